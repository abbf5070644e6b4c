//! End-to-end tests of the dashboard in a real browser: headless Chromium (Debian's
//! `/usr/bin/chromium`) driven by Playwright, against real daemons (and, for workflows, a
//! real containerd). Each test writes screenshots of the pages it visits to
//! `target/dashboard-screenshots` (or `$KAAPANA_SCREENSHOTS`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::browser::{Browser, Page};
use common::containerd::TestContainerd;
use common::{Daemon, Site};
use kaapana_node::api::JobsView;

const T: Duration = Duration::from_secs(90);

fn base(d: &Daemon) -> String {
    d.api().base().to_owned()
}

fn login(page: &Page<'_>, d: &Daemon) {
    page.login(&base(d), d.api().token());
}

/// A raw HTTP request to the daemon's API address: (status, headers, body).
fn http(
    d: &Daemon,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let addr = base(d).trim_start_matches("http://").to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// Two networked sites without a container runtime: site-a, and site-b registered at site-a
/// (site-b is not started unless a test starts it).
struct Pair {
    tmp: tempfile::TempDir,
    a: Site,
    b: Site,
}

fn pair() -> Pair {
    let tmp = common::test_dir();
    let root = tmp.path();
    let a = Site::init_networked(root, "site-a");
    let b = Site::init_networked(root, "site-b");
    Pair { tmp, a, b }
}

#[test]
fn no_page_or_api_route_works_without_the_token_and_cross_site_requests_are_refused() {
    let p = pair();
    let bundle_b = p.b.export(p.tmp.path());
    p.a.register(&p.b, &bundle_b);
    let da = p.a.start();
    // A workflow whose runner never comes: it stays running, and is what the forged
    // requests below try to cancel.
    let w = da.submit_workflow(
        "name = \"held\"\n[[job]]\nname = \"j\"\nrunner = \"site-b\"\nimage = \"sha256:4f2c1e4bd2e4f5a9b1f6a1b9e3f5c8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1\"\n",
    );
    assert_eq!(w.state, "running");
    let id = w.workflow_id.clone();
    let job = w.jobs[0].job_id.clone();

    // Without the token: every API route answers 401; every page sends to the login, and
    // every fragment, stream and action answers 401.
    let api_routes = [
        ("GET", "/v1/info".to_owned()),
        ("GET", "/v1/bundle".to_owned()),
        ("GET", "/v1/instances".to_owned()),
        ("POST", "/v1/instances".to_owned()),
        ("POST", "/v1/instances/preview".to_owned()),
        ("PUT", "/v1/instances/site-b/policy".to_owned()),
        ("DELETE", "/v1/instances/site-b".to_owned()),
        ("POST", "/v1/messages".to_owned()),
        ("GET", "/v1/inbox".to_owned()),
        ("GET", "/v1/jobs".to_owned()),
        ("POST", "/v1/jobs".to_owned()),
        ("POST", format!("/v1/jobs/{job}/approve")),
        ("POST", format!("/v1/jobs/{job}/reject")),
        ("GET", format!("/v1/jobs/{job}/result")),
        ("GET", format!("/v1/jobs/{job}/result/bundle")),
        ("GET", format!("/v1/jobs/{job}/log")),
        ("GET", "/v1/workflows".to_owned()),
        ("POST", "/v1/workflows".to_owned()),
        ("GET", format!("/v1/workflows/{id}")),
        ("POST", format!("/v1/workflows/{id}/cancel")),
        ("GET", "/v1/datasets".to_owned()),
        ("POST", "/v1/datasets".to_owned()),
        ("DELETE", "/v1/datasets/x".to_owned()),
        ("GET", "/v1/events".to_owned()),
    ];
    for (method, path) in &api_routes {
        for auth in [None, Some("Bearer wrong-token")] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
            let (status, _, body) = http(&da, method, path, &headers, "{}");
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {body}");
        }
        // A session cookie is not the API's credential either.
        let (status, _, _) =
            http(&da, method, path, &[("Cookie", "kaapana_node_session=forged")], "{}");
        assert_eq!(status, 401, "{method} {path} with a cookie");
    }
    let pages = [
        "/ui/instances".to_owned(),
        "/ui/instances/site-b".to_owned(),
        "/ui/instances/site-b/remove".to_owned(),
        "/ui/bundle".to_owned(),
        "/ui/workflows".to_owned(),
        "/ui/workflows/new".to_owned(),
        format!("/ui/workflows/{id}"),
        format!("/ui/jobs/{job}/log"),
        format!("/ui/jobs/{job}/result"),
        "/ui/approvals".to_owned(),
    ];
    for path in &pages {
        let (status, head, _) = http(&da, "GET", path, &[("Accept", "text/html")], "");
        assert_eq!(status, 303, "GET {path}: {head}");
        assert!(head.to_lowercase().contains("location: /login?next="), "{head}");
        let (status, _, _) = http(&da, "GET", path, &[], "");
        assert_eq!(status, 401, "GET {path} without Accept: text/html");
    }
    let fragments = [
        "/ui/live/instances".to_owned(),
        "/ui/live/workflows".to_owned(),
        "/ui/live/approvals".to_owned(),
        format!("/ui/workflows/{id}/live"),
        "/ui/events".to_owned(),
    ];
    for path in &fragments {
        assert_eq!(http(&da, "GET", path, &[], "").0, 401, "GET {path}");
    }
    let actions = [
        "/ui/instances/preview".to_owned(),
        "/ui/instances/register".to_owned(),
        "/ui/instances/site-b/policy".to_owned(),
        "/ui/instances/site-b/policy/confirm".to_owned(),
        "/ui/instances/site-b/remove".to_owned(),
        "/ui/workflows".to_owned(),
        format!("/ui/workflows/{id}/cancel"),
        format!("/ui/approvals/{job}/approve"),
        format!("/ui/approvals/{job}/reject"),
        "/ui/logout".to_owned(),
    ];
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    for path in &actions {
        assert_eq!(http(&da, "POST", path, &form, "csrf=x").0, 401, "POST {path}");
    }
    // The login itself refuses a wrong token, and a login posted from another origin.
    let (status, _, body) = http(&da, "POST", "/login", &form, "token=wrong");
    assert_eq!(status, 401);
    assert!(body.contains("not this node"), "{body}");
    let token_form = format!("token={}", da.api().token());
    let foreign = [form[0], ("Origin", "http://127.0.0.1:1")];
    assert_eq!(http(&da, "POST", "/login", &foreign, &token_form).0, 403);

    // In the browser: the login page, a wrong token, then the right one.
    let browser = Browser::launch();
    let page = browser.page("admin");
    page.goto(&format!("{}/ui/workflows/{id}", base(&da)));
    assert!(page.url().contains("/login?next="), "{}", page.url());
    page.screenshot("login");
    page.fill("#token", "not-the-token");
    assert_eq!(page.click_nav("button[type=submit]"), 401);
    assert!(page.text(".alert.error").contains("not this node's API token"));
    page.fill("#token", da.api().token());
    assert_eq!(page.click_nav("button[type=submit]"), 200);
    assert!(
        page.url().ends_with(&format!("/ui/workflows/{id}")),
        "back where it was: {}",
        page.url()
    );
    let cookies = page.cookies();
    let session = cookies.iter().find(|c| c["name"] == "kaapana_node_session").unwrap();
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Strict");
    assert_eq!(page.eval("document.cookie"), "", "the session cookie is not readable by scripts");

    // Another origin's page (a port of its own on 127.0.0.1: same site, so the browser sends
    // the cookie) forges a cancel: a form posted at once, and a fetch with credentials.
    let target = format!("{}/ui/workflows/{id}/cancel", base(&da));
    let evil = page.serve(&format!(
        r#"<!doctype html><html><body>
<form id="f" method="post" action="{target}"><input name="csrf" value="guessed"></form>
<script>
fetch("{target}", {{ method: "POST", mode: "no-cors", credentials: "include",
  headers: {{ "Content-Type": "application/x-www-form-urlencoded" }}, body: "csrf=guessed" }})
  .finally(() => document.getElementById("f").submit());
</script></body></html>"#
    ));
    let forged = browser.page("admin");
    forged.goto(&evil);
    forged.wait_for_text("body", "refused");
    let refusal = forged.text("body");
    assert!(refusal.contains("another site or port") || refusal.contains("CSRF"), "{refusal}");
    // A script of another origin cannot read the API with the cookie either.
    forged.goto(&forged.serve("<!doctype html><title>elsewhere</title>"));
    let read = forged.eval(&format!(
        "fetch('{}/v1/workflows', {{credentials: 'include'}}).then(r => 'read ' + r.status).catch(e => 'blocked')",
        base(&da)
    ));
    assert_eq!(read, "blocked", "no CORS: the answer is not readable");
    // A request from the dashboard's own origin without the session's CSRF token.
    page.goto(&format!("{}/ui/workflows/{id}", base(&da)));
    let status = page.eval(&format!(
        "fetch('/ui/workflows/{id}/cancel', {{method: 'POST', headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: 'csrf=0000'}}).then(r => r.status)"
    ));
    assert_eq!(status, 403);
    assert_eq!(da.workflow(&id).state, "running", "no forged request cancelled it");

    // Logging out ends the session for good.
    page.screenshot("workflow-held");
    assert_eq!(page.click_nav("form.logout button"), 200);
    assert!(page.url().ends_with("/login"), "{}", page.url());
    page.goto(&format!("{}/ui/workflows", base(&da)));
    assert!(page.url().contains("/login"), "{}", page.url());
}

