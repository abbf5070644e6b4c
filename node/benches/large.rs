//! Large workflows (issue 19): a single-file workflow of N dataset items (default 10,000) at
//! one site, driven through the federation core and the real store on disk.
//!
//! `cargo bench -p kaapana-node --bench large` (options after `--`):
//!
//! - `--items N`: the dataset's items, so the workflow's jobs (default 10,000);
//! - `--parallel P`: the step's `max_parallel` (default 16);
//! - `--events E`: stop after E events (default: run the workflow to its end);
//! - `--whole`: persist as the store did before issue 19: every call that changed a workflow
//!   writes the whole workflow (postcard of every job's record, one value; here under a
//!   `meta` key, which is what `workflows.v4` held) instead of the changed records only.
//!
//! What runs is the daemon's own persistence path without the daemon around it: one
//! [`Site`] (the federation core) owns the workflow and runs its jobs itself (`runner =
//! owner`); every event is one `Site::handle` call whose commands become store operations
//! through [`kaapana_node::daemon::records_of`], the driver's function, written with one
//! [`Store::write`] (one group-commit request, committed and fsynced before the next event,
//! as the driver's lock serialises its commits). No containers run — 10,000 of them would
//! measure containerd: the bench plays the executor and reports each `StartJob` as started,
//! then exited 0, and each `DeliverResult` as stored (`Event::ResultStored`), so a job costs
//! three events. The result bundles, the outbox and the audit entries the daemon writes
//! beside these records are left out: the figures are those of the workflow's and the runner
//! jobs' records.
//!
//! Printed: events per second; the bytes of the values written per event (what the store
//! encodes); the bytes this process wrote to the disk per event (`/proc/self/io`
//! `write_bytes`: redb's pages and their copy-on-write, fsynced); the store file's size; and
//! how long reading the workflow back (`Store::workflows`, as the daemon does on start) takes.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use kaapana_federation::{Command, Event, Outcome, Record, Registry, Site, SiteConfig};
use kaapana_node::store::{Store, WriteOp};
use kaapana_protocol::{
    BlobRef, CapabilityAd, ContainerWork, DatasetSummary, ExitStatus, Header, ImageDigest,
    InstanceId, ItemToken, JobSpec, JobTimings, NameScope, Processing, ResourceLimits, Resources,
    ResultManifest, RunnerSelector, Sha256Digest, Timestamp, Work, WorkflowId, WorkflowManifest,
};

const LONG: Duration = Duration::from_secs(30 * 24 * 3600);
const DATASET: &str = "lung-ct";

struct Args {
    items: usize,
    parallel: u32,
    events: Option<u64>,
    whole: bool,
}

fn args() -> Args {
    let mut a = Args { items: 10_000, parallel: 16, events: None, whole: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--items" => a.items = it.next().and_then(|v| v.parse().ok()).expect("--items N"),
            "--parallel" => {
                a.parallel = it.next().and_then(|v| v.parse().ok()).expect("--parallel P");
            }
            "--events" => a.events = it.next().and_then(|v| v.parse().ok()),
            "--whole" => a.whole = true,
            // `cargo bench` passes `--bench`.
            _ => {}
        }
    }
    a
}

fn me() -> InstanceId {
    let mut bytes = vec![0x12, 0x20];
    bytes.extend_from_slice(&[7; 32]);
    InstanceId::from_bytes(&bytes).unwrap()
}

fn token(k: usize) -> ItemToken {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(k as u64).to_be_bytes());
    ItemToken(b)
}

fn ad(items: usize, now: Timestamp) -> CapabilityAd {
    CapabilityAd {
        header: Header::new(now, LONG),
        sequence: 1,
        instance_name: "site-a".to_owned(),
        node_version: "0.1.0".to_owned(),
        executors: vec![],
        allowed_images: vec![],
        allowed_workflows: NameScope::Any,
        datasets: vec![DatasetSummary {
            name: DATASET.to_owned(),
            items: items as u64,
            bytes: (items as u64) << 20,
            tokens: (0..items).map(token).collect(),
            modalities: Vec::new(),
        }],
        resources: Resources { cpu_millis: 8000, memory_bytes: 16 << 30, gpus: vec![] },
    }
}

fn manifest(parallel: u32, now: Timestamp) -> WorkflowManifest {
    WorkflowManifest {
        header: Header::new(now, LONG),
        workflow_id: WorkflowId::from_bytes([3; 16]),
        owner: me(),
        name: "segment-every-series".to_owned(),
        jobs: vec![JobSpec {
            name: "segment".to_owned(),
            runner: RunnerSelector::Owner,
            dataset: Some(DATASET.to_owned()),
            processing: Processing::SingleFile { max_parallel: parallel },
            work: Work::Container(ContainerWork {
                image: ImageDigest(Sha256Digest::of(b"segmenter")),
                command: vec!["/segment".to_owned()],
                env: vec![],
            }),
            limits: ResourceLimits::default(),
            timeout_secs: 600,
            inputs: vec![],
            max_retries: 0,
        }],
        rounds: None,
    }
}

