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
    /// `connected`, or why not.
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
}

impl WorkflowView {
    /// The view of a workflow.
    pub fn new(w: &kaapana_federation::Workflow) -> Self {
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
                })
                .collect(),
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
