//! [`KubernetesExecutor`] (feature `kubernetes`): jobs as `batch/v1` Jobs in a namespace of
//! the site's cluster, through kube-rs.
//!
//! A job becomes two objects named `kn-<job id>` ([`objects::job_name`]), both labelled
//! `app.kubernetes.io/managed-by=kaapana-node` and `kaapana.io/job-id=<id>`: a
//! [`NetworkPolicy`] that denies all ingress and egress of the job's pods, created first, and
//! the [`Job`] ([`job_object`]): one pod, never retried, the image by digest from the
//! configured repository, no service account token, an unprivileged container with a
//! read-only root filesystem, requests and limits from the manifest, `activeDeadlineSeconds`
//! from its timeout, the dataset read-only at `/input`, upstream results at `/input/<name>`
//! and `/output` writable, all as sub-paths of configured volumes ([`DataVolume`]: the node's
//! PersistentVolumeClaim, or host paths on single-node sites) that the node sees at their
//! `local_path`.
//!
//! [`Executor::run`] creates both (a Job that already exists — `409 AlreadyExists` — is the
//! job's own from an earlier attempt and is followed, never duplicated), then watches the Job
//! (a `watch` on the single object, re-established when the server closes it) until its
//! `Complete` or `Failed` condition, while a second task watches the job's pod and follows its
//! log (`follow=true`) into the job's log file. How it ended: `Complete` → `Exited(0)`;
//! `Failed` with reason `DeadlineExceeded` → `TimedOut`; a container terminated with reason
//! `OOMKilled` → `OutOfMemory` (also after `Complete`, as the containerd executor reports a
//! killed child); otherwise `Exited(<the container's exit code>)`; a Job deleted by
//! [`Executor::kill`] (or by anyone) → `Killed(9)`. The outcome is recorded next to the log
//! ([`crate::write_exit_record`]), then the Job is deleted with foreground propagation and
//! awaited until it is gone (so are its pods), and only then the NetworkPolicy.
//!
//! The node finds its Jobs after a restart with [`Executor::running`] (by label) and follows
//! one with [`Executor::reattach`] (its log then follows again from its start, after a note).
//! [`Executor::has_image`] is always true and [`Executor::pull`] refuses: the cluster's nodes
//! pull `<image_repository>@<digest>` themselves when a pod starts.
//!
//! Limits of the mapping: Kubernetes has no overlay mounts, so a job with both a dataset and
//! upstream results needs a folder per upstream name in the dataset (the mount points under
//! the read-only `/input`), or it is refused with a clear error; the NetworkPolicy is only
//! enforced by a network plugin that supports NetworkPolicies. The executor needs, in its
//! namespace: create/get/list/watch/delete on `jobs` and `networkpolicies`, get/list/watch on
//! `pods` and get on `pods/log`.
//!
//! kube's TLS is rustls with ring; [`KubernetesExecutor::from_environment`] installs ring as
//! the process's default rustls provider first (libp2p brings aws-lc-rs too, and rustls
//! panics when it has two and none installed).

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::{AsyncReadExt as _, FutureExt as _, StreamExt as _};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kaapana_protocol::{ExecutorKind, ExitStatus, ImageDigest, JobId, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;

use crate::{ExecError, Executor, JobOutcome, JobRun};

mod error;
pub mod objects;

pub use error::KubernetesError;
use objects::{CONTAINER, LABEL_JOB_ID, job_selector, managed_selector};
pub use objects::{
    DataVolume, KubernetesConfig, VolumeSource, job_name, job_object, network_policy_object,
};

/// How long the server may keep one watch open (it closes it then; the executor watches again).
const WATCH_TIMEOUT_SECS: u32 = 290;
/// How long the log may take to arrive in full after the Job ended.
const LOG_DRAIN: Duration = Duration::from_secs(30);
/// How long a deleted Job (and its pods) may take to go.
const DELETE_WAIT: Duration = Duration::from_secs(120);
/// Watches that fail in a row before the executor gives up.
const MAX_WATCH_FAILURES: u32 = 5;
/// The exit status reported for a Job that was deleted (SIGKILL).
const SIGKILL: u8 = 9;

/// How the wait for a Job ended.
#[derive(Debug)]
enum End {
    /// It has its `Complete` or `Failed` condition.
    Finished(Box<Job>),
    /// It was deleted, or is being deleted.
    Deleted,
    /// [`Executor::kill`] was called.
    Killed,
}

/// State shared by the executor's calls.
#[derive(Debug)]
struct Shared {
    /// Jobs that [`Executor::kill`] was called for.
    killed: Mutex<HashSet<JobId>>,
    /// Jobs whose `run` is between its start and the creation of the Job.
    starting: Mutex<HashSet<JobId>>,
    /// Bumped whenever `killed` changes.
    changed: watch::Sender<u64>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Jobs as `batch/v1` Jobs in a Kubernetes namespace. See the [module docs](self).
#[derive(Clone)]
pub struct KubernetesExecutor {
    config: KubernetesConfig,
    jobs: Api<Job>,
    pods: Api<Pod>,
    policies: Api<NetworkPolicy>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KubernetesExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesExecutor").field("config", &self.config).finish_non_exhaustive()
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

fn timestamp(t: Option<&Time>) -> Option<Timestamp> {
    let ms = t?.0.as_millisecond();
    u64::try_from(ms).ok().map(Timestamp::from_millis)
}

fn append_note(log: &Path, note: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "[kaapana-node] {note}");
    }
}

/// The condition (`Complete` or `Failed`, status `True`) that ends a Job, if it has one.
fn final_condition(job: &Job) -> Option<&k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
}

