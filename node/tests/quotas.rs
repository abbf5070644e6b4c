//! Quotas and retention between real daemons (issue 19): a registered instance's job messages
//! about jobs it has no part in are refused and counted; a peer beyond its inbox quota or its
//! share of the replay window is refused (`quota_exceeded`) until retention makes room, and
//! nothing it sent is forgotten before it expires.
//!
//! Every site is a `kaapana-node run` process on loopback; "mallory" is a registered instance
//! played by the test process ([`TestPeer`]), which signs whatever it likes with its own key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::{Daemon, Site, TestPeer};
use kaapana_node::api::{InboxEntry, JobsView, OwnerJobView, SubmitJobRequest};
use kaapana_node::net::results::{RejectCode, ResultError, ResultPart, SendOptions};
use kaapana_protocol::{
    BlobRef, Cancel, CapabilityAd, ContainerWork, Delivery, ExecutorKind, ExitStatus, Header,
    JobId, JobManifest, JobState, JobTimings, JobUpdate, NameScope, RejectReason, ResourceLimits,
    Resources, ResultManifest, Signed, Timestamp, Work, WorkflowId,
};

const T: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const IMAGE: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// `kaapana_node_peer_refused_total` for one signer, type and reason.
fn refused(d: &Daemon, peer: &str, kind: &str, reason: &str) -> f64 {
    d.metric(&format!(
        "kaapana_node_peer_refused_total{{peer=\"{peer}\",kind=\"{kind}\",reason=\"{reason}\"}}"
    ))
}

/// The one verdict of a one-message request, which must be a rejection for `reason`.
fn rejected(verdicts: &[Delivery], reason: RejectReason) -> String {
    match verdicts {
        [Delivery::Rejected { reason: r, detail }] if *r == reason => detail.clone(),
        other => panic!("expected {reason:?}, got {other:?}"),
    }
}

fn inbox_from(d: &Daemon, site: &Site) -> usize {
    let inbox: Vec<InboxEntry> = d.api().get("/v1/inbox?limit=10000").unwrap();
    inbox.iter().filter(|e| e.from == site.instance_id()).count()
}

/// Mallory's capability ad (so that an owner can place a job on it).
fn ad(peer: &TestPeer) -> Vec<u8> {
    let ad = CapabilityAd {
        header: Header::new(now(), HOUR),
        sequence: now().as_millis(),
        instance_name: "mallory".into(),
        node_version: "0.1.0".into(),
        executors: vec![ExecutorKind::Containerd],
        allowed_images: vec![],
        allowed_workflows: NameScope::Any,
        datasets: vec![],
        resources: Resources { cpu_millis: 4000, memory_bytes: 8 << 30, gpus: vec![] },
    };
    Signed::sign(peer.identity.signing_key(), &ad).unwrap().into_bytes()
}

fn update(
    job: JobId,
    workflow: WorkflowId,
    state: JobState,
    sequence: u32,
    life: Duration,
) -> JobUpdate {
    JobUpdate {
        header: Header::new(now(), life),
        job_id: job,
        workflow_id: workflow,
        attempt: 0,
        sequence,
        state,
        reason: None,
        retryable: false,
    }
}

fn owner_job(d: &Daemon, job: &str) -> OwnerJobView {
    let jobs: JobsView = d.api().get("/v1/jobs").unwrap();
    jobs.submitted.into_iter().find(|j| j.job_id == job).unwrap()
}

