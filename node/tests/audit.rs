//! The audit log between real daemons: a registration, a policy change, an approved job run
//! on the runner's containerd and its result delivered leave a verifying chain at both sites;
//! an altered or a removed entry in a copy of the store is named by `audit verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::Site;
use kaapana_federation::{AllowList, Execution, Policy};
use kaapana_node::api::{
    InstanceView, JobsView, OwnerJobView, RejectRequest, RunnerJobView, SubmitJobRequest,
};
use kaapana_node::audit::{AuditEntryView, StoredEntry};
use kaapana_node::store::AUDIT;
use redb::{ReadableDatabase, ReadableTable};

const T: Duration = Duration::from_secs(60);

fn kinds(site: &Site) -> Vec<String> {
    site.ok(&["audit", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .collect()
}

/// Copies a stopped site's data directory.
fn copy_site(site: &Site, root: &Path, name: &str) -> Site {
    let copy = Site { name: name.to_owned(), dir: root.join(name) };
    let status =
        std::process::Command::new("cp").arg("-a").arg(&site.dir).arg(&copy.dir).status().unwrap();
    assert!(status.success());
    copy
}

/// The sequence number of the first entry of `kind` in the site's store.
fn seq_of(site: &Site, kind: &str) -> u64 {
    let db = redb::Database::open(site.dir.join("node.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(AUDIT).unwrap();
    for entry in table.iter().unwrap() {
        let (seq, value) = entry.unwrap();
        if AuditEntryView::of(seq.value(), value.value()).kind == kind {
            return seq.value();
        }
    }
    panic!("no {kind} entry");
}

fn request(image: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        runner: "site-b".into(),
        workflow_name: "stats".into(),
        job_name: "echo".into(),
        image: image.to_owned(),
        command: vec!["sh".into(), "-c".into(), "echo audited > /output/out.txt".into()],
        env: vec![],
        dataset: None,
        timeout_secs: 60,
        cpu_millis: 500,
        memory_bytes: 128 << 20,
    }
}

#[test]
fn the_audit_log_records_a_job_end_to_end_and_names_tampered_entries() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(common::containerd::TestContainerd::start());
    let tmp = common::test_dir();
    let root = tmp.path();

    let a = Site::init_networked(root, "site-a");
    let b = Site::init_networked(root, "site-b");
    let (bundle_a, bundle_b) = (a.export(root), b.export(root));
    // site-a registers site-b offline (no daemon yet).
    a.register(&b, &bundle_b);
    b.ok(&["instance", "add", bundle_a.to_str().unwrap(), "--allow-workflow", "other"]);
    b.set_executor(Some(ctd.containerd().socket()));
    let tar = common::containerd::build_busybox_image(root, "busybox", false);
    b.ok(&["image", "import", tar.tar.to_str().unwrap()]);
    let image = tar.digest.to_string();

    let da = a.start();
    let db = b.start();
    da.wait_until("connected", T, |d| d.is_connected_to("site-b"));
    // The runner widens site-a's policy (jobs still wait for approval).
    let policy = Policy {
        allowed_workflows: AllowList::Any,
        allowed_datasets: AllowList::Any,
        execution: Execution::Approval,
        share_logs: false,
    };
    let _: InstanceView = db.api().put("/v1/instances/site-a/policy", &policy).unwrap();

    let job: OwnerJobView = da.api().post("/v1/jobs", &request(&image)).unwrap();
    db.wait_until("the job waits for approval", T, |d| {
        let jobs: JobsView = d.api().get("/v1/jobs").unwrap();
        jobs.running_here.iter().any(|j| j.job_id == job.job_id)
    });
    b.ok(&["job", "approve", &job.job_id]);
    da.wait_until("the result", T, |d| {
        d.api().get::<serde_json::Value>(&format!("/v1/jobs/{}/result", job.job_id)).is_ok()
    });
    db.wait_until("the delivery audited", T, |d| {
        let entries: Vec<AuditEntryView> = d.api().get("/v1/audit").unwrap();
        entries.iter().any(|e| e.kind == "result_sent")
    });
    // A decision the core refuses (the job is decided already) is not audited.
    b.fails(&["job", "approve", &job.job_id]);
    // A second job, rejected.
    let second: OwnerJobView = da.api().post("/v1/jobs", &request(&image)).unwrap();
    db.wait_until("the second job waits", T, |d| {
        let jobs: JobsView = d.api().get("/v1/jobs").unwrap();
        jobs.running_here.iter().any(|j| j.job_id == second.job_id)
    });
    let _: RunnerJobView = db
        .api()
        .post(
            &format!("/v1/jobs/{}/reject", second.job_id),
            &RejectRequest { reason: "not today".into() },
        )
        .unwrap();
    // With the daemon running, `audit verify` goes through its API.
    let out = b.ok(&["audit", "verify"]);
    assert!(out.contains("audit log verified"), "{out}");
    assert!(da.stop() && db.stop(), "the daemons did not stop cleanly");

    // Offline, on the data directories.
    for site in [&a, &b] {
        let out = site.ok(&["audit", "verify"]);
        assert!(out.contains("audit log verified"), "{}: {out}", site.name);
    }
    assert_eq!(
        kinds(&a),
        ["instance_added", "workflow_submitted", "result_stored", "workflow_submitted"],
        "{}",
        a.ok(&["audit", "list"])
    );
    let kinds_b = kinds(&b);
    assert_eq!(
        kinds_b,
        [
            "instance_added",
            "policy_changed",
            "job_approved",
            "job_started",
            "result_sent",
            "job_rejected"
        ],
        "{}",
        b.ok(&["audit", "list"])
    );
    let listed = b.ok(&["audit", "list", "--after", "2"]);
    assert!(listed.contains(&job.job_id) && !listed.contains("policy_changed"), "{listed}");
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(listed.contains("reason: not today"), "{listed}");

    // An altered detail: the entry's signature no longer matches.
    let altered = copy_site(&b, root, "site-b-altered");
    let seq = seq_of(&altered, "job_approved");
    {
        let db = redb::Database::open(altered.dir.join("node.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(AUDIT).unwrap();
            let value = table.get(seq).unwrap().unwrap().value().to_vec();
            let mut stored = StoredEntry::decode(&value).unwrap();
            let mut body = stored.body().unwrap();
            body.detail = "nothing to see here".into();
            stored.body = postcard::to_allocvec(&body).unwrap();
            table.insert(seq, stored.encode().unwrap().as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = altered.fails(&["audit", "verify"]);
    assert!(err.contains(&format!("audit entry {seq} was altered")), "{err}");
    assert!(altered.ok(&["audit", "list"]).contains("nothing to see here"));

    // A removed entry in the middle: a gap in the chain.
    let removed = copy_site(&b, root, "site-b-removed");
    let seq = seq_of(&removed, "job_started");
    {
        let db = redb::Database::open(removed.dir.join("node.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(AUDIT).unwrap().remove(seq).unwrap();
        txn.commit().unwrap();
    }
    let err = removed.fails(&["audit", "verify"]);
    assert!(err.contains(&format!("audit entry {seq} is missing")), "{err}");
    // The original is untouched.
    assert!(b.ok(&["audit", "verify"]).contains("audit log verified"));
}
