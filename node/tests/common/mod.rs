//! Shared helpers for the node's end-to-end tests: real `kaapana-node` processes on real
//! data directories.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod airflow;
pub mod browser;
pub mod containerd;
pub mod model;
pub mod nat;
pub mod netns;
pub mod orthanc;
pub mod training;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test: cargo's for tests; for an example (which cargo gives no binary
/// path), `$KAAPANA_NODE_BIN` or `kaapana-node` beside the example's folder
/// (`target/<profile>/examples/..`).
pub fn kaapana_node() -> Command {
    let mut c = Command::new(node_binary());
    c.env_remove("KAAPANA_NODE_DATA_DIR").env("NO_COLOR", "1");
    c
}

pub fn node_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_kaapana-node") {
        return PathBuf::from(path);
    }
    if let Some(path) = std::env::var_os("KAAPANA_NODE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join("kaapana-node");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p kaapana-node --bin kaapana-node) or set \
         KAAPANA_NODE_BIN",
        path.display()
    );
    path
}

/// One site: a data directory used through the CLI.
#[derive(Debug)]
pub struct Site {
    /// The instance's name.
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
}

impl Site {
    /// A site whose data directory will be `root/name` (not initialised yet).
    pub fn new(root: &Path, name: &str) -> Self {
        Self { name: name.to_owned(), dir: root.join(name) }
    }

    /// `init`s a site with loopback addresses.
    pub fn init(root: &Path, name: &str) -> Self {
        let site = Self::new(root, name);
        site.ok(&["init", "--name", name, "--listen", "/ip4/127.0.0.1/tcp/0"]);
        site
    }

    /// Runs `kaapana-node ARGS --data-dir DIR`.
    pub fn run(&self, args: &[&str]) -> Output {
        kaapana_node().args(args).arg("--data-dir").arg(&self.dir).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "`kaapana-node {}` failed for {}:\n{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "`kaapana-node {}` unexpectedly succeeded for {}:\n{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Exports the bundle into `root/<name>.bundle` and returns its path.
    pub fn export(&self, root: &Path) -> PathBuf {
        let path = root.join(format!("{}.bundle", self.name));
        self.ok(&["instance", "export", "--out", path.to_str().unwrap()]);
        path
    }

    /// The fingerprint `info` shows.
    pub fn fingerprint(&self) -> String {
        self.info_field("fingerprint")
    }

    /// The instance id `info` shows.
    pub fn instance_id(&self) -> String {
        self.info_field("instance id")
    }

    fn info_field(&self, field: &str) -> String {
        let info = self.ok(&["info"]);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in info output:\n{info}"))
            .trim()
            .to_owned()
    }

    /// Registers `other` from its bundle with a permissive policy, checking its fingerprint.
    pub fn register(&self, other: &Site, bundle: &Path) {
        let fp = other.fingerprint();
        self.ok(&[
            "instance",
            "add",
            bundle.to_str().unwrap(),
            "--expect-fingerprint",
            &fp,
            "--allow-any-workflow",
            "--allow-any-dataset",
            "--auto-execute",
        ]);
    }
}

// ----- running daemons -----

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kaapana_node::api::InstanceView;
use kaapana_node::client::ApiClient;
use kaapana_node::daemon::Event;

/// A port on 127.0.0.1 that is free for TCP and UDP right now (for TCP and QUIC listeners
/// that must keep their address across restarts). It is taken below Linux's ephemeral range
/// (32768 and up), so that no outgoing connection of another node can grab it before the
/// node that owns it starts listening.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 600) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = if port >= 32_000 { 20_000 + port % 12_000 } else { port };
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

impl Site {
    /// `init`s a site listening on a fixed loopback port (TCP and QUIC) and an API on a
    /// port chosen by the OS.
    pub fn init_networked(root: &Path, name: &str) -> Self {
        let site = Self::new(root, name);
        let port = free_port();
        site.ok(&[
            "init",
            "--name",
            name,
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{port}"),
            "--listen",
            &format!("/ip4/127.0.0.1/udp/{port}/quic-v1"),
            "--api-listen",
            "127.0.0.1:0",
        ]);
        // Daemons in tests run no container runtime unless a test gives them one.
        site.set_executor(None);
        site
    }

    /// Configures the executor: `kind = "none"`, or containerd at `socket`.
    pub fn set_executor(&self, containerd_socket: Option<&Path>) {
        self.set_executor_pulling(containerd_socket, None);
    }

    /// [`Site::set_executor`], pulling missing images over plain HTTP from `repository`.
    pub fn set_executor_pulling(&self, containerd_socket: Option<&Path>, repository: Option<&str>) {
        let path = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (start, rest) = text.split_at(text.find("[executor]").unwrap());
        let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 1);
        let section = match containerd_socket {
            None => "[executor]\nkind = \"none\"\n".to_owned(),
            Some(s) => format!(
                "[executor]\nkind = \"containerd\"\ncontainerd_address = {:?}\npull_from = [{}]\ninsecure_registry = true\n",
                s.display().to_string(),
                repository.map(|r| format!("{r:?}")).unwrap_or_default()
            ),
        };
        std::fs::write(&path, format!("{start}{section}{}", &rest[end..])).unwrap();
    }

    /// Starts `kaapana-node run` and waits until it says it runs (it prints its API address).
    pub fn start(&self) -> Daemon {
        self.spawn_daemon(kaapana_node(), Duration::from_secs(60))
    }
}

/// A running `kaapana-node run` process; killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// The instance's name.
    pub name: String,
    /// Its data directory.
    pub dir: PathBuf,
    child: Option<Child>,
    api: Option<ApiClient>,
    log: PathBuf,
}

