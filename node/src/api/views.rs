//! The JSON bodies of the local API: what its routes ([`crate::api`]) answer and take, and
//! what the CLI ([`crate::client`], the `kaapana-node` binary) sends and prints.
//!
//! Plain data and the conversions into it from the crates above (registry entries, workflows,
//! jobs, datasets). No HTTP server, no daemon state: the client side uses these without the
//! routes.

use std::collections::BTreeMap;

use kaapana_federation::{Policy, RegisteredInstance};
use kaapana_protocol::{CapabilityAd, NameScope};
use serde::{Deserialize, Serialize};

/// The JSON body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// `GET /v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InfoView {
    /// Instance name.
    pub name: String,
    /// Instance id (PeerId).
    pub instance_id: String,
    /// Certificate fingerprint.
    pub fingerprint: String,
    /// Addresses the swarm listens on, with `/p2p/<id>`.
    pub listen_addrs: Vec<String>,
}

/// A registered instance as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceView {
    /// Its name.
    pub name: String,
    /// Its id.
    pub instance_id: String,
    /// Its certificate's fingerprint.
    pub fingerprint: String,
    /// Where it is dialed.
    pub listen_addrs: Vec<String>,
    /// Its certificate's expiry.
    pub certificate_not_after: String,
    /// What it may do here.
    pub policy: Policy,
    /// Whether a connection is up (`None` when no daemon runs).
    pub connected: Option<bool>,
    /// `direct` or `relayed` while connected.
    #[serde(default)]
    pub path: Option<String>,
    /// `connected, direct`, `connected, relayed`, or why not connected.
    pub status: String,
    /// When it was last heard from.
    pub last_seen: Option<String>,
    /// The last ping round trip in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Messages waiting for it.
    pub outbox_depth: u64,
    /// What it advertised to this instance.
    pub capabilities: Option<CapabilitiesView>,
}

/// A peer's capability ad, readable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapabilitiesView {
    /// Increases with each change.
    pub sequence: u64,
    /// Its node version.
    pub node_version: String,
    /// Executors it offers.
    pub executors: Vec<String>,
    /// Workflows it allows this instance (`any` = all).
    pub allowed_workflows: Vec<String>,
    /// Images it allows.
    pub allowed_images: Vec<String>,
    /// Datasets: name, items, bytes.
    pub datasets: Vec<(String, u64, u64)>,
    /// Items per modality of each dataset that has them: dataset name → (modality, items).
    #[serde(default)]
    pub modalities: BTreeMap<String, Vec<(String, u64)>>,
    /// CPU in millicores.
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// GPU count.
    pub gpus: usize,
    /// When the ad expires.
    pub expires_at: String,
}

impl From<&CapabilityAd> for CapabilitiesView {
    fn from(ad: &CapabilityAd) -> Self {
        Self {
            sequence: ad.sequence,
            node_version: ad.node_version.clone(),
            executors: ad.executors.iter().map(|e| format!("{e:?}").to_lowercase()).collect(),
            allowed_workflows: match &ad.allowed_workflows {
                NameScope::Any => vec!["any".to_owned()],
                NameScope::Only(names) => names.clone(),
            },
            allowed_images: ad.allowed_images.iter().map(ToString::to_string).collect(),
            datasets: ad.datasets.iter().map(|d| (d.name.clone(), d.items, d.bytes)).collect(),
            modalities: ad
                .datasets
                .iter()
                .filter(|d| !d.modalities.is_empty())
                .map(|d| {
                    let m = d.modalities.iter().map(|m| (m.modality.clone(), m.items)).collect();
                    (d.name.clone(), m)
                })
                .collect(),
            cpu_millis: ad.resources.cpu_millis,
            memory_bytes: ad.resources.memory_bytes,
            gpus: ad.resources.gpus.len(),
            expires_at: ad.header.expires_at.to_string(),
        }
    }
}

impl InstanceView {
    /// The view of a registered instance as the data directory alone shows it (no daemon
    /// runs, so nothing is known about its connection).
    pub fn offline(inst: &RegisteredInstance, outbox_depth: u64) -> Self {
        Self {
            name: inst.name.clone(),
            instance_id: inst.instance_id.to_string(),
            fingerprint: kaapana_certs::Fingerprint(inst.fingerprint).to_string(),
            listen_addrs: inst.listen_addrs.clone(),
            certificate_not_after: inst.certificate_not_after.to_string(),
            policy: inst.policy.clone(),
            connected: None,
            path: None,
            status: "unknown: the daemon is not running".to_owned(),
            last_seen: None,
            rtt_ms: None,
            outbox_depth,
            capabilities: None,
        }
    }
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddInstanceRequest {
    /// The exchange bundle's text.
    pub bundle: String,
    /// What the instance may do here.
    pub policy: Policy,
    /// Refuse unless the certificate has this fingerprint.
    pub expect_fingerprint: Option<String>,
}

/// `POST /v1/instances/preview`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewRequest {
    /// The exchange bundle's text.
    pub bundle: String,
}

