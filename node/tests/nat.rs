//! Sites behind NAT (issue 18), on hosts of their own (network namespaces, see
//! `common::netns`): site-a and site-b each sit behind a NAT router of their own (nftables
//! masquerade; nothing can dial in), the relay site is on the public subnet and relays for the
//! instances registered with it (`network.relay_service`). Jobs run on a real containerd.
//!
//! - Without hole punching, site-a and site-b reach each other only through the relay: a
//!   3-site workflow completes, its 4 MB result crossing the relay (its nftables counter shows
//!   the bytes) as TLS it cannot read (a capture at the relay has none of the job's marker,
//!   which the result carries in plain text).
//! - With hole punching, the relayed connection becomes direct (DCUtR through both NATs) and
//!   the workflow's result goes direct: the relay carries almost none of its bytes.
//! - A stranger cannot reserve a slot at the relay, and a registered instance cannot use the
//!   relay to reach one that did not register it.
//! - The relay (`kaapana-node relay`) killed mid-workflow: the workflow finishes once it is
//!   back; nothing lost, nothing run twice.
//!
//! Needs root, iproute2, nftables, tcpdump, containerd and runc (`scripts/test` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::containerd::TestContainerd;
use common::netns::{Net, P2P_PORT};
use common::{Daemon, Site};

const T: Duration = Duration::from_secs(120);
/// The bytes of the result the NATed runner sends back.
const RESULT_BYTES: u64 = 4_000_000;

/// The three sites: 0 = the relay (public), 1 = site-a, 2 = site-b (each behind its NAT).
struct NatFed {
    daemons: Vec<Option<Daemon>>,
    sites: Vec<Site>,
    _ctd: TestContainerd,
    _rt: tokio::runtime::Runtime,
    image: String,
    tmp: tempfile::TempDir,
    net: Net,
    relay_only: bool,
}

/// The relay's address as `network.relays` names it.
fn relay_addr(net: &Net, relay: &Site) -> String {
    format!("/ip4/{}/tcp/{P2P_PORT}/p2p/{}", net.ip(1), relay.instance_id())
}

