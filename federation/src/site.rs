//! One instance's federation logic, whole: [`Site::handle`] takes an [`Event`] and returns the
//! [`Command`]s the driver must carry out.
//!
//! A site is both the owner of its workflows and the runner of the jobs other instances (and
//! its own workflows) send it. It routes between the state machines of this crate —
//! [`Workflow`] at the owner, [`RunnerJob`] at the runner — and holds every rule between them:
//! which messages apply to which job, cancel matching, which results the owner takes (and
//! which are `superseded`), when a runner out of reach counts as lost or gone, and that a job
//! of its own workflow runs here without the network under [`Policy::own`].
//!
//! The daemon (`kaapana-node`) and the simulator (`simulations/`) drive the same code: the
//! daemon verifies signed messages and feeds their payloads, carries out the commands with
//! real I/O (redb, libp2p, containerd) and arms real timers; the simulator does the same in
//! virtual time.
//!
//! # The order of commands
//!
//! The commands of one call come in this order:
//! 1. every [`Command::Persist`] (each changed record once, in its state after the call; a
//!    workflow's own fields and each of its jobs are records of their own, see [`Record`]);
//! 2. the effects, in causal order: [`Command::Send`], [`Command::StartJob`],
//!    [`Command::StopJob`], [`Command::DeliverResult`], [`Command::SetTimer`] and
//!    [`Command::Notify`].
//!
//! A driver must make the records durable before any effect leaves the process: it commits
//! the `Persist` records together with the `Send`s (queued in a durable outbox) and with the
//! record of the message that caused them, and only then acknowledges that message, starts
//! containers or delivers results. Replaying an event after a crash is harmless: a message
//! already applied changes nothing (ids are deterministic, sequences only grow).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kaapana_protocol::{
    Cancel, CapabilityAd, ExitStatus, Header, InstanceId, JobId, JobManifest, JobState, JobUpdate,
    NameScope, ResultManifest, Timestamp, WorkflowId, WorkflowManifest, fit_text,
};
use serde::{Deserialize, Serialize};

use crate::capability::Candidate;
use crate::job::{Expected, RunnerCommand, RunnerEvent, RunnerJob, TransitionError, Update};
use crate::policy::Policy;
use crate::registry::{RegisteredInstance, Registry};
use crate::workflow::{PlanError, Workflow, WorkflowCommand, WorkflowEvent, WorkflowState};

/// Time limits of a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteConfig {
    /// How long job manifests stay valid (they may wait for a runner that is away).
    pub job_lifetime: Duration,
    /// How long job updates and cancels stay valid (they may wait in an outbox).
    pub message_lifetime: Duration,
    /// After how long out of reach a runner counts as lost: jobs that may move, move.
    pub runner_lost_after: Duration,
    /// After how long out of reach a runner counts as gone: its remaining jobs fail.
    pub runner_give_up_after: Duration,
}

impl Default for SiteConfig {
    fn default() -> Self {
        Self {
            job_lifetime: Duration::from_secs(7 * 24 * 3600),
            message_lifetime: Duration::from_secs(7 * 24 * 3600),
            runner_lost_after: Duration::from_secs(300),
            runner_give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// A job message between instances: what a driver receives verified and sends signed.
// Messages live only until the driver has signed or applied them.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// A job for its runner.
    JobManifest(JobManifest),
    /// A runner's report on a job, for its owner.
    JobUpdate(JobUpdate),
    /// An owner's cancellation of a workflow's jobs.
    Cancel(Cancel),
}

/// How a job's container went, as the executor reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The container started.
    Started,
    /// The container (or DAG run) ended.
    Exited {
        /// How.
        exit: ExitStatus,
        /// What the executor knows beyond the exit status (the failed Airflow task, say).
        detail: Option<String>,
    },
    /// The executor could not run the job (image missing, dataset gone, runtime error).
    Failed(String),
}

/// A timer the site asks its driver to arm ([`Command::SetTimer`]) and to fire
/// ([`Event::TimerFired`]). Setting a timer replaces an earlier one with the same value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// Look again at a runner that is out of reach: lost after
    /// [`SiteConfig::runner_lost_after`], gone after [`SiteConfig::runner_give_up_after`].
    RunnerCheck(InstanceId),
    /// A training's round deadline ([`Workflow::handle`] with
    /// [`WorkflowEvent::Tick`]).
    RoundDeadline(WorkflowId),
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The driver has loaded the site and starts: every registered peer is out of reach
    /// until it connects.
    Started,
    /// A verified job message from the registered instance `from` (its signer).
    Received {
        /// The signer.
        from: InstanceId,
        /// The payload.
        message: Message,
    },
    /// A verified capability ad of a registered instance.
    Capabilities {
        /// The signer.
        from: InstanceId,
        /// The ad.
        ad: CapabilityAd,
    },
    /// The receiver refused a message this site sent, for good (e.g. it expired while it
    /// waited): a refused job manifest fails its job.
    Refused {
        /// The receiver.
        to: InstanceId,
        /// The message.
        message: Message,
        /// The receiver's reason.
        reason: String,
    },
    /// A result the site accepted ([`Site::expects_result`]) is stored with its bundle.
    ResultStored {
        /// The runner that signed it (this site for its own jobs).
        from: InstanceId,
        /// The verified result manifest.
        result: ResultManifest,
        /// For a training's update ([`Site::is_update`]): the sample count its bundle
        /// reports (its `samples` file), `None` if it has none or it is not a number.
        samples: Option<u64>,
    },
    /// The executor reports on a job this site runs.
    Executor {
        /// The job.
        job: JobId,
        /// What happened.
        outcome: Outcome,
    },
    /// A local user submits a workflow this site owns.
    Submit {
        /// The manifest (its owner must be this site).
        manifest: WorkflowManifest,
    },
    /// The local admin approves a job that waits for approval.
    Approve {
        /// The job.
        job: JobId,
    },
    /// The local admin rejects it.
    Reject {
        /// The job.
        job: JobId,
        /// Why.
        reason: String,
    },
    /// A local user cancels a workflow this site owns.
    CancelWorkflow {
        /// The workflow.
        workflow: WorkflowId,
        /// Who, in words.
        by: String,
    },
    /// A registered instance connected.
    PeerConnected {
        /// It.
        peer: InstanceId,
    },
    /// A registered instance's last connection closed.
    PeerDisconnected {
        /// It.
        peer: InstanceId,
    },
    /// An instance was registered, or its policy changed.
    InstanceRegistered(Box<RegisteredInstance>),
    /// An instance was unregistered.
    InstanceRemoved(InstanceId),
    /// What this site offers its own workflows changed (datasets, resources).
    OwnCapabilities(Box<CapabilityAd>),
    /// A timer fired.
    TimerFired(Timer),
}

