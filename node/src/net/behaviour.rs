//! The swarm's behaviours (the derive generates `BehaviourEvent`, one variant per field).
#![allow(missing_docs)]

use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{connection_limits, ping, request_response};

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
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}
