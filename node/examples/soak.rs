//! Soak run: three sites on hosts of their own (network namespaces, as in `tests/faults.rs`),
//! many workflows, random faults, then a consistency check across every store.
//!
//! ```sh
//! cargo build -p kaapana-node --bin kaapana-node
//! cargo run -p kaapana-node --example soak -- [--workflows 1000] [--seed S] [--in-flight 48] [--keep DIR]
//! ```
//!
//! As root, with iproute2, nftables, containerd, runc and busybox-static (`scripts/test`
//! installs them). Each site has dataset `ct` and runs jobs on one shared containerd; every
//! site submits workflows (round robin over the sites that are up) of three shapes: one job at
//! a named other site; a job placed by a capability query (`pick = "best"`, 2 retries) feeding
//! an aggregation at the owner; a job at every site (`pick = "all"`, 1 retry) feeding one. A
//! seeded generator injects faults on random sites while workflows are submitted: a silent cut
//! (every packet dropped), a loud cut (resets), 10-30 % packet loss, a freeze (SIGSTOP, then
//! SIGCONT) and a crash (SIGKILL, then a restart on the same data directory). The owners'
//! lease (`runner_lost_after_secs`) is 10 s. After the last submission the faults end and the
//! run waits until every workflow has ended (or nothing moves for 3 minutes).
//!
//! The check, across every store: every acknowledged workflow is at its owner and has ended,
//! finished or failed with a stated reason (`lost` counts those missing or never ended); every
//! job id ran at most once at its runner (each job appends a line to its `/output/runs`, kept
//! per job id: `duplicate runs`); every finished job's result is stored at the owner under its
//! current attempt's id and hashes to the digest the workflow recorded (`bad results`), and the
//! runner's record agrees; results of replaced attempts are not stored (`late results stored`).
//! Failures by the shim race (issue 19: containerd's "failed to start shim", e.g. "… file
//! exists" after a node was killed inside `Tasks.Create`) are counted on their own, as runner
//! jobs and as workflows whose reason names it (`shim race`); they make the run fail too.
//! It prints the counts and exits non-zero if anything is lost, duplicated or wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::containerd::TestContainerd;
use common::netns::Net;
use common::{Daemon, Site, SplitMix};
use kaapana_node::api::{JobsView, ResultView, SubmitWorkflowRequest, WorkflowView};

const NAMES: [&str; 3] = ["site-a", "site-b", "site-c"];
const LEASE_SECS: u64 = 10;

struct Args {
    workflows: usize,
    seed: u64,
    in_flight: usize,
    keep: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        workflows: 1000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        in_flight: 48,
        keep: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--workflows" => a.workflows = value().parse().expect("--workflows N"),
            "--seed" => a.seed = value().parse().expect("--seed S"),
            "--in-flight" => a.in_flight = value().parse().expect("--in-flight N"),
            "--keep" => a.keep = Some(PathBuf::from(value())),
            other => panic!("unknown argument {other}; see the example's documentation"),
        }
    }
    a
}

/// Fault timing from the seeded generator.
fn millis(rng: &mut SplitMix, from: u64, to: u64) -> Duration {
    Duration::from_millis(from + rng.below(to - from))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Cut,
    LoudCut,
    Loss,
    Freeze,
    Crash,
}

struct Soak {
    daemons: Vec<Option<Daemon>>,
    sites: Vec<Site>,
    frozen: Vec<bool>,
    _ctd: TestContainerd,
    _rt: tokio::runtime::Runtime,
    image: String,
    net: Net,
}

impl Soak {
    /// Whether site `i`'s API can be called now (not killed, not frozen).
    fn up(&self, i: usize) -> bool {
        self.daemons[i].is_some() && !self.frozen[i]
    }

    fn d(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().unwrap()
    }

    fn start(&mut self, i: usize) {
        self.daemons[i] = Some(self.sites[i].start_netns(&self.net, i + 1));
    }

    fn apply(&mut self, i: usize, fault: Fault, rng: &mut SplitMix) {
        let k = i + 1;
        match fault {
            Fault::Cut => self.net.cut(k),
            Fault::LoudCut => self.net.cut_with_resets(k),
            Fault::Loss => self.net.loss(k, 10 + rng.below(21) as u8),
            Fault::Freeze => {
                self.d(i).pause();
                self.frozen[i] = true;
            }
            Fault::Crash => self.daemons[i].take().unwrap().kill(),
        }
    }

