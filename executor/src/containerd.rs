//! [`ContainerdExecutor`]: jobs as containers on containerd, through its v1 gRPC API.
//!
//! Each start of a job gets a container of its own, `kn-<job id hex>-<start nonce>` (8 random
//! hex digits; see [`new_container_id`]) in the executor's namespace (default `kaapana-node`),
//! labelled `kaapana-node/job=<id>` and `kaapana-node/deadline-ms`; its root filesystem is an
//! active snapshot of the same name on top of the image's layers. The executor finds a job's
//! containers by the label (`Containers.List` with `labels."kaapana-node/job"==<id>`), never by
//! deriving the id, so kill, cleanup and re-attach after a restart work for any start. The
//! sequence (containerd 1.6): `Containers.Create` (the OCI spec, built with serde_json) →
//! `Snapshots.Prepare` (after the container, so the snapshot is referenced and safe from GC)
//! → `Tasks.Create` (stdout and stderr appended to the log file by the shim) → `Tasks.Wait`
//! (issued before the start) → `Tasks.Start` → exit or timeout (SIGKILL) → `Tasks.Delete` →
//! `Snapshots.Remove` → `Containers.Delete`.
//!
//! Why a fresh id per start (the "shim race", issue 19): a node killed while containerd runs
//! its `Tasks.Create` can leave the runtime v2 bundle
//! (`<state>/io.containerd.runtime.v2.task/<namespace>/<id>`) behind without a task.
//! containerd then refuses every later `Tasks.Create` of that id ("failed to start shim:
//! mkdir …: file exists"), and its API cannot remove the bundle: `Tasks.Delete` answers "not
//! found", and containerd's own clean-up at its next start skips a bundle whose container
//! still exists. A new id per start is never blocked by such a leftover. After the restart
//! the executor sees the old container by its label, finds no started task
//! ([`Executor::reattach`] returns [`ExecError::JobNotFound`], so the node starts the job
//! again: it never ran) and deletes that container; containerd removes the stray bundle at
//! its next start (checked with containerd 1.6.20). A job never has two containers at once:
//! [`Executor::run`] refuses a job that still has one.
//!
//! Out-of-memory kills are seen through containerd's `/tasks/oom` events: one subscription
//! per executor, confirmed live by a ping event it publishes to itself, so no event between
//! the start of a job and its end is missed; the events repeat and are folded into a flag per
//! container. After a job exits, the executor waits (briefly) for its `/tasks/exit` event,
//! which the shim sends after any OOM event, so the flag is complete. The memory cgroup's
//! `oom_kill` counter is read as a second source (it also covers jobs that ran while no node
//! process was listening).
//!
//! Why a job ended survives a restart of the node: [`Executor::kill`] and the timeout label
//! the container (`kaapana-node/ended-by`) before they send SIGKILL.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use containerd_client::events::{TaskExit, TaskOom};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateNamespaceRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, GetRequest as GetTaskRequest, KillRequest,
    ListContainersRequest, Namespace, PublishRequest, StartRequest, SubscribeRequest,
    UpdateContainerRequest, WaitRequest, WaitResponse,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Status};
use containerd_client::types::v1::Status as TaskStatus;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use kaapana_protocol::{ExecutorKind, ExitStatus, ImageDigest, JobId, ResourceLimits, Timestamp};
use prost::Message as _;
use tokio::sync::{oneshot, watch};

use super::api::{Api, err, not_found_ok, quote};
use super::image::{self, ImageInfo, ResolvedImage};
use super::spec;
use super::{ExecError, Executor, JobOutcome, JobRun, JobWork};

