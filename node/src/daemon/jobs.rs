//! Jobs at this node, driving `kaapana-federation`'s job state machines: as the runner of
//! jobs other instances submit, and as the owner of jobs this instance submitted.
//!
//! Every state change is committed together with the signed `JobUpdate` it produces, queued in
//! the durable outbox for the owner: a crash can lose neither, and the owner learns every
//! transition in order as soon as it is reachable. One async lock serialises job changes, so
//! that read-modify-write of a job record never interleaves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kaapana_federation::{AllowList, Execution, Policy};
use kaapana_federation::{OwnerJob, RunnerCommand, RunnerEvent, RunnerJob, Update};
use kaapana_protocol::{
    AnyVerified, Header, InstanceId, JobId, JobManifest, JobUpdate, Signed, Timestamp, WorkflowId,
};

use super::{NodeState, now};
use crate::store::{OwnerJobRecord, RunnerJobRecord, StoreError, WorkflowRecord, WriteOp};

/// How long job updates stay valid (they may wait in the outbox while the owner is away).
const UPDATE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// No such job here.
    #[error("no job {0} at this instance; see `kaapana-node job list`")]
    NotFound(JobId),
    /// The job is not in a state where this applies.
    #[error(transparent)]
    Transition(#[from] kaapana_federation::TransitionError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// What to do after the commit.
#[derive(Debug, Default)]
pub(crate) struct AfterCommit {
    queued: usize,
    wake: Vec<InstanceId>,
    execute: Vec<JobId>,
    kill: Vec<JobId>,
    pub(crate) events: Vec<(&'static str, Option<InstanceId>, String)>,
}

impl AfterCommit {
    /// One more message queued for `peer`: count it and wake its outbox worker.
    pub(crate) fn queued_one(&mut self, peer: InstanceId) {
        self.queued += 1;
        if !self.wake.contains(&peer) {
            self.wake.push(peer);
        }
    }

    /// Carries the follow-ups out.
    pub(crate) fn run(self, state: &Arc<NodeState>) {
        state.metrics.outbox_depth.inc_by(i64::try_from(self.queued).unwrap_or(i64::MAX));
        for peer in self.wake {
            state.wake_outbox(&peer);
        }
        for (kind, peer, detail) in self.events {
            state.event(kind, peer.as_ref(), detail);
        }
        for job in self.kill {
            super::execution::kill(state, job);
        }
        for job in self.execute {
            super::execution::start(state, job);
        }
    }
}

/// Store operations and follow-ups for accepted job messages, to be committed together with
/// the messages themselves.
///
/// Owner-side job and workflow records changed while preparing are kept here, not in the
/// store, until the commit: a later message of the same batch reads them from here
/// ([`Prepared::owner_job`], [`Prepared::workflow`]), so no change is lost to a stale read.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Written in the same commit as the messages.
    pub(crate) ops: Vec<WriteOp>,
    /// Done after that commit.
    pub(crate) after: AfterCommit,
    owner_jobs: HashMap<JobId, OwnerJobRecord>,
    workflows: HashMap<WorkflowId, WorkflowRecord>,
}

impl Prepared {
    /// The owner-side record of `id`, as changed so far in this batch.
    pub(crate) fn owner_job(
        &self,
        state: &NodeState,
        id: &JobId,
    ) -> Result<Option<OwnerJobRecord>, StoreError> {
        match self.owner_jobs.get(id) {
            Some(r) => Ok(Some(r.clone())),
            None => state.store.owner_job(id),
        }
    }

    /// Keeps a changed owner-side job record for the commit.
    pub(crate) fn put_owner_job(&mut self, record: OwnerJobRecord) {
        self.owner_jobs.insert(record.job.job_id, record);
    }

    /// The workflow `id`, as changed so far in this batch.
    pub(crate) fn workflow(
        &self,
        state: &NodeState,
        id: &WorkflowId,
    ) -> Result<Option<WorkflowRecord>, StoreError> {
        match self.workflows.get(id) {
            Some(r) => Ok(Some(r.clone())),
            None => state.store.workflow(id),
        }
    }

    /// Keeps a changed workflow for the commit.
    pub(crate) fn put_workflow(&mut self, record: WorkflowRecord) {
        self.workflows.insert(record.workflow.workflow_id, record);
    }

    /// Every store operation of the batch, changed records last.
    pub(crate) fn take_ops(&mut self) -> Vec<WriteOp> {
        let mut ops = std::mem::take(&mut self.ops);
        ops.extend(self.owner_jobs.drain().map(|(_, r)| WriteOp::PutOwnerJob(Box::new(r))));
        ops.extend(self.workflows.drain().map(|(_, r)| WriteOp::PutWorkflow(Box::new(r))));
        ops
    }
}

/// Turns an accepted message into job changes (called with the jobs lock held).
pub(crate) fn prepare(state: &NodeState, m: &AnyVerified, now: Timestamp, out: &mut Prepared) {
    let result = match m {
        AnyVerified::JobManifest(v) => {
            on_job_manifest(state, v.signer(), v.payload(), v.signed().as_bytes(), now, out)
        }
        AnyVerified::JobUpdate(v) => on_job_update(state, v.signer(), v.payload(), now, out),
        AnyVerified::Cancel(v) => on_cancel(state, v.signer(), v.payload(), now, out),
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "cannot apply a job message");
    }
}