/// `POST /v1/messages`: a message for one instance, signed by this node and queued durably.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// The receiving instance, by name or id.
    pub to: String,
    /// A cancellation, for now the only message a user sends directly (workflows send the
    /// rest).
    pub cancel: CancelRequest,
}

/// The content of a [`Cancel`](kaapana_protocol::Cancel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The workflow (32 hex digits).
    pub workflow_id: String,
    /// One job of it (32 hex digits), or all.
    pub job_id: Option<String>,
    /// Why.
    pub reason: String,
}

/// The answer to [`SendRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendResponse {
    /// The message id.
    pub id: String,
}

/// One inbox entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Arrival order.
    pub seq: u64,
    /// Message id.
    pub id: String,
    /// Message type.
    pub kind: String,
    /// Signer's id.
    pub from: String,
    /// When it was accepted.
    pub received_at: String,
    /// The payload, for people.
    pub summary: String,
}

/// `POST /v1/workflows`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitWorkflowRequest {
    /// The workflow file's text (TOML, see [`crate::workflow_file`]).
    pub toml: String,
}

/// One job of a workflow as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowJobView {
    /// The job's name (its step's name, or `<step>-<k>` when a step has several jobs).
    pub name: String,
    /// Its step's name.
    pub step: String,
    /// The current attempt's job id.
    pub job_id: String,
    /// The runner-instance's name.
    pub runner: String,
    /// Which attempt (0 = the first).
    pub attempt: u32,
    /// Its state (`waiting` while its inputs or a slot are not ready).
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Its result bundle's digest, once stored here.
    pub result: Option<String>,
    /// For a training's update: the sample count it reported.
    pub samples: Option<u64>,
}

/// A training's rounds as the API and CLI show them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingView {
    /// The number of the last round.
    pub rounds: u32,
    /// The first round this workflow runs (after the round it resumed from).
    pub first_round: u32,
    /// The quorum.
    pub min_sites: u32,
    /// Seconds a round waits for slow sites once it has its quorum.
    pub round_deadline_secs: u32,
    /// `drop` or `fold`.
    pub late: String,
    /// The dataset the sites train on.
    pub dataset: String,
    /// The sites' names, in the order of their job numbers.
    pub sites: Vec<String>,
    /// Rounds that made their model.
    pub completed: usize,
    /// The rounds so far, oldest first.
    pub history: Vec<RoundView>,
}

/// One round of a training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundView {
    /// Its number.
    pub round: u32,
    /// `open` (waiting for updates), `aggregating` or `done`.
    pub state: String,
    /// When its train jobs were dispatched.
    pub opened_at: String,
    /// When it closes at the latest once it has its quorum.
    pub deadline: String,
    /// When it closed.
    pub closed_at: Option<String>,
    /// When its model was stored.
    pub ended_at: Option<String>,
    /// Milliseconds from opening to its model (done rounds).
    pub duration_ms: Option<u64>,
    /// The jobs whose updates were aggregated.
    pub updates: Vec<String>,
    /// Late updates of the round before, aggregated with these.
    pub folded: Vec<String>,
    /// Jobs that had not delivered when it closed.
    pub late: Vec<String>,
    /// Samples of all aggregated updates.
    pub samples: u64,
    /// Its aggregate job (whose result is the model).
    pub aggregate_job: Option<String>,
    /// The model's digest.
    pub model: Option<String>,
    /// The model's size in bytes.
    pub model_bytes: Option<u64>,
    /// Bytes of this round's input model the owner sent to sites since it started (sites
    /// that held it already fetched nothing).
    pub input_bytes_sent: u64,
}