    fn undo(&mut self, i: usize, fault: Fault) {
        let k = i + 1;
        match fault {
            Fault::Cut | Fault::LoudCut => self.net.heal(k),
            Fault::Loss => self.net.loss(k, 0),
            Fault::Freeze => {
                self.d(i).resume();
                self.frozen[i] = false;
            }
            Fault::Crash => self.start(i),
        }
    }

    fn workflow(&self, owner: usize, rng: &mut SplitMix) -> String {
        // Jobs take up to a second, so that faults also hit running containers.
        let work = format!(
            "echo run >> /output/runs; sleep 0.{}; ls /input | wc -l > /output/n",
            rng.below(10)
        );
        let agg = "echo run >> /output/runs; cat /input/*/n | awk '{s+=$1} END {print s}' > /output/total";
        let text = match rng.below(10) {
            0..=3 => {
                let other = NAMES[(owner + 1 + rng.below(2) as usize) % 3];
                format!(
                    "name = \"soak-named\"\n[[job]]\nname = \"work\"\nrunner = \"{other}\"\n\
                     dataset = \"ct\"\nimage = \"IMAGE\"\ncommand = [\"sh\", \"-c\", \"{work}\"]\n\
                     timeout = \"2m\"\n"
                )
            }
            4..=7 => format!(
                "name = \"soak-best\"\n[[job]]\nname = \"work\"\n\
                 query = {{ dataset = \"ct\", pick = \"best\" }}\nretries = 2\nimage = \"IMAGE\"\n\
                 command = [\"sh\", \"-c\", \"{work}\"]\ntimeout = \"2m\"\n[[job]]\nname = \"agg\"\n\
                 runner = \"owner\"\ninputs = [\"work\"]\nimage = \"IMAGE\"\n\
                 command = [\"sh\", \"-c\", \"{agg}\"]\ntimeout = \"2m\"\n"
            ),
            _ => format!(
                "name = \"soak-all\"\n[[job]]\nname = \"work\"\n\
                 query = {{ dataset = \"ct\", pick = \"all\" }}\nretries = 1\nimage = \"IMAGE\"\n\
                 command = [\"sh\", \"-c\", \"{work}\"]\ntimeout = \"2m\"\n[[job]]\nname = \"agg\"\n\
                 runner = \"owner\"\ninputs = [\"work\"]\nimage = \"IMAGE\"\n\
                 command = [\"sh\", \"-c\", \"{agg}\"]\ntimeout = \"2m\"\n"
            ),
        };
        text.replace("IMAGE", &self.image)
    }

    fn runs(&self, i: usize, job: &str) -> usize {
        let file = self.sites[i].dir.join("jobs").join(job).join("output").join("runs");
        std::fs::read_to_string(file).map_or(0, |t| t.lines().count())
    }
}

#[derive(Debug, Default)]
struct Counts {
    submitted: usize,
    refused_at_submission: usize,
    unanswered_submissions: usize,
    completed: usize,
    failed: usize,
    cancelled: usize,
    missing: usize,
    never_ended: usize,
    failed_without_reason: usize,
    duplicate_runs: usize,
    bad_results: usize,
    late_results_stored: usize,
    runner_disagrees: usize,
    jobs_checked: usize,
    shim_race_jobs: usize,
    shim_race_workflows: usize,
    faults: BTreeMap<String, usize>,
    failure_reasons: BTreeMap<String, usize>,
}

/// containerd's error when it cannot start a task's shim (the shim race of issue 19).
const SHIM_RACE: &str = "failed to start shim";

