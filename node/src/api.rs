//! The local HTTP/JSON API of a running daemon (axum), used by the CLI, the dashboard and
//! scrapers. It listens on loopback; every `/v1` route needs `Authorization: Bearer <token>`
//! with the token from the data directory's `api-token` file. `/healthz` and `/metrics` are
//! open.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/info` | this instance |
//! | `GET /v1/bundle` | this instance's exchange bundle (PEM) |
//! | `GET /v1/instances` | registered instances with connection state and capabilities |
//! | `POST /v1/instances` | register one from a bundle ([`AddInstanceRequest`]) |
//! | `DELETE /v1/instances/{name-or-id}` | unregister one; its connections close at once |
//! | `POST /v1/messages` | sign a message and queue it for an instance ([`SendRequest`]) |
//! | `GET /v1/inbox?after=N&limit=M` | accepted messages in arrival order |
//! | `GET /v1/jobs` | jobs this instance runs for others, and jobs it submitted |
//! | `POST /v1/jobs` | sign a job for a runner-instance and queue it ([`SubmitJobRequest`]) |
//! | `POST /v1/jobs/{id}/approve`, `POST /v1/jobs/{id}/reject` | decide on a job waiting for approval |
//! | `GET /v1/jobs/{id}/result` | a submitted job's verified result: exit status, bundle and log files |
//! | `GET /v1/jobs/{id}/log` | a job's log: the runner's copy (if it shared it) or this instance's own |
//! | `GET /v1/workflows` | workflows this instance owns, with their state |
//! | `POST /v1/workflows` | plan, sign and start a workflow from its TOML file ([`SubmitWorkflowRequest`]) |
//! | `GET /v1/workflows/{id}` | one workflow: its steps and jobs with state, runner and result |
//! | `POST /v1/workflows/{id}/cancel` | cancel a workflow: its jobs stop at every runner |
//! | `GET /v1/datasets` | the site's datasets: name, provider, location, items, size |
//! | `POST /v1/datasets` | register a dataset folder ([`AddDatasetRequest`]) |
//! | `DELETE /v1/datasets/{name}` | forget a dataset (its files stay) |
//! | `GET /v1/events?after=N&wait_ms=M` | observed events, long-polling for new ones |

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kaapana_federation::{InstanceRef, Policy, RegisteredInstance};
use kaapana_protocol::{
    AnySigned, AnyVerified, Cancel, CapabilityAd, Header, JobId, NameScope, WorkflowId,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminError};
use crate::daemon::{Event, NodeState, PeerStatus, now};

/// A failed API call: the HTTP status and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        use kaapana_federation::RegistryError;
        let status = match &e {
            AdminError::Registry(RegistryError::NotFound { .. }) => StatusCode::NOT_FOUND,
            AdminError::Registry(_) => StatusCode::CONFLICT,
            AdminError::Cert(_)
            | AdminError::OwnBundle { .. }
            | AdminError::FingerprintMismatch { .. }
            | AdminError::BadArgument(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

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
            cpu_millis: ad.resources.cpu_millis,
            memory_bytes: ad.resources.memory_bytes,
            gpus: ad.resources.gpus.len(),
            expires_at: ad.header.expires_at.to_string(),
        }
    }
}

