//! Federation benchmark: real `kaapana-node run` processes on loopback.
//!
//! Prints, in one run:
//! * signed messages (job updates) per second that daemon B accepts from daemon A over
//!   `/kaapana/fed/1`:
//!   delivered from A's durable outbox, verified (signature, time, replay window) and durably
//!   recorded by B before it answers; beside raw ring Ed25519 verifications per second of the
//!   same envelope bytes on one core, and their ratio (target ≥ 0.5);
//! * the idle resident memory of a daemon with 0 and with 500 registered instances (targets
//!   ≤ 30 MiB and ≤ 64 MiB).
//!
//! `cargo bench -p kaapana-node --bench federation` (add `-- N` for N manifests, default
//! 20000).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Site, federation};
use kaapana_certs::{Identity, InstanceCertificate};
use kaapana_federation::{Policy, RegisteredInstance};
use kaapana_node::store::{Store, WriteOp};
use kaapana_protocol::{
    ContainerWork, DatasetRef, EnvVar, Header, ImageDigest, InstanceId, JobId, JobManifest,
    JobState, JobUpdate, ResourceLimits, Sha256Digest, Signed, Timestamp, Work, WorkflowId,
};

fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// A typical job manifest of about 1 KiB, signed by `owner` for `runner`.
fn job_manifest(owner: InstanceId, runner: InstanceId, n: u64) -> JobManifest {
    let mut job = [0u8; 16];
    job[..8].copy_from_slice(&n.to_be_bytes());
    JobManifest {
        header: Header::new(now(), Duration::from_secs(24 * 3600)),
        job_id: JobId::from_bytes(job),
        workflow_id: WorkflowId::from_bytes([7; 16]),
        owner,
        runner,
        job_name: "nnunet-predict-liver".into(),
        attempt: 0,
        dataset: Some(DatasetRef { name: "lits-ct-abdomen".into(), item: None }),
        work: Work::Container(ContainerWork {
        image: ImageDigest(Sha256Digest::of(b"registry.kaapana.local/nnunet-predict:0.4.1")),
        command: "python3 -m nnunet.inference.predict --input /input/dicom-to-nifti --output /output/segmentations --task Task003_Liver --model 3d_fullres --folds 0,1,2,3,4 --disable-tta --num-threads-preprocessing 4 --mode normal --save-probabilities --overwrite-existing --step-size 0.5 --chk model_final_checkpoint"
            .split(' ')
            .map(str::to_owned)
            .collect(),
        env: (0..12)
            .map(|i| EnvVar { name: format!("KAAPANA_SETTING_{i}"), value: format!("/models/nnunet/value-{i}-of-the-setting") })
            .collect(),
        }),
        limits: ResourceLimits { cpu_millis: 4000, memory_bytes: 16 << 30, gpus: 1 },
        timeout_secs: 3600,
        inputs: Vec::new(),
        workflow_name: "liver-segmentation".into(),
    }
}

/// A job update for that job, as a runner pushes them to an owner (the most frequent message
/// between instances). B does not know the job, so it records the message and changes nothing
/// else: the bench measures the message path, not job execution.
fn job_update(job: &JobManifest) -> JobUpdate {
    JobUpdate {
        header: Header::new(now(), Duration::from_secs(24 * 3600)),
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        attempt: 0,
        sequence: 3,
        state: JobState::Running,
        reason: Some(
            "container started on runner-instance bench-a (containerd 1.6.20, runc 1.1.5)".into(),
        ),
        retryable: false,
    }
}

