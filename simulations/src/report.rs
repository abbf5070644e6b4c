//! Running scenarios and reporting them: one [`Row`] per variant (deterministic: the same
//! seed gives the same bytes) and one [`Perf`] (wall time and memory, which vary from machine
//! to machine and are kept in a separate file). A scenario with trainings also gets one
//! [`TrainingRow`] per training and one [`RoundRow`] per round (`<name>-trainings.csv`,
//! `<name>-rounds.csv`), taken from the owner's [`Training`] record.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use kaapana_federation::{Training, WorkflowState};
use kaapana_protocol::Timestamp;

use crate::config::{Delivery, Scenario, Variant, WorkflowKind};
use crate::engine::{SEC, to_secs};
use crate::mem;
use crate::sim::{Sim, SimError, SimOptions, T0_MS, WorkflowOutcome};

/// What one run measured. Every field is a function of the scenario and its seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The scenario.
    pub scenario: String,
    /// The variant's label.
    pub variant: String,
    /// Sites.
    pub sites: u32,
    /// Push or poll.
    pub delivery: Delivery,
    /// Fraction cut off by the partitions.
    pub partition_fraction: f64,
    /// The seed.
    pub seed: u64,
    /// Workflows submitted.
    pub workflows: usize,
    /// Of those, finished.
    pub finished: usize,
    /// Failed (or not planned), each with a reason.
    pub failed: usize,
    /// Cancelled.
    pub cancelled: usize,
    /// Still running when the run stopped.
    pub unfinished: usize,
    /// Jobs dispatched, every attempt counted.
    pub jobs: u64,
    /// Retries (attempts after the first) over all jobs.
    pub job_retries: u64,
    /// Mean submission-to-end time of the workflows that ended, in seconds.
    pub completion_mean_s: f64,
    /// The longest of those, in seconds.
    pub completion_max_s: f64,
    /// Mean completion time of the statistics workflows that ended, in seconds.
    pub completion_statistics_s: f64,
    /// Mean completion time of the best-site workflows that ended, in seconds.
    pub completion_best_s: f64,
    /// Mean dispatch-to-runner time of remote job manifests, in seconds.
    pub delivery_mean_s: f64,
    /// The longest of those, in seconds.
    pub delivery_max_s: f64,
    /// Federation messages transmitted (resends included).
    pub messages: u64,
    /// Of those, resends.
    pub messages_resent: u64,
    /// Requests that carried workflow traffic (outbox batches, or polls that carried
    /// something either way) plus result transfers.
    pub round_trips: u64,
    /// Requests that failed and were retried.
    pub requests_failed: u64,
    /// Result transfers that failed and were retried.
    pub result_failures: u64,
    /// Round trips that carry no workflow traffic: keepalive pings (push, over the simulated
    /// connections) or empty polls (poll).
    pub background_round_trips: u64,
    /// The same if every site kept a connection to (or polled) every other site.
    pub full_mesh_background: f64,
    /// Bytes of the requests with workflow traffic and their answers, transport overhead
    /// included.
    pub control_bytes: u64,
    /// Bytes of the background round trips (pings, or empty polls).
    pub background_bytes: u64,
    /// Bytes of result transfers.
    pub result_bytes: u64,
    /// Site crashes.
    pub crashes: u64,
    /// Events handled.
    pub events: u64,
    /// Virtual time when the last workflow ended, in seconds.
    pub end_s: f64,
    /// The first failure reason, if any workflow failed.
    pub first_failure: String,
    /// The trainings of the run, one row each (not part of `<name>.csv`).
    pub trainings: Vec<TrainingRow>,
    /// Their rounds, one row each (not part of `<name>.csv`).
    pub rounds: Vec<RoundRow>,
}

