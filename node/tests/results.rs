//! `/kaapana/results/1` end to end: the owner is a real `kaapana-node run` process, the runner
//! an in-process libp2p peer with the runner site's key (the daemon's own swarm code), on real
//! loopback sockets.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{Daemon, Site, TestPeer, federation, test_dir};
use kaapana_node::blobs::hash_file;
use kaapana_node::net::results::{
    RejectCode, ResultError, ResultPart, SendOptions, SendOutcome, send_envelope, send_result,
    send_result_part,
};
use kaapana_node::store::Store;
use kaapana_protocol::{
    BlobRef, ExitStatus, Header, JobId, JobTimings, RejectReason, ResultManifest, Signed,
    Timestamp, WorkflowId,
};

const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

fn random_bytes(n: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut out = vec![0u8; n];
    for chunk in out.chunks_mut(MIB) {
        ring::rand::SystemRandom::new().fill(chunk).unwrap();
    }
    out
}

fn random_job() -> JobId {
    JobId::from_bytes(random_bytes(16).try_into().unwrap())
}

fn manifest(job: JobId, bundle: BlobRef) -> ResultManifest {
    let t = now();
    ResultManifest {
        header: Header::new(t, Duration::from_secs(24 * 3600)),
        job_id: job,
        workflow_id: WorkflowId::from_bytes([3; 16]),
        attempt: 0,
        exit: ExitStatus::Exited(0),
        bundle,
        log: None,
        timings: JobTimings { received_at: t, started_at: t, finished_at: t },
    }
}

/// An owner daemon and an in-process runner peer connected to it (over TCP, or QUIC).
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    owner: Site,
    runner: Site,
    daemon: Option<Daemon>,
    peer: TestPeer,
}

impl Setup {
    fn new(quic: bool) -> Self {
        Self::with_quota(quic, None)
    }

