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
    /// Register a folder as a dataset: one sub-folder per item (e.g. one per DICOM series,
    /// named by its series UID). Jobs see it read-only at /input.
    Add {
        /// The dataset's name, as peers and workflows name it.
        name: String,
        /// The folder.
        folder: PathBuf,
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
        (DatasetCommand::Add { name, folder }, Some(api)) => {
            let folder = std::path::absolute(&folder)
                .with_context(|| format!("cannot resolve {}", folder.display()))?;
            let v: DatasetView = api.post("/v1/datasets", &AddDatasetRequest { name, folder })?;
            print_dataset_added(&v);
        }
        (DatasetCommand::Add { name, folder }, None) => {
            let store = admin::NodeFiles::open(dir)?.store()?;
            let existing = store.datasets()?;
            let (record, provider, scan) = datasets::check_new(&name, &folder, &existing, now())?;
            store.write(vec![crate::store::WriteOp::PutDataset(record)])?;
            print_dataset_added(&DatasetView::new(
                &name,
                &datasets::DatasetEntry { provider, scan: Some(scan), error: None },
            ));
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
                println!("No datasets; add one with `kaapana-node dataset add NAME FOLDER`.");
            }
            for v in views {
                match (v.items, v.bytes) {
                    (Some(items), Some(bytes)) => println!(
                        "{:<24} {items:>7} items {:>12} bytes  {} {}",
                        v.name, bytes, v.provider, v.location
                    ),
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

fn print_dataset_added(v: &DatasetView) {
    println!(
        "Dataset {} registered: {} items, {} bytes, at {}",
        v.name,
        v.items.unwrap_or(0),
        v.bytes.unwrap_or(0),
        v.location
    );
    println!(
        "Peers whose policy allows it see its name and size (`instance add --allow-dataset`)."
    );
}
