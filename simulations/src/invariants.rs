//! Invariants checked while a simulation runs.
//!
//! The simulator calls these hooks at the step where each property can break; the first
//! violation is kept and ends the run with [`SimError::Invariant`](crate::SimError). They are
//! on by default in debug builds ([`SimOptions`](crate::SimOptions)); the CLI's
//! `--invariants` turns them on in release builds too.
//!
//! - time never runs backwards;
//! - no job (job id, i.e. one attempt) starts twice, and no attempt beyond the step's retries
//!   starts: a job runs again only when the owner retried it;
//! - no job starts before every job of every step it reads from has finished with its result
//!   stored at the owner, and it lists exactly those results;
//! - every message the sender saw acknowledged is durably recorded at its receiver;
//! - a receiver accepts a sender's messages in the order they were queued (exactly once);
//! - a workflow that failed or was cancelled says why; a finished one has every job done (a
//!   training: every job whose update it aggregated, and every aggregation);
//! - trainings: a train job is dispatched only while its round is open, with the model of the
//!   round before as its only input (none in the first round), and that round's model is
//!   stored; no aggregation is dispatched before its round closed; a round closed with at least
//!   `min_sites` updates of its own, and its aggregation reads exactly the round's updates and
//!   the folded late ones (of the round before), each done with its result stored at the
//!   owner; rounds open and close in order, one at a time; a finished training completed
//!   exactly its rounds (`rounds - first + 1`), each with its model.

use std::collections::HashMap;
use std::fmt;

use std::collections::BTreeSet;

use kaapana_federation::{RoundRecord, Training, Workflow, WorkflowState};
use kaapana_protocol::{JobId, JobManifest, Timestamp};

use crate::engine::{Micros, to_secs};

/// A broken invariant: when and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Virtual time (µs).
    pub at: Micros,
    /// What broke, in words.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at t = {:.3} s: {}", to_secs(self.at), self.what)
    }
}

/// The checker.
#[derive(Debug, Default)]
pub struct Invariants {
    enabled: bool,
    started: HashMap<JobId, u32>,
    violation: Option<Violation>,
    checks: u64,
}

impl Invariants {
    /// A checker; `enabled = false` makes every hook a no-op.
    pub fn new(enabled: bool) -> Self {
        Self { enabled, ..Self::default() }
    }

    /// Whether checks run.
    pub const fn enabled(&self) -> bool {
        self.enabled
    }

    /// How many checks ran.
    pub const fn checks(&self) -> u64 {
        self.checks
    }

    /// The first violation, once (the run stops on it).
    pub fn take_violation(&mut self) -> Option<Violation> {
        self.violation.take()
    }

    /// Records a violation (the first one wins).
    pub fn violate(&mut self, at: Micros, what: impl Into<String>) {
        if self.enabled && self.violation.is_none() {
            self.violation = Some(Violation { at, what: what.into() });
        }
    }

    fn check(&mut self, ok: bool, at: Micros, what: impl FnOnce() -> String) {
        if !self.enabled {
            return;
        }
        self.checks += 1;
        if !ok {
            self.violate(at, what());
        }
    }

    /// An event at `at` follows one at `before`.
    pub fn time_moves_forward(&mut self, before: Micros, at: Micros) {
        self.check(at >= before, at, || {
            format!("an event at {at} µs ran after one at {before} µs")
        });
    }

    /// Job `job` (attempt `attempt` of a step with `max_retries`) starts at site `site`.
    pub fn started_once(
        &mut self,
        at: Micros,
        site: u32,
        job: JobId,
        attempt: u32,
        max_retries: u32,
    ) {
        if !self.enabled {
            return;
        }
        if let Some(first) = self.started.insert(job, site) {
            self.violate(at, format!("job {job} started a second time (at site {site}, first at site {first}) without a retry"));
        }
        self.check(attempt <= max_retries, at, || {
            format!("job {job} runs attempt {attempt}, beyond its {max_retries} retries")
        });
    }

    /// Job `name` starts; `missing` says which of its inputs is not done, if any.
    pub fn inputs_done(&mut self, at: Micros, name: &str, missing: Option<String>) {
        self.check(missing.is_none(), at, || {
            format!(
                "job {name} started before its inputs finished: {}",
                missing.unwrap_or_default()
            )
        });
    }

