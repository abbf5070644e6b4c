//! The daemon: `kaapana-node run`.
//!
//! One [`CancellationToken`] and one [`JoinSet`]: the swarm task, the driver (which turns
//! [`NetEvent`]s into state changes), one outbox worker per registered instance, the periodic
//! worker (capability refresh), the retention worker (expired replay ids and old inbox entries,
//! every `[limits] prune_interval_secs`) and the HTTP API. Stopping cancels the
//! token and joins every task with a deadline. Shared state lives in [`NodeState`]; its locks
//! are never held across an `.await`.

mod driver;
mod execution;
mod inbound;
mod outbox;
mod results;
mod trust;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use kaapana_certs::Identity;
use kaapana_federation::{
    AllowList, Event as FedEvent, RegisteredInstance, Registry, Site, SiteConfig, Timer,
};
use kaapana_protocol::{
    AnySigned, CapabilityAd, FedRequest, FedResponse, Header, InstanceId, NameScope, ReplayWindow,
    Resources, Signed, Timestamp, VerifyOptions,
};
use libp2p::Multiaddr;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use crate::events::{Event, EventKind, EventLog};
pub use driver::{JobError, RequestError, WorkflowError, records_of};
pub use trust::{RevocationView, RevocationsView, RotateRequest, RotationView};

use crate::admin::{AdminError, NodeFiles};
use crate::audit::{AuditKind, AuditRecord};
use crate::data_dir::DataDir;
use crate::metrics::Metrics;
use crate::net::{self, FedFrame, NatEvent, NetEvent, NetworkHandle, SwarmLoop};
use crate::store::{Store, StoreError, WriteOp};

