//! Running kaapana-node jobs in containers on containerd: the [`Executor`] trait and its
//! containerd implementation.
//!
//! This crate owns everything between "run this job" and "it ended like this": importing OCI
//! image tarballs and pulling images by digest into containerd ([`image`], [`pull`]), the job
//! sandbox (the image's root filesystem, the job's dataset read-only at `/input`, upstream
//! results at `/input/<name>`, a writable `/output`, no network), CPU and memory limits, the
//! wall-clock timeout, out-of-memory detection, the exit record, re-attaching to jobs after a
//! restart of the node ([`containerd`]), and supervising a containerd child process
//! ([`lifecycle`]). It must not know federation rules (who may run what, job state machines:
//! `kaapana-federation`), the node's store, or the network protocol: the node decides which
//! job runs and records what happened; this crate only runs it. It depends on
//! `kaapana-protocol` for identifiers and the exit status alone.
//!
//! An executor runs one job ([`JobRun`]) in a sandbox; its stdout and stderr go to a log file.
//! [`Executor::run`] returns when the job has ended *and* everything it left in the executor
//! (container, task, snapshot) is gone.
//!
//! The trait is object-safe (`Arc<dyn Executor>`): its methods return boxed futures.
//!
//! - [`containerd`]: [`ContainerdExecutor`], jobs as containerd containers through its gRPC API.
//! - [`lifecycle`]: [`Containerd`], a connection to a configured containerd or a containerd
//!   child process that the node starts, supervises and stops.
//! - [`image`]: importing OCI image layout tarballs into containerd ([`import_oci_tar`]).
//! - [`pull`]: pulling images by digest from an OCI registry into containerd
//!   ([`pull_image`]).
//! - `busybox` (feature `test-utils`): a minimal job image built from the host's static
//!   busybox, for tests and the node's demo.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use kaapana_protocol::{ExecutorKind, ExitStatus, ImageDigest, JobId, ResourceLimits, Timestamp};

pub mod airflow;
mod api;
#[cfg(any(test, feature = "test-utils"))]
pub mod busybox;
pub mod containerd;
pub mod image;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod lifecycle;
pub mod pull;
mod spec;

pub use airflow::{AirflowConfig, AirflowExecutor};
pub use containerd::{ContainerdExecutor, ExecutorConfig};
pub use image::{ImageInfo, import_oci_tar, list_images};
pub use lifecycle::Containerd;
pub use pull::pull_image;

/// One job for an executor: what to run, on which files, within which limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRun {
    /// The job (names its container, or its DAG run).
    pub job_id: JobId,
    /// What it runs: a container (the containerd executor) or a DAG run (the Airflow one).
    pub work: JobWork,
    /// The dataset folder, bind-mounted read-only at `/input` (a DAG run gets its path).
    pub input: Option<PathBuf>,
    /// Upstream results `(name, folder)`, each read-only at `/input/<name>`.
    pub upstream: Vec<(String, PathBuf)>,
    /// The folder bind-mounted writable at `/output` (must exist); a DAG writes into it.
    pub output: PathBuf,
    /// The file that receives the job's stdout and stderr (created if missing, appended to).
    pub log: PathBuf,
    /// CPU and memory limits (0 = the executor's default).
    pub limits: ResourceLimits,
    /// Wall-clock limit, after which the job is killed and reported [`ExitStatus::TimedOut`].
    pub timeout: Duration,
}

/// What a job runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobWork {
    /// A container of an image in the executor's image store.
    Container {
        /// The image, by manifest (or index) digest; it must already be in the executor.
        image: ImageDigest,
        /// The command line; empty means the image's `Entrypoint` + `Cmd`.
        command: Vec<String>,
        /// Environment variables, added after (and overriding) the image's `Env`.
        env: Vec<(String, String)>,
    },
    /// One run of a DAG of the site's Airflow ([`airflow`]).
    AirflowDag(airflow::DagRunJob),
}

/// How and when a job ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobOutcome {
    /// How it ended: `Exited(code)`, `TimedOut`, `OutOfMemory` or `Killed(signal)` (by
    /// [`Executor::kill`]).
    pub exit: ExitStatus,
    /// When its process started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
    /// What the executor knows beyond the exit status, for a failure's reason (e.g. which
    /// Airflow task failed and in which state); `None` for containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The file next to a job's log where its executor records how it ended, durably, before it
/// removes the container: a node that stops between the two still knows the outcome.
pub fn exit_record_path(log: &Path) -> PathBuf {
    log.with_file_name("exit.json")
}

