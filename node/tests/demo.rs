//! `kaapana-node demo` end to end: three sites, each with its own daemon and containerd, run
//! the federated statistics workflow. The test keeps the demo's work directory and checks the
//! results against the synthetic datasets itself, reading every item's `slices.txt`.
//!
//! Needs root, containerd, runc and busybox-static (`scripts/test` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

/// Statistics of slice counts, as the workflow reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stats {
    items: u64,
    sum: u64,
    min: u64,
    max: u64,
    /// Bins of 50 slices: 0-49, 50-99, ..., 300-349.
    bins: [u64; 7],
}

impl Stats {
    fn add(&mut self, slices: u64) {
        self.min = if self.items == 0 { slices } else { self.min.min(slices) };
        self.max = self.max.max(slices);
        self.items += 1;
        self.sum += slices;
        self.bins[usize::try_from(slices / 50).unwrap()] += 1;
    }

    fn merge(&mut self, other: &Self) {
        self.min = if self.items == 0 { other.min } else { self.min.min(other.min) };
        self.max = self.max.max(other.max);
        self.items += other.items;
        self.sum += other.sum;
        for (a, b) in self.bins.iter_mut().zip(other.bins) {
            *a += b;
        }
    }

    /// Reads the `key value` lines of a stats.txt or merged.txt; panics on a missing key.
    fn parse(text: &str) -> (Self, BTreeMap<String, String>) {
        let map: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        let num = |k: &str| -> u64 {
            map.get(k)
                .unwrap_or_else(|| panic!("no `{k}` line in:\n{text}"))
                .parse()
                .unwrap_or_else(|e| panic!("`{k}` is not a number ({e}) in:\n{text}"))
        };
        let mut bins = [0; 7];
        for (i, b) in bins.iter_mut().enumerate() {
            *b = num(&format!("bin_{:03}_{:03}", i * 50, i * 50 + 49));
        }
        let stats = Self {
            items: num("items"),
            sum: num("slices_sum"),
            min: num("slices_min"),
            max: num("slices_max"),
            bins,
        };
        (stats, map)
    }
}

/// A site's dataset as the test reads it: every item folder's slice count.
fn dataset_stats(dataset: &Path, site_number: usize) -> Stats {
    let mut stats = Stats::default();
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dataset).unwrap() {
        let item = entry.unwrap().path();
        let name = item.file_name().unwrap().to_string_lossy().into_owned();
        let prefix = format!("1.2.826.0.1.3680043.10.{site_number}.");
        assert!(
            name.starts_with(&prefix),
            "item {name} is not named like a series UID {prefix}<k>"
        );
        let slices: u64 =
            std::fs::read_to_string(item.join("slices.txt")).unwrap().trim().parse().unwrap();
        assert!((20..=300).contains(&slices), "{name}: {slices} slices");
        let dcm = std::fs::read(item.join("image.dcm")).unwrap();
        assert_eq!(&dcm[128..132], b"DICM", "{name}/image.dcm has no DICOM preamble");
        stats.add(slices);
        names.insert(name);
    }
    assert_eq!(names.len() as u64, stats.items);
    stats
}

/// `[  1.2s] <job> at <runner> <state>` lines of the demo's progress: (job, runner, state).
fn progress(stdout: &str) -> Vec<(String, String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix('[')?;
            let (time, rest) = rest.split_once("s]")?;
            time.trim().parse::<f64>().ok()?;
            let mut words = rest.split_whitespace();
            let job = words.next()?.to_owned();
            (words.next()? == "at").then_some(())?;
            let runner = words.next()?.to_owned();
            let state = words.next()?.trim_end_matches(':').to_owned();
            Some((job, runner, state))
        })
        .collect()
}

