//! The simulated federation: sites, links and the events between them.
//!
//! Every site holds a [`kaapana_federation::Site`], the one federation core the daemon runs
//! too: the simulator feeds it [`Event`]s ([`Site::handle`](kaapana_federation::Site::handle))
//! and carries out the [`Command`]s it returns, in virtual time. It holds no federation rule
//! of its own; what it models is the I/O the daemon does around the core:
//!
//! - `Persist`: nothing to do (the core's value is the durable state; the sim keeps it across
//!   crashes and rebuilds the core from its records on restart, as the daemon does);
//! - `Send`: the durable outbox. One worker per (site, peer) sends the oldest entries as one
//!   request while the peer is connected, removes what the peer settled, backs off
//!   exponentially (100 ms doubling, at most 30 s) after a failure and wakes on new entries
//!   and reconnects; the receiver records message ids durably before it answers, so a resend
//!   is `Replayed`; a message refused as expired is fed back to its sender as
//!   [`Event::Refused`];
//! - `StartJob`/`StopJob`: the executor, with the scenario's start delays, durations and
//!   failures (a training's stragglers run their train jobs for `straggler_job_s`), reporting
//!   [`Event::Executor`];
//! - `DeliverResult`: result bundles, streamed over the runner's uplink and the owner's
//!   downlink (both shared first come, first served), retried with backoff until the owner
//!   has them; the owner stores what [`Site::expects_result`] accepts and feeds
//!   [`Event::ResultStored`], with the sample count of a training's update
//!   ([`Site::is_update`]: the items the runner advertises for the training's dataset, one
//!   update in ten fewer), where the daemon reads the bundle's `samples` file;
//! - `SetTimer`: a [`Event::TimerFired`] at that virtual time (a later timer with the same
//!   value replaces it): a lost-runner check (`Timer::RunnerCheck`) or a training's round
//!   deadline (`Timer::RoundDeadline`); timers are volatile, the core re-arms them when it is
//!   fed `Started` after a restart;
//! - connections: a link breaks when a partition cuts it or a site crashes; the peers notice
//!   after the ping timeout and redial with backoff after it heals (a restarted site dials at
//!   once); each end feeds its core `PeerConnected`/`PeerDisconnected` when it notices;
//!   requests on a broken connection fail when that is noticed, or time out;
//! - inbound processing: each site handles requests one after another, each costing a commit
//!   and a little per message, so a busy owner queues;
//! - crashes: volatile state (workers, transfers, timers, connections, and containers unless
//!   they survive) is lost, durable state (the core's workflows and jobs, outboxes, seen
//!   message ids, stored and signed results) is kept; a restart feeds `Started`, resends
//!   unsent results, starts scheduled jobs that never started and re-attaches running ones or
//!   reports them failed (the daemon's recovery);
//! - the polling baseline: instead of pushing, every site polls every workflow owner; its own
//!   messages ride along on the poll and the owner's come back in the answer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use kaapana_federation::{
    AllowList, Command, Event, Execution, Expected, Message, Notice, Outcome, Policy, Record,
    RegisteredInstance, Registry, RunnerJob, SiteConfig, SiteError, Timer, Workflow, WorkflowState,
};
use kaapana_protocol::{
    BlobRef, CapabilityAd, CapabilityQuery, ContainerWork, DatasetSummary, ENVELOPE_OVERHEAD,
    ExecutorKind, ExitStatus, Gpu, Header, ImageDigest, InstanceId, ItemToken, JobId, JobManifest,
    JobSpec, JobState, NameScope, Pick, Processing, ResourceLimits, Resources, ResultManifest,
    Rounds, RunnerSelector, Sha256Digest, Timestamp, Work, WorkflowId, WorkflowManifest,
};
use serde::Serialize;

use crate::config::{Delivery, Scenario, Variant, WorkflowConfig, WorkflowKind};
use crate::engine::{EventQueue, MS, Micros, SEC, secs};
use crate::invariants::{Invariants, Violation};
use crate::rng::Rng;

/// The federation core of one site.
type Core = kaapana_federation::Site;

/// The wall-clock instant virtual time 0 stands for (in 2027), so that headers look real.
pub const T0_MS: u64 = 1_800_000_000_000;
/// How long job manifests stay valid (kaapana-node: 7 days).
const JOB_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long job updates and cancels stay valid (kaapana-node: 7 days).
const MESSAGE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long workflow manifests, ads and results stay valid.
const LONG_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Entries per request at most (kaapana-node's outbox).
const MAX_BATCH: usize = kaapana_protocol::MAX_BATCH;
/// Bytes per request at most beyond the first entry (kaapana-node's outbox).
const BATCH_BYTES: u64 = 3 * 1024 * 1024;
/// The outbox's longest backoff.
const MAX_BACKOFF: Micros = 30 * SEC;
/// One-way latencies a (re)connection costs: TCP, TLS 1.3 and the multiplexer.
const HANDSHAKE_LEGS: u64 = 4;

// Keys of the keyed random streams.
const K_SITE: u64 = 1;
const K_LINK: u64 = 2;
const K_TOKEN: u64 = 3;
const K_WORKFLOW: u64 = 4;
const K_JOB: u64 = 5;
const K_PARTITION: u64 = 6;
const K_CRASH: u64 = 7;
const K_POLL: u64 = 8;
const K_STRAGGLER: u64 = 9;

/// Why a run could not be carried out or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A site's identity could not be derived.
    #[error("cannot derive the identity of site {site}: {detail}")]
    Identity {
        /// The site.
        site: u32,
        /// Why.
        detail: String,
    },
    /// An invariant was violated: the simulation (or the core) is wrong.
    #[error("invariant violated: {0}")]
    Invariant(Violation),
    /// Some workflows did not end although the scenario requires it.
    #[error("{count} workflow(s) did not end by t = {at_s:.0} s: {detail}")]
    Unfinished {
        /// How many.
        count: usize,
        /// The virtual time the run stopped at, in seconds.
        at_s: f64,
        /// The first of them, with their job counts.
        detail: String,
    },
    /// Writing results failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// How a run is observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimOptions {
    /// Check invariants at every step (on by default in debug builds).
    pub invariants: bool,
    /// Record a [`TraceEvent`] log (for tests).
    pub trace: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self { invariants: cfg!(debug_assertions), trace: false }
    }
}

/// A kind of federation message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MsgKind {
    /// A job manifest, owner to runner.
    Job,
    /// A job update, runner to owner.
    Update,
    /// A cancel, owner to runner.
    Cancel,
}

/// Something that happened, recorded when [`SimOptions::trace`] is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// A message was accepted (recorded for the first time) by its receiver.
    Accepted {
        /// When.
        at: Micros,
        /// The sender.
        from: u32,
        /// The receiver.
        to: u32,
        /// What.
        kind: MsgKind,
        /// The sender's message id.
        id: u64,
    },
    /// A connection came up or was noticed down.
    Link {
        /// When.
        at: Micros,
        /// One end.
        a: u32,
        /// The other end.
        b: u32,
        /// Up or down.
        connected: bool,
    },
    /// A job's container started.
    Started {
        /// When.
        at: Micros,
        /// Where.
        site: u32,
        /// Which job.
        job: JobId,
    },
    /// A result bundle was stored at its owner.
    ResultStored {
        /// When.
        at: Micros,
        /// The runner.
        from: u32,
        /// The job.
        job: JobId,
    },
    /// A workflow ended.
    WorkflowEnded {
        /// When.
        at: Micros,
        /// Its owner.
        owner: u32,
        /// How.
        state: WorkflowState,
        /// Why.
        reason: Option<String>,
    },
    /// A site crashed or restarted.
    Site {
        /// When.
        at: Micros,
        /// Which.
        site: u32,
        /// Up (restart) or down (crash).
        up: bool,
    },
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Job manifests dispatched (every attempt of every job).
    pub dispatches: u64,
    /// Jobs whose container started.
    pub executions: u64,
    /// Federation messages transmitted, resends included.
    pub envelopes: u64,
    /// Of those, resends of a message transmitted before.
    pub envelopes_resent: u64,
    /// Messages of each kind accepted by their receiver.
    pub accepted: BTreeMap<&'static str, u64>,
    /// Requests sent (outbox batches or polls).
    pub requests: u64,
    /// Requests that failed (timeout or broken connection) and were retried.
    pub requests_failed: u64,
    /// Polls (polling model only).
    pub polls: u64,
    /// Polls that carried nothing either way.
    pub empty_polls: u64,
    /// Bytes of those polls and their answers (included in `control_bytes`).
    pub empty_poll_bytes: u64,
    /// Bytes of requests and their answers.
    pub control_bytes: u64,
    /// Result bundle transfers started.
    pub result_transfers: u64,
    /// Of those, failed ones (retried).
    pub result_failures: u64,
    /// Bytes of result transfers (failed ones included).
    pub result_bytes: u64,
    /// Time from dispatch to the runner recording remote job manifests, summed (µs).
    pub delivery_latency_sum: u64,
    /// How many remote job manifests that sum covers.
    pub delivery_latency_count: u64,
    /// The longest of those latencies (µs).
    pub delivery_latency_max: u64,
    /// Site crashes.
    pub crashes: u64,
    /// Messages refused because they expired before they were delivered.
    pub expired: u64,
    /// Executor reports the core refused (they did not apply to the job's state).
    pub transition_errors: u64,
    /// Workflows a fired lost-runner check changed (jobs moved to another runner, or given
    /// up): the workflow records the core asked to persist while handling
    /// `TimerFired(RunnerCheck)`.
    pub runner_lost_events: u64,
}

/// One workflow of a run and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowOutcome {
    /// Its owner.
    pub owner: u32,
    /// Its kind.
    pub kind: WorkflowKind,
    /// When it was submitted.
    pub submitted_at: Micros,
    /// When it ended.
    pub ended_at: Option<Micros>,
    /// How (None while running).
    pub state: Option<WorkflowState>,
    /// Why it failed (or could not be planned).
    pub reason: Option<String>,
    /// Its jobs (current attempts).
    pub jobs: usize,
    /// Retries over all its jobs.
    pub retries: u64,
}

fn msg_kind(m: &Message) -> MsgKind {
    match m {
        Message::JobManifest(_) => MsgKind::Job,
        Message::JobUpdate(_) => MsgKind::Update,
        _ => MsgKind::Cancel,
    }
}