/// How long a capability ad is valid; it is refreshed well before.
const CAPABILITY_LIFETIME: Duration = Duration::from_secs(3600);
/// How often ads are re-sent.
const REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// The longest wait between two dial attempts to a registered instance.
const MAX_REDIAL: Duration = Duration::from_secs(30);
/// A connection that the peer closes sooner than this after the handshake, before any message
/// went through, is taken as the peer refusing us.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Reading the data directory failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The network.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// The datasets could not be loaded.
    #[error(transparent)]
    Datasets(#[from] crate::datasets::DatasetError),
    /// The executor could not start.
    #[error(
        "{0} (or set `[executor] kind = \"none\"` in config.toml for an instance that runs no jobs)"
    )]
    Executor(#[from] crate::executor::ExecError),
    /// The Kubernetes executor is misconfigured or cannot reach its cluster.
    #[error("{0}")]
    Kubernetes(String),
    /// The PACS cache folder cannot be used.
    #[error("cannot open the PACS cache {}: {source}", path.display())]
    PacsCache {
        /// The folder.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The API could not bind.
    #[error("cannot start the local API on {addr}: {source}")]
    Api {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The current time as a [`Timestamp`].
pub fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// What the node knows about one registered instance's connection.
#[derive(Debug, Clone, Default)]
pub struct PeerStatus {
    /// Live connections.
    pub connections: u32,
    /// When the current connection came up.
    pub connected_since: Option<Timestamp>,
    /// The last time anything was heard from it.
    pub last_seen: Option<Timestamp>,
    /// The last ping round trip.
    pub rtt: Option<Duration>,
    /// Why it is not connected, as far as this node can tell.
    pub last_error: Option<String>,
    /// Its latest verified capability ad.
    pub capabilities: Option<CapabilityAd>,
    /// Whether anything was received on the current connection.
    pub heard_on_connection: bool,
    /// Failed dials since the last connection (for backoff).
    pub failures: u32,
    /// How it is connected (`None`: not connected).
    pub path: Option<net::Path>,
}

/// State shared by the daemon's tasks and the API.
#[derive(Debug)]
pub struct NodeState {
    /// This instance's name.
    pub name: String,
    /// This instance's id.
    pub instance_id: InstanceId,
    identity: Identity,
    /// The node's files and configuration.
    pub files: NodeFiles,
    /// The store.
    pub store: Store,
    /// Metrics.
    pub metrics: Metrics,
    /// The network.
    pub net: NetworkHandle,
    /// Observed events.
    pub events: EventLog,
    /// Recent job counts per workflow and message counters per instance (the dashboard's
    /// charts).
    pub history: crate::history::History,
    /// Time limits for inbound messages.
    pub verify_options: VerifyOptions,
    registry: Mutex<Registry>,
    peers: Mutex<BTreeMap<InstanceId, PeerStatus>>,
    replay: Mutex<ReplayWindow>,
    /// Inbox entries and envelope bytes per sender (read from the store at start, kept
    /// current by inbound handling and retention): what `[limits] inbox_*_per_peer` bound.
    inbox_usage: Mutex<HashMap<InstanceId, (u64, u64)>>,
    outbox_wakers: Mutex<HashMap<InstanceId, Arc<Notify>>>,
    capability_sequence: Mutex<u64>,
    /// The federation core: every workflow this instance owns and every job it runs. Held
    /// only while the core computes (see [`driver`]).
    site: Mutex<Site>,
    /// Serialises feeding the core and committing what it returns, so that records reach the
    /// store in the order the core changed them.
    drive_lock: tokio::sync::Mutex<()>,
    /// What the core asked to store when the store failed: written first by the next commit.
    unwritten: Mutex<Vec<WriteOp>>,
    /// Arms the core's timers (the timer task).
    timers: Mutex<Option<mpsc::UnboundedSender<(Timer, Timestamp)>>>,
    /// Bytes of each input bundle this owner sent to runners since it started (a training's
    /// model per round, for its view).
    input_bytes_sent: Mutex<HashMap<kaapana_protocol::Sha256Digest, u64>>,
    /// Runs jobs; `None` on a node without a container runtime.
    executor: Option<Arc<dyn crate::executor::Executor>>,
    /// The site's datasets.
    datasets: std::sync::RwLock<crate::datasets::Datasets>,
    /// Series fetched from the PACS for DICOMweb datasets.
    pub(crate) pacs_cache: Arc<crate::pacs_cache::PacsCache>,
    cancel: CancellationToken,
    tasks: Mutex<Option<mpsc::UnboundedSender<InstanceId>>>,
    /// Instances revoked here (the store's `revocations.v1`), checked on every message.
    revoked: Mutex<std::collections::BTreeSet<InstanceId>>,
    /// New keys of hand-overs accepted since start → the old key, whose connection closes
    /// when the new key connects.
    retiring: Mutex<HashMap<InstanceId, InstanceId>>,
    /// One revocation or hand-over at a time.
    trust_lock: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeState {
    /// A snapshot of the registry.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// The site's datasets.
    pub fn datasets(&self) -> std::sync::RwLockReadGuard<'_, crate::datasets::Datasets> {
        self.datasets.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn datasets_mut(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, crate::datasets::Datasets> {
        self.datasets.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fires when the daemon shuts down (long-lived responses end with it).
    pub fn shutdown_signal(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// A read-only look at the federation core (workflows, jobs, candidates).
    pub fn site(&self) -> MutexGuard<'_, Site> {
        lock(&self.site)
    }

    /// Tells the core what this instance now offers its own workflows.
    async fn own_capabilities_changed(self: &Arc<Self>) {
        let ad = Box::new(self.own_capability_ad());
        if let Err(e) = self.feed(vec![FedEvent::OwnCapabilities(ad)], Vec::new()).await {
            tracing::error!(error = %e, "cannot record a change of this instance's capabilities");
        }
    }

    /// Registers a dataset folder: checks it, stores it, scans it, and shows it to the peers
    /// whose policy allows it.
    pub async fn add_dataset(
        self: &Arc<Self>,
        name: &str,
        folder: &std::path::Path,
    ) -> Result<(), crate::datasets::DatasetError> {
        let existing = self.store.datasets()?;
        let (record, provider, _) = crate::datasets::check_new(name, folder, &existing, now())?;
        self.register_dataset(name, record, provider).await
    }

    /// Registers a DICOMweb dataset: resolves its selection by QIDO-RS (off the runtime),
    /// stores its definition, and shows it to the peers whose policy allows it.
    pub async fn add_dicomweb_dataset(
        self: &Arc<Self>,
        name: &str,
        selection: crate::datasets::DicomWebSelection,
    ) -> Result<(), crate::datasets::DatasetError> {
        let existing = self.store.datasets()?;
        let name_owned = name.to_owned();
        let (record, provider, _) = tokio::task::spawn_blocking(move || {
            crate::datasets::check_new_dicomweb(&name_owned, &selection, &existing, now())
        })
        .await
        .map_err(|e| crate::datasets::DatasetError::BadRequest(e.to_string()))??;
        // Registered meanwhile by another request?
        if let Some(d) = self.store.datasets()?.into_iter().find(|d| d.name == name) {
            return Err(crate::datasets::DatasetError::Exists {
                name: name.into(),
                location: d.location,
            });
        }
        self.register_dataset(name, record, provider).await
    }

    async fn register_dataset(
        self: &Arc<Self>,
        name: &str,
        record: crate::store::DatasetRecord,
        provider: Arc<dyn crate::datasets::DatasetProvider>,
    ) -> Result<(), crate::datasets::DatasetError> {
        let audit = AuditRecord::now(
            AuditKind::DatasetAdded,
            name,
            format!("{} at {}", record.provider, record.location),
        );
        self.store.write_async(vec![WriteOp::PutDataset(record), WriteOp::Audit(audit)]).await?;
        self.datasets_mut().insert(provider);
        self.event(EventKind::DatasetAdded, None, format!("dataset {name}"));
        self.own_capabilities_changed().await;
        self.readvertise();
        Ok(())
    }

    /// Forgets a dataset (its files stay).
    pub async fn remove_dataset(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(), crate::datasets::DatasetError> {
        if !self.store.datasets()?.iter().any(|d| d.name == name) {
            return Err(crate::datasets::DatasetError::NotFound(name.into()));
        }
        let audit = AuditRecord::now(AuditKind::DatasetRemoved, name, "");
        self.store
            .write_async(vec![WriteOp::RemoveDataset(name.into()), WriteOp::Audit(audit)])
            .await?;
        self.datasets_mut().remove(name);
        self.own_capabilities_changed().await;
        self.readvertise();
        Ok(())
    }

    /// Pushes fresh capability ads to every connected peer (after a dataset or policy change).
    pub(crate) fn readvertise(self: &Arc<Self>) {
        let peers: Vec<InstanceId> = self
            .registry()
            .iter()
            .map(|i| i.instance_id)
            .filter(|i| self.is_connected(i))
            .collect();
        for peer in peers {
            let s = Arc::clone(self);
            tokio::spawn(async move { s.push_capabilities(peer).await });
        }
    }

    /// A snapshot of every peer's status.
    pub fn peer_status(&self, id: &InstanceId) -> PeerStatus {
        lock(&self.peers).get(id).cloned().unwrap_or_default()
    }

    /// Whether `id` has a live connection.
    pub fn is_connected(&self, id: &InstanceId) -> bool {
        lock(&self.peers).get(id).is_some_and(|p| p.connections > 0)
    }

    fn peer_mut<R>(&self, id: &InstanceId, f: impl FnOnce(&mut PeerStatus) -> R) -> R {
        f(lock(&self.peers).entry(*id).or_default())
    }

    /// Keeps the gauge of relayed peers as a peer's path goes from `was` to `now`.
    fn count_relayed(&self, was: Option<net::Path>, now: Option<net::Path>) {
        let relayed = |p: Option<net::Path>| i64::from(p == Some(net::Path::Relayed));
        self.metrics.peers_relayed.inc_by(relayed(now) - relayed(was));
    }

    pub(crate) fn name_of(&self, id: &InstanceId) -> String {
        self.registry().get(id).map_or_else(|| id.to_string(), |i| i.name.clone())
    }

    fn event(&self, kind: EventKind, peer: Option<&InstanceId>, detail: impl Into<String>) {
        self.events.push(now(), kind, peer.map(|p| self.name_of(p)), detail.into());
    }

    fn wake_outbox(&self, id: &InstanceId) {
        if let Some(n) = lock(&self.outbox_wakers).get(id) {
            n.notify_one();
        }
    }

    /// The capability ad this node shows `peer`: what that peer may use here.
    fn capability_ad(&self, peer: &RegisteredInstance) -> CapabilityAd {
        let allowed_workflows = match &peer.policy.allowed_workflows {
            AllowList::Any => NameScope::Any,
            AllowList::Only(names) => NameScope::Only(names.iter().cloned().collect()),
        };
        let datasets = self
            .datasets()
            .summaries_for(&peer.instance_id, |d| peer.policy.allowed_datasets.allows(d));
        self.make_ad(allowed_workflows, datasets)
    }

    /// The ad of this instance as a runner of its own workflows (everything allowed).
    pub(crate) fn own_capability_ad(&self) -> CapabilityAd {
        let datasets = self.datasets().own_summaries(&self.instance_id);
        self.make_ad(NameScope::Any, datasets)
    }

    fn make_ad(
        &self,
        allowed_workflows: NameScope,
        datasets: Vec<kaapana_protocol::DatasetSummary>,
    ) -> CapabilityAd {
        let now = now();
        let sequence = {
            let mut seq = lock(&self.capability_sequence);
            *seq = (*seq + 1).max(now.as_millis());
            *seq
        };
        CapabilityAd {
            header: Header::new(now, CAPABILITY_LIFETIME),
            sequence,
            instance_name: self.name.clone(),
            node_version: env!("CARGO_PKG_VERSION").to_owned(),
            executors: self.executor.iter().map(|e| e.kind()).collect(),
            allowed_images: Vec::new(),
            allowed_workflows,
            datasets,
            resources: local_resources(),
        }
    }

    /// Signs and sends this node's capability ad to `peer` (if connected). A send that fails
    /// while the peer is still connected (it went out on a connection that closed, e.g. the
    /// loser of two simultaneous dials) is retried a few times.
    async fn push_capabilities(self: &Arc<Self>, peer: InstanceId) {
        let Some(inst) = self.registry().get(&peer).cloned() else { return };
        let ad = self.capability_ad(&inst);
        let signed = match Signed::sign(self.identity.signing_key(), &ad) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign the capability ad");
                return;
            }
        };
        let frame = FedFrame::Batch(FedRequest { messages: vec![signed.into_bytes()] });
        for attempt in 0..4 {
            if attempt > 0 {
                tokio::select! {
                    () = self.cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(250 << attempt)) => {}
                }
                if !self.is_connected(&peer) {
                    return;
                }
            }
            match self.net.request(peer.peer_id(), frame.clone()).await {
                Ok(FedResponse::Results(r))
                    if r.first().is_some_and(|d| {
                        matches!(
                            d,
                            kaapana_protocol::Delivery::Accepted
                                | kaapana_protocol::Delivery::Rejected {
                                    reason: kaapana_protocol::RejectReason::Replayed,
                                    ..
                                }
                        )
                    }) =>
                {
                    self.metrics.messages_out.get_or_create(&kind_label("CapabilityAd")).inc();
                    self.metrics.peer_message(&self.name_of(&peer), crate::metrics::Direction::Out);
                    return;
                }
                Ok(other) => {
                    tracing::warn!(peer = %inst.name, ?other, "capability ad not accepted");
                    return;
                }
                Err(e) => tracing::debug!(peer = %inst.name, error = %e, "capability ad not sent"),
            }
        }
    }

    /// Queues `messages` for `peer`, durably, and wakes its outbox worker.
    pub async fn enqueue(
        &self,
        peer: InstanceId,
        messages: Vec<AnySigned>,
    ) -> Result<(), StoreError> {
        let n = messages.len();
        let envelopes = messages.into_iter().map(|m| m.as_bytes().to_vec()).collect();
        self.store.write_async(vec![WriteOp::EnqueueOutbox { peer, envelopes }]).await?;
        self.metrics.outbox_depth.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        self.wake_outbox(&peer);
        Ok(())
    }

    /// Submits one job for one runner-instance: a workflow of one step, planned, signed and
    /// queued like any other. Returns the owner's record of the job.
    pub async fn submit_job(
        self: &Arc<Self>,
        job: kaapana_protocol::JobManifest,
    ) -> Result<kaapana_federation::WorkflowJob, WorkflowError> {
        let manifest = kaapana_protocol::WorkflowManifest {
            header: job.header,
            workflow_id: job.workflow_id,
            owner: self.instance_id,
            name: job.workflow_name.clone(),
            jobs: vec![kaapana_protocol::JobSpec {
                name: job.job_name.clone(),
                runner: kaapana_protocol::RunnerSelector::Instance(job.runner),
                dataset: job.dataset.map(|d| d.name),
                processing: kaapana_protocol::Processing::Batch,
                work: job.work,
                limits: job.limits,
                timeout_secs: job.timeout_secs,
                inputs: Vec::new(),
                max_retries: 0,
            }],
            rounds: None,
        };
        let workflow = self.submit_workflow(manifest).await?;
        workflow.jobs.into_iter().next().ok_or(WorkflowError::NotFound(job.workflow_id))
    }

    /// The model that round `round` of training `workflow` made here, for a training that
    /// resumes from it; the error says why there is none.
    pub fn resume_model(
        &self,
        workflow: kaapana_protocol::WorkflowId,
        round: u32,
    ) -> Result<kaapana_protocol::ResumeFrom, String> {
        let site = self.site();
        let w = site
            .workflow(&workflow)
            .ok_or_else(|| format!("there is no workflow {workflow} here"))?;
        let t =
            w.training.as_ref().ok_or_else(|| format!("workflow {workflow} is not a training"))?;
        let rec = t.history.iter().find(|r| r.round == round && r.model.is_some());
        let job = rec
            .and_then(|r| r.aggregate_step)
            .and_then(|s| w.jobs.iter().find(|j| j.step == s))
            .and_then(|j| j.result.map(|bundle| (j, bundle)));
        match job {
            Some((j, bundle)) => Ok(kaapana_protocol::ResumeFrom {
                round,
                model: kaapana_protocol::InputBundle {
                    job_name: j.name.clone(),
                    job_id: j.job_id,
                    bundle,
                },
            }),
            None => {
                let done: Vec<String> = t
                    .history
                    .iter()
                    .filter(|r| r.model.is_some())
                    .map(|r| r.round.to_string())
                    .collect();
                Err(format!(
                    "round {round} of training {} ({workflow}) made no model; rounds with a model: {}",
                    w.name,
                    if done.is_empty() { "none".to_owned() } else { done.join(", ") }
                ))
            }
        }
    }

    /// The API's view of a workflow of this instance.
    pub fn workflow_view(&self, w: &kaapana_federation::Workflow) -> crate::api::WorkflowView {
        crate::api::WorkflowView::new(w, &|d| self.input_bytes_sent(d))
    }

    /// Bytes of the input bundle `digest` sent to runners since this node started.
    pub fn input_bytes_sent(&self, digest: &kaapana_protocol::Sha256Digest) -> u64 {
        lock(&self.input_bytes_sent).get(digest).copied().unwrap_or(0)
    }

    /// Signs `manifest` (this instance must be its owner), plans it and starts its first jobs,
    /// in one commit with the signed manifest.
    pub async fn submit_workflow(
        self: &Arc<Self>,
        manifest: kaapana_protocol::WorkflowManifest,
    ) -> Result<kaapana_federation::Workflow, WorkflowError> {
        let id = manifest.workflow_id;
        let signed = self.sign(&manifest).map_err(|e| WorkflowError::Sign(e.to_string()))?;
        let record = WriteOp::PutWorkflowManifest { workflow: id, envelope: signed.into_bytes() };
        let audit = AuditRecord::now(
            AuditKind::WorkflowSubmitted,
            id,
            format!("{} ({} job spec(s))", manifest.name, manifest.jobs.len()),
        );
        self.request_audited(FedEvent::Submit { manifest }, vec![record], Some(audit)).await?;
        self.site().workflow(&id).cloned().ok_or(WorkflowError::NotFound(id))
    }

    /// Cancels a workflow this instance owns: stops its jobs at every runner.
    pub async fn cancel_workflow(
        self: &Arc<Self>,
        id: kaapana_protocol::WorkflowId,
        by: String,
    ) -> Result<kaapana_federation::Workflow, WorkflowError> {
        let audit = AuditRecord::now(AuditKind::WorkflowCancelled, id, format!("by {by}"));
        self.request_audited(
            FedEvent::CancelWorkflow { workflow: id, by },
            Vec::new(),
            Some(audit),
        )
        .await?;
        self.site().workflow(&id).cloned().ok_or(WorkflowError::NotFound(id))
    }

    /// The local admin approves or rejects a job that waits for approval here.
    pub async fn decide_job(
        self: &Arc<Self>,
        job: kaapana_protocol::JobId,
        approve: Result<(), String>,
    ) -> Result<kaapana_federation::RunnerJob, JobError> {
        let (event, audit) = match approve {
            Ok(()) => (
                FedEvent::Approve { job },
                AuditRecord::now(AuditKind::JobApproved, job, self.job_text(&job)),
            ),
            Err(reason) => {
                let detail = format!("{}; reason: {reason}", self.job_text(&job));
                let audit = AuditRecord::now(AuditKind::JobRejected, job, detail);
                (FedEvent::Reject { job, reason }, audit)
            }
        };
        // The audit entry is committed with the decision, and only if the core took it.
        self.request_audited(event, Vec::new(), Some(audit)).await?;
        self.site().runner_job(&job).map(|r| r.job.clone()).ok_or(JobError::NotFound(job))
    }

    /// A job this node runs, in one line for the audit log: its name, workflow and owner.
    pub(crate) fn job_text(&self, job: &kaapana_protocol::JobId) -> String {
        match self.site().runner_job(job) {
            Some(r) => format!(
                "{} (attempt {}) of workflow {} from {}",
                r.job.job_name, r.job.attempt, r.job.workflow_id, r.job.owner_name
            ),
            None => format!("job {job}"),
        }
    }

    /// Signs `payload` with this instance's key.
    pub fn sign<T: kaapana_protocol::Manifest>(
        &self,
        payload: &T,
    ) -> Result<Signed<T>, kaapana_protocol::EncodeError> {
        Signed::sign(self.identity.signing_key(), payload)
    }

    /// Registers an instance at runtime: durable first, then admitted and dialed.
    pub async fn add_instance(
        self: &Arc<Self>,
        inst: RegisteredInstance,
    ) -> Result<(), AdminError> {
        if let Some(r) = crate::trust::revocation_of(&self.store, &inst.instance_id)? {
            return Err(AdminError::Revoked {
                name: inst.name.clone(),
                why: format!("{} ({})", r.reason, crate::trust::source_text(&r.source)),
            });
        }
        self.registry().clone().add(inst.clone())?;
        let audit = WriteOp::Audit(crate::admin::audit_added(&inst));
        self.store.write_async(vec![WriteOp::PutInstance(Box::new(inst.clone())), audit]).await?;
        self.registry().add(inst.clone())?;
        self.tell_site(FedEvent::InstanceRegistered(Box::new(inst.clone()))).await;
        self.metrics.instances_registered.inc();
        self.event(EventKind::InstanceAdded, Some(&inst.instance_id), inst.fingerprint_text());
        self.admit(&inst).await;
        self.send_revocation_list(inst.instance_id).await;
        Ok(())
    }

    /// Changes what a registered instance may do here: durable first, then the federation core
    /// and the network follow, and the instance gets a fresh capability ad. Jobs it already
    /// sent keep the decision they got.
    pub async fn set_policy(
        self: &Arc<Self>,
        which: &kaapana_federation::InstanceRef,
        policy: kaapana_federation::Policy,
    ) -> Result<RegisteredInstance, AdminError> {
        let mut next = self.registry().clone();
        next.update_policy(which, policy)?;
        let inst = next
            .resolve(which)
            .cloned()
            .ok_or_else(|| AdminError::BadArgument(format!("no registered instance {which}")))?;
        let policy = crate::admin::policy_text(&inst.policy);
        let audit = AuditRecord::now(
            AuditKind::PolicyChanged,
            inst.instance_id,
            format!("{}: {policy}", inst.name),
        );
        self.store
            .write_async(vec![WriteOp::PutInstance(Box::new(inst.clone())), WriteOp::Audit(audit)])
            .await?;
        self.registry().update_policy(which, inst.policy.clone())?;
        self.tell_site(FedEvent::InstanceRegistered(Box::new(inst.clone()))).await;
        self.event(EventKind::PolicyChanged, Some(&inst.instance_id), policy);
        if self.is_connected(&inst.instance_id) {
            let s = Arc::clone(self);
            let id = inst.instance_id;
            tokio::spawn(async move { s.push_capabilities(id).await });
        }
        Ok(inst)
    }

    /// Unregisters an instance at runtime: durable first, then its connections are closed.
    pub async fn remove_instance(
        self: &Arc<Self>,
        which: &kaapana_federation::InstanceRef,
    ) -> Result<RegisteredInstance, AdminError> {
        let inst = self.registry().clone().remove(which)?;
        let id = inst.instance_id;
        let audit = WriteOp::Audit(crate::admin::audit_removed(&inst));
        self.store
            .write_async(vec![WriteOp::RemoveInstance(id), WriteOp::ForgetPeer(id), audit])
            .await?;
        self.unregistered(&inst, false).await;
        self.event(EventKind::InstanceRemoved, Some(&id), inst.name.clone());
        Ok(inst)
    }

    /// Feeds the core an event that stores nothing of its own (registry and connection
    /// changes); a failure to write is logged.
    async fn tell_site(self: &Arc<Self>, event: FedEvent) {
        if let Err(e) = self.feed(vec![event], Vec::new()).await {
            tracing::error!(error = %e, "cannot record what the federation core changed");
        }
    }

    /// Admits a registered instance to the swarm, starts its outbox worker and dials it.
    async fn admit(self: &Arc<Self>, inst: &RegisteredInstance) {
        let addrs = inst.listen_addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()).collect();
        let _ = self.net.allow(inst.instance_id.peer_id(), addrs).await;
        lock(&self.outbox_wakers)
            .entry(inst.instance_id)
            .or_insert_with(|| Arc::new(Notify::new()));
        if let Some(tx) = lock(&self.tasks).as_ref() {
            let _ = tx.send(inst.instance_id);
        }
        let _ = self.net.dial(inst.instance_id.peer_id()).await;
    }

    fn redial_later(self: &Arc<Self>, id: InstanceId) {
        let failures = self.peer_mut(&id, |p| {
            p.failures = p.failures.saturating_add(1);
            p.failures
        });
        let delay =
            Duration::from_millis(250u64.saturating_mul(1 << failures.min(8))).min(MAX_REDIAL);
        let state = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                () = state.cancel.cancelled() => {}
                () = tokio::time::sleep(delay) => {
                    if state.registry().is_registered(&id) && !state.is_connected(&id) {
                        let _ = state.net.dial(id.peer_id()).await;
                    }
                }
            }
        });
    }

    /// This instance's exchange bundle: the configured advertised addresses, or else the
    /// addresses the swarm actually listens on and those confirmed from outside (AutoNAT, a
    /// relay's reservation); then the circuit addresses through the configured relays.
    pub async fn bundle(&self) -> Result<String, AdminError> {
        let addrs = self.bundle_addrs().await;
        self.files.bundle(&self.identity, addrs, now()).map(|(text, _)| text)
    }

    /// The dial addresses an exchange bundle of this instance names (see [`Self::bundle`]).
    pub async fn bundle_addrs(&self) -> Vec<String> {
        let network = &self.files.config.network;
        let mut addrs = if network.advertise.is_empty() {
            self.listen_addrs().await
        } else {
            network.advertise.clone()
        };
        for r in network.relayed() {
            // A reservation's confirmed address is the same circuit with `/p2p/<us>`.
            if !addrs.iter().any(|a| a.starts_with(&r)) {
                addrs.push(r);
            }
        }
        // A bundle names at most 32 addresses (`InstanceBundleInfo`).
        addrs.truncate(32);
        addrs
    }

    /// This node's listen addresses as the swarm reports them.
    pub async fn listen_addrs(&self) -> Vec<String> {
        let own = self.instance_id.peer_id();
        self.net
            .listen_addrs()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.with_p2p(own).unwrap_or_else(|a| a).to_string())
            .collect()
    }
}