#[test]
fn an_admin_registers_a_peer_through_the_page_and_edits_and_removes_it() {
    let p = pair();
    let root = p.tmp.path();
    // site-b already registered site-a (by the CLI); site-a's admin registers site-b in the
    // browser.
    let bundle_a = p.a.export(root);
    p.b.register(&p.a, &bundle_a);
    let (da, db) = (p.a.start(), p.b.start());
    let bundle_b = root.join("site-b.bundle");
    std::fs::write(&bundle_b, db.api().get_text("/v1/bundle").unwrap()).unwrap();

    let browser = Browser::launch();
    let page = browser.page("admin");
    login(&page, &da);
    page.goto(&format!("{}/ui/instances", base(&da)));
    assert_eq!(page.text("#own-name"), "site-a");
    assert_eq!(page.text("#own-fingerprint"), p.a.fingerprint());
    assert!(page.text("#live").contains("No instance is registered yet"));

    // A broken bundle is refused with the reason.
    page.fill("#bundle", "-----BEGIN KAAPANA EXCHANGE BUNDLE-----\nnot a bundle\n");
    assert_eq!(page.click_nav("#register button[type=submit]"), 400);
    assert!(
        page.text(".alert.error").contains("cannot be registered"),
        "{}",
        page.text(".alert.error")
    );

    // The real one, chosen as a file: its fingerprint is shown before anything is registered.
    page.set_file("#bundle-file", &bundle_b);
    page.wait_for_text("#bundle", "BEGIN");
    assert_eq!(page.click_nav("#register button[type=submit]"), 200);
    assert_eq!(page.text("#preview-name"), "site-b");
    assert_eq!(page.text("#preview-fingerprint"), p.b.fingerprint());
    assert!(da.instance("site-b").is_none(), "nothing registered before the confirmation");
    page.screenshot("register-preview");
    page.fill("#allowed_workflows", "lung-stats, any-other");
    page.fill("#allowed_datasets", "any");
    page.check("input[name=execution][value=automatic]");
    assert_eq!(page.click_nav("#confirm-register"), 200);
    assert!(page.url().contains("/ui/instances/site-b?done=registered"), "{}", page.url());
    let b = da.instance("site-b").unwrap();
    assert_eq!(b.fingerprint, p.b.fingerprint());
    assert_eq!(b.policy.allowed_workflows.to_string(), "any-other, lung-stats");
    assert_eq!(b.policy.allowed_datasets.to_string(), "any");

    // The overview shows it connect, live: no reload.
    page.goto(&format!("{}/ui/instances", base(&da)));
    page.eval("window.__sameDocument = 1");
    page.wait_for("tr[data-instance=site-b] td .conn.up");
    // Its capability ad: resources and the workflows it allows site-a.
    page.wait_for_text("tr[data-instance=site-b]", "CPU");
    assert_eq!(page.eval("window.__sameDocument"), 1, "updated in place");
    page.screenshot("instance-overview");

    // Edit its policy, with a confirmation that shows the change.
    page.goto(&format!("{}/ui/instances/site-b", base(&da)));
    page.wait_for("#connection .conn.up");
    page.fill("#allowed_datasets", "lung-ct");
    page.check("input[name=execution][value=approval]");
    assert_eq!(page.click_nav("#policy button[type=submit]"), 200);
    let diff = page.texts("#policy-diff tr.changed");
    assert_eq!(diff.len(), 2, "{diff:?}");
    assert!(diff[0].contains("any") && diff[0].contains("lung-ct"), "{diff:?}");
    assert!(diff[1].contains("automatic") && diff[1].contains("approval"), "{diff:?}");
    assert_eq!(da.instance("site-b").unwrap().policy.allowed_datasets.to_string(), "any");
    page.screenshot("policy-review");
    assert_eq!(page.click_nav("#confirm-policy"), 200);
    assert!(page.text(".alert.ok").contains("Policy saved"));
    let b = da.instance("site-b").unwrap();
    assert_eq!(b.policy.allowed_datasets.to_string(), "lung-ct");
    assert_eq!(b.policy.execution.to_string(), "approval");
    // site-b is sent a new ad with the narrower workflows.
    db.wait_until("site-b to see site-a's new ad", T, |d| {
        d.instance("site-a").and_then(|i| i.capabilities).is_some()
    });
    page.screenshot("instance");

    // Remove it, after a confirmation.
    page.click_nav("a.button.danger");
    assert!(page.text("main").contains(&p.b.fingerprint()));
    assert_eq!(page.click_nav("#confirm-remove"), 200);
    assert!(page.text(".alert.ok").contains("Removed"));
    assert!(da.instance("site-b").is_none());
    da.wait_until("site-b's connection to close", T, |d| !d.is_connected_to("site-b"));
}

