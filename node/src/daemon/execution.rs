//! Running jobs on the node's executor and reporting their progress to the job state
//! machine: image check → started → exited (or executor failure).
//!
//! Each job gets `DATA_DIR/jobs/<job id>/` with `output/` (mounted writable at `/output`) and
//! `job.log` (its stdout and stderr, after the node's own lines about staging its data). Its
//! dataset (see [`crate::datasets`]) is mounted read-only at `/input`; a single-file job sees
//! only its item, at `/input/<item>/`. A DICOMweb dataset's series are staged first (fetched
//! from the PACS through the cache, hard-linked into `input/` of the job's folder, which is
//! removed when the container is gone).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kaapana_federation::Outcome;
use kaapana_protocol::{Header, JobId, JobTimings, ResultManifest, Signed};

use super::driver::JobError;
use super::{EventKind, NodeState, now};
use crate::blobs::BlobStore;
use crate::datasets::JobData;
use crate::executor::airflow::{DagRunJob, RunningHook};
use crate::executor::{JobRun, JobWork};
use crate::net::results::{ResultPart, SendOptions, send_result_part};
use kaapana_protocol::Work;

/// The folder of one job's files.
pub(crate) fn job_dir(state: &NodeState, job: &JobId) -> PathBuf {
    state.files.dir.root().join("jobs").join(job.to_string())
}

/// Starts a scheduled job in the background.
pub(crate) fn start(state: &Arc<NodeState>, job: JobId) {
    let s = Arc::clone(state);
    tokio::spawn(async move {
        if let Err(e) = run(&s, job).await {
            tracing::error!(%job, error = %e, "job execution failed");
        }
    });
}

/// Aborts a running job.
pub(crate) fn kill(state: &Arc<NodeState>, job: JobId) {
    let Some(executor) = state.executor.clone() else { return };
    tokio::spawn(async move {
        if let Err(e) = executor.kill(&job).await {
            tracing::warn!(%job, error = %e, "cannot kill the job's container");
        }
    });
}

async fn fail(state: &Arc<NodeState>, job: JobId, reason: String) -> Result<(), JobError> {
    state.executor_event(job, Outcome::Failed(reason)).await
}

async fn run(state: &Arc<NodeState>, job_id: JobId) -> Result<(), JobError> {
    let record = state.store.runner_job(&job_id)?.ok_or(JobError::NotFound(job_id))?;
    // Verified when it arrived.
    let manifest = record.manifest;
    let Some(executor) = state.executor.clone() else {
        return fail(
            state,
            job_id,
            "this instance runs no executor (no container runtime configured)".into(),
        )
        .await;
    };
    let is_dag = manifest.work.dag_run().is_some();
    let dir = job_dir(state, &job_id);
    // The image check (a pull, if it is missing) and the job's data (staging, fetching and
    // unpacking inputs) are independent: both run at once. The image's verdict comes first,
    // as it did when it was checked first.
    let image = async {
        match manifest.work.container() {
            Some(c) => ensure_image(state, executor.as_ref(), &c.image).await,
            None => Ok(()),
        }
    };
    let (image, data) = tokio::join!(image, prepare_data(state, &manifest, &dir, is_dag));
    if let Err(why) = image {
        if data.is_ok() {
            drop_staged_input(&dir).await;
        }
        return fail(state, job_id, why).await;
    }
    let (input, upstream) = match data {
        Ok(data) => data,
        Err(why) => return fail(state, job_id, why).await,
    };
    // A container runs once it is started; a DAG run reports `running` when Airflow says so.
    if record.job.state != kaapana_protocol::JobState::Running && !is_dag {
        state.executor_event(job_id, Outcome::Started).await?;
    }
    let work = match &manifest.work {
        Work::Container(c) => JobWork::Container {
            image: c.image,
            command: c.command.clone(),
            env: c.env.iter().map(|v| (v.name.clone(), v.value.clone())).collect(),
        },
        Work::AirflowDag(d) => {
            let s = Arc::clone(state);
            let on_running = RunningHook(Arc::new(move || {
                let s = Arc::clone(&s);
                Box::pin(async move {
                    // Already running after a restart: nothing to report.
                    let _ = s.executor_event(job_id, Outcome::Started).await;
                })
            }));
            let identifiers = match &manifest.dataset {
                Some(d) if d.item.is_some() => input.iter().filter_map(|p| file_name(p)).collect(),
                Some(_) => input.as_deref().map(item_folders).unwrap_or_default(),
                None => Vec::new(),
            };
            JobWork::AirflowDag(DagRunJob {
                dag_id: d.dag_id.clone(),
                conf: d.conf.clone(),
                attempt: manifest.attempt,
                workflow_id: manifest.workflow_id.to_string(),
                owner: manifest.owner.to_string(),
                dataset_name: manifest.dataset.as_ref().map(|d| d.name.clone()),
                identifiers,
                on_running: Some(on_running),
            })
        }
    };
    let output = dir.join("output");
    let outcome = executor
        .run(JobRun {
            job_id,
            work,
            input,
            upstream,
            output,
            log: dir.join("job.log"),
            limits: manifest.limits,
            timeout: Duration::from_secs(u64::from(manifest.timeout_secs)),
        })
        .await;
    drop_staged_input(&dir).await;
    match outcome {
        Ok(o) => exited(state, job_id, o).await,
        Err(e) => fail(state, job_id, e.to_string()).await,
    }
}

