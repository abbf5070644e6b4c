//! `kaapana-node dataset ...`: the datasets at this site.

use std::path::PathBuf;

use clap::Subcommand;

use crate::admin;
use crate::api::views::{AddDatasetRequest, DatasetView};
use crate::cli::{CliError, Context as _, now};
use crate::client::ApiClient;
use crate::data_dir::DataDir;
use crate::datasets;

/// `kaapana-node dataset ...`.
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Register a dataset: a folder with one sub-folder per item (e.g. one per DICOM series,
    /// named by its series UID), or series of the site's PACS over DICOMweb (`--dicomweb URL`
    /// with `--series`, `--study` or `--query`), fetched when a job starts. Jobs see it
    /// read-only at /input, one sub-folder per series.
    #[command(group = clap::ArgGroup::new("source").required(true).args(["folder", "dicomweb"]))]
    Add {
        /// The dataset's name, as peers and workflows name it.
        name: String,
        /// The folder.
        folder: Option<PathBuf>,
        /// The PACS's DICOMweb URL (QIDO-RS and WADO-RS), e.g. http://pacs:8042/dicom-web.
        #[arg(long, value_name = "URL")]
        dicomweb: Option<String>,
        /// Series by SeriesInstanceUID.
        #[arg(long, value_name = "UID", num_args = 1.., requires = "dicomweb", conflicts_with_all = ["study", "query"])]
        series: Vec<String>,
        /// Every series of these studies (StudyInstanceUID).
        #[arg(long, value_name = "UID", num_args = 1.., requires = "dicomweb", conflicts_with = "query")]
        study: Vec<String>,
        /// Every series matching QIDO-RS attribute values, e.g.
        /// 'Modality=CT&BodyPartExamined=CHEST'.
        #[arg(long, value_name = "TERMS", requires = "dicomweb")]
        query: Option<String>,
        /// The PACS user (HTTP basic authentication, with --pacs-password-file).
        #[arg(long, value_name = "USER", requires_all = ["dicomweb", "pacs_password_file"])]
        pacs_user: Option<String>,
        /// A file holding the PACS password (mode 0600; read each time the PACS is used).
        #[arg(long, value_name = "FILE", requires = "pacs_user")]
        pacs_password_file: Option<PathBuf>,
        /// A file holding a bearer token for the PACS (mode 0600; read each time it is used).
        #[arg(long, value_name = "FILE", requires = "dicomweb", conflicts_with = "pacs_user")]
        pacs_token_file: Option<PathBuf>,
    },
    /// List the registered datasets with their item counts and sizes.
    List,
    /// Forget a dataset (its files stay where they are).
    Remove {
        /// The dataset's name.
        name: String,
    },
}

