//! A real Apache Airflow for tests: `airflow standalone` (API server, scheduler, DAG processor,
//! triggerer; SQLite, LocalExecutor) in a private `AIRFLOW_HOME` on free loopback ports, with
//! the test DAG `node/tests/dags/kaapana_test_dag.py` and a simple-auth user whose password
//! the test sets. The `airflow` binary is `$KAAPANA_AIRFLOW`, else what `kn_airflow`
//! (scripts/common.sh) installs.
//!
//! Airflow takes several seconds to start, so a test binary shares one ([`Airflow::shared`]),
//! each test with DAG runs of its own jobs. The whole process group goes when the test process
//! does: `airflow standalone` runs under a shell that waits for its standard input to close
//! (the test process's end, however it ends) and then kills the rest of its process group and
//! removes the Airflow home.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The test DAG's id.
pub const DAG: &str = "kaapana-test";
/// The Airflow user the nodes act as.
pub const USER: &str = "kaapana";

/// A running `airflow standalone`.
#[derive(Debug)]
pub struct Airflow {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Airflow's major version: 3 (REST `/api/v2`, tokens) or 2 (`/api/v1`, basic auth).
    pub major: u8,
    /// The user the nodes act as.
    pub user: String,
    /// The user's password.
    pub password: String,
    /// Its `AIRFLOW_HOME`.
    pub home: PathBuf,
    child: Child,
    /// Closed when the test process ends, which makes the shell kill the process group.
    _lifeline: ChildStdin,
    agent: ureq::Agent,
}

/// The `airflow` binary: `$KAAPANA_AIRFLOW`, or installed by `kn_airflow`.
pub fn airflow_binary() -> PathBuf {
    installed("KAAPANA_AIRFLOW", "kn_airflow")
}

/// Airflow 2's `airflow` binary (Kaapana 0.6 ships 2.11): `$KAAPANA_AIRFLOW2`, or installed
/// by `kn_airflow2`.
pub fn airflow2_binary() -> PathBuf {
    installed("KAAPANA_AIRFLOW2", "kn_airflow2")
}