/// Raw ring Ed25519 verifications per second of `envelope` on this thread, for `for_`.
fn ring_verifies_per_second(envelope: &[u8], for_: Duration) -> f64 {
    let (signed, sig) = envelope.split_at(envelope.len() - 64);
    let signer = Signed::<JobUpdate>::from_bytes(envelope).unwrap().claimed_signer();
    let pk = signer.ed25519_public_key().unwrap();
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < for_ {
        for _ in 0..100 {
            key.verify(std::hint::black_box(signed), sig).unwrap();
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn throughput(n: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let sites = federation(tmp.path(), &["bench-a", "bench-b"]);
    let (a, b) = (&sites[0], &sites[1]);
    let a_id: InstanceId = a.instance_id().parse().unwrap();
    let b_id: InstanceId = b.instance_id().parse().unwrap();

    // Fill A's outbox while nothing runs: the sender's API is not what is measured.
    let identity = Identity::load(&a.dir.join("identity.key")).unwrap();
    let store = Store::open(&a.dir.join("node.redb")).unwrap();
    let mut envelopes = Vec::with_capacity(n as usize);
    for i in 0..n {
        let signed =
            Signed::sign(identity.signing_key(), &job_update(&job_manifest(a_id, b_id, i)))
                .unwrap();
        envelopes.push(signed.into_bytes());
    }
    let envelope_len = envelopes[0].len();
    let sample = envelopes[0].clone();
    for chunk in envelopes.chunks(4096) {
        store
            .write(vec![WriteOp::EnqueueOutbox { peer: b_id, envelopes: chunk.to_vec() }])
            .unwrap();
    }
    drop(store);

    let ring_rate = ring_verifies_per_second(&sample, Duration::from_secs(2));

    let db = b.start();
    let da = a.start();
    let connected = db.wait_for_event(0, Duration::from_secs(30), |e| e.kind == "peer_connected");
    db.wait_until("all manifests accepted", Duration::from_secs(600), |d| {
        d.metric("kaapana_node_messages_in_total{kind=\"JobUpdate\"}") as u64 >= n
    });
    let inbox: Vec<kaapana_node::api::InboxEntry> =
        db.api().get(&format!("/v1/inbox?after={}&limit=1", n - 1)).unwrap();
    assert_eq!(inbox.len(), 1, "B's inbox should hold {n} manifests");
    // The last record's arrival time, from the store, in ms since the epoch.
    let last_ms = {
        let at = &inbox[0].received_at;
        let t = time_from_rfc3339_ms(at);
        t.max(connected.at_ms + 1)
    };
    let secs = (last_ms - connected.at_ms) as f64 / 1000.0;
    let rate = n as f64 / secs;
    assert_eq!(db.metric("kaapana_node_rejections_total{reason=\"replayed\"}"), 0.0);
    println!(
        "manifests:                   {n} signed JobUpdates of {envelope_len} bytes (envelope)"
    );
    println!(
        "accepted+verified+stored:    {rate:.0}/s  ({secs:.2} s from connection to the last durable record)"
    );
    println!("raw ring Ed25519 verify:     {ring_rate:.0}/s on one core, same bytes, same run");
    println!("ratio:                       {:.2} (target >= 0.5)", rate / ring_rate);
    assert!(da.stop() && db.stop());
}

/// `2026-11-25T22:30:41.123Z` → ms since the epoch.
fn time_from_rfc3339_ms(s: &str) -> u64 {
    let (date, time) = s.split_once('T').unwrap();
    let mut d = date.split('-').map(|x| x.parse::<i64>().unwrap());
    let (y, m, day) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
    let time = time.trim_end_matches('Z');
    let (hms, ms) = time.split_once('.').unwrap();
    let mut t = hms.split(':').map(|x| x.parse::<i64>().unwrap());
    let (hh, mm, ss) = (t.next().unwrap(), t.next().unwrap(), t.next().unwrap());
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((((days * 24 + hh) * 60 + mm) * 60 + ss) * 1000 + ms.parse::<i64>().unwrap()) as u64
}

fn idle_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let site = Site::init_networked(tmp.path(), "idle");
    let d = site.start();
    d.wait_until("settled", Duration::from_secs(10), |_| true);
    std::thread::sleep(Duration::from_secs(3));
    let rss0 = rss_kib(d.pid());
    assert!(d.stop());

    // 500 registered instances, offline (their addresses refuse connections).
    let store = Store::open(&site.dir.join("node.redb")).unwrap();
    let t = now();
    let ops: Vec<WriteOp> = (0..500)
        .map(|i| {
            let id = Identity::generate().unwrap();
            let cert = InstanceCertificate::self_signed(
                &id,
                &format!("peer-{i}"),
                t,
                t.saturating_add(Duration::from_secs(86_400)),
            )
            .unwrap();
            WriteOp::PutInstance(Box::new(RegisteredInstance {
                instance_id: id.instance_id(),
                name: format!("peer-{i}"),
                certificate_der: cert.der().to_vec(),
                fingerprint: cert.fingerprint().0,
                listen_addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 1 + i % 1000)],
                certificate_not_after: cert.not_after(),
                registered_at: t,
                policy: Policy::default(),
            }))
        })
        .collect();
    store.write(ops).unwrap();
    drop(store);
    let d = site.start();
    assert_eq!(d.instances().len(), 500);
    std::thread::sleep(Duration::from_secs(5));
    let rss500 = rss_kib(d.pid());
    assert!(d.stop());
    println!("idle RSS, 0 instances:       {:.1} MiB (target <= 30)", rss0 as f64 / 1024.0);
    println!("idle RSS, 500 instances:     {:.1} MiB (target <= 64)", rss500 as f64 / 1024.0);
}

fn main() {
    // `cargo bench` passes `--bench`; a number sets the manifest count.
    let n = std::env::args().skip(1).find_map(|a| a.parse::<u64>().ok()).unwrap_or(20_000);
    throughput(n);
    idle_memory();
}
