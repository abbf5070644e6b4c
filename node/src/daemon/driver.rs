//! The driver of the federation core: this node's only way to change workflows and jobs.
//!
//! Everything that happens to them — a verified message, an executor report, a local request,
//! a fired timer, a peer connecting or going away — becomes a `kaapana_federation::Event` for
//! [`Site::handle`](kaapana_federation::Site::handle). The driver carries out the commands it
//! returns, in their order:
//!
//! 1. `Persist` records and the signed `Send`s (queued in the durable outbox) go into **one**
//!    store commit, together with whatever the caller must record with them (the seen ids and
//!    inbox entries of the messages that caused them): a crash loses neither a state nor its
//!    announcement, and a message is acknowledged only after that commit;
//! 2. then the effects: outbox workers are woken, jobs started or killed, results delivered,
//!    timers armed, events logged.
//!
//! One async lock ([`NodeState::drive_lock`]) serialises step 1, so records reach the store in
//! the order the core changed them. The site itself sits behind a plain mutex that is held
//! only while the core computes, never across an `.await`, so reads (API views, result
//! offers) never wait for a commit.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kaapana_federation::{
    Command, Event, Message, Notice, Outcome, Record, SiteError, Timer, WorkflowState,
};
use kaapana_protocol::{InstanceId, JobId, ResultManifest, Signed, Timestamp, WorkflowId};
use tokio::sync::mpsc;

