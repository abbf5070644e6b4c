//! Running jobs on the node's executor and reporting their progress to the job state
//! machine: image check → started → exited (or executor failure).
//!
//! Each job gets `DATA_DIR/jobs/<job id>/` with `output/` (mounted writable at `/output`) and
//! `job.log` (its stdout and stderr).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kaapana_federation::RunnerEvent;
use kaapana_protocol::{JobId, JobManifest, Signed};

use super::NodeState;
use super::jobs::{JobError, runner_event};
use crate::executor::JobRun;

/// The folder of one job's files.
pub(crate) fn job_dir(state: &NodeState, job: &JobId) -> PathBuf {
    state.files.dir.root().join("jobs").join(job.to_string())
}

/// Starts a scheduled job in the background.
pub(crate) fn start(state: &Arc<NodeState>, job: JobId) {
    let s = Arc::clone(state);
    tokio::spawn(async move {
        if let Err(e) = run(&s, job).await {
            tracing::error!(%job, error = %e, "job execution failed");
        }
    });
}

/// Aborts a running job.
pub(crate) fn kill(state: &Arc<NodeState>, job: JobId) {
    let Some(executor) = state.executor.clone() else { return };
    tokio::spawn(async move {
        if let Err(e) = executor.kill(&job).await {
            tracing::warn!(%job, error = %e, "cannot kill the job's container");
        }
    });
}

async fn fail(state: &Arc<NodeState>, job: JobId, reason: String) -> Result<(), JobError> {
    runner_event(state, job, RunnerEvent::ExecutorFailed { reason }).await.map(drop)
}

async fn run(state: &Arc<NodeState>, job_id: JobId) -> Result<(), JobError> {
    let record = state.store.runner_job(&job_id)?.ok_or(JobError::NotFound(job_id))?;
    // Verified when it arrived; read back as of that moment.
    let manifest: JobManifest = match Signed::<JobManifest>::from_bytes(&record.manifest)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            s.verify(record.job.received_at, &state.verify_options).map_err(|e| e.to_string())
        }) {
        Ok(v) => v.into_payload(),
        Err(e) => return fail(state, job_id, format!("stored job manifest unreadable: {e}")).await,
    };
    let Some(executor) = state.executor.clone() else {
        return fail(
            state,
            job_id,
            "this instance runs no executor (no container runtime configured)".into(),
        )
        .await;
    };
    match executor.has_image(&manifest.image).await {
        Ok(true) => {}
        Ok(false) => {
            return fail(
                state,
                job_id,
                format!("image {} is not available at {}", manifest.image, state.name),
            )
            .await;
        }
        Err(e) => return fail(state, job_id, e.to_string()).await,
    }
    if let Some(d) = &manifest.dataset {
        return fail(
            state,
            job_id,
            format!(
                "dataset {} is not registered at {} (datasets are not supported yet)",
                d.name, state.name
            ),
        )
        .await;
    }
    let dir = job_dir(state, &job_id);
    let output = dir.join("output");
    if let Err(e) = std::fs::create_dir_all(&output) {
        return fail(state, job_id, format!("cannot create {}: {e}", output.display())).await;
    }
    runner_event(state, job_id, RunnerEvent::Started).await?;
    let outcome = executor
        .run(JobRun {
            job_id,
            image: manifest.image,
            command: manifest.command.clone(),
            env: manifest.env.iter().map(|v| (v.name.clone(), v.value.clone())).collect(),
            input: None,
            upstream: Vec::new(),
            output,
            log: dir.join("job.log"),
            limits: manifest.limits,
            timeout: Duration::from_secs(u64::from(manifest.timeout_secs)),
        })
        .await;
    match outcome {
        Ok(o) => runner_event(state, job_id, RunnerEvent::Exited { exit: o.exit }).await.map(drop),
        Err(e) => fail(state, job_id, e.to_string()).await,
    }
}

/// After a restart: jobs that were scheduled or running are re-attached to their containers
/// (their outcome is then reported as usual), started if they never started, or failed with
/// the reason; the owner always learns a final state.
pub(crate) async fn recover(state: &Arc<NodeState>) {
    use kaapana_protocol::JobState;
    let jobs = match state.store.runner_jobs() {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "cannot read jobs to recover");
            return;
        }
    };
    let held = match &state.executor {
        Some(x) => x.running().await.unwrap_or_default(),
        None => Vec::new(),
    };
    for record in jobs {
        let id = record.job.job_id;
        let result = match record.job.state {
            JobState::Scheduled if !held.contains(&id) => {
                start(state, id);
                Ok(())
            }
            JobState::Scheduled | JobState::Running => reattach(state, id, held.contains(&id)).await,
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(job = %id, error = %e, "cannot recover job");
        }
    }
}

async fn reattach(state: &Arc<NodeState>, job: JobId, held: bool) -> Result<(), JobError> {
    let Some(executor) = state.executor.clone().filter(|_| held) else {
        return fail(state, job, "the node restarted and the job's container was gone".into()).await;
    };
    let s = Arc::clone(state);
    tokio::spawn(async move {
        let log = job_dir(&s, &job).join("job.log");
        let result = match executor.reattach(&job, &log).await {
            Ok(outcome) => {
                // A job scheduled but not yet reported started still goes through `running`.
                let _ = runner_event(&s, job, RunnerEvent::Started).await;
                runner_event(&s, job, RunnerEvent::Exited { exit: outcome.exit }).await.map(drop)
            }
            Err(e) => fail(&s, job, format!("after a restart of the node: {e}")).await,
        };
        if let Err(e) = result {
            tracing::error!(%job, error = %e, "cannot report a re-attached job");
        }
    });
    Ok(())
}
