//! The command line of `kaapana-node`: its flags ([`Cli`], clap) and each subcommand, as
//! library functions that the binary (and tests) call.
//!
//! [`run`] executes a parsed command line; the command groups are in [`instance`],
//! [`dataset`], [`image`], [`job`] and [`workflow`], the demo in [`crate::demo`]. What a
//! command prints goes to stdout (and stderr); failures are a [`CliError`], whose message and
//! chain of causes is what the binary shows after `error: `. Commands that change or show live
//! state use the running daemon's API ([`crate::client`]) when it answers, and the data
//! directory directly otherwise.

use std::convert::Infallible;
use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use kaapana_protocol::{Timestamp, ValidationError};

use crate::admin::{self, AdminError, DEFAULT_VALID_DAYS, InitOptions};
use crate::client::ClientError;
use crate::daemon::DaemonError;
use crate::data_dir::DataDir;
use crate::datasets::DatasetError;
use crate::executor::ExecError;
use crate::store::StoreError;

pub mod audit;
pub mod dataset;
pub mod image;
pub mod instance;
pub mod job;
pub mod workflow;

pub use audit::AuditCommand;
pub use dataset::DatasetCommand;
pub use image::ImageCommand;
pub use instance::{InstanceCommand, PolicyArgs};
pub use job::JobCommand;
pub use workflow::WorkflowCommand;

use dataset::dataset_command;
use image::image_command;
use instance::instance_command;
use job::job_command;
use workflow::workflow_command;

/// Why a command failed: the message a user sees (with its causes, each after `: `).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// An administrative operation on the data directory failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A call to the running daemon's API failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon could not start.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The executor (containerd) failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// A dataset was refused or is unknown.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A name or value is invalid.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// A file or the terminal could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A plain message for the user.
    #[error("{0}")]
    Message(String),
    /// What was being done when `source` happened.
    #[error("{context}")]
    Context {
        /// What was being done, e.g. `cannot read bundle a.bundle`.
        context: String,
        /// What went wrong.
        #[source]
        source: Box<CliError>,
    },
    /// A step of the demo failed at one of its sites (whose log the demo shows).
    #[error("at {site}")]
    AtSite {
        /// The site's name.
        site: String,
        /// What went wrong there.
        #[source]
        source: Box<CliError>,
    },
}

impl CliError {
    /// This error with `context` in front, as [`Context::context`] does for results.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self::Context { context: context.to_string(), source: Box::new(self) }
    }
}

impl From<Infallible> for CliError {
    fn from(e: Infallible) -> Self {
        match e {}
    }
}

/// Returns early with a [`CliError::Message`] formatted like `format!`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::cli::CliError::Message(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// Context for a failure: a message in front of the error (for a `Result`), or the message
/// as the error (for an `Option` that is `None`).
pub trait Context<T> {
    /// Puts `context` in front of the error.
    fn context(self, context: impl fmt::Display) -> Result<T, CliError>;
    /// Puts `f()` in front of the error; `f` runs only on failure.
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T, CliError>;
}

