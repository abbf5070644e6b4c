//! The dashboard: Kaapana's "Instance Overview", "Workflow List" and the approvals of this
//! instance as server-rendered pages on the API's address, with one small script for live
//! updates (server-sent events; no page reloads) and file inputs.
//!
//! This module owns the pages' routes and what they do; the HTML is in [`pages`], the
//! drawings in [`graph`], the login, sessions and CSRF checks in [`auth`]. The assets
//! (`assets/app.css`, `assets/app.js`) are compiled into the binary: nothing is fetched from
//! elsewhere and no Node.js is needed to build or run it.
//!
//! It must not bypass the daemon: every action goes through the same [`NodeState`] methods
//! (and checks) as the JSON API.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | to the Workflow List (or the login) |
//! | `GET /login`, `POST /login` | log in with the API token; `POST /ui/logout` ends the session |
//! | `GET /ui/instances` | Instance Overview: this instance, registration, the registered instances (paged) |
//! | `POST /ui/instances/preview`, `POST /ui/instances/register` | check a bundle and show its fingerprint; register it |
//! | `GET /ui/instances/{name}` | one instance: status, capabilities, messages chart, policy |
//! | `POST /ui/instances/{name}/policy`, `.../policy/confirm` | review and apply a policy change |
//! | `GET`, `POST /ui/instances/{name}/remove` | confirm and remove |
//! | `GET /ui/bundle` | this instance's exchange bundle as a file |
//! | `GET /ui/workflows`, `POST /ui/workflows` | Workflow List (paged, filtered); submit a workflow file |
//! | `GET /ui/workflows/new` | the submission form |
//! | `GET /ui/workflows/{id}`, `POST /ui/workflows/{id}/cancel` | one workflow: graph, jobs, chart; cancel |
//! | `GET /ui/jobs/{id}/log`, `GET /ui/jobs/{id}/result` | a job's log; its result bundle as a download |
//! | `GET /ui/approvals`, `POST /ui/approvals/{job}/approve`, `.../reject` | jobs waiting here for a decision |
//! | `GET /ui/live/...`, `GET /ui/workflows/{id}/live` | the live parts of the pages, as HTML fragments |
//! | `GET /ui/events` | the node's events as server-sent events |
//! | `GET /ui/assets/{file}` | the stylesheet and the script (the only routes open without a session) |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use kaapana_federation::{AllowList, Execution, InstanceRef, Policy};
use maud::Markup;
use serde::Deserialize;

use crate::api::{self, InstanceView, PageQuery, WorkflowView};
use crate::daemon::{NodeState, now};

pub mod auth;
pub mod graph;
pub mod pages;

pub use auth::{Session, Sessions};
use pages::{Frame, PAGE_SIZE, Section};

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// The dashboard's routes (see the module docs), for [`crate::api::serve`] to merge.
pub fn router(sessions: Arc<Sessions>) -> Router<Arc<NodeState>> {
    let ui = Router::new()
        .route("/ui/instances", get(instances))
        .route("/ui/instances/preview", post(instance_preview))
        .route("/ui/instances/register", post(instance_register))
        .route("/ui/instances/{which}", get(instance))
        .route("/ui/instances/{which}/policy", post(policy_review))
        .route("/ui/instances/{which}/policy/confirm", post(policy_apply))
        .route("/ui/instances/{which}/remove", get(remove_confirm).post(remove_apply))
        .route("/ui/bundle", get(own_bundle))
        .route("/ui/workflows", get(workflows).post(workflow_submit))
        .route("/ui/workflows/new", get(workflow_new))
        .route("/ui/workflows/{id}", get(workflow))
        .route("/ui/workflows/{id}/live", get(workflow_live))
        .route("/ui/workflows/{id}/cancel", post(workflow_cancel))
        .route("/ui/jobs/{id}/log", get(job_log))
        .route("/ui/jobs/{id}/result", get(job_result))
        .route("/ui/approvals", get(approvals))
        .route("/ui/approvals/{job}/approve", post(approve))
        .route("/ui/approvals/{job}/reject", post(reject))
        .route("/ui/live/instances", get(instances_live))
        .route("/ui/live/workflows", get(workflows_live))
        .route("/ui/live/approvals", get(approvals_live))
        .route("/ui/events", get(events))
        .route("/ui/logout", post(logout))
        .layer(middleware::from_fn_with_state(Arc::clone(&sessions), auth::require_session));
    Router::new()
        .route("/", get(root))
        .route("/login", get(login_form).post(login))
        .route("/ui/assets/{file}", get(asset))
        .merge(ui)
        .layer(middleware::map_response(security_headers))
        .layer(Extension(sessions))
}