    /// `sender` saw message `id` acknowledged by `receiver`; `durable` = the receiver has it
    /// in its durable record.
    pub fn acknowledged_is_durable(
        &mut self,
        at: Micros,
        sender: u32,
        receiver: u32,
        id: u64,
        durable: bool,
    ) {
        self.check(durable, at, || {
            format!("message {id} from site {sender} was acknowledged but site {receiver} has not recorded it")
        });
    }

    /// `to` accepts message `id` from `from`, after `last` (the previous one accepted).
    pub fn in_order(&mut self, at: Micros, from: u32, to: u32, last: Option<u64>, id: u64) {
        self.check(last.is_none_or(|l| l < id), at, || {
            format!(
                "site {to} accepted message {id} from site {from} after message {}",
                last.unwrap_or(0)
            )
        });
    }

    /// A workflow ended in `state`, with `reason`.
    pub fn ended_with_reason(&mut self, at: Micros, state: WorkflowState, reason: Option<&str>) {
        let ok = state == WorkflowState::Finished || reason.is_some_and(|r| !r.trim().is_empty());
        self.check(ok, at, || format!("a workflow ended {state} without a reason"));
    }

    /// A workflow finished; `all_done` = each of its jobs finished with its result stored.
    pub fn finished_means_done(&mut self, at: Micros, all_done: bool) {
        self.check(all_done, at, || "a workflow finished with jobs not done".to_owned());
    }

    /// Owner `w` dispatched `job` (`now`: the time of the dispatch); `stored` says whether
    /// the owner stored a job's result. Checks the rounds of a training.
    pub fn training_dispatch(
        &mut self,
        at: Micros,
        now: Timestamp,
        w: &Workflow,
        job: &JobManifest,
        stored: impl Fn(&JobId) -> bool,
    ) {
        if !self.enabled {
            return;
        }
        let Some(t) = &w.training else { return };
        let Some(j) = w.job(&job.job_id) else { return };
        let Some(round) = w.steps.get(j.step).and_then(|s| s.round) else {
            self.violate(at, format!("training {}: job {} is not in a round", w.name, j.name));
            return;
        };
        let what = match round_order(t) {
            Some(e) => Some(e),
            None if round.aggregate => aggregate_ok(w, t, j.step, job, &stored),
            None => train_ok(t, j.step, now, job),
        };
        self.check(what.is_none(), at, || {
            format!("training {}: {}: {}", w.name, j.name, what.unwrap_or_default())
        });
    }

    /// Training `w` finished: it completed exactly its rounds, each with its model, and every
    /// job it used (updates, folded updates, aggregations) is done.
    pub fn training_finished(&mut self, at: Micros, w: &Workflow) {
        let Some(t) = &w.training else { return };
        let expected = (t.rounds.rounds + 1).saturating_sub(t.rounds.first_round()) as usize;
        self.check(t.completed() == expected, at, || {
            format!(
                "training {} finished with {} of its {expected} rounds completed",
                w.name,
                t.completed()
            )
        });
        let order = round_order(t);
        self.check(order.is_none(), at, || {
            format!("training {}: {}", w.name, order.unwrap_or_default())
        });
        let used: BTreeSet<JobId> =
            t.history.iter().flat_map(|r| r.updates.iter().chain(&r.folded)).copied().collect();
        let all_done = w.jobs.iter().all(|j| {
            let aggregate = w.steps.get(j.step).and_then(|s| s.round).is_some_and(|r| r.aggregate);
            j.is_done() || !(aggregate || used.contains(&j.job_id))
        });
        self.check(all_done, at, || {
            format!("training {} finished with an update or an aggregation not done", w.name)
        });
    }
}

