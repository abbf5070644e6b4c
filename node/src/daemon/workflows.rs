//! Workflows this instance owns, driving `kaapana-federation`'s [`Workflow`] state machine.
//!
//! The core plans and decides; this module does the I/O it asks for: it signs the job
//! manifests the core dispatches and queues them for their runners (or receives them here when
//! this instance is the runner, e.g. for the aggregation step), signs and queues cancels, and
//! feeds the core what happens: job updates, stored results, runners lost, cancellation by the
//! user. Every change of a workflow is committed together with the messages it causes, under
//! the jobs lock, so a crash loses neither.

use std::sync::Arc;
use std::time::Duration;

use kaapana_federation::{
    Candidate, OwnerJob, Workflow, WorkflowCommand, WorkflowEvent, WorkflowState,
};
use kaapana_protocol::{
    Cancel, ExitStatus, Header, InstanceId, JobId, JobState, ResultManifest, RunnerSelector,
    Signed, Timestamp, WorkflowId, WorkflowManifest,
};

use super::jobs::{JobError, Prepared};
use super::{NodeState, now};
use crate::store::{OwnerJobRecord, StoreError, WorkflowRecord, WriteOp};

/// How long job manifests of a workflow stay valid (they may wait for a runner that is away).
pub(crate) const JOB_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a workflow manifest stays valid.
const WORKFLOW_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long cancels stay valid.
const CANCEL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a workflow operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// The workflow cannot be planned (no runner matches, unknown instance, ...).
    #[error(transparent)]
    Plan(#[from] kaapana_federation::PlanError),
    /// No such workflow here.
    #[error("no workflow {0} at this instance; see `kaapana-node workflow list`")]
    NotFound(WorkflowId),
    /// It has ended already.
    #[error("workflow {0} has ended already ({1})")]
    Ended(WorkflowId, WorkflowState),
    /// A job change failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
    /// A step reads upstream results but would run elsewhere than at the owner.
    #[error(
        "job {0} reads the results of other jobs, so it must run at the workflow's owner (runner = \"owner\"): upstream results are stored only here"
    )]
    InputsAtOwnerOnly(String),
}

/// What the owner knows of every instance that may run its jobs, itself included.
pub(crate) fn candidates(state: &NodeState) -> Vec<Candidate> {
    let mut out = vec![Candidate {
        instance: state.instance_id,
        name: state.name.clone(),
        ad: state.own_capability_ad(),
        reachable: true,
    }];
    let registry: Vec<_> = state.registry().iter().cloned().collect();
    for inst in registry {
        let status = state.peer_status(&inst.instance_id);
        // An instance that has not advertised anything yet matches no capability query, but
        // jobs may still name it: they wait in the outbox until it is reachable.
        let ad = status.capabilities.unwrap_or_else(|| unknown_ad(&inst.name));
        out.push(Candidate {
            instance: inst.instance_id,
            name: inst.name.clone(),
            ad,
            reachable: status.connections > 0,
        });
    }
    out
}

/// The ad of an instance that has advertised nothing yet: no datasets, no resources.
fn unknown_ad(name: &str) -> kaapana_protocol::CapabilityAd {
    kaapana_protocol::CapabilityAd {
        header: Header::new(Timestamp::from_millis(0), Duration::ZERO),
        sequence: 0,
        instance_name: name.to_owned(),
        node_version: String::new(),
        executors: Vec::new(),
        allowed_images: Vec::new(),
        allowed_workflows: kaapana_protocol::NameScope::Only(Vec::new()),
        datasets: Vec::new(),
        resources: kaapana_protocol::Resources::default(),
    }
}

/// Signs `manifest` (this instance must be its owner), plans it and starts its first jobs, in
/// one commit.
pub(crate) async fn submit(
    state: &Arc<NodeState>,
    manifest: WorkflowManifest,
) -> Result<Workflow, WorkflowError> {
    for job in &manifest.jobs {
        let at_owner = match &job.runner {
            RunnerSelector::Owner => true,
            RunnerSelector::Instance(id) => *id == state.instance_id,
            _ => false,
        };
        if !job.inputs.is_empty() && !at_owner {
            return Err(WorkflowError::InputsAtOwnerOnly(job.name.clone()));
        }
    }
    let _guard = state.jobs_lock.lock().await;
    let now = now();
    let (workflow, commands) = Workflow::start(&manifest, &state.candidates(), now, JOB_LIFETIME)?;
    let signed = state.sign(&manifest).map_err(|e| WorkflowError::Sign(e.to_string()))?;
    let mut out = Prepared::default();
    out.put_workflow(WorkflowRecord { workflow, manifest: signed.into_bytes() });
    out.after.events.push((
        "workflow_submitted",
        None,
        format!("workflow {} ({})", manifest.name, manifest.workflow_id),
    ));
    apply(state, manifest.workflow_id, commands, now, &mut out)?;
    let workflow = out
        .workflow(state, &manifest.workflow_id)?
        .map(|r| r.workflow)
        .ok_or(WorkflowError::NotFound(manifest.workflow_id))?;
    state.store.write_async(out.take_ops()).await?;
    out.after.run(state);
    Ok(workflow)
}