impl<T, E: Into<CliError>> Context<T> for Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T, CliError> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T, CliError> {
        self.map_err(|e| e.into().context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl fmt::Display) -> Result<T, CliError> {
        self.ok_or_else(|| CliError::Message(context.to_string()))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T, CliError> {
        self.ok_or_else(|| CliError::Message(f().to_string()))
    }
}

/// Federated peer-to-peer runner for Kaapana: instance identity, certificate exchange between
/// sites, and (soon) signed workflows and jobs that run where the data is.
#[derive(Debug, Parser)]
#[command(name = "kaapana-node", version, propagate_version = true)]
pub struct Cli {
    /// The node's data directory (key, certificate, configuration, store).
    #[arg(long, global = true, env = "KAAPANA_NODE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this instance: Ed25519 key (mode 0600), self-signed instance certificate,
    /// commented config.toml and API token.
    Init {
        /// The instance's name, shown to other sites and written into its certificate (CN).
        #[arg(long)]
        name: String,
        /// A multiaddress to listen on (repeatable); default: TCP and QUIC on port 7400.
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<String>,
        /// An address peers should dial, written into exported bundles (repeatable);
        /// default: the listen addresses.
        #[arg(long, value_name = "MULTIADDR")]
        advertise: Vec<String>,
        /// Address of the local HTTP API; default 127.0.0.1:7401.
        #[arg(long, value_name = "ADDR")]
        api_listen: Option<String>,
        /// Validity of the instance certificate in days.
        #[arg(long, default_value_t = DEFAULT_VALID_DAYS)]
        valid_days: u32,
    },
    /// Run the node daemon: the peer-to-peer network with the registered instances, the
    /// outbox, and the local HTTP API. Stops gracefully on SIGINT or SIGTERM.
    Run,
    /// Run a relay-only node (e.g. a consortium's, on a public address): the daemon with its
    /// relay service on (`network.relay_service`) and no executor. It relays circuits between
    /// the instances registered with it, and only them; the traffic it forwards is TLS between
    /// the two instances, which it cannot read. Register it at the sites like any instance,
    /// and name it in their `network.relays`.
    Relay,
    /// Show this instance's name, id, certificate fingerprint and validity.
    Info,
    /// Register other instances by certificate exchange, list and remove them.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Run a federation CA, for consortia that provision instance certificates centrally.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Submit jobs to other instances; list jobs; approve or reject jobs waiting here. Needs
    /// a running daemon.
    #[command(subcommand)]
    Job(JobCommand),
    /// Container images for jobs run here (in containerd).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Cross-site workflows this instance owns: submit a workflow file, follow its jobs at
    /// their runner-instances, cancel it, collect its results. Needs a running daemon.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Datasets at this site: folders with one sub-folder per item (DICOM series), or series
    /// of the site's PACS over DICOMweb.
    /// Peers see names, item counts and sizes, never contents or item identifiers.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// This instance's audit log: every registration, policy change, job decision, job start
    /// and result sent or stored, hash-chained and signed with the instance key.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The demo: three sites on this machine (each its own data directory, daemon, containerd
    /// and synthetic dataset) register each other by certificate exchange and run a federated
    /// statistics workflow; the merged result is checked against the data. Then they train a
    /// model together (FedAvg over `--training-rounds` rounds), whose loss must go down. Needs
    /// root.
    Demo {
        /// How many sites (site-a, site-b, ...).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=6))]
        sites: u8,
        /// Work in DIR (new or empty) and keep it afterwards (data directories, daemon logs,
        /// datasets, workflow file, results); default: a temporary directory, removed.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
        /// The statically linked `kaapana-stats` job program for the job image (scripts/demo
        /// builds it); default: `<target>/job-programs/x86_64-unknown-linux-gnu/job-program/`
        /// beside this program's target folder.
        #[arg(long, value_name = "PATH", env = "KAAPANA_STATS_PROGRAM")]
        stats_program: Option<PathBuf>,
        /// The statically linked `kaapana-fedavg` job program for the job image (scripts/demo
        /// builds it); default: `kaapana-fedavg` in the folder of the `kaapana-stats` program.
        #[arg(long, value_name = "PATH", env = "KAAPANA_FEDAVG_PROGRAM")]
        fedavg_program: Option<PathBuf>,
        /// Rounds of the FedAvg training after the statistics; 0 skips the training.
        #[arg(long, value_name = "N", default_value_t = 10,
              value_parser = clap::value_parser!(u32).range(0..=100))]
        training_rounds: u32,
    },
}