impl Daemon {
    /// The API client.
    pub fn api(&self) -> &ApiClient {
        self.api.as_ref().unwrap()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Registered instances as the daemon shows them.
    pub fn instances(&self) -> Vec<InstanceView> {
        self.api().instances().unwrap()
    }

    /// One registered instance by name.
    pub fn instance(&self, name: &str) -> Option<InstanceView> {
        self.instances().into_iter().find(|i| i.name == name)
    }

    /// `/metrics`.
    pub fn metrics(&self) -> String {
        let addr = self.api_addr();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        use std::io::{Read, Write};
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// A metric's value (0 when absent), e.g. `kaapana_node_rejections_total{reason="expired"}`.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Where the test reaches the API (behind NAT: the router's forward, not the address the
    /// daemon wrote).
    fn api_addr(&self) -> String {
        match &self.api {
            Some(api) => api.base().trim_start_matches("http://").to_owned(),
            None => std::fs::read_to_string(self.dir.join("api-address")).unwrap(),
        }
    }

    /// Events after `after`, waiting up to `wait` for the first.
    pub fn events(&self, after: u64, wait: Duration) -> Vec<Event> {
        self.api().get(&format!("/v1/events?after={after}&wait_ms={}", wait.as_millis())).unwrap()
    }

    /// The sequence number of the latest event (to wait for what happens after it).
    pub fn last_event(&self) -> u64 {
        self.events(0, Duration::ZERO).last().map_or(0, |e| e.seq)
    }

    /// Waits, event by event, until `cond` holds; panics after `timeout` with the log.
    pub fn wait_until(&self, what: &str, timeout: Duration, cond: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            if cond(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: timed out waiting for {what}\n{}",
                self.name,
                self.log_text()
            );
            // Long-poll: returns as soon as anything happens at the daemon.
            if let Some(e) = self.events(seen, left.min(Duration::from_secs(1))).last() {
                seen = e.seq;
            }
        }
    }

    /// Waits for an event after `after` that satisfies `pred`; returns it.
    pub fn wait_for_event(
        &self,
        after: u64,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + timeout;
        let mut seen = after;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: timed out waiting for an event\n{}",
                self.name,
                self.log_text()
            );
            for e in self.events(seen, left.min(Duration::from_secs(5))) {
                seen = e.seq;
                if pred(&e) {
                    return e;
                }
            }
        }
    }

    /// Submits a job that nobody will run to the instance registered as `runner` (for tests
    /// that play the runner themselves: the owner stores results only of jobs it submitted).
    pub fn submit_placeholder_job(&self, runner: &str) -> kaapana_protocol::JobId {
        let job: kaapana_node::api::OwnerJobView = self
            .api()
            .post(
                "/v1/jobs",
                &kaapana_node::api::SubmitJobRequest {
                    runner: runner.into(),
                    workflow_name: "federated-statistics".into(),
                    job_name: "placeholder".into(),
                    image: format!("sha256:{}", "ab".repeat(32)),
                    command: vec![],
                    env: vec![],
                    dataset: None,
                    timeout_secs: 60,
                    cpu_millis: 0,
                    memory_bytes: 0,
                },
            )
            .unwrap();
        job.job_id.parse().unwrap()
    }

    /// Whether the daemon shows `peer` as connected.
    pub fn is_connected_to(&self, peer: &str) -> bool {
        self.instance(peer).and_then(|i| i.connected).unwrap_or(false)
    }

    /// SIGTERM, then waits for the process; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        child.wait().unwrap().success()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, then waits for the process.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sites that registered each other (every pair, both ways) through the CLI, not running.