/// One training of a run, from its owner's record. Times are virtual.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingRow {
    /// The scenario.
    pub scenario: String,
    /// The variant's label.
    pub variant: String,
    /// Sites in the federation.
    pub sites: u32,
    /// Fraction cut off by the partitions.
    pub partition_fraction: f64,
    /// The seed.
    pub seed: u64,
    /// Its index among the run's workflows (submission order).
    pub workflow: usize,
    /// Its owner.
    pub owner: u32,
    /// `finished`, `failed`, `cancelled`, or `running` when the run stopped.
    pub state: String,
    /// Its late-update policy, `drop` or `fold`.
    pub late_policy: String,
    /// Its last round.
    pub rounds: u32,
    /// Its quorum.
    pub min_sites: u32,
    /// The sites it trains at.
    pub training_sites: usize,
    /// Rounds that made their model.
    pub rounds_completed: usize,
    /// Round duration (opened to its model stored), mean over the completed rounds, in s.
    pub round_mean_s: f64,
    /// Its median (nearest rank), in s.
    pub round_p50_s: f64,
    /// Its 99th percentile (nearest rank), in s.
    pub round_p99_s: f64,
    /// The longest round, in s.
    pub round_max_s: f64,
    /// Updates aggregated per completed round (the round's own and the folded ones), mean.
    pub updates_mean: f64,
    /// The fewest updates of the round's own any completed round aggregated.
    pub updates_min: usize,
    /// Samples aggregated per completed round, mean.
    pub samples_mean: f64,
    /// Jobs that had not delivered when their round closed, over all rounds.
    pub late: usize,
    /// Of those, updates aggregated with the next round's (`fold`).
    pub folded: usize,
    /// Of those, dropped: cancelled at their round's close (`drop`), or not delivered before
    /// the next round closed or the training ended (`fold`).
    pub dropped: usize,
    /// Submission to its end (or to the end of the run), in s.
    pub completion_s: f64,
    /// Why it failed, if it did.
    pub reason: String,
}

/// One round of a training.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundRow {
    /// The scenario.
    pub scenario: String,
    /// The variant's label.
    pub variant: String,
    /// The training's index among the run's workflows.
    pub workflow: usize,
    /// The round's number.
    pub round: u32,
    /// When it opened, in s of virtual time.
    pub opened_s: f64,
    /// From opening to closing (quorum or all sites), in s; empty while open.
    pub close_s: Option<f64>,
    /// From opening to its model stored, in s; empty until then.
    pub duration_s: Option<f64>,
    /// Updates of its own it aggregated.
    pub updates: usize,
    /// Late updates of the round before it aggregated.
    pub folded: usize,
    /// Its jobs that had not delivered when it closed.
    pub late: usize,
    /// Samples it aggregated.
    pub samples: u64,
}

impl Row {
    /// Messages per dispatched job.
    pub fn messages_per_job(&self) -> f64 {
        ratio(self.messages as f64, self.jobs)
    }

    /// Round trips (with workflow traffic) per dispatched job.
    pub fn round_trips_per_job(&self) -> f64 {
        ratio(self.round_trips as f64, self.jobs)
    }

    /// All round trips, background included, per dispatched job.
    pub fn all_round_trips_per_job(&self) -> f64 {
        ratio((self.round_trips + self.background_round_trips) as f64, self.jobs)
    }

    /// Control bytes per dispatched job.
    pub fn control_bytes_per_job(&self) -> f64 {
        ratio(self.control_bytes as f64, self.jobs)
    }

    /// Control and background bytes per dispatched job.
    pub fn all_control_bytes_per_job(&self) -> f64 {
        ratio((self.control_bytes + self.background_bytes) as f64, self.jobs)
    }

    /// Result bytes per dispatched job.
    pub fn result_bytes_per_job(&self) -> f64 {
        ratio(self.result_bytes as f64, self.jobs)
    }
}

fn ratio(a: f64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a / b as f64 }
}

