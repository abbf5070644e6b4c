//! N federation [`Site`]s driven in memory, in virtual time, through random workflows and
//! random faults (issue 13).
//!
//! The driver here does what `kaapana-node` does with a site's commands, and nothing more:
//!
//! - `Persist` records are its durable state, together with the outbox (the `Send`s of the
//!   same call), the replay window of message ids it has applied, the results it signed and
//!   the owner has not confirmed yet, and the peers' capability ads it verified;
//! - every ordered pair of sites has one FIFO outbox queue. A message leaves it only when the
//!   receiver acknowledges it: a lost transfer is a broken connection (both ends get
//!   `PeerDisconnected`; the message stays queued and goes again after the reconnect), and a
//!   lost acknowledgement sends the message again, which the receiver's replay window drops
//!   (or, in cases without the window, the site itself must ignore: the module docs of
//!   `site.rs` promise that replaying a message is harmless);
//! - `StartJob` creates a container; it starts (`Outcome::Started`) and ends
//!   (`Outcome::Exited`) or fails (`Outcome::Failed`, retryable) in later steps. `StopJob`
//!   kills it;
//! - `DeliverResult` signs a result; it is transferred to the owner when both are up and
//!   connected, checked with `expects_result` there and stored (`Event::ResultStored`) when
//!   expected, then confirmed;
//! - timers fire at their time; a later `SetTimer` replaces the earlier one;
//! - partitions cut every link across a random split of the sites, on both ends;
//! - a crash drops the `Site`, its timers and (unless the case lets containers survive) its
//!   containers, and sometimes falls right after a call's durable commit, before its other
//!   effects (containers started or stopped, results signed, timers armed). The restart
//!   builds the site from the durable state alone (`Site::new` with the last persisted
//!   workflows and runner jobs, the registry, the stored ads, `Event::Started`, its own ad)
//!   and recovers like the node does: a job scheduled without a container starts; a
//!   running job whose container is gone fails with "the node restarted and the job's
//!   container was gone"; a surviving container is re-attached (its start and end are
//!   reported); a container of a job that has ended is killed; a result that ended but was
//!   never confirmed is delivered again (signed anew if the crash came before it was).
//!
//! After a random number of chaotic steps every site comes up and every link heals, and the
//! driver runs without faults until nothing is left to do. What is checked is written at the
//! checks:
//!
//! 1. every submitted workflow ends (finished, failed or cancelled) within [`HEAL_BOUND`] of
//!    virtual time after the heal, and then nothing is left: no container runs, every job at
//!    every runner has ended ([`run_case`]);
//! 2. a job id never runs twice, and two attempts of one job run at once only when the older
//!    one was replaced, and cancelled, after its runner was declared lost
//!    ([`World::container_started`]); a site that is up holds no container of a job that has
//!    ended there, so a Cancel stops it ([`World::check_runner_side`]);
//! 3. the owner expects (`Expected::Yes`) only results of the current attempt from its
//!    runner, a result it does not expect changes nothing even when fed, and every result a
//!    workflow holds is its job's current attempt's, made by a container of that attempt that
//!    exited 0 ([`World::transfer_result`], [`World::observe`]);
//! 4. a finished workflow has every job finished with its result stored, and a final state is
//!    never left ([`World::observe`]).
//!
//! `PROPTEST_CASES` sets the number of cases (256 by default); `SITES_STATS=1` prints what
//! each case exercised, `SITES_TRACE=1` every step and command (with `--nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use kaapana_federation::{
    AllowList, Candidate, Command, Event, Execution, Expected, Message, Notice, Outcome, Policy,
    Record, RegisteredInstance, Registry, RunnerJob, RunnerRecord, Site, SiteConfig, Timer,
    UpdateError, Workflow, WorkflowHeader, WorkflowJob, WorkflowState,
};
use kaapana_protocol::{
    BlobRef, CapabilityAd, CapabilityQuery, ContainerWork, DatasetSummary, ExitStatus, Gpu, Header,
    ImageDigest, InstanceId, ItemToken, JobId, JobManifest, JobSpec, JobState, JobTimings,
    JobUpdate, NameScope, Pick, Processing, ResourceLimits, Resources, ResultManifest,
    RunnerSelector, Sha256Digest, Timestamp, Work, WorkflowId, WorkflowManifest,
};
use proptest::prelude::*;

const DATASET: &str = "lung-ct";
const WORKFLOW: &str = "random-dag";
const LOST_AFTER: Duration = Duration::from_secs(30);
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
const LONG: Duration = Duration::from_secs(30 * 24 * 3600);
/// Virtual milliseconds of the Unix epoch the runs start at.
const BASE: u64 = 1_800_000_000_000;

fn config() -> SiteConfig {
    SiteConfig {
        job_lifetime: LONG,
        message_lifetime: LONG,
        runner_lost_after: LOST_AFTER,
        runner_give_up_after: GIVE_UP_AFTER,
    }
}

fn id(n: usize) -> InstanceId {
    let mut bytes = vec![0x12, 0x20];
    bytes.extend_from_slice(&[u8::try_from(n).unwrap() + 1; 32]);
    InstanceId::from_bytes(&bytes).unwrap()
}

fn name(n: usize) -> String {
    format!("site-{n}")
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(BASE + ms)
}

fn token(site: usize, k: usize) -> ItemToken {
    let mut b = [u8::try_from(site).unwrap(); 32];
    b[1] = u8::try_from(k).unwrap();
    ItemToken(b)
}

/// The bundle a job's container leaves: one per job id, so a stored bundle names the attempt
/// that made it.
fn bundle_of(job: &JobId) -> BlobRef {
    BlobRef { digest: Sha256Digest::of(job.as_bytes()), size: 1 }
}

fn allow_all() -> Policy {
    Policy {
        allowed_workflows: AllowList::Any,
        allowed_datasets: AllowList::Any,
        execution: Execution::Automatic,
        share_logs: true,
    }
}

// ---- what a case is made of ----------------------------------------------------------------

#[derive(Clone, Debug)]
struct SiteGen {
    cpu: u32,
    gpu: bool,
    items: usize,
}

#[derive(Clone, Debug)]
enum Sel {
    Owner,
    Instance(usize),
    Query { gpu: bool, min_cpu: u32, best: bool },
}

#[derive(Clone, Debug)]
struct StepGen {
    sel: Sel,
    single_file: Option<u32>,
    inputs: Vec<usize>,
    retries: u32,
}

#[derive(Clone, Debug)]
struct WfGen {
    owner: usize,
    steps: Vec<StepGen>,
    /// The chaotic step after which it is submitted.
    submit_after: usize,
}

