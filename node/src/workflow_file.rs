//! Workflow files: a readable TOML form of a [`WorkflowManifest`].
//!
//! A workflow file names the workflow and lists its jobs as `[[job]]` tables. It is checked
//! when it is parsed ([`WorkflowFile::parse`], [`WorkflowFile::load`]); the registered names of
//! instances are resolved to their ids when the manifest is made
//! ([`WorkflowFile::to_manifest`]), which also checks the jobs' dependencies (unknown inputs,
//! cycles). Unknown keys are errors, so a typo is reported with its line instead of silently
//! ignored.
//!
//! ```toml
//! # A federated statistics workflow: one job per site, an aggregation at the owner.
//! name = "federated-statistics"
//!
//! [[job]]
//! name = "site-stats"
//! # where it runs: "owner", an instance's registered name, or a capability query:
//! query = { dataset = "synthetic-ct", pick = "all" }   # also: gpu = true, min_cpu = 0.5, min_memory = "1GiB", pick = "best"
//! dataset = "synthetic-ct"        # optional when the query names it
//! processing = "batch"            # or "single-file" (one job per dataset item)
//! # max_parallel = 2              # single-file only: jobs at once per runner (default 1)
//! image = "sha256:4f2c...64 hex"  # by digest only; a tag is refused with a clear error
//! command = ["/bin/sh", "-c", "..."]
//! env = { BINS = "10" }
//! cpu = 0.5                       # CPU cores (0.5 = 500 millicores)
//! memory = "256MiB"               # B, KiB, MiB, GiB, or KB/MB/GB (decimal); plain integer = bytes
//! timeout = "5m"                  # seconds as integer, or "90s", "5m", "1h"
//! retries = 2                     # retries after a lost runner or executor failure; default 0, at most 10
//!
//! [[job]]
//! name = "aggregate"
//! runner = "owner"
//! inputs = ["site-stats"]
//! image = "sha256:..."
//! command = ["/bin/sh", "-c", "..."]
//!
//! [[job]]
//! # A job of the runner's Airflow (Kaapana's workflows): one run of this DAG.
//! name = "segment"
//! runner = "site-b"
//! dataset = "lung-ct"
//! dag = "total-segmentator"        # the runner's policy must allow this DAG id
//! conf = { task = "total", fast = true }   # the DAG run's conf (any TOML table, sent as JSON)
//! ```
//!
//! Top-level keys:
//! - `name` (required): the workflow's name, 1 to 128 characters from `A-Z a-z 0-9 . _ -`,
//!   not starting with `.` or `-`. Runners allow or refuse workflows by this name.
//! - `[[job]]` (at least one): the steps.
//! - `[rounds]`: makes the workflow a training (federated learning), see below.
//!
//! # Trainings
//! ```toml
//! name = "fedavg"
//!
//! [rounds]
//! rounds = 10                    # the number of the last round
//! min_sites = 2                  # the quorum: updates a round needs
//! round_deadline = "2m"          # from its opening, a round waits this long for slow sites
//! late = "drop"                  # or "fold": a late update joins the next round's aggregation
//! # train = "train"              # the job trained at the sites (default "train")
//! # aggregate = "aggregate"      # the job that aggregates at the owner (default "aggregate")
//! # resume_from = { workflow = "<workflow id>", round = 6 }   # continue from that round's model
//!
//! [[job]]
//! name = "train"
//! query = { dataset = "synthetic-ct", pick = "all" }
//! image = "sha256:..."
//! command = ["/bin/kaapana-fedavg", "train"]
//!
//! [[job]]
//! name = "aggregate"
//! runner = "owner"
//! inputs = ["train"]
//! image = "sha256:..."
//! command = ["/bin/kaapana-fedavg", "aggregate"]
//! ```
//! Each round runs `train` at every site the query selects, with the model of the round
//! before under `/input/aggregate-r<k>/` (nothing in the first round), and `aggregate` at the
//! owner over the round's updates, under `/input/train-r<k>-<n>/`. A train job writes its
//! sample count to `/output/samples`; a count above the items its site advertises for the
//! dataset is refused. Jobs find their round in `KAAPANA_ROUND` (and the last one in
//! `KAAPANA_ROUNDS`). A training has exactly these two jobs. `resume_from` names a training
//! of this instance and one of its completed rounds: the new one starts with the round after
//! it, from its model, and runs up to `rounds`.
//!
//! Keys of a `[[job]]`:
//! - `name` (required): unique in the file, same syntax as the workflow's name. A job reads
//!   the results of its inputs under `/input/<name>/`.
//! - exactly one of `runner` and `query`: `runner = "owner"` runs the job at the workflow's
//!   owner, `runner = "<name>"` at the registered instance of that name (`kaapana-node instance
//!   list`); `query = { ... }` at the instances whose advertised capabilities match: `dataset`
//!   (a dataset of that name), `gpu` (at least one GPU), `min_cpu` (cores), `min_memory` (a
//!   size), and `pick` (required): `"all"` matches or only the `"best"` one.
//! - `dataset`: the dataset the job reads at its runner; defaults to the query's `dataset`.
//! - `processing`: `"batch"` (default, one job for the whole dataset) or `"single-file"` (one
//!   job per dataset item; needs a dataset), with `max_parallel` (default 1) jobs at once per
//!   runner.
//! - exactly one of `image` and `dag`, what the job runs:
//!   - `image`: the image's digest, `sha256:` and 64 lowercase hex digits (`kaapana-node image
//!     list` shows them). Tags are refused: a signed manifest pins exactly the code that runs.
//!     With it, `command` (the command line; empty or left out runs the image's own
//!     entrypoint) and `env` (environment variables, names `[A-Za-z_][A-Za-z0-9_]*`).
//!   - `dag`: the id of a DAG of the runner's Airflow (its executor must be `kind =
//!     "airflow"`), run once for the job; the runner's policy must allow the DAG id. With it,
//!     `conf`: a table that becomes the DAG run's `conf` as a JSON object (at most 16 KiB;
//!     the runner adds the key `kaapana_node` with the job, its input and output folders and
//!     Kaapana's `data_form`, so the table must not have it). TOML dates become strings.
//! - `cpu` (cores, above 0) and `memory` (a size, above 0): limits of the job's container;
//!   left out, the executor's defaults apply.
//! - `timeout`: wall-clock limit (default `"1h"`), after which the job is killed.
//! - `retries`: how often a job is tried again after a retryable failure (its runner was lost
//!   or its executor failed; exit codes are final), default 0, at most
//!   [`MAX_RETRIES`] (10).
//! - `inputs`: names of the jobs whose results this job reads; default none.
//!
//! Sizes are a whole number of bytes, or a string of a whole number and a unit: `B`, `KiB`,
//! `MiB`, `GiB` (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000), e.g. `"256MiB"`.
//! Durations are a whole number of seconds, or a string of a whole number and `s`, `m` or
//! `h`, e.g. `"90s"`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kaapana_protocol::{
    CapabilityQuery, ContainerWork, DagRun, EnvVar, Header, ImageDigest, InstanceId, JobSpec,
    LateUpdates, MAX_NAME_LEN, MAX_RETRIES, Manifest, Pick, Processing, ResourceLimits, ResumeFrom,
    Rounds, RunnerSelector, ValidationError, Work, WorkflowId, WorkflowManifest, validate_name,
};
use serde::Deserialize;

/// The timeout of a job whose file sets none: one hour.
const DEFAULT_TIMEOUT_SECS: u32 = 3600;