trait FingerprintText {
    fn fingerprint_text(&self) -> String;
}

impl FingerprintText for RegisteredInstance {
    fn fingerprint_text(&self) -> String {
        kaapana_certs::Fingerprint(self.fingerprint).to_string()
    }
}

fn kind_label(kind: &str) -> crate::metrics::KindLabel {
    crate::metrics::KindLabel { kind: kind.to_owned() }
}

/// CPU and memory of this machine.
fn local_resources() -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    Resources {
        cpu_millis: u32::try_from(cpus * 1000).unwrap_or(u32::MAX),
        memory_bytes,
        gpus: nvidia_gpus(),
    }
}

/// NVIDIA GPUs as the driver lists them under `/proc/driver/nvidia/gpus/*/information`.
fn nvidia_gpus() -> Vec<kaapana_protocol::Gpu> {
    let Ok(dirs) = std::fs::read_dir("/proc/driver/nvidia/gpus") else { return Vec::new() };
    let mut gpus: Vec<kaapana_protocol::Gpu> = dirs
        .filter_map(Result::ok)
        .filter_map(|d| std::fs::read_to_string(d.path().join("information")).ok())
        .map(|info| kaapana_protocol::Gpu {
            model: info
                .lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map_or_else(|| "NVIDIA GPU".to_owned(), |m| m.trim().to_owned()),
            memory_bytes: 0,
        })
        .collect();
    gpus.truncate(64);
    gpus
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    state: Arc<NodeState>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    api_addr: SocketAddr,
    containerd: Option<crate::executor::Containerd>,
}

