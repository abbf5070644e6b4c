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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kaapana_protocol::{FED_PROTOCOL, FedResponse};
use libp2p::allow_block_list;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, ping,
    relay,
};
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

/// How the swarm takes part in relaying, hole punching and NAT detection (`[network]`).
#[derive(Debug, Clone, Default)]
pub struct NetOptions {
    /// Relay circuits between registered instances (`network.relay_service`; always for
    /// `kaapana-node relay`).
    pub relay_service: bool,
    /// Upgrade relayed connections to direct ones by hole punching (DCUtR).
    pub hole_punching: bool,
    /// Ask peers whether this node is reachable from outside (AutoNAT); a confirmed address
    /// goes into the bundle this node exports.
    pub autonat: bool,
    /// Relays (registered instances) to reserve a slot at, each ending in `/p2p/<its id>`:
    /// peers reach this node through them when they cannot dial it directly.
    pub relays: Vec<Multiaddr>,
    /// The addresses this node is reachable at (`network.advertise`); empty: its listen
    /// addresses. A relay hands them out with every reservation.
    pub external: Vec<Multiaddr>,
}

impl NetOptions {
    /// Parses `network.relays`: every address must end in `/p2p/<peer id>`.
    pub fn parse_relays(relays: &[String]) -> Result<Vec<Multiaddr>, NetError> {
        relays
            .iter()
            .map(|text| {
                let bad = |detail: String| NetError::BadAddress { addr: text.clone(), detail };
                let addr: Multiaddr = text.parse().map_err(|e: libp2p::multiaddr::Error| bad(e.to_string()))?;
                match addr.iter().last() {
                    Some(Protocol::P2p(_)) => Ok(addr),
                    _ => Err(bad(
                        "a relay's address must end in /p2p/<its instance id as a peer id> (see `kaapana-node instance list` at the relay)".to_owned(),
                    )),
                }
            })
            .collect()
    }
}

/// An error with its sources: `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The peer id at the end of a relay's address.
fn relay_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Which peers the relay service serves (the registered instances) and what it refused.
#[derive(Debug, Default)]
pub struct RelayGate {
    registered: RwLock<HashSet<PeerId>>,
    /// Reservations refused: the asker is not registered here.
    pub reservations_refused: AtomicU64,
    /// Circuits refused: the source is not registered here.
    pub circuits_refused: AtomicU64,
}

impl RelayGate {
    fn admits(&self, peer: &PeerId) -> bool {
        self.registered.read().map(|r| r.contains(peer)).unwrap_or(false)
    }

    fn set(&self, peer: PeerId, registered: bool) {
        if let Ok(mut r) = self.registered.write() {
            if registered {
                r.insert(peer);
            } else {
                r.remove(&peer);
            }
        }
    }
}

/// A built swarm and what its loop needs besides.
#[allow(missing_debug_implementations)]
pub struct NetSwarm {
    swarm: Swarm<Behaviour>,
    gate: Arc<RelayGate>,
    relays: Vec<Multiaddr>,
    /// With the relay service: the addresses to hand out, `None` = the listen addresses.
    relay_external: Option<Vec<Multiaddr>>,
}

/// How long a relayed circuit may last and carry (between registered instances: as long as
/// the connection is needed; a result or a model may be large).
const CIRCUIT_MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
const CIRCUIT_MAX_BYTES: u64 = 1 << 40;