/// The `runner` value that selects the workflow's owner.
const OWNER: &str = "owner";

/// Why a workflow file cannot be used. Messages name the file's job and field and say how to
/// fix it.
///
/// Errors that wrap another error include its text in their message (and do not expose it as
/// [`std::error::Error::source`] a second time), so that a whole chain prints each cause once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowFileError {
    /// The file could not be read.
    #[error("cannot read workflow file {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// An error in a file read by [`WorkflowFile::load`].
    #[error("{path}: {error}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: Box<WorkflowFileError>,
    },
    /// The text is not valid TOML, or has unknown, missing or mistyped keys.
    #[error("not a valid workflow file: {detail}")]
    Syntax {
        /// The TOML parser's message (names the key, line and column).
        detail: String,
        /// The line (from 1) the parser stopped at.
        line: Option<usize>,
    },
    /// A key has a value that is not acceptable.
    #[error("{}: {problem}", location(.job, .line, .field))]
    Field {
        /// The job (its `name`), or `None` for a top-level key.
        job: Option<String>,
        /// The line of the job's `name`.
        line: Option<usize>,
        /// The key, e.g. `image` or `query.min_memory`.
        field: &'static str,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The file has no `[[job]]` table.
    #[error("the workflow has no jobs: add at least one [[job]] table")]
    NoJobs,
    /// Two jobs have the same name.
    #[error("two [[job]] tables are named `{name}`: give each job its own name")]
    DuplicateJob {
        /// The name.
        name: String,
    },
    /// A job's `inputs` names no job of the file.
    #[error(
        "job `{job}`, `inputs`: `{input}` is not the name of a [[job]] in this file; inputs name the jobs whose results this job reads"
    )]
    UnknownInput {
        /// The job.
        job: String,
        /// The name in its `inputs`.
        input: String,
    },
    /// The jobs' `inputs` form a cycle.
    #[error(
        "the jobs' `inputs` form a cycle (job `{job}` is on it), so none of them could start; remove an input so that the jobs form a chain"
    )]
    Cycle {
        /// A job on the cycle.
        job: String,
    },
    /// A job's `runner` names no registered instance.
    #[error(
        "job `{job}`, `runner`: `{name}` is not a registered instance; `kaapana-node instance list` shows the registered names (or use runner = \"owner\" or a query)"
    )]
    UnknownInstance {
        /// The job.
        job: String,
        /// The name in its `runner`.
        name: String,
    },
    /// The manifest made from the file fails the protocol's checks for another reason (e.g.
    /// more jobs, arguments or variables than a manifest may carry).
    #[error("the workflow cannot be sent: {error}")]
    Invalid {
        /// The protocol's reason.
        error: ValidationError,
    },
}

impl WorkflowFileError {
    /// The line (from 1) of the file's `text` that this error is about, where it can be told:
    /// where the parser stopped, the job's `name` line, or the job's `inputs` or `runner` line.
    pub fn line_in(&self, text: &str) -> Option<usize> {
        match self {
            Self::Syntax { line, .. } | Self::Field { line, .. } => *line,
            Self::InFile { error, .. } => error.line_in(text),
            Self::DuplicateJob { name } => job_name_lines(text, name).get(1).copied(),
            Self::Cycle { job } => job_name_lines(text, job).first().copied(),
            Self::UnknownInput { job, .. } => key_line_in_job(text, job, "inputs"),
            Self::UnknownInstance { job, .. } => key_line_in_job(text, job, "runner"),
            _ => None,
        }
    }
}

/// The line (from 1) of byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> Option<usize> {
    text.get(..offset).map(|before| before.matches('\n').count() + 1)
}

/// The lines (from 1) of `name = "<job>"` keys inside `[[job]]` tables.
fn job_name_lines(text: &str, job: &str) -> Vec<usize> {
    let mut in_job = false;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_job = t.replace(' ', "") == "[[job]]";
            continue;
        }
        if in_job
            && let Some((key, value)) = t.split_once('=')
            && key.trim() == "name"
            && value.trim().trim_matches(|c| c == '"' || c == '\'') == job
        {
            lines.push(i + 1);
        }
    }
    lines
}

/// The line of `key` in the `[[job]]` table named `job` (or of its `name`, if the key is not
/// found there).
fn key_line_in_job(text: &str, job: &str, key: &str) -> Option<usize> {
    let name_line = *job_name_lines(text, job).first()?;
    let lines: Vec<&str> = text.lines().collect();
    let start = lines[..name_line].iter().rposition(|l| l.trim().starts_with('['))?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim().starts_with('['))
        .map_or(lines.len(), |k| start + 1 + k);
    let found = lines[start + 1..end]
        .iter()
        .position(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == key));
    Some(found.map_or(name_line, |k| start + 2 + k))
}

/// Where a [`WorkflowFileError::Field`] is: "job `x` (line 4), `image`" or "`name`".
fn location(job: &Option<String>, line: &Option<usize>, field: &str) -> String {
    match (job, line) {
        (Some(job), Some(line)) => format!("job `{job}` (line {line}), `{field}`"),
        (Some(job), None) => format!("job `{job}`, `{field}`"),
        (None, _) => format!("`{field}`"),
    }
}

impl From<ValidationError> for WorkflowFileError {
    /// The protocol's reasons in the file's words.
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::DuplicateJob { name } => Self::DuplicateJob { name },
            ValidationError::UnknownInput { job, input } => Self::UnknownInput { job, input },
            ValidationError::Cycle { job } => Self::Cycle { job },
            error => Self::Invalid { error },
        }
    }
}

/// The file as written; every value is checked when it becomes a [`WorkflowFile`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: String,
    #[serde(default)]
    job: Vec<RawJob>,
    rounds: Option<toml::Spanned<RawRounds>>,
}

/// `[rounds]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRounds {
    rounds: i64,
    min_sites: i64,
    round_deadline: toml::Value,
    #[serde(default)]
    late: RawLate,
    train: Option<String>,
    aggregate: Option<String>,
    resume_from: Option<RawResume>,
}

/// `late = "drop" | "fold"`.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawLate {
    #[default]
    Drop,
    Fold,
}

/// `resume_from = { workflow = "...", round = N }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResume {
    workflow: String,
    round: i64,
}

/// A checked `[rounds]`: the rounds (without the model to resume from, which the node looks
/// up) and the training and round to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileRounds {
    rounds: Rounds,
    resume_from: Option<(WorkflowId, u32)>,
    line: Option<usize>,
}

/// One `[[job]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: toml::Spanned<String>,
    runner: Option<String>,
    query: Option<RawQuery>,
    dataset: Option<String>,
    #[serde(default)]
    processing: RawProcessing,
    max_parallel: Option<i64>,
    image: Option<String>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    dag: Option<String>,
    conf: Option<toml::Table>,
    cpu: Option<f64>,
    memory: Option<toml::Value>,
    timeout: Option<toml::Value>,
    retries: Option<i64>,
    #[serde(default)]
    inputs: Vec<String>,
}

/// A job's `query` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    dataset: Option<String>,
    #[serde(default)]
    gpu: bool,
    min_cpu: Option<f64>,
    min_memory: Option<toml::Value>,
    pick: Option<RawPick>,
}

/// `processing = "batch" | "single-file"`.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RawProcessing {
    #[default]
    Batch,
    SingleFile,
}

/// `pick = "all" | "best"`.
#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawPick {
    All,
    Best,
}

