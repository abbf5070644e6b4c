//! The node's metrics, in one registry, served as Prometheus text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels naming a message type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `JobManifest`, `CapabilityAd`, ...
    pub kind: String,
}

/// Labels naming a rejection reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `expired`, `bad_signature`, ... (see `RejectReason::label`).
    pub reason: String,
}

/// Labels naming a registered instance and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The instance's name.
    pub peer: String,
    /// `in` (from the instance to this one) or `out` (from this one to it).
    pub direction: String,
}

/// Labels of a message refused for its signer's sake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// The signer's registered name.
    pub peer: String,
    /// The message type (`JobUpdate`, `ResultManifest`, ...).
    pub kind: String,
    /// Why: a job it has no part in (`unknown_job`, `other_runner`, `not_the_owner`,
    /// `other_recipient`), a quota (`inbox_entries`, `inbox_bytes`, `seen_ids`) or a type
    /// that does not travel on `/kaapana/fed/1` (`unsupported_kind`).
    pub reason: String,
}

/// Which way a message went, for the per-instance metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the instance to this one.
    In,
    /// From this instance to it.
    Out,
}

impl Direction {
    const fn as_str(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }
}

/// One registered instance's message counters (see [`Metrics::peer_counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerCounts {
    /// Messages from it accepted here.
    pub messages_in: u64,
    /// Messages to it that it acknowledged.
    pub messages_out: u64,
    /// Its messages or requests refused here.
    pub rejected_in: u64,
    /// Messages of this instance it refused for good.
    pub rejected_out: u64,
}

/// Every metric of the node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Registered instances with at least one live connection.
    pub peers_connected: Gauge,
    /// Instances registered here.
    pub instances_registered: Gauge,
    /// Instances revoked here since the daemon started.
    pub instances_revoked: Counter,
    /// Signed messages accepted (verified and durably recorded), by type.
    pub messages_in: Family<KindLabel, Counter>,
    /// Signed messages delivered to peers (acknowledged by them), by type.
    pub messages_out: Family<KindLabel, Counter>,
    /// Inbound messages or requests refused, by reason.
    pub rejections: Family<ReasonLabel, Counter>,
    /// Connections refused by gating (strangers, limits).
    pub connections_denied: Counter,
    /// Messages waiting in the outbox, over all peers.
    pub outbox_depth: Gauge,
    /// Signed messages exchanged with each registered instance, by direction (accepted here,
    /// or acknowledged by it).
    pub peer_messages: Family<PeerLabel, Counter>,
    /// Messages refused, by instance and direction (`in`: its messages refused here; `out`:
    /// this instance's messages it refused for good).
    pub peer_rejections: Family<PeerLabel, Counter>,
    /// Bytes of input bundles this instance sent to runners (as a workflow's owner).
    pub input_bytes_sent: Counter,
    /// Bytes of input bundles this instance fetched from owners (as a runner).
    pub input_bytes_fetched: Counter,
    /// Reservations and circuits the relay service refused (`what` = `reservation` or
    /// `circuit`): the asker is not registered here.
    pub relay_refused: Family<WhatLabel, Counter>,
    /// Registered instances connected only through a relay.
    pub peers_relayed: Gauge,
    /// Messages of registered instances refused for their signer's sake: about a job it has
    /// no part in, or beyond one of its quotas (`[limits]`).
    pub peer_refused: Family<RefusedLabel, Counter>,
    /// Unexpired message ids held for replay protection (as of the last retention pass).
    pub seen_ids: Gauge,
    /// Expired message ids pruned.
    pub seen_ids_pruned: Counter,
    /// Inbox entries pruned for their age.
    pub inbox_pruned: Counter,
}

/// A `what` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhatLabel {
    /// What.
    pub what: String,
}