fn expires_at(m: &Message) -> Timestamp {
    match m {
        Message::JobManifest(m) => m.header.expires_at,
        Message::JobUpdate(m) => m.header.expires_at,
        Message::Cancel(m) => m.header.expires_at,
        _ => Timestamp::from_millis(u64::MAX),
    }
}

/// The signed envelope's size: the postcard payload plus the envelope's fixed overhead.
fn wire_size(m: &Message) -> u64 {
    let payload = match m {
        Message::JobManifest(m) => postcard_size(m),
        Message::JobUpdate(m) => postcard_size(m),
        Message::Cancel(m) => postcard_size(m),
        _ => 0,
    };
    (payload + ENVELOPE_OVERHEAD) as u64
}

impl MsgKind {
    const fn label(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::Update => "update",
            Self::Cancel => "cancel",
        }
    }
}

fn postcard_size<T: Serialize>(v: &T) -> usize {
    postcard::serialize_with_flavor(v, postcard::ser_flavors::Size::default()).unwrap_or(0)
}

/// Bytes of a LEB128 varint.
const fn varint_len(mut v: u64) -> u64 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// One message in transit: the sender's id for it and the payload.
#[derive(Clone, Debug)]
struct Env {
    id: u64,
    msg: Rc<Message>,
    bytes: u64,
}

#[derive(Debug)]
struct OutEntry {
    env: Env,
    sends: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Accepted,
    Replayed,
    Expired,
}

#[derive(Debug)]
struct Request {
    from: u32,
    to: u32,
    from_inc: u32,
    epoch: u32,
    poll: bool,
    bytes: u64,
    batch: Vec<Env>,
    /// The batch, kept for the invariant checks once it has been processed.
    batch_kept: Vec<Env>,
    acks: Vec<u64>,
    settled: Vec<(u64, Verdict)>,
    reply: Vec<Env>,
}

/// A result this site signed for a remote owner, kept durably until the owner confirmed it.
#[derive(Debug)]
struct Signed {
    owner: u32,
    result: ResultManifest,
}

/// What a site keeps across a crash besides its core.
#[derive(Debug, Default)]
struct Durable {
    /// Result bundles stored here (at owners).
    stored_results: HashMap<JobId, BlobRef>,
    /// Signed results not yet confirmed by their owner.
    results: BTreeMap<JobId, Signed>,
    outbox: BTreeMap<u32, VecDeque<OutEntry>>,
    next_msg: u64,
    seen: HashSet<(u32, u64)>,
    last_accepted: HashMap<u32, u64>,
}

#[derive(Debug, Default)]
struct Worker {
    in_flight: Option<u64>,
    failures: u32,
    timer_gen: u64,
}

#[derive(Debug, Default)]
struct Transfer {
    failures: u32,
    attempt: u64,
}

#[derive(Debug, Default)]
struct Volatile {
    workers: BTreeMap<u32, Worker>,
    transfers: BTreeMap<JobId, Transfer>,
    pending_acks: BTreeMap<u32, Vec<u64>>,
    busy_until: Micros,
    up_free: Micros,
    down_free: Micros,
    /// The generation of the armed `RunnerCheck` timer per peer.
    timers: HashMap<u32, u64>,
    /// The generation of the armed `RoundDeadline` timer per training.
    round_timers: HashMap<WorkflowId, u64>,
}

#[derive(Clone, Copy, Debug)]
struct Container {
    ends_at: Micros,
}

#[derive(Debug)]
struct Site {
    id: InstanceId,
    name: String,
    alive: bool,
    inc: u32,
    up_bps: f64,
    down_bps: f64,
    /// The federation core: workflows owned here, jobs run here (durable), peers (volatile,
    /// rebuilt on restart).
    core: Core,
    d: Durable,
    v: Volatile,
    containers: BTreeMap<JobId, Container>,
}

/// What a site offers, drawn once; its ads are built from it.
#[derive(Debug)]
struct Attr {
    dataset: bool,
    items: u64,
    gpu: bool,
    cpu: u32,
}

#[derive(Debug)]
struct Link {
    up: bool,
    connected: bool,
    epoch: u32,
    latency: Micros,
    noticed_at: Micros,
}

#[derive(Debug)]
struct WfMeta {
    cfg: usize,
    id: Option<WorkflowId>,
    owner: u32,
    outcome: WorkflowOutcome,
}

#[derive(Debug)]
enum Ev {
    Submit { wf: usize },
    Arrive { req: u64 },
    Processed { req: u64, inc: u32 },
    Respond { req: u64 },
    ReqTimeout { site: u32, peer: u32, req: u64, inc: u32 },
    OutboxTimer { site: u32, peer: u32, generation: u64, inc: u32 },
    LinkNoticed { a: u32, b: u32, epoch: u32 },
    LinkConnected { a: u32, b: u32, epoch: u32 },
    ExecStart { site: u32, job: JobId, inc: u32 },
    ExecExit { site: u32, job: JobId, inc: u32 },
    ResultTry { site: u32, job: JobId, inc: u32 },
    ResultArrive { site: u32, job: JobId, inc: u32, attempt: u64, epoch: u32 },
    ResultAcked { site: u32, job: JobId, inc: u32, attempt: u64, epoch: u32 },
    RunnerCheck { site: u32, peer: u32, generation: u64, inc: u32 },
    RoundDeadline { site: u32, workflow: WorkflowId, generation: u64, inc: u32 },
    Crash { site: u32 },
    Restart { site: u32 },
    PartitionStart { p: usize },
    PartitionHeal { p: usize },
    Poll { site: u32, peer: u32, inc: u32 },
}

/// One simulated federation.
#[derive(Debug)]
pub struct Sim {
    sc: Scenario,
    seed: u64,
    queue: EventQueue<Ev>,
    rng: Rng,
    sites: Vec<Site>,
    index: HashMap<InstanceId, u32>,
    links: HashMap<(u32, u32), Link>,
    adj: Vec<Vec<u32>>,
    cut: Vec<u64>,
    partitions: Vec<Vec<u32>>,
    owners: BTreeSet<u32>,
    requests: HashMap<u64, Request>,
    next_req: u64,
    kicks: Vec<(u32, u32)>,
    wfs: Vec<WfMeta>,
    wf_index: HashMap<WorkflowId, usize>,
    submits_pending: usize,
    open_workflows: usize,
    /// Messages in outboxes, at every site (durable, so crashes do not change it).
    undelivered: usize,
    /// Result bundles signed but not yet confirmed by their owner.
    unsent_results: usize,
    dispatched_at: HashMap<JobId, Micros>,
    counters: Counters,
    inv: Invariants,
    trace: Option<Vec<TraceEvent>>,
    events: u64,
    timed_out: bool,
    last_end: Micros,
    /// The cores' time limits.
    config: SiteConfig,
    /// What every site offers.
    attrs: Vec<Attr>,
    /// Events for cores, fed in order after the current one (a core's command may cause one).
    pending: VecDeque<(u32, Event)>,
    feeding: bool,
    next_timer: u64,
}

/// A valid instance id for site `i`: the Ed25519 public key of a seed derived from `i`.
pub fn instance_id(i: u32) -> Result<InstanceId, SimError> {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(b"sim-");
    seed[4..8].copy_from_slice(&i.to_be_bytes());
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| SimError::Identity { site: i, detail: e.to_string() })?;
    let mut pk = [0u8; 32];
    let public = ring::signature::KeyPair::public_key(&pair).as_ref();
    if public.len() != 32 {
        return Err(SimError::Identity { site: i, detail: "unexpected key length".into() });
    }
    pk.copy_from_slice(public);
    InstanceId::from_ed25519_public_key(&pk)
        .map_err(|e| SimError::Identity { site: i, detail: e.to_string() })
}

/// A site's name: `site-00042`, so that names sort like indices.
pub fn site_name(i: u32) -> String {
    format!("site-{i:05}")
}

fn ts(now: Micros) -> Timestamp {
    Timestamp::from_millis(T0_MS + now / MS)
}

/// The virtual time a timestamp stands for.
const fn micros(t: Timestamp) -> Micros {
    t.as_millis().saturating_sub(T0_MS).saturating_mul(MS)
}

/// Site `p` as another site registers it (by certificate exchange in the node), with `policy`.
fn registered(id: InstanceId, p: u32, policy: &Policy) -> RegisteredInstance {
    RegisteredInstance {
        instance_id: id,
        name: site_name(p),
        certificate_der: Vec::new(),
        fingerprint: [0; 32],
        listen_addrs: Vec::new(),
        certificate_not_after: ts(0).saturating_add(LONG_LIFETIME),
        registered_at: ts(0),
        policy: policy.clone(),
    }
}

fn job_keys(job: &JobId) -> [u64; 2] {
    let b = job.as_bytes();
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
}

const fn key(a: u32, b: u32) -> (u32, u32) {
    if a < b { (a, b) } else { (b, a) }
}

/// The region of site `i`, whose dataset is called `<dataset>-r<region>`.
pub const fn region_of(i: u32, region_size: u32) -> u32 {
    i / region_size
}

