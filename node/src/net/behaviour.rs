//! The swarm's behaviours (the derive generates `BehaviourEvent`, one variant per field).
#![allow(missing_docs)]

use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{autonat, connection_limits, dcutr, identify, ping, relay, request_response};

use super::FedCodec;

/// The behaviours, in gating order: the per-address handshake limit, then the allow list, so
/// that a stranger is refused before any other behaviour creates a handler for its connection.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// First: counts handshakes per remote address (see [`super::pending`]).
    pub(super) pending: super::pending::PendingPerIp,
    pub(super) allowed: allow_block_list::Behaviour<AllowedPeers>,
    pub(super) limits: connection_limits::Behaviour,
    pub(super) fed: request_response::Behaviour<FedCodec>,
    pub(super) ping: ping::Behaviour,
    /// Raw streams (`/kaapana/results/1`); after the gates, like every protocol.
    pub(super) stream: libp2p_stream::Behaviour,
    /// Observed addresses (what a peer sees this node's connection come from: behind NAT,
    /// the router's mapping), which hole punching and AutoNAT start from.
    pub(super) identify: identify::Behaviour,
    /// Circuits through relays this node reserved a slot at (`network.relays`), inbound and
    /// outbound.
    pub(super) relay_client: relay::client::Behaviour,
    /// Relaying for registered instances (`network.relay_service`, `kaapana-node relay`).
    pub(super) relay: Toggle<relay::Behaviour>,
    /// Upgrading a relayed connection to a direct one (`network.hole_punching`).
    pub(super) dcutr: Toggle<dcutr::Behaviour>,
    /// Whether this node is reachable from outside, asked of its peers (`network.autonat`).
    pub(super) autonat: Toggle<autonat::Behaviour>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}