/// Label holding the job id (hex) on a job's container.
pub const LABEL_JOB: &str = "kaapana-node/job";
/// Label holding the job's deadline (Unix milliseconds) on its container.
pub const LABEL_DEADLINE: &str = "kaapana-node/deadline-ms";
/// Label set to `killed` or `timeout` on a container before the executor kills its task.
pub const LABEL_ENDED_BY: &str = "kaapana-node/ended-by";

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const PING_TOPIC: &str = "/kaapana-node/ping";
const SIGKILL: u32 = 9;
/// The exit status of a process killed by SIGKILL.
const EXIT_SIGKILL: u32 = 128 + SIGKILL;
/// How long to wait for a job's `/tasks/exit` event after its Wait returned.
const EXIT_EVENT_WAIT: Duration = Duration::from_secs(2);
/// How long a killed task may take to stop.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// The settings of a [`ContainerdExecutor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// containerd namespace for the node's images and jobs (default `kaapana-node`).
    pub namespace: String,
    /// Snapshotter for image layers and job root filesystems (default `overlayfs`).
    pub snapshotter: String,
    /// Runtime (default `io.containerd.runc.v2`).
    pub runtime: String,
    /// Limits for jobs whose manifest says 0 (default 1000 millicores, 1 GiB).
    pub default_limits: ResourceLimits,
    /// Most processes a job may have (default 1024).
    pub pids_max: i64,
    /// A folder for per-job scratch files (the `/input` stub); default
    /// `$TMPDIR/kaapana-node-executor`. The daemon puts it in its data directory.
    pub scratch_dir: PathBuf,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            namespace: "kaapana-node".into(),
            snapshotter: "overlayfs".into(),
            runtime: "io.containerd.runc.v2".into(),
            default_limits: ResourceLimits { cpu_millis: 1000, memory_bytes: 1 << 30, gpus: 0 },
            pids_max: 1024,
            scratch_dir: std::env::temp_dir().join("kaapana-node-executor"),
        }
    }
}

/// Why the executor killed a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndedBy {
    Killed,
    Timeout,
}

impl EndedBy {
    const fn label(self) -> &'static str {
        match self {
            Self::Killed => "killed",
            Self::Timeout => "timeout",
        }
    }
}

/// What the event subscription saw of one container.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    oom: bool,
    exited: bool,
}

/// State shared with the event task.
#[derive(Debug)]
struct Shared {
    seen: Mutex<HashMap<String, Seen>>,
    changed: watch::Sender<u64>,
    ended_by: Mutex<HashMap<JobId, EndedBy>>,
    images: Mutex<HashMap<ImageDigest, ResolvedImage>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Jobs as containerd containers. See the [module docs](self).
#[derive(Debug)]
pub struct ContainerdExecutor {
    api: Api,
    config: ExecutorConfig,
    shared: Arc<Shared>,
    events: tokio::task::JoinHandle<()>,
    limit_swap: bool,
}

impl Drop for ContainerdExecutor {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// A new container id for one start of a job: `kn-<job id hex>-<8 random hex digits>` (see
/// the [module docs](self) for why each start gets its own).
pub fn new_container_id(job: &JobId) -> String {
    let mut nonce = [0u8; 4];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).is_err() {
        // No system randomness: the clock still differs between two starts of one job.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        nonce = nanos.to_be_bytes();
    }
    format!("kn-{job}-{}", kaapana_protocol::hex(&nonce))
}

/// The folder name of a job's scratch files (one per job, shared by its starts).
fn scratch_name(job: &JobId) -> String {
    format!("kn-{job}")
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

fn timestamp(t: Option<prost_types::Timestamp>) -> Option<Timestamp> {
    let t = t?;
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u64::try_from(t.nanos).ok()?;
    Some(Timestamp::from_millis(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)))
}

/// How a task's end maps to an [`ExitStatus`].
fn classify(code: u32, ended_by: Option<EndedBy>, oom: bool) -> ExitStatus {
    match ended_by {
        Some(EndedBy::Killed) if code == EXIT_SIGKILL => ExitStatus::Killed(9),
        Some(EndedBy::Timeout) if code == EXIT_SIGKILL => ExitStatus::TimedOut,
        _ if oom => ExitStatus::OutOfMemory,
        _ => ExitStatus::Exited(i32::try_from(code).unwrap_or(i32::MAX)),
    }
}

/// The memory cgroup's count of OOM kills (cgroup v1 `memory.oom_control` or v2
/// `memory.events`), if readable.
fn cgroup_oom_kills(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    let files = [
        format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
        format!("/sys/fs/cgroup/{rel}/memory.events"),
    ];
    files.iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    })
}

fn append_note(log: &Path, note: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "[kaapana-node] {note}");
    }
}