/// Records `outcome` next to `log` (write, fsync, rename).
pub fn write_exit_record(log: &Path, outcome: &JobOutcome) -> std::io::Result<()> {
    let path = exit_record_path(log);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(outcome).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The outcome recorded next to `log`, if there is one.
pub fn read_exit_record(log: &Path) -> Option<JobOutcome> {
    std::fs::read(exit_record_path(log)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// Why an executor could not run, find or clean up a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The job's image is not in the executor's image store.
    #[error(
        "image {digest} is not in containerd; import it with `kaapana-node image import FILE.tar`"
    )]
    ImageNotFound {
        /// The digest the job asked for.
        digest: ImageDigest,
    },
    /// A containerd call failed.
    #[error("containerd {op} failed: {detail}")]
    Containerd {
        /// The call, e.g. `Tasks.Create`.
        op: &'static str,
        /// containerd's status code and message.
        detail: String,
    },
    /// containerd could not be reached or started.
    #[error("containerd is not available at {socket}: {detail}")]
    Unavailable {
        /// The socket tried.
        socket: PathBuf,
        /// What went wrong, and what to do about it.
        detail: String,
    },
    /// A file or folder could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An image (tarball or stored image) is malformed or unsupported.
    #[error("bad image: {detail}")]
    BadImage {
        /// What is wrong with it.
        detail: String,
    },
    /// The job itself cannot be run as given (paths, names, command).
    #[error("cannot run job: {detail}")]
    BadJob {
        /// What is wrong with it.
        detail: String,
    },
    /// The executor holds nothing of this job (it ended and was cleaned up, or never started).
    #[error("job {job} is not in containerd (it was cleaned up or never started)")]
    JobNotFound {
        /// The job.
        job: JobId,
    },
    /// The registry does not have an image with this digest (see [`pull::pull_image`]).
    #[error("image {digest} not found in registry {registry}")]
    ImageNotInRegistry {
        /// The digest asked for.
        digest: ImageDigest,
        /// The registry and repository asked, e.g. `127.0.0.1:5000/kaapana/busybox`.
        registry: String,
    },
    /// A registry served content whose SHA-256 is not the digest asked for; it was refused and
    /// nothing of it kept.
    #[error(
        "digest mismatch: refused the {what} from registry {registry}: its SHA-256 is {actual}, \
         not {expected}"
    )]
    DigestMismatch {
        /// The registry and repository.
        registry: String,
        /// What was refused, e.g. `manifest` or `blob sha256:…`.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what came.
        actual: String,
    },
    /// Airflow's REST API could not be reached, refused the node's credentials, or answered
    /// with an error.
    #[error("Airflow at {url}: {detail}")]
    Airflow {
        /// The URL asked.
        url: String,
        /// What went wrong, and what to do about it.
        detail: String,
    },
    /// A registry could not be reached, or answered with an error or something malformed.
    #[error("registry {registry}: {detail}")]
    Registry {
        /// The registry and repository.
        registry: String,
        /// What went wrong.
        detail: String,
    },
}

impl ExecError {
    /// An [`ExecError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// Runs jobs in sandboxes. Object-safe: every method returns a boxed future.
///
/// Jobs are identified by their [`JobId`]; an executor runs at most one container per job.
/// Dropping a [`run`](Executor::run) future does not stop the job: it keeps running in the
/// executor until [`kill`](Executor::kill) or [`cleanup`](Executor::cleanup), and another
/// executor object (e.g. after a restart of the node) finds it through
/// [`running`](Executor::running) and [`reattach`](Executor::reattach).
pub trait Executor: Send + Sync + fmt::Debug {
    /// Which kind of executor this is (advertised to other instances).
    fn kind(&self) -> ExecutorKind;

    /// Runs the job and waits until it has ended and everything of it is cleaned up.
    ///
    /// A job that ran and ended is `Ok` whatever its exit status; `Err` means it could not be
    /// run (missing image, bad paths, executor failure).
    fn run(&self, job: JobRun) -> BoxFuture<'_, Result<JobOutcome, ExecError>>;

    /// Aborts a running job: its [`run`](Executor::run) (or
    /// [`reattach`](Executor::reattach)) then returns [`ExitStatus::Killed`].
    fn kill<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>>;

    /// Whether the image is in the executor's image store.
    fn has_image<'a>(&'a self, image: &'a ImageDigest) -> BoxFuture<'a, Result<bool, ExecError>>;

    /// The jobs of this node that the executor still holds (running or ended but not cleaned
    /// up), e.g. after a restart of the node.
    fn running(&self) -> BoxFuture<'_, Result<Vec<JobId>, ExecError>>;

    /// Waits for a job started by an earlier process (its timeout still applies), then cleans
    /// it up. `log` is the job's log file: if the job is gone, a line saying so is appended.
    /// Returns [`ExecError::JobNotFound`] when nothing of the job remains or it never started.
    fn reattach<'a>(
        &'a self,
        job: &'a JobId,
        log: &'a Path,
    ) -> BoxFuture<'a, Result<JobOutcome, ExecError>>;

    /// Removes whatever the executor still holds of the job (killing it if it runs).
    /// Idempotent: cleaning up a job that is gone is `Ok`.
    fn cleanup<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>>;

    /// Pulls `image` by digest from the OCI repository `reference` (`host[:port]/path`),
    /// checking every blob against its digest; plain HTTP if `insecure_http`.
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        image: &'a ImageDigest,
        insecure_http: bool,
    ) -> BoxFuture<'a, Result<ImageDigest, ExecError>>;
}
