//! End-to-end tests of jobs as Airflow DAG runs: two real daemons (site-a owns the workflows,
//! site-b runs them with `[executor] kind = "airflow"`) and a real `airflow standalone` (see
//! `common::airflow`) with the test DAG `node/tests/dags/kaapana_test_dag.py`, which writes
//! what its conf told it into the output folder, fails on request, or waits for a file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::airflow::{Airflow, DAG};
use common::{Daemon, Site};
use kaapana_node::api::{JobsView, WorkflowView};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);

/// The series of site-b's folder dataset `lung-ct`, one folder each.
const SERIES: [&str; 2] = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"];

struct TwoSites {
    tmp: tempfile::TempDir,
    a: Site,
    b: Site,
    airflow: &'static Airflow,
}

/// site-a (no executor) and site-b (Airflow), registered with each other; site-b allows
/// site-a the DAG `kaapana-test` and the dataset `lung-ct` and runs its jobs at once.
fn two_sites() -> TwoSites {
    two_sites_with(Airflow::shared())
}

/// [`two_sites`] with site-b's jobs on `airflow`.
fn two_sites_with(airflow: &'static Airflow) -> TwoSites {
    let tmp = common::test_dir();
    let root = tmp.path();
    let (a, b) =
        common::airflow::owner_and_airflow_runner(root, airflow, &["--allow-dataset", "lung-ct"]);
    let dataset = root.join("lung-ct");
    for (i, s) in SERIES.iter().enumerate() {
        std::fs::create_dir_all(dataset.join(s)).unwrap();
        std::fs::write(dataset.join(s).join(format!("slice-{i}.dcm")), b"not really DICOM")
            .unwrap();
    }
    b.ok(&["dataset", "add", "lung-ct", dataset.to_str().unwrap()]);
    TwoSites { tmp, a, b, airflow }
}

impl TwoSites {
    fn start(&self) -> (Daemon, Daemon) {
        let (da, db) = (self.a.start(), self.b.start());
        da.wait_for_capabilities("site-b", T);
        (da, db)
    }
}

/// A workflow of one DAG job at site-b on `lung-ct` with `conf`.
fn dag_workflow(name: &str, dag: &str, conf: &str) -> String {
    format!(
        "name = {name:?}\n[[job]]\nname = \"segment\"\nrunner = \"site-b\"\ndataset = \"lung-ct\"\n\
         dag = {dag:?}\nconf = {conf}\ntimeout = \"3m\"\n"
    )
}

fn wait_workflow(owner: &Daemon, id: &str, state: &str) -> WorkflowView {
    owner.wait_workflow(id, state, T)
}

/// The run-id prefix of a job's DAG runs (all attempts).
fn prefix(job_id: &str) -> String {
    format!("kaapana-node-{job_id}-")
}

#[test]
fn a_dag_job_runs_at_the_runners_airflow_and_its_output_comes_back_signed() {
    let s = two_sites();
    let (da, _db) = s.start();
    let w = da.submit_workflow(&dag_workflow(
        "airflow-e2e",
        DAG,
        r#"{ greeting = "hello from site-a", options = { fast = true } }"#,
    ));
    let w = wait_workflow(&da, &w.workflow_id, "finished");
    let job = &w.jobs[0];
    assert_eq!((job.state.as_str(), job.runner.as_str()), ("finished", "site-b"), "{w:#?}");
    assert!(job.result.is_some(), "{w:#?}");

    // The output folder of the DAG run, as the owner verified and stored it.
    let out = s.tmp.path().join("results");
    s.a.ok(&["workflow", "result", &w.workflow_id, "--out", out.to_str().unwrap()]);
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("segment/result.json")).unwrap())
            .unwrap();
    assert_eq!(result["job_id"], job.job_id.as_str());
    assert_eq!(result["workflow_id"], w.workflow_id.as_str());
    assert_eq!(result["owner"], s.a.instance_id().as_str());
    assert_eq!(result["greeting"], "hello from site-a");
    // Kaapana's data_form: the dataset's identifiers and name.
    assert_eq!(result["identifiers"], serde_json::json!(SERIES));
    assert_eq!(result["dataset_name"], "lung-ct");
    assert_eq!(
        result["input_files"],
        serde_json::json!([
            format!("{}/slice-0.dcm", SERIES[0]),
            format!("{}/slice-1.dcm", SERIES[1])
        ])
    );

    // Exactly one run in Airflow, successful, with the node's conf.
    let runs = s.airflow.runs(&prefix(&job.job_id));
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["state"], "success");
    assert_eq!(runs[0]["conf"]["options"]["fast"], true);
    assert_eq!(runs[0]["conf"]["kaapana_node"]["data_form"]["dataset_name"], "lung-ct");
}

#[test]
fn a_failing_task_is_reported_at_the_owner_with_its_reason() {
    let s = two_sites();
    let (da, db) = s.start();
    let w = da.submit_workflow(&dag_workflow(
        "airflow-fails",
        DAG,
        r#"{ fail = "no CT series in the input" }"#,
    ));
    let w = wait_workflow(&da, &w.workflow_id, "failed");
    let reason = w.jobs[0].reason.clone().unwrap_or_default();
    for part in [
        "the job exited with status 1",
        &format!("DAG run kaapana-node-{}-0 of {DAG} failed", w.jobs[0].job_id),
        "task process failed (try 1)",
        "RuntimeError: no CT series in the input",
    ] {
        assert!(reason.contains(part), "expected {part:?} in the reason: {reason}");
    }
    // The runner's log of the job has the task's log.
    let log = std::fs::read_to_string(s.b.dir.join("jobs").join(&w.jobs[0].job_id).join("job.log"))
        .unwrap();
    assert!(log.contains("[airflow] task process (failed, try 1)"), "{log}");
    assert!(log.contains("no CT series in the input"), "{log}");
    drop(db);
}

