//! End-to-end tests of cross-site workflows between real daemons on a real containerd: a site
//! job feeding an aggregation at the owner, policy denial, approval, cancellation,
//! single-file processing, and a single-file workflow of many jobs across daemon restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::containerd::TestContainerd;
use common::{Daemon, Site};
use kaapana_node::api::{JobsView, WorkflowView};

const T: Duration = Duration::from_secs(60);

/// Two sites on one containerd: site-a (the owner, which runs aggregation steps) and site-b
/// (the runner, with dataset `lung-ct`), registered with each other; site-b registers site-a
/// with `policy`. The job image is imported once (both use the same containerd namespace).
struct TwoSites {
    ctd: TestContainerd,
    rt: tokio::runtime::Runtime,
    tmp: tempfile::TempDir,
    a: Site,
    b: Site,
    image: String,
    /// The value in each item of site-b's dataset, by item.
    values: Vec<(String, u32)>,
}

fn two_sites(policy: &[&str]) -> TwoSites {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let tmp = common::test_dir();
    let root = tmp.path();
    let a = Site::init_networked(root, "site-a");
    let b = Site::init_networked(root, "site-b");
    let (bundle_a, bundle_b) = (a.export(root), b.export(root));
    a.register(&b, &bundle_b);
    let mut args = vec!["instance", "add", bundle_a.to_str().unwrap()];
    args.extend_from_slice(policy);
    b.ok(&args);
    a.set_executor(Some(ctd.containerd().socket()));
    b.set_executor(Some(ctd.containerd().socket()));
    let tar = common::containerd::build_busybox_image(root, "busybox", false);
    b.ok(&["image", "import", tar.tar.to_str().unwrap()]);
    let values = vec![
        ("1.2.826.0.1.3680043.8.1".to_owned(), 17),
        ("1.2.826.0.1.3680043.8.2".to_owned(), 250),
        ("1.2.826.0.1.3680043.8.3".to_owned(), 4),
    ];
    let dataset = root.join("lung-ct");
    for (item, value) in &values {
        std::fs::create_dir_all(dataset.join(item)).unwrap();
        std::fs::write(dataset.join(item).join("value"), format!("{value}\n")).unwrap();
    }
    b.ok(&["dataset", "add", "lung-ct", dataset.to_str().unwrap()]);
    TwoSites { ctd, rt, image: tar.digest.to_string(), tmp, a, b, values }
}

impl TwoSites {
    fn start(&self) -> (Daemon, Daemon) {
        let (da, db) = (self.a.start(), self.b.start());
        da.wait_for_capabilities("site-b", T);
        (da, db)
    }

    fn write(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, toml.replace("IMAGE", &self.image)).unwrap();
        path
    }

    /// Waits until containerd holds no container, task or job snapshot.
    fn wait_clean(&self, owner: &Daemon) {
        owner.wait_until("containerd to be clean", T, |_| {
            let inv = self.rt.block_on(self.ctd.inventory());
            inv.containers.is_empty() && inv.tasks.is_empty() && inv.active_snapshots().is_empty()
        });
        self.rt.block_on(self.ctd.assert_clean());
    }
}

fn submit(owner: &Daemon, toml_file: &Path) -> WorkflowView {
    owner.submit_workflow(&std::fs::read_to_string(toml_file).unwrap())
}

fn wait_workflow(owner: &Daemon, id: &str, state: &str) -> WorkflowView {
    owner.wait_workflow(id, state, T)
}