/// A fresh workflow manifest's header.
pub(crate) fn header(now: Timestamp) -> Header {
    Header::new(now, WORKFLOW_LIFETIME)
}

/// Cancels a workflow: stops its jobs at every runner.
pub(crate) async fn cancel(
    state: &Arc<NodeState>,
    id: WorkflowId,
    by: String,
) -> Result<Workflow, WorkflowError> {
    let _guard = state.jobs_lock.lock().await;
    let now = now();
    let mut out = Prepared::default();
    let record = out.workflow(state, &id)?.ok_or(WorkflowError::NotFound(id))?;
    if record.workflow.state.is_final() {
        return Err(WorkflowError::Ended(id, record.workflow.state));
    }
    feed(state, record, WorkflowEvent::Cancel { by }, now, &mut out)?;
    let workflow =
        out.workflow(state, &id)?.map(|r| r.workflow).ok_or(WorkflowError::NotFound(id))?;
    state.store.write_async(out.take_ops()).await?;
    out.after.run(state);
    Ok(workflow)
}

/// A job's owner-side record changed (an update from its runner was applied): tells its
/// workflow, if it belongs to one this instance owns.
pub(crate) fn on_job_changed(
    state: &NodeState,
    job: &OwnerJob,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    let Some(record) = out.workflow(state, &job.workflow_id)? else { return Ok(()) };
    if record.workflow.job(&job.job_id).is_none() {
        return Ok(());
    }
    let event = WorkflowEvent::JobUpdated {
        job_id: job.job_id,
        state: job.state,
        reason: job.reason.clone(),
        retryable: job.retryable,
    };
    feed(state, record, event, now, out)
}

/// A verified result was stored: records it and tells its workflow, in one commit. The
/// result must be for a job this instance submitted to `from`.
pub(crate) async fn record_result(
    state: &Arc<NodeState>,
    from: &InstanceId,
    signed: &Signed<ResultManifest>,
    manifest: &ResultManifest,
    bundle_part: bool,
) -> Result<(), StoreError> {
    let _guard = state.jobs_lock.lock().await;
    let now = now();
    let mut out = Prepared::default();
    out.ops.push(WriteOp::PutResult { job: manifest.job_id, envelope: signed.as_bytes().to_vec() });
    if bundle_part && let Some(record) = out.workflow(state, &manifest.workflow_id)? {
        let current = record
            .workflow
            .job(&manifest.job_id)
            .is_some_and(|j| j.runner == *from && j.attempt == manifest.attempt);
        if current {
            let event = WorkflowEvent::ResultStored {
                job_id: manifest.job_id,
                bundle: manifest.bundle,
                success: manifest.exit == ExitStatus::Exited(0),
            };
            if let Err(e) = feed(state, record, event, now, &mut out) {
                tracing::error!(error = %e, "cannot apply a result to its workflow");
            }
        }
    }
    state.store.write_async(out.take_ops()).await?;
    out.after.run(state);
    Ok(())
}

/// Whether the owner takes a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expected {
    /// Yes: a job it submitted to that runner, current in its workflow.
    Yes,
    /// Not a job this instance submitted to that runner.
    NotYours,
    /// A job attempt its workflow has replaced (the job now runs as `current`).
    Superseded {
        /// The job's current attempt.
        current: JobId,
    },
}