/// What one run cost on this machine.
#[derive(Clone, Debug, PartialEq)]
pub struct Perf {
    /// The scenario.
    pub scenario: String,
    /// The variant's label.
    pub variant: String,
    /// Sites.
    pub sites: u32,
    /// Wall time of the run (setup included), in seconds.
    pub wall_s: f64,
    /// Events per wall second.
    pub events_per_s: f64,
    /// The heap's peak during the run, in bytes (0 without the counting allocator).
    pub peak_heap: u64,
    /// The process's peak RSS so far, in bytes.
    pub peak_rss: u64,
}

impl Perf {
    /// Peak heap per simulated site, in bytes.
    pub fn heap_per_site(&self) -> f64 {
        ratio(self.peak_heap as f64, u64::from(self.sites))
    }
}

/// Runs one variant to its end.
pub fn run_variant(variant: &Variant, opts: SimOptions) -> Result<(Row, Perf), SimError> {
    let started = Instant::now();
    mem::reset_peak();
    let mut sim = Sim::new(variant, opts)?;
    sim.run()?;
    let peak_heap = mem::peak() as u64;
    let row = summarize(variant, &sim);
    let wall_s = started.elapsed().as_secs_f64();
    drop(sim);
    let sc = &variant.scenario;
    let perf = Perf {
        scenario: sc.name.clone(),
        variant: variant.label.clone(),
        sites: sc.sites,
        wall_s,
        events_per_s: row.events as f64 / wall_s.max(1e-9),
        peak_heap,
        peak_rss: mem::peak_rss().unwrap_or(0),
    };
    if sc.require_all_end && row.unfinished > 0 {
        return Err(SimError::Unfinished {
            count: row.unfinished,
            at_s: row.end_s.max(sc.max_time_s),
            detail: format!("{} (variant {})", row.first_failure, variant.label),
        });
    }
    Ok((row, perf))
}

/// Runs every variant of a scenario; `progress` sees each result as it comes.
pub fn run_scenario(
    sc: &Scenario,
    opts: SimOptions,
    mut progress: impl FnMut(&Row, &Perf),
) -> Result<Vec<(Row, Perf)>, SimError> {
    let mut out = Vec::new();
    for v in sc.variants() {
        let (row, perf) = run_variant(&v, opts)?;
        progress(&row, &perf);
        out.push((row, perf));
    }
    Ok(out)
}