/// What every dashboard answer carries: no framing, no inline scripts or styles, nothing
/// from other origins, no caching of pages.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

type St = State<Arc<NodeState>>;

/// A page, or an error shown as one.
type PageResult = Result<Response, Response>;

fn html(status: StatusCode, m: Markup) -> Response {
    (status, Html(m.into_string())).into_response()
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

fn awaiting(state: &NodeState) -> usize {
    state
        .site()
        .runner_jobs()
        .filter(|r| r.job.state == kaapana_protocol::JobState::Pending { awaiting_approval: true })
        .count()
}

fn frame<'a>(state: &'a NodeState, session: &'a Session, section: Section) -> Frame<'a> {
    Frame { instance: &state.name, csrf: &session.csrf, section, awaiting: awaiting(state) }
}

/// An API error as a page of `section`.
fn error_page(state: &NodeState, s: &Session, section: Section, e: &api::ApiError) -> Response {
    let title = match e.status() {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::CONFLICT => "Not possible now",
        StatusCode::BAD_REQUEST => "Refused",
        _ => "Error",
    };
    html(e.status(), pages::error_page(&frame(state, s, section), title, e.message()))
}

/// The notices a redirect after an action asks for (fixed texts: nothing from the URL is
/// shown).
#[derive(Debug, Default, Deserialize)]
struct Done {
    done: Option<String>,
}

impl Done {
    fn notice(&self) -> Markup {
        let text = match self.done.as_deref() {
            Some("registered") => {
                Some("Registered. The instance can connect once it has registered this one too.")
            }
            Some("policy") => Some("Policy saved; the instance has been sent a new capability ad."),
            Some("removed") => Some("Removed; its connections are closed."),
            Some("cancelled") => Some("Cancelled; the runner-instances are told to stop its jobs."),
            Some("approved") => Some("Approved: the job starts."),
            Some("rejected") => Some("Rejected: the requesting instance is told why."),
            Some("submitted") => Some("Signed and started."),
            _ => None,
        };
        pages::flash(text)
    }
}

// ---- login ----------------------------------------------------------------------------------

async fn root(Extension(sessions): Extension<Arc<Sessions>>, headers: HeaderMap) -> Response {
    if sessions.session(&headers).is_some() {
        see_other("/ui/workflows")
    } else {
        see_other("/login")
    }
}

#[derive(Debug, Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Only paths of the dashboard: `next` must not send the browser elsewhere.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/ui/workflows".to_owned(),
    }
}