/// Builds the swarm for `keypair`.
pub fn build_swarm(
    keypair: libp2p::identity::Keypair,
    options: &NetOptions,
) -> Result<NetSwarm, NetError> {
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
    let gate = Arc::new(RelayGate::default());
    let local = keypair.public().to_peer_id();
    let relay_server = options.relay_service.then(|| {
        // Only registered instances may reserve a slot or open a circuit (strangers cannot
        // even connect: the allow list closes their connection first; this also holds for a
        // peer removed while connected).
        let (g1, g2) = (Arc::clone(&gate), Arc::clone(&gate));
        let config = relay::Config {
            max_reservations: 1024,
            max_reservations_per_peer: 4,
            max_circuits: 1024,
            max_circuits_per_peer: 64,
            max_circuit_duration: CIRCUIT_MAX_DURATION,
            max_circuit_bytes: CIRCUIT_MAX_BYTES,
            reservation_rate_limiters: vec![Box::new(
                move |peer: PeerId, _: &Multiaddr, _: Instant| {
                    let ok = g1.admits(&peer);
                    if !ok {
                        g1.reservations_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                },
            )],
            circuit_src_rate_limiters: vec![Box::new(
                move |peer: PeerId, _: &Multiaddr, _: Instant| {
                    let ok = g2.admits(&peer);
                    if !ok {
                        g2.circuits_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                },
            )],
            ..relay::Config::default()
        };
        let mut r = relay::Behaviour::new(local, config);
        // Serve without waiting for a confirmed public address (a consortium's relay is
        // reachable by configuration, and registered peers dial it by its bundle).
        r.set_status(Some(relay::Status::Enable));
        r
    });
    let autonat = options.autonat.then(|| {
        autonat::Behaviour::new(
            local,
            autonat::Config {
                // Site networks and the tests' namespaces use private addresses.
                only_global_ips: false,
                boot_delay: Duration::from_secs(5),
                retry_interval: Duration::from_secs(30),
                ..autonat::Config::default()
            },
        )
    });
    let hole_punching = options.hole_punching;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::tls::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| NetError::Transport { what: "TCP/TLS", detail: e.to_string() })?
        .with_quic()
        // Over a circuit, the two instances run TLS 1.3 end to end: the relay forwards bytes
        // it cannot read.
        .with_relay_client(libp2p::tls::Config::new, libp2p::yamux::Config::default)
        .map_err(|e| NetError::Transport { what: "relay", detail: e.to_string() })?
        .with_behaviour(|key, relay_client| Behaviour {
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
            identify: identify::Behaviour::new(
                identify::Config::new("/kaapana/id/1".to_owned(), key.public())
                    .with_agent_version(format!("kaapana-node/{}", env!("CARGO_PKG_VERSION"))),
            ),
            relay_client,
            relay: relay_server.into(),
            dcutr: hole_punching.then(|| dcutr::Behaviour::new(key.public().to_peer_id())).into(),
            autonat: autonat.into(),
        })
        .map_err(|e| NetError::Transport { what: "behaviour", detail: e.to_string() })?
        // Registered peers stay connected; strangers never get this far.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(24 * 3600)))
        .build();
    let relay_external = options.relay_service.then(|| options.external.clone());
    Ok(NetSwarm { swarm, gate, relays: options.relays.clone(), relay_external })
}

/// How a peer is connected: directly, or only through a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// At least one direct connection.
    Direct,
    /// Only relayed connections.
    Relayed,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
        })
    }
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
        /// How the peer is connected now.
        path: Path,
    },
    /// A connection closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
        /// Connections to this peer left.
        remaining: u32,
        /// How the peer is connected now (`None`: not at all).
        path: Option<Path>,
        /// Why, if known.
        cause: Option<String>,
    },
    /// Something about relays, hole punching or reachability, for the event log.
    Nat {
        /// The peer it concerns (a relay, a peer punched to), if any.
        peer: Option<PeerId>,
        /// What happened.
        what: NatEvent,
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

/// Relays, hole punching and reachability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatEvent {
    /// A relay accepted this node's reservation: peers can reach it through it.
    Reserved,
    /// The reservation at a relay ended (the connection to it closed), or the relay did not
    /// give one; it is asked again.
    ReservationLost {
        /// Why.
        reason: String,
        /// Whether there was a reservation.
        had: bool,
    },
    /// The relay service refused a stranger's reservation or circuit.
    RelayRefused {
        /// `reservation` or `circuit`.
        what: &'static str,
    },
    /// A relayed connection became direct.
    HolePunched,
    /// Hole punching failed; the relayed connection stays.
    HolePunchFailed {
        /// Why.
        reason: String,
    },
    /// AutoNAT's verdict changed: `public <address>`, `private` or `unknown`.
    Reachability(String),
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
    Paths(oneshot::Sender<HashMap<PeerId, Path>>),
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

    /// The addresses the swarm listens on, and those confirmed from outside: a relay's
    /// circuit address once it accepted a reservation, an address AutoNAT confirmed.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.command(NetCommand::ListenAddrs(tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// How each connected peer is connected.
    pub async fn paths(&self) -> Result<HashMap<PeerId, Path>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.command(NetCommand::Paths(tx)).await?;
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
    gate: Arc<RelayGate>,
    /// Each peer's connections, and whether each is relayed.
    connections: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    relays: Vec<Relay>,
    /// Refusals already reported.
    refused: (u64, u64),
    /// A relay without advertised addresses: its listen addresses are its external ones.
    external_from_listeners: bool,
    /// Peers whose hole punching failed: (attempts so far, when to try again).
    punch_again: HashMap<PeerId, (u32, Instant)>,
}