impl ContainerdExecutor {
    /// An executor on this containerd channel ([`super::Containerd::channel`]): creates the
    /// namespace if needed and subscribes to containerd's task events before it returns.
    pub async fn new(channel: Channel, config: ExecutorConfig) -> Result<Self, ExecError> {
        let api = Api::new(channel, &config.namespace, &config.snapshotter)?;
        let created = api
            .namespaces()
            .create(api.req(CreateNamespaceRequest {
                namespace: Some(Namespace {
                    name: config.namespace.clone(),
                    labels: HashMap::from([("kaapana-node/managed".into(), "true".into())]),
                }),
            }))
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(err("Namespaces.Create")(s)),
        }
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            seen: Mutex::new(HashMap::new()),
            changed,
            ended_by: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let events = tokio::spawn(event_loop(api.clone(), Arc::clone(&shared), ready_tx));
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(())) => {}
            _ => {
                events.abort();
                return Err(ExecError::Containerd {
                    op: "Events.Subscribe",
                    detail: "the event subscription did not come up within 10 s".into(),
                });
            }
        }
        let limit_swap = Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
            || Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        Ok(Self { api, config, shared, events, limit_swap })
    }

    /// The executor's settings.
    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    pub(crate) fn api(&self) -> &Api {
        &self.api
    }

    /// Imports an OCI image layout tarball (see [`image::import_oci_tar`]).
    pub async fn import_image(&self, tar: &Path) -> Result<ImageDigest, ExecError> {
        image::import_oci_tar(self, tar).await
    }

    /// Pulls an image by digest from a registry repository (`host[:port]/repository`) over
    /// HTTPS, or plain HTTP if `insecure_http` (see [`super::pull::pull_image`]).
    pub async fn pull_image(
        &self,
        registry_reference: &str,
        digest: &ImageDigest,
        insecure_http: bool,
    ) -> Result<ImageDigest, ExecError> {
        super::pull::pull_image(self, registry_reference, digest, insecure_http).await
    }

    /// The images in the executor's namespace.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>, ExecError> {
        image::list_images(self).await
    }

    async fn resolve_cached(&self, digest: &ImageDigest) -> Result<ResolvedImage, ExecError> {
        if let Some(r) = guard(&self.shared.images).get(digest) {
            return Ok(r.clone());
        }
        let r = image::resolve(&self.api, digest).await?;
        guard(&self.shared.images).insert(*digest, r.clone());
        Ok(r)
    }

    fn scratch(&self, job: &JobId) -> PathBuf {
        self.config.scratch_dir.join(scratch_name(job))
    }

    /// The ids of the job's containers (found by their job label; normally none or one).
    pub async fn containers_of(&self, job: &JobId) -> Result<Vec<String>, ExecError> {
        Ok(self.job_containers(job).await?.into_iter().map(|c| c.id).collect())
    }

    async fn job_containers(&self, job: &JobId) -> Result<Vec<Container>, ExecError> {
        let filter = format!("labels.{}=={}", quote(LABEL_JOB), quote(&job.to_string()));
        let resp = self
            .api
            .containers()
            .list(self.api.req(ListContainersRequest { filters: vec![filter] }))
            .await
            .map_err(err("Containers.List"))?;
        let mut containers = resp.into_inner().containers;
        containers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(containers)
    }

    fn cgroups_path(&self, cid: &str) -> String {
        format!("/{}/{cid}", self.config.namespace)
    }

    async fn run_job(&self, job: JobRun) -> Result<JobOutcome, ExecError> {
        let JobWork::Container { image: digest, command, env } = &job.work else {
            return Err(ExecError::BadJob {
                detail: "this instance runs containers (executor containerd), not Airflow DAG \
                         runs; a site with Airflow sets `[executor] kind = \"airflow\"`"
                    .into(),
            });
        };
        // At most one container per job: one left by an earlier start must be re-attached to
        // or cleaned up first.
        if !self.job_containers(&job.job_id).await?.is_empty() {
            return Err(already_has_container(&job.job_id));
        }
        let cid = new_container_id(&job.job_id);
        // The log first: the shim appends to an existing file.
        if let Some(dir) = job.log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ExecError::io(dir, e))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&job.log)
            .map_err(|e| ExecError::io(&job.log, e))?;
        let log = std::path::absolute(&job.log).map_err(|e| ExecError::io(&job.log, e))?;

        let image = self.resolve_cached(digest).await?;
        let args = spec::args(command, &image.config)?;
        let env = spec::env(&image.config, env)?;
        let user = spec::user(&image.config)?;
        let stub = self.scratch(&job.job_id).join("input");
        if stub.exists() {
            std::fs::remove_dir_all(&stub).map_err(|e| ExecError::io(&stub, e))?;
        }
        std::fs::create_dir_all(&stub).map_err(|e| ExecError::io(&stub, e))?;
        let mounts = spec::data_mounts(job.input.as_deref(), &job.upstream, &job.output, &stub);
        let mounts = match mounts {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.scratch(&job.job_id));
                return Err(e);
            }
        };
        let limits = ResourceLimits {
            cpu_millis: match job.limits.cpu_millis {
                0 => self.config.default_limits.cpu_millis,
                n => n,
            },
            memory_bytes: match job.limits.memory_bytes {
                0 => self.config.default_limits.memory_bytes,
                n => n,
            },
            gpus: job.limits.gpus,
        };
        let cwd = image.config.working_dir.clone().filter(|w| w.starts_with('/'));
        let spec = spec::build(spec::SpecParams {
            args,
            env,
            cwd: cwd.unwrap_or_else(|| "/".into()),
            user,
            mounts,
            cgroups_path: self.cgroups_path(&cid),
            cpu_millis: limits.cpu_millis,
            memory_bytes: limits.memory_bytes,
            limit_swap: self.limit_swap,
            pids_max: self.config.pids_max,
            hostname: "job",
        });
        let deadline = now().saturating_add(job.timeout);
        let container = Container {
            id: cid.clone(),
            labels: HashMap::from([
                (LABEL_JOB.to_owned(), job.job_id.to_string()),
                (LABEL_DEADLINE.to_owned(), deadline.as_millis().to_string()),
            ]),
            image: image.name.clone(),
            runtime: Some(Runtime { name: self.config.runtime.clone(), options: None }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(&spec)
                    .map_err(|e| ExecError::BadJob { detail: e.to_string() })?,
            }),
            snapshotter: self.config.snapshotter.clone(),
            snapshot_key: cid.clone(),
            ..Container::default()
        };
        guard(&self.shared.seen).remove(&cid);
        guard(&self.shared.ended_by).remove(&job.job_id);
        let created = self
            .api
            .containers()
            .create(self.api.req(CreateContainerRequest { container: Some(container) }))
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                let _ = std::fs::remove_dir_all(self.scratch(&job.job_id));
                return Err(already_has_container(&job.job_id));
            }
            Err(s) => {
                let _ = std::fs::remove_dir_all(self.scratch(&job.job_id));
                return Err(err("Containers.Create")(s));
            }
        }
        match self.start(&job, &cid, (digest, &image), &log).await {
            Ok(started_at) => {
                let outcome = self.finish(&job.job_id, &cid, deadline, started_at, &job.log).await;
                if let Ok(o) = &outcome {
                    note_outcome(&log, o, job.timeout);
                }
                outcome
            }
            Err(e) => {
                if let Err(c) = self.cleanup_job(&job.job_id).await {
                    tracing::warn!(job = %job.job_id, "cleanup after a failed start: {c}");
                }
                Err(e)
            }
        }
    }

    /// Snapshot, task, start; returns when the process runs.
    async fn start(
        &self,
        job: &JobRun,
        cid: &str,
        (digest, image): (&ImageDigest, &ResolvedImage),
        log: &Path,
    ) -> Result<Timestamp, ExecError> {
        let prepared = self
            .api
            .snapshots()
            .prepare(self.api.req(PrepareSnapshotRequest {
                snapshotter: self.config.snapshotter.clone(),
                key: cid.to_owned(),
                parent: image.top_chain.clone(),
                labels: HashMap::new(),
            }))
            .await;
        let mounts = match prepared {
            Ok(r) => r.into_inner().mounts,
            Err(s) if s.code() == Code::NotFound => {
                // The image (or its layers) went away since it was resolved.
                guard(&self.shared.images).remove(digest);
                return Err(ExecError::ImageNotFound { digest: *digest });
            }
            Err(s) => return Err(err("Snapshots.Prepare")(s)),
        };
        let log = log.to_string_lossy().into_owned();
        self.api
            .tasks()
            .create(self.api.req(CreateTaskRequest {
                container_id: cid.to_owned(),
                rootfs: mounts,
                stdout: log.clone(),
                stderr: log,
                ..CreateTaskRequest::default()
            }))
            .await
            .map_err(err("Tasks.Create"))?;
        let started_at = now();
        self.api
            .tasks()
            .start(
                self.api.req(StartRequest { container_id: cid.to_owned(), exec_id: String::new() }),
            )
            .await
            .map_err(err("Tasks.Start"))?;
        // A kill() that came before the task existed only left its mark: act on it now.
        let killed = guard(&self.shared.ended_by).get(&job.job_id) == Some(&EndedBy::Killed);
        if killed {
            self.mark_and_kill(&job.job_id, cid, EndedBy::Killed).await?;
        }
        Ok(started_at)
    }

    fn wait_task(&self, cid: &str) -> tokio::task::JoinHandle<Result<WaitResponse, Status>> {
        let mut tasks = self.api.tasks();
        let req =
            self.api.req(WaitRequest { container_id: cid.to_owned(), exec_id: String::new() });
        tokio::spawn(async move { tasks.wait(req).await.map(|r| r.into_inner()) })
    }

    /// Waits for the task (killing it at the deadline), reads how it ended, records that next
    /// to the job's log and cleans up.
    async fn finish(
        &self,
        job: &JobId,
        cid: &str,
        deadline: Timestamp,
        started_at: Timestamp,
        log: &Path,
    ) -> Result<JobOutcome, ExecError> {
        let result = self.wait_until(job, cid, deadline).await;
        let result = match result {
            Ok((code, exited_at)) => {
                let oom = self.saw_oom(cid).await;
                let ended_by = guard(&self.shared.ended_by).get(job).copied();
                let outcome = JobOutcome {
                    exit: classify(code, ended_by, oom),
                    started_at,
                    finished_at: exited_at.unwrap_or_else(now).max(started_at),
                    detail: None,
                };
                // Durable before the container goes: a node stopped in between still knows.
                super::write_exit_record(log, &outcome)
                    .map(|()| outcome)
                    .map_err(|e| ExecError::io(super::exit_record_path(log), e))
            }
            Err(e) => Err(e),
        };
        let cleaned = self.cleanup_job(job).await;
        let outcome = result?;
        cleaned?;
        Ok(outcome)
    }

    /// Waits for the task to exit; at the deadline, marks it timed out and SIGKILLs it.
    async fn wait_until(
        &self,
        job: &JobId,
        cid: &str,
        deadline: Timestamp,
    ) -> Result<(u32, Option<Timestamp>), ExecError> {
        let joined = |r: Result<Result<WaitResponse, Status>, tokio::task::JoinError>| match r {
            Ok(Ok(w)) => Ok((w.exit_status, timestamp(w.exited_at))),
            Ok(Err(s)) => Err(err("Tasks.Wait")(s)),
            Err(e) => Err(ExecError::Containerd { op: "Tasks.Wait", detail: e.to_string() }),
        };
        let mut waiter = self.wait_task(cid);
        let left = deadline.duration_since(now());
        match tokio::time::timeout(left, &mut waiter).await {
            Ok(r) => joined(r),
            Err(_) => {
                self.mark_and_kill(job, cid, EndedBy::Timeout).await?;
                match tokio::time::timeout(KILL_WAIT, waiter).await {
                    Ok(r) => joined(r),
                    Err(_) => Err(ExecError::Containerd {
                        op: "Tasks.Kill",
                        detail: format!("the task of {cid} did not stop within {KILL_WAIT:?}"),
                    }),
                }
            }
        }
    }

    /// Labels the container with why it is killed, then sends SIGKILL.
    async fn mark_and_kill(&self, job: &JobId, cid: &str, why: EndedBy) -> Result<(), ExecError> {
        guard(&self.shared.ended_by).insert(*job, why);
        let container = Container {
            id: cid.to_owned(),
            labels: HashMap::from([(LABEL_ENDED_BY.to_owned(), why.label().to_owned())]),
            ..Container::default()
        };
        let updated = self
            .api
            .containers()
            .update(self.api.req(UpdateContainerRequest {
                container: Some(container),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{LABEL_ENDED_BY}")],
                }),
            }))
            .await;
        if not_found_ok(updated, "Containers.Update")?.is_none() {
            return Err(ExecError::JobNotFound { job: *job });
        }
        let killed = self
            .api
            .tasks()
            .kill(self.api.req(KillRequest {
                container_id: cid.to_owned(),
                exec_id: String::new(),
                signal: SIGKILL,
                all: false,
            }))
            .await;
        match killed {
            Ok(_) => Ok(()),
            // Already gone, or it exited just now: its Wait reports how.
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) if s.code() == Code::FailedPrecondition => Ok(()),
            Err(s) => Err(err("Tasks.Kill")(s)),
        }
    }

    /// Whether the container was OOM-killed: waits (briefly) for its exit event, which follows
    /// any OOM event, then also asks the memory cgroup.
    async fn saw_oom(&self, cid: &str) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let until = tokio::time::Instant::now() + EXIT_EVENT_WAIT;
        loop {
            let seen = guard(&self.shared.seen).get(cid).copied().unwrap_or_default();
            if seen.oom {
                return true;
            }
            if seen.exited {
                break;
            }
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        cgroup_oom_kills(&self.cgroups_path(cid)).is_some_and(|n| n > 0)
    }

    /// Deletes each of the job's containers with its task (killing it first if it runs) and
    /// snapshot, and the job's scratch folder. Idempotent.
    async fn cleanup_job(&self, job: &JobId) -> Result<(), ExecError> {
        for container in self.job_containers(job).await? {
            self.cleanup_container(&container.id).await?;
        }
        let scratch = self.scratch(job);
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(|e| ExecError::io(&scratch, e))?;
        }
        guard(&self.shared.ended_by).remove(job);
        Ok(())
    }

    /// Deletes one container with its task (killing it first if it runs) and snapshot.
    async fn cleanup_container(&self, cid: &str) -> Result<(), ExecError> {
        let cid = cid.to_owned();
        let task = self
            .api
            .tasks()
            .get(self.api.req(GetTaskRequest { container_id: cid.clone(), exec_id: String::new() }))
            .await;
        if let Some(task) = not_found_ok(task, "Tasks.Get")?.and_then(|t| t.into_inner().process) {
            if task.status != TaskStatus::Stopped as i32 {
                let waiter = self.wait_task(&cid);
                let _ = self
                    .api
                    .tasks()
                    .kill(self.api.req(KillRequest {
                        container_id: cid.clone(),
                        exec_id: String::new(),
                        signal: SIGKILL,
                        all: false,
                    }))
                    .await;
                let _ = tokio::time::timeout(KILL_WAIT, waiter).await;
            }
            let deleted = self
                .api
                .tasks()
                .delete(self.api.req(DeleteTaskRequest { container_id: cid.clone() }))
                .await;
            not_found_ok(deleted, "Tasks.Delete")?;
        }
        let removed = self
            .api
            .snapshots()
            .remove(self.api.req(RemoveSnapshotRequest {
                snapshotter: self.config.snapshotter.clone(),
                key: cid.clone(),
            }))
            .await;
        not_found_ok(removed, "Snapshots.Remove")?;
        let deleted = self
            .api
            .containers()
            .delete(self.api.req(DeleteContainerRequest { id: cid.clone() }))
            .await;
        not_found_ok(deleted, "Containers.Delete")?;
        guard(&self.shared.seen).remove(&cid);
        Ok(())
    }

    async fn reattach_job(&self, job: &JobId, log: &Path) -> Result<JobOutcome, ExecError> {
        let containers = self.job_containers(job).await?;
        if containers.is_empty() {
            append_note(log, "the job's container is gone (the node lost track of it)");
            return Err(ExecError::JobNotFound { job: *job });
        }
        // The container whose task started, if any; the others (a start interrupted before
        // its task ran, e.g. inside Tasks.Create) never ran the job and go.
        let mut followed = None;
        for container in containers {
            let task = self
                .api
                .tasks()
                .get(self.api.req(GetTaskRequest {
                    container_id: container.id.clone(),
                    exec_id: String::new(),
                }))
                .await;
            let task = not_found_ok(task, "Tasks.Get")?.and_then(|t| t.into_inner().process);
            let started = task.as_ref().is_some_and(|t| t.status != TaskStatus::Created as i32);
            if started && followed.is_none() {
                followed = Some(container);
            } else {
                self.cleanup_container(&container.id).await?;
            }
        }
        let Some(container) = followed else {
            self.cleanup_job(job).await?;
            append_note(log, "the job never started (the node stopped while starting it)");
            return Err(ExecError::JobNotFound { job: *job });
        };
        let cid = container.id.clone();
        if let Some(why) = match container.labels.get(LABEL_ENDED_BY).map(String::as_str) {
            Some("killed") => Some(EndedBy::Killed),
            Some("timeout") => Some(EndedBy::Timeout),
            _ => None,
        } {
            guard(&self.shared.ended_by).insert(*job, why);
        }
        let deadline = container
            .labels
            .get(LABEL_DEADLINE)
            .and_then(|d| d.parse().ok())
            .map_or_else(now, Timestamp::from_millis);
        let started_at = timestamp(container.created_at).unwrap_or_else(now);
        let outcome = self.finish(job, &cid, deadline, started_at, log).await?;
        note_outcome(log, &outcome, Duration::ZERO);
        Ok(outcome)
    }

    async fn running_jobs(&self) -> Result<Vec<JobId>, ExecError> {
        let resp = self
            .api
            .containers()
            .list(self.api.req(ListContainersRequest {
                filters: vec![format!("labels.{}", quote(LABEL_JOB))],
            }))
            .await
            .map_err(err("Containers.List"))?;
        let mut jobs: Vec<JobId> = resp
            .into_inner()
            .containers
            .iter()
            .filter_map(|c| c.labels.get(LABEL_JOB)?.parse().ok())
            .collect();
        jobs.sort();
        jobs.dedup();
        Ok(jobs)
    }

    async fn kill_job(&self, job: &JobId) -> Result<(), ExecError> {
        let containers = self.job_containers(job).await?;
        if containers.is_empty() {
            // Not created yet (or gone): a start in progress acts on the mark.
            guard(&self.shared.ended_by).insert(*job, EndedBy::Killed);
            return Err(ExecError::JobNotFound { job: *job });
        }
        let mut result = Ok(());
        for container in containers {
            if let Err(e) = self.mark_and_kill(job, &container.id, EndedBy::Killed).await {
                result = Err(e);
            }
        }
        result
    }
}

