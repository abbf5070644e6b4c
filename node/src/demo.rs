//! `kaapana-node demo`: a federation of three sites on this machine runs a federated
//! statistics workflow, from certificate exchange to verified, merged results.
//!
//! Everything happens as it would between real sites, only on loopback: each site has its
//! own data directory, identity, containerd (started and supervised by its daemon) and PACS
//! (a real Orthanc with its DICOMweb plugin, started by the demo), loaded with synthetic CT
//! series written as real DICOM ([`kaapana_dicom::synthetic`]); each site registers its
//! dataset as the series its PACS holds; the sites register each other by exchanging bundles
//! and checking fingerprints; their daemons are separate processes of this binary. site-a
//! submits a workflow whose `site-stats` step runs at every site that has the dataset (site-a
//! included): the runner stages the series from its PACS by WADO-RS and the job program
//! `kaapana-stats` reads their headers and pixel data; the `aggregate` step merges the
//! per-site statistics at site-a. The demo then checks every site's and the merged
//! statistics against what it wrote.
//!
//! The work directory holds:
//!
//! ```text
//! site-a/  site-b/  site-c/        the sites' data directories (each with its containerd)
//! site-a.bundle ...                the exchange bundles
//! site-a.out, site-a.log ...       each daemon's stdout and log (stderr)
//! data/site-a/synthetic-ct/<series UID>/<n>.dcm   the DICOM files each PACS was loaded with
//! pacs/site-a/                     each site's Orthanc (config, storage, log)
//! site-a.pacs-password             the password each daemon reads to reach its PACS
//! image/kaapana-demo.oci.tar       the job image: busybox and the static kaapana-stats
//! federated-statistics.toml        the workflow file
//! results/<job>/...                the unpacked result bundles (results/aggregate/merged.json)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::admin::{self, DEFAULT_VALID_DAYS, InitOptions};
use crate::api::views::{SubmitWorkflowRequest, WorkflowView};
use crate::client::ApiClient;
use crate::data_dir::DataDir;
use crate::executor::{Containerd, ContainerdExecutor, ExecutorConfig, busybox, lifecycle};
use crate::orthanc::{Orthanc, OrthancConfig};
use crate::store::WriteOp;
use kaapana_dicom::{SiteSpec, SiteStats, SiteTruth};
use kaapana_federation::{AllowList, Execution, Policy};
use kaapana_protocol::ImageDigest;

use crate::cli::workflow::{
    WorkflowCommand, follow_workflow_until, print_workflow, workflow_command,
};
use crate::cli::{CliError, Context as _, bail};

/// The workflow's name, which every site's policy allows for the others.
const WORKFLOW: &str = "federated-statistics";
/// The dataset's name at every site.
const DATASET: &str = "synthetic-ct";
/// The seed of the synthetic data.
const SEED: u64 = 0x6b61_6170_616e_6121;
/// CT series per site for the first three sites (more sites: from the seed).
const ITEMS: [usize; 3] = [40, 25, 33];
/// Slices per series.
const SLICES: std::ops::RangeInclusive<u32> = 5..=40;
/// Rows and columns of every slice.
const IMAGE_SIZE: u16 = 64;
/// The PACS user every site's daemon reaches its own Orthanc as.
const PACS_USER: &str = "kaapana-node";
/// How long the daemons get to start, connect and exchange capability ads.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the workflow may take.
const WORKFLOW_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a daemon gets after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the job program is put in the job image.
const STATS_IN_IMAGE: &str = "bin/kaapana-stats";

/// A step of the demo, in bold.
fn step(text: &str) {
    use std::io::IsTerminal as _;
    if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        println!("\n\x1b[1m== {text}\x1b[0m");
    } else {
        println!("\n== {text}");
    }
}

/// Marks an error as having happened at a site (its log tail is shown).
trait AtSite<T> {
    /// The error, as one at `site`.
    fn at_site(self, site: impl Into<String>) -> Result<T, CliError>;
}

impl<T, E: Into<CliError>> AtSite<T> for Result<T, E> {
    fn at_site(self, site: impl Into<String>) -> Result<T, CliError> {
        self.map_err(|e| at_site(e.into(), site))
    }
}

/// `e`, as an error at `site`.
fn at_site(e: CliError, site: impl Into<String>) -> CliError {
    CliError::AtSite { site: site.into(), source: Box::new(e) }
}

/// The site an error happened at: the outermost one it names.
fn failing_site(e: &CliError) -> Option<&str> {
    match e {
        CliError::AtSite { site, .. } => Some(site),
        CliError::Context { source, .. } => failing_site(source),
        _ => None,
    }
}