/// `$variable`, else the path the shell function `install` (scripts/common.sh) prints.
fn installed(variable: &str, install: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(variable) {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("bash")
        .args(["-c", &format!(". scripts/common.sh && {install}")])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{install} (scripts/common.sh) could not install Airflow");
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim());
    assert!(path.is_file(), "{install} printed {}", path.display());
    path
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Airflow {
    /// The Airflow of this test process, started on first use.
    pub fn shared() -> &'static Airflow {
        static SHARED: OnceLock<Airflow> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Kept for the process's life (statics are not dropped): the lifeline ends it.
            let dir = tempfile::Builder::new().prefix("kaapana-node-airflow-").tempdir().unwrap();
            Airflow::start(&dir.keep(), true)
        })
    }

    /// An Airflow 2 of this test process, started on first use.
    pub fn shared2() -> &'static Airflow {
        static SHARED: OnceLock<Airflow> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = tempfile::Builder::new().prefix("kaapana-node-airflow2-").tempdir().unwrap();
            Airflow::start_with(&airflow2_binary(), 2, &dir.keep(), true)
        })
    }

    /// Starts `airflow standalone` with its home in `home` (removed when the process group
    /// goes, if `remove_home`) and waits until the API answers, the user gets a token and the
    /// test DAG is parsed and unpaused.
    pub fn start(home: &Path, remove_home: bool) -> Airflow {
        Self::start_with(&airflow_binary(), 3, home, remove_home)
    }

    /// Starts `airflow` (of major version `major`) standalone, as [`Airflow::start`].
    /// Airflow 2 runs on SQLite with the SequentialExecutor (its standalone's), basic auth for
    /// the REST API, and the admin user standalone creates.
    pub fn start_with(airflow: &Path, major: u8, home: &Path, remove_home: bool) -> Airflow {
        let airflow = airflow.to_owned();
        let bin = airflow.parent().unwrap();
        std::fs::create_dir_all(home.join("dags")).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dags/kaapana_test_dag.py"),
            home.join("dags/kaapana_test_dag.py"),
        )
        .unwrap();
        let password = format!("pw-{}", random_hex());
        std::fs::write(
            home.join("passwords.json"),
            serde_json::json!({ USER: password }).to_string(),
        )
        .unwrap();
        let port = super::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let cfg2 = format!(
            "[core]\n\
             dags_folder = {home}/dags\n\
             load_examples = False\n\
             dags_are_paused_at_creation = False\n\
             [webserver]\n\
             web_server_host = 127.0.0.1\n\
             web_server_port = {port}\n\
             secret_key = {secret}\n\
             workers = 1\n\
             [api]\n\
             auth_backends = airflow.api.auth.backend.basic_auth\n\
             [scheduler]\n\
             scheduler_heartbeat_sec = 1\n\
             min_file_process_interval = 30\n\
             dag_dir_list_interval = 5\n\
             [logging]\n\
             worker_log_server_port = {wport}\n\
             trigger_log_server_port = {tport}\n",
            home = home.display(),
            secret = random_hex(),
            wport = super::free_port(),
            tport = super::free_port(),
        );
        let cfg = format!(
            "[core]\n\
             dags_folder = {home}/dags\n\
             load_examples = False\n\
             dags_are_paused_at_creation = False\n\
             executor = LocalExecutor\n\
             parallelism = 8\n\
             execution_api_server_url = {url}/execution/\n\
             simple_auth_manager_users = {USER}:admin\n\
             simple_auth_manager_passwords_file = {home}/passwords.json\n\
             [api]\n\
             host = 127.0.0.1\n\
             port = {port}\n\
             secret_key = {secret}\n\
             workers = 1\n\
             [api_auth]\n\
             jwt_secret = {jwt}\n\
             [dag_processor]\n\
             refresh_interval = 5\n\
             min_file_process_interval = 30\n\
             [scheduler]\n\
             scheduler_idle_sleep_time = 0.2\n\
             [logging]\n\
             worker_log_server_port = {wport}\n\
             trigger_log_server_port = {tport}\n",
            home = home.display(),
            secret = random_hex(),
            jwt = random_hex(),
            wport = super::free_port(),
            tport = super::free_port(),
        );
        std::fs::write(home.join("airflow.cfg"), if major == 2 { cfg2 } else { cfg }).unwrap();
        let log = std::fs::File::create(home.join("standalone.log")).unwrap();
        let mut cmd = Command::new("bash");
        // `airflow standalone` in the background; when our end of stdin closes, the whole
        // process group (this shell, standalone and its children) is killed.
        // `$1`, if not empty, is removed afterwards.
        cmd.args([
            "-c",
            "\"$0\" standalone >&2 </dev/null & cat >/dev/null; \
             for p in $(pgrep -g $$); do [ \"$p\" = $$ ] || kill -KILL \"$p\"; done; \
             [ -z \"$1\" ] || rm -rf \"$1\"",
        ])
        .arg(&airflow)
        .arg(if remove_home { home.as_os_str() } else { std::ffi::OsStr::new("") })
        .env("AIRFLOW_HOME", home)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().unwrap();
        let lifeline = child.stdin.take().unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let user = if major == 2 { "admin" } else { USER }.to_owned();
        let mut af = Airflow {
            url,
            major,
            user,
            password,
            home: home.to_owned(),
            child,
            _lifeline: lifeline,
            agent,
        };
        af.wait_ready(Duration::from_secs(240));
        af
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        loop {
            if self.major == 2 {
                // Standalone writes the admin user's generated password once it made it.
                let file = self.home.join("standalone_admin_password.txt");
                if let Ok(p) = std::fs::read_to_string(&file) {
                    self.password = p.trim().to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "Airflow did not get ready within {limit:?} ({last}); its log:\n{}",
                self.log_tail()
            );
            let dag = self.try_token().and_then(|t| {
                self.request_with("GET", &t, &format!("{}/dags/{DAG}", self.api()), None)
            });
            match dag {
                Ok((200, body)) => {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    if v["is_paused"] == Value::Bool(false) {
                        return;
                    }
                    last = "the DAG is paused".into();
                }
                Ok((status, body)) => last = format!("HTTP {status}: {body}"),
                Err(e) => last = e,
            }
            // Polling a process that is starting.
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The end of `standalone`'s output (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.home.join("standalone.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The REST API's root path.
    fn api(&self) -> &'static str {
        if self.major == 2 { "/api/v1" } else { "/api/v2" }
    }

    /// Airflow 3: a JWT; Airflow 2: the basic credentials (see `request_with`).
    fn try_token(&self) -> Result<String, String> {
        if self.major == 2 {
            use base64::Engine as _;
            let basic = format!("{}:{}", self.user, self.password);
            return Ok(base64::engine::general_purpose::STANDARD.encode(basic));
        }
        let mut resp = self
            .agent
            .post(&format!("{}/auth/token", self.url))
            .send_json(serde_json::json!({"username": USER, "password": self.password}))
            .map_err(|e| e.to_string())?;
        let body = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        v["access_token"].as_str().map(str::to_owned).ok_or(body)
    }

    fn request_with(
        &self,
        method: &str,
        token: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, String), String> {
        let url = format!("{}{path}", self.url);
        let auth =
            if self.major == 2 { format!("Basic {token}") } else { format!("Bearer {token}") };
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("POST", Some(b)) => self.agent.post(&url).header("Authorization", &auth).send_json(b),
            ("PATCH", Some(b)) => {
                self.agent.patch(&url).header("Authorization", &auth).send_json(b)
            }
            (m, _) => panic!("unsupported request {m} {path}"),
        };
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_to_string().map_err(|e| e.to_string())?))
    }

    /// A REST call of the Airflow API as the test user (`path` under `/api/v2` for Airflow 3,
    /// `/api/v1` for Airflow 2): (status, JSON body).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = self.try_token().unwrap();
        let (status, text) = self.request_with(method, &token, path, body).unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// The runs of the test DAG whose run id starts with `prefix`.
    pub fn runs(&self, prefix: &str) -> Vec<Value> {
        let query = if self.major == 2 {
            format!("/api/v1/dags/{DAG}/dagRuns?limit=100")
        } else {
            format!("/api/v2/dags/{DAG}/dagRuns?run_id_pattern={prefix}&limit=100")
        };
        let (status, v) = self.call("GET", &query, None);
        assert_eq!(status, 200, "{v}");
        v["dag_runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["dag_run_id"].as_str().unwrap().starts_with(prefix))
            .cloned()
            .collect()
    }

    /// The state of the test DAG's run `run_id`.
    pub fn run_state(&self, run_id: &str) -> String {
        let path = format!("{}/dags/{DAG}/dagRuns/{run_id}", self.api());
        let (status, v) = self.call("GET", &path, None);
        assert_eq!(status, 200, "{v}");
        v["state"].as_str().unwrap().to_owned()
    }

    /// Writes the password file a node reads (mode 0600) into `dir`.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("airflow-password");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        writeln!(f, "{}", self.password).unwrap();
        path
    }

    /// The `[executor]` section of a node that runs its jobs here.
    pub fn executor_section(&self, password_file: &Path) -> String {
        format!(
            "[executor]\nkind = \"airflow\"\nairflow_url = {:?}\nairflow_api_version = \"auto\"\n\
             airflow_user = {:?}\nairflow_password_file = {:?}\nairflow_poll_ms = 200\n",
            self.url,
            self.user,
            password_file.display().to_string()
        )
    }
}