/// Where a checked job runs, before instance names are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Runner {
    /// `runner = "owner"`.
    Owner,
    /// `runner = "<registered name>"`.
    Named(String),
    /// `query = { ... }`.
    Query(CapabilityQuery),
}

/// A checked job: its spec (with a placeholder runner) and where it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileJob {
    runner: Runner,
    spec: JobSpec,
}

/// A parsed, checked workflow file, before runner names are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowFile {
    name: String,
    jobs: Vec<FileJob>,
    rounds: Option<FileRounds>,
}

impl WorkflowFile {
    /// Parses TOML text (unknown keys are errors, with line numbers from toml's error).
    pub fn parse(text: &str) -> Result<Self, WorkflowFileError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| WorkflowFileError::Syntax {
            detail: e.to_string().trim_end().to_owned(),
            line: e.span().and_then(|s| line_at(text, s.start)),
        })?;
        validate_name("workflow name", &raw.name).map_err(|e| WorkflowFileError::Field {
            job: None,
            line: None,
            field: "name",
            problem: e.to_string(),
        })?;
        if raw.job.is_empty() {
            return Err(WorkflowFileError::NoJobs);
        }
        let jobs =
            raw.job.into_iter().map(|j| check_job(j, text)).collect::<Result<Vec<_>, _>>()?;
        let mut names = BTreeSet::new();
        for job in &jobs {
            if !names.insert(job.spec.name.as_str()) {
                return Err(WorkflowFileError::DuplicateJob { name: job.spec.name.clone() });
            }
        }
        for job in &jobs {
            if let Some(input) = job.spec.inputs.iter().find(|i| !names.contains(i.as_str())) {
                return Err(WorkflowFileError::UnknownInput {
                    job: job.spec.name.clone(),
                    input: input.clone(),
                });
            }
        }
        let rounds = raw.rounds.map(|r| check_rounds(r, text)).transpose()?;
        Ok(Self { name: raw.name, jobs, rounds })
    }

    /// The training and round a `[rounds]` table's `resume_from` names.
    pub fn resume_from(&self) -> Option<(WorkflowId, u32)> {
        self.rounds.as_ref().and_then(|r| r.resume_from)
    }

    /// Reads and parses a file; errors name the path.
    pub fn load(path: &Path) -> Result<Self, WorkflowFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| WorkflowFileError::Io { path: path.to_owned(), error })?;
        Self::parse(&text)
            .map_err(|e| WorkflowFileError::InFile { path: path.to_owned(), error: Box::new(e) })
    }

    /// The signed-to-be manifest: `resolve` maps an instance's registered name to its id (None
    /// = unknown instance → error listing the name).
    ///
    /// The manifest is validated with `kaapana_protocol::Manifest::validate` (cycles, unknown
    /// inputs, duplicate names) and such errors are reported with the file's words. `resume`
    /// is the model that [`Self::resume_from`] names, which the caller looked up.
    pub fn to_manifest(
        &self,
        workflow_id: WorkflowId,
        owner: InstanceId,
        header: Header,
        resolve: &dyn Fn(&str) -> Option<InstanceId>,
        resume: Option<ResumeFrom>,
    ) -> Result<WorkflowManifest, WorkflowFileError> {
        let jobs = self
            .jobs
            .iter()
            .map(|job| {
                let runner = match &job.runner {
                    Runner::Owner => RunnerSelector::Owner,
                    Runner::Named(name) => {
                        RunnerSelector::Instance(resolve(name).ok_or_else(|| {
                            WorkflowFileError::UnknownInstance {
                                job: job.spec.name.clone(),
                                name: name.clone(),
                            }
                        })?)
                    }
                    Runner::Query(query) => RunnerSelector::Query(query.clone()),
                };
                Ok(JobSpec { runner, ..job.spec.clone() })
            })
            .collect::<Result<Vec<_>, WorkflowFileError>>()?;
        if let Some(r) = &self.rounds
            && r.resume_from.is_some() != resume.is_some()
        {
            return Err(WorkflowFileError::Field {
                job: None,
                line: r.line,
                field: "rounds.resume_from",
                problem: "the model to resume from was not looked up".to_owned(),
            });
        }
        let rounds = self.rounds.as_ref().map(|r| Rounds { resume, ..r.rounds.clone() });
        let name = self.name.clone();
        let manifest = WorkflowManifest { header, workflow_id, owner, name, jobs, rounds };
        manifest.validate().map_err(|e| match e {
            ValidationError::BadRounds { detail } => WorkflowFileError::Field {
                job: None,
                line: self.rounds.as_ref().and_then(|r| r.line),
                field: "rounds",
                problem: detail,
            },
            other => other.into(),
        })?;
        Ok(manifest)
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Checks `[rounds]`; `text` is the whole file, for its line.
fn check_rounds(
    raw: toml::Spanned<RawRounds>,
    text: &str,
) -> Result<FileRounds, WorkflowFileError> {
    let line = line_at(text, raw.span().start);
    let raw = raw.into_inner();
    let err = |field: &'static str, problem: String| WorkflowFileError::Field {
        job: None,
        line,
        field,
        problem,
    };
    let count = |field: &'static str, n: i64, min: u32| {
        u32::try_from(n)
            .ok()
            .filter(|&n| n >= min)
            .ok_or_else(|| err(field, format!("{n} is not a whole number of at least {min}")))
    };
    let rounds = count("rounds.rounds", raw.rounds, 1)?;
    let min_sites = count("rounds.min_sites", raw.min_sites, 1)?;
    let round_deadline_secs =
        parse_duration(&raw.round_deadline).map_err(|p| err("rounds.round_deadline", p))?;
    let resume_from = match raw.resume_from {
        None => None,
        Some(r) => {
            let id = r.workflow.parse::<WorkflowId>().map_err(|e| {
                err(
                    "rounds.resume_from.workflow",
                    format!("{e} (`kaapana-node workflow list` shows ids)"),
                )
            })?;
            Some((id, count("rounds.resume_from.round", r.round, 1)?))
        }
    };
    let name = |v: Option<String>, default: &str, field: &'static str| {
        let v = v.unwrap_or_else(|| default.to_owned());
        validate_name(field, &v).map(|()| v).map_err(|e| err(field, e.to_string()))
    };
    Ok(FileRounds {
        rounds: Rounds {
            rounds,
            min_sites,
            round_deadline_secs,
            late: match raw.late {
                RawLate::Drop => LateUpdates::Drop,
                RawLate::Fold => LateUpdates::Fold,
            },
            train: name(raw.train, "train", "rounds.train")?,
            aggregate: name(raw.aggregate, "aggregate", "rounds.aggregate")?,
            // The model to resume from is looked up by the node (`to_manifest`'s `resume`).
            resume: None,
        },
        resume_from,
        line,
    })
}

