//! Load time of the dashboard at the scale of a large federation: an owner daemon with 500
//! registered instances and 1,000 workflows (a third of them cancelled), measured two ways:
//!
//! - the server: each page's HTML (and the JSON lists) fetched over HTTP with the session
//!   cookie, median and 95th percentile of 30 fetches;
//! - the browser: headless Chromium (Playwright) opening each page, median over 7 loads of
//!   the first byte, DOMContentLoaded and the load event (Navigation Timing), and the bytes.
//!
//! `cargo bench -p kaapana-node --bench dashboard` (add `-- N M` for N instances and M
//! workflows; defaults 500 and 1000). Needs `npm ci` in node/tests/dashboard and Debian's
//! chromium (scripts/test installs both).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Site;
use common::browser::Browser;
use kaapana_node::admin::{self, InitOptions};
use kaapana_node::daemon::now;
use kaapana_node::data_dir::DataDir;

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let instances = args.first().copied().unwrap_or(500);
    let workflows = args.get(1).copied().unwrap_or(1000);
    let tmp = common::test_dir();
    let root = tmp.path();

    // The owner, and `instances` others registered at it (they never run: their rows show
    // why they are not connected, and the owner's outbox holds the jobs for them).
    let owner = Site::init_networked(root, "owner");
    let started = Instant::now();
    for i in 0..instances {
        let dir = DataDir::new(root.join(format!("peer-{i:04}")));
        let port = 40_000 + i;
        admin::init(
            &dir,
            &InitOptions {
                name: format!("site-{i:04}"),
                listen: Some(vec![format!("/ip4/127.0.0.1/tcp/{port}")]),
                advertise: Vec::new(),
                api_listen: None,
                valid_days: admin::DEFAULT_VALID_DAYS,
            },
            now(),
        )
        .unwrap();
        let (bundle, _) = admin::export_bundle(&dir, now()).unwrap();
        let policy = kaapana_federation::Policy::default();
        admin::add_instance(&DataDir::new(&owner.dir), &bundle, policy, None, now()).unwrap();
    }
    println!("registered {instances} instances in {:.1} s", started.elapsed().as_secs_f64());

    let d = owner.start();
    let started = Instant::now();
    let mut ids = Vec::new();
    for k in 0..workflows {
        let runners: Vec<String> =
            (0..1 + k % 3).map(|j| format!("site-{:04}", (k * 7 + j * 13) % instances)).collect();
        let mut text = format!("name = \"study-{k:04}\"\n");
        for (j, r) in runners.iter().enumerate() {
            text.push_str(&format!(
                "[[job]]\nname = \"part-{j}\"\nrunner = \"{r}\"\nimage = \"sha256:{}\"\n",
                "ab".repeat(32)
            ));
        }
        text.push_str(
            "[[job]]\nname = \"merge\"\nrunner = \"owner\"\ninputs = [\"part-0\"]\nimage = \"sha256:",
        );
        text.push_str(&format!("{}\"\n", "cd".repeat(32)));
        ids.push(d.submit_workflow(&text).workflow_id);
    }
    let submit = started.elapsed().as_secs_f64();
    for id in ids.iter().step_by(3) {
        let _: serde_json::Value =
            d.api().post(&format!("/v1/workflows/{id}/cancel"), &serde_json::json!({})).unwrap();
    }
    println!(
        "submitted {workflows} workflows in {submit:.1} s ({:.1} ms each), cancelled {}",
        submit * 1000.0 / workflows as f64,
        ids.len().div_ceil(3)
    );

    // A session, as the browser gets it.
    let base = d.api().base().to_owned();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent();
    let r = agent
        .post(&format!("{base}/login"))
        .content_type("application/x-www-form-urlencoded")
        .send(format!("token={}", d.api().token()))
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();

    let wf = &ids[ids.len() / 2];
    let pages = [
        ("Instance Overview, page 1", "/ui/instances".to_owned()),
        ("Instance Overview, page 10", "/ui/instances?page=10".to_owned()),
        ("Instance Overview, filtered", "/ui/instances?q=site-04".to_owned()),
        ("one instance", "/ui/instances/site-0042".to_owned()),
        ("Workflow List, page 1", "/ui/workflows".to_owned()),
        ("Workflow List, page 20", "/ui/workflows?page=20".to_owned()),
        ("Workflow List, running only", "/ui/workflows?state=running".to_owned()),
        ("one workflow", format!("/ui/workflows/{wf}")),
        ("Approvals", "/ui/approvals".to_owned()),
    ];
    let json = [
        ("GET /v1/instances (all)", "/v1/instances".to_owned()),
        ("GET /v1/instances?limit=50", "/v1/instances?limit=50".to_owned()),
        ("GET /v1/workflows (all)", "/v1/workflows".to_owned()),
        ("GET /v1/workflows?limit=50", "/v1/workflows?limit=50&newest_first=true".to_owned()),
    ];
    println!();
    println!("server: HTML or JSON over HTTP on loopback, 30 fetches each");
    println!("{:<32} {:>10} {:>10} {:>10}", "page", "median ms", "p95 ms", "KiB");
    let fetch = |path: &str, bearer: bool| {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..30 {
            let t = Instant::now();
            let req = agent.get(&format!("{base}{path}"));
            let req = if bearer {
                req.header("Authorization", &format!("Bearer {}", d.api().token()))
            } else {
                req.header("Cookie", &cookie).header("Accept", "text/html")
            };
            let mut r = req.call().unwrap();
            assert_eq!(r.status(), 200, "{path}");
            size = r.body_mut().read_to_vec().unwrap().len();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        (percentile(times.clone(), 0.5), percentile(times, 0.95), size)
    };
    for (name, path) in &pages {
        let (m, p95, size) = fetch(path, false);
        println!("{name:<32} {m:>10.1} {p95:>10.1} {:>10.1}", size as f64 / 1024.0);
    }
    for (name, path) in &json {
        let (m, p95, size) = fetch(path, true);
        println!("{name:<32} {m:>10.1} {p95:>10.1} {:>10.1}", size as f64 / 1024.0);
    }

    println!();
    println!("browser: headless Chromium (Playwright), median of 7 loads");
    println!("{:<32} {:>10} {:>10} {:>10} {:>10}", "page", "TTFB ms", "DOM ms", "load ms", "KiB");
    let browser = Browser::launch();
    let page = browser.page("bench");
    page.login(&base, d.api().token());
    for (name, path) in &pages {
        let mut t = (Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0;
        for _ in 0..7 {
            let (ttfb, dom, load, b) = page.timed_goto(&format!("{base}{path}"));
            t.0.push(ttfb);
            t.1.push(dom);
            t.2.push(load);
            bytes = b;
        }
        println!(
            "{name:<32} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            percentile(t.0, 0.5),
            percentile(t.1, 0.5),
            percentile(t.2, 0.5),
            bytes as f64 / 1024.0
        );
    }
    drop(browser);
    drop(d);
}
