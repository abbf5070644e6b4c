//! The manifest types: everything that carries intent between instances.
//!
//! Every type starts with a [`Header`] whose first field is the protocol version, so that a
//! receiver can name an unknown version before it tries to decode the rest. Collections are
//! `Vec`s (never hash maps) so that the encoding is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::ids::{ImageDigest, InstanceId, JobId, Sha256Digest, WorkflowId};
use crate::signed::{Manifest, ManifestKind, PROTOCOL_VERSION};
use crate::time::Timestamp;

/// The fields every manifest starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The protocol version the payload is written in ([`PROTOCOL_VERSION`]).
    pub protocol_version: u16,
    /// When the signer issued it.
    pub issued_at: Timestamp,
    /// After this instant receivers reject it.
    pub expires_at: Timestamp,
}

impl Header {
    /// A header for the current protocol version, valid for `lifetime` from `issued_at`.
    pub fn new(issued_at: Timestamp, lifetime: Duration) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            issued_at,
            expires_at: issued_at.saturating_add(lifetime),
        }
    }
}

/// Maximum length of names (jobs, datasets, workflows, env variables).
pub const MAX_NAME_LEN: usize = 128;
/// Maximum length of free text (display names, reasons).
pub const MAX_TEXT_LEN: usize = 1024;

/// Checks an identifier-like name: `[A-Za-z0-9._-]{1,128}`, not starting with `.` or `-`.
/// Such names are safe as path components (`/input/<job-name>/`).
pub fn validate_name(field: &'static str, value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && !value.starts_with(['.', '-'])
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::BadName { field, value: value.to_owned(), max: MAX_NAME_LEN })
    }
}

/// Checks free text: at most `max` bytes and no control characters.
pub fn validate_text(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.len() > max {
        return Err(ValidationError::TooLong { field, len: value.len(), max });
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::OutOfRange { field, expected: "free of control characters" });
    }
    Ok(())
}

/// `text` fit for a signed free-text field such as a reason: control characters replaced by
/// spaces, cut at a character boundary to at most [`MAX_TEXT_LEN`] bytes. The one helper every
/// crate uses to turn an error message into something [`validate_text`] accepts.
pub fn fit_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT_LEN));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT_LEN {
            break;
        }
        out.push(c);
    }
    out
}

pub(crate) fn validate_count<T>(
    field: &'static str,
    items: &[T],
    max: usize,
) -> Result<(), ValidationError> {
    if items.len() > max {
        Err(ValidationError::TooMany { field, len: items.len(), max })
    } else {
        Ok(())
    }
}

/// An executor kind a runner offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ExecutorKind {
    /// Containers on the node's own containerd.
    Containerd,
    /// batch/v1 Jobs in the site's Kubernetes cluster.
    Kubernetes,
    /// DAG runs in the site's Apache Airflow (Kaapana's own workflow engine).
    Airflow,
}

/// A dataset as advertised: its name and size, never its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// The dataset's name at that site.
    pub name: String,
    /// How many items (DICOM series) it holds.
    pub items: u64,
    /// Its total size in bytes.
    pub bytes: u64,
    /// One opaque token per item, keyed for the receiving instance, so that its jobs can name
    /// single items (single-file processing) without learning their identifiers. Empty when the
    /// receiver may not use this dataset.
    pub tokens: Vec<ItemToken>,
    /// How many items have each DICOM modality (`CT`, `MR`, ...), by modality; empty when the
    /// site does not know (a folder dataset). Counts, never identifiers.
    pub modalities: Vec<ModalityCount>,
}

/// How many items of a dataset have one DICOM modality.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModalityCount {
    /// The modality as DICOM's Modality (0008,0060) names it: `CT`, `MR`, `CR`, ...
    pub modality: String,
    /// How many items (series) have it.
    pub items: u64,
}

/// The most modalities one advertised dataset lists.
pub const MAX_MODALITIES: usize = 64;