/// `kaapana-node ca ...`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a federation CA (ca.key, mode 0600, and ca.crt) in a directory.
    Create {
        /// The CA's name (CN).
        #[arg(long)]
        name: String,
        /// The directory to write to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        valid_days: u32,
    },
    /// Revoke instances in the federation: write the CA's next revocation list (signed with
    /// the CA key, numbered one above the list in --list, whose entries it keeps). Import it
    /// at any site with `instance revocations --import FILE`; it spreads to the others.
    Revoke {
        /// The CA's directory (as written by `ca create`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The revocation list file: read if it exists, then replaced by the next list.
        #[arg(long, value_name = "FILE")]
        list: PathBuf,
        /// An exchange bundle of an instance to revoke (repeatable).
        #[arg(long, value_name = "FILE")]
        bundle: Vec<PathBuf>,
        /// The instance id of an instance to revoke (repeatable).
        #[arg(long, value_name = "ID")]
        instance: Vec<String>,
        /// Why (kept in every site's audit log).
        #[arg(long, default_value = "revoked by the federation CA")]
        reason: String,
        /// How long the list is passed on (re-issue it before; at most 400).
        #[arg(long, default_value_t = 30)]
        valid_days: u32,
    },
    /// Re-issue this instance's certificate from a federation CA (same key and name) and
    /// trust that CA from now on: peers' certificates must then be issued by it too.
    Sign {
        /// The CA's directory (as written by `ca create`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Validity of the new instance certificate in days.
        #[arg(long, default_value_t = DEFAULT_VALID_DAYS)]
        valid_days: u32,
    },
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// Runs one command line: what `kaapana-node` does after parsing its flags. Prints to stdout
/// (and to stderr what is not the command's output); errors are for the caller to print.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let dir = DataDir::new(cli.data_dir.unwrap_or_else(DataDir::default_root));
    match cli.command {
        Command::Init { name, listen, advertise, api_listen, valid_days } => {
            let opts = InitOptions {
                name: name.clone(),
                listen: if listen.is_empty() { None } else { Some(listen) },
                advertise,
                api_listen,
                valid_days,
            };
            let report = admin::init(&dir, &opts, now())?;
            println!("Initialised instance {name} in {}", dir.root().display());
            println!("  instance id:  {}", report.instance_id);
            println!("  fingerprint:  {}", report.fingerprint);
            println!("  valid until:  {}", report.not_after);
            println!(
                "Next: `kaapana-node instance export --out {name}.bundle` and send it to the other sites."
            );
        }
        Command::Run | Command::Relay => {
            let relay_only = matches!(cli.command, Command::Relay);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("kaapana-node")
                .build()?;
            runtime.block_on(async {
                let daemon = if relay_only {
                    crate::daemon::Daemon::start_relay(&dir).await?
                } else {
                    crate::daemon::Daemon::start(&dir).await?
                };
                println!(
                    "kaapana-node {} running; API on {}; dashboard at http://{}/ (log in with the api-token file); stop with Ctrl-C",
                    daemon.state().name,
                    daemon.api_addr(),
                    daemon.api_addr()
                );
                daemon.run_until_signal().await?;
                Ok::<_, CliError>(())
            })?;
        }
        Command::Info => {
            let node = admin::NodeFiles::open(&dir)?;
            let c = &node.certificate;
            println!("name:         {}", c.name());
            println!("instance id:  {}", c.instance_id());
            println!("fingerprint:  {}", c.fingerprint());
            println!(
                "issuer:       {}",
                if c.is_self_signed() { "self-signed".to_owned() } else { c.issuer_name() }
            );
            println!("valid:        {} to {}", c.not_before(), c.not_after());
            println!("data dir:     {}", dir.root().display());
        }
        Command::Instance(cmd) => instance_command(&dir, cmd)?,
        Command::Dataset(cmd) => dataset_command(&dir, cmd)?,
        Command::Audit(cmd) => audit::audit_command(&dir, cmd)?,
        Command::Workflow(cmd) => workflow_command(&dir, cmd)?,
        Command::Demo { sites, keep, stats_program, fedavg_program, training_rounds } => {
            let programs =
                crate::demo::JobPrograms { stats: stats_program, fedavg: fedavg_program };
            crate::demo::run(usize::from(sites), keep, programs, training_rounds)?
        }
        Command::Job(cmd) => job_command(&dir, cmd)?,
        Command::Image(cmd) => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(image_command(&dir, cmd))?;
        }
        Command::Ca(CaCommand::Create { name, out, valid_days }) => {
            let ca = admin::ca_create(&out, &name, valid_days, now())?;
            println!("Created federation CA {name} in {}", out.display());
            println!("  fingerprint:  {}", ca.certificate().fingerprint());
        }
        Command::Ca(CaCommand::Revoke { ca, list, bundle, instance, reason, valid_days }) => {
            let (written, added) =
                admin::ca_revoke(&ca, &list, &bundle, &instance, &reason, valid_days, now())?;
            let p = written.payload();
            println!(
                "Wrote revocation list {} of {} to {} ({} revoked, {added} new)",
                p.number,
                p.federation,
                list.display(),
                p.revoked.len()
            );
            println!("  Import it at a site: kaapana-node instance revocations --import FILE");
        }
        Command::Ca(CaCommand::Sign { ca, valid_days }) => {
            let cert = admin::ca_sign(&dir, &ca, valid_days, now())?;
            println!("Instance certificate re-issued by {}", cert.issuer_name());
            println!("  fingerprint:  {}", cert.fingerprint());
            println!("  valid until:  {}", cert.not_after());
            println!(
                "Export a new bundle: peers registered with the old certificate must re-add it."
            );
        }
    }
    Ok(())
}