impl Sim {
    /// Sets up a run of `variant`: sites, ads, links, and the scheduled submissions, faults
    /// and timers.
    pub fn new(variant: &Variant, opts: SimOptions) -> Result<Self, SimError> {
        let sc = variant.scenario.clone();
        sc.validate()?;
        let n = sc.sites;
        let seed = sc.seed;
        let mut ids = Vec::with_capacity(n as usize);
        for i in 0..n {
            ids.push(instance_id(i)?);
        }
        let index: HashMap<InstanceId, u32> =
            ids.iter().enumerate().map(|(i, id)| (*id, i as u32)).collect();
        let owners: BTreeSet<u32> =
            sc.workflow.iter().flat_map(|w| w.owners.iter().copied()).collect();
        let config = SiteConfig {
            job_lifetime: JOB_LIFETIME,
            message_lifetime: MESSAGE_LIFETIME,
            runner_lost_after: Duration::from_secs_f64(sc.node.runner_lost_after_s),
            runner_give_up_after: Duration::from_secs_f64(sc.node.runner_give_up_after_s),
        };
        let policy = Policy {
            allowed_workflows: AllowList::Any,
            allowed_datasets: AllowList::Any,
            execution: Execution::Automatic,
            share_logs: false,
        };

        // Static attributes of every site, each from its own stream.
        let mut attrs = Vec::with_capacity(n as usize);
        let mut sites = Vec::with_capacity(n as usize);
        for (i, id) in ids.iter().enumerate() {
            let mut r = Rng::keyed(seed, &[K_SITE, i as u64]);
            let dataset = r.chance(sc.site.dataset_fraction);
            let items = (sc.site.items.sample(&mut r).round() as u64).max(1);
            let gpu = r.chance(sc.site.gpu_fraction);
            let cpu = sc.site.cpu_millis.sample(&mut r).round().min(f64::from(u32::MAX)) as u32;
            let up_bps = (sc.network.uplink_mbit_s.sample(&mut r) * 125_000.0).max(1000.0);
            let down_bps = (sc.network.downlink_mbit_s.sample(&mut r) * 125_000.0).max(1000.0);
            attrs.push(Attr { dataset, items, gpu, cpu });
            // Owners register every other site; the other sites register the owners.
            let mut registry = Registry::new();
            let peers: Vec<u32> = if owners.contains(&(i as u32)) {
                (0..n).collect()
            } else {
                owners.iter().copied().collect()
            };
            for p in peers.into_iter().filter(|&p| p != i as u32) {
                let inst = registered(ids[p as usize], p, &policy);
                registry
                    .add(inst)
                    .map_err(|e| SimError::Identity { site: p, detail: e.to_string() })?;
            }
            let core = Core::new(*id, site_name(i as u32), config, registry, [], [], ts(0));
            sites.push(Site {
                id: *id,
                name: site_name(i as u32),
                alive: true,
                inc: 0,
                up_bps,
                down_bps,
                core,
                d: Durable::default(),
                v: Volatile::default(),
                containers: BTreeMap::new(),
            });
        }

        let mut sim = Self {
            seed,
            queue: EventQueue::new(),
            rng: Rng::keyed(seed, &[0]),
            sites,
            index,
            links: HashMap::new(),
            adj: vec![Vec::new(); n as usize],
            cut: vec![0; n as usize],
            partitions: Vec::new(),
            owners: owners.clone(),
            requests: HashMap::new(),
            next_req: 0,
            kicks: Vec::new(),
            wfs: Vec::new(),
            wf_index: HashMap::new(),
            submits_pending: 0,
            open_workflows: 0,
            undelivered: 0,
            unsent_results: 0,
            dispatched_at: HashMap::new(),
            counters: Counters::default(),
            inv: Invariants::new(opts.invariants),
            trace: opts.trace.then(Vec::new),
            events: 0,
            timed_out: false,
            last_end: 0,
            config,
            attrs,
            pending: VecDeque::new(),
            feeding: false,
            next_timer: 0,
            sc,
        };

        // Every site starts; every owner knows every site's ad (its own included, as the
        // node's is).
        for s in 0..n {
            sim.feed(s, Event::Started);
        }
        for &o in &owners {
            sim.restore_ads(o);
        }

        // Links between every owner and every site: the only pairs that exchange messages.
        for &o in &owners {
            for s in 0..n {
                if s != o {
                    sim.ensure_link(o, s);
                }
            }
        }

        // Submissions.
        for (c, w) in sim.sc.workflow.clone().iter().enumerate() {
            for k in 0..w.count {
                let owner = w.owners[k as usize % w.owners.len()];
                let at = secs(w.at_s + w.every_s * f64::from(k));
                let outcome = WorkflowOutcome {
                    owner,
                    kind: w.kind,
                    submitted_at: at,
                    ended_at: None,
                    state: None,
                    reason: None,
                    jobs: 0,
                    retries: 0,
                };
                sim.wfs.push(WfMeta { cfg: c, id: None, owner, outcome });
                sim.queue.schedule(at, Ev::Submit { wf: sim.wfs.len() - 1 });
                sim.submits_pending += 1;
            }
        }

        // Partitions: the cut-off sites are drawn once per partition.
        for (p, cfg) in sim.sc.partition.clone().iter().enumerate() {
            let mut eligible: Vec<u32> =
                (0..n).filter(|s| cfg.include_owners || !sim.owners.contains(s)).collect();
            let count = ((cfg.fraction * f64::from(n)).round() as usize).min(eligible.len());
            let mut r = Rng::keyed(seed, &[K_PARTITION, p as u64]);
            for i in 0..count {
                let j = i + r.below((eligible.len() - i) as u64) as usize;
                eligible.swap(i, j);
            }
            let mut members: Vec<u32> = eligible[..count].to_vec();
            members.sort_unstable();
            sim.partitions.push(members);
            if count > 0 {
                sim.queue.schedule(secs(cfg.start_s), Ev::PartitionStart { p });
                sim.queue.schedule(secs(cfg.start_s + cfg.duration_s), Ev::PartitionHeal { p });
            }
        }

        // Crashes: each site at most once.
        let crashes = sim.sc.crashes.clone();
        if crashes.fraction > 0.0 {
            for s in 0..n {
                if !crashes.include_owners && sim.owners.contains(&s) {
                    continue;
                }
                let mut r = Rng::keyed(seed, &[K_CRASH, u64::from(s)]);
                if r.chance(crashes.fraction) {
                    let at = secs(crashes.at_s.sample(&mut r));
                    let down = secs(crashes.downtime_s.sample(&mut r)).max(MS);
                    sim.queue.schedule(at, Ev::Crash { site: s });
                    sim.queue.schedule(at + down, Ev::Restart { site: s });
                }
            }
        }

        // In the polling model every site polls every owner.
        if sim.sc.delivery == Delivery::Poll {
            for s in 0..n {
                sim.arm_polls(s);
            }
        }
        Ok(sim)
    }

    // ---- running -----------------------------------------------------------------------

    /// Runs until every workflow ended and every message and result was delivered, nothing is
    /// left to do, or the time limit.
    pub fn run(&mut self) -> Result<(), SimError> {
        while self.step()? {}
        Ok(())
    }

    /// Handles one event; false when the run is over.
    pub fn step(&mut self) -> Result<bool, SimError> {
        if self.is_done() {
            return Ok(false);
        }
        let Some(next) = self.queue.peek_time() else { return Ok(false) };
        if next > secs(self.sc.max_time_s) {
            self.timed_out = true;
            return Ok(false);
        }
        let before = self.queue.now();
        let Some((at, ev)) = self.queue.pop() else { return Ok(false) };
        self.inv.time_moves_forward(before, at);
        self.events += 1;
        self.handle(ev);
        self.flush_kicks();
        match self.inv.take_violation() {
            Some(v) => Err(SimError::Invariant(v)),
            None => Ok(true),
        }
    }

    /// Runs every event up to virtual time `until` (for tests).
    pub fn run_until(&mut self, until: Micros) -> Result<(), SimError> {
        while self.queue.peek_time().is_some_and(|t| t <= until) {
            if !self.step()? {
                break;
            }
        }
        Ok(())
    }

    /// Every workflow ended and every message and result reached its receiver.
    fn is_done(&self) -> bool {
        self.submits_pending == 0
            && self.open_workflows == 0
            && self.undelivered == 0
            && self.unsent_results == 0
    }

    /// The virtual time now.
    pub fn now(&self) -> Micros {
        self.queue.now()
    }

    /// Events handled so far.
    pub const fn events(&self) -> u64 {
        self.events
    }

    /// Whether the run hit its time limit.
    pub const fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// The counters.
    pub const fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The recorded trace (empty unless tracing).
    pub fn trace(&self) -> &[TraceEvent] {
        self.trace.as_deref().unwrap_or(&[])
    }

    /// Every workflow of the run.
    pub fn outcomes(&self) -> Vec<WorkflowOutcome> {
        self.wfs.iter().map(|w| w.outcome.clone()).collect()
    }

    /// Workflow `i` of the run (in submission order) as its owner keeps it, once submitted
    /// and planned.
    pub fn workflow(&self, i: usize) -> Option<&Workflow> {
        let meta = self.wfs.get(i)?;
        self.sites.get(meta.owner as usize)?.core.workflow(meta.id.as_ref()?)
    }

    /// The configuration of workflow `i` of the run (in submission order).
    pub fn workflow_config(&self, i: usize) -> Option<&WorkflowConfig> {
        self.sc.workflow.get(self.wfs.get(i)?.cfg)
    }

    /// The site index of an instance id.
    pub fn site_of(&self, id: &InstanceId) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// When the last workflow ended (µs).
    pub const fn last_end(&self) -> Micros {
        self.last_end
    }

    /// The scenario this run simulates.
    pub const fn scenario(&self) -> &Scenario {
        &self.sc
    }

    /// Connections that exist (pairs that exchange messages).
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Whether sites `a` and `b` consider themselves connected.
    pub fn connected(&self, a: u32, b: u32) -> bool {
        self.links.get(&key(a, b)).is_some_and(|l| l.connected)
    }

    /// Whether the network lets `a` and `b` talk right now (both up, not cut apart).
    pub fn physically_up(&self, a: u32, b: u32) -> bool {
        let (Some(sa), Some(sb)) = (self.sites.get(a as usize), self.sites.get(b as usize)) else {
            return false;
        };
        sa.alive && sb.alive && self.cut[a as usize] == self.cut[b as usize]
    }

    /// The sites partition `p` cuts off.
    pub fn partition_members(&self, p: usize) -> &[u32] {
        self.partitions.get(p).map_or(&[], Vec::as_slice)
    }

    /// Crashes `site` now (for tests; scenarios schedule crashes in `[crashes]`).
    pub fn crash_site(&mut self, site: u32) {
        if (site as usize) < self.sites.len() {
            self.crash(site);
            self.flush_kicks();
        }
    }

    /// Restarts a crashed `site` now (for tests).
    pub fn restart_site(&mut self, site: u32) {
        if (site as usize) < self.sites.len() {
            self.restart(site);
            self.flush_kicks();
        }
    }

    /// Messages `site` holds for `peer`, not yet acknowledged.
    pub fn outbox_len(&self, site: u32, peer: u32) -> usize {
        self.sites.get(site as usize).and_then(|s| s.d.outbox.get(&peer)).map_or(0, VecDeque::len)
    }

