//! Federated learning end to end: a FedAvg training of 10 rounds over three real daemons on a
//! real containerd, each site training `kaapana-fedavg` on its own synthetic DICOM series.
//! One site is killed while round 4 runs and comes back when round 7 opens: the training
//! goes on with its quorum of 2, ends after exactly 10 rounds, and every round's model is the
//! FedAvg of the updates the round aggregated, recomputed here from their bundles.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::training::{bundle_file, current_round, three_sites, training, workflow_file};

const WAIT: Duration = Duration::from_secs(120);

fn weights(json: &[u8]) -> Vec<f64> {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap();
    v["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect()
}

#[test]
fn a_training_survives_a_site_that_is_away_for_three_rounds_and_its_models_are_fedavg() {
    let dir = common::test_dir();
    let t = three_sites(dir.path(), |i| 10 + 4 * i, 3..=6, 32);
    let digest = t.digest.clone();
    let (a, b) = (t.sites[0].start(), t.sites[1].start());
    let mut c = Some(t.sites[2].start());
    for name in ["site-b", "site-c"] {
        a.wait_for_capabilities(name, WAIT);
    }
    let train = r#"["/bin/kaapana-fedavg", "train", "--data", "/input", "--epochs", "10"]"#;
    let aggregate = r#"["/bin/kaapana-fedavg", "aggregate"]"#;
    let w = a.submit_workflow(&workflow_file(&digest, 10, 2, "4s", train, aggregate));
    let id = w.workflow_id.clone();
    assert_eq!(training(&w).sites, ["site-a", "site-b", "site-c"]);

    a.wait_until("round 4", WAIT, |d| current_round(d, &id) >= 4);
    c.take().unwrap().kill();
    a.wait_until("round 7", WAIT, |d| current_round(d, &id) >= 7);
    let c = t.sites[2].start();
    let view = a.wait_workflow(&id, "finished", Duration::from_secs(300));
    drop((b, c));

    let tr = training(&view);
    assert_eq!(tr.completed, 10, "{tr:#?}");
    let rounds: Vec<u32> = tr.history.iter().map(|r| r.round).collect();
    assert_eq!(rounds, (1..=10).collect::<Vec<_>>());
    let runner: BTreeMap<&str, &str> =
        view.jobs.iter().map(|j| (j.name.as_str(), j.runner.as_str())).collect();
    let contributors = |r: usize| -> Vec<&str> {
        tr.history[r - 1].updates.iter().map(|u| runner[u.as_str()]).collect()
    };
    for r in &tr.history {
        assert!(r.updates.len() >= 2, "round {} closed below its quorum: {r:#?}", r.round);
        assert_eq!(r.state, "done");
    }
    for r in [5, 6] {
        assert_eq!(contributors(r), ["site-a", "site-b"], "site-c was away in round {r}");
    }
    assert!(
        (8..=10).any(|r| contributors(r).contains(&"site-c")),
        "site-c came back but never contributed again: {:#?}",
        tr.history
    );

    // Every model is the FedAvg of its round's updates (in the order the aggregate reads
    // them: by job name), each weighted by the sample count it reported, which is the number
    // of series at its site.
    let mut losses = Vec::new();
    for r in &tr.history {
        let mut updates = r.updates.clone();
        updates.sort();
        let mut acc: Vec<f64> = Vec::new();
        let mut total = 0u64;
        for u in &updates {
            let job = view.jobs.iter().find(|j| &j.name == u).unwrap();
            let site = t.sites.iter().position(|s| s.name == job.runner).unwrap();
            let digest = job.result.as_deref().unwrap();
            let n: u64 = String::from_utf8(bundle_file(&t.sites[0], digest, "samples"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(n, t.series[site] as u64, "{u} at {}", job.runner);
            assert_eq!(job.samples, Some(n));
            let w = weights(&bundle_file(&t.sites[0], digest, "model.json"));
            if acc.is_empty() {
                acc = vec![0.0; w.len()];
            }
            for (a, x) in acc.iter_mut().zip(&w) {
                *a += n as f64 * x;
            }
            total += n;
        }
        assert_eq!(r.samples, total);
        let reference: Vec<f64> = acc.iter().map(|a| a / total as f64).collect();
        let model = weights(&bundle_file(&t.sites[0], r.model.as_deref().unwrap(), "model.json"));
        assert_eq!(model.len(), reference.len());
        for (got, want) in model.iter().zip(&reference) {
            assert!(
                (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                "round {}: {model:?} != {reference:?}",
                r.round
            );
        }
        let metrics: serde_json::Value = serde_json::from_slice(&bundle_file(
            &t.sites[0],
            r.model.as_deref().unwrap(),
            "metrics.json",
        ))
        .unwrap();
        losses.push(metrics["loss"].as_f64().unwrap());
    }
    for (r, loss) in tr.history.iter().zip(&losses) {
        let sites: Vec<&str> = r.updates.iter().map(|u| runner[u.as_str()]).collect();
        eprintln!(
            "round {:2}: {:5} ms, loss {loss:.5}, updates from {sites:?}",
            r.round,
            r.duration_ms.unwrap_or_default()
        );
    }
    assert!(losses[9] < losses[0], "the loss did not go down: {losses:?}");

    // Round 2's model went to the two other sites once each; the owner's own job read it here.
    let r2 = &tr.history[1];
    let model1 = tr.history[0].model_bytes.unwrap();
    assert_eq!(r2.input_bytes_sent, 2 * model1, "{r2:#?}");
    drop(t.ctd);
}
