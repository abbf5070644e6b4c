//! A private containerd per test, a busybox test image built at test time, and inventories of
//! what the node left in containerd (for the "no leftovers" checks).
//!
//! Needs root and Debian's `containerd`, `runc` and `busybox-static` (`scripts/test` installs
//! them). The containerd runs on a socket in a temporary folder, never the system one, and
//! goes away in `Drop` even when the test fails: its tasks are killed and deleted, its
//! containers and snapshots removed, the process stopped and stray mounts detached.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    ListSnapshotsRequest, RemoveSnapshotRequest, snapshots_client::SnapshotsClient,
};
use containerd_client::services::v1::{
    DeleteContainerRequest, DeleteTaskRequest, KillRequest, ListContainersRequest,
    ListTasksRequest, containers_client::ContainersClient, tasks_client::TasksClient,
};
use containerd_client::tonic::Request;
use containerd_client::tonic::transport::Channel;
use kaapana_node::executor::{Containerd, ContainerdExecutor, ExecutorConfig, JobRun, JobWork};
use kaapana_protocol::{ImageDigest, JobId, ResourceLimits, Sha256Digest};
use tempfile::TempDir;

/// The namespace the tests' executors use.
pub const NAMESPACE: &str = "kaapana-node";
const SNAPSHOTTER: &str = "overlayfs";

/// An OCI image layout tarball built by [`build_busybox_image`].
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The tarball.
    pub tar: PathBuf,
    /// Its manifest digest.
    pub digest: ImageDigest,
}

fn digest_of(bytes: &[u8]) -> String {
    Sha256Digest::of(bytes).to_string()
}

/// Builds an OCI image layout tarball in `dir` from Debian's static busybox: one layer
/// (`/bin/busybox`, applet symlinks, `/etc/passwd`, `/tmp`), gzip-compressed if `gzip`.
/// `tag` goes into the image's files, so different tags give different digests. (The image
/// is the library's [`kaapana_node::executor::busybox::build_image`], which the demo uses.)
pub fn build_busybox_image(dir: &Path, tag: &str, gzip: bool) -> TestImage {
    let (tar, digest) = kaapana_node::executor::busybox::build_image(dir, tag, gzip)
        .unwrap_or_else(|e| panic!("cannot build the busybox image: {e}"));
    TestImage { tar, digest }
}

/// A new random job id.
pub fn job_id() -> JobId {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    JobId::from_bytes(b)
}

/// What the node's namespace holds of jobs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Container ids.
    pub containers: Vec<String>,
    /// Task (container) ids.
    pub tasks: Vec<String>,
    /// Snapshots by name with their kind (`Committed` ones are image layers).
    pub snapshots: BTreeMap<String, String>,
}

impl Inventory {
    /// Snapshots other than committed image layers (job root filesystems, extractions).
    pub fn active_snapshots(&self) -> Vec<&String> {
        self.snapshots.iter().filter(|(_, k)| k.as_str() != "Committed").map(|(n, _)| n).collect()
    }
}

/// A request in the tests' namespace.
pub fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("containerd-namespace", NAMESPACE.parse().unwrap());
    r
}

/// Lists containers, tasks and snapshots in the namespace.
pub async fn inventory(channel: Channel) -> Inventory {
    let containers = ContainersClient::new(channel.clone())
        .list(req(ListContainersRequest { filters: vec![] }))
        .await
        .unwrap()
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    let tasks = TasksClient::new(channel.clone())
        .list(req(ListTasksRequest { filter: String::new() }))
        .await
        .unwrap()
        .into_inner()
        .tasks
        .into_iter()
        // containerd 1.6 fills in `id` only.
        .map(|t| if t.container_id.is_empty() { t.id } else { t.container_id })
        .collect();
    let mut snapshots = BTreeMap::new();
    let mut stream = SnapshotsClient::new(channel)
        .list(req(ListSnapshotsRequest { snapshotter: SNAPSHOTTER.into(), filters: vec![] }))
        .await
        .unwrap()
        .into_inner();
    while let Some(msg) = stream.message().await.unwrap() {
        for info in msg.info {
            let kind = containerd_client::services::v1::snapshots::Kind::try_from(info.kind)
                .map(|k| format!("{k:?}"))
                .unwrap_or_else(|_| info.kind.to_string());
            snapshots.insert(info.name, kind);
        }
    }
    Inventory { containers, tasks, snapshots }
}

