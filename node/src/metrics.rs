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

/// Every metric of the node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Registered instances with at least one live connection.
    pub peers_connected: Gauge,
    /// Instances registered here.
    pub instances_registered: Gauge,
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
        for reason in kaapana_protocol::RejectReason::ALL {
            let _ = rejections.get_or_create(&ReasonLabel { reason: reason.label().to_owned() });
        }
        Self {
            registry,
            peers_connected,
            instances_registered,
            messages_in,
            messages_out,
            rejections,
            connections_denied,
            outbox_depth,
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