impl Drop for Airflow {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// site-a (no executor) and site-b (jobs on `airflow`) in `root`, registered with each
/// other; site-b allows site-a the test DAG (plus `allow`, e.g. `--allow-dataset X`) and runs
/// its jobs at once.
pub fn owner_and_airflow_runner(
    root: &Path,
    airflow: &Airflow,
    allow: &[&str],
) -> (super::Site, super::Site) {
    let a = super::Site::init_networked(root, "site-a");
    let b = super::Site::init_networked(root, "site-b");
    let (bundle_a, bundle_b) = (a.export(root), b.export(root));
    a.register(&b, &bundle_b);
    let mut args = vec!["instance", "add", bundle_a.to_str().unwrap(), "--allow-workflow", DAG];
    args.extend_from_slice(allow);
    args.push("--auto-execute");
    b.ok(&args);
    b.set_airflow_executor(airflow);
    (a, b)
}

impl super::Site {
    /// Makes this site run its jobs as DAG runs of `airflow`.
    pub fn set_airflow_executor(&self, airflow: &Airflow) {
        let path = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let (start, rest) = text.split_at(text.find("[executor]").unwrap());
        let end = rest[1..].find("\n[").map_or(rest.len(), |i| i + 1);
        let section = airflow.executor_section(&airflow.password_file(&self.dir));
        std::fs::write(&path, format!("{start}{section}{}", &rest[end..])).unwrap();
    }
}
