//! Shared helpers for the node's end-to-end tests: real `kaapana-node` processes on real
//! data directories.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn kaapana_node() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kaapana-node"));
    c.env_remove("KAAPANA_NODE_DATA_DIR").env("NO_COLOR", "1");
    c
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