fn already_has_container(job: &JobId) -> ExecError {
    ExecError::BadJob {
        detail: format!(
            "job {job} already has a container in containerd; reattach to it or clean it up"
        ),
    }
}

fn note_outcome(log: &Path, outcome: &JobOutcome, timeout: Duration) {
    match outcome.exit {
        ExitStatus::TimedOut if timeout > Duration::ZERO => {
            append_note(log, &format!("the job was killed after its timeout of {timeout:?}"));
        }
        ExitStatus::TimedOut => append_note(log, "the job was killed after its timeout"),
        ExitStatus::OutOfMemory => append_note(log, "the job exceeded its memory limit"),
        ExitStatus::Killed(_) => append_note(log, "the job was aborted"),
        ExitStatus::Exited(_) => {}
    }
}

/// Subscribes to the namespace's `/tasks/oom` and `/tasks/exit` events (again after any
/// break) and records them; `ready` fires when the first subscription is confirmed live.
async fn event_loop(api: Api, shared: Arc<Shared>, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let ns = quote(api.namespace());
    let filters: Vec<String> = ["/tasks/oom", "/tasks/exit", PING_TOPIC]
        .iter()
        .map(|t| format!("namespace=={ns},topic=={}", quote(t)))
        .collect();
    loop {
        let mut client = api.events();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut live = false;
        let subscribe = client.subscribe(api.req(SubscribeRequest { filters: filters.clone() }));
        let mut subscribe = std::pin::pin!(subscribe);
        // Subscribe answers with the first event: ping until it does.
        let stream = loop {
            tokio::select! {
                r = &mut subscribe => break r,
                _ = tick.tick() => ping(&api).await,
            }
        };
        if let Ok(resp) = stream {
            let mut stream = resp.into_inner();
            loop {
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(env)) => {
                            if env.topic == PING_TOPIC {
                                live = true;
                                if let Some(r) = ready.take() {
                                    let _ = r.send(());
                                }
                            } else {
                                record(&shared, &env.topic, env.event);
                            }
                        }
                        _ => break,
                    },
                    _ = tick.tick(), if !live => ping(&api).await,
                }
            }
        }
        tracing::debug!("containerd event subscription ended; subscribing again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn ping(api: &Api) {
    let event = prost_types::Any {
        type_url: "containerd.events.TaskOOM".into(),
        value: TaskOom { container_id: "kaapana-node-ping".into() }.encode_to_vec(),
    };
    let _ = api
        .events()
        .publish(api.req(PublishRequest { topic: PING_TOPIC.into(), event: Some(event) }))
        .await;
}