/// Kills and deletes every task, container and non-committed snapshot in the namespace.
async fn purge(channel: Channel) {
    let inv = inventory(channel.clone()).await;
    let mut tasks = TasksClient::new(channel.clone());
    for t in &inv.tasks {
        let _ = tasks
            .kill(req(KillRequest {
                container_id: t.clone(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            }))
            .await;
    }
    for t in &inv.tasks {
        for _ in 0..50 {
            if tasks.delete(req(DeleteTaskRequest { container_id: t.clone() })).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut snaps = SnapshotsClient::new(channel.clone());
    for s in inv.active_snapshots() {
        let _ = snaps
            .remove(req(RemoveSnapshotRequest { snapshotter: SNAPSHOTTER.into(), key: s.clone() }))
            .await;
    }
    let mut containers = ContainersClient::new(channel);
    for c in &inv.containers {
        let _ = containers.delete(req(DeleteContainerRequest { id: c.clone() })).await;
    }
}

/// A containerd of the test's own, under a temporary folder.
#[derive(Debug)]
pub struct TestContainerd {
    /// Its data folder (`containerd/` inside is containerd's; the rest is free for the test).
    pub dir: TempDir,
    containerd: Option<Containerd>,
}

impl TestContainerd {
    /// Starts one (through [`Containerd::spawn`]).
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("kn-ctd-").tempdir().unwrap();
        let containerd = Containerd::spawn(dir.path()).await.unwrap();
        Self { dir, containerd: Some(containerd) }
    }

    /// The containerd.
    pub fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().unwrap()
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        self.containerd().channel()
    }

    /// A new executor on it (scratch files under the test's folder).
    pub async fn executor(&self) -> ContainerdExecutor {
        let config = ExecutorConfig {
            scratch_dir: self.dir.path().join("scratch"),
            ..ExecutorConfig::default()
        };
        ContainerdExecutor::new(self.channel(), config).await.unwrap()
    }

    /// Builds the busybox image (plain layer) in the test's folder and imports it.
    pub async fn busybox(&self, exec: &ContainerdExecutor) -> ImageDigest {
        let image = build_busybox_image(self.dir.path(), "busybox", false);
        let digest = exec.import_image(&image.tar).await.unwrap();
        assert_eq!(digest, image.digest);
        digest
    }

    /// A job running `sh -c SCRIPT` with fresh `/output` and log under `name/`.
    pub fn job(&self, name: &str, image: ImageDigest, script: &str) -> JobRun {
        let base = self.dir.path().join(name);
        let output = base.join("output");
        std::fs::create_dir_all(&output).unwrap();
        JobRun {
            job_id: job_id(),
            work: JobWork::Container {
                image,
                command: vec!["sh".into(), "-c".into(), script.into()],
                env: vec![],
            },
            input: None,
            upstream: vec![],
            output,
            log: base.join("job.log"),
            limits: ResourceLimits { cpu_millis: 1000, memory_bytes: 256 << 20, gpus: 0 },
            timeout: Duration::from_secs(30),
        }
    }

    /// What the namespace holds.
    pub async fn inventory(&self) -> Inventory {
        inventory(self.channel()).await
    }

    /// Asserts that no container, task or job snapshot is left in the namespace.
    pub async fn assert_clean(&self) {
        let inv = self.inventory().await;
        assert!(inv.containers.is_empty(), "containers left: {inv:?}");
        assert!(inv.tasks.is_empty(), "tasks left: {inv:?}");
        assert!(inv.active_snapshots().is_empty(), "snapshots left: {inv:?}");
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        let Some(containerd) = self.containerd.take() else { return };
        let socket = containerd.socket().to_path_buf();
        // Purge on a runtime of its own (Drop may run inside the test's runtime).
        let purged = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let work = async {
                    let channel = containerd_client::connect(&socket).await.ok()?;
                    purge(channel).await;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), work).await;
            });
        })
        .join();
        if purged.is_err() {
            eprintln!("purging the test containerd failed");
        }
        drop(containerd); // SIGTERM, wait (SIGKILL after a deadline)
        // Mounts a killed shim may have left under the folder.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
            .collect();
        points.reverse();
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A private OCI registry on loopback: Debian's `docker-registry` (distribution 2.x) as a
/// child process, with filesystem storage in a temporary folder; stopped in `Drop`.
#[derive(Debug)]
pub struct TestRegistry {
    /// Its storage and config.
    pub dir: TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    child: std::process::Child,
    agent: ureq::Agent,
}