/// Fault rates in per mille, and switches.
#[derive(Clone, Debug)]
struct Faults {
    /// Weight of losing a transfer (a broken link) against a delivery's 100.
    loss: u32,
    /// Chance that an acknowledgement is lost (the message or result goes again).
    dup: u32,
    /// Weight of a crash per site up.
    crash: u32,
    /// Chance that a crash follows a call right after its durable commit.
    mid_crash: u32,
    /// Weight of a new partition.
    partition: u32,
    /// Chance that a container fails to start or dies (retryable).
    exec_fail: u32,
    /// Chance that a container exits with a non-zero status (final).
    exit_fail: u32,
    /// Whether containers survive their node's crash.
    survive: bool,
    /// Whether receivers drop messages they applied before (the node's replay window).
    dedup: bool,
    /// Whether the driver also feeds results the owner does not expect (which must change
    /// nothing).
    bad_results: bool,
    /// Whether users cancel workflows now and then.
    cancel: bool,
}

#[derive(Clone, Debug)]
struct Case {
    sites: Vec<SiteGen>,
    workflows: Vec<WfGen>,
    faults: Faults,
    chaos_steps: usize,
    seed: u64,
}

fn site_gen() -> impl Strategy<Value = SiteGen> {
    (prop_oneof![Just(1000u32), Just(2000), Just(4000)], any::<bool>(), 1usize..=3)
        .prop_map(|(cpu, gpu, items)| SiteGen { cpu, gpu, items })
}

fn step_gen(sites: usize) -> impl Strategy<Value = StepGen> {
    let sel = prop_oneof![
        1 => Just(Sel::Owner),
        1 => (0..sites).prop_map(Sel::Instance),
        3 => (any::<bool>(), prop_oneof![Just(0u32), Just(2000), Just(4000)], any::<bool>())
            .prop_map(|(gpu, min_cpu, best)| Sel::Query { gpu, min_cpu, best }),
    ];
    let processing = prop_oneof![3 => Just(None), 1 => (1u32..3).prop_map(Some)];
    let retries = prop_oneof![Just(0u32), Just(1), Just(2)];
    (sel, processing, proptest::collection::vec(0usize..64, 0..3), retries).prop_map(
        |(sel, single_file, inputs, retries)| StepGen { sel, single_file, inputs, retries },
    )
}

fn faults() -> impl Strategy<Value = Faults> {
    (
        (prop_oneof![Just(0u32), Just(5), Just(20)], prop_oneof![Just(0u32), Just(50), Just(200)]),
        (prop_oneof![Just(0u32), Just(1), Just(2)], prop_oneof![Just(0u32), Just(50)]),
        prop_oneof![Just(0u32), Just(5), Just(15)],
        (prop_oneof![Just(0u32), Just(50), Just(150)], prop_oneof![Just(0u32), Just(20)]),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (loss, dup),
                (crash, mid_crash),
                partition,
                (exec_fail, exit_fail),
                (survive, dedup, bad_results, cancel),
            )| Faults {
                loss,
                dup,
                crash,
                mid_crash,
                partition,
                exec_fail,
                exit_fail,
                survive,
                dedup,
                bad_results,
                cancel,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    proptest::collection::vec(site_gen(), 3..=8).prop_flat_map(|sites| {
        let n = sites.len();
        let wf = (0..n, proptest::collection::vec(step_gen(n), 1..=5), 0usize..400)
            .prop_map(|(owner, steps, submit_after)| WfGen { owner, steps, submit_after });
        (Just(sites), proptest::collection::vec(wf, 1..=4), faults(), 200usize..1200, any::<u64>())
            .prop_map(|(sites, workflows, faults, chaos_steps, seed)| Case {
                sites,
                workflows,
                faults,
                chaos_steps,
                seed,
            })
    })
}

/// xorshift64*: the driver's choices within a case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn per_mille(&mut self, p: u32) -> bool {
        self.below(1000) < u64::from(p)
    }
}

// ---- the driver ----------------------------------------------------------------------------

/// What a node keeps across a crash.
#[derive(Default)]
struct Durable {
    /// Each workflow's own record ([`Record::Workflow`]).
    workflows: BTreeMap<WorkflowId, WorkflowHeader>,
    /// Each workflow's job records ([`Record::WorkflowJob`]), by position.
    workflow_jobs: BTreeMap<(WorkflowId, usize), WorkflowJob>,
    runner_jobs: BTreeMap<JobId, RunnerRecord>,
    /// Results signed and not yet confirmed by their owner.
    pending: BTreeMap<JobId, ResultManifest>,
    /// Results the owner confirmed (stored or refused).
    confirmed: BTreeSet<JobId>,
    /// The replay window: ids of the messages applied here.
    seen: BTreeSet<u64>,
}