/// The row of a finished run.
pub fn summarize(variant: &Variant, sim: &Sim) -> Row {
    let sc = &variant.scenario;
    let c = sim.counters();
    let outcomes: Vec<WorkflowOutcome> = sim.outcomes();
    let count = |s: WorkflowState| outcomes.iter().filter(|o| o.state == Some(s)).count();
    let durations: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| o.ended_at.map(|e| to_secs(e.saturating_sub(o.submitted_at))))
        .collect();
    let mean = if durations.is_empty() {
        0.0
    } else {
        durations.iter().sum::<f64>() / durations.len() as f64
    };
    let max = durations.iter().copied().fold(0.0, f64::max);
    let mean_of = |kind: WorkflowKind| {
        let d: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.kind == kind)
            .filter_map(|o| o.ended_at.map(|e| to_secs(e.saturating_sub(o.submitted_at))))
            .collect();
        if d.is_empty() { 0.0 } else { d.iter().sum::<f64>() / d.len() as f64 }
    };
    let end = if sim.timed_out() || outcomes.iter().any(|o| o.state.is_none()) {
        sim.now()
    } else {
        sim.last_end()
    };
    let n = f64::from(sc.sites);
    // Background traffic runs until the run stopped: everything delivered, or the limit.
    let window = sim.now() as f64 / SEC as f64;
    let (background, background_bytes, full_mesh) = match sc.delivery {
        Delivery::Push => {
            // Both ends ping every interval.
            let per_link = 2.0 * window / sc.network.ping_interval_s;
            let pings = (sim.link_count() as f64 * per_link).round() as u64;
            let bytes = (pings as f64 * sc.network.ping_bytes).round() as u64;
            (pings, bytes, n * (n - 1.0) / 2.0 * per_link)
        }
        Delivery::Poll => {
            (c.empty_polls, c.empty_poll_bytes, n * (n - 1.0) * window / sc.node.poll_interval_s)
        }
    };
    // Empty polls are background, not workflow traffic.
    let control_bytes = match sc.delivery {
        Delivery::Push => c.control_bytes,
        Delivery::Poll => c.control_bytes.saturating_sub(c.empty_poll_bytes),
    };
    let workflow_requests =
        c.requests - if sc.delivery == Delivery::Poll { c.empty_polls } else { 0 };
    let first_failure = outcomes
        .iter()
        .find(|o| o.state != Some(WorkflowState::Finished))
        .map(|o| match (&o.state, &o.reason) {
            (None, _) => format!("workflow of site {} still running", o.owner),
            (Some(s), Some(r)) => format!("{s}: {r}"),
            (Some(s), None) => s.to_string(),
        })
        .unwrap_or_default();
    Row {
        scenario: sc.name.clone(),
        variant: variant.label.clone(),
        sites: sc.sites,
        delivery: sc.delivery,
        partition_fraction: variant.partition_fraction,
        seed: sc.seed,
        workflows: outcomes.len(),
        finished: count(WorkflowState::Finished),
        failed: count(WorkflowState::Failed),
        cancelled: count(WorkflowState::Cancelled),
        unfinished: outcomes.iter().filter(|o| o.state.is_none()).count(),
        jobs: c.dispatches,
        job_retries: outcomes.iter().map(|o| o.retries).sum(),
        completion_mean_s: mean,
        completion_max_s: max,
        completion_statistics_s: mean_of(WorkflowKind::Statistics),
        completion_best_s: mean_of(WorkflowKind::Best),
        delivery_mean_s: if c.delivery_latency_count == 0 {
            0.0
        } else {
            to_secs(c.delivery_latency_sum) / c.delivery_latency_count as f64
        },
        delivery_max_s: to_secs(c.delivery_latency_max),
        messages: c.envelopes,
        messages_resent: c.envelopes_resent,
        round_trips: workflow_requests + c.result_transfers,
        requests_failed: c.requests_failed,
        result_failures: c.result_failures,
        background_round_trips: background,
        full_mesh_background: full_mesh,
        control_bytes,
        background_bytes,
        result_bytes: c.result_bytes,
        crashes: c.crashes,
        events: sim.events(),
        end_s: to_secs(end),
        first_failure: first_failure.replace([',', '\n', '"'], " "),
        trainings: Vec::new(),
        rounds: Vec::new(),
    }
    .with_trainings(variant, sim, &outcomes)
}

/// Seconds of virtual time since 0.
fn vsecs(t: Timestamp) -> f64 {
    t.as_millis().saturating_sub(T0_MS) as f64 / 1000.0
}