/// The job's data, before its container starts: its dataset staged at `/input` (or its one
/// item), `output/` created, and its upstream results fetched from the owner (at a runner
/// that is not the owner) and unpacked. Returns the input folder and the upstream folders, or
/// why the job cannot run.
async fn prepare_data(
    state: &Arc<NodeState>,
    manifest: &kaapana_protocol::JobManifest,
    dir: &std::path::Path,
    is_dag: bool,
) -> Result<(Option<PathBuf>, Vec<(String, PathBuf)>), String> {
    // The dataset at /input: a folder dataset as it is (batch), or its one item at
    // /input/<item>/ (single-file); a DICOMweb dataset's series fetched into the job's folder.
    let (input, upstream) = match &manifest.dataset {
        Some(d) => {
            let resolved = state.datasets().resolve(&manifest.owner, &d.name, d.item.as_ref());
            let staged = match resolved {
                Ok(r) => stage(state, dir, r).await,
                Err(e) => Err(e),
            };
            let staged = staged.map_err(|e| {
                // The details (series UIDs, the PACS's URL, files) stay at this site.
                if let crate::datasets::DatasetError::Staging { detail, .. } = &e {
                    tracing::warn!(job = %manifest.job_id, dataset = %d.name, %detail, "staging failed");
                    state.event(
                        EventKind::StagingFailed,
                        Some(&manifest.owner),
                        format!("job {}, dataset {}: {detail}", manifest.job_id, d.name),
                    );
                }
                e.to_string()
            });
            match staged {
                Ok(JobData::Dataset(dir)) => (Some(dir), Vec::new()),
                // A DAG run is told the item's folder as its input.
                Ok(JobData::Item { folder, .. }) if is_dag => (Some(folder), Vec::new()),
                Ok(JobData::Item { item, folder }) => (None, vec![(item, folder)]),
                Err(e) => {
                    return Err(format!(
                        "dataset {} is not available at {}: {e}",
                        d.name, state.name
                    ));
                }
            }
        }
        None => (None, Vec::new()),
    };
    let output = dir.join("output");
    if let Err(e) = std::fs::create_dir_all(&output) {
        return Err(format!("cannot create {}: {e}", output.display()));
    }
    // Upstream results, unpacked from the blob store, at /input/<job name>/; a runner that is
    // not the workflow's owner fetches those it does not hold from the owner first.
    let mut upstream = upstream;
    if !manifest.inputs.is_empty() && manifest.owner != state.instance_id {
        fetch_inputs(state, manifest).await?;
    }
    if !manifest.inputs.is_empty() {
        let (inputs, into) = (manifest.inputs.clone(), dir.join("inputs"));
        let blobs = BlobStore::in_data_dir(&state.files.dir).map_err(|e| e.to_string());
        let unpacked = tokio::task::spawn_blocking(move || unpack_inputs(&blobs?, &inputs, &into))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        upstream.extend(unpacked?);
    }
    Ok((input, upstream))
}

/// The last component of `path` as text.
fn file_name(path: &std::path::Path) -> Option<String> {
    path.file_name().and_then(|n| n.to_str()).map(str::to_owned)
}

/// The names of the item folders of a dataset folder (DICOM series UIDs, for a DICOMweb
/// dataset), sorted: Kaapana's `data_form` identifiers.
fn item_folders(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| file_name(&e.path()))
        .collect();
    names.sort();
    names
}

