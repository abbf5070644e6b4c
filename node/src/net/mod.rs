//! The peer-to-peer network: a libp2p swarm on TCP (TLS 1.3 + yamux) and QUIC that only
//! registered instances can enter, and `/kaapana/fed/1` request-response on it; result
//! bundles travel as raw streams on `/kaapana/results/1` ([`results`]).
//!
//! [`SwarmLoop`] owns the `Swarm` and runs in its own task; [`NetworkHandle`] is its cloneable
//! client (bounded channel, replies over oneshots); everything the swarm observes comes out as
//! a [`NetEvent`]. Gating happens here: `allow_block_list` admits only peers the node allowed
//! (the registered instances), and `connection_limits` bounds the handshakes a stranger can
//! start. A stranger's connection is closed right after the TLS handshake, before any
//! protocol handler exists.

mod behaviour;
mod codec;
pub mod inputs;
mod pending;
pub mod results;

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use kaapana_protocol::{FED_PROTOCOL, FedResponse};
use libp2p::allow_block_list;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, connection_limits, ping};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use behaviour::{Behaviour, BehaviourEvent};
pub use codec::{FedCodec, FedFrame};

/// How long a `/kaapana/fed/1` request may take, including the receiver's durable commit.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a swarm could not be built or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A transport could not be set up.
    #[error("cannot set up the {what} transport: {detail}")]
    Transport {
        /// Which one.
        what: &'static str,
        /// The error.
        detail: String,
    },
    /// A listen address is not a valid multiaddress.
    #[error("listen address `{addr}` is not a valid multiaddress: {detail}")]
    BadAddress {
        /// The address.
        addr: String,
        /// The parser's message.
        detail: String,
    },
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {detail} (is another node using the port?)")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        detail: String,
    },
    /// The swarm task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

/// Inbound handshakes at once from one IP address: a flood from one host keeps to these, and
/// registered instances (other addresses) still get through.
const MAX_PENDING_PER_IP: u32 = 8;

/// Builds the swarm for `keypair`.
pub fn build_swarm(keypair: libp2p::identity::Keypair) -> Result<Swarm<Behaviour>, NetError> {
    let fed = request_response::Behaviour::with_codec(
        FedCodec,
        [(StreamProtocol::new(FED_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(64),
    );
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(256))
        .with_max_pending_outgoing(Some(256))
        .with_max_established_per_peer(Some(4))
        .with_max_established_incoming(Some(2048));
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::tls::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| NetError::Transport { what: "TCP/TLS", detail: e.to_string() })?
        .with_quic()
        .with_behaviour(|_| Behaviour {
            pending: pending::PendingPerIp::new(MAX_PENDING_PER_IP),
            allowed: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            fed,
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(10)),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| NetError::Transport { what: "behaviour", detail: e.to_string() })?
        // Registered peers stay connected; strangers never get this far.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(24 * 3600)))
        .build();
    Ok(swarm)
}

/// What the swarm reports to the node.
#[derive(Debug)]
pub enum NetEvent {
    /// Listening on this address.
    Listening(Multiaddr),
    /// A connection to a registered peer is up.
    Connected {
        /// The peer.
        peer: PeerId,
        /// The remote address.
        addr: Multiaddr,
        /// Whether the peer dialed us.
        inbound: bool,
        /// Connections to this peer now.
        connections: u32,
    },
    /// A connection closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// Connections to this peer left.
        remaining: u32,
        /// Why, if known.
        cause: Option<String>,
    },
    /// A connection was refused by gating (stranger, or limits).
    Denied {
        /// The remote peer, when known.
        peer: Option<PeerId>,
        /// The remote address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Dialing a peer failed.
    DialFailed {
        /// The peer.
        peer: Option<PeerId>,
        /// Why.
        error: String,
    },
    /// A request arrived on `/kaapana/fed/1`; answer it with [`NetworkHandle::respond`].
    Request {
        /// The (registered, connected) peer.
        peer: PeerId,
        /// What it sent.
        frame: FedFrame,
        /// Where the answer goes.
        channel: ResponseChannel<FedResponse>,
    },
    /// A ping round trip.
    Rtt {
        /// The peer.
        peer: PeerId,
        /// The round-trip time.
        rtt: Duration,
    },
}

/// Why a request to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The request did not get an answer.
    #[error("request to {peer} failed: {detail}")]
    Failed {
        /// The peer.
        peer: PeerId,
        /// libp2p's reason.
        detail: String,
    },
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

enum NetCommand {
    Listen(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    Allow(PeerId, Vec<Multiaddr>),
    Disallow(PeerId),
    Dial(PeerId),
    Send(PeerId, FedFrame, oneshot::Sender<Result<FedResponse, SendError>>),
    Respond(ResponseChannel<FedResponse>, FedResponse),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
}

/// The client of the [`SwarmLoop`].
#[derive(Clone)]
pub struct NetworkHandle {
    tx: mpsc::Sender<NetCommand>,
    local_peer: PeerId,
    stream: libp2p_stream::Control,
}

impl std::fmt::Debug for NetworkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkHandle")
            .field("local_peer", &self.local_peer)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NetCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetCommand")
    }
}

