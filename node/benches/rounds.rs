//! Training rounds over three `kaapana-node run` processes on one real containerd, on
//! loopback (the figures of issue 17, beside Flower and NVIDIA FLARE: `benches/peers/run`):
//!
//! 1. **Per-round overhead with a no-op train step**: every site's train job only writes its
//!    sample count, the aggregate does nothing. A round is two containers one after the other
//!    (the sites' train jobs, in parallel, then the aggregate at the owner), so the overhead
//!    of the federation (dispatch, signing, transfer, durable commits, scheduling) is the
//!    round's time minus twice the time of one local no-op job of the same image, measured
//!    here too; and, since the three sites' train containers share this machine's containerd
//!    and cores, also the round's time minus that of three local no-op jobs at once and one.
//! 2. **A 100 MB model**: the aggregate writes a 100 MB global model, each site reads it in
//!    the next round (fetched from the owner over `/kaapana/inputs/1`) and sends back a
//!    100 MB update.
//!
//! `cargo bench -p kaapana-node --bench rounds` (add `-- R` for R no-op rounds, `-- R MB M`
//! for M model rounds of MB megabytes).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::training::{millis, three_sites, training, workflow_file};
use common::{Daemon, test_dir};

const WAIT: Duration = Duration::from_secs(600);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Runs a training to its end; returns each round's duration in ms and the final view.
fn run(owner: &Daemon, toml: &str) -> (Vec<f64>, kaapana_node::api::WorkflowView) {
    let w = owner.submit_workflow(toml);
    let view = owner.wait_workflow(&w.workflow_id, "finished", WAIT);
    let rounds = training(&view).history.iter().map(|r| r.duration_ms.unwrap() as f64).collect();
    (rounds, view)
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let noop_rounds = args.first().copied().unwrap_or(30) as u32;
    let mb = args.get(1).copied().unwrap_or(100);
    let model_rounds = args.get(2).copied().unwrap_or(3) as u32;
    let tmp = test_dir();
    let t = three_sites(tmp.path(), |_| 2, 1..=1, 8);
    let daemons: Vec<Daemon> = t.sites.iter().map(|s| s.start()).collect();
    let owner = &daemons[0];
    for name in ["site-b", "site-c"] {
        owner.wait_for_capabilities(name, WAIT);
    }

    // One local no-op job of the same image, 10 times: the container's own cost.
    let mut local = Vec::new();
    for k in 0..10 {
        let w = owner.submit_workflow(&format!(
            "name = \"local-{k}\"\n[[job]]\nname = \"noop\"\nrunner = \"owner\"\nimage = \"{}\"\ncommand = [\"true\"]\n",
            t.digest
        ));
        let v = owner.wait_workflow(&w.workflow_id, "finished", WAIT);
        local.push((millis(v.ended_at.as_deref().unwrap()) - millis(&v.created_at)) as f64);
    }
    let job = median(local);
    println!("one local no-op job (submit to result stored): median {job:.0} ms of 10");
    // Three local no-op jobs at once, 10 times: what the sites' three train containers cost
    // when they share this machine's one containerd and two cores, as they do in a round.
    let mut parallel = Vec::new();
    for k in 0..10 {
        let jobs: String = (1..=3)
            .map(|n| {
                format!(
                    "[[job]]\nname = \"noop-{n}\"\nrunner = \"owner\"\nimage = \"{}\"\ncommand = [\"true\"]\n",
                    t.digest
                )
            })
            .collect();
        let w = owner.submit_workflow(&format!("name = \"local-3-{k}\"\n{jobs}"));
        let v = owner.wait_workflow(&w.workflow_id, "finished", WAIT);
        parallel.push((millis(v.ended_at.as_deref().unwrap()) - millis(&v.created_at)) as f64);
    }
    let three = median(parallel);
    println!(
        "three local no-op jobs at once (submit to all results stored): median {three:.0} ms of 10"
    );

    let train = r#"["sh", "-c", "echo 1 > /output/samples"]"#;
    let toml = workflow_file(&t.digest, noop_rounds, 3, "60s", train, r#"["true"]"#);
    let (rounds, _) = run(owner, &toml);
    let further = &rounds[1..];
    let per_round = mean(further);
    println!(
        "no-op training, 3 sites, {noop_rounds} rounds: first round {:.0} ms, further rounds mean {per_round:.0} ms (median {:.0} ms, min {:.0} ms)",
        rounds[0],
        median(further.to_vec()),
        further.iter().copied().fold(f64::INFINITY, f64::min),
    );
    println!(
        "per-round overhead beyond its two containers: {:.0} ms (round {per_round:.0} ms - 2 x {job:.0} ms)",
        per_round - 2.0 * job
    );
    println!(
        "per-round overhead beyond three containers at once and then one: {:.0} ms (round {per_round:.0} ms - {three:.0} ms - {job:.0} ms)",
        per_round - three - job
    );

    let bytes = mb * 1_000_000;
    let train = format!(
        r#"["sh", "-c", "cat /input/aggregate-r*/model.bin > /dev/null 2>&1; head -c {bytes} /dev/urandom > /output/update.bin; echo 2 > /output/samples"]"#
    );
    let aggregate = format!(r#"["sh", "-c", "head -c {bytes} /dev/urandom > /output/model.bin"]"#);
    let toml = workflow_file(&t.digest, model_rounds, 3, "10m", &train, &aggregate);
    let (rounds, view) = run(owner, &toml);
    let tr = training(&view);
    for (r, ms) in tr.history.iter().zip(&rounds) {
        println!(
            "{mb} MB model, round {}: {:.2} s, model bytes sent by the owner {:.1} MB, updates {}",
            r.round,
            ms / 1000.0,
            r.input_bytes_sent as f64 / 1e6,
            r.updates.len()
        );
    }
    if rounds.len() > 1 {
        println!(
            "{mb} MB model: mean round with the model going out and {mb} MB updates coming back: {:.2} s",
            mean(&rounds[1..]) / 1000.0
        );
    }
    drop(daemons);
}
