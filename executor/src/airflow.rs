//! Jobs as Airflow DAG runs: [`AirflowExecutor`], through Airflow's stable REST API.
//!
//! A job whose work is a DAG run is triggered as one run of that DAG (`POST
//! /api/v2/dags/{dag_id}/dagRuns` on Airflow 3, with a JWT from `POST /auth/token`;
//! `/api/v1/...` with basic authentication on Airflow 2, which Kaapana 0.6 ships). Its run id
//! is derived from the job ([`run_id`]: `kaapana-node-<job id>-<attempt>`), so a trigger after
//! a restart of the node is answered `409 Conflict` and the executor follows the existing run
//! instead of starting a second one. The run's `conf` is the manifest's conf with the node's
//! own key `kaapana_node` ([`dag_conf`]): the job, the input folder, the output folder and
//! Kaapana's `data_form` (the dataset's identifiers and name).
//!
//! The executor polls the run every [`AirflowConfig::poll_interval`] and reports at once: the
//! first `running` through [`DagRunJob::on_running`], the end as a [`JobOutcome`] (`success`
//! → `Exited(0)`; `failed` → `Exited(1)` with the failed tasks, their states and the error
//! their logs name, see [`failure_detail`]). [`Executor::kill`] marks the run `failed`; a run
//! past its timeout is marked `failed` too and reported `TimedOut`. A line per state change
//! and, at the end, the task instances' logs go to the job's log.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use kaapana_protocol::{
    DAG_CONF_NODE_KEY, ExecutorKind, ExitStatus, ImageDigest, JobId, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ExecError, Executor, JobOutcome, JobRun, JobWork};

/// The prefix of every DAG run id the node triggers.
pub const RUN_ID_PREFIX: &str = "kaapana-node-";

/// The DAG run id of a job's attempt: `kaapana-node-<job id>-<attempt>`.
pub fn run_id(job: &JobId, attempt: u32) -> String {
    format!("{RUN_ID_PREFIX}{job}-{attempt}")
}

/// The job of a DAG run id made by [`run_id`], if it is one.
pub fn job_of_run_id(run_id: &str) -> Option<(JobId, u32)> {
    let rest = run_id.strip_prefix(RUN_ID_PREFIX)?;
    let (job, attempt) = rest.rsplit_once('-')?;
    Some((job.parse().ok()?, attempt.parse().ok()?))
}

/// Which REST API the site's Airflow speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiVersion {
    /// Ask the server (`/api/v2/version`, then `/api/v1/version`).
    #[default]
    Auto,
    /// Airflow 2: `/api/v1`, basic authentication.
    V1,
    /// Airflow 3: `/api/v2`, a JWT from `/auth/token`.
    V2,
}

/// How to reach the site's Airflow and where it sees the node's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AirflowConfig {
    /// The Airflow web server / API server, e.g. `http://127.0.0.1:8080` (plain HTTP: keep it
    /// on loopback or the site's trusted network).
    pub url: String,
    /// Which API to use.
    pub api_version: ApiVersion,
    /// The Airflow user the node acts as.
    pub user: String,
    /// Its password (read once, when the executor starts).
    pub password: String,
    /// Path prefixes as the node sees them → as Airflow's workers see them (e.g. the node's
    /// data directory mounted elsewhere in Airflow's containers); the first matching prefix
    /// is replaced. Empty: Airflow sees the node's paths as they are (one machine).
    pub path_map: Vec<(PathBuf, PathBuf)>,
    /// How often a run's state is read.
    pub poll_interval: Duration,
}

/// Called once when a DAG run is first seen `running`; the executor waits for it, so that
/// whatever it reports comes before the run's end.
#[derive(Clone)]
pub struct RunningHook(pub Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>);

impl fmt::Debug for RunningHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunningHook")
    }
}

impl PartialEq for RunningHook {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for RunningHook {}

/// A job's DAG run: which DAG, its conf, and what the node tells the DAG about the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DagRunJob {
    /// The DAG.
    pub dag_id: String,
    /// The manifest's conf, a JSON object as text.
    pub conf: String,
    /// The job's attempt (part of the run id).
    pub attempt: u32,
    /// The job's workflow.
    pub workflow_id: String,
    /// The workflow's owner (its instance id).
    pub owner: String,
    /// The dataset's name at this site, if the job reads one.
    pub dataset_name: Option<String>,
    /// The dataset's items the job reads (DICOM series instance UIDs, or folder names).
    pub identifiers: Vec<String>,
    /// Told when the run is first `running`.
    pub on_running: Option<RunningHook>,
}

/// `path` as Airflow sees it: absolute, with the first matching prefix of `map` replaced.
fn airflow_path(path: &Path, map: &[(PathBuf, PathBuf)]) -> Result<String, ExecError> {
    let abs = std::path::absolute(path).map_err(|e| ExecError::io(path, e))?;
    let mapped = map
        .iter()
        .find_map(|(from, to)| abs.strip_prefix(from).ok().map(|rest| to.join(rest)))
        .unwrap_or(abs);
    mapped.into_os_string().into_string().map_err(|p| ExecError::BadJob {
        detail: format!("{} is not UTF-8, which a DAG run's conf cannot carry", p.display()),
    })
}

