//! End-to-end tests of jobs between real daemons: submission, the runner's policy, approval,
//! and the state updates the owner receives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Daemon, Site};
use kaapana_node::api::{JobsView, OwnerJobView, RejectRequest, RunnerJobView, SubmitJobRequest};

const T: Duration = Duration::from_secs(30);
const IMAGE: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// site-a (owner) and site-b (runner); site-b registers site-a with `policy` flags.
fn pair(root: &std::path::Path, policy: &[&str]) -> (Site, Site) {
    let a = Site::init_networked(root, "site-a");
    let b = Site::init_networked(root, "site-b");
    // No container runtime here (`init_networked`): scheduled jobs fail with that reason.
    let (bundle_a, bundle_b) = (a.export(root), b.export(root));
    a.register(&b, &bundle_b);
    let mut args = vec!["instance", "add", bundle_a.to_str().unwrap()];
    args.extend_from_slice(policy);
    b.ok(&args);
    (a, b)
}

fn submit(owner: &Daemon, workflow: &str, dataset: Option<&str>) -> OwnerJobView {
    submit_job(owner, workflow, dataset, IMAGE, &["true"], 60)
}

fn submit_job(
    owner: &Daemon,
    workflow: &str,
    dataset: Option<&str>,
    image: &str,
    command: &[&str],
    timeout_secs: u32,
) -> OwnerJobView {
    owner
        .api()
        .post(
            "/v1/jobs",
            &SubmitJobRequest {
                runner: "site-b".into(),
                workflow_name: workflow.into(),
                job_name: "stats".into(),
                image: image.into(),
                command: command.iter().map(|c| (*c).to_owned()).collect(),
                env: vec![],
                dataset: dataset.map(str::to_owned),
                timeout_secs,
                cpu_millis: 500,
                memory_bytes: 128 << 20,
            },
        )
        .unwrap()
}

fn owner_view(owner: &Daemon, job: &str) -> OwnerJobView {
    let jobs: JobsView = owner.api().get("/v1/jobs").unwrap();
    jobs.submitted.into_iter().find(|j| j.job_id == job).unwrap()
}

fn wait_state(owner: &Daemon, job: &str, state: &str) -> OwnerJobView {
    owner.wait_until(&format!("job {job} {state}"), T, |d| owner_view(d, job).state == state);
    owner_view(owner, job)
}

#[test]
fn a_denied_job_fails_at_the_owner_with_the_rule_that_denied_it() {
    let tmp = common::test_dir();
    let (a, b) = pair(
        tmp.path(),
        &[
            "--allow-workflow",
            "federated-statistics",
            "--allow-dataset",
            "lung-ct",
            "--auto-execute",
        ],
    );
    let (da, db) = (a.start(), b.start());
    da.wait_until("connected", T, |d| d.is_connected_to("site-b"));

    let job = submit(&da, "crypto-mining", None);
    assert_eq!(job.state, "queued");
    let view = wait_state(&da, &job.job_id, "failed");
    assert_eq!(
        view.reason.as_deref(),
        Some("workflow crypto-mining is not allowed for instance site-a")
    );

    let job = submit(&da, "federated-statistics", Some("brain-mri"));
    let view = wait_state(&da, &job.job_id, "failed");
    assert_eq!(
        view.reason.as_deref(),
        Some("dataset brain-mri is not allowed for instance site-a")
    );

    // The runner keeps its own record with the same reason.
    let jobs: JobsView = db.api().get("/v1/jobs").unwrap();
    assert_eq!(jobs.running_here.len(), 2);
    assert!(jobs.running_here.iter().all(|j| j.state == "failed"));
}