/// Three sites on one containerd: site-a owns the workflows; site-b and site-c each hold a
/// dataset `lung-ct` of three items with a number in each, and registered site-a with
/// `policy`.
struct Three {
    ctd: TestContainerd,
    _rt: tokio::runtime::Runtime,
    tmp: tempfile::TempDir,
    sites: Vec<Site>,
    image: String,
}

fn three_sites(policy: &[&str]) -> Three {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctd = rt.block_on(TestContainerd::start());
    let tmp = common::test_dir();
    let root = tmp.path();
    let sites: Vec<Site> =
        ["site-a", "site-b", "site-c"].iter().map(|n| Site::init_networked(root, n)).collect();
    let bundles: Vec<PathBuf> = sites.iter().map(|s| s.export(root)).collect();
    let tar = common::containerd::build_busybox_image(root, "busybox", false);
    for s in &sites {
        s.set_executor(Some(ctd.containerd().socket()));
    }
    for (k, runner) in sites.iter().enumerate().skip(1) {
        sites[0].register(runner, &bundles[k]);
        let mut args = vec!["instance", "add", bundles[0].to_str().unwrap()];
        args.extend_from_slice(policy);
        runner.ok(&args);
        runner.ok(&["image", "import", tar.tar.to_str().unwrap()]);
        let dataset = root.join(format!("lung-ct-{k}"));
        for item in 1..=3 {
            let dir = dataset.join(format!("1.2.826.0.1.3680043.8.{k}.{item}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("value"), format!("{}\n", k * 10 + item)).unwrap();
        }
        runner.ok(&["dataset", "add", "lung-ct", dataset.to_str().unwrap()]);
    }
    Three { ctd, _rt: rt, tmp, sites, image: tar.digest.to_string() }
}

impl Three {
    fn start(&self) -> Vec<Daemon> {
        let d: Vec<Daemon> = self.sites.iter().map(Site::start).collect();
        d[0].wait_for_capabilities("site-b", T);
        d[0].wait_for_capabilities("site-c", T);
        d
    }

    fn write(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, toml.replace("IMAGE", &self.image)).unwrap();
        path
    }
}

const STATS: &str = r#"name = "lung-stats"

[[job]]
name = "sum"
query = { dataset = "lung-ct", pick = "all" }
dataset = "lung-ct"
image = "IMAGE"
command = ["sh", "-c", "sleep 1; echo summed $(ls /input | wc -l) items; cat /input/*/value | awk '{s+=$1} END {print s}' > /output/sum"]
timeout = "1m"

[[job]]
name = "merge"
runner = "owner"
inputs = ["sum"]
image = "IMAGE"
command = ["sh", "-c", "cat /input/*/sum | awk '{s+=$1} END {print \"total=\" s}' > /output/total.txt"]
timeout = "1m"
"#;

#[test]
fn a_three_site_workflow_is_submitted_in_the_page_and_finishes_live() {
    let s = three_sites(&[
        "--allow-workflow",
        "lung-stats",
        "--allow-dataset",
        "lung-ct",
        "--auto-execute",
        "--share-logs",
    ]);
    let d = s.start();
    let browser = Browser::launch();
    let page = browser.page("researcher");
    login(&page, &d[0]);
    page.goto(&format!("{}/ui/workflows", base(&d[0])));
    page.click_nav("#new-workflow");

    // A file with a mistake: the error is shown at its line, and the text is kept.
    let broken =
        STATS.replace("IMAGE", &s.image).replace("runner = \"owner\"", "runner = \"site-x\"");
    page.fill("#toml", &broken);
    assert_eq!(page.click_nav("#submit-workflow"), 400);
    let error = page.text("#submit-error");
    assert!(
        error.contains("Line 13") && error.contains("`site-x` is not a registered instance"),
        "{error}"
    );
    assert_eq!(page.text("#error-line").trim(), "runner = \"site-x\"");
    page.screenshot("workflow-submit-error");

    // The right file, chosen as a file.
    let file = s.write("lung-stats.toml", STATS);
    page.set_file("#workflow-file", &file);
    page.wait_for_text("#toml", "total=");
    assert_eq!(page.click_nav("#submit-workflow"), 200);
    assert!(
        page.url().contains("/ui/workflows/") && page.url().contains("done=submitted"),
        "{}",
        page.url()
    );
    let id =
        page.url().split("/ui/workflows/").nth(1).unwrap().split('?').next().unwrap().to_owned();
    page.eval("window.__sameDocument = 1");
    // The graph: one job at each runner, arrows into the merge at the owner.
    page.wait_attached("svg.graph");
    assert_eq!(page.count("svg.graph g.job"), 3);
    assert_eq!(page.count("svg.graph path.edge"), 2);
    let boxes = page.texts("svg.graph g.job");
    assert!(
        boxes.iter().any(|b| b.contains("site-b")) && boxes.iter().any(|b| b.contains("site-c")),
        "{boxes:?}"
    );
    assert!(boxes.iter().any(|b| b.contains("merge") && b.contains("site-a")), "{boxes:?}");

    // It runs and finishes while the page is watched, updated in place.
    page.wait_for_text("#jobs", "running");
    page.screenshot("workflow-running");
    page.wait_for_text("#wf-state", "finished");
    assert_eq!(page.eval("window.__sameDocument"), 1, "no page reload");
    assert_eq!(page.count("#jobs tr[data-state=finished]"), 3);
    assert_eq!(page.count("svg.graph g.job.st-finished"), 3);
    let chart = page.text("figure.chart figcaption");
    assert!(chart.contains("finished 3"), "{chart}");
    page.screenshot("workflow-finished");
    let w = d[0].workflow(&id);
    assert_eq!(w.state, "finished");

    // The merge's result, downloaded: a tar of its /output.
    let merge = w.jobs.iter().find(|j| j.name == "merge").unwrap();
    let tar = s.tmp.path().join("merge.tar");
    let name = page.download(&format!("#jobs tr[data-job='{}'] a.download", merge.job_id), &tar);
    assert_eq!(name, format!("result-{}.tar", merge.job_id));
    let mut archive = tar::Archive::new(std::fs::File::open(&tar).unwrap());
    let mut total = None;
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        if e.path().unwrap().ends_with("total.txt") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            total = Some(text);
        }
    }
    // site-b: 11+12+13, site-c: 21+22+23.
    assert_eq!(total.as_deref(), Some("total=102\n"));

    // A runner's job log.
    let sum = w.jobs.iter().find(|j| j.runner == "site-b").unwrap();
    page.click_nav(&format!("#jobs tr[data-job='{}'] a[href$='/log']", sum.job_id));
    let log = page.text("#job-log");
    assert!(log.contains("summed 3 items"), "the runner's shared log: {log}");
    page.screenshot("job-log");

    // The list shows it finished, with its progress.
    page.goto(&format!("{}/ui/workflows", base(&d[0])));
    let row = page.text(&format!("tr[data-workflow='{id}']"));
    assert!(row.contains("finished") && row.contains("3 finished"), "{row}");
    page.screenshot("workflow-list");
    // The open page's event stream does not hold up a graceful stop.
    let mut d = d;
    let owner = d.remove(0);
    assert!(owner.stop(), "site-a stopped gracefully with a page open");
    drop(d);
    drop(s.ctd);
}

