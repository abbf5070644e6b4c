//! Durable write throughput of the node's store: one writer doing one write per commit, then
//! 64 concurrent writers sharing commits (group commit).
//!
//! `cargo run --release -p kaapana-node --example store_throughput [DIR]`; the store file goes
//! to a temporary directory under DIR (default `/var/tmp`, which is usually not tmpfs: fsync
//! must reach a real disk for the figures to mean anything).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use kaapana_federation::{Policy, RegisteredInstance};
use kaapana_node::store::Store;
use kaapana_protocol::{InstanceId, Timestamp};

const SERIAL_WRITES: u32 = 2_000;
const WRITERS: u32 = 64;
const WRITES_PER_WRITER: u32 = 500;

fn instance(n: u32) -> RegisteredInstance {
    // A SHA-256 multihash id: valid, and cheap to make (no key generation in the loop).
    let mut id = vec![0x12, 0x20];
    id.extend_from_slice(&n.to_be_bytes());
    id.extend_from_slice(&[0x5a; 28]);
    RegisteredInstance {
        instance_id: InstanceId::from_bytes(&id).unwrap(),
        name: format!("site-{n}"),
        certificate_der: vec![0x30; 600],
        fingerprint: [7; 32],
        listen_addrs: vec!["/ip4/192.0.2.1/udp/4433/quic-v1".into()],
        certificate_not_after: Timestamp::from_millis(2_000_000_000_000),
        registered_at: Timestamp::from_millis(1_700_000_000_000),
        policy: Policy::default(),
    }
}

fn main() {
    let base = std::env::args().nth(1).map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::tempdir_in(&base).unwrap();
    let store = Store::open(&dir.path().join("throughput.redb")).unwrap();
    println!("store: {}", store.path().display());

    // The disk's own limit, for scale: 4 KiB written and fsynced, in a loop.
    let probe = std::fs::File::create(dir.path().join("fsync-probe")).unwrap();
    let started = Instant::now();
    for i in 0..200u64 {
        probe.write_all_at(&[0x5a; 4096], (i % 16) * 4096).unwrap();
        probe.sync_all().unwrap();
    }
    let fsyncs = 200.0 / started.elapsed().as_secs_f64();
    println!("raw disk: {fsyncs:.0} fsyncs/s (4 KiB write + fsync)");

    let started = Instant::now();
    for n in 0..SERIAL_WRITES {
        store.put_instance(&instance(n)).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let serial = f64::from(SERIAL_WRITES) / secs;
    println!(
        "1 writer, one write per commit: {SERIAL_WRITES} durable commits in {secs:.2} s = {:.0} commits/s",
        serial
    );

    let started = Instant::now();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..WRITES_PER_WRITER {
                    store.put_instance(&instance(1_000_000 + w * WRITES_PER_WRITER + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = WRITERS * WRITES_PER_WRITER;
    println!(
        "{WRITERS} concurrent writers (group commit): {total} durable writes in {secs:.2} s = {:.0} writes/s",
        f64::from(total) / secs
    );
    println!("group commit: {:.0}x the one-writer rate", f64::from(total) / secs / serial);
    assert_eq!(store.instances().unwrap().len() as u32, SERIAL_WRITES + total);
}