#[test]
fn a_site_job_feeds_an_aggregation_at_the_owner() {
    let s = two_sites(&[
        "--allow-workflow",
        "lung-stats",
        "--allow-dataset",
        "lung-ct",
        "--auto-execute",
    ]);
    let (da, _db) = s.start();
    let file = s.write(
        "lung-stats.toml",
        r#"
name = "lung-stats"

[[job]]
name = "count"
runner = "site-b"
dataset = "lung-ct"
image = "IMAGE"
command = ["sh", "-c", "ls /input | wc -l > /output/n && cat /input/*/value | awk '{s+=$1} END {print s}' > /output/sum"]
memory = "64MiB"
timeout = "1m"

[[job]]
name = "aggregate"
runner = "owner"
inputs = ["count"]
image = "IMAGE"
command = ["sh", "-c", "echo items=$(cat /input/count/n) sum=$(cat /input/count/sum) > /output/merged.txt"]
timeout = "1m"
"#,
    );
    // Through the CLI, as a researcher would.
    let out = s.a.ok(&["workflow", "submit", file.to_str().unwrap()]);
    assert!(out.contains("Submitted workflow lung-stats"), "{out}");
    let id = out.split('(').nth(1).unwrap().split(')').next().unwrap().to_owned();
    let w = wait_workflow(&da, &id, "finished");
    assert_eq!(w.jobs.len(), 2);
    let count = &w.jobs[0];
    assert_eq!((count.name.as_str(), count.runner.as_str()), ("count", "site-b"));
    assert_eq!((w.jobs[1].name.as_str(), w.jobs[1].runner.as_str()), ("aggregate", "site-a"));
    assert!(w.jobs.iter().all(|j| j.state == "finished" && j.result.is_some()), "{w:#?}");

    let shown = s.a.ok(&["workflow", "show", &id]);
    assert!(shown.contains("aggregate") && shown.contains("site-b"), "{shown}");
    assert!(shown.contains("step aggregate (1 job) <- count"), "{shown}");
    assert!(s.a.ok(&["workflow", "list"]).contains("finished"));
    let out_dir = s.tmp.path().join("results");
    s.a.ok(&["workflow", "result", &id, "--out", out_dir.to_str().unwrap()]);
    let sum: u32 = s.values.iter().map(|(_, v)| v).sum();
    assert_eq!(
        std::fs::read_to_string(out_dir.join("aggregate/merged.txt")).unwrap(),
        format!("items=3 sum={sum}\n")
    );
    assert_eq!(std::fs::read_to_string(out_dir.join("count/n")).unwrap().trim(), "3");
    s.wait_clean(&da);
}

#[test]
fn a_denied_job_fails_its_workflow_with_the_rule_at_the_owner() {
    let s = two_sites(&[
        "--allow-workflow",
        "lung-stats",
        "--allow-dataset",
        "lung-ct",
        "--auto-execute",
    ]);
    let (da, db) = s.start();
    let file = s.write(
        "denied.toml",
        r#"
name = "lung-stats"
[[job]]
name = "count"
runner = "site-b"
dataset = "brain-mri"
image = "IMAGE"
command = ["true"]
[[job]]
name = "aggregate"
runner = "owner"
inputs = ["count"]
image = "IMAGE"
"#,
    );
    let w = submit(&da, &file);
    let w = wait_workflow(&da, &w.workflow_id, "failed");
    let reason = w.reason.clone().unwrap();
    assert!(reason.contains("dataset brain-mri is not allowed for instance site-a"), "{reason}");
    assert_eq!(
        w.jobs[0].reason.as_deref(),
        Some("dataset brain-mri is not allowed for instance site-a")
    );
    // The aggregation never ran.
    assert_eq!(w.jobs[1].state, "failed");
    assert_eq!(w.jobs[1].result, None);
    let jobs: JobsView = db.api().get("/v1/jobs").unwrap();
    assert_eq!(jobs.running_here.len(), 1);

    // A capability query nothing matches is refused when the workflow is submitted.
    let file = s.write(
        "nomatch.toml",
        r#"
name = "lung-stats"
[[job]]
name = "count"
query = { dataset = "brain-mri", pick = "all" }
image = "IMAGE"
"#,
    );
    let err = s.a.fails(&["workflow", "submit", file.to_str().unwrap()]);
    assert!(err.contains("brain-mri"), "{err}");
}

