//! A bounded log of what the daemon observed, for `/v1/events` (long-poll) and tests that
//! assert on events instead of sleeping.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use kaapana_protocol::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One observation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Increases by one per event, from 1.
    pub seq: u64,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
    /// What happened: `peer_connected`, `peer_disconnected`, `connection_denied`,
    /// `dial_failed`, `message_accepted`, `message_rejected`, `request_refused`,
    /// `capabilities_received`, `instance_added`, `instance_removed`, `delivered`,
    /// `delivery_rejected`, `job_submitted`, `job_received`, `job_refused`, `job_state`,
    /// `job_update_ignored`, `image_pulled`, `result_sent`, `result_retry`, `result_failed`,
    /// `result_received`, `result_incomplete`, `result_rejected`.
    pub kind: String,
    /// The peer concerned, if any.
    pub peer: Option<String>,
    /// Details: a reason, a message kind and id, ...
    pub detail: String,
}

/// The log: the last [`EventLog::CAPACITY`] events and a signal for waiters.
#[derive(Debug)]
pub struct EventLog {
    events: Mutex<VecDeque<Event>>,
    latest: watch::Sender<u64>,
}

impl EventLog {
    /// Events kept.
    pub const CAPACITY: usize = 10_000;

    /// An empty log.
    pub fn new() -> Self {
        Self { events: Mutex::new(VecDeque::new()), latest: watch::Sender::new(0) }
    }

    /// Records an event.
    pub fn push(&self, now: Timestamp, kind: &'static str, peer: Option<String>, detail: String) {
        let mut events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = events.back().map_or(1, |e| e.seq + 1);
        tracing::debug!(kind, ?peer, %detail, "event");
        events.push_back(Event {
            seq,
            at_ms: now.as_millis(),
            kind: kind.to_owned(),
            peer,
            detail,
        });
        if events.len() > Self::CAPACITY {
            events.pop_front();
        }
        drop(events);
        self.latest.send_replace(seq);
    }

    /// The events after `after`; waits up to `wait` for one if there is none yet.
    pub async fn after(&self, after: u64, wait: Duration) -> Vec<Event> {
        let mut rx = self.latest.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|latest| *latest > after)).await;
        let events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        events.iter().filter(|e| e.seq > after).cloned().collect()
    }
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}