/// Checks a modality: 1-16 characters of DICOM's code string repertoire (uppercase letters,
/// digits, space and `_`), as Modality (0008,0060) is.
pub fn validate_modality(m: &str) -> Result<(), ValidationError> {
    let ok = !m.is_empty()
        && m.len() <= 16
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field: "dataset modality",
            expected: "1-16 of A-Z, 0-9, space and _ (a DICOM code string)",
        })
    }
}

/// A GPU a site offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// The model as the driver names it.
    pub model: String,
    /// Its memory in bytes.
    pub memory_bytes: u64,
}

/// Compute a site offers to federated jobs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// GPUs.
    pub gpus: Vec<Gpu>,
}

/// A set of names that may also be "all of them".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameScope {
    /// Every name.
    Any,
    /// Only these.
    Only(Vec<String>),
}

impl NameScope {
    /// Whether `name` is in the scope.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// What an instance can run, pushed to its registered peers on connect and on change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityAd {
    /// Version, issue and expiry.
    pub header: Header,
    /// Increases with every change; a receiver keeps the ad with the highest sequence.
    pub sequence: u64,
    /// The instance's display name.
    pub instance_name: String,
    /// The node software's version.
    pub node_version: String,
    /// Executors available.
    pub executors: Vec<ExecutorKind>,
    /// Images this instance allows jobs to use.
    pub allowed_images: Vec<ImageDigest>,
    /// Workflows this instance allows the receiver to run here.
    pub allowed_workflows: NameScope,
    /// Datasets by name and size.
    pub datasets: Vec<DatasetSummary>,
    /// Compute offered.
    pub resources: Resources,
}

impl Manifest for CapabilityAd {
    const KIND: ManifestKind = ManifestKind::CapabilityAd;
    const MAX_PAYLOAD: usize = 2 * 1024 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        validate_text("instance_name", &self.instance_name, MAX_TEXT_LEN)?;
        validate_text("node_version", &self.node_version, MAX_NAME_LEN)?;
        validate_count("executors", &self.executors, 8)?;
        validate_count("allowed_images", &self.allowed_images, 1024)?;
        if let NameScope::Only(names) = &self.allowed_workflows {
            validate_count("allowed_workflows", names, 1024)?;
            for w in names {
                validate_name("allowed workflow", w)?;
            }
        }
        validate_count("datasets", &self.datasets, 1024)?;
        validate_count("gpus", &self.resources.gpus, 64)?;
        let mut tokens = 0usize;
        for d in &self.datasets {
            validate_name("dataset", &d.name)?;
            tokens = tokens.saturating_add(d.tokens.len());
            if d.tokens.len() as u64 > d.items {
                return Err(ValidationError::OutOfRange {
                    field: "dataset tokens",
                    expected: "at most one token per item",
                });
            }
            validate_count("dataset modalities", &d.modalities, MAX_MODALITIES)?;
            let mut counted = 0u64;
            for (i, m) in d.modalities.iter().enumerate() {
                validate_modality(&m.modality)?;
                if d.modalities[..i].iter().any(|o| o.modality == m.modality) {
                    return Err(ValidationError::OutOfRange {
                        field: "dataset modalities",
                        expected: "each modality once",
                    });
                }
                counted = counted.saturating_add(m.items);
            }
            if counted > d.items {
                return Err(ValidationError::OutOfRange {
                    field: "dataset modalities",
                    expected: "at most as many items per modality as the dataset has",
                });
            }
        }
        if tokens > MAX_ITEM_TOKENS {
            return Err(ValidationError::TooMany {
                field: "dataset tokens",
                len: tokens,
                max: MAX_ITEM_TOKENS,
            });
        }
        for g in &self.resources.gpus {
            validate_text("gpu model", &g.model, MAX_NAME_LEN)?;
        }
        Ok(())
    }
}

/// How many jobs a job spec makes from its dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Processing {
    /// One job for the whole dataset.
    Batch,
    /// One job per dataset item, at most `max_parallel` running at once per runner.
    SingleFile {
        /// Concurrency bound per runner (at least 1).
        max_parallel: u32,
    },
}