impl Durable {
    /// The stored workflows, each put together from its header and its job records.
    fn workflows(&self) -> Vec<Workflow> {
        self.workflows
            .values()
            .map(|h| {
                let id = h.workflow_id;
                let jobs =
                    self.workflow_jobs.range((id, 0)..=(id, usize::MAX)).map(|(_, j)| j.clone());
                Workflow::from_records(h.clone(), jobs.collect()).expect("complete records")
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    FailToStart,
    Exit(ExitStatus),
    DieRunning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    /// Ended while its node was down; reported on the restart (`ran`: it had started).
    Ended {
        ran: bool,
        outcome: Outcome,
    },
}

#[derive(Clone, Debug)]
struct Container {
    manifest: JobManifest,
    plan: Plan,
    phase: Phase,
    /// When its next step (start, end) may come, in virtual ms.
    ready_at: u64,
}

struct Node {
    site: Option<Site>,
    durable: Durable,
    timers: BTreeMap<Timer, u64>,
    containers: BTreeMap<JobId, Container>,
    /// The peers this site was told are connected.
    told: BTreeSet<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Submit(usize),
    Cancel(usize),
    Deliver(usize, usize),
    Lose(usize, usize),
    Relink(usize, usize),
    Container(usize, JobId),
    Result(usize, JobId),
    Timer(usize, Timer),
    Crash(usize),
    Restart(usize),
    Partition,
    Heal,
    Tick,
}

#[derive(Debug, Default)]
struct Stats {
    steps: u64,
    deliveries: u64,
    replays: u64,
    crashes: u64,
    mid_crashes: u64,
    partitions: u64,
    losses: u64,
    lost_replacements: u64,
    overlaps: u64,
    superseded: u64,
    bad_results_fed: u64,
    given_up: u64,
    /// Virtual ms from the heal until every workflow had ended.
    heal_ms: u64,
    finished: u64,
    failed: u64,
    cancelled: u64,
}

struct World {
    n: usize,
    ids: Vec<InstanceId>,
    ads: Vec<CapabilityAd>,
    registries: Vec<Registry>,
    nodes: Vec<Node>,
    outbox: BTreeMap<(usize, usize), VecDeque<(u64, Message)>>,
    next_message: u64,
    /// Partitioned pairs (a < b).
    cut: BTreeSet<(usize, usize)>,
    /// Links broken by a lost transfer (a < b).
    broken: BTreeSet<(usize, usize)>,
    now: u64,
    rng: Rng,
    faults: Faults,
    chaos: bool,
    manifests: Vec<WorkflowManifest>,
    /// The chaotic step after which each workflow is submitted.
    submit_after: Vec<usize>,
    submitted: Vec<bool>,
    // ---- what the checks remember ----
    /// Containers running now, at whichever site, up or down: job → (site, workflow, job
    /// name, attempt).
    running: BTreeMap<JobId, (usize, WorkflowId, String, u32)>,
    /// Job ids whose container has ever started.
    started: BTreeSet<JobId>,
    /// Job ids whose container exited with status 0.
    exited_ok: BTreeSet<JobId>,
    /// Attempts their owner replaced after it declared their runner lost.
    lost_replaced: BTreeSet<JobId>,
    /// Jobs an owner sent a Cancel for.
    cancels_sent: BTreeSet<JobId>,
    /// When every workflow had ended (virtual ms).
    ended_at: u64,
    /// Every workflow's final state, once reached.
    ended: BTreeMap<WorkflowId, WorkflowState>,
    stats: Stats,
}

/// `Err` with the message unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl World {
    fn new(case: &Case) -> Result<Self, String> {
        let n = case.sites.len();
        let ids: Vec<InstanceId> = (0..n).map(id).collect();
        // The last site offers everything, so that every query has a match.
        let ads: Vec<CapabilityAd> = case
            .sites
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let (cpu, gpu) = if k == n - 1 { (4000, true) } else { (s.cpu, s.gpu) };
                CapabilityAd {
                    header: Header::new(ts(0), LONG),
                    sequence: 1,
                    instance_name: name(k),
                    node_version: "0.1.0".to_owned(),
                    executors: vec![],
                    allowed_images: vec![],
                    allowed_workflows: NameScope::Any,
                    datasets: vec![DatasetSummary {
                        name: DATASET.to_owned(),
                        items: s.items as u64,
                        bytes: 1 << 20,
                        tokens: (0..s.items).map(|i| token(k, i)).collect(),
                        modalities: Vec::new(),
                    }],
                    resources: Resources {
                        cpu_millis: cpu,
                        memory_bytes: u64::from(cpu) << 20,
                        gpus: if gpu {
                            vec![Gpu { model: "A100".to_owned(), memory_bytes: 1 << 34 }]
                        } else {
                            vec![]
                        },
                    },
                }
            })
            .collect();
        let registries = (0..n)
            .map(|me| {
                let mut r = Registry::new();
                for k in (0..n).filter(|&k| k != me) {
                    r.add(RegisteredInstance {
                        instance_id: ids[k],
                        name: name(k),
                        certificate_der: vec![],
                        fingerprint: [0; 32],
                        listen_addrs: vec![],
                        certificate_not_after: ts(LONG.as_millis() as u64),
                        registered_at: ts(0),
                        policy: allow_all(),
                    })
                    .unwrap();
                }
                r
            })
            .collect();
        let nodes = (0..n)
            .map(|_| Node {
                site: None,
                durable: Durable::default(),
                timers: BTreeMap::new(),
                containers: BTreeMap::new(),
                told: BTreeSet::new(),
            })
            .collect();
        let manifests =
            case.workflows.iter().enumerate().map(|(w, g)| manifest(w, g, &ids)).collect();
        let mut world = Self {
            n,
            ids,
            ads,
            registries,
            nodes,
            outbox: BTreeMap::new(),
            next_message: 0,
            cut: BTreeSet::new(),
            broken: BTreeSet::new(),
            now: 0,
            rng: Rng(case.seed | 1),
            faults: case.faults.clone(),
            chaos: true,
            manifests,
            submit_after: case.workflows.iter().map(|w| w.submit_after).collect(),
            submitted: vec![false; case.workflows.len()],
            running: BTreeMap::new(),
            started: BTreeSet::new(),
            exited_ok: BTreeSet::new(),
            lost_replaced: BTreeSet::new(),
            cancels_sent: BTreeSet::new(),
            ended_at: u64::MAX,
            ended: BTreeMap::new(),
            stats: Stats::default(),
        };
        // The first start is a restart with nothing stored.
        for s in 0..n {
            world.restart(s)?;
        }
        Ok(world)
    }

    fn up(&self, s: usize) -> bool {
        self.nodes[s].site.is_some()
    }

    fn index_of(&self, i: &InstanceId) -> usize {
        self.ids.iter().position(|x| x == i).expect("a site of the run")
    }

    fn link_up(&self, a: usize, b: usize) -> bool {
        self.up(a)
            && self.up(b)
            && !self.cut.contains(&pair(a, b))
            && !self.broken.contains(&pair(a, b))
    }

    // ---- calls into a site ----

    /// Feeds `event` to site `s` and carries out the commands. `mid`: a crash may follow the
    /// call's durable commit. `strict`: the site must not refuse it (executor reports of
    /// containers the driver holds for jobs that have not ended).
    fn handle(&mut self, s: usize, event: Event, mid: bool, strict: bool) -> Result<(), String> {
        let now = ts(self.now);
        let timer = matches!(event, Event::TimerFired(_));
        let trace = std::env::var_os("SITES_TRACE").is_some();
        let shown = if strict || trace { format!("{event:?}") } else { String::new() };
        let site = self.nodes[s].site.as_mut().expect("handle at a site that is up");
        let before: BTreeMap<WorkflowId, Workflow> =
            site.workflows().map(|w| (w.workflow_id, w.clone())).collect();
        let cmds = site.handle(now, event);
        if trace {
            eprintln!("  site-{s} <- {shown}");
            for c in &cmds {
                match c {
                    Command::Persist(_) | Command::Notify(Notice::WorkflowProgress { .. }) => {}
                    c => eprintln!("    {c:?}"),
                }
            }
        }
        let crash = mid && self.chaos && self.rng.per_mille(self.faults.mid_crash);
        self.observe(s, &before, timer)?;
        self.apply(s, cmds, crash, strict, &shown)?;
        if crash {
            self.stats.mid_crashes += 1;
            self.crash(s)?;
        }
        Ok(())
    }