async fn login_form(Query(q): Query<NextQuery>) -> Response {
    html(StatusCode::OK, pages::login(&safe_next(q.next.as_deref()), None))
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(
    Extension(sessions): Extension<Arc<Sessions>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    // Refuse logins posted by other origins' pages (login CSRF).
    if let Err(why) = auth::from_this_origin(&headers) {
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    match sessions.login(&f.token) {
        Some(id) => {
            let mut r = see_other(&next);
            if let Ok(v) = HeaderValue::from_str(&auth::session_cookie(&id, &headers)) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        None => html(
            StatusCode::UNAUTHORIZED,
            pages::login(&next, Some("That is not this node's API token.")),
        ),
    }
}

async fn logout(Extension(sessions): Extension<Arc<Sessions>>, headers: HeaderMap) -> Response {
    sessions.logout(&headers);
    let mut r = see_other("/login");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&auth::cleared_cookie())
            .unwrap_or(HeaderValue::from_static("kaapana_node_session=; Max-Age=0")),
    );
    r
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

// ---- Instance Overview ------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    page: Option<usize>,
    #[serde(default)]
    q: String,
    #[serde(default)]
    state: String,
    done: Option<String>,
}

impl ListQuery {
    fn page(&self) -> usize {
        self.page.unwrap_or(1).max(1)
    }

    fn api(&self, newest_first: bool) -> PageQuery {
        PageQuery {
            offset: (self.page() - 1) * PAGE_SIZE,
            limit: Some(PAGE_SIZE),
            q: Some(self.q.clone()),
            state: Some(self.state.clone()),
            newest_first,
        }
    }
}

fn instances_table(state: &NodeState, q: &ListQuery) -> Result<Markup, api::ApiError> {
    let page = api::instance_page(state, &q.api(false))?;
    Ok(pages::instances_table(&page.entries, q.page(), page.total, &q.q, now().as_millis()))
}

async fn instances(
    State(state): St,
    Extension(s): Extension<Session>,
    Query(q): Query<ListQuery>,
) -> PageResult {
    instances_with(&state, &s, &q, Done { done: q.done.clone() }.notice(), StatusCode::OK).await
}

async fn instances_with(
    state: &NodeState,
    s: &Session,
    q: &ListQuery,
    notice: Markup,
    status: StatusCode,
) -> PageResult {
    let f = frame(state, s, Section::Instances);
    let table =
        instances_table(state, q).map_err(|e| error_page(state, s, Section::Instances, &e))?;
    let live =
        format!("/ui/live/instances?page={}{}", q.page(), pages::query_suffix(&[("q", &q.q)]));
    Ok(html(status, pages::instances(&f, &api::info_view(state).await, table, &q.q, notice, &live)))
}

async fn instances_live(State(state): St, Query(q): Query<ListQuery>) -> Response {
    match instances_table(&state, &q) {
        Ok(m) => html(StatusCode::OK, m),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct BundleForm {
    bundle: String,
}

async fn instance_preview(
    State(state): St,
    Extension(s): Extension<Session>,
    Form(f): Form<BundleForm>,
) -> PageResult {
    match api::preview_bundle(&state, &f.bundle) {
        Ok(inst) => {
            let view = InstanceView::offline(&inst, 0);
            Ok(html(
                StatusCode::OK,
                pages::register_preview(&frame(&state, &s, Section::Instances), &view, &f.bundle),
            ))
        }
        Err(e) => {
            let notice =
                pages::error_box(&format!("The bundle cannot be registered: {}", e.message()));
            instances_with(&state, &s, &ListQuery::default(), notice, e.status()).await
        }
    }
}

#[derive(Debug, Deserialize)]
struct PolicyForm {
    #[serde(default)]
    allowed_workflows: String,
    #[serde(default)]
    allowed_datasets: String,
    #[serde(default)]
    execution: String,
    share_logs: Option<String>,
}

impl PolicyForm {
    fn policy(&self) -> Result<Policy, String> {
        let list = |what: &str, v: &str| {
            v.parse::<AllowList>().map_err(|e| format!("allowed {what}: {e}"))
        };
        Ok(Policy {
            allowed_workflows: list("workflows", &self.allowed_workflows)?,
            allowed_datasets: list("datasets", &self.allowed_datasets)?,
            execution: match self.execution.as_str() {
                "automatic" => Execution::Automatic,
                "approval" | "" => Execution::Approval,
                other => return Err(format!("execution `{other}`: choose automatic or approval")),
            },
            share_logs: self.share_logs.as_deref() == Some("on"),
        })
    }
}

#[derive(Debug, Deserialize)]
struct RegisterForm {
    bundle: String,
    fingerprint: String,
    #[serde(flatten)]
    policy: PolicyForm,
}

async fn instance_register(
    State(state): St,
    Extension(s): Extension<Session>,
    Form(f): Form<RegisterForm>,
) -> PageResult {
    let refuse = |status, message: String| {
        error_page(&state, &s, Section::Instances, &api::ApiError::from_parts(status, message))
    };
    let policy = f.policy.policy().map_err(|e| refuse(StatusCode::BAD_REQUEST, e))?;
    let inst =
        crate::admin::verify_bundle(&state.files, &f.bundle, policy, Some(&f.fingerprint), now())
            .map_err(|e| {
            let e = api::ApiError::from(e);
            refuse(e.status(), e.message().to_owned())
        })?;
    let name = inst.name.clone();
    state.add_instance(inst).await.map_err(|e| {
        let e = api::ApiError::from(e);
        refuse(e.status(), e.message().to_owned())
    })?;
    Ok(see_other(&format!("/ui/instances/{}?done=registered", auth::urlencode(&name))))
}

fn find_instance(state: &NodeState, which: &str) -> Result<InstanceView, api::ApiError> {
    let r: InstanceRef = api::parse_arg(which)?;
    let inst = state.registry().resolve(&r).cloned().ok_or_else(|| {
        api::ApiError::from_parts(StatusCode::NOT_FOUND, format!("no registered instance {which}"))
    })?;
    let depth = state
        .store
        .outbox_depth(&inst.instance_id)
        .map_err(|e| api::ApiError::from(crate::admin::AdminError::from(e)))?;
    Ok(InstanceView::new(&inst, Some(&state.peer_status(&inst.instance_id)), depth))
}

async fn instance(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(which): Path<String>,
    Query(done): Query<Done>,
) -> PageResult {
    let i = find_instance(&state, &which)
        .map_err(|e| error_page(&state, &s, Section::Instances, &e))?;
    let now_ms = now().as_millis();
    let current =
        crate::history::PeerSample { at_ms: now_ms, counts: state.metrics.peer_counts(&i.name) };
    let chart = graph::peer_chart(&state.history.peer(&i.name), current);
    let f = frame(&state, &s, Section::Instances);
    Ok(html(StatusCode::OK, pages::instance(&f, &i, chart, done.notice(), now_ms)))
}

async fn policy_review(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(which): Path<String>,
    Form(form): Form<PolicyForm>,
) -> PageResult {
    let sec = Section::Instances;
    let i = find_instance(&state, &which).map_err(|e| error_page(&state, &s, sec, &e))?;
    let new = form.policy().map_err(|m| {
        error_page(&state, &s, sec, &api::ApiError::from_parts(StatusCode::BAD_REQUEST, m))
    })?;
    Ok(html(
        StatusCode::OK,
        pages::policy_review(&frame(&state, &s, sec), &i.name, &i.policy, &new),
    ))
}

async fn policy_apply(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(which): Path<String>,
    Form(form): Form<PolicyForm>,
) -> PageResult {
    let sec = Section::Instances;
    let bad = |e: api::ApiError| error_page(&state, &s, sec, &e);
    let policy =
        form.policy().map_err(|m| bad(api::ApiError::from_parts(StatusCode::BAD_REQUEST, m)))?;
    let r: InstanceRef = api::parse_arg(&which).map_err(bad)?;
    let inst = state.set_policy(&r, policy).await.map_err(|e| bad(e.into()))?;
    Ok(see_other(&format!("/ui/instances/{}?done=policy", auth::urlencode(&inst.name))))
}

async fn remove_confirm(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(which): Path<String>,
) -> PageResult {
    let sec = Section::Instances;
    let i = find_instance(&state, &which).map_err(|e| error_page(&state, &s, sec, &e))?;
    Ok(html(StatusCode::OK, pages::remove_confirm(&frame(&state, &s, sec), &i)))
}

async fn remove_apply(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(which): Path<String>,
) -> PageResult {
    let bad = |e: api::ApiError| error_page(&state, &s, Section::Instances, &e);
    let r: InstanceRef = api::parse_arg(&which).map_err(bad)?;
    state.remove_instance(&r).await.map_err(|e| bad(e.into()))?;
    Ok(see_other("/ui/instances?done=removed"))
}

async fn own_bundle(State(state): St) -> Response {
    match state.bundle().await {
        Ok(text) => {
            let disposition = format!("attachment; filename=\"{}.bundle\"", state.name);
            let mut r = text.into_response();
            if let Ok(v) = HeaderValue::from_str(&disposition) {
                r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            r
        }
        Err(e) => api::ApiError::from(e).into_response(),
    }
}

// ---- Workflow List ------------------------------------------------------------------------

fn workflows_table(state: &NodeState, q: &ListQuery) -> Result<Markup, api::ApiError> {
    let page = api::workflow_page(state, &q.api(true))?;
    let query = pages::query_suffix(&[("q", &q.q), ("state", &q.state)]);
    Ok(pages::workflows_table(&page.entries, q.page(), page.total, &query, now().as_millis()))
}

async fn workflows(
    State(state): St,
    Extension(s): Extension<Session>,
    Query(q): Query<ListQuery>,
) -> PageResult {
    let sec = Section::Workflows;
    let table = workflows_table(&state, &q).map_err(|e| error_page(&state, &s, sec, &e))?;
    let live = format!(
        "/ui/live/workflows?page={}{}",
        q.page(),
        pages::query_suffix(&[("q", &q.q), ("state", &q.state)])
    );
    let notice = Done { done: q.done.clone() }.notice();
    let f = frame(&state, &s, sec);
    Ok(html(StatusCode::OK, pages::workflows(&f, table, &q.q, &q.state, &live, notice)))
}

async fn workflows_live(State(state): St, Query(q): Query<ListQuery>) -> Response {
    match workflows_table(&state, &q) {
        Ok(m) => html(StatusCode::OK, m),
        Err(e) => e.into_response(),
    }
}

async fn workflow_new(State(state): St, Extension(s): Extension<Session>) -> Response {
    html(StatusCode::OK, pages::workflow_new(&frame(&state, &s, Section::Workflows), "", None))
}

#[derive(Debug, Deserialize)]
struct WorkflowForm {
    toml: String,
}

async fn workflow_submit(
    State(state): St,
    Extension(s): Extension<Session>,
    Form(f): Form<WorkflowForm>,
) -> Response {
    // Browsers send CR LF in text areas.
    let text = f.toml.replace("\r\n", "\n");
    match api::submit_workflow_file(&state, &text).await {
        Ok(w) => see_other(&format!("/ui/workflows/{}?done=submitted", w.workflow_id)),
        Err(e) => html(
            e.error.status(),
            pages::workflow_new(
                &frame(&state, &s, Section::Workflows),
                &text,
                Some((e.error.message(), e.line)),
            ),
        ),
    }
}

fn find_workflow(state: &NodeState, id: &str) -> Result<WorkflowView, api::ApiError> {
    let wid: kaapana_protocol::WorkflowId = api::parse_arg(id)?;
    state.site().workflow(&wid).map(|w| state.workflow_view(w)).ok_or_else(|| {
        api::ApiError::from_parts(
            StatusCode::NOT_FOUND,
            format!("no workflow {id} at this instance"),
        )
    })
}

fn workflow_live_markup(state: &NodeState, s: &Session, w: &WorkflowView) -> Markup {
    let samples = w
        .workflow_id
        .parse::<kaapana_protocol::WorkflowId>()
        .map(|id| state.history.workflow(&id))
        .unwrap_or_default();
    let end = w
        .ended_at
        .as_deref()
        .and_then(pages::parse_rfc3339_ms)
        .unwrap_or_else(|| now().as_millis());
    pages::workflow_live(w, graph::workflow_chart(&samples, end), &s.csrf)
}

async fn workflow(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Query(done): Query<Done>,
) -> PageResult {
    let sec = Section::Workflows;
    let w = find_workflow(&state, &id).map_err(|e| error_page(&state, &s, sec, &e))?;
    let live = workflow_live_markup(&state, &s, &w);
    Ok(html(StatusCode::OK, pages::workflow(&frame(&state, &s, sec), &w, live, done.notice())))
}

async fn workflow_live(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    match find_workflow(&state, &id) {
        Ok(w) => html(StatusCode::OK, workflow_live_markup(&state, &s, &w)),
        Err(e) => e.into_response(),
    }
}

async fn workflow_cancel(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> PageResult {
    let bad = |e: api::ApiError| error_page(&state, &s, Section::Workflows, &e);
    let wid: kaapana_protocol::WorkflowId = api::parse_arg(&id).map_err(bad)?;
    let by = format!("{} (dashboard)", state.name);
    state.cancel_workflow(wid, by).await.map_err(|e| bad(api::workflow_error(e)))?;
    Ok(see_other(&format!("/ui/workflows/{id}?done=cancelled")))
}

async fn job_log(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let log = api::job_log(State(Arc::clone(&state)), Path(id.clone()))
        .await
        .map_err(|e| e.message().to_owned());
    html(StatusCode::OK, pages::job_log(&frame(&state, &s, Section::Workflows), &id, log))
}

async fn job_result(State(state): St, Path(id): Path<String>) -> Response {
    let path = match api::result_bundle_path(&state, &id).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match api::download(&path, &format!("result-{id}.tar"), "application/x-tar").await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

// ---- Approvals ----------------------------------------------------------------------------

fn approvals_markup(state: &NodeState, s: &Session) -> Markup {
    use kaapana_protocol::{JobState, Work};
    let mut pending = Vec::new();
    let mut recent = Vec::new();
    {
        let site = state.site();
        let mut jobs: Vec<_> = site.runner_jobs().collect();
        jobs.sort_by_key(|r| std::cmp::Reverse(r.job.received_at));
        for r in jobs {
            let (j, m) = (&r.job, &r.manifest);
            if j.state == (JobState::Pending { awaiting_approval: true }) {
                let work = match &m.work {
                    Work::Container(c) => {
                        let mut w = vec![("Image", c.image.to_string())];
                        w.push((
                            "Command",
                            if c.command.is_empty() {
                                "(the image's own)".into()
                            } else {
                                c.command.join(" ")
                            },
                        ));
                        if !c.env.is_empty() {
                            let env: Vec<String> =
                                c.env.iter().map(|e| format!("{}={}", e.name, e.value)).collect();
                            w.push(("Environment", env.join(" ")));
                        }
                        w
                    }
                    Work::AirflowDag(d) => vec![
                        ("Airflow DAG", d.dag_id.clone()),
                        ("Configuration", serde_json::to_string(&d.conf).unwrap_or_default()),
                    ],
                };
                let dataset = m.dataset.as_ref().map(|d| match &d.item {
                    Some(_) => format!("{} (one item, single-file processing)", d.name),
                    None => format!("{} (all items)", d.name),
                });
                let limits = format!(
                    "{} · {} · timeout {} s",
                    if m.limits.cpu_millis == 0 {
                        "default CPU".to_owned()
                    } else {
                        format!("{} CPU", f64::from(m.limits.cpu_millis) / 1000.0)
                    },
                    if m.limits.memory_bytes == 0 {
                        "default memory".to_owned()
                    } else {
                        format!("{} MiB", m.limits.memory_bytes >> 20)
                    },
                    m.timeout_secs
                );
                pending.push(pages::PendingJob {
                    job_id: j.job_id.to_string(),
                    owner: j.owner_name.clone(),
                    workflow: (m.workflow_name.clone(), j.workflow_id.to_string()),
                    job_name: j.job_name.clone(),
                    work,
                    dataset,
                    limits,
                    received_at: j.received_at.to_string(),
                });
            } else if recent.len() < PAGE_SIZE {
                recent.push(pages::RanHere {
                    job_id: j.job_id.to_string(),
                    owner: j.owner_name.clone(),
                    job_name: j.job_name.clone(),
                    state: api::state_word(j.state),
                    reason: j.reason.clone(),
                    received_at: j.received_at.to_string(),
                });
            }
        }
    }
    pages::approvals_live(
        &frame(state, s, Section::Approvals),
        &pending,
        &recent,
        now().as_millis(),
    )
}

async fn approvals(
    State(state): St,
    Extension(s): Extension<Session>,
    Query(done): Query<Done>,
) -> Response {
    let live = approvals_markup(&state, &s);
    html(
        StatusCode::OK,
        pages::approvals(&frame(&state, &s, Section::Approvals), live, done.notice()),
    )
}

async fn approvals_live(State(state): St, Extension(s): Extension<Session>) -> Response {
    html(StatusCode::OK, approvals_markup(&state, &s))
}

#[derive(Debug, Deserialize)]
struct RejectForm {
    #[serde(default)]
    reason: String,
}

async fn decide(
    state: &Arc<NodeState>,
    s: &Session,
    job: &str,
    decision: Result<(), String>,
) -> PageResult {
    let bad = |e: api::ApiError| error_page(state, s, Section::Approvals, &e);
    let id: kaapana_protocol::JobId = api::parse_arg(job).map_err(bad)?;
    let done = if decision.is_ok() { "approved" } else { "rejected" };
    state.decide_job(id, decision).await.map_err(|e| bad(api::job_error(e)))?;
    Ok(see_other(&format!("/ui/approvals?done={done}")))
}

async fn approve(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(job): Path<String>,
) -> PageResult {
    decide(&state, &s, &job, Ok(())).await
}

async fn reject(
    State(state): St,
    Extension(s): Extension<Session>,
    Path(job): Path<String>,
    Form(f): Form<RejectForm>,
) -> PageResult {
    let reason = f.reason.trim();
    if reason.is_empty() {
        let e = api::ApiError::from_parts(
            StatusCode::BAD_REQUEST,
            "give a reason: the requesting instance is told it",
        );
        return Err(error_page(&state, &s, Section::Approvals, &e));
    }
    decide(&state, &s, &job, Err(format!("rejected by the admin of {}: {reason}", state.name)))
        .await
}

// ---- live updates ----------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
}

/// The node's events from now on (or after `after`, or the browser's `Last-Event-ID`) as
/// server-sent events, until the daemon stops.
async fn events(State(state): St, headers: HeaderMap, Query(q): Query<EventsQuery>) -> Response {
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let after = last_id.or(q.after).unwrap_or_else(|| state.events.latest());
    let stop = state.shutdown_signal();
    let stream = futures::stream::unfold((state, after, stop), |(state, after, stop)| async move {
        let batch = tokio::select! {
            () = stop.cancelled() => return None,
            b = state.events.after(after, Duration::from_secs(25)) => b,
        };
        let next = batch.last().map_or(after, |e| e.seq);
        let items: Vec<Result<SseEvent, Infallible>> = batch
            .iter()
            .map(|e| {
                Ok(SseEvent::default()
                    .id(e.seq.to_string())
                    .data(serde_json::to_string(e).unwrap_or_default()))
            })
            .collect();
        Some((futures::stream::iter(items), (state, next, stop)))
    });
    use futures::StreamExt;
    Sse::new(stream.flatten()).keep_alive(KeepAlive::default()).into_response()
}