#[test]
fn a_runner_fetches_an_upstream_result_from_the_owner_once() {
    let s = two_sites(&["--allow-any-workflow", "--allow-any-dataset", "--auto-execute"]);
    let (da, db) = s.start();
    // The owner makes a "model"; a job at site-b reads it (fetched from the owner), a second
    // one there reads it and the first one's result (both held at site-b by then: nothing is
    // fetched), and the owner merges.
    let file = s.write(
        "model-at-runner.toml",
        r#"
name = "fed-round"
[[job]]
name = "model"
runner = "owner"
image = "IMAGE"
command = ["sh", "-c", "yes w | head -c 3000000 > /output/weights && echo v1 > /output/version"]
[[job]]
name = "train-a"
runner = "site-b"
inputs = ["model"]
image = "IMAGE"
command = ["sh", "-c", "wc -c < /input/model/weights > /output/size && cat /input/model/version > /output/seen"]
[[job]]
name = "train-b"
runner = "site-b"
inputs = ["model", "train-a"]
image = "IMAGE"
command = ["sh", "-c", "echo $(cat /input/model/version) $(cat /input/train-a/size) > /output/both"]
[[job]]
name = "merge"
runner = "owner"
inputs = ["train-b"]
image = "IMAGE"
command = ["sh", "-c", "cat /input/train-b/both > /output/final"]
"#,
    );
    let after_b = db.last_event();
    let after_a = da.last_event();
    let w = submit(&da, &file);
    let w = wait_workflow(&da, &w.workflow_id, "finished");
    let out_dir = s.tmp.path().join("fed-results");
    s.a.ok(&["workflow", "result", &w.workflow_id, "--out", out_dir.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(out_dir.join("merge/final")).unwrap().trim(),
        "v1 3000000",
        "site-b read the owner's model, and its own earlier result"
    );
    let fetched = db.event_details(after_b, "input_fetched");
    assert_eq!(fetched.len(), 3, "{fetched:?}");
    assert_eq!(
        fetched
            .iter()
            .filter(|d| d.contains("fetched") && d.contains("bytes from the owner"))
            .count(),
        1,
        "{fetched:?}"
    );
    assert_eq!(
        fetched.iter().filter(|d| d.contains("held here already")).count(),
        2,
        "{fetched:?}"
    );
    let served = da.event_details(after_a, "input_served");
    assert_eq!(served.len(), 1, "the owner sent the model once: {served:?}");
    let sent = da.metric("kaapana_node_input_bytes_sent_total");
    assert!(sent > 3_000_000.0, "the model's bundle: {sent}");
    assert_eq!(db.metric("kaapana_node_input_bytes_fetched_total"), sent);
    s.wait_clean(&da);
}

#[test]
fn a_job_awaiting_approval_runs_once_the_runners_admin_approves() {
    let s = two_sites(&["--allow-any-workflow", "--allow-any-dataset"]);
    let (da, db) = s.start();
    let file = s.write(
        "approve.toml",
        r#"
name = "lung-stats"
[[job]]
name = "count"
runner = "site-b"
dataset = "lung-ct"
image = "IMAGE"
command = ["sh", "-c", "ls /input > /output/items"]
"#,
    );
    let w = submit(&da, &file);
    let job = w.jobs[0].job_id.clone();
    da.wait_until("the job to await approval", T, |d| {
        d.workflow(&w.workflow_id).jobs[0].state == "pending (awaiting approval)"
    });
    let pending = s.b.ok(&["job", "list", "--pending"]);
    assert!(pending.contains(&job) && pending.contains("site-a"), "{pending}");
    s.b.ok(&["job", "approve", &job]);
    let done = wait_workflow(&da, &w.workflow_id, "finished");
    assert_eq!(done.jobs[0].state, "finished");
    drop(db);
    s.wait_clean(&da);
}

#[test]
fn cancelling_a_workflow_stops_its_container_at_the_runner() {
    let s = two_sites(&["--allow-any-workflow", "--allow-any-dataset", "--auto-execute"]);
    let (da, db) = s.start();
    let file = s.write(
        "slow.toml",
        r#"
name = "slow"
[[job]]
name = "sleep"
runner = "site-b"
image = "IMAGE"
command = ["sleep", "300"]
[[job]]
name = "after"
runner = "owner"
inputs = ["sleep"]
image = "IMAGE"
"#,
    );
    let w = submit(&da, &file);
    da.wait_until("the job to run", T, |d| d.workflow(&w.workflow_id).jobs[0].state == "running");
    let out = s.a.ok(&["workflow", "cancel", &w.workflow_id]);
    assert!(out.contains("cancelled"), "{out}");
    let w = da.workflow(&w.workflow_id);
    assert_eq!(w.state, "cancelled");
    // The runner aborts its job, says who did, and its container is gone.
    let job = w.jobs[0].job_id.clone();
    db.wait_until("the runner to abort the job", T, |d| {
        let jobs: JobsView = d.api().get("/v1/jobs").unwrap();
        jobs.running_here.iter().any(|j| {
            j.job_id == job
                && j.state == "failed"
                && j.reason.as_deref() == Some("aborted by site-a")
        })
    });
    s.wait_clean(&da);
}

#[test]
fn single_file_processing_makes_one_job_and_one_result_per_item() {
    let s = two_sites(&["--allow-any-workflow", "--allow-dataset", "lung-ct", "--auto-execute"]);
    let (da, _db) = s.start();
    let file = s.write(
        "per-item.toml",
        r#"
name = "per-item"
[[job]]
name = "item"
query = { dataset = "lung-ct", pick = "all" }
processing = "single-file"
max_parallel = 2
image = "IMAGE"
command = ["sh", "-c", "ls /input > /output/items && cat /input/*/value > /output/value"]
"#,
    );
    let w = submit(&da, &file);
    assert_eq!(w.jobs.len(), s.values.len(), "{w:#?}");
    let w = wait_workflow(&da, &w.workflow_id, "finished");
    let out_dir = s.tmp.path().join("per-item");
    s.a.ok(&["workflow", "result", &w.workflow_id, "--out", out_dir.to_str().unwrap()]);
    // Each job saw exactly one item, and together they saw every item once.
    let mut seen = Vec::new();
    for j in &w.jobs {
        assert_eq!(j.runner, "site-b");
        let items = std::fs::read_to_string(out_dir.join(&j.name).join("items")).unwrap();
        let value = std::fs::read_to_string(out_dir.join(&j.name).join("value")).unwrap();
        assert_eq!(items.lines().count(), 1, "{items}");
        seen.push((items.trim().to_owned(), value.trim().parse::<u32>().unwrap()));
    }
    seen.sort();
    assert_eq!(seen, s.values);
    s.wait_clean(&da);
}

#[test]
fn a_workflow_ends_with_the_reason_when_its_runner_stays_out_of_reach() {
    let s = two_sites(&["--allow-any-workflow", "--allow-any-dataset", "--auto-execute"]);
    // site-a gives a runner up after 2 s out of reach (default: a day); site-b never starts.
    let config = s.a.dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace("runner_lost_after_secs = 300", "runner_lost_after_secs = 1")
        .replace("runner_give_up_after_secs = 86400", "runner_give_up_after_secs = 2");
    std::fs::write(&config, text).unwrap();
    let da = s.a.start();
    let file = s.write(
        "unreachable.toml",
        r#"
name = "lung-stats"
[[job]]
name = "count"
runner = "site-b"
image = "IMAGE"
[[job]]
name = "aggregate"
runner = "owner"
inputs = ["count"]
image = "IMAGE"
"#,
    );
    let w = submit(&da, &file);
    let w = wait_workflow(&da, &w.workflow_id, "failed");
    let reason = w.jobs[0].reason.clone().unwrap_or_default();
    assert!(
        reason
            .contains("runner site-b has been out of reach for more than 2 s; the job is given up"),
        "{w:#?}"
    );
    assert!(w.reason.unwrap_or_default().contains("job count at site-b failed"));
    assert_eq!(w.jobs[1].state, "failed");
    // A cancel for the given-up job waits for site-b in the outbox, beside the job manifest.
    assert_eq!(da.instance("site-b").unwrap().outbox_depth, 2);
}

/// A single-file workflow of 36 items at one site (its own dataset, real containers, four at a
/// time) finishes with one result per item, and every job reads back exactly as it was after
/// its daemon is killed (SIGKILL) and restarted, and again after a clean stop and restart
/// (issue 19: each job is a store record of its own, written when that job changes; the
/// daemon loads the workflow from its header and its 36 job records).
#[test]
fn a_single_file_workflow_of_many_jobs_keeps_every_jobs_state_across_restarts() {
    const ITEMS: usize = 36;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let tmp = common::test_dir();
    let root = tmp.path();
    let a = Site::init_networked(root, "site-a");
    a.set_executor(Some(ctd.containerd().socket()));
    let tar = common::containerd::build_busybox_image(root, "busybox", false);
    a.ok(&["image", "import", tar.tar.to_str().unwrap()]);
    let dataset = root.join("series");
    for k in 0..ITEMS {
        let item = dataset.join(format!("1.2.826.0.1.3680043.9.{k}"));
        std::fs::create_dir_all(&item).unwrap();
        std::fs::write(item.join("value"), format!("{k}\n")).unwrap();
    }
    a.ok(&["dataset", "add", "series", dataset.to_str().unwrap()]);
    let toml = r#"
name = "every-series"
[[job]]
name = "item"
runner = "owner"
dataset = "series"
processing = "single-file"
max_parallel = 4
image = "IMAGE"
command = ["sh", "-c", "cat /input/*/value > /output/value"]
"#
    .replace("IMAGE", &tar.digest.to_string());

    let da = a.start();
    let w = da.submit_workflow(&toml);
    assert_eq!(w.jobs.len(), ITEMS, "{w:#?}");
    let id = w.workflow_id.clone();
    let w = da.wait_workflow(&id, "finished", Duration::from_secs(180));
    assert!(w.jobs.iter().all(|j| j.state == "finished" && j.result.is_some()), "{w:#?}");
    let out = root.join("every-series");
    a.ok(&["workflow", "result", &id, "--out", out.to_str().unwrap()]);
    let mut values: Vec<usize> = w
        .jobs
        .iter()
        .map(|j| {
            let v = std::fs::read_to_string(out.join(&j.name).join("value")).unwrap();
            v.trim().parse().unwrap()
        })
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..ITEMS).collect::<Vec<_>>(), "each item once");
    let same = |again: &WorkflowView, when: &str| {
        assert_eq!(format!("{:?}", again.jobs), format!("{:?}", w.jobs), "jobs after {when}");
        assert_eq!((&again.state, &again.ended_at), (&w.state, &w.ended_at), "after {when}");
    };

    da.kill();
    let da = a.start();
    same(&da.workflow(&id), "a kill");
    assert!(da.stop(), "the daemon stopped cleanly");
    let da = a.start();
    same(&da.workflow(&id), "a clean stop");
}
