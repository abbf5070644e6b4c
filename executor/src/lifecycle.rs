//! The containerd the node uses: a configured socket, or a child process the node owns.
//!
//! [`Containerd::connect`] uses a containerd that someone else runs (`containerd.address`).
//! [`Containerd::spawn`] starts `containerd` with everything under `DATA_DIR/containerd/`:
//!
//! ```text
//! DATA_DIR/containerd/config.toml      written by the node (grpc address, CRI disabled)
//! DATA_DIR/containerd/root/            images, content, snapshots
//! DATA_DIR/containerd/state/           running tasks
//! DATA_DIR/containerd/containerd.sock  the gRPC socket (see below)
//! DATA_DIR/containerd/containerd.pid   the child's pid (to adopt it after a crash of the node)
//! DATA_DIR/containerd/containerd.log   its stdout and stderr
//! ```
//!
//! Unix socket paths are limited to 107 bytes: when `DATA_DIR/containerd/containerd.sock.ttrpc`
//! would be longer, the socket goes to `/run/kaapana-node-<hash of the dir>/containerd.sock`
//! instead ([`socket_path_for`]).
//!
//! The child runs in its own process group (a Ctrl-C at the node's terminal does not reach it),
//! is restarted by a supervisor task if it dies, and is stopped (SIGTERM, SIGKILL after
//! [`STOP_DEADLINE`]) by [`Containerd::shutdown`] or on drop. Running jobs survive a restart
//! of containerd or of the node: their shims keep running. A node that was killed finds its
//! containerd still running on start-up and adopts it (pid file + a Version call).

use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::tonic::transport::Channel;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::ExecError;

/// How long [`Containerd::spawn`] waits for a new containerd to answer.
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a stopping containerd gets after SIGTERM before it is killed.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Plugins the node's own containerd does not load (CRI would want CNI and slows start-up;
/// the other snapshotters are not used).
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];

/// A connection to containerd, and the containerd process itself when the node owns it.
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    owned: Option<Owned>,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("socket", &self.socket)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