/// A durable record the driver must store: which one changed. The driver stores its state
/// as [`Site::workflow`] or [`Site::runner_job`] give it before it feeds the next event (the
/// record may be large, so the command does not copy it).
///
/// A workflow is stored as several records: its own fields ([`Workflow::header`]) and one
/// record per job, so that an event that changes one job of a workflow with thousands costs
/// one job's record, not the whole workflow. [`Workflow::from_records`] puts them together
/// again for [`Site::new`]. A new workflow names its header and every job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// The own fields of a workflow this site owns: its [`Workflow::header`].
    Workflow(WorkflowId),
    /// One job of a workflow this site owns: `Site::workflow(workflow).jobs[index]`.
    /// Positions never change: a workflow's jobs are only ever appended.
    WorkflowJob {
        /// The workflow.
        workflow: WorkflowId,
        /// The job's position in [`Workflow::jobs`].
        index: usize,
    },
    /// A job this site runs.
    RunnerJob(JobId),
}

/// A job this site runs, with the verified manifest it came in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRecord {
    /// Its state.
    pub job: RunnerJob,
    /// Its manifest.
    pub manifest: JobManifest,
}

/// What the driver must do, in the documented order (see the module docs).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Store this record durably (replacing the earlier one with its id), in its state after
    /// this call.
    Persist(Record),
    /// Sign this message and deliver it to `to` (through a durable outbox, in order).
    Send {
        /// The receiver.
        to: InstanceId,
        /// The message.
        message: Message,
    },
    /// Run this job's container (the job is scheduled); report through [`Event::Executor`].
    StartJob(Box<JobManifest>),
    /// Kill this job's container.
    StopJob(JobId),
    /// Pack the job's output as its result, sign a `ResultManifest` and deliver it to the
    /// job's owner until it is stored (for this site's own jobs: store it and report
    /// [`Event::ResultStored`]).
    DeliverResult {
        /// The job as it ended.
        job: Box<RunnerJob>,
        /// How its container ended.
        exit: ExitStatus,
    },
    /// Arm a timer (replacing one with the same value).
    SetTimer {
        /// Which.
        timer: Timer,
        /// When it fires.
        at: Timestamp,
    },
    /// Tell the users.
    Notify(Notice),
}

/// Something users should learn about, or a local request that was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// A local request was refused; nothing changed.
    Refused(SiteError),
    /// A workflow was planned and started.
    WorkflowSubmitted {
        /// It.
        workflow: WorkflowId,
        /// Its name.
        name: String,
    },
    /// A workflow's jobs moved on ([`Workflow::counts`] says where they are; the notice does
    /// not count them, which costs time in proportion to the workflow's size).
    WorkflowProgress {
        /// It.
        workflow: WorkflowId,
        /// Its name.
        name: String,
    },
    /// A workflow reached its final state.
    WorkflowEnded {
        /// It.
        workflow: WorkflowId,
        /// Which state.
        state: WorkflowState,
        /// Why (failures and cancellations).
        reason: Option<String>,
    },
    /// A job of a workflow here was sent to its runner (or started here).
    JobDispatched {
        /// Its manifest.
        job: Box<JobManifest>,
    },
    /// A job arrived at this runner.
    JobReceived {
        /// Its owner.
        owner: InstanceId,
        /// It, as received (possibly failed at once by policy).
        job: Box<RunnerJob>,
    },
    /// A job this site runs, or one its workflows sent out, changed state.
    JobState {
        /// The other side: the job's owner at the runner, its runner at the owner.
        peer: InstanceId,
        /// The job.
        job: JobId,
        /// Its new state.
        state: JobState,
        /// Why (failures).
        reason: Option<String>,
    },
    /// A job manifest that names another runner or owner was refused.
    JobRefused {
        /// Its sender.
        from: InstanceId,
        /// Why.
        detail: String,
    },
    /// A job update that does not apply was ignored.
    JobUpdateIgnored {
        /// Its sender.
        from: InstanceId,
        /// Why.
        detail: String,
    },
    /// The owner gave a job up (its runner gone, or the manifest refused).
    JobGivenUp {
        /// Its runner.
        runner: InstanceId,
        /// The job.
        job: JobId,
        /// Why.
        reason: String,
    },
}