/// Whether the Job has ended, was deleted or is being deleted.
fn end_of(job: Job) -> Option<End> {
    if job.metadata.deletion_timestamp.is_some() {
        return Some(End::Deleted);
    }
    final_condition(&job)?;
    Some(End::Finished(Box::new(job)))
}

/// The job container's status in a pod: `(terminated, running since, waiting reason)`.
fn container_state(
    pod: &Pod,
) -> (Option<ContainerStateTerminated>, Option<Timestamp>, Option<String>) {
    let Some(status) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER))
    else {
        return (None, None, None);
    };
    let state = status.state.as_ref();
    let terminated = state
        .and_then(|s| s.terminated.clone())
        .or_else(|| status.last_state.as_ref().and_then(|s| s.terminated.clone()));
    let running =
        state.and_then(|s| s.running.as_ref()).and_then(|r| timestamp(r.started_at.as_ref()));
    let waiting = state.and_then(|s| s.waiting.as_ref()).map(|w| {
        let reason = w.reason.clone().unwrap_or_default();
        match &w.message {
            Some(m) if !m.is_empty() => format!("{reason}: {m}"),
            _ => reason,
        }
    });
    (terminated, running, waiting)
}

/// Whether the job's container has started (so its log can be read).
fn container_started(pod: &Pod) -> bool {
    let (terminated, running, _) = container_state(pod);
    terminated.is_some() || running.is_some()
}

/// The newest of the pods.
fn newest(pods: Vec<Pod>) -> Option<Pod> {
    pods.into_iter().max_by(|a, b| {
        let t = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b)).then_with(|| a.name_any().cmp(&b.name_any()))
    })
}

/// How a job ended, from the end of its Job and its pod (if one remains).
fn classify(end: &End, pod: Option<&Pod>, killed: bool) -> (ExitStatus, Option<String>) {
    let job = match end {
        End::Killed => return (ExitStatus::Killed(SIGKILL), None),
        End::Deleted if killed => return (ExitStatus::Killed(SIGKILL), None),
        End::Deleted => {
            return (
                ExitStatus::Killed(SIGKILL),
                Some("the job's Job was deleted outside kaapana-node".into()),
            );
        }
        End::Finished(job) => job,
    };
    let (terminated, _, _) = pod.map(container_state).unwrap_or((None, None, None));
    let oom = terminated.as_ref().and_then(|t| t.reason.as_deref()) == Some("OOMKilled");
    let Some(cond) = final_condition(job) else {
        return (ExitStatus::Killed(SIGKILL), Some("the Job has no final condition".into()));
    };
    if cond.type_ == "Complete" {
        return (if oom { ExitStatus::OutOfMemory } else { ExitStatus::Exited(0) }, None);
    }
    let reason = cond.reason.clone().unwrap_or_default();
    if reason == "DeadlineExceeded" {
        return (ExitStatus::TimedOut, None);
    }
    if oom {
        return (ExitStatus::OutOfMemory, None);
    }
    match terminated {
        Some(t) => (ExitStatus::Exited(t.exit_code), None),
        None => {
            let why = match pod {
                None => "its pod is gone".to_owned(),
                Some(p) => match container_state(p).2 {
                    Some(w) => format!("its container never started ({w})"),
                    None => "its container has no exit status".to_owned(),
                },
            };
            let message = cond.message.clone().unwrap_or_default();
            (
                ExitStatus::Killed(SIGKILL),
                Some(format!("the Job failed ({reason}: {message}) and {why}")),
            )
        }
    }
}