/// The conf a job's DAG run gets: the manifest's object plus `kaapana_node` = `{job_id,
/// workflow_id, owner, attempt, run_id, input, output, upstream, data_form: {identifiers,
/// dataset_name}}`, paths as Airflow sees them.
pub fn dag_conf(
    job: &JobRun,
    run: &DagRunJob,
    path_map: &[(PathBuf, PathBuf)],
) -> Result<Value, ExecError> {
    let mut conf = match serde_json::from_str::<Value>(&run.conf) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(ExecError::BadJob {
                detail: "the job's DAG conf is not a JSON object".into(),
            });
        }
    };
    let input = match &job.input {
        Some(p) => Value::String(airflow_path(p, path_map)?),
        None => Value::Null,
    };
    let mut upstream = serde_json::Map::new();
    for (name, folder) in &job.upstream {
        upstream.insert(name.clone(), Value::String(airflow_path(folder, path_map)?));
    }
    conf.insert(
        DAG_CONF_NODE_KEY.to_owned(),
        json!({
            "job_id": job.job_id.to_string(),
            "workflow_id": run.workflow_id,
            "owner": run.owner,
            "attempt": run.attempt,
            "run_id": run_id(&job.job_id, run.attempt),
            "input": input,
            "output": airflow_path(&job.output, path_map)?,
            "upstream": upstream,
            "data_form": {
                "identifiers": run.identifiers,
                "dataset_name": run.dataset_name,
            },
        }),
    );
    Ok(Value::Object(conf))
}

/// A DAG run's state as Airflow names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Waiting for the scheduler.
    Queued,
    /// Its tasks run.
    Running,
    /// Every task succeeded (or was skipped).
    Success,
    /// A task failed, or the run was marked failed.
    Failed,
    /// A state this executor does not know.
    Other(String),
}

impl RunState {
    /// Parses Airflow's `state` field.
    pub fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "success" => Self::Success,
            "failed" => Self::Failed,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Whether the run has ended.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Success | Self::Failed)
    }
}

/// One task instance of a run, as the REST API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TaskInstance {
    /// The task.
    pub task_id: String,
    /// Its state (`success`, `failed`, `upstream_failed`, `skipped`, ... or none yet).
    #[serde(default)]
    pub state: Option<String>,
    /// Its try (the log's number).
    #[serde(default)]
    pub try_number: u32,
    /// The index of a mapped task (-1 when not mapped).
    #[serde(default = "unmapped")]
    pub map_index: i64,
}

const fn unmapped() -> i64 {
    -1
}

/// The states of a task instance that say it failed.
fn task_failed(state: Option<&str>) -> bool {
    matches!(state, Some("failed" | "upstream_failed" | "up_for_retry"))
}

/// Why a run failed, in words: each failed task with its state and try, and the error its log
/// names (`errors` by task id), e.g. `task process failed (try 1): RuntimeError: no series`.
pub fn failure_detail(
    dag_id: &str,
    run_id: &str,
    tasks: &[TaskInstance],
    errors: &[(String, String)],
) -> String {
    let failed: Vec<String> = tasks
        .iter()
        .filter(|t| task_failed(t.state.as_deref()))
        .map(|t| {
            let state = t.state.as_deref().unwrap_or("failed");
            let mapped =
                if t.map_index >= 0 { format!("[{}]", t.map_index) } else { String::new() };
            let error = errors
                .iter()
                .find(|(task, _)| *task == t.task_id)
                .map(|(_, e)| format!(": {e}"))
                .unwrap_or_default();
            format!("task {}{mapped} {state} (try {}){error}", t.task_id, t.try_number)
        })
        .collect();
    if failed.is_empty() {
        format!("DAG run {run_id} of {dag_id} was marked failed (no task failed)")
    } else {
        format!("DAG run {run_id} of {dag_id} failed: {}", failed.join("; "))
    }
}

/// The error a task's log names: Airflow 3's structured `error_detail` (`RuntimeError: ...`),
/// or, for Airflow 2's text logs, the last `ERROR` line.
pub fn log_error(content: &Value) -> Option<String> {
    match content {
        Value::Array(events) => events.iter().rev().find_map(|e| {
            let details = e.get("error_detail")?.as_array()?;
            let d = details.last()?;
            let kind = d.get("exc_type").and_then(Value::as_str).unwrap_or("error");
            let value = d.get("exc_value").and_then(Value::as_str).unwrap_or_default();
            Some(format!("{kind}: {value}"))
        }),
        Value::String(text) => {
            let text = airflow2_log_text(text);
            // The exception line that ends the last traceback, else the last ERROR line.
            let lines: Vec<&str> = text.lines().collect();
            let traceback =
                lines.iter().rposition(|l| l.contains("Traceback (most recent call last)"));
            let exception = traceback.and_then(|i| {
                lines[i + 1..]
                    .iter()
                    .find(|l| !l.is_empty() && !l.starts_with([' ', '\t']))
                    .map(|l| l.trim().to_owned())
            });
            exception.or_else(|| {
                lines
                    .iter()
                    .rev()
                    .find(|l| l.contains(" ERROR - ") && !l.contains("Task failed with exception"))
                    .map(|l| l.rsplit(" ERROR - ").next().unwrap_or(l).trim().to_owned())
            })
        }
        _ => None,
    }
}

