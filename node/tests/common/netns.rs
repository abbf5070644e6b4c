//! A host per node: Linux network namespaces on a private test subnet, and the faults tests
//! apply to them.
//!
//! [`Net::new`] builds, for one test:
//!
//! ```text
//!   root namespace (the test process)          bridge namespace `knXXXX-br`
//!   knXXXXh 10.A.B.254/24  ── veth ──  knXXXXhb ─┐
//!                                                 br0
//!   node namespace `knXXXX-n1`                    │
//!   eth0 10.A.B.1/24  ─────────── veth ── knXXXXb1┤
//!   node namespace `knXXXX-n2`                    │
//!   eth0 10.A.B.2/24  ─────────── veth ── knXXXXb2┘
//! ```
//!
//! Each node's daemon runs inside its namespace (`nsenter --net=/run/netns/knXXXX-nK`),
//! listens on `10.A.B.K:7400` (libp2p) and serves its API on `10.A.B.K:7401`, which the test
//! process reaches through its own veth (`.254`). Subnets and names are unique per test and
//! process, and only the test's own namespaces and links are ever touched.
//!
//! Faults act inside a node's namespace, on its `eth0`, through one nftables table `inet kn`
//! rebuilt on every change: [`Net::cut`] (drop everything), [`Net::loss`] (`numgen random mod
//! 100 < N drop` on what arrives), [`Net::throttle`] (a byte-rate limit on what arrives from
//! one address). The test's own API traffic (from `.254` to port 7401) is always let through,
//! so a cut node can still be asked for its state. This kernel has no `netem`: latency comes
//! from [`Relay`], a delaying TCP relay in the test process that nodes dial instead of each
//! other (they advertise the relay's address in their bundles).
//!
//! Everything is removed in `Drop`, also when the test panics: relays stop, processes still
//! inside the namespaces are killed, the host veth and the namespaces are deleted. Namespaces
//! of a test process that died without cleaning up (SIGKILL) are swept by the next [`Net::new`]:
//! each test records its prefix and pid under `/run/kaapana-node-tests/`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The libp2p port of every node (each namespace has its own ports).
pub const P2P_PORT: u16 = 7400;
/// The API port of every node.
pub const API_PORT: u16 = 7401;

/// Where tests record which prefixes they own (for sweeping after a killed test process).
const REGISTRY: &str = "/run/kaapana-node-tests";

/// Runs `ip`/`nft`/... and panics with its output when it fails.
fn run(program: &str, args: &[&str]) -> String {
    run_with_input(program, args, None)
}

fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run `{program}`: {e} (the fault tests need root and Debian's iproute2, \
             nftables and util-linux; scripts/test installs them)"
        )
    });
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        input.map(|i| format!("\ninput:\n{i}")).unwrap_or_default()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`run`], but only reports failure (for cleanup, which must go on).
fn try_run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The faults currently applied to one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Faults {
    cut: bool,
    /// With `cut`: refuse actively (TCP resets, ICMP unreachable) instead of dropping.
    reject: bool,
    loss_percent: u8,
    /// Byte rates per source address.
    throttles: BTreeMap<String, u64>,
}

/// One test's network: a bridge, `n` node namespaces and the test process's own veth.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    subnet: String,
    nodes: usize,
    /// Which nodes sit behind a NAT router of their own (index = node).
    natted: Vec<bool>,
    faults: Mutex<Vec<Faults>>,
    relays: Mutex<Vec<Relay>>,
    registry_file: PathBuf,
}

impl Net {
    /// Builds the network with nodes `1..=n` (at most 200). Panics with the failing command
    /// if the machine cannot (not root, no iproute2).
    pub fn new(n: usize) -> Self {
        Self::with_nat(n, &[])
    }