impl TrainingView {
    /// The view of `w`'s training; `sent` gives the bytes of a blob the owner sent.
    pub fn new(
        w: &kaapana_federation::Workflow,
        t: &kaapana_federation::Training,
        sent: &dyn Fn(&kaapana_protocol::Sha256Digest) -> u64,
    ) -> Self {
        let name = |id: &kaapana_protocol::JobId| {
            w.job(id).map_or_else(|| id.to_string(), |j| j.name.clone())
        };
        let names = |ids: &[kaapana_protocol::JobId]| ids.iter().map(name).collect::<Vec<_>>();
        let history = t
            .history
            .iter()
            .map(|r| {
                let input = w.steps.get(r.train_step).and_then(|s| s.external.first());
                let aggregate = r
                    .aggregate_step
                    .and_then(|s| w.jobs.iter().find(|j| j.step == s))
                    .map(|j| j.name.clone());
                RoundView {
                    round: r.round,
                    state: match (r.closed_at, r.model) {
                        (None, _) => "open",
                        (Some(_), None) => "aggregating",
                        (Some(_), Some(_)) => "done",
                    }
                    .to_owned(),
                    opened_at: r.opened_at.to_string(),
                    deadline: r.deadline.to_string(),
                    closed_at: r.closed_at.map(|t| t.to_string()),
                    ended_at: r.ended_at.map(|t| t.to_string()),
                    duration_ms: r.ended_at.map(|e| {
                        u64::try_from(e.duration_since(r.opened_at).as_millis()).unwrap_or(u64::MAX)
                    }),
                    updates: names(&r.updates),
                    folded: names(&r.folded),
                    late: names(&r.late),
                    samples: r.samples,
                    aggregate_job: aggregate,
                    model: r.model.map(|m| m.digest.to_string()),
                    model_bytes: r.model.map(|m| m.size),
                    input_bytes_sent: input.map_or(0, |i| sent(&i.bundle.digest)),
                }
            })
            .collect();
        Self {
            rounds: t.rounds.rounds,
            first_round: t.rounds.first_round(),
            min_sites: t.rounds.min_sites,
            round_deadline_secs: t.rounds.round_deadline_secs,
            late: match t.rounds.late {
                kaapana_protocol::LateUpdates::Drop => "drop",
                kaapana_protocol::LateUpdates::Fold => "fold",
            }
            .to_owned(),
            dataset: t.dataset.clone(),
            sites: t.sites.iter().map(|s| s.name.clone()).collect(),
            completed: t.completed(),
            history,
        }
    }
}

/// A workflow as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowView {
    /// The workflow.
    pub workflow_id: String,
    /// Its name.
    pub name: String,
    /// `running`, `finished`, `failed` or `cancelled`.
    pub state: String,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Its jobs by state, e.g. `2 running, 1 finished`.
    pub progress: String,
    /// When it was submitted.
    pub created_at: String,
    /// When it ended.
    pub ended_at: Option<String>,
    /// Steps: name and the steps it reads.
    pub steps: Vec<(String, Vec<String>)>,
    /// Its jobs, in step order.
    pub jobs: Vec<WorkflowJobView>,
    /// For a training: its rounds.
    pub training: Option<TrainingView>,
}

impl WorkflowView {
    /// The view of a workflow (trainings: with the bytes of each round's model the owner
    /// sent, from `sent`).
    pub fn new(
        w: &kaapana_federation::Workflow,
        sent: &dyn Fn(&kaapana_protocol::Sha256Digest) -> u64,
    ) -> Self {
        let step_name = |i: usize| w.steps.get(i).map(|s| s.spec.name.clone()).unwrap_or_default();
        Self {
            workflow_id: w.workflow_id.to_string(),
            name: w.name.clone(),
            state: w.state.to_string(),
            reason: w.reason.clone(),
            progress: w.counts().to_string(),
            created_at: w.created_at.to_string(),
            ended_at: w.ended_at.map(|t| t.to_string()),
            steps: w.steps.iter().map(|s| (s.spec.name.clone(), s.spec.inputs.clone())).collect(),
            jobs: w
                .jobs
                .iter()
                .map(|j| WorkflowJobView {
                    name: j.name.clone(),
                    step: step_name(j.step),
                    job_id: j.job_id.to_string(),
                    runner: j.runner_name.clone(),
                    attempt: j.attempt,
                    state: if j.dispatched || j.state.is_terminal() {
                        state_word(j.state)
                    } else {
                        "waiting".into()
                    },
                    reason: j.reason.clone(),
                    result: j.result.map(|b| b.digest.to_string()),
                    samples: j.samples,
                })
                .collect(),
            training: w.training.as_ref().map(|t| TrainingView::new(w, t, sent)),
        }
    }
}

/// A dataset as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetView {
    /// Its name.
    pub name: String,
    /// Its provider (`directory`, `dicomweb`).
    pub provider: String,
    /// Where it is (a folder, a DICOMweb URL).
    pub location: String,
    /// How many items (DICOM series) it holds; `None` if it cannot be read.
    pub items: Option<u64>,
    /// Their total size in bytes (for `dicomweb`: the estimated pixel data).
    pub bytes: Option<u64>,
    /// Items per modality (`dicomweb` datasets).
    #[serde(default)]
    pub modalities: Vec<(String, u64)>,
    /// What a `dicomweb` dataset was registered from (`query Modality=CT`, ...).
    #[serde(default)]
    pub selection: Option<String>,
    /// Why it cannot be read.
    pub error: Option<String>,
}