/// Airflow 2's log text: its REST API may give the log as the Python repr of a list of
/// `(host, text)` pairs, with `\n` escaped; that is unescaped here.
fn airflow2_log_text(text: &str) -> String {
    if text.starts_with("[('") && text.contains("\\n") {
        text.replace("\\n", "\n").replace("\\'", "'").replace("\\\\", "\\")
    } else {
        text.to_owned()
    }
}

/// A task log as lines for the job's log.
fn log_lines(content: &Value) -> Vec<String> {
    match content {
        Value::Array(events) => events
            .iter()
            .filter_map(|e| {
                let event = e.get("event")?.as_str()?;
                if event.starts_with("::") {
                    return None;
                }
                let level = e.get("level").and_then(Value::as_str).unwrap_or("info");
                let ts = e.get("timestamp").and_then(Value::as_str).unwrap_or_default();
                let mut line = format!("{ts} {level} {event}");
                if let Some(err) = log_error(&Value::Array(vec![e.clone()])) {
                    line.push_str(&format!(" ({err})"));
                }
                Some(line)
            })
            .collect(),
        Value::String(text) => text.lines().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// What the executor records next to a job's log when it triggers its run, so that a node
/// restarted later finds the run again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RunRecord {
    dag_id: String,
    run_id: String,
    /// When the job's timeout ends (ms since the epoch).
    deadline_ms: u64,
}

fn record_path(log: &Path) -> PathBuf {
    log.with_file_name("airflow-run.json")
}

fn write_record(log: &Path, record: &RunRecord) -> Result<(), ExecError> {
    let path = record_path(log);
    let tmp = path.with_extension("json.tmp");
    let bytes =
        serde_json::to_vec(record).map_err(|e| ExecError::BadJob { detail: e.to_string() })?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| ExecError::io(&path, e))
}

fn read_record(log: &Path) -> Option<RunRecord> {
    std::fs::read(record_path(log)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn append_log(log: &Path, lines: &[String]) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        for l in lines {
            let _ = writeln!(f, "{l}");
        }
    }
}

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Timestamp::from_millis(ms)
}

/// An HTTP request to the API.
enum Req {
    Get,
    Post(Value),
    Patch(Value),
}

