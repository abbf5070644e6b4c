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
//! | `GET /v1/instances?offset=N&limit=M&q=TEXT` | registered instances with connection state and capabilities, by name (the total in `X-Total-Count`) |
//! | `POST /v1/instances` | register one from a bundle ([`AddInstanceRequest`]) |
//! | `POST /v1/instances/preview` | check a bundle and show who it is, without registering it ([`PreviewRequest`]) |
//! | `PUT /v1/instances/{name-or-id}/policy` | change what a registered instance may do here ([`Policy`](kaapana_federation::Policy)) |
//! | `DELETE /v1/instances/{name-or-id}` | unregister one; its connections close at once |
//! | `POST /v1/messages` | sign a message and queue it for an instance ([`SendRequest`]) |
//! | `GET /v1/inbox?after=N&limit=M` | accepted messages in arrival order |
//! | `GET /v1/jobs` | jobs this instance runs for others, and jobs it submitted |
//! | `POST /v1/jobs` | sign a job for a runner-instance and queue it ([`SubmitJobRequest`]) |
//! | `POST /v1/jobs/{id}/approve`, `POST /v1/jobs/{id}/reject` | decide on a job waiting for approval |
//! | `GET /v1/jobs/{id}/result` | a submitted job's verified result: exit status, bundle and log files |
//! | `GET /v1/jobs/{id}/result/bundle` | the result bundle itself (a tar of the job's `/output`) |
//! | `GET /v1/jobs/{id}/log` | a job's log: the runner's copy (if it shared it) or this instance's own |
//! | `GET /v1/workflows?offset=N&limit=M&state=S&q=TEXT&newest_first=true` | workflows this instance owns, with their state (the total in `X-Total-Count`) |
//! | `POST /v1/workflows` | plan, sign and start a workflow from its TOML file ([`SubmitWorkflowRequest`]) |
//! | `GET /v1/workflows/{id}` | one workflow: its steps and jobs with state, runner and result |
//! | `POST /v1/workflows/{id}/cancel` | cancel a workflow: its jobs stop at every runner |
//! | `GET /v1/datasets` | the site's datasets: name, provider, location, items, size |
//! | `POST /v1/datasets` | register a dataset: a folder or series of the site's PACS over DICOMweb ([`AddDatasetRequest`]) |
//! | `DELETE /v1/datasets/{name}` | forget a dataset (its files stay) |
//! | `GET /v1/events?after=N&wait_ms=M` | observed events, long-polling for new ones |
//!
//! The dashboard ([`crate::dashboard`]) is served on the same address under `/`, `/login` and
//! `/ui`, with a session cookie instead of the bearer token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kaapana_federation::{InstanceRef, RegisteredInstance};
use kaapana_protocol::{AnySigned, AnyVerified, Cancel, Header, JobId, WorkflowId};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminError};
use crate::daemon::{Event, NodeState, PeerStatus, now};

pub mod views;

pub use views::*;

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

    /// An error with this status and message.
    pub fn from_parts(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, message)
    }
}

impl ApiError {
    /// The HTTP status.
    pub const fn status(&self) -> StatusCode {
        self.status
    }