impl DatasetView {
    /// The view of a registered dataset.
    pub fn new(name: &str, e: &crate::datasets::DatasetEntry) -> Self {
        Self {
            name: name.to_owned(),
            provider: e.provider.kind().to_owned(),
            location: e.provider.location(),
            items: e.scan.as_ref().map(|s| s.items.len() as u64),
            bytes: e.scan.as_ref().map(|s| s.bytes),
            modalities: e.scan.as_ref().map_or_else(Vec::new, |s| {
                s.modalities.iter().map(|m| (m.modality.clone(), m.items)).collect()
            }),
            selection: e.provider.selection(),
            error: e.error.clone(),
        }
    }
}

/// `POST /v1/datasets`: a folder (`folder`), or series in the site's PACS (`dicomweb`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddDatasetRequest {
    /// Its name, as peers will see it.
    pub name: String,
    /// The folder, with one sub-folder per item; an absolute path on the daemon's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<std::path::PathBuf>,
    /// Series of the site's PACS, resolved by QIDO-RS when the dataset is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicomweb: Option<crate::datasets::DicomWebSelection>,
}

/// A job this instance runs for another one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerJobView {
    /// The job.
    pub job_id: String,
    /// The job spec's name.
    pub job_name: String,
    /// Its workflow.
    pub workflow_id: String,
    /// The owner's name.
    pub owner: String,
    /// Its state, in Kaapana's words.
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// When it arrived.
    pub received_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
}

/// A job this instance submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerJobView {
    /// The job.
    pub job_id: String,
    /// Its workflow.
    pub workflow_id: String,
    /// The runner-instance's name.
    pub runner: String,
    /// Its state as the runner last reported it.
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// When that was.
    pub updated_at: String,
}

impl OwnerJobView {
    /// The owner's record of a job of workflow `workflow_id`.
    pub fn new(
        workflow_id: kaapana_protocol::WorkflowId,
        j: &kaapana_federation::WorkflowJob,
    ) -> Self {
        Self {
            job_id: j.job_id.to_string(),
            workflow_id: workflow_id.to_string(),
            runner: j.runner_name.clone(),
            state: state_word(j.state),
            reason: j.reason.clone(),
            updated_at: j.updated_at.to_string(),
        }
    }
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobsView {
    /// Jobs this instance runs (or ran) for others.
    pub running_here: Vec<RunnerJobView>,
    /// Jobs this instance submitted.
    pub submitted: Vec<OwnerJobView>,
}

/// `POST /v1/jobs`: one job for one runner-instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitJobRequest {
    /// The runner-instance, by name or id.
    pub runner: String,
    /// The workflow's name (the runner's policy must allow it).
    pub workflow_name: String,
    /// The job's name.
    pub job_name: String,
    /// The image, `sha256:<64 hex>` (tags are refused).
    pub image: String,
    /// The command line (empty: the image's default).
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment variables `NAME=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// A dataset at the runner.
    #[serde(default)]
    pub dataset: Option<String>,
    /// Wall-clock limit in seconds.
    pub timeout_secs: u32,
    /// CPU limit in millicores (0 = default).
    #[serde(default)]
    pub cpu_millis: u32,
    /// Memory limit in bytes (0 = default).
    #[serde(default)]
    pub memory_bytes: u64,
}

/// `POST /v1/jobs/{id}/reject`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectRequest {
    /// Why.
    pub reason: String,
}

/// Kaapana's word for a state.
pub fn state_word(s: kaapana_protocol::JobState) -> String {
    use kaapana_protocol::JobState as S;
    match s {
        S::Queued => "queued".into(),
        S::Pending { awaiting_approval: true } => "pending (awaiting approval)".into(),
        S::Pending { awaiting_approval: false } => "pending".into(),
        S::Scheduled => "scheduled".into(),
        S::Running => "running".into(),
        S::Finished => "finished".into(),
        S::Failed => "failed".into(),
    }
}

impl From<&kaapana_federation::RunnerJob> for RunnerJobView {
    fn from(j: &kaapana_federation::RunnerJob) -> Self {
        Self {
            job_id: j.job_id.to_string(),
            job_name: j.job_name.clone(),
            workflow_id: j.workflow_id.to_string(),
            owner: j.owner_name.clone(),
            state: state_word(j.state),
            reason: j.reason.clone(),
            received_at: j.received_at.to_string(),
            finished_at: j.finished_at.map(|t| t.to_string()),
        }
    }
}

/// A stored blob of a result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobView {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Where the verified file is at this instance.
    pub path: Option<String>,
}

/// `GET /v1/jobs/{id}/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultView {
    /// The job.
    pub job_id: String,
    /// The runner-instance that signed it.
    pub runner: String,
    /// How the container ended.
    pub exit: String,
    /// The tar of the job's `/output`.
    pub bundle: BlobView,
    /// The job's log, if the runner shared it.
    pub log: Option<BlobView>,
    /// When the container started and ended.
    pub started_at: String,
    /// When it ended.
    pub finished_at: String,
}