impl InstanceView {
    /// The view of a registered instance; `status` is `None` when no daemon runs.
    pub fn new(inst: &RegisteredInstance, status: Option<&PeerStatus>, outbox_depth: u64) -> Self {
        let connected = status.map(|s| s.connections > 0);
        let status_text = match (status, connected) {
            (None, _) => "unknown: the daemon is not running".to_owned(),
            (Some(_), Some(true)) => "connected".to_owned(),
            (Some(s), _) => match &s.last_error {
                Some(e) => format!("not connected: {e}"),
                None => "not connected yet".to_owned(),
            },
        };
        Self {
            name: inst.name.clone(),
            instance_id: inst.instance_id.to_string(),
            fingerprint: kaapana_certs::Fingerprint(inst.fingerprint).to_string(),
            listen_addrs: inst.listen_addrs.clone(),
            certificate_not_after: inst.certificate_not_after.to_string(),
            policy: inst.policy.clone(),
            connected,
            status: status_text,
            last_seen: status.and_then(|s| s.last_seen).map(|t| t.to_string()),
            rtt_ms: status.and_then(|s| s.rtt).map(|d| d.as_secs_f64() * 1000.0),
            outbox_depth,
            capabilities: status.and_then(|s| s.capabilities.as_ref()).map(CapabilitiesView::from),
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

/// `POST /v1/messages`: a message for one instance, signed by this node and queued durably.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// The receiving instance, by name or id.
    pub to: String,
    /// A cancellation, for now the only message a user sends directly (workflows send the
    /// rest).
    pub cancel: CancelRequest,
}

/// The content of a [`Cancel`].
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

#[derive(Debug, Deserialize)]
struct AfterQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

/// Serves the API until `cancel` fires.
pub async fn serve(
    state: Arc<NodeState>,
    listener: tokio::net::TcpListener,
    token: String,
    cancel: CancellationToken,
) {
    let v1 = Router::new()
        .route("/info", get(info))
        .route("/bundle", get(bundle))
        .route("/instances", get(list_instances).post(add_instance))
        .route("/instances/{which}", axum::routing::delete(remove_instance))
        .route("/messages", post(send_message))
        .route("/inbox", get(inbox))
        .route("/jobs", get(list_jobs).post(submit_job))
        .route("/jobs/{id}/approve", post(approve_job))
        .route("/jobs/{id}/reject", post(reject_job))
        .route("/jobs/{id}/result", get(job_result))
        .route("/jobs/{id}/log", get(job_log))
        .route("/workflows", get(list_workflows).post(submit_workflow))
        .route("/workflows/{id}", get(show_workflow))
        .route("/workflows/{id}/cancel", post(cancel_workflow))
        .route("/datasets", get(list_datasets).post(add_dataset))
        .route("/datasets/{name}", axum::routing::delete(remove_dataset))
        .route("/events", get(events))
        .layer(middleware::from_fn_with_state(Arc::new(token), require_token));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .with_state(state);
    let shutdown = cancel.clone();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "the API server failed");
    }
}

async fn require_token(
    State(token): State<Arc<String>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time in the token's length.
    let ok = given.len() == token.len()
        && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see the data directory's api-token file)",
        ));
    }
    Ok(next.run(request).await)
}