/// Why a local request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SiteError {
    /// No such job here.
    #[error("no job {0} at this instance; see `kaapana-node job list`")]
    NoSuchJob(JobId),
    /// No such workflow here.
    #[error("no workflow {0} at this instance; see `kaapana-node workflow list`")]
    NoSuchWorkflow(WorkflowId),
    /// It has ended already.
    #[error("workflow {0} has ended already ({1})")]
    WorkflowEnded(WorkflowId, WorkflowState),
    /// A workflow with this id exists already.
    #[error("workflow {0} exists already")]
    WorkflowExists(WorkflowId),
    /// The manifest is owned by another instance.
    #[error("workflow {0} is owned by instance {1}, not by this one")]
    NotOwner(WorkflowId, InstanceId),
    /// The workflow cannot be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The job is not in a state where this applies.
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

/// Why a job message from a registered instance is none of its business here (see
/// [`Site::concerns`]): it names a job the sender has no part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Unrelated {
    /// (As the owner.) The job is not one of this instance's workflows' jobs; (as the
    /// runner) no job of that workflow runs here.
    UnknownJob,
    /// (As the owner.) The job is this instance's, but it went to another runner.
    OtherRunner,
    /// (As the runner.) The job (or its workflow) here belongs to another owner, or a
    /// manifest names an owner other than its signer.
    NotTheOwner,
    /// (As the runner.) A manifest names another runner.
    OtherRecipient,
}

impl Unrelated {
    /// A short, stable label for metrics (`peer_refused_total{reason="other_runner"}`).
    pub const fn label(self) -> &'static str {
        match self {
            Self::UnknownJob => "unknown_job",
            Self::OtherRunner => "other_runner",
            Self::NotTheOwner => "not_the_owner",
            Self::OtherRecipient => "other_recipient",
        }
    }
}

/// What a site knows of one registered instance's reachability and capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Peer {
    connected: bool,
    /// When `connected` last changed (or when the site started).
    since: Timestamp,
    ad: Option<Box<CapabilityAd>>,
}

/// Commands collected during one call: changed records and effects.
#[derive(Debug, Default)]
struct Out {
    workflows: BTreeSet<WorkflowId>,
    runner_jobs: BTreeSet<JobId>,
    effects: Vec<Command>,
}

impl Out {
    fn notify(&mut self, notice: Notice) {
        self.effects.push(Command::Notify(notice));
    }
}

/// One instance's federation state and rules. See the module docs.
#[derive(Clone, Debug)]
pub struct Site {
    me: InstanceId,
    name: String,
    config: SiteConfig,
    registry: Registry,
    peers: BTreeMap<InstanceId, Peer>,
    own_ad: Option<CapabilityAd>,
    workflows: BTreeMap<WorkflowId, Workflow>,
    /// Boxed: a site holds few, and a map of large inline values reserves much room.
    runner_jobs: BTreeMap<JobId, Box<RunnerRecord>>,
    /// The ids of every attempt of every job of this site's workflows → their workflow
    /// (a job id is derived from its workflow's id, so it names the workflow by itself).
    owned_jobs: BTreeMap<JobId, WorkflowId>,
    /// Built once until a peer's reachability or ad, the registry or the own ad change.
    candidates: Option<Arc<Vec<Candidate>>>,
}

impl Site {
    /// A site for instance `me` called `name`, with its registered instances and the records
    /// it persisted before (workflows it owns, jobs it runs). Peers start out of reach at
    /// `now`; feed [`Event::Started`] before anything else.
    pub fn new(
        me: InstanceId,
        name: impl Into<String>,
        config: SiteConfig,
        registry: Registry,
        workflows: impl IntoIterator<Item = Workflow>,
        runner_jobs: impl IntoIterator<Item = RunnerRecord>,
        now: Timestamp,
    ) -> Self {
        let peers = registry
            .iter()
            .map(|i| (i.instance_id, Peer { connected: false, since: now, ad: None }))
            .collect();
        let workflows: BTreeMap<WorkflowId, Workflow> =
            workflows.into_iter().map(|w| (w.workflow_id, w)).collect();
        let owned_jobs = workflows
            .values()
            .flat_map(|w| {
                w.jobs.iter().flat_map(move |j| {
                    j.previous.iter().chain([&j.job_id]).map(move |id| (*id, w.workflow_id))
                })
            })
            .collect();
        Self {
            me,
            name: name.into(),
            config,
            registry,
            peers,
            own_ad: None,
            workflows,
            runner_jobs: runner_jobs.into_iter().map(|r| (r.job.job_id, Box::new(r))).collect(),
            owned_jobs,
            candidates: None,
        }
    }