pub fn federation(root: &Path, names: &[&str]) -> Vec<Site> {
    let sites: Vec<Site> = names.iter().map(|n| Site::init_networked(root, n)).collect();
    let bundles: Vec<PathBuf> = sites.iter().map(|s| s.export(root)).collect();
    for (i, s) in sites.iter().enumerate() {
        for (j, other) in sites.iter().enumerate() {
            if i != j {
                s.register(other, &bundles[j]);
            }
        }
    }
    sites
}

// ----- a libp2p peer inside the test process -----

use std::sync::{Arc, Condvar, Mutex};

use kaapana_node::net::{FedFrame, NetEvent, NetworkHandle, SendError, SwarmLoop};
use kaapana_protocol::{Delivery, FedRequest, FedResponse, PeerId};
use libp2p::Multiaddr;

impl Site {
    /// The site's PeerId (its instance id).
    pub fn peer_id(&self) -> PeerId {
        self.instance_id().parse().unwrap()
    }

    /// The multiaddresses the site's configuration listens on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let config = kaapana_node::config::Config::load(&self.dir.join("config.toml")).unwrap();
        config.network.listen.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// The site's key.
    pub fn identity(&self) -> kaapana_certs::Identity {
        kaapana_certs::Identity::load(&self.dir.join("identity.key")).unwrap()
    }
}

/// What a [`TestPeer`] observed, for waiting on it.
#[derive(Debug, Default)]
struct PeerLog {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A libp2p node in the test process with a site's key (the daemon's own swarm code), for
/// sending arbitrary frames over a real connection. It answers whatever it is sent with
/// `Accepted`.
#[derive(Debug)]
pub struct TestPeer {
    rt: Option<tokio::runtime::Runtime>,
    net: NetworkHandle,
    cancel: tokio_util::sync::CancellationToken,
    log: Arc<PeerLog>,
    /// The key it runs with.
    pub identity: kaapana_certs::Identity,
}