/// Whether `result` is of a job this instance submitted to `runner` (so it may be stored), and
/// not of an attempt its workflow has replaced since.
pub(crate) fn expects_result(
    state: &NodeState,
    result: &ResultManifest,
    runner: &InstanceId,
) -> Result<Expected, StoreError> {
    let Some(record) = state.store.owner_job(&result.job_id)? else {
        return Ok(Expected::NotYours);
    };
    if record.job.runner != *runner || record.job.attempt != result.attempt {
        return Ok(Expected::NotYours);
    }
    let Some(w) = state.store.workflow(&record.job.workflow_id)? else { return Ok(Expected::Yes) };
    if w.workflow.job(&result.job_id).is_some() {
        return Ok(Expected::Yes);
    }
    match w.workflow.jobs.iter().find(|j| j.previous.contains(&result.job_id)) {
        Some(j) => Ok(Expected::Superseded { current: j.job_id }),
        None => Ok(Expected::Yes),
    }
}

/// Whether a dispatched job still needs its runner: not ended, or finished but its result
/// has not arrived.
fn waits_for_runner(j: &kaapana_federation::WorkflowJob) -> bool {
    j.dispatched
        && (!j.state.is_terminal() || (j.state == JobState::Finished && j.result.is_none()))
}

/// Runners of running workflows that have been out of reach for longer than `grace` are lost:
/// their jobs move to another instance where the workflow allows it. Runners out of reach for
/// longer than `give_up` are gone: their remaining jobs fail with that reason (so that every
/// workflow ends), and a cancel waits for them in case they come back.
pub(crate) async fn check_lost_runners(state: &Arc<NodeState>, grace: Duration, give_up: Duration) {
    let now = now();
    let Ok(workflows) = state.store.workflows() else { return };
    let mut lost = Vec::new();
    let mut gone = Vec::new();
    for r in workflows.iter().filter(|r| !r.workflow.state.is_final()) {
        for j in r.workflow.jobs.iter().filter(|j| waits_for_runner(j)) {
            if j.runner == state.instance_id || lost.contains(&j.runner) {
                continue;
            }
            let away = state.unreachable_for(&j.runner, now);
            if away > grace {
                lost.push(j.runner);
            }
            if away > give_up {
                gone.push(j.runner);
            }
        }
    }
    if lost.is_empty() {
        return;
    }
    let ids: Vec<WorkflowId> = workflows
        .iter()
        .filter(|r| !r.workflow.state.is_final())
        .map(|r| r.workflow.workflow_id)
        .collect();
    let _guard = state.jobs_lock.lock().await;
    let mut out = Prepared::default();
    for runner in lost {
        for id in &ids {
            let Ok(Some(record)) = out.workflow(state, id) else { continue };
            let waiting =
                record.workflow.jobs.iter().any(|j| j.runner == runner && waits_for_runner(j));
            if waiting
                && let Err(e) = feed(
                    state,
                    record,
                    WorkflowEvent::RunnerLost { instance: runner },
                    now,
                    &mut out,
                )
            {
                tracing::error!(error = %e, "cannot move jobs off a lost runner");
            }
        }
    }
    for runner in gone {
        let why = format!(
            "runner {} has been out of reach for more than {} s; the job is given up",
            state.name_of(&runner),
            give_up.as_secs()
        );
        for id in &ids {
            let Ok(Some(record)) = out.workflow(state, id) else { continue };
            let stuck: Vec<JobId> = record
                .workflow
                .jobs
                .iter()
                .filter(|j| j.runner == runner && waits_for_runner(j))
                .map(|j| j.job_id)
                .collect();
            for job in stuck {
                if let Err(e) = fail_job(state, runner, job, *id, &why, now, &mut out) {
                    tracing::error!(error = %e, "cannot give a job up");
                }
            }
        }
    }
    match state.store.write_async(out.take_ops()).await {
        Ok(_) => out.after.run(state),
        Err(e) => tracing::error!(error = %e, "cannot record moved jobs"),
    }
}

/// A job manifest its runner refused for good (expired while it waited, or otherwise): the
/// job fails at this owner with that reason.
pub(crate) async fn job_refused(
    state: &Arc<NodeState>,
    runner: InstanceId,
    envelope: &[u8],
    why: String,
) {
    let Ok(job) = Signed::<kaapana_protocol::JobManifest>::from_bytes(envelope)
        .map_err(|e| e.to_string())
        .and_then(|s| s.verify_stored().map_err(|e| e.to_string()))
        .map(kaapana_protocol::Verified::into_payload)
    else {
        return;
    };
    let _guard = state.jobs_lock.lock().await;
    let now = now();
    let mut out = Prepared::default();
    let reason = format!("{} refused the job manifest: {why}", state.name_of(&runner));
    if let Err(e) = fail_job(state, runner, job.job_id, job.workflow_id, &reason, now, &mut out) {
        tracing::error!(error = %e, "cannot fail a refused job");
        return;
    }
    match state.store.write_async(out.take_ops()).await {
        Ok(_) => out.after.run(state),
        Err(e) => tracing::error!(error = %e, "cannot record a refused job"),
    }
}