/// Runs the demo with `sites` sites; in `keep` (kept) or a temporary directory (removed).
///
/// The sites' daemons are child processes of this program (`kaapana-node run`, through
/// [`std::env::current_exe`]), so only the `kaapana-node` binary can run it. `stats_program`
/// is the statically linked `kaapana-stats` for the job image (default: where
/// `scripts/demo` builds it, see [`default_stats_program`]).
pub fn run(
    sites: usize,
    keep: Option<PathBuf>,
    stats_program: Option<PathBuf>,
) -> Result<(), CliError> {
    let started = Instant::now();
    let stats_program = match stats_program {
        Some(p) => p,
        None => default_stats_program()?,
    };
    if !stats_program.is_file() {
        bail!(
            "the job program {} is missing: ./scripts/demo builds it (kn_build_job_programs in \
             scripts/common.sh), or pass --stats-program PATH",
            stats_program.display()
        );
    }
    if !Orthanc::installed() {
        bail!("{}", crate::orthanc::OrthancError::Missing);
    }
    let work = WorkDir::new(keep)?;
    let mut demo = Demo {
        root: work.path.clone(),
        sites: (0..sites).map(|i| Site::new(&work.path, i)).collect(),
        daemons: Daemons::default(),
        pacs: Vec::new(),
        stats_program,
        next_port: 20_000 + (std::process::id() % 600) as u16 * 20,
        daemons_started: None,
    };
    let result = demo.run();
    if let Err(e) = &result {
        // The tail of the failing site's log (the owner's when no site is to blame).
        let failing = failing_site(e).unwrap_or("site-a").to_owned();
        if let Some(site) = demo.sites.iter().find(|s| s.name == failing) {
            site.print_log_tail(30);
        }
    }
    // Daemons first (they use the work directory and the PACS), then the PACS, then the
    // directory.
    let stopped = demo.daemons.stop_all();
    demo.pacs.clear();
    drop(demo);
    drop(work);
    let total = started.elapsed().as_secs_f64();
    match (result, stopped) {
        (Ok(()), Ok(())) => {
            println!("\nDemo finished in {total:.1} s.");
            Ok(())
        }
        (Ok(()), Err(e)) => Err(e.context(format!("the demo failed after {total:.1} s"))),
        (Err(e), stopped) => {
            if let Err(s) = stopped {
                eprintln!("also: {s:#}");
            }
            Err(e.context(format!("the demo failed after {total:.1} s")))
        }
    }
}

/// Where `scripts/demo` builds the static `kaapana-stats`: beside this program's target
/// folder, `<target>/job-programs/x86_64-unknown-linux-gnu/job-program/kaapana-stats`.
pub fn default_stats_program() -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let target = exe.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    Ok(target.join("job-programs/x86_64-unknown-linux-gnu/job-program/kaapana-stats"))
}