#[test]
fn a_runner_admin_approves_and_rejects_and_an_owner_sees_denials_and_cancels() {
    let s = three_sites(&["--allow-workflow", "lung-stats", "--allow-dataset", "lung-ct"]);
    let d = s.start();
    let (owner, runner) = (&d[0], &d[1]);
    let browser = Browser::launch();
    let admin = browser.page("runner-admin");
    login(&admin, runner);
    admin.goto(&format!("{}/ui/approvals", base(runner)));
    assert!(admin.text("#live").contains("No job is waiting"));
    admin.eval("window.__sameDocument = 1");

    // A job for site-b only: it waits there for its admin, and appears on the open page.
    let one_site = |name: &str, command: &str| {
        format!(
            "name = \"{name}\"\n[[job]]\nname = \"sum\"\nrunner = \"site-b\"\ndataset = \"lung-ct\"\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", \"{command}\"]\ntimeout = \"1m\"\n",
            s.image
        )
    };
    let w = owner.submit_workflow(&one_site("lung-stats", "cat /input/*/value > /output/all"));
    let job = w.jobs[0].job_id.clone();
    let card = format!("section.pending[data-job='{job}']");
    admin.wait_for(&card);
    assert_eq!(admin.eval("window.__sameDocument"), 1);
    let shown = admin.text(&card);
    for expected in [
        "site-a",
        "lung-stats",
        &s.image,
        "cat /input/*/value > /output/all",
        "lung-ct (all items)",
    ] {
        assert!(shown.contains(expected), "{expected} in {shown}");
    }
    admin.goto(&format!("{}/ui/approvals", base(runner)));
    assert_eq!(admin.text("#awaiting-count"), "1");
    admin.screenshot("approvals");
    assert_eq!(admin.click_nav(&format!("{card} button.approve")), 200);
    assert!(admin.text(".alert.ok").contains("Approved"));
    owner.wait_workflow(&w.workflow_id, "finished", T);

    // Another one, rejected with a reason the owner sees.
    let w2 = owner.submit_workflow(&one_site("lung-stats", "true"));
    let card2 = format!("section.pending[data-job='{}']", w2.jobs[0].job_id);
    admin.goto(&format!("{}/ui/approvals", base(runner)));
    admin.wait_for(&card2);
    admin.fill(&format!("{card2} input[name=reason]"), "not during the scanner upgrade");
    assert_eq!(admin.click_nav(&format!("{card2} form.reject button")), 200);
    let rejected = owner.wait_workflow(&w2.workflow_id, "failed", T);
    assert!(
        rejected.jobs[0].reason.as_deref().unwrap_or("").contains("not during the scanner upgrade"),
        "{rejected:?}"
    );

    // A workflow site-b's policy does not allow: denied there, the owner's page shows why.
    let researcher = browser.page("researcher");
    login(&researcher, owner);
    let denied = owner.submit_workflow(&one_site("brain-seg", "true"));
    researcher.goto(&format!("{}/ui/workflows/{}", base(owner), denied.workflow_id));
    researcher.wait_for_text("#wf-state", "failed");
    let reason = researcher.text("#jobs td.reason");
    assert!(reason.contains("workflow brain-seg is not allowed for instance site-a"), "{reason}");
    researcher.screenshot("workflow-denied");

    // A third, cancelled by the owner while it waits for approval: gone from the runner's
    // page, live.
    let w3 = owner.submit_workflow(&one_site("lung-stats", "true"));
    let card3 = format!("section.pending[data-job='{}']", w3.jobs[0].job_id);
    admin.goto(&format!("{}/ui/approvals", base(runner)));
    admin.wait_for(&card3);
    researcher.goto(&format!("{}/ui/workflows/{}", base(owner), w3.workflow_id));
    assert_eq!(researcher.click_nav("#cancel-workflow"), 200);
    assert_eq!(researcher.dialogs().len(), 1, "asked before cancelling");
    assert!(researcher.text(".alert.ok").contains("Cancelled"));
    researcher.wait_for_text("#wf-state", "cancelled");
    assert_eq!(owner.workflow(&w3.workflow_id).state, "cancelled");
    admin.wait_gone(&card3);
    let jobs: JobsView = runner.api().get("/v1/jobs").unwrap();
    let j3 = jobs.running_here.iter().find(|j| j.job_id == w3.jobs[0].job_id).unwrap();
    assert_eq!(j3.state, "failed", "{j3:?}");
    admin.screenshot("approvals-after");
    drop(d);
}