    /// [`Net::new`], with the nodes in `natted` each behind a NAT router of its own (see
    /// [`Net::router_ns`]): they can dial out, nobody can dial in.
    pub fn with_nat(n: usize, natted: &[usize]) -> Self {
        assert!((1..=200).contains(&n), "1 to 200 nodes");
        assert!(natted.iter().all(|k| (1..=n).contains(k)), "no such node in {natted:?}");
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_dead();
        let pid = std::process::id();
        let existing = run("ip", &["netns", "list"]);
        let addresses = run("ip", &["-o", "-4", "addr", "show"]);
        let routes = run("ip", &["-4", "route", "show", "table", "all"]);
        let (prefix, subnet) = loop {
            let k = COUNTER.fetch_add(1, Ordering::SeqCst);
            let tag = (pid.wrapping_mul(2_654_435_761) >> 8).wrapping_add(k.wrapping_mul(40_503));
            let prefix = format!("kn{:04x}", tag & 0xffff);
            // Second octet from the pid, third from the counter: parallel tests of one binary
            // differ in the third, concurrent binaries (almost always) in the second.
            let subnet = format!("10.{}.{}", 200 + (pid + k / 256) % 50, k % 256);
            let busy = existing.lines().any(|l| l.starts_with(&format!("{prefix}-")))
                || addresses.contains(&format!(" {subnet}."))
                || routes.contains(&format!("{subnet}."));
            if !busy {
                break (prefix, subnet);
            }
            assert!(k < 100_000, "no free subnet or prefix");
        };
        std::fs::create_dir_all(REGISTRY).unwrap();
        let registry_file = Path::new(REGISTRY).join(&prefix);
        std::fs::write(&registry_file, pid.to_string()).unwrap();
        let net = Self {
            prefix,
            subnet,
            nodes: n,
            natted: (0..=n).map(|k| natted.contains(&k)).collect(),
            faults: Mutex::new(vec![Faults::default(); n + 1]),
            relays: Mutex::new(Vec::new()),
            registry_file,
        };
        // From here on, Drop removes whatever was made, also if a command below fails.
        net.build();
        net
    }

