//! Trainings (workflows with rounds) over real daemons: three sites on one real containerd,
//! each with a synthetic DICOM dataset `synthetic-ct` and a job image holding
//! `kaapana-fedavg`, and readers for what a training's view and bundles hold. Shared by the
//! end-to-end test (`tests/training.rs`) and the benchmark (`benches/rounds.rs`).
#![allow(dead_code)]

use std::io::Read as _;
use std::path::Path;

use kaapana_dicom::SiteSpec;
use kaapana_node::api::{TrainingView, WorkflowView};
use kaapana_node::executor::busybox::{ExtraFile, build_image_with};

use super::containerd::TestContainerd;
use super::{Daemon, Site, federation};

/// The sites (registered with each other, not running) and what they hold.
pub struct TrainingSites {
    /// `site-a`, `site-b`, `site-c`.
    pub sites: Vec<Site>,
    /// The job image's digest (busybox and `/bin/kaapana-fedavg`).
    pub digest: String,
    /// Series (samples) in each site's dataset.
    pub series: Vec<usize>,
    /// The containerd every site runs its jobs on.
    pub ctd: TestContainerd,
    _rt: tokio::runtime::Runtime,
}

/// Three sites under `root`; site `i` has `series(i)` synthetic series of `slices` slices of
/// `size` x `size` pixels.
pub fn three_sites(
    root: &Path,
    series: impl Fn(usize) -> usize,
    slices: std::ops::RangeInclusive<u32>,
    size: u16,
) -> TrainingSites {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let sites = federation(root, &["site-a", "site-b", "site-c"]);
    let program = ExtraFile {
        path_in_image: "bin/kaapana-fedavg".into(),
        host: super::fedavg_program(),
        mode: 0o755,
    };
    let (image, digest) = build_image_with(root, "fedavg", false, &[program]).unwrap();
    let mut counts = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        s.set_executor(Some(ctd.containerd().socket()));
        s.ok(&["image", "import", image.to_str().unwrap()]);
        let n = series(i);
        let data = root.join(format!("ct-{}", s.name));
        let spec = SiteSpec {
            series: n,
            slices: slices.clone(),
            rows: size,
            columns: size,
            ..SiteSpec::new(i as u64 + 7)
        };
        kaapana_dicom::write_site(&spec, &data).unwrap();
        s.ok(&["dataset", "add", "synthetic-ct", data.to_str().unwrap()]);
        counts.push(n);
    }
    TrainingSites { sites, digest: digest.to_string(), series: counts, ctd, _rt: rt }
}

/// A training's workflow file: `rounds` rounds, quorum `min_sites`, `deadline`, the train
/// job running `train` at every site with `synthetic-ct` and the aggregate `aggregate` at
/// the owner (each a JSON array of the command line).
pub fn workflow_file(
    digest: &str,
    rounds: u32,
    min_sites: u32,
    deadline: &str,
    train: &str,
    aggregate: &str,
) -> String {
    format!(
        r#"name = "fedavg"

[rounds]
rounds = {rounds}
min_sites = {min_sites}
round_deadline = "{deadline}"
late = "drop"

[[job]]
name = "train"
query = {{ dataset = "synthetic-ct", pick = "all" }}
image = "{digest}"
command = {train}
timeout = "5m"

[[job]]
name = "aggregate"
runner = "owner"
inputs = ["train"]
image = "{digest}"
command = {aggregate}
timeout = "5m"
"#
    )
}

/// The file named `name` at the top of the result bundle `digest` stored at `site`.
pub fn bundle_file(site: &Site, digest: &str, name: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let path = site.dir.join("blobs/sha256").join(hex);
    let mut archive = tar::Archive::new(std::fs::File::open(&path).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let p = entry.path().unwrap().into_owned();
        if p.file_name().is_some_and(|f| f == name) && p.components().count() <= 2 {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            return bytes;
        }
    }
    panic!("bundle {digest} has no {name}");
}

/// A workflow view's training.
pub fn training(view: &WorkflowView) -> &TrainingView {
    view.training.as_ref().expect("a training")
}

/// The round the owner has opened last (the training must still run).
pub fn current_round(owner: &Daemon, id: &str) -> u32 {
    let w = owner.workflow(id);
    assert_eq!(w.state, "running", "the training ended early: {:?}", w.reason);
    w.training.and_then(|t| t.history.last().map(|r| r.round)).unwrap_or(0)
}

/// Milliseconds since the epoch of a timestamp as the API shows it
/// (`2026-11-25T22:30:41.123Z`).
pub fn millis(rfc3339: &str) -> u64 {
    let n = |r: std::ops::Range<usize>| -> u64 { rfc3339[r].parse().unwrap() };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11..13)) * 60 + n(14..16)) * 60_000 + n(17..19) * 1000 + n(20..23)
}