impl NatFed {
    /// The federation, every pair registered both ways; `relay_only`: the relay is a
    /// `kaapana-node relay` (no executor), else a full site that also relays.
    fn new(hole_punching: bool, relay_only: bool) -> Self {
        let net = Net::with_nat(3, &[2, 3]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctd = rt.block_on(TestContainerd::start());
        let tmp = common::test_dir();
        let root = tmp.path();
        let relay = Site::init_netns_nat(root, "relay", &net, 1, &[], hole_punching);
        relay.set_network("relay_service", "true");
        let via = [relay_addr(&net, &relay)];
        let a = Site::init_netns_nat(root, "site-a", &net, 2, &via, hole_punching);
        let b = Site::init_netns_nat(root, "site-b", &net, 3, &via, hole_punching);
        let sites = vec![relay, a, b];
        let bundles: Vec<PathBuf> = sites.iter().map(|s| s.export(root)).collect();
        for (i, s) in sites.iter().enumerate() {
            for (j, other) in sites.iter().enumerate() {
                if i != j {
                    s.register(other, &bundles[j]);
                }
            }
        }
        for (i, s) in sites.iter().enumerate() {
            if !(relay_only && i == 0) {
                s.set_executor(Some(ctd.containerd().socket()));
            }
        }
        let image = common::containerd::build_busybox_image(root, "busybox", false);
        sites[1].ok(&["image", "import", image.tar.to_str().unwrap()]);
        Self {
            daemons: vec![None, None, None],
            sites,
            _ctd: ctd,
            _rt: rt,
            image: image.digest.to_string(),
            tmp,
            net,
            relay_only,
        }
    }

    fn start(&mut self, i: usize) {
        let sub = if i == 0 && self.relay_only { "relay" } else { "run" };
        self.daemons[i] = Some(self.sites[i].start_netns_as(&self.net, i + 1, sub));
    }

    fn d(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().unwrap()
    }

    /// How site `i` sees site `j` connected: `Some("direct")`, `Some("relayed")` or `None`.
    fn path(&self, i: usize, j: usize) -> Option<String> {
        self.d(i).instance(&self.sites[j].name).and_then(|v| v.path)
    }

    /// Waits until site-a and site-b see each other connected by `path`.
    fn wait_path(&self, path: &str) {
        for (i, j) in [(1, 2), (2, 1)] {
            self.d(i).wait_until(&format!("{} {path}", self.sites[j].name), T, |_| {
                self.path(i, j).as_deref() == Some(path)
            });
        }
    }

    fn path_in(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Submits at site-a: a job at site-b writing `marker` (plain text) and 4 MB of random
    /// bytes, `others` more jobs (at the relay site when it runs jobs), and a sum at site-a
    /// reading them all. Returns the workflow id.
    fn submit(&self, name: &str, marker: &str, sleep_s: u32) -> String {
        let mut toml = format!(
            r#"name = "{name}"
[[job]]
name = "far"
runner = "site-b"
image = "{image}"
command = ["sh", "-c", "echo run >> /output/runs; sleep {sleep_s}; for i in $(seq 200); do echo {marker}; done > /output/marker.txt; head -c {RESULT_BYTES} /dev/urandom > /output/blob"]
timeout = "2m"
"#,
            image = self.image
        );
        let mut inputs = vec!["\"far\"".to_owned()];
        if !self.relay_only {
            toml.push_str(&format!(
                "[[job]]\nname = \"public\"\nrunner = \"relay\"\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", \"echo run >> /output/runs; echo relay-site > /output/who\"]\ntimeout = \"2m\"\n",
                self.image
            ));
            inputs.push("\"public\"".to_owned());
        }
        toml.push_str(&format!(
            "[[job]]\nname = \"sum\"\nrunner = \"owner\"\ninputs = [{}]\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", \"echo run >> /output/runs; wc -c < /input/far/blob > /output/far-bytes; cat /input/*/who > /output/who 2>/dev/null; true\"]\ntimeout = \"2m\"\n",
            inputs.join(", "),
            self.image
        ));
        self.d(1).submit_workflow(&toml).workflow_id
    }

    /// Checks the finished workflow `id`: every job ran once, the sum read all 4 MB. Returns
    /// the folder its results were fetched into.
    fn check_finished(&self, id: &str) -> PathBuf {
        let w = self.d(1).wait_workflow(id, "finished", T);
        for j in &w.jobs {
            let i = self.sites.iter().position(|s| s.name == j.runner).unwrap();
            let runs = self.sites[i].dir.join("jobs").join(&j.job_id).join("output").join("runs");
            let runs = std::fs::read_to_string(&runs).map_or(0, |t| t.lines().count());
            assert_eq!((j.attempt, runs), (0, 1), "job {} ran once: {j:#?}", j.name);
        }
        let out = self.path_in(&format!("result-{id}"));
        // The CLI reaches the daemon's API from inside site-a's namespace.
        let status = self
            .net
            .command(2, common::node_binary())
            .arg("--data-dir")
            .arg(&self.sites[1].dir)
            .args(["workflow", "result", id, "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "workflow result {id}");
        let far = std::fs::read_to_string(out.join("sum/far-bytes")).unwrap();
        assert_eq!(far.trim(), RESULT_BYTES.to_string());
        out
    }

    /// Counts, at the relay, the bytes arriving from site-b's router.
    fn count_from_b(&self) {
        let rules = format!(
            "table inet kncount {{\n  chain input {{ type filter hook prerouting priority -300; policy accept;\n    iifname \"eth0\" ip saddr {} counter comment \"from-b\"\n  }}\n}}\n",
            self.net.ip(3)
        );
        let ns = self.net.ns(1);
        self.net.nft_in(&ns, &["-f", &write_tmp(&self.path_in("count.nft"), &rules)]);
    }

    /// The bytes counted by [`NatFed::count_from_b`] so far.
    fn bytes_from_b(&self) -> u64 {
        let ns = self.net.ns(1);
        let rules = self.net.nft_in(&ns, &["list", "table", "inet", "kncount"]);
        rules
            .split("bytes ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {rules}"))
    }
}

fn write_tmp(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// tcpdump on the relay's `eth0`, writing every packet to `file`; stopped (and flushed) by
/// [`stop_capture`].
fn capture(net: &Net, file: &Path) -> Child {
    let child = net
        .command(1, "tcpdump")
        .args(["-i", "eth0", "-U", "-s", "0", "-w"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (scripts/test installs it)");
    // tcpdump says on stderr when it listens; wait for that line.
    let mut child = child;
    let stderr = child.stderr.take().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line).unwrap();
    assert!(line.contains("listening on"), "tcpdump: {line}");
    child
}

fn stop_capture(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().unwrap();
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn two_sites_behind_nat_work_together_through_a_relay_then_directly_after_hole_punching() {
    // 1. No hole punching: site-a and site-b meet only through the relay.
    let mut f = NatFed::new(false, false);
    for i in 0..3 {
        f.start(i);
    }
    for (i, j) in [(1, 0), (2, 0), (0, 1), (0, 2)] {
        f.d(i).wait_for_capabilities(&f.sites[j].name, T);
        assert_eq!(f.path(i, j).as_deref(), Some("direct"), "{i} sees {j}");
    }
    f.wait_path("relayed");
    for i in [1, 2] {
        let other = &f.sites[3 - i].name;
        let status = f.d(i).instance(other).unwrap().status;
        assert_eq!(status, "connected, relayed", "{} sees {other}", f.sites[i].name);
        assert_eq!(f.d(i).metric("kaapana_node_peers_relayed"), 1.0);
        let relay_events = f.d(i).event_details(0, "relay");
        assert!(
            relay_events.iter().any(|e| e.contains("reserved a slot at relay relay")),
            "{relay_events:?}"
        );
    }
    // The bundles name the relay's circuit.
    let bundle = std::fs::read_to_string(f.tmp.path().join("site-b.bundle")).unwrap();
    assert!(!bundle.is_empty());
    let b_view = f.d(1).instance("site-b").unwrap();
    assert!(b_view.listen_addrs.iter().any(|a| a.ends_with("/p2p-circuit")), "{b_view:?}");

    f.count_from_b();
    let pcap = f.path_in("relay.pcap");
    let tcpdump = capture(&f.net, &pcap);
    let marker = format!("kaapana-nat-marker-{}", std::process::id());
    let id = f.submit("through-the-relay", &marker, 0);
    let out = f.check_finished(&id);
    stop_capture(tcpdump);
    assert_eq!(std::fs::read_to_string(out.join("sum/who")).unwrap().trim(), "relay-site");
    // The result went through the relay ...
    let relayed = f.bytes_from_b();
    assert!(relayed > RESULT_BYTES, "the relay got {relayed} bytes from site-b");
    // ... which could not read it: the marker is in the result in plain text, not in what the
    // relay forwarded.
    let plain = std::fs::read(out.join("far/marker.txt")).unwrap();
    assert_eq!(count(&plain, marker.as_bytes()), 200);
    let captured = std::fs::read(&pcap).unwrap();
    assert!(captured.len() as u64 > 2 * RESULT_BYTES, "captured {} bytes", captured.len());
    assert_eq!(count(&captured, marker.as_bytes()), 0, "the relay saw the marker in clear");
    assert_eq!(count(&captured, f.image.as_bytes()), 0, "the relay saw the job manifest");
    eprintln!(
        "relayed: {relayed} bytes from site-b crossed the relay; it captured {} bytes, none readable",
        captured.len()
    );

    // 2. Hole punching: after a restart with it on, the connection becomes direct and the
    // result goes direct.
    for i in [1, 2] {
        assert!(f.daemons[i].take().unwrap().stop(), "{} stopped gracefully", f.sites[i].name);
        f.sites[i].set_network("hole_punching", "true");
    }
    for i in [1, 2] {
        f.start(i);
    }
    f.wait_path("direct");
    let punched: Vec<String> =
        [1, 2].iter().flat_map(|&i| f.d(i).event_details(0, "hole_punch")).collect();
    assert!(punched.iter().any(|e| e.contains("direct now")), "{punched:?}");
    for i in [1, 2] {
        assert_eq!(f.d(i).metric("kaapana_node_peers_relayed"), 0.0);
    }
    let before = f.bytes_from_b();
    let id = f.submit("direct", &marker, 0);
    f.check_finished(&id);
    let through_relay = f.bytes_from_b() - before;
    eprintln!("direct: {through_relay} bytes from site-b crossed the relay");
    assert!(
        through_relay < RESULT_BYTES / 4,
        "{through_relay} bytes from site-b crossed the relay although the connection is direct"
    );
}