/// The value at quantile `q` of `sorted` (nearest rank); 0 if empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Row {
    /// Adds the rows of the run's trainings.
    fn with_trainings(
        mut self,
        variant: &Variant,
        sim: &Sim,
        outcomes: &[WorkflowOutcome],
    ) -> Self {
        let sc = &variant.scenario;
        for (i, o) in outcomes.iter().enumerate().filter(|(_, o)| o.kind == WorkflowKind::Training)
        {
            let cfg = sim.workflow_config(i);
            let training: Option<&Training> = sim.workflow(i).and_then(|w| w.training.as_ref());
            let state = o.state.map_or_else(|| "running".to_owned(), |s| s.to_string());
            let end = o.ended_at.unwrap_or_else(|| sim.now());
            let mut row = TrainingRow {
                scenario: sc.name.clone(),
                variant: variant.label.clone(),
                sites: sc.sites,
                partition_fraction: variant.partition_fraction,
                seed: sc.seed,
                workflow: i,
                owner: o.owner,
                state,
                late_policy: cfg.map_or("", |c| c.late.label()).to_owned(),
                rounds: cfg.map_or(0, |c| c.rounds),
                min_sites: 0,
                training_sites: 0,
                rounds_completed: 0,
                round_mean_s: 0.0,
                round_p50_s: 0.0,
                round_p99_s: 0.0,
                round_max_s: 0.0,
                updates_mean: 0.0,
                updates_min: 0,
                samples_mean: 0.0,
                late: 0,
                folded: 0,
                dropped: 0,
                completion_s: to_secs(end.saturating_sub(o.submitted_at)),
                reason: o.reason.clone().unwrap_or_default().replace([',', '\n', '"'], " "),
            };
            if let Some(t) = training {
                row.rounds = t.rounds.rounds;
                row.min_sites = t.rounds.min_sites;
                row.training_sites = t.sites.len();
                let completed: Vec<_> = t.history.iter().filter(|r| r.model.is_some()).collect();
                row.rounds_completed = completed.len();
                let mut durations: Vec<f64> = completed
                    .iter()
                    .filter_map(|r| r.ended_at.map(|e| vsecs(e) - vsecs(r.opened_at)))
                    .collect();
                durations.sort_by(f64::total_cmp);
                let n = durations.len().max(1) as f64;
                row.round_mean_s = durations.iter().sum::<f64>() / n;
                row.round_p50_s = quantile(&durations, 0.5);
                row.round_p99_s = quantile(&durations, 0.99);
                row.round_max_s = durations.last().copied().unwrap_or(0.0);
                let k = completed.len().max(1) as f64;
                row.updates_mean =
                    completed.iter().map(|r| r.updates.len() + r.folded.len()).sum::<usize>()
                        as f64
                        / k;
                row.updates_min = completed.iter().map(|r| r.updates.len()).min().unwrap_or(0);
                row.samples_mean = completed.iter().map(|r| r.samples).sum::<u64>() as f64 / k;
                row.late = t.history.iter().map(|r| r.late.len()).sum();
                row.folded = t.history.iter().map(|r| r.folded.len()).sum();
                row.dropped = row.late.saturating_sub(row.folded);
                for r in &t.history {
                    let opened = vsecs(r.opened_at);
                    self.rounds.push(RoundRow {
                        scenario: sc.name.clone(),
                        variant: variant.label.clone(),
                        workflow: i,
                        round: r.round,
                        opened_s: opened,
                        close_s: r.closed_at.map(|c| vsecs(c) - opened),
                        duration_s: r.ended_at.map(|e| vsecs(e) - opened),
                        updates: r.updates.len(),
                        folded: r.folded.len(),
                        late: r.late.len(),
                        samples: r.samples,
                    });
                }
            }
            self.trainings.push(row);
        }
        self
    }
}

/// The header of [`rows_csv`].
pub const ROW_COLUMNS: &[&str] = &[
    "scenario",
    "variant",
    "sites",
    "delivery",
    "partition_fraction",
    "seed",
    "workflows",
    "finished",
    "failed",
    "cancelled",
    "unfinished",
    "jobs",
    "job_retries",
    "completion_mean_s",
    "completion_max_s",
    "completion_statistics_s",
    "completion_best_s",
    "delivery_mean_s",
    "delivery_max_s",
    "messages",
    "messages_resent",
    "messages_per_job",
    "round_trips",
    "round_trips_per_job",
    "requests_failed",
    "result_failures",
    "background_round_trips",
    "all_round_trips_per_job",
    "full_mesh_background",
    "control_bytes",
    "control_bytes_per_job",
    "background_bytes",
    "all_control_bytes_per_job",
    "result_bytes",
    "result_bytes_per_job",
    "crashes",
    "events",
    "end_s",
    "first_failure",
];