use super::{EventKind, NodeState, lock, now};
use crate::audit::{AuditKind, AuditRecord};
use crate::store::{StoreError, WriteOp};

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
    /// The federation core refused the request.
    #[error(transparent)]
    Refused(SiteError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SiteError> for JobError {
    fn from(e: SiteError) -> Self {
        match e {
            SiteError::NoSuchJob(id) => Self::NotFound(id),
            SiteError::Transition(t) => Self::Transition(t),
            other => Self::Refused(other),
        }
    }
}

/// Why a workflow operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// The workflow cannot be planned (no runner matches, unknown instance, inputs read away
    /// from the owner, ...).
    #[error(transparent)]
    Plan(#[from] kaapana_federation::PlanError),
    /// No such workflow here.
    #[error("no workflow {0} at this instance; see `kaapana-node workflow list`")]
    NotFound(WorkflowId),
    /// It has ended already.
    #[error("workflow {0} has ended already ({1})")]
    Ended(WorkflowId, WorkflowState),
    /// The federation core refused the request for another reason.
    #[error(transparent)]
    Refused(SiteError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

impl From<SiteError> for WorkflowError {
    fn from(e: SiteError) -> Self {
        match e {
            SiteError::Plan(p) => Self::Plan(p),
            SiteError::NoSuchWorkflow(id) => Self::NotFound(id),
            SiteError::WorkflowEnded(id, s) => Self::Ended(id, s),
            other => Self::Refused(other),
        }
    }
}

/// What a committed batch of commands leaves to do.
#[derive(Debug, Default)]
struct Effects {
    queued: usize,
    wake: Vec<InstanceId>,
    rest: Vec<Command>,
}

impl NodeState {
    /// Feeds `events` to the federation core, commits their records and messages together with
    /// `with` in one durable write, then carries out the effects. Returns the core's
    /// refusals of local requests (empty when all applied). With no event and nothing to
    /// write, nothing is written.
    pub(crate) async fn feed(
        self: &Arc<Self>,
        events: Vec<Event>,
        with: Vec<WriteOp>,
    ) -> Result<Vec<SiteError>, StoreError> {
        self.feed_audited(events, with, None).await
    }

    /// [`NodeState::feed`], and `audit` appended to the audit log in the same commit when the
    /// core refused none of the events.
    async fn feed_audited(
        self: &Arc<Self>,
        events: Vec<Event>,
        with: Vec<WriteOp>,
        audit: Option<AuditRecord>,
    ) -> Result<Vec<SiteError>, StoreError> {
        if events.is_empty() && lock(&self.unwritten).is_empty() {
            // Nothing for the core: a plain write, grouped with concurrent ones.
            let mut with = with;
            with.extend(audit.map(WriteOp::Audit));
            if !with.is_empty() {
                self.store.write_async(with).await?;
            }
            return Ok(Vec::new());
        }
        let _order = self.drive_lock.lock().await;
        let now = now();
        let (commands, mut records) = {
            let mut site = lock(&self.site);
            let commands: Vec<Command> =
                events.into_iter().flat_map(|e| site.handle(now, e)).collect();
            // The records' states after these events, read before any other event changes them.
            let records = records_of(&site, &commands);
            (commands, records)
        };
        let mut ops = std::mem::take(&mut *lock(&self.unwritten));
        ops.extend(with);
        let (mut messages, effects, refused) = self.split(commands);
        ops.append(&mut records);
        ops.append(&mut messages);
        if refused.is_empty()
            && let Some(record) = audit
        {
            ops.push(WriteOp::Audit(record));
        }
        if !ops.is_empty()
            && let Err(e) = self.store.write_async(ops.clone()).await
        {
            // The core has moved on already: keep what it asked to store for the next commit,
            // so that it still reaches the disk (in order) once the store works again.
            *lock(&self.unwritten) = ops;
            return Err(e);
        }
        drop(_order);
        self.carry_out(effects);
        Ok(refused)
    }

    /// Feeds one local request (committed with `with`) and returns its refusal as the
    /// caller's error; `audit` is appended to the audit log in the same commit if the core
    /// does not refuse the request.
    pub(crate) async fn request_audited(
        self: &Arc<Self>,
        event: Event,
        with: Vec<WriteOp>,
        audit: Option<AuditRecord>,
    ) -> Result<(), RequestError> {
        let refused = self.feed_audited(vec![event], with, audit).await?;
        refused.into_iter().next().map_or(Ok(()), |e| Err(RequestError::Refused(e)))
    }

    /// Store operations for the records and messages, then the effects for after the commit.
    fn split(&self, commands: Vec<Command>) -> (Vec<WriteOp>, Effects, Vec<SiteError>) {
        let mut outbox: Vec<(InstanceId, Vec<Vec<u8>>)> = Vec::new();
        let mut effects = Effects::default();
        let mut refused = Vec::new();
        for c in commands {
            match c {
                Command::Persist(_) => {}
                Command::Send { to, message } => match self.sign_message(&message) {
                    Ok(envelope) => {
                        match outbox.last_mut() {
                            Some((peer, envs)) if *peer == to => envs.push(envelope),
                            _ => outbox.push((to, vec![envelope])),
                        }
                        effects.queued += 1;
                        if !effects.wake.contains(&to) {
                            effects.wake.push(to);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot sign a message; not sent"),
                },
                Command::Notify(Notice::Refused(e)) => refused.push(e),
                other => effects.rest.push(other),
            }
        }
        let mut ops = Vec::new();
        ops.extend(
            outbox.into_iter().map(|(peer, envelopes)| WriteOp::EnqueueOutbox { peer, envelopes }),
        );
        (ops, effects, refused)
    }

    fn sign_message(&self, m: &Message) -> Result<Vec<u8>, String> {
        let signed = match m {
            Message::JobManifest(j) => self.sign(j).map(Signed::into_bytes),
            Message::JobUpdate(u) => self.sign(u).map(Signed::into_bytes),
            Message::Cancel(c) => self.sign(c).map(Signed::into_bytes),
            other => return Err(format!("no signing for {other:?}")),
        };
        signed.map_err(|e| e.to_string())
    }

    /// The effects of a committed batch, in order.
    fn carry_out(self: &Arc<Self>, effects: Effects) {
        self.metrics.outbox_depth.inc_by(i64::try_from(effects.queued).unwrap_or(i64::MAX));
        for peer in effects.wake {
            self.wake_outbox(&peer);
        }
        for c in effects.rest {
            match c {
                Command::StartJob(m) => super::execution::start(self, m.job_id),
                Command::StopJob(job) => super::execution::kill(self, job),
                Command::DeliverResult { job, exit } => super::execution::deliver(self, *job, exit),
                Command::SetTimer { timer, at } => {
                    if let Some(tx) = lock(&self.timers).as_ref() {
                        let _ = tx.send((timer, at));
                    }
                }
                Command::Notify(n) => self.notice(n),
                _ => {}
            }
        }
    }

    /// Logs what the core wants users to know.
    fn notice(&self, n: Notice) {
        let (kind, peer, detail) = match n {
            Notice::WorkflowSubmitted { workflow, name } => {
                if let Some(c) = self.site().workflow(&workflow).map(|w| w.counts()) {
                    let sample = crate::history::WorkflowSample::new(now().as_millis(), &c);
                    self.history.workflow_counts(workflow, sample);
                }
                (EventKind::WorkflowSubmitted, None, format!("workflow {name} ({workflow})"))
            }
            Notice::WorkflowProgress { workflow, name } => {
                let counts = self.site().workflow(&workflow).map(|w| w.counts());
                if let Some(c) = &counts {
                    let sample = crate::history::WorkflowSample::new(now().as_millis(), c);
                    self.history.workflow_counts(workflow, sample);
                }
                let counts = counts.map(|c| c.to_string()).unwrap_or_default();
                (
                    EventKind::WorkflowProgress,
                    None,
                    format!("workflow {name} ({workflow}): {counts}"),
                )
            }
            Notice::WorkflowEnded { workflow, state, reason } => {
                if let Some(c) = self.site().workflow(&workflow).map(|w| w.counts()) {
                    let sample = crate::history::WorkflowSample::new(now().as_millis(), &c);
                    self.history.workflow_counts(workflow, sample);
                }
                let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                (EventKind::WorkflowEnded, None, format!("workflow {workflow} {state}{why}"))
            }
            Notice::JobDispatched { job } => (
                EventKind::JobSubmitted,
                Some(job.runner),
                format!("job {} ({}) of workflow {}", job.job_name, job.job_id, job.workflow_name),
            ),
            Notice::JobReceived { owner, job } => {
                (EventKind::JobReceived, Some(owner), job.to_string())
            }
            Notice::JobState { peer, job, state, reason } => {
                let why = reason.map(|r| format!(": {r}")).unwrap_or_default();
                (EventKind::JobState, Some(peer), format!("job {job} is {state:?}{why}"))
            }
            Notice::JobRefused { from, detail } => (EventKind::JobRefused, Some(from), detail),
            Notice::JobUpdateIgnored { from, detail } => {
                (EventKind::JobUpdateIgnored, Some(from), detail)
            }
            Notice::JobGivenUp { runner, job, reason } => {
                (EventKind::JobGivenUp, Some(runner), format!("job {job}: {reason}"))
            }
            Notice::Refused(e) => {
                tracing::debug!(error = %e, "the federation core refused an event");
                return;
            }
            _ => return,
        };
        self.event(kind, peer.as_ref(), detail);
    }

    /// An executor report on a job this node runs.
    pub(crate) async fn executor_event(
        self: &Arc<Self>,
        job: JobId,
        outcome: Outcome,
    ) -> Result<(), JobError> {
        // A start is audited with the state change that records it.
        let audit = matches!(outcome, Outcome::Started)
            .then(|| AuditRecord::now(AuditKind::JobStarted, job, self.job_text(&job)));
        Ok(self.request_audited(Event::Executor { job, outcome }, Vec::new(), audit).await?)
    }

    /// A job manifest its runner refused for good (expired while it waited, or otherwise):
    /// the core fails the job with that reason.
    pub(crate) async fn manifest_refused(
        self: &Arc<Self>,
        runner: InstanceId,
        envelope: &[u8],
        why: String,
    ) {
        // Signed here and stored since: read back as of then.
        let Ok(job) = Signed::<kaapana_protocol::JobManifest>::from_bytes(envelope)
            .map_err(|e| e.to_string())
            .and_then(|s| s.verify_stored().map_err(|e| e.to_string()))
            .map(kaapana_protocol::Verified::into_payload)
        else {
            return;
        };
        let event = Event::Refused { to: runner, message: Message::JobManifest(job), reason: why };
        if let Err(e) = self.feed(vec![event], Vec::new()).await {
            tracing::error!(error = %e, "cannot record a refused job");
        }
    }

    /// A verified result (and its bundle) is stored here: records the signed manifest and
    /// tells its workflow, in one commit.
    pub(crate) async fn result_stored(
        self: &Arc<Self>,
        from: InstanceId,
        signed: &Signed<ResultManifest>,
        result: &ResultManifest,
        bundle_part: bool,
    ) -> Result<(), StoreError> {
        let record =
            WriteOp::PutResult { job: result.job_id, envelope: signed.as_bytes().to_vec() };
        let part = if bundle_part { "result bundle" } else { "result log" };
        let audit = WriteOp::Audit(AuditRecord::now(
            AuditKind::ResultStored,
            result.job_id,
            format!(
                "{part} from {} (workflow {}), bundle sha256:{}, manifest {}",
                self.name_of(&from),
                result.workflow_id,
                result.bundle.digest.hex(),
                signed.id()
            ),
        ));
        let events = if bundle_part {
            let samples = if self.site().is_update(&result.job_id) {
                let blobs = crate::blobs::BlobStore::in_data_dir(&self.files.dir);
                let bundle = blobs.ok().and_then(|b| b.path(&result.bundle.digest));
                tokio::task::spawn_blocking(move || bundle.and_then(|p| samples_in_bundle(&p)))
                    .await
                    .unwrap_or_default()
            } else {
                None
            };
            vec![Event::ResultStored { from, result: result.clone(), samples }]
        } else {
            Vec::new()
        };
        self.feed(events, vec![record, audit]).await.map(drop)
    }
}

/// The largest `samples` file of a training update that is read (a number and a newline).
const MAX_SAMPLES_FILE: u64 = 32;

/// The sample count a training update's result bundle reports: its top-level `samples` file,
/// a decimal number (surrounding whitespace allowed). `None` when there is none, it is larger
/// than [`MAX_SAMPLES_FILE`] or not a number (the core then refuses the update and says why).
pub(crate) fn samples_in_bundle(bundle: &std::path::Path) -> Option<u64> {
    use std::io::Read as _;
    let file = std::fs::File::open(bundle).ok()?;
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries_with_seek().ok()? {
        let mut entry = entry.ok()?;
        let path = entry.path().ok()?.into_owned();
        let mut parts = path.components().filter(|c| *c != std::path::Component::CurDir);
        let top =
            matches!((parts.next(), parts.next()), (Some(p), None) if p.as_os_str() == "samples");
        if !top || !entry.header().entry_type().is_file() {
            continue;
        }
        if entry.size() > MAX_SAMPLES_FILE {
            return None;
        }
        let mut text = String::new();
        entry.read_to_string(&mut text).ok()?;
        return text.trim().parse().ok();
    }
    None
}

/// Store operations for every record the commands name, each once, in its current state: a
/// workflow's own fields ([`Record::Workflow`]) and single jobs ([`Record::WorkflowJob`]) as
/// records of their own, so an event that changes one job writes that job only. Public for
/// the benchmarks (`benches/large.rs`), which persist through the same path.
pub fn records_of(site: &kaapana_federation::Site, commands: &[Command]) -> Vec<WriteOp> {
    let mut workflows = BTreeSet::new();
    let mut workflow_jobs = BTreeSet::new();
    let mut runner_jobs = BTreeSet::new();
    for c in commands {
        match c {
            Command::Persist(Record::Workflow(id)) => {
                workflows.insert(*id);
            }
            Command::Persist(Record::WorkflowJob { workflow, index }) => {
                workflow_jobs.insert((*workflow, *index));
            }
            Command::Persist(Record::RunnerJob(id)) => {
                runner_jobs.insert(*id);
            }
            _ => {}
        }
    }
    let mut ops: Vec<WriteOp> = workflows
        .iter()
        .filter_map(|id| site.workflow(id))
        .map(|w| WriteOp::PutWorkflowHeader(Box::new(w.header())))
        .collect();
    for (workflow, index) in workflow_jobs {
        let job = site.workflow(&workflow).and_then(|w| w.jobs.get(index));
        if let (Some(job), Ok(index)) = (job, u32::try_from(index)) {
            ops.push(WriteOp::PutWorkflowJob { workflow, index, job: Box::new(job.clone()) });
        }
    }
    ops.extend(
        runner_jobs
            .iter()
            .filter_map(|id| site.runner_job(id))
            .map(|r| WriteOp::PutRunnerJob(Box::new(r.clone()))),
    );
    ops
}

/// Why a local request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The core refused it.
    #[error(transparent)]
    Refused(SiteError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RequestError> for JobError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Refused(s) => s.into(),
            RequestError::Store(s) => Self::Store(s),
        }
    }
}

impl From<RequestError> for WorkflowError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Refused(s) => s.into(),
            RequestError::Store(s) => Self::Store(s),
        }
    }
}

/// Arms the core's timers and fires them: a later setting of the same timer replaces the
/// earlier one.
pub(super) async fn run_timers(
    state: Arc<NodeState>,
    mut set: mpsc::UnboundedReceiver<(Timer, Timestamp)>,
) {
    let mut armed: HashMap<Timer, Timestamp> = HashMap::new();
    loop {
        let next = armed.values().min().copied();
        let wait = next.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(at.as_millis().saturating_sub(now().as_millis()))
        });
        tokio::select! {
            biased;
            () = state.cancel.cancelled() => return,
            got = set.recv() => match got {
                Some((timer, at)) => { armed.insert(timer, at); }
                None => return,
            },
            () = tokio::time::sleep(wait), if next.is_some() => {
                let t = now();
                let due: Vec<Timer> =
                    armed.iter().filter(|(_, at)| **at <= t).map(|(timer, _)| *timer).collect();
                for timer in &due {
                    armed.remove(timer);
                }
                let events = due.into_iter().map(Event::TimerFired).collect();
                if let Err(e) = state.feed(events, Vec::new()).await {
                    tracing::error!(error = %e, "cannot record what a timer changed");
                }
            }
        }
    }
}