/// The work directory: a new temporary one (removed on drop), or the one given with `--keep`.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn new(keep: Option<PathBuf>) -> Result<Self, CliError> {
        match keep {
            Some(dir) => {
                fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                if fs::read_dir(&dir)?.next().is_some() {
                    bail!("{} is not empty; --keep needs an empty or new folder", dir.display());
                }
                let path = std::path::absolute(&dir)?;
                Ok(Self { path, keep: true })
            }
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let path = std::env::temp_dir()
                    .join(format!("kaapana-demo.{}.{nanos:08x}", std::process::id()));
                fs::create_dir(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                Ok(Self { path, keep: false })
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            println!("Kept the work directory {}", self.path.display());
            return;
        }
        // Never recurse into a file system still mounted below it (a job's root file system
        // left behind by a killed containerd): leave it for a look instead.
        let root = self.path.to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mounts.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| p.starts_with(&root)) {
            eprintln!("{} still has mounts below it; not removed", self.path.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// One site of the demo.
struct Site {
    /// `site-a`, `site-b`, ...
    name: String,
    /// 1, 2, ... (in its items' series UIDs).
    number: usize,
    dir: DataDir,
    /// The folder of the DICOM files its PACS was loaded with.
    dataset: PathBuf,
    /// Its PACS's folder.
    pacs_dir: PathBuf,
    /// The file with its daemon's PACS password.
    password_file: PathBuf,
    /// The daemon's stdout and stderr.
    out: PathBuf,
    log: PathBuf,
}

impl Site {
    fn new(root: &Path, i: usize) -> Self {
        let name = format!("site-{}", char::from(b'a' + i as u8));
        Self {
            number: i + 1,
            dir: DataDir::new(root.join(&name)),
            dataset: root.join("data").join(&name).join(DATASET),
            pacs_dir: root.join("pacs").join(&name),
            password_file: root.join(format!("{name}.pacs-password")),
            out: root.join(format!("{name}.out")),
            log: root.join(format!("{name}.log")),
            name,
        }
    }

    fn print_log_tail(&self, lines: usize) {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        eprintln!("\n--- the last {lines} lines of {}'s log ({}):", self.name, self.log.display());
        for l in &all[all.len().saturating_sub(lines)..] {
            eprintln!("  {l}");
        }
    }
}

/// The daemons started so far; [`Daemons::stop_all`] (or drop) stops them with SIGTERM.
#[derive(Default)]
struct Daemons(Vec<(String, Child)>);

impl Daemons {
    /// SIGTERM to every daemon, then waits for each (SIGKILL after [`STOP_TIMEOUT`]).
    fn stop_all(&mut self) -> Result<(), CliError> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for (_, child) in &self.0 {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let mut failed = Vec::new();
        for (name, mut child) in self.0.drain(..) {
            let deadline = Instant::now() + STOP_TIMEOUT;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            match status {
                Some(s) if s.success() => {}
                Some(s) => failed.push(format!("{name} exited with {s}")),
                None => failed.push(format!("{name} did not stop within {STOP_TIMEOUT:?}: killed")),
            }
        }
        if failed.is_empty() { Ok(()) } else { bail!("{}", failed.join("; ")) }
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        if let Err(e) = self.stop_all() {
            eprintln!("{e:#}");
        }
    }
}

struct Demo {
    root: PathBuf,
    sites: Vec<Site>,
    daemons: Daemons,
    /// Each site's PACS, stopped when the demo ends.
    pacs: Vec<Orthanc>,
    /// The static job program that goes into the job image.
    stats_program: PathBuf,
    /// The next loopback port to try.
    next_port: u16,
    /// When the daemons were started.
    daemons_started: Option<Instant>,
}

/// The statistics as JSON, for messages.
fn json(s: &SiteStats) -> String {
    s.to_json().unwrap_or_else(|e| format!("({e})"))
}

/// The differences of two statistics, by top-level JSON field.
fn diff(want: &SiteStats, got: &SiteStats) -> Vec<String> {
    let as_map = |s: &SiteStats| -> BTreeMap<String, serde_json::Value> {
        serde_json::from_str(&json(s)).unwrap_or_default()
    };
    let (want, got) = (as_map(want), as_map(got));
    want.iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| match got.get(k) {
            Some(g) => format!("{k}: expected {v}, got {g}"),
            None => format!("{k}: expected {v}, got nothing"),
        })
        .collect()
}

fn now() -> kaapana_protocol::Timestamp {
    kaapana_protocol::Timestamp::from_system_time(std::time::SystemTime::now())
}

/// A loopback port free for TCP now, below Linux's ephemeral range (32768 and up) so that no
/// outgoing connection of another daemon takes it before its owner listens.
fn free_port(next: &mut u16) -> Result<u16, CliError> {
    for _ in 0..2000 {
        let port = *next;
        *next = if *next >= 32_000 { 20_000 } else { *next + 1 };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port on 127.0.0.1 between 20000 and 32000")
}

impl Demo {
    fn run(&mut self) -> Result<(), CliError> {
        let names: Vec<&str> = self.sites.iter().map(|s| s.name.as_str()).collect();
        println!(
            "kaapana-node demo: {} sites ({}) on this machine, each with its own identity, \
             containerd and PACS; work directory {}",
            names.len(),
            names.join(", "),
            self.root.display()
        );

        self.register()?;
        let expected = self.make_datasets()?;
        let expected: Vec<SiteStats> = expected.iter().map(SiteTruth::stats).collect();
        let tar = self.build_image()?;
        self.start_daemons()?;
        let digest = self.import_image(&tar)?;
        self.wait_for_peers(&expected)?;
        let (api, workflow) = self.submit(&digest)?;
        self.follow(&api, &workflow)?;
        self.check_results(&api, &workflow, &expected)?;

        step("graceful shutdown (SIGTERM to every daemon)");
        self.daemons.stop_all()?;
        println!("All daemons stopped.");
        Ok(())
    }

    /// Creates the sites and registers every pair both ways by certificate exchange.
    fn register(&mut self) -> Result<(), CliError> {
        step("each site creates its identity (Ed25519 key, X.509 instance certificate)");
        let mut fingerprints = Vec::new();
        for s in &self.sites {
            let port = free_port(&mut self.next_port)?;
            let opts = InitOptions {
                name: s.name.clone(),
                listen: Some(vec![format!("/ip4/127.0.0.1/tcp/{port}")]),
                advertise: Vec::new(),
                api_listen: Some("127.0.0.1:0".into()),
                valid_days: DEFAULT_VALID_DAYS,
            };
            let report =
                admin::init(&s.dir, &opts, now()).at_site(s.name.clone()).context("init")?;
            println!(
                "$ kaapana-node init --name {} --listen {} --api-listen 127.0.0.1:0\n  {}  fingerprint {}",
                s.name,
                opts.listen.as_deref().unwrap_or_default().join(" "),
                report.instance_id,
                report.fingerprint
            );
            fingerprints.push(report.fingerprint.to_string());
        }

        step(
            "each exports its bundle; a forged one is refused; every site registers every other, checking the fingerprint read out by phone",
        );
        let mut bundles = Vec::new();
        for s in &self.sites {
            let (text, _) = admin::export_bundle(&s.dir, now()).at_site(s.name.clone())?;
            let path = self.root.join(format!("{}.bundle", s.name));
            fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            bundles.push(path);
        }
        if self.sites.len() >= 3 {
            self.forged_bundle_is_refused(&bundles, &fingerprints[0])?;
        }
        let policy = Policy {
            allowed_workflows: AllowList::Only(BTreeSet::from([WORKFLOW.to_owned()])),
            allowed_datasets: AllowList::Only(BTreeSet::from([DATASET.to_owned()])),
            execution: Execution::Automatic,
            share_logs: true,
        };
        println!(
            "policy for every peer: --allow-workflow {WORKFLOW} --allow-dataset {DATASET} --auto-execute --share-logs"
        );
        for s in &self.sites {
            for (j, other) in self.sites.iter().enumerate() {
                if other.name == s.name {
                    continue;
                }
                let text = fs::read_to_string(&bundles[j])?;
                let inst = admin::add_instance(
                    &s.dir,
                    &text,
                    policy.clone(),
                    Some(&fingerprints[j]),
                    now(),
                )
                .at_site(s.name.clone())
                .with_context(|| format!("registering {}", other.name))?;
                println!(
                    "$ kaapana-node instance add {}.bundle --expect-fingerprint \"{}…\"   # at {}: registered {} ({})",
                    other.name,
                    &fingerprints[j][..14.min(fingerprints[j].len())],
                    s.name,
                    inst.name,
                    inst.instance_id
                );
            }
        }
        Ok(())
    }

    /// A forged bundle (site-a's certificate with site-b's signed name and addresses) is
    /// refused at site-c, even though the certificate has the fingerprint it expects.
    fn forged_bundle_is_refused(
        &self,
        bundles: &[PathBuf],
        fingerprint_a: &str,
    ) -> Result<(), CliError> {
        let block = |text: &str, label: &str| -> String {
            let begin = format!("-----BEGIN {label}-----");
            let end = format!("-----END {label}-----");
            match (text.find(&begin), text.find(&end)) {
                (Some(b), Some(e)) if b < e => format!("{}\n", &text[b..e + end.len()]),
                _ => String::new(),
            }
        };
        let a = fs::read_to_string(&bundles[0])?;
        let b = fs::read_to_string(&bundles[1])?;
        let forged =
            format!("{}{}", block(&a, "CERTIFICATE"), block(&b, "KAAPANA INSTANCE BUNDLE"));
        let path = self.root.join("forged.bundle");
        fs::write(&path, &forged)?;
        let policy = Policy {
            allowed_workflows: AllowList::Any,
            allowed_datasets: AllowList::Any,
            execution: Execution::Automatic,
            share_logs: true,
        };
        let c = &self.sites[2];
        println!(
            "$ kaapana-node instance add forged.bundle --expect-fingerprint \"{}…\"   # at {}: site-a's certificate, site-b's signed addresses",
            &fingerprint_a[..14.min(fingerprint_a.len())],
            c.name
        );
        match admin::add_instance(&c.dir, &forged, policy, Some(fingerprint_a), now()) {
            Ok(inst) => Err(CliError::Message(format!(
                "the forged bundle was accepted (registered {} {})",
                inst.name, inst.instance_id
            )))
            .at_site(c.name.clone()),
            Err(e) => {
                println!("  refused: {e}");
                Ok(())
            }
        }
    }

    /// Starts each site's PACS, loads it with the site's synthetic CT series and registers
    /// them as the site's dataset; returns what each site holds.
    fn make_datasets(&mut self) -> Result<Vec<SiteTruth>, CliError> {
        step(&format!(
            "each site's PACS (Orthanc + DICOMweb) is loaded with synthetic CT series written as DICOM; \
             the site registers them as its dataset `{DATASET}` (they never leave the site)"
        ));
        let mut all = Vec::new();
        for s in &self.sites {
            let mixed = (s.number as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let series = ITEMS.get(s.number - 1).copied().unwrap_or(20 + (mixed % 30) as usize);
            let spec = SiteSpec {
                seed: SEED ^ mixed,
                series,
                slices: SLICES,
                rows: IMAGE_SIZE,
                columns: IMAGE_SIZE,
            };
            let truth = kaapana_dicom::write_site(&spec, &s.dataset)
                .map_err(|e| CliError::Message(e.to_string()))
                .at_site(s.name.clone())?;
            let password = random_password()?;
            write_secret(&s.password_file, &password)?;
            let config = OrthancConfig {
                name: format!("{}-pacs", s.name),
                http_port: free_port(&mut self.next_port)?,
                dicom_port: free_port(&mut self.next_port)?,
                user: PACS_USER.into(),
                password,
            };
            let pacs = Orthanc::start(&s.pacs_dir, config)
                .map_err(|e| CliError::Message(e.to_string()))
                .at_site(s.name.clone())?;
            let loaded = pacs
                .upload_folder(&s.dataset)
                .map_err(|e| CliError::Message(e.to_string()))
                .at_site(s.name.clone())?;
            let slices = truth.stats().slices.sum;
            println!(
                "{}: Orthanc on {} holds {} CT series, {slices} slices in {loaded} DICOM files ({} bytes)",
                s.name,
                pacs.url,
                truth.series.len(),
                truth.bytes
            );
            let url = pacs.dicomweb();
            let (items, modalities) =
                register_pacs_dataset(&s.dir, &url, &s.password_file).at_site(s.name.clone())?;
            println!(
                "$ kaapana-node dataset add {DATASET} --dicomweb {url} --query Modality=CT \
                 --pacs-user {PACS_USER} --pacs-password-file {}   # {}: {items} series ({modalities})",
                file_name(&s.password_file),
                s.name,
            );
            if items != truth.series.len() as u64 {
                bail!(
                    "{}: the dataset resolved to {items} series, the PACS was loaded with {}",
                    s.name,
                    truth.series.len()
                );
            }
            self.pacs.push(pacs);
            all.push(truth);
        }
        Ok(all)
    }

    /// Builds the job image once: busybox and the static `kaapana-stats`.
    fn build_image(&self) -> Result<PathBuf, CliError> {
        step(
            "the job image: a one-layer OCI image of the static busybox and the static kaapana-stats",
        );
        let dir = self.root.join("image");
        fs::create_dir_all(&dir)?;
        let extra = [busybox::ExtraFile {
            path_in_image: STATS_IN_IMAGE.into(),
            host: self.stats_program.clone(),
            mode: 0o755,
        }];
        let (tar, digest) = busybox::build_image_with(&dir, "kaapana-demo", false, &extra)?;
        println!(
            "{} ({digest}), with /{STATS_IN_IMAGE} from {}",
            tar.strip_prefix(&self.root).unwrap_or(&tar).display(),
            self.stats_program.display()
        );
        Ok(tar)
    }

    /// Starts every daemon and waits until each says it runs.
    fn start_daemons(&mut self) -> Result<(), CliError> {
        step(
            "the daemons start (each starts its own containerd); only registered instances may connect",
        );
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        self.daemons_started = Some(Instant::now());
        for s in &self.sites {
            let out = fs::File::create(&s.out)?;
            let log = fs::File::create(&s.log)?;
            let mut cmd = Command::new(&exe);
            cmd.arg("--data-dir")
                .arg(s.dir.root())
                .arg("run")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(log);
            cmd.env("NO_COLOR", "1");
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info");
            }
            let child = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
            self.daemons.0.push((s.name.clone(), child));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for (i, s) in self.sites.iter().enumerate() {
            loop {
                let out = fs::read_to_string(&s.out).unwrap_or_default();
                if let Some(line) = out.lines().find(|l| l.contains("API on")) {
                    let api = line.split("API on ").nth(1).and_then(|r| r.split(';').next());
                    println!(
                        "$ kaapana-node run   # {} runs (pid {}), API on {}",
                        s.name,
                        self.daemons.0.get(i).map_or(0, |(_, c)| c.id()),
                        api.unwrap_or("?").trim()
                    );
                    break;
                }
                if let Some((_, child)) = self.daemons.0.get_mut(i)
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(CliError::Message(format!(
                        "the daemon exited ({status}) before it ran"
                    )))
                    .at_site(s.name.clone());
                }
                if Instant::now() > deadline {
                    return Err(CliError::Message(format!(
                        "the daemon did not say it runs within {START_TIMEOUT:?}"
                    )))
                    .at_site(s.name.clone());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Imports the job image at every site, into the containerd its daemon runs.
    fn import_image(&self, tar: &Path) -> Result<ImageDigest, CliError> {
        step("every site imports the job image (jobs name images by digest only)");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut digest = None;
        for s in &self.sites {
            let d = runtime
                .block_on(async {
                    let root = s.dir.root();
                    let containerd = Containerd::connect(lifecycle::socket_path_for(root)).await?;
                    let config = ExecutorConfig {
                        scratch_dir: root.join("executor-scratch"),
                        ..ExecutorConfig::default()
                    };
                    let executor = ContainerdExecutor::new(containerd.channel(), config).await?;
                    executor.import_image(tar).await
                })
                .at_site(s.name.clone())
                .context("image import")?;
            println!("$ kaapana-node image import image/{}   # at {}: {d}", file_name(tar), s.name);
            if digest.as_ref().is_some_and(|first| *first != d) {
                bail!("{} imported the image as {d}, another site as {digest:?}", s.name);
            }
            digest = Some(d);
        }
        digest.context("no sites")
    }

    /// Waits until site-a is connected to every peer and has its capability ad with the
    /// dataset (the workflow's query is answered from these ads).
    fn wait_for_peers(&self, expected: &[SiteStats]) -> Result<(), CliError> {
        step("site-a waits for every peer's signed capability ad");
        let owner = &self.sites[0];
        let api = ApiClient::connect(&owner.dir)
            .context("the daemon's API does not answer")
            .at_site(owner.name.clone())?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let instances = api.instances().at_site(owner.name.clone())?;
            let missing: Vec<String> = self.sites[1..]
                .iter()
                .zip(&expected[1..])
                .filter_map(|(s, stats)| {
                    let Some(v) = instances.iter().find(|v| v.name == s.name) else {
                        return Some(format!("{}: not registered", s.name));
                    };
                    let has_dataset = v.capabilities.as_ref().is_some_and(|c| {
                        c.datasets
                            .iter()
                            .any(|(n, items, _)| n == DATASET && *items == stats.series)
                    });
                    match (v.connected, has_dataset) {
                        (Some(true), true) => None,
                        (Some(true), false) => Some(format!("{}: no capability ad yet", s.name)),
                        _ => Some(format!("{}: {}", s.name, v.status)),
                    }
                })
                .collect();
            if missing.is_empty() {
                for v in &instances {
                    let Some(c) = &v.capabilities else { continue };
                    let datasets: Vec<String> = c
                        .datasets
                        .iter()
                        .map(|(n, items, bytes)| {
                            let modalities: Vec<String> = c
                                .modalities
                                .get(n)
                                .into_iter()
                                .flatten()
                                .map(|(m, k)| format!("{m} {k}"))
                                .collect();
                            format!(
                                "{n} ({items} series: {}; {bytes} bytes of pixel data)",
                                modalities.join(", ")
                            )
                        })
                        .collect();
                    println!(
                        "{:<8} connected; allows site-a workflows {}; datasets {}; {:.1} CPUs, {:.1} GiB",
                        v.name,
                        c.allowed_workflows.join(", "),
                        datasets.join(", "),
                        f64::from(c.cpu_millis) / 1000.0,
                        c.memory_bytes as f64 / f64::from(1u32 << 30),
                    );
                }
                println!(
                    "(site-a has every peer's ad, {:.1} s after the daemons were started)",
                    self.daemons_started.map_or(0.0, |t| t.elapsed().as_secs_f64())
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let culprit = missing
                    .first()
                    .and_then(|m| m.split(':').next())
                    .unwrap_or(&owner.name)
                    .to_owned();
                return Err(CliError::Message(format!(
                    "site-a did not get every peer's capability ad within {START_TIMEOUT:?}: {}",
                    missing.join("; ")
                )))
                .at_site(culprit);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes the workflow file, prints it, submits it at site-a.
    fn submit(&self, digest: &ImageDigest) -> Result<(ApiClient, WorkflowView), CliError> {
        step(
            "site-a submits the workflow: statistics at every site with the dataset, merged at site-a",
        );
        let toml = workflow_file(digest);
        let path = self.root.join(format!("{WORKFLOW}.toml"));
        fs::write(&path, &toml)?;
        println!("{}:\n", file_name(&path));
        for l in toml.lines() {
            println!("    {l}");
        }
        let owner = &self.sites[0];
        let api = ApiClient::connect(&owner.dir)
            .context("the daemon's API does not answer")
            .at_site(owner.name.clone())?;
        println!("\n$ kaapana-node workflow submit {}   # at site-a", file_name(&path));
        let w: WorkflowView = api
            .post("/v1/workflows", &SubmitWorkflowRequest { toml })
            .at_site(owner.name.clone())
            .context("workflow submit")?;
        println!("Submitted workflow {} ({}): {} jobs", w.name, w.workflow_id, w.jobs.len());
        print_workflow(&w);
        Ok((api, w))
    }

    /// Follows the workflow's jobs until it ends (`workflow wait`).
    fn follow(&self, api: &ApiClient, w: &WorkflowView) -> Result<(), CliError> {
        step("the jobs run where the data is; site-a follows their signed state changes");
        println!("$ kaapana-node workflow wait {}", w.workflow_id);
        let deadline = Instant::now() + WORKFLOW_TIMEOUT;
        let outcome = follow_workflow_until(api, &w.workflow_id, Some(deadline));
        if let Err(e) = outcome {
            // The failing site: the runner of the first failed job, else the owner.
            let now: Option<WorkflowView> =
                api.get(&format!("/v1/workflows/{}", w.workflow_id)).ok();
            if let Some(now) = &now {
                println!("\n$ kaapana-node workflow show {}", w.workflow_id);
                print_workflow(now);
            }
            // The failing site: the runner of the job that failed first (not one cancelled
            // because of it), else the owner. Its job log comes back with the result when the
            // runner shares logs, as every demo site does.
            let failed: Vec<_> = now
                .map(|v| v.jobs.into_iter().filter(|j| j.state.starts_with("failed")).collect())
                .unwrap_or_default();
            let first = failed
                .iter()
                .find(|j| {
                    let why = j.reason.as_deref().unwrap_or_default();
                    !why.contains("cancelled") && !why.starts_with("workflow ")
                })
                .or(failed.first());
            let Some(job) = first else {
                return Err(at_site(e, self.sites[0].name.clone()));
            };
            match api.get_text(&format!("/v1/jobs/{}/log", job.job_id)) {
                Ok(log) => {
                    let lines: Vec<&str> = log.lines().collect();
                    println!(
                        "\n--- the log of job {} at {} (its last 20 lines):",
                        job.name, job.runner
                    );
                    for l in &lines[lines.len().saturating_sub(20)..] {
                        println!("  {l}");
                    }
                }
                Err(le) => println!("\n(the log of job {} is not available: {le})", job.name),
            }
            return Err(at_site(e, job.runner.clone()));
        }
        Ok(())
    }

    /// Unpacks the results, prints the merged statistics and checks them (and each site's).
    fn check_results(
        &self,
        api: &ApiClient,
        w: &WorkflowView,
        expected: &[SiteStats],
    ) -> Result<(), CliError> {
        step("site-a unpacks the verified result bundles");
        let out = self.root.join("results");
        println!("$ kaapana-node workflow result {} --out results", w.workflow_id);
        workflow_command(
            &self.sites[0].dir,
            WorkflowCommand::Result { id: w.workflow_id.clone(), out: out.clone() },
        )
        .at_site(self.sites[0].name.clone())?;

        let final_view: WorkflowView = api.get(&format!("/v1/workflows/{}", w.workflow_id))?;
        let mut problems = Vec::new();
        let mut runners = BTreeSet::new();
        for j in final_view.jobs.iter().filter(|j| j.step == "site-stats") {
            let Some(i) = self.sites.iter().position(|s| s.name == j.runner) else {
                problems.push(format!("{} ran at {}, which is not a demo site", j.name, j.runner));
                continue;
            };
            runners.insert(j.runner.clone());
            let file = out.join(&j.name).join("stats.json");
            match SiteStats::read_json(&file) {
                Ok(got) => {
                    for d in diff(&expected[i], &got) {
                        problems.push(format!("{} ({}): {d}", j.name, j.runner));
                    }
                }
                Err(e) => problems.push(format!("{} ({}): {e}", j.name, j.runner)),
            }
        }
        for s in &self.sites {
            if !runners.contains(&s.name) {
                problems.push(format!("no site-stats job ran at {}", s.name));
            }
        }

        let merged_path = out.join("aggregate").join("merged.json");
        let merged = SiteStats::read_json(&merged_path)
            .map_err(|e| CliError::Message(format!("the aggregate step's result: {e}")))?;
        step("merged statistics (results/aggregate/merged.json)");
        for l in merged.summary().lines() {
            println!("    {l}");
        }
        let want = SiteStats::merge(expected);
        problems.extend(diff(&want, &merged).into_iter().map(|d| format!("merged.json: {d}")));
        if !problems.is_empty() {
            bail!("the results do not match the synthetic data:\n  {}", problems.join("\n  "));
        }
        println!(
            "\nmerged statistics match the synthetic data ({} sites, {} patients, {} series, {} slices, \
             {} voxels, mean {:.1} HU); each site's statistics match its own data",
            self.sites.len(),
            want.patients,
            want.series,
            want.slices.sum,
            want.voxels,
            want.mean_hu().unwrap_or_default()
        );
        Ok(())
    }
}

/// 24 random letters and digits.
fn random_password() -> Result<String, CliError> {
    use ring::rand::SecureRandom as _;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CliError::Message("the system's random generator failed".into()))?;
    Ok(bytes.iter().map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()])).collect())
}

/// Writes a secret to a new file only its owner can read.
fn write_secret(path: &Path, secret: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(secret.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Registers the site's PACS dataset (`dataset add --dicomweb URL --query Modality=CT` with
/// the PACS password in `password_file`) on its data directory; its series count and
/// modalities.
fn register_pacs_dataset(
    dir: &DataDir,
    url: &str,
    password_file: &Path,
) -> Result<(u64, String), CliError> {
    let selection = crate::datasets::DicomWebSelection {
        url: url.to_owned(),
        series: Vec::new(),
        studies: Vec::new(),
        query: Some("Modality=CT".into()),
        user: Some(PACS_USER.into()),
        password_file: Some(password_file.to_owned()),
        token_file: None,
    };
    let store = admin::NodeFiles::open(dir)?.store()?;
    let existing = store.datasets()?;
    let (record, _, scan) =
        crate::datasets::check_new_dicomweb(DATASET, &selection, &existing, now())?;
    store.write(vec![WriteOp::PutDataset(record)])?;
    let modalities: Vec<String> =
        scan.modalities.iter().map(|m| format!("{} {}", m.modality, m.items)).collect();
    Ok((scan.items.len() as u64, modalities.join(", ")))
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The workflow file.
fn workflow_file(digest: &ImageDigest) -> String {
    format!(
        r#"# Federated statistics of the CT series at every site (slices per series, patients by sex
# and age, a Hounsfield-unit histogram of every voxel), merged at the owner.
name = "{WORKFLOW}"

[[job]]
name = "site-stats"
# every instance whose capability ad has the dataset, this one included: one job each, over
# all of its series (staged from its PACS to /input/<SeriesInstanceUID>/*.dcm)
query = {{ dataset = "{DATASET}", pick = "all" }}
processing = "batch"
image = "{digest}"
# reads every DICOM file's header and pixel data; writes /output/stats.json
command = ["/{STATS_IN_IMAGE}", "site", "--input", "/input", "--output", "/output"]
timeout = "2m"
memory = "128MiB"

[[job]]
name = "aggregate"
runner = "owner"
# reads each site-stats job's result at /input/<job name>/stats.json
inputs = ["site-stats"]
image = "{digest}"
command = ["/{STATS_IN_IMAGE}", "merge", "--input", "/input", "--output", "/output"]
timeout = "2m"
memory = "64MiB"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workflow_file_parses() {
        let digest = ImageDigest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let text = workflow_file(&digest);
        crate::workflow_file::WorkflowFile::parse(&text).unwrap();
    }

    #[test]
    fn differences_are_named_by_field() {
        let a = SiteStats { series: 3, ..SiteStats::empty() };
        let b = SiteStats { series: 4, ..SiteStats::empty() };
        assert!(diff(&a, &a).is_empty());
        let d = diff(&a, &b);
        assert_eq!(d, vec!["series: expected 3, got 4".to_owned()]);
    }
}