/// A third instance's updates, results, manifests and cancels about a job between two other
/// instances are refused before they are recorded (`not_your_job`), counted per signer, type
/// and reason, and change nothing at either of them; the honest pair then carries on.
#[test]
fn a_registered_third_instance_cannot_touch_another_pairs_job() {
    let tmp = common::test_dir();
    let root = tmp.path();
    let a = Site::init_networked(root, "site-a");
    let b = Site::init_networked(root, "site-b");
    let mallory = Site::init_networked(root, "mallory");
    let (bundle_a, bundle_b, bundle_m) = (a.export(root), b.export(root), mallory.export(root));
    a.register(&b, &bundle_b);
    a.register(&mallory, &bundle_m);
    // site-b runs site-a's jobs after a local approval: the job waits there meanwhile.
    b.ok(&["instance", "add", bundle_a.to_str().unwrap(), "--allow-any-workflow"]);
    b.register(&mallory, &bundle_m);
    let (da, db) = (a.start(), b.start());
    da.wait_until("site-b connected", T, |d| d.is_connected_to("site-b"));
    let peer = TestPeer::new(&mallory);
    for (site, d) in [(&a, &da), (&b, &db)] {
        peer.allow(site);
        peer.dial(site);
        d.wait_until("mallory connected", T, |d| d.is_connected_to("mallory"));
    }

    let job: OwnerJobView = da
        .api()
        .post(
            "/v1/jobs",
            &SubmitJobRequest {
                runner: "site-b".into(),
                workflow_name: "federated-statistics".into(),
                job_name: "stats".into(),
                image: IMAGE.into(),
                command: vec!["true".into()],
                env: vec![],
                dataset: None,
                timeout_secs: 60,
                cpu_millis: 0,
                memory_bytes: 0,
            },
        )
        .unwrap();
    let waiting = "pending (awaiting approval)";
    da.wait_until("the job waiting at site-b", T, |d| owner_job(d, &job.job_id).state == waiting);
    let job_id: JobId = job.job_id.parse().unwrap();
    let workflow: WorkflowId = job.workflow_id.parse().unwrap();
    let key = peer.identity.signing_key();
    let sign_update = |u: &JobUpdate| Signed::sign(key, u).unwrap().into_bytes();

    // At the owner: updates about its job that went to site-b, and about no job at all.
    for (state, seq) in [(JobState::Running, 1), (JobState::Finished, 2)] {
        let before = refused(&da, "mallory", "JobUpdate", "other_runner");
        let u = sign_update(&update(job_id, workflow, state, seq, HOUR));
        let detail = rejected(&peer.send(&a, vec![u]), RejectReason::NotYourJob);
        assert!(detail.contains("was sent to site-b, not to mallory"), "{detail}");
        assert_eq!(refused(&da, "mallory", "JobUpdate", "other_runner"), before + 1.0);
    }
    let stray = JobId::from_bytes([7; 16]);
    let u = sign_update(&update(stray, workflow, JobState::Finished, 1, HOUR));
    rejected(&peer.send(&a, vec![u]), RejectReason::NotYourJob);
    assert_eq!(refused(&da, "mallory", "JobUpdate", "unknown_job"), 1.0);
    // A result for it, on the results stream.
    let bundle = root.join("bundle.tar");
    std::fs::write(&bundle, vec![5u8; 4096]).unwrap();
    let blob: BlobRef = kaapana_node::blobs::hash_file(&bundle).unwrap();
    let result = ResultManifest {
        header: Header::new(now(), HOUR),
        job_id,
        workflow_id: workflow,
        attempt: 0,
        exit: ExitStatus::Exited(0),
        bundle: blob,
        log: None,
        timings: JobTimings { received_at: now(), started_at: now(), finished_at: now() },
    };
    let signed = Signed::sign(key, &result).unwrap();
    let sent = peer.block_on(kaapana_node::net::results::send_result_part(
        peer.stream_control(),
        a.peer_id(),
        &signed,
        ResultPart::Bundle,
        &bundle,
        &SendOptions::default(),
    ));
    assert!(
        matches!(sent, Err(ResultError::Rejected { reason: RejectCode::NotYourJob, .. })),
        "{sent:?}"
    );
    assert_eq!(refused(&da, "mallory", "ResultManifest", "other_runner"), 1.0);

    // At the runner: a cancel of site-a's job, and manifests mallory signed for site-a's
    // workflow (naming site-a as the owner) or for another runner.
    let cancel = Cancel {
        header: Header::new(now(), HOUR),
        workflow_id: workflow,
        job_id: Some(job_id),
        reason: "mine now".into(),
    };
    let cancel = Signed::sign(key, &cancel).unwrap().into_bytes();
    rejected(&peer.send(&b, vec![cancel]), RejectReason::NotYourJob);
    assert_eq!(refused(&db, "mallory", "Cancel", "not_the_owner"), 1.0);
    let manifest = |owner: &Site, runner: &Site| JobManifest {
        header: Header::new(now(), HOUR),
        job_id: JobId::from_bytes([8; 16]),
        workflow_id: workflow,
        owner: owner.instance_id().parse().unwrap(),
        runner: runner.instance_id().parse().unwrap(),
        job_name: "stats".into(),
        attempt: 0,
        dataset: None,
        work: Work::Container(ContainerWork {
            image: IMAGE.parse().unwrap(),
            command: vec!["true".into()],
            env: vec![],
        }),
        limits: ResourceLimits { cpu_millis: 0, memory_bytes: 0, gpus: 0 },
        timeout_secs: 60,
        inputs: vec![],
        workflow_name: "federated-statistics".into(),
    };
    for (m, reason) in
        [(manifest(&a, &b), "not_the_owner"), (manifest(&mallory, &a), "other_recipient")]
    {
        let m = Signed::sign(key, &m).unwrap().into_bytes();
        rejected(&peer.send(&b, vec![m]), RejectReason::NotYourJob);
        assert_eq!(refused(&db, "mallory", "JobManifest", reason), 1.0, "{reason}");
    }
    // Each refusal is an event at the daemon that refused it.
    let events = db.event_details(0, "message_rejected");
    assert!(events.iter().any(|e| e.contains("Cancel not_the_owner")), "{events:#?}");

    // Nothing moved or was kept: the job waits at both sides, nothing of mallory's is in
    // either inbox, and site-b runs no job of mallory's.
    assert_eq!(owner_job(&da, &job.job_id).state, waiting);
    let at_b: JobsView = db.api().get("/v1/jobs").unwrap();
    assert_eq!(at_b.running_here.len(), 1, "{at_b:#?}");
    assert_eq!(at_b.running_here[0].state, waiting);
    assert_eq!((inbox_from(&da, &mallory), inbox_from(&db, &mallory)), (0, 0));
    assert!(da.is_connected_to("mallory") && db.is_connected_to("mallory"));

    // The honest pair carries on: approved, the job fails at site-b (no container runtime
    // here) and site-a learns it.
    b.ok(&["job", "approve", &job.job_id]);
    da.wait_until("the job failed", T, |d| owner_job(d, &job.job_id).state == "failed");
    assert!(owner_job(&da, &job.job_id).reason.unwrap().contains("no executor"));
    drop(peer);
    assert!(da.stop() && db.stop());
}

