//! `kaapana-node image ...`: container images for jobs run here.

use std::path::PathBuf;

use clap::Subcommand;

use crate::admin;
use crate::cli::{CliError, bail};
use crate::data_dir::DataDir;

/// `kaapana-node image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image layout tarball (for sites without registry access); prints the
    /// digest that jobs use to name it.
    Import {
        /// The tarball (`oci-layout`, `index.json`, `blobs/sha256/...`).
        file: PathBuf,
    },
    /// List the images available to jobs.
    List,
}

/// Runs an `image` command on the configured containerd, or the node's own (started for
/// the command if the daemon does not run).
pub async fn image_command(dir: &DataDir, cmd: ImageCommand) -> Result<(), CliError> {
    use crate::config::ExecutorKindSetting;
    use crate::executor::{Containerd, ContainerdExecutor, ExecutorConfig, lifecycle};
    let node = admin::NodeFiles::open(dir)?;
    match node.config.executor.kind {
        ExecutorKindSetting::None => {
            bail!("this instance runs no executor (`[executor] kind = \"none\"` in config.toml)")
        }
        ExecutorKindSetting::Kubernetes => bail!(
            "this instance runs jobs on Kubernetes, whose nodes pull images by digest from \
             `[executor.kubernetes] image_repository`: push the image there instead"
        ),
        ExecutorKindSetting::Airflow => bail!(
            "this instance runs Airflow DAGs (`[executor] kind = \"airflow\"`), not container \
             images: its jobs name DAG ids"
        ),
        ExecutorKindSetting::Containerd => {}
    }
    // The configured containerd, or the node's own one: running if the daemon runs, else
    // started for this command and stopped afterwards.
    let containerd = match &node.config.executor.containerd_address {
        Some(socket) => Containerd::connect(socket).await?,
        None => match Containerd::connect(lifecycle::socket_path_for(dir.root())).await {
            Ok(c) => c,
            Err(_) => Containerd::spawn(dir.root()).await?,
        },
    };
    let config = ExecutorConfig {
        scratch_dir: dir.root().join("executor-scratch"),
        ..ExecutorConfig::default()
    };
    let executor = ContainerdExecutor::new(containerd.channel(), config).await?;
    let result = match cmd {
        ImageCommand::Import { file } => executor.import_image(&file).await.map(|digest| {
            println!("Imported {}", file.display());
            println!("  image: {digest}");
            println!(
                "Jobs name it by this digest, e.g. `kaapana-node job submit --image {digest} ...`."
            );
        }),
        ImageCommand::List => executor.list_images().await.map(|images| {
            if images.is_empty() {
                println!("No images. Import one with `kaapana-node image import FILE.tar`.");
            }
            for i in images {
                println!("{}  {}", i.digest, i.name);
            }
        }),
    };
    containerd.shutdown().await;
    Ok(result?)
}
