//! The `kaapana-stats` command line (the binary cargo builds for these tests): site, merge,
//! help and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use kaapana_dicom::{SiteSpec, SiteStats, write_site};

fn stats(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kaapana-stats")).args(args).output().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn spec(seed: u64, series: usize) -> SiteSpec {
    SiteSpec { seed, series, slices: 1..=6, rows: 16, columns: 16 }
}

#[test]
fn site_then_merge_give_the_truth() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let merge_in = root.join("merge-in");
    let mut truths = Vec::new();
    for (name, seed, series) in [("site-a", 1, 5), ("site-b", 2, 3), ("site-c", 3, 1)] {
        let input = root.join(name);
        truths.push(write_site(&spec(seed, series), &input).unwrap().stats());
        // The output folder does not exist yet: it is created.
        let output = merge_in.join(format!("stats-{name}"));
        let out = stats(&["site", "--input", p(&input), &format!("--output={}", output.display())]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains(&format!("{series} series")), "{stdout}");
        assert!(stdout.contains("mean HU"), "{stdout}");
        let written = SiteStats::read_json(&output.join("stats.json")).unwrap();
        assert_eq!(&written, truths.last().unwrap());
    }
    // A folder without stats.json is skipped with a note.
    std::fs::create_dir(merge_in.join("logs")).unwrap();
    let merged_dir = root.join("merged");
    let out = stats(&["merge", "--input", p(&merge_in), "--output", p(&merged_dir)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("logs"), "{}", text(&out.stderr));
    let expected = SiteStats::merge(&truths);
    assert_eq!(expected.sites, 3);
    assert_eq!(expected.series, 9);
    let printed = SiteStats::from_json(&out.stdout, Path::new("stdout")).unwrap();
    assert_eq!(printed, expected);
    assert_eq!(SiteStats::read_json(&merged_dir.join("merged.json")).unwrap(), expected);
}

#[test]
fn a_non_dicom_file_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_site(&spec(9, 2), &input).unwrap();
    let series = std::fs::read_dir(&input).unwrap().next().unwrap().unwrap().path();
    let bad = series.join("broken.dcm");
    std::fs::write(&bad, b"this is not DICOM").unwrap();
    let output = tmp.path().join("out");
    let out = stats(&["site", "--input", p(&input), "--output", p(&output)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a readable DICOM file"), "{stderr}");
    assert!(!output.join("stats.json").exists());
}

#[test]
fn merge_without_inputs_or_with_a_bad_file_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(input.join("job-a")).unwrap();
    let out = stats(&["merge", "--input", p(&input), "--output", p(&tmp.path().join("o"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no */stats.json"), "{}", text(&out.stderr));

    let bad = input.join("job-a").join("stats.json");
    std::fs::write(&bad, br#"{"format": "kaapana-stats/1", "sites": 1}"#).unwrap();
    let out = stats(&["merge", "--input", p(&input), "--output", p(&tmp.path().join("o"))]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&bad.display().to_string()) && stderr.contains("missing field"),
        "{stderr}"
    );

    let out = stats(&["site", "--input", p(&tmp.path().join("nowhere"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nowhere"), "{}", text(&out.stderr));
}

#[test]
fn help_and_usage_errors() {
    let out = stats(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(help.contains("kaapana-stats site") && help.contains("merged.json"), "{help}");
    for args in [&[][..], &["frobnicate"], &["site", "--input"], &["site", "--verbose"]] {
        let out = stats(args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("Usage:"), "{}", text(&out.stderr));
    }
}