/// Which of the matching instances a capability query selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pick {
    /// Every matching instance gets a job.
    All,
    /// Only the best match (most free resources, then most dataset items).
    Best,
}

/// Runners chosen by what they advertise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityQuery {
    /// The runner must have a dataset of this name.
    pub dataset: Option<String>,
    /// The runner must offer at least one GPU.
    pub gpu: bool,
    /// Minimum CPU offered, in millicores.
    pub min_cpu_millis: u32,
    /// Minimum memory offered, in bytes.
    pub min_memory_bytes: u64,
    /// All matches, or the best one.
    pub pick: Pick,
}

/// Where a job spec runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunnerSelector {
    /// At the workflow's owner (e.g. the aggregation step).
    Owner,
    /// At this instance.
    Instance(InstanceId),
    /// At the instances whose capabilities match.
    Query(CapabilityQuery),
}

/// An environment variable for a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Its name (`[A-Za-z_][A-Za-z0-9_]*`).
    pub name: String,
    /// Its value.
    pub value: String,
}

/// Limits for one job's container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// CPU in millicores (0 = the executor's default).
    pub cpu_millis: u32,
    /// Memory in bytes (0 = the executor's default).
    pub memory_bytes: u64,
    /// GPUs.
    pub gpus: u32,
}

/// One step of a workflow: what to run, where, on which data, after which other steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The step's name, unique in the workflow; upstream results appear under
    /// `/input/<name>/`.
    pub name: String,
    /// Where it runs.
    pub runner: RunnerSelector,
    /// The dataset it reads at the runner, by name.
    pub dataset: Option<String>,
    /// Batch or single-file processing.
    pub processing: Processing,
    /// What it runs: a container or an Airflow DAG run.
    pub work: Work,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// Wall-clock limit in seconds, after which the job is killed.
    pub timeout_secs: u32,
    /// Names of the steps whose results it reads.
    pub inputs: Vec<String>,
    /// How often a job of this step is tried again after a retryable failure (its runner was
    /// lost, or its executor failed); exit codes, denials and rejections are final.
    pub max_retries: u32,
}

/// What a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    /// A container: an image pinned by digest, its command line and environment.
    Container(ContainerWork),
    /// One run of a DAG of the runner's Apache Airflow, as Kaapana runs its workflows. What
    /// the DAG does is the runner's: its policy must allow the DAG id.
    AirflowDag(DagRun),
}

impl Work {
    /// The container work, if it is one.
    pub fn container(&self) -> Option<&ContainerWork> {
        match self {
            Self::Container(c) => Some(c),
            Self::AirflowDag(_) => None,
        }
    }

    /// The DAG run, if it is one.
    pub fn dag_run(&self) -> Option<&DagRun> {
        match self {
            Self::AirflowDag(d) => Some(d),
            Self::Container(_) => None,
        }
    }

    /// Checks the work as a manifest's validation does (names, counts, the DAG conf).
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Container(c) => validate_container(c),
            Self::AirflowDag(d) => d.validate(),
        }
    }
}

/// A container a job runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerWork {
    /// The image, by digest.
    pub image: ImageDigest,
    /// The command line.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: Vec<EnvVar>,
}

/// One run of an Airflow DAG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DagRun {
    /// The DAG's id at the runner's Airflow (a name: `[A-Za-z0-9._-]`, at most 128).
    pub dag_id: String,
    /// The DAG run's `conf`: a JSON object, as text (at most [`MAX_DAG_CONF_LEN`] bytes). The
    /// runner adds its own key [`DAG_CONF_NODE_KEY`], which this object must not have.
    pub conf: String,
}

/// The most bytes of a DAG run's `conf` text.
pub const MAX_DAG_CONF_LEN: usize = 16 * 1024;
/// The key of a DAG run's `conf` that the runner fills in (the job, its input and output
/// folders, Kaapana's `data_form`).
pub const DAG_CONF_NODE_KEY: &str = "kaapana_node";