    /// Carries out one call's commands in their order; `crash`: only the durable part.
    fn apply(
        &mut self,
        s: usize,
        cmds: Vec<Command>,
        crash: bool,
        strict: bool,
        event: &str,
    ) -> Result<(), String> {
        let mut effects = false;
        let persisted = cmds.iter().any(|c| matches!(c, Command::Persist(_)));
        for c in cmds {
            match c {
                Command::Persist(r) => {
                    ensure!(!effects, "site-{s}: a Persist after an effect ({event})");
                    // Persist names the record; its state is the site's after this call.
                    let node = &mut self.nodes[s];
                    let (site, d) =
                        (node.site.as_ref().expect("a site that is up"), &mut node.durable);
                    match r {
                        Record::Workflow(id) => {
                            let w = site.workflow(&id).ok_or("Persist of an unknown workflow")?;
                            d.workflows.insert(id, w.header());
                        }
                        Record::WorkflowJob { workflow, index } => {
                            let w =
                                site.workflow(&workflow).ok_or("Persist of an unknown workflow")?;
                            let j = w.jobs.get(index).ok_or("Persist of an unknown job index")?;
                            d.workflow_jobs.insert((workflow, index), j.clone());
                        }
                        Record::RunnerJob(id) => {
                            let r = site.runner_job(&id).ok_or("Persist of an unknown job")?;
                            d.runner_jobs.insert(id, r.clone());
                        }
                        other => return Err(format!("unknown record {other:?}")),
                    }
                }
                Command::Send { to, message } => {
                    effects = true;
                    let t = self.index_of(&to);
                    ensure!(t != s, "site-{s} sends to itself: {message:?}");
                    // The outbox is committed with the records.
                    if let Message::Cancel(c) = &message {
                        self.cancels_sent.extend(c.job_id);
                    }
                    self.next_message += 1;
                    self.outbox.entry((s, t)).or_default().push_back((self.next_message, message));
                }
                _ if crash => effects = true,
                Command::StartJob(m) => {
                    effects = true;
                    self.create_container(s, *m)?;
                }
                Command::StopJob(job) => {
                    effects = true;
                    self.nodes[s].containers.remove(&job);
                    self.running.remove(&job);
                }
                Command::DeliverResult { job, exit } => {
                    effects = true;
                    let d = &mut self.nodes[s].durable;
                    ensure!(
                        !d.pending.contains_key(&job.job_id) && !d.confirmed.contains(&job.job_id),
                        "site-{s}: a second result for job {}",
                        job.job_id
                    );
                    d.pending.insert(job.job_id, result_manifest(&job, exit));
                }
                Command::SetTimer { timer, at } => {
                    effects = true;
                    self.nodes[s].timers.insert(timer, at.as_millis() - BASE);
                }
                Command::Notify(notice) => {
                    effects = true;
                    if let Notice::JobGivenUp { .. } = &notice {
                        self.stats.given_up += 1;
                    }
                    if strict && let Notice::Refused(e) = &notice {
                        return Err(format!("site-{s} refused {event}: {e}"));
                    }
                }
                other => return Err(format!("unknown command {other:?}")),
            }
        }
        if persisted {
            self.check_durable(s, event)?;
        }
        Ok(())
    }

    /// Checks that the records a site persisted make up its workflows exactly: every change
    /// of a job or of a workflow's own fields was named by a `Persist`.
    fn check_durable(&self, s: usize, event: &str) -> Result<(), String> {
        let node = &self.nodes[s];
        let Some(site) = node.site.as_ref() else { return Ok(()) };
        let stored = node.durable.workflows();
        let live: Vec<&Workflow> = site.workflows().collect();
        ensure!(
            stored.len() == live.len(),
            "site-{s}: {} workflows stored, {} live",
            stored.len(),
            live.len()
        );
        for (st, w) in stored.iter().zip(live) {
            ensure!(
                st == w,
                "site-{s}: the stored records of workflow {} differ from it after {event}",
                w.workflow_id
            );
        }
        Ok(())
    }

    /// Checks an owner's workflows after one of its calls.
    ///
    /// 3 (results): a job's stored result is the bundle of its current attempt (bundles are
    /// per job id), and that attempt's container exited 0 — so no result of a replaced
    /// attempt is ever stored into a workflow. 4: a finished workflow has every job finished
    /// with its result stored. Final states are never left, and nothing changes after them.
    /// Also records which attempts were replaced in a runner check (a timer), i.e. after
    /// their runner was declared lost: the only attempts that may overlap their successor.
    fn observe(
        &mut self,
        s: usize,
        before: &BTreeMap<WorkflowId, Workflow>,
        timer: bool,
    ) -> Result<(), String> {
        let Some(site) = self.nodes[s].site.as_ref() else { return Ok(()) };
        for w in site.workflows() {
            if let Some(b) = before.get(&w.workflow_id) {
                if b.state.is_final() {
                    ensure!(
                        w.state == b.state && w.jobs == b.jobs,
                        "workflow {} changed after it ended {}",
                        w.workflow_id,
                        b.state
                    );
                }
                for (jb, ja) in b.jobs.iter().zip(&w.jobs) {
                    for old in ja.previous.iter().skip(jb.previous.len()) {
                        if timer {
                            self.lost_replaced.insert(*old);
                            self.stats.lost_replacements += 1;
                        }
                    }
                }
            }
            for j in &w.jobs {
                if let Some(r) = j.result {
                    ensure!(
                        r == bundle_of(&j.job_id),
                        "job {} ({}) holds a result that is not its current attempt's",
                        j.name,
                        j.job_id
                    );
                    ensure!(
                        self.exited_ok.contains(&j.job_id),
                        "job {} ({}) holds a result, but no container of it exited 0",
                        j.name,
                        j.job_id
                    );
                }
            }
            if w.state == WorkflowState::Finished {
                for j in &w.jobs {
                    ensure!(
                        j.state == JobState::Finished && j.result.is_some(),
                        "workflow {} finished, but job {} is {:?} with result {:?}",
                        w.workflow_id,
                        j.name,
                        j.state,
                        j.result
                    );
                }
            }
            if w.state.is_final() {
                let first = *self.ended.entry(w.workflow_id).or_insert(w.state);
                ensure!(first == w.state, "workflow {} ended twice", w.workflow_id);
            }
        }
        Ok(())
    }

    // ---- containers ----

    fn create_container(&mut self, s: usize, m: JobManifest) -> Result<(), String> {
        let job = m.job_id;
        ensure!(
            !self.nodes[s].containers.contains_key(&job),
            "site-{s}: StartJob for job {job} whose container exists"
        );
        ensure!(
            !self.started.contains(&job),
            "site-{s}: StartJob for job {job}, which ran already"
        );
        let f = &self.faults;
        let (exec_fail, exit_fail) = (f.exec_fail, f.exit_fail);
        let plan = if self.rng.per_mille(exec_fail) {
            if self.rng.below(2) == 0 { Plan::FailToStart } else { Plan::DieRunning }
        } else if self.rng.per_mille(exit_fail) {
            Plan::Exit(ExitStatus::Exited(3))
        } else {
            Plan::Exit(ExitStatus::Exited(0))
        };
        let ready_at = self.now + self.rng.below(2_000);
        let c = Container { manifest: m, plan, phase: Phase::Created, ready_at };
        self.nodes[s].containers.insert(job, c);
        Ok(())
    }

