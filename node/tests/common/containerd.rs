//! A private containerd per test, a busybox test image built at test time, and inventories of
//! what the node left in containerd (for the "no leftovers" checks).
//!
//! Needs root and Debian's `containerd`, `runc` and `busybox-static` (`scripts/test` installs
//! them). The containerd runs on a socket in a temporary folder, never the system one, and
//! goes away in `Drop` even when the test fails: its tasks are killed and deleted, its
//! containers and snapshots removed, the process stopped and stray mounts detached.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write as _;
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
use kaapana_node::executor::{Containerd, ContainerdExecutor, ExecutorConfig, JobRun};
use kaapana_protocol::{ImageDigest, JobId, ResourceLimits, Sha256Digest};
use serde_json::json;
use tempfile::TempDir;

/// The namespace the tests' executors use.
pub const NAMESPACE: &str = "kaapana-node";
const SNAPSHOTTER: &str = "overlayfs";

/// busybox applets the test image links to `/bin/busybox`.
const APPLETS: &[&str] = &[
    "sh",
    "sha256sum",
    "cat",
    "ls",
    "nc",
    "sleep",
    "head",
    "dd",
    "tr",
    "echo",
    "ip",
    "awk",
    "true",
    "false",
    "wc",
    "id",
    "mkdir",
    "env",
    "sed",
    "grep",
    "printf",
    "test",
    "yes",
    "touch",
    "hostname",
];

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

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data).unwrap();
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn add_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// Builds an OCI image layout tarball in `dir` from Debian's static busybox: one layer
/// (`/bin/busybox`, applet symlinks, `/etc/passwd`, `/tmp`), gzip-compressed if `gzip`.
/// `tag` goes into the image's files, so different tags give different digests.
pub fn build_busybox_image(dir: &Path, tag: &str, gzip: bool) -> TestImage {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox is missing: apt-get install busybox-static");
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "etc"] {
        add_dir(&mut layer, d, 0o755);
    }
    add_dir(&mut layer, "tmp", 0o1777);
    add_file(&mut layer, "bin/busybox", 0o755, &busybox);
    for a in APPLETS {
        add_symlink(&mut layer, &format!("bin/{a}"), "busybox");
    }
    add_file(&mut layer, "etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    add_file(&mut layer, "etc/image-tag", 0o644, tag.as_bytes());
    let layer = layer.into_inner().unwrap();
    let diff_id = digest_of(&layer);
    let (layer_blob, layer_type) = if gzip {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer).unwrap();
        (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        (layer, "application/vnd.oci.image.layer.v1.tar")
    };

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest_of(&config),
            "size": config.len(),
        },
        "layers": [{"mediaType": layer_type, "digest": digest_of(&layer_blob), "size": layer_blob.len()}],
    }))
    .unwrap();
    let manifest_digest = digest_of(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))
    .unwrap();

    let mut outer = tar::Builder::new(Vec::new());
    add_file(&mut outer, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    add_file(&mut outer, "index.json", 0o644, &index);
    add_dir(&mut outer, "blobs", 0o755);
    add_dir(&mut outer, "blobs/sha256", 0o755);
    for blob in [&layer_blob, &config, &manifest] {
        let name = format!("blobs/sha256/{}", Sha256Digest::of(blob).hex());
        add_file(&mut outer, &name, 0o644, blob);
    }
    let tar = dir.join(format!("{tag}{}.oci.tar", if gzip { "-gz" } else { "" }));
    std::fs::write(&tar, outer.into_inner().unwrap()).unwrap();
    TestImage { tar, digest: ImageDigest::parse(&manifest_digest).unwrap() }
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
            image,
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
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