    /// The message for people.
    pub fn message(&self) -> &str {
        &self.message
    }
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
            AdminError::Revoked { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl InstanceView {
    /// The view of a registered instance; `status` is `None` when no daemon runs (then it is
    /// [`InstanceView::offline`]).
    pub fn new(inst: &RegisteredInstance, status: Option<&PeerStatus>, outbox_depth: u64) -> Self {
        let Some(s) = status else { return Self::offline(inst, outbox_depth) };
        let connected = s.connections > 0;
        let status_text = if connected {
            match s.path {
                Some(crate::net::Path::Relayed) => "connected, relayed".to_owned(),
                _ => "connected, direct".to_owned(),
            }
        } else {
            match &s.last_error {
                Some(e) => format!("not connected: {e}"),
                None => "not connected yet".to_owned(),
            }
        };
        Self {
            connected: Some(connected),
            path: s.path.filter(|_| connected).map(|p| p.to_string()),
            status: status_text,
            last_seen: s.last_seen.map(|t| t.to_string()),
            rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
            capabilities: s.capabilities.as_ref().map(CapabilitiesView::from),
            ..Self::offline(inst, outbox_depth)
        }
    }
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
        .route("/instances/preview", post(preview_instance))
        .route("/instances/{which}", axum::routing::delete(remove_instance))
        .route("/instances/{which}/policy", axum::routing::put(set_policy))
        .route("/instances/{which}/revoke", post(revoke_instance))
        .route("/revocations", get(list_revocations).post(import_revocations))
        .route("/rotation", get(rotation_status).post(start_rotation))
        .route("/messages", post(send_message))
        .route("/inbox", get(inbox))
        .route("/audit", get(audit_list))
        .route("/audit/verify", get(audit_verify))
        .route("/jobs", get(list_jobs).post(submit_job))
        .route("/jobs/{id}/approve", post(approve_job))
        .route("/jobs/{id}/reject", post(reject_job))
        .route("/jobs/{id}/result", get(job_result))
        .route("/jobs/{id}/result/bundle", get(job_result_bundle))
        .route("/jobs/{id}/log", get(job_log))
        .route("/workflows", get(list_workflows).post(submit_workflow))
        .route("/workflows/{id}", get(show_workflow))
        .route("/workflows/{id}/cancel", post(cancel_workflow))
        .route("/datasets", get(list_datasets).post(add_dataset))
        .route("/datasets/{name}", axum::routing::delete(remove_dataset))
        .route("/events", get(events))
        .layer(middleware::from_fn_with_state(Arc::new(token.clone()), require_token));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .merge(crate::dashboard::router(Arc::new(crate::dashboard::Sessions::new(token))))
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
    if !crate::dashboard::auth::same_secret(given, &token) {
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

/// This instance, as `GET /v1/info` and the dashboard show it.
pub(crate) async fn info_view(state: &NodeState) -> InfoView {
    InfoView {
        name: state.name.clone(),
        instance_id: state.instance_id.to_string(),
        fingerprint: state.files.certificate.fingerprint().to_string(),
        listen_addrs: state.listen_addrs().await,
    }
}

async fn info(State(state): State<Arc<NodeState>>) -> Json<InfoView> {
    Json(info_view(&state).await)
}

async fn bundle(State(state): State<Arc<NodeState>>) -> ApiResult<String> {
    Ok(state.bundle().await?)
}

/// A page of a list: `offset` and `limit` (at most [`MAX_PAGE`]); `q` filters by name.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    /// Entries to skip.
    #[serde(default)]
    pub offset: usize,
    /// Entries to return (all up to [`MAX_PAGE`] when left out).
    pub limit: Option<usize>,
    /// Only entries whose name contains this (case-insensitive).
    pub q: Option<String>,
    /// Only workflows in this state (`running`, `finished`, `failed`, `cancelled`).
    pub state: Option<String>,
    /// Newest workflows first (default: oldest first).
    #[serde(default)]
    pub newest_first: bool,
}

/// The most entries one list answer holds.
pub const MAX_PAGE: usize = 10_000;

impl PageQuery {
    fn range(&self, total: usize) -> std::ops::Range<usize> {
        let start = self.offset.min(total);
        start..start.saturating_add(self.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE)).min(total)
    }

    fn matches(&self, name: &str) -> bool {
        self.q
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty())
            .is_none_or(|q| name.to_lowercase().contains(&q.to_lowercase()))
    }
}

/// One page of a list and the number of entries of the whole (filtered) list.
#[derive(Debug)]
pub struct Page<T> {
    /// The entries.
    pub entries: Vec<T>,
    /// How many the whole list has.
    pub total: usize,
}

impl<T: serde::Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        ([("x-total-count", self.total.to_string())], Json(self.entries)).into_response()
    }
}