#[test]
fn cancel_at_the_owner_marks_the_dag_run_failed() {
    let s = two_sites();
    let (da, db) = s.start();
    let w = da.submit_workflow(&dag_workflow("airflow-cancel", DAG, r#"{ wait_for = "go" }"#));
    // `running` comes from Airflow's state of the run, pushed by the runner.
    da.wait_until("the DAG run to run", T, |d| {
        d.workflow(&w.workflow_id).jobs[0].state == "running"
    });
    let job = da.workflow(&w.workflow_id).jobs[0].job_id.clone();
    let runs = s.airflow.runs(&prefix(&job));
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["state"], "running");
    let run_id = runs[0]["dag_run_id"].as_str().unwrap().to_owned();

    let out = s.a.ok(&["workflow", "cancel", &w.workflow_id]);
    assert!(out.contains("cancelled"), "{out}");
    db.wait_until("the runner to abort the job", T, |d| {
        let jobs: JobsView = d.api().get("/v1/jobs").unwrap();
        jobs.running_here.iter().any(|j| {
            j.job_id == job
                && j.state == "failed"
                && j.reason.as_deref() == Some("aborted by site-a")
        })
    });
    db.wait_until("Airflow to show the run failed", T, |_| {
        s.airflow.run_state(&run_id) == "failed"
    });
    assert_eq!(da.workflow(&w.workflow_id).state, "cancelled");
    // The task never got its file: it wrote no result.
    assert!(!s.b.dir.join("jobs").join(&job).join("output/result.json").exists());
}

#[test]
fn a_runner_killed_mid_run_reattaches_without_a_second_trigger() {
    let s = two_sites();
    let (da, db) = s.start();
    let w = da.submit_workflow(&dag_workflow("airflow-restart", DAG, r#"{ wait_for = "go" }"#));
    da.wait_until("the DAG run to run", T, |d| {
        d.workflow(&w.workflow_id).jobs[0].state == "running"
    });
    let job = da.workflow(&w.workflow_id).jobs[0].job_id.clone();
    assert_eq!(s.airflow.runs(&prefix(&job)).len(), 1);

    db.kill(); // SIGKILL, mid-run
    let db = s.b.start();
    // The run goes on in Airflow; the test lets it finish.
    std::fs::write(s.b.dir.join("jobs").join(&job).join("output/go"), b"").unwrap();
    let w = wait_workflow(&da, &w.workflow_id, "finished");
    assert!(w.jobs[0].result.is_some(), "{w:#?}");

    let runs = s.airflow.runs(&prefix(&job));
    assert_eq!(runs.len(), 1, "the restarted runner triggered again: {runs:#?}");
    assert_eq!(runs[0]["state"], "success");
    let log = std::fs::read_to_string(s.b.dir.join("jobs").join(&job).join("job.log")).unwrap();
    assert!(log.contains("node restarted: following DAG run"), "{log}");
    let out = s.tmp.path().join("results");
    s.a.ok(&["workflow", "result", &w.workflow_id, "--out", out.to_str().unwrap()]);
    assert!(out.join("segment/result.json").is_file());
    drop(db);
}

#[test]
fn a_dag_the_runners_policy_does_not_allow_is_refused_with_the_rule() {
    let s = two_sites();
    let (da, _db) = s.start();
    let w = da.submit_workflow(&dag_workflow("kaapana-test", "total-segmentator", "{}"));
    let w = wait_workflow(&da, &w.workflow_id, "failed");
    assert_eq!(
        w.jobs[0].reason.as_deref(),
        Some("Airflow DAG total-segmentator is not allowed for instance site-a"),
        "{w:#?}"
    );
    // Nothing was triggered (the workflow's name equal to an allowed DAG id does not help).
    assert!(s.airflow.runs(&prefix(&w.jobs[0].job_id)).is_empty());
}

#[test]
fn a_dag_job_runs_at_an_airflow_2_runner_through_api_v1_with_basic_auth() {
    // Kaapana 0.6 ships Airflow 2.11: the executor detects it (`airflow_api_version = "auto"`)
    // and speaks /api/v1 with basic auth.
    let s = two_sites_with(Airflow::shared2());
    assert_eq!(s.airflow.major, 2);
    let (da, _db) = s.start();
    let w = da.submit_workflow(&dag_workflow("airflow2-e2e", DAG, r#"{ greeting = "hi, 2.11" }"#));
    let w = wait_workflow(&da, &w.workflow_id, "finished");
    let job = &w.jobs[0];
    let out = s.tmp.path().join("results");
    s.a.ok(&["workflow", "result", &w.workflow_id, "--out", out.to_str().unwrap()]);
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("segment/result.json")).unwrap())
            .unwrap();
    assert_eq!(result["job_id"], job.job_id.as_str());
    assert_eq!(result["greeting"], "hi, 2.11");
    assert_eq!(result["identifiers"], serde_json::json!(SERIES));
    let runs = s.airflow.runs(&prefix(&job.job_id));
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["state"], "success");
    assert_eq!(runs[0]["conf"]["kaapana_node"]["data_form"]["dataset_name"], "lung-ct");

    // A failing task: its reason comes from Airflow 2's task log.
    let w = da.submit_workflow(&dag_workflow("airflow2-fails", DAG, r#"{ fail = "no series" }"#));
    let w = wait_workflow(&da, &w.workflow_id, "failed");
    let reason = w.jobs[0].reason.clone().unwrap_or_default();
    for part in ["the job exited with status 1", "RuntimeError: no series"] {
        assert!(reason.contains(part), "expected {part:?} in the reason: {reason}");
    }
}