#[test]
fn demo_runs_federated_statistics_at_three_sites_and_the_numbers_are_right() {
    let dir = common::test_dir();
    let work = dir.path().join("demo");
    let started = Instant::now();
    let out = common::kaapana_node().arg("demo").arg("--keep").arg(&work).output().unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n--- stderr:\n{stderr}");
    eprintln!("the demo took {:.1} s", elapsed.as_secs_f64());

    // Progress: every job's state changes, each with its runner; all four jobs finished, the
    // site-stats jobs one at each site, the aggregation at the owner.
    let lines = progress(&stdout);
    let mut runner_of = BTreeMap::new();
    for (job, runner, state) in &lines {
        if let Some(earlier) = runner_of.insert(job.clone(), runner.clone()) {
            assert_eq!(&earlier, runner, "{job} changed runners:\n{stdout}");
        }
        assert_ne!(state, "failed", "{job} at {runner} failed:\n{stdout}");
    }
    let finished: BTreeSet<&str> =
        lines.iter().filter(|l| l.2 == "finished").map(|l| l.0.as_str()).collect();
    assert_eq!(
        finished,
        BTreeSet::from(["site-stats-1", "site-stats-2", "site-stats-3", "aggregate"]),
        "{stdout}"
    );
    let stat_runners: BTreeSet<&str> = runner_of
        .iter()
        .filter(|(job, _)| job.starts_with("site-stats-"))
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(stat_runners, BTreeSet::from(["site-a", "site-b", "site-c"]), "{stdout}");
    assert_eq!(runner_of["aggregate"], "site-a");
    for (job, _, state) in &lines {
        if job == "aggregate" && state != "waiting" {
            // The aggregation starts only when every site's statistics are in.
            let first = lines.iter().position(|l| &l.0 == job && &l.2 == state).unwrap();
            for s in ["site-stats-1", "site-stats-2", "site-stats-3"] {
                let done = lines.iter().position(|l| l.0 == s && l.2 == "finished").unwrap();
                assert!(done < first, "aggregate was {state} before {s} finished:\n{stdout}");
            }
        }
    }
    assert!(stdout.contains("Workflow federated-statistics finished after"), "{stdout}");
    assert!(stdout.contains("merged statistics match the synthetic data"), "{stdout}");

    // The synthetic data, read back by the test: three sites with different item counts.
    let mut per_site = BTreeMap::new();
    let mut all = Stats::default();
    for (n, site) in ["site-a", "site-b", "site-c"].into_iter().enumerate() {
        let stats = dataset_stats(&work.join("data").join(site).join("synthetic-ct"), n + 1);
        all.merge(&stats);
        per_site.insert(site, stats);
    }
    let counts: BTreeSet<u64> = per_site.values().map(|s| s.items).collect();
    assert_eq!(counts.len(), 3, "the sites should have different item counts: {per_site:?}");

    // Each site's statistics (its job's verified result) match that site's data.
    for (job, runner) in runner_of.iter().filter(|(j, _)| j.starts_with("site-stats-")) {
        let text = std::fs::read_to_string(work.join("results").join(job).join("stats.txt"))
            .unwrap_or_else(|e| panic!("no stats.txt of {job}: {e}"));
        let (got, _) = Stats::parse(&text);
        assert_eq!(got, per_site[runner.as_str()], "{job} at {runner}:\n{text}");
    }

    // The merged statistics match the data of all sites.
    let merged = std::fs::read_to_string(work.join("results/aggregate/merged.txt")).unwrap();
    let (got, lines) = Stats::parse(&merged);
    assert_eq!(got, all, "merged.txt:\n{merged}");
    assert_eq!(lines["sites"], "3", "merged.txt:\n{merged}");
    let mean: f64 = lines["slices_mean"].parse().unwrap();
    let want = all.sum as f64 / all.items as f64;
    assert!((mean - want).abs() < 0.0051, "slices_mean {mean}, expected {want:.2}");
    // And the demo printed them.
    for l in merged.lines() {
        assert!(stdout.contains(l), "the demo did not print `{l}`:\n{stdout}");
    }

    // Everything stopped: no daemon's API address is left, no process runs on the work
    // directory (daemons, their containerds, shims) and nothing is mounted below it.
    for site in ["site-a", "site-b", "site-c"] {
        assert!(!work.join(site).join("api-address").exists(), "{site}'s daemon did not stop");
    }
    let root = work.to_string_lossy().into_owned();
    let mut left = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&root) {
            left.push(format!("{}: {cmdline}", p.file_name().to_string_lossy()));
        }
    }
    assert!(left.is_empty(), "processes left running: {left:#?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let below: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&root)))
        .collect();
    assert!(below.is_empty(), "mounts left: {below:#?}");
}
