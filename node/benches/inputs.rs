//! Input fetch throughput on loopback: a runner (an in-process libp2p peer with the runner
//! site's key) fetches a model its job reads from the owner (a `kaapana-node run` process)
//! over `/kaapana/inputs/1`: a 100 MB model by default, made by the owner's first job on a
//! real containerd. Each round fetches into an empty blob store (hashing and writing on the
//! runner's side included); the last line is a fetch of a blob the runner holds already.
//!
//! `cargo bench -p kaapana-node --bench inputs` (add `-- N` for N MB, `-- N R` for R rounds).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::model::owner_with_model;
use common::test_dir;
use kaapana_node::blobs::BlobStore;
use kaapana_node::net::inputs::fetch_input;

const WAIT: Duration = Duration::from_secs(300);

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let mb = args.first().copied().unwrap_or(100);
    let rounds = args.get(1).copied().unwrap_or(5);
    let tmp = test_dir();
    let root = tmp.path();
    let command = format!("head -c {} /dev/urandom > /output/weights", mb * 1_000_000);
    let m = owner_with_model(root, &[], &command, WAIT);
    let (owner, peer, train, model) = (&m.owner, &m.runner, m.train, m.model);
    println!("model bundle: {:.1} MB (a tar of {mb} MB of random bytes)", model.size as f64 / 1e6);
    let mut speeds = Vec::new();
    for r in 0..rounds {
        let store = BlobStore::open(&root.join(format!("runner-blobs-{r}"))).unwrap();
        let t = Instant::now();
        let control = peer.stream_control();
        peer.block_on(fetch_input(control, owner.peer_id(), train, model, &store)).unwrap();
        let s = t.elapsed().as_secs_f64();
        speeds.push(model.size as f64 / 1e6 / s);
        println!("fetch {}: {:.3} s, {:.0} MB/s", r + 1, s, model.size as f64 / 1e6 / s);
        std::fs::remove_dir_all(root.join(format!("runner-blobs-{r}"))).unwrap();
    }
    speeds.sort_by(f64::total_cmp);
    println!("median {:.0} MB/s over {rounds} fetches", speeds[speeds.len() / 2]);
    let store = BlobStore::open(&root.join("held")).unwrap();
    peer.block_on(fetch_input(peer.stream_control(), owner.peer_id(), train, model, &store))
        .unwrap();
    let t = Instant::now();
    peer.block_on(fetch_input(peer.stream_control(), owner.peer_id(), train, model, &store))
        .unwrap();
    println!("held already: {:.3} ms, 0 bytes sent", t.elapsed().as_secs_f64() * 1000.0);
    drop(m);
}