/// How often a failed hole punch is tried again (each time on a fresh relayed connection),
/// and the first wait, doubled after each attempt.
const PUNCH_ATTEMPTS: u32 = 5;
const PUNCH_RETRY: Duration = Duration::from_secs(5);

/// A relay this node keeps a reservation at.
struct Relay {
    addr: Multiaddr,
    peer: PeerId,
    listener: Option<ListenerId>,
    /// Whether the relay accepted the listener's reservation.
    reserved: bool,
    /// When to ask again, and the backoff after that.
    retry_at: Instant,
    backoff: Duration,
}

/// The most addresses kept per peer (its bundle's and those it announced).
const MAX_PEER_ADDRS: usize = 64;

/// How often reservations and refusals are looked after.
const RELAY_TICK: Duration = Duration::from_secs(1);
const RELAY_MAX_BACKOFF: Duration = Duration::from_secs(30);

impl SwarmLoop {
    /// Wraps `net`; events go to `events`.
    pub fn new(net: NetSwarm, events: mpsc::Sender<NetEvent>) -> (Self, NetworkHandle) {
        let NetSwarm { mut swarm, gate, relays, relay_external } = net;
        // A relay's reservations carry its addresses (the client refuses one without): the
        // advertised ones, or else every address it listens on (see `NewListenAddr`).
        let external_from_listeners = match relay_external {
            Some(addrs) if !addrs.is_empty() => {
                for a in addrs {
                    swarm.add_external_address(a);
                }
                false
            }
            Some(_) => true,
            None => false,
        };
        let (tx, commands) = mpsc::channel(1024);
        let handle = NetworkHandle {
            tx,
            local_peer: *swarm.local_peer_id(),
            stream: swarm.behaviour().stream.new_control(),
        };
        let now = Instant::now();
        let relays = relays
            .into_iter()
            .filter_map(|addr| {
                let peer = relay_peer(&addr)?;
                Some(Relay {
                    addr,
                    peer,
                    listener: None,
                    reserved: false,
                    retry_at: now,
                    backoff: RELAY_TICK,
                })
            })
            .collect();
        let me = Self {
            swarm,
            commands,
            events,
            pending: HashMap::new(),
            addresses: HashMap::new(),
            gate,
            connections: HashMap::new(),
            relays,
            refused: (0, 0),
            external_from_listeners,
            punch_again: HashMap::new(),
        };
        (me, handle)
    }

    /// How `peer` is connected now.
    fn path(&self, peer: &PeerId) -> Option<Path> {
        let conns = self.connections.get(peer)?;
        if conns.is_empty() {
            None
        } else if conns.values().any(|relayed| !relayed) {
            Some(Path::Direct)
        } else {
            Some(Path::Relayed)
        }
    }