    fn record(&mut self, e: TraceEvent) {
        if let Some(t) = &mut self.trace {
            t.push(e);
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Submit { wf } => self.submit(wf),
            Ev::Arrive { req } => self.arrive(req),
            Ev::Processed { req, inc } => self.processed(req, inc),
            Ev::Respond { req } => self.respond(req),
            Ev::ReqTimeout { site, peer, req, inc } => {
                if self.sites[site as usize].inc == inc
                    && self.worker(site, peer).is_some_and(|w| w.in_flight == Some(req))
                {
                    self.fail_request(site, peer);
                }
            }
            Ev::OutboxTimer { site, peer, generation, inc } => {
                let fresh = self.sites[site as usize].inc == inc
                    && self.worker(site, peer).is_some_and(|w| w.timer_gen == generation);
                if fresh && self.sc.delivery == Delivery::Push {
                    self.kicks.push((site, peer));
                }
            }
            Ev::LinkNoticed { a, b, epoch } => {
                let stale = self.links.get(&key(a, b)).is_none_or(|l| l.epoch != epoch || l.up);
                if !stale {
                    self.set_connected(a, b, false);
                }
            }
            Ev::LinkConnected { a, b, epoch } => {
                let fresh = self.links.get(&key(a, b)).is_some_and(|l| l.epoch == epoch && l.up);
                if fresh {
                    self.set_connected(a, b, true);
                }
            }
            Ev::ExecStart { site, job, inc } => self.exec_start(site, job, inc),
            Ev::ExecExit { site, job, inc } => self.exec_exit(site, job, inc),
            Ev::ResultTry { site, job, inc } => {
                if self.sites[site as usize].inc == inc {
                    self.result_try(site, job);
                }
            }
            Ev::ResultArrive { site, job, inc, attempt, epoch } => {
                self.result_arrive(site, job, inc, attempt, epoch);
            }
            Ev::ResultAcked { site, job, inc, attempt, epoch } => {
                self.result_acked(site, job, inc, attempt, epoch);
            }
            Ev::RunnerCheck { site, peer, generation, inc } => {
                let st = &mut self.sites[site as usize];
                if st.alive && st.inc == inc && st.v.timers.get(&peer) == Some(&generation) {
                    st.v.timers.remove(&peer);
                    let id = self.sites[peer as usize].id;
                    self.feed(site, Event::TimerFired(Timer::RunnerCheck(id)));
                }
            }
            Ev::RoundDeadline { site, workflow, generation, inc } => {
                let st = &mut self.sites[site as usize];
                if st.alive
                    && st.inc == inc
                    && st.v.round_timers.get(&workflow) == Some(&generation)
                {
                    st.v.round_timers.remove(&workflow);
                    self.feed(site, Event::TimerFired(Timer::RoundDeadline(workflow)));
                }
            }
            Ev::Crash { site } => self.crash(site),
            Ev::Restart { site } => self.restart(site),
            Ev::PartitionStart { p } => self.partition(p, true),
            Ev::PartitionHeal { p } => self.partition(p, false),
            Ev::Poll { site, peer, inc } => self.poll(site, peer, inc),
        }
    }

    // ---- links -------------------------------------------------------------------------

    fn ensure_link(&mut self, a: u32, b: u32) {
        let k = key(a, b);
        if self.links.contains_key(&k) {
            return;
        }
        let mut r = Rng::keyed(self.seed, &[K_LINK, u64::from(k.0), u64::from(k.1)]);
        let latency = secs(self.sc.network.latency_ms.sample(&mut r) / 1000.0).max(100);
        let up = self.physically_up(a, b);
        self.links.insert(k, Link { up, connected: up, epoch: 0, latency, noticed_at: 0 });
        self.adj[a as usize].push(b);
        self.adj[b as usize].push(a);
        if up {
            for (x, y) in [(a, b), (b, a)] {
                let peer = self.sites[y as usize].id;
                self.feed(x, Event::PeerConnected { peer });
            }
        } else {
            let now = self.now();
            if let Some(l) = self.links.get_mut(&k) {
                l.noticed_at = now;
            }
        }
    }

    fn latency(&self, a: u32, b: u32) -> Micros {
        self.links.get(&key(a, b)).map_or(25 * MS, |l| l.latency)
    }

    /// Brings link `(a, b)` in line with the network after a change at `a`; `dial` when `a`
    /// has just restarted and dials its peers at once.
    fn refresh_link(&mut self, a: u32, b: u32, dial: bool) {
        let up = self.physically_up(a, b);
        let now = self.now();
        let (latency, was_connected) = match self.links.get(&key(a, b)) {
            Some(l) if l.up == up && !dial => return,
            Some(l) => (l.latency, l.connected),
            None => return,
        };
        if dial && was_connected {
            // The restarted side has no connection, whatever the other side believes.
            self.set_connected(a, b, false);
        }
        let epoch = {
            let Some(l) = self.links.get_mut(&key(a, b)) else { return };
            if l.up == up && !dial {
                return;
            }
            l.up = up;
            l.epoch += 1;
            l.epoch
        };
        if !up {
            let detect = secs(self.sc.network.detect_s.sample(&mut self.rng));
            self.queue.schedule(now + detect, Ev::LinkNoticed { a, b, epoch });
            return;
        }
        let handshake = HANDSHAKE_LEGS * latency;
        let delay = if dial {
            handshake
        } else if was_connected {
            // The break was never noticed: the connection carries on.
            0
        } else {
            let noticed = self.links.get(&key(a, b)).map_or(now, |l| l.noticed_at);
            self.next_redial(noticed, now) - now + handshake + self.rng.below(SEC) // the two sides' timers are not in step
        };
        self.queue.schedule(now + delay, Ev::LinkConnected { a, b, epoch });
    }

    /// The first redial at or after `now` of a connection noticed down at `since`: every
    /// `base * 2^k` (capped) after the previous one, as kaapana-node redials.
    fn next_redial(&self, since: Micros, now: Micros) -> Micros {
        let base = secs(self.sc.network.redial_base_ms / 1000.0).max(1);
        let cap = secs(self.sc.network.redial_max_s).max(base);
        let mut t = since;
        let mut k = 1u32;
        while t < now {
            let step = base.saturating_mul(1u64 << k.min(20)).min(cap);
            if step == cap {
                // Evenly spaced from here on.
                let n = (now - t).div_ceil(cap);
                return t + n * cap;
            }
            t += step;
            k += 1;
        }
        t
    }

