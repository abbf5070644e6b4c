//! Staging a series from the PACS: a 500-instance CT series (512×512, 16-bit: about 0.5 MB an
//! instance, as a real chest CT) in a real Orthanc on loopback, fetched by WADO-RS into the
//! node's PACS cache and linked into a job's input folder ([`PacsCache::stage_series`]),
//! beside `curl` of the same WADO-RS URL to one file, alternating, in the same run. Prints the
//! median of each, MB/s, and the ratio ours / curl (goal ≥ 0.8).
//!
//! `cargo bench -p kaapana-node --bench staging` (add `-- N` for N rounds, default 5, and
//! `--instances K` for another series length).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Instant;

use kaapana_dicom::{SiteSpec, write_site};
use kaapana_node::pacs::{DicomWeb, PacsAuth};
use kaapana_node::pacs_cache::PacsCache;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .or_else(|| args.iter().find(|a| a.parse::<usize>().is_ok()))
        .and_then(|a| a.parse::<usize>().ok())
        .unwrap_or(5);
    let instances = args
        .iter()
        .position(|a| a == "--instances")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(500);

    let tmp = common::test_dir();
    let orthanc = common::orthanc::start(&tmp.path().join("pacs"));
    let spec =
        SiteSpec { seed: 14, series: 1, slices: instances..=instances, rows: 512, columns: 512 };
    let written = Instant::now();
    let truth = write_site(&spec, &tmp.path().join("series")).unwrap();
    let loaded = orthanc.upload_folder(&tmp.path().join("series")).unwrap();
    let (series, t) = truth.series.iter().next().unwrap();
    eprintln!(
        "series {series}: {loaded} instances, {} bytes, written and stored in Orthanc in {:.1} s",
        truth.bytes,
        written.elapsed().as_secs_f64()
    );
    let auth = PacsAuth::Basic {
        user: common::orthanc::USER.into(),
        password: common::orthanc::PASSWORD.into(),
    };
    let pacs = DicomWeb::new(&orthanc.dicomweb(), auth);
    let url = format!("{}/studies/{}/series/{series}", orthanc.dicomweb(), t.study_uid);

    let (mut ours, mut curl) = (Vec::new(), Vec::new());
    let mut curl_bytes = 0u64;
    for round in 0..rounds {
        // Ours: an empty cache each round, so every instance comes from the PACS.
        let dir = tmp.path().join(format!("round-{round}"));
        let cache = PacsCache::open(&dir.join("cache"), u64::MAX).unwrap();
        std::fs::create_dir_all(dir.join("input")).unwrap();
        let started = Instant::now();
        let staged = cache.stage_series(&pacs, &t.study_uid, series, &dir.join("input")).unwrap();
        ours.push(started.elapsed().as_secs_f64());
        assert_eq!(staged.instances, loaded as u64, "{staged:?}");

        // curl of the same URL to one file (the multipart answer as it comes).
        let file = dir.join("curl.multipart");
        let started = Instant::now();
        let status = Command::new("curl")
            .args(["-sS", "--fail", "-o"])
            .arg(&file)
            .args(["-u", &format!("{}:{}", common::orthanc::USER, common::orthanc::PASSWORD)])
            .args([
                "-H",
                "Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            ])
            .arg(&url)
            .status()
            .unwrap();
        curl.push(started.elapsed().as_secs_f64());
        assert!(status.success(), "curl {url}: {status}");
        curl_bytes = std::fs::metadata(&file).unwrap().len();
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let (ours, curl) = (median(ours), median(curl));
    let mb = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    println!(
        "staging {loaded} instances ({:.1} MB) from Orthanc on loopback, median of {rounds}:",
        truth.bytes as f64 / 1e6
    );
    println!(
        "  ours (WADO-RS → cache → job input): {ours:.3} s, {:.0} MB/s",
        mb(truth.bytes, ours)
    );
    println!(
        "  curl of the same URL to a file:     {curl:.3} s, {:.0} MB/s ({curl_bytes} bytes with the multipart framing)",
        mb(curl_bytes, curl)
    );
    println!("  ratio ours / curl (time of curl / time of ours): {:.2} (goal >= 0.8)", curl / ours);
}