    /// Asks the relays without a reservation again (with backoff), and reports the relay
    /// service's refusals.
    fn tend_relays(&mut self) {
        let now = Instant::now();
        // A failed hole punch is tried again on a fresh relayed connection: DCUtR runs once
        // per relayed connection, so the stale one is closed (the node redials at once; what
        // it carried resumes or is retried from the outbox).
        let due: Vec<PeerId> =
            self.punch_again.iter().filter(|(_, (_, at))| *at <= now).map(|(p, _)| *p).collect();
        for peer in due {
            let relayed: Vec<ConnectionId> = match self.path(&peer) {
                Some(Path::Relayed) => {
                    self.connections[&peer].iter().filter(|(_, r)| **r).map(|(c, _)| *c).collect()
                }
                // Direct meanwhile, or gone: nothing to do.
                _ => {
                    self.punch_again.remove(&peer);
                    continue;
                }
            };
            if let Some(entry) = self.punch_again.get_mut(&peer) {
                entry.1 = now + PUNCH_RETRY * 2u32.pow(entry.0.min(6));
            }
            tracing::info!(%peer, "closing the relayed connection to try hole punching again");
            for c in relayed {
                self.swarm.close_connection(c);
            }
        }

        for r in &mut self.relays {
            if r.listener.is_some() || now < r.retry_at {
                continue;
            }
            r.retry_at = now + r.backoff;
            r.backoff = (r.backoff * 2).min(RELAY_MAX_BACKOFF);
            // Reserving at a relay that is not registered would be refused by the allow list.
            if !self.swarm.behaviour().allowed.allowed_peers().contains(&r.peer) {
                continue;
            }
            match self.swarm.listen_on(r.addr.clone().with(Protocol::P2pCircuit)) {
                Ok(id) => r.listener = Some(id),
                Err(e) => {
                    tracing::warn!(relay = %r.addr, error = %e, "cannot reserve at the relay")
                }
            }
        }
        let refused = (
            self.gate.reservations_refused.load(Ordering::Relaxed),
            self.gate.circuits_refused.load(Ordering::Relaxed),
        );
        for (what, new, old) in
            [("reservation", refused.0, self.refused.0), ("circuit", refused.1, self.refused.1)]
        {
            for _ in old..new {
                let _ = self
                    .events
                    .try_send(NetEvent::Nat { peer: None, what: NatEvent::RelayRefused { what } });
            }
        }
        self.refused = refused;
    }