/// Checks one `[[job]]`; `text` is the whole file, for the line of the job's name.
fn check_job(raw: RawJob, text: &str) -> Result<FileJob, WorkflowFileError> {
    let line = text.get(..raw.name.span().start).map(|before| before.matches('\n').count() + 1);
    let name = raw.name.into_inner();
    let err = |field: &'static str, problem: String| WorkflowFileError::Field {
        job: Some(name.clone()),
        line,
        field,
        problem,
    };

    validate_name("job name", &name).map_err(|e| err("name", e.to_string()))?;

    let runner = match (raw.runner, raw.query) {
        (Some(_), Some(_)) => {
            return Err(err(
                "runner",
                "the job has both `runner` and `query`; keep one: `runner` names where it runs, \
                 `query` chooses runners by their capabilities"
                    .into(),
            ));
        }
        (None, None) => {
            return Err(err(
                "runner",
                "the job does not say where it runs: add `runner = \"owner\"`, \
                 `runner = \"<registered instance name>\"` or `query = { ... }`"
                    .into(),
            ));
        }
        (Some(r), None) if r == OWNER => Runner::Owner,
        (Some(r), None) if r.trim().is_empty() || r.chars().any(char::is_control) => {
            return Err(err(
                "runner",
                format!(
                    "{r:?} is not an instance name: use \"owner\" or a name from `kaapana-node instance list`"
                ),
            ));
        }
        (Some(r), None) => Runner::Named(r),
        (None, Some(q)) => Runner::Query(check_query(q, &err)?),
    };

    let query_dataset = match &runner {
        Runner::Query(q) => q.dataset.clone(),
        Runner::Owner | Runner::Named(_) => None,
    };
    let dataset = match (raw.dataset, query_dataset) {
        (Some(d), Some(q)) if d != q => {
            return Err(err(
                "dataset",
                format!(
                    "`{d}` differs from the query's dataset `{q}`; the job reads the dataset its \
                     runners were chosen for, so name it once, in the query"
                ),
            ));
        }
        (Some(d), _) => {
            validate_name("dataset", &d).map_err(|e| err("dataset", e.to_string()))?;
            Some(d)
        }
        (None, q) => q,
    };

    let processing = match (raw.processing, raw.max_parallel) {
        (RawProcessing::Batch, Some(_)) => {
            return Err(err(
                "max_parallel",
                "only applies to processing = \"single-file\"; remove it, or set \
                 processing = \"single-file\" to run one job per dataset item"
                    .into(),
            ));
        }
        (RawProcessing::Batch, None) => Processing::Batch,
        (RawProcessing::SingleFile, n) => {
            let n = n.unwrap_or(1);
            let max_parallel = u32::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
                err(
                    "max_parallel",
                    format!("must be at least 1 (jobs at once per runner), found {n}"),
                )
            })?;
            Processing::SingleFile { max_parallel }
        }
    };
    if matches!(processing, Processing::SingleFile { .. }) && dataset.is_none() {
        return Err(err(
            "processing",
            "single-file processing runs one job per dataset item, so the job needs a dataset: \
             add `dataset = \"<name>\"` or name one in the query"
                .into(),
        ));
    }

    let work = check_work(raw.image, raw.command, raw.env, raw.dag, raw.conf, &err)?;

    let cpu_millis = match raw.cpu {
        None => 0,
        Some(cores) => cores_to_millis(cores).filter(|&m| m > 0).ok_or_else(|| {
            err(
                "cpu",
                format!(
                    "must be a number of cores above 0, e.g. 0.5 (at least 0.001), found {cores}; \
                     leave it out for the executor's default"
                ),
            )
        })?,
    };
    let memory_bytes = match &raw.memory {
        None => 0,
        Some(v) => match parse_size(v).map_err(|p| err("memory", p))? {
            0 => {
                return Err(err(
                    "memory",
                    "must be above 0 bytes; leave it out for the executor's default".into(),
                ));
            }
            bytes => bytes,
        },
    };
    let timeout_secs = match &raw.timeout {
        None => DEFAULT_TIMEOUT_SECS,
        Some(v) => parse_duration(v).map_err(|p| err("timeout", p))?,
    };
    let max_retries = match raw.retries {
        None => 0,
        Some(r) => u32::try_from(r).ok().filter(|&r| r <= MAX_RETRIES).ok_or_else(|| {
            err("retries", format!("must be between 0 and {MAX_RETRIES}, found {r}"))
        })?,
    };

    let mut seen = BTreeSet::new();
    if let Some(dup) = raw.inputs.iter().find(|i| !seen.insert(i.as_str())) {
        return Err(err("inputs", format!("lists `{dup}` twice; name each input once")));
    }

    Ok(FileJob {
        runner,
        spec: JobSpec {
            name,
            runner: RunnerSelector::Owner,
            dataset,
            processing,
            work,
            limits: ResourceLimits { cpu_millis, memory_bytes, gpus: 0 },
            timeout_secs,
            inputs: raw.inputs,
            max_retries,
        },
    })
}