/// The blocking REST client (one per executor; its calls run on blocking threads).
#[derive(Debug)]
struct Client {
    base: String,
    config: AirflowConfig,
    agent: ureq::Agent,
    version: Mutex<Option<ApiVersion>>,
    token: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Client {
    fn airflow_err(&self, url: &str, detail: impl Into<String>) -> ExecError {
        ExecError::Airflow { url: url.to_owned(), detail: detail.into() }
    }

    fn send_once(
        &self,
        req: &Req,
        url: &str,
        auth: Option<&str>,
    ) -> Result<(u16, String), ExecError> {
        let unreachable = |e: ureq::Error| {
            self.airflow_err(url, format!("cannot reach it ({e}); is Airflow running there?"))
        };
        let mut resp = match req {
            Req::Get => {
                let mut r = self.agent.get(url).header("Accept", "application/json");
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.call().map_err(unreachable)?
            }
            Req::Post(body) | Req::Patch(body) => {
                let mut r = match req {
                    Req::Patch(_) => self.agent.patch(url),
                    _ => self.agent.post(url),
                }
                .header("Accept", "application/json");
                if let Some(a) = auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(body).map_err(unreachable)?
            }
        };
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        Ok((status, body))
    }

    fn version(&self) -> Result<ApiVersion, ExecError> {
        let known = *lock(&self.version);
        if let Some(v) = known {
            return Ok(v);
        }
        let v = match self.config.api_version {
            ApiVersion::Auto => {
                let url = format!("{}/api/v2/version", self.base);
                match self.send_once(&Req::Get, &url, None)?.0 {
                    200 | 401 | 403 => ApiVersion::V2,
                    _ => {
                        let url = format!("{}/api/v1/version", self.base);
                        match self.send_once(&Req::Get, &url, None)?.0 {
                            200 | 401 | 403 => ApiVersion::V1,
                            status => {
                                return Err(self.airflow_err(
                                    &url,
                                    format!(
                                        "neither /api/v2 nor /api/v1 answers (HTTP {status}); \
                                         is this Airflow's API server, and is its URL right?"
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
            v => v,
        };
        *lock(&self.version) = Some(v);
        Ok(v)
    }

    fn fetch_token(&self) -> Result<String, ExecError> {
        let url = format!("{}/auth/token", self.base);
        let body = json!({"username": self.config.user, "password": self.config.password});
        let (status, text) = self.send_once(&Req::Post(body), &url, None)?;
        if !(200..300).contains(&status) {
            return Err(self.airflow_err(
                &url,
                format!(
                    "refused a token for user {} (HTTP {status}); check `[executor] airflow_user` \
                     and the password file",
                    self.config.user
                ),
            ));
        }
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("access_token")?.as_str().map(str::to_owned))
            .ok_or_else(|| self.airflow_err(&url, "answered without an access_token"))
    }

    /// `path` below the API root (`/dags/...`); 401/403 on Airflow 3 fetch a new token once.
    fn call(&self, req: &Req, path: &str) -> Result<(u16, String), ExecError> {
        let version = self.version()?;
        let api = if version == ApiVersion::V1 { "api/v1" } else { "api/v2" };
        let url = format!("{}/{api}{path}", self.base);
        if version == ApiVersion::V1 {
            use base64::Engine;
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", self.config.user, self.config.password));
            let out = self.send_once(req, &url, Some(&format!("Basic {basic}")))?;
            return self.check_auth(&url, out);
        }
        for fresh in [false, true] {
            // Not a match on the guard itself: its temporary would live through the arms.
            let cached = lock(&self.token).clone();
            let token = match cached {
                Some(t) if !fresh => t,
                _ => {
                    let t = self.fetch_token()?;
                    *lock(&self.token) = Some(t.clone());
                    t
                }
            };
            let out = self.send_once(req, &url, Some(&format!("Bearer {token}")))?;
            if !matches!(out.0, 401 | 403) || fresh {
                return self.check_auth(&url, out);
            }
        }
        Err(self.airflow_err(&url, "unreachable"))
    }

    fn check_auth(&self, url: &str, out: (u16, String)) -> Result<(u16, String), ExecError> {
        match out.0 {
            401 | 403 => Err(self.airflow_err(
                url,
                format!(
                    "refused user {} (HTTP {}); the user needs the rights to trigger and edit DAG \
                     runs",
                    self.config.user, out.0
                ),
            )),
            _ => Ok(out),
        }
    }

    fn json(&self, req: &Req, path: &str) -> Result<Value, ExecError> {
        let (status, body) = self.call(req, path)?;
        if !(200..300).contains(&status) {
            return Err(self.airflow_err(path, format!("HTTP {status}: {}", brief(&body))));
        }
        serde_json::from_str(&body)
            .map_err(|e| self.airflow_err(path, format!("answered no JSON ({e})")))
    }

    /// Checks that the DAG exists and is not paused.
    fn check_dag(&self, dag_id: &str) -> Result<(), ExecError> {
        let (status, body) = self.call(&Req::Get, &format!("/dags/{dag_id}"))?;
        match status {
            404 => Err(self.airflow_err(
                &self.base,
                format!(
                    "has no DAG {dag_id}: is its file in Airflow's dags folder and parsed without \
                     import errors?"
                ),
            )),
            200 => {
                let paused = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("is_paused")?.as_bool())
                    .unwrap_or(false);
                if paused {
                    Err(self.airflow_err(
                        &self.base,
                        format!("DAG {dag_id} is paused: unpause it in Airflow to run its jobs"),
                    ))
                } else {
                    Ok(())
                }
            }
            s => Err(self
                .airflow_err(&self.base, format!("HTTP {s} for DAG {dag_id}: {}", brief(&body)))),
        }
    }

    /// Triggers the run; `false` if a run with that id exists already (409).
    fn trigger(&self, dag_id: &str, run_id: &str, conf: Value) -> Result<bool, ExecError> {
        let mut body = json!({"dag_run_id": run_id, "conf": conf});
        if self.version()? == ApiVersion::V2 {
            body["logical_date"] = Value::Null;
        }
        let path = format!("/dags/{dag_id}/dagRuns");
        let (status, text) = self.call(&Req::Post(body), &path)?;
        match status {
            200 | 201 => Ok(true),
            409 => Ok(false),
            s => Err(self.airflow_err(
                &path,
                format!("refused to trigger DAG {dag_id} (HTTP {s}): {}", brief(&text)),
            )),
        }
    }

    /// The run's state; `None` if there is no such run.
    fn run_state(&self, dag_id: &str, run_id: &str) -> Result<Option<RunState>, ExecError> {
        let path = format!("/dags/{dag_id}/dagRuns/{run_id}");
        let (status, body) = self.call(&Req::Get, &path)?;
        match status {
            404 => Ok(None),
            200 => serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("state")?.as_str().map(RunState::parse))
                .map(Some)
                .ok_or_else(|| self.airflow_err(&path, "answered a DAG run without a state")),
            s => Err(self.airflow_err(&path, format!("HTTP {s}: {}", brief(&body)))),
        }
    }

    fn mark_failed(&self, dag_id: &str, run_id: &str) -> Result<(), ExecError> {
        let path = format!("/dags/{dag_id}/dagRuns/{run_id}");
        let (status, body) = self.call(&Req::Patch(json!({"state": "failed"})), &path)?;
        match status {
            200..=299 | 404 => Ok(()),
            s => Err(self.airflow_err(
                &path,
                format!("refused to mark the run failed (HTTP {s}): {}", brief(&body)),
            )),
        }
    }

    fn tasks(&self, dag_id: &str, run_id: &str) -> Result<Vec<TaskInstance>, ExecError> {
        let path = format!("/dags/{dag_id}/dagRuns/{run_id}/taskInstances");
        let v = self.json(&Req::Get, &path)?;
        serde_json::from_value(v.get("task_instances").cloned().unwrap_or(Value::Null))
            .map_err(|e| self.airflow_err(&path, format!("unexpected task instances: {e}")))
    }

    /// A task's log content (Airflow 3: a list of events; Airflow 2: text).
    fn task_log(&self, dag_id: &str, run_id: &str, t: &TaskInstance) -> Option<Value> {
        let mut path = format!(
            "/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{}/logs/{}?full_content=true",
            t.task_id,
            t.try_number.max(1)
        );
        if t.map_index >= 0 {
            path.push_str(&format!("&map_index={}", t.map_index));
        }
        self.json(&Req::Get, &path).ok()?.get("content").cloned()
    }

    /// The ids (and DAGs) of the node's runs that have not ended.
    fn active_runs(&self) -> Result<Vec<(String, String)>, ExecError> {
        let mut out = Vec::new();
        const PAGE: usize = 100;
        for page in 0..1000 {
            let v = if self.version()? == ApiVersion::V1 {
                let body = json!({"states": ["queued", "running"], "page_limit": PAGE,
                                  "page_offset": page * PAGE});
                self.json(&Req::Post(body), "/dags/~/dagRuns/list")?
            } else {
                let path = format!(
                    "/dags/~/dagRuns?run_id_pattern={RUN_ID_PREFIX}&state=queued&state=running\
                     &limit={PAGE}&offset={}",
                    page * PAGE
                );
                self.json(&Req::Get, &path)?
            };
            let runs = v.get("dag_runs").and_then(Value::as_array).cloned().unwrap_or_default();
            for r in &runs {
                let (Some(run), Some(dag)) = (
                    r.get("dag_run_id").and_then(Value::as_str),
                    r.get("dag_id").and_then(Value::as_str),
                ) else {
                    continue;
                };
                if run.starts_with(RUN_ID_PREFIX) {
                    out.push((dag.to_owned(), run.to_owned()));
                }
            }
            if runs.len() < PAGE {
                break;
            }
        }
        Ok(out)
    }
}

fn brief(body: &str) -> String {
    kaapana_protocol::fit_text(&body.chars().take(300).collect::<String>())
}

/// Jobs as DAG runs of the site's Airflow.
#[derive(Debug, Clone)]
pub struct AirflowExecutor {
    client: Arc<Client>,
    /// Jobs [`Executor::kill`] aborted: their end is reported `Killed`.
    killed: Arc<Mutex<HashSet<JobId>>>,
}

impl AirflowExecutor {
    /// An executor for the Airflow at `config.url` (nothing is asked until the first job).
    pub fn new(config: AirflowConfig) -> Result<Self, ExecError> {
        let base = config.url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(ExecError::Airflow {
                url: base,
                detail: "`[executor] airflow_url` must be an http:// URL (https is not supported \
                         yet: keep Airflow's API on loopback or the site's trusted network)"
                    .into(),
            });
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let client =
            Client { base, config, agent, version: Mutex::new(None), token: Mutex::new(None) };
        Ok(Self { client: Arc::new(client), killed: Arc::new(Mutex::new(HashSet::new())) })
    }

    /// The API version the server speaks (asked once).
    pub async fn api_version(&self) -> Result<ApiVersion, ExecError> {
        self.blocking(|c| c.version()).await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, ExecError> + Send + 'static,
    ) -> Result<T, ExecError> {
        let client = Arc::clone(&self.client);
        tokio::task::spawn_blocking(move || f(&client)).await.map_err(|e| ExecError::Airflow {
            url: String::new(),
            detail: format!("the REST call's thread failed: {e}"),
        })?
    }

    async fn run_dag(&self, job: JobRun) -> Result<JobOutcome, ExecError> {
        let JobWork::AirflowDag(run) = &job.work else {
            return Err(ExecError::BadJob {
                detail: "this instance runs Airflow DAGs (executor airflow), not containers".into(),
            });
        };
        if let Some(dir) = job.log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ExecError::io(dir, e))?;
        }
        let conf = dag_conf(&job, run, &self.client.config.path_map)?;
        let run_id = run_id(&job.job_id, run.attempt);
        let deadline = now().saturating_add(job.timeout);
        let record = RunRecord {
            dag_id: run.dag_id.clone(),
            run_id: run_id.clone(),
            deadline_ms: deadline.as_millis(),
        };
        write_record(&job.log, &record)?;
        let dag = run.dag_id.clone();
        let (rid, c) = (run_id.clone(), conf);
        let triggered = self
            .blocking(move |client| {
                client.check_dag(&dag)?;
                client.trigger(&dag, &rid, c)
            })
            .await?;
        let line = if triggered {
            format!("[airflow] triggered DAG {} as run {run_id}", run.dag_id)
        } else {
            format!("[airflow] DAG run {run_id} of {} exists already: following it", run.dag_id)
        };
        append_log(&job.log, &[line]);
        self.follow(&job.job_id, &record, &job.log, run.on_running.as_ref()).await
    }

    /// Polls the run until it ends (marking it failed at its deadline), then appends its task
    /// logs to `log`.
    async fn follow(
        &self,
        job: &JobId,
        record: &RunRecord,
        log: &Path,
        on_running: Option<&RunningHook>,
    ) -> Result<JobOutcome, ExecError> {
        let (dag, run) = (record.dag_id.clone(), record.run_id.clone());
        let deadline = Timestamp::from_millis(record.deadline_ms);
        let mut started_at = None;
        let mut last: Option<RunState> = None;
        let mut timed_out = false;
        let mut aborted = false;
        let mut failures = 0u32;
        let state = loop {
            let (d, r) = (dag.clone(), run.clone());
            let state = match self.blocking(move |c| c.run_state(&d, &r)).await {
                Ok(Some(s)) => {
                    failures = 0;
                    s
                }
                Ok(None) => return Err(ExecError::JobNotFound { job: *job }),
                // Airflow restarting, say: a minute of failed polls before the job fails.
                Err(e) if failures < 120 => {
                    failures += 1;
                    if failures == 1 {
                        append_log(log, &[format!("[airflow] cannot read run {run}: {e}")]);
                    }
                    tokio::time::sleep(self.client.config.poll_interval).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if last.as_ref() != Some(&state) {
                append_log(log, &[format!("[airflow] DAG run {run} of {dag} is {state:?}")]);
                last = Some(state.clone());
            }
            if state == RunState::Running && started_at.is_none() {
                started_at = Some(now());
                if let Some(hook) = on_running {
                    (hook.0)().await;
                }
            }
            if state.is_final() {
                break state;
            }
            if !aborted && lock(&self.killed).contains(job) {
                aborted = true;
                append_log(log, &[format!("[airflow] aborted: marking DAG run {run} failed")]);
                let (d, r) = (dag.clone(), run.clone());
                self.blocking(move |c| c.mark_failed(&d, &r)).await?;
            }
            if !timed_out && now() >= deadline {
                timed_out = true;
                append_log(log, &[format!("[airflow] timeout: marking DAG run {run} failed")]);
                let (d, r) = (dag.clone(), run.clone());
                self.blocking(move |c| c.mark_failed(&d, &r)).await?;
            }
            tokio::time::sleep(self.client.config.poll_interval).await;
        };
        let finished_at = now();
        let started_at = started_at.unwrap_or(finished_at);
        let (d, r) = (dag.clone(), run.clone());
        let (tasks, logs) = self
            .blocking(move |c| {
                let tasks = c.tasks(&d, &r).unwrap_or_default();
                let logs: Vec<(TaskInstance, Option<Value>)> = tasks
                    .iter()
                    .filter(|t| t.state.is_some())
                    .map(|t| (t.clone(), c.task_log(&d, &r, t)))
                    .collect();
                Ok((tasks, logs))
            })
            .await
            .unwrap_or_default();
        let mut errors = Vec::new();
        for (t, content) in &logs {
            let state = t.state.as_deref().unwrap_or("none");
            let mut lines =
                vec![format!("[airflow] task {} ({state}, try {}):", t.task_id, t.try_number)];
            if let Some(c) = content {
                lines.extend(log_lines(c));
                if let Some(e) = log_error(c) {
                    errors.push((t.task_id.clone(), e));
                }
            }
            append_log(log, &lines);
        }
        let killed = lock(&self.killed).remove(job);
        let (exit, detail) = match state {
            RunState::Success => (ExitStatus::Exited(0), None),
            _ if killed => (ExitStatus::Killed(9), Some(format!("DAG run {run} marked failed"))),
            _ if timed_out => (ExitStatus::TimedOut, Some(format!("DAG run {run} marked failed"))),
            _ => (ExitStatus::Exited(1), Some(failure_detail(&dag, &run, &tasks, &errors))),
        };
        let outcome = JobOutcome { exit, started_at, finished_at, detail };
        super::write_exit_record(log, &outcome)
            .map_err(|e| ExecError::io(super::exit_record_path(log), e))?;
        Ok(outcome)
    }

    /// The run of `job`: from its record next to `log`, or found among the active runs.
    async fn find_run(
        &self,
        job: &JobId,
        log: Option<&Path>,
    ) -> Result<Option<RunRecord>, ExecError> {
        if let Some(r) = log.and_then(read_record) {
            return Ok(Some(r));
        }
        let job = *job;
        let runs = self.blocking(|c| c.active_runs()).await?;
        Ok(runs
            .into_iter()
            .find(|(_, r)| job_of_run_id(r).is_some_and(|(j, _)| j == job))
            .map(|(dag_id, run_id)| RunRecord { dag_id, run_id, deadline_ms: u64::MAX }))
    }
}

impl Executor for AirflowExecutor {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Airflow
    }

    fn run(&self, job: JobRun) -> BoxFuture<'_, Result<JobOutcome, ExecError>> {
        Box::pin(self.run_dag(job))
    }

    fn kill<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>> {
        Box::pin(async move {
            // Remembered first: a run triggered after this (a cancel that came while the job
            // was staging its data) is marked failed by `follow` as soon as it is seen.
            lock(&self.killed).insert(*job);
            let Some(record) = self.find_run(job, None).await? else {
                return Err(ExecError::JobNotFound { job: *job });
            };
            self.blocking(move |c| c.mark_failed(&record.dag_id, &record.run_id)).await
        })
    }

    fn has_image<'a>(&'a self, _image: &'a ImageDigest) -> BoxFuture<'a, Result<bool, ExecError>> {
        Box::pin(async { Ok(false) })
    }

    fn running(&self) -> BoxFuture<'_, Result<Vec<JobId>, ExecError>> {
        Box::pin(async move {
            let runs = self.blocking(|c| c.active_runs()).await?;
            Ok(runs.iter().filter_map(|(_, r)| job_of_run_id(r).map(|(j, _)| j)).collect())
        })
    }

    fn reattach<'a>(
        &'a self,
        job: &'a JobId,
        log: &'a Path,
    ) -> BoxFuture<'a, Result<JobOutcome, ExecError>> {
        Box::pin(async move {
            let Some(record) = self.find_run(job, Some(log)).await? else {
                return Err(ExecError::JobNotFound { job: *job });
            };
            append_log(
                log,
                &[format!("[airflow] node restarted: following DAG run {}", record.run_id)],
            );
            self.follow(job, &record, log, None).await
        })
    }

    fn cleanup<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, Result<(), ExecError>> {
        // Airflow keeps the run in its history; only a run that still runs is stopped.
        Box::pin(async move {
            match self.find_run(job, None).await? {
                Some(r) => self.blocking(move |c| c.mark_failed(&r.dag_id, &r.run_id)).await,
                None => Ok(()),
            }
        })
    }

    fn pull<'a>(
        &'a self,
        _reference: &'a str,
        image: &'a ImageDigest,
        _insecure_http: bool,
    ) -> BoxFuture<'a, Result<ImageDigest, ExecError>> {
        Box::pin(async move {
            Err(ExecError::BadJob {
                detail: format!(
                    "image {image}: this instance runs Airflow DAGs (executor airflow), not \
                     container images"
                ),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(input: Option<&str>) -> (JobRun, DagRunJob) {
        let run = DagRunJob {
            dag_id: "kaapana-test".into(),
            conf: r#"{"greeting": "hello", "n": 3}"#.into(),
            attempt: 2,
            workflow_id: "w1".into(),
            owner: "12D3KooOwner".into(),
            dataset_name: Some("lung-ct".into()),
            identifiers: vec!["1.2.840.1".into(), "1.2.840.2".into()],
            on_running: None,
        };
        let j = JobRun {
            job_id: JobId::from_bytes([0xab; 16]),
            work: JobWork::AirflowDag(run.clone()),
            input: input.map(PathBuf::from),
            upstream: vec![("prep".into(), PathBuf::from("/data/jobs/x/inputs/prep"))],
            output: PathBuf::from("/data/jobs/x/output"),
            log: PathBuf::from("/data/jobs/x/job.log"),
            limits: kaapana_protocol::ResourceLimits::default(),
            timeout: Duration::from_secs(60),
        };
        (j, run)
    }

    #[test]
    fn run_ids_derive_from_the_job_and_attempt_and_parse_back() {
        let id = JobId::from_bytes([0xab; 16]);
        let r = run_id(&id, 3);
        assert_eq!(r, format!("kaapana-node-{}-3", "ab".repeat(16)));
        assert_eq!(job_of_run_id(&r), Some((id, 3)));
        assert_eq!(run_id(&id, 3), r, "the same job gives the same id after a restart");
        assert_ne!(run_id(&id, 4), r);
        for other in ["manual__2024-01-01", "kaapana-node-zz-1", "kaapana-node-abab", ""] {
            assert_eq!(job_of_run_id(other), None, "{other}");
        }
    }

    #[test]
    fn conf_is_the_manifests_object_with_the_nodes_key() {
        let (j, run) = job(Some("/data/jobs/x/input"));
        let conf = dag_conf(&j, &run, &[]).unwrap();
        assert_eq!(conf["greeting"], "hello");
        assert_eq!(conf["n"], 3);
        let node = &conf["kaapana_node"];
        assert_eq!(node["job_id"], "ab".repeat(16));
        assert_eq!(node["workflow_id"], "w1");
        assert_eq!(node["owner"], "12D3KooOwner");
        assert_eq!(node["run_id"], run_id(&j.job_id, 2));
        assert_eq!(node["input"], "/data/jobs/x/input");
        assert_eq!(node["output"], "/data/jobs/x/output");
        assert_eq!(node["upstream"]["prep"], "/data/jobs/x/inputs/prep");
        assert_eq!(node["data_form"]["identifiers"], json!(["1.2.840.1", "1.2.840.2"]));
        assert_eq!(node["data_form"]["dataset_name"], "lung-ct");

        let (j, run) = job(None);
        let map = [(PathBuf::from("/data"), PathBuf::from("/kaapana/mounted/node"))];
        let conf = dag_conf(&j, &run, &map).unwrap();
        assert_eq!(conf["kaapana_node"]["input"], Value::Null);
        assert_eq!(conf["kaapana_node"]["output"], "/kaapana/mounted/node/jobs/x/output");

        let bad = DagRunJob { conf: "[1]".into(), ..run };
        assert!(matches!(dag_conf(&j, &bad, &[]), Err(ExecError::BadJob { .. })));
    }

    #[test]
    fn states_map_and_failures_name_the_task_its_state_and_error() {
        assert_eq!(RunState::parse("queued"), RunState::Queued);
        assert_eq!(RunState::parse("running"), RunState::Running);
        assert!(RunState::parse("success").is_final());
        assert!(RunState::parse("failed").is_final());
        assert!(!RunState::parse("queued").is_final());
        assert_eq!(RunState::parse("restarting"), RunState::Other("restarting".into()));

        let tasks: Vec<TaskInstance> = serde_json::from_value(json!([
            {"task_id": "fetch", "state": "success", "try_number": 1},
            {"task_id": "process", "state": "failed", "try_number": 2},
            {"task_id": "report", "state": "upstream_failed", "try_number": 0},
            {"task_id": "later", "state": null, "try_number": 0}
        ]))
        .unwrap();
        let errors = vec![("process".to_owned(), "RuntimeError: no series".to_owned())];
        assert_eq!(
            failure_detail("d", "r", &tasks, &errors),
            "DAG run r of d failed: task process failed (try 2): RuntimeError: no series; task \
             report upstream_failed (try 0)"
        );
        assert_eq!(
            failure_detail("d", "r", &tasks[..1], &[]),
            "DAG run r of d was marked failed (no task failed)"
        );
    }

    #[test]
    fn log_errors_from_airflow_3_events_and_airflow_2_text() {
        let v3 = json!([
            {"event": "Filling up the DagBag", "level": "info"},
            {"event": "Task failed with exception", "level": "error",
             "error_detail": [{"exc_type": "RuntimeError", "exc_value": "no series of CT found"}]}
        ]);
        assert_eq!(log_error(&v3).as_deref(), Some("RuntimeError: no series of CT found"));
        let lines = log_lines(&v3);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("RuntimeError: no series of CT found"), "{lines:?}");
        let v2 = Value::String(
            "[2024-01-01] {taskinstance.py:1} ERROR - Task failed with exception\n\
             [2024-01-01] {taskinstance.py:2} ERROR - RuntimeError: no series\n\
             [2024-01-01] {taskinstance.py:3} INFO - Marking task as FAILED."
                .into(),
        );
        assert_eq!(log_error(&v2).as_deref(), Some("RuntimeError: no series"));
        // As Airflow 2.11 writes it: the exception after its traceback, and as the repr of
        // (host, text) pairs its REST API may return.
        let real = "[2026-12-07] {taskinstance.py:3313} ERROR - Task failed with exception\n\
                    Traceback (most recent call last):\n  File \"/dag.py\", line 3, in process\n\
                    \x20   raise RuntimeError(conf[\"fail\"])\nRuntimeError: no series\n\
                    [2026-12-07] {taskinstance.py:1226} INFO - Marking task as FAILED.";
        assert_eq!(
            log_error(&Value::String(real.into())).as_deref(),
            Some("RuntimeError: no series")
        );
        let repr = format!("[('host', '{}')]", real.replace('\n', "\\n"));
        assert_eq!(log_error(&Value::String(repr)).as_deref(), Some("RuntimeError: no series"));
        assert_eq!(log_error(&json!([{"event": "ok"}])), None);
    }
}
