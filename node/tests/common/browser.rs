//! A headless Chromium driven by Playwright (`node/tests/dashboard/browser.mjs`), for the
//! dashboard's tests and benchmark: one Node.js process per [`Browser`], one JSON command per
//! line. Needs `npm ci` in `node/tests/dashboard` (scripts/test runs it) and Debian's
//! `chromium`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use serde_json::{Value, json};

/// The folder of the Playwright driver and its `node_modules`.
pub fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard")
}

/// Where the tests write their screenshots.
pub fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("KAAPANA_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots")
    });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Io {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u64,
}

/// The browser process.
pub struct Browser {
    child: Child,
    io: Mutex<Io>,
}

/// One page (a browser context of its own: its own cookies) of a [`Browser`].
pub struct Page<'a> {
    browser: &'a Browser,
    name: String,
}

impl Browser {
    /// Starts the browser.
    pub fn launch() -> Self {
        let dir = driver_dir();
        assert!(
            dir.join("node_modules/playwright-core").is_dir(),
            "playwright-core is not installed: run `npm ci` in {} (scripts/test does)",
            dir.display()
        );
        assert!(
            Path::new("/usr/bin/chromium").exists() || std::env::var_os("CHROMIUM").is_some(),
            "Debian's chromium is not installed: apt-get install chromium (scripts/test does)"
        );
        let mut child = Command::new("node")
            .arg(dir.join("browser.mjs"))
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (Node.js) runs the Playwright driver");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, io: Mutex::new(Io { stdin, stdout, next_id: 1 }) }
    }

    /// A page by name (created on first use, with its own cookies).
    pub fn page(&self, name: &str) -> Page<'_> {
        Page { browser: self, name: name.to_owned() }
    }

    /// Runs one command; `Err` with Playwright's message when it fails.
    pub fn try_call(&self, page: &str, op: &str, mut args: Value) -> Result<Value, String> {
        let mut io = self.io.lock().unwrap();
        let id = io.next_id;
        io.next_id += 1;
        args["id"] = json!(id);
        args["op"] = json!(op);
        args["page"] = json!(page);
        writeln!(io.stdin, "{args}").unwrap();
        io.stdin.flush().unwrap();
        let mut line = String::new();
        let n = io.stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "the browser driver exited (its errors are above)");
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["id"], json!(id), "{answer}");
        if answer["ok"] == json!(true) {
            Ok(answer.get("value").cloned().unwrap_or(Value::Null))
        } else {
            Err(answer["error"].as_str().unwrap_or("?").to_owned())
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(mut io) = self.io.lock() {
            let _ = writeln!(io.stdin, "{}", json!({"op": "quit"}));
        }
        let _ = self.child.wait();
    }
}