    /// [`Setup::new`] with `[workflows] max_result_bytes_per_runner` at the owner.
    fn with_quota(quic: bool, quota: Option<u64>) -> Self {
        let dir = test_dir();
        let root = dir.path().to_owned();
        let mut sites = federation(&root, &["owner", "runner"]).into_iter();
        let (owner, runner) = (sites.next().unwrap(), sites.next().unwrap());
        if let Some(q) = quota {
            let path = owner.dir.join("config.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with("# max_result_bytes_per_runner"))
                .expect("config.toml documents max_result_bytes_per_runner")
                .to_owned();
            let text = text.replace(&line, &format!("max_result_bytes_per_runner = {q}"));
            std::fs::write(&path, text).unwrap();
        }
        let daemon = owner.start();
        let peer = TestPeer::new(&runner);
        if quic {
            peer.allow_quic(&owner);
        } else {
            peer.allow(&owner);
        }
        peer.connect(&owner, WAIT);
        Self { _dir: dir, root, owner, runner, daemon: Some(daemon), peer }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    /// A job the owner submits to the runner (the owner stores results only of its own jobs).
    fn submitted_job(&self) -> JobId {
        self.daemon().submit_placeholder_job("runner")
    }

    /// A random bundle file of `size` bytes and its reference.
    fn bundle(&self, name: &str, size: usize) -> (PathBuf, BlobRef) {
        let path = self.root.join(name);
        std::fs::write(&path, random_bytes(size)).unwrap();
        let blob = hash_file(&path).unwrap();
        (path, blob)
    }

    /// A result manifest for `blob`, signed by the runner site.
    fn signed(&self, job: JobId, blob: BlobRef) -> Signed<ResultManifest> {
        Signed::sign(self.runner.identity().signing_key(), &manifest(job, blob)).unwrap()
    }

    fn send(
        &self,
        signed: &Signed<ResultManifest>,
        file: &Path,
    ) -> Result<SendOutcome, ResultError> {
        self.send_with(signed, file, &SendOptions::default())
    }

    fn send_with(
        &self,
        signed: &Signed<ResultManifest>,
        file: &Path,
        opts: &SendOptions,
    ) -> Result<SendOutcome, ResultError> {
        let control = self.peer.stream_control();
        let owner = self.owner.peer_id();
        self.peer.block_on(send_result_part(control, owner, signed, ResultPart::Bundle, file, opts))
    }

    fn stored_path(&self, blob: &BlobRef) -> PathBuf {
        self.owner.dir.join("blobs/sha256").join(blob.digest.hex())
    }

    fn partial_path(&self, blob: &BlobRef) -> PathBuf {
        self.owner.dir.join("blobs/partial").join(format!("{}.part", blob.digest.hex()))
    }

    fn files_in(&self, sub: &str) -> Vec<String> {
        match std::fs::read_dir(self.owner.dir.join("blobs").join(sub)) {
            Ok(entries) => {
                entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Stops the owner and opens its store.
    fn stop_and_open_store(&mut self) -> Store {
        assert!(self.daemon.take().unwrap().stop(), "the owner did not stop cleanly");
        Store::open(&self.owner.dir.join("node.redb")).unwrap()
    }
}

fn assert_same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x.len() == y.len() && x == y, "{} and {} differ", a.display(), b.display());
}

fn rejected(r: Result<SendOutcome, ResultError>) -> (RejectCode, String) {
    match r {
        Err(ResultError::Rejected { reason, detail }) => (reason, detail),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_bundle_arrives_byte_identical_and_the_result_is_recorded() {
    let mut s = Setup::new(false);
    let (file, blob) = s.bundle("bundle.tar", 20 * MIB);
    let job = s.submitted_job();
    let signed = s.signed(job, blob);
    let before = s.daemon().last_event();

    let started = std::time::Instant::now();
    let outcome = s.send(&signed, &file).unwrap();
    let took = started.elapsed();
    assert_eq!(outcome, SendOutcome::Stored { resumed_from: 0, sent: blob.size });
    eprintln!("20 MiB over TCP in {took:?}");

    let stored = s.stored_path(&blob);
    assert_same_file(&stored, &file);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777, 0o444);
    assert!(s.files_in("partial").is_empty(), "{:?}", s.files_in("partial"));
    let event = s.daemon().wait_for_event(before, WAIT, |e| e.kind == "result_received");
    assert_eq!(event.peer.as_deref(), Some("runner"));
    assert!(event.detail.contains(&job.to_string()), "{event:?}");
    assert!(event.detail.contains(&blob.digest.to_string()), "{event:?}");

    // The same result again: the owner has the blob, nothing is sent.
    assert_eq!(s.send(&signed, &file).unwrap(), SendOutcome::AlreadyStored);
    // Through the plain entry point too.
    let control = s.peer.stream_control();
    let again = s.peer.block_on(send_result(control, s.owner.peer_id(), &signed, &file));
    assert_eq!(again.unwrap(), SendOutcome::AlreadyStored);

    let store = s.stop_and_open_store();
    assert_eq!(store.result(&job).unwrap().as_deref(), Some(signed.as_bytes()));
    assert_eq!(store.results().unwrap().len(), 1);
}

#[test]
fn a_bundle_arrives_over_quic() {
    let s = Setup::new(true);
    let (file, blob) = s.bundle("bundle.tar", 20 * MIB);
    let signed = s.signed(s.submitted_job(), blob);
    let outcome = s.send(&signed, &file).unwrap();
    assert_eq!(outcome, SendOutcome::Stored { resumed_from: 0, sent: blob.size });
    assert_same_file(&s.stored_path(&blob), &file);
}

#[test]
fn an_interrupted_transfer_resumes_where_the_owner_stands() {
    let mut s = Setup::new(false);
    let (file, blob) = s.bundle("bundle.tar", 20 * MIB);
    let job = s.submitted_job();
    let signed = s.signed(job, blob);
    let before = s.daemon().last_event();

    let half = blob.size / 2;
    let opts = SendOptions { stop_after: Some(half), ..SendOptions::default() };
    match s.send_with(&signed, &file, &opts) {
        Err(ResultError::Interrupted { resumed_from: 0, sent }) => assert_eq!(sent, half),
        other => panic!("expected an interruption, got {other:?}"),
    }
    // The owner notices the end of the stream and keeps what came.
    let event = s.daemon().wait_for_event(before, WAIT, |e| e.kind == "result_incomplete");
    assert!(event.detail.contains("they are kept"), "{event:?}");
    let kept = std::fs::metadata(s.partial_path(&blob)).unwrap().len();
    assert!(kept > 0 && kept <= half, "{kept} bytes kept of {half} sent");
    // A resume point: what came is fsynced and its length recorded, so that the offer after a
    // crash is all of it and nothing that was not on disk.
    let record = s.partial_path(&blob).with_extension("part.synced");
    let durable = u64::from_be_bytes(std::fs::read(&record).unwrap().try_into().unwrap());
    assert_eq!(durable, kept, "the owner made every kept byte durable");
    assert!(!s.stored_path(&blob).exists());

    let outcome = s.send(&signed, &file).unwrap();
    assert_eq!(outcome, SendOutcome::Stored { resumed_from: kept, sent: blob.size - kept });
    assert_same_file(&s.stored_path(&blob), &file);
    assert!(s.files_in("partial").is_empty());
    let store = s.stop_and_open_store();
    assert_eq!(store.result(&job).unwrap().as_deref(), Some(signed.as_bytes()));
}

#[test]
fn a_tampered_bundle_is_rejected_and_nothing_is_kept() {
    let mut s = Setup::new(false);
    let (file, blob) = s.bundle("bundle.tar", 4 * MIB);
    let job = s.submitted_job();
    let signed = s.signed(job, blob);
    // Same size, one bit flipped in the middle.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[2 * MIB + 17] ^= 0x10;
    let tampered = s.root.join("tampered.tar");
    std::fs::write(&tampered, &bytes).unwrap();

    let metric = r#"kaapana_node_rejections_total{reason="digest_mismatch"}"#;
    assert_eq!(s.daemon().metric(metric), 0.0);
    let (reason, detail) = rejected(s.send(&signed, &tampered));
    assert_eq!(reason, RejectCode::DigestMismatch);
    assert!(detail.contains(&blob.digest.to_string()), "{detail}");
    assert!(!reason.is_transient());
    assert!(s.files_in("sha256").is_empty(), "{:?}", s.files_in("sha256"));
    assert!(s.files_in("partial").is_empty(), "{:?}", s.files_in("partial"));
    assert_eq!(s.daemon().metric(metric), 1.0);

    // The genuine bundle is still welcome afterwards.
    assert!(matches!(s.send(&signed, &file).unwrap(), SendOutcome::Stored { resumed_from: 0, .. }));
    assert_same_file(&s.stored_path(&blob), &file);
    drop(s.stop_and_open_store());
}

#[test]
fn a_manifest_of_an_unknown_signer_or_tampered_is_rejected_before_any_byte() {
    let mut s = Setup::new(false);
    let (file, blob) = s.bundle("bundle.tar", 2 * MIB);
    let job = s.submitted_job();

    // Signed by a key the owner never registered (sent by the registered runner).
    let stranger = kaapana_certs::Identity::generate().unwrap();
    let signed = Signed::sign(stranger.signing_key(), &manifest(job, blob)).unwrap();
    let (reason, detail) = rejected(s.send(&signed, &file));
    assert_eq!(reason, RejectCode::Manifest(RejectReason::UnknownSigner), "{detail}");

    // Signed by the runner, then one payload byte changed.
    let mut envelope = s.signed(job, blob).into_bytes();
    let at = envelope.len() - 64 - 3;
    envelope[at] ^= 1;
    let control = s.peer.stream_control();
    let owner = s.owner.peer_id();
    let opts = SendOptions::default();
    let r = s.peer.block_on(send_envelope(
        control,
        owner,
        &envelope,
        ResultPart::Bundle,
        blob,
        &file,
        &opts,
    ));
    let (reason, detail) = rejected(r);
    assert_eq!(reason, RejectCode::Manifest(RejectReason::BadSignature), "{detail}");

    // Garbage instead of an envelope.
    let control = s.peer.stream_control();
    let r = s.peer.block_on(send_envelope(
        control,
        owner,
        b"not an envelope",
        ResultPart::Bundle,
        blob,
        &file,
        &opts,
    ));
    assert!(matches!(rejected(r).0, RejectCode::Manifest(RejectReason::Malformed)));

    // A log that the manifest does not name.
    let signed = s.signed(job, blob);
    let control = s.peer.stream_control();
    let r = s.peer.block_on(send_envelope(
        control,
        owner,
        signed.as_bytes(),
        ResultPart::Log,
        blob,
        &file,
        &opts,
    ));
    assert_eq!(rejected(r).0, RejectCode::NoSuchPart);

    // No byte of the bundle was taken: no partial file, nothing stored, nothing recorded.
    assert!(s.files_in("partial").is_empty(), "{:?}", s.files_in("partial"));
    assert!(s.files_in("sha256").is_empty());
    let d = s.daemon();
    assert_eq!(d.metric(r#"kaapana_node_rejections_total{reason="unknown_signer"}"#), 1.0);
    assert_eq!(d.metric(r#"kaapana_node_rejections_total{reason="bad_signature"}"#), 1.0);
    let store = s.stop_and_open_store();
    assert_eq!(store.result(&job).unwrap(), None);
}

#[test]
fn a_result_for_a_job_the_owner_did_not_submit_to_that_runner_is_refused() {
    let s = Setup::new(false);
    let (file, blob) = s.bundle("bundle.tar", MIB);
    let (reason, detail) = rejected(s.send(&s.signed(random_job(), blob), &file));
    assert_eq!(reason, RejectCode::NotYourJob, "{detail}");
    assert!(detail.contains("was not submitted to"), "{detail}");
    assert!(s.files_in("sha256").is_empty(), "nothing may be kept");
    assert_eq!(s.daemon().metric("kaapana_node_rejections_total{reason=\"not_your_job\"}"), 1.0);
}

#[test]
fn an_owner_refuses_results_beyond_its_per_runner_quota() {
    let quota = 3 * MIB as u64;
    let s = Setup::with_quota(false, Some(quota));
    let quota_metric = r#"kaapana_node_rejections_total{reason="quota_exceeded"}"#;

    // 2 MiB of 3: stored.
    let (first, first_blob) = s.bundle("first.tar", 2 * MIB);
    let first_job = s.submitted_job();
    let first_signed = s.signed(first_job, first_blob);
    assert!(matches!(s.send(&first_signed, &first).unwrap(), SendOutcome::Stored { .. }));

    // 2 MiB more would make 4 MiB: refused before any byte, nothing kept.
    let (second, second_blob) = s.bundle("second.tar", 2 * MIB);
    let second_job = s.submitted_job();
    let before = s.daemon().last_event();
    let (code, detail) = rejected(s.send(&s.signed(second_job, second_blob), &second));
    assert_eq!(code, RejectCode::QuotaExceeded);
    assert!(code.is_transient(), "a quota can be raised: the runner tries again later");
    assert!(
        detail.contains(&format!("{} bytes of results stored", 2 * MIB))
            && detail.contains(&format!("quota of {quota} bytes")),
        "{detail}"
    );
    let event = s.daemon().wait_for_event(before, WAIT, |e| e.kind == "result_rejected");
    assert!(event.detail.starts_with("quota_exceeded: "), "{event:?}");
    assert_eq!(s.daemon().metric(quota_metric), 1.0);
    assert!(!s.stored_path(&second_blob).exists());
    assert!(s.files_in("partial").is_empty(), "{:?}", s.files_in("partial"));

    // 1 MiB fills the quota exactly: stored.
    let (third, third_blob) = s.bundle("third.tar", MIB);
    let third_job = s.submitted_job();
    assert!(matches!(
        s.send(&s.signed(third_job, third_blob), &third).unwrap(),
        SendOutcome::Stored { .. }
    ));
    // A blob that is here already takes no more bytes: not refused.
    assert_eq!(s.send(&first_signed, &first).unwrap(), SendOutcome::AlreadyStored);
    // Anything more is refused.
    let (fourth, fourth_blob) = s.bundle("fourth.tar", 1000);
    let (code, _) = rejected(s.send(&s.signed(s.submitted_job(), fourth_blob), &fourth));
    assert_eq!(code, RejectCode::QuotaExceeded);
    assert_eq!(s.daemon().metric(quota_metric), 2.0);
}