impl Metrics {
    /// All metrics at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kaapana_node");
        let peers_connected = Gauge::default();
        registry.register(
            "peers_connected",
            "Registered instances with at least one live connection",
            peers_connected.clone(),
        );
        let instances_registered = Gauge::default();
        registry.register(
            "instances_registered",
            "Instances registered here",
            instances_registered.clone(),
        );
        let instances_revoked = Counter::default();
        registry.register(
            "instances_revoked",
            "Instances revoked here since the daemon started",
            instances_revoked.clone(),
        );
        let messages_in = Family::<KindLabel, Counter>::default();
        registry.register(
            "messages_in",
            "Signed messages accepted: verified and durably recorded",
            messages_in.clone(),
        );
        let messages_out = Family::<KindLabel, Counter>::default();
        registry.register(
            "messages_out",
            "Signed messages delivered to and acknowledged by peers",
            messages_out.clone(),
        );
        let rejections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "rejections",
            "Inbound messages or requests refused, by reason",
            rejections.clone(),
        );
        let connections_denied = Counter::default();
        registry.register(
            "connections_denied",
            "Connections refused by gating (unregistered peers, connection limits)",
            connections_denied.clone(),
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Messages waiting in the outbox for delivery",
            outbox_depth.clone(),
        );
        let peer_messages = Family::<PeerLabel, Counter>::default();
        registry.register(
            "peer_messages",
            "Signed messages exchanged with each registered instance, by direction",
            peer_messages.clone(),
        );
        let peer_rejections = Family::<PeerLabel, Counter>::default();
        registry.register(
            "peer_rejections",
            "Messages refused, by instance and direction (in: refused here; out: refused by it)",
            peer_rejections.clone(),
        );
        let input_bytes_sent = Counter::default();
        registry.register(
            "input_bytes_sent",
            "Bytes of input bundles (upstream results, models) sent to runners as a workflow's owner",
            input_bytes_sent.clone(),
        );
        let input_bytes_fetched = Counter::default();
        registry.register(
            "input_bytes_fetched",
            "Bytes of input bundles fetched from workflows' owners as a runner",
            input_bytes_fetched.clone(),
        );
        let relay_refused = Family::<WhatLabel, Counter>::default();
        registry.register(
            "relay_refused",
            "Relay reservations and circuits refused because the asker is not registered here",
            relay_refused.clone(),
        );
        for what in ["reservation", "circuit"] {
            let _ = relay_refused.get_or_create(&WhatLabel { what: what.to_owned() });
        }
        let peers_relayed = Gauge::default();
        registry.register(
            "peers_relayed",
            "Registered instances connected only through a relay",
            peers_relayed.clone(),
        );
        let peer_refused = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "peer_refused",
            "Messages of registered instances refused for their signer's sake (a job it has no part in, a quota), by signer, type and reason",
            peer_refused.clone(),
        );
        let seen_ids = Gauge::default();
        registry.register(
            "seen_ids",
            "Unexpired message ids held for replay protection",
            seen_ids.clone(),
        );
        let seen_ids_pruned = Counter::default();
        registry.register("seen_ids_pruned", "Expired message ids pruned", seen_ids_pruned.clone());
        let inbox_pruned = Counter::default();
        registry.register(
            "inbox_pruned",
            "Inbox entries pruned for their age ([limits] inbox_retention_secs)",
            inbox_pruned.clone(),
        );
        for reason in kaapana_protocol::RejectReason::ALL {
            let _ = rejections.get_or_create(&ReasonLabel { reason: reason.label().to_owned() });
        }
        Self {
            registry,
            peers_connected,
            instances_registered,
            instances_revoked,
            messages_in,
            messages_out,
            rejections,
            connections_denied,
            outbox_depth,
            peer_messages,
            peer_rejections,
            input_bytes_sent,
            input_bytes_fetched,
            relay_refused,
            peers_relayed,
            peer_refused,
            seen_ids,
            seen_ids_pruned,
            inbox_pruned,
        }
    }

    fn label(peer: &str, direction: Direction) -> PeerLabel {
        PeerLabel { peer: peer.to_owned(), direction: direction.as_str().to_owned() }
    }

    /// Counts a message exchanged with the instance called `peer`.
    pub fn peer_message(&self, peer: &str, direction: Direction) {
        self.peer_messages.get_or_create(&Self::label(peer, direction)).inc();
    }

    /// Counts a message refused, here (`In`) or by the instance called `peer` (`Out`).
    pub fn peer_rejection(&self, peer: &str, direction: Direction) {
        self.peer_rejections.get_or_create(&Self::label(peer, direction)).inc();
    }

    /// Counts a message of the instance called `peer` refused for its sake.
    pub fn peer_refused(&self, peer: &str, kind: &str, reason: &str) {
        let label = RefusedLabel {
            peer: peer.to_owned(),
            kind: kind.to_owned(),
            reason: reason.to_owned(),
        };
        self.peer_refused.get_or_create(&label).inc();
    }

    /// The counters of the instance called `peer` (zero for one never heard of).
    pub fn peer_counts(&self, peer: &str) -> PeerCounts {
        let get = |f: &Family<PeerLabel, Counter>, d| f.get_or_create(&Self::label(peer, d)).get();
        PeerCounts {
            messages_in: get(&self.peer_messages, Direction::In),
            messages_out: get(&self.peer_messages, Direction::Out),
            rejected_in: get(&self.peer_rejections, Direction::In),
            rejected_out: get(&self.peer_rejections, Direction::Out),
        }
    }

    /// Drops the counters of an unregistered instance.
    pub fn forget_peer(&self, peer: &str) {
        for d in [Direction::In, Direction::Out] {
            self.peer_messages.remove(&Self::label(peer, d));
            self.peer_rejections.remove(&Self::label(peer, d));
        }
    }

    /// Counts a rejection.
    pub fn reject(&self, reason: kaapana_protocol::RejectReason) {
        self.rejections.get_or_create(&ReasonLabel { reason: reason.label().to_owned() }).inc();
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
