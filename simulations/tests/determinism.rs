//! Same scenario and seed, same bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use simulations::config::Delivery;
use simulations::report::{rows_csv, run_scenario};
use simulations::{Scenario, SimOptions};

fn ci() -> Scenario {
    Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/ci-100.toml")).unwrap()
}

fn csv(sc: &Scenario) -> String {
    let results = run_scenario(sc, SimOptions::default(), |_, _| {}).unwrap();
    let rows: Vec<_> = results.into_iter().map(|(r, _)| r).collect();
    rows_csv(&rows)
}

#[test]
fn the_same_seed_gives_byte_identical_csv() {
    let mut sc = ci();
    sc.sweep.delivery = vec![Delivery::Push, Delivery::Poll];
    let first = csv(&sc);
    let second = csv(&sc);
    assert_eq!(first, second);
    assert_eq!(first.lines().count(), 3, "{first}");
}

#[test]
fn another_seed_gives_another_run() {
    let sc = ci();
    let mut other = sc.clone();
    other.seed += 1;
    let (a, b) = (csv(&sc), csv(&other));
    assert_ne!(a, b);
    // Only the measurements differ, not the shape of the file.
    assert_eq!(a.lines().next(), b.lines().next());
}

#[test]
fn the_cli_writes_identical_files_for_the_same_seed() {
    let exe = env!("CARGO_BIN_EXE_simulations");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/ci-100.toml");
    let base = std::env::temp_dir().join(format!("simulations-determinism-{}", std::process::id()));
    let mut outputs = Vec::new();
    for run in ["a", "b"] {
        let out = base.join(run);
        let status = std::process::Command::new(exe)
            .arg("run")
            .arg(&scenario)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        outputs.push(std::fs::read(out.join("ci-100.csv")).unwrap());
    }
    let _ = std::fs::remove_dir_all(&base);
    assert_eq!(outputs[0], outputs[1]);
    assert!(!outputs[0].is_empty());
}
