//! Latency of a DAG job: from the submit of a signed workflow of one DAG job at the owner
//! (site-a) to the DAG run's `running` state in the runner's (site-b's) Airflow, as its REST
//! API shows it; beside the same trigger by `curl` (`POST /api/v2/dags/{id}/dagRuns` with a
//! token fetched before) → `running`, alternating, in the same run against the same
//! `airflow standalone`. Both are read by the same poller (every 20 ms). Also prints when the
//! owner saw the runner's pushed `running`.
//!
//! `cargo bench -p kaapana-node --bench airflow` (add `-- N` for N rounds, default 7).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::airflow::{Airflow, DAG};

const POLL: Duration = Duration::from_millis(20);
const LIMIT: Duration = Duration::from_secs(120);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Polls Airflow until run `run_id` of the test DAG is `running` (or later); seconds since
/// `start`.
fn until_running(airflow: &Airflow, run_id: &str, start: Instant) -> f64 {
    loop {
        assert!(start.elapsed() < LIMIT, "run {run_id} did not start");
        let (status, v) =
            airflow.call("GET", &format!("/api/v2/dags/{DAG}/dagRuns/{run_id}"), None);
        if status == 200 && v["state"] != "queued" {
            assert_eq!(v["state"], "running", "{v}");
            return start.elapsed().as_secs_f64();
        }
        std::thread::sleep(POLL);
    }
}

fn main() {
    let rounds = std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(7);
    let airflow = Airflow::shared();
    let tmp = common::test_dir();
    let root = tmp.path();
    let (a, b) = common::airflow::owner_and_airflow_runner(root, airflow, &[]);
    let (da, _db) = (a.start(), b.start());
    da.wait_for_capabilities("site-b", LIMIT);
    let token = {
        let (_, v) = airflow.call(
            "POST",
            "/auth/token",
            Some(serde_json::json!({"username": common::airflow::USER, "password": airflow.password})),
        );
        v["access_token"].as_str().unwrap().to_owned()
    };
    let workflow = format!(
        "name = \"bench\"\n[[job]]\nname = \"wait\"\nrunner = \"site-b\"\ndag = \"{DAG}\"\n\
         conf = {{ wait_for = \"go\" }}\ntimeout = \"5m\"\n"
    );

    let (mut ours, mut seen_at_owner, mut curl) = (Vec::new(), Vec::new(), Vec::new());
    // Round 0 warms both paths up (token, connections, DAG parsing) and is not counted.
    for round in 0..=rounds {
        // Ours: signed at the owner, sent, checked by the runner's policy, triggered there.
        let start = Instant::now();
        let w = da.submit_workflow(&workflow);
        let job = w.jobs[0].job_id.clone();
        let run_id = format!("kaapana-node-{job}-0");
        let t_ours = until_running(airflow, &run_id, start);
        da.wait_until("the owner to see running", LIMIT, |d| {
            d.workflow(&w.workflow_id).jobs[0].state == "running"
        });
        let t_owner = start.elapsed().as_secs_f64();
        std::fs::write(b.dir.join("jobs").join(&job).join("output/go"), b"").unwrap();

        // curl: the same trigger straight at Airflow's REST API.
        let out = root.join(format!("curl-{round}"));
        std::fs::create_dir_all(&out).unwrap();
        let curl_run = format!("bench-curl-{round}-{}", std::process::id());
        let body = serde_json::json!({
            "dag_run_id": curl_run,
            "logical_date": null,
            "conf": {"wait_for": "go", "kaapana_node": {
                "job_id": "curl", "workflow_id": "curl", "owner": "curl", "input": null,
                "output": out.to_str().unwrap(),
                "data_form": {"identifiers": [], "dataset_name": null}}},
        });
        let start = Instant::now();
        let status = Command::new("curl")
            .args(["-sS", "--fail", "-o", "/dev/null", "-X", "POST"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Content-Type: application/json", "-d", &body.to_string()])
            .arg(format!("{}/api/v2/dags/{DAG}/dagRuns", airflow.url))
            .status()
            .unwrap();
        assert!(status.success(), "curl: {status}");
        let t_curl = until_running(airflow, &curl_run, start);
        std::fs::write(out.join("go"), b"").unwrap();
        if round > 0 {
            ours.push(t_ours);
            seen_at_owner.push(t_owner);
            curl.push(t_curl);
        }
        eprintln!(
            "round {round}: ours {t_ours:.3} s (owner saw running at {t_owner:.3} s), curl {t_curl:.3} s"
        );
        da.wait_until("the workflow to finish", LIMIT, |d| {
            d.workflow(&w.workflow_id).state == "finished"
        });
    }
    let (o, s, c) = (median(ours), median(seen_at_owner), median(curl));
    println!(
        "DAG job → `running` in the runner's Airflow (airflow standalone, SQLite), median of {rounds}:"
    );
    println!("  ours: signed job submitted at the owner → run running:  {o:.3} s");
    println!("        ... and the owner has the runner's pushed running: {s:.3} s");
    println!("  curl: POST dagRuns at Airflow → run running:            {c:.3} s");
    println!("  difference ours - curl: {:.3} s (ratio {:.2})", o - c, o / c);
}