/// Runs a `dataset` command: through the daemon if one runs, else on the data directory.
pub fn dataset_command(dir: &DataDir, cmd: DatasetCommand) -> Result<(), CliError> {
    // With a daemon running, changes go through it (it holds the store and tells the peers).
    let daemon = ApiClient::connect(dir);
    match (cmd, daemon) {
        (
            DatasetCommand::Add {
                name,
                folder,
                dicomweb,
                series,
                study,
                query,
                pacs_user,
                pacs_password_file,
                pacs_token_file,
            },
            daemon,
        ) => {
            let absolute = |p: PathBuf| {
                std::path::absolute(&p).with_context(|| format!("cannot resolve {}", p.display()))
            };
            let selection = match dicomweb {
                Some(url) => Some(datasets::DicomWebSelection {
                    url,
                    series,
                    studies: study,
                    query,
                    user: pacs_user,
                    password_file: pacs_password_file.map(absolute).transpose()?,
                    token_file: pacs_token_file.map(absolute).transpose()?,
                }),
                None => None,
            };
            let folder = folder.map(absolute).transpose()?;
            match daemon {
                Some(api) => {
                    let req = AddDatasetRequest { name, folder, dicomweb: selection };
                    let v: DatasetView = api.post("/v1/datasets", &req)?;
                    print_dataset_added(&v);
                }
                None => {
                    let store = admin::NodeFiles::open(dir)?.store()?;
                    let existing = store.datasets()?;
                    let (record, provider, scan) = match (folder, selection) {
                        (_, Some(selection)) => {
                            datasets::check_new_dicomweb(&name, &selection, &existing, now())?
                        }
                        (Some(folder), None) => {
                            datasets::check_new(&name, &folder, &existing, now())?
                        }
                        (None, None) => {
                            return Err(datasets::DatasetError::BadRequest(
                                "give a FOLDER or --dicomweb URL".into(),
                            )
                            .into());
                        }
                    };
                    store.write(vec![crate::store::WriteOp::PutDataset(record)])?;
                    print_dataset_added(&DatasetView::new(
                        &name,
                        &datasets::DatasetEntry { provider, scan: Some(scan), error: None },
                    ));
                }
            }
        }
        (DatasetCommand::List, daemon) => {
            let views: Vec<DatasetView> = match daemon {
                Some(api) => api.get("/v1/datasets")?,
                None => {
                    let store = admin::NodeFiles::open(dir)?.store()?;
                    store
                        .datasets()?
                        .iter()
                        .map(|r| {
                            let entry = match datasets::provider_for(r) {
                                Ok(p) => match p.scan() {
                                    Ok(s) => datasets::DatasetEntry {
                                        provider: p,
                                        scan: Some(s),
                                        error: None,
                                    },
                                    Err(e) => datasets::DatasetEntry {
                                        provider: p,
                                        scan: None,
                                        error: Some(e.to_string()),
                                    },
                                },
                                Err(e) => {
                                    return DatasetView {
                                        name: r.name.clone(),
                                        provider: r.provider.clone(),
                                        location: r.location.clone(),
                                        items: None,
                                        bytes: None,
                                        modalities: Vec::new(),
                                        selection: None,
                                        error: Some(e.to_string()),
                                    };
                                }
                            };
                            DatasetView::new(&r.name, &entry)
                        })
                        .collect()
                }
            };
            if views.is_empty() {
                println!(
                    "No datasets; add one with `kaapana-node dataset add NAME FOLDER` or `dataset add NAME --dicomweb URL --query Modality=CT`."
                );
            }
            for v in views {
                match (v.items, v.bytes) {
                    (Some(items), Some(bytes)) => {
                        let mut extra = String::new();
                        if !v.modalities.is_empty() {
                            extra.push_str(&format!("  modalities {}", modalities(&v.modalities)));
                        }
                        if let Some(s) = &v.selection {
                            extra.push_str(&format!("  ({s})"));
                        }
                        println!(
                            "{:<24} {items:>7} items {:>12} bytes  {} {}{extra}",
                            v.name, bytes, v.provider, v.location
                        );
                    }
                    _ => println!("{:<24} unreadable: {}", v.name, v.error.unwrap_or_default()),
                }
            }
        }
        (DatasetCommand::Remove { name }, Some(api)) => {
            let _: serde_json::Value = api.delete(&format!("/v1/datasets/{name}"))?;
            println!("Dataset {name} removed (its files stay).");
        }
        (DatasetCommand::Remove { name }, None) => {
            let store = admin::NodeFiles::open(dir)?.store()?;
            if !store.datasets()?.iter().any(|d| d.name == name) {
                return Err(datasets::DatasetError::NotFound(name).into());
            }
            store.write(vec![crate::store::WriteOp::RemoveDataset(name.clone())])?;
            println!("Dataset {name} removed (its files stay).");
        }
    }
    Ok(())
}

/// `CT 3, MR 1`.
pub(crate) fn modalities(m: &[(String, u64)]) -> String {
    m.iter().map(|(m, n)| format!("{m} {n}")).collect::<Vec<_>>().join(", ")
}

fn print_dataset_added(v: &DatasetView) {
    let size = if v.provider == datasets::DicomWebDataset::KIND {
        "bytes of pixel data (estimated)"
    } else {
        "bytes"
    };
    println!(
        "Dataset {} registered: {} items, {} {size}, at {}",
        v.name,
        v.items.unwrap_or(0),
        v.bytes.unwrap_or(0),
        v.location
    );
    if !v.modalities.is_empty() {
        println!("Modalities: {}", modalities(&v.modalities));
    }
    if let Some(s) = &v.selection {
        println!("Selected by {s}; the series are fetched from the PACS when a job starts.");
    }
    println!(
        "Peers whose policy allows it see its name and size (`instance add --allow-dataset`)."
    );
}