fn on_job_manifest(
    state: &NodeState,
    signer: InstanceId,
    job: &JobManifest,
    envelope: &[u8],
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    if job.runner != state.instance_id || job.owner != signer {
        out.after.events.push((
            "job_refused",
            Some(signer),
            format!(
                "job {} names runner {} and owner {}; only its owner may send it here",
                job.job_id, job.runner, job.owner
            ),
        ));
        return Ok(());
    }
    if state.store.runner_job(&job.job_id)?.is_some() {
        return Ok(());
    }
    let Some(owner) = state.registry().get(&signer).cloned() else { return Ok(()) };
    let (runner_job, commands) = RunnerJob::receive(job, &owner.name, &owner.policy, now);
    out.after.events.push(("job_received", Some(signer), runner_job.to_string()));
    let record = RunnerJobRecord { job: runner_job, manifest: envelope.to_vec() };
    apply_runner_commands(state, record, commands, now, out)
}

/// A job of this instance's own workflow that runs here (e.g. the aggregation step): it is
/// received as a peer's would be, under the owner's own policy (everything allowed, run at
/// once, logs kept).
pub(crate) fn receive_local(
    state: &NodeState,
    job: &JobManifest,
    envelope: &[u8],
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    if state.store.runner_job(&job.job_id)?.is_some() {
        return Ok(());
    }
    let own = Policy {
        allowed_workflows: AllowList::Any,
        allowed_datasets: AllowList::Any,
        execution: Execution::Automatic,
        share_logs: true,
    };
    let (runner_job, commands) = RunnerJob::receive(job, &state.name, &own, now);
    out.after.events.push(("job_received", Some(state.instance_id), runner_job.to_string()));
    let record = RunnerJobRecord { job: runner_job, manifest: envelope.to_vec() };
    apply_runner_commands(state, record, commands, now, out)
}

/// Aborts a job of this instance's own workflow that runs here.
pub(crate) fn abort_local(
    state: &NodeState,
    job_id: &JobId,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    let Some(mut record) = state.store.runner_job(job_id)? else { return Ok(()) };
    if record.job.state.is_terminal() {
        return Ok(());
    }
    let commands = record.job.handle(RunnerEvent::Aborted { by: state.name.clone() }, now)?;
    apply_runner_commands(state, record, commands, now, out)
}

/// Queues the effects of runner commands: the record, signed updates for the owner, and
/// executor actions.
fn apply_runner_commands(
    state: &NodeState,
    record: RunnerJobRecord,
    commands: Vec<RunnerCommand>,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    let owner = record.job.owner;
    let local = owner == state.instance_id;
    let mut updates = Vec::new();
    let mut local_updates = Vec::new();
    for c in commands {
        match c {
            RunnerCommand::Persist => {}
            RunnerCommand::SendUpdate(u) if local => {
                local_updates.push(make_update(&record.job, &u, now));
            }
            RunnerCommand::SendUpdate(u) => updates.push(sign_update(state, &record.job, &u, now)?),
            RunnerCommand::Execute => out.after.execute.push(record.job.job_id),
            RunnerCommand::Kill => out.after.kill.push(record.job.job_id),
            RunnerCommand::SendResult { .. } => {
                // The result bundle follows on /kaapana/results/1 (execution module).
            }
            _ => {}
        }
    }
    out.ops.push(WriteOp::PutRunnerJob(Box::new(record)));
    // This instance runs a job of its own workflow: its updates apply here directly.
    for update in local_updates {
        on_job_update(state, owner, &update, now, out)?;
    }
    if !updates.is_empty() {
        out.after.queued += updates.len();
        out.ops.push(WriteOp::EnqueueOutbox { peer: owner, envelopes: updates });
        out.after.wake.push(owner);
    }
    Ok(())
}