/// Bytes this process has caused to be sent to the storage layer.
fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// The bytes of the value each op writes (as the store encodes it: a schema byte in front of
/// the workflow records' postcard).
fn value_bytes(op: &WriteOp) -> usize {
    match op {
        WriteOp::PutWorkflowHeader(h) => 1 + postcard::to_allocvec(h.as_ref()).unwrap().len(),
        WriteOp::PutWorkflowJob { job, .. } => {
            1 + postcard::to_allocvec(job.as_ref()).unwrap().len()
        }
        WriteOp::PutRunnerJob(r) => postcard::to_allocvec(r.as_ref()).unwrap().len(),
        WriteOp::PutMeta { value, .. } => value.len(),
        _ => 0,
    }
}

fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let store = Store::open(&path).unwrap();
    let mut clock = 1_800_000_000_000u64;
    let mut now = || {
        clock += 1;
        Timestamp::from_millis(clock)
    };
    let t0 = now();
    let mut site = Site::new(me(), "site-a", SiteConfig::default(), Registry::new(), [], [], t0);
    site.handle(t0, Event::Started);
    site.handle(t0, Event::OwnCapabilities(Box::new(ad(a.items, t0))));
    let m = manifest(a.parallel, t0);
    let wid = m.workflow_id;

    let mut queue: VecDeque<Event> = VecDeque::from([Event::Submit { manifest: m }]);
    let (mut events, mut values, mut ops_written) = (0u64, 0u64, 0u64);
    let mut submit_values = 0u64;
    let io_before = write_bytes();
    let start = Instant::now();
    while let Some(event) = queue.pop_front() {
        if a.events.is_some_and(|e| events >= e) {
            break;
        }
        let submit = matches!(event, Event::Submit { .. });
        let t = now();
        let cmds = site.handle(t, event);
        events += 1;
        let mut ops = kaapana_node::daemon::records_of(&site, &cmds);
        if a.whole {
            let touched = cmds.iter().any(|c| {
                matches!(c, Command::Persist(Record::Workflow(_) | Record::WorkflowJob { .. }))
            });
            ops.retain(|op| {
                !matches!(op, WriteOp::PutWorkflowHeader(_) | WriteOp::PutWorkflowJob { .. })
            });
            if touched {
                let w = site.workflow(&wid).unwrap();
                let value = postcard::to_allocvec(w).unwrap();
                ops.push(WriteOp::PutMeta { key: "workflows.v4".to_owned(), value });
            }
        }
        let bytes: u64 = ops.iter().map(|op| value_bytes(op) as u64).sum();
        if submit {
            submit_values = bytes;
        }
        values += bytes;
        ops_written += ops.len() as u64;
        if !ops.is_empty() {
            store.write(ops).unwrap();
        }
        for c in cmds {
            match c {
                Command::StartJob(m) => {
                    queue.push_back(Event::Executor { job: m.job_id, outcome: Outcome::Started });
                    queue.push_back(Event::Executor {
                        job: m.job_id,
                        outcome: Outcome::Exited { exit: ExitStatus::Exited(0), detail: None },
                    });
                }
                Command::DeliverResult { job, exit } => {
                    let result = ResultManifest {
                        header: Header::new(t, LONG),
                        job_id: job.job_id,
                        workflow_id: job.workflow_id,
                        attempt: job.attempt,
                        exit,
                        bundle: BlobRef {
                            digest: Sha256Digest::of(job.job_id.as_bytes()),
                            size: 1,
                        },
                        log: None,
                        timings: JobTimings { received_at: t, started_at: t, finished_at: t },
                    };
                    queue.push_back(Event::ResultStored { from: me(), result, samples: None });
                }
                _ => {}
            }
        }
    }
    let elapsed = start.elapsed();
    let disk = write_bytes() - io_before;
    let w = site.workflow(&wid).unwrap();
    let state = w.state;
    let counts = w.counts();
    drop(site);
    let file = std::fs::metadata(&path).unwrap().len();
    let read = Instant::now();
    let stored = store.workflows().unwrap();
    let read = read.elapsed();

    let mode = if a.whole { "whole workflow per event (before issue 19)" } else { "per job" };
    println!(
        "large workflow: {} single-file jobs, max_parallel {}, persisted {mode}",
        a.items, a.parallel
    );
    println!("  workflow: {state} ({counts}) after {events} events");
    println!(
        "  {events} events in {:.2} s: {:.0} events/s ({ops_written} store ops)",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    let after_submit = values - submit_values;
    let per = |b: u64, n: u64| b as f64 / n.max(1) as f64;
    println!(
        "  values written: {:.1} MB in all, {:.0} B/event ({:.0} B/event after the submit, \
         which wrote {submit_values} B)",
        values as f64 / 1e6,
        per(values, events),
        per(after_submit, events.saturating_sub(1)),
    );
    println!(
        "  disk writes (/proc/self/io write_bytes): {:.1} MB, {:.0} B/event",
        disk as f64 / 1e6,
        per(disk, events)
    );
    println!("  store file: {:.1} MB", file as f64 / 1e6);
    if a.whole {
        println!("  (the whole-record values are not read back: they sit under a meta key)");
    } else {
        let jobs: usize = stored.iter().map(|w| w.jobs.len()).sum();
        println!(
            "  read back (Store::workflows, as on daemon start): {} workflow(s), {jobs} jobs in {:.0} ms",
            stored.len(),
            read.as_secs_f64() * 1e3
        );
    }
}