    fn set_connected(&mut self, a: u32, b: u32, connected: bool) {
        let now = self.now();
        let Some(l) = self.links.get_mut(&key(a, b)) else { return };
        if l.connected == connected {
            return;
        }
        l.connected = connected;
        if !connected {
            l.noticed_at = now;
        }
        // Each end that is up tells its core (a crashed end's core restarts disconnected).
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.sites[y as usize].id;
            let event = if connected {
                Event::PeerConnected { peer }
            } else {
                Event::PeerDisconnected { peer }
            };
            self.feed(x, event);
        }
        self.record(TraceEvent::Link { at: now, a, b, connected });
        // Requests on the old connection fail now (libp2p reports the closed connection), and
        // both outbox workers wake up.
        for (x, y) in [(a, b), (b, a)] {
            if !self.sites[x as usize].alive {
                continue;
            }
            let in_flight = self.worker(x, y).and_then(|w| w.in_flight);
            if let Some(req) = in_flight {
                let stale = self.requests.get(&req).is_none_or(|r| {
                    !connected || self.links.get(&key(a, b)).is_none_or(|l| l.epoch != r.epoch)
                });
                if stale {
                    self.fail_request(x, y);
                }
            }
            if connected && self.sc.delivery == Delivery::Push {
                self.kicks.push((x, y));
            }
        }
    }

    /// Arrival time of a small message from `a` to `b` sent now: latency, jitter, lost
    /// packets and serialisation at the slower end.
    fn transmit(&mut self, a: u32, b: u32, bytes: u64) -> Micros {
        let now = self.now();
        let bps = self.sites[a as usize].up_bps.min(self.sites[b as usize].down_bps);
        let serial = (bytes as f64 / bps * 1e6) as Micros;
        now + self.latency(a, b) + self.jitter() + self.losses() + serial
    }

    /// Arrival time of a bulk transfer (a result bundle): it queues for the sender's uplink
    /// and the receiver's downlink, each shared first come, first served.
    fn transmit_bulk(&mut self, a: u32, b: u32, bytes: u64) -> Micros {
        let now = self.now();
        let latency = self.latency(a, b) + self.jitter() + self.losses();
        let (up_bps, up_free) = {
            let s = &self.sites[a as usize];
            (s.up_bps, s.v.up_free)
        };
        let up_start = now.max(up_free);
        let up_end = up_start + (bytes as f64 / up_bps * 1e6) as Micros;
        self.sites[a as usize].v.up_free = up_end;
        let (down_bps, down_free) = {
            let s = &self.sites[b as usize];
            (s.down_bps, s.v.down_free)
        };
        let down_start = (up_start + latency).max(down_free);
        let down_end = down_start + (bytes as f64 / down_bps * 1e6) as Micros;
        self.sites[b as usize].v.down_free = down_end;
        down_end.max(up_end + latency)
    }

    fn jitter(&mut self) -> Micros {
        secs(self.sc.network.jitter_ms.sample(&mut self.rng) / 1000.0)
    }

    fn losses(&mut self) -> Micros {
        let mut delay = 0;
        let mut rto = secs(self.sc.network.retransmit_ms / 1000.0);
        let mut k = 0;
        while k < 8 && self.rng.chance(self.sc.network.loss) {
            delay += rto;
            rto *= 2;
            k += 1;
        }
        delay
    }

    // ---- outbox and requests -----------------------------------------------------------

    fn worker(&self, site: u32, peer: u32) -> Option<&Worker> {
        self.sites[site as usize].v.workers.get(&peer)
    }

    fn enqueue(&mut self, from: u32, to: u32, msg: Message) {
        if !self.links.contains_key(&key(from, to)) {
            self.ensure_link(from, to);
        }
        let bytes = wire_size(&msg);
        let site = &mut self.sites[from as usize];
        let id = site.d.next_msg;
        site.d.next_msg += 1;
        let env = Env { id, msg: Rc::new(msg), bytes };
        site.d.outbox.entry(to).or_default().push_back(OutEntry { env, sends: 0 });
        self.undelivered += 1;
        if self.sc.delivery == Delivery::Push {
            self.kicks.push((from, to));
        }
    }

    fn flush_kicks(&mut self) {
        while !self.kicks.is_empty() {
            let mut kicks = std::mem::take(&mut self.kicks);
            let mut done = BTreeSet::new();
            kicks.retain(|k| done.insert(*k));
            for (s, p) in kicks {
                self.kick(s, p);
            }
        }
    }

    /// The outbox worker of `s` for `p` sends what waits, if it can.
    fn kick(&mut self, s: u32, p: u32) {
        if !self.sites[s as usize].alive {
            return;
        }
        let connected = self.connected(s, p);
        let site = &mut self.sites[s as usize];
        let worker = site.v.workers.entry(p).or_default();
        if worker.in_flight.is_some() {
            return;
        }
        let queue = site.d.outbox.get_mut(&p);
        let Some(queue) = queue.filter(|q| !q.is_empty()) else {
            worker.failures = 0;
            return;
        };
        if !connected {
            // Waits for the reconnect.
            worker.failures = 0;
            return;
        }
        let batch = take_batch(queue, &mut self.counters);
        let req = self.next_req;
        self.next_req += 1;
        worker.in_flight = Some(req);
        self.send_request(s, p, req, false, batch, Vec::new());
    }

    fn send_request(
        &mut self,
        from: u32,
        to: u32,
        req: u64,
        poll: bool,
        batch: Vec<Env>,
        acks: Vec<u64>,
    ) {
        let mut bytes = varint_len(batch.len() as u64) + 1;
        for e in &batch {
            bytes += varint_len(e.bytes) + e.bytes;
        }
        bytes += acks.len() as u64 * 8;
        bytes += if poll {
            self.sc.network.poll_overhead_bytes
        } else {
            self.sc.network.request_overhead_bytes
        } as u64;
        self.counters.requests += 1;
        self.counters.control_bytes += bytes;
        self.counters.envelopes += batch.len() as u64;
        let epoch = self.links.get(&key(from, to)).map_or(0, |l| l.epoch);
        let inc = self.sites[from as usize].inc;
        self.requests.insert(
            req,
            Request {
                from,
                to,
                from_inc: inc,
                epoch,
                poll,
                bytes,
                batch,
                batch_kept: Vec::new(),
                acks,
                settled: Vec::new(),
                reply: Vec::new(),
            },
        );
        let at = self.transmit(from, to, bytes);
        self.queue.schedule(at, Ev::Arrive { req });
        let timeout = secs(self.sc.network.request_timeout_s);
        self.queue.after(timeout, Ev::ReqTimeout { site: from, peer: to, req, inc });
    }

    /// Whether request `req` still travels on the connection it was sent on.
    fn on_its_connection(&self, r: &Request) -> bool {
        self.links.get(&key(r.from, r.to)).is_some_and(|l| l.up && l.epoch == r.epoch)
    }

    fn arrive(&mut self, req: u64) {
        let Some(r) = self.requests.get(&req) else { return };
        if !self.on_its_connection(r) {
            self.requests.remove(&req);
            return;
        }
        let to = r.to as usize;
        let messages = r.batch.len() + r.acks.len();
        let base = if messages == 0 && r.poll {
            self.sc.site.process_poll_ms
        } else {
            self.sc.site.process_request_ms
        };
        let cost = secs((base + self.sc.site.process_message_ms * messages as f64) / 1000.0);
        let now = self.now();
        let site = &mut self.sites[to];
        let done = now.max(site.v.busy_until) + cost;
        site.v.busy_until = done;
        let inc = site.inc;
        self.queue.schedule(done, Ev::Processed { req, inc });
    }

    fn processed(&mut self, req: u64, inc: u32) {
        let Some((from, to)) = self.requests.get(&req).map(|r| (r.from, r.to)) else { return };
        if self.sites[to as usize].inc != inc || !self.sites[to as usize].alive {
            self.requests.remove(&req);
            return;
        }
        let Some(r) = self.requests.get_mut(&req) else { return };
        let batch = std::mem::take(&mut r.batch);
        let acks = std::mem::take(&mut r.acks);
        if self.inv.enabled() {
            r.batch_kept.clone_from(&batch);
        }
        let (poll, request_bytes) = (r.poll, r.bytes);
        let mut settled = Vec::with_capacity(batch.len());
        for e in &batch {
            let v = self.receive_envelope(to, from, e);
            settled.push((e.id, v));
        }
        let mut reply = Vec::new();
        if poll {
            // The poller has recorded these: drop them from the outbox.
            if !acks.is_empty() {
                let acked: HashSet<u64> = acks.iter().copied().collect();
                for &id in &acks {
                    let durable = self.sites[from as usize].d.seen.contains(&(to, id));
                    self.inv.acknowledged_is_durable(self.queue.now(), to, from, id, durable);
                }
                if let Some(q) = self.sites[to as usize].d.outbox.get_mut(&from) {
                    let before = q.len();
                    q.retain(|e| !acked.contains(&e.env.id));
                    self.undelivered -= before - q.len();
                }
            }
            if let Some(q) = self.sites[to as usize].d.outbox.get_mut(&from) {
                reply = take_batch(q, &mut self.counters);
            }
            self.counters.envelopes += reply.len() as u64;
        }
        let mut bytes = 2 + settled.len() as u64 * 2;
        for e in &reply {
            bytes += varint_len(e.bytes) + e.bytes;
        }
        self.counters.control_bytes += bytes;
        if poll && batch.is_empty() && acks.is_empty() && reply.is_empty() {
            self.counters.empty_polls += 1;
            self.counters.empty_poll_bytes += request_bytes + bytes;
        }
        if let Some(r) = self.requests.get_mut(&req) {
            r.settled = settled;
            r.reply = reply;
        }
        let at = self.transmit(to, from, bytes);
        self.queue.schedule(at, Ev::Respond { req });
    }

    /// A message arrives at `to`: recorded and applied once, whatever the number of copies.
    fn receive_envelope(&mut self, to: u32, from: u32, e: &Env) -> Verdict {
        let now = self.now();
        let site = &mut self.sites[to as usize];
        if site.d.seen.contains(&(from, e.id)) {
            return Verdict::Replayed;
        }
        if expires_at(&e.msg) < ts(now) {
            self.counters.expired += 1;
            return Verdict::Expired;
        }
        site.d.seen.insert((from, e.id));
        let last = site.d.last_accepted.insert(from, e.id);
        self.inv.in_order(now, from, to, last, e.id);
        let kind = msg_kind(&e.msg);
        *self.counters.accepted.entry(kind.label()).or_default() += 1;
        self.record(TraceEvent::Accepted { at: now, from, to, kind, id: e.id });
        if let Message::JobManifest(m) = &*e.msg
            && let Some(at) = self.dispatched_at.remove(&m.job_id)
        {
            let latency = now.saturating_sub(at);
            self.counters.delivery_latency_sum += latency;
            self.counters.delivery_latency_count += 1;
            self.counters.delivery_latency_max = self.counters.delivery_latency_max.max(latency);
        }
        let from_id = self.sites[from as usize].id;
        self.feed(to, Event::Received { from: from_id, message: (*e.msg).clone() });
        Verdict::Accepted
    }

    fn respond(&mut self, req: u64) {
        let Some(r) = self.requests.remove(&req) else { return };
        let (s, p) = (r.from, r.to);
        let site = &self.sites[s as usize];
        let current = site.alive
            && site.inc == r.from_inc
            && site.v.workers.get(&p).is_some_and(|w| w.in_flight == Some(req));
        if !current || !self.on_its_connection(&r) {
            return;
        }
        // Settle the oldest entries, in order. What was acknowledged must be in the receiver's
        // durable record: its id, and for a job manifest the job itself.
        if self.inv.enabled() {
            for (e, &(id, verdict)) in r.batch_kept.iter().zip(&r.settled) {
                if verdict == Verdict::Expired {
                    continue;
                }
                let receiver = &self.sites[p as usize];
                let durable = receiver.d.seen.contains(&(s, id))
                    && match &*e.msg {
                        Message::JobManifest(m) => receiver.core.runner_job(&m.job_id).is_some(),
                        _ => true,
                    };
                self.inv.acknowledged_is_durable(self.queue.now(), s, p, id, durable);
            }
        }
        let settled: HashMap<u64, Verdict> = r.settled.iter().copied().collect();
        let mut refused = Vec::new();
        if let Some(q) = self.sites[s as usize].d.outbox.get_mut(&p) {
            while let Some(&v) = q.front().and_then(|e| settled.get(&e.env.id)) {
                if let Some(e) = q.pop_front()
                    && v == Verdict::Expired
                {
                    refused.push(e.env.msg);
                }
                self.undelivered -= 1;
            }
        }
        // The receiver refused these for good: the sender's core learns it.
        let to = self.sites[p as usize].id;
        for msg in refused {
            let reason = "it expired before it was delivered".to_owned();
            self.feed(s, Event::Refused { to, message: (*msg).clone(), reason });
        }
        if let Some(w) = self.sites[s as usize].v.workers.get_mut(&p) {
            w.in_flight = None;
            w.failures = 0;
        }
        if r.poll {
            for e in &r.reply {
                // Accepted, already had, or expired: either way the owner may drop it.
                self.receive_envelope(s, p, e);
                self.sites[s as usize].v.pending_acks.entry(p).or_default().push(e.id);
            }
        } else {
            self.kicks.push((s, p));
        }
    }

    fn fail_request(&mut self, s: u32, p: u32) {
        let now = self.now();
        let delivery = self.sc.delivery;
        let Some(w) = self.sites[s as usize].v.workers.get_mut(&p) else { return };
        if w.in_flight.take().is_none() {
            return;
        }
        self.counters.requests_failed += 1;
        w.failures = w.failures.saturating_add(1);
        w.timer_gen += 1;
        let (generation, f) = (w.timer_gen, w.failures);
        if delivery == Delivery::Push {
            let backoff = (100 * MS).saturating_mul(1 << f.min(9)).min(MAX_BACKOFF);
            let inc = self.sites[s as usize].inc;
            self.queue
                .schedule(now + backoff, Ev::OutboxTimer { site: s, peer: p, generation, inc });
        }
    }

    // ---- polling -----------------------------------------------------------------------

    fn arm_polls(&mut self, s: u32) {
        let interval = secs(self.sc.node.poll_interval_s).max(MS);
        let inc = self.sites[s as usize].inc;
        let owners: Vec<u32> = self.owners.iter().copied().filter(|&o| o != s).collect();
        for o in owners {
            let mut r =
                Rng::keyed(self.seed, &[K_POLL, u64::from(s), u64::from(o), u64::from(inc)]);
            let phase = r.below(interval);
            self.queue.after(phase, Ev::Poll { site: s, peer: o, inc });
        }
    }

    fn poll(&mut self, s: u32, p: u32, inc: u32) {
        let site = &self.sites[s as usize];
        if !site.alive || site.inc != inc {
            return;
        }
        let interval = secs(self.sc.node.poll_interval_s).max(MS);
        self.queue.after(interval, Ev::Poll { site: s, peer: p, inc });
        if !self.connected(s, p) {
            return;
        }
        let site = &mut self.sites[s as usize];
        let worker = site.v.workers.entry(p).or_default();
        if worker.in_flight.is_some() {
            return;
        }
        let batch = match site.d.outbox.get_mut(&p) {
            Some(q) => take_batch(q, &mut self.counters),
            None => Vec::new(),
        };
        let acks = site.v.pending_acks.remove(&p).unwrap_or_default();
        let req = self.next_req;
        self.next_req += 1;
        worker.in_flight = Some(req);
        self.counters.polls += 1;
        self.send_request(s, p, req, true, batch, acks);
    }

    // ---- owners: workflows -------------------------------------------------------------

    fn submit(&mut self, wf: usize) {
        let owner = self.wfs[wf].owner;
        if !self.sites[owner as usize].alive {
            // The researcher submits again once the owner is back.
            self.queue.after(10 * SEC, Ev::Submit { wf });
            return;
        }
        self.submits_pending -= 1;
        let now = self.now();
        self.wfs[wf].outcome.submitted_at = now;
        let cfg = self.sc.workflow[self.wfs[wf].cfg].clone();
        let manifest = self.manifest(wf, owner, &cfg);
        let id = manifest.workflow_id;
        let cmds = self.sites[owner as usize].core.handle(ts(now), Event::Submit { manifest });
        let refused = cmds.iter().find_map(|c| match c {
            Command::Notify(Notice::Refused(e)) => Some(e.to_string()),
            _ => None,
        });
        if let Some(e) = refused {
            let o = &mut self.wfs[wf].outcome;
            o.state = Some(WorkflowState::Failed);
            o.reason = Some(format!("not planned: {e}"));
            o.ended_at = Some(now);
            self.last_end = self.last_end.max(now);
            return;
        }
        self.wfs[wf].outcome.jobs =
            self.sites[owner as usize].core.workflow(&id).map_or(0, |w| w.jobs.len());
        self.wf_index.insert(id, wf);
        self.wfs[wf].id = Some(id);
        self.open_workflows += 1;
        self.carry_out(owner, cmds, false);
        self.drain();
    }

    /// The workflow manifest a researcher at `owner` would write for `cfg`.
    fn manifest(&mut self, wf: usize, owner: u32, cfg: &WorkflowConfig) -> WorkflowManifest {
        let mut r = Rng::keyed(self.seed, &[K_WORKFLOW, wf as u64]);
        let workflow_id = WorkflowId::from_bytes(r.bytes16());
        let spec = |name: String, runner: RunnerSelector, inputs: Vec<String>| JobSpec {
            name,
            runner,
            dataset: None,
            processing: Processing::Batch,
            work: Work::Container(ContainerWork {
                image: ImageDigest(Sha256Digest::of(b"kaapana/federated-statistics:1.0")),
                command: vec!["/bin/stats".to_owned()],
                env: Vec::new(),
            }),
            limits: ResourceLimits::default(),
            timeout_secs: 3600,
            inputs,
            max_retries: cfg.max_retries,
        };
        let query = |dataset: String, pick: Pick| CapabilityQuery {
            dataset: Some(dataset),
            gpu: cfg.gpu,
            min_cpu_millis: cfg.min_cpu_millis,
            min_memory_bytes: 0,
            pick,
        };
        let mut jobs = Vec::new();
        let mut rounds = None;
        let name;
        match cfg.kind {
            WorkflowKind::Statistics => {
                name = "federated-statistics".to_owned();
                let regions = self.sc.sites.div_ceil(self.sc.site.region_size);
                let region_size = self.sc.site.region_size;
                let cands = self.sites[owner as usize].core.candidates();
                // The regions where something matches (a researcher would leave out the rest).
                let queries: Vec<CapabilityQuery> = (0..regions)
                    .map(|k| query(format!("{}-r{k}", cfg.dataset), Pick::All))
                    .collect();
                let mut matched = vec![false; regions as usize];
                for c in cands.iter() {
                    let Some(&i) = self.index.get(&c.instance) else { continue };
                    let k = region_of(i, region_size) as usize;
                    if !matched[k] && c.matches(&queries[k]) {
                        matched[k] = true;
                    }
                }
                let mut used: Vec<u32> = (0..regions).filter(|&k| matched[k as usize]).collect();
                if used.is_empty() {
                    used.push(0); // planning then says why nothing matches
                }
                let staged = used.len() > 1;
                let mut finals = Vec::new();
                for k in used {
                    let q = query(format!("{}-r{k}", cfg.dataset), Pick::All);
                    let stats = if staged { format!("stats-r{k}") } else { "stats".to_owned() };
                    jobs.push(spec(stats.clone(), RunnerSelector::Query(q), Vec::new()));
                    if staged {
                        let partial = format!("partial-r{k}");
                        jobs.push(spec(partial.clone(), RunnerSelector::Owner, vec![stats]));
                        finals.push(partial);
                    } else {
                        finals.push(stats);
                    }
                }
                jobs.push(spec("aggregate".to_owned(), RunnerSelector::Owner, finals));
            }
            WorkflowKind::Best => {
                name = "train-best".to_owned();
                let cohorts = self.sc.site.cohorts.max(1) as usize;
                let dataset = cfg.dataset.replace("{i}", &(wf % cohorts).to_string());
                let q = query(dataset, Pick::Best);

                jobs.push(spec("train".to_owned(), RunnerSelector::Query(q), Vec::new()));
                jobs.push(spec(
                    "report".to_owned(),
                    RunnerSelector::Owner,
                    vec!["train".to_owned()],
                ));
            }
            WorkflowKind::Training => {
                name = "federated-training".to_owned();
                let q = query(format!("{}-r0", cfg.dataset), Pick::All);
                // The quorum as a fraction of the sites the query matches now.
                let matching = self.sites[owner as usize]
                    .core
                    .candidates()
                    .iter()
                    .filter(|c| c.matches(&q))
                    .count();
                rounds = Some(Rounds {
                    rounds: cfg.rounds,
                    min_sites: cfg.min_sites.resolve(matching),
                    round_deadline_secs: cfg.round_deadline_s.round() as u32,
                    late: cfg.late.updates(),
                    train: "train".to_owned(),
                    aggregate: "aggregate".to_owned(),
                    resume: None,
                });
                jobs.push(spec("train".to_owned(), RunnerSelector::Query(q), Vec::new()));
                jobs.push(spec(
                    "aggregate".to_owned(),
                    RunnerSelector::Owner,
                    vec!["train".to_owned()],
                ));
            }
        }
        WorkflowManifest {
            header: Header::new(ts(self.now()), LONG_LIFETIME),
            workflow_id,
            owner: self.sites[owner as usize].id,
            name,
            jobs,
            rounds,
        }
    }

    // ---- the cores ---------------------------------------------------------------------

    /// Gives owner `o`'s core every site's ad (its own through `OwnCapabilities`), as the
    /// daemon restores the ads it stored.
    fn restore_ads(&mut self, o: u32) {
        let own = self.ad(o, o);
        for i in 0..self.sc.sites {
            if i != o {
                let ad = self.ad(o, i);
                let id = self.sites[i as usize].id;
                self.sites[o as usize].core.restore_capabilities(id, ad);
            }
        }
        self.feed(o, Event::OwnCapabilities(Box::new(own)));
    }

    /// Site `i`'s capability ad as owner `o` receives it (item tokens are per owner).
    fn ad(&self, o: u32, i: u32) -> CapabilityAd {
        let sc = &self.sc;
        let a = &self.attrs[i as usize];
        let mut datasets = Vec::new();
        if a.dataset {
            let region = region_of(i, sc.site.region_size);
            let tokens = (0..a.items)
                .map(|k| {
                    ItemToken(
                        Rng::keyed(self.seed, &[K_TOKEN, u64::from(o), u64::from(i), k]).bytes32(),
                    )
                })
                .collect();
            datasets.push(DatasetSummary {
                name: format!("{}-r{region}", sc.site.dataset),
                items: a.items,
                bytes: a.items * 200 * 1024 * 1024,
                tokens,
                modalities: Vec::new(),
            });
        }
        if sc.site.cohorts > 0 {
            datasets.push(DatasetSummary {
                name: format!("cohort-{}", i % sc.site.cohorts),
                items: a.items,
                bytes: a.items * 200 * 1024 * 1024,
                tokens: Vec::new(),
                modalities: Vec::new(),
            });
        }
        CapabilityAd {
            header: Header::new(ts(0), LONG_LIFETIME),
            sequence: 1,
            instance_name: site_name(i),
            node_version: "0.1.0".to_owned(),
            executors: vec![ExecutorKind::Containerd],
            allowed_images: Vec::new(),
            allowed_workflows: NameScope::Any,
            datasets,
            resources: Resources {
                cpu_millis: a.cpu,
                memory_bytes: u64::from(a.cpu) * 4 * 1024 * 1024,
                gpus: if a.gpu {
                    vec![Gpu { model: "A100".to_owned(), memory_bytes: 40 << 30 }]
                } else {
                    Vec::new()
                },
            },
        }
    }

    /// Feeds `event` to site `s`'s core now and carries out its commands; events a command
    /// causes are fed after it, in order.
    fn feed(&mut self, s: u32, event: Event) {
        self.pending.push_back((s, event));
        self.drain();
    }

    fn drain(&mut self) {
        if self.feeding {
            return;
        }
        self.feeding = true;
        while let Some((s, event)) = self.pending.pop_front() {
            if !self.sites[s as usize].alive {
                continue;
            }
            let check = matches!(event, Event::TimerFired(_));
            let now = ts(self.now());
            let cmds = self.sites[s as usize].core.handle(now, event);
            self.carry_out(s, cmds, check);
        }
        self.feeding = false;
    }

    /// Carries out a core's commands, in order: the I/O the daemon does.
    fn carry_out(&mut self, s: u32, cmds: Vec<Command>, runner_check: bool) {
        let now = self.now();
        if runner_check {
            // The core's value is the durable record; only the workflows a lost-runner check
            // changed (their own record or any of their jobs') are counted.
            let changed: BTreeSet<_> = cmds
                .iter()
                .filter_map(|c| match c {
                    Command::Persist(
                        Record::Workflow(w) | Record::WorkflowJob { workflow: w, .. },
                    ) => Some(*w),
                    _ => None,
                })
                .collect();
            self.counters.runner_lost_events += u64::try_from(changed.len()).unwrap_or(u64::MAX);
        }
        for cmd in cmds {
            match cmd {
                Command::Send { to, message } => {
                    if let Some(&r) = self.index.get(&to) {
                        self.enqueue(s, r, message);
                    }
                }
                Command::StartJob(m) => {
                    let job = m.job_id;
                    let delay = {
                        let mut r = self.job_rng(&job, 1);
                        secs(self.sc.site.executor_start_s.sample(&mut r))
                    };
                    let inc = self.sites[s as usize].inc;
                    self.queue.schedule(now + delay, Ev::ExecStart { site: s, job, inc });
                }
                Command::StopJob(job) => {
                    self.sites[s as usize].containers.remove(&job);
                }
                Command::DeliverResult { job, exit } => self.deliver_result(s, &job, exit),
                Command::SetTimer { timer, at } => self.set_timer(s, timer, at),
                Command::Notify(notice) => self.notice(s, notice),
                _ => {}
            }
        }
    }

    fn set_timer(&mut self, s: u32, timer: Timer, at: Timestamp) {
        let at = micros(at).max(self.now());
        self.next_timer += 1;
        let generation = self.next_timer;
        let site = &mut self.sites[s as usize];
        let inc = site.inc;
        match timer {
            Timer::RunnerCheck(peer) => {
                let Some(&p) = self.index.get(&peer) else { return };
                site.v.timers.insert(p, generation);
                self.queue.schedule(at, Ev::RunnerCheck { site: s, peer: p, generation, inc });
            }
            Timer::RoundDeadline(workflow) => {
                site.v.round_timers.insert(workflow, generation);
                let ev = Ev::RoundDeadline { site: s, workflow, generation, inc };
                self.queue.schedule(at, ev);
            }
            _ => {}
        }
    }

    fn notice(&mut self, s: u32, notice: Notice) {
        match notice {
            Notice::JobDispatched { job } => {
                self.counters.dispatches += 1;
                if job.runner != self.sites[s as usize].id {
                    self.dispatched_at.insert(job.job_id, self.now());
                }
                if self.inv.enabled() {
                    self.check_training_dispatch(s, &job);
                }
            }
            Notice::WorkflowEnded { workflow, state, reason } => {
                self.ended(s, workflow, state, reason);
            }
            Notice::Refused(SiteError::Transition(_) | SiteError::NoSuchJob(_)) => {
                self.counters.transition_errors += 1;
            }
            _ => {}
        }
    }

    /// The rounds of a training at owner `s` allow the dispatch of `job`.
    fn check_training_dispatch(&mut self, s: u32, job: &JobManifest) {
        let now = self.now();
        let site = &self.sites[s as usize];
        let Some(w) = site.core.workflow(&job.workflow_id) else { return };
        if w.training.is_some() {
            let stored = |id: &JobId| site.d.stored_results.contains_key(id);
            self.inv.training_dispatch(now, ts(now), w, job, stored);
        }
    }

    fn ended(
        &mut self,
        owner: u32,
        workflow_id: WorkflowId,
        state: WorkflowState,
        reason: Option<String>,
    ) {
        let now = self.now();
        self.inv.ended_with_reason(now, state, reason.as_deref());
        let Some(&i) = self.wf_index.get(&workflow_id) else { return };
        let w = self.sites[owner as usize].core.workflow(&workflow_id);
        let (jobs, retries) =
            w.map_or((0, 0), |w| (w.jobs.len(), w.jobs.iter().map(|j| u64::from(j.attempt)).sum()));
        if state == WorkflowState::Finished
            && let Some(w) = w
        {
            if w.training.is_some() {
                // Late jobs were dropped (failed): what must be done is what the rounds used.
                self.inv.training_finished(now, w);
            } else {
                let all_done = w.jobs.iter().all(|j| j.is_done());
                self.inv.finished_means_done(now, all_done);
            }
        }
        let o = &mut self.wfs[i].outcome;
        if o.state.is_none() {
            self.open_workflows = self.open_workflows.saturating_sub(1);
        }
        o.state = Some(state);
        o.reason.clone_from(&reason);
        o.ended_at = Some(now);
        o.jobs = jobs;
        o.retries = retries;
        self.last_end = self.last_end.max(now);
        self.record(TraceEvent::WorkflowEnded { at: now, owner, state, reason });
    }

    // ---- runners: jobs -----------------------------------------------------------------

    fn job_rng(&self, job: &JobId, what: u64) -> Rng {
        let [a, b] = job_keys(job);
        Rng::keyed(self.seed, &[K_JOB, a, b, what])
    }

    /// The workflow configuration a runner job belongs to.
    fn job_cfg(&self, s: u32, job: &JobId) -> Option<&WorkflowConfig> {
        let rec = self.sites[s as usize].core.runner_job(job)?;
        let &i = self.wf_index.get(&rec.job.workflow_id)?;
        self.sc.workflow.get(self.wfs.get(i)?.cfg)
    }

    fn result_size(&self, s: u32, job: &JobId) -> u64 {
        let kib = self.job_cfg(s, job).map_or(16.0, |c| {
            let mut r = self.job_rng(job, 2);
            c.result_kib.sample(&mut r)
        });
        ((kib * 1024.0) as u64).max(512)
    }

    fn exec_start(&mut self, s: u32, job: JobId, inc: u32) {
        let now = self.now();
        let site = &self.sites[s as usize];
        if !site.alive || site.inc != inc {
            return;
        }
        let Some(rec) = site.core.runner_job(&job) else { return };
        if rec.job.state != JobState::Scheduled {
            return;
        }
        let attempt = rec.job.attempt;
        // Site jobs read a dataset; aggregations and reports at the owner read results.
        let aggregation = rec.manifest.dataset.is_none();
        let inputs = rec.manifest.inputs.len();
        let name = site.name.clone();
        let mut r = self.job_rng(&job, 3);
        if r.chance(self.sc.site.executor_failure) {
            let reason = format!("image could not be pulled at {name} (simulated)");
            self.feed(s, Event::Executor { job, outcome: Outcome::Failed(reason) });
            return;
        }
        self.check_inputs(s, &job);
        let max_retries = self.job_cfg(s, &job).map_or(0, |c| c.max_retries);
        self.inv.started_once(now, s, job, attempt, max_retries);
        self.counters.executions += 1;
        self.record(TraceEvent::Started { at: now, site: s, job });
        let duration = {
            let mut r = self.job_rng(&job, 4);
            match self.job_cfg(s, &job) {
                Some(c) if aggregation => {
                    c.aggregate_job_s.sample(&mut r)
                        + c.aggregate_per_input_ms / 1000.0 * inputs as f64
                }
                Some(c) if c.kind == WorkflowKind::Training && self.straggler(s, c) => {
                    c.straggler_job_s.sample(&mut r)
                }
                Some(c) => c.site_job_s.sample(&mut r),
                None => 1.0,
            }
        };
        let ends_at = now + secs(duration).max(MS);
        self.sites[s as usize].containers.insert(job, Container { ends_at });
        self.feed(s, Event::Executor { job, outcome: Outcome::Started });
        self.queue.schedule(ends_at, Ev::ExecExit { site: s, job, inc });
    }

    /// Whether site `s` is one of a training's stragglers: drawn once per site, so that the
    /// stragglers at a smaller fraction are among those at every larger one.
    fn straggler(&self, s: u32, cfg: &WorkflowConfig) -> bool {
        Rng::keyed(self.seed, &[K_STRAGGLER, u64::from(s)]).chance(cfg.straggler_fraction)
    }

    /// No job starts before every job of every step it reads from is done at the owner.
    fn check_inputs(&mut self, s: u32, job: &JobId) {
        if !self.inv.enabled() {
            return;
        }
        let now = self.now();
        let Some((name, missing)) = self.inputs_missing(s, job) else { return };
        self.inv.inputs_done(now, &name, missing);
    }

    /// The job's name and, if it may not start yet, why.
    fn inputs_missing(&self, s: u32, job: &JobId) -> Option<(String, Option<String>)> {
        let m = &self.sites[s as usize].core.runner_job(job)?.manifest;
        let &owner = self.index.get(&m.owner)?;
        let site = &self.sites[owner as usize];
        let w = site.core.workflow(&m.workflow_id)?;
        let job = w.job(&m.job_id)?;
        let step = w.steps.get(job.step)?;
        let mut upstream = 0usize;
        let mut missing = None;
        for &i in &step.inputs {
            for j in w.jobs.iter().filter(|j| j.step == i) {
                upstream += 1;
                if !j.is_done() && missing.is_none() {
                    missing = Some(format!("{} is {:?}", j.name, j.state));
                }
            }
        }
        // A training's steps read results that are not of a step they name: the model of the
        // round before (train), the round's updates (aggregate).
        for e in &step.external {
            upstream += 1;
            let done = w.job(&e.job_id).is_none_or(|j| j.is_done() && j.result == Some(e.bundle));
            if !done && missing.is_none() {
                missing = Some(format!("{} is not done with its result", e.job_name));
            }
        }
        for input in &m.inputs {
            if !site.d.stored_results.contains_key(&input.job_id) && missing.is_none() {
                missing = Some(format!("the result of {} is not stored", input.job_name));
            }
        }
        if missing.is_none() && upstream != m.inputs.len() {
            missing = Some(format!("{} inputs listed, {upstream} upstream jobs", m.inputs.len()));
        }
        Some((m.job_name.clone(), missing))
    }

    fn exec_exit(&mut self, s: u32, job: JobId, inc: u32) {
        let site = &self.sites[s as usize];
        if !site.alive || site.inc != inc || !site.containers.contains_key(&job) {
            return;
        }
        self.sites[s as usize].containers.remove(&job);
        let mut r = self.job_rng(&job, 5);
        let exit = if r.chance(self.sc.site.exit_failure) {
            ExitStatus::Exited(1)
        } else {
            ExitStatus::Exited(0)
        };
        if self.sites[s as usize]
            .core
            .runner_job(&job)
            .is_some_and(|r| r.job.state == JobState::Scheduled)
        {
            // A re-attached container that was never reported started.
            self.feed(s, Event::Executor { job, outcome: Outcome::Started });
        }
        self.feed(s, Event::Executor { job, outcome: Outcome::Exited { exit, detail: None } });
    }

    // ---- results -----------------------------------------------------------------------

    /// Packs a job's output and signs its result; the site's own jobs' results are stored at
    /// once, the others are written durably and delivered to their owner.
    fn deliver_result(&mut self, s: u32, job: &RunnerJob, exit: ExitStatus) {
        let size = self.result_size(s, &job.job_id);
        let bundle = BlobRef { digest: Sha256Digest::of(job.job_id.as_bytes()), size };
        let result = result_manifest(job, exit, bundle);
        let Some(&owner) = self.index.get(&job.owner) else { return };
        if owner == s {
            // Its own workflow's job: the bundle is in the local blob store already.
            self.store_result(s, s, result);
            return;
        }
        let id = job.job_id;
        if self.sites[s as usize].d.results.insert(id, Signed { owner, result }).is_none() {
            self.unsent_results += 1;
        }
        self.start_result(s, id);
    }

    /// A result from runner `from` reaches `owner`: stored and reported to the core if the
    /// core takes it (a superseded or foreign one is dropped, but acknowledged).
    fn store_result(&mut self, owner: u32, from: u32, result: ResultManifest) {
        let now = self.now();
        let from_id = self.sites[from as usize].id;
        let site = &mut self.sites[owner as usize];
        if site.core.expects_result(&result, &from_id) != Expected::Yes {
            return;
        }
        site.d.stored_results.insert(result.job_id, result.bundle);
        // A training's update: the daemon reads the bundle's `samples` file; here the job
        // trained on the items its site advertises, one update in ten on fewer of them (some
        // failed to load).
        let samples = site.core.is_update(&result.job_id).then(|| {
            let items = self.attrs[from as usize].items.max(1);
            let mut r = self.job_rng(&result.job_id, 6);
            if r.chance(0.1) { 1 + r.below(items) } else { items }
        });
        self.record(TraceEvent::ResultStored { at: now, from, job: result.job_id });
        self.feed(owner, Event::ResultStored { from: from_id, result, samples });
    }

    fn start_result(&mut self, s: u32, job: JobId) {
        let site = &mut self.sites[s as usize];
        if !site.d.results.contains_key(&job) || site.v.transfers.contains_key(&job) {
            return;
        }
        site.v.transfers.insert(job, Transfer::default());
        self.result_try(s, job);
    }

    fn result_try(&mut self, s: u32, job: JobId) {
        let Some(signed) = self.sites[s as usize].d.results.get(&job) else {
            self.sites[s as usize].v.transfers.remove(&job);
            return;
        };
        let owner = signed.owner;
        let bytes = signed.result.bundle.size
            + postcard_size(&signed.result) as u64
            + ENVELOPE_OVERHEAD as u64;
        let inc = self.sites[s as usize].inc;
        if !self.connected(s, owner) {
            self.result_failed(s, job);
            return;
        }
        let Some(t) = self.sites[s as usize].v.transfers.get_mut(&job) else { return };
        t.attempt += 1;
        let attempt = t.attempt;
        self.counters.result_transfers += 1;
        self.counters.result_bytes += bytes;
        let epoch = self.links.get(&key(s, owner)).map_or(0, |l| l.epoch);
        let at = self.transmit_bulk(s, owner, bytes);
        self.queue.schedule(at, Ev::ResultArrive { site: s, job, inc, attempt, epoch });
    }

    fn result_failed(&mut self, s: u32, job: JobId) {
        let now = self.now();
        let inc = self.sites[s as usize].inc;
        let Some(t) = self.sites[s as usize].v.transfers.get_mut(&job) else { return };
        t.failures += 1;
        let backoff = (200 * MS * (1u64 << t.failures.min(7))).min(30 * SEC);
        self.queue.schedule(now + backoff, Ev::ResultTry { site: s, job, inc });
    }

    fn transfer_current(
        &self,
        s: u32,
        job: &JobId,
        inc: u32,
        attempt: u64,
        epoch: u32,
    ) -> Option<u32> {
        let site = &self.sites[s as usize];
        if !site.alive || site.inc != inc {
            return None;
        }
        if site.v.transfers.get(job).is_none_or(|t| t.attempt != attempt) {
            return None;
        }
        let owner = site.d.results.get(job)?.owner;
        let ok = self.links.get(&key(s, owner)).is_some_and(|l| l.up && l.epoch == epoch)
            && self.sites[owner as usize].alive;
        ok.then_some(owner)
    }

    fn result_arrive(&mut self, s: u32, job: JobId, inc: u32, attempt: u64, epoch: u32) {
        let Some(owner) = self.transfer_current(s, &job, inc, attempt, epoch) else {
            if self.sites[s as usize].inc == inc
                && self.sites[s as usize]
                    .v
                    .transfers
                    .get(&job)
                    .is_some_and(|t| t.attempt == attempt)
            {
                self.counters.result_failures += 1;
                self.result_failed(s, job);
            }
            return;
        };
        let Some(signed) = self.sites[s as usize].d.results.get(&job) else { return };
        let result = signed.result.clone();
        self.store_result(owner, s, result);
        let at = self.now() + self.latency(s, owner);
        self.queue.schedule(at, Ev::ResultAcked { site: s, job, inc, attempt, epoch });
    }

    fn result_acked(&mut self, s: u32, job: JobId, inc: u32, attempt: u64, epoch: u32) {
        if self.transfer_current(s, &job, inc, attempt, epoch).is_none() {
            if self.sites[s as usize].inc == inc
                && self.sites[s as usize]
                    .v
                    .transfers
                    .get(&job)
                    .is_some_and(|t| t.attempt == attempt)
            {
                // The owner has it, but we do not know: it is sent again and stored again.
                self.counters.result_failures += 1;
                self.result_failed(s, job);
            }
            return;
        }
        let site = &mut self.sites[s as usize];
        site.v.transfers.remove(&job);
        if site.d.results.remove(&job).is_some() {
            self.unsent_results -= 1;
        }
    }

    // ---- faults ------------------------------------------------------------------------

    fn crash(&mut self, s: u32) {
        let now = self.now();
        let survive = self.sc.site.containers_survive_crash;
        let site = &mut self.sites[s as usize];
        if !site.alive {
            return;
        }
        site.alive = false;
        site.inc += 1;
        site.v = Volatile::default();
        if !survive {
            site.containers.clear();
        }
        self.counters.crashes += 1;
        self.record(TraceEvent::Site { at: now, site: s, up: false });
        for p in self.adj[s as usize].clone() {
            self.refresh_link(s, p, false);
        }
    }

    fn restart(&mut self, s: u32) {
        let now = self.now();
        let site = &mut self.sites[s as usize];
        if site.alive {
            return;
        }
        site.alive = true;
        site.inc += 1;
        // The daemon loads its records and builds its core afresh: every peer out of reach
        // until it connects.
        let old = &site.core;
        let core = Core::new(
            site.id,
            site.name.clone(),
            self.config,
            old.registry().clone(),
            old.workflows().cloned().collect::<Vec<Workflow>>(),
            old.runner_jobs().cloned().collect::<Vec<_>>(),
            ts(now),
        );
        site.core = core;
        self.record(TraceEvent::Site { at: now, site: s, up: true });
        self.feed(s, Event::Started);
        if self.owners.contains(&s) {
            self.restore_ads(s);
        }
        for p in self.adj[s as usize].clone() {
            self.refresh_link(s, p, true);
        }
        self.recover(s);
        if self.sc.delivery == Delivery::Poll {
            self.arm_polls(s);
        }
        let peers: Vec<u32> = self.sites[s as usize].d.outbox.keys().copied().collect();
        if self.sc.delivery == Delivery::Push {
            for p in peers {
                self.kicks.push((s, p));
            }
        }
    }

    /// After a restart: signed results are sent again; scheduled jobs are started (again:
    /// they never ran); running jobs are re-attached to their containers or reported failed
    /// (kaapana-node's recovery).
    fn recover(&mut self, s: u32) {
        let now = self.now();
        let inc = self.sites[s as usize].inc;
        let unsent: Vec<JobId> = self.sites[s as usize].d.results.keys().copied().collect();
        for job in unsent {
            self.start_result(s, job);
        }
        let jobs: Vec<(JobId, JobState)> = self.sites[s as usize]
            .core
            .runner_jobs()
            .map(|r| (r.job.job_id, r.job.state))
            .collect();
        for (job, state) in jobs {
            let held = self.sites[s as usize].containers.get(&job).copied();
            match (state, held) {
                (JobState::Scheduled, None) => {
                    self.queue.schedule(now, Ev::ExecStart { site: s, job, inc });
                }
                (JobState::Scheduled | JobState::Running, Some(c)) => {
                    self.queue.schedule(c.ends_at.max(now), Ev::ExecExit { site: s, job, inc });
                }
                (JobState::Running, None) => {
                    let reason = "the node restarted and the job's container was gone".to_owned();
                    self.feed(s, Event::Executor { job, outcome: Outcome::Failed(reason) });
                }
                _ => {}
            }
        }
    }

    fn partition(&mut self, p: usize, start: bool) {
        let members = self.partitions[p].clone();
        let bit = 1u64 << p;
        for &s in &members {
            if start {
                self.cut[s as usize] |= bit;
            } else {
                self.cut[s as usize] &= !bit;
            }
        }
        for &s in &members {
            for q in self.adj[s as usize].clone() {
                self.refresh_link(s, q, false);
            }
        }
    }
}

/// The oldest entries of an outbox queue, as one request takes them.
fn take_batch(queue: &mut VecDeque<OutEntry>, counters: &mut Counters) -> Vec<Env> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for e in queue.iter_mut() {
        if out.len() >= MAX_BATCH || (!out.is_empty() && bytes + e.env.bytes > BATCH_BYTES) {
            break;
        }
        bytes += e.env.bytes;
        e.sends += 1;
        if e.sends > 1 {
            counters.envelopes_resent += 1;
        }
        out.push(e.env.clone());
    }
    out
}

/// The result manifest a runner signs for a job that ended with `exit`.
fn result_manifest(job: &RunnerJob, exit: ExitStatus, bundle: BlobRef) -> ResultManifest {
    let at = job.finished_at.unwrap_or(job.received_at);
    ResultManifest {
        header: Header::new(at, LONG_LIFETIME),
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        attempt: job.attempt,
        exit,
        bundle,
        log: None,
        timings: kaapana_protocol::JobTimings {
            received_at: job.received_at,
            started_at: job.started_at.unwrap_or(job.received_at),
            finished_at: at,
        },
    }
}
