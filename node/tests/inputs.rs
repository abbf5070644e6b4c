//! `/kaapana/inputs/1` end to end: the owner is a real `kaapana-node run` process on a real
//! containerd (its first job makes the "model"); the runners are in-process libp2p peers with
//! the runner sites' keys, fetching it over real loopback sockets.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::model::owner_with_model;
use common::{TestPeer, test_dir};
use kaapana_node::blobs::{BlobError, BlobStore};
use kaapana_node::net::inputs::{FetchError, FetchOutcome, fetch_input};
use kaapana_protocol::JobId;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn only_the_jobs_runner_gets_an_input_and_a_partial_fetch_resumes() {
    let tmp = test_dir();
    let root = tmp.path();
    // A 2 MB model at the owner; the training job reading it goes to "runner".
    let m = owner_with_model(root, &["other"], "yes w | head -c 2000000 > /output/weights", WAIT);
    let (d, owner, peer, train, model) = (&m.daemon, &m.owner, &m.runner, m.train, m.model);
    let digest = model.digest;
    let bytes = m.bytes();
    let id = m.workflow_id();
    let stranger = TestPeer::new(&m.others[0]);
    stranger.allow(owner);
    stranger.connect(owner, WAIT);

    let fetch = |p: &TestPeer, job: JobId, store: &BlobStore| {
        p.block_on(fetch_input(p.stream_control(), owner.peer_id(), job, model, store))
    };
    let refused = |r: Result<_, FetchError>| match r {
        Err(FetchError::Refused(detail)) => detail,
        other => panic!("not refused: {other:?}"),
    };

    // Another registered instance, or the runner asking for a job that is not its: refused,
    // nothing written.
    let elsewhere = BlobStore::open(&root.join("other-blobs")).unwrap();
    let why = refused(fetch(&stranger, train, &elsewhere));
    assert!(why.contains("not an input of a live job"), "{why}");
    let store = BlobStore::open(&root.join("runner-blobs")).unwrap();
    let why = refused(fetch(peer, JobId::from_bytes([7; 16]), &store));
    assert!(why.contains("not an input"), "{why}");
    assert!(store.path(&digest).is_none());

    // Half of it arrived in an earlier attempt: the fetch continues from there.
    let half = bytes.len() / 2;
    store.remove_partial(&digest).unwrap();
    let mut earlier = store.begin(model).unwrap();
    earlier.write(&bytes[..half]).unwrap();
    earlier.checkpoint().unwrap();
    drop(earlier);
    let (path, how) = fetch(peer, train, &store).unwrap();
    assert_eq!(
        how,
        FetchOutcome::Fetched { resumed_from: half as u64, received: (bytes.len() - half) as u64 }
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "byte-identical");
    // Held now: not fetched again.
    assert_eq!(fetch(peer, train, &store).unwrap().1, FetchOutcome::AlreadyHere);

    // A corrupt partial file: the digest does not match, nothing is kept, and the next
    // attempt fetches it whole.
    let fresh = BlobStore::open(&root.join("fresh-blobs")).unwrap();
    let mut earlier = fresh.begin(model).unwrap();
    earlier.write(&vec![b'x'; half]).unwrap();
    earlier.checkpoint().unwrap();
    drop(earlier);
    match fetch(peer, train, &fresh) {
        Err(FetchError::Blob(BlobError::DigestMismatch { .. })) => {}
        other => panic!("a corrupt partial file was kept: {other:?}"),
    }
    assert!(fresh.path(&digest).is_none() && !fresh.partial_path(&digest).exists());
    let (_, how) = fetch(peer, train, &fresh).unwrap();
    assert_eq!(how, FetchOutcome::Fetched { resumed_from: 0, received: bytes.len() as u64 });

    // The owner logged what it sent and refused.
    let served = d.event_details(0, "input_served");
    assert_eq!(served.iter().filter(|s| s.contains("refused")).count(), 2, "{served:?}");
    assert_eq!(served.iter().filter(|s| s.contains(" bytes)")).count(), 3, "{served:?}");

    // The owner counts what it sent: the second half twice, then the whole.
    let sent = 2 * (bytes.len() - half) + bytes.len();
    assert_eq!(d.metric("kaapana_node_input_bytes_sent_total"), sent as f64);

    // Once the job is cancelled, its input is not sent any more.
    let _: serde_json::Value =
        d.api().post(&format!("/v1/workflows/{id}/cancel"), &serde_json::json!({})).unwrap();
    let again = BlobStore::open(&root.join("again-blobs")).unwrap();
    let why = refused(fetch(peer, train, &again));
    assert!(why.contains("not an input of a live job"), "{why}");
    drop(stranger);
    drop(m);
}