/// Stages a job's dataset off the async runtime (fetching series from the PACS can take
/// minutes), with progress lines appended to the job's log (`job.log`, which the executor
/// appends to as well).
async fn stage(
    state: &Arc<NodeState>,
    dir: &std::path::Path,
    resolved: crate::datasets::Resolved,
) -> Result<JobData, crate::datasets::DatasetError> {
    let (input, log) = (dir.join("input"), dir.join("job.log"));
    let cache = Arc::clone(&state.pacs_cache);
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| crate::datasets::DatasetError::Io { path: dir.clone(), source: e })?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| crate::datasets::DatasetError::Io { path: log.clone(), source: e })?;
        let ctx = crate::datasets::StageContext { input: &input, cache: &cache };
        let staged = resolved.stage(&ctx, &mut |line| {
            use std::io::Write;
            let _ = writeln!(log, "[kaapana-node] {line}");
        });
        staged.map_err(|e| {
            // What was staged before the failure goes: the job does not run.
            if input.exists() {
                let _ = std::fs::remove_dir_all(&input);
            }
            use std::io::Write;
            let _ = writeln!(log, "[kaapana-node] staging failed: {e}");
            e
        })
    })
    .await
    .map_err(|e| crate::datasets::DatasetError::Io {
        path: PathBuf::from("staging"),
        source: std::io::Error::other(e),
    })?
}

/// Removes the links to staged series in a job's folder once its container is gone, so that
/// the PACS cache's evictions free their space.
async fn drop_staged_input(dir: &std::path::Path) {
    let input = dir.join("input");
    if tokio::fs::try_exists(&input).await.unwrap_or(false) {
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(input)).await;
    }
}

/// A job's container ended: the core records it (with its update for the owner) and asks for
/// its result ([`deliver`]).
async fn exited(
    state: &Arc<NodeState>,
    job_id: JobId,
    o: crate::executor::JobOutcome,
) -> Result<(), JobError> {
    state.executor_event(job_id, Outcome::Exited { exit: o.exit, detail: o.detail }).await
}

/// Packs, signs and delivers a job's result in the background (the core's `DeliverResult`).
pub(crate) fn deliver(
    state: &Arc<NodeState>,
    job: kaapana_federation::RunnerJob,
    exit: kaapana_protocol::ExitStatus,
) {
    let received_at = job.received_at;
    let started_at = job.started_at.unwrap_or(received_at).max(received_at);
    let finished_at = job.finished_at.unwrap_or(started_at).max(started_at);
    let timings = JobTimings { received_at, started_at, finished_at };
    let s = Arc::clone(state);
    tokio::spawn(async move {
        if let Err(e) = deliver_result(&s, &job, exit, timings).await {
            tracing::error!(job = %job.job_id, error = %e, "cannot deliver the result");
            s.event(EventKind::ResultFailed, Some(&job.owner), format!("job {}: {e}", job.job_id));
        }
    });
}

/// Attempts at fetching one input before the job fails (retryably: the owner may run it
/// again).
const INPUT_ATTEMPTS: u32 = 4;

/// Fetches the job's upstream bundles this instance does not hold from the workflow's owner
/// (`/kaapana/inputs/1`), resuming broken transfers; a line per input goes to the job's log.
async fn fetch_inputs(
    state: &Arc<NodeState>,
    manifest: &kaapana_protocol::JobManifest,
) -> Result<(), String> {
    let blobs = BlobStore::in_data_dir(&state.files.dir).map_err(|e| e.to_string())?;
    let log_path = job_dir(state, &manifest.job_id).join("job.log");
    let log = |line: String| {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&log_path) {
            let _ = writeln!(f, "[kaapana-node] {line}");
        }
    };
    for input in &manifest.inputs {
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let control = state.net.stream_control();
            let started = std::time::Instant::now();
            let owner = manifest.owner.peer_id();
            match crate::net::inputs::fetch_input(
                control,
                owner,
                manifest.job_id,
                input.bundle,
                &blobs,
            )
            .await
            {
                Ok((_, o)) => break (o, started.elapsed()),
                Err(e) if e.is_retryable() && attempt < INPUT_ATTEMPTS => {
                    log(format!("input {}: {e}; trying again", input.job_name));
                    tokio::select! {
                        () = state.cancel.cancelled() => return Err("the node is stopping".into()),
                        () = tokio::time::sleep(Duration::from_millis(500 << attempt)) => {}
                    }
                }
                Err(e) => {
                    return Err(format!("input {} of job {}: {e}", input.job_name, input.job_id));
                }
            }
        };
        let line = match outcome.0 {
            crate::net::inputs::FetchOutcome::AlreadyHere => {
                format!(
                    "input {}: {} held here already, not fetched",
                    input.job_name, input.bundle.digest
                )
            }
            crate::net::inputs::FetchOutcome::Fetched { resumed_from, received } => {
                state.metrics.input_bytes_fetched.inc_by(received);
                format!(
                    "input {}: fetched {received} bytes from the owner in {:.2} s{}",
                    input.job_name,
                    outcome.1.as_secs_f64(),
                    if resumed_from > 0 {
                        format!(" (resumed at byte {resumed_from})")
                    } else {
                        String::new()
                    }
                )
            }
        };
        state.event(
            EventKind::InputFetched,
            Some(&manifest.owner),
            format!("job {}: {line}", manifest.job_id),
        );
        log(line);
    }
    Ok(())
}