fn record(shared: &Shared, topic: &str, event: Option<prost_types::Any>) {
    let Some(event) = event else { return };
    let (cid, oom) = match topic {
        "/tasks/oom" => match TaskOom::decode(event.value.as_slice()) {
            Ok(e) => (e.container_id, true),
            Err(_) => return,
        },
        "/tasks/exit" => match TaskExit::decode(event.value.as_slice()) {
            Ok(e) if e.id.is_empty() || e.id == e.container_id => (e.container_id, false),
            _ => return,
        },
        _ => return,
    };
    if !cid.starts_with("kn-") {
        return;
    }
    {
        let mut seen = guard(&shared.seen);
        let entry = seen.entry(cid).or_default();
        if oom {
            if entry.oom {
                return; // they repeat, often thousands of times
            }
            entry.oom = true;
        } else {
            entry.exited = true;
        }
    }
    shared.changed.send_modify(|n| *n = n.wrapping_add(1));
}

impl Executor for ContainerdExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Containerd
    }

    fn pull<'a>(
        &'a self,
        reference: &'a str,
        image: &'a ImageDigest,
        insecure_http: bool,
    ) -> BoxFuture<'a, Result<ImageDigest, ExecError>> {
        Box::pin(self.pull_image(reference, image, insecure_http))
    }

    fn run(&self, job: JobRun) -> BoxFuture<'_, Result<JobOutcome, ExecError>> {
        self.run_job(job).boxed()
    }

    fn kill<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>> {
        self.kill_job(job).boxed()
    }

    fn has_image<'a>(&'a self, image: &'a ImageDigest) -> BoxFuture<'a, Result<bool, ExecError>> {
        async move {
            match image::resolve(&self.api, image).await {
                Ok(r) => {
                    guard(&self.shared.images).insert(*image, r);
                    Ok(true)
                }
                Err(ExecError::ImageNotFound { .. }) => {
                    guard(&self.shared.images).remove(image);
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn running(&self) -> BoxFuture<'_, Result<Vec<JobId>, ExecError>> {
        self.running_jobs().boxed()
    }

    fn reattach<'a>(
        &'a self,
        job: &'a JobId,
        log: &'a Path,
    ) -> BoxFuture<'a, Result<JobOutcome, ExecError>> {
        self.reattach_job(job, log).boxed()
    }

    fn cleanup<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>> {
        self.cleanup_job(job).boxed()
    }
}