impl DagRun {
    fn validate(&self) -> Result<(), ValidationError> {
        validate_name("DAG id", &self.dag_id)?;
        if self.conf.len() > MAX_DAG_CONF_LEN {
            return Err(ValidationError::TooLong {
                field: "DAG conf",
                len: self.conf.len(),
                max: MAX_DAG_CONF_LEN,
            });
        }
        match serde_json::from_str::<serde_json::Value>(&self.conf) {
            Ok(serde_json::Value::Object(map)) if !map.contains_key(DAG_CONF_NODE_KEY) => Ok(()),
            Ok(serde_json::Value::Object(_)) => Err(ValidationError::OutOfRange {
                field: "DAG conf",
                expected: "an object without the key kaapana_node (the runner sets it)",
            }),
            _ => Err(ValidationError::OutOfRange {
                field: "DAG conf",
                expected: "a JSON object (e.g. {} or {\"key\": \"value\"})",
            }),
        }
    }
}

fn validate_container(c: &ContainerWork) -> Result<(), ValidationError> {
    validate_count("command", &c.command, 256)?;
    validate_count("env", &c.env, 256)?;
    for v in &c.env {
        let ok = v.name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && v.name.len() <= MAX_NAME_LEN
            && v.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(ValidationError::BadName {
                field: "environment variable",
                value: v.name.clone(),
                max: MAX_NAME_LEN,
            });
        }
    }
    Ok(())
}

fn validate_job_common(work: &Work, timeout_secs: u32) -> Result<(), ValidationError> {
    work.validate()?;
    if timeout_secs == 0 {
        return Err(ValidationError::OutOfRange {
            field: "timeout_secs",
            expected: "at least 1 second",
        });
    }
    Ok(())
}

impl JobSpec {
    fn validate(&self) -> Result<(), ValidationError> {
        validate_name("job name", &self.name)?;
        if let Some(d) = &self.dataset {
            validate_name("dataset", d)?;
        }
        if let RunnerSelector::Query(CapabilityQuery { dataset: Some(d), .. }) = &self.runner {
            validate_name("dataset", d)?;
        }
        if let Processing::SingleFile { max_parallel: 0 } = self.processing {
            return Err(ValidationError::OutOfRange {
                field: "max_parallel",
                expected: "at least 1",
            });
        }
        validate_count("inputs", &self.inputs, 1024)?;
        if self.max_retries > MAX_RETRIES {
            return Err(ValidationError::OutOfRange {
                field: "max_retries",
                expected: "at most 10",
            });
        }
        validate_job_common(&self.work, self.timeout_secs)
    }
}

/// The most retries a job spec may ask for.
pub const MAX_RETRIES: u32 = 10;

/// The most item tokens one capability ad carries (over all its datasets).
pub const MAX_ITEM_TOKENS: usize = 60_000;

/// A workflow: a DAG of job specs, signed by the instance that owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowManifest {
    /// Version, issue and expiry.
    pub header: Header,
    /// Chosen by the owner.
    pub workflow_id: WorkflowId,
    /// The instance that owns it and receives the results.
    pub owner: InstanceId,
    /// A readable name.
    pub name: String,
    /// The steps.
    pub jobs: Vec<JobSpec>,
    /// For federated learning: run the `train` step and the `aggregate` step round after
    /// round, the model of each round being the input of the next. `None`: a plain DAG.
    pub rounds: Option<Rounds>,
}

/// The most rounds one training may have.
pub const MAX_ROUNDS: u32 = 100_000;

/// What happens to a site's update that arrives after its round closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LateUpdates {
    /// The late job is cancelled when its round closes; its update is never used.
    Drop,
    /// The late job may go on; if its update arrives before the next round closes, it is
    /// aggregated with that round's updates (and cancelled when that round closes if not).
    Fold,
}