async fn metrics(State(state): State<Arc<NodeState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn info(State(state): State<Arc<NodeState>>) -> Json<InfoView> {
    Json(InfoView {
        name: state.name.clone(),
        instance_id: state.instance_id.to_string(),
        fingerprint: state.files.certificate.fingerprint().to_string(),
        listen_addrs: state.listen_addrs().await,
    })
}

async fn bundle(State(state): State<Arc<NodeState>>) -> ApiResult<String> {
    Ok(state.bundle().await?)
}

async fn list_instances(State(state): State<Arc<NodeState>>) -> ApiResult<Json<Vec<InstanceView>>> {
    let mut all: Vec<RegisteredInstance> = state.registry().iter().cloned().collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(all.len());
    for inst in &all {
        let depth = state.store.outbox_depth(&inst.instance_id).map_err(AdminError::from)?;
        out.push(InstanceView::new(inst, Some(&state.peer_status(&inst.instance_id)), depth));
    }
    Ok(Json(out))
}

async fn add_instance(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<AddInstanceRequest>,
) -> ApiResult<(StatusCode, Json<InstanceView>)> {
    let inst = admin::verify_bundle(
        &state.files,
        &req.bundle,
        req.policy,
        req.expect_fingerprint.as_deref(),
        now(),
    )?;
    state.add_instance(inst.clone()).await?;
    Ok((StatusCode::CREATED, Json(InstanceView::new(&inst, Some(&PeerStatus::default()), 0))))
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

fn workflow_error(e: crate::daemon::WorkflowError) -> ApiError {
    use crate::daemon::WorkflowError as E;
    let status = match &e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Plan(_) => StatusCode::BAD_REQUEST,
        E::Ended(..) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

/// How long a workflow manifest stays valid.
const WORKFLOW_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

fn parse_workflow(id: &str) -> Result<WorkflowId, ApiError> {
    id.parse().map_err(|e: kaapana_protocol::ValidationError| {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    })
}

async fn list_workflows(State(state): State<Arc<NodeState>>) -> ApiResult<Json<Vec<WorkflowView>>> {
    let mut all = state.store.workflows().map_err(|e| ApiError::from(AdminError::from(e)))?;
    all.sort_by_key(|w| w.created_at);
    Ok(Json(all.iter().map(WorkflowView::new).collect()))
}

async fn submit_workflow(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<SubmitWorkflowRequest>,
) -> ApiResult<(StatusCode, Json<WorkflowView>)> {
    let bad = |e: &dyn std::fmt::Display| ApiError::new(StatusCode::BAD_REQUEST, e.to_string());
    let file = crate::workflow_file::WorkflowFile::parse(&req.toml).map_err(|e| bad(&e))?;
    let id = WorkflowId::from_bytes(random_bytes()?);
    let manifest = {
        let registry = state.registry();
        let resolve = |name: &str| {
            if name == state.name {
                return Some(state.instance_id);
            }
            registry.iter().find(|i| i.name == name).map(|i| i.instance_id)
        };
        file.to_manifest(id, state.instance_id, Header::new(now(), WORKFLOW_LIFETIME), &resolve)
            .map_err(|e| bad(&e))?
    };
    let workflow = state.submit_workflow(manifest).await.map_err(workflow_error)?;
    Ok((StatusCode::CREATED, Json(WorkflowView::new(&workflow))))
}

async fn show_workflow(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkflowView>> {
    let id = parse_workflow(&id)?;
    let record = state
        .store
        .workflow(&id)
        .map_err(|e| ApiError::from(AdminError::from(e)))?
        .ok_or_else(|| workflow_error(crate::daemon::WorkflowError::NotFound(id)))?;
    Ok(Json(WorkflowView::new(&record)))
}

async fn cancel_workflow(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkflowView>> {
    let id = parse_workflow(&id)?;
    let by = state.name.clone();
    let w = state.cancel_workflow(id, by).await.map_err(workflow_error)?;
    Ok(Json(WorkflowView::new(&w)))
}

/// A dataset as the API and CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetView {
    /// Its name.
    pub name: String,
    /// Its provider (`directory`).
    pub provider: String,
    /// Where it is.
    pub location: String,
    /// How many items (DICOM series) it holds; `None` if it cannot be read.
    pub items: Option<u64>,
    /// Their total size in bytes.
    pub bytes: Option<u64>,
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
            error: e.error.clone(),
        }
    }
}

/// `POST /v1/datasets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddDatasetRequest {
    /// Its name, as peers will see it.
    pub name: String,
    /// The folder, with one sub-folder per item; an absolute path on the daemon's host.
    pub folder: std::path::PathBuf,
}

fn dataset_error(e: crate::datasets::DatasetError) -> ApiError {
    use crate::datasets::DatasetError as E;
    let status = match &e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Exists { .. } => StatusCode::CONFLICT,
        E::BadName(_) | E::BadFolder { .. } | E::Io { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

async fn list_datasets(State(state): State<Arc<NodeState>>) -> Json<Vec<DatasetView>> {
    let d = state.datasets();
    Json(d.entries().iter().map(|(n, e)| DatasetView::new(n, e)).collect())
}

async fn add_dataset(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<AddDatasetRequest>,
) -> ApiResult<(StatusCode, Json<DatasetView>)> {
    state.add_dataset(&req.name, &req.folder).await.map_err(dataset_error)?;
    let d = state.datasets();
    let e = d.entries().get(&req.name).ok_or_else(|| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the dataset vanished while added")
    })?;
    Ok((StatusCode::CREATED, Json(DatasetView::new(&req.name, e))))
}

async fn remove_dataset(
    State(state): State<Arc<NodeState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.remove_dataset(&name).await.map_err(dataset_error)?;
    Ok(Json(serde_json::json!({ "removed": name })))
}

async fn remove_instance(
    State(state): State<Arc<NodeState>>,
    Path(which): Path<String>,
) -> ApiResult<Json<InstanceView>> {
    let which: InstanceRef =
        which.parse().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{e}")))?;
    let inst = state.remove_instance(&which).await?;
    Ok(Json(InstanceView::new(&inst, None, 0)))
}

async fn send_message(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<SendRequest>,
) -> ApiResult<(StatusCode, Json<SendResponse>)> {
    let bad = |e: &dyn std::fmt::Display| ApiError::new(StatusCode::BAD_REQUEST, e.to_string());
    let to: InstanceRef = req.to.parse().map_err(|e| bad(&e))?;
    let peer = state.registry().resolve(&to).map(|i| i.instance_id).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("no registered instance {to}"))
    })?;
    let cancel = Cancel {
        header: Header::new(now(), Duration::from_secs(7 * 24 * 3600)),
        workflow_id: req.cancel.workflow_id.parse::<WorkflowId>().map_err(|e| bad(&e))?,
        job_id: req.cancel.job_id.map(|j| j.parse::<JobId>()).transpose().map_err(|e| bad(&e))?,
        reason: req.cancel.reason,
    };
    let signed = state.sign(&cancel).map_err(|e| bad(&e))?;
    let id = signed.id().to_string();
    state.enqueue(peer, vec![AnySigned::from(signed)]).await.map_err(AdminError::from)?;
    Ok((StatusCode::ACCEPTED, Json(SendResponse { id })))
}