/// Whether a containerd container id is that of a job: `kn-`, 32 hex digits, `-` and 8 hex
/// digits (or without the start nonce, as node versions before issue 19 named them).
pub fn is_job_container(id: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    match id.strip_prefix("kn-").map(|rest| rest.split_once('-')) {
        Some(Some((job, nonce))) => job.len() == 32 && hex(job) && nonce.len() == 8 && hex(nonce),
        Some(None) => id.len() == 3 + 32 && hex(&id[3..]),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_to_statuses() {
        assert_eq!(classify(0, None, false), ExitStatus::Exited(0));
        assert_eq!(classify(137, Some(EndedBy::Timeout), false), ExitStatus::TimedOut);
        assert_eq!(classify(137, Some(EndedBy::Killed), true), ExitStatus::Killed(9));
        assert_eq!(classify(0, Some(EndedBy::Timeout), false), ExitStatus::Exited(0));
        assert_eq!(classify(137, None, true), ExitStatus::OutOfMemory);
        assert_eq!(classify(0, None, true), ExitStatus::OutOfMemory);
        assert_eq!(classify(137, None, false), ExitStatus::Exited(137));
    }

    #[test]
    fn container_ids_name_the_job_and_differ_per_start() {
        let job = JobId::from_bytes([0xab; 16]);
        let cid = new_container_id(&job);
        let prefix = format!("kn-{}-", "ab".repeat(16));
        assert!(cid.starts_with(&prefix), "{cid}");
        assert_eq!(cid.len(), prefix.len() + 8);
        assert!(is_job_container(&cid));
        assert_ne!(new_container_id(&job), cid, "a second start gets another id");
        assert!(is_job_container(&format!("kn-{}", "ab".repeat(16))), "the older form");
        assert!(!is_job_container(&format!("kn-{}-xyz", "ab".repeat(16))));
        assert!(!is_job_container("kaapana-node-ping"));
    }
}