/// An iterative workflow: training rounds with a quorum and a deadline.
///
/// Round `k` runs the `train` job spec at every site it selects (its runner: a capability
/// query with `pick = all`, or one instance), with the global model of round `k - 1` as its
/// input (none in the first round, unless resumed). The round closes when every site has
/// reported, or at its deadline once `min_sites` updates have arrived; then the `aggregate`
/// job spec runs at the owner over the round's updates and makes the model of round `k`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rounds {
    /// The number of the last round (rounds are numbered from 1).
    pub rounds: u32,
    /// The quorum: how many sites' updates a round needs.
    pub min_sites: u32,
    /// How long a round waits for slow sites once it has its quorum, in seconds.
    pub round_deadline_secs: u32,
    /// What happens to late updates.
    pub late: LateUpdates,
    /// The job spec trained at the sites.
    pub train: String,
    /// The job spec that aggregates the updates at the owner.
    pub aggregate: String,
    /// Continue a training: the model of an earlier round, from which the next round starts.
    pub resume: Option<ResumeFrom>,
}

/// The model a resumed training starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeFrom {
    /// The round that made it: training continues with the round after it.
    pub round: u32,
    /// The aggregate result that holds it (stored at the owner).
    pub model: InputBundle,
}

impl Rounds {
    /// The first round this training runs.
    pub fn first_round(&self) -> u32 {
        self.resume.as_ref().map_or(1, |r| r.round.saturating_add(1))
    }

    fn validate(&self, jobs: &[JobSpec]) -> Result<(), ValidationError> {
        let bad = |detail: String| Err(ValidationError::BadRounds { detail });
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return bad(format!("rounds is {}; it must be 1 to {MAX_ROUNDS}", self.rounds));
        }
        if self.min_sites == 0 {
            return bad("min_sites must be at least 1".to_owned());
        }
        if self.round_deadline_secs == 0 {
            return bad("round_deadline must be at least 1 second".to_owned());
        }
        if let Some(r) = &self.resume {
            validate_name("resumed model's job name", &r.model.job_name)?;
            if r.round == 0 || r.round >= self.rounds {
                return bad(format!(
                    "resume_from round {} must be at least 1 and before the last round {}",
                    r.round, self.rounds
                ));
            }
        }
        if self.train == self.aggregate {
            return bad(format!("train and aggregate are both `{}`", self.train));
        }
        let find = |name: &str, role: &str| {
            jobs.iter().find(|j| j.name == name).ok_or_else(|| ValidationError::BadRounds {
                detail: format!("the {role} job `{name}` is not a job of this workflow"),
            })
        };
        let train = find(&self.train, "train")?;
        let aggregate = find(&self.aggregate, "aggregate")?;
        if jobs.len() != 2 {
            return bad(format!(
                "a workflow with rounds has exactly two jobs, `{}` and `{}`; this one has {}",
                self.train,
                self.aggregate,
                jobs.len()
            ));
        }
        if !train.inputs.is_empty() {
            return bad(format!(
                "the train job `{}` takes no inputs: each round it reads the model of the round before",
                train.name
            ));
        }
        if aggregate.inputs != [train.name.clone()] {
            return bad(format!(
                "the aggregate job `{}` must take input from `{}` only",
                aggregate.name, train.name
            ));
        }
        if train.processing != Processing::Batch {
            return bad(format!(
                "the train job `{}` must use batch processing (one update per site)",
                train.name
            ));
        }
        if aggregate.runner != RunnerSelector::Owner {
            return bad(format!("the aggregate job `{}` must run at the owner", aggregate.name));
        }
        if let RunnerSelector::Query(q) = &train.runner
            && q.pick != Pick::All
        {
            return bad(format!(
                "the train job `{}` must pick all matching sites (pick = \"all\")",
                train.name
            ));
        }
        Ok(())
    }
}