/// The rows as CSV (fixed formatting, so equal runs give equal bytes).
pub fn rows_csv(rows: &[Row]) -> String {
    let mut out = ROW_COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.3},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.4},{:.4},{},{},{:.3},{},{:.3},{},{},{},{:.3},{:.0},{},{:.1},{},{:.1},{},{:.1},{},{},{:.3},{}",
            r.scenario,
            r.variant,
            r.sites,
            r.delivery.label(),
            r.partition_fraction,
            r.seed,
            r.workflows,
            r.finished,
            r.failed,
            r.cancelled,
            r.unfinished,
            r.jobs,
            r.job_retries,
            r.completion_mean_s,
            r.completion_max_s,
            r.completion_statistics_s,
            r.completion_best_s,
            r.delivery_mean_s,
            r.delivery_max_s,
            r.messages,
            r.messages_resent,
            r.messages_per_job(),
            r.round_trips,
            r.round_trips_per_job(),
            r.requests_failed,
            r.result_failures,
            r.background_round_trips,
            r.all_round_trips_per_job(),
            r.full_mesh_background,
            r.control_bytes,
            r.control_bytes_per_job(),
            r.background_bytes,
            r.all_control_bytes_per_job(),
            r.result_bytes,
            r.result_bytes_per_job(),
            r.crashes,
            r.events,
            r.end_s,
            r.first_failure,
        );
    }
    out
}

/// The header of [`trainings_csv`].
pub const TRAINING_COLUMNS: &[&str] = &[
    "scenario",
    "variant",
    "sites",
    "partition_fraction",
    "seed",
    "workflow",
    "owner",
    "state",
    "late_policy",
    "rounds",
    "min_sites",
    "training_sites",
    "rounds_completed",
    "round_mean_s",
    "round_p50_s",
    "round_p99_s",
    "round_max_s",
    "updates_mean",
    "updates_min",
    "samples_mean",
    "late",
    "folded",
    "dropped",
    "completion_s",
    "reason",
];

/// The trainings of the runs as CSV (fixed formatting: equal runs give equal bytes).
pub fn trainings_csv(rows: &[Row]) -> String {
    let mut out = TRAINING_COLUMNS.join(",");
    out.push('\n');
    for t in rows.iter().flat_map(|r| &r.trainings) {
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.2},{},{:.1},{},{},{},{:.3},{}",
            t.scenario,
            t.variant,
            t.sites,
            t.partition_fraction,
            t.seed,
            t.workflow,
            t.owner,
            t.state,
            t.late_policy,
            t.rounds,
            t.min_sites,
            t.training_sites,
            t.rounds_completed,
            t.round_mean_s,
            t.round_p50_s,
            t.round_p99_s,
            t.round_max_s,
            t.updates_mean,
            t.updates_min,
            t.samples_mean,
            t.late,
            t.folded,
            t.dropped,
            t.completion_s,
            t.reason,
        );
    }
    out
}

/// The header of [`rounds_csv`].
pub const ROUND_COLUMNS: &[&str] = &[
    "scenario",
    "variant",
    "workflow",
    "round",
    "opened_s",
    "close_s",
    "duration_s",
    "updates",
    "folded",
    "late",
    "samples",
];

/// Every round of every training as CSV.
pub fn rounds_csv(rows: &[Row]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.3}"));
    let mut out = ROUND_COLUMNS.join(",");
    out.push('\n');
    for r in rows.iter().flat_map(|r| &r.rounds) {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.3},{},{},{},{},{},{}",
            r.scenario,
            r.variant,
            r.workflow,
            r.round,
            r.opened_s,
            opt(r.close_s),
            opt(r.duration_s),
            r.updates,
            r.folded,
            r.late,
            r.samples,
        );
    }
    out
}