/// site-a with `[limits]` set, and mallory connected and running one job of site-a's; returns
/// the daemon, the peer, the job and its workflow.
fn owner_with_a_job_on_mallory(
    root: &std::path::Path,
    limits: &[(&str, &str)],
) -> (Site, Site, Daemon, TestPeer, JobId, WorkflowId) {
    let a = Site::init_networked(root, "site-a");
    let mallory = Site::init_networked(root, "mallory");
    a.register(&mallory, &mallory.export(root));
    for (key, value) in limits {
        a.set_config("limits", key, value);
    }
    let da = a.start();
    let peer = TestPeer::new(&mallory);
    peer.allow(&a);
    peer.dial(&a);
    da.wait_until("mallory connected", T, |d| d.is_connected_to("mallory"));
    assert_eq!(peer.send(&a, vec![ad(&peer)]), vec![Delivery::Accepted]);
    da.wait_for_capabilities("mallory", T);
    let toml = format!(
        "name = \"busy\"\n[[job]]\nname = \"train\"\nrunner = \"mallory\"\nimage = \"{IMAGE}\"\ncommand = [\"true\"]\n"
    );
    let w = da.submit_workflow(&toml);
    da.wait_until("the job delivered", T, |d| d.instance("mallory").unwrap().outbox_depth == 0);
    let job = w.jobs[0].job_id.parse().unwrap();
    let workflow = w.workflow_id.parse().unwrap();
    (a, mallory, da, peer, job, workflow)
}

/// Restarts `d` (after `change`s to its site's config) and reconnects `peer`.
fn restart(d: Daemon, site: &Site, peer: &TestPeer, change: &[(&str, &str)]) -> Daemon {
    assert!(d.stop());
    for (key, value) in change {
        site.set_config("limits", key, value);
    }
    let d = site.start();
    peer.dial(site);
    d.wait_until("mallory connected", T, |d| d.is_connected_to("mallory"));
    d
}