impl Page<'_> {
    /// Runs one command and panics (after a screenshot of the page) when it fails.
    pub fn call(&self, op: &str, args: Value) -> Value {
        match self.browser.try_call(&self.name, op, args.clone()) {
            Ok(v) => v,
            Err(e) => {
                let shot = screenshot_dir().join(format!("failed-{}-{op}.png", self.name));
                let _ = self.browser.try_call(
                    &self.name,
                    "screenshot",
                    json!({"path": shot.display().to_string()}),
                );
                let url = self.browser.try_call(&self.name, "url", json!({})).unwrap_or_default();
                panic!("browser {op} {args} failed at {url}: {e}\n(screenshot: {})", shot.display())
            }
        }
    }

    /// Opens `url`; its HTTP status.
    pub fn goto(&self, url: &str) -> u64 {
        self.call("goto", json!({ "url": url }))["status"].as_u64().unwrap_or(0)
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        self.call("url", json!({})).as_str().unwrap_or("").to_owned()
    }

    /// Clicks what navigates and waits for the next page; its HTTP status.
    pub fn click_nav(&self, selector: &str) -> u64 {
        self.call("clickNav", json!({ "selector": selector }))["status"].as_u64().unwrap_or(0)
    }

    /// Clicks.
    pub fn click(&self, selector: &str) {
        self.call("click", json!({ "selector": selector }));
    }

    /// Types into a field (replacing its value).
    pub fn fill(&self, selector: &str, value: &str) {
        self.call("fill", json!({ "selector": selector, "value": value }));
    }

    /// Checks a checkbox or radio button.
    pub fn check(&self, selector: &str) {
        self.call("check", json!({ "selector": selector }));
    }

    /// Chooses a file in a file input.
    pub fn set_file(&self, selector: &str, path: &Path) {
        self.call("setFiles", json!({ "selector": selector, "path": path.display().to_string() }));
    }

    /// Waits until `selector` is visible.
    pub fn wait_for(&self, selector: &str) {
        self.call("waitFor", json!({ "selector": selector }));
    }

    /// Waits until `selector` is in the page (visible or not).
    pub fn wait_attached(&self, selector: &str) {
        self.call("waitFor", json!({ "selector": selector, "state": "attached" }));
    }

    /// Waits until `selector` is gone.
    pub fn wait_gone(&self, selector: &str) {
        self.call("waitFor", json!({ "selector": selector, "state": "detached" }));
    }

    /// Waits until the text of `selector` contains `text`; the text then.
    pub fn wait_for_text(&self, selector: &str, text: &str) -> String {
        let v = self.call("waitForText", json!({ "selector": selector, "text": text }));
        v.as_str().unwrap_or("").to_owned()
    }

    /// The text of the first match.
    pub fn text(&self, selector: &str) -> String {
        self.call("text", json!({ "selector": selector })).as_str().unwrap_or("").to_owned()
    }

    /// The texts of all matches.
    pub fn texts(&self, selector: &str) -> Vec<String> {
        let v = self.call("texts", json!({ "selector": selector }));
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap_or("").to_owned()).collect()
    }

    /// How many elements match.
    pub fn count(&self, selector: &str) -> u64 {
        self.call("count", json!({ "selector": selector })).as_u64().unwrap_or(0)
    }

    /// An attribute of the first match.
    pub fn attr(&self, selector: &str, name: &str) -> Option<String> {
        self.call("attr", json!({ "selector": selector, "name": name })).as_str().map(str::to_owned)
    }

    /// Evaluates a JavaScript expression (or function) in the page.
    pub fn eval(&self, js: &str) -> Value {
        self.call("eval", json!({ "js": js }))
    }

    /// A full-page screenshot into the screenshot folder; its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let path = screenshot_dir().join(format!("{name}.png"));
        self.call("screenshot", json!({ "path": path.display().to_string() }));
        path
    }

    /// Clicks a download link and saves the file to `path`; the browser's suggested name.
    pub fn download(&self, selector: &str, path: &Path) -> String {
        let v = self
            .call("download", json!({ "selector": selector, "path": path.display().to_string() }));
        v["suggested"].as_str().unwrap_or("").to_owned()
    }

    /// The context's cookies.
    pub fn cookies(&self) -> Vec<Value> {
        self.call("cookies", json!({})).as_array().cloned().unwrap_or_default()
    }

    /// The messages of the dialogs (confirm, alert) accepted since the last call.
    pub fn dialogs(&self) -> Vec<String> {
        let v = self.call("dialogs", json!({}));
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap_or("").to_owned()).collect()
    }

    /// Loads `url` and returns the browser's timings in ms: (first byte, DOMContentLoaded,
    /// load) and the bytes transferred.
    pub fn timed_goto(&self, url: &str) -> (f64, f64, f64, u64) {
        let v = self.call("timedGoto", json!({ "url": url }));
        assert_eq!(v["status"], json!(200), "{url}: {v}");
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        (f("ttfb"), f("dom"), f("load"), v["bytes"].as_u64().unwrap_or(0))
    }

    /// Serves `html` from another origin (a port of its own on 127.0.0.1); its URL.
    pub fn serve(&self, html: &str) -> String {
        self.call("serve", json!({ "html": html })).as_str().unwrap().to_owned()
    }

    /// Logs in at the daemon's dashboard `base` (`http://127.0.0.1:PORT`) with `token`.
    pub fn login(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/login"));
        self.fill("#token", token);
        let status = self.click_nav("button[type=submit]");
        assert_eq!(status, 200, "login at {base} failed: {}", self.url());
    }
}