impl TestPeer {
    /// A peer with `site`'s key (not listening).
    pub fn new(site: &Site) -> Self {
        let identity = site.identity();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let log = Arc::new(PeerLog::default());
        let cancel = tokio_util::sync::CancellationToken::new();
        let net = rt.block_on(async {
            let swarm =
                kaapana_node::net::build_swarm(identity.libp2p_keypair(), &Default::default())
                    .unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let (swarm_loop, net) = SwarmLoop::new(swarm, tx);
            tokio::spawn(swarm_loop.run(cancel.clone()));
            let (handle, log) = (net.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    let line = match ev {
                        NetEvent::Request { peer, frame, channel } => {
                            let n = match &frame {
                                FedFrame::Batch(FedRequest { messages }) => messages.len(),
                                _ => 0,
                            };
                            let _ = handle
                                .respond(channel, FedResponse::Results(vec![Delivery::Accepted; n]))
                                .await;
                            format!("request {peer} {n}")
                        }
                        NetEvent::Connected { peer, .. } => format!("connected {peer}"),
                        NetEvent::Disconnected { peer, remaining, cause, .. } => {
                            format!("disconnected {peer} {remaining} {cause:?}")
                        }
                        other => format!("{other:?}"),
                    };
                    log.lines.lock().unwrap().push(line);
                    log.changed.notify_all();
                }
            });
            net
        });
        Self { rt: Some(rt), net, cancel, log, identity }
    }

    /// Its PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.net.local_peer_id()
    }

    /// A control for raw libp2p streams (`/kaapana/results/1`) on this peer's swarm.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.net.stream_control()
    }

    /// Admits `site` with its QUIC address only (see [`TestPeer::allow`]).
    pub fn allow_quic(&self, site: &Site) {
        let quic: Vec<Multiaddr> =
            site.listen_addrs().into_iter().filter(|a| a.to_string().contains("/quic")).collect();
        assert!(!quic.is_empty(), "{} has no QUIC listen address", site.name);
        self.block_on(self.net.allow(site.peer_id(), quic)).unwrap();
    }

    /// Runs `f` on the peer's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().unwrap().block_on(f)
    }

    /// Admits `site` on this side (our own gating refuses everyone else) with its TCP address.
    /// One address only: dialing TCP and QUIC at once makes two connections, and a request
    /// could go out on the one that loses and is closed.
    pub fn allow(&self, site: &Site) {
        let tcp: Vec<Multiaddr> =
            site.listen_addrs().into_iter().filter(|a| a.to_string().contains("/tcp/")).collect();
        assert!(!tcp.is_empty(), "{} has no TCP listen address", site.name);
        self.block_on(self.net.allow(site.peer_id(), tcp)).unwrap();
    }

    /// Dials `site` (allow it first).
    pub fn dial(&self, site: &Site) {
        self.block_on(self.net.dial(site.peer_id())).unwrap();
    }

    /// Sends one frame to `site` and waits for the answer (fails unless connected).
    pub fn request(&self, site: &Site, frame: FedFrame) -> Result<FedResponse, SendError> {
        self.block_on(self.net.request(site.peer_id(), frame))
    }

    /// Sends envelopes as one batch; returns the verdicts (panics on a refusal).
    pub fn send(&self, site: &Site, messages: Vec<Vec<u8>>) -> Vec<Delivery> {
        match self.request(site, FedFrame::Batch(FedRequest { messages })) {
            Ok(FedResponse::Results(r)) => r,
            other => panic!("expected verdicts from {}, got {other:?}", site.name),
        }
    }

    /// What it observed so far (connections, requests), one line each.
    pub fn log(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Waits until a logged line satisfies `pred`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        while !lines.iter().any(|l| pred(l)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "test peer: timed out waiting for {what}: {lines:#?}");
            lines = self.log.changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Dials `site` and waits until the connection is up.
    pub fn connect(&self, site: &Site, timeout: Duration) {
        self.dial(site);
        let connected = format!("connected {}", site.peer_id());
        self.wait_for(&connected, timeout, |l| l == connected);
    }
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A temporary directory for a test's sites; kept after the test when
/// `KAAPANA_KEEP_TEST_DIRS` is set (to read the daemons' logs after a failure).
pub fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix("kaapana-node-test-").tempdir().unwrap();
    if std::env::var_os("KAAPANA_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test directory: {}", dir.path().display());
    }
    dir
}

// ----- sites on hosts of their own (network namespaces, see `netns`) -----

impl Site {
    /// `init`s a site for node `k` of `net`: libp2p on `10.A.B.k:7400` (TCP), the API on
    /// `10.A.B.k:7401` (reachable from the test process), no executor yet. Its bundle
    /// advertises `advertise` (e.g. a [`netns::Relay`]'s address) instead of its listen
    /// address when given.
    pub fn init_netns(
        root: &Path,
        name: &str,
        net: &netns::Net,
        k: usize,
        advertise: Option<&str>,
    ) -> Self {
        let site = Self::new(root, name);
        let (listen, api) = (net.p2p_addr(k), net.api_listen(k));
        let mut args = vec!["init", "--name", name, "--listen", &listen, "--api-listen", &api];
        if let Some(a) = advertise {
            args.extend_from_slice(&["--advertise", a]);
        }
        site.ok(&args);
        site.set_executor(None);
        site
    }

    /// [`Site::init_netns`] listening on TCP and QUIC (what hole punching through NAT
    /// routers needs), with `relays` (see `network.relays`) and hole punching on or off.
    pub fn init_netns_nat(
        root: &Path,
        name: &str,
        net: &netns::Net,
        k: usize,
        relays: &[String],
        hole_punching: bool,
    ) -> Self {
        let site = Self::new(root, name);
        let (tcp, quic, api) = (net.p2p_addr(k), net.quic_addr(k), net.api_listen(k));
        site.ok(&[
            "init",
            "--name",
            name,
            "--listen",
            &tcp,
            "--listen",
            &quic,
            "--api-listen",
            &api,
        ]);
        site.set_executor(None);
        let list = relays.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(", ");
        site.set_network("relays", &format!("[{list}]"));
        site.set_network("hole_punching", &hole_punching.to_string());
        site
    }

