//! A bounded log of what the daemon observed, for `/v1/events` (long-poll) and tests that
//! assert on events instead of sleeping.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use kaapana_protocol::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What an [`Event`] is about: its `kind` field is [`EventKind::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// `peer_connected`.
    PeerConnected,
    /// `peer_disconnected`.
    PeerDisconnected,
    /// `connection_denied`.
    ConnectionDenied,
    /// `dial_failed`.
    DialFailed,
    /// `message_accepted`.
    MessageAccepted,
    /// `message_rejected`.
    MessageRejected,
    /// `request_refused`.
    RequestRefused,
    /// `capabilities_received`.
    CapabilitiesReceived,
    /// `instance_added`.
    InstanceAdded,
    /// `instance_removed`.
    InstanceRemoved,
    /// `policy_changed`: what a registered instance may do here changed.
    PolicyChanged,
    /// `dataset_added`.
    DatasetAdded,
    /// `delivered`.
    Delivered,
    /// `delivery_rejected`.
    DeliveryRejected,
    /// `workflow_submitted`.
    WorkflowSubmitted,
    /// `workflow_progress`.
    WorkflowProgress,
    /// `workflow_ended`.
    WorkflowEnded,
    /// `job_submitted`.
    JobSubmitted,
    /// `job_received`.
    JobReceived,
    /// `job_refused`.
    JobRefused,
    /// `job_state`.
    JobState,
    /// `job_update_ignored`.
    JobUpdateIgnored,
    /// `job_given_up`.
    JobGivenUp,
    /// `image_pulled`.
    ImagePulled,
    /// `staging_failed`: a job's data could not be staged (with the series and the PACS; this
    /// site's event log only, never sent to a peer).
    StagingFailed,
    /// `input_fetched`: a runner holds an input of its job (fetched from the owner, or here
    /// already).
    InputFetched,
    /// `input_served`: the owner sent (or refused) an input to a runner.
    InputServed,
    /// `result_sent`.
    ResultSent,
    /// `result_retry`.
    ResultRetry,
    /// `result_failed`.
    ResultFailed,
    /// `result_refused`.
    ResultRefused,
    /// `result_received`.
    ResultReceived,
    /// `result_incomplete`.
    ResultIncomplete,
    /// `result_rejected`.
    ResultRejected,
    /// `relay`: a reservation at a relay accepted or lost, a stranger's reservation or circuit
    /// refused by the relay service.
    Relay,
    /// `hole_punch`: a relayed connection became direct, or could not.
    HolePunch,
    /// `instance_revoked`: an instance was revoked here (by the admin, the federation CA's
    /// list, or its hand-over to a new key).
    InstanceRevoked,
    /// `revocation_list`: a federation CA's revocation list was adopted here.
    RevocationList,
    /// `instance_rotated`: a registered instance handed over to a new key.
    InstanceRotated,
    /// `key_rotation`: this instance prepared a new key, or switched to it.
    KeyRotation,
    /// `reachability`: AutoNAT's verdict on whether this node is reachable from outside.
    Reachability,
    /// `retention`: a retention pass pruned expired message ids or old inbox entries.
    Retention,
}

impl EventKind {
    /// The kind's name as events carry it (stable: tools and tests match on it).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PeerConnected => "peer_connected",
            Self::PeerDisconnected => "peer_disconnected",
            Self::ConnectionDenied => "connection_denied",
            Self::DialFailed => "dial_failed",
            Self::MessageAccepted => "message_accepted",
            Self::MessageRejected => "message_rejected",
            Self::RequestRefused => "request_refused",
            Self::CapabilitiesReceived => "capabilities_received",
            Self::InstanceAdded => "instance_added",
            Self::InstanceRemoved => "instance_removed",
            Self::PolicyChanged => "policy_changed",
            Self::InstanceRevoked => "instance_revoked",
            Self::RevocationList => "revocation_list",
            Self::InstanceRotated => "instance_rotated",
            Self::KeyRotation => "key_rotation",
            Self::DatasetAdded => "dataset_added",
            Self::Delivered => "delivered",
            Self::DeliveryRejected => "delivery_rejected",
            Self::WorkflowSubmitted => "workflow_submitted",
            Self::WorkflowProgress => "workflow_progress",
            Self::WorkflowEnded => "workflow_ended",
            Self::JobSubmitted => "job_submitted",
            Self::JobReceived => "job_received",
            Self::JobRefused => "job_refused",
            Self::JobState => "job_state",
            Self::JobUpdateIgnored => "job_update_ignored",
            Self::JobGivenUp => "job_given_up",
            Self::ImagePulled => "image_pulled",
            Self::StagingFailed => "staging_failed",
            Self::InputFetched => "input_fetched",
            Self::InputServed => "input_served",
            Self::ResultSent => "result_sent",
            Self::ResultRetry => "result_retry",
            Self::Relay => "relay",
            Self::HolePunch => "hole_punch",
            Self::Reachability => "reachability",
            Self::Retention => "retention",
            Self::ResultFailed => "result_failed",
            Self::ResultRefused => "result_refused",
            Self::ResultReceived => "result_received",
            Self::ResultIncomplete => "result_incomplete",
            Self::ResultRejected => "result_rejected",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One observation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Increases by one per event, from 1.
    pub seq: u64,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
    /// What happened: an [`EventKind`]'s name.
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
    pub fn push(&self, now: Timestamp, kind: EventKind, peer: Option<String>, detail: String) {
        let mut events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = events.back().map_or(1, |e| e.seq + 1);
        tracing::debug!(kind = kind.as_str(), ?peer, %detail, "event");
        events.push_back(Event {
            seq,
            at_ms: now.as_millis(),
            kind: kind.as_str().to_owned(),
            peer,
            detail,
        });
        if events.len() > Self::CAPACITY {
            events.pop_front();
        }
        drop(events);
        self.latest.send_replace(seq);
    }

    /// The sequence number of the latest event (0 before the first).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
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