/// The process of a containerd the node owns.
enum Proc {
    /// Started by this process.
    Child(Child),
    /// Started by an earlier process of the node (found through the pid file).
    Adopted(Pid),
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Self::Child(c) => c.id(),
            Self::Adopted(p) => p.as_raw().unsigned_abs(),
        }
    }

    /// Whether the process has exited (reaping it if it is our child).
    fn exited(&mut self) -> bool {
        match self {
            Self::Child(c) => !matches!(c.try_wait(), Ok(None)),
            Self::Adopted(p) => !pid_alive(*p),
        }
    }

    /// SIGTERM, wait up to `deadline`, then SIGKILL and wait.
    fn stop(&mut self, deadline: Duration) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).unwrap_or(i32::MAX));
        if self.exited() {
            return;
        }
        let _ = kill(pid, Signal::SIGTERM);
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(pid = pid.as_raw(), "containerd did not stop after SIGTERM; killing it");
        let _ = kill(pid, Signal::SIGKILL);
        match self {
            Self::Child(c) => {
                let _ = c.wait();
            }
            Self::Adopted(p) => {
                let until = Instant::now() + Duration::from_secs(5);
                while pid_alive(*p) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// What the node needs to (re)start and stop its own containerd.
struct Owned {
    proc: Arc<Mutex<Option<Proc>>>,
    files: Files,
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

/// The files of an owned containerd.
#[derive(Clone, Debug)]
struct Files {
    config: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
    socket: PathBuf,
}

fn lock(m: &Mutex<Option<Proc>>) -> MutexGuard<'_, Option<Proc>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn pid_alive(pid: Pid) -> bool {
    // A zombie still answers kill(0); treat it as gone.
    if kill(pid, None).is_err() {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state =
                stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            state != Some('Z')
        }
        Err(_) => false,
    }
}

/// The gRPC socket of the containerd owned by the node with this data directory:
/// `DATA_DIR/containerd/containerd.sock`, or `/run/kaapana-node-<hash>/containerd.sock` when
/// that path (plus containerd's `.ttrpc` suffix) exceeds the 107-byte limit of Unix sockets.
pub fn socket_path_for(data_dir: &Path) -> PathBuf {
    let dir = data_dir.join("containerd");
    let sock = dir.join("containerd.sock");
    if sock.as_os_str().len() + ".ttrpc".len() <= 107 {
        return sock;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_encoded_bytes());
    let hash = kaapana_protocol::hex(&digest.as_ref()[..8]);
    PathBuf::from(format!("/run/kaapana-node-{hash}")).join("containerd.sock")
}

impl Containerd {
    /// Connects to a containerd that runs elsewhere and checks that it answers.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ExecError> {
        let socket = socket.as_ref().to_path_buf();
        let channel = connect_and_check(&socket).await?;
        Ok(Self { channel, socket, owned: None })
    }

    /// Starts (or adopts, after a crash of the node) the node's own containerd under
    /// `data_dir/containerd/`, waits until it answers (at most [`START_DEADLINE`]) and
    /// supervises it: it is restarted if it dies, and stopped on [`shutdown`](Self::shutdown)
    /// or drop.
    pub async fn spawn(data_dir: &Path) -> Result<Self, ExecError> {
        let dir = data_dir.join("containerd");
        let root = dir.join("root");
        let state = dir.join("state");
        for d in [&root, &state] {
            fs::create_dir_all(d).map_err(|e| ExecError::io(d, e))?;
        }
        let socket = socket_path_for(data_dir);
        if let Some(parent) = socket.parent() {
            fs::create_dir_all(parent).map_err(|e| ExecError::io(parent, e))?;
        }
        let files = Files {
            config: dir.join("config.toml"),
            pid_file: dir.join("containerd.pid"),
            log: dir.join("containerd.log"),
            socket: socket.clone(),
        };
        write_config(&files.config, &root, &state, &socket)?;

        // A containerd left running by an earlier node process: adopt it.
        if let Some(pid) = read_pid(&files.pid_file).filter(|p| pid_alive(*p)) {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains(&*files.config.to_string_lossy());
            if ours {
                let channel = wait_until_answering(&socket, START_DEADLINE, || pid_alive(pid))
                    .await
                    .map_err(|detail| ExecError::Unavailable {
                        socket: socket.clone(),
                        detail: format!(
                            "containerd pid {pid} from an earlier run of this node is still \
                             running but does not answer ({detail}); stop it and start again"
                        ),
                    })?;
                tracing::info!(pid = pid.as_raw(), "adopted the node's running containerd");
                return Ok(Self::owned(channel, files, Proc::Adopted(pid)));
            }
        }

        let child = start_child(&files)?;
        let proc = Arc::new(Mutex::new(Some(Proc::Child(child))));
        let alive = {
            let proc = Arc::clone(&proc);
            move || lock(&proc).as_mut().is_some_and(|p| !p.exited())
        };
        match wait_until_answering(&socket, START_DEADLINE, alive).await {
            Ok(channel) => {
                let proc = lock(&proc).take();
                match proc {
                    Some(p) => Ok(Self::owned(channel, files, p)),
                    None => Err(ExecError::Unavailable { socket, detail: "lost".into() }),
                }
            }
            Err(detail) => {
                if let Some(mut p) = lock(&proc).take() {
                    p.stop(Duration::from_secs(2));
                }
                let _ = fs::remove_file(&files.pid_file);
                Err(ExecError::Unavailable {
                    socket,
                    detail: format!(
                        "the node's containerd did not come up ({detail}); see {} \
                         (is `containerd` installed? `apt-get install containerd runc`)",
                        files.log.display()
                    ),
                })
            }
        }
    }

    fn owned(channel: Channel, files: Files, proc: Proc) -> Self {
        let proc = Arc::new(Mutex::new(Some(proc)));
        let supervisor = tokio::spawn(supervise(Arc::clone(&proc), files.clone()));
        Self {
            channel,
            socket: files.socket.clone(),
            owned: Some(Owned { proc, files, supervisor: Some(supervisor) }),
        }
    }

    /// A gRPC channel to containerd (cheap to clone; reconnects by itself).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The socket containerd listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pid of the containerd process the node owns (`None` for a connected one).
    pub fn pid(&self) -> Option<u32> {
        let owned = self.owned.as_ref()?;
        lock(&owned.proc).as_ref().map(Proc::pid)
    }

    /// containerd's version (the Version service).
    pub async fn version(&self) -> Result<String, ExecError> {
        version(self.channel())
            .await
            .map_err(|detail| ExecError::Containerd { op: "Version.Version", detail })
    }

    /// Stops the containerd the node owns (SIGTERM, SIGKILL after [`STOP_DEADLINE`]) and
    /// waits for it; a connected containerd is left alone.
    pub async fn shutdown(mut self) {
        if let Some(owned) = self.owned.take() {
            let _ = tokio::task::spawn_blocking(move || owned.stop()).await;
        }
    }
}

impl Owned {
    fn stop(mut self) {
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
        if let Some(mut p) = lock(&self.proc).take() {
            p.stop(STOP_DEADLINE);
        }
        let _ = fs::remove_file(&self.files.pid_file);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(owned) = self.owned.take() {
            owned.stop();
        }
    }
}