fn sign_update(
    state: &NodeState,
    job: &RunnerJob,
    u: &Update,
    now: Timestamp,
) -> Result<Vec<u8>, JobError> {
    Signed::sign(state.signing_key(), &make_update(job, u, now))
        .map(Signed::into_bytes)
        .map_err(|e| JobError::Sign(e.to_string()))
}

fn make_update(job: &RunnerJob, u: &Update, now: Timestamp) -> JobUpdate {
    JobUpdate {
        header: Header::new(now, UPDATE_LIFETIME),
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        attempt: job.attempt,
        sequence: u.sequence,
        state: u.state,
        reason: u.reason.as_ref().map(|r| truncate(r, kaapana_protocol::MAX_TEXT_LEN)),
        retryable: u.retryable,
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].chars().filter(|c| !c.is_control()).collect()
}

fn on_job_update(
    state: &NodeState,
    signer: InstanceId,
    update: &JobUpdate,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    let Some(mut record) = out.owner_job(state, &update.job_id)? else {
        out.after.events.push((
            "job_update_ignored",
            Some(signer),
            format!("unknown job {}", update.job_id),
        ));
        return Ok(());
    };
    match record.job.apply(update, signer, now) {
        Ok(true) => {
            let reason = record.job.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            out.after.events.push((
                "job_state",
                Some(signer),
                format!("job {} is {:?}{reason}", update.job_id, record.job.state),
            ));
            let job = record.job.clone();
            out.put_owner_job(record);
            super::workflows::on_job_changed(state, &job, now, out)?;
        }
        Ok(false) => {}
        Err(e) => out.after.events.push(("job_update_ignored", Some(signer), e.to_string())),
    }
    Ok(())
}

fn on_cancel(
    state: &NodeState,
    signer: InstanceId,
    cancel: &kaapana_protocol::Cancel,
    now: Timestamp,
    out: &mut Prepared,
) -> Result<(), JobError> {
    let by = state.name_of(&signer);
    for mut record in state.store.runner_jobs()? {
        let j = &record.job;
        let matches = j.owner == signer
            && j.workflow_id == cancel.workflow_id
            && cancel.job_id.is_none_or(|id| id == j.job_id)
            && !j.state.is_terminal();
        if !matches {
            continue;
        }
        let commands = record.job.handle(RunnerEvent::Aborted { by: by.clone() }, now)?;
        apply_runner_commands(state, record, commands, now, out)?;
    }
    Ok(())
}

/// Applies a local event (approval, executor progress) to a job this node runs: commits the
/// new state with its updates for the owner, then carries out the follow-ups.
pub(crate) async fn runner_event(
    state: &Arc<NodeState>,
    job_id: JobId,
    event: RunnerEvent,
) -> Result<RunnerJob, JobError> {
    let _guard = state.jobs_lock.lock().await;
    let now = now();
    let mut record = state.store.runner_job(&job_id)?.ok_or(JobError::NotFound(job_id))?;
    let commands = record.job.handle(event, now)?;
    let job = record.job.clone();
    let mut prepared = Prepared::default();
    apply_runner_commands(state, record, commands, now, &mut prepared)?;
    state.store.write_async(prepared.take_ops()).await?;
    prepared.after.events.push(("job_state", Some(job.owner), job.to_string()));
    prepared.after.run(state);
    Ok(job)
}

/// Signs a job manifest for `runner` and queues it, recording the job as queued, in one
/// commit.
pub(crate) async fn submit(state: &Arc<NodeState>, job: JobManifest) -> Result<OwnerJob, JobError> {
    let _guard = state.jobs_lock.lock().await;
    let signed =
        Signed::sign(state.signing_key(), &job).map_err(|e| JobError::Sign(e.to_string()))?;
    let owner_job = OwnerJob::queued(&job, now());
    let record = OwnerJobRecord { job: owner_job.clone(), manifest: signed.as_bytes().to_vec() };
    state
        .store
        .write_async(vec![
            WriteOp::PutOwnerJob(Box::new(record)),
            WriteOp::EnqueueOutbox { peer: job.runner, envelopes: vec![signed.into_bytes()] },
        ])
        .await?;
    state.metrics.outbox_depth.inc();
    state.wake_outbox(&job.runner);
    state.event(
        "job_submitted",
        Some(&job.runner),
        format!("job {} ({})", job.job_name, job.job_id),
    );
    Ok(owner_job)
}