/// Unpacks each upstream result bundle into `into/<job name>/`; the bundles must be in this
/// instance's blob store (the owner stored them when they came; a runner fetched them with
/// [`fetch_inputs`]).
fn unpack_inputs(
    blobs: &BlobStore,
    inputs: &[kaapana_protocol::InputBundle],
    into: &std::path::Path,
) -> Result<Vec<(String, PathBuf)>, String> {
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        let Some(path) = blobs.path(&input.bundle.digest) else {
            return Err(format!(
                "the result of upstream job {} ({}) is not stored at this instance",
                input.job_name, input.job_id
            ));
        };
        let folder = into.join(&input.job_name);
        if folder.exists() {
            std::fs::remove_dir_all(&folder)
                .map_err(|e| format!("cannot clear {}: {e}", folder.display()))?;
        }
        std::fs::create_dir_all(&folder)
            .map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        tar::Archive::new(file).unpack(&folder).map_err(|e| {
            format!("cannot unpack the result of upstream job {}: {e}", input.job_name)
        })?;
        out.push((input.job_name.clone(), folder));
    }
    Ok(out)
}

/// How long a signed result stays valid (it may wait for an owner that is away).
const RESULT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Packs `/output` as the result bundle, signs the `ResultManifest` and sends bundle (and, if
/// the owner's policy allows, the log) to the owner until it has them. The signed manifest is
/// kept in the job's folder, so that a restart sends the same result again.
async fn deliver_result(
    state: &Arc<NodeState>,
    job: &kaapana_federation::RunnerJob,
    exit: kaapana_protocol::ExitStatus,
    timings: JobTimings,
) -> Result<(), String> {
    let dir = job_dir(state, &job.job_id);
    let share_logs = state.registry().get(&job.owner).is_some_and(|o| o.policy.share_logs);
    let (bundle_path, log_path) = (dir.join("result.tar"), dir.join("job.log"));
    let blobs = BlobStore::in_data_dir(&state.files.dir).map_err(|e| e.to_string())?;
    let (output, bundle_file, log_file) =
        (dir.join("output"), bundle_path.clone(), log_path.clone());
    let (bundle, log) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        pack(&output, &bundle_file)?;
        let bundle = blobs.put_file(&bundle_file).map_err(|e| e.to_string())?;
        let log = if share_logs && log_file.exists() {
            Some(blobs.put_file(&log_file).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok((bundle, log))
    })
    .await
    .map_err(|e| e.to_string())??;
    let manifest = ResultManifest {
        header: Header::new(now(), RESULT_LIFETIME),
        job_id: job.job_id,
        workflow_id: job.workflow_id,
        attempt: job.attempt,
        exit,
        bundle,
        log,
        timings,
    };
    let signed = state.sign(&manifest).map_err(|e| e.to_string())?;
    write_durably(&dir.join("result.manifest"), signed.as_bytes())?;
    if job.owner == state.instance_id {
        // A job of this instance's own workflow: its bundle is in the blob store already.
        state
            .result_stored(job.owner, &signed, &manifest, true)
            .await
            .map_err(|e| e.to_string())?;
        let _ = std::fs::write(dir.join("result.sent"), b"");
        return Ok(());
    }
    send_until_stored(state, job.job_id, job.owner, &signed, &bundle_path, log.map(|_| log_path))
        .await
}

/// Sends a signed result's parts, retrying with backoff while the owner is away.
async fn send_until_stored(
    state: &Arc<NodeState>,
    job_id: JobId,
    owner: kaapana_protocol::InstanceId,
    signed: &Signed<ResultManifest>,
    bundle: &std::path::Path,
    log: Option<PathBuf>,
) -> Result<(), String> {
    let mut parts = vec![(ResultPart::Bundle, bundle.to_path_buf())];
    parts.extend(log.map(|l| (ResultPart::Log, l)));
    let opts = SendOptions::default();
    for (part, file) in parts {
        let mut failures = 0u32;
        loop {
            if state.cancel.is_cancelled() {
                return Err("the node is stopping; the result is sent after its restart".into());
            }
            if !state.registry().is_registered(&owner) {
                return Err("the owner is no longer registered".into());
            }
            let control = state.net.stream_control();
            match send_result_part(control, owner.peer_id(), signed, part, &file, &opts).await {
                Ok(_) => break,
                Err(e) if !e.is_retryable() => {
                    // The owner refuses this result for good (not its job, a replaced attempt,
                    // a digest that does not match): sending it again cannot help.
                    state.event(EventKind::ResultRefused, Some(&owner), format!("{part:?}: {e}"));
                    let _ = std::fs::write(bundle.with_file_name("result.sent"), b"");
                    return Err(format!("the owner refused the result: {e}"));
                }
                Err(e) => {
                    failures += 1;
                    tracing::debug!(%owner, error = %e, "result not delivered yet");
                    if failures.is_multiple_of(10) {
                        state.event(EventKind::ResultRetry, Some(&owner), format!("{part:?}: {e}"));
                    }
                    let backoff = Duration::from_millis(200u64 << failures.min(7))
                        .min(Duration::from_secs(30));
                    tokio::select! {
                        () = state.cancel.cancelled() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }
    let _ = std::fs::write(bundle.with_file_name("result.sent"), b"");
    // Nothing of the store changes when the owner confirms: the audit entry is a commit of
    // its own, right after.
    let detail = format!(
        "to {}: {}, manifest {}",
        state.name_of(&owner),
        state.job_text(&job_id),
        signed.id()
    );
    let audit = crate::audit::AuditRecord::now(crate::audit::AuditKind::ResultSent, job_id, detail);
    if let Err(e) = state.store.write_async(vec![crate::store::WriteOp::Audit(audit)]).await {
        tracing::error!(error = %e, "cannot append the result's delivery to the audit log");
    }
    state.event(EventKind::ResultSent, Some(&owner), format!("job {}", signed.id()));
    Ok(())
}

/// Writes the tar of `output` (paths relative to it, sorted, owner and times zeroed) to `to`.
fn pack(output: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    let file =
        std::fs::File::create(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", output)
        .map_err(|e| format!("cannot pack {}: {e}", output.display()))?;
    let mut w = builder.into_inner().map_err(|e| e.to_string())?;
    std::io::Write::flush(&mut w).map_err(|e| e.to_string())?;
    w.into_inner().map_err(|e| e.to_string())?.sync_all().map_err(|e| e.to_string())
}

fn write_durably(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Resends results that were signed but not confirmed before a restart.
pub(crate) fn resend_results(state: &Arc<NodeState>, job: &kaapana_federation::RunnerJob) {
    let dir = job_dir(state, &job.job_id);
    let (manifest, bundle) = (dir.join("result.manifest"), dir.join("result.tar"));
    if !job.state.is_terminal() || dir.join("result.sent").exists() {
        return;
    }
    if !manifest.exists() {
        // The node stopped after the job's end was recorded but before its result was signed:
        // pack `/output` now.
        if let (Some(exit), Some(_), Some(_)) = (job.exit, job.started_at, job.finished_at) {
            deliver(state, job.clone(), exit);
        }
        return;
    }
    let signed = match std::fs::read(&manifest)
        .map_err(|e| e.to_string())
        .and_then(|b| Signed::<ResultManifest>::from_bytes(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(job = %job.job_id, error = %e, "stored result unreadable");
            return;
        }
    };
    let log =
        signed.verify_stored().ok().and_then(|v| v.payload().log).map(|_| dir.join("job.log"));
    let (s, owner, job_id) = (Arc::clone(state), job.owner, job.job_id);
    tokio::spawn(async move {
        let sent = if owner == s.instance_id {
            match signed.verify_stored() {
                Ok(v) => s
                    .result_stored(owner, &signed, v.payload(), true)
                    .await
                    .map_err(|e| e.to_string())
                    .map(|()| {
                        let _ = std::fs::write(bundle.with_file_name("result.sent"), b"");
                    }),
                Err(e) => Err(e.to_string()),
            }
        } else {
            send_until_stored(&s, job_id, owner, &signed, &bundle, log).await
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "result not resent");
        }
    });
}

/// After a restart: jobs that were scheduled or running are re-attached to their containers
/// (their outcome is then reported as usual), started if they never started, or failed with
/// the reason; the owner always learns a final state.
pub(crate) async fn recover(state: &Arc<NodeState>) {
    use kaapana_protocol::JobState;
    let jobs = match state.store.runner_jobs() {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "cannot read jobs to recover");
            return;
        }
    };
    let held = match &state.executor {
        Some(x) => x.running().await.unwrap_or_default(),
        None => Vec::new(),
    };
    for record in jobs {
        let id = record.job.job_id;
        resend_results(state, &record.job);
        if record.job.state.is_terminal() && !held.contains(&id) {
            // A job that ended while the node stopped before its staged input was removed.
            drop_staged_input(&job_dir(state, &id)).await;
        }
        if record.job.state.is_terminal() && held.contains(&id) {
            // It ended (aborted, say) but the kill was lost with the node: kill it now.
            kill(state, id);
            continue;
        }
        if !matches!(record.job.state, JobState::Scheduled | JobState::Running) {
            continue;
        }
        let result =
            if held.contains(&id) { reattach(state, id).await } else { resume(state, id).await };
        if let Err(e) = result {
            tracing::error!(job = %id, error = %e, "cannot recover job");
        }
    }
}

/// A job that was scheduled or running when the node stopped and whose container is gone:
/// if its executor recorded how it ended (the node stopped between the container's end and
/// the record of it), that outcome is reported and its result delivered; otherwise the
/// container never ran to its end and left nothing behind, so the job starts (again).
async fn resume(state: &Arc<NodeState>, job: JobId) -> Result<(), JobError> {
    let log = job_dir(state, &job).join("job.log");
    match crate::executor::read_exit_record(&log) {
        Some(outcome) => {
            let _ = state.executor_event(job, Outcome::Started).await;
            exited(state, job, outcome).await
        }
        None => {
            if state.executor.is_none() {
                return fail(state, job, "the node restarted without its executor".into()).await;
            }
            start(state, job);
            Ok(())
        }
    }
}

/// Follows a job whose container survived the node's restart to its end.
async fn reattach(state: &Arc<NodeState>, job: JobId) -> Result<(), JobError> {
    let Some(executor) = state.executor.clone() else { return resume(state, job).await };
    let s = Arc::clone(state);
    tokio::spawn(async move {
        let log = job_dir(&s, &job).join("job.log");
        let reattached = executor.reattach(&job, &log).await;
        if !matches!(reattached, Err(crate::executor::ExecError::JobNotFound { .. })) {
            drop_staged_input(&job_dir(&s, &job)).await;
        }
        let result = match reattached {
            Ok(outcome) => {
                // A job scheduled but not yet reported started still goes through `running`.
                let _ = s.executor_event(job, Outcome::Started).await;
                exited(&s, job, outcome).await
            }
            // Created but never started: it left nothing behind, so it starts again.
            Err(crate::executor::ExecError::JobNotFound { .. }) => resume(&s, job).await,
            Err(e) => fail(&s, job, format!("after a restart of the node: {e}")).await,
        };
        if let Err(e) = result {
            tracing::error!(%job, error = %e, "cannot report a re-attached job");
        }
    });
    Ok(())
}

/// The image is in the executor, or pulled from one of the configured repositories; else why
/// not.
async fn ensure_image(
    state: &NodeState,
    executor: &dyn crate::executor::Executor,
    image: &kaapana_protocol::ImageDigest,
) -> Result<(), String> {
    match executor.has_image(image).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => return Err(e.to_string()),
    }
    let cfg = &state.files.config.executor;
    let mut errors = Vec::new();
    for repo in &cfg.pull_from {
        match executor.pull(repo, image, cfg.insecure_registry).await {
            Ok(_) => {
                state.event(EventKind::ImagePulled, None, format!("{image} from {repo}"));
                return Ok(());
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(if errors.is_empty() {
        format!(
            "image {image} is not available at {} and no registry to pull it from is configured",
            state.name
        )
    } else {
        format!(
            "image {image} is not available at {} and could not be pulled: {}",
            state.name,
            errors.join("; ")
        )
    })
}
