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

use common::containerd::TestContainerd;
use common::{TestPeer, federation, test_dir};
use kaapana_node::blobs::{BlobStore, hash_file};
use kaapana_node::net::inputs::fetch_input;
use kaapana_protocol::{JobId, Sha256Digest};

const WAIT: Duration = Duration::from_secs(300);

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let mb = args.first().copied().unwrap_or(100);
    let rounds = args.get(1).copied().unwrap_or(5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let tmp = test_dir();
    let root = tmp.path();
    let mut sites = federation(root, &["owner", "runner"]).into_iter();
    let (owner, runner) = (sites.next().unwrap(), sites.next().unwrap());
    owner.set_executor(Some(ctd.containerd().socket()));
    let image = common::containerd::build_busybox_image(root, "busybox", false);
    owner.ok(&["image", "import", image.tar.to_str().unwrap()]);
    let d = owner.start();
    let peer = TestPeer::new(&runner);
    peer.allow(&owner);
    peer.connect(&owner, WAIT);
    let w = d.submit_workflow(&format!(
        r#"name = "round"
[[job]]
name = "model"
runner = "owner"
image = "{digest}"
command = ["sh", "-c", "head -c {bytes} /dev/urandom > /output/weights"]
timeout = "10m"
[[job]]
name = "train"
runner = "runner"
inputs = ["model"]
image = "{digest}"
"#,
        digest = image.digest,
        bytes = mb * 1_000_000,
    ));
    let id = w.workflow_id.clone();
    d.wait_until("the model and the training job's dispatch", WAIT, |d| {
        d.workflow(&id).jobs[1].state != "waiting"
    });
    let view = d.workflow(&id);
    let train: JobId = view.jobs[1].job_id.parse().unwrap();
    let digest: Sha256Digest = view.jobs[0].result.as_deref().unwrap().parse().unwrap();
    let model = hash_file(&owner.dir.join("blobs/sha256").join(digest.hex())).unwrap();
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
    drop(d);
    drop(ctd);
}