/// The registered instances by name, one page of them (with their live status).
pub fn instance_page(state: &NodeState, q: &PageQuery) -> Result<Page<InstanceView>, ApiError> {
    let mut all: Vec<RegisteredInstance> =
        state.registry().iter().filter(|i| q.matches(&i.name)).cloned().collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let total = all.len();
    let mut entries = Vec::new();
    for inst in &all[q.range(total)] {
        let depth = state.store.outbox_depth(&inst.instance_id).map_err(AdminError::from)?;
        entries.push(InstanceView::new(inst, Some(&state.peer_status(&inst.instance_id)), depth));
    }
    Ok(Page { entries, total })
}

/// The workflows this instance owns, one page of them.
pub fn workflow_page(state: &NodeState, q: &PageQuery) -> Result<Page<WorkflowView>, ApiError> {
    let mut all = state.store.workflows().map_err(|e| ApiError::from(AdminError::from(e)))?;
    all.retain(|w| {
        q.matches(&w.name)
            && q.state.as_deref().is_none_or(|s| s.is_empty() || w.state.to_string() == s)
    });
    all.sort_by_key(|w| (w.created_at, w.workflow_id));
    if q.newest_first {
        all.reverse();
    }
    let total = all.len();
    Ok(Page {
        entries: all[q.range(total)].iter().map(|w| state.workflow_view(w)).collect(),
        total,
    })
}