    /// Check 2, when a container of job `job` starts at site `s`.
    ///
    /// - A job id never runs twice: its container starts at most once, ever (a restart
    ///   starts only containers that never started, and a retry is a new attempt with a new
    ///   id).
    /// - Two attempts of one job (same workflow and job name) run at once only when the
    ///   older one was replaced because the owner declared its runner lost. The core's
    ///   contract permits that and only that: the owner cannot reach a lost runner, so it
    ///   moves the job and queues a Cancel for the old attempt, which may run on at the
    ///   lost runner (a partition, a crash with surviving containers, or a manifest still
    ///   in the outbox that arrives before the Cancel behind it) until that Cancel arrives.
    ///   Every other replacement (an executor failure, a give-up) happens only after the
    ///   old attempt ended or with no new attempt at all, so it can never overlap.
    ///   So the older attempt must be one replaced in a runner check, with a Cancel queued
    ///   for it; [`World::check_runner_side`] checks that the Cancel does stop it.
    fn container_started(&mut self, s: usize, m: &JobManifest) -> Result<(), String> {
        let job = m.job_id;
        ensure!(self.started.insert(job), "job {} ({job}) runs twice", m.job_name);
        for (other, (site, wf, name, attempt)) in &self.running {
            if *wf != m.workflow_id || *name != m.job_name {
                continue;
            }
            let older = if *attempt < m.attempt { *other } else { job };
            ensure!(
                self.lost_replaced.contains(&older) && self.cancels_sent.contains(&older),
                "attempts {attempt} (site-{site}) and {} (site-{s}) of job {} run at once, and \
                 the older one was not replaced (and cancelled) after its runner was lost",
                m.attempt,
                m.job_name
            );
            self.stats.overlaps += 1;
        }
        self.running.insert(job, (s, m.workflow_id, m.job_name.clone(), m.attempt));
        Ok(())
    }

    /// One step of a container's life.
    fn step_container(&mut self, s: usize, job: JobId) -> Result<(), String> {
        let up = self.up(s);
        let Some(c) = self.nodes[s].containers.get(&job).cloned() else { return Ok(()) };
        match c.phase {
            Phase::Created if c.plan == Plan::FailToStart => {
                let outcome = Outcome::Failed("the job's image is missing".to_owned());
                if up {
                    self.nodes[s].containers.remove(&job);
                    self.handle(s, Event::Executor { job, outcome }, true, true)?;
                } else {
                    self.set_phase(s, job, Phase::Ended { ran: false, outcome });
                }
            }
            Phase::Created => {
                self.container_started(s, &c.manifest)?;
                self.set_phase(s, job, Phase::Running);
                // It runs for 1 to 90 s.
                let ends = self.now + 1_000 + self.rng.below(89_000);
                if let Some(c) = self.nodes[s].containers.get_mut(&job) {
                    c.ready_at = ends;
                }
                if up {
                    self.handle(s, Event::Executor { job, outcome: Outcome::Started }, true, true)?;
                }
            }
            Phase::Running => {
                self.running.remove(&job);
                let outcome = match c.plan {
                    Plan::Exit(exit) => {
                        if exit == ExitStatus::Exited(0) {
                            self.exited_ok.insert(job);
                        }
                        Outcome::Exited { exit, detail: None }
                    }
                    _ => Outcome::Failed("the container runtime failed".to_owned()),
                };
                if up {
                    self.nodes[s].containers.remove(&job);
                    self.handle(s, Event::Executor { job, outcome }, true, true)?;
                } else {
                    self.set_phase(s, job, Phase::Ended { ran: true, outcome });
                }
            }
            Phase::Ended { .. } => {}
        }
        Ok(())
    }

    fn set_phase(&mut self, s: usize, job: JobId, phase: Phase) {
        if let Some(c) = self.nodes[s].containers.get_mut(&job) {
            c.phase = phase;
        }
    }

    /// A Cancel does what it says, and a site that is up holds no container of a job that
    /// has ended there (it was killed, or it ended and was reported).
    fn check_runner_side(&self, s: usize) -> Result<(), String> {
        let Some(site) = self.nodes[s].site.as_ref() else { return Ok(()) };
        for (job, c) in &self.nodes[s].containers {
            let state = site.runner_job(job).map(|r| r.job.state);
            ensure!(
                state.is_some_and(|st| !st.is_terminal()),
                "site-{s} still holds the container of job {} ({job}), which is {state:?} there",
                c.manifest.job_name
            );
        }
        Ok(())
    }

    // ---- messages and results ----

    fn deliver(&mut self, a: usize, b: usize) -> Result<(), String> {
        let Some((mid, message)) = self.outbox.get(&(a, b)).and_then(|q| q.front()).cloned() else {
            return Ok(());
        };
        let ack = !(self.chaos && self.rng.per_mille(self.faults.dup));
        let seen = !self.nodes[b].durable.seen.insert(mid);
        if seen {
            self.stats.replays += 1;
        }
        if !(seen && self.faults.dedup) {
            self.stats.deliveries += 1;
            self.handle(b, Event::Received { from: self.ids[a], message }, true, false)?;
        }
        // A receiver that crashed before it answered did not acknowledge.
        if ack && self.up(b) {
            self.outbox.get_mut(&(a, b)).and_then(VecDeque::pop_front);
        }
        self.check_runner_side(b)
    }

    /// Check 3, when a signed result reaches its owner: the owner expects it only for the
    /// current attempt of a job it sent to that runner; a result it does not expect changes
    /// nothing even if a driver stored it (`bad_results`).
    fn transfer_result(&mut self, r: usize, job: JobId) -> Result<(), String> {
        let Some(rm) = self.nodes[r].durable.pending.get(&job).cloned() else { return Ok(()) };
        let owner = self.nodes[r].durable.runner_jobs[&job].job.owner;
        let o = self.index_of(&owner);
        let runner = self.ids[r];
        let site = self.nodes[o].site.as_ref().expect("owner up");
        let expected = site.expects_result(&rm, &runner);
        let before = site.workflow(&rm.workflow_id).cloned();
        if expected == Expected::Yes {
            let w = before.as_ref().expect("a workflow of the owner");
            let current = w.job(&rm.job_id);
            ensure!(
                current.is_some_and(|j| j.runner == runner && j.attempt == rm.attempt),
                "the owner expects the result of job {job} attempt {} from site-{r}, which is \
                 not the current attempt there: {current:?}",
                rm.attempt
            );
        }
        if matches!(expected, Expected::Superseded { .. }) {
            self.stats.superseded += 1;
        }
        let bad = expected != Expected::Yes && self.faults.bad_results && self.rng.below(2) == 0;
        if expected == Expected::Yes || bad {
            if bad {
                self.stats.bad_results_fed += 1;
            }
            self.handle(
                o,
                Event::ResultStored { from: runner, result: rm.clone(), samples: None },
                true,
                false,
            )?;
        }
        if expected != Expected::Yes
            && let Some(site) = self.nodes[o].site.as_ref()
        {
            let after = site.workflow(&rm.workflow_id).cloned();
            ensure!(
                after == before,
                "a result the owner does not expect ({expected:?}) changed workflow {}",
                rm.workflow_id
            );
        }
        let ack = !(self.chaos && self.rng.per_mille(self.faults.dup));
        if ack && self.up(o) {
            let d = &mut self.nodes[r].durable;
            d.pending.remove(&job);
            d.confirmed.insert(job);
        }
        Ok(())
    }

    // ---- connectivity, crashes and restarts ----