async fn inbox(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<AfterQuery>,
) -> ApiResult<Json<Vec<InboxEntry>>> {
    let records = state
        .store
        .inbox(q.after, q.limit.unwrap_or(1000).min(10_000))
        .map_err(AdminError::from)?;
    let entries = records
        .into_iter()
        .map(|(seq, r)| {
            let (id, kind, summary) = match AnySigned::from_bytes(&r.envelope) {
                Ok(m) => {
                    // Recorded after verification; verified again only to show the payload.
                    let summary = m
                        .verify(r.received_at, &state.verify_options)
                        .map(|v| summarize(&v))
                        .unwrap_or_else(|e| format!("(no longer verifiable: {e})"));
                    (m.id().to_string(), m.kind().name().to_owned(), summary)
                }
                Err(e) => (String::new(), "unreadable".to_owned(), e.to_string()),
            };
            InboxEntry {
                seq,
                id,
                kind,
                from: r.from.to_string(),
                received_at: r.received_at.to_string(),
                summary,
            }
        })
        .collect();
    Ok(Json(entries))
}

async fn events(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<AfterQuery>,
) -> Json<Vec<Event>> {
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(30_000));
    Json(state.events.after(q.after, wait).await)
}

/// One line about a message, for people.
fn summarize(m: &AnyVerified) -> String {
    match m {
        AnyVerified::Cancel(c) => {
            let p = c.payload();
            let job = p.job_id.map(|j| format!(" job {j}")).unwrap_or_default();
            format!("cancel workflow {}{job}: {}", p.workflow_id, p.reason)
        }
        AnyVerified::JobManifest(j) => {
            let p = j.payload();
            format!(
                "job {} ({}) of workflow {}, attempt {}, image {}",
                p.job_name, p.job_id, p.workflow_id, p.attempt, p.image
            )
        }
        AnyVerified::JobUpdate(u) => {
            let p = u.payload();
            let why = p.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            format!("job {} attempt {} is {:?}{why}", p.job_id, p.attempt, p.state)
        }
        AnyVerified::ResultManifest(r) => {
            let p = r.payload();
            format!(
                "result of job {} attempt {}: {:?}, bundle {} ({} bytes)",
                p.job_id, p.attempt, p.exit, p.bundle.digest, p.bundle.size
            )
        }
        AnyVerified::WorkflowManifest(w) => {
            let p = w.payload();
            format!("workflow {} ({}) with {} job(s)", p.name, p.workflow_id, p.jobs.len())
        }
        AnyVerified::CapabilityAd(a) => format!("capabilities, sequence {}", a.payload().sequence),
    }
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
    pub fn new(workflow_id: WorkflowId, j: &kaapana_federation::WorkflowJob) -> Self {
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

async fn list_jobs(State(state): State<Arc<NodeState>>) -> ApiResult<Json<JobsView>> {
    let store_err = |e: crate::store::StoreError| ApiError::from(AdminError::from(e));
    let mut running_here: Vec<RunnerJobView> =
        state.store.runner_jobs().map_err(store_err)?.iter().map(|r| (&r.job).into()).collect();
    running_here.sort_by(|a, b| a.received_at.cmp(&b.received_at));
    let mut submitted: Vec<OwnerJobView> = Vec::new();
    for w in state.store.workflows().map_err(store_err)? {
        submitted.extend(
            w.jobs.iter().filter(|j| j.dispatched).map(|j| OwnerJobView::new(w.workflow_id, j)),
        );
    }
    submitted.sort_by(|a, b| a.updated_at.cmp(&b.updated_at));
    Ok(Json(JobsView { running_here, submitted }))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ApiError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"))?;
    Ok(b)
}

async fn submit_job(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<SubmitJobRequest>,
) -> ApiResult<(StatusCode, Json<OwnerJobView>)> {
    let bad = |e: &dyn std::fmt::Display| ApiError::new(StatusCode::BAD_REQUEST, e.to_string());
    let to: InstanceRef = req.runner.parse().map_err(|e| bad(&e))?;
    let runner =
        state.registry().resolve(&to).map(|i| (i.instance_id, i.name.clone())).ok_or_else(
            || ApiError::new(StatusCode::NOT_FOUND, format!("no registered instance {to}")),
        )?;
    let image = kaapana_protocol::ImageDigest::parse(&req.image).map_err(|e| bad(&e))?;
    let env = req
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(n, v)| kaapana_protocol::EnvVar { name: n.to_owned(), value: v.to_owned() })
                .ok_or_else(|| bad(&format!("environment variable `{kv}` is not NAME=value")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let job = kaapana_protocol::JobManifest {
        header: Header::new(now(), Duration::from_secs(7 * 24 * 3600)),
        job_id: JobId::from_bytes(random_bytes()?),
        workflow_id: WorkflowId::from_bytes(random_bytes()?),
        owner: state.instance_id,
        runner: runner.0,
        job_name: req.job_name,
        attempt: 0,
        dataset: req.dataset.map(|name| kaapana_protocol::DatasetRef { name, item: None }),
        image,
        command: req.command,
        env,
        limits: kaapana_protocol::ResourceLimits {
            cpu_millis: req.cpu_millis,
            memory_bytes: req.memory_bytes,
            gpus: 0,
        },
        timeout_secs: req.timeout_secs,
        inputs: Vec::new(),
        workflow_name: req.workflow_name,
    };
    kaapana_protocol::Manifest::validate(&job).map_err(|e| bad(&e))?;
    let workflow_id = job.workflow_id;
    let owner_job = state.submit_job(job).await.map_err(workflow_error)?;
    let _ = runner.1;
    Ok((StatusCode::ACCEPTED, Json(OwnerJobView::new(workflow_id, &owner_job))))
}

fn job_error(e: crate::daemon::JobError) -> ApiError {
    use crate::daemon::JobError as E;
    let status = match &e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Transition(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn parse_job(id: &str) -> Result<JobId, ApiError> {
    id.parse().map_err(|e: kaapana_protocol::ValidationError| {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    })
}

async fn approve_job(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<RunnerJobView>> {
    let job = state.decide_job(parse_job(&id)?, Ok(())).await.map_err(job_error)?;
    Ok(Json((&job).into()))
}

async fn reject_job(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
    Json(req): Json<RejectRequest>,
) -> ApiResult<Json<RunnerJobView>> {
    let job = state.decide_job(parse_job(&id)?, Err(req.reason)).await.map_err(job_error)?;
    Ok(Json((&job).into()))
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

async fn job_result(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<ResultView>> {
    let job = parse_job(&id)?;
    let envelope =
        state.store.result(&job).map_err(|e| ApiError::from(AdminError::from(e)))?.ok_or_else(
            || ApiError::new(StatusCode::NOT_FOUND, format!("no result for job {job} (yet)")),
        )?;
    let signed =
        kaapana_protocol::Signed::<kaapana_protocol::ResultManifest>::from_bytes(&envelope)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // Verified when it arrived; its validity period may have passed since.
    let verified = signed
        .verify_stored()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let blobs = crate::blobs::BlobStore::in_data_dir(&state.files.dir)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let blob = |b: kaapana_protocol::BlobRef| BlobView {
        digest: b.digest.to_string(),
        size: b.size,
        path: blobs.path(&b.digest).map(|p| p.display().to_string()),
    };
    let m = verified.payload();
    Ok(Json(ResultView {
        job_id: m.job_id.to_string(),
        runner: state.name_of(&verified.signer()),
        exit: format!("{:?}", m.exit),
        bundle: blob(m.bundle),
        log: m.log.map(blob),
        started_at: m.timings.started_at.to_string(),
        finished_at: m.timings.finished_at.to_string(),
    }))
}

async fn job_log(State(state): State<Arc<NodeState>>, Path(id): Path<String>) -> ApiResult<String> {
    let job = parse_job(&id)?;
    if let Ok(Json(result)) = job_result(State(Arc::clone(&state)), Path(id)).await
        && let Some(path) = result.log.and_then(|l| l.path)
    {
        return std::fs::read_to_string(&path)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
    }
    let local = state.files.dir.root().join("jobs").join(job.to_string()).join("job.log");
    std::fs::read_to_string(&local).map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no log for job {job} here (the runner's policy may not share logs with this instance)"),
        )
    })
}