/// `[executor]`'s Airflow keys, checked, with the password read from its file.
fn airflow_config(files: &NodeFiles) -> Result<crate::executor::AirflowConfig, DaemonError> {
    use crate::config::AirflowApiSetting;
    use crate::executor::airflow::ApiVersion;
    let x = &files.config.executor;
    let missing = |key: &str| {
        DaemonError::Executor(crate::executor::ExecError::Airflow {
            url: x.airflow_url.clone().unwrap_or_default(),
            detail: format!("`[executor] kind = \"airflow\"` needs `{key}` in config.toml"),
        })
    };
    let url = x.airflow_url.clone().ok_or_else(|| missing("airflow_url"))?;
    let user = x.airflow_user.clone().ok_or_else(|| missing("airflow_user"))?;
    let file = x.airflow_password_file.as_ref().ok_or_else(|| missing("airflow_password_file"))?;
    let password = crate::pacs::read_secret(file).map_err(|e| {
        DaemonError::Executor(crate::executor::ExecError::Airflow {
            url: url.clone(),
            detail: format!("`[executor] airflow_password_file`: {e}"),
        })
    })?;
    Ok(crate::executor::AirflowConfig {
        url,
        api_version: match x.airflow_api_version {
            AirflowApiSetting::Auto => ApiVersion::Auto,
            AirflowApiSetting::V2 => ApiVersion::V1,
            AirflowApiSetting::V3 => ApiVersion::V2,
        },
        user,
        password,
        path_map: x.airflow_path_map.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
        poll_interval: Duration::from_millis(x.airflow_poll_ms.max(10)),
    })
}

