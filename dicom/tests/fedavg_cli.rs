//! The `kaapana-fedavg` command line (the binary cargo builds for these tests): three sites,
//! three rounds of `train` at each and `aggregate`, the aggregate checked against a FedAvg
//! recomputed here from the updates' files; help and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use kaapana_dicom::{SiteSpec, write_site};
use serde_json::Value;

fn fedavg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kaapana-fedavg")).args(args).output().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn spec(seed: u64, series: usize) -> SiteSpec {
    SiteSpec { seed, series, slices: 3..=10, rows: 32, columns: 32 }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn weights(model: &Value) -> Vec<f64> {
    model["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect()
}

#[test]
fn three_sites_three_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let sites = [("site-a", 101, 24), ("site-b", 202, 16), ("site-c", 303, 30)];
    for (name, seed, series) in sites {
        write_site(&spec(seed, series), &root.join(name).join("data")).unwrap();
    }
    let mut losses = Vec::new();
    for round in 1..=3 {
        // The training jobs' input: the previous round's aggregate (none in round 1).
        let train_in = root.join(format!("round-{round}/train-in"));
        std::fs::create_dir_all(&train_in).unwrap();
        if round > 1 {
            let global = root.join(format!("round-{}/aggregate/model.json", round - 1));
            std::fs::create_dir_all(train_in.join("aggregate")).unwrap();
            std::fs::copy(&global, train_in.join("aggregate/model.json")).unwrap();
        }
        let agg_in = root.join(format!("round-{round}/aggregate-in"));
        for (name, _, series) in sites {
            let output = agg_in.join(format!("train-{name}"));
            let out = fedavg(&[
                "train",
                "--data",
                p(&root.join(name).join("data")),
                "--input",
                p(&train_in),
                &format!("--output={}", output.display()),
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let stdout = text(&out.stdout);
            assert_eq!(stdout.lines().count(), 1, "{stdout}");
            assert!(stdout.contains(&format!("trained on {series} series")), "{stdout}");
            assert!(stdout.contains(if round == 1 { "from zeros" } else { "aggregate" }));
            assert_eq!(
                std::fs::read(output.join("samples")).unwrap(),
                format!("{series}\n").as_bytes()
            );
            let metrics = json(&output.join("metrics.json"));
            assert_eq!(metrics["samples"], series);
            let (before, after) =
                (metrics["loss_before"].as_f64().unwrap(), metrics["loss_after"].as_f64().unwrap());
            assert!(after < before, "{name} round {round}: {metrics}");
            if round == 1 {
                assert!((before - std::f64::consts::LN_2).abs() < 1e-12, "{metrics}");
            }
        }
        // A folder without model.json (a job's logs) is skipped with a note.
        std::fs::create_dir_all(agg_in.join("logs")).unwrap();
        let agg_out = root.join(format!("round-{round}/aggregate"));
        let out = fedavg(&["aggregate", "--input", p(&agg_in), "--output", p(&agg_out)]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("logs"), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        assert!(stdout.contains("aggregated 3 updates of 70 samples"), "{stdout}");

        // FedAvg recomputed from the updates' files, in folder-name order.
        let mut acc: Vec<f64> = Vec::new();
        let mut total = 0u64;
        let mut weighted_loss = 0.0;
        for (name, _, _) in sites {
            let dir = agg_in.join(format!("train-{name}"));
            let n: u64 =
                std::fs::read_to_string(dir.join("samples")).unwrap().trim().parse().unwrap();
            let w = weights(&json(&dir.join("model.json")));
            acc.resize(w.len(), 0.0);
            for (a, w) in acc.iter_mut().zip(&w) {
                *a += n as f64 * w;
            }
            total += n;
            weighted_loss +=
                n as f64 * json(&dir.join("metrics.json"))["loss_after"].as_f64().unwrap();
        }
        let expected: Vec<f64> = acc.iter().map(|a| a / total as f64).collect();
        let model = json(&agg_out.join("model.json"));
        let got = weights(&model);
        assert_eq!(got.len(), 7);
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() <= 1e-12, "{got:?} != {expected:?}");
        }
        assert_eq!(model["features"][0], "bias");
        let metrics = json(&agg_out.join("metrics.json"));
        assert_eq!(metrics["samples"], 70);
        let names: Vec<&str> = metrics["updates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["train-site-a", "train-site-b", "train-site-c"]);
        let loss = metrics["loss"].as_f64().unwrap();
        assert!((loss - weighted_loss / total as f64).abs() < 1e-12, "{metrics}");
        assert!(stdout.contains(&format!("weighted loss {loss:.6}")), "{stdout}");
        losses.push(loss);
    }
    eprintln!("weighted loss per round: {losses:?}");
    assert!(losses[2] < losses[0], "{losses:?}");
    assert!(losses[1] < losses[0] && losses[2] < losses[1], "{losses:?}");
}

#[test]
fn train_errors_name_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("series-without-files")).unwrap();
    let output = tmp.path().join("out");
    let input = tmp.path().join("in");
    let run = |input: &Path| {
        fedavg(&["train", "--data", p(&data), "--input", p(input), "--output", p(&output)])
    };
    let out = run(&input);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no DICOM series") && stderr.contains(p(&data)), "{stderr}");
    assert!(!output.exists());

    write_site(&spec(5, 3), &data).unwrap();
    for name in ["a", "b"] {
        std::fs::create_dir_all(input.join(name)).unwrap();
        std::fs::write(
            input.join(name).join("model.json"),
            r#"{"weights": [0, 0, 0, 0, 0, 0, 0], "features": ["bias", "lung_fraction",
            "fat_fraction", "soft_tissue_fraction", "dense_fraction", "bone_fraction",
            "mean_hu"]}"#,
        )
        .unwrap();
    }
    let out = run(&input);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("several") && stderr.contains("b/model.json"), "{stderr}");

    std::fs::remove_dir_all(input.join("b")).unwrap();
    let bad = input.join("a").join("model.json");
    std::fs::write(&bad, r#"{"weights": [1.0], "features": ["x"]}"#).unwrap();
    let out = run(&input);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(p(&bad)) && stderr.contains("features"), "{stderr}");

    std::fs::remove_file(&bad).unwrap();
    let out = run(&input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(output.join("samples")).unwrap(), "3\n");
}