async fn list_instances(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Page<InstanceView>> {
    instance_page(&state, &q)
}

async fn preview_instance(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<PreviewRequest>,
) -> ApiResult<Json<InstanceView>> {
    let inst = preview_bundle(&state, &req.bundle)?;
    Ok(Json(InstanceView::offline(&inst, 0)))
}

/// Checks a bundle as registering it would (signature, validity, not this instance, not yet
/// registered) and returns who it is, registering nothing.
pub fn preview_bundle(state: &NodeState, bundle: &str) -> Result<RegisteredInstance, ApiError> {
    let inst = admin::verify_bundle(
        &state.files,
        bundle,
        kaapana_federation::Policy::default(),
        None,
        now(),
    )?;
    state.registry().clone().add(inst.clone()).map_err(AdminError::from)?;
    Ok(inst)
}

async fn set_policy(
    State(state): State<Arc<NodeState>>,
    Path(which): Path<String>,
    Json(policy): Json<kaapana_federation::Policy>,
) -> ApiResult<Json<InstanceView>> {
    let which: InstanceRef = parse_arg(&which)?;
    let inst = state.set_policy(&which, policy).await?;
    let depth = state.store.outbox_depth(&inst.instance_id).map_err(AdminError::from)?;
    Ok(Json(InstanceView::new(&inst, Some(&state.peer_status(&inst.instance_id)), depth)))
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

pub(crate) fn workflow_error(e: crate::daemon::WorkflowError) -> ApiError {
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

/// A path or form argument (an id, an instance name or id), or a 400 with the reason.
pub(crate) fn parse_arg<T>(s: &str) -> Result<T, ApiError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn parse_workflow(id: &str) -> Result<WorkflowId, ApiError> {
    parse_arg(id)
}

async fn list_workflows(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Page<WorkflowView>> {
    workflow_page(&state, &q)
}

/// Why a workflow file was not started: the message and, where known, its line in the file.
#[derive(Debug)]
pub struct SubmitError {
    /// The error as the API answers it.
    pub error: ApiError,
    /// The line (from 1) the error is about.
    pub line: Option<usize>,
}

impl From<ApiError> for SubmitError {
    fn from(error: ApiError) -> Self {
        Self { error, line: None }
    }
}

/// Plans, signs and starts a workflow from its file's text.
pub async fn submit_workflow_file(
    state: &Arc<NodeState>,
    text: &str,
) -> Result<kaapana_federation::Workflow, SubmitError> {
    let bad = |e: &crate::workflow_file::WorkflowFileError| SubmitError {
        error: ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        line: e.line_in(text),
    };
    let file = crate::workflow_file::WorkflowFile::parse(text).map_err(|e| bad(&e))?;
    let id = WorkflowId::from_bytes(random_bytes()?);
    let manifest = {
        let registry = state.registry();
        let resolve = |name: &str| {
            if name == state.name {
                return Some(state.instance_id);
            }
            registry.iter().find(|i| i.name == name).map(|i| i.instance_id)
        };
        let resume = match file.resume_from() {
            None => None,
            Some((workflow, round)) => {
                Some(state.resume_model(workflow, round).map_err(|problem| {
                    bad(&crate::workflow_file::WorkflowFileError::Field {
                        job: None,
                        line: text.lines().position(|l| l.contains("resume_from")).map(|i| i + 1),
                        field: "rounds.resume_from",
                        problem,
                    })
                })?)
            }
        };
        file.to_manifest(
            id,
            state.instance_id,
            Header::new(now(), WORKFLOW_LIFETIME),
            &resolve,
            resume,
        )
        .map_err(|e| bad(&e))?
    };
    state.submit_workflow(manifest).await.map_err(|e| SubmitError::from(workflow_error(e)))
}

async fn submit_workflow(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<SubmitWorkflowRequest>,
) -> ApiResult<(StatusCode, Json<WorkflowView>)> {
    let workflow = submit_workflow_file(&state, &req.toml).await.map_err(|e| e.error)?;
    Ok((StatusCode::CREATED, Json(state.workflow_view(&workflow))))
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
    Ok(Json(state.workflow_view(&record)))
}

async fn cancel_workflow(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkflowView>> {
    let id = parse_workflow(&id)?;
    let by = state.name.clone();
    let w = state.cancel_workflow(id, by).await.map_err(workflow_error)?;
    Ok(Json(state.workflow_view(&w)))
}

fn dataset_error(e: crate::datasets::DatasetError) -> ApiError {
    use crate::datasets::DatasetError as E;
    let status = match &e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Exists { .. } => StatusCode::CONFLICT,
        E::BadName(_)
        | E::BadFolder { .. }
        | E::Io { .. }
        | E::BadRequest(_)
        | E::EmptySelection { .. }
        | E::Pacs(_)
        | E::BadSeries { .. } => StatusCode::BAD_REQUEST,
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
    match (req.folder, req.dicomweb) {
        (Some(folder), None) => state.add_dataset(&req.name, &folder).await,
        (None, Some(selection)) => state.add_dicomweb_dataset(&req.name, selection).await,
        _ => Err(crate::datasets::DatasetError::BadRequest(
            "a dataset is a folder (`folder`) or series in the PACS (`dicomweb`), one of them"
                .into(),
        )),
    }
    .map_err(dataset_error)?;
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
    let which: InstanceRef = parse_arg(&which)?;
    let inst = state.remove_instance(&which).await?;
    Ok(Json(InstanceView::new(&inst, None, 0)))
}

/// `POST /v1/instances/{which}/revoke`.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub struct RevokeRequest {
    /// Why (for the audit log).
    #[serde(default)]
    pub reason: String,
}

async fn revoke_instance(
    State(state): State<Arc<NodeState>>,
    Path(which): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> ApiResult<Json<crate::daemon::RevocationView>> {
    let which: InstanceRef = parse_arg(&which)?;
    let reason = if req.reason.is_empty() { "revoked by the site's admin" } else { &req.reason };
    let record = state.revoke_instance(&which, reason).await?;
    Ok(Json((&record).into()))
}

/// `POST /v1/revocations`: a federation CA's revocation list to adopt.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct ImportRevocationsRequest {
    /// The list file's text (PEM, as `ca revoke` writes it).
    pub list: String,
}

async fn import_revocations(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<ImportRevocationsRequest>,
) -> ApiResult<Json<Vec<crate::daemon::RevocationView>>> {
    let list = crate::trust::parse_revocation_list(&req.list).map_err(AdminError::from)?;
    let revoked = state.import_revocation_list(&list).await?;
    Ok(Json(revoked.iter().map(Into::into).collect()))
}

async fn list_revocations(
    State(state): State<Arc<NodeState>>,
) -> ApiResult<Json<crate::daemon::RevocationsView>> {
    Ok(Json(state.revocations()?))
}

async fn rotation_status(
    State(state): State<Arc<NodeState>>,
) -> ApiResult<Json<crate::daemon::RotationView>> {
    Ok(Json(state.rotation_status()?))
}

async fn start_rotation(
    State(state): State<Arc<NodeState>>,
    Json(req): Json<crate::daemon::RotateRequest>,
) -> ApiResult<Json<crate::daemon::RotationView>> {
    Ok(Json(state.start_rotation(&req).await?))
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

/// `GET /v1/audit?after=N&limit=M`: audit entries after `N`, in order (not verified).
async fn audit_list(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<AfterQuery>,
) -> ApiResult<Json<Vec<crate::audit::AuditEntryView>>> {
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let entries = state.store.audit_entries(q.after, limit).map_err(AdminError::from)?;
    Ok(Json(entries.iter().map(|(seq, v)| crate::audit::AuditEntryView::of(*seq, v)).collect()))
}

/// `GET /v1/audit/verify`: verifies the whole audit log as of one snapshot of the store.
async fn audit_verify(
    State(state): State<Arc<NodeState>>,
) -> ApiResult<Json<crate::audit::VerifyReport>> {
    let key = crate::trust::audit_keys(&state.files.dir, &state.files.certificate)?;
    let store = state.store.clone();
    let result = tokio::task::spawn_blocking(move || store.verify_audit(&key))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(AdminError::from)?;
    Ok(Json(result.into()))
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
            let work = match &p.work {
                kaapana_protocol::Work::Container(c) => format!("image {}", c.image),
                kaapana_protocol::Work::AirflowDag(d) => format!("Airflow DAG {}", d.dag_id),
            };
            format!(
                "job {} ({}) of workflow {}, attempt {}, {work}",
                p.job_name, p.job_id, p.workflow_id, p.attempt
            )
        }
        AnyVerified::JobUpdate(u) => {
            let p = u.payload();
            let why = p.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            format!("job {} attempt {} is {:?}{why}", p.job_id, p.attempt, p.state)
        }
        AnyVerified::RevocationList(l) => {
            let p = l.payload();
            format!("revocation list {} of {}: {} revoked", p.number, p.federation, p.revoked.len())
        }
        AnyVerified::KeyHandOver(h) => {
            format!("key hand-over of {}: {}", h.signer(), h.payload().reason)
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
        work: kaapana_protocol::Work::Container(kaapana_protocol::ContainerWork {
            image,
            command: req.command,
            env,
        }),
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

pub(crate) fn job_error(e: crate::daemon::JobError) -> ApiError {
    use crate::daemon::JobError as E;
    let status = match &e {
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Transition(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn parse_job(id: &str) -> Result<JobId, ApiError> {
    parse_arg(id)
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

pub(crate) async fn job_result(
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

/// The verified bundle file of a job's result at this instance.
pub(crate) async fn result_bundle_path(
    state: &Arc<NodeState>,
    id: &str,
) -> ApiResult<std::path::PathBuf> {
    let Json(result) = job_result(State(Arc::clone(state)), Path(id.to_owned())).await?;
    result.bundle.path.map(std::path::PathBuf::from).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the result bundle of job {id} is not stored here (yet)"),
        )
    })
}

/// A file as a download named `name`.
pub(crate) async fn download(
    path: &std::path::Path,
    name: &str,
    content_type: &str,
) -> ApiResult<Response> {
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_str(content_type)
            .unwrap_or(header::HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    Ok(response)
}

async fn job_result_bundle(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let path = result_bundle_path(&state, &id).await?;
    download(&path, &format!("result-{id}.tar"), "application/x-tar").await
}

pub(crate) async fn job_log(
    State(state): State<Arc<NodeState>>,
    Path(id): Path<String>,
) -> ApiResult<String> {
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
