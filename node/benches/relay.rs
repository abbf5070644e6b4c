//! Result throughput relayed vs direct, on the same network namespaces (issue 18): site-a and
//! site-b each behind a NAT router of their own (nftables masquerade), a relay-only node
//! (`kaapana-node relay`) on the public subnet between them (see `tests/common/nat.rs`).
//! site-b runs a job whose output is `MB` megabytes of random bytes; its result travels to
//! site-a first through the relay (hole punching off), then, after both restart with hole
//! punching on, over the direct connection DCUtR made.
//!
//! The figure per transfer is the result path: from the job's end at the runner (its runner
//! record's `finished_at`) to the owner's `result_received` event for the stored bundle, i.e.
//! packing and signing the bundle, sending it, and the owner verifying and storing it.
//!
//! `cargo bench -p kaapana-node --bench relay` (add `-- MB N` for N transfers of MB
//! megabytes; default 100 MB, 3 each). Needs root (namespaces), containerd, runc, nftables.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::nat::NatFed;
use common::training::millis;
use kaapana_node::api::JobsView;

/// One transfer of `mb` MB from site-b to site-a; the seconds of its result path.
fn transfer(f: &NatFed, k: usize, mb: u64) -> f64 {
    let toml = format!(
        r#"name = "transfer-{k}"
[[job]]
name = "far"
runner = "site-b"
image = "{}"
command = ["sh", "-c", "head -c {} /dev/urandom > /output/blob"]
timeout = "10m"
memory = "256MiB"
"#,
        f.image,
        mb * 1_000_000
    );
    let w = f.d(1).submit_workflow(&toml);
    let w = f.d(1).wait_workflow(&w.workflow_id, "finished", Duration::from_secs(600));
    let job = &w.jobs[0].job_id;
    let b = f.d(2);
    let jobs: JobsView = b.api().get("/v1/jobs").unwrap();
    let ended = jobs.running_here.iter().find(|j| &j.job_id == job).unwrap();
    let ended = millis(ended.finished_at.as_deref().unwrap());
    let sent = f
        .d(1)
        .events(0, Duration::ZERO)
        .into_iter()
        .find(|e| {
            e.kind == "result_received"
                && e.detail.contains(job.as_str())
                && e.detail.contains(" bundle ")
        })
        .unwrap_or_else(|| panic!("no result_received event for {job}"))
        .at_ms;
    (sent.saturating_sub(ended)) as f64 / 1000.0
}

fn run(f: &NatFed, mode: &str, mb: u64, n: usize) -> f64 {
    let mut rates = Vec::new();
    for k in 0..n {
        let secs = transfer(f, k, mb);
        let rate = mb as f64 / secs;
        println!("{mode}: {mb} MB result in {secs:.2} s: {rate:.1} MB/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!("{mode}: median {median:.1} MB/s of {n}");
    median
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let mb = args.first().copied().unwrap_or(100);
    let n = args.get(1).copied().unwrap_or(3) as usize;
    let mut f = NatFed::new(false, true);
    for i in 0..3 {
        f.start(i);
    }
    f.wait_path("relayed");
    let relayed = run(&f, "relayed", mb, n);
    for i in [1, 2] {
        assert!(f.daemons[i].take().unwrap().stop());
        f.sites[i].set_network("hole_punching", "true");
    }
    for i in [1, 2] {
        f.start(i);
    }
    f.wait_path("direct");
    let direct = run(&f, "direct", mb, n);
    println!(
        "result throughput relayed / direct: {relayed:.1} / {direct:.1} MB/s ({:.2} of direct)",
        relayed / direct
    );
}