/// Connects to (or starts) containerd as configured.
async fn start_executor(
    files: &NodeFiles,
) -> Result<
    (Option<crate::executor::Containerd>, Option<Arc<dyn crate::executor::Executor>>),
    DaemonError,
> {
    use crate::config::ExecutorKindSetting;
    use crate::executor::{Containerd, ContainerdExecutor, ExecutorConfig};
    match files.config.executor.kind {
        ExecutorKindSetting::None => return Ok((None, None)),
        ExecutorKindSetting::Kubernetes => {
            use crate::executor::kubernetes::KubernetesExecutor;
            let Some(config) = files.config.executor.kubernetes.clone() else {
                return Err(DaemonError::Kubernetes(
                    "`[executor] kind = \"kubernetes\"` needs an `[executor.kubernetes]` table \
                     (namespace, image_repository, volumes)"
                        .into(),
                ));
            };
            let executor = KubernetesExecutor::from_environment(config)
                .await
                .map_err(|e| DaemonError::Kubernetes(format!("the Kubernetes executor: {e}")))?;
            return Ok((None, Some(Arc::new(executor))));
        }
        ExecutorKindSetting::Airflow => {
            let executor = crate::executor::AirflowExecutor::new(airflow_config(files)?)?;
            let version = executor.api_version().await?;
            tracing::info!(?version, "jobs run as DAG runs of the site's Airflow");
            return Ok((None, Some(Arc::new(executor))));
        }
        ExecutorKindSetting::Containerd => {}
    }
    let containerd = match &files.config.executor.containerd_address {
        Some(socket) => Containerd::connect(socket).await?,
        None => Containerd::spawn(files.dir.root()).await?,
    };
    let config = ExecutorConfig {
        scratch_dir: files.dir.root().join("executor-scratch"),
        ..ExecutorConfig::default()
    };
    let executor = ContainerdExecutor::new(containerd.channel(), config).await?;
    Ok((Some(containerd), Some(Arc::new(executor))))
}

impl Daemon {
    /// Starts the daemon for the instance in `dir`: network, outbox workers and API.
    pub async fn start(dir: &DataDir) -> Result<Self, DaemonError> {
        Self::start_as(dir, false).await
    }

    /// Starts a relay-only node (`kaapana-node relay`): the daemon with its relay service on
    /// and no executor, whatever its configuration says.
    pub async fn start_relay(dir: &DataDir) -> Result<Self, DaemonError> {
        Self::start_as(dir, true).await
    }