/// Whether a training's rounds opened and closed in order: numbered from its first round one
/// after another, each but the last closed with its model, each opened when the one before
/// made its model, and closed after it opened.
fn round_order(t: &Training) -> Option<String> {
    let first = t.rounds.first_round();
    let n = t.history.len();
    for (k, r) in t.history.iter().enumerate() {
        let expected = first.saturating_add(k as u32);
        if r.round != expected {
            return Some(format!("round {} is where round {expected} belongs", r.round));
        }
        if r.closed_at.is_some_and(|c| c < r.opened_at) {
            return Some(format!("round {} closed before it opened", r.round));
        }
        if r.closed_at.is_some() != r.aggregate_step.is_some() {
            return Some(format!("round {} is closed without its aggregation", r.round));
        }
        if r.model.is_some() && r.closed_at.is_none() {
            return Some(format!("round {} made its model before it closed", r.round));
        }
        if k + 1 < n {
            let next = &t.history[k + 1];
            if r.model.is_none() || r.ended_at.is_none_or(|e| e > next.opened_at) {
                return Some(format!(
                    "round {} opened before round {} made its model",
                    next.round, r.round
                ));
            }
        }
        if r.round > t.rounds.rounds {
            return Some(format!("round {} is beyond the last round {}", r.round, t.rounds.rounds));
        }
    }
    None
}

/// A train job of step `step` dispatched at `now`: its round is the one in progress, open
/// (or closing at this very instant), and it reads the model of the round before.
fn train_ok(t: &Training, step: usize, now: Timestamp, job: &JobManifest) -> Option<String> {
    let Some(k) = t.history.iter().position(|r| r.train_step == step) else {
        return Some("its step is no round's train step".to_owned());
    };
    let r = &t.history[k];
    if k + 1 != t.history.len() || r.closed_at.is_some_and(|c| c < now) {
        return Some(format!("dispatched after its round {} closed", r.round));
    }
    let model = k.checked_sub(1).and_then(|p| t.history[p].model);
    let inputs: Vec<_> = job.inputs.iter().map(|i| i.bundle).collect();
    let ok = match (model, k) {
        (Some(m), _) => inputs == [m],
        // The first round reads the resumed model, if any.
        (None, 0) => inputs.len() == usize::from(t.rounds.resume.is_some()),
        (None, _) => false,
    };
    (!ok).then(|| {
        format!(
            "round {} reads {} inputs, not the model of the round before",
            r.round,
            inputs.len()
        )
    })
}

/// An aggregation of step `step`: its round closed with its quorum, and it reads exactly the
/// round's updates and the folded ones, each done and stored.
fn aggregate_ok(
    w: &Workflow,
    t: &Training,
    step: usize,
    job: &JobManifest,
    stored: &impl Fn(&JobId) -> bool,
) -> Option<String> {
    let Some(k) = t.history.iter().position(|r| r.aggregate_step == Some(step)) else {
        return Some("dispatched before its round closed".to_owned());
    };
    let r: &RoundRecord = &t.history[k];
    if r.closed_at.is_none() {
        return Some(format!("dispatched before round {} closed", r.round));
    }
    let min = t.rounds.min_sites as usize;
    if r.updates.len() < min {
        return Some(format!(
            "round {} closed with {} updates, fewer than min_sites = {min}",
            r.round,
            r.updates.len()
        ));
    }
    let step_of = |id: &JobId| w.job(id).map(|j| j.step);
    if let Some(u) = r.updates.iter().find(|u| step_of(u) != Some(r.train_step)) {
        return Some(format!("update {u} of round {} is not a job of its train step", r.round));
    }
    let previous = k.checked_sub(1).map(|p| t.history[p].train_step);
    if let Some(u) = r.folded.iter().find(|u| previous.is_none() || step_of(u) != previous) {
        return Some(format!("folded update {u} of round {} is not of the round before", r.round));
    }
    let listed: BTreeSet<JobId> = job.inputs.iter().map(|i| i.job_id).collect();
    let expected: BTreeSet<JobId> = r.updates.iter().chain(&r.folded).copied().collect();
    if listed != expected || job.inputs.len() != expected.len() {
        return Some(format!(
            "round {} lists {} inputs, not its {} updates and {} folded ones",
            r.round,
            job.inputs.len(),
            r.updates.len(),
            r.folded.len()
        ));
    }
    for i in &job.inputs {
        let done = w.job(&i.job_id).is_some_and(|j| j.is_done() && j.result == Some(i.bundle));
        if !done || !stored(&i.job_id) {
            return Some(format!("update {} is not done and stored at the owner", i.job_name));
        }
    }
    None
}
