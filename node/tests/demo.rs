//! `kaapana-node demo` end to end: three sites, each with its own daemon, containerd and PACS
//! (a real Orthanc), run the federated statistics workflow over real DICOM. The test keeps the
//! demo's work directory and checks the results against the DICOM files the demo generated,
//! which it reads itself with dcmtk's `dcmdump` (every file must parse). Then the sites train a
//! model together (FedAvg over 10 rounds): the test checks that every round ran at all three
//! sites over all their series, that the loss went down, and the plot the demo drew of it.
//!
//! Needs root, containerd, runc, busybox-static, orthanc, orthanc-dicomweb, dcmtk and python3
//! (`scripts/test` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What the test reads from a site's DICOM files with dcmdump: per series its slice count,
/// per patient the sex.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Dumped {
    files: u64,
    slices: BTreeMap<String, u64>,
    sex: BTreeMap<String, String>,
}

impl Dumped {
    /// The counts `stats.json` and `merged.json` carry: (series, slice sum, min, max,
    /// patients, F, M, files).
    fn figures(&self) -> [u64; 8] {
        let s = self.slices.values();
        let count = |x: &str| self.sex.values().filter(|v| *v == x).count() as u64;
        [
            self.slices.len() as u64,
            s.clone().sum(),
            s.clone().copied().min().unwrap_or(0),
            s.copied().max().unwrap_or(0),
            self.sex.len() as u64,
            count("F"),
            count("M"),
            self.files,
        ]
    }

    fn merge(all: &[Dumped]) -> [u64; 8] {
        let f: Vec<[u64; 8]> = all.iter().map(Self::figures).collect();
        let sum = |k: usize| f.iter().map(|x| x[k]).sum::<u64>();
        [
            sum(0),
            sum(1),
            f.iter().map(|x| x[2]).min().unwrap_or(0),
            f.iter().map(|x| x[3]).max().unwrap_or(0),
            sum(4),
            sum(5),
            sum(6),
            sum(7),
        ]
    }
}

/// The same figures from a stats.json or merged.json.
fn figures_of(json: &serde_json::Value) -> [u64; 8] {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"));
    [
        n(&json["series"]),
        n(&json["slices"]["sum"]),
        n(&json["slices"]["min"]),
        n(&json["slices"]["max"]),
        n(&json["patients"]),
        n(&json["patients_by_sex"]["F"]),
        n(&json["patients_by_sex"]["M"]),
        n(&json["files"]),
    ]
}

fn dcm_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            dcm_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "dcm") {
            out.push(p);
        }
    }
}

/// Reads every DICOM file of a site's generated dataset with dcmdump (in batches), checking
/// that each parses without an error and has 64×64 16-bit pixel data of the right length.
fn dump_site(dataset: &Path) -> Dumped {
    let mut files = Vec::new();
    dcm_files(dataset, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no DICOM files in {}", dataset.display());
    let mut d = Dumped::default();
    for batch in files.chunks(400) {
        let out = Command::new("dcmdump")
            .args(["-q", "+F"])
            .args(["+P", "0020,000e", "+P", "0010,0020", "+P", "0010,0040", "+P", "0008,0060"])
            .args(["+P", "0028,0010", "+P", "0028,0011", "+P", "7fe0,0010"])
            .args(batch)
            .output()
            .expect("dcmdump (dcmtk) is missing: apt-get install -y dcmtk");
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dcmdump failed: {err}");
        assert!(!err.contains("E:") && !text.contains("E:"), "dcmdump errors: {err}{text}");
        let records: Vec<&str> = text.split("# dcmdump (").skip(1).collect();
        assert_eq!(records.len(), batch.len(), "dcmdump did not read every file:\n{text}");
        for r in records {
            let value = |tag: &str| -> String {
                let line = r
                    .lines()
                    .find(|l| l.starts_with(tag))
                    .unwrap_or_else(|| panic!("no {tag} in:\n{r}"));
                let (a, b) = (line.find('[').unwrap() + 1, line.find(']').unwrap());
                line[a..b].to_owned()
            };
            let us = |tag: &str| -> u64 {
                let line = r.lines().find(|l| l.starts_with(tag)).unwrap();
                line.split_whitespace().nth(2).unwrap().parse().unwrap()
            };
            assert_eq!(value("(0008,0060)"), "CT", "{r}");
            assert_eq!((us("(0028,0010)"), us("(0028,0011)")), (64, 64), "{r}");
            let pixels = r.lines().find(|l| l.starts_with("(7fe0,0010) OW")).expect(r);
            let len: u64 = pixels
                .split('#')
                .nth(1)
                .unwrap()
                .trim()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(len, 64 * 64 * 2, "{pixels}");
            *d.slices.entry(value("(0020,000e)")).or_default() += 1;
            let previous = d.sex.insert(value("(0010,0020)"), value("(0010,0040)"));
            if let Some(p) = previous {
                assert_eq!(p, d.sex[&value("(0010,0020)")], "a patient changed sex:\n{r}");
            }
            d.files += 1;
        }
    }
    d
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

/// The rounds of the demo's training (its default).
const ROUNDS: u32 = 10;

/// The rows of the demo's table of the loss per round: (round, sites, samples, loss).
fn loss_table(stdout: &str) -> Vec<(u32, usize, u64, f64)> {
    let header = ["round", "sites", "samples", "loss"];
    let mut lines =
        stdout.lines().skip_while(|l| l.split_whitespace().collect::<Vec<_>>() != header);
    assert!(lines.next().is_some(), "no table of the loss per round:\n{stdout}");
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(w.len() >= 4, "not a row of the loss table: {l:?}");
            (
                w[0].parse().unwrap(),
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
                w[3].parse().unwrap(),
            )
        })
        .collect()
}