    async fn start_as(dir: &DataDir, relay_only: bool) -> Result<Self, DaemonError> {
        // libp2p brings aws-lc-rs and kube brings ring: pick one provider for the process, or
        // the first plain rustls config panics.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A prepared key rotation is finished first, if every registered instance has the
        // hand-over: the node then starts with its new key.
        let owned = dir.clone();
        let switched =
            tokio::task::spawn_blocking(move || crate::trust::finish_rotation(&owned, false))
                .await
                .map_err(|e| AdminError::BadArgument(format!("the key rotation failed: {e}")))??;
        if let Some(new_id) = switched {
            tracing::info!(instance = %new_id, "switched to the new instance key");
        }
        let mut files = NodeFiles::open(dir)?;
        if relay_only {
            files.config.network.relay_service = true;
            files.config.executor.kind = crate::config::ExecutorKindSetting::None;
        }
        let identity = files.identity()?;
        let store = files.audited_store()?;
        let registry = store.load_registry()?;
        let revoked = store.revocations()?.into_iter().map(|r| r.instance_id).collect();
        let now = now();

        let limits = &files.config.limits;
        let mut replay = ReplayWindow::with_limits(
            usize::try_from(limits.seen_ids_max).unwrap_or(usize::MAX),
            usize::try_from(limits.seen_ids_per_peer).unwrap_or(usize::MAX),
        );
        for (id, expires_at, signer) in store.seen_ids_with_signers()? {
            if expires_at > now {
                match signer {
                    Some(s) => replay.restore_from(s, id, expires_at),
                    None => replay.restore(id, expires_at),
                }
            }
        }
        let inbox_usage = store.inbox_usage()?;
        let mut peers = BTreeMap::new();
        let verify_options = VerifyOptions::default();
        for (peer, envelope) in store.peer_capabilities()? {
            // Stored ads were verified on arrival; re-check signature and expiry on restart.
            let ad = Signed::<CapabilityAd>::from_bytes(&envelope)
                .ok()
                .and_then(|s| s.verify(now, &verify_options).ok())
                .filter(|v| v.signer() == peer)
                .map(|v| v.into_payload());
            if let Some(ad) = ad {
                peers.insert(peer, PeerStatus { capabilities: Some(ad), ..PeerStatus::default() });
            }
        }

        let network = &files.config.network;
        let options = net::NetOptions {
            relay_service: network.relay_service,
            hole_punching: network.hole_punching,
            autonat: network.autonat,
            relays: net::NetOptions::parse_relays(&network.relays)?,
            external: network
                .advertise
                .iter()
                .map(|a| {
                    a.parse().map_err(|e: libp2p::multiaddr::Error| net::NetError::BadAddress {
                        addr: a.clone(),
                        detail: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let swarm = net::build_swarm(identity.libp2p_keypair(), &options)?;
        let (events_tx, events_rx) = mpsc::channel(4096);
        let (swarm_loop, net) = SwarmLoop::new(swarm, events_tx);
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(swarm_loop.run(cancel.clone()));

        let metrics = Metrics::new();
        metrics.instances_registered.set(i64::try_from(registry.len()).unwrap_or(i64::MAX));
        let mut depth = 0;
        for inst in registry.iter() {
            depth += store.outbox_depth(&inst.instance_id)?;
        }
        metrics.outbox_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));

        let datasets = crate::datasets::Datasets::load(&store).await?;
        let cache_dir = files.dir.root().join("pacs-cache");
        let cache_bytes = files.config.datasets.pacs_cache_bytes;
        let pacs_cache = tokio::task::spawn_blocking({
            let dir = cache_dir.clone();
            move || crate::pacs_cache::PacsCache::open(&dir, cache_bytes)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| DaemonError::PacsCache { path: cache_dir, source })?;
        let (containerd, executor) = start_executor(&files).await?;
        let wf = &files.config.workflows;
        let config = SiteConfig {
            runner_lost_after: Duration::from_secs(wf.runner_lost_after_secs),
            runner_give_up_after: Duration::from_secs(wf.runner_give_up_after_secs),
            ..SiteConfig::default()
        };
        let mut site = Site::new(
            identity.instance_id(),
            files.config.instance.name.clone(),
            config,
            registry.clone(),
            store.workflows()?,
            store.runner_jobs()?,
            now,
        );
        for (peer, status) in &peers {
            if let Some(ad) = &status.capabilities {
                site.restore_capabilities(*peer, ad.clone());
            }
        }
        let (timers_tx, timers_rx) = mpsc::unbounded_channel();

        let (spawn_tx, spawn_rx) = mpsc::unbounded_channel();
        let state = Arc::new(NodeState {
            name: files.config.instance.name.clone(),
            instance_id: identity.instance_id(),
            identity,
            store,
            metrics,
            net: net.clone(),
            events: EventLog::new(),
            history: crate::history::History::default(),
            verify_options,
            registry: Mutex::new(registry),
            peers: Mutex::new(peers),
            replay: Mutex::new(replay),
            inbox_usage: Mutex::new(inbox_usage),
            outbox_wakers: Mutex::new(HashMap::new()),
            capability_sequence: Mutex::new(0),
            site: Mutex::new(site),
            drive_lock: tokio::sync::Mutex::new(()),
            unwritten: Mutex::new(Vec::new()),
            timers: Mutex::new(Some(timers_tx)),
            input_bytes_sent: Mutex::new(HashMap::new()),
            executor,
            datasets: std::sync::RwLock::new(datasets),
            pacs_cache: Arc::new(pacs_cache),
            cancel: cancel.clone(),
            tasks: Mutex::new(Some(spawn_tx)),
            revoked: Mutex::new(revoked),
            retiring: Mutex::new(HashMap::new()),
            trust_lock: tokio::sync::Mutex::new(()),
            files,
        });

        // The registered instances are admitted before the node listens: a relay must know
        // whom it serves when the first reservation request arrives (dialing them waits for
        // the listeners, below, so that TCP dials reuse the listening port, which hole
        // punching needs).
        let registered: Vec<RegisteredInstance> = state.registry().iter().cloned().collect();
        for inst in &registered {
            let addrs =
                inst.listen_addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()).collect();
            net.allow(inst.instance_id.peer_id(), addrs).await?;
        }
        for addr in &state.files.config.network.listen {
            let parsed: Multiaddr = addr.parse().map_err(|e: libp2p::multiaddr::Error| {
                net::NetError::BadAddress { addr: addr.clone(), detail: e.to_string() }
            })?;
            net.listen(parsed).await?;
        }

        tasks.spawn(drive(Arc::clone(&state), events_rx));
        tasks.spawn(outbox::supervise(Arc::clone(&state), spawn_rx));
        tasks.spawn(periodic(Arc::clone(&state)));
        tasks.spawn(retention(Arc::clone(&state)));
        tasks.spawn(sample_peers(Arc::clone(&state)));
        tasks.spawn(driver::run_timers(Arc::clone(&state), timers_rx));
        let own = Box::new(state.own_capability_ad());
        state.feed(vec![FedEvent::OwnCapabilities(own), FedEvent::Started], Vec::new()).await?;
        tasks.spawn(net::inputs::serve_inputs(
            Arc::new(InputsOfSite(Arc::clone(&state))),
            crate::blobs::BlobStore::in_data_dir(&state.files.dir),
            net.stream_control(),
            cancel.clone(),
        ));
        tasks.spawn(net::results::serve_results(
            Arc::new(results::Owner(Arc::clone(&state))),
            crate::blobs::BlobStore::in_data_dir(&state.files.dir),
            net.stream_control(),
            cancel.clone(),
        ));
        for inst in &registered {
            state.admit(inst).await;
        }

        let api_listen = state.files.config.api.listen.clone();
        let listener = tokio::net::TcpListener::bind(&api_listen)
            .await
            .map_err(|source| DaemonError::Api { addr: api_listen.clone(), source })?;
        let api_addr = listener
            .local_addr()
            .map_err(|source| DaemonError::Api { addr: api_listen.clone(), source })?;
        let token = std::fs::read_to_string(state.files.dir.api_token_path())
            .map_err(|source| DaemonError::Api { addr: api_listen, source })?;
        tasks.spawn(crate::api::serve(
            Arc::clone(&state),
            listener,
            token.trim().to_owned(),
            cancel.clone(),
        ));
        crate::client::write_api_address(&state.files.dir, api_addr)
            .map_err(|source| DaemonError::Api { addr: api_addr.to_string(), source })?;
        tracing::info!(
            instance = %state.name, id = %state.instance_id, api = %api_addr,
            dashboard = %format!("http://{api_addr}/"), peers = registered.len(),
            "kaapana-node running"
        );
        // Jobs that were scheduled or running when the node stopped: re-attach or report.
        let s = Arc::clone(&state);
        tasks.spawn(async move { execution::recover(&s).await });
        Ok(Self { state, cancel, tasks, api_addr, containerd })
    }

    /// The shared state (for in-process tests and benchmarks).
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// The local API's address.
    pub const fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Runs until SIGINT or SIGTERM, then stops gracefully.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        self.shutdown().await;
        Ok(())
    }

    /// Stops accepting API requests and connections, lets queued store writes finish, closes
    /// every connection and joins every task (10 s at most).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        lock(&self.state.tasks).take();
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => {
                    tracing::warn!(left = self.tasks.len(), "tasks did not stop in time; aborting them");
                    self.tasks.abort_all();
                    break;
                }
                next = self.tasks.join_next() => if next.is_none() { break },
            }
        }
        crate::client::remove_api_address(&self.state.files.dir);
        if let Some(containerd) = self.containerd.take() {
            containerd.shutdown().await;
        }
        tracing::info!("stopped");
    }
}