/// A summary table of the trainings for the terminal (empty without trainings).
pub fn training_table(results: &[(Row, Perf)]) -> String {
    let mut out = String::new();
    if results.iter().all(|(r, _)| r.trainings.is_empty()) {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<28} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>9} {:>6} {:>7} {:>7} {:>9} {:>8}",
        "training",
        "state",
        "quorum",
        "rounds",
        "mean s",
        "p50 s",
        "p99 s",
        "upd/round",
        "late",
        "folded",
        "dropped",
        "events",
        "wall s"
    );
    for (r, p) in results {
        for t in &r.trainings {
            let _ = writeln!(
                out,
                "{:<28} {:>9} {:>7} {:>10} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>6} {:>7} {:>7} {:>9} {:>8.2}",
                format!("{} #{}", r.variant, t.workflow),
                t.state,
                format!("{}/{}", t.min_sites, t.training_sites),
                format!("{}/{}", t.rounds_completed, t.rounds),
                t.round_mean_s,
                t.round_p50_s,
                t.round_p99_s,
                t.updates_mean,
                t.late,
                t.folded,
                t.dropped,
                r.events,
                p.wall_s,
            );
        }
    }
    out
}

/// The header of [`perf_csv`].
pub const PERF_COLUMNS: &[&str] = &[
    "scenario",
    "variant",
    "sites",
    "wall_s",
    "events_per_s",
    "peak_heap_bytes",
    "heap_per_site_bytes",
    "peak_rss_bytes",
];

/// Wall times and memory as CSV.
pub fn perf_csv(perfs: &[Perf]) -> String {
    let mut out = PERF_COLUMNS.join(",");
    out.push('\n');
    for p in perfs {
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{:.0},{},{:.0},{}",
            p.scenario,
            p.variant,
            p.sites,
            p.wall_s,
            p.events_per_s,
            p.peak_heap,
            p.heap_per_site(),
            p.peak_rss
        );
    }
    out
}

/// A summary table for the terminal.
pub fn table(results: &[(Row, Perf)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>8} {:>9}",
        "variant",
        "sites",
        "wf ok/all",
        "compl s",
        "max s",
        "deliv s",
        "msg/job",
        "rt/job",
        "all rt/j",
        "retries",
        "B/job",
        "wall s",
        "heap/site"
    );
    for (r, p) in results {
        let _ = writeln!(
            out,
            "{:<28} {:>6} {:>9} {:>9.1} {:>8.1} {:>8.3} {:>8.2} {:>9.2} {:>9.2} {:>8} {:>9.0} {:>8.2} {:>9}",
            r.variant,
            r.sites,
            format!("{}/{}", r.finished, r.workflows),
            r.completion_mean_s,
            r.completion_max_s,
            r.delivery_mean_s,
            r.messages_per_job(),
            r.round_trips_per_job(),
            r.all_round_trips_per_job(),
            r.job_retries + r.requests_failed + r.result_failures,
            r.control_bytes_per_job(),
            p.wall_s,
            human_bytes(p.heap_per_site()),
        );
    }
    out
}

/// `12.3 KiB` and the like.
pub fn human_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Writes `<dir>/<name>.csv` and `<dir>/<name>-perf.csv`, and with trainings
/// `<dir>/<name>-trainings.csv` and `<dir>/<name>-rounds.csv`.
pub fn write_results(dir: &Path, name: &str, results: &[(Row, Perf)]) -> Result<(), SimError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SimError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let rows: Vec<Row> = results.iter().map(|(r, _)| r.clone()).collect();
    let perfs: Vec<Perf> = results.iter().map(|(_, p)| p.clone()).collect();
    let csv = dir.join(format!("{name}.csv"));
    std::fs::write(&csv, rows_csv(&rows)).map_err(io(&csv))?;
    let perf = dir.join(format!("{name}-perf.csv"));
    std::fs::write(&perf, perf_csv(&perfs)).map_err(io(&perf))?;
    if rows.iter().any(|r| !r.trainings.is_empty()) {
        let trainings = dir.join(format!("{name}-trainings.csv"));
        std::fs::write(&trainings, trainings_csv(&rows)).map_err(io(&trainings))?;
        let rounds = dir.join(format!("{name}-rounds.csv"));
        std::fs::write(&rounds, rounds_csv(&rows)).map_err(io(&rounds))?;
    }
    Ok(())
}