/// A peer at its inbox quota (entries, then bytes) gets `quota_exceeded`, counted, while its
/// capability ads still go through; the counts survive a restart (read from the store); once
/// retention prunes its old entries, the refused message is taken.
#[test]
fn a_peer_beyond_its_inbox_quota_is_refused_until_retention_makes_room() {
    let tmp = common::test_dir();
    let (a, mallory, da, peer, job, workflow) =
        owner_with_a_job_on_mallory(tmp.path(), &[("inbox_entries_per_peer", "4")]);
    let key = peer.identity.signing_key();
    let signed = |seq: u32| {
        Signed::sign(key, &update(job, workflow, JobState::Running, seq, HOUR))
            .unwrap()
            .into_bytes()
    };
    let mut sizes = 0;
    for seq in 1..=4 {
        let u = signed(seq);
        sizes += u.len();
        assert_eq!(peer.send(&a, vec![u]), vec![Delivery::Accepted], "update {seq}");
    }
    da.wait_until("the job running", T, |d| {
        d.workflow(&workflow.to_string()).jobs[0].state == "running"
    });
    let detail = rejected(&peer.send(&a, vec![signed(5)]), RejectReason::QuotaExceeded);
    assert!(detail.contains("inbox_entries_per_peer"), "{detail}");
    assert_eq!(refused(&da, "mallory", "JobUpdate", "inbox_entries"), 1.0);
    // The refusal is transient, and the rest of a request waits behind it, in order.
    match &peer.send(&a, vec![signed(5), signed(6)])[..] {
        [
            Delivery::Rejected { reason: RejectReason::QuotaExceeded, .. },
            Delivery::Rejected { reason: RejectReason::Overloaded, .. },
        ] => {}
        other => panic!("{other:?}"),
    }
    assert!(RejectReason::QuotaExceeded.is_transient());
    // Ads are not inbox entries.
    assert_eq!(peer.send(&a, vec![ad(&peer)]), vec![Delivery::Accepted]);
    assert_eq!(inbox_from(&da, &mallory), 4);

    // Bytes: after a restart the four entries still count (read from the store).
    let next = signed(5);
    let limit = (sizes + next.len() - 1).to_string();
    let da = restart(
        da,
        &a,
        &peer,
        &[("inbox_entries_per_peer", "1000"), ("inbox_bytes_per_peer", &limit)],
    );
    let detail = rejected(&peer.send(&a, vec![next.clone()]), RejectReason::QuotaExceeded);
    assert!(detail.contains("inbox_bytes_per_peer"), "{detail}");
    assert_eq!(refused(&da, "mallory", "JobUpdate", "inbox_bytes"), 1.0);

    // Retention: entries older than a second are pruned by the background pass, which gives
    // the quota back; the same message is taken now (it was never recorded).
    let da = restart(da, &a, &peer, &[("inbox_retention_secs", "1"), ("prune_interval_secs", "1")]);
    da.wait_until("the inbox pruned", T, |d| inbox_from(d, &mallory) == 0);
    let pruned = da.event_details(0, "retention");
    assert!(pruned.iter().any(|e| e.contains("pruned 4 inbox entries")), "{pruned:#?}");
    assert_eq!(da.metric("kaapana_node_inbox_pruned_total"), 4.0);
    assert_eq!(peer.send(&a, vec![next]), vec![Delivery::Accepted]);
    assert_eq!(da.workflow(&workflow.to_string()).jobs[0].state, "running");
    drop(peer);
    assert!(da.stop());
}

/// A peer with its share of unexpired message ids gets `quota_exceeded` for new messages,
/// while its old ones are still recognised as replays (nothing is forgotten before it
/// expires); once its messages expire and retention prunes their ids, it has room again.
#[test]
fn a_peer_at_its_share_of_seen_ids_is_refused_and_nothing_is_forgotten_before_expiry() {
    let tmp = common::test_dir();
    let (a, _, da, peer, job, workflow) = owner_with_a_job_on_mallory(
        tmp.path(),
        &[("seen_ids_per_peer", "3"), ("prune_interval_secs", "1")],
    );
    let key = peer.identity.signing_key();
    let signed = |seq: u32, life: Duration| {
        Signed::sign(key, &update(job, workflow, JobState::Running, seq, life))
            .unwrap()
            .into_bytes()
    };
    // Its ad is one id; two short-lived updates make three.
    let short = Duration::from_secs(3);
    let (first, second) = (signed(1, short), signed(2, short));
    for u in [&first, &second] {
        assert_eq!(peer.send(&a, vec![u.clone()]), vec![Delivery::Accepted]);
    }
    let third = signed(3, HOUR);
    let detail = rejected(&peer.send(&a, vec![third.clone()]), RejectReason::QuotaExceeded);
    assert!(detail.contains("unexpired messages"), "{detail}");
    assert_eq!(refused(&da, "mallory", "JobUpdate", "seen_ids"), 1.0);
    // Full, yet a replay is still a replay.
    rejected(&peer.send(&a, vec![first.clone()]), RejectReason::Replayed);

    // The two updates expire; the retention pass forgets their ids (and only theirs).
    da.wait_until("expired ids pruned", T, |d| {
        d.event_details(0, "retention").iter().any(|e| e.contains("2 expired message ids"))
    });
    assert_eq!(peer.send(&a, vec![third]), vec![Delivery::Accepted]);
    rejected(&peer.send(&a, vec![first]), RejectReason::Expired);
    assert_eq!(da.metric("kaapana_node_seen_ids_pruned_total"), 2.0);
    drop(peer);
    assert!(da.stop());
}
