//! The store's crash test: a process that writes registrations through the [`Store`] and prints
//! each one once `put_instance` returned is killed with SIGKILL at a random moment, several
//! times on the same file; every printed registration must be there when the store is
//! reopened, and the store must open each time.
//!
//! The writer is this test binary itself, re-executed to run [`crash_writer_child`] with
//! `KAAPANA_STORE_CHILD` set to the store path. Without that variable the child test does
//! nothing. Set `KAAPANA_CRASH_SEED` to replay a run (the seed is printed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaapana_federation::{Policy, RegisteredInstance};
use kaapana_node::store::Store;
use kaapana_protocol::{InstanceId, SigningKey, Timestamp};

const CHILD_ENV: &str = "KAAPANA_STORE_CHILD";
const CHILD_TEST: &str = "crash_writer_child";
const WRITER_THREADS: usize = 4;
const ROUNDS: usize = 8;
const MAX_LINES_BEFORE_KILL: u64 = 400;

/// The writer child. Does nothing unless `KAAPANA_STORE_CHILD` names a store file.
#[test]
fn crash_writer_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else { return };
    let store = match Store::open(Path::new(&path)) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("child: {e}");
            std::process::exit(3);
        }
    };
    let threads: Vec<_> = (0..WRITER_THREADS)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                loop {
                    let inst = new_instance();
                    if let Err(e) = store.put_instance(&inst) {
                        eprintln!("child: put_instance failed: {e}");
                        std::process::exit(4);
                    }
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "done {}", inst.instance_id).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A registration with a fresh Ed25519 identity.
fn new_instance() -> RegisteredInstance {
    let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
    let id = key.instance_id();
    RegisteredInstance {
        instance_id: id,
        name: format!("site-{id}"),
        certificate_der: vec![0x30; 300],
        fingerprint: *key.public_key(),
        listen_addrs: vec!["/ip4/192.0.2.1/udp/4433/quic-v1".into()],
        certificate_not_after: Timestamp::from_millis(2_000_000_000_000),
        registered_at: Timestamp::from_system_time(SystemTime::now()),
        policy: Policy::default(),
    }
}

/// Kills (SIGKILL) and reaps the child however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the writer child until it has printed `kill_after` lines, kills it with SIGKILL, and
/// returns every id it printed (including lines already in the pipe when it died).
fn run_child_and_kill(path: &Path, kill_after: u64) -> BTreeSet<InstanceId> {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut printed = BTreeSet::new();
    let parse = |line: &str| line.strip_prefix("done ").map(|id| id.parse::<InstanceId>().unwrap());
    while (printed.len() as u64) < kill_after {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => printed.extend(parse(&line)),
            Err(e) => {
                let _ = child.0.kill();
                let mut stderr = String::new();
                child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
                panic!("child stopped after {} lines ({e}); its stderr:\n{stderr}", printed.len());
            }
        }
    }
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished: {status}");
    // Lines the child printed before it died were acknowledged as well.
    for line in lines {
        printed.extend(parse(&line));
    }
    reader.join().unwrap();
    printed
}

#[test]
fn sigkill_loses_no_acknowledged_registration() {
    let seed = std::env::var("KAAPANA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("seed {seed} (KAAPANA_CRASH_SEED={seed} replays the kill points)");
    let mut rng = common::SplitMix(seed);
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("node.redb");
    let started = Instant::now();

    let mut acknowledged = BTreeSet::new();
    for round in 1..=ROUNDS {
        let kill_after = 1 + rng.next() % MAX_LINES_BEFORE_KILL;
        let printed = run_child_and_kill(&path, kill_after);
        acknowledged.extend(printed.iter().copied());

        let store = Store::open(&path)
            .unwrap_or_else(|e| panic!("round {round}: the store does not reopen: {e}"));
        let stored: BTreeSet<InstanceId> =
            store.instances().unwrap().into_iter().map(|i| i.instance_id).collect();
        let missing: Vec<_> = acknowledged.difference(&stored).collect();
        assert!(
            missing.is_empty(),
            "round {round} (seed {seed}): {} acknowledged registrations lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        assert_eq!(store.load_registry().unwrap().len(), stored.len());
        println!(
            "round {round}: killed after {kill_after} lines ({} printed); {} stored so far, \
             {} of them committed but never printed",
            printed.len(),
            stored.len(),
            stored.len() - acknowledged.len()
        );
        drop(store);
        // The file the store repaired and closed passes redb's own integrity check.
        let mut db = redb::Database::open(&path).unwrap();
        assert!(db.check_integrity().unwrap(), "round {round}: the closed store needed a repair");
    }
    println!("{ROUNDS} rounds in {:.1?}", started.elapsed());
}