impl TestRegistry {
    /// Starts one and waits until it answers `GET /v2/`.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("kn-registry-").tempdir().unwrap();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", super::free_port());
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n",
                    dir.path().join("storage").display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = std::process::Command::new("/usr/bin/docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("/usr/bin/docker-registry is missing: apt-get install docker-registry");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // e.g. the port was taken meanwhile: try another
                }
                let up = agent
                    .get(format!("http://{addr}/v2/"))
                    .call()
                    .is_ok_and(|r| r.status().as_u16() == 200);
                if up {
                    return Self { dir, addr, child, agent };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        panic!("docker-registry did not start: {log}");
    }

    /// `127.0.0.1:<port>/<name>`: what [`ContainerdExecutor::pull_image`] takes.
    pub fn repository(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }

    /// Uploads a blob (monolithic: POST then PUT with the digest); returns its digest.
    pub fn push_blob(&self, repository: &str, data: &[u8]) -> String {
        let digest = digest_of(data);
        let start = self
            .agent
            .post(format!("http://{}/v2/{repository}/blobs/uploads/", self.addr))
            .header("Content-Length", "0")
            .send_empty()
            .unwrap();
        assert_eq!(start.status().as_u16(), 202, "blob upload start");
        let location = start.headers().get("location").unwrap().to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("http://{}{location}", self.addr)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = self
            .agent
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .send(data)
            .unwrap();
        assert_eq!(done.status().as_u16(), 201, "blob upload of {digest}");
        digest
    }

    /// Uploads a manifest or index under its digest (no tag); returns the digest.
    pub fn push_manifest(&self, repository: &str, data: &[u8], media_type: &str) -> String {
        let digest = digest_of(data);
        let mut r = self
            .agent
            .put(format!("http://{}/v2/{repository}/manifests/{digest}", self.addr))
            .header("Content-Type", media_type)
            .send(data)
            .unwrap();
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 201, "manifest upload of {digest}: {body}");
        digest
    }

    /// Pushes every image of an OCI layout tarball (e.g. from [`build_busybox_image`]): its
    /// config and layers, then its manifest by digest. Returns the manifest digests of
    /// `index.json`.
    pub fn push_layout(&self, tar: &Path, repository: &str) -> Vec<ImageDigest> {
        let blobs = layout_blobs(tar);
        let index: serde_json::Value =
            serde_json::from_slice(&blobs["index.json"]).expect("index.json");
        let mut pushed = Vec::new();
        for m in index["manifests"].as_array().unwrap() {
            let digest = m["digest"].as_str().unwrap();
            let media_type = m["mediaType"].as_str().unwrap();
            let manifest = &blobs[digest];
            let parsed: serde_json::Value = serde_json::from_slice(manifest).unwrap();
            let config = parsed["config"]["digest"].as_str().unwrap();
            self.push_blob(repository, &blobs[config]);
            for layer in parsed["layers"].as_array().unwrap() {
                self.push_blob(repository, &blobs[layer["digest"].as_str().unwrap()]);
            }
            self.push_manifest(repository, manifest, media_type);
            pushed.push(ImageDigest::parse(digest).unwrap());
        }
        pushed
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The files of an OCI layout tarball: `index.json` by name, blobs by digest (`sha256:…`).
pub fn layout_blobs(tar: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(std::fs::File::open(tar).unwrap());
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        let key = match path.strip_prefix("blobs/sha256/") {
            Some(hex) => format!("sha256:{hex}"),
            None => path,
        };
        out.insert(key, data);
    }
    out
}
