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
//! Then the sites train a model together: site-a submits a training (a workflow with rounds,
//! see [`crate::workflow_file`]) of `--training-rounds` rounds (default 10). In each round
//! every site runs the job program `kaapana-fedavg train` on its own series (a logistic
//! regression, from the round before's model) and site-a averages their updates
//! (`kaapana-fedavg aggregate`, FedAvg). The demo prints each round as it completes, with the
//! training loss the round's aggregate reports (read from its result bundle through site-a's
//! API), a table and a plot of the loss per round, and checks that the training ran every
//! round and that its loss went down.
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
//! image/kaapana-demo.oci.tar       the job image: busybox, the static kaapana-stats and
//!                                  kaapana-fedavg
//! federated-statistics.toml        the workflow file
//! results/<job>/...                the unpacked result bundles (results/aggregate/merged.json)
//! fedavg.toml                      the training's workflow file
//! fedavg-loss.svg                  the plot of the training's loss per round
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
/// The training's name, which every site's policy allows too.
const TRAINING: &str = "fedavg";
/// The training's quorum: a round aggregates once this many sites delivered.
const TRAINING_MIN_SITES: u32 = 2;
/// Epochs of gradient descent each site runs per round.
const TRAINING_EPOCHS: u32 = 10;
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
/// Where the training's job program is put in the job image.
const FEDAVG_IN_IMAGE: &str = "bin/kaapana-fedavg";
/// The plot of the training's loss, in the work directory.
const LOSS_PLOT: &str = "fedavg-loss.svg";

/// How long a training of `rounds` rounds may take.
fn training_timeout(rounds: u32) -> Duration {
    Duration::from_secs(60 + 30 * u64::from(rounds))
}

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

/// The statically linked job programs that go into the job image; `None`: the default.
#[derive(Debug, Clone, Default)]
pub struct JobPrograms {
    /// `kaapana-stats` (default: where `scripts/demo` builds it, see
    /// [`default_stats_program`]).
    pub stats: Option<PathBuf>,
    /// `kaapana-fedavg` (default: `kaapana-fedavg` in the folder of `kaapana-stats`).
    pub fedavg: Option<PathBuf>,
}