/// Appends everything `reader` yields to `log`; returns whether the stream ended cleanly.
async fn copy_to_log(mut reader: impl futures::AsyncRead + Unpin, log: &Path) -> bool {
    let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) else {
        return false;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return true,
            Ok(n) => {
                if file.write_all(&buf[..n]).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Watches the job's pods until its container has started, then follows its log into `log`
/// until the log ends. Returns whether it followed a log; gives up (false) when `ended` turns
/// true before the container started, or when watching fails repeatedly.
async fn follow_logs(
    pods: Api<Pod>,
    job: JobId,
    log: PathBuf,
    mut ended: watch::Receiver<bool>,
) -> bool {
    let wp = WatchParams::default().labels(&job_selector(&job)).timeout(WATCH_TIMEOUT_SECS);
    let mut failures = 0;
    while failures < MAX_WATCH_FAILURES {
        if *ended.borrow() {
            return false;
        }
        let stream = match pods.watch(&wp, "0").await {
            Ok(s) => s,
            Err(_) => {
                failures += 1;
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                        failures = 0;
                        if container_started(&pod) {
                            let lp = LogParams {
                                container: Some(CONTAINER.into()),
                                follow: true,
                                ..LogParams::default()
                            };
                            return match pods.log_stream(&pod.name_any(), &lp).await {
                                Ok(reader) => {
                                    if !copy_to_log(reader, &log).await {
                                        append_note(&log, "the job's log stream broke off");
                                    }
                                    true
                                }
                                Err(_) => false,
                            };
                        }
                    }
                    Some(Ok(WatchEvent::Error(_)) | Err(_)) => {
                        failures += 1;
                        break;
                    }
                    Some(Ok(_)) => {}
                    None => break,
                },
                r = ended.changed() => {
                    if r.is_err() || *ended.borrow() {
                        return false;
                    }
                }
            }
        }
    }
    false
}

impl KubernetesExecutor {
    /// An executor on this client (its default namespace is not used: the configured one
    /// is). Checks the configuration; makes no call to the cluster.
    pub fn new(client: Client, config: KubernetesConfig) -> Result<Self, KubernetesError> {
        config.validate()?;
        let ns = config.namespace.as_str();
        let (changed, _) = watch::channel(0);
        Ok(Self {
            jobs: Api::namespaced(client.clone(), ns),
            pods: Api::namespaced(client.clone(), ns),
            policies: Api::namespaced(client, ns),
            config,
            shared: Arc::new(Shared {
                killed: Mutex::new(HashSet::new()),
                starting: Mutex::new(HashSet::new()),
                changed,
            }),
        })
    }

    /// An executor with the client configuration of the environment: `KUBECONFIG` (or
    /// `~/.kube/config`), else the pod's service account. Installs ring as the process's
    /// default rustls provider if none is installed.
    pub async fn from_environment(config: KubernetesConfig) -> Result<Self, KubernetesError> {
        config.validate()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_default()
            .await
            .map_err(|e| KubernetesError::Client { detail: e.to_string() })?;
        Self::new(client, config)
    }