    fn build(&self) {
        let br = self.bridge_ns();
        run("ip", &["netns", "add", &br]);
        run("ip", &["-n", &br, "link", "set", "lo", "up"]);
        run("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &br, "link", "set", "br0", "up"]);
        for k in 1..=self.nodes {
            if self.natted[k] {
                self.build_natted(k);
                continue;
            }
            let ns = self.ns(k);
            let (inner, outer) = (format!("{}n{k}", self.prefix), format!("{}b{k}", self.prefix));
            run("ip", &["netns", "add", &ns]);
            run("ip", &["link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            run("ip", &["link", "set", &inner, "netns", &ns]);
            run("ip", &["link", "set", &outer, "netns", &br]);
            run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", self.ip(k)), "dev", "eth0"]);
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", &br, "link", "set", &outer, "master", "br0", "up"]);
        }
        let (host, host_peer) = (self.host_if(), format!("{}hb", self.prefix));
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &host_peer]);
        run("ip", &["link", "set", &host_peer, "netns", &br]);
        run("ip", &["-n", &br, "link", "set", &host_peer, "master", "br0", "up"]);
        run("ip", &["addr", "add", &format!("{}/24", self.host_ip()), "dev", &host]);
        run("ip", &["link", "set", &host, "up"]);
        // The bridge forwards once its ports are up; wait until every node answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        for k in 1..=self.nodes {
            while !self.reachable(k) {
                assert!(Instant::now() < deadline, "node {k} of {} is not reachable", self.prefix);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Node `k` behind its router: the router's namespace holds `wan0` on the bridge (with
    /// the node's public address, [`Net::ip`]) and `lan0` (192.168.k.1/24) towards the node's
    /// `eth0` (192.168.k.2/24, default route via the router). The router masquerades what
    /// leaves through `wan0` (a real NAT: conntrack keeps the source port when it can),
    /// forwards back only what belongs to connections from inside, and drops (silently, as
    /// NATs do) whatever else arrives, except the test's API calls, forwarded to the node's
    /// API port.
    fn build_natted(&self, k: usize) {
        let (br, gw, ns) = (self.bridge_ns(), self.router_ns(k), self.ns(k));
        let p = &self.prefix;
        run("ip", &["netns", "add", &gw]);
        run("ip", &["-n", &gw, "link", "set", "lo", "up"]);
        run("ip", &["netns", "add", &ns]);
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        let (wan, outer) = (format!("{p}w{k}"), format!("{p}b{k}"));
        run("ip", &["link", "add", &wan, "type", "veth", "peer", "name", &outer]);
        run("ip", &["link", "set", &wan, "netns", &gw]);
        run("ip", &["link", "set", &outer, "netns", &br]);
        run("ip", &["-n", &gw, "link", "set", &wan, "name", "wan0"]);
        run("ip", &["-n", &gw, "addr", "add", &format!("{}/24", self.ip(k)), "dev", "wan0"]);
        run("ip", &["-n", &gw, "link", "set", "wan0", "up"]);
        run("ip", &["-n", &br, "link", "set", &outer, "master", "br0", "up"]);
        let (inner, lan) = (format!("{p}n{k}"), format!("{p}l{k}"));
        run("ip", &["link", "add", &inner, "type", "veth", "peer", "name", &lan]);
        run("ip", &["link", "set", &inner, "netns", &ns]);
        run("ip", &["link", "set", &lan, "netns", &gw]);
        run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"]);
        run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", self.lan_ip(k)), "dev", "eth0"]);
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &ns, "route", "add", "default", "via", &format!("192.168.{k}.1")]);
        run("ip", &["-n", &gw, "link", "set", &lan, "name", "lan0"]);
        run("ip", &["-n", &gw, "addr", "add", &format!("192.168.{k}.1/24"), "dev", "lan0"]);
        run("ip", &["-n", &gw, "link", "set", "lan0", "up"]);
        run("ip", &["netns", "exec", &gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        let (host, node) = (self.host_ip(), self.lan_ip(k));
        let rules = [
            "table ip knnat {".to_owned(),
            "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;".into(),
            format!(
                "    iifname \"wan0\" ip saddr {host} tcp dport {API_PORT} dnat to {node}:{API_PORT}"
            ),
            "  }".into(),
            "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;".into(),
            "    oifname \"wan0\" counter masquerade comment \"nat\"".into(),
            "  }".into(),
            "  chain forward { type filter hook forward priority filter; policy drop;".into(),
            "    ct state established,related accept".into(),
            "    iifname \"lan0\" oifname \"wan0\" accept".into(),
            format!(
                "    iifname \"wan0\" ip daddr {node} ip saddr {host} tcp dport {API_PORT} accept"
            ),
            "  }".into(),
            "  chain input { type filter hook input priority filter; policy drop;".into(),
            "    iif \"lo\" accept".into(),
            "    ct state established,related accept".into(),
            "    iifname \"lan0\" accept".into(),
            "  }".into(),
            "}".into(),
        ]
        .join("\n");
        run_with_input("ip", &["netns", "exec", &gw, "nft", "-f", "-"], Some(&rules));
    }

    /// Whether node `k` sits behind a NAT router.
    pub fn is_natted(&self, k: usize) -> bool {
        self.natted[k]
    }

    /// The namespace of node `k`'s NAT router.
    pub fn router_ns(&self, k: usize) -> String {
        assert!(self.natted[k], "node {k} has no router");
        format!("{}-g{k}", self.prefix)
    }

    /// Node `k`'s own address: behind NAT, its LAN address; else [`Net::ip`].
    pub fn lan_ip(&self, k: usize) -> String {
        if self.natted[k] { format!("192.168.{k}.2") } else { self.ip(k) }
    }

    /// The QUIC listen address of node `k` (UDP, on its own address).
    pub fn quic_addr(&self, k: usize) -> String {
        format!("/ip4/{}/udp/{P2P_PORT}/quic-v1", self.lan_ip(k))
    }

    /// Where node `k`'s API listens (its own address).
    pub fn api_listen(&self, k: usize) -> String {
        format!("{}:{API_PORT}", self.lan_ip(k))
    }

    /// Runs `nft` in namespace `ns` (the test's own namespaces only) and returns its output.
    pub fn nft_in(&self, ns: &str, args: &[&str]) -> String {
        assert!(ns.starts_with(&format!("{}-", self.prefix)), "not this test's namespace: {ns}");
        let mut all = vec!["netns", "exec", ns, "nft"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Whether the host reaches node `k` (a TCP connect to a closed port is refused: that is
    /// an answer). Behind NAT, through the router's forward of the API port.
    fn reachable(&self, k: usize) -> bool {
        let port = if self.natted[k] { API_PORT } else { 9 };
        let addr: SocketAddr = format!("{}:{port}", self.ip(k)).parse().unwrap();
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        }
    }

    /// The names' common prefix (`knXXXX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many nodes.
    pub const fn nodes(&self) -> usize {
        self.nodes
    }

    /// Node `k`'s namespace.
    pub fn ns(&self, k: usize) -> String {
        assert!((1..=self.nodes).contains(&k), "no node {k}");
        format!("{}-n{k}", self.prefix)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    fn host_if(&self) -> String {
        format!("{}h", self.prefix)
    }

    /// Node `k`'s address on the test subnet (behind NAT: its router's public address).
    pub fn ip(&self, k: usize) -> String {
        format!("{}.{k}", self.subnet)
    }

    /// The test process's address on the subnet.
    pub fn host_ip(&self) -> String {
        format!("{}.254", self.subnet)
    }

    /// Node `k`'s libp2p listen address (TCP, on its own address).
    pub fn p2p_addr(&self, k: usize) -> String {
        format!("/ip4/{}/tcp/{P2P_PORT}", self.lan_ip(k))
    }

    /// Where the test reaches node `k`'s API (behind NAT: the router's forward).
    pub fn api_addr(&self, k: usize) -> String {
        format!("{}:{API_PORT}", self.ip(k))
    }

    /// `program` to be run inside node `k`'s namespace (network only: files and mounts are
    /// the test's).
    pub fn command(&self, k: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(k))).arg("--").arg(program);
        c
    }

    // ----- faults -----

    fn update(&self, k: usize, change: impl FnOnce(&mut Faults)) {
        let mut all = self.faults.lock().unwrap();
        let f = &mut all[k];
        change(f);
        let script = self.ruleset(f);
        run_with_input("ip", &["netns", "exec", &self.ns(k), "nft", "-f", "-"], Some(&script));
    }

    fn ruleset(&self, f: &Faults) -> String {
        let host = self.host_ip();
        let mut input = format!(
            "    type filter hook input priority 0; policy accept;\n    \
             iifname \"eth0\" ip saddr {host} tcp dport {API_PORT} accept\n"
        );
        let mut output = format!(
            "    type filter hook output priority 0; policy accept;\n    \
             oifname \"eth0\" ip daddr {host} tcp sport {API_PORT} accept\n"
        );
        if f.cut && f.reject {
            input.push_str("    iifname \"eth0\" meta l4proto tcp reject with tcp reset\n");
            input.push_str("    iifname \"eth0\" reject\n");
            // The resets answering what arrives must get out.
            output.push_str("    oifname \"eth0\" tcp flags & rst == rst accept\n");
            output.push_str("    oifname \"eth0\" meta l4proto tcp reject with tcp reset\n");
            output.push_str("    oifname \"eth0\" reject\n");
        } else if f.cut {
            input.push_str("    iifname \"eth0\" drop\n");
            output.push_str("    oifname \"eth0\" drop\n");
        }
        if f.loss_percent > 0 {
            input.push_str(&format!(
                "    iifname \"eth0\" numgen random mod 100 < {} counter drop comment \"loss\"\n",
                f.loss_percent
            ));
        }
        for (from, rate) in &f.throttles {
            input.push_str(&format!(
                "    iifname \"eth0\" ip saddr {from} limit rate over {rate} bytes/second drop\n"
            ));
        }
        // Creating the table first makes the delete succeed when it does not exist yet; the
        // whole file is one transaction.
        format!(
            "table inet kn\ndelete table inet kn\ntable inet kn {{\n  chain input {{\n{input}  }}\n  \
             chain output {{\n{output}  }}\n}}\n"
        )
    }

    /// Cuts node `k` off: every packet in or out of its `eth0` is dropped, silently (except
    /// the test's API calls). Connections are not closed: they stall, as behind a broken link.
    pub fn cut(&self, k: usize) {
        self.update(k, |f| f.cut = true);
    }

    /// Cuts node `k` off loudly: every TCP segment in or out of its `eth0` is answered with a
    /// reset and everything else with ICMP unreachable, so that connections fail at once (as
    /// when a firewall in between starts refusing).
    pub fn cut_with_resets(&self, k: usize) {
        self.update(k, |f| {
            f.cut = true;
            f.reject = true;
        });
    }

    /// Ends a [`Net::cut`] or [`Net::cut_with_resets`].
    pub fn heal(&self, k: usize) {
        self.update(k, |f| {
            f.cut = false;
            f.reject = false;
        });
    }

    /// Drops `percent` % of the packets arriving at node `k` at random (0 ends it).
    pub fn loss(&self, k: usize, percent: u8) {
        assert!(percent <= 100);
        self.update(k, |f| f.loss_percent = percent);
    }

    /// Drops what arrives at node `k` from `from_ip` beyond `bytes_per_second` (TCP slows
    /// down to about that rate); `None` ends it.
    pub fn throttle(&self, k: usize, from_ip: &str, bytes_per_second: Option<u64>) {
        self.update(k, |f| match bytes_per_second {
            Some(r) => {
                f.throttles.insert(from_ip.to_owned(), r);
            }
            None => {
                f.throttles.remove(from_ip);
            }
        });
    }

    /// Ends every fault at node `k`.
    pub fn clear(&self, k: usize) {
        self.update(k, |f| *f = Faults::default());
    }

    /// Takes node `k`'s link down (the test cannot reach its API either meanwhile).
    pub fn link_down(&self, k: usize) {
        run("ip", &["-n", &self.ns(k), "link", "set", "eth0", "down"]);
    }

    /// Brings node `k`'s link back up (its address and route come back with it).
    pub fn link_up(&self, k: usize) {
        run("ip", &["-n", &self.ns(k), "link", "set", "eth0", "up"]);
        if !run("ip", &["-n", &self.ns(k), "-4", "addr", "show", "eth0"]).contains(&self.ip(k)) {
            run(
                "ip",
                &["-n", &self.ns(k), "addr", "add", &format!("{}/24", self.ip(k)), "dev", "eth0"],
            );
        }
    }

    /// Packets the current [`Net::loss`] rule at node `k` has dropped so far.
    pub fn lost(&self, k: usize) -> u64 {
        self.rules(k)
            .lines()
            .find(|l| l.contains("comment \"loss\""))
            .and_then(|l| l.split("counter packets ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The nftables rules in force at node `k` (for failure messages).
    pub fn rules(&self, k: usize) -> String {
        run("ip", &["netns", "exec", &self.ns(k), "nft", "list", "ruleset"])
    }

    // ----- latency -----

    /// A relay on the test's address that forwards to node `k`'s libp2p port, delaying every
    /// chunk by `delay` in each direction. Returns its address as a multiaddress, for node
    /// `k` to advertise (peers then dial the relay).
    pub fn relay_to(&self, k: usize, delay: Duration) -> String {
        let target: SocketAddr = format!("{}:{P2P_PORT}", self.ip(k)).parse().unwrap();
        let relay = Relay::start(&self.host_ip(), target, delay);
        let addr = format!("/ip4/{}/tcp/{}", relay.addr.ip(), relay.addr.port());
        self.relays.lock().unwrap().push(relay);
        addr
    }

    /// Whether this test's namespaces or host link still exist.
    pub fn leftovers(prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = run("ip", &["netns", "list"])
            .lines()
            .filter(|l| l.starts_with(&format!("{prefix}-")))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
            .collect();
        if try_run("ip", &["link", "show", &format!("{prefix}h")]) {
            out.push(format!("{prefix}h"));
        }
        out
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for relay in self.relays.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..)
        {
            drop(relay);
        }
        remove(&self.prefix);
        let _ = std::fs::remove_file(&self.registry_file);
    }
}

/// Removes everything a test with `prefix` made: kills processes left in its namespaces,
/// deletes the host link (its bridge-side peer goes with it) and the namespaces.
fn remove(prefix: &str) {
    let names: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .collect();
    for ns in &names {
        // Processes the test started inside (a daemon whose handle leaked): kill them by pid.
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let host = format!("{prefix}h");
    if try_run("ip", &["link", "show", &host]) && !try_run("ip", &["link", "del", &host]) {
        eprintln!("cannot delete link {host}");
    }
    for ns in &names {
        if !try_run("ip", &["netns", "del", ns]) {
            eprintln!("cannot delete network namespace {ns}");
        }
    }
}

/// Removes the namespaces of test processes that died without cleaning up.
fn sweep_dead() {
    let Ok(entries) = std::fs::read_dir(REGISTRY) else { return };
    for e in entries.flatten() {
        let prefix = e.file_name().to_string_lossy().into_owned();
        let owner = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse().ok());
        if owner.is_some_and(pid_alive) {
            continue;
        }
        remove(&prefix);
        let _ = std::fs::remove_file(e.path());
    }
}

// ----- the delaying relay -----

/// A TCP relay in the test process: accepts on `listen`, connects to `target` for each
/// connection, and forwards both ways, each chunk `delay` after it was read (order kept; no
/// bandwidth limit). Stopped in `Drop`: every connection is shut down.
#[derive(Debug)]
pub struct Relay {
    /// Where it accepts.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts one on `listen_ip` (a port chosen by the OS).
    pub fn start(listen_ip: &str, target: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind((listen_ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, streams2) = (Arc::clone(&stop), Arc::clone(&streams));
        let acceptor = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let inbound = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                {
                    let mut all = streams2.lock().unwrap();
                    all.retain(|s| s.peer_addr().is_ok());
                    all.push(inbound.try_clone().unwrap());
                    all.push(outbound.try_clone().unwrap());
                }
                let (a, b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                std::thread::spawn(move || pump(inbound, outbound, delay));
                std::thread::spawn(move || pump(b, a, delay));
            }
        });
        Self { addr, stop, streams, acceptor: Some(acceptor) }
    }
}

/// Copies `from` → `to`, each chunk `delay` after it was read.
fn pump(from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let mut reader_side = from.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader_side.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    for (at, chunk) in rx {
        let due = at + delay;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = reader.join();
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

// ----- a WAN-like path: delay and rate limit between two hosts -----

/// Two hosts joined by a router that delays every packet and limits the rate, for
/// measurements over a long fat path (this kernel has no `netem`):
///
/// ```text
///   namespace `kwXXXX-a`          router `kwXXXX-r`                 namespace `kwXXXX-b`
///   eth0 10.S.T.2/26 ─ veth ─ ra 10.S.T.1    rb 10.S.T.65 ─ veth ─ eth0 10.S.T.66/26
///                              kd0 (tun): every packet between ra and rb goes through it
///                              hr 10.S.T.129 ─ veth ─ root `kwXXXXh` 10.S.T.130/26
/// ```
///
/// The router's policy routing sends what arrives on `ra` or `rb` for the other side to the
/// TUN device `kd0`; a thread of the test process (inside the router's namespace) reads each
/// packet and writes it back `delay` after it arrived (order kept), and the kernel routes it
/// on. So the delay is per packet and end to end: TCP's own windows and congestion control
/// see it (no TCP-terminating proxy). `tbf` on the router's `ra` and `rb` limits each
/// direction to `rate_mbit` (queue: one bandwidth-delay product). The links have an MTU of
/// [`WAN_MTU`] so that the delaying thread handles few packets. TCP's buffer limits in `a`
/// and `b` are raised to 32 MiB (net.ipv4.tcp_rmem/tcp_wmem), so that the socket buffers
/// can hold the path's bandwidth-delay product. The test process reaches both hosts through
/// the router's `hr` link (route 10.S.T.0/24), undelayed except for the router's own path.
///
/// Code runs inside a host with [`WanPath::enter`] (this thread's network namespace) or
/// [`WanPath::command`]. Cleanup as for [`Net`] (`Drop`, and the sweep of a dead test's
/// prefix).
#[derive(Debug)]
pub struct WanPath {
    prefix: String,
    subnet: String,
    stop: Arc<AtomicBool>,
    delayer: Option<JoinHandle<()>>,
    registry_file: PathBuf,
}

/// The MTU of a [`WanPath`]'s links.
pub const WAN_MTU: u32 = 64_000;

/// TUNSETIFF, `_IOW('T', 202, int)`.
const TUNSETIFF: u64 = 0x4004_54ca;

impl WanPath {
    /// Builds the path: `delay` each way, `rate_mbit` Mbit/s each way.
    pub fn new(delay: Duration, rate_mbit: u32) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_dead();
        let pid = std::process::id();
        let existing = run("ip", &["netns", "list"]);
        let addresses = run("ip", &["-o", "-4", "addr", "show"]);
        let routes = run("ip", &["-4", "route", "show", "table", "all"]);
        let (prefix, subnet) = loop {
            let k = COUNTER.fetch_add(1, Ordering::SeqCst);
            let tag = (pid.wrapping_mul(2_654_435_761) >> 8).wrapping_add(k.wrapping_mul(40_503));
            let prefix = format!("kw{:04x}", tag & 0xffff);
            let subnet = format!("10.{}.{}", 250 + (pid + k / 256) % 5, k % 256);
            let busy = existing.lines().any(|l| l.starts_with(&format!("{prefix}-")))
                || addresses.contains(&format!(" {subnet}."))
                || routes.contains(&format!("{subnet}."));
            if !busy {
                break (prefix, subnet);
            }
            assert!(k < 100_000, "no free subnet or prefix");
        };
        std::fs::create_dir_all(REGISTRY).unwrap();
        let registry_file = Path::new(REGISTRY).join(&prefix);
        std::fs::write(&registry_file, pid.to_string()).unwrap();
        let mut me = Self {
            prefix,
            subnet,
            stop: Arc::new(AtomicBool::new(false)),
            delayer: None,
            registry_file,
        };
        me.build(delay, rate_mbit);
        me
    }

    /// Host `a`'s address.
    pub fn ip_a(&self) -> String {
        format!("{}.2", self.subnet)
    }

    /// Host `b`'s address.
    pub fn ip_b(&self) -> String {
        format!("{}.66", self.subnet)
    }

    /// The namespace of host `side` (`'a'` or `'b'`).
    pub fn ns(&self, side: char) -> String {
        assert!(side == 'a' || side == 'b', "hosts are a and b");
        format!("{}-{side}", self.prefix)
    }

    fn build(&mut self, delay: Duration, rate_mbit: u32) {
        let (p, s) = (self.prefix.clone(), self.subnet.clone());
        let r = format!("{p}-r");
        let mtu = WAN_MTU.to_string();
        run("ip", &["netns", "add", &r]);
        run("ip", &["-n", &r, "link", "set", "lo", "up"]);
        for (side, host, router, net) in [('a', 2, 1, 0), ('b', 66, 65, 64)] {
            let ns = self.ns(side);
            let (inner, outer) = (format!("{p}{side}"), format!("{p}r{side}"));
            run("ip", &["netns", "add", &ns]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &["link", "add", &inner, "mtu", &mtu, "type", "veth", "peer", "name", &outer],
            );
            run("ip", &["link", "set", &inner, "netns", &ns]);
            run("ip", &["link", "set", &outer, "netns", &r]);
            run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            run("ip", &["-n", &ns, "addr", "add", &format!("{s}.{host}/26"), "dev", "eth0"]);
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", &ns, "route", "add", "default", "via", &format!("{s}.{router}")]);
            let name = format!("r{side}");
            run("ip", &["-n", &r, "link", "set", &outer, "name", &name]);
            run("ip", &["-n", &r, "addr", "add", &format!("{s}.{router}/26"), "dev", &name]);
            run("ip", &["-n", &r, "link", "set", &name, "up"]);
            for (key, value) in [
                ("net.ipv4.tcp_rmem", "4096 131072 33554432"),
                ("net.ipv4.tcp_wmem", "4096 16384 33554432"),
            ] {
                run("ip", &["netns", "exec", &ns, "sysctl", "-q", "-w", &format!("{key}={value}")]);
            }
            // One bandwidth-delay product of queue (at least 1 MB), bursts of a few packets.
            let bdp = u64::from(rate_mbit) * 125_000 * delay.as_micros() as u64 * 2 / 1_000_000;
            let limit = bdp.max(1 << 20).to_string();
            let rate = format!("{rate_mbit}mbit");
            let burst = (4 * WAN_MTU).to_string();
            run(
                "ip",
                &[
                    "netns", "exec", &r, "tc", "qdisc", "add", "dev", &name, "root", "tbf", "rate",
                    &rate, "burst", &burst, "limit", &limit,
                ],
            );
            let _ = net;
        }
        let (host, host_peer) = (format!("{p}h"), format!("{p}hr"));
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &host_peer]);
        run("ip", &["link", "set", &host_peer, "netns", &r]);
        run("ip", &["-n", &r, "link", "set", &host_peer, "name", "hr"]);
        run("ip", &["-n", &r, "addr", "add", &format!("{s}.129/26"), "dev", "hr"]);
        run("ip", &["-n", &r, "link", "set", "hr", "up"]);
        run("ip", &["addr", "add", &format!("{s}.130/26"), "dev", &host]);
        run("ip", &["link", "set", &host, "up"]);
        run("ip", &["route", "add", &format!("{s}.0/24"), "via", &format!("{s}.129")]);
        for key in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"] {
            run("ip", &["netns", "exec", &r, "sysctl", "-q", "-w", key]);
        }

        // The delaying TUN device, opened by a thread inside the router's namespace.
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (stop, r2) = (Arc::clone(&self.stop), r.clone());
        self.delayer = Some(std::thread::spawn(move || {
            enter_netns(&r2);
            match open_tun("kd0") {
                Ok(fd) => {
                    opened_tx.send(Ok(())).unwrap();
                    delay_packets(fd, delay, &stop);
                    // SAFETY: `fd` is this thread's own descriptor, closed once.
                    unsafe { nix::libc::close(fd) };
                }
                Err(e) => opened_tx.send(Err(e)).unwrap(),
            }
        }));
        opened_rx.recv().unwrap().expect("cannot open a TUN device in the router's namespace");
        run("ip", &["-n", &r, "link", "set", "kd0", "mtu", &mtu, "up"]);
        for key in ["net.ipv4.conf.kd0.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            run("ip", &["netns", "exec", &r, "sysctl", "-q", "-w", key]);
        }
        run("ip", &["-n", &r, "route", "add", "default", "dev", "kd0", "table", "100"]);
        for (from, to) in [("ra", format!("{s}.64/26")), ("rb", format!("{s}.0/26"))] {
            run(
                "ip",
                &["-n", &r, "rule", "add", "iif", from, "to", &to, "lookup", "100", "pref", "100"],
            );
        }
        // The path works end to end (a TCP connect to a closed port is refused: an answer).
        let deadline = Instant::now() + Duration::from_secs(10);
        let target: SocketAddr = format!("{}:9", self.ip_b()).parse().unwrap();
        let a = self.ns('a');
        let reachable = std::thread::spawn(move || {
            enter_netns(&a);
            loop {
                match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                    Ok(_) => return true,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                    Err(_) if Instant::now() > deadline => return false,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        assert!(reachable.join().unwrap(), "{target} not reachable over {}", self.prefix);
    }

    /// `program` to be run inside host `side`'s namespace.
    pub fn command(&self, side: char, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(side))).arg("--").arg(program);
        c
    }

    /// Moves the calling thread into host `side`'s network namespace: the sockets it (and
    /// threads it starts later) creates are that host's. For threads of their own.
    pub fn enter(&self, side: char) {
        enter_netns(&self.ns(side));
    }
}

impl Drop for WanPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.delayer.take() {
            let _ = t.join();
        }
        let route = format!("{}.0/24", self.subnet);
        let _ = try_run("ip", &["route", "del", &route]);
        remove(&self.prefix);
        let _ = std::fs::remove_file(&self.registry_file);
    }
}

fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: a valid namespace descriptor; setns changes only this thread.
    let rc =
        unsafe { nix::libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), nix::libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Creates TUN device `name` (IPv4 packets, no packet information header) in this thread's
/// namespace; its descriptor.
fn open_tun(name: &str) -> std::io::Result<i32> {
    // SAFETY: plain open/ioctl with an ifreq of the kernel's layout (name, then flags).
    unsafe {
        let fd = nix::libc::open(c"/dev/net/tun".as_ptr(), nix::libc::O_RDWR);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (nix::libc::IFF_TUN | nix::libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        if nix::libc::ioctl(fd, TUNSETIFF as _, ifr.as_mut_ptr()) < 0 {
            let e = std::io::Error::last_os_error();
            nix::libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

/// Reads packets from the TUN device `fd` and writes each back `delay` after it arrived,
/// until `stop`.
fn delay_packets(fd: i32, delay: Duration, stop: &AtomicBool) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for (at, packet) in rx {
                let due = at + delay;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                // SAFETY: writes one packet from a live buffer.
                unsafe { nix::libc::write(fd, packet.as_ptr().cast(), packet.len()) };
            }
        });
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = nix::libc::pollfd { fd, events: nix::libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd; a read into a live buffer.
            let ready = unsafe { nix::libc::poll(&mut pfd, 1, 100) };
            if ready <= 0 {
                continue;
            }
            let n = unsafe { nix::libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let at = Instant::now();
            if tx.send((at, buf[..n as usize].to_vec())).is_err() {
                break;
            }
        }
        drop(tx);
    });
}