impl NetworkHandle {
    /// This node's PeerId.
    pub const fn local_peer_id(&self) -> PeerId {
        self.local_peer
    }

    /// A control for raw streams on this swarm (`/kaapana/results/1`): it opens streams to
    /// peers (dialing them if needed) and accepts inbound ones.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.stream.clone()
    }

    async fn command(&self, c: NetCommand) -> Result<(), NetError> {
        self.tx.send(c).await.map_err(|_| NetError::Stopped)
    }

    /// Starts listening on `addr`.
    pub async fn listen(&self, addr: Multiaddr) -> Result<(), NetError> {
        let (tx, rx) = oneshot::channel();
        self.command(NetCommand::Listen(addr, tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Admits `peer` (a registered instance) and remembers where to dial it.
    pub async fn allow(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NetError> {
        self.command(NetCommand::Allow(peer, addrs)).await
    }

    /// Refuses `peer` from now on and closes its live connections.
    pub async fn disallow(&self, peer: PeerId) -> Result<(), NetError> {
        self.command(NetCommand::Disallow(peer)).await
    }

    /// Dials `peer` at its known addresses, unless it is connected already.
    pub async fn dial(&self, peer: PeerId) -> Result<(), NetError> {
        self.command(NetCommand::Dial(peer)).await
    }

    /// Sends a request to a connected peer and waits for the answer; fails at once if the peer
    /// is not connected (requests never dial: see [`NetworkHandle::dial`]).
    pub async fn request(&self, peer: PeerId, frame: FedFrame) -> Result<FedResponse, SendError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(NetCommand::Send(peer, frame, tx)).await.map_err(|_| SendError::Stopped)?;
        rx.await.map_err(|_| SendError::Stopped)?
    }

    /// Answers an inbound request.
    pub async fn respond(
        &self,
        channel: ResponseChannel<FedResponse>,
        response: FedResponse,
    ) -> Result<(), NetError> {
        self.command(NetCommand::Respond(channel, response)).await
    }

    /// The addresses the swarm listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.command(NetCommand::ListenAddrs(tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }
}

/// Owns the swarm; see the module docs.
#[allow(missing_debug_implementations)]
pub struct SwarmLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<NetCommand>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<FedResponse, SendError>>>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
}

impl SwarmLoop {
    /// Wraps `swarm`; events go to `events`.
    pub fn new(swarm: Swarm<Behaviour>, events: mpsc::Sender<NetEvent>) -> (Self, NetworkHandle) {
        let (tx, commands) = mpsc::channel(1024);
        let handle = NetworkHandle {
            tx,
            local_peer: *swarm.local_peer_id(),
            stream: swarm.behaviour().stream.new_control(),
        };
        let me =
            Self { swarm, commands, events, pending: HashMap::new(), addresses: HashMap::new() };
        (me, handle)
    }

    /// Runs until `cancel` fires, then closes every connection.
    pub async fn run(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                Some(ev) = self.swarm.next() => {
                    if let Some(out) = self.on_swarm_event(ev)
                        && self.events.send(out).await.is_err()
                    {
                        break;
                    }
                }
            }
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(SendError::Stopped));
        }
    }

    fn on_command(&mut self, cmd: NetCommand) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            NetCommand::Listen(addr, reply) => {
                let r = self.swarm.listen_on(addr.clone()).map(|_| ()).map_err(|e| {
                    NetError::Listen { addr: addr.to_string(), detail: e.to_string() }
                });
                let _ = reply.send(r);
            }
            NetCommand::Allow(peer, addrs) => {
                b.allowed.allow_peer(peer);
                for a in &addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                }
                self.addresses.insert(peer, addrs);
            }
            NetCommand::Disallow(peer) => {
                // disallow_peer closes the live connections too.
                b.allowed.disallow_peer(peer);
                self.addresses.remove(&peer);
            }
            NetCommand::Dial(peer) => {
                if self.swarm.is_connected(&peer) {
                    return;
                }
                let addrs = self.addresses.get(&peer).cloned().unwrap_or_default();
                let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                if let Err(e) = self.swarm.dial(opts) {
                    let _ = self
                        .events
                        .try_send(NetEvent::DialFailed { peer: Some(peer), error: e.to_string() });
                }
            }
            NetCommand::Send(peer, frame, reply) => {
                // request_response would dial a disconnected peer itself, around the node's
                // redial backoff (a peer that refuses us would be redialed at once).
                if !self.swarm.is_connected(&peer) {
                    let detail = "not connected".to_owned();
                    let _ = reply.send(Err(SendError::Failed { peer, detail }));
                    return;
                }
                let id = self.swarm.behaviour_mut().fed.send_request(&peer, frame);
                self.pending.insert(id, reply);
            }
            NetCommand::Respond(channel, response) => {
                // The peer may have gone; then there is nobody to answer.
                let _ = b.fed.send_response(channel, response);
            }
            NetCommand::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) -> Option<NetEvent> {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => Some(NetEvent::Listening(address)),
            SwarmEvent::ListenerError { error, .. } => {
                tracing::error!(%error, "listener failed");
                None
            }
            SwarmEvent::ListenerClosed { addresses, reason: Err(error), .. } => {
                tracing::error!(?addresses, %error, "listener closed");
                None
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                let (addr, inbound) = match endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address, false),
                    ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr, true),
                };
                Some(NetEvent::Connected {
                    peer: peer_id,
                    addr,
                    inbound,
                    connections: num_established.get(),
                })
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established, cause, .. } => {
                Some(NetEvent::Disconnected {
                    peer: peer_id,
                    remaining: num_established,
                    cause: cause.map(|c| c.to_string()),
                })
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, peer_id, .. } => {
                Some(NetEvent::Denied {
                    peer: peer_id,
                    addr: send_back_addr.to_string(),
                    reason: error.to_string(),
                })
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                Some(NetEvent::DialFailed { peer: peer_id, error: error.to_string() })
            }
            SwarmEvent::Behaviour(BehaviourEvent::Fed(ev)) => self.on_fed_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            })) => match result {
                Ok(rtt) => Some(NetEvent::Rtt { peer, rtt }),
                Err(error) => {
                    // libp2p-ping no longer closes a connection whose pings fail, and a TCP
                    // connection whose packets are all dropped stays "established" for many
                    // minutes: close it, so that the node sees the peer as gone (and its
                    // workflows can react) and redials.
                    tracing::info!(%peer, %error, "ping failed; closing the connection");
                    self.swarm.close_connection(connection);
                    None
                }
            },
            _ => None,
        }
    }

    fn on_fed_event(
        &mut self,
        ev: request_response::Event<FedFrame, FedResponse>,
    ) -> Option<NetEvent> {
        use request_response::{Event, Message};
        match ev {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                Some(NetEvent::Request { peer, frame: request, channel })
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
                None
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(SendError::Failed { peer, detail: error.to_string() }));
                }
                None
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
                None
            }
            Event::ResponseSent { .. } => None,
        }
    }
}