    /// An executor with the current context of the kubeconfig file at `path`. Installs ring
    /// as the process's default rustls provider if none is installed.
    pub async fn from_kubeconfig(
        path: &Path,
        config: KubernetesConfig,
    ) -> Result<Self, KubernetesError> {
        config.validate()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client_error = |detail: String| KubernetesError::Client { detail };
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| client_error(format!("{}: {e}", path.display())))?;
        let options = kube::config::KubeConfigOptions::default();
        let client_config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| client_error(format!("{}: {e}", path.display())))?;
        let client = Client::try_from(client_config).map_err(|e| client_error(e.to_string()))?;
        Self::new(client, config)
    }

    /// The executor's settings.
    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    fn api_error(&self, op: String) -> impl FnOnce(kube::Error) -> KubernetesError + '_ {
        move |e| KubernetesError::api(op, &self.config.namespace, &e)
    }

    fn is_killed(&self, job: &JobId) -> bool {
        guard(&self.shared.killed).contains(job)
    }

    /// The job's folders with symlinks resolved, and the volumes' local paths likewise, so
    /// that the lexical mapping of [`job_object`] sees real locations.
    fn resolve(&self, job: &JobRun) -> Result<(JobRun, KubernetesConfig), ExecError> {
        let folder = |what: &str, p: &Path| crate::spec::folder(what, p);
        let mut resolved = job.clone();
        resolved.output = folder("the output", &job.output)?;
        resolved.input = job.input.as_deref().map(|p| folder("the input", p)).transpose()?;
        resolved.upstream = job
            .upstream
            .iter()
            .map(|(n, p)| Ok((n.clone(), folder(&format!("upstream result {n:?}"), p)?)))
            .collect::<Result<_, ExecError>>()?;
        if let Some(input) = &resolved.input {
            for (name, _) in &resolved.upstream {
                if !input.join(name).is_dir() {
                    return Err(ExecError::BadJob {
                        detail: format!(
                            "upstream result {name:?} cannot be mounted at /input/{name} over \
                             the dataset {}: Kubernetes has no overlay mounts and the dataset \
                             (read-only at /input) has no folder {name:?} to mount it on; run \
                             such jobs without a dataset, or on the containerd executor",
                            input.display()
                        ),
                    });
                }
            }
        }
        let mut config = self.config.clone();
        for v in &mut config.volumes {
            v.local_path = v.local_path.canonicalize().map_err(|e| {
                ExecError::from(KubernetesError::Config {
                    detail: format!(
                        "the volume's local_path {} cannot be resolved: {e}",
                        v.local_path.display()
                    ),
                })
            })?;
        }
        Ok((resolved, config))
    }

    async fn run_job(&self, job: JobRun) -> Result<JobOutcome, ExecError> {
        if let Some(dir) = job.log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ExecError::io(dir, e))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&job.log)
            .map_err(|e| ExecError::io(&job.log, e))?;
        let (resolved, config) = self.resolve(&job)?;
        let job_obj = job_object(&resolved, &config)?;
        let policy = network_policy_object(&job.job_id, &config);
        let name = job_name(&job.job_id);
        guard(&self.shared.killed).remove(&job.job_id);
        guard(&self.shared.starting).insert(job.job_id);
        let created = self.create(&job.job_id, &name, &job_obj, &policy, &job.log).await;
        guard(&self.shared.starting).remove(&job.job_id);
        let started = created?;
        if self.is_killed(&job.job_id) {
            // kill() came while the Job was being created.
            self.delete_job(&name).await?;
        }
        let outcome = self.follow(&job.job_id, &job.log, started).await;
        if let Ok(o) = &outcome {
            note_outcome(&job.log, o, job.timeout);
        }
        outcome
    }

    /// Creates the NetworkPolicy, then the Job (an existing Job of this job is adopted).
    /// Returns when the Job was created.
    async fn create(
        &self,
        job: &JobId,
        name: &str,
        job_obj: &Job,
        policy: &NetworkPolicy,
        log: &Path,
    ) -> Result<Timestamp, ExecError> {
        match self.policies.create(&PostParams::default(), policy).await {
            Ok(_) => {}
            Err(e) if error::is_status(&e, 409) => {}
            Err(e) => return Err(self.api_error(format!("create NetworkPolicy {name}"))(e).into()),
        }
        match self.jobs.create(&PostParams::default(), job_obj).await {
            Ok(created) => {
                Ok(timestamp(created.metadata.creation_timestamp.as_ref()).unwrap_or_else(now))
            }
            Err(e) if error::is_status(&e, 409) => {
                let existing =
                    self.jobs.get(name).await.map_err(self.api_error(format!("get Job {name}")))?;
                self.check_ours(job, &existing)?;
                append_note(
                    log,
                    &format!("Job {name} already exists (an earlier attempt): following it"),
                );
                Ok(timestamp(existing.metadata.creation_timestamp.as_ref()).unwrap_or_else(now))
            }
            Err(e) => {
                let err = self.api_error(format!("create Job {name}"))(e);
                if let Err(c) = self.delete_policy(name).await {
                    tracing::warn!(%job, "cannot delete the NetworkPolicy of a Job not created: {c}");
                }
                Err(err.into())
            }
        }
    }

    fn check_ours(&self, job: &JobId, existing: &Job) -> Result<(), KubernetesError> {
        let labels = existing.labels();
        let id = job.to_string();
        if labels.get(LABEL_JOB_ID) == Some(&id)
            && labels.get(objects::LABEL_MANAGED_BY).map(String::as_str)
                == Some(objects::MANAGED_BY)
        {
            return Ok(());
        }
        Err(KubernetesError::NotOurs {
            name: existing.name_any(),
            namespace: self.config.namespace.clone(),
            job: id,
            labels: format!("{labels:?}"),
        })
    }

    /// Waits for the Job's end while following its log, records the outcome next to the log
    /// and cleans up.
    async fn follow(
        &self,
        job: &JobId,
        log: &Path,
        started: Timestamp,
    ) -> Result<JobOutcome, ExecError> {
        let (ended_tx, ended_rx) = watch::channel(false);
        let follower = tokio::spawn(follow_logs(self.pods.clone(), *job, log.to_owned(), ended_rx));
        let end = self.wait_for_end(job).await;
        let _ = ended_tx.send(true);
        let abort = follower.abort_handle();
        let followed = match tokio::time::timeout(LOG_DRAIN, follower).await {
            Ok(Ok(followed)) => followed,
            Ok(Err(_)) => false,
            Err(_) => {
                abort.abort();
                append_note(log, &format!("the job's log did not end within {LOG_DRAIN:?}"));
                true
            }
        };
        let result = match end {
            Ok(end) => self.outcome(job, &end, followed, started, log).await,
            Err(e) => Err(e.into()),
        };
        let result = result.and_then(|outcome| {
            crate::write_exit_record(log, &outcome)
                .map(|()| outcome)
                .map_err(|e| ExecError::io(crate::exit_record_path(log), e))
        });
        let cleaned = self.cleanup_job(job).await;
        let outcome = result?;
        cleaned?;
        Ok(outcome)
    }

    /// Watches the Job until it has ended, is deleted, or [`Executor::kill`] is called.
    async fn wait_for_end(&self, job: &JobId) -> Result<End, KubernetesError> {
        let name = job_name(job);
        let mut changed = self.shared.changed.subscribe();
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(WATCH_TIMEOUT_SECS);
        let mut failures = 0;
        loop {
            let current = self
                .jobs
                .get_opt(&name)
                .await
                .map_err(self.api_error(format!("get Job {name}")))?;
            let Some(current) = current else { return Ok(End::Deleted) };
            let version = current.resource_version().unwrap_or_default();
            if let Some(end) = end_of(current) {
                return Ok(end);
            }
            if self.is_killed(job) {
                return Ok(End::Killed);
            }
            let stream = match self.jobs.watch(&wp, &version).await {
                Ok(s) => s,
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_WATCH_FAILURES {
                        return Err(self.api_error(format!("watch Job {name}"))(e));
                    }
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    event = stream.next() => match event {
                        Some(Ok(WatchEvent::Added(j) | WatchEvent::Modified(j))) => {
                            failures = 0;
                            if let Some(end) = end_of(j) {
                                return Ok(end);
                            }
                        }
                        Some(Ok(WatchEvent::Deleted(_))) => return Ok(End::Deleted),
                        Some(Ok(WatchEvent::Bookmark(_))) => {}
                        // 410 Gone (the version is too old) and the like: get it again.
                        Some(Ok(WatchEvent::Error(s))) => {
                            failures += 1;
                            if failures >= MAX_WATCH_FAILURES {
                                return Err(self.api_error(format!("watch Job {name}"))(
                                    kube::Error::Api(s),
                                ));
                            }
                            break;
                        }
                        Some(Err(e)) => {
                            failures += 1;
                            if failures >= MAX_WATCH_FAILURES {
                                return Err(self.api_error(format!("watch Job {name}"))(e));
                            }
                            break;
                        }
                        None => break,
                    },
                    r = changed.changed() => {
                        if r.is_err() || self.is_killed(job) {
                            return Ok(End::Killed);
                        }
                    }
                }
            }
        }
    }

    /// The outcome, from the Job's end and its pod; reads the pod's log if it was not
    /// followed.
    async fn outcome(
        &self,
        job: &JobId,
        end: &End,
        followed: bool,
        started: Timestamp,
        log: &Path,
    ) -> Result<JobOutcome, ExecError> {
        let lp = ListParams::default().labels(&job_selector(job));
        let pods = self
            .pods
            .list(&lp)
            .await
            .map_err(self.api_error(format!("list pods of Job {}", job_name(job))))?;
        let pod = newest(pods.items);
        if !followed {
            match pod.as_ref().filter(|p| container_started(p)) {
                Some(p) => {
                    let lp =
                        LogParams { container: Some(CONTAINER.into()), ..LogParams::default() };
                    match self.pods.logs(&p.name_any(), &lp).await {
                        Ok(text) => {
                            if let Ok(mut f) =
                                std::fs::OpenOptions::new().create(true).append(true).open(log)
                            {
                                let _ = f.write_all(text.as_bytes());
                            }
                        }
                        Err(e) => append_note(log, &format!("cannot read the job's log: {e}")),
                    }
                }
                None => append_note(
                    log,
                    "the job's container left no log (its pod is gone or never ran)",
                ),
            }
        }
        let (exit, note) = classify(end, pod.as_ref(), self.is_killed(job));
        if let Some(note) = note {
            append_note(log, &note);
        }
        let (terminated, running, _) =
            pod.as_ref().map(container_state).unwrap_or((None, None, None));
        let job_obj = match end {
            End::Finished(j) => Some(j.as_ref()),
            _ => None,
        };
        let status = job_obj.and_then(|j| j.status.as_ref());
        let started_at = terminated
            .as_ref()
            .and_then(|t| timestamp(t.started_at.as_ref()))
            .or(running)
            .or_else(|| status.and_then(|s| timestamp(s.start_time.as_ref())))
            .unwrap_or(started);
        let finished_at = terminated
            .as_ref()
            .and_then(|t| timestamp(t.finished_at.as_ref()))
            .or_else(|| status.and_then(|s| timestamp(s.completion_time.as_ref())))
            .or_else(|| {
                job_obj
                    .and_then(final_condition)
                    .and_then(|c| timestamp(c.last_transition_time.as_ref()))
            })
            .unwrap_or_else(now);
        Ok(JobOutcome { exit, started_at, finished_at: finished_at.max(started_at), detail: None })
    }

    /// Deletes the Job with foreground propagation (its pods go first). Whether it existed.
    async fn delete_job(&self, name: &str) -> Result<bool, KubernetesError> {
        match self.jobs.delete(name, &DeleteParams::foreground()).await {
            Ok(_) => Ok(true),
            Err(e) if error::is_status(&e, 404) => Ok(false),
            Err(e) => Err(self.api_error(format!("delete Job {name}"))(e)),
        }
    }

    async fn delete_policy(&self, name: &str) -> Result<(), KubernetesError> {
        match self.policies.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(e) if error::is_status(&e, 404) => Ok(()),
            Err(e) => Err(self.api_error(format!("delete NetworkPolicy {name}"))(e)),
        }
    }

    /// Waits until the Job is gone (after a foreground delete: its pods are gone too).
    async fn wait_gone(&self, name: &str) -> Result<(), KubernetesError> {
        let wp = WatchParams::default().fields(&format!("metadata.name={name}")).timeout(60);
        let wait = async {
            let mut failures = 0;
            loop {
                let current = self
                    .jobs
                    .get_opt(name)
                    .await
                    .map_err(self.api_error(format!("get Job {name}")))?;
                let Some(current) = current else { return Ok(()) };
                let version = current.resource_version().unwrap_or_default();
                let stream = match self.jobs.watch(&wp, &version).await {
                    Ok(s) => s,
                    Err(e) => {
                        failures += 1;
                        if failures >= MAX_WATCH_FAILURES {
                            return Err(self.api_error(format!("watch Job {name}"))(e));
                        }
                        continue;
                    }
                };
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(WatchEvent::Deleted(_)) => return Ok(()),
                        Ok(WatchEvent::Error(s)) => {
                            failures += 1;
                            if failures >= MAX_WATCH_FAILURES {
                                return Err(self.api_error(format!("watch Job {name}"))(
                                    kube::Error::Api(s),
                                ));
                            }
                            break;
                        }
                        Err(e) => {
                            failures += 1;
                            if failures >= MAX_WATCH_FAILURES {
                                return Err(self.api_error(format!("watch Job {name}"))(e));
                            }
                            break;
                        }
                        Ok(_) => failures = 0,
                    }
                }
            }
        };
        match tokio::time::timeout(DELETE_WAIT, wait).await {
            Ok(r) => r,
            Err(_) => Err(KubernetesError::Api {
                op: format!("delete Job {name}"),
                namespace: self.config.namespace.clone(),
                code: None,
                detail: format!("the Job is still there {DELETE_WAIT:?} after its deletion"),
                hint: "its pods may be stuck terminating: see `kubectl describe` of the Job and \
                       its pods"
                    .into(),
            }),
        }
    }

    /// Deletes the Job (waiting until it and its pods are gone), then the NetworkPolicy.
    async fn cleanup_job(&self, job: &JobId) -> Result<(), ExecError> {
        let name = job_name(job);
        if self.delete_job(&name).await? {
            self.wait_gone(&name).await?;
        }
        self.delete_policy(&name).await?;
        guard(&self.shared.killed).remove(job);
        Ok(())
    }

    async fn kill_job(&self, job: &JobId) -> Result<(), ExecError> {
        guard(&self.shared.killed).insert(*job);
        self.shared.changed.send_modify(|n| *n = n.wrapping_add(1));
        let existed = self.delete_job(&job_name(job)).await?;
        if !existed && !guard(&self.shared.starting).contains(job) {
            guard(&self.shared.killed).remove(job);
            return Err(ExecError::JobNotFound { job: *job });
        }
        Ok(())
    }

    async fn reattach_job(&self, job: &JobId, log: &Path) -> Result<JobOutcome, ExecError> {
        let name = job_name(job);
        let existing =
            self.jobs.get_opt(&name).await.map_err(self.api_error(format!("get Job {name}")))?;
        let Some(existing) = existing else {
            self.delete_policy(&name).await?;
            append_note(log, "the job's Job is gone (the node lost track of it)");
            return Err(ExecError::JobNotFound { job: *job });
        };
        self.check_ours(job, &existing)?;
        append_note(
            log,
            &format!(
                "re-attached to Job {name} after a restart of the node; its log follows from its start"
            ),
        );
        let started = existing
            .status
            .as_ref()
            .and_then(|s| timestamp(s.start_time.as_ref()))
            .or_else(|| timestamp(existing.metadata.creation_timestamp.as_ref()))
            .unwrap_or_else(now);
        let outcome = self.follow(job, log, started).await?;
        note_outcome(log, &outcome, Duration::ZERO);
        Ok(outcome)
    }

    async fn running_jobs(&self) -> Result<Vec<JobId>, ExecError> {
        let lp = ListParams::default().labels(&managed_selector());
        let list = self.jobs.list(&lp).await.map_err(self.api_error("list Jobs".into()))?;
        let mut jobs: Vec<JobId> =
            list.items.iter().filter_map(|j| j.labels().get(LABEL_JOB_ID)?.parse().ok()).collect();
        jobs.sort();
        jobs.dedup();
        Ok(jobs)
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

impl Executor for KubernetesExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Kubernetes
    }

    fn run(&self, job: JobRun) -> BoxFuture<'_, Result<JobOutcome, ExecError>> {
        self.run_job(job).boxed()
    }

    fn kill<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>> {
        self.kill_job(job).boxed()
    }

    /// Always true: the cluster pulls `<image_repository>@<digest>` when the pod starts (a
    /// missing image shows as the pod waiting in `ErrImagePull` until the job's deadline).
    fn has_image<'a>(&'a self, _image: &'a ImageDigest) -> BoxFuture<'a, Result<bool, ExecError>> {
        async { Ok(true) }.boxed()
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

    /// Refused: the node does not pull for the cluster; its nodes pull
    /// `<image_repository>@<digest>` themselves.
    fn pull<'a>(
        &'a self,
        reference: &'a str,
        image: &'a ImageDigest,
        _insecure_http: bool,
    ) -> BoxFuture<'a, Result<ImageDigest, ExecError>> {
        let detail = format!(
            "the Kubernetes executor does not pull images: the cluster's nodes pull {} \
             themselves when the job's pod starts; push the image to that repository (or set \
             `image_repository`)",
            self.config.image_reference(image)
        );
        async move { Err(ExecError::Registry { registry: reference.to_owned(), detail }) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, PodStatus};

    fn job_with(type_: &str, reason: &str) -> End {
        End::Finished(Box::new(Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    reason: Some(reason.into()),
                    ..JobCondition::default()
                }]),
                ..JobStatus::default()
            }),
            ..Job::default()
        }))
    }

    fn pod_terminated(code: i32, reason: &str) -> Pod {
        Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: CONTAINER.into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: code,
                            reason: Some(reason.into()),
                            ..ContainerStateTerminated::default()
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn ends_map_to_exit_statuses() {
        let exit = |end: &End, pod: Option<&Pod>| classify(end, pod, false).0;
        assert_eq!(exit(&job_with("Complete", ""), None), ExitStatus::Exited(0));
        let done = pod_terminated(0, "Completed");
        assert_eq!(exit(&job_with("Complete", ""), Some(&done)), ExitStatus::Exited(0));
        let oom = pod_terminated(137, "OOMKilled");
        assert_eq!(exit(&job_with("Complete", ""), Some(&oom)), ExitStatus::OutOfMemory);
        let deadline = job_with("Failed", "DeadlineExceeded");
        assert_eq!(exit(&deadline, Some(&oom)), ExitStatus::TimedOut);
        assert_eq!(exit(&deadline, None), ExitStatus::TimedOut);
        let failed = job_with("Failed", "BackoffLimitExceeded");
        assert_eq!(exit(&failed, Some(&oom)), ExitStatus::OutOfMemory);
        assert_eq!(exit(&failed, Some(&pod_terminated(3, "Error"))), ExitStatus::Exited(3));
        let (gone, note) = classify(&failed, None, false);
        assert_eq!(gone, ExitStatus::Killed(9));
        assert!(note.is_some_and(|n| n.contains("BackoffLimitExceeded") && n.contains("gone")));
        assert_eq!(exit(&End::Killed, None), ExitStatus::Killed(9));
        let (deleted, note) = classify(&End::Deleted, None, false);
        assert_eq!(deleted, ExitStatus::Killed(9));
        assert!(note.is_some_and(|n| n.contains("outside kaapana-node")));
        assert_eq!(classify(&End::Deleted, None, true), (ExitStatus::Killed(9), None));
    }

    #[test]
    fn only_final_true_conditions_end_a_job() {
        let mut job = Job {
            status: Some(JobStatus {
                conditions: Some(vec![
                    JobCondition {
                        type_: "FailureTarget".into(),
                        status: "True".into(),
                        ..JobCondition::default()
                    },
                    JobCondition {
                        type_: "Failed".into(),
                        status: "False".into(),
                        ..JobCondition::default()
                    },
                ]),
                ..JobStatus::default()
            }),
            ..Job::default()
        };
        assert!(end_of(job.clone()).is_none());
        job.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(matches!(end_of(job), Some(End::Deleted)));
    }
}
