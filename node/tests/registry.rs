//! Pulling images by digest from an OCI registry into containerd: against a real registry on
//! loopback (Debian's `docker-registry`, a child process per test) and a private containerd
//! per test; a tiny in-test HTTP server plays a registry that serves wrong bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::containerd::{TestContainerd, TestRegistry, build_busybox_image, layout_blobs};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{InfoRequest, ListContentRequest, ListStatusesRequest};
use kaapana_node::executor::{ExecError, Executor};
use kaapana_protocol::{ExitStatus, ImageDigest, Sha256Digest};
use serde_json::json;

const REPO: &str = "kaapana/busybox";

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The OCI architecture of this machine.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Runs `sh -c 'echo ok > /output/x; cat /etc/image-tag'` with `image` and checks it.
async fn run_ok(
    ctd: &TestContainerd,
    exec: &impl Executor,
    name: &str,
    image: ImageDigest,
) -> String {
    let job = ctd.job(name, image, "echo ok > /output/x; cat /etc/image-tag");
    let out = exec.run(job.clone()).await.unwrap();
    assert_eq!(out.exit, ExitStatus::Exited(0), "log: {}", read(&job.log));
    assert_eq!(read(&job.output.join("x")), "ok\n");
    read(&job.log)
}

/// Blobs in containerd's content store, and writes in progress.
async fn content(ctd: &TestContainerd) -> (Vec<String>, Vec<String>) {
    let mut client = ContentClient::new(ctd.channel());
    let mut stream = client
        .list(common::containerd::req(ListContentRequest { filters: vec![] }))
        .await
        .unwrap()
        .into_inner();
    let mut blobs = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        blobs.extend(msg.info.into_iter().map(|i| i.digest));
    }
    blobs.sort();
    let statuses = client
        .list_statuses(common::containerd::req(ListStatusesRequest { filters: vec![] }))
        .await
        .unwrap()
        .into_inner()
        .statuses
        .into_iter()
        .map(|s| s.r#ref)
        .collect();
    (blobs, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest_runs_a_job_and_is_idempotent() {
    let registry = TestRegistry::start();
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = build_busybox_image(ctd.dir.path(), "pulled", true);
    assert_eq!(registry.push_layout(&image.tar, REPO), vec![image.digest]);
    let repo = registry.repository(REPO);

    assert!(!exec.has_image(&image.digest).await.unwrap());
    assert_eq!(exec.pull_image(&repo, &image.digest, true).await.unwrap(), image.digest);
    assert!(exec.has_image(&image.digest).await.unwrap());
    assert_eq!(run_ok(&ctd, &exec, "first", image.digest).await, "pulled");

    // Again: everything is there (nothing is downloaded twice), nothing is added.
    let before = (ctd.inventory().await.snapshots, content(&ctd).await);
    assert_eq!(exec.pull_image(&repo, &image.digest, true).await.unwrap(), image.digest);
    assert_eq!((ctd.inventory().await.snapshots, content(&ctd).await), before);
    assert_eq!(exec.list_images().await.unwrap().len(), 1);
    assert_eq!(run_ok(&ctd, &exec, "second", image.digest).await, "pulled");

    // The same image imported from its tarball is the same image.
    assert_eq!(exec.import_image(&image.tar).await.unwrap(), image.digest);
    assert_eq!(exec.list_images().await.unwrap().len(), 1);
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_of_an_image_index_takes_this_platform() {
    let registry = TestRegistry::start();
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let ours = build_busybox_image(ctd.dir.path(), "this-platform", false);
    let other = build_busybox_image(ctd.dir.path(), "other-platform", false);
    registry.push_layout(&ours.tar, REPO);
    registry.push_layout(&other.tar, REPO);
    let entry = |img: &common::containerd::TestImage, arch: &str| {
        let bytes = &layout_blobs(&img.tar)[&img.digest.to_string()];
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.digest.to_string(),
            "size": bytes.len(),
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let other_arch = if host_arch() == "s390x" { "arm64" } else { "s390x" };
    // The other platform first: the pull must skip it.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&other, other_arch), entry(&ours, host_arch())],
    }))
    .unwrap();
    let index_digest =
        registry.push_manifest(REPO, &index, "application/vnd.oci.image.index.v1+json");
    let index_digest = ImageDigest::parse(&index_digest).unwrap();

    let repo = registry.repository(REPO);
    assert_eq!(exec.pull_image(&repo, &index_digest, true).await.unwrap(), index_digest);
    assert!(exec.has_image(&index_digest).await.unwrap());
    assert!(!exec.has_image(&other.digest).await.unwrap());
    assert_eq!(run_ok(&ctd, &exec, "index", index_digest).await, "this-platform");
    // The other platform's layer was not downloaded.
    let other_layer = {
        let blobs = layout_blobs(&other.tar);
        let m: serde_json::Value =
            serde_json::from_slice(&blobs[&other.digest.to_string()]).unwrap();
        m["layers"][0]["digest"].as_str().unwrap().to_owned()
    };
    assert!(!content(&ctd).await.0.contains(&other_layer));

    // The manifest's own digest works too.
    assert_eq!(exec.pull_image(&repo, &ours.digest, true).await.unwrap(), ours.digest);
    assert_eq!(run_ok(&ctd, &exec, "manifest", ours.digest).await, "this-platform");
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_the_registry_lacks_is_a_clear_error() {
    let registry = TestRegistry::start();
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = build_busybox_image(ctd.dir.path(), "present", false);
    registry.push_layout(&image.tar, REPO);
    let repo = registry.repository(REPO);

    let absent = ImageDigest(Sha256Digest::of(b"no such image"));
    let e = exec.pull_image(&repo, &absent, true).await.unwrap_err();
    assert!(matches!(e, ExecError::ImageNotInRegistry { digest, .. } if digest == absent), "{e:?}");
    assert_eq!(e.to_string(), format!("image {absent} not found in registry {repo}"));

    // A repository the registry does not have at all: the same.
    let e = exec.pull_image(&registry.repository("nobody/nothing"), &image.digest, true).await;
    assert!(matches!(e, Err(ExecError::ImageNotInRegistry { .. })), "{e:?}");

    // Tags are not pulled: the reference names a repository only.
    let e = exec.pull_image(&format!("{repo}:latest"), &image.digest, true).await.unwrap_err();
    assert!(e.to_string().contains("has a tag"), "{e}");
    let e = exec.pull_image(&format!("{repo}@{absent}"), &image.digest, true).await.unwrap_err();
    assert!(e.to_string().contains("has a digest"), "{e}");

    // HTTPS to a plain-HTTP registry: a registry error, not a panic (rustls gets a provider).
    let e = exec.pull_image(&repo, &image.digest, false).await;
    assert!(matches!(e, Err(ExecError::Registry { .. })), "{e:?}");

    // Nothing of the failed pulls is left.
    assert!(exec.list_images().await.unwrap().is_empty());
    assert_eq!(content(&ctd).await, (vec![], vec![]));
    assert!(ctd.inventory().await.snapshots.is_empty());
    ctd.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_serving_wrong_bytes_is_refused() {
    let ctd = TestContainerd::start().await;
    let exec = ctd.executor().await;
    let image = build_busybox_image(ctd.dir.path(), "genuine", false);
    let blobs = layout_blobs(&image.tar);
    let manifest = &blobs[&image.digest.to_string()];
    let parsed: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    let config = parsed["config"]["digest"].as_str().unwrap().to_owned();
    let layer = parsed["layers"][0]["digest"].as_str().unwrap().to_owned();
    let other = build_busybox_image(ctd.dir.path(), "impostor", false);
    let other_manifest = layout_blobs(&other.tar)[&other.digest.to_string()].clone();

    let manifest_path = |repo: &str| format!("/v2/{repo}/manifests/{}", image.digest);
    let blob_path = |repo: &str, d: &str| format!("/v2/{repo}/blobs/{d}");
    let mut tampered_layer = blobs[&layer].clone();
    let middle = tampered_layer.len() / 2;
    tampered_layer[middle] ^= 0x20;
    let routes = BTreeMap::from([
        // "swapped": another image's manifest under this digest.
        (manifest_path("swapped"), other_manifest),
        // "tampered": the right manifest and config, a layer with one bit flipped.
        (manifest_path("tampered"), manifest.clone()),
        (blob_path("tampered", &config), blobs[&config].clone()),
        (blob_path("tampered", &layer), tampered_layer),
        // "incomplete": the layer is missing.
        (manifest_path("incomplete"), manifest.clone()),
        (blob_path("incomplete", &config), blobs[&config].clone()),
    ]);
    let server = FakeRegistry::start(routes);

    let e = exec.pull_image(&server.repository("swapped"), &image.digest, true).await.unwrap_err();
    match &e {
        ExecError::DigestMismatch { what, expected, actual, .. } => {
            assert_eq!(what, "manifest");
            assert_eq!(expected, &image.digest.to_string());
            assert_eq!(actual, &other.digest.to_string());
        }
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().starts_with("digest mismatch: refused the manifest"), "{e}");

    let e = exec.pull_image(&server.repository("tampered"), &image.digest, true).await.unwrap_err();
    match &e {
        ExecError::DigestMismatch { what, expected, .. } => {
            assert_eq!(what, &format!("blob {layer}"));
            assert_eq!(expected, &layer);
        }
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("digest mismatch"), "{e}");

    let e = exec.pull_image(&server.repository("incomplete"), &image.digest, true).await;
    match e {
        Err(ExecError::Registry { detail, .. }) => {
            assert_eq!(
                detail,
                format!("blob {layer} of image {} is not in the registry", image.digest)
            );
        }
        e => panic!("{e:?}"),
    }

    // Nothing of it was kept: no image, no blob, no write in progress, no snapshot.
    assert!(!exec.has_image(&image.digest).await.unwrap());
    assert!(exec.list_images().await.unwrap().is_empty());
    assert_eq!(content(&ctd).await, (vec![], vec![]));
    let info = ContentClient::new(ctd.channel())
        .info(common::containerd::req(InfoRequest { digest: layer.clone() }))
        .await;
    assert!(info.is_err());
    assert!(ctd.inventory().await.snapshots.is_empty());
    ctd.assert_clean().await;
}

/// A registry that serves fixed bytes by path over plain HTTP (`GET /v2/` answers `{}`; all
/// else 404), one request per connection.
struct FakeRegistry {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRegistry {
    fn start(routes: BTreeMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve(conn, &routes);
                }
            }
        });
        Self { addr, stop, thread: Some(thread) }
    }

    fn repository(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }
}

fn serve(mut conn: TcpStream, routes: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (status, body): (&str, &[u8]) = match routes.get(&path) {
        Some(body) => ("200 OK", body),
        None if path == "/v2/" => ("200 OK", b"{}"),
        None => ("404 Not Found", br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}"#),
    };
    let content_type = if path.contains("/manifests/") {
        "application/vnd.oci.image.manifest.v1+json"
    } else if path.contains("/blobs/") && status.starts_with("200") {
        "application/octet-stream"
    } else {
        "application/json"
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    conn.flush()
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