/// Runs the demo with `sites` sites; in `keep` (kept) or a temporary directory (removed);
/// the training has `training_rounds` rounds (0: no training).
///
/// The sites' daemons are child processes of this program (`kaapana-node run`, through
/// [`std::env::current_exe`]), so only the `kaapana-node` binary can run it. `programs` are
/// the statically linked job programs for the job image (`kaapana-fedavg` is needed only for
/// a training).
pub fn run(
    sites: usize,
    keep: Option<PathBuf>,
    programs: JobPrograms,
    training_rounds: u32,
) -> Result<(), CliError> {
    let started = Instant::now();
    let stats_program = match programs.stats {
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
    let fedavg_program = if training_rounds == 0 {
        None
    } else {
        let p = programs.fedavg.unwrap_or_else(|| stats_program.with_file_name("kaapana-fedavg"));
        if !p.is_file() {
            bail!(
                "the job program {} is missing: ./scripts/demo builds it next to kaapana-stats \
                 (kn_build_job_programs in scripts/common.sh), or pass --fedavg-program PATH \
                 (or --training-rounds 0 to skip the training)",
                p.display()
            );
        }
        Some(p)
    };
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
        fedavg_program,
        training_rounds,
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
    /// The static training job program that goes into it too (`None`: no training).
    fedavg_program: Option<PathBuf>,
    /// The training's rounds (0: no training).
    training_rounds: u32,
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
        if self.training_rounds > 0 {
            let training = self.submit_training(&api, &digest)?;
            let rounds = self.follow_training(&api, &training)?;
            self.report_training(&rounds)?;
        }

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
        let mut workflows = vec![WORKFLOW];
        if self.training_rounds > 0 {
            workflows.push(TRAINING);
        }
        let policy = Policy {
            allowed_workflows: AllowList::Only(workflows.iter().map(|w| (*w).to_owned()).collect()),
            allowed_datasets: AllowList::Only(BTreeSet::from([DATASET.to_owned()])),
            execution: Execution::Automatic,
            share_logs: true,
        };
        let allow: Vec<String> =
            workflows.iter().map(|w| format!("--allow-workflow {w}")).collect();
        println!(
            "policy for every peer: {} --allow-dataset {DATASET} --auto-execute --share-logs",
            allow.join(" ")
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

    /// Builds the job image once: busybox, the static `kaapana-stats` and (for a training)
    /// the static `kaapana-fedavg`.
    fn build_image(&self) -> Result<PathBuf, CliError> {
        let mut programs = vec![(STATS_IN_IMAGE, &self.stats_program)];
        if let Some(fedavg) = &self.fedavg_program {
            programs.push((FEDAVG_IN_IMAGE, fedavg));
        }
        let names: Vec<String> = programs
            .iter()
            .map(|(p, _)| format!("the static {}", file_name(Path::new(p))))
            .collect();
        step(&format!(
            "the job image: a one-layer OCI image of the static busybox and {}",
            names.join(" and ")
        ));
        let dir = self.root.join("image");
        fs::create_dir_all(&dir)?;
        let extra: Vec<busybox::ExtraFile> = programs
            .iter()
            .map(|(in_image, host)| busybox::ExtraFile {
                path_in_image: (*in_image).into(),
                host: (*host).clone(),
                mode: 0o755,
            })
            .collect();
        let (tar, digest) = busybox::build_image_with(&dir, "kaapana-demo", false, &extra)?;
        println!("{} ({digest})", tar.strip_prefix(&self.root).unwrap_or(&tar).display());
        for (in_image, host) in &programs {
            println!("  /{in_image} from {}", host.display());
        }
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
        follow_workflow_until(api, &w.workflow_id, Some(deadline))
            .map_err(|e| self.failed(api, &w.workflow_id, e))
    }

    /// `e`, an error following workflow `id`, as one at the site to blame: the runner of the
    /// job that failed first (not one cancelled because of it), else the owner. Shows the
    /// workflow and that job's log (it comes back with the result when the runner shares
    /// logs, as every demo site does).
    fn failed(&self, api: &ApiClient, id: &str, e: CliError) -> CliError {
        let now: Option<WorkflowView> = api.get(&format!("/v1/workflows/{id}")).ok();
        if let Some(now) = &now {
            println!("\n$ kaapana-node workflow show {id}");
            print_workflow(now);
        }
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
            return at_site(e, self.sites[0].name.clone());
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
        at_site(e, job.runner.clone())
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

    /// Writes the training's workflow file, prints it, submits it at site-a.
    fn submit_training(
        &self,
        api: &ApiClient,
        digest: &ImageDigest,
    ) -> Result<WorkflowView, CliError> {
        let n = self.training_rounds;
        step(&format!(
            "site-a submits a training: FedAvg of a logistic regression over {n} rounds, at every \
             site with the dataset"
        ));
        let toml = training_file(digest, n);
        let path = self.root.join(format!("{TRAINING}.toml"));
        fs::write(&path, &toml).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}:\n", file_name(&path));
        for l in toml.lines() {
            println!("    {l}");
        }
        let owner = &self.sites[0];
        println!("\n$ kaapana-node workflow submit {}   # at site-a", file_name(&path));
        let w: WorkflowView = api
            .post("/v1/workflows", &SubmitWorkflowRequest { toml })
            .at_site(owner.name.clone())
            .context("training submit")?;
        let training = w
            .training
            .as_ref()
            .context("site-a took the training's workflow file as one without rounds")
            .at_site(owner.name.clone())?;
        println!(
            "Submitted training {} ({}): rounds {} to {} at {}, quorum {}, late updates {}",
            w.name,
            w.workflow_id,
            training.first_round,
            training.rounds,
            training.sites.join(", "),
            training.min_sites,
            training.late
        );
        Ok(w)
    }

    /// Follows the training until it ends, printing each round as it completes; its rounds.
    fn follow_training(&self, api: &ApiClient, w: &WorkflowView) -> Result<Vec<Round>, CliError> {
        step(
            "each round: every site trains the round before's model on its own series, \
             site-a averages their updates (FedAvg)",
        );
        println!("$ kaapana-node workflow wait {}", w.workflow_id);
        let owner = &self.sites[0].name;
        let id = &w.workflow_id;
        let started = Instant::now();
        let deadline = started + training_timeout(self.training_rounds);
        let mut rounds: Vec<Round> = Vec::new();
        loop {
            let view: WorkflowView =
                api.get(&format!("/v1/workflows/{id}")).at_site(owner.clone())?;
            let training = view
                .training
                .as_ref()
                .context("the training's workflow view has no rounds")
                .at_site(owner.clone())?;
            let last = rounds.last().map_or(0, |r| r.round);
            for r in training.history.iter().filter(|r| r.state == "done" && r.round > last) {
                let round = read_round(api, &view, r)
                    .with_context(|| format!("round {}", r.round))
                    .at_site(owner.clone())?;
                let late = if round.late.is_empty() {
                    String::new()
                } else {
                    format!(", late: {}", round.late.join(", "))
                };
                println!(
                    "  [{:>5.1}s] round {:>2}/{} done in {:.1} s: updates from {} ({} samples{late}); loss {:.5}",
                    started.elapsed().as_secs_f64(),
                    round.round,
                    training.rounds,
                    round.duration.as_secs_f64(),
                    round.sites.join(", "),
                    round.samples,
                    round.loss
                );
                rounds.push(round);
            }
            if view.state != "running" {
                let why = view.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                let secs = started.elapsed().as_secs_f64();
                if view.state == "finished" {
                    let per_round = secs / training.completed.max(1) as f64;
                    println!(
                        "Training {} finished: {} rounds in {secs:.1} s ({per_round:.1} s per round)",
                        view.name, training.completed
                    );
                    return Ok(rounds);
                }
                println!("Training {} {}{why} after {secs:.1} s", view.name, view.state);
                let e = CliError::Message(format!("training {id} {}{why}", view.state));
                return Err(self.failed(api, id, e));
            }
            if Instant::now() > deadline {
                let e = CliError::Message(format!(
                    "training {id} still runs after {:.0} s ({}; {} of {} rounds done)",
                    started.elapsed().as_secs_f64(),
                    view.progress,
                    rounds.len(),
                    training.rounds
                ));
                return Err(self.failed(api, id, e));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Prints the loss per round as a table, plots it and checks the training: every round
    /// ran and the loss went down.
    fn report_training(&self, rounds: &[Round]) -> Result<(), CliError> {
        step("the training loss per round (each round's aggregate: metrics.json)");
        let max = rounds.iter().map(|r| r.loss).fold(0.0_f64, f64::max);
        println!("    round  sites  samples   loss");
        for r in rounds {
            let bar = if max > 0.0 { (r.loss / max * 40.0).round() as usize } else { 0 };
            println!(
                "    {:>5}  {:>5}  {:>7}  {:.5}  {}",
                r.round,
                r.sites.len(),
                r.samples,
                r.loss,
                "#".repeat(bar)
            );
        }
        let plot = self.root.join(LOSS_PLOT);
        fs::write(&plot, loss_plot(rounds, self.sites.len()))
            .with_context(|| format!("cannot write {}", plot.display()))?;
        println!("\nthe plot of the loss per round: {}", plot.display());

        let n = self.training_rounds;
        let numbers: Vec<u32> = rounds.iter().map(|r| r.round).collect();
        if numbers != (1..=n).collect::<Vec<_>>() {
            bail!("the training should have run rounds 1 to {n}; it ran {numbers:?}");
        }
        let (Some(first), Some(last)) = (rounds.first(), rounds.last()) else {
            bail!("the training ran no rounds");
        };
        // With one round, its loss is compared with the untrained model's.
        let (before, what) = if rounds.len() > 1 {
            (first.loss, format!("round 1's loss {:.5}", first.loss))
        } else {
            let b = first.loss_before.context("round 1's metrics.json has no loss_before")?;
            (b, format!("the untrained model's loss {b:.5}"))
        };
        if last.loss >= before {
            bail!(
                "the training's loss did not go down: round {}'s loss {:.5} is not below {what} \
                 (losses by round: {})",
                last.round,
                last.loss,
                rounds.iter().map(|r| format!("{:.5}", r.loss)).collect::<Vec<_>>().join(", ")
            );
        }
        println!(
            "the training ran all {n} rounds and its loss went down from {before:.5} to {:.5} ({:.0} % less)",
            last.loss,
            (1.0 - last.loss / before) * 100.0
        );
        Ok(())
    }
}

/// A round of the training that made its model.
#[derive(Debug, Clone)]
struct Round {
    round: u32,
    /// From its opening to its model.
    duration: Duration,
    /// The sites whose updates it aggregated, by name.
    sites: Vec<String>,
    /// The sites that had not delivered when it closed.
    late: Vec<String>,
    /// The samples of its updates.
    samples: u64,
    /// The sample-weighted training loss of its updates (the aggregate's metrics.json).
    loss: f64,
    /// The same of the model it started from.
    loss_before: Option<f64>,
}

/// Round `r` of the training `view`, with the loss its aggregate job's result bundle (fetched
/// through the API) reports.
fn read_round(
    api: &ApiClient,
    view: &WorkflowView,
    r: &crate::api::views::RoundView,
) -> Result<Round, CliError> {
    let runner = |job: &String| {
        view.jobs.iter().find(|j| &j.name == job).map_or_else(|| job.clone(), |j| j.runner.clone())
    };
    let mut sites: Vec<String> = r.updates.iter().map(runner).collect();
    sites.sort();
    let mut late: Vec<String> = r.late.iter().map(runner).collect();
    late.sort();
    let name = r.aggregate_job.as_deref().context("it has no aggregate job")?;
    let job = view
        .jobs
        .iter()
        .find(|j| j.name == name)
        .with_context(|| format!("the workflow has no job {name}"))?;
    let bundle = api
        .get_bytes(&format!("/v1/jobs/{}/result/bundle", job.job_id), 64 << 20)
        .with_context(|| format!("the result bundle of {name}"))?;
    let metrics = file_in_tar(&bundle, "metrics.json")
        .with_context(|| format!("the result bundle of {name}"))?
        .with_context(|| format!("the result bundle of {name} has no metrics.json"))?;
    let metrics: kaapana_dicom::fedavg::AggregateMetrics = serde_json::from_slice(&metrics)
        .map_err(|e| CliError::Message(format!("{name}'s metrics.json: {e}")))?;
    let loss = metrics.loss.with_context(|| {
        format!("{name}'s metrics.json has no loss (an update came without metrics.json)")
    })?;
    Ok(Round {
        round: r.round,
        duration: Duration::from_millis(r.duration_ms.unwrap_or_default()),
        sites,
        late,
        samples: r.samples,
        loss,
        loss_before: metrics.loss_before,
    })
}

/// The file `name` at the top of the tar `bytes` (`name` or `./name`), if it has one.
fn file_in_tar(bytes: &[u8], name: &str) -> Result<Option<Vec<u8>>, CliError> {
    use std::io::Read as _;
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().context("not a tar")? {
        let mut entry = entry.context("not a tar")?;
        let path = entry.path().context("not a tar")?.into_owned();
        let top: Vec<_> =
            path.components().filter(|c| *c != std::path::Component::CurDir).collect();
        if top.len() == 1 && top[0].as_os_str() == name {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).context("not a tar")?;
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// A line chart of the loss per round as SVG: rounds on the x axis, the loss on the y axis,
/// with ticks, grid lines and labels.
fn loss_plot(rounds: &[Round], sites: usize) -> String {
    use std::fmt::Write as _;
    const WIDTH: f64 = 640.0;
    const HEIGHT: f64 = 400.0;
    const LEFT: f64 = 72.0;
    const RIGHT: f64 = 24.0;
    const TOP: f64 = 48.0;
    const BOTTOM: f64 = 56.0;
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let losses: Vec<f64> = rounds.iter().map(|r| r.loss).collect();
    let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let (y_lo, y_hi, y_step) = nice_range(lo, hi, 5);
    let decimals = (-y_step.log10().floor()).max(0.0) as usize;
    let first = rounds.first().map_or(1, |r| r.round);
    let last = rounds.last().map_or(1, |r| r.round).max(first + 1);
    let x = |round: u32| LEFT + f64::from(round - first) / f64::from(last - first) * plot_w;
    let y = |loss: f64| TOP + (y_hi - loss) / (y_hi - y_lo) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">FedAvg training loss per round ({sites} sites)</text>"#,
        LEFT + plot_w / 2.0
    );
    // The y axis: grid lines and labels.
    let ticks = ((y_hi - y_lo) / y_step).round() as u32;
    for i in 0..=ticks {
        let tick = y_lo + f64::from(i) * y_step;
        let ty = y(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#e0e0e0"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.decimals$}</text>"#,
            LEFT - 6.0,
            ty + 4.0
        );
    }
    // The x axis: a tick per round (every few rounds when there are many).
    let every = (u32::try_from(rounds.len()).unwrap_or(u32::MAX) / 10).max(1);
    for r in rounds.iter().filter(|r| (r.round - first).is_multiple_of(every)) {
        let tx = x(r.round);
        let _ = writeln!(
            svg,
            r#"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="black"/>"#,
            TOP + plot_h,
            TOP + plot_h + 5.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 18.0,
            r.round
        );
    }
    let _ = writeln!(
        svg,
        r#"<path d="M {LEFT} {TOP} V {:.1} H {:.1}" fill="none" stroke="black"/>"#,
        TOP + plot_h,
        LEFT + plot_w
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">round</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">training loss (mean logistic loss, sample-weighted)</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // The line and its points.
    let points: Vec<String> =
        rounds.iter().map(|r| format!("{:.1},{:.1}", x(r.round), y(r.loss))).collect();
    let _ = writeln!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
        points.join(" ")
    );
    for r in rounds {
        let _ = writeln!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#1f77b4"><title>round {}: loss {:.5}</title></circle>"##,
            x(r.round),
            y(r.loss),
            r.round,
            r.loss
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// An axis range from below `lo` to above `hi` in about `ticks` steps of 1, 2 or 5 times a
/// power of ten: (start, end, step).
fn nice_range(lo: f64, hi: f64, ticks: u32) -> (f64, f64, f64) {
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) * 0.1 };
    let raw = span / f64::from(ticks.max(1));
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let start = (lo / step).floor() * step;
    let mut end = (hi / step).ceil() * step;
    if end <= start {
        end = start + step;
    }
    (start, end, step)
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

/// The training's workflow file: `rounds` rounds of FedAvg at every site with the dataset.
fn training_file(digest: &ImageDigest, rounds: u32) -> String {
    format!(
        r#"# Federated learning: a logistic regression ("large lungs" from the HU bands of a CT
# series) trained at every site on its own series, averaged at the owner (FedAvg) each round.
name = "{TRAINING}"

[rounds]
rounds = {rounds}
# a round aggregates once this many sites delivered ...
min_sites = {TRAINING_MIN_SITES}
# ... and waits at most this long for the others, whose late updates are dropped
round_deadline = "2m"
late = "drop"

[[job]]
name = "train"
# every instance with the dataset: one job each per round, over all of its series (at
# /input/<SeriesInstanceUID>/*.dcm), starting from the round before's model
# (/input/aggregate-r<k-1>/model.json in round k; none in round 1)
query = {{ dataset = "{DATASET}", pick = "all" }}
image = "{digest}"
# writes /output/model.json, /output/samples (its series) and /output/metrics.json
command = ["/{FEDAVG_IN_IMAGE}", "train", "--data", "/input", "--epochs", "{TRAINING_EPOCHS}"]
timeout = "2m"
memory = "128MiB"

[[job]]
name = "aggregate"
runner = "owner"
# reads the round's updates at /input/train-r<k>-<n>/; writes the sample-weighted mean model
# (the next round's) and /output/metrics.json (the loss of the round's updates)
inputs = ["train"]
image = "{digest}"
command = ["/{FEDAVG_IN_IMAGE}", "aggregate"]
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
        let text = training_file(&digest, 10);
        crate::workflow_file::WorkflowFile::parse(&text).unwrap();
    }

    fn round(round: u32, loss: f64) -> Round {
        Round {
            round,
            duration: Duration::from_secs(1),
            sites: vec!["site-a".into(), "site-b".into()],
            late: Vec::new(),
            samples: 10,
            loss,
            loss_before: None,
        }
    }

    #[test]
    fn the_loss_plot_has_a_point_per_round_inside_its_axes() {
        let rounds: Vec<Round> =
            (1..=10).map(|r| round(r, 0.7 / (1.0 + f64::from(r) * 0.1))).collect();
        let svg = loss_plot(&rounds, 3);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<circle ").count(), 10);
        let points = svg.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        let xy: Vec<(f64, f64)> = points
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert_eq!(xy.len(), 10);
        for w in xy.windows(2) {
            assert!(w[0].0 < w[1].0, "x grows with the round: {xy:?}");
            assert!(w[0].1 < w[1].1, "a lower loss is lower in the plot: {xy:?}");
        }
        for (x, y) in xy {
            assert!((72.0..=616.0).contains(&x) && (48.0..=344.0).contains(&y), "{x},{y}");
        }
        // One round, equal losses: no division by zero.
        let one = loss_plot(&[round(1, 0.5)], 3);
        assert!(!one.contains("NaN") && !one.contains("inf"), "{one}");
    }

    #[test]
    fn axis_ranges_are_round_numbers_around_the_data() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let (lo, hi, step) = nice_range(0.0, 1.0, 5);
        assert!(close(lo, 0.0) && close(hi, 1.0) && close(step, 0.2), "{lo} {hi} {step}");
        let (lo, hi, step) = nice_range(0.41, 0.69, 5);
        assert!(close(lo, 0.4) && close(hi, 0.7) && close(step, 0.1), "{lo} {hi} {step}");
        let (lo, hi, step) = nice_range(0.5, 0.5, 5);
        assert!(lo <= 0.5 && hi > 0.5 && step > 0.0, "{lo} {hi} {step}");
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