/// `[ 12.3s] round  4/10 done in 1.2 s: updates from site-a, site-b, site-c (98 samples); loss
/// 0.51234` lines of the demo's progress: (round, sites, loss).
fn round_lines(stdout: &str) -> Vec<(u32, Vec<String>, f64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("s] round ")?.1;
            let (round, rest) = rest.split_once('/')?;
            let sites = rest.split_once("updates from ")?.1.split_once(" (")?.0;
            let loss = rest.rsplit_once("loss ")?.1;
            Some((
                round.trim().parse().ok()?,
                sites.split(", ").map(str::to_owned).collect(),
                loss.trim().parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn demo_runs_federated_statistics_at_three_sites_and_the_numbers_are_right() {
    let dir = common::test_dir();
    let work = dir.path().join("demo");
    let started = Instant::now();
    let stats_program = common::stats_program();
    let out = common::kaapana_node()
        .arg("demo")
        .arg("--keep")
        .arg(&work)
        .arg("--stats-program")
        .arg(&stats_program)
        .output()
        .unwrap();
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

    // The training: every round, each at all three sites over all their series, printed as
    // it completed, then in the table of the loss per round; the loss went down.
    assert!(stdout.contains(&format!("Training fedavg finished: {ROUNDS} rounds")), "{stdout}");
    let printed = round_lines(&stdout);
    let table = loss_table(&stdout);
    let all: Vec<u32> = (1..=ROUNDS).collect();
    assert_eq!(printed.iter().map(|r| r.0).collect::<Vec<_>>(), all, "{stdout}");
    assert_eq!(table.iter().map(|r| r.0).collect::<Vec<_>>(), all, "{stdout}");
    let series: u64 = ["site-a", "site-b", "site-c"]
        .iter()
        .map(|s| std::fs::read_dir(work.join("data").join(s).join("synthetic-ct")).unwrap().count())
        .sum::<usize>() as u64;
    for ((round, sites, loss), (_, n, samples, table_loss)) in printed.iter().zip(&table) {
        assert_eq!(sites, &["site-a", "site-b", "site-c"], "round {round}:\n{stdout}");
        assert_eq!((*n, *samples), (3, series), "round {round}:\n{stdout}");
        assert!((loss - table_loss).abs() < 1e-5, "round {round}: {loss} vs {table_loss}");
        assert!(loss.is_finite() && *loss > 0.0, "round {round}: loss {loss}");
    }
    let losses: Vec<f64> = table.iter().map(|r| r.3).collect();
    assert!(losses[losses.len() - 1] < losses[0], "the loss did not go down: {losses:?}");
    assert!(stdout.contains("its loss went down"), "{stdout}");
    // The plot: well-formed SVG (Python's XML parser reads it) with a point per round.
    let plot = work.join("fedavg-loss.svg");
    assert!(stdout.contains(&plot.display().to_string()), "{stdout}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#), "{svg}");
    assert_eq!(svg.matches("<circle ").count(), ROUNDS as usize, "{svg}");
    assert_eq!(svg.matches("<polyline ").count(), 1, "{svg}");
    let script = "import sys, xml.etree.ElementTree as E\n\
                  r = E.parse(sys.argv[1]).getroot()\n\
                  print(r.tag, len(r.findall('.//{http://www.w3.org/2000/svg}circle')))";
    let parsed = Command::new("python3").args(["-c", script]).arg(&plot).output().unwrap();
    let err = String::from_utf8_lossy(&parsed.stderr);
    assert!(parsed.status.success(), "{} is not well-formed XML: {err}", plot.display());
    assert_eq!(
        String::from_utf8_lossy(&parsed.stdout).trim(),
        format!("{{http://www.w3.org/2000/svg}}svg {ROUNDS}")
    );
    // Every site-stats job staged all of its site's series from the site's PACS (its log at
    // the runner says so, series by series); then each round's train job staged them again
    // (from the site's cache of its PACS) and trained on all of them.
    for site in ["site-a", "site-b", "site-c"] {
        let jobs = work.join(site).join("jobs");
        let logs: Vec<String> = std::fs::read_dir(&jobs)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path().join("job.log")).unwrap_or_default())
            .filter(|l| l.contains("staged 1/"))
            .collect();
        let n =
            std::fs::read_dir(work.join("data").join(site).join("synthetic-ct")).unwrap().count();
        let (trained, stats): (Vec<&String>, Vec<&String>) =
            logs.iter().partition(|l| l.contains("trained on "));
        assert_eq!(stats.len(), 1, "{site}: one statistics job staged from the PACS: {logs:#?}");
        assert!(
            stats[0].contains(&format!("staged {n}/{n} series"))
                && stats[0].contains(&format!("({n} from PACS, 0 from cache")),
            "{site}: {}",
            stats[0]
        );
        assert_eq!(trained.len(), ROUNDS as usize, "{site}: a train job per round: {logs:#?}");
        for l in trained {
            assert!(
                l.contains(&format!("staged {n}/{n} series"))
                    && l.contains(&format!("trained on {n} series of /input")),
                "{site}: {l}"
            );
        }
    }

    // The synthetic DICOM, read back by the test with dcmdump: three sites with different
    // series counts.
    let mut per_site = BTreeMap::new();
    for site in ["site-a", "site-b", "site-c"] {
        per_site.insert(site, dump_site(&work.join("data").join(site).join("synthetic-ct")));
    }
    let counts: BTreeSet<usize> = per_site.values().map(|s| s.slices.len()).collect();
    assert_eq!(counts.len(), 3, "the sites should have different series counts: {per_site:?}");

    // Each site's statistics (its job's verified result, computed from the series staged from
    // its PACS) match that site's files.
    for (job, runner) in runner_of.iter().filter(|(j, _)| j.starts_with("site-stats-")) {
        let text = std::fs::read_to_string(work.join("results").join(job).join("stats.json"))
            .unwrap_or_else(|e| panic!("no stats.json of {job}: {e}"));
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            figures_of(&json),
            per_site[runner.as_str()].figures(),
            "{job} at {runner}:\n{text}"
        );
        let voxels = json["voxels"].as_u64().unwrap();
        assert_eq!(voxels, per_site[runner.as_str()].files * 64 * 64, "{job}: {text}");
    }

    // The merged statistics match the files of all sites.
    let merged = std::fs::read_to_string(work.join("results/aggregate/merged.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&merged).unwrap();
    let all: Vec<Dumped> = per_site.values().cloned().collect();
    assert_eq!(figures_of(&json), Dumped::merge(&all), "merged.json:\n{merged}");
    assert_eq!(json["sites"], 3, "merged.json:\n{merged}");
    let histogram: u64 =
        json["hu_histogram"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(histogram, json["voxels"].as_u64().unwrap(), "merged.json:\n{merged}");

    // The PACS at each site was the demo's own Orthanc, and it stopped with the demo.
    for site in ["site-a", "site-b", "site-c"] {
        let log =
            std::fs::read_to_string(work.join("pacs").join(site).join("orthanc.log")).unwrap();
        assert!(log.contains("DICOMweb") || log.contains("dicom-web"), "{site}: {log}");
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