#[test]
fn a_job_waits_for_approval_and_the_owner_learns_the_decision() {
    let tmp = common::test_dir();
    let (a, b) = pair(tmp.path(), &["--allow-any-workflow", "--allow-any-dataset"]);
    let (da, db) = (a.start(), b.start());
    da.wait_until("connected", T, |d| d.is_connected_to("site-b"));

    let rejected = submit(&da, "federated-statistics", None);
    let approved = submit(&da, "federated-statistics", None);
    wait_state(&da, &rejected.job_id, "pending (awaiting approval)");
    wait_state(&da, &approved.job_id, "pending (awaiting approval)");

    // The runner's admin sees both waiting, through the CLI.
    let pending = b.ok(&["job", "list", "--pending"]);
    assert!(pending.contains(&rejected.job_id) && pending.contains(&approved.job_id), "{pending}");

    let r: RunnerJobView = db
        .api()
        .post(
            &format!("/v1/jobs/{}/reject", rejected.job_id),
            &RejectRequest { reason: "not on weekends".into() },
        )
        .unwrap();
    assert_eq!(r.state, "failed");
    let view = wait_state(&da, &rejected.job_id, "failed");
    assert_eq!(view.reason.as_deref(), Some("rejected at this site: not on weekends"));

    let out = b.ok(&["job", "approve", &approved.job_id]);
    assert!(out.contains("Approved job"), "{out}");
    // Scheduled, then it fails: this runner has no container runtime, and says so.
    let view = wait_state(&da, &approved.job_id, "failed");
    assert!(view.reason.as_deref().unwrap().contains("no executor"), "{view:?}");

    // A decided job cannot be decided again.
    let again = b.fails(&["job", "approve", &approved.job_id]);
    assert!(again.contains("does not apply"), "{again}");
}

#[test]
fn jobs_reach_a_runner_that_was_offline_and_cancel_aborts_them() {
    let tmp = common::test_dir();
    let (a, b) = pair(tmp.path(), &["--allow-any-workflow", "--allow-any-dataset"]);
    let da = a.start();
    // The runner is down: the job waits in the owner's durable outbox.
    let job = submit(&da, "federated-statistics", None);
    assert_eq!(owner_view(&da, &job.job_id).state, "queued");
    let db = b.start();
    wait_state(&da, &job.job_id, "pending (awaiting approval)");
    // The owner cancels the workflow: the runner aborts the job and says who did.
    let msg = serde_json::json!({
        "to": "site-b",
        "cancel": { "workflow_id": job.workflow_id, "job_id": null, "reason": "changed my mind" }
    });
    let _: serde_json::Value = da.api().post("/v1/messages", &msg).unwrap();
    let view = wait_state(&da, &job.job_id, "failed");
    assert_eq!(view.reason.as_deref(), Some("aborted by site-a"));
    drop(db);
}