/// Fails a job at this owner (its runner is gone, or refused it): its record, its workflow,
/// and a cancel queued for the runner in case it runs the job after all.
fn fail_job(
    state: &NodeState,
    runner: InstanceId,
    job_id: JobId,
    workflow_id: WorkflowId,
    reason: &str,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    if let Some(mut record) = out.owner_job(state, &job_id)?
        && !record.job.state.is_terminal()
    {
        record.job.state = JobState::Failed;
        record.job.reason = Some(truncate(reason));
        record.job.updated_at = now;
        out.put_owner_job(record);
    }
    let cancel = Cancel {
        header: Header::new(now, CANCEL_LIFETIME),
        workflow_id,
        job_id: Some(job_id),
        reason: truncate(reason),
    };
    let signed = state.sign(&cancel).map_err(|e| JobError::Sign(e.to_string()))?;
    out.ops.push(WriteOp::EnqueueOutbox { peer: runner, envelopes: vec![signed.into_bytes()] });
    out.after.queued_one(runner);
    out.after.events.push(("job_given_up", Some(runner), format!("job {job_id}: {reason}")));
    let Some(record) = out.workflow(state, &workflow_id)? else { return Ok(()) };
    let event = WorkflowEvent::JobUpdated {
        job_id,
        state: JobState::Failed,
        reason: Some(reason.to_owned()),
        retryable: false,
    };
    feed(state, record, event, now, out)
}

/// Applies one event to a workflow and carries out the commands; an event that changes
/// nothing writes nothing.
fn feed(
    state: &NodeState,
    mut record: WorkflowRecord,
    event: WorkflowEvent,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    let before = record.workflow.clone();
    let commands = record.workflow.handle(event, &state.candidates(), now, JOB_LIFETIME);
    if commands.is_empty() && record.workflow == before {
        return Ok(());
    }
    let id = record.workflow.workflow_id;
    out.after.events.push((
        "workflow_progress",
        None,
        format!("workflow {} ({id}): {}", record.workflow.name, record.workflow.counts()),
    ));
    out.put_workflow(record);
    apply(state, id, commands, now, out)
}

/// Carries out a workflow's commands: signed job manifests and cancels into the outbox (or
/// straight to this instance's own runner side), end-of-workflow events.
fn apply(
    state: &NodeState,
    workflow_id: WorkflowId,
    commands: Vec<WorkflowCommand>,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    for command in commands {
        match command {
            WorkflowCommand::Dispatch(job) => {
                let signed = state.sign(&job).map_err(|e| JobError::Sign(e.to_string()))?;
                let envelope = signed.into_bytes();
                out.put_owner_job(OwnerJobRecord {
                    job: OwnerJob::queued(&job, now),
                    manifest: envelope.clone(),
                });
                out.after.events.push((
                    "job_submitted",
                    Some(job.runner),
                    format!(
                        "job {} ({}) of workflow {}",
                        job.job_name, job.job_id, job.workflow_name
                    ),
                ));
                if job.runner == state.instance_id {
                    super::jobs::receive_local(state, &job, &envelope, now, out)?;
                } else {
                    out.ops.push(WriteOp::EnqueueOutbox {
                        peer: job.runner,
                        envelopes: vec![envelope],
                    });
                    out.after.queued_one(job.runner);
                }
            }
            WorkflowCommand::CancelJob { runner, job_id, reason } => {
                if runner == state.instance_id {
                    super::jobs::abort_local(state, &job_id, now, out)?;
                    continue;
                }
                let cancel = Cancel {
                    header: Header::new(now, CANCEL_LIFETIME),
                    workflow_id,
                    job_id: Some(job_id),
                    reason: truncate(&reason),
                };
                let signed = state.sign(&cancel).map_err(|e| JobError::Sign(e.to_string()))?;
                out.ops.push(WriteOp::EnqueueOutbox {
                    peer: runner,
                    envelopes: vec![signed.into_bytes()],
                });
                out.after.queued_one(runner);
            }
            WorkflowCommand::Ended { state: end, reason } => {
                let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                out.after.events.push((
                    "workflow_ended",
                    None,
                    format!("workflow {workflow_id} {end}{why}"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    let max = kaapana_protocol::MAX_TEXT_LEN;
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].chars().filter(|c| !c.is_control()).collect()
}
