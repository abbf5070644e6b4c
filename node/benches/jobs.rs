//! Cross-site job latency: a no-op job submitted at daemon A, run on daemon B's containerd,
//! its result (bundle) stored at A; beside `ctr run --rm` of the same image on the same
//! containerd, in the same run.
//!
//! `cargo bench -p kaapana-node --bench jobs` (add `-- N` for N jobs each, default 20).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Site;
use kaapana_node::api::{OwnerJobView, SubmitJobRequest};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n = std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(common::containerd::TestContainerd::start());
    let exec = rt.block_on(ctd.executor());
    let image = rt.block_on(ctd.busybox(&exec));
    let socket = ctd.containerd().socket().to_path_buf();

    let tmp = common::test_dir();
    let a = Site::init_networked(tmp.path(), "site-a");
    let b = Site::init_networked(tmp.path(), "site-b");
    b.set_executor(Some(&socket));
    let (bundle_a, bundle_b) = (a.export(tmp.path()), b.export(tmp.path()));
    a.register(&b, &bundle_b);
    b.register(&a, &bundle_a);
    let (da, db) = (a.start(), b.start());
    da.wait_until("connected", Duration::from_secs(30), |d| d.is_connected_to("site-b"));

    // Ours: submit at A → container on B → result stored at A.
    let mut ours = Vec::new();
    for i in 0..=n {
        let start = Instant::now();
        let job: OwnerJobView = da
            .api()
            .post(
                "/v1/jobs",
                &SubmitJobRequest {
                    runner: "site-b".into(),
                    workflow_name: "noop".into(),
                    job_name: format!("noop-{i}"),
                    image: image.to_string(),
                    command: vec!["true".into()],
                    env: vec![],
                    dataset: None,
                    timeout_secs: 60,
                    cpu_millis: 0,
                    memory_bytes: 0,
                },
            )
            .unwrap();
        let path = format!("/v1/jobs/{}/result", job.job_id);
        da.wait_until("the result", Duration::from_secs(60), |d| {
            d.api().get::<serde_json::Value>(&path).is_ok()
        });
        if i > 0 {
            ours.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // ctr run --rm of the same image on the same containerd.
    let name = kaapana_node::executor::image::image_name(&image);
    let mut ctr = Vec::new();
    for i in 0..=n {
        let start = Instant::now();
        let status = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", "kaapana-node", "run", "--rm", &name, &format!("bench-ctr-{i}"), "true"])
            .status()
            .unwrap();
        assert!(status.success());
        if i > 0 {
            ctr.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let (o, c) = (median(ours), median(ctr));
    println!(
        "cross-site no-op job (submit at A → run on B → result at A): median {o:.1} ms over {n}"
    );
    println!(
        "ctr run --rm, same image, same containerd:                 median {c:.1} ms over {n}"
    );
    println!("ratio: {:.2} (target <= 1.3)", o / c);
    assert!(da.stop() && db.stop());
    rt.block_on(ctd.assert_clean());
}