impl Manifest for WorkflowManifest {
    const KIND: ManifestKind = ManifestKind::WorkflowManifest;
    const MAX_PAYLOAD: usize = 256 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        validate_name("workflow name", &self.name)?;
        if self.jobs.is_empty() {
            return Err(ValidationError::OutOfRange {
                field: "jobs",
                expected: "at least one job",
            });
        }
        validate_count("jobs", &self.jobs, 1024)?;
        let mut names = BTreeSet::new();
        for job in &self.jobs {
            job.validate()?;
            if !names.insert(job.name.as_str()) {
                return Err(ValidationError::DuplicateJob { name: job.name.clone() });
            }
        }
        for job in &self.jobs {
            for input in &job.inputs {
                if !names.contains(input.as_str()) {
                    return Err(ValidationError::UnknownInput {
                        job: job.name.clone(),
                        input: input.clone(),
                    });
                }
            }
        }
        check_acyclic(&self.jobs)?;
        match &self.rounds {
            Some(r) => r.validate(&self.jobs),
            None => Ok(()),
        }
    }
}

/// Kahn's algorithm over the jobs' inputs, in O(jobs + inputs). Job names are unique and every
/// input names a job (checked before).
fn check_acyclic(jobs: &[JobSpec]) -> Result<(), ValidationError> {
    let index: BTreeMap<&str, usize> =
        jobs.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();
    let mut pending: Vec<usize> = jobs.iter().map(|j| j.inputs.len()).collect();
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (i, j) in jobs.iter().enumerate() {
        for input in &j.inputs {
            if let Some(&producer) = index.get(input.as_str()) {
                consumers[producer].push(i);
            }
        }
    }
    let mut ready: Vec<usize> = (0..jobs.len()).filter(|&i| pending[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &c in &consumers[i] {
            pending[c] -= 1;
            if pending[c] == 0 {
                ready.push(c);
            }
        }
    }
    if done == jobs.len() {
        return Ok(());
    }
    let stuck = (0..jobs.len()).find(|&i| pending[i] > 0).map(|i| jobs[i].name.clone());
    Err(ValidationError::Cycle { job: stuck.unwrap_or_default() })
}

/// An opaque, per-peer token naming one dataset item without revealing its identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ItemToken(pub [u8; 32]);

/// The data a job reads at its runner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRef {
    /// The dataset's name at the runner.
    pub name: String,
    /// For single-file processing: the one item the job sees.
    pub item: Option<ItemToken>,
}

/// A content-addressed blob (result bundle, log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// SHA-256 of the bytes.
    pub digest: Sha256Digest,
    /// Length in bytes.
    pub size: u64,
}

/// An upstream result a job reads under `/input/<job_name>/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputBundle {
    /// The upstream step's name.
    pub job_name: String,
    /// The upstream job.
    pub job_id: JobId,
    /// Its result bundle.
    pub bundle: BlobRef,
}

/// One run of one job spec at one runner-instance, signed by the workflow's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobManifest {
    /// Version, issue and expiry.
    pub header: Header,
    /// This job.
    pub job_id: JobId,
    /// Its workflow.
    pub workflow_id: WorkflowId,
    /// The workflow's owner, where results go.
    pub owner: InstanceId,
    /// The instance that runs it.
    pub runner: InstanceId,
    /// The job spec's name.
    pub job_name: String,
    /// 0 for the first attempt, then 1, 2, ... for retries.
    pub attempt: u32,
    /// The data it reads.
    pub dataset: Option<DatasetRef>,
    /// What it runs: a container or an Airflow DAG run.
    pub work: Work,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// Wall-clock limit in seconds.
    pub timeout_secs: u32,
    /// Upstream results.
    pub inputs: Vec<InputBundle>,
    /// The workflow's name, which the runner's policy allows or not (Kaapana's allowed_dags).
    pub workflow_name: String,
}

impl Manifest for JobManifest {
    const KIND: ManifestKind = ManifestKind::JobManifest;
    const MAX_PAYLOAD: usize = 64 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        validate_name("job name", &self.job_name)?;
        validate_name("workflow name", &self.workflow_name)?;
        if let Some(d) = &self.dataset {
            validate_name("dataset", &d.name)?;
        }
        validate_count("inputs", &self.inputs, 1024)?;
        for i in &self.inputs {
            validate_name("input job name", &i.job_name)?;
        }
        validate_job_common(&self.work, self.timeout_secs)
    }
}