    /// Runs until `cancel` fires, then closes every connection.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(RELAY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                _ = tick.tick() => self.tend_relays(),
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
                self.gate.set(peer, true);
                for a in &addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                }
                self.addresses.insert(peer, addrs);
            }
            NetCommand::Disallow(peer) => {
                // disallow_peer closes the live connections too.
                b.allowed.disallow_peer(peer);
                self.gate.set(peer, false);
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
                let mut addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                for a in self.swarm.external_addresses() {
                    if !addrs.contains(a) {
                        addrs.push(a.clone());
                    }
                }
                let _ = reply.send(addrs);
            }
            NetCommand::Paths(reply) => {
                let paths =
                    self.connections.keys().filter_map(|p| Some((*p, self.path(p)?))).collect();
                let _ = reply.send(paths);
            }
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) -> Option<NetEvent> {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                if self.external_from_listeners && !is_relayed(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                Some(NetEvent::Listening(address))
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::error!(%error, "listener failed");
                None
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, reason } => {
                if let Some(r) = self.relays.iter_mut().find(|r| r.listener == Some(listener_id)) {
                    // The connection to the relay closed (or it refused): ask again later.
                    r.listener = None;
                    let had = std::mem::replace(&mut r.reserved, false);
                    let reason = match reason {
                        Ok(()) => "the connection to the relay closed".to_owned(),
                        Err(e) => error_chain(&e),
                    };
                    tracing::info!(relay = %r.addr, %reason, "reservation at the relay ended");
                    let peer = Some(r.peer);
                    return Some(NetEvent::Nat {
                        peer,
                        what: NatEvent::ReservationLost { reason, had },
                    });
                }
                if let Err(error) = reason {
                    tracing::error!(?addresses, %error, "listener closed");
                }
                None
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                let (addr, inbound) = match endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address, false),
                    ConnectedPoint::Listener { send_back_addr, .. } => (send_back_addr, true),
                };
                let conns = self.connections.entry(peer_id).or_default();
                conns.insert(connection_id, relayed);
                if !relayed {
                    // A direct connection replaces the relayed ones: what they carry (a result
                    // transfer resumes where it stopped, requests are retried from the outbox)
                    // moves to it, and the relay is relieved.
                    let stale: Vec<ConnectionId> =
                        conns.iter().filter(|(_, r)| **r).map(|(c, _)| *c).collect();
                    for c in stale {
                        self.swarm.close_connection(c);
                    }
                }
                // A relay we hold no reservation at is back: ask it now, not after backoff.
                let mut ask = false;
                for r in
                    self.relays.iter_mut().filter(|r| r.peer == peer_id && r.listener.is_none())
                {
                    r.retry_at = Instant::now();
                    r.backoff = RELAY_TICK;
                    ask = true;
                }
                if ask {
                    self.tend_relays();
                }
                let path = self.path(&peer_id).unwrap_or(Path::Direct);
                Some(NetEvent::Connected {
                    peer: peer_id,
                    addr,
                    inbound,
                    connections: num_established.get(),
                    path,
                })
            }
            SwarmEvent::ConnectionClosed {
                peer_id, connection_id, num_established, cause, ..
            } => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                    if conns.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                Some(NetEvent::Disconnected {
                    peer: peer_id,
                    remaining: num_established,
                    path: self.path(&peer_id),
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
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => {
                // Reported once per listener: renewals (and a repeated accept on a second
                // connection to the relay) are not news.
                let r = self.relays.iter_mut().find(|r| r.peer == relay_peer_id)?;
                r.backoff = RELAY_TICK;
                if std::mem::replace(&mut r.reserved, true) {
                    return None;
                }
                Some(NetEvent::Nat { peer: Some(relay_peer_id), what: NatEvent::Reserved })
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => {
                let what = match result {
                    Ok(_) => {
                        self.punch_again.remove(&remote_peer_id);
                        NatEvent::HolePunched
                    }
                    Err(e) => {
                        let now = Instant::now();
                        let entry = self.punch_again.entry(remote_peer_id).or_insert((0, now));
                        entry.0 += 1;
                        let attempts = entry.0;
                        if attempts >= PUNCH_ATTEMPTS {
                            self.punch_again.remove(&remote_peer_id);
                        } else {
                            entry.1 = now + PUNCH_RETRY * 2u32.pow(attempts - 1);
                        }
                        let again = if attempts < PUNCH_ATTEMPTS {
                            format!("; trying again ({attempts} of {PUNCH_ATTEMPTS})")
                        } else {
                            format!("; gave up after {PUNCH_ATTEMPTS} attempts")
                        };
                        NatEvent::HolePunchFailed { reason: format!("{}{again}", error_chain(&e)) }
                    }
                };
                Some(NetEvent::Nat { peer: Some(remote_peer_id), what })
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let verdict = match new {
                    autonat::NatStatus::Public(addr) => format!("public {addr}"),
                    autonat::NatStatus::Private => "private".to_owned(),
                    autonat::NatStatus::Unknown => "unknown".to_owned(),
                };
                Some(NetEvent::Nat { peer: None, what: NatEvent::Reachability(verdict) })
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                tracing::debug!(peer = %peer_id, observed = %info.observed_addr, "identified");
                // A registered peer's own addresses (its listeners, a relay circuit, what
                // AutoNAT confirmed) join those of its bundle for redialing it.
                if let Some(known) = self.addresses.get_mut(&peer_id) {
                    for a in info.listen_addrs {
                        if known.len() >= MAX_PEER_ADDRS {
                            break;
                        }
                        if !known.contains(&a) {
                            self.swarm.add_peer_address(peer_id, a.clone());
                            known.push(a);
                        }
                    }
                }
                None
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_addresses_must_name_the_relay_and_say_why_not() {
        let id = PeerId::random();
        let good = format!("/ip4/203.0.113.7/tcp/7400/p2p/{id}");
        let parsed = NetOptions::parse_relays(std::slice::from_ref(&good)).unwrap();
        assert_eq!(relay_peer(&parsed[0]), Some(id));
        let e = NetOptions::parse_relays(&["/ip4/203.0.113.7/tcp/7400".to_owned()]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/ip4/203.0.113.7/tcp/7400") && text.contains("/p2p/"), "{text}");
        let e = NetOptions::parse_relays(&["not an address".to_owned()]).unwrap_err();
        assert!(e.to_string().contains("not an address"), "{e}");
        let circuit: Multiaddr = format!("{good}/p2p-circuit").parse().unwrap();
        assert!(is_relayed(&circuit) && !is_relayed(&parsed[0]));
    }

    #[test]
    fn the_relay_gate_admits_registered_peers_only() {
        let gate = RelayGate::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        gate.set(a, true);
        assert!(gate.admits(&a) && !gate.admits(&b));
        gate.set(a, false);
        assert!(!gate.admits(&a));
    }
}
