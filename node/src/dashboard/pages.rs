//! The dashboard's HTML: one function per page or live fragment, from the API's views.
//!
//! maud escapes every spliced value, so names, reasons and logs from peers cannot inject
//! markup. Every form that changes something carries the session's CSRF token
//! ([`csrf_field`]).

use maud::{DOCTYPE, Markup, html};

use super::graph;
use crate::api::{CapabilitiesView, InfoView, InstanceView, WorkflowJobView, WorkflowView};

/// Entries per page of the long lists.
pub const PAGE_SIZE: usize = 50;

/// Which top-level page is shown (for the navigation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Instance Overview.
    Instances,
    /// Workflow List.
    Workflows,
    /// Approvals.
    Approvals,
}

/// What every page's frame shows.
#[derive(Debug)]
pub struct Frame<'a> {
    /// This instance's name.
    pub instance: &'a str,
    /// The session's CSRF token.
    pub csrf: &'a str,
    /// The highlighted section.
    pub section: Section,
    /// Jobs waiting for approval here (a badge on "Approvals").
    pub awaiting: usize,
}

/// The hidden field with the session's CSRF token.
pub fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// A whole page: head, navigation, `body`.
pub fn page(f: &Frame<'_>, title: &str, body: Markup) -> Markup {
    let nav = |s: Section, href: &str, label: &str| {
        html! { a.nav-item.active[f.section == s] href=(href) { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · " (f.instance) " · kaapana-node" }
                link rel="stylesheet" href="/ui/assets/app.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                header.top {
                    span.brand { "kaapana-node" }
                    span.instance-name title="this instance" { (f.instance) }
                    nav {
                        (nav(Section::Instances, "/ui/instances", "Instance Overview"))
                        (nav(Section::Workflows, "/ui/workflows", "Workflow List"))
                        a.nav-item.active[f.section == Section::Approvals] href="/ui/approvals" {
                            "Approvals"
                            @if f.awaiting > 0 { " " span.badge #awaiting-count { (f.awaiting) } }
                        }
                    }
                    form.logout method="post" action="/ui/logout" {
                        (csrf_field(f.csrf))
                        button.link type="submit" { "Log out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The login page (`error`: why the last attempt failed).
pub fn login(next: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Log in · kaapana-node" }
                link rel="stylesheet" href="/ui/assets/app.css";
            }
            body.login {
                main.login-box {
                    h1 { "kaapana-node" }
                    p { "Log in with this node's API token: the " code { "api-token" } " file of its data directory." }
                    @if let Some(e) = error { p.alert.error role="alert" { (e) } }
                    form method="post" action="/login" {
                        input type="hidden" name="next" value=(next);
                        label for="token" { "API token" }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

/// A notice at the top of a page.
pub fn flash(message: Option<&str>) -> Markup {
    html! { @if let Some(m) = message { p.alert.ok role="status" { (m) } } }
}

/// An error notice.
pub fn error_box(message: &str) -> Markup {
    html! { p.alert.error role="alert" { (message) } }
}

fn state_badge(state: &str) -> Markup {
    html! { span class=(format!("state {}", graph::state_class(state))) { (state) } }
}

/// Seconds, minutes or hours since an RFC 3339 time, for people ("12 s ago").
pub fn ago(rfc3339: &str, now_ms: u64) -> String {
    match parse_rfc3339_ms(rfc3339) {
        Some(t) if t <= now_ms => {
            let s = (now_ms - t) / 1000;
            match s {
                0..=119 => format!("{s} s ago"),
                120..=7199 => format!("{} min ago", s / 60),
                7200..=172_799 => format!("{} h ago", s / 3600),
                _ => format!("{} days ago", s / 86_400),
            }
        }
        Some(_) => "just now".to_owned(),
        None => rfc3339.to_owned(),
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS(.mmm)Z`.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let ms = if b.get(19) == Some(&b'.') { num(20..23).unwrap_or(0) } else { 0 };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60 + ss).ok().map(|secs| secs * 1000 + ms as u64)
}

fn pager(base: &str, query: &str, page: usize, total: usize) -> Markup {
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let link = |p: usize| format!("{base}?page={p}{query}");
    html! {
        nav.pager aria-label="pages" {
            @if page > 1 { a href=(link(page - 1)) rel="prev" { "← previous" } }
            span { "page " (page) " of " (pages) " · " (total) " in all" }
            @if page < pages { a href=(link(page + 1)) rel="next" { "next →" } }
        }
    }
}

/// The `&q=...` part of a list's links.
pub fn query_suffix(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("&{k}={}", super::auth::urlencode(v)))
        .collect()
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn connection(i: &InstanceView, now_ms: u64) -> Markup {
    let up = i.connected == Some(true);
    html! {
        span class=(if up { "conn up" } else { "conn down" }) title=(i.status) {
            (if up { "connected" } else { "not connected" })
        }
        @if let Some(path) = i.path.as_deref().filter(|_| up) { " " small.muted { "(" (path) ")" } }
        @if !up && i.status != "not connected yet" && i.status != "not connected" {
            br; small.muted { (i.status.trim_start_matches("not connected: ")) }
        }
        @if let Some(t) = &i.last_seen { br; small.muted title=(t) { "last contact " (ago(t, now_ms)) } }
    }
}

fn datasets_cell(c: &CapabilitiesView) -> Markup {
    html! {
        @if c.datasets.is_empty() { span.muted { "none" } }
        ul.plain {
            @for (name, items, size) in &c.datasets {
                li {
                    b { (name) } " · " (items) " items · " (bytes(*size))
                    @if let Some(m) = c.modalities.get(name) {
                        " · "
                        @for (k, (modality, n)) in m.iter().enumerate() {
                            @if k > 0 { ", " }
                            span.modality { (modality) } " " (n)
                        }
                    }
                }
            }
        }
    }
}

fn resources(c: &CapabilitiesView) -> String {
    format!("{} CPU · {} · {} GPU", f64::from(c.cpu_millis) / 1000.0, bytes(c.memory_bytes), c.gpus)
}

fn policy_summary(i: &InstanceView) -> String {
    format!(
        "workflows: {} · datasets: {} · {}{}",
        i.policy.allowed_workflows,
        i.policy.allowed_datasets,
        i.policy.execution,
        if i.policy.share_logs { " · logs shared" } else { "" }
    )
}

/// Instance Overview's table of registered instances (the live part of the page).
pub fn instances_table(
    list: &[InstanceView],
    page: usize,
    total: usize,
    q: &str,
    now_ms: u64,
) -> Markup {
    html! {
        @if list.is_empty() {
            p.muted { @if q.is_empty() { "No instance is registered yet: register one with its exchange bundle above." } @else { "No registered instance matches." } }
        } @else {
            table.list #instances {
                thead { tr { th { "Instance" } th { "Connection" } th { "RTT" } th { "Datasets" } th { "Resources" } th { "Allows us" } th { "Our policy for it" } } }
                tbody {
                    @for i in list {
                        tr data-instance=(i.name) {
                            td { a href=(format!("/ui/instances/{}", super::auth::urlencode(&i.name))) { b { (i.name) } } br; small.mono.muted { (short(&i.instance_id)) } }
                            td { (connection(i, now_ms)) }
                            td { @if let Some(r) = i.rtt_ms { (format!("{r:.1} ms")) } @else { span.muted { "–" } } }
                            @if let Some(c) = &i.capabilities {
                                td { (datasets_cell(c)) }
                                td { (resources(c)) }
                                td { (c.allowed_workflows.join(", ")) }
                            } @else {
                                td.muted colspan="3" { "no capability ad yet" }
                            }
                            td { (policy_summary(i)) }
                        }
                    }
                }
            }
            (pager("/ui/instances", &query_suffix(&[("q", q)]), page, total))
        }
    }
}

fn short(id: &str) -> String {
    if id.len() > 16 { format!("{}…{}", &id[..8], &id[id.len() - 6..]) } else { id.to_owned() }
}

/// Instance Overview.
pub fn instances(
    f: &Frame<'_>,
    me: &InfoView,
    table: Markup,
    q: &str,
    notice: Markup,
    live_url: &str,
) -> Markup {
    page(
        f,
        "Instance Overview",
        html! {
            h1 { "Instance Overview" }
            (notice)
            section.card #this-instance {
                h2 { "This instance" }
                dl.facts {
                    dt { "Name" } dd #own-name { (me.name) }
                    dt { "Instance id" } dd.mono { (me.instance_id) }
                    dt { "Fingerprint" } dd.mono #own-fingerprint { (me.fingerprint) }
                    dt { "Addresses" } dd { ul.plain.mono { @for a in &me.listen_addrs { li { (a) } } } }
                }
                p { a.button href="/ui/bundle" download { "Download this instance's exchange bundle" } }
            }
            section.card #register {
                h2 { "Register an instance" }
                p { "Upload the exchange bundle another instance's admin sent you. Its fingerprint is shown before anything is registered: compare it with the one they tell you by another channel." }
                form method="post" action="/ui/instances/preview" {
                    (csrf_field(f.csrf))
                    label for="bundle-file" { "Bundle file" }
                    input #bundle-file type="file" accept=".pem,.bundle,.txt,text/plain" data-file-into="bundle";
                    label for="bundle" { "or paste it" }
                    textarea #bundle name="bundle" rows="4" required placeholder="-----BEGIN KAAPANA EXCHANGE BUNDLE-----" {}
                    button type="submit" { "Check the bundle" }
                }
            }
            section.card {
                h2 { "Registered instances" }
                form.filter method="get" action="/ui/instances" {
                    input type="search" name="q" value=(q) placeholder="filter by name" aria-label="filter by name";
                    button type="submit" { "Filter" }
                }
                div #live data-live=(live_url) data-events="peer_,capabilities_,instance_,policy_,dial_" { (table) }
            }
        },
    )
}

/// The form fields of a policy (shared by registration and editing).
pub fn policy_fields(p: &kaapana_federation::Policy) -> Markup {
    use kaapana_federation::Execution;
    html! {
        fieldset.policy {
            legend { "What this instance may do here" }
            label for="allowed_workflows" { "Allowed workflows (" code { "any" } ", " code { "none" } " or names, comma-separated)" }
            input #allowed_workflows name="allowed_workflows" value=(p.allowed_workflows.to_string());
            label for="allowed_datasets" { "Allowed datasets" }
            input #allowed_datasets name="allowed_datasets" value=(p.allowed_datasets.to_string());
            div.radio {
                label { input type="radio" name="execution" value="approval" checked[p.execution == Execution::Approval]; " jobs wait for a local approval" }
                label { input type="radio" name="execution" value="automatic" checked[p.execution == Execution::Automatic]; " jobs start automatically" }
            }
            label.check { input type="checkbox" name="share_logs" value="on" checked[p.share_logs]; " send job logs back to it" }
        }
    }
}

/// The confirmation before registering: who the bundle is, and the policy to give it.
pub fn register_preview(f: &Frame<'_>, inst: &InstanceView, bundle: &str) -> Markup {
    page(
        f,
        "Register an instance",
        html! {
            h1 { "Register " (inst.name) "?" }
            section.card {
                p { "The bundle is valid and signed by this instance's key. Compare the fingerprint with the one its admin tells you by phone or another channel before you register it." }
                dl.facts {
                    dt { "Name" } dd #preview-name { (inst.name) }
                    dt { "Instance id" } dd.mono { (inst.instance_id) }
                    dt { "Fingerprint" } dd.mono.fingerprint #preview-fingerprint { (inst.fingerprint) }
                    dt { "Certificate valid until" } dd { (inst.certificate_not_after) }
                    dt { "Addresses" } dd { ul.plain.mono { @for a in &inst.listen_addrs { li { (a) } } } }
                }
                form method="post" action="/ui/instances/register" {
                    (csrf_field(f.csrf))
                    input type="hidden" name="fingerprint" value=(inst.fingerprint);
                    textarea hidden name="bundle" { (bundle) }
                    (policy_fields(&kaapana_federation::Policy::default()))
                    div.actions {
                        button type="submit" #confirm-register { "The fingerprint matches: register " (inst.name) }
                        a href="/ui/instances" { "Cancel" }
                    }
                }
            }
        },
    )
}

/// One registered instance: its details, chart, policy form and removal.
pub fn instance(
    f: &Frame<'_>,
    i: &InstanceView,
    chart: Markup,
    notice: Markup,
    now_ms: u64,
) -> Markup {
    let base = format!("/ui/instances/{}", super::auth::urlencode(&i.name));
    page(
        f,
        &i.name,
        html! {
            p.crumbs { a href="/ui/instances" { "Instance Overview" } " / " (i.name) }
            h1 { (i.name) }
            (notice)
            section.card {
                dl.facts {
                    dt { "Connection" } dd #connection { (connection(i, now_ms)) }
                    dt { "RTT" } dd { @if let Some(r) = i.rtt_ms { (format!("{r:.1} ms")) } @else { "–" } }
                    dt { "Instance id" } dd.mono { (i.instance_id) }
                    dt { "Fingerprint" } dd.mono { (i.fingerprint) }
                    dt { "Certificate valid until" } dd { (i.certificate_not_after) }
                    dt { "Addresses" } dd { ul.plain.mono { @for a in &i.listen_addrs { li { (a) } } } }
                    dt { "Messages waiting for it" } dd { (i.outbox_depth) }
                }
            }
            section.card {
                h2 { "What it offers us" }
                @if let Some(c) = &i.capabilities {
                    dl.facts {
                        dt { "Datasets" } dd { (datasets_cell(c)) }
                        dt { "Resources" } dd { (resources(c)) }
                        dt { "Executors" } dd { (c.executors.join(", ")) }
                        dt { "Workflows it allows us" } dd { (c.allowed_workflows.join(", ")) }
                        dt { "Images it allows" } dd.mono { @if c.allowed_images.is_empty() { "any" } @else { (c.allowed_images.join(", ")) } }
                        dt { "Node version" } dd { (c.node_version) }
                        dt { "Ad" } dd { "sequence " (c.sequence) ", expires " (c.expires_at) }
                    }
                } @else { p.muted { "No capability ad received yet." } }
            }
            section.card {
                h2 { "Messages" }
                (chart)
            }
            section.card #policy {
                h2 { "Our policy for it" }
                p { (policy_summary(i)) }
                form method="post" action=(format!("{base}/policy")) {
                    (csrf_field(f.csrf))
                    (policy_fields(&i.policy))
                    button type="submit" { "Review the change" }
                }
            }
            section.card.danger {
                h2 { "Remove" }
                p { "Unregistering closes its connections at once; it can no longer send jobs here or run ours." }
                a.button.danger href=(format!("{base}/remove")) { "Remove " (i.name) "…" }
            }
        },
    )
}

/// The confirmation of a policy change: old and new side by side.
pub fn policy_review(
    f: &Frame<'_>,
    name: &str,
    old: &kaapana_federation::Policy,
    new: &kaapana_federation::Policy,
) -> Markup {
    let rows = [
        ("Allowed workflows", old.allowed_workflows.to_string(), new.allowed_workflows.to_string()),
        ("Allowed datasets", old.allowed_datasets.to_string(), new.allowed_datasets.to_string()),
        ("Execution", old.execution.to_string(), new.execution.to_string()),
        ("Job logs sent back", yes_no(old.share_logs), yes_no(new.share_logs)),
    ];
    let base = format!("/ui/instances/{}", super::auth::urlencode(name));
    page(
        f,
        "Confirm the policy change",
        html! {
            h1 { "Change the policy for " (name) "?" }
            section.card {
                @if old == new { p.alert.ok { "Nothing changes." } }
                table.list #policy-diff {
                    thead { tr { th {} th { "Now" } th { "After the change" } } }
                    tbody { @for (what, a, b) in &rows { tr.changed[a != b] { th { (what) } td { (a) } td { (b) } } } }
                }
                p { "Jobs it already sent keep the decision they got; new jobs follow the new policy." }
                form method="post" action=(format!("{base}/policy/confirm")) {
                    (csrf_field(f.csrf))
                    input type="hidden" name="allowed_workflows" value=(new.allowed_workflows.to_string());
                    input type="hidden" name="allowed_datasets" value=(new.allowed_datasets.to_string());
                    input type="hidden" name="execution" value=(new.execution.to_string());
                    @if new.share_logs { input type="hidden" name="share_logs" value="on"; }
                    div.actions {
                        button type="submit" #confirm-policy { "Confirm the change" }
                        a href=(base) { "Cancel" }
                    }
                }
            }
        },
    )
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

/// The confirmation of a removal.
pub fn remove_confirm(f: &Frame<'_>, i: &InstanceView) -> Markup {
    let base = format!("/ui/instances/{}", super::auth::urlencode(&i.name));
    page(
        f,
        "Remove an instance",
        html! {
            h1 { "Remove " (i.name) "?" }
            section.card.danger {
                p { "Fingerprint " span.mono { (i.fingerprint) } }
                p { "Its connections close at once. Messages still waiting for it (" (i.outbox_depth) ") are dropped. To work with it again, both sides must register each other anew." }
                form method="post" action=(format!("{base}/remove")) {
                    (csrf_field(f.csrf))
                    div.actions {
                        button.danger type="submit" #confirm-remove { "Remove " (i.name) }
                        a href=(base) { "Cancel" }
                    }
                }
            }
        },
    )
}

/// Counts of a workflow's jobs by the words of its view.
fn counts(jobs: &[WorkflowJobView]) -> [(usize, &'static str); 4] {
    let n = |f: &dyn Fn(&str) -> bool| jobs.iter().filter(|j| f(&j.state)).count();
    [
        (n(&|s| s == "finished"), "st-finished"),
        (n(&|s| s == "failed"), "st-failed"),
        (n(&|s| s == "running"), "st-running"),
        (n(&|s| !matches!(s, "finished" | "failed" | "running")), "st-queued"),
    ]
}

fn progress(w: &WorkflowView) -> Markup {
    let total = w.jobs.len().max(1) as f64;
    let mut x = 0.0;
    let mut segs = Vec::new();
    for (n, class) in counts(&w.jobs) {
        if n > 0 {
            let width = 120.0 * n as f64 / total;
            segs.push((x, width, class));
            x += width;
        }
    }
    html! {
        svg.progress xmlns="http://www.w3.org/2000/svg" width="120" height="10" viewBox="0 0 120 10" role="img" aria-label=(w.progress) {
            title { (w.progress) }
            rect.track x="0" y="0" width="120" height="10" rx="3" {}
            @for (x, width, class) in segs {
                rect class=(format!("seg {class}")) x=(format!("{x:.1}")) y="0" width=(format!("{width:.1}")) height="10" {}
            }
        }
        " " small.muted.progress-text { (w.progress) }
    }
}

/// Workflow List's table (the live part of the page).
pub fn workflows_table(
    list: &[WorkflowView],
    page: usize,
    total: usize,
    query: &str,
    now_ms: u64,
) -> Markup {
    html! {
        @if list.is_empty() {
            p.muted { "No workflow here yet." }
        } @else {
            table.list #workflows {
                thead { tr { th { "Workflow" } th { "State" } th { "Progress" } th { "Submitted" } th { "Ended" } } }
                tbody {
                    @for w in list {
                        tr data-workflow=(w.workflow_id) {
                            td { a href=(format!("/ui/workflows/{}", w.workflow_id)) { b { (w.name) } } br; small.mono.muted { (short(&w.workflow_id)) } }
                            td { (state_badge(&w.state)) }
                            td { (progress(w)) }
                            td title=(w.created_at) { (ago(&w.created_at, now_ms)) }
                            td { @if let Some(e) = &w.ended_at { span title=(e) { (ago(e, now_ms)) } } @else { "–" } }
                        }
                    }
                }
            }
            (pager("/ui/workflows", query, page, total))
        }
    }
}

/// Workflow List.
pub fn workflows(
    f: &Frame<'_>,
    table: Markup,
    q: &str,
    state: &str,
    live_url: &str,
    notice: Markup,
) -> Markup {
    page(
        f,
        "Workflow List",
        html! {
            h1 { "Workflow List" }
            (notice)
            p { a.button href="/ui/workflows/new" #new-workflow { "Submit a workflow" } }
            form.filter method="get" action="/ui/workflows" {
                input type="search" name="q" value=(q) placeholder="filter by name" aria-label="filter by name";
                select name="state" aria-label="state" {
                    @for s in ["", "running", "finished", "failed", "cancelled"] {
                        option value=(s) selected[s == state] { (if s.is_empty() { "any state" } else { s }) }
                    }
                }
                button type="submit" { "Filter" }
            }
            div #live data-live=(live_url) data-events="workflow_,job_,result_" { (table) }
        },
    )
}

/// The workflow file form; on a failed submission, the error at its line.
pub fn workflow_new(f: &Frame<'_>, text: &str, error: Option<(&str, Option<usize>)>) -> Markup {
    page(
        f,
        "Submit a workflow",
        html! {
            p.crumbs { a href="/ui/workflows" { "Workflow List" } " / submit" }
            h1 { "Submit a workflow" }
            @if let Some((message, line)) = error {
                div.alert.error role="alert" #submit-error {
                    @if let Some(l) = line { b { "Line " (l) ": " } }
                    (message)
                }
                @if line.is_some() {
                    ol.listing #listing {
                        @for (k, l) in text.lines().enumerate() {
                            li.error-line[Some(k + 1) == line] id=[(Some(k + 1) == line).then_some("error-line")] { code { (l) } }
                        }
                    }
                }
            }
            section.card {
                form method="post" action="/ui/workflows" {
                    (csrf_field(f.csrf))
                    label for="workflow-file" { "Workflow file (TOML)" }
                    input #workflow-file type="file" accept=".toml,text/plain" data-file-into="toml";
                    label for="toml" { "or write it here" }
                    textarea #toml name="toml" rows="18" spellcheck="false" required { (text) }
                    button type="submit" #submit-workflow { "Sign and start" }
                }
            }
        },
    )
}

/// The live part of a workflow's page: graph, chart and jobs.
pub fn workflow_live(w: &WorkflowView, chart: Markup, csrf: &str) -> Markup {
    html! {
        div.wf-head {
            (state_badge(&w.state))
            span #wf-state hidden { (w.state) }
            (progress(w))
            @if w.state == "running" {
                form method="post" action=(format!("/ui/workflows/{}/cancel", w.workflow_id)) data-confirm="Cancel this workflow? Its jobs stop at every runner-instance." {
                    (csrf_field(csrf))
                    button.danger type="submit" #cancel-workflow { "Cancel the workflow" }
                }
            }
        }
        @if let Some(r) = &w.reason { p.alert.error #wf-reason { (r) } }
        @if let Some(t) = &w.training { (training_rounds(t)) }
        section.card {
            h2 { "Jobs" }
            div.graph-box { (graph::workflow_graph(w)) }
        }
        section.card {
            table.list #jobs {
                thead { tr { th { "Job" } th { "Step" } th { "Runner-instance" } th { "Attempt" } th { "State" } th { "Reason" } th { "Result" } } }
                tbody {
                    @for j in &w.jobs {
                        tr data-job=(j.job_id) data-state=(j.state) {
                            td { (j.name) }
                            td { (j.step) }
                            td { (j.runner) }
                            td { (j.attempt + 1) }
                            td { (state_badge(&j.state)) }
                            td.reason { @if let Some(r) = &j.reason { (r) } }
                            td {
                                @if j.result.is_some() {
                                    a.download href=(format!("/ui/jobs/{}/result", j.job_id)) download { "download" } " · "
                                }
                                @if j.state != "waiting" { a href=(format!("/ui/jobs/{}/log", j.job_id)) { "log" } }
                            }
                        }
                    }
                }
            }
        }
        section.card {
            h2 { "Jobs over time" }
            (chart)
        }
    }
}

/// A training's rounds: quorum, deadline and one row per round.
fn training_rounds(t: &crate::api::TrainingView) -> Markup {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    html! {
        section.card #rounds {
            h2 { "Rounds" }
            p.muted {
                (t.completed) " of " (t.rounds.saturating_sub(t.first_round) + 1) " rounds done · quorum "
                (t.min_sites) " of " (t.sites.len()) " sites (" (t.sites.join(", ")) ") · deadline "
                (t.round_deadline_secs) " s · late updates: " (t.late) " · dataset " (t.dataset)
            }
            table.list {
                thead { tr { th { "Round" } th { "State" } th { "Updates" } th { "Samples" } th { "Late" } th { "Duration" } th { "Model" } th { "Model sent by this instance" } } }
                tbody {
                    @for r in t.history.iter().rev() {
                        tr data-round=(r.round) {
                            td { (r.round) }
                            td { (state_badge(&r.state)) }
                            td { (r.updates.len()) @if !r.folded.is_empty() { " + " (r.folded.len()) " folded" } }
                            td { (r.samples) }
                            td { (r.late.len()) }
                            td { @if let Some(ms) = r.duration_ms { (format!("{:.1} s", ms as f64 / 1000.0)) } }
                            td { @if let Some(b) = r.model_bytes { (mb(b)) } }
                            td { (mb(r.input_bytes_sent)) }
                        }
                    }
                }
            }
        }
    }
}

/// A workflow's page.
pub fn workflow(f: &Frame<'_>, w: &WorkflowView, live: Markup, notice: Markup) -> Markup {
    page(
        f,
        &w.name,
        html! {
            p.crumbs { a href="/ui/workflows" { "Workflow List" } " / " (w.name) }
            h1 { (w.name) }
            (notice)
            p.muted { "Workflow " span.mono { (w.workflow_id) } " · submitted " (w.created_at) }
            div #live data-live=(format!("/ui/workflows/{}/live", w.workflow_id)) data-events="workflow_,job_,result_,delivered" { (live) }
        },
    )
}

/// A job's log.
pub fn job_log(f: &Frame<'_>, job: &str, log: Result<String, String>) -> Markup {
    page(
        f,
        "Job log",
        html! {
            p.crumbs { a href="/ui/workflows" { "Workflow List" } " / job " (job) }
            h1 { "Log of job " span.mono { (job) } }
            @match log {
                Ok(text) => pre.log #job-log { (text) },
                Err(e) => (error_box(&e)),
            }
        },
    )
}

/// What a job waiting for approval would run.
#[derive(Debug)]
pub struct PendingJob {
    /// The job's id.
    pub job_id: String,
    /// The requesting instance.
    pub owner: String,
    /// Its workflow's name and id.
    pub workflow: (String, String),
    /// The job's name.
    pub job_name: String,
    /// Image digest or Airflow DAG.
    pub work: Vec<(&'static str, String)>,
    /// The dataset (and item) it reads.
    pub dataset: Option<String>,
    /// Limits.
    pub limits: String,
    /// When it arrived.
    pub received_at: String,
}

/// A job that ran or runs here.
#[derive(Debug)]
pub struct RanHere {
    /// The job's id.
    pub job_id: String,
    /// The requesting instance.
    pub owner: String,
    /// The job's name.
    pub job_name: String,
    /// Its state word.
    pub state: String,
    /// Why it failed or was rejected.
    pub reason: Option<String>,
    /// When it arrived.
    pub received_at: String,
}

/// The live part of Approvals.
pub fn approvals_live(
    f: &Frame<'_>,
    pending: &[PendingJob],
    recent: &[RanHere],
    now_ms: u64,
) -> Markup {
    html! {
        @if pending.is_empty() {
            p.muted #no-pending { "No job is waiting for approval." }
        }
        @for p in pending {
            section.card.pending data-job=(p.job_id) {
                h2 { (p.job_name) " from " (p.owner) }
                dl.facts {
                    dt { "Requesting instance" } dd { (p.owner) }
                    dt { "Workflow" } dd { (p.workflow.0) " " small.mono.muted { (p.workflow.1) } }
                    @for (k, v) in &p.work { dt { (k) } dd.mono { (v) } }
                    dt { "Dataset" } dd { @if let Some(d) = &p.dataset { (d) } @else { span.muted { "none" } } }
                    dt { "Limits" } dd { (p.limits) }
                    dt { "Arrived" } dd title=(p.received_at) { (ago(&p.received_at, now_ms)) }
                }
                div.actions {
                    form method="post" action=(format!("/ui/approvals/{}/approve", p.job_id)) {
                        (csrf_field(f.csrf))
                        button type="submit" .approve { "Approve" }
                    }
                    form.reject method="post" action=(format!("/ui/approvals/{}/reject", p.job_id)) {
                        (csrf_field(f.csrf))
                        input name="reason" required placeholder="reason (sent to the requesting instance)" aria-label="reason";
                        button.danger type="submit" { "Reject" }
                    }
                }
            }
        }
        section.card {
            h2 { "Jobs run here for other instances" }
            @if recent.is_empty() { p.muted { "None yet." } } @else {
                table.list #ran-here {
                    thead { tr { th { "Job" } th { "From" } th { "State" } th { "Reason" } th { "Arrived" } } }
                    tbody {
                        @for r in recent {
                            tr data-job=(r.job_id) {
                                td { (r.job_name) br; small.mono.muted { (short(&r.job_id)) } }
                                td { (r.owner) }
                                td { (state_badge(&r.state)) }
                                td.reason { @if let Some(x) = &r.reason { (x) } }
                                td title=(r.received_at) { (ago(&r.received_at, now_ms)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Approvals.
pub fn approvals(f: &Frame<'_>, live: Markup, notice: Markup) -> Markup {
    page(
        f,
        "Approvals",
        html! {
            h1 { "Approvals" }
            p { "Jobs that registered instances sent here and that their policy holds for a local decision. The requesting instance is told the decision, with the reason of a rejection." }
            (notice)
            div #live data-live="/ui/live/approvals" data-events="job_" { (live) }
        },
    )
}

/// A plain error page.
pub fn error_page(f: &Frame<'_>, title: &str, message: &str) -> Markup {
    page(f, title, html! { h1 { (title) } (error_box(message)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_are_read_and_shown_relative() {
        let t = parse_rfc3339_ms("2026-11-25T22:30:41.123Z").unwrap();
        assert_eq!(t, 1_795_645_841_123);
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(ago("2026-11-25T22:30:41.123Z", t + 5_000), "5 s ago");
        assert_eq!(ago("2026-11-25T22:30:41.123Z", t + 600_000), "10 min ago");
        assert_eq!(ago("garbage", t), "garbage");
    }

    #[test]
    fn the_error_line_of_a_workflow_file_is_marked() {
        let f = Frame { instance: "a", csrf: "c", section: Section::Workflows, awaiting: 0 };
        let html = workflow_new(&f, "x = 1\ny = <2>\n", Some(("bad", Some(2)))).into_string();
        assert!(
            html.contains(
                "<li class=\"error-line\" id=\"error-line\"><code>y = &lt;2&gt;</code></li>"
            ),
            "{html}"
        );
        assert!(html.contains("Line 2: "));
        assert!(html.contains("name=\"csrf\" value=\"c\""));
    }
}