/// A job's state, in Kaapana's names and order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// At the owner, not yet accepted by the runner.
    Queued,
    /// Held by the runner; `awaiting_approval` while its policy wants a local decision.
    Pending {
        /// Whether a site admin must approve it first.
        awaiting_approval: bool,
    },
    /// Accepted and waiting for resources.
    Scheduled,
    /// Its container runs.
    Running,
    /// Ended with exit status 0; the result follows.
    Finished,
    /// Ended otherwise (an abort is a failure with its reason).
    Failed,
}

impl JobState {
    /// Whether no further transition follows.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Failed)
    }
}

/// A job's state transition, signed by its runner and pushed to the owner at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUpdate {
    /// Version, issue and expiry.
    pub header: Header,
    /// The job.
    pub job_id: JobId,
    /// Its workflow.
    pub workflow_id: WorkflowId,
    /// Which attempt.
    pub attempt: u32,
    /// Increases with every update of this attempt, so the owner can order them.
    pub sequence: u32,
    /// The new state.
    pub state: JobState,
    /// Why (for failures: the rule or error; for aborts: "aborted by <instance>").
    pub reason: Option<String>,
    /// For failures: whether trying again may succeed (the executor failed), as opposed to a
    /// final outcome (an exit code, a policy denial, a rejection, an abort).
    pub retryable: bool,
}

impl Manifest for JobUpdate {
    const KIND: ManifestKind = ManifestKind::JobUpdate;
    const MAX_PAYLOAD: usize = 4 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        if let Some(r) = &self.reason {
            validate_text("reason", r, MAX_TEXT_LEN)?;
        }
        Ok(())
    }
}

/// How a job's container ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// It was killed after its timeout.
    TimedOut,
    /// It was killed for exceeding its memory limit.
    OutOfMemory,
    /// It was killed by this signal for another reason.
    Killed(u8),
}

/// When a job's phases happened at the runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTimings {
    /// When the runner received the job manifest.
    pub received_at: Timestamp,
    /// When the container started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
}

/// A job's outcome, signed by its runner; the bundle it names follows as a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultManifest {
    /// Version, issue and expiry.
    pub header: Header,
    /// The job.
    pub job_id: JobId,
    /// Its workflow.
    pub workflow_id: WorkflowId,
    /// Which attempt produced it.
    pub attempt: u32,
    /// How the container ended.
    pub exit: ExitStatus,
    /// The tar of `/output`.
    pub bundle: BlobRef,
    /// The job's log, when the runner's policy releases it to the owner.
    pub log: Option<BlobRef>,
    /// Phase times.
    pub timings: JobTimings,
}

impl Manifest for ResultManifest {
    const KIND: ManifestKind = ManifestKind::ResultManifest;
    const MAX_PAYLOAD: usize = 4 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        let t = &self.timings;
        if t.started_at < t.received_at || t.finished_at < t.started_at {
            return Err(ValidationError::OutOfRange {
                field: "timings",
                expected: "received_at <= started_at <= finished_at",
            });
        }
        Ok(())
    }
}

/// Stops a workflow, or one job of it, at every runner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// Version, issue and expiry.
    pub header: Header,
    /// The workflow.
    pub workflow_id: WorkflowId,
    /// One job only, or all of the workflow's jobs.
    pub job_id: Option<JobId>,
    /// Why.
    pub reason: String,
}

impl Manifest for Cancel {
    const KIND: ManifestKind = ManifestKind::Cancel;
    const MAX_PAYLOAD: usize = 4 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        validate_text("reason", &self.reason, MAX_TEXT_LEN)
    }
}