    /// Sets a peer's last verified capability ad (a driver restoring what it stored) without
    /// an event.
    pub fn restore_capabilities(&mut self, from: InstanceId, ad: CapabilityAd) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.ad = Some(Box::new(ad));
            self.candidates = None;
        }
    }

    /// This instance's id.
    pub const fn id(&self) -> InstanceId {
        self.me
    }

    /// This instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its time limits.
    pub const fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// The registered instances.
    pub const fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The upstream bundle `digest` if it is an input of job `job`, which one of this site's
    /// workflows dispatched to `runner` and which has not ended (see
    /// [`Workflow::input_for`]).
    pub fn input_for(
        &self,
        runner: &InstanceId,
        job: &JobId,
        digest: &kaapana_protocol::Sha256Digest,
    ) -> Option<kaapana_protocol::BlobRef> {
        let workflow = self.owned_jobs.get(job)?;
        self.workflows.get(workflow)?.input_for(runner, job, digest)
    }

    /// A workflow this site owns.
    pub fn workflow(&self, id: &WorkflowId) -> Option<&Workflow> {
        self.workflows.get(id)
    }

    /// Every workflow this site owns.
    pub fn workflows(&self) -> impl Iterator<Item = &Workflow> {
        self.workflows.values()
    }

    /// A job this site runs.
    pub fn runner_job(&self, id: &JobId) -> Option<&RunnerRecord> {
        self.runner_jobs.get(id).map(AsRef::as_ref)
    }

    /// Every job this site runs.
    pub fn runner_jobs(&self) -> impl Iterator<Item = &RunnerRecord> {
        self.runner_jobs.values().map(AsRef::as_ref)
    }

    /// Whether `peer` is connected as far as this site knows.
    pub fn is_connected(&self, peer: &InstanceId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.connected)
    }

    /// The instances this site's workflows may run on, itself first.
    pub fn candidates(&mut self) -> Arc<Vec<Candidate>> {
        if let Some(c) = &self.candidates {
            return Arc::clone(c);
        }
        let mut out = Vec::with_capacity(self.registry.len() + 1);
        out.push(Candidate {
            instance: self.me,
            name: self.name.clone(),
            ad: self.own_ad.clone().unwrap_or_else(|| unknown_ad(&self.name)),
            reachable: true,
        });
        for inst in self.registry.iter() {
            let peer = self.peers.get(&inst.instance_id);
            // An instance that has not advertised anything yet matches no capability query,
            // but jobs may still name it: they wait in the outbox until it is reachable.
            let ad = peer
                .and_then(|p| p.ad.as_deref().cloned())
                .unwrap_or_else(|| unknown_ad(&inst.name));
            out.push(Candidate {
                instance: inst.instance_id,
                name: inst.name.clone(),
                ad,
                reachable: peer.is_some_and(|p| p.connected),
            });
        }
        let fresh = Arc::new(out);
        self.candidates = Some(Arc::clone(&fresh));
        fresh
    }

    /// Whether the result of `job` is a training's update, whose bundle's sample count the
    /// driver reads and passes with [`Event::ResultStored`].
    pub fn is_update(&self, job: &JobId) -> bool {
        self.owned_jobs
            .get(job)
            .and_then(|w| self.workflows.get(w))
            .is_some_and(|w| w.is_update(job))
    }

    /// Whether the owner takes `result` from `runner`: a result of the current attempt of a
    /// job it submitted to that runner. Results of attempts replaced since are
    /// [`Expected::Superseded`]; they must not be stored.
    pub fn expects_result(&self, result: &ResultManifest, runner: &InstanceId) -> Expected {
        match self.owned_jobs.get(&result.job_id).and_then(|w| self.workflows.get(w)) {
            Some(w) => w.expects_result(result, runner),
            None => Expected::NotYours,
        }
    }

    /// Whether `message`, signed by the registered instance `from`, is about a job `from` has
    /// a part in here: an update about a job this site sent to `from` (the current attempt or
    /// an earlier one), a manifest naming this site as its runner and `from` as its owner, a
    /// cancel of jobs `from` sent here. `sent_with` are manifests accepted before `message`
    /// but not fed yet (earlier in the same request), which a cancel may name. Anything else
    /// is refused before it is recorded, with the reason and a message for the sender.
    pub fn concerns(
        &self,
        from: &InstanceId,
        message: &Message,
        sent_with: &[&JobManifest],
    ) -> Result<(), (Unrelated, String)> {
        match message {
            Message::JobUpdate(u) => self.runs_for_us(from, &u.job_id),
            Message::JobManifest(m) => {
                if m.runner != self.me {
                    return Err((
                        Unrelated::OtherRecipient,
                        format!(
                            "job {} is for runner {}, not for this instance",
                            m.job_id, m.runner
                        ),
                    ));
                }
                if m.owner != *from {
                    return Err((
                        Unrelated::NotTheOwner,
                        format!(
                            "job {} is owned by {}; only its owner may send it",
                            m.job_id, m.owner
                        ),
                    ));
                }
                match self.runner_jobs.get(&m.job_id) {
                    Some(r) if r.job.owner != *from => Err((
                        Unrelated::NotTheOwner,
                        format!("job {} here belongs to another owner", m.job_id),
                    )),
                    _ => Ok(()),
                }
            }
            Message::Cancel(c) => {
                let matches = |workflow: WorkflowId, job: JobId| {
                    workflow == c.workflow_id && c.job_id.is_none_or(|id| id == job)
                };
                if sent_with.iter().any(|m| m.owner == *from && matches(m.workflow_id, m.job_id)) {
                    return Ok(());
                }
                let mut others = false;
                let candidates: Box<dyn Iterator<Item = &RunnerRecord>> = match c.job_id {
                    Some(id) => Box::new(self.runner_jobs.get(&id).map(AsRef::as_ref).into_iter()),
                    None => Box::new(self.runner_jobs.values().map(AsRef::as_ref)),
                };
                for r in candidates.filter(|r| matches(r.job.workflow_id, r.job.job_id)) {
                    if r.job.owner == *from {
                        return Ok(());
                    }
                    others = true;
                }
                if !others {
                    // A cancel of nothing that runs here cancels nothing and names no one
                    // else's job (the owner may cancel a job whose manifest never arrived).
                    return Ok(());
                }
                let what = c.job_id.map_or_else(
                    || format!("workflow {}", c.workflow_id),
                    |j| format!("job {j} of workflow {}", c.workflow_id),
                );
                Err((Unrelated::NotTheOwner, format!("{what} here was sent by another owner")))
            }
        }
    }

    /// Whether `job` is one of this site's jobs that it sent to `runner` (any attempt): what
    /// updates and results from `runner` may be about.
    pub fn runs_for_us(&self, runner: &InstanceId, job: &JobId) -> Result<(), (Unrelated, String)> {
        let unknown =
            || (Unrelated::UnknownJob, format!("job {job} is not a job of this instance's"));
        let w = self.owned_jobs.get(job).and_then(|w| self.workflows.get(w)).ok_or_else(unknown)?;
        let ran_on = match w.job(job) {
            Some(j) => Some(j.runner),
            None => w
                .jobs
                .iter()
                .find_map(|j| {
                    let k = j.previous.iter().position(|p| p == job)?;
                    Some(j.previous_runners.get(k).copied())
                })
                .ok_or_else(unknown)?,
        };
        match ran_on {
            Some(r) if r != *runner => Err((
                Unrelated::OtherRunner,
                format!(
                    "job {job} was sent to {}, not to {}",
                    self.name_of(&r),
                    self.name_of(runner)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Applies one event at `now`; returns the commands in the documented order.
    pub fn handle(&mut self, now: Timestamp, event: Event) -> Vec<Command> {
        let mut out = Out::default();
        match event {
            Event::Started => {
                // Peers nothing waits for need no timer: a job sent to one later arms it.
                let mut waited_for = BTreeSet::new();
                for w in self.workflows.values().filter(|w| !w.state.is_final()) {
                    let runners = w.jobs.iter().filter(|j| waits_for_runner(j)).map(|j| j.runner);
                    waited_for.extend(runners);
                }
                for p in waited_for {
                    self.arm_runner_check(p, now, &mut out);
                }
                // Rounds waiting for their deadline wake up again (at once if it passed).
                for w in self.workflows.values().filter(|w| !w.state.is_final()) {
                    let open = w.training.as_ref().and_then(|t| t.current());
                    if let Some(r) = open.filter(|r| r.closed_at.is_none()) {
                        let timer = Timer::RoundDeadline(w.workflow_id);
                        out.effects.push(Command::SetTimer { timer, at: r.deadline });
                    }
                }
            }
            Event::Received { from, message } => match message {
                Message::JobManifest(m) => self.on_job_manifest(from, m, now, &mut out),
                Message::JobUpdate(u) => self.on_job_update(from, &u, now, &mut out),
                Message::Cancel(c) => self.on_cancel(from, &c, now, &mut out),
            },
            Event::Capabilities { from, ad } => {
                if let Some(p) = self.peers.get_mut(&from)
                    && p.ad.as_ref().is_none_or(|old| old.sequence < ad.sequence)
                {
                    p.ad = Some(Box::new(ad));
                    self.candidates = None;
                }
            }
            Event::Refused { to, message, reason } => {
                if let Message::JobManifest(m) = message {
                    let name = self.name_of(&to);
                    let why = format!("{name} refused the job manifest: {reason}");
                    self.give_up(to, m.job_id, m.workflow_id, &why, now, &mut out);
                }
            }
            Event::ResultStored { from, result, samples } => {
                self.on_result(from, &result, samples, now, &mut out);
            }
            Event::Executor { job, outcome } => {
                let event = match outcome {
                    Outcome::Started => RunnerEvent::Started,
                    Outcome::Exited { exit, detail } => RunnerEvent::Exited { exit, detail },
                    Outcome::Failed(reason) => RunnerEvent::ExecutorFailed { reason },
                };
                self.local_runner_event(job, event, now, &mut out);
            }
            Event::Submit { manifest } => self.submit(manifest, now, &mut out),
            Event::Approve { job } => {
                self.local_runner_event(job, RunnerEvent::Approved, now, &mut out);
            }
            Event::Reject { job, reason } => {
                self.local_runner_event(job, RunnerEvent::Rejected { reason }, now, &mut out);
            }
            Event::CancelWorkflow { workflow, by } => match self.workflows.get(&workflow) {
                None => out.notify(Notice::Refused(SiteError::NoSuchWorkflow(workflow))),
                Some(w) if w.state.is_final() => {
                    out.notify(Notice::Refused(SiteError::WorkflowEnded(workflow, w.state)));
                }
                Some(_) => self.feed(workflow, WorkflowEvent::Cancel { by }, now, &mut out),
            },
            Event::PeerConnected { peer } => {
                if let Some(p) = self.peers.get_mut(&peer)
                    && !p.connected
                {
                    p.connected = true;
                    p.since = now;
                    self.candidates = None;
                }
            }
            Event::PeerDisconnected { peer } => {
                if let Some(p) = self.peers.get_mut(&peer)
                    && p.connected
                {
                    p.connected = false;
                    p.since = now;
                    self.candidates = None;
                    if self.waits_for(&peer) {
                        self.arm_runner_check(peer, now, &mut out);
                    }
                }
            }
            Event::InstanceRegistered(inst) => {
                let id = inst.instance_id;
                let _ = self.registry.remove(&crate::InstanceRef::Id(id));
                if self.registry.add(*inst).is_ok() {
                    self.peers.entry(id).or_insert(Peer { connected: false, since: now, ad: None });
                }
                self.candidates = None;
            }
            Event::InstanceRemoved(id) => {
                let _ = self.registry.remove(&crate::InstanceRef::Id(id));
                self.peers.remove(&id);
                self.candidates = None;
            }
            Event::OwnCapabilities(ad) => {
                self.own_ad = Some(*ad);
                self.candidates = None;
            }
            Event::TimerFired(Timer::RunnerCheck(peer)) => self.check_runner(peer, now, &mut out),
            Event::TimerFired(Timer::RoundDeadline(workflow)) => {
                self.feed(workflow, WorkflowEvent::Tick, now, &mut out);
            }
        }
        self.finish(out)
    }

    /// Turns what one call collected into commands: records first, then effects.
    fn finish(&mut self, out: Out) -> Vec<Command> {
        let mut cmds =
            Vec::with_capacity(out.workflows.len() + out.runner_jobs.len() + out.effects.len());
        for &workflow in &out.workflows {
            let Some(w) = self.workflows.get_mut(&workflow) else { continue };
            let changes = w.take_changes();
            if changes.header {
                cmds.push(Command::Persist(Record::Workflow(workflow)));
            }
            cmds.extend(
                changes
                    .jobs
                    .into_iter()
                    .map(|index| Command::Persist(Record::WorkflowJob { workflow, index })),
            );
        }
        for id in out.runner_jobs.iter().filter(|id| self.runner_jobs.contains_key(id)) {
            cmds.push(Command::Persist(Record::RunnerJob(*id)));
        }
        cmds.extend(out.effects);
        cmds
    }

    fn name_of(&self, id: &InstanceId) -> String {
        if *id == self.me {
            return self.name.clone();
        }
        self.registry.get(id).map_or_else(|| id.to_string(), |i| i.name.clone())
    }

    // ---- as a runner ------------------------------------------------------------------

    fn on_job_manifest(&mut self, from: InstanceId, m: JobManifest, now: Timestamp, out: &mut Out) {
        if m.runner != self.me || m.owner != from {
            out.notify(Notice::JobRefused {
                from,
                detail: format!(
                    "job {} names runner {} and owner {}; only its owner may send it here",
                    m.job_id, m.runner, m.owner
                ),
            });
            return;
        }
        let Some(owner) = self.registry.get(&from) else {
            out.notify(Notice::JobRefused {
                from,
                detail: format!("job {} comes from an instance that is not registered", m.job_id),
            });
            return;
        };
        let (name, policy) = (owner.name.clone(), owner.policy.clone());
        self.receive(from, &name, &policy, m, now, out);
    }

    /// A job arrives at this runner from `owner` (called `owner_name`) under `policy`.
    fn receive(
        &mut self,
        owner: InstanceId,
        owner_name: &str,
        policy: &Policy,
        m: JobManifest,
        now: Timestamp,
        out: &mut Out,
    ) {
        if self.runner_jobs.contains_key(&m.job_id) {
            return;
        }
        let (job, cmds) = RunnerJob::receive(&m, owner_name, policy, now);
        out.notify(Notice::JobReceived { owner, job: Box::new(job.clone()) });
        let id = job.job_id;
        self.runner_jobs.insert(id, Box::new(RunnerRecord { job, manifest: m }));
        self.runner_commands(id, cmds, now, out);
    }

    fn on_cancel(&mut self, from: InstanceId, c: &Cancel, now: Timestamp, out: &mut Out) {
        let by = self.name_of(&from);
        let matching: Vec<JobId> = self
            .runner_jobs
            .values()
            .filter(|r| {
                let j = &r.job;
                j.owner == from
                    && j.workflow_id == c.workflow_id
                    && c.job_id.is_none_or(|id| id == j.job_id)
                    && !j.state.is_terminal()
            })
            .map(|r| r.job.job_id)
            .collect();
        for job in matching {
            // Only jobs that have not ended match, and an abort applies to every one of those.
            let _ = self.runner_event(job, RunnerEvent::Aborted { by: by.clone() }, now, out);
        }
    }

    /// A local decision or executor report; refused with the reason if it does not apply.
    fn local_runner_event(
        &mut self,
        job: JobId,
        event: RunnerEvent,
        now: Timestamp,
        out: &mut Out,
    ) {
        if !self.runner_jobs.contains_key(&job) {
            out.notify(Notice::Refused(SiteError::NoSuchJob(job)));
            return;
        }
        if let Err(e) = self.runner_event(job, event, now, out) {
            out.notify(Notice::Refused(SiteError::Transition(e)));
        }
    }

    fn runner_event(
        &mut self,
        job: JobId,
        event: RunnerEvent,
        now: Timestamp,
        out: &mut Out,
    ) -> Result<(), TransitionError> {
        let Some(rec) = self.runner_jobs.get_mut(&job) else { return Ok(()) };
        let cmds = rec.job.handle(event, now)?;
        out.notify(Notice::JobState {
            peer: rec.job.owner,
            job,
            state: rec.job.state,
            reason: rec.job.reason.clone(),
        });
        self.runner_commands(job, cmds, now, out);
        Ok(())
    }

    /// Carries out a runner job's commands: its record, updates for its owner (applied here
    /// when the owner is this site), and executor actions.
    fn runner_commands(
        &mut self,
        job: JobId,
        cmds: Vec<RunnerCommand>,
        now: Timestamp,
        out: &mut Out,
    ) {
        let Some(rec) = self.runner_jobs.get(&job) else { return };
        let owner = rec.job.owner;
        let mut local_updates = Vec::new();
        for c in cmds {
            let Some(rec) = self.runner_jobs.get(&job) else { return };
            match c {
                RunnerCommand::Persist => {
                    out.runner_jobs.insert(job);
                }
                RunnerCommand::SendUpdate(u) => {
                    let update = make_update(&rec.job, &u, now, self.config.message_lifetime);
                    if owner == self.me {
                        local_updates.push(update);
                    } else {
                        out.effects
                            .push(Command::Send { to: owner, message: Message::JobUpdate(update) });
                    }
                }
                RunnerCommand::Execute => {
                    out.effects.push(Command::StartJob(Box::new(rec.manifest.clone())));
                }
                RunnerCommand::Kill => out.effects.push(Command::StopJob(job)),
                RunnerCommand::SendResult { exit } => out
                    .effects
                    .push(Command::DeliverResult { job: Box::new(rec.job.clone()), exit }),
            }
        }
        // This site runs a job of its own workflow: its updates apply here directly.
        for update in local_updates {
            self.on_job_update(self.me, &update, now, out);
        }
    }

    // ---- as an owner ------------------------------------------------------------------

    fn submit(&mut self, manifest: WorkflowManifest, now: Timestamp, out: &mut Out) {
        let id = manifest.workflow_id;
        if manifest.owner != self.me {
            out.notify(Notice::Refused(SiteError::NotOwner(id, manifest.owner)));
            return;
        }
        if self.workflows.contains_key(&id) {
            out.notify(Notice::Refused(SiteError::WorkflowExists(id)));
            return;
        }
        let cands = self.candidates();
        let started = Workflow::start(&manifest, &cands, now, self.config.job_lifetime);
        let (workflow, cmds) = match started {
            Ok(w) => w,
            Err(e) => {
                out.notify(Notice::Refused(SiteError::Plan(e)));
                return;
            }
        };
        for j in &workflow.jobs {
            self.owned_jobs.insert(j.job_id, id);
        }
        out.notify(Notice::WorkflowSubmitted { workflow: id, name: workflow.name.clone() });
        self.workflows.insert(id, workflow);
        out.workflows.insert(id);
        self.workflow_commands(id, cmds, now, out);
    }

    fn on_job_update(&mut self, from: InstanceId, u: &JobUpdate, now: Timestamp, out: &mut Out) {
        let Some(&wid) = self.owned_jobs.get(&u.job_id) else {
            out.notify(Notice::JobUpdateIgnored {
                from,
                detail: format!("unknown job {}", u.job_id),
            });
            return;
        };
        let cands = self.candidates();
        let life = self.config.job_lifetime;
        let Some(w) = self.workflows.get_mut(&wid) else { return };
        match w.apply_update(from, u, &cands, now, life) {
            Ok(None) => {}
            Ok(Some(cmds)) => {
                let job = w.job(&u.job_id);
                out.notify(Notice::JobState {
                    peer: from,
                    job: u.job_id,
                    state: job.map_or(u.state, |j| j.state),
                    reason: job.and_then(|j| j.reason.clone()),
                });
                self.changed(wid, cmds, now, out);
            }
            Err(e) => out.notify(Notice::JobUpdateIgnored { from, detail: e.to_string() }),
        }
    }

    fn on_result(
        &mut self,
        from: InstanceId,
        r: &ResultManifest,
        samples: Option<u64>,
        now: Timestamp,
        out: &mut Out,
    ) {
        if self.expects_result(r, &from) != Expected::Yes {
            return;
        }
        let Some(&wid) = self.owned_jobs.get(&r.job_id) else { return };
        let event = WorkflowEvent::ResultStored {
            job_id: r.job_id,
            bundle: r.bundle,
            success: r.exit == ExitStatus::Exited(0),
            samples,
        };
        self.feed(wid, event, now, out);
    }

    /// Feeds one event to a workflow and carries out its commands.
    fn feed(&mut self, wid: WorkflowId, event: WorkflowEvent, now: Timestamp, out: &mut Out) {
        let cands = self.candidates();
        let life = self.config.job_lifetime;
        let Some(w) = self.workflows.get_mut(&wid) else { return };
        let before = w.revision();
        let cmds = w.handle(event, &cands, now, life);
        if cmds.is_empty() && w.revision() == before {
            return;
        }
        self.changed(wid, cmds, now, out);
    }

    fn changed(
        &mut self,
        wid: WorkflowId,
        cmds: Vec<WorkflowCommand>,
        now: Timestamp,
        out: &mut Out,
    ) {
        if let Some(w) = self.workflows.get(&wid) {
            out.workflows.insert(wid);
            out.notify(Notice::WorkflowProgress { workflow: wid, name: w.name.clone() });
        }
        self.workflow_commands(wid, cmds, now, out);
    }

    /// Carries out a workflow's commands: job manifests and cancels for their runners (or
    /// straight to this site's own runner side), the end of the workflow.
    fn workflow_commands(
        &mut self,
        wid: WorkflowId,
        cmds: Vec<WorkflowCommand>,
        now: Timestamp,
        out: &mut Out,
    ) {
        for cmd in cmds {
            match cmd {
                WorkflowCommand::Dispatch(m) => {
                    self.owned_jobs.insert(m.job_id, wid);
                    out.notify(Notice::JobDispatched { job: Box::new(m.clone()) });
                    let runner = m.runner;
                    if runner == self.me {
                        let name = self.name.clone();
                        self.receive(self.me, &name, &Policy::own(), m, now, out);
                    } else {
                        out.effects
                            .push(Command::Send { to: runner, message: Message::JobManifest(m) });
                        if !self.is_connected(&runner) {
                            self.arm_runner_check(runner, now, out);
                        }
                    }
                }
                WorkflowCommand::CancelJob { runner, job_id, reason } => {
                    if runner == self.me {
                        let by = self.name.clone();
                        let live = self
                            .runner_jobs
                            .get(&job_id)
                            .is_some_and(|r| !r.job.state.is_terminal());
                        if live {
                            let _ =
                                self.runner_event(job_id, RunnerEvent::Aborted { by }, now, out);
                        }
                        continue;
                    }
                    out.effects.push(Command::Send {
                        to: runner,
                        message: Message::Cancel(self.cancel(wid, job_id, &reason, now)),
                    });
                }
                WorkflowCommand::WakeAt(at) => {
                    let timer = Timer::RoundDeadline(wid);
                    out.effects.push(Command::SetTimer { timer, at });
                }
                WorkflowCommand::Ended { state, reason } => {
                    out.notify(Notice::WorkflowEnded { workflow: wid, state, reason });
                }
            }
        }
    }

    fn cancel(&self, wid: WorkflowId, job: JobId, reason: &str, now: Timestamp) -> Cancel {
        Cancel {
            header: Header::new(now, self.config.message_lifetime),
            workflow_id: wid,
            job_id: Some(job),
            reason: fit_text(reason),
        }
    }

    /// Fails a dispatched job at this owner (its runner is gone, or refused it) and queues a
    /// cancel for the runner in case it runs the job after all.
    fn give_up(
        &mut self,
        runner: InstanceId,
        job: JobId,
        wid: WorkflowId,
        reason: &str,
        now: Timestamp,
        out: &mut Out,
    ) {
        let current = self
            .workflows
            .get(&wid)
            .and_then(|w| w.job(&job))
            .is_some_and(|j| j.runner == runner && waits_for_runner(j));
        if !current {
            return;
        }
        out.effects.push(Command::Send {
            to: runner,
            message: Message::Cancel(self.cancel(wid, job, reason, now)),
        });
        out.notify(Notice::JobGivenUp { runner, job, reason: fit_text(reason) });
        self.feed(wid, WorkflowEvent::GiveUp { job_id: job, reason: reason.to_owned() }, now, out);
    }

    // ---- runners out of reach ---------------------------------------------------------

    /// Whether a running workflow has a job that still needs `peer`.
    fn waits_for(&self, peer: &InstanceId) -> bool {
        self.workflows.values().any(|w| {
            !w.state.is_final() && w.jobs.iter().any(|j| j.runner == *peer && waits_for_runner(j))
        })
    }

    /// Arms the next look at `peer` while it is out of reach: when it becomes lost, or now if
    /// it is lost already (a job was just sent to it).
    fn arm_runner_check(&self, peer: InstanceId, now: Timestamp, out: &mut Out) {
        let Some(p) = self.peers.get(&peer).filter(|p| !p.connected) else { return };
        let at = p.since.saturating_add(self.config.runner_lost_after).max(now);
        out.effects.push(Command::SetTimer { timer: Timer::RunnerCheck(peer), at });
    }

    /// A runner out of reach longer than the grace period is lost: its jobs move where their
    /// workflow allows. Out of reach longer than the give-up period, it is gone: its jobs
    /// that still wait for it fail with that reason, so that every workflow ends.
    fn check_runner(&mut self, peer: InstanceId, now: Timestamp, out: &mut Out) {
        let Some(since) = self.peers.get(&peer).filter(|p| !p.connected).map(|p| p.since) else {
            return;
        };
        let away = now.duration_since(since);
        if away < self.config.runner_lost_after {
            self.arm_runner_check(peer, now, out);
            return;
        }
        let waiting = |w: &Workflow| {
            !w.state.is_final() && w.jobs.iter().any(|j| j.runner == peer && waits_for_runner(j))
        };
        let ids: Vec<WorkflowId> =
            self.workflows.values().filter(|w| waiting(w)).map(|w| w.workflow_id).collect();
        for &id in &ids {
            if self.workflows.get(&id).is_some_and(waiting) {
                self.feed(id, WorkflowEvent::RunnerLost { instance: peer }, now, out);
            }
        }
        if away < self.config.runner_give_up_after {
            if self.workflows.values().any(waiting) {
                let at = since.saturating_add(self.config.runner_give_up_after);
                out.effects.push(Command::SetTimer { timer: Timer::RunnerCheck(peer), at });
            }
            return;
        }
        let why = format!(
            "runner {} has been out of reach for more than {} s; the job is given up",
            self.name_of(&peer),
            self.config.runner_give_up_after.as_secs()
        );
        for id in ids {
            let stuck: Vec<JobId> = self
                .workflows
                .get(&id)
                .map(|w| {
                    w.jobs
                        .iter()
                        .filter(|j| j.runner == peer && waits_for_runner(j))
                        .map(|j| j.job_id)
                        .collect()
                })
                .unwrap_or_default();
            for job in stuck {
                self.give_up(peer, job, id, &why, now, out);
            }
        }
    }
}

/// Whether a dispatched job still needs its runner: not ended, or finished but its result has
/// not arrived.
fn waits_for_runner(j: &crate::WorkflowJob) -> bool {
    j.dispatched
        && (!j.state.is_terminal() || (j.state == JobState::Finished && j.result.is_none()))
}

fn make_update(job: &RunnerJob, u: &Update, now: Timestamp, life: Duration) -> JobUpdate {
    JobUpdate {
        header: Header::new(now, life),
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        attempt: job.attempt,
        sequence: u.sequence,
        state: u.state,
        reason: u.reason.as_deref().map(fit_text),
        retryable: u.retryable,
    }
}

/// The ad of an instance that has advertised nothing yet: no datasets, no resources.
fn unknown_ad(name: &str) -> CapabilityAd {
    CapabilityAd {
        header: Header::new(Timestamp::from_millis(0), Duration::ZERO),
        sequence: 0,
        instance_name: name.to_owned(),
        node_version: String::new(),
        executors: Vec::new(),
        allowed_images: Vec::new(),
        allowed_workflows: NameScope::Only(Vec::new()),
        datasets: Vec::new(),
        resources: kaapana_protocol::Resources::default(),
    }
}