#[test]
fn aggregate_errors_name_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    let output = tmp.path().join("out");
    let aggregate = || fedavg(&["aggregate", "--input", p(&input), "--output", p(&output)]);
    std::fs::create_dir_all(input.join("logs")).unwrap();
    let out = aggregate();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no */model.json"), "{}", text(&out.stderr));

    let model = |n: usize| {
        format!(
            r#"{{"weights": {:?}, "features": {:?}}}"#,
            vec![0.5; n],
            (0..n).map(|i| format!("f{i}")).collect::<Vec<_>>()
        )
    };
    let site_a = input.join("site-a");
    std::fs::create_dir_all(&site_a).unwrap();
    std::fs::write(site_a.join("model.json"), model(3)).unwrap();
    let out = aggregate();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(p(&site_a.join("samples"))) && stderr.contains("missing"), "{stderr}");

    for bad in ["0\n", "three\n", ""] {
        std::fs::write(site_a.join("samples"), bad).unwrap();
        let out = aggregate();
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(text(&out.stderr).contains(p(&site_a.join("samples"))), "{}", text(&out.stderr));
    }
    std::fs::write(site_a.join("samples"), "4\n").unwrap();
    let site_b = input.join("site-b");
    std::fs::create_dir_all(&site_b).unwrap();
    std::fs::write(site_b.join("model.json"), model(2)).unwrap();
    std::fs::write(site_b.join("samples"), "1\n").unwrap();
    let out = aggregate();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(p(&site_b.join("model.json"))), "{stderr}");

    // Matching models without metrics: the loss is unknown (null).
    std::fs::write(site_b.join("model.json"), model(3)).unwrap();
    let out = aggregate();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("weighted loss unknown"), "{}", text(&out.stdout));
    let metrics = json(&output.join("metrics.json"));
    assert_eq!(metrics["samples"], 5);
    assert!(metrics["loss"].is_null(), "{metrics}");
    assert_eq!(weights(&json(&output.join("model.json"))), vec![0.5; 3]);
}

#[test]
fn help_and_usage_errors() {
    let out = fedavg(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(help.contains("kaapana-fedavg train") && help.contains("acc[j] += "), "{help}");
    for args in [
        &[][..],
        &["frobnicate"],
        &["train", "--data"],
        &["train", "--epochs", "many"],
        &["train", "--learning-rate", "-1"],
        &["train", "--learning-rate=NaN"],
        &["aggregate", "--epochs", "3"],
        &["train", "--verbose"],
    ] {
        let out = fedavg(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("Usage:"), "{}", text(&out.stderr));
    }
}
