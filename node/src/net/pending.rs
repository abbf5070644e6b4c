//! A limit on inbound connections still in their handshake, per remote IP address.
//!
//! libp2p's `connection_limits` bounds pending inbound connections globally: a stranger that
//! opens many connections and never finishes a handshake (or sends garbage) fills every slot,
//! and registered instances are denied with it. Counting per IP address keeps a flood from one
//! host to its own few slots.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// The behaviour: counts pending inbound connections per remote IP and denies those above
/// the limit.
#[derive(Debug)]
pub struct PendingPerIp {
    max: u32,
    per_ip: HashMap<IpAddr, u32>,
    pending: HashMap<ConnectionId, IpAddr>,
}

/// Too many handshakes from one address at once.
#[derive(Debug, thiserror::Error)]
#[error("more than {max} inbound handshakes at once from {ip}")]
pub(crate) struct TooManyPending {
    ip: IpAddr,
    max: u32,
}

impl PendingPerIp {
    /// At most `max` pending inbound connections per remote IP address.
    pub fn new(max: u32) -> Self {
        Self { max, per_ip: HashMap::new(), pending: HashMap::new() }
    }

    fn release(&mut self, id: ConnectionId) {
        if let Some(ip) = self.pending.remove(&id)
            && let Some(n) = self.per_ip.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl NetworkBehaviour for PendingPerIp {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else { return Ok(()) };
        let n = self.per_ip.entry(ip).or_default();
        if *n >= self.max {
            return Err(ConnectionDenied::new(TooManyPending { ip, max: self.max }));
        }
        *n += 1;
        self.pending.insert(id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        _peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.release(id);
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        // Every inbound connection that fails or is denied, in its handshake or by another
        // behaviour once established, ends here.
        if let FromSwarm::ListenFailure(f) = event {
            self.release(f.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_own_few_slots_and_they_come_back() {
        let mut b = PendingPerIp::new(2);
        let stranger: Multiaddr = "/ip4/10.0.0.9/tcp/4000".parse().unwrap();
        let friend: Multiaddr = "/ip4/10.0.0.2/tcp/4000".parse().unwrap();
        let local: Multiaddr = "/ip4/10.0.0.1/tcp/7400".parse().unwrap();
        let ids: Vec<ConnectionId> = (0..4).map(|_| ConnectionId::new_unchecked(0)).collect();
        let (a, c) = (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2));
        assert!(b.handle_pending_inbound_connection(a, &local, &stranger).is_ok());
        assert!(b.handle_pending_inbound_connection(c, &local, &stranger).is_ok());
        let third = ConnectionId::new_unchecked(3);
        assert!(b.handle_pending_inbound_connection(third, &local, &stranger).is_err());
        // Another address is not affected.
        assert!(b.handle_pending_inbound_connection(ids[0], &local, &friend).is_ok());
        // A slot comes back when a handshake ends.
        assert!(
            b.handle_established_inbound_connection(a, PeerId::random(), &local, &stranger).is_ok()
        );
        assert!(b.handle_pending_inbound_connection(third, &local, &stranger).is_ok());
        b.release(c);
        b.release(c);
        assert_eq!(b.per_ip.get(&ip_of(&stranger).unwrap()), Some(&1));
    }
}