    /// Tells every site that is up which of its links changed.
    fn refresh(&mut self) -> Result<(), String> {
        for a in 0..self.n {
            for b in 0..self.n {
                if a == b || !self.up(a) {
                    continue;
                }
                let want = self.link_up(a, b);
                if want == self.nodes[a].told.contains(&b) {
                    continue;
                }
                let peer = self.ids[b];
                if want {
                    self.nodes[a].told.insert(b);
                    self.handle(a, Event::PeerConnected { peer }, false, false)?;
                    // Ads are pushed on connect.
                    let ad = self.ads[b].clone();
                    self.handle(a, Event::Capabilities { from: peer, ad }, false, false)?;
                } else {
                    self.nodes[a].told.remove(&b);
                    self.handle(a, Event::PeerDisconnected { peer }, false, false)?;
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, s: usize) -> Result<(), String> {
        self.stats.crashes += 1;
        let node = &mut self.nodes[s];
        node.site = None;
        node.timers.clear();
        node.told.clear();
        if !self.faults.survive {
            for job in std::mem::take(&mut node.containers).into_keys() {
                self.running.remove(&job);
            }
        }
        self.refresh()
    }

    fn restart(&mut self, s: usize) -> Result<(), String> {
        let d = &self.nodes[s].durable;
        let mut site = Site::new(
            self.ids[s],
            name(s),
            config(),
            self.registries[s].clone(),
            d.workflows(),
            d.runner_jobs.values().cloned(),
            ts(self.now),
        );
        for p in (0..self.n).filter(|&p| p != s) {
            site.restore_capabilities(self.ids[p], self.ads[p].clone());
        }
        self.nodes[s].site = Some(site);
        self.handle(s, Event::Started, false, false)?;
        self.handle(s, Event::OwnCapabilities(Box::new(self.ads[s].clone())), false, false)?;
        self.recover(s)?;
        self.refresh()?;
        self.check_runner_side(s)
    }

    /// The node's recovery after a restart (`kaapana-node`'s `recover`).
    fn recover(&mut self, s: usize) -> Result<(), String> {
        let ids: Vec<JobId> = self.nodes[s].durable.runner_jobs.keys().copied().collect();
        for id in ids {
            // As it is now: recovering one job may end others (its workflow fails here).
            let Some(job) = self.nodes[s].durable.runner_jobs.get(&id).map(|r| r.job.clone())
            else {
                continue;
            };
            if !self.up(s) {
                return Ok(());
            }
            let d = &mut self.nodes[s].durable;
            // Ended, but its result was never signed (the crash came first): sign it now.
            if let Some(exit) = job.exit
                && job.state.is_terminal()
                && !d.pending.contains_key(&id)
                && !d.confirmed.contains(&id)
            {
                d.pending.insert(id, result_manifest(&job, exit));
            }
            let phase = self.nodes[s].containers.get(&id).map(|c| c.phase.clone());
            match (job.state, phase) {
                (JobState::Scheduled, None) => {
                    let m = self.nodes[s].durable.runner_jobs[&id].manifest.clone();
                    self.create_container(s, m)?;
                }
                (JobState::Scheduled, Some(Phase::Running)) => {
                    self.handle(
                        s,
                        Event::Executor { job: id, outcome: Outcome::Started },
                        false,
                        true,
                    )?;
                }
                (JobState::Scheduled | JobState::Running, Some(Phase::Ended { ran, outcome })) => {
                    self.nodes[s].containers.remove(&id);
                    if ran && job.state == JobState::Scheduled {
                        let started = Event::Executor { job: id, outcome: Outcome::Started };
                        self.handle(s, started, false, true)?;
                    }
                    self.handle(s, Event::Executor { job: id, outcome }, false, true)?;
                }
                (JobState::Running, None) => {
                    let reason = "the node restarted and the job's container was gone".to_owned();
                    let failed = Event::Executor { job: id, outcome: Outcome::Failed(reason) };
                    self.handle(s, failed, false, true)?;
                }
                (st, Some(_)) if st.is_terminal() => {
                    // Its StopJob was lost in the crash.
                    self.nodes[s].containers.remove(&id);
                    self.running.remove(&id);
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ---- the steps ----

    fn actions(&self, chaos_step: usize) -> Vec<(u32, Action)> {
        let mut out = Vec::new();
        let f = &self.faults;
        for (w, m) in self.manifests.iter().enumerate() {
            let owner = self.index_of(&m.owner);
            if !self.submitted[w]
                && self.up(owner)
                && (!self.chaos || chaos_step >= self.submit_after[w])
            {
                out.push((20, Action::Submit(w)));
            }
            let running = self.nodes[owner]
                .site
                .as_ref()
                .and_then(|site| site.workflow(&m.workflow_id))
                .is_some_and(|w| !w.state.is_final());
            if self.chaos && f.cancel && running {
                out.push((1, Action::Cancel(w)));
            }
        }
        for (&(a, b), q) in &self.outbox {
            if q.is_empty() || !self.link_up(a, b) {
                continue;
            }
            out.push((100, Action::Deliver(a, b)));
            if self.chaos && f.loss > 0 {
                out.push((f.loss, Action::Lose(a, b)));
            }
        }
        for &(a, b) in &self.broken {
            out.push((if self.chaos { 15 } else { 100 }, Action::Relink(a, b)));
        }
        for (s, node) in self.nodes.iter().enumerate() {
            for (job, c) in &node.containers {
                if !matches!(c.phase, Phase::Ended { .. }) && c.ready_at <= self.now {
                    out.push((40, Action::Container(s, *job)));
                }
            }
            if node.site.is_some() {
                for job in node.durable.pending.keys() {
                    let owner = self.index_of(&node.durable.runner_jobs[job].job.owner);
                    if owner == s || self.link_up(s, owner) {
                        out.push((60, Action::Result(s, *job)));
                    }
                }
                for (timer, &at) in &node.timers {
                    if at <= self.now {
                        out.push((100, Action::Timer(s, *timer)));
                    }
                }
                if self.chaos && f.crash > 0 {
                    out.push((f.crash, Action::Crash(s)));
                }
            } else {
                out.push((if self.chaos { 10 } else { 1000 }, Action::Restart(s)));
            }
        }
        if self.chaos {
            if f.partition > 0 && self.cut.is_empty() {
                out.push((f.partition, Action::Partition));
            }
            if !self.cut.is_empty() {
                out.push((5, Action::Heal));
            }
            out.push((100, Action::Tick));
        } else if !self.cut.is_empty() {
            out.push((1000, Action::Heal));
        }
        out
    }

    fn pick(&mut self, actions: &[(u32, Action)]) -> Action {
        let total: u64 = actions.iter().map(|(w, _)| u64::from(*w)).sum();
        let mut x = self.rng.below(total);
        for (w, a) in actions {
            if x < u64::from(*w) {
                return *a;
            }
            x -= u64::from(*w);
        }
        actions.last().expect("an action").1
    }

    fn run(&mut self, action: Action) -> Result<(), String> {
        self.stats.steps += 1;
        if std::env::var_os("SITES_TRACE").is_some() {
            eprintln!("t={} {action:?}", self.now);
        }
        match action {
            Action::Submit(w) => {
                self.submitted[w] = true;
                let manifest = self.manifests[w].clone();
                let owner = self.index_of(&manifest.owner);
                let wid = manifest.workflow_id;
                self.handle(owner, Event::Submit { manifest }, true, true)?;
                if let Some(site) = self.nodes[owner].site.as_ref() {
                    ensure!(site.workflow(&wid).is_some(), "workflow {w} was not accepted");
                }
            }
            Action::Cancel(w) => {
                let workflow = self.manifests[w].workflow_id;
                let owner = self.index_of(&self.manifests[w].owner);
                let by = "a user".to_owned();
                self.handle(owner, Event::CancelWorkflow { workflow, by }, true, true)?;
            }
            Action::Deliver(a, b) => self.deliver(a, b)?,
            Action::Lose(a, b) => {
                self.stats.losses += 1;
                self.broken.insert(pair(a, b));
                self.refresh()?;
            }
            Action::Relink(a, b) => {
                self.broken.remove(&pair(a, b));
                self.refresh()?;
            }
            Action::Container(s, job) => {
                self.step_container(s, job)?;
                self.check_runner_side(s)?;
            }
            Action::Result(r, job) => self.transfer_result(r, job)?,
            Action::Timer(s, timer) => {
                self.nodes[s].timers.remove(&timer);
                self.handle(s, Event::TimerFired(timer), true, false)?;
            }
            Action::Crash(s) => self.crash(s)?,
            Action::Restart(s) => self.restart(s)?,
            Action::Partition => {
                self.stats.partitions += 1;
                let mask = 1 + self.rng.below((1u64 << self.n) - 2);
                for a in 0..self.n {
                    for b in a + 1..self.n {
                        if (mask >> a) & 1 != (mask >> b) & 1 {
                            self.cut.insert((a, b));
                        }
                    }
                }
                self.refresh()?;
            }
            Action::Heal => {
                self.cut.clear();
                self.refresh()?;
            }
            Action::Tick => {
                let dt = match self.rng.below(20) {
                    0 => 60_000 + self.rng.below(400_000),
                    1..=5 => 3_000 + self.rng.below(60_000),
                    _ => 1 + self.rng.below(3_000),
                };
                self.now += dt;
            }
        }
        Ok(())
    }

    /// When nothing but time is left: the next timer of a site that is up, or the next step
    /// of a container.
    fn next_timer(&self) -> Option<u64> {
        let timers = self.nodes.iter().filter(|n| n.site.is_some()).flat_map(|n| n.timers.values());
        let containers = self
            .nodes
            .iter()
            .flat_map(|n| n.containers.values())
            .filter(|c| !matches!(c.phase, Phase::Ended { .. }))
            .map(|c| &c.ready_at);
        timers.chain(containers).copied().min()
    }

    fn all_ended(&self) -> bool {
        self.manifests
            .iter()
            .enumerate()
            .all(|(w, m)| self.submitted[w] && self.ended.contains_key(&m.workflow_id))
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for (s, node) in self.nodes.iter().enumerate() {
            let Some(site) = node.site.as_ref() else {
                out.push_str(&format!("site-{s}: down\n"));
                continue;
            };
            for w in site.workflows() {
                out.push_str(&format!(
                    "site-{s} owns {} {}: {}\n",
                    w.workflow_id,
                    w.state,
                    w.counts()
                ));
                for j in &w.jobs {
                    out.push_str(&format!(
                        "  {} #{} at {} dispatched={} {:?} result={} reason={:?}\n",
                        j.name,
                        j.attempt,
                        j.runner_name,
                        j.dispatched,
                        j.state,
                        j.result.is_some(),
                        j.reason
                    ));
                }
            }
            for r in site.runner_jobs() {
                out.push_str(&format!("site-{s} runs {}\n", r.job));
            }
            out.push_str(&format!(
                "site-{s}: {} containers, {} results pending, timers {:?}\n",
                node.containers.len(),
                node.durable.pending.len(),
                node.timers
            ));
        }
        for ((a, b), q) in &self.outbox {
            if !q.is_empty() {
                out.push_str(&format!("outbox site-{a} -> site-{b}: {} messages\n", q.len()));
            }
        }
        out
    }
}

fn result_manifest(job: &RunnerJob, exit: ExitStatus) -> ResultManifest {
    let started = job.started_at.unwrap_or(job.received_at).max(job.received_at);
    let finished = job.finished_at.unwrap_or(started).max(started);
    ResultManifest {
        header: Header::new(finished, LONG),
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        attempt: job.attempt,
        exit,
        bundle: bundle_of(&job.job_id),
        log: None,
        timings: JobTimings {
            received_at: job.received_at,
            started_at: started,
            finished_at: finished,
        },
    }
}

fn manifest(w: usize, g: &WfGen, ids: &[InstanceId]) -> WorkflowManifest {
    let jobs = g
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let inputs: BTreeSet<String> = if i == 0 {
                BTreeSet::new()
            } else {
                st.inputs.iter().map(|k| format!("s{}", k % i)).collect()
            };
            // Steps that read upstream results run at the owner here (they may run at a runner,
            // which fetches its inputs from the owner).
            let runner = match (&st.sel, inputs.is_empty()) {
                (_, false) | (Sel::Owner, true) => RunnerSelector::Owner,
                (Sel::Instance(k), true) => RunnerSelector::Instance(ids[*k]),
                (Sel::Query { gpu, min_cpu, best }, true) => {
                    RunnerSelector::Query(CapabilityQuery {
                        dataset: Some(DATASET.to_owned()),
                        gpu: *gpu,
                        min_cpu_millis: *min_cpu,
                        min_memory_bytes: 0,
                        pick: if *best { Pick::Best } else { Pick::All },
                    })
                }
            };
            let name = format!("s{i}");
            JobSpec {
                work: Work::Container(ContainerWork {
                    image: ImageDigest(Sha256Digest::of(name.as_bytes())),
                    command: vec!["run".to_owned()],
                    env: vec![],
                }),
                name,
                runner,
                dataset: Some(DATASET.to_owned()),
                processing: match st.single_file {
                    Some(p) => Processing::SingleFile { max_parallel: p },
                    None => Processing::Batch,
                },
                limits: ResourceLimits::default(),
                timeout_secs: 600,
                inputs: inputs.into_iter().collect(),
                max_retries: st.retries,
            }
        })
        .collect();
    WorkflowManifest {
        header: Header::new(ts(0), LONG),
        workflow_id: WorkflowId::from_bytes([u8::try_from(w).unwrap() + 1; 16]),
        owner: ids[g.owner],
        name: WORKFLOW.to_owned(),
        jobs,
        rounds: None,
    }
}

/// The longest a container runs (ms): up to 2 s to start, up to 90 s to end.
const CONTAINER_MAX: u64 = 92_000;
/// How long every workflow may take to end once everything is up and connected (ms): a
/// runner check and a give-up period for what was armed before the heal, plus the longest
/// chain of containers one workflow can need — up to 5 steps one after the other, each with
/// up to 3 attempts of up to 3 items run one by one (`max_parallel` 1). Once healed the run
/// is event-driven: virtual time passes only when nothing but timers and running containers
/// is left.
const HEAL_BOUND: u64 =
    LOST_AFTER.as_millis() as u64 + GIVE_UP_AFTER.as_millis() as u64 + 5 * 3 * 3 * CONTAINER_MAX;
const MAX_STEPS: u64 = 200_000;

fn run_case(case: &Case) -> Result<Stats, String> {
    let mut world = World::new(case)?;
    // Chaos.
    for step in 0..case.chaos_steps {
        let actions = world.actions(step);
        let a = world.pick(&actions);
        world.run(a)?;
    }
    // Heal: every site up, every link back, no more faults.
    world.chaos = false;
    let healed_at = world.now;
    if world.all_ended() {
        world.ended_at = healed_at;
    }
    loop {
        ensure!(
            world.stats.steps < MAX_STEPS,
            "no end after {MAX_STEPS} steps\n{}",
            world.describe()
        );
        let actions = world.actions(usize::MAX);
        if actions.is_empty() {
            if world.all_ended() {
                break;
            }
            match world.next_timer() {
                Some(at) => world.now = world.now.max(at),
                None => return Err(format!("stuck with nothing to do\n{}", world.describe())),
            }
        } else {
            let a = world.pick(&actions);
            world.run(a)?;
        }
        // Check 1: ended within bounded virtual time after the heal.
        if world.all_ended() {
            world.ended_at = world.ended_at.min(world.now);
        } else {
            ensure!(
                world.now - healed_at <= HEAL_BOUND,
                "workflows still running {} s after every site came up and every partition \
                 healed\n{}",
                (world.now - healed_at) / 1000,
                world.describe()
            );
        }
    }
    world.stats.heal_ms = world.ended_at.saturating_sub(healed_at);
    // Nothing is left behind: no container runs, and every job at every runner has ended.
    ensure!(world.running.is_empty(), "containers still run: {:?}", world.running);
    for (s, node) in world.nodes.iter().enumerate() {
        ensure!(node.containers.is_empty(), "site-{s} still holds containers");
        let site = node.site.as_ref().expect("up");
        for r in site.runner_jobs() {
            ensure!(r.job.state.is_terminal(), "site-{s} still has {} open", r.job);
        }
        for w in site.workflows() {
            match w.state {
                WorkflowState::Finished => world.stats.finished += 1,
                WorkflowState::Failed => world.stats.failed += 1,
                WorkflowState::Cancelled => world.stats.cancelled += 1,
                WorkflowState::Running => return Err(format!("workflow {} runs", w.workflow_id)),
            }
        }
    }
    Ok(world.stats)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })]

    /// Random workflows over 3 to 8 sites with random delivery order, lost transfers,
    /// partitions, crashes and executor failures: see the module docs and the checks.
    #[test]
    fn sites_end_every_workflow_and_never_run_a_job_twice(case in case()) {
        match run_case(&case) {
            Ok(stats) => {
                if std::env::var_os("SITES_STATS").is_some() {
                    eprintln!("{} sites, {} workflows, seed {}: {stats:?}", case.sites.len(), case.workflows.len(), case.seed);
                }
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

// ---- the owner's record of a job (formerly `OwnerJob`) -------------------------------------

#[test]
fn the_owner_applies_updates_once_in_order_and_never_leaves_a_final_state() {
    let (owner, runner) = (id(0), id(1));
    let ad = |n: usize| CapabilityAd {
        header: Header::new(ts(0), LONG),
        sequence: 1,
        instance_name: name(n),
        node_version: "0.1.0".to_owned(),
        executors: vec![],
        allowed_images: vec![],
        allowed_workflows: NameScope::Any,
        datasets: vec![],
        resources: Resources::default(),
    };
    let cands = vec![
        Candidate { instance: owner, name: name(0), ad: ad(0), reachable: true },
        Candidate { instance: runner, name: name(1), ad: ad(1), reachable: true },
    ];
    let spec = JobSpec {
        name: "stats".to_owned(),
        runner: RunnerSelector::Instance(runner),
        dataset: None,
        processing: Processing::Batch,
        work: Work::Container(ContainerWork {
            image: ImageDigest(Sha256Digest::of(b"img")),
            command: vec![],
            env: vec![],
        }),
        limits: ResourceLimits::default(),
        timeout_secs: 60,
        inputs: vec![],
        max_retries: 0,
    };
    let m = WorkflowManifest {
        header: Header::new(ts(0), LONG),
        workflow_id: WorkflowId::from_bytes([2; 16]),
        owner,
        name: WORKFLOW.to_owned(),
        jobs: vec![spec],
        rounds: None,
    };
    let (mut wf, _) = Workflow::start(&m, &cands, ts(0), LONG).unwrap();
    let job = wf.jobs[0].job_id;
    let update = |sequence, state| JobUpdate {
        header: Header::new(ts(1), Duration::from_secs(60)),
        job_id: job,
        workflow_id: m.workflow_id,
        attempt: 0,
        sequence,
        state,
        reason: None,
        retryable: false,
    };
    let apply =
        |wf: &mut Workflow, from, u: &JobUpdate, at| wf.apply_update(from, u, &cands, ts(at), LONG);
    assert!(apply(&mut wf, runner, &update(2, JobState::Scheduled), 1).unwrap().is_some());
    assert_eq!(wf.jobs[0].state, JobState::Scheduled);
    assert_eq!(wf.jobs[0].last_sequence, 2);
    // A late, older update changes nothing.
    let pending = JobState::Pending { awaiting_approval: false };
    assert_eq!(apply(&mut wf, runner, &update(1, pending), 2).unwrap(), None);
    assert_eq!(wf.jobs[0].state, JobState::Scheduled);
    // Neither does the same update again.
    assert_eq!(apply(&mut wf, runner, &update(2, JobState::Scheduled), 2).unwrap(), None);
    assert!(apply(&mut wf, runner, &update(4, JobState::Finished), 3).unwrap().is_some());
    assert_eq!(wf.jobs[0].state, JobState::Finished);
    assert_eq!(wf.jobs[0].updated_at, ts(3));
    // A final state is never left.
    assert_eq!(apply(&mut wf, runner, &update(5, JobState::Running), 4).unwrap(), None);
    assert_eq!(wf.jobs[0].state, JobState::Finished);
    assert_eq!(wf.jobs[0].last_sequence, 4);
    let before = wf.clone();
    // Only the job's runner may update it.
    assert!(matches!(
        apply(&mut wf, owner, &update(6, JobState::Failed), 5),
        Err(UpdateError::NotTheRunner { .. })
    ));
    // Only in its current attempt.
    let mut other = update(7, JobState::Failed);
    other.attempt = 1;
    assert_eq!(
        apply(&mut wf, runner, &other, 5),
        Err(UpdateError::OtherAttempt { job, got: 1, current: 0 })
    );
    // And only a job it knows.
    let mut unknown = update(8, JobState::Failed);
    unknown.job_id = JobId::from_bytes([7; 16]);
    assert!(matches!(apply(&mut wf, runner, &unknown, 5), Err(UpdateError::UnknownJob { .. })));
    assert_eq!(wf, before);
}
