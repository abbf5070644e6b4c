//! `kaapana-node`: the command line of a Kaapana instance's federation node.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kaapana_federation::{AllowList, Execution, InstanceRef, Policy};
use kaapana_node::admin::{self, DEFAULT_VALID_DAYS, InitOptions};
use kaapana_node::api::views::{
    AddDatasetRequest, AddInstanceRequest, DatasetView, InstanceView, JobsView, OwnerJobView,
    RejectRequest, ResultView, RunnerJobView, SubmitJobRequest, SubmitWorkflowRequest,
    WorkflowView,
};
use kaapana_node::client::ApiClient;
use kaapana_node::data_dir::DataDir;
use kaapana_node::datasets;
use kaapana_protocol::Timestamp;

mod demo;

/// Federated peer-to-peer runner for Kaapana: instance identity, certificate exchange between
/// sites, and (soon) signed workflows and jobs that run where the data is.
#[derive(Debug, Parser)]
#[command(name = "kaapana-node", version, propagate_version = true)]
struct Cli {
    /// The node's data directory (key, certificate, configuration, store).
    #[arg(long, global = true, env = "KAAPANA_NODE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Datasets at this site: named folders with one sub-folder per item (DICOM series).
    /// Peers see names, item counts and sizes, never contents or item identifiers.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// The demo: three sites on this machine (each its own data directory, daemon, containerd
    /// and synthetic dataset) register each other by certificate exchange and run a federated
    /// statistics workflow; the merged result is checked against the data. Needs root.
    Demo {
        /// How many sites (site-a, site-b, ...).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=6))]
        sites: u8,
        /// Work in DIR (new or empty) and keep it afterwards (data directories, daemon logs,
        /// datasets, workflow file, results); default: a temporary directory, removed.
        #[arg(long, value_name = "DIR")]
        keep: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum WorkflowCommand {
    /// Plan, sign and start a workflow from its TOML file (format: README, "Workflow files").
    Submit {
        /// The workflow file.
        file: PathBuf,
        /// Follow its jobs until it ends; exit 0 only if it finished.
        #[arg(long)]
        wait: bool,
    },
    /// List the workflows this instance owns.
    List,
    /// Show a workflow: each job with its step, runner, state and result.
    Show {
        /// The workflow id.
        id: String,
    },
    /// Follow a workflow's jobs until it ends; exit 0 only if it finished.
    Wait {
        /// The workflow id.
        id: String,
    },
    /// Cancel a workflow: its jobs stop at every runner-instance.
    Cancel {
        /// The workflow id.
        id: String,
    },
    /// Unpack the result bundle of each of its finished jobs into DIR/<job name>/.
    Result {
        /// The workflow id.
        id: String,
        /// The folder to unpack into (created if missing; must be empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DatasetCommand {
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

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import an OCI image layout tarball (for sites without registry access); prints the
    /// digest that jobs use to name it.
    Import {
        /// The tarball (`oci-layout`, `index.json`, `blobs/sha256/...`).
        file: PathBuf,
    },
    /// List the images available to jobs.
    List,
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Sign a job for a runner-instance and queue it; it is delivered as soon as the runner
    /// is reachable. The command line follows `--`.
    Submit {
        /// The runner-instance (name or id).
        #[arg(long)]
        to: String,
        /// The workflow it belongs to (the runner's policy must allow it).
        #[arg(long)]
        workflow: String,
        /// The job's name.
        #[arg(long)]
        name: String,
        /// The image by digest: sha256:<64 hex> (tags are refused).
        #[arg(long)]
        image: String,
        /// A dataset at the runner.
        #[arg(long)]
        dataset: Option<String>,
        /// An environment variable NAME=value (repeatable).
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Wall-clock limit in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u32,
        /// CPU limit in millicores (0 = the runner's default).
        #[arg(long, default_value_t = 0)]
        cpu_millis: u32,
        /// Memory limit in MiB (0 = the runner's default).
        #[arg(long, default_value_t = 0)]
        memory_mib: u64,
        /// The command line; empty = the image's default.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List jobs this instance runs for others and jobs it submitted.
    List {
        /// Only jobs waiting here for approval.
        #[arg(long)]
        pending: bool,
    },
    /// Approve a job that waits for local approval: it is scheduled and runs.
    Approve {
        /// The job id.
        id: String,
    },
    /// Reject a job that waits for local approval: it fails with your reason, which its owner
    /// sees.
    Reject {
        /// The job id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Unpack a submitted job's verified result bundle (its `/output`) into a folder.
    Result {
        /// The job id.
        id: String,
        /// The folder to unpack into (created if missing; must be empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Show a job's log: the runner's copy for a submitted job (if its policy shares logs with
    /// this instance), or the local log of a job run here.
    Logs {
        /// The job id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum InstanceCommand {
    /// Write this instance's exchange bundle (certificate, name, addresses, signed) for
    /// another site's admin to `instance add`.
    Export {
        /// The file to write; default: standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Register another instance from its exchange bundle. Confirm the printed fingerprint
    /// with the other site's admin by phone (or pass --expect-fingerprint). Both sites must
    /// register each other before they can connect.
    Add {
        /// The bundle file the other site exported.
        file: PathBuf,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Refuse the bundle unless its certificate has this fingerprint (as confirmed out of
        /// band; spaces and colons are ignored).
        #[arg(long, value_name = "FINGERPRINT")]
        expect_fingerprint: Option<String>,
    },
    /// List the registered instances and their policies.
    List,
    /// Unregister an instance, by name or instance id.
    Remove {
        /// Name or instance id (PeerId).
        instance: String,
    },
}

/// What a registered instance may do here. Without flags it may do nothing.
#[derive(Debug, Args)]
struct PolicyArgs {
    /// A workflow this instance may run here (repeatable).
    #[arg(long, value_name = "WORKFLOW")]
    allow_workflow: Vec<String>,
    /// Allow every workflow.
    #[arg(long, conflicts_with = "allow_workflow")]
    allow_any_workflow: bool,
    /// A dataset this instance's jobs may read here (repeatable).
    #[arg(long, value_name = "DATASET")]
    allow_dataset: Vec<String>,
    /// Allow every dataset.
    #[arg(long, conflicts_with = "allow_dataset")]
    allow_any_dataset: bool,
    /// Run this instance's jobs without local approval (default: each job waits for
    /// `job approve`).
    #[arg(long)]
    auto_execute: bool,
    /// Send job logs back to this instance with its results.
    #[arg(long)]
    share_logs: bool,
}

impl PolicyArgs {
    fn to_policy(&self) -> anyhow::Result<Policy> {
        let list = |any: bool, names: &[String], what: &'static str| -> anyhow::Result<AllowList> {
            if any {
                return Ok(AllowList::Any);
            }
            for n in names {
                kaapana_protocol::validate_name(what, n)?;
            }
            Ok(AllowList::Only(names.iter().cloned().collect::<BTreeSet<_>>()))
        };
        Ok(Policy {
            allowed_workflows: list(self.allow_any_workflow, &self.allow_workflow, "workflow")?,
            allowed_datasets: list(self.allow_any_dataset, &self.allow_dataset, "dataset")?,
            execution: if self.auto_execute { Execution::Automatic } else { Execution::Approval },
            share_logs: self.share_logs,
        })
    }
}

#[derive(Debug, Subcommand)]
enum CaCommand {
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

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain of causes, without a backtrace: these are messages for admins.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
        Command::Run => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("kaapana-node")
                .build()?;
            runtime.block_on(async {
                let daemon = kaapana_node::daemon::Daemon::start(&dir).await?;
                println!(
                    "kaapana-node {} running; API on {}; stop with Ctrl-C",
                    daemon.state().name,
                    daemon.api_addr()
                );
                daemon.run_until_signal().await?;
                anyhow::Ok(())
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
        Command::Workflow(cmd) => workflow_command(&dir, cmd)?,
        Command::Demo { sites, keep } => demo::run(usize::from(sites), keep)?,
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

fn instance_command(dir: &DataDir, cmd: InstanceCommand) -> anyhow::Result<()> {
    // With a daemon running, changes go through it (it holds the store and the connections).
    let daemon = ApiClient::connect(dir);
    match cmd {
        InstanceCommand::Export { out } => {
            let (text, fingerprint) = match &daemon {
                Some(api) => {
                    let text = api.get_text("/v1/bundle")?;
                    (text, admin::NodeFiles::open(dir)?.certificate.fingerprint())
                }
                None => admin::export_bundle(dir, now())?,
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, &text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    println!("Wrote {}", path.display());
                    println!("  fingerprint:  {fingerprint}");
                }
                None => {
                    std::io::stdout().write_all(text.as_bytes())?;
                    eprintln!("fingerprint: {fingerprint}");
                }
            }
        }
        InstanceCommand::Add { file, policy, expect_fingerprint } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read bundle {}", file.display()))?;
            let policy = policy.to_policy()?;
            let view = match &daemon {
                Some(api) => api.add_instance(&AddInstanceRequest {
                    bundle: text,
                    policy,
                    expect_fingerprint: expect_fingerprint.clone(),
                })?,
                None => {
                    let inst = admin::add_instance(
                        dir,
                        &text,
                        policy,
                        expect_fingerprint.as_deref(),
                        now(),
                    )?;
                    InstanceView::offline(&inst, 0)
                }
            };
            println!("Registered instance {} ({})", view.name, view.instance_id);
            println!("  fingerprint:  {}", view.fingerprint);
            if expect_fingerprint.is_none() {
                println!(
                    "  Confirm this fingerprint with {}'s admin out of band (e.g. by phone).",
                    view.name
                );
            }
            print_policy(&view.policy);
            println!(
                "  Registration is mutual: {} must also add this instance's bundle.",
                view.name
            );
        }
        InstanceCommand::List => {
            let all = match &daemon {
                Some(api) => api.instances()?,
                None => {
                    let node = admin::NodeFiles::open(dir)?;
                    let store = node.store()?;
                    let mut views = Vec::new();
                    for i in admin::list_instances_in(&store)? {
                        views.push(InstanceView::offline(&i, store.outbox_depth(&i.instance_id)?));
                    }
                    views
                }
            };
            if all.is_empty() {
                println!("No instances registered. Add one with `kaapana-node instance add FILE`.");
                return Ok(());
            }
            for (n, v) in all.iter().enumerate() {
                if n > 0 {
                    println!();
                }
                print_instance(v);
            }
        }
        InstanceCommand::Remove { instance } => {
            let removed = match &daemon {
                Some(api) => api.remove_instance(&instance)?,
                None => {
                    let which: InstanceRef = instance.parse()?;
                    InstanceView::offline(&admin::remove_instance(dir, &which)?, 0)
                }
            };
            println!("Removed instance {} ({})", removed.name, removed.instance_id);
        }
    }
    Ok(())
}

async fn image_command(dir: &DataDir, cmd: ImageCommand) -> anyhow::Result<()> {
    use kaapana_node::config::ExecutorKindSetting;
    use kaapana_node::executor::{Containerd, ContainerdExecutor, ExecutorConfig, lifecycle};
    let node = admin::NodeFiles::open(dir)?;
    if node.config.executor.kind == ExecutorKindSetting::None {
        anyhow::bail!(
            "this instance runs no executor (`[executor] kind = \"none\"` in config.toml)"
        );
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

fn dataset_command(dir: &DataDir, cmd: DatasetCommand) -> anyhow::Result<()> {
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
            store.write(vec![kaapana_node::store::WriteOp::PutDataset(record)])?;
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
                anyhow::bail!(datasets::DatasetError::NotFound(name));
            }
            store.write(vec![kaapana_node::store::WriteOp::RemoveDataset(name.clone())])?;
            println!("Dataset {name} removed (its files stay).");
        }
    }
    Ok(())
}

fn workflow_command(dir: &DataDir, cmd: WorkflowCommand) -> anyhow::Result<()> {
    let Some(api) = ApiClient::connect(dir) else {
        anyhow::bail!(
            "no daemon runs for {}: start it with `kaapana-node run` (workflows need the network)",
            dir.root().display()
        );
    };
    match cmd {
        WorkflowCommand::Submit { file, wait } => {
            let toml = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let w: WorkflowView = api
                .post("/v1/workflows", &SubmitWorkflowRequest { toml })
                .with_context(|| format!("workflow file {}", file.display()))?;
            println!("Submitted workflow {} ({}): {} jobs", w.name, w.workflow_id, w.jobs.len());
            print_workflow(&w);
            if wait {
                follow_workflow(&api, &w.workflow_id)?;
            }
        }
        WorkflowCommand::List => {
            let all: Vec<WorkflowView> = api.get("/v1/workflows")?;
            if all.is_empty() {
                println!("No workflows; submit one with `kaapana-node workflow submit FILE.toml`.");
            }
            for w in all {
                println!(
                    "{}  {:<28} {:<9} {}  (submitted {})",
                    w.workflow_id, w.name, w.state, w.progress, w.created_at
                );
            }
        }
        WorkflowCommand::Show { id } => {
            let w: WorkflowView = api.get(&format!("/v1/workflows/{id}"))?;
            println!("Workflow {} ({})", w.name, w.workflow_id);
            print_workflow(&w);
        }
        WorkflowCommand::Wait { id } => follow_workflow(&api, &id)?,
        WorkflowCommand::Cancel { id } => {
            let w: WorkflowView =
                api.post(&format!("/v1/workflows/{id}/cancel"), &serde_json::json!({}))?;
            println!("Workflow {} ({}) {}", w.name, w.workflow_id, w.state);
        }
        WorkflowCommand::Result { id, out } => {
            let w: WorkflowView = api.get(&format!("/v1/workflows/{id}"))?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            if std::fs::read_dir(&out)?.next().is_some() {
                anyhow::bail!("{} is not empty; choose an empty folder", out.display());
            }
            let mut n = 0;
            for j in w.jobs.iter().filter(|j| j.result.is_some()) {
                let r: ResultView = api.get(&format!("/v1/jobs/{}/result", j.job_id))?;
                let Some(path) = r.bundle.path else { continue };
                let into = out.join(&j.name);
                std::fs::create_dir_all(&into)?;
                let file =
                    std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
                tar::Archive::new(file)
                    .unpack(&into)
                    .with_context(|| format!("cannot unpack into {}", into.display()))?;
                println!("  {:<28} from {:<16} -> {}", j.name, j.runner, into.display());
                n += 1;
            }
            println!("Unpacked {n} verified result bundles of workflow {} ({})", w.name, w.state);
        }
    }
    Ok(())
}

fn print_workflow(w: &WorkflowView) {
    let why = w.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    println!("  state: {}{why} ({})", w.state, w.progress);
    // The DAG: each step with the steps whose results it reads.
    for (step, inputs) in &w.steps {
        let n = w.jobs.iter().filter(|j| &j.step == step).count();
        let reads =
            if inputs.is_empty() { String::new() } else { format!(" <- {}", inputs.join(", ")) };
        println!("  step {step} ({n} job{}){reads}", if n == 1 { "" } else { "s" });
    }
    for j in &w.jobs {
        let why = j.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
        let attempt =
            if j.attempt > 0 { format!(" (attempt {})", j.attempt + 1) } else { String::new() };
        println!("  {:<28} at {:<16} {}{attempt}{why}", j.name, j.runner, j.state);
    }
}

/// Prints each job's state changes until the workflow ends; fails unless it finished.
fn follow_workflow(api: &ApiClient, id: &str) -> anyhow::Result<()> {
    follow_workflow_until(api, id, None)
}

/// [`follow_workflow`], failing at `deadline` if the workflow is still running then.
fn follow_workflow_until(
    api: &ApiClient,
    id: &str,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<()> {
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let started = std::time::Instant::now();
    loop {
        let w: WorkflowView = api.get(&format!("/v1/workflows/{id}"))?;
        for j in &w.jobs {
            let line = format!("{} {}", j.state, j.reason.clone().unwrap_or_default());
            if seen.get(&j.name) != Some(&line) {
                let why = j.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                println!(
                    "  [{:>5.1}s] {:<28} at {:<16} {}{why}",
                    started.elapsed().as_secs_f64(),
                    j.name,
                    j.runner,
                    j.state
                );
                seen.insert(j.name.clone(), line);
            }
        }
        if w.state != "running" {
            let why = w.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            println!(
                "Workflow {} {}{why} after {:.1} s",
                w.name,
                w.state,
                started.elapsed().as_secs_f64()
            );
            if w.state == "finished" {
                return Ok(());
            }
            anyhow::bail!("workflow {} {}{why}", w.workflow_id, w.state);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            anyhow::bail!(
                "workflow {} still runs after {:.0} s ({})",
                w.workflow_id,
                started.elapsed().as_secs_f64(),
                w.progress
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
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

fn job_command(dir: &DataDir, cmd: JobCommand) -> anyhow::Result<()> {
    let Some(api) = ApiClient::connect(dir) else {
        anyhow::bail!(
            "no daemon runs for {}: start it with `kaapana-node run` (jobs need the network)",
            dir.root().display()
        );
    };
    match cmd {
        JobCommand::Submit {
            to,
            workflow,
            name,
            image,
            dataset,
            env,
            timeout,
            cpu_millis,
            memory_mib,
            command,
        } => {
            let req = SubmitJobRequest {
                runner: to,
                workflow_name: workflow,
                job_name: name,
                image,
                command,
                env,
                dataset,
                timeout_secs: timeout,
                cpu_millis,
                memory_bytes: memory_mib * 1024 * 1024,
            };
            let job: OwnerJobView = api.post("/v1/jobs", &req)?;
            println!("Submitted job {} to {} ({})", job.job_id, job.runner, job.state);
        }
        JobCommand::List { pending } => {
            let jobs: JobsView = api.get("/v1/jobs")?;
            let here: Vec<_> = jobs
                .running_here
                .iter()
                .filter(|j| !pending || j.state == "pending (awaiting approval)")
                .collect();
            println!("Jobs run here for other instances:");
            if here.is_empty() {
                println!("  none");
            }
            for j in here {
                let why = j.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                println!(
                    "  {}  {:<24} from {:<16} {}{why}",
                    j.job_id, j.job_name, j.owner, j.state
                );
            }
            if !pending {
                println!("Jobs submitted by this instance:");
                if jobs.submitted.is_empty() {
                    println!("  none");
                }
                for j in &jobs.submitted {
                    let why = j.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                    println!("  {}  at {:<16} {}{why}", j.job_id, j.runner, j.state);
                }
            }
        }
        JobCommand::Approve { id } => {
            let j: RunnerJobView =
                api.post(&format!("/v1/jobs/{id}/approve"), &serde_json::json!({}))?;
            println!("Approved job {} from {}: {}", j.job_id, j.owner, j.state);
        }
        JobCommand::Result { id, out } => {
            let r: ResultView = api.get(&format!("/v1/jobs/{id}/result"))?;
            let path = r.bundle.path.clone().with_context(|| {
                format!("the result of job {id} is known but its bundle is not stored here yet")
            })?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            if std::fs::read_dir(&out)?.next().is_some() {
                anyhow::bail!("{} is not empty; choose an empty folder", out.display());
            }
            let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
            tar::Archive::new(file)
                .unpack(&out)
                .with_context(|| format!("cannot unpack the result into {}", out.display()))?;
            println!("Job {} ran at {} and ended {}", r.job_id, r.runner, r.exit);
            println!(
                "  bundle {} ({} bytes), verified, unpacked into {}",
                r.bundle.digest,
                r.bundle.size,
                out.display()
            );
            if r.log.is_some() {
                println!("  its log: `kaapana-node job logs {}`", r.job_id);
            }
        }
        JobCommand::Logs { id } => {
            print!("{}", api.get_text(&format!("/v1/jobs/{id}/log"))?);
        }
        JobCommand::Reject { id, reason } => {
            let j: RunnerJobView =
                api.post(&format!("/v1/jobs/{id}/reject"), &RejectRequest { reason })?;
            println!("Rejected job {} from {}: {}", j.job_id, j.owner, j.state);
        }
    }
    Ok(())
}

fn print_instance(v: &InstanceView) {
    println!("{}  {}", v.name, v.instance_id);
    let mut status = format!("  status:        {}", v.status);
    if let Some(seen) = &v.last_seen {
        status.push_str(&format!("; last seen {seen}"));
    }
    if let Some(rtt) = v.rtt_ms {
        status.push_str(&format!("; round trip {rtt:.2} ms"));
    }
    println!("{status}");
    println!("  fingerprint:   {}", v.fingerprint);
    println!("  certificate:   valid until {}", v.certificate_not_after);
    let p = &v.policy;
    println!(
        "  policy:        workflows {}; datasets {}; execution {}; logs {}",
        p.allowed_workflows,
        p.allowed_datasets,
        execution_word(p.execution),
        if p.share_logs { "shared" } else { "not shared" }
    );
    match &v.capabilities {
        Some(c) => {
            let datasets = if c.datasets.is_empty() {
                "none".to_owned()
            } else {
                c.datasets
                    .iter()
                    .map(|(n, items, _)| format!("{n} ({items} items)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "  capabilities:  node {}; executors {}; workflows {}; datasets {}; {} CPUs, {:.1} GiB memory, {} GPUs",
                c.node_version,
                if c.executors.is_empty() { "none".to_owned() } else { c.executors.join(", ") },
                if c.allowed_workflows.is_empty() {
                    "none".to_owned()
                } else {
                    c.allowed_workflows.join(", ")
                },
                datasets,
                f64::from(c.cpu_millis) / 1000.0,
                c.memory_bytes as f64 / f64::from(1u32 << 30),
                c.gpus
            );
        }
        None => println!("  capabilities:  not received"),
    }
    if v.outbox_depth > 0 {
        println!("  outbox:        {} message(s) waiting", v.outbox_depth);
    }
}

fn execution_word(e: Execution) -> &'static str {
    match e {
        Execution::Automatic => "automatic",
        Execution::Approval => "approval",
    }
}

fn print_policy(p: &Policy) {
    println!("  may run workflows: {}", p.allowed_workflows);
    println!("  on datasets:       {}", p.allowed_datasets);
    println!("  execution:         {}", execution_word(p.execution));
    println!("  logs shared:       {}", if p.share_logs { "yes" } else { "no" });
}