/// The signed part of an exchange bundle: who the instance is and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceBundleInfo {
    /// Version, issue and expiry (the bundle's own validity, not the certificate's).
    pub header: Header,
    /// The instance's display name.
    pub display_name: String,
    /// Multiaddresses to dial it at.
    pub listen_addrs: Vec<String>,
    /// SHA-256 of the certificate's DER, binding the certificate to this signature.
    pub certificate_sha256: Sha256Digest,
}

impl Manifest for InstanceBundleInfo {
    const KIND: ManifestKind = ManifestKind::InstanceBundle;
    const MAX_PAYLOAD: usize = 16 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        validate_text("display_name", &self.display_name, MAX_TEXT_LEN)?;
        if self.display_name.is_empty() {
            return Err(ValidationError::OutOfRange {
                field: "display_name",
                expected: "not empty",
            });
        }
        validate_count("listen_addrs", &self.listen_addrs, 32)?;
        for a in &self.listen_addrs {
            validate_text("listen address", a, 256)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_text_gives_what_validate_text_accepts() {
        assert_eq!(fit_text("runner\nlost\t"), "runner lost ");
        let long = "é".repeat(MAX_TEXT_LEN);
        let fit = fit_text(&long);
        assert!(fit.len() <= MAX_TEXT_LEN && fit.len() > MAX_TEXT_LEN - 2);
        assert!(validate_text("reason", &fit, MAX_TEXT_LEN).is_ok());
        assert!(validate_text("reason", &long, MAX_TEXT_LEN).is_err());
    }

    #[test]
    fn dag_runs_name_a_dag_and_carry_a_bounded_json_object_without_the_node_key() {
        let run = |dag_id: &str, conf: &str| {
            Work::AirflowDag(DagRun { dag_id: dag_id.into(), conf: conf.into() }).validate()
        };
        assert_eq!(run("total-segmentator", "{}"), Ok(()));
        assert_eq!(run("nnunet.predict_v2", r#"{"task": "Task003", "folds": [0, 1]}"#), Ok(()));
        for (dag, conf) in [
            ("", "{}"),
            ("../etc", "{}"),
            ("dag", "[]"),
            ("dag", "\"text\""),
            ("dag", "{"),
            ("dag", ""),
            ("dag", r#"{"kaapana_node": {}}"#),
        ] {
            assert!(run(dag, conf).is_err(), "{dag:?} {conf:?}");
        }
        let long = format!("{{\"k\": \"{}\"}}", "x".repeat(MAX_DAG_CONF_LEN));
        assert!(matches!(run("dag", &long), Err(ValidationError::TooLong { .. })));
        let e = run("dag", r#"{"kaapana_node": 1}"#).unwrap_err().to_string();
        assert!(e.contains("kaapana_node"), "{e}");
    }

    #[test]
    fn advertised_modalities_are_dicom_code_strings_counted_within_the_items() {
        let ad = |modalities: Vec<(&str, u64)>| CapabilityAd {
            header: Header::new(Timestamp::from_millis(1), Duration::from_secs(60)),
            sequence: 1,
            instance_name: "site-b".into(),
            node_version: "0.1.0".into(),
            executors: vec![],
            allowed_images: vec![],
            allowed_workflows: NameScope::Any,
            datasets: vec![DatasetSummary {
                name: "lung-ct".into(),
                items: 3,
                bytes: 0,
                tokens: vec![],
                modalities: modalities
                    .into_iter()
                    .map(|(m, items)| ModalityCount { modality: m.into(), items })
                    .collect(),
            }],
            resources: Resources::default(),
        };
        assert!(ad(vec![]).validate().is_ok());
        assert!(ad(vec![("CT", 2), ("MR", 1)]).validate().is_ok());
        for bad in [
            vec![("ct", 1)],
            vec![("", 1)],
            vec![("CT/MR", 1)],
            vec![("ABCDEFGHIJKLMNOPQ", 1)],
            vec![("CT", 1), ("CT", 1)],
            vec![("CT", 3), ("MR", 1)],
        ] {
            assert!(ad(bad.clone()).validate().is_err(), "{bad:?}");
        }
    }
}
