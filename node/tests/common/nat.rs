//! Sites behind NAT routers around a relay (see [`NatFed`]), for the NAT tests and the relay
//! benchmark.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use super::containerd::TestContainerd;
use super::netns::{Net, P2P_PORT};
use super::{Daemon, Site};

pub const T: Duration = Duration::from_secs(120);
/// The bytes of the result the NATed runner sends back.
pub const RESULT_BYTES: u64 = 4_000_000;
/// The bytes of the model the owner's job makes, which the NATed runner fetches as an input.
pub const MODEL_BYTES: u64 = 1_000_000;

/// The three sites: 0 = the relay (public), 1 = site-a, 2 = site-b (each behind its NAT).
pub struct NatFed {
    pub daemons: Vec<Option<Daemon>>,
    pub sites: Vec<Site>,
    _ctd: TestContainerd,
    _rt: tokio::runtime::Runtime,
    pub image: String,
    pub tmp: tempfile::TempDir,
    pub net: Net,
    pub relay_only: bool,
}

/// The relay's address as `network.relays` names it.
pub fn relay_addr(net: &Net, relay: &Site) -> String {
    format!("/ip4/{}/tcp/{P2P_PORT}/p2p/{}", net.ip(1), relay.instance_id())
}

impl NatFed {
    /// The federation, every pair registered both ways; `relay_only`: the relay is a
    /// `kaapana-node relay` (no executor), else a full site that also relays.
    pub fn new(hole_punching: bool, relay_only: bool) -> Self {
        let net = Net::with_nat(3, &[2, 3]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctd = rt.block_on(TestContainerd::start());
        let tmp = super::test_dir();
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
        let image = super::containerd::build_busybox_image(root, "busybox", false);
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

    pub fn start(&mut self, i: usize) {
        let sub = if i == 0 && self.relay_only { "relay" } else { "run" };
        self.daemons[i] = Some(self.sites[i].start_netns_as(&self.net, i + 1, sub));
    }

    pub fn d(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().unwrap()
    }

    /// How site `i` sees site `j` connected: `Some("direct")`, `Some("relayed")` or `None`.
    pub fn path(&self, i: usize, j: usize) -> Option<String> {
        self.d(i).instance(&self.sites[j].name).and_then(|v| v.path)
    }

    /// Waits until site-a and site-b see each other connected by `path`.
    pub fn wait_path(&self, path: &str) {
        for (i, j) in [(1, 2), (2, 1)] {
            self.d(i).wait_until(&format!("{} {path}", self.sites[j].name), T, |_| {
                self.path(i, j).as_deref() == Some(path)
            });
        }
    }

    pub fn path_in(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Submits at site-a: a "model" job at site-a (1 MB, and `marker` in plain text); a job
    /// at site-b that reads the model (fetched from site-a) and writes `marker` and 4 MB of
    /// random bytes; one at the relay site when it runs jobs; and a sum at site-a reading
    /// them. Returns the workflow id.
    pub fn submit(&self, name: &str, marker: &str, sleep_s: u32) -> String {
        let mut toml = format!(
            r#"name = "{name}"
[[job]]
name = "model"
runner = "owner"
image = "{image}"
command = ["sh", "-c", "echo run >> /output/runs; for i in $(seq 200); do echo {marker}; done > /output/model.txt; head -c {MODEL_BYTES} /dev/urandom > /output/model.bin"]
timeout = "2m"
[[job]]
name = "far"
runner = "site-b"
inputs = ["model"]
image = "{image}"
command = ["sh", "-c", "echo run >> /output/runs; sleep {sleep_s}; wc -c < /input/model/model.bin > /output/model-bytes; for i in $(seq 200); do echo {marker}; done > /output/marker.txt; head -c {RESULT_BYTES} /dev/urandom > /output/blob"]
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
    pub fn check_finished(&self, id: &str) -> PathBuf {
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
            .command(2, super::node_binary())
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
        // site-b fetched the owner's model (an input, as a training's model is) whole.
        let model = std::fs::read_to_string(out.join("far/model-bytes")).unwrap();
        assert_eq!(model.trim(), MODEL_BYTES.to_string());
        out
    }

    /// Counts, at the relay, the bytes arriving from site-b's router.
    pub fn count_from_b(&self) {
        let rules = format!(
            "table inet kncount {{\n  chain input {{ type filter hook prerouting priority -300; policy accept;\n    iifname \"eth0\" ip saddr {} counter comment \"from-b\"\n  }}\n}}\n",
            self.net.ip(3)
        );
        let ns = self.net.ns(1);
        self.net.nft_in(&ns, &["-f", &write_tmp(&self.path_in("count.nft"), &rules)]);
    }

    /// The bytes counted by [`NatFed::count_from_b`] so far.
    pub fn bytes_from_b(&self) -> u64 {
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

pub fn write_tmp(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// tcpdump on the relay's `eth0`, writing every packet to `file`; stopped (and flushed) by
/// [`stop_capture`].
pub fn capture(net: &Net, file: &Path) -> Child {
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

pub fn stop_capture(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().unwrap();
}

pub fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}