fn main() {
    let args = args();
    println!(
        "soak: {} workflows, seed {}, {} in flight",
        args.workflows, args.seed, args.in_flight
    );
    let mut rng = SplitMix(args.seed);
    let started = Instant::now();

    // ----- set-up -----
    let net = Net::new(NAMES.len());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let tmp = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).unwrap();
            let t = tempfile::Builder::new().prefix("soak-").tempdir_in(dir).unwrap();
            let path = t.keep();
            println!("keeping everything in {}", path.display());
            path
        }
        None => {
            let t = common::test_dir();
            let path = t.path().to_owned();
            std::mem::forget(t); // removed below, unless kept
            path
        }
    };
    let sites = common::federation_netns(&tmp, &net, &NAMES, None);
    for (i, s) in sites.iter().enumerate() {
        s.set_executor(Some(ctd.containerd().socket()));
        s.set_runner_lost_after(LEASE_SECS);
        let dir = tmp.join(format!("ct-{}", s.name));
        for item in 0..=i {
            std::fs::create_dir_all(dir.join(format!("1.2.826.0.1.{item}"))).unwrap();
            std::fs::write(dir.join(format!("1.2.826.0.1.{item}/value")), "1\n").unwrap();
        }
        s.ok(&["dataset", "add", "ct", dir.to_str().unwrap()]);
    }
    let image = common::containerd::build_busybox_image(&tmp, "busybox", false);
    sites[0].ok(&["image", "import", image.tar.to_str().unwrap()]);
    let mut s = Soak {
        daemons: vec![None, None, None],
        sites,
        frozen: vec![false; 3],
        _ctd: ctd,
        _rt: rt,
        image: image.digest.to_string(),
        net,
    };
    for i in 0..3 {
        s.start(i);
    }
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            let name = NAMES[j];
            s.d(i).wait_until(&format!("{name}'s capabilities"), Duration::from_secs(60), |d| {
                d.instance(name)
                    .is_some_and(|v| v.connected == Some(true) && v.capabilities.is_some())
            });
        }
    }
    println!("set up in {:?}", started.elapsed());

    // ----- submissions under faults -----
    let mut counts = Counts::default();
    // Acknowledged workflows by owner, and which of them have not ended yet.
    let mut owned: Vec<BTreeSet<String>> = vec![BTreeSet::new(); 3];
    let mut open: BTreeSet<(usize, String)> = BTreeSet::new();
    let mut active: Vec<(Instant, usize, Fault)> = Vec::new();
    let mut next_fault = Instant::now() + millis(&mut rng, 1000, 4000);
    let mut next_poll = Instant::now();
    let mut last_report = Instant::now();
    let mut last_progress = Instant::now();
    let mut owner_turn = 0usize;
    let run_started = Instant::now();
    loop {
        let now = Instant::now();
        let submitting = counts.submitted < args.workflows;
        // End faults whose time is up (all of them once the submissions are done).
        let mut i = 0;
        while i < active.len() {
            if active[i].0 <= now || !submitting {
                let (_, site, fault) = active.remove(i);
                s.undo(site, fault);
            } else {
                i += 1;
            }
        }
        // A new fault now and then, on a site without one; at most two at once.
        if submitting && now >= next_fault && active.len() < 2 {
            let site = rng.below(3) as usize;
            if !active.iter().any(|(_, a, _)| *a == site) {
                let (fault, dur) = match rng.below(10) {
                    0 | 1 => (Fault::Cut, millis(&mut rng, 2000, 15000)),
                    2 | 3 => (Fault::LoudCut, millis(&mut rng, 2000, 15000)),
                    4 | 5 => (Fault::Loss, millis(&mut rng, 3000, 15000)),
                    6 | 7 => (Fault::Freeze, millis(&mut rng, 500, 8000)),
                    _ => (Fault::Crash, millis(&mut rng, 300, 4000)),
                };
                s.apply(site, fault, &mut rng);
                *counts.faults.entry(format!("{fault:?}")).or_default() += 1;
                active.push((now + dur, site, fault));
            }
            next_fault = now + millis(&mut rng, 1000, 5000);
        }
        // Submit while fewer than `in_flight` are open.
        let mut tries = 0;
        while counts.submitted < args.workflows && open.len() < args.in_flight && tries < 3 {
            tries += 1;
            let owner = (0..3).map(|k| (owner_turn + k) % 3).find(|&o| s.up(o));
            let Some(owner) = owner else { break };
            owner_turn = owner + 1;
            let toml = s.workflow(owner, &mut rng);
            match s
                .d(owner)
                .api()
                .post::<_, WorkflowView>("/v1/workflows", &SubmitWorkflowRequest { toml })
            {
                Ok(w) => {
                    counts.submitted += 1;
                    owned[owner].insert(w.workflow_id.clone());
                    open.insert((owner, w.workflow_id));
                }
                Err(kaapana_node::client::ClientError::Api { message, .. }) => {
                    // Refused (e.g. no capability ad of a matching runner yet): not acknowledged.
                    counts.refused_at_submission += 1;
                    if counts.refused_at_submission <= 5 {
                        println!("submission refused at {}: {message}", NAMES[owner]);
                    }
                }
                Err(e) => {
                    counts.unanswered_submissions += 1;
                    println!("submission at {} got no answer: {e}", NAMES[owner]);
                }
            }
        }
        // Which open workflows have ended (polling the owners that can answer).
        if now >= next_poll {
            next_poll = now + Duration::from_secs(1);
            for o in 0..3 {
                if !s.up(o) || !open.iter().any(|(w, _)| *w == o) {
                    continue;
                }
                let Ok(all) = s.d(o).api().get::<Vec<WorkflowView>>("/v1/workflows") else {
                    continue;
                };
                for w in all {
                    if w.state != "running" && open.remove(&(o, w.workflow_id.clone())) {
                        last_progress = now;
                    }
                }
            }
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            println!(
                "{:>5.0} s: {} submitted, {} open, faults now: {:?}",
                run_started.elapsed().as_secs_f64(),
                counts.submitted,
                open.len(),
                active.iter().map(|(_, i, f)| format!("{}:{f:?}", NAMES[*i])).collect::<Vec<_>>()
            );
        }
        if !submitting && open.is_empty() {
            break;
        }
        if !submitting && last_progress.elapsed() > Duration::from_secs(180) {
            println!("nothing ended for 3 minutes; {} workflows still open", open.len());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run_time = run_started.elapsed();
    // Everything healed and up for the check.
    for (_, site, fault) in std::mem::take(&mut active) {
        s.undo(site, fault);
    }

    // ----- the consistency check -----
    let views: Vec<JobsView> = (0..3).map(|i| s.d(i).api().get("/v1/jobs").unwrap()).collect();
    // Every job id recorded at any runner: it ran at most once.
    let mut runner_of: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut jobs_of_workflow: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, v) in views.iter().enumerate() {
        for r in &v.running_here {
            if r.reason.as_deref().is_some_and(|t| t.contains(SHIM_RACE)) {
                counts.shim_race_jobs += 1;
                println!(
                    "SHIM RACE: job {} ({}) at {}: {}",
                    r.job_name,
                    r.job_id,
                    NAMES[i],
                    r.reason.as_deref().unwrap_or_default()
                );
            }
            jobs_of_workflow.entry(r.workflow_id.clone()).or_default().push(r.job_id.clone());
            let runs = s.runs(i, &r.job_id);
            if runs > 1 {
                counts.duplicate_runs += 1;
                println!(
                    "DUPLICATE: job {} ({}) ran {runs} times at {}",
                    r.job_name, r.job_id, NAMES[i]
                );
            }
            if let Some((other, _)) = runner_of.insert(r.job_id.clone(), (i, r.state.clone())) {
                counts.duplicate_runs += 1;
                println!(
                    "DUPLICATE: job {} recorded at {} and {}",
                    r.job_id, NAMES[other], NAMES[i]
                );
            }
        }
    }
    for o in 0..3 {
        let all: Vec<WorkflowView> = s.d(o).api().get("/v1/workflows").unwrap();
        let by_id: BTreeMap<&str, &WorkflowView> =
            all.iter().map(|w| (w.workflow_id.as_str(), w)).collect();
        for id in &owned[o] {
            let Some(w) = by_id.get(id.as_str()) else {
                counts.missing += 1;
                println!("LOST: workflow {id} acknowledged by {} is not there", NAMES[o]);
                continue;
            };
            match w.state.as_str() {
                "finished" => counts.completed += 1,
                "failed" => counts.failed += 1,
                "cancelled" => counts.cancelled += 1,
                _ => {
                    counts.never_ended += 1;
                    println!("LOST: workflow {id} at {} never ended: {w:#?}", NAMES[o]);
                    continue;
                }
            }
            if w.state != "finished" {
                match w.reason.as_deref().filter(|r| !r.is_empty()) {
                    Some(r) => {
                        if r.contains(SHIM_RACE) {
                            counts.shim_race_workflows += 1;
                        }
                        // Group reasons by their shape (ids and names vary).
                        let shape: String = r
                            .split_whitespace()
                            .map(|t| {
                                if t.len() >= 16 && t.chars().all(|c| c.is_ascii_hexdigit()) {
                                    "ID"
                                } else {
                                    t
                                }
                            })
                            .collect::<Vec<_>>()
                            .join(" ");
                        *counts.failure_reasons.entry(shape).or_default() += 1;
                    }
                    None => counts.failed_without_reason += 1,
                }
            }
            let mut ids_of_workflow: BTreeSet<&str> = BTreeSet::new();
            for j in &w.jobs {
                ids_of_workflow.insert(&j.job_id);
                if j.state != "finished" {
                    continue;
                }
                counts.jobs_checked += 1;
                let ok = (|| {
                    let digest = j.result.clone()?;
                    let r: ResultView =
                        s.d(o).api().get(&format!("/v1/jobs/{}/result", j.job_id)).ok()?;
                    let hashed =
                        kaapana_node::blobs::hash_file(&PathBuf::from(r.bundle.path?)).ok()?;
                    (r.bundle.digest == digest && hashed.digest.to_string() == digest).then_some(())
                })();
                if ok.is_none() {
                    counts.bad_results += 1;
                    println!("BAD RESULT: workflow {id} job {} ({}): {j:#?}", j.name, j.job_id);
                }
                match runner_of.get(&j.job_id) {
                    Some((r, state)) if NAMES[*r] == j.runner && state == "finished" => {
                        if s.runs(*r, &j.job_id) != 1 {
                            counts.duplicate_runs += 1;
                            println!("RUNS: job {} ran {} times", j.job_id, s.runs(*r, &j.job_id));
                        }
                    }
                    other => {
                        counts.runner_disagrees += 1;
                        println!(
                            "DISAGREE: job {} finished at the owner, runner has {other:?}",
                            j.job_id
                        );
                    }
                }
            }
            // Results stored for job ids of this workflow that are not a current attempt: late
            // results of replaced attempts.
            for job in jobs_of_workflow.get(id).into_iter().flatten() {
                if !ids_of_workflow.contains(job.as_str()) {
                    let stored: Result<ResultView, _> =
                        s.d(o).api().get(&format!("/v1/jobs/{job}/result"));
                    if stored.is_ok() {
                        counts.late_results_stored += 1;
                        println!("LATE RESULT STORED: job {job} of workflow {id}");
                    }
                }
            }
        }
    }
    let lost = counts.missing + counts.never_ended;
    let duplicated = counts.duplicate_runs;
    println!("\n===== soak result (seed {}) =====", args.seed);
    println!("run time:                 {run_time:?} (total {:?})", started.elapsed());
    println!("faults injected:          {:?}", counts.faults);
    println!("workflows submitted:      {} (acknowledged)", counts.submitted);
    println!("  completed:              {}", counts.completed);
    println!("  failed with a reason:   {}", counts.failed);
    println!("  cancelled:              {}", counts.cancelled);
    println!(
        "  lost:                   {lost} ({} missing, {} never ended)",
        counts.missing, counts.never_ended
    );
    println!("  failed without reason:  {}", counts.failed_without_reason);
    println!("submissions refused:      {}", counts.refused_at_submission);
    println!("submissions unanswered:   {}", counts.unanswered_submissions);
    println!("finished jobs checked:    {}", counts.jobs_checked);
    println!("duplicated runs/results:  {duplicated}");
    println!("bad results:              {}", counts.bad_results);
    println!("runner disagrees:         {}", counts.runner_disagrees);
    println!("late results stored:      {}", counts.late_results_stored);
    println!(
        "shim race failures:       {} jobs, {} workflows (\"{SHIM_RACE}\")",
        counts.shim_race_jobs, counts.shim_race_workflows
    );
    for (reason, n) in &counts.failure_reasons {
        println!("  {n:>4} × {reason}");
    }
    println!(
        "SOAK submitted={} completed={} failed={} cancelled={} lost={lost} duplicated={duplicated} bad_results={} disagree={} late_stored={} shim_race_jobs={} shim_race_workflows={}",
        counts.submitted,
        counts.completed,
        counts.failed,
        counts.cancelled,
        counts.bad_results,
        counts.runner_disagrees,
        counts.late_results_stored,
        counts.shim_race_jobs,
        counts.shim_race_workflows
    );
    let ok = lost == 0
        && duplicated == 0
        && counts.bad_results == 0
        && counts.failed_without_reason == 0
        && counts.runner_disagrees == 0
        && counts.late_results_stored == 0
        && counts.shim_race_jobs == 0
        && counts.shim_race_workflows == 0;
    drop(s);
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    std::process::exit(if ok { 0 } else { 1 });
}