/// Restarts the owned containerd when it dies (at most 5 times in 5 minutes).
async fn supervise(proc: Arc<Mutex<Option<Proc>>>, files: Files) {
    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut guard = lock(&proc);
        let Some(p) = guard.as_mut() else { return };
        if !p.exited() {
            continue;
        }
        restarts.retain(|t| t.elapsed() < Duration::from_secs(300));
        if restarts.len() >= 5 {
            tracing::error!(
                log = %files.log.display(),
                "the node's containerd keeps dying; not restarting it again"
            );
            *guard = None;
            return;
        }
        restarts.push(Instant::now());
        tracing::warn!(log = %files.log.display(), "the node's containerd died; restarting it");
        match start_child(&files) {
            Ok(child) => *guard = Some(Proc::Child(child)),
            Err(e) => tracing::error!("cannot restart containerd: {e}"),
        }
    }
}

fn read_pid(path: &Path) -> Option<Pid> {
    let text = fs::read_to_string(path).ok()?;
    text.trim().parse::<i32>().ok().filter(|p| *p > 0).map(Pid::from_raw)
}

fn write_config(path: &Path, root: &Path, state: &Path, socket: &Path) -> Result<(), ExecError> {
    let mut cfg = toml::Table::new();
    cfg.insert("version".into(), toml::Value::Integer(2));
    cfg.insert("root".into(), root.to_string_lossy().into_owned().into());
    cfg.insert("state".into(), state.to_string_lossy().into_owned().into());
    cfg.insert(
        "disabled_plugins".into(),
        toml::Value::Array(DISABLED_PLUGINS.iter().map(|p| (*p).into()).collect()),
    );
    let mut grpc = toml::Table::new();
    grpc.insert("address".into(), socket.to_string_lossy().into_owned().into());
    cfg.insert("grpc".into(), grpc.into());
    let mut ttrpc = toml::Table::new();
    ttrpc.insert("address".into(), format!("{}.ttrpc", socket.display()).into());
    cfg.insert("ttrpc".into(), ttrpc.into());
    let text = format!(
        "# Written by kaapana-node for its own containerd; rewritten at every start.\n{}",
        toml::to_string(&cfg).map_err(|e| ExecError::BadJob { detail: e.to_string() })?
    );
    fs::write(path, text).map_err(|e| ExecError::io(path, e))
}

fn start_child(files: &Files) -> Result<Child, ExecError> {
    // A socket file left by a containerd that died would make the new one fail to listen.
    for s in [files.socket.clone(), PathBuf::from(format!("{}.ttrpc", files.socket.display()))] {
        let _ = fs::remove_file(s);
    }
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)
        .map_err(|e| ExecError::io(&files.log, e))?;
    let _ = writeln!(log, "--- kaapana-node starts containerd ---");
    let err_log = log.try_clone().map_err(|e| ExecError::io(&files.log, e))?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&files.config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .process_group(0)
        .spawn()
        .map_err(|e| ExecError::Unavailable {
            socket: files.socket.clone(),
            detail: format!(
                "cannot start `containerd`: {e} (install it with `apt-get install containerd \
                 runc`, or set containerd.address to a running containerd)"
            ),
        })?;
    fs::write(&files.pid_file, format!("{}\n", child.id()))
        .map_err(|e| ExecError::io(&files.pid_file, e))?;
    Ok(child)
}

async fn version(channel: Channel) -> Result<String, String> {
    let resp = VersionClient::new(channel)
        .version(())
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().version)
}

async fn connect_and_check(socket: &Path) -> Result<Channel, ExecError> {
    let unavailable = |detail: String| ExecError::Unavailable { socket: socket.into(), detail };
    let channel =
        containerd_client::connect(socket).await.map_err(|e| unavailable(e.to_string()))?;
    version(channel.clone()).await.map_err(unavailable)?;
    Ok(channel)
}

/// Polls the socket until containerd answers a Version call, `alive()` turns false, or the
/// deadline passes.
async fn wait_until_answering(
    socket: &Path,
    deadline: Duration,
    alive: impl Fn() -> bool,
) -> Result<Channel, String> {
    let until = Instant::now() + deadline;
    let mut last = String::from("no answer yet");
    loop {
        if socket.exists() {
            match connect_and_check(socket).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        if !alive() {
            return Err(format!("the process exited; last error: {last}"));
        }
        if Instant::now() >= until {
            return Err(format!("no answer within {deadline:?}; last error: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
