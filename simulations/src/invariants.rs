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
//! - a workflow that failed or was cancelled says why; a finished one has every job done.

use std::collections::HashMap;
use std::fmt;

use kaapana_federation::WorkflowState;
use kaapana_protocol::JobId;

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
}