/// Turns network events into state changes.
async fn drive(state: Arc<NodeState>, mut events: mpsc::Receiver<NetEvent>) {
    loop {
        let ev = tokio::select! {
            biased;
            () = state.cancel.cancelled() => return,
            ev = events.recv() => match ev { Some(ev) => ev, None => return },
        };
        on_net_event(&state, ev).await;
    }
}

async fn on_net_event(state: &Arc<NodeState>, ev: NetEvent) {
    let now = now();
    match ev {
        NetEvent::Listening(addr) => tracing::info!(%addr, "listening"),
        NetEvent::Connected { peer, addr, inbound, connections, path } => {
            let id = InstanceId::from_peer_id(peer);
            let was = state.peer_mut(&id, |p| p.path.replace(path));
            state.count_relayed(was, Some(path));
            if connections > 1 && was != Some(path) {
                state.event(EventKind::PeerConnected, Some(&id), format!("now {path}: {addr}"));
            }
            state.peer_mut(&id, |p| {
                p.connections = connections;
                p.last_seen = Some(now);
                // `failures` is reset once the peer answers (below): a peer that closes each
                // connection right after the handshake must not reset the redial backoff.
                p.last_error = None;
                if connections == 1 {
                    p.connected_since = Some(now);
                    p.heard_on_connection = false;
                }
            });
            if connections == 1 {
                state.metrics.peers_connected.inc();
                state.event(
                    EventKind::PeerConnected,
                    Some(&id),
                    format!("{path}, {} {addr}", if inbound { "from" } else { "to" }),
                );
                let s = Arc::clone(state);
                tokio::spawn(async move { s.push_capabilities(id).await });
                state.wake_outbox(&id);
                state.tell_site(FedEvent::PeerConnected { peer: id }).await;
                state.retire_handed_over(&id).await;
            }
        }
        NetEvent::Disconnected { peer, remaining, path, cause } => {
            let id = InstanceId::from_peer_id(peer);
            let was = state.peer_mut(&id, |p| std::mem::replace(&mut p.path, path));
            state.count_relayed(was, path);
            let registered = state.registry().is_registered(&id);
            let refused = state.peer_mut(&id, |p| {
                p.connections = remaining;
                let quick = p
                    .connected_since
                    .is_some_and(|since| now.duration_since(since) < REFUSED_WITHIN);
                quick && !p.heard_on_connection
            });
            if remaining == 0 {
                state.metrics.peers_connected.dec();
                let why = if refused {
                    format!(
                        "{} closed the connection right after the handshake: this instance is probably not registered there (its admin must `kaapana-node instance add` this instance's bundle)",
                        state.name_of(&id)
                    )
                } else {
                    cause.unwrap_or_else(|| "connection closed".to_owned())
                };
                state.peer_mut(&id, |p| p.last_error = Some(why.clone()));
                state.event(EventKind::PeerDisconnected, Some(&id), why);
                state.tell_site(FedEvent::PeerDisconnected { peer: id }).await;
                if registered {
                    state.redial_later(id);
                }
            }
        }
        NetEvent::Denied { peer, addr, reason } => {
            state.metrics.connections_denied.inc();
            tracing::warn!(?peer, %addr, %reason, "connection denied");
            let detail = format!(
                "{} from {addr}: {reason}",
                peer.map_or_else(|| "unknown peer".to_owned(), |p| p.to_string())
            );
            state.events.push(
                now,
                EventKind::ConnectionDenied,
                peer.map(|p| p.to_string()),
                detail,
            );
        }
        NetEvent::DialFailed { peer, error } => {
            if let Some(peer) = peer {
                let id = InstanceId::from_peer_id(peer);
                if state.registry().is_registered(&id) && !state.is_connected(&id) {
                    state.peer_mut(&id, |p| {
                        p.last_error = Some(format!("cannot reach it: {error}"))
                    });
                    state.event(EventKind::DialFailed, Some(&id), error);
                    state.redial_later(id);
                }
            }
        }
        NetEvent::Request { peer, frame, channel } => {
            let id = InstanceId::from_peer_id(peer);
            state.peer_mut(&id, |p| {
                p.last_seen = Some(now);
                p.heard_on_connection = true;
                p.failures = 0;
            });
            let s = Arc::clone(state);
            tokio::spawn(async move {
                let response = inbound::handle(&s, id, frame).await;
                let _ = s.net.respond(channel, response).await;
            });
        }
        NetEvent::Nat { peer, what } => {
            let id = peer.map(InstanceId::from_peer_id);
            let name = id.as_ref().map(|i| state.name_of(i)).unwrap_or_default();
            let (kind, text) = match what {
                NatEvent::Reserved => {
                    (EventKind::Relay, format!("reserved a slot at relay {name}"))
                }
                NatEvent::ReservationLost { reason, had: true } => (
                    EventKind::Relay,
                    format!("the reservation at relay {name} ended ({reason}); asking again"),
                ),
                NatEvent::ReservationLost { reason, had: false } => (
                    EventKind::Relay,
                    format!("relay {name} gave no reservation ({reason}); asking again"),
                ),
                NatEvent::RelayRefused { what } => {
                    state
                        .metrics
                        .relay_refused
                        .get_or_create(&crate::metrics::WhatLabel { what: what.to_owned() })
                        .inc();
                    (EventKind::Relay, format!("refused a {what} to an unregistered peer"))
                }
                NatEvent::HolePunched => {
                    (EventKind::HolePunch, "the connection is direct now".to_owned())
                }
                NatEvent::HolePunchFailed { reason } => (
                    EventKind::HolePunch,
                    format!("hole punching failed, the connection stays relayed: {reason}"),
                ),
                NatEvent::Reachability(verdict) => {
                    (EventKind::Reachability, format!("reachable from outside: {verdict}"))
                }
            };
            tracing::info!(peer = %name, "{text}");
            match id {
                Some(id) => state.event(kind, Some(&id), text),
                None => state.events.push(now, kind, None, text),
            }
        }
        NetEvent::Rtt { peer, rtt } => {
            let id = InstanceId::from_peer_id(peer);
            state.peer_mut(&id, |p| {
                p.rtt = Some(rtt);
                p.last_seen = Some(now);
                p.heard_on_connection = true;
                p.failures = 0;
            });
        }
    }
}

