//! `kaapana-node workflow ...`: cross-site workflows this instance owns.

use std::path::PathBuf;

use clap::Subcommand;

use crate::api::views::{ResultView, SubmitWorkflowRequest, WorkflowView};
use crate::cli::{CliError, Context as _, bail};
use crate::client::ApiClient;
use crate::data_dir::DataDir;

/// `kaapana-node workflow ...`.
#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
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

/// Runs a `workflow` command through the running daemon.
pub fn workflow_command(dir: &DataDir, cmd: WorkflowCommand) -> Result<(), CliError> {
    let Some(api) = ApiClient::connect(dir) else {
        bail!(
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
                bail!("{} is not empty; choose an empty folder", out.display());
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

/// Prints a workflow's state, its steps and its jobs.
pub fn print_workflow(w: &WorkflowView) {
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
pub fn follow_workflow(api: &ApiClient, id: &str) -> Result<(), CliError> {
    follow_workflow_until(api, id, None)
}

/// [`follow_workflow`], failing at `deadline` if the workflow is still running then.
pub fn follow_workflow_until(
    api: &ApiClient,
    id: &str,
    deadline: Option<std::time::Instant>,
) -> Result<(), CliError> {
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
            bail!("workflow {} {}{why}", w.workflow_id, w.state);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() > d) {
            bail!(
                "workflow {} still runs after {:.0} s ({})",
                w.workflow_id,
                started.elapsed().as_secs_f64(),
                w.progress
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
