//! Running scenarios and reporting them: one [`Row`] per variant (deterministic: the same
//! seed gives the same bytes) and one [`Perf`] (wall time and memory, which vary from machine
//! to machine and are kept in a separate file).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use kaapana_federation::WorkflowState;

use crate::config::{Delivery, Scenario, Variant, WorkflowKind};
use crate::engine::{SEC, to_secs};
use crate::mem;
use crate::sim::{Sim, SimError, SimOptions, WorkflowOutcome};

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

/// Writes `<dir>/<name>.csv` and `<dir>/<name>-perf.csv`.
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
    Ok(())
}
