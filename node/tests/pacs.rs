//! The site's PACS over DICOMweb, against a real Orthanc (Debian's `orthanc` and
//! `orthanc-dicomweb`) loaded with the real DICOM files of the `pydicom` wheel: QIDO-RS
//! queries, `dataset add --dicomweb` through real daemons, and jobs on a real containerd that
//! read series staged from the PACS by WADO-RS.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::containerd::TestContainerd;
use common::orthanc::{self, Orthanc, PASSWORD, USER, pydicom_files};
use common::{Daemon, Site};
use kaapana_node::api::WorkflowView;
use kaapana_node::orthanc::OrthancConfig;
use kaapana_node::pacs::{DicomWeb, PacsAuth, PacsError, SeriesQuery};

const T: Duration = Duration::from_secs(120);

fn auth() -> PacsAuth {
    PacsAuth::Basic { user: USER.into(), password: PASSWORD.into() }
}

/// Every series Orthanc holds, by its own REST API (not DICOMweb): UID → (study UID, modality,
/// instances); and the UIDs Orthanc holds more than once (pydicom ships an RT dose series with
/// the same study and series UIDs under two patient ids), which are left out.
/// Series UID → (study UID, modality, instances).
type SeriesTable = BTreeMap<String, (String, String, usize)>;

fn orthanc_series(o: &Orthanc) -> (SeriesTable, BTreeSet<String>) {
    let all: serde_json::Value = serde_json::from_str(&o.get("/series?expand").unwrap()).unwrap();
    let mut out = BTreeMap::new();
    let mut twice = BTreeSet::new();
    for s in all.as_array().unwrap() {
        let uid = s["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap();
        if all
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["MainDicomTags"]["SeriesInstanceUID"] == uid)
            .count()
            > 1
        {
            twice.insert(uid.to_owned());
            continue;
        }
        let tags = &s["MainDicomTags"];
        let study: serde_json::Value = serde_json::from_str(
            &o.get(&format!("/studies/{}", s["ParentStudy"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        out.insert(
            tags["SeriesInstanceUID"].as_str().unwrap().to_owned(),
            (
                study["MainDicomTags"]["StudyInstanceUID"].as_str().unwrap().to_owned(),
                tags["Modality"].as_str().unwrap_or_default().to_owned(),
                s["Instances"].as_array().unwrap().len(),
            ),
        );
    }
    (out, twice)
}

#[test]
fn pydicom_files_load_into_orthanc_and_qido_finds_them_by_series_study_and_modality() {
    let tmp = common::test_dir();
    let orthanc = orthanc::start(&tmp.path().join("pacs"));
    let files = pydicom_files();
    let taken = orthanc::upload_all(&orthanc, &files);
    assert!(taken >= 50, "Orthanc took only {taken} of {} pydicom files", files.len());
    let (truth, twice) = orthanc_series(&orthanc);
    assert!(truth.len() >= 5, "{} series", truth.len());
    eprintln!("{} pydicom files, {taken} taken by Orthanc, {} series", files.len(), truth.len());

    let pacs = DicomWeb::new(&orthanc.dicomweb(), auth());

    // Every series, one at a time by UID, with its study, modality and instance count.
    let uids: Vec<String> = truth.keys().cloned().collect();
    let listed = pacs.series(&SeriesQuery::Series(uids.clone())).unwrap();
    assert_eq!(listed.iter().map(|s| s.series_uid.clone()).collect::<Vec<_>>(), uids);
    for s in &listed {
        let (study, modality, instances) = &truth[&s.series_uid];
        assert_eq!(&s.study_uid, study);
        assert_eq!(s.modality.as_deref().unwrap_or_default(), modality);
        assert_eq!(s.instances, *instances as u64, "series {}", s.series_uid);
    }

    // A series UID the PACS lists twice cannot be retrieved: it is refused, saying why.
    for uid in &twice {
        match pacs.series(&SeriesQuery::Series(vec![uid.clone()])) {
            Err(e @ PacsError::Ambiguous { .. }) => {
                assert!(e.to_string().contains("more than once"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    // By modality: exactly the series of that modality (but for the ones listed twice).
    let modalities: BTreeSet<&String> =
        truth.values().map(|(_, m, _)| m).filter(|m| !m.is_empty()).collect();
    assert!(modalities.len() >= 2, "{modalities:?}");
    for m in modalities {
        let q = SeriesQuery::parse_match(&format!("Modality={m}")).unwrap();
        let found: BTreeSet<String> =
            pacs.series(&q).unwrap().into_iter().map(|s| s.series_uid).collect();
        let expected: BTreeSet<String> =
            truth.iter().filter(|(_, (_, mm, _))| mm == m).map(|(k, _)| k.clone()).collect();
        assert_eq!(found, expected, "modality {m}");
    }

    // By study: every series of the study, none of another.
    let (study, _, _) = truth.values().next().unwrap().clone();
    let found: BTreeSet<String> = pacs
        .series(&SeriesQuery::Studies(vec![study.clone()]))
        .unwrap()
        .into_iter()
        .map(|s| s.series_uid)
        .collect();
    let expected: BTreeSet<String> =
        truth.iter().filter(|(_, (st, _, _))| *st == study).map(|(k, _)| k.clone()).collect();
    assert_eq!(found, expected);

    // A UID the PACS does not hold: nothing.
    assert!(pacs.series(&SeriesQuery::Series(vec!["1.2.3.4.5.6.7".into()])).unwrap().is_empty());
}

#[test]
fn wrong_credentials_and_a_pacs_that_is_down_fail_with_what_to_check() {
    let tmp = common::test_dir();
    let orthanc = orthanc::start(&tmp.path().join("pacs"));
    let all = SeriesQuery::parse_match("Modality=CT").unwrap();

    let wrong = PacsAuth::Basic { user: USER.into(), password: "not-the-password".into() };
    match DicomWeb::new(&orthanc.dicomweb(), wrong).series(&all) {
        Err(e @ PacsError::Unauthorized { status: 401, .. }) => {
            assert!(e.to_string().contains("refused the credentials"), "{e}");
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    let pacs = DicomWeb::new(&orthanc.dicomweb(), auth());
    assert!(pacs.series(&all).unwrap().is_empty(), "an empty PACS holds no CT series");

    let url = orthanc.dicomweb();
    drop(orthanc);
    match DicomWeb::new(&url, auth()).series(&all) {
        Err(e @ PacsError::Unreachable { .. }) => {
            assert!(e.to_string().contains("cannot be reached"), "{e}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

// ----- datasets of the PACS, through daemons and jobs -----

/// An Orthanc that can be stopped and started again on the same folder and ports.
struct Pacs {
    dir: PathBuf,
    config: OrthancConfig,
    orthanc: Option<Orthanc>,
}

/// What Orthanc stored of one series: its study, modality and the SHA-256 of each original
/// file (as it was uploaded).
#[derive(Debug, Clone)]
struct SeriesTruth {
    study: String,
    modality: String,
    hashes: Vec<String>,
    /// The original files' bytes.
    bytes: u64,
}

impl Pacs {
    fn start(root: &Path) -> Self {
        let config = OrthancConfig {
            name: "kaapana-test-pacs".into(),
            http_port: common::free_port(),
            dicom_port: common::free_port(),
            user: USER.into(),
            password: PASSWORD.into(),
        };
        let mut pacs = Self { dir: root.join("pacs"), config, orthanc: None };
        pacs.up();
        pacs
    }

    fn up(&mut self) {
        let o = Orthanc::start(&self.dir, self.config.clone()).unwrap_or_else(|e| panic!("{e}"));
        self.orthanc = Some(o);
    }

    fn down(&mut self) {
        drop(self.orthanc.take());
    }

    fn o(&self) -> &Orthanc {
        self.orthanc.as_ref().unwrap()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/dicom-web", self.config.http_port)
    }

    /// Uploads every pydicom file; what Orthanc stored, by series UID (but for the series
    /// UIDs it holds more than once, which come second).
    fn load_pydicom(&self) -> (BTreeMap<String, SeriesTruth>, BTreeSet<String>) {
        let mut by_orthanc_id: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
        for f in pydicom_files() {
            let bytes = std::fs::read(&f).unwrap();
            let (status, body) = self.o().post_instance(&bytes).unwrap();
            if status != 200 {
                continue;
            }
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
            // A file whose instance Orthanc already holds (pydicom ships a few twice) is not
            // stored again.
            if answer["Status"] != "Success" {
                continue;
            }
            let series = answer["ParentSeries"].as_str().unwrap().to_owned();
            let entry = by_orthanc_id.entry(series).or_default();
            entry.0.push(kaapana_protocol::Sha256Digest::of(&bytes).hex());
            entry.1 += bytes.len() as u64;
        }
        let mut out = BTreeMap::new();
        let mut twice = BTreeSet::new();
        for (id, (mut hashes, bytes)) in by_orthanc_id {
            let s: serde_json::Value =
                serde_json::from_str(&self.o().get(&format!("/series/{id}")).unwrap()).unwrap();
            let study: serde_json::Value = serde_json::from_str(
                &self.o().get(&format!("/studies/{}", s["ParentStudy"].as_str().unwrap())).unwrap(),
            )
            .unwrap();
            hashes.sort();
            let uid = s["MainDicomTags"]["SeriesInstanceUID"].as_str().unwrap().to_owned();
            if out.contains_key(&uid) {
                // The same series UID under two patients (pydicom ships one such RT dose
                // series): WADO-RS cannot retrieve it, and registering it is refused.
                twice.insert(uid);
                continue;
            }
            out.insert(
                uid,
                SeriesTruth {
                    study: study["MainDicomTags"]["StudyInstanceUID"].as_str().unwrap().to_owned(),
                    modality: s["MainDicomTags"]["Modality"].as_str().unwrap_or("").to_owned(),
                    hashes,
                    bytes,
                },
            );
        }
        for uid in &twice {
            out.remove(uid);
        }
        (out, twice)
    }

    /// Deletes a series with Orthanc's REST API.
    fn delete_series(&self, uid: &str) {
        let all: serde_json::Value =
            serde_json::from_str(&self.o().get("/series?expand").unwrap()).unwrap();
        let id = all
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["MainDicomTags"]["SeriesInstanceUID"] == uid)
            .map(|s| s["ID"].as_str().unwrap().to_owned())
            .unwrap();
        self.o().delete(&format!("/series/{id}")).unwrap();
    }
}

/// A file holding `secret`, mode 0600.
fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `kaapana-node dataset add NAME --dicomweb URL ARGS --pacs-user .. --pacs-password-file ..`.
fn add_args<'a>(name: &'a str, url: &'a str, pw: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["dataset", "add", name, "--dicomweb", url];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--pacs-user", USER, "--pacs-password-file", pw.to_str().unwrap()]);
    v
}

#[test]
fn dicomweb_datasets_are_added_by_series_study_and_query_and_advertised_without_the_pacs() {
    let tmp = common::test_dir();
    let mut pacs = Pacs::start(tmp.path());
    let (truth, twice) = pacs.load_pydicom();
    let url = pacs.url();
    let pw = secret_file(tmp.path(), "pacs-password", PASSWORD);
    let sites = common::federation(tmp.path(), &["site-a", "site-b"]);
    let (a, b) = (&sites[0], &sites[1]);
    let uids: Vec<&String> = truth.keys().collect();

    // Without a daemon, on the data directory: two series by UID.
    let out = b.ok(&add_args("two", &url, &pw, &["--series", uids[0], uids[1]]));
    assert!(out.contains("Dataset two registered: 2 items"), "{out}");

    let da = a.start();
    let mut db = b.start();
    // Through the daemon: every series of a study, and a query by modality.
    let (study, _) = truth
        .values()
        .map(|t| (t.study.clone(), truth.values().filter(|u| u.study == t.study).count()))
        .max_by_key(|(_, n)| *n)
        .unwrap();
    let in_study = truth.values().filter(|t| t.study == study).count();
    let out = b.ok(&add_args("study", &url, &pw, &["--study", &study]));
    assert!(out.contains(&format!("{in_study} items")), "{out}");
    let ct = truth.values().filter(|t| t.modality == "CT").count();
    assert!(ct >= 2, "{truth:#?}");
    let out = b.ok(&add_args("ct", &url, &pw, &["--query", "Modality=CT"]));
    assert!(out.contains(&format!("{ct} items")), "{out}");
    assert!(out.contains(&format!("Modalities: CT {ct}")), "{out}");
    // The size is the pixel data QIDO-RS describes: more than nothing for CT.
    let bytes: u64 =
        out.split(" items, ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(bytes > 0, "{out}");

    let list = b.ok(&["dataset", "list"]);
    let line = list.lines().find(|l| l.starts_with("ct ")).unwrap();
    assert!(line.contains("dicomweb") && line.contains(&url), "{line}");
    assert!(line.contains(&format!("{ct} items")) && line.contains(&format!("modalities CT {ct}")));
    assert!(line.contains("query Modality=CT"), "{line}");

    // An empty selection and refused credentials fail, saying what was asked and what to check.
    let err = b.fails(&add_args("none", &url, &pw, &["--query", "Modality=XA"]));
    assert!(err.contains("holds no series for query Modality=XA") && err.contains(&url), "{err}");
    let wrong = secret_file(tmp.path(), "wrong-password", "not-the-password");
    let err = b.fails(&add_args("wrong", &url, &wrong, &["--query", "Modality=CT"]));
    assert!(err.contains("refused the credentials (HTTP 401)"), "{err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = b.fails(&add_args("open", &url, &pw, &["--query", "Modality=CT"]));
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    for uid in &twice {
        let err = b.fails(&add_args("twice", &url, &pw, &["--series", uid]));
        assert!(err.contains(&format!("lists series {uid} more than once")), "{err}");
    }
    assert!(!b.ok(&["dataset", "list"]).contains("wrong"));

    // The owner sees names, counts and modalities, never a UID.
    let shows_ct = |d: &Daemon| {
        d.instance("site-b").and_then(|i| i.capabilities).is_some_and(|c| {
            c.modalities.get("ct").is_some_and(|m| m == &vec![("CT".to_owned(), ct as u64)])
        })
    };
    da.wait_until("site-b's ad with the ct dataset", T, shows_ct);
    let shown = a.ok(&["instance", "list"]);
    assert!(shown.contains(&format!("ct ({ct} items: CT {ct})")), "{shown}");
    let ad = serde_json::to_string(&da.instance("site-b").unwrap().capabilities).unwrap();
    for uid in truth.keys().chain(truth.values().map(|t| &t.study)) {
        assert!(!ad.contains(uid.as_str()), "{uid} in {ad}");
    }

    // The PACS goes away: the runner restarts and advertises the same from its store.
    pacs.down();
    let before = da.instance("site-b").unwrap().capabilities.unwrap().sequence;
    assert!(db.stop());
    db = b.start();
    da.wait_until("a new ad from the restarted runner", T, |d| {
        d.instance("site-b")
            .and_then(|i| i.capabilities)
            .is_some_and(|c| c.sequence > before && c.datasets.len() == 3)
    });
    assert!(shows_ct(&da));
    let list = b.ok(&["dataset", "list"]);
    assert!(list.contains(&format!("modalities CT {ct}")), "{list}");
    assert!(da.stop() && db.stop());
}

/// site-a (owner) and site-b (runner on a real containerd, with the busybox job image) that
/// registered each other, and a PACS loaded with the pydicom files.
struct Fed {
    tmp: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    ctd: TestContainerd,
    pacs: Pacs,
    truth: BTreeMap<String, SeriesTruth>,
    a: Site,
    b: Site,
    image: String,
    password: PathBuf,
}

impl Fed {
    fn new() -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctd = rt.block_on(TestContainerd::start());
        let tmp = common::test_dir();
        let pacs = Pacs::start(tmp.path());
        let (truth, _) = pacs.load_pydicom();
        let mut sites = common::federation(tmp.path(), &["site-a", "site-b"]);
        let (a, b) = (sites.remove(0), sites.remove(0));
        b.set_executor(Some(ctd.containerd().socket()));
        let tar = common::containerd::build_busybox_image(tmp.path(), "busybox", false);
        b.ok(&["image", "import", tar.tar.to_str().unwrap()]);
        let password = secret_file(tmp.path(), "pacs-password", PASSWORD);
        Self { rt, ctd, pacs, truth, a, b, image: tar.digest.to_string(), password, tmp }
    }

    /// Bounds the runner's PACS cache (`[datasets] pacs_cache_bytes`; before it starts).
    fn set_cache_bound(&self, bytes: u64) {
        let path = self.b.dir.join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let line = text.lines().find(|l| l.starts_with("pacs_cache_bytes")).unwrap();
        let text = text.replace(line, &format!("pacs_cache_bytes = {bytes}"));
        std::fs::write(&path, text).unwrap();
    }

    fn add(&self, name: &str, args: &[&str]) -> String {
        let url = self.pacs.url();
        self.b.ok(&add_args(name, &url, &self.password, args))
    }

    fn start(&self) -> (Daemon, Daemon) {
        let (da, db) = (self.a.start(), self.b.start());
        da.wait_for_capabilities("site-b", T);
        (da, db)
    }

    /// Submits a one-step workflow at `da` reading `dataset` at site-b; with
    /// `single_file`, one job per item. Every job hashes its input into `/output`.
    fn submit(&self, da: &Daemon, dataset: &str, single_file: bool, retries: u32) -> WorkflowView {
        let target = if single_file {
            format!(
                "query = {{ dataset = \"{dataset}\", pick = \"all\" }}\nprocessing = \"single-file\"\nmax_parallel = 2"
            )
        } else {
            format!("runner = \"site-b\"\ndataset = \"{dataset}\"")
        };
        da.submit_workflow(&format!(
            r#"
name = "pacs-hashes"
[[job]]
name = "hash"
{target}
retries = {retries}
image = "{}"
command = ["sh", "-c", "cd /input && ls > /output/series.txt && sha256sum */* > /output/hashes.txt"]
timeout = "5m"
"#,
            self.image
        ))
    }

    /// Waits until workflow `id` is `state` (panics if it ends otherwise).
    fn wait(&self, da: &Daemon, id: &str, state: &str) -> WorkflowView {
        da.wait_until(&format!("workflow {id} {state}"), T, |d| {
            let w = d.workflow(id);
            assert!(w.state == "running" || w.state == state, "{w:#?}");
            w.state == state
        });
        da.workflow(id)
    }

    /// The result of workflow `id`, unpacked: per job, series UID → sorted file hashes.
    fn hashes(&self, id: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
        let out = self.tmp.path().join(format!("result-{id}"));
        self.a.ok(&["workflow", "result", id, "--out", out.to_str().unwrap()]);
        let mut jobs = BTreeMap::new();
        for job in std::fs::read_dir(&out).unwrap() {
            let job = job.unwrap().path();
            let mut per_series: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for s in std::fs::read_to_string(job.join("series.txt")).unwrap().lines() {
                per_series.insert(s.to_owned(), Vec::new());
            }
            for line in std::fs::read_to_string(job.join("hashes.txt")).unwrap().lines() {
                let (hash, path) = line.split_once("  ").unwrap();
                let series = path.split('/').next().unwrap();
                per_series.get_mut(series).unwrap().push(hash.to_owned());
            }
            per_series.values_mut().for_each(|v| v.sort());
            jobs.insert(job.file_name().unwrap().to_string_lossy().into_owned(), per_series);
        }
        jobs
    }

    /// The runner's log of job `id`.
    fn job_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.b.dir.join("jobs").join(id).join("job.log")).unwrap()
    }

    fn expected(&self, series: &[&String]) -> BTreeMap<String, Vec<String>> {
        series.iter().map(|s| ((*s).clone(), self.truth[*s].hashes.clone())).collect()
    }

    /// Bytes under the runner's PACS cache, and the series it holds.
    fn cache(&self) -> (u64, BTreeSet<String>) {
        let root = self.b.dir.join("pacs-cache");
        let (mut bytes, mut series) = (0, BTreeSet::new());
        for e in std::fs::read_dir(&root).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                if !f.file_name().to_string_lossy().starts_with('.') {
                    bytes += f.metadata().unwrap().len();
                }
            }
            series.insert(name);
        }
        (bytes, series)
    }

    fn wait_clean(&self, da: &Daemon) {
        da.wait_until("containerd to be clean", T, |_| {
            let inv = self.rt.block_on(self.ctd.inventory());
            inv.containers.is_empty() && inv.tasks.is_empty() && inv.active_snapshots().is_empty()
        });
        self.rt.block_on(self.ctd.assert_clean());
    }
}

#[test]
fn pydicom_series_reach_a_batch_job_byte_identical_through_a_bounded_cache() {
    let s = Fed::new();
    // Room for about half of the data: staging everything must evict.
    let total: u64 = s.truth.values().map(|t| t.bytes).sum();
    s.set_cache_bound(total / 2);
    let all: Vec<&String> = s.truth.keys().collect();
    let series_args: Vec<&str> = all.iter().map(|u| u.as_str()).collect();
    let mut args = vec!["--series"];
    args.extend_from_slice(&series_args);
    let out = s.add("pydicom", &args);
    assert!(out.contains(&format!("{} items", all.len())), "{out}");
    // The smallest series on its own, for the cache.
    let small = s.truth.iter().min_by_key(|(_, t)| t.hashes.len()).map(|(k, _)| k).unwrap();
    s.add("one", &["--series", small]);
    let (da, db) = s.start();

    // One series twice: from the PACS, then from the cache, byte-identical both times.
    let first = s.submit(&da, "one", false, 0);
    let first = s.wait(&da, &first.workflow_id, "finished");
    let log = s.job_log(&first.jobs[0].job_id);
    let n = s.truth[small].hashes.len();
    assert!(log.contains(&format!("staged 1/1 series: {n} instances")), "{log}");
    assert!(!log.contains(small.as_str()), "the log (shared with the owner) names no UID: {log}");
    assert!(log.contains("(from PACS"), "{log}");
    assert!(log.contains("staged dataset one: 1 series"), "{log}");
    assert!(!s.b.dir.join("jobs").join(&first.jobs[0].job_id).join("input").exists());
    let second = s.submit(&da, "one", false, 0);
    let second = s.wait(&da, &second.workflow_id, "finished");
    let log = s.job_log(&second.jobs[0].job_id);
    assert!(log.contains(&format!("staged 1/1 series: {n} instances")), "{log}");
    assert!(!log.contains(small.as_str()), "the log (shared with the owner) names no UID: {log}");
    assert!(log.contains("(from cache"), "{log}");
    for w in [&first, &second] {
        assert_eq!(s.hashes(&w.workflow_id)["hash"], s.expected(&[small]));
    }

    // Every series in one batch job: the job sees /input/<series UID>/*.dcm, each file as it
    // was uploaded to the PACS; the cache stays within its bound.
    let w = s.submit(&da, "pydicom", false, 0);
    let w = s.wait(&da, &w.workflow_id, "finished");
    let got = s.hashes(&w.workflow_id);
    assert_eq!(got["hash"], s.expected(&all));
    let log = s.job_log(&w.jobs[0].job_id);
    assert!(log.contains(&format!("staged {0}/{0} series", all.len())), "{log}");
    let (bytes, held) = s.cache();
    assert!(bytes <= total / 2, "the cache holds {bytes} bytes, bound {}", total / 2);
    assert!(held.len() < all.len(), "nothing was evicted: {held:?}");
    eprintln!(
        "{} series, {total} bytes; the cache holds {} series, {bytes} bytes",
        all.len(),
        held.len()
    );
    assert!(da.stop() && db.stop());
    s.wait_clean(&s.a.start());
}

#[test]
fn single_file_jobs_each_see_only_their_series() {
    let s = Fed::new();
    let ct: Vec<&String> =
        s.truth.iter().filter(|(_, t)| t.modality == "CT").map(|(k, _)| k).collect();
    s.add("ct", &["--query", "Modality=CT"]);
    let (da, _db) = s.start();
    let w = s.submit(&da, "ct", true, 0);
    assert_eq!(w.jobs.len(), ct.len(), "{w:#?}");
    let w = s.wait(&da, &w.workflow_id, "finished");
    let got = s.hashes(&w.workflow_id);
    assert_eq!(got.len(), ct.len());
    let mut seen = BTreeMap::new();
    for (job, per_series) in got {
        assert_eq!(per_series.len(), 1, "job {job} saw {per_series:?}");
        seen.extend(per_series);
    }
    assert_eq!(seen, s.expected(&ct));
    for j in &w.jobs {
        let log = s.job_log(&j.job_id);
        assert!(log.contains("staged 1/1 series"), "{log}");
    }
    // A batch job over the same dataset sees every series (from the cache now).
    let w = s.submit(&da, "ct", false, 0);
    let w = s.wait(&da, &w.workflow_id, "finished");
    assert_eq!(s.hashes(&w.workflow_id)["hash"], s.expected(&ct));
    let log = s.job_log(&w.jobs[0].job_id);
    assert!(log.contains(&format!("0 from PACS, {} from cache", ct.len())), "{log}");
    s.wait_clean(&da);
}

#[test]
fn staging_fails_with_what_to_fix_when_credentials_series_or_the_pacs_are_gone() {
    let mut s = Fed::new();
    let mut by_size: Vec<&String> = s.truth.keys().collect();
    by_size.sort_by_key(|k| s.truth[*k].hashes.len());
    let (keep, gone) = (by_size[0].clone(), by_size[1].clone());
    s.add("pair", &["--series", &keep, &gone]);
    let (da, _db) = s.start();

    // The password file changed after registration: the PACS refuses, and the reason says so.
    std::fs::write(&s.password, "changed\n").unwrap();
    let w = s.submit(&da, "pair", false, 0);
    let w = s.wait(&da, &w.workflow_id, "failed");
    // The owner (another instance) learns what happened and who can fix it, but no
    // identifier of the runner's PACS: no UID, no URL, no file; the runner's own event log
    // has them.
    let reason = w.jobs[0].reason.clone().unwrap();
    assert!(reason.contains("dataset pair"), "{reason}");
    assert!(reason.contains("refused the node's credentials (HTTP 401)"), "{reason}");
    let (password_file, url) = (s.password.to_str().unwrap().to_owned(), s.pacs.url());
    let private = |reason: &str| {
        assert!(!reason.contains(&password_file), "{reason}");
        assert!(!reason.contains(&url), "{reason}");
        assert!(!reason.contains(&keep) && !reason.contains(&gone), "{reason}");
    };
    private(&reason);
    let detail = |db: &Daemon, what: &str| -> String {
        let events = db.events(0, Duration::ZERO);
        events
            .iter()
            .rev()
            .find(|e| e.kind == "staging_failed" && e.detail.contains(what))
            .map(|e| e.detail.clone())
            .unwrap_or_else(|| panic!("no staging_failed event with {what:?}: {events:#?}"))
    };
    let d = detail(&_db, "refused the credentials (HTTP 401)");
    assert!(d.contains(s.password.to_str().unwrap()), "{d}");
    std::fs::write(&s.password, format!("{PASSWORD}\n")).unwrap();

    // A series deleted from the PACS after registration.
    s.pacs.delete_series(&gone);
    let w = s.submit(&da, "pair", false, 0);
    let w = s.wait(&da, &w.workflow_id, "failed");
    let reason = w.jobs[0].reason.clone().unwrap();
    assert!(reason.contains("series is no longer in the site's PACS"), "{reason}");
    assert!(reason.contains("dataset pair"), "{reason}");
    private(&reason);
    detail(&_db, &format!("series {gone} is no longer in the PACS"));
    // What was staged before is gone with the failure; the log says what happened.
    assert!(!s.b.dir.join("jobs").join(&w.jobs[0].job_id).join("input").exists());
    let log = s.job_log(&w.jobs[0].job_id);
    assert!(
        log.contains("staging failed") && log.contains("no longer in the site's PACS"),
        "{log}"
    );
    private(&log);
    s.add("kept", &["--series", &keep]);

    // The PACS is down: the job fails saying which PACS cannot be reached; the failure is
    // retryable, and the workflow's retries are spent at once (they follow each other without
    // a pause).
    s.pacs.down();
    let w = s.submit(&da, "kept", false, 2);
    let w = s.wait(&da, &w.workflow_id, "failed");
    let reason = w.jobs[0].reason.clone().unwrap();
    assert!(reason.contains("the site's PACS cannot be reached"), "{reason}");
    private(&reason);
    let d = detail(&_db, "cannot be reached");
    assert!(d.contains(&s.pacs.url()), "{d}");
    assert_eq!(w.jobs[0].attempt, 2, "a retryable failure is tried again: {w:#?}");
    // Orthanc again, same folder and ports: a new job runs.
    s.pacs.up();
    let w = s.submit(&da, "kept", false, 0);
    let w = s.wait(&da, &w.workflow_id, "finished");
    assert_eq!(s.hashes(&w.workflow_id)["hash"], s.expected(&[&keep]));
    s.wait_clean(&da);
}
