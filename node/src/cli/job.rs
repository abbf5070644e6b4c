//! `kaapana-node job ...`: submitting, listing and deciding on jobs.

use std::path::PathBuf;

use clap::Subcommand;

use crate::api::views::{
    JobsView, OwnerJobView, RejectRequest, ResultView, RunnerJobView, SubmitJobRequest,
};
use crate::cli::{CliError, Context as _, bail};
use crate::client::ApiClient;
use crate::data_dir::DataDir;

/// `kaapana-node job ...`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
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

/// Runs a `job` command through the running daemon.
pub fn job_command(dir: &DataDir, cmd: JobCommand) -> Result<(), CliError> {
    let Some(api) = ApiClient::connect(dir) else {
        bail!(
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
                bail!("{} is not empty; choose an empty folder", out.display());
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