    /// Sets `key = value` (TOML) in the `[network]` section of the site's config.toml.
    pub fn set_network(&self, key: &str, value: &str) {
        self.set_config("network", key, value);
    }

    /// Sets `key = value` (TOML) in the `[section]` of the site's config.toml (the key must
    /// be there: `init` writes every key).
    pub fn set_config(&self, section: &str, key: &str, value: &str) {
        let path = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let header = format!("[{section}]");
        let (start, rest) = text.split_at(text.find(&header).unwrap());
        let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 1);
        let section: String = rest[..end]
            .lines()
            .map(|l| {
                if l.split('=').next().is_some_and(|k| k.trim() == key) {
                    format!("{key} = {value}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(section.contains(&format!("{key} = {value}")), "no key {key} in {header}");
        std::fs::write(&path, format!("{start}{section}{}", &rest[end..])).unwrap();
    }

    /// Sets `[workflows] runner_lost_after_secs`.
    pub fn set_runner_lost_after(&self, secs: u64) {
        let path = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("runner_lost_after_secs"))
            .expect("config.toml has runner_lost_after_secs")
            .to_owned();
        let text = text.replace(&line, &format!("runner_lost_after_secs = {secs}"));
        std::fs::write(&path, text).unwrap();
    }

    /// `init`s a site listening (TCP) on the multiaddress `listen`, its API on `api`
    /// (`IP:PORT`), no executor: for hosts of other topologies (e.g. a [`netns::WanPath`]).
    pub fn init_at(root: &Path, name: &str, listen: &str, api: &str) -> Self {
        let site = Self::new(root, name);
        site.ok(&["init", "--name", name, "--listen", listen, "--api-listen", api]);
        site.set_executor(None);
        site
    }

    /// Starts `kaapana-node run` through `cmd`, a command that runs the node binary (e.g.
    /// [`netns::WanPath::command`] with [`node_binary`]), and waits until it says it runs.
    pub fn start_command(&self, mut cmd: Command) -> Daemon {
        cmd.env_remove("KAAPANA_NODE_DATA_DIR").env("NO_COLOR", "1");
        self.spawn_daemon(cmd, Duration::from_secs(60))
    }

    /// Starts `kaapana-node run` inside node `k`'s namespace of `net` and waits until it says
    /// it runs. The process is the daemon itself (`nsenter` execs it), so [`Daemon::pid`],
    /// [`Daemon::pause`] and [`Daemon::kill`] act on it.
    pub fn start_netns(&self, net: &netns::Net, k: usize) -> Daemon {
        self.start_netns_as(net, k, "run")
    }

    /// [`Site::start_netns`] with `kaapana-node SUBCOMMAND` (`run` or `relay`). Behind NAT,
    /// the test reaches the API through the router's forward.
    pub fn start_netns_as(&self, net: &netns::Net, k: usize, subcommand: &str) -> Daemon {
        let mut cmd = net.command(k, node_binary());
        cmd.env_remove("KAAPANA_NODE_DATA_DIR").env("NO_COLOR", "1");
        let mut d = self.spawn_daemon_as(cmd, subcommand, Duration::from_secs(60));
        if net.is_natted(k) {
            let token = std::fs::read_to_string(self.dir.join("api-token")).unwrap();
            d.api = Some(ApiClient::new(&net.api_addr(k), token.trim()));
        }
        d
    }

    /// Runs `cmd run --data-dir DIR` as the daemon (stderr appended to `DIR/daemon.log`) and
    /// waits up to `timeout` for its API address.
    fn spawn_daemon(&self, cmd: Command, timeout: Duration) -> Daemon {
        self.spawn_daemon_as(cmd, "run", timeout)
    }

    fn spawn_daemon_as(&self, mut cmd: Command, subcommand: &str, timeout: Duration) -> Daemon {
        let log = self.dir.join("daemon.log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut child = cmd
            .arg(subcommand)
            .arg("--data-dir")
            .arg(&self.dir)
            .env("RUST_LOG", "info,kaapana_node=debug")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("API on ").nth(1) {
                    let addr = rest.split(';').next().unwrap_or_default().trim().to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let mut daemon = Daemon {
            name: self.name.clone(),
            dir: self.dir.clone(),
            child: Some(child),
            api: None,
            log,
        };
        match rx.recv_timeout(timeout) {
            Ok(addr) => {
                let token = std::fs::read_to_string(self.dir.join("api-token")).unwrap();
                daemon.api = Some(ApiClient::new(&addr, token.trim()));
            }
            Err(_) => panic!("{} did not start:\n{}", self.name, daemon.log_text()),
        }
        daemon
    }
}

impl Daemon {
    /// Sends `signal` to the daemon's process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// SIGSTOP: the process freezes (its connections stay open, nothing answers).
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`Daemon::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// Whether the process has exited (without reaping it for good: a later `kill`/drop still
    /// works).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }
}

/// Sites on nodes `1..=names.len()` of `net` that registered each other (every pair, both
/// ways, permissive policy) through the CLI, not running. With `relay_delay`, each site
/// advertises a [`netns::Relay`] to itself with that delay, so that every connection between
/// two sites goes through one.
pub fn federation_netns(
    root: &Path,
    net: &netns::Net,
    names: &[&str],
    relay_delay: Option<Duration>,
) -> Vec<Site> {
    let sites: Vec<Site> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let relay = relay_delay.map(|d| net.relay_to(i + 1, d));
            Site::init_netns(root, n, net, i + 1, relay.as_deref())
        })
        .collect();
    let bundles: Vec<PathBuf> = sites.iter().map(|s| s.export(root)).collect();
    for (i, s) in sites.iter().enumerate() {
        for (j, other) in sites.iter().enumerate() {
            if i != j {
                s.register(other, &bundles[j]);
            }
        }
    }
    sites
}

/// splitmix64: a small seeded generator, so that a failing run can be replayed from its seed
/// without a dependency.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Daemon {
    /// The details of the events of `kind` after event `after` (without waiting).
    pub fn event_details(&self, after: u64, kind: &str) -> Vec<String> {
        let events = self.events(after, Duration::ZERO);
        events.into_iter().filter(|e| e.kind == kind).map(|e| e.detail).collect()
    }

    /// Submits a workflow file's text at this (owner) daemon.
    pub fn submit_workflow(&self, toml: &str) -> kaapana_node::api::WorkflowView {
        let req = kaapana_node::api::SubmitWorkflowRequest { toml: toml.to_owned() };
        self.api().post("/v1/workflows", &req).unwrap()
    }

    /// The workflow `id` as its owner shows it.
    pub fn workflow(&self, id: &str) -> kaapana_node::api::WorkflowView {
        self.api().get(&format!("/v1/workflows/{id}")).unwrap()
    }

    /// Waits (at most `limit`) until this daemon has the capability ad of the instance
    /// `name`.
    pub fn wait_for_capabilities(&self, name: &str, limit: Duration) {
        self.wait_until(&format!("{name}'s capabilities"), limit, |d| {
            d.instance(name).is_some_and(|i| i.capabilities.is_some())
        });
    }

    /// Waits (at most `limit`) until the workflow `id` is in `state`; fails at once if it
    /// ends in another state.
    pub fn wait_workflow(
        &self,
        id: &str,
        state: &str,
        limit: Duration,
    ) -> kaapana_node::api::WorkflowView {
        self.wait_until(&format!("workflow {id} {state}"), limit, |d| {
            let w = d.workflow(id);
            assert!(
                w.state == "running" || w.state == state,
                "workflow ended {} instead of {state}: {w:#?}",
                w.state
            );
            w.state == state
        });
        self.workflow(id)
    }
}

/// The statically linked `kaapana-stats` job program (for job images), built once per test
/// process by `kn_build_job_programs` (scripts/common.sh) into its own target folder.
pub fn stats_program() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let out = Command::new("bash")
                .args(["-c", ". scripts/common.sh && kn_build_job_programs"])
                .current_dir(root)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "kn_build_job_programs failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let printed = String::from_utf8(out.stdout).unwrap();
            let path = root.join(printed.lines().last().unwrap_or_default().trim());
            assert!(path.is_file(), "kn_build_job_programs printed {}", path.display());
            path
        })
        .clone()
}

/// The statically linked `kaapana-fedavg` job program (FedAvg of a logistic regression),
/// built next to [`stats_program`].
pub fn fedavg_program() -> PathBuf {
    let path = stats_program().with_file_name("kaapana-fedavg");
    assert!(path.is_file(), "kn_build_job_programs built no {}", path.display());
    path
}
