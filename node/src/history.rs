//! Short in-memory histories of the node's metrics, for the dashboard's charts: each owned
//! workflow's job counts whenever they change, and each registered instance's message counters
//! sampled at a fixed interval.
//!
//! Bounded (workflows, samples per workflow, samples per instance) and not persisted: after a
//! restart the charts start again from the current counts. Nothing here is sent to a peer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use kaapana_federation::JobCounts;
use kaapana_protocol::WorkflowId;
use serde::Serialize;

use crate::metrics::PeerCounts;

/// One workflow's job counts at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WorkflowSample {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Not dispatched yet.
    pub waiting: u32,
    /// Dispatched and not running yet (queued, pending, awaiting approval, scheduled).
    pub queued: u32,
    /// Running.
    pub running: u32,
    /// Finished.
    pub finished: u32,
    /// Failed.
    pub failed: u32,
}

impl WorkflowSample {
    /// The sample of `counts` at `at_ms`.
    pub fn new(at_ms: u64, c: &JobCounts) -> Self {
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        Self {
            at_ms,
            waiting: n(c.waiting),
            queued: n(c.queued + c.pending + c.awaiting_approval + c.scheduled),
            running: n(c.running),
            finished: n(c.finished),
            failed: n(c.failed),
        }
    }

    fn same_counts(&self, o: &Self) -> bool {
        (self.waiting, self.queued, self.running, self.finished, self.failed)
            == (o.waiting, o.queued, o.running, o.finished, o.failed)
    }
}

/// One instance's counters at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PeerSample {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The counters then (cumulative).
    pub counts: PeerCounts,
}

/// The histories.
#[derive(Debug, Default)]
pub struct History {
    workflows: Mutex<Workflows>,
    peers: Mutex<HashMap<String, VecDeque<PeerSample>>>,
}

#[derive(Debug, Default)]
struct Workflows {
    series: HashMap<WorkflowId, Vec<WorkflowSample>>,
    /// Insertion order, for evicting the oldest workflow's series.
    order: VecDeque<WorkflowId>,
}

impl History {
    /// Workflows whose series are kept (the oldest go first).
    pub const WORKFLOWS: usize = 2_000;
    /// Samples kept per workflow: when full, every other one is dropped (the chart keeps its
    /// shape at half the resolution).
    pub const SAMPLES_PER_WORKFLOW: usize = 512;
    /// Samples kept per instance (at the daemon's 10 s interval: the last hour).
    pub const SAMPLES_PER_PEER: usize = 360;

    /// Records a workflow's counts if they changed.
    pub fn workflow_counts(&self, id: WorkflowId, sample: WorkflowSample) {
        let mut w = self.workflows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !w.series.contains_key(&id) {
            if w.order.len() >= Self::WORKFLOWS
                && let Some(old) = w.order.pop_front()
            {
                w.series.remove(&old);
            }
            w.order.push_back(id);
        }
        let series = w.series.entry(id).or_default();
        if series.last().is_some_and(|last| last.same_counts(&sample)) {
            return;
        }
        if series.len() >= Self::SAMPLES_PER_WORKFLOW {
            // Keep the first and thin out the rest.
            let mut k = 0;
            series.retain(|_| {
                k += 1;
                k == 1 || k % 2 == 0
            });
        }
        series.push(sample);
    }

    /// A workflow's recorded counts, oldest first.
    pub fn workflow(&self, id: &WorkflowId) -> Vec<WorkflowSample> {
        let w = self.workflows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.series.get(id).cloned().unwrap_or_default()
    }

    /// Records every listed instance's counters at `at_ms`; forgets instances not listed.
    pub fn sample_peers(&self, at_ms: u64, counts: BTreeMap<String, PeerCounts>) {
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        peers.retain(|name, _| counts.contains_key(name));
        for (name, counts) in counts {
            let series = peers.entry(name).or_default();
            if series.len() >= Self::SAMPLES_PER_PEER {
                series.pop_front();
            }
            series.push_back(PeerSample { at_ms, counts });
        }
    }

    /// An instance's samples, oldest first.
    pub fn peer(&self, name: &str) -> Vec<PeerSample> {
        let peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        peers.get(name).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(running: usize, finished: usize) -> JobCounts {
        JobCounts { running, finished, ..JobCounts::default() }
    }

    #[test]
    fn a_workflow_series_records_changes_only_and_stays_bounded() {
        let h = History::default();
        let id = WorkflowId::from_bytes([1; 16]);
        h.workflow_counts(id, WorkflowSample::new(1, &counts(2, 0)));
        h.workflow_counts(id, WorkflowSample::new(2, &counts(2, 0)));
        h.workflow_counts(id, WorkflowSample::new(3, &counts(1, 1)));
        let s = h.workflow(&id);
        assert_eq!(s.iter().map(|s| s.at_ms).collect::<Vec<_>>(), [1, 3]);
        for t in 0..10 * History::SAMPLES_PER_WORKFLOW {
            h.workflow_counts(id, WorkflowSample::new(10 + t as u64, &counts(t % 2, t)));
        }
        let s = h.workflow(&id);
        assert!(s.len() <= History::SAMPLES_PER_WORKFLOW, "{}", s.len());
        assert_eq!(s.first().unwrap().at_ms, 1, "the first sample stays");
        assert_eq!(s.last().unwrap().finished as usize, 10 * History::SAMPLES_PER_WORKFLOW - 1);
        assert!(s.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    }

    #[test]
    fn old_workflows_are_evicted_first() {
        let h = History::default();
        for i in 0..=History::WORKFLOWS as u32 {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            h.workflow_counts(WorkflowId::from_bytes(b), WorkflowSample::new(1, &counts(1, 0)));
        }
        assert!(h.workflow(&WorkflowId::from_bytes([0; 16])).is_empty());
        let mut last = [0; 16];
        last[..4].copy_from_slice(&(History::WORKFLOWS as u32).to_be_bytes());
        assert_eq!(h.workflow(&WorkflowId::from_bytes(last)).len(), 1);
    }

    #[test]
    fn peer_samples_roll_and_unregistered_peers_are_forgotten() {
        let h = History::default();
        let c = |n| PeerCounts { messages_in: n, ..PeerCounts::default() };
        for t in 0..History::SAMPLES_PER_PEER as u64 + 5 {
            h.sample_peers(t, BTreeMap::from([("a".to_owned(), c(t)), ("b".to_owned(), c(0))]));
        }
        let a = h.peer("a");
        assert_eq!(a.len(), History::SAMPLES_PER_PEER);
        assert_eq!(a.first().unwrap().at_ms, 5);
        h.sample_peers(1000, BTreeMap::from([("a".to_owned(), c(1))]));
        assert!(h.peer("b").is_empty());
    }
}