/// Checks what a job runs: `image` (with `command` and `env`) or `dag` (with `conf`).
fn check_work(
    image: Option<String>,
    command: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    dag: Option<String>,
    conf: Option<toml::Table>,
    err: &dyn Fn(&'static str, String) -> WorkflowFileError,
) -> Result<Work, WorkflowFileError> {
    let image = match (image, dag) {
        (Some(_), Some(_)) => {
            return Err(err(
                "dag",
                "the job has both `image` and `dag`; keep one: `image` runs a container, `dag` \
                 runs a DAG of the runner's Airflow"
                    .into(),
            ));
        }
        (None, None) => {
            return Err(err(
                "image",
                "the job does not say what it runs: add `image = \"sha256:…\"` (a container) \
                 or `dag = \"<DAG id>\"` (a DAG run at the runner's Airflow)"
                    .into(),
            ));
        }
        (None, Some(dag_id)) => {
            if command.is_some() || env.is_some() {
                let field = if command.is_some() { "command" } else { "env" };
                return Err(err(
                    field,
                    format!(
                        "a DAG job runs what the runner's Airflow defines for DAG `{dag_id}`; \
                         pass parameters in `conf = {{ ... }}` instead of `{field}`"
                    ),
                ));
            }
            validate_name("DAG id", &dag_id).map_err(|e| err("dag", e.to_string()))?;
            let conf = match conf {
                None => "{}".to_owned(),
                Some(table) => serde_json::to_string(&toml_to_json(toml::Value::Table(table)))
                    .map_err(|e| err("conf", e.to_string()))?,
            };
            let run = DagRun { dag_id, conf };
            Work::AirflowDag(run.clone()).validate().map_err(|e| err("conf", e.to_string()))?;
            return Ok(Work::AirflowDag(run));
        }
        (Some(image), None) => image,
    };
    if conf.is_some() {
        return Err(err(
            "conf",
            "only applies to a DAG job (`dag = \"...\"`); a container gets `command` and `env`"
                .into(),
        ));
    }
    let digest = ImageDigest::parse(&image).map_err(|e| {
        let problem = match e {
            ValidationError::ImageTag { .. } => format!(
                "`{image}` is a tag; images are referenced by digest, e.g. sha256:… (64 lowercase \
                 hex digits); `kaapana-node image list` shows digests"
            ),
            _ => format!(
                "`{image}` is not a valid digest: expected sha256: followed by 64 lowercase hex \
                 digits; `kaapana-node image list` shows digests"
            ),
        };
        err("image", problem)
    })?;
    let raw_env = env.unwrap_or_default();
    let mut env = Vec::with_capacity(raw_env.len());
    for (var, value) in raw_env {
        if !is_env_name(&var) {
            return Err(err(
                "env",
                format!(
                    "`{var}` is not a valid variable name: use 1 to {MAX_NAME_LEN} letters, \
                     digits and _, not starting with a digit"
                ),
            ));
        }
        env.push(EnvVar { name: var, value });
    }
    Ok(Work::Container(ContainerWork { image: digest, command: command.unwrap_or_default(), env }))
}

/// A TOML value as JSON: tables become objects, arrays arrays, dates their RFC 3339 text.
fn toml_to_json(v: toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s),
        toml::Value::Integer(i) => serde_json::Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        toml::Value::Boolean(b) => serde_json::Value::Bool(b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(toml_to_json).collect())
        }
        toml::Value::Table(t) => {
            serde_json::Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// Checks a job's `query`; `err` makes an error about the job's field.
fn check_query(
    raw: RawQuery,
    err: &dyn Fn(&'static str, String) -> WorkflowFileError,
) -> Result<CapabilityQuery, WorkflowFileError> {
    if let Some(d) = &raw.dataset {
        validate_name("dataset", d).map_err(|e| err("query.dataset", e.to_string()))?;
    }
    let min_cpu_millis = match raw.min_cpu {
        None => 0,
        Some(cores) => cores_to_millis(cores).ok_or_else(|| {
            err(
                "query.min_cpu",
                format!("must be a number of cores, 0 or more, e.g. 0.5, found {cores}"),
            )
        })?,
    };
    let min_memory_bytes = match &raw.min_memory {
        None => 0,
        Some(v) => parse_size(v).map_err(|p| err("query.min_memory", p))?,
    };
    let pick = match raw.pick {
        Some(RawPick::All) => Pick::All,
        Some(RawPick::Best) => Pick::Best,
        None => {
            return Err(err(
                "query.pick",
                "the query does not say how many matching instances run the job: add \
                 `pick = \"all\"` (every match) or `pick = \"best\"` (only the best match)"
                    .into(),
            ));
        }
    };
    Ok(CapabilityQuery {
        dataset: raw.dataset,
        gpu: raw.gpu,
        min_cpu_millis,
        min_memory_bytes,
        pick,
    })
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_NAME_LEN`] bytes (the protocol's rule).
fn is_env_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Cores as millicores, rounded; `None` when negative, not finite or too large.
fn cores_to_millis(cores: f64) -> Option<u32> {
    if !cores.is_finite() || cores < 0.0 {
        return None;
    }
    let millis = (cores * 1000.0).round();
    if millis > f64::from(u32::MAX) {
        return None;
    }
    // In range and integral (checked above), so the cast is exact.
    Some(millis as u32)
}

/// Splits `"256MiB"` into `(256, "MiB")`; the unit may follow a space.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number = s.get(..end)?.parse().ok()?;
    Some((number, s.get(end..)?.trim_start()))
}

/// A size: an integer of bytes, or `"<whole number><unit>"`. The error says what is accepted.
fn parse_size(value: &toml::Value) -> Result<u64, String> {
    const HELP: &str = "a size is a whole number of bytes, or a string like \"256MiB\" with \
                        one of the units B, KiB, MiB, GiB (powers of 1024) or KB, MB, GB \
                        (powers of 1000)";
    match value {
        toml::Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is negative; {HELP}"))
        }
        toml::Value::String(s) => {
            let (number, unit) = split_number(s).ok_or_else(|| format!("{s:?}: {HELP}"))?;
            let factor: u64 = match unit {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                "KB" => 1_000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                _ => return Err(format!("{s:?} has an unknown unit `{unit}`; {HELP}")),
            };
            number.checked_mul(factor).ok_or_else(|| format!("{s:?} is too large"))
        }
        other => Err(format!("found a {}; {HELP}", other.type_str())),
    }
}

/// A duration in seconds (at least 1): an integer of seconds, or `"<whole number>s|m|h"`.
fn parse_duration(value: &toml::Value) -> Result<u32, String> {
    const HELP: &str =
        "a duration is a whole number of seconds, or a string like \"90s\", \"5m\" or \"1h\"";
    let secs = match value {
        toml::Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is negative; {HELP}"))?
        }
        toml::Value::String(s) => {
            let (number, unit) = split_number(s).ok_or_else(|| format!("{s:?}: {HELP}"))?;
            let factor: u64 = match unit {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3600,
                _ => return Err(format!("{s:?} has an unknown unit `{unit}`; {HELP}")),
            };
            number.checked_mul(factor).ok_or_else(|| format!("{s:?} is too long"))?
        }
        other => return Err(format!("found a {}; {HELP}", other.type_str())),
    };
    match u32::try_from(secs) {
        Ok(0) => Err(format!("must be at least 1 second; {HELP}")),
        Ok(secs) => Ok(secs),
        Err(_) => Err(format!("{secs} seconds is too long; at most {} are allowed", u32::MAX)),
    }
}

#[cfg(test)]
mod tests {
    use kaapana_protocol::{SigningKey, Timestamp};

    use super::*;

    const D1: &str = "sha256:4f2c0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab";
    const D2: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// The example of the module documentation, with its placeholder digests filled in.
    fn documented_example() -> String {
        doc_example(0)
    }

    /// The `n`-th TOML example of the module docs, with digests filled in.
    fn doc_example(n: usize) -> String {
        let source = include_str!("workflow_file.rs");
        let start = source
            .lines()
            .enumerate()
            .filter(|(_, l)| *l == "//! ```toml")
            .nth(n)
            .map(|(i, _)| i)
            .expect("the example");
        let mut lines = source
            .lines()
            .skip(start + 1)
            .take_while(|l| *l != "//! ```")
            .map(|l| l.strip_prefix("//! ").unwrap_or(l.trim_start_matches("//!")))
            .collect::<Vec<_>>()
            .join("\n");
        lines.push('\n');
        assert!(lines.contains("[[job]]"), "example not found in the module docs");
        lines.replace("sha256:4f2c...64 hex", D1).replace("\"sha256:...\"", &format!("{D2:?}"))
    }

    fn instance() -> InstanceId {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap().instance_id()
    }

    fn header() -> Header {
        Header::new(Timestamp::from_millis(1_000), std::time::Duration::from_secs(3600))
    }

    fn manifest(
        text: &str,
        resolve: &dyn Fn(&str) -> Option<InstanceId>,
    ) -> Result<WorkflowManifest, WorkflowFileError> {
        WorkflowFile::parse(text)?.to_manifest(
            WorkflowId::from_bytes([1; 16]),
            instance(),
            header(),
            resolve,
            None,
        )
    }

    /// A file with one job whose body is `job` (after its name), for error tests.
    fn one_job(job: &str) -> String {
        format!("name = \"w\"\n\n[[job]]\nname = \"j\"\n{job}\n")
    }

    /// The error message of parsing `text`.
    fn parse_error(text: &str) -> String {
        WorkflowFile::parse(text).unwrap_err().to_string()
    }

    /// Asserts that `message` contains each of `parts`.
    #[track_caller]
    fn assert_mentions(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "expected {part:?} in: {message}");
        }
    }

    #[test]
    fn the_documented_training_parses_to_rounds_and_its_errors_name_the_key() {
        let text = doc_example(1);
        let m = manifest(&text, &|_| None).unwrap();
        let r = m.rounds.clone().unwrap();
        assert_eq!((r.rounds, r.min_sites, r.round_deadline_secs), (10, 2, 120));
        assert_eq!(
            (r.late, r.train.as_str(), r.aggregate.as_str()),
            (LateUpdates::Drop, "train", "aggregate")
        );
        assert_eq!(r.resume, None);
        let with = |old: &str, new: &str| {
            assert!(text.contains(old), "{old}");
            text.replace(old, new)
        };
        let fold = with("late = \"drop\"", "late = \"fold\"");
        assert_eq!(manifest(&fold, &|_| None).unwrap().rounds.unwrap().late, LateUpdates::Fold);
        let e = parse_error(&with("rounds = 10 ", "rounds = 0 "));
        assert_mentions(&e, &["`rounds.rounds`", "at least 1"]);
        let e = parse_error(&with("late = \"drop\"", "late = \"keep\""));
        assert_mentions(&e, &["late", "keep"]);
        let e = parse_error(&with("round_deadline = \"2m\"", "round_deadline = \"2d\""));
        assert_mentions(&e, &["`rounds.round_deadline`", "unknown unit `d`"]);
        let e = parse_error(&with(
            "# resume_from = { workflow = \"<workflow id>\", round = 6 }",
            "resume_from = { workflow = \"nope\", round = 6 }",
        ));
        assert_mentions(&e, &["`rounds.resume_from.workflow`", "workflow list"]);
        // A resumed training needs its model looked up.
        let resumed = with(
            "# resume_from = { workflow = \"<workflow id>\", round = 6 }",
            &format!(
                "resume_from = {{ workflow = \"{}\", round = 6 }}",
                WorkflowId::from_bytes([3; 16])
            ),
        );
        let file = WorkflowFile::parse(&resumed).unwrap();
        assert_eq!(file.resume_from(), Some((WorkflowId::from_bytes([3; 16]), 6)));
        let e = manifest(&resumed, &|_| None).unwrap_err().to_string();
        assert_mentions(&e, &["`rounds.resume_from`", "not looked up"]);
        // Rules between rounds and jobs come from the protocol, with the [rounds] line.
        let three =
            format!("{text}\n[[job]]\nname = \"extra\"\nrunner = \"owner\"\nimage = \"{D1}\"\n");
        let e = manifest(&three, &|_| None).unwrap_err();
        assert_mentions(&e.to_string(), &["`rounds`", "exactly two jobs"]);
        let line = three.lines().position(|l| l == "[rounds]").unwrap() + 1;
        assert_eq!(e.line_in(&three), Some(line));
        let e = manifest(&with("inputs = [\"train\"]", "inputs = []"), &|_| None).unwrap_err();
        assert_mentions(&e.to_string(), &["must take input from `train` only"]);
    }

    #[test]
    fn documented_example_parses_to_the_expected_manifest() {
        let text = documented_example();
        let file = WorkflowFile::parse(&text).unwrap();
        assert_eq!(file.name(), "federated-statistics");
        let (owner, site_b) = (instance(), instance());
        let resolve = |n: &str| (n == "site-b").then_some(site_b);
        let m = file
            .to_manifest(WorkflowId::from_bytes([9; 16]), owner, header(), &resolve, None)
            .unwrap();
        assert_eq!(m.name, "federated-statistics");
        assert_eq!(m.owner, owner);
        assert_eq!(m.workflow_id, WorkflowId::from_bytes([9; 16]));
        assert_eq!(m.header, header());
        let expected = vec![
            JobSpec {
                name: "site-stats".into(),
                runner: RunnerSelector::Query(CapabilityQuery {
                    dataset: Some("synthetic-ct".into()),
                    gpu: false,
                    min_cpu_millis: 0,
                    min_memory_bytes: 0,
                    pick: Pick::All,
                }),
                dataset: Some("synthetic-ct".into()),
                processing: Processing::Batch,
                work: Work::Container(ContainerWork {
                    image: ImageDigest::parse(D1).unwrap(),
                    command: vec!["/bin/sh".into(), "-c".into(), "...".into()],
                    env: vec![EnvVar { name: "BINS".into(), value: "10".into() }],
                }),
                limits: ResourceLimits { cpu_millis: 500, memory_bytes: 256 << 20, gpus: 0 },
                timeout_secs: 300,
                inputs: vec![],
                max_retries: 2,
            },
            JobSpec {
                name: "aggregate".into(),
                runner: RunnerSelector::Owner,
                dataset: None,
                processing: Processing::Batch,
                work: Work::Container(ContainerWork {
                    image: ImageDigest::parse(D2).unwrap(),
                    command: vec!["/bin/sh".into(), "-c".into(), "...".into()],
                    env: vec![],
                }),
                limits: ResourceLimits::default(),
                timeout_secs: DEFAULT_TIMEOUT_SECS,
                inputs: vec!["site-stats".into()],
                max_retries: 0,
            },
            JobSpec {
                name: "segment".into(),
                runner: RunnerSelector::Instance(site_b),
                dataset: Some("lung-ct".into()),
                processing: Processing::Batch,
                work: Work::AirflowDag(DagRun {
                    dag_id: "total-segmentator".into(),
                    conf: r#"{"fast":true,"task":"total"}"#.into(),
                }),
                limits: ResourceLimits::default(),
                timeout_secs: DEFAULT_TIMEOUT_SECS,
                inputs: vec![],
                max_retries: 0,
            },
        ];
        assert_eq!(m.jobs, expected);
    }

    #[test]
    fn query_options_single_file_and_named_runners() {
        let site = instance();
        let text = format!(
            r#"name = "seg"

[[job]]
name = "segment"
query = {{ dataset = "ct", gpu = true, min_cpu = 2, min_memory = "1GiB", pick = "best" }}
processing = "single-file"
max_parallel = 3
image = "busybox@{D1}"
memory = 1000
timeout = 90
env = {{ Z_LAST = "z", A_FIRST = "a" }}

[[job]]
name = "report"
runner = "Site B"
inputs = ["segment"]
image = "{D2}"
processing = "single-file"
dataset = "reports"
timeout = "2h"
cpu = 1
memory = "2 GB"
"#
        );
        let m = manifest(&text, &|n| (n == "Site B").then_some(site)).unwrap();
        let segment = &m.jobs[0];
        assert_eq!(
            segment.runner,
            RunnerSelector::Query(CapabilityQuery {
                dataset: Some("ct".into()),
                gpu: true,
                min_cpu_millis: 2000,
                min_memory_bytes: 1 << 30,
                pick: Pick::Best,
            })
        );
        assert_eq!(segment.dataset.as_deref(), Some("ct"));
        assert_eq!(segment.processing, Processing::SingleFile { max_parallel: 3 });
        let container = segment.work.container().unwrap();
        assert_eq!(container.image, ImageDigest::parse(D1).unwrap());
        assert_eq!(segment.limits.memory_bytes, 1000);
        assert_eq!(segment.timeout_secs, 90);
        // Sorted by name: the manifest is deterministic whatever the file's order.
        let names: Vec<_> = container.env.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["A_FIRST", "Z_LAST"]);

        let report = &m.jobs[1];
        assert_eq!(report.runner, RunnerSelector::Instance(site));
        assert_eq!(report.processing, Processing::SingleFile { max_parallel: 1 });
        assert_eq!(report.timeout_secs, 7200);
        assert_eq!(report.limits.cpu_millis, 1000);
        assert_eq!(report.limits.memory_bytes, 2_000_000_000);
    }

    #[test]
    fn dag_jobs_carry_their_conf_as_a_json_object_and_refuse_container_keys() {
        let text = one_job(
            "runner = \"owner\"\ndag = \"nnunet\"\nconf = { model = \"3d\", folds = [0, 1], \
             opts = { tta = false, step = 0.5 }, when = 2024-01-02 }",
        );
        let m = manifest(&text, &|_| None).unwrap();
        let run = m.jobs[0].work.dag_run().unwrap();
        assert_eq!(run.dag_id, "nnunet");
        let conf: serde_json::Value = serde_json::from_str(&run.conf).unwrap();
        assert_eq!(
            conf,
            serde_json::json!({"model": "3d", "folds": [0, 1], "opts": {"tta": false, "step": 0.5},
                               "when": "2024-01-02"})
        );
        let plain = manifest(&one_job("runner = \"owner\"\ndag = \"d\""), &|_| None).unwrap();
        assert_eq!(plain.jobs[0].work.dag_run().unwrap().conf, "{}");

        let both =
            parse_error(&one_job(&format!("runner = \"owner\"\ndag = \"d\"\nimage = \"{D1}\"")));
        assert_mentions(&both, &["`dag`", "both `image` and `dag`"]);
        let neither = parse_error(&one_job("runner = \"owner\""));
        assert_mentions(&neither, &["`image`", "does not say what it runs", "dag = "]);
        let cmd = parse_error(&one_job("runner = \"owner\"\ndag = \"d\"\ncommand = [\"x\"]"));
        assert_mentions(&cmd, &["`command`", "conf = {"]);
        let conf =
            parse_error(&one_job(&format!("runner = \"owner\"\nimage = \"{D1}\"\nconf = {{}}")));
        assert_mentions(&conf, &["`conf`", "only applies to a DAG job"]);
        let reserved =
            parse_error(&one_job("runner = \"owner\"\ndag = \"d\"\nconf = { kaapana_node = 1 }"));
        assert_mentions(&reserved, &["`conf`", "kaapana_node"]);
        let bad_id = parse_error(&one_job("runner = \"owner\"\ndag = \"../x\""));
        assert_mentions(&bad_id, &["`dag`", "DAG id `../x`"]);
    }

    #[test]
    fn sizes_and_durations() {
        let size = |s: &str| parse_size(&toml::Value::String(s.into()));
        assert_eq!(size("1B"), Ok(1));
        assert_eq!(size("3"), Ok(3));
        assert_eq!(size("2KiB"), Ok(2048));
        assert_eq!(size("5MB"), Ok(5_000_000));
        assert_eq!(size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size(&toml::Value::Integer(7)), Ok(7));
        assert!(size("99999999999999GiB").unwrap_err().contains("too large"));
        let dur = |s: &str| parse_duration(&toml::Value::String(s.into()));
        assert_eq!(dur("90s"), Ok(90));
        assert_eq!(dur("5m"), Ok(300));
        assert_eq!(dur("1h"), Ok(3600));
        assert_eq!(dur("45"), Ok(45));
        assert!(dur("9999999h").unwrap_err().contains("too long"));
        assert_eq!(cores_to_millis(0.0015), Some(2));
        assert_eq!(cores_to_millis(-1.0), None);
        assert_eq!(cores_to_millis(f64::NAN), None);
        assert_eq!(cores_to_millis(1e12), None);
    }

    #[test]
    fn image_tags_and_bad_digests_are_refused() {
        let tag = parse_error(&one_job("runner = \"owner\"\nimage = \"busybox:latest\""));
        assert_mentions(
            &tag,
            &[
                "job `j` (line 4), `image`",
                "`busybox:latest` is a tag",
                "images are referenced by digest, e.g. sha256:",
                "`kaapana-node image list` shows digests",
            ],
        );
        let short = parse_error(&one_job("runner = \"owner\"\nimage = \"sha256:abc\""));
        assert_mentions(&short, &["`image`", "64 lowercase hex"]);
        let upper = D1.to_uppercase().replace("SHA256", "sha256");
        let upper = parse_error(&one_job(&format!("runner = \"owner\"\nimage = \"{upper}\"")));
        assert_mentions(&upper, &["`image`", "64 lowercase hex"]);
    }

    #[test]
    fn names_are_checked() {
        let bad_workflow = parse_error(&format!(
            "name = \"-flow\"\n[[job]]\nname = \"j\"\nrunner = \"owner\"\nimage = \"{D1}\"\n"
        ));
        assert_mentions(&bad_workflow, &["`name`", "workflow name `-flow`", "not a valid name"]);
        let bad_job = parse_error(&format!(
            "name = \"w\"\n[[job]]\nname = \"a/b\"\nrunner = \"owner\"\nimage = \"{D1}\"\n"
        ));
        assert_mentions(&bad_job, &["job `a/b` (line 3), `name`", "A-Z a-z 0-9 . _ -"]);
        let bad_dataset = parse_error(&one_job(&format!(
            "runner = \"owner\"\ndataset = \"x y\"\nimage = \"{D1}\""
        )));
        assert_mentions(&bad_dataset, &["`dataset`", "dataset `x y` is not a valid name"]);
        let bad_query_dataset = parse_error(&one_job(&format!(
            "query = {{ dataset = \".hidden\", pick = \"all\" }}\nimage = \"{D1}\""
        )));
        assert_mentions(&bad_query_dataset, &["`query.dataset`", "`.hidden`"]);
        let bad_runner = parse_error(&one_job(&format!("runner = \" \"\nimage = \"{D1}\"")));
        assert_mentions(&bad_runner, &["`runner`", "not an instance name"]);
    }

    #[test]
    fn value_errors_name_the_job_and_field() {
        let cases: &[(&str, &[&str])] = &[
            ("memory = \"256M\"", &["`memory`", "unknown unit `M`", "MiB"]),
            ("memory = \"lots\"", &["`memory`", "a size is a whole number"]),
            ("memory = -5", &["`memory`", "-5 is negative"]),
            ("memory = 1.5", &["`memory`", "found a float"]),
            ("memory = 0", &["`memory`", "above 0 bytes", "executor's default"]),
            ("timeout = \"1d\"", &["`timeout`", "unknown unit `d`", "\"90s\""]),
            ("timeout = \"5 minutes\"", &["`timeout`", "unknown unit `minutes`"]),
            ("timeout = 0", &["`timeout`", "at least 1 second"]),
            ("timeout = -3", &["`timeout`", "negative"]),
            ("timeout = true", &["`timeout`", "found a boolean"]),
            ("cpu = 0", &["`cpu`", "above 0", "found 0"]),
            ("cpu = -1.5", &["`cpu`", "above 0", "found -1.5"]),
            ("cpu = 0.0001", &["`cpu`", "at least 0.001"]),
            ("retries = 11", &["`retries`", "between 0 and 10", "found 11"]),
            ("retries = -1", &["`retries`", "between 0 and 10"]),
            (
                "max_parallel = 2",
                &["`max_parallel`", "only applies to processing = \"single-file\""],
            ),
            (
                "processing = \"single-file\"\ndataset = \"d\"\nmax_parallel = 0",
                &["`max_parallel`", "at least 1", "found 0"],
            ),
            ("processing = \"single-file\"", &["`processing`", "needs a dataset"]),
            ("processing = \"per-item\"", &["unknown variant `per-item`", "single-file", "line"]),
            ("env = { \"1BAD\" = \"x\" }", &["`env`", "`1BAD` is not a valid variable name"]),
            ("env = { \"A-B\" = \"x\" }", &["`env`", "`A-B`"]),
            ("inputs = [\"j\", \"j\"]", &["`inputs`", "`j` twice"]),
        ];
        for (body, parts) in cases {
            let text = one_job(&format!("runner = \"owner\"\nimage = \"{D1}\"\n{body}"));
            let message = parse_error(&text);
            assert_mentions(&message, parts);
            if !body.starts_with("processing = \"per-item\"") {
                assert_mentions(&message, &["job `j` (line 4)"]);
            }
        }
        let too_long = "A".repeat(MAX_NAME_LEN + 1);
        let message = parse_error(&one_job(&format!(
            "runner = \"owner\"\nimage = \"{D1}\"\nenv = {{ {too_long} = \"x\" }}"
        )));
        assert_mentions(&message, &["`env`", "not a valid variable name"]);
    }

    #[test]
    fn query_errors() {
        let query =
            |q: &str| parse_error(&one_job(&format!("query = {{ {q} }}\nimage = \"{D1}\"")));
        assert_mentions(
            &query("dataset = \"ct\""),
            &["`query.pick`", "pick = \"all\"", "\"best\""],
        );
        assert_mentions(&query("pick = \"some\""), &["unknown variant `some`", "`all`", "`best`"]);
        assert_mentions(&query("pick = \"all\", min_cpu = -1"), &["`query.min_cpu`", "found -1"]);
        assert_mentions(&query("pick = \"all\", min_memory = \"1T\""), &["`query.min_memory`"]);
        assert_mentions(&query("pick = \"all\", gpus = 1"), &["unknown field `gpus`", "line 5"]);
        let conflict = parse_error(&one_job(&format!(
            "query = {{ dataset = \"a\", pick = \"all\" }}\ndataset = \"b\"\nimage = \"{D1}\""
        )));
        assert_mentions(&conflict, &["`dataset`", "`b` differs from the query's dataset `a`"]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let top = parse_error(&format!(
            "name = \"w\"\nowner = \"me\"\n[[job]]\nname = \"j\"\nrunner = \"owner\"\nimage = \"{D1}\"\n"
        ));
        assert_mentions(&top, &["not a valid workflow file", "unknown field `owner`", "line 2"]);
        let in_job =
            parse_error(&one_job(&format!("runner = \"owner\"\nimage = \"{D1}\"\nretry = 2")));
        assert_mentions(&in_job, &["unknown field `retry`", "line 7", "retries"]);
        let jobs = parse_error("name = \"w\"\n[[jobs]]\nname = \"j\"\n");
        assert_mentions(&jobs, &["unknown field `jobs`"]);
        let table = parse_error(&one_job(&format!(
            "runner = \"owner\"\nimage = \"{D1}\"\n[job.limits]\ncpu = 1"
        )));
        assert_mentions(&table, &["unknown field `limits`"]);
        let missing = parse_error(&one_job("name2 = 1"));
        assert_mentions(&missing, &["unknown field `name2`"]);
    }

    #[test]
    fn runner_and_query_are_exclusive_and_required() {
        let both = parse_error(&one_job(&format!(
            "runner = \"owner\"\nquery = {{ pick = \"all\" }}\nimage = \"{D1}\""
        )));
        assert_mentions(
            &both,
            &["job `j` (line 4), `runner`", "both `runner` and `query`", "keep one"],
        );
        let neither = parse_error(&one_job(&format!("image = \"{D1}\"")));
        assert_mentions(&neither, &["job `j` (line 4), `runner`", "does not say where it runs"]);
    }

    #[test]
    fn workflow_level_errors() {
        assert!(matches!(WorkflowFile::parse("name = \"w\"\n"), Err(WorkflowFileError::NoJobs)));
        assert_mentions(&parse_error("name = \"w\"\n"), &["no jobs", "[[job]]"]);
        let job = |name: &str, extra: &str| {
            format!("[[job]]\nname = \"{name}\"\nrunner = \"owner\"\nimage = \"{D1}\"\n{extra}\n")
        };
        let dup = format!("name = \"w\"\n{}{}", job("a", ""), job("a", ""));
        assert_mentions(&parse_error(&dup), &["two [[job]] tables are named `a`"]);
        let unknown = format!("name = \"w\"\n{}", job("a", "inputs = [\"b\"]"));
        assert_mentions(
            &parse_error(&unknown),
            &["job `a`, `inputs`", "`b` is not the name of a [[job]]"],
        );
    }

    #[test]
    fn cycles_are_rejected() {
        let text = format!(
            "name = \"w\"\n\
             [[job]]\nname = \"a\"\nrunner = \"owner\"\nimage = \"{D1}\"\ninputs = [\"b\"]\n\
             [[job]]\nname = \"b\"\nrunner = \"owner\"\nimage = \"{D1}\"\ninputs = [\"a\"]\n"
        );
        let err = manifest(&text, &|_| None).unwrap_err();
        assert!(matches!(err, WorkflowFileError::Cycle { .. }), "{err:?}");
        assert_mentions(&err.to_string(), &["form a cycle", "remove an input"]);
        let own = format!(
            "name = \"w\"\n[[job]]\nname = \"a\"\nrunner = \"owner\"\nimage = \"{D1}\"\ninputs = [\"a\"]\n"
        );
        assert!(matches!(manifest(&own, &|_| None), Err(WorkflowFileError::Cycle { .. })));
    }

    #[test]
    fn unknown_instances_are_named() {
        let text = one_job(&format!("runner = \"site-b\"\nimage = \"{D1}\""));
        let err = manifest(&text, &|_| None).unwrap_err();
        assert_mentions(
            &err.to_string(),
            &[
                "job `j`, `runner`",
                "`site-b` is not a registered instance",
                "kaapana-node instance list",
            ],
        );
    }

    #[test]
    fn protocol_limits_are_reported() {
        let args = vec!["\"x\""; 300].join(", ");
        let text = one_job(&format!("runner = \"owner\"\nimage = \"{D1}\"\ncommand = [{args}]"));
        let err = manifest(&text, &|_| None).unwrap_err();
        assert!(matches!(err, WorkflowFileError::Invalid { .. }), "{err:?}");
        assert_mentions(&err.to_string(), &["command has 300 entries", "256"]);
    }

    #[test]
    fn load_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = WorkflowFile::load(&missing).unwrap_err().to_string();
        assert_mentions(&err, &["cannot read workflow file", "missing.toml"]);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, one_job("runner = \"owner\"\nimage = \"busybox:latest\"")).unwrap();
        let err = WorkflowFile::load(&bad).unwrap_err().to_string();
        assert_mentions(&err, &["bad.toml: job `j` (line 4), `image`", "is a tag"]);

        let good = dir.path().join("good.toml");
        std::fs::write(&good, documented_example()).unwrap();
        assert_eq!(
            WorkflowFile::load(&good).unwrap(),
            WorkflowFile::parse(&documented_example()).unwrap()
        );
    }

    #[test]
    fn errors_know_their_line() {
        let text = "name = \"w\"\n\n[[job]]\nname = \"a\"\nimage = \"x\"\nrunner = \"nowhere\"\n\n[[job]]\nname = \"b\"\ninputs = [\"zz\"]\n";
        let e = WorkflowFileError::UnknownInstance { job: "a".into(), name: "nowhere".into() };
        assert_eq!(e.line_in(text), Some(6));
        let e = WorkflowFileError::UnknownInput { job: "b".into(), input: "zz".into() };
        assert_eq!(e.line_in(text), Some(10));
        let dup = format!("{text}\n[[job]]\nname = \"a\"\n");
        let e = WorkflowFileError::DuplicateJob { name: "a".into() };
        assert_eq!(e.line_in(&dup), Some(13));
        let syntax =
            WorkflowFile::parse("name = \"w\"\n[[job]]\nname = \"a\"\nretry = 3\n").unwrap_err();
        assert_eq!(syntax.line_in(""), Some(4), "{syntax}");
        let broken = WorkflowFile::parse("name = \"w\"\n\n[[job]\n").unwrap_err();
        assert_eq!(broken.line_in(""), Some(3), "{broken}");
    }
}