/// What `/kaapana/inputs/1` may send: the inputs of live jobs this site's workflows
/// dispatched, as the federation core says.
struct InputsOfSite(Arc<NodeState>);

impl net::inputs::InputSource for InputsOfSite {
    fn input_for(
        &self,
        runner: &InstanceId,
        job: &kaapana_protocol::JobId,
        digest: &kaapana_protocol::Sha256Digest,
    ) -> Option<kaapana_protocol::BlobRef> {
        if !self.0.registry().is_registered(runner) {
            return None;
        }
        self.0.site().input_for(runner, job, digest)
    }

    fn served(&self, runner: &InstanceId, detail: String) {
        self.0.event(EventKind::InputServed, Some(runner), detail);
    }

    fn sent(&self, _runner: &InstanceId, digest: &kaapana_protocol::Sha256Digest, bytes: u64) {
        self.0.metrics.input_bytes_sent.inc_by(bytes);
        *lock(&self.0.input_bytes_sent).entry(*digest).or_default() += bytes;
    }
}

/// How often each registered instance's message counters are sampled for the dashboard.
const PEER_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// Samples every registered instance's message counters into [`NodeState::history`].
async fn sample_peers(state: Arc<NodeState>) {
    let mut tick = tokio::time::interval(PEER_SAMPLE_INTERVAL);
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let names: Vec<String> = state.registry().iter().map(|i| i.name.clone()).collect();
        let counts = names.into_iter().map(|n| {
            let c = state.metrics.peer_counts(&n);
            (n, c)
        });
        state.history.sample_peers(now().as_millis(), counts.collect());
    }
}

/// Re-sends capability ads before they expire.
async fn periodic(state: Arc<NodeState>) {
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.tick().await;
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let connected: Vec<InstanceId> = lock(&state.peers)
            .iter()
            .filter(|(_, p)| p.connections > 0)
            .map(|(id, _)| *id)
            .collect();
        for id in connected {
            state.push_capabilities(id).await;
        }
    }
}

/// The most inbox entries one retention write removes (one transaction stays small; a pass
/// writes as many as it needs).
const PRUNE_BATCH: usize = 10_000;

/// Every `[limits] prune_interval_secs`: forgets the replay ids whose messages expired (in
/// memory and in the store) and removes inbox entries older than `inbox_retention_secs`,
/// giving their senders' quota back. Off the message path: inbound handling never prunes
/// the store (the replay window drops expired ids in memory only when it is full).
async fn retention(state: Arc<NodeState>) {
    let limits = state.files.config.limits.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(limits.prune_interval_secs.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = now();
        // The store first: an id the window forgot but the store kept would come back after a
        // restart (harmless); the other way round a restart could forget an unexpired one.
        let seen = match state.store.write_async(vec![WriteOp::PruneSeen(now)]).await {
            Ok(out) => match out.first() {
                Some(crate::store::WriteOutcome::Pruned(n)) => *n,
                _ => 0,
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot prune expired message ids");
                continue;
            }
        };
        lock(&state.replay).prune(now);
        let before = now.saturating_sub(Duration::from_secs(limits.inbox_retention_secs));
        let mut entries = 0u64;
        loop {
            let op = WriteOp::PruneInbox { before, limit: PRUNE_BATCH };
            let per_peer = match state.store.write_async(vec![op]).await {
                Ok(mut out) => match out.pop() {
                    Some(crate::store::WriteOutcome::InboxPruned(p)) => p,
                    _ => Vec::new(),
                },
                Err(e) => {
                    tracing::error!(error = %e, "cannot prune the inbox");
                    break;
                }
            };
            let n: u64 = per_peer.iter().map(|(_, n, _)| n).sum();
            entries += n;
            let mut usage = lock(&state.inbox_usage);
            for (peer, n, bytes) in per_peer {
                if let Some(u) = usage.get_mut(&peer) {
                    u.0 = u.0.saturating_sub(n);
                    u.1 = u.1.saturating_sub(bytes);
                }
            }
            drop(usage);
            if n < PRUNE_BATCH as u64 || state.cancel.is_cancelled() {
                break;
            }
        }
        state.metrics.seen_ids.set(i64::try_from(lock(&state.replay).len()).unwrap_or(i64::MAX));
        if seen > 0 || entries > 0 {
            state.metrics.inbox_pruned.inc_by(entries);
            state.metrics.seen_ids_pruned.inc_by(seen as u64);
            state.events.push(
                now,
                EventKind::Retention,
                None,
                format!("pruned {entries} inbox entries and {seen} expired message ids"),
            );
        }
    }
}

impl NodeState {
    /// Gives back inbox quota reserved for messages that were not recorded after all.
    fn release_inbox(&self, reserved: &[(InstanceId, u64)]) {
        let mut usage = lock(&self.inbox_usage);
        for (peer, bytes) in reserved {
            if let Some(u) = usage.get_mut(peer) {
                u.0 = u.0.saturating_sub(1);
                u.1 = u.1.saturating_sub(*bytes);
            }
        }
    }
}