#[test]
fn jobs_run_on_the_runners_containerd_and_survive_a_runner_crash() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(common::containerd::TestContainerd::start());

    let tmp = common::test_dir();
    let (a, b) = pair(
        tmp.path(),
        &["--allow-any-workflow", "--allow-any-dataset", "--auto-execute", "--share-logs"],
    );
    b.set_executor(Some(ctd.containerd().socket()));
    // The runner's admin imports the job image from a tarball, through the CLI.
    let tar = common::containerd::build_busybox_image(tmp.path(), "busybox", false);
    let out = b.ok(&["image", "import", tar.tar.to_str().unwrap()]);
    let image = tar.digest.to_string();
    assert!(out.contains(&image), "{out}");
    assert!(b.ok(&["image", "list"]).contains(&image));
    // site-b's dataset: three series (item folders), each a file of patterned bytes,
    // registered through the CLI.
    let dataset = tmp.path().join("lung-ct");
    let mut expected = String::new();
    for (i, len) in [1000usize, 1 << 20, 3].iter().enumerate() {
        let bytes: Vec<u8> = (0..*len).map(|j| (j * 31 + i * 7) as u8).collect();
        let item = format!("1.2.826.0.1.{i}");
        std::fs::create_dir_all(dataset.join(&item)).unwrap();
        std::fs::write(dataset.join(&item).join("image.dcm"), &bytes).unwrap();
        let digest = kaapana_protocol::Sha256Digest::of(&bytes).hex();
        expected.push_str(&format!("{digest}  {item}/image.dcm\n"));
    }
    let added = b.ok(&["dataset", "add", "lung-ct", dataset.to_str().unwrap()]);
    assert!(added.contains("3 items"), "{added}");
    assert!(b.ok(&["dataset", "list"]).contains("lung-ct"));
    let da = a.start();
    let mut db = b.start();
    da.wait_until("connected", T, |d| d.is_connected_to("site-b"));

    // A job that hashes its input files: the result arrives at the owner byte-identical.
    let ok = submit_job(
        &da,
        "stats",
        Some("lung-ct"),
        &image,
        &["sh", "-c", "cd /input && sha256sum */* > /output/hashes.txt && echo hashed-the-input"],
        60,
    );
    let view = wait_state(&da, &ok.job_id, "finished");
    assert_eq!(view.reason, None);
    da.wait_until("the result", T, |d| {
        d.api().get::<serde_json::Value>(&format!("/v1/jobs/{}/result", ok.job_id)).is_ok()
    });
    let unpacked = tmp.path().join("result");
    let out = a.ok(&["job", "result", &ok.job_id, "--out", unpacked.to_str().unwrap()]);
    assert!(out.contains("verified"), "{out}");
    assert_eq!(std::fs::read_to_string(unpacked.join("hashes.txt")).unwrap(), expected);
    // The runner shares logs with site-a: the job's stdout is visible at the owner (the log
    // follows the bundle on its own stream).
    da.wait_until("the log", T, |d| {
        d.api().get_text(&format!("/v1/jobs/{}/log", ok.job_id)).is_ok_and(|l| !l.is_empty())
    });
    let log = a.ok(&["job", "logs", &ok.job_id]);
    assert!(log.contains("hashed-the-input"), "{log}");

    // Failures reach the owner with their reason.
    let exit3 = submit_job(&da, "stats", None, &image, &["sh", "-c", "exit 3"], 60);
    let slow = submit_job(&da, "stats", None, &image, &["sleep", "30"], 1);
    assert_eq!(
        wait_state(&da, &exit3.job_id, "failed").reason.as_deref(),
        Some("the job exited with status 3")
    );
    assert_eq!(
        wait_state(&da, &slow.job_id, "failed").reason.as_deref(),
        Some("killed after its timeout of 1 s")
    );

    // The runner is killed while a job runs; after its restart it re-attaches to the
    // container and the owner learns the final state.
    let long = submit_job(
        &da,
        "stats",
        None,
        &image,
        &["sh", "-c", "touch /output/started; sleep 3; echo done > /output/x"],
        60,
    );
    wait_state(&da, &long.job_id, "running");
    // The container itself runs once it has written its marker.
    let marker = b.dir.join("jobs").join(&long.job_id).join("output").join("started");
    let deadline = std::time::Instant::now() + T;
    while !marker.exists() {
        assert!(std::time::Instant::now() < deadline, "the job's container never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    db.kill();
    db = b.start();
    let view = wait_state(&da, &long.job_id, "finished");
    assert_eq!(view.reason, None);
    assert!(b.dir.join("jobs").join(&long.job_id).join("output").join("x").exists());

    assert!(db.stop() && da.stop());
    rt.block_on(ctd.assert_clean());
}

#[test]
fn a_missing_image_is_pulled_by_digest_or_the_job_fails_saying_why() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(common::containerd::TestContainerd::start());
    let registry = common::containerd::TestRegistry::start();
    let repo = registry.repository("kaapana/jobs");
    let tmp = common::test_dir();
    let tar = common::containerd::build_busybox_image(tmp.path(), "pulled", true);
    let digests = registry.push_layout(&tar.tar, "kaapana/jobs");
    assert_eq!(digests, vec![tar.digest]);

    let (a, b) =
        pair(tmp.path(), &["--allow-any-workflow", "--allow-any-dataset", "--auto-execute"]);
    b.set_executor_pulling(Some(ctd.containerd().socket()), Some(&repo));
    let (da, db) = (a.start(), b.start());
    da.wait_until("connected", T, |d| d.is_connected_to("site-b"));

    let job = submit_job(&da, "stats", None, &tar.digest.to_string(), &["true"], 60);
    assert_eq!(wait_state(&da, &job.job_id, "finished").reason, None);

    // A digest nobody has: the job fails, and the owner reads why.
    let job = submit_job(&da, "stats", None, IMAGE, &["true"], 60);
    let reason = wait_state(&da, &job.job_id, "failed").reason.unwrap();
    assert!(reason.contains("is not available at site-b and could not be pulled"), "{reason}");
    assert!(reason.contains("not found in registry"), "{reason}");
    assert!(da.stop() && db.stop());
    rt.block_on(ctd.assert_clean());
}
