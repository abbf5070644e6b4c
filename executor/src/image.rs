//! Images in containerd: importing OCI image layout tarballs, listing and resolving images.
//!
//! containerd 1.6 has no Transfer service, so the import is done client-side with the v1
//! services, the way containerd's own client does it:
//!
//! 1. the tarball is indexed once (`oci-layout`, `index.json`, `blobs/sha256/…`; blobs are then
//!    read by seeking, so a large image is read about once);
//! 2. `index.json` → (image index → the manifest for this platform) → manifest → config,
//!    whose `rootfs.diff_ids` give the layers' chain ids;
//! 3. under a lease (`containerd-lease` header; it expires after an hour if the node dies):
//!    `Content.Write` per blob, leaves first, with containerd's GC labels
//!    (`containerd.io/gc.ref.content.m.<i>` on an index, `…gc.ref.content.config` and
//!    `…gc.ref.content.l.<i>` on the manifest, `containerd.io/gc.ref.snapshot.<snapshotter>`
//!    = the top chain id on the config); a blob that exists gets its labels with
//!    `Content.Update` and joins the lease;
//! 4. `Images.Create` (or `Images.Update`) named [`image_name`]`(digest)`;
//! 5. per layer `Snapshots.Prepare` (parent = the previous chain id) → `Diff.Apply` (which also
//!    decompresses gzip and zstd layers) → `Snapshots.Commit` named by the chain id;
//! 6. the lease is deleted (synchronously: containerd's GC runs before the import returns, so
//!    a missing reference shows at once rather than at some later GC).
//!
//! Steps 3-6 (`store`) and the layout of a manifest's blobs and labels (`manifest_blobs`)
//! are shared with the registry pull ([`super::pull`]), whose layers stream from the registry.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, AddResourceRequest, ApplyRequest, CreateImageRequest,
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, GetImageRequest,
    Image, Info as ContentInfo, InfoRequest, ListImagesRequest, Resource, UpdateImageRequest,
    UpdateRequest as ContentUpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor as CdDescriptor;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use kaapana_protocol::{ImageDigest, Sha256Digest, Timestamp};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::ExecError;
use super::api::{Api, err, not_found_ok, quote};
use super::containerd::ContainerdExecutor;

/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI layer, uncompressed tar.
pub const MEDIA_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI layer, gzip-compressed tar.
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Largest JSON blob (index, manifest, config) read into memory.
pub(super) const MAX_JSON_BLOB: u64 = 16 << 20;
/// Bytes per `Content.Write` message.
const WRITE_CHUNK: usize = 1 << 20;

/// The containerd image name under which the node keeps the image with this digest:
/// `kaapana-node.local/image@sha256:…` (a valid reference, so `ctr` can use it too).
pub fn image_name(digest: &ImageDigest) -> String {
    format!("kaapana-node.local/image@{digest}")
}

/// An image in the node's containerd namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// containerd's name for it.
    pub name: String,
    /// The digest of its target (manifest or index).
    pub digest: ImageDigest,
    /// The target's media type.
    pub media_type: String,
    /// The target's size in bytes (of the manifest or index itself).
    pub size: i64,
}

/// Imports an OCI image layout tarball (`oci-layout`, `index.json`, `blobs/sha256/…`; plain
/// tar) into the executor's containerd namespace and unpacks its layers. Idempotent. Returns
/// the digest jobs use to reference it (of the manifest, or of the index if the layout has
/// one; the layers unpacked are those of the manifest for this machine's platform).
pub async fn import_oci_tar(
    exec: &ContainerdExecutor,
    tar: &Path,
) -> Result<ImageDigest, ExecError> {
    import(exec.api(), tar).await
}

/// The images in the executor's containerd namespace.
pub async fn list_images(exec: &ContainerdExecutor) -> Result<Vec<ImageInfo>, ExecError> {
    let resp = exec
        .api()
        .images()
        .list(exec.api().req(ListImagesRequest { filters: vec![] }))
        .await
        .map_err(err("Images.List"))?;
    Ok(resp
        .into_inner()
        .images
        .into_iter()
        .filter_map(|img| {
            let target = img.target?;
            let digest = ImageDigest::parse(&target.digest).ok()?;
            Some(ImageInfo {
                name: img.name,
                digest,
                media_type: target.media_type,
                size: target.size,
            })
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// OCI JSON

#[derive(Clone, Debug, Deserialize)]
pub(super) struct OciDescriptor {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: i64,
    #[serde(default)]
    pub(super) annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) platform: Option<OciPlatform>,
}

#[derive(Clone, Debug, Deserialize)]
pub(super) struct OciPlatform {
    #[serde(default)]
    pub(super) architecture: String,
    #[serde(default)]
    pub(super) os: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct OciIndex {
    #[serde(default)]
    pub(super) manifests: Vec<OciDescriptor>,
}

#[derive(Debug, Deserialize)]
pub(super) struct OciManifest {
    pub(super) config: OciDescriptor,
    #[serde(default)]
    pub(super) layers: Vec<OciDescriptor>,
}

#[derive(Debug, Deserialize)]
struct OciLayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

#[derive(Debug, Deserialize)]
struct OciConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The parts of an image config that shape a job's process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "Entrypoint", default)]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub(crate) cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub(crate) env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub(crate) working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub(crate) user: Option<String>,
}

pub(super) fn bad(detail: impl Into<String>) -> ExecError {
    ExecError::BadImage { detail: detail.into() }
}

pub(super) fn parse_json<'a, T: Deserialize<'a>>(
    what: &str,
    bytes: &'a [u8],
) -> Result<T, ExecError> {
    serde_json::from_slice(bytes).map_err(|e| bad(format!("{what} is not valid: {e}")))
}

pub(super) fn check_digest(d: &str) -> Result<Sha256Digest, ExecError> {
    Sha256Digest::parse(d).map_err(|_| bad(format!("unsupported digest {d:?} (only sha256)")))
}

/// The OCI architecture name of this machine.
pub(super) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

pub(super) fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

pub(super) fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

/// The chain ids of layers with these diff ids (OCI image spec: `ChainID(L0) = DiffID(L0)`,
/// `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`).
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => Sha256Digest::of(format!("{prev} {d}").as_bytes()).to_string(),
        };
        out.push(next);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The tarball

/// Where each regular file of a tarball lies.
#[derive(Debug)]
struct TarIndex {
    path: PathBuf,
    files: HashMap<String, (u64, u64)>,
}

fn normalize(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

fn scan_tar(path: &Path) -> Result<TarIndex, ExecError> {
    let io = |e| ExecError::io(path, e);
    let file = std::fs::File::open(path).map_err(io)?;
    let mut archive = tar::Archive::new(file);
    let mut files = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    for entry in archive.entries_with_seek().map_err(io)? {
        let entry =
            entry.map_err(|e| bad(format!("{} is not a readable tar: {e}", path.display())))?;
        let name = normalize(&entry.path().map_err(io)?);
        let kind = entry.header().entry_type();
        if kind.is_file() {
            files.insert(name, (entry.raw_file_position(), entry.size()));
        } else if (kind.is_hard_link() || kind.is_symlink())
            && let Some(target) = entry.link_name().map_err(io)?
        {
            let target = if kind.is_symlink() {
                Path::new(&name).parent().unwrap_or(Path::new("")).join(target)
            } else {
                target.into_owned()
            };
            links.push((name, normalize(&target)));
        }
    }
    for (name, target) in links {
        if let Some(pos) = files.get(&target).copied() {
            files.insert(name, pos);
        }
    }
    Ok(TarIndex { path: path.to_path_buf(), files })
}

impl TarIndex {
    fn blob_path(digest: &Sha256Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    fn locate(&self, desc: &OciDescriptor) -> Result<(u64, u64), ExecError> {
        let digest = check_digest(&desc.digest)?;
        let (offset, size) = *self
            .files
            .get(&Self::blob_path(&digest))
            .ok_or_else(|| bad(format!("blob {} is missing from the tarball", desc.digest)))?;
        if i64::try_from(size).ok() != Some(desc.size) {
            return Err(bad(format!(
                "blob {} has {size} bytes, its descriptor says {}",
                desc.digest, desc.size
            )));
        }
        Ok((offset, size))
    }

    fn read_file(&self, offset: u64, size: u64) -> Result<Vec<u8>, ExecError> {
        if size > MAX_JSON_BLOB {
            return Err(bad(format!("a metadata file of {size} bytes is too large")));
        }
        let io = |e| ExecError::io(&self.path, e);
        let mut f = std::fs::File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(usize::MAX)];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    fn read_named(&self, name: &str) -> Result<Option<Vec<u8>>, ExecError> {
        match self.files.get(name) {
            Some(&(offset, size)) => self.read_file(offset, size).map(Some),
            None => Ok(None),
        }
    }

    /// A small blob, checked against its digest.
    fn read_blob(&self, desc: &OciDescriptor) -> Result<Vec<u8>, ExecError> {
        let (offset, size) = self.locate(desc)?;
        let bytes = self.read_file(offset, size)?;
        if Sha256Digest::of(&bytes).to_string() != desc.digest {
            return Err(bad(format!("blob {} does not match its digest", desc.digest)));
        }
        Ok(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// The import

/// One blob to write, with its labels.
#[derive(Debug)]
pub(super) struct Blob {
    pub(super) desc: OciDescriptor,
    pub(super) data: BlobData,
    pub(super) labels: HashMap<String, String>,
}

/// Where a blob's bytes come from.
#[derive(Debug)]
pub(super) enum BlobData {
    /// In memory (already checked against the digest).
    Bytes(Vec<u8>),
    /// In the tarball at `path`, from `offset` (containerd checks the digest on commit).
    Tar { path: PathBuf, offset: u64 },
    /// From a registry, streamed: checked against the descriptor's size and digest while it
    /// is written, and not committed unless it matches. Skipped if containerd has it.
    Remote(Arc<dyn BlobFetch>),
}

/// A stream of a blob's bytes.
pub(super) type BlobStream = BoxStream<'static, Result<Vec<u8>, ExecError>>;

/// Opens blobs of one image in a registry (see [`BlobData::Remote`]).
pub(super) trait BlobFetch: Send + Sync + std::fmt::Debug {
    /// The registry, for error messages.
    fn registry(&self) -> &str;
    /// Starts the download of the blob `desc`.
    fn fetch(&self, desc: OciDescriptor) -> BoxFuture<'static, Result<BlobStream, ExecError>>;
}

/// An image to store in containerd: its blobs and the layers to unpack.
#[derive(Debug)]
pub(super) struct Plan {
    /// What the image record points at (manifest or index).
    pub(super) target: OciDescriptor,
    /// Leaves first: layers, config, manifest, index.
    pub(super) blobs: Vec<Blob>,
    pub(super) layers: Vec<OciDescriptor>,
    pub(super) diff_ids: Vec<String>,
}

/// The blobs of one image manifest, leaves first (layers, config, manifest), labelled so that
/// containerd's GC keeps the config and layers while the manifest is kept, and the unpacked
/// layers while the config is; and the layers to unpack with their diff ids.
#[derive(Debug)]
pub(super) struct ManifestBlobs {
    pub(super) blobs: Vec<Blob>,
    pub(super) layers: Vec<OciDescriptor>,
    pub(super) diff_ids: Vec<String>,
}

/// Checks a manifest against its config and lays out their blobs ([`ManifestBlobs`]);
/// `layer_data` says where each layer's bytes come from. Shared by the tarball import and the
/// registry pull.
pub(super) fn manifest_blobs(
    manifest_desc: OciDescriptor,
    manifest_bytes: Vec<u8>,
    manifest: OciManifest,
    config_bytes: Vec<u8>,
    snapshotter: &str,
    mut layer_data: impl FnMut(&OciDescriptor) -> Result<BlobData, ExecError>,
) -> Result<ManifestBlobs, ExecError> {
    let config: OciConfigFile = parse_json("the image config", &config_bytes)?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(bad(format!(
            "the config lists {} layers (diff_ids), the manifest {}",
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        )));
    }
    for d in &config.rootfs.diff_ids {
        check_digest(d)?;
    }
    let chains = chain_ids(&config.rootfs.diff_ids);

    let mut blobs = Vec::new();
    let mut manifest_labels = HashMap::new();
    manifest_labels
        .insert("containerd.io/gc.ref.content.config".to_owned(), manifest.config.digest.clone());
    for (i, (layer, diff_id)) in manifest.layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
        let data = layer_data(layer)?;
        let labels = HashMap::from([("containerd.io/uncompressed".to_owned(), diff_id.clone())]);
        blobs.push(Blob { desc: layer.clone(), data, labels });
        manifest_labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), layer.digest.clone());
    }
    let mut config_labels = HashMap::new();
    if let Some(top) = chains.last() {
        config_labels.insert(format!("containerd.io/gc.ref.snapshot.{snapshotter}"), top.clone());
    }
    blobs.push(Blob {
        desc: manifest.config.clone(),
        data: BlobData::Bytes(config_bytes),
        labels: config_labels,
    });
    blobs.push(Blob {
        desc: manifest_desc,
        data: BlobData::Bytes(manifest_bytes),
        labels: manifest_labels,
    });
    Ok(ManifestBlobs { blobs, layers: manifest.layers, diff_ids: config.rootfs.diff_ids })
}

/// The manifest of an image index for this machine (linux and its architecture; no
/// attestation manifests), among those `usable` accepts.
pub(super) fn platform_manifest(
    index: &OciIndex,
    mut usable: impl FnMut(&OciDescriptor) -> bool,
) -> Option<&OciDescriptor> {
    let arch = host_arch();
    index.manifests.iter().find(|m| {
        is_manifest(&m.media_type)
            && !m.annotations.contains_key("vnd.docker.reference.type")
            && m.platform.as_ref().is_none_or(|p| p.os == "linux" && p.architecture == arch)
            && usable(m)
    })
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn plan(index: &TarIndex, snapshotter: &str) -> Result<Plan, ExecError> {
    if let Some(layout) = index.read_named("oci-layout")? {
        let layout: OciLayoutFile = parse_json("oci-layout", &layout)?;
        if !layout.image_layout_version.starts_with("1.") {
            return Err(bad(format!(
                "unsupported OCI layout version {}",
                layout.image_layout_version
            )));
        }
    }
    let top = index.read_named("index.json")?.ok_or_else(|| {
        bad("the tarball has no index.json (is it an OCI image layout, e.g. from `docker save` \
             ≥ 25, `skopeo copy … oci-archive:` or `buildah push … oci-archive:`?)")
    })?;
    let top: OciIndex = parse_json("index.json", &top)?;
    let mut targets: Vec<OciDescriptor> = Vec::new();
    for d in top.manifests {
        if !targets.iter().any(|t| t.digest == d.digest) {
            targets.push(d);
        }
    }
    let target = match targets.len() {
        1 => targets.remove(0),
        0 => return Err(bad("index.json lists no image")),
        n => {
            return Err(bad(format!(
                "index.json lists {n} different images; import a tarball with one image"
            )));
        }
    };

    let mut index_blob = None;
    let manifest_desc = if is_index(&target.media_type) {
        let bytes = index.read_blob(&target)?;
        let inner: OciIndex = parse_json("the image index", &bytes)?;
        let arch = host_arch();
        let mut chosen = None;
        let mut labels = HashMap::new();
        let mut i = 0;
        for m in &inner.manifests {
            if index.locate(m).is_err() {
                continue; // not in this tarball (other platforms)
            }
            labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), m.digest.clone());
            i += 1;
            let attestation = m.annotations.contains_key("vnd.docker.reference.type");
            let fits =
                m.platform.as_ref().is_none_or(|p| p.os == "linux" && p.architecture == arch);
            if chosen.is_none() && is_manifest(&m.media_type) && fits && !attestation {
                chosen = Some(m.clone());
            }
        }
        index_blob = Some(Blob { desc: target.clone(), data: BlobData::Bytes(bytes), labels });
        chosen.ok_or_else(|| bad(format!("the image index has no manifest for linux/{arch}")))?
    } else if is_manifest(&target.media_type) {
        target.clone()
    } else {
        return Err(bad(format!("unsupported media type {:?} in index.json", target.media_type)));
    };

    let manifest_bytes = index.read_blob(&manifest_desc)?;
    let manifest: OciManifest = parse_json("the image manifest", &manifest_bytes)?;
    let config_bytes = index.read_blob(&manifest.config)?;
    let ManifestBlobs { mut blobs, layers, diff_ids } = manifest_blobs(
        manifest_desc,
        manifest_bytes,
        manifest,
        config_bytes,
        snapshotter,
        |layer| {
            let (offset, _) = index.locate(layer)?;
            Ok(BlobData::Tar { path: index.path.clone(), offset })
        },
    )?;
    blobs.extend(index_blob);
    Ok(Plan { target, blobs, layers, diff_ids })
}

fn cd_descriptor(d: &OciDescriptor) -> CdDescriptor {
    CdDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: HashMap::new(),
    }
}

async fn import(api: &Api, tar: &Path) -> Result<ImageDigest, ExecError> {
    let tar_path = tar.to_path_buf();
    let snapshotter = api.snapshotter.clone();
    let plan = tokio::task::spawn_blocking(move || {
        let index = scan_tar(&tar_path)?;
        plan(&index, &snapshotter)
    })
    .await
    .map_err(|e| bad(format!("import task failed: {e}")))??;
    let digest = ImageDigest(check_digest(&plan.target.digest)?);
    let labels = HashMap::from([("kaapana-node/imported".to_owned(), "true".to_owned())]);
    store(api, &plan, &digest, labels).await?;
    Ok(digest)
}

/// Stores an image in containerd under a lease: its blobs, the image record
/// [`image_name`]`(digest)` with `labels`, its layers unpacked; then the lease goes (a
/// synchronous GC). Shared by the tarball import and the registry pull.
pub(super) async fn store(
    api: &Api,
    plan: &Plan,
    digest: &ImageDigest,
    labels: HashMap<String, String>,
) -> Result<(), ExecError> {
    let lease = Lease::create(api).await?;
    let result = store_under_lease(api, &lease.id, plan, digest, labels).await;
    // Deleting the lease runs containerd's GC (sync): what the labels do not hold goes now.
    let released = lease.delete(api).await;
    result?;
    released
}

async fn store_under_lease(
    api: &Api,
    lease: &str,
    plan: &Plan,
    digest: &ImageDigest,
    labels: HashMap<String, String>,
) -> Result<(), ExecError> {
    for blob in &plan.blobs {
        write_blob(api, lease, blob).await?;
    }

    let image = Image {
        name: image_name(digest),
        labels,
        target: Some(cd_descriptor(&plan.target)),
        created_at: None,
        updated_at: None,
    };
    let created = api
        .images()
        .create(api.leased(
            CreateImageRequest { image: Some(image.clone()), source_date_epoch: None },
            lease,
        ))
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            api.images()
                .update(api.leased(
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    },
                    lease,
                ))
                .await
                .map_err(err("Images.Update"))?;
        }
        Err(s) => return Err(err("Images.Create")(s)),
    }

    unpack(api, lease, &plan.layers, &plan.diff_ids).await
}

/// Unpacks the layers into committed snapshots named by their chain ids.
async fn unpack(
    api: &Api,
    lease: &str,
    layers: &[OciDescriptor],
    diff_ids: &[String],
) -> Result<(), ExecError> {
    let chains = chain_ids(diff_ids);
    let snapshotter = api.snapshotter.clone();
    let mut parent = String::new();
    for ((layer, diff_id), chain) in layers.iter().zip(diff_ids).zip(&chains) {
        let stat =
            api.snapshots()
                .stat(api.req(StatSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: chain.clone(),
                }))
                .await;
        if not_found_ok(stat, "Snapshots.Stat")?.is_some() {
            add_to_lease(api, lease, chain, &format!("snapshots/{snapshotter}")).await?;
            parent = chain.clone();
            continue;
        }
        let key = format!("kaapana-node-extract-{}-{chain}", unique_suffix());
        let mounts = api
            .snapshots()
            .prepare(api.leased(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(err("Snapshots.Prepare"))?
            .into_inner()
            .mounts;
        let applied = async {
            let resp = api
                .diff()
                .apply(api.leased(
                    ApplyRequest {
                        diff: Some(cd_descriptor(layer)),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    lease,
                ))
                .await
                .map_err(err("Diff.Apply"))?
                .into_inner();
            let got = resp.applied.map(|d| d.digest).unwrap_or_default();
            if &got != diff_id {
                return Err(bad(format!(
                    "layer {} unpacks to {got}, but the config says {diff_id}",
                    layer.digest
                )));
            }
            let committed = api
                .snapshots()
                .commit(api.leased(
                    CommitSnapshotRequest {
                        snapshotter: snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    lease,
                ))
                .await;
            match committed {
                Ok(_) => Ok(true),
                // Another import committed the same layer meanwhile.
                Err(s) if s.code() == Code::AlreadyExists => Ok(false),
                Err(s) => Err(err("Snapshots.Commit")(s)),
            }
        }
        .await;
        if !matches!(applied, Ok(true)) {
            let _ = api
                .snapshots()
                .remove(api.req(RemoveSnapshotRequest { snapshotter: snapshotter.clone(), key }))
                .await;
        }
        applied?;
        parent = chain.clone();
    }
    Ok(())
}

async fn add_to_lease(api: &Api, lease: &str, id: &str, kind: &str) -> Result<(), ExecError> {
    api.leases()
        .add_resource(api.req(AddResourceRequest {
            id: lease.to_owned(),
            resource: Some(Resource { id: id.to_owned(), r#type: kind.to_owned() }),
        }))
        .await
        .map_err(err("Leases.AddResource"))?;
    Ok(())
}

/// Writes one blob (or, if containerd has it, sets its labels and adds it to the lease).
async fn write_blob(api: &Api, lease: &str, blob: &Blob) -> Result<(), ExecError> {
    if let BlobData::Remote(_) = &blob.data {
        // Download nothing that containerd already has.
        let info =
            api.content().info(api.req(InfoRequest { digest: blob.desc.digest.clone() })).await;
        if not_found_ok(info, "Content.Info")?.is_some() {
            return label_existing(api, lease, blob).await;
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let reference = format!("kaapana-node-import-{}-{}", unique_suffix(), blob.desc.digest);
    let feeder = tokio::spawn(feed(
        tx,
        reference.clone(),
        blob_source(blob),
        blob.desc.clone(),
        blob.labels.clone(),
    ));

    // Content.Write answers only once it has the first message: the feeder runs apart.
    let result = api.content().write(api.leased(requests, lease)).await;
    let outcome = match result {
        Err(s) if s.code() == Code::AlreadyExists => {
            feeder.abort();
            return label_existing(api, lease, blob).await;
        }
        Err(s) => Err(err("Content.Write")(s)),
        Ok(resp) => {
            let mut responses = resp.into_inner();
            let mut committed = false;
            loop {
                match responses.message().await {
                    Ok(Some(r)) if r.action == WriteAction::Commit as i32 => {
                        committed = true;
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(s) if s.code() == Code::AlreadyExists => {
                        feeder.abort();
                        return label_existing(api, lease, blob).await;
                    }
                    Err(s) => return Err(err("Content.Write")(s)),
                }
            }
            if committed {
                Ok(())
            } else {
                Err(ExecError::Containerd {
                    op: "Content.Write",
                    detail: format!("the write of {} ended without a commit", blob.desc.digest),
                })
            }
        }
    };
    match feeder.await {
        Ok(Ok(())) => outcome,
        // The feeder's error is the cause (the write then ended without a commit): report it
        // and drop what containerd received of the blob.
        Ok(Err(e)) => {
            let _ = api.content().abort(api.req(AbortRequest { r#ref: reference })).await;
            Err(e)
        }
        Err(e) => outcome.and(Err(bad(format!("blob writer task failed: {e}")))),
    }
}

#[derive(Debug)]
enum Source {
    Bytes(Vec<u8>),
    Tar(PathBuf, u64),
    Remote(Arc<dyn BlobFetch>),
}

fn blob_source(blob: &Blob) -> Source {
    match &blob.data {
        BlobData::Bytes(b) => Source::Bytes(b.clone()),
        BlobData::Tar { path, offset } => Source::Tar(path.clone(), *offset),
        BlobData::Remote(fetch) => Source::Remote(Arc::clone(fetch)),
    }
}

/// Feeds `Content.Write`: WRITE messages with the data, then COMMIT with the labels.
async fn feed(
    tx: tokio::sync::mpsc::Sender<WriteContentRequest>,
    reference: String,
    source: Source,
    desc: OciDescriptor,
    labels: HashMap<String, String>,
) -> Result<(), ExecError> {
    let msg = |action: WriteAction, offset: i64, data: Vec<u8>| WriteContentRequest {
        action: action as i32,
        r#ref: reference.clone(),
        total: desc.size,
        expected: desc.digest.clone(),
        offset,
        data,
        labels: HashMap::new(),
    };
    // A closed channel means containerd answered (e.g. AlreadyExists): stop quietly.
    let mut offset = 0i64;
    match source {
        Source::Bytes(bytes) => {
            for chunk in bytes.chunks(WRITE_CHUNK) {
                if tx.send(msg(WriteAction::Write, offset, chunk.to_vec())).await.is_err() {
                    return Ok(());
                }
                offset += i64::try_from(chunk.len()).unwrap_or(i64::MAX);
            }
        }
        Source::Tar(tar, start) => {
            let io = |e| ExecError::io(&tar, e);
            let mut f = tokio::fs::File::open(&tar).await.map_err(io)?;
            f.seek(SeekFrom::Start(start)).await.map_err(io)?;
            let mut left = u64::try_from(desc.size).unwrap_or(0);
            while left > 0 {
                let n = usize::try_from(left.min(WRITE_CHUNK as u64)).unwrap_or(WRITE_CHUNK);
                let mut buf = vec![0u8; n];
                f.read_exact(&mut buf).await.map_err(io)?;
                if tx.send(msg(WriteAction::Write, offset, buf)).await.is_err() {
                    return Ok(());
                }
                offset += i64::try_from(n).unwrap_or(i64::MAX);
                left -= n as u64;
            }
        }
        Source::Remote(fetch) => {
            let mut stream = fetch.fetch(desc.clone()).await?;
            let mut check = StreamCheck::new(&desc, fetch.registry());
            let mut buf = Vec::with_capacity(WRITE_CHUNK);
            loop {
                let chunk = match stream.next().await {
                    Some(Ok(chunk)) => chunk,
                    Some(Err(e)) => return Err(check.failed(e)),
                    None => break,
                };
                check.update(&chunk)?;
                buf.extend_from_slice(&chunk);
                while buf.len() >= WRITE_CHUNK {
                    let rest = buf.split_off(WRITE_CHUNK);
                    let data = std::mem::replace(&mut buf, rest);
                    let n = data.len();
                    if tx.send(msg(WriteAction::Write, offset, data)).await.is_err() {
                        return Ok(());
                    }
                    offset += i64::try_from(n).unwrap_or(i64::MAX);
                }
            }
            // Nothing is committed unless size and digest match.
            check.finish()?;
            if !buf.is_empty() {
                let n = buf.len();
                if tx.send(msg(WriteAction::Write, offset, buf)).await.is_err() {
                    return Ok(());
                }
                offset += i64::try_from(n).unwrap_or(i64::MAX);
            }
        }
    }
    let mut commit = msg(WriteAction::Commit, offset, Vec::new());
    commit.labels = labels;
    let _ = tx.send(commit).await;
    Ok(())
}

/// Checks a downloaded blob against its descriptor while it streams: never more bytes than
/// its size, and at the end its size and SHA-256.
pub(super) struct StreamCheck {
    expected: String,
    size: u64,
    received: u64,
    hash: ring::digest::Context,
    registry: String,
}

impl std::fmt::Debug for StreamCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCheck")
            .field("expected", &self.expected)
            .field("size", &self.size)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl StreamCheck {
    /// A check of the blob `desc` from `registry`.
    pub(super) fn new(desc: &OciDescriptor, registry: &str) -> Self {
        Self {
            expected: desc.digest.clone(),
            size: u64::try_from(desc.size).unwrap_or(0),
            received: 0,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            registry: registry.to_owned(),
        }
    }

    /// Takes the next bytes; refuses more than the descriptor's size.
    pub(super) fn update(&mut self, chunk: &[u8]) -> Result<(), ExecError> {
        self.received = self.received.saturating_add(chunk.len() as u64);
        if self.received > self.size {
            return Err(ExecError::Registry {
                registry: self.registry.clone(),
                detail: format!(
                    "blob {} is longer than the {} bytes its descriptor says; refused",
                    self.expected, self.size
                ),
            });
        }
        self.hash.update(chunk);
        Ok(())
    }

    fn mismatch(&self) -> Option<ExecError> {
        let actual = format!("sha256:{}", hex(self.hash.clone().finish().as_ref()));
        (actual != self.expected).then(|| ExecError::DigestMismatch {
            registry: self.registry.clone(),
            what: format!("blob {}", self.expected),
            expected: self.expected.clone(),
            actual,
        })
    }

    /// The download failed with `e`: a digest mismatch if all the bytes came and they do not
    /// match (a verifying client reports that as an I/O error at the end), `e` otherwise.
    pub(super) fn failed(&self, e: ExecError) -> ExecError {
        if self.received == self.size
            && let Some(mismatch) = self.mismatch()
        {
            return mismatch;
        }
        e
    }

    /// The stream ended: checks size and digest.
    pub(super) fn finish(&self) -> Result<(), ExecError> {
        if self.received != self.size {
            return Err(ExecError::Registry {
                registry: self.registry.clone(),
                detail: format!(
                    "blob {} ended after {} of {} bytes",
                    self.expected, self.received, self.size
                ),
            });
        }
        self.mismatch().map_or(Ok(()), Err)
    }
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An existing blob: `Content.Update` of our labels (a commit's labels are not applied when
/// the blob exists), and the blob joins the lease until the image references it.
async fn label_existing(api: &Api, lease: &str, blob: &Blob) -> Result<(), ExecError> {
    add_to_lease(api, lease, &blob.desc.digest, "content").await?;
    if blob.labels.is_empty() {
        return Ok(());
    }
    let paths = blob.labels.keys().map(|k| format!("labels.{k}")).collect();
    api.content()
        .update(api.req(ContentUpdateRequest {
            info: Some(ContentInfo {
                digest: blob.desc.digest.clone(),
                size: 0,
                created_at: None,
                updated_at: None,
                labels: blob.labels.clone(),
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .map_err(err("Content.Update"))?;
    Ok(())
}

/// A lease that holds everything an import creates until the image references it.
#[derive(Debug)]
struct Lease {
    id: String,
}

impl Lease {
    async fn create(api: &Api) -> Result<Self, ExecError> {
        let id = format!("kaapana-node-import-{}", unique_suffix());
        let expire = Timestamp::from_system_time(SystemTime::now() + Duration::from_secs(3600));
        let labels = HashMap::from([("containerd.io/gc.expire".to_owned(), expire.to_string())]);
        api.leases()
            .create(api.req(CreateLeaseRequest { id: id.clone(), labels }))
            .await
            .map_err(err("Leases.Create"))?;
        Ok(Self { id })
    }

    async fn delete(self, api: &Api) -> Result<(), ExecError> {
        api.leases()
            .delete(api.req(DeleteLeaseRequest { id: self.id, sync: true }))
            .await
            .map_err(err("Leases.Delete"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Resolving an image for a job

/// What a job needs from an image: its record name, its root filesystem and its config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResolvedImage {
    /// containerd's name of the image record.
    pub(crate) name: String,
    /// The chain id of the top layer (the parent of a job's snapshot); empty for no layers.
    pub(crate) top_chain: String,
    /// Entrypoint, Cmd, Env, WorkingDir, User.
    pub(crate) config: RunConfig,
}

/// Finds the image with this digest in the namespace and reads its manifest and config.
pub(crate) async fn resolve(api: &Api, digest: &ImageDigest) -> Result<ResolvedImage, ExecError> {
    let not_found = || ExecError::ImageNotFound { digest: *digest };
    let name = image_name(digest);
    let got = api.images().get(api.req(GetImageRequest { name: name.clone() })).await;
    let image = match not_found_ok(got, "Images.Get")?.and_then(|r| r.into_inner().image) {
        Some(img) => img,
        None => {
            // Imported by something else (e.g. `ctr images import`) under another name?
            let filter = format!("target.digest=={}", quote(&digest.to_string()));
            let list = api
                .images()
                .list(api.req(ListImagesRequest { filters: vec![filter] }))
                .await
                .map_err(err("Images.List"))?;
            list.into_inner().images.into_iter().next().ok_or_else(not_found)?
        }
    };
    let target = image.target.ok_or_else(not_found)?;
    let mut manifest_desc = (target.media_type.clone(), target.digest.clone());
    if is_index(&target.media_type) {
        let bytes = read_content(api, &target.digest, digest).await?;
        let index: OciIndex = parse_json("the image index", &bytes)?;
        let arch = host_arch();
        let m = index
            .manifests
            .into_iter()
            .find(|m| {
                is_manifest(&m.media_type)
                    && !m.annotations.contains_key("vnd.docker.reference.type")
                    && m.platform.as_ref().is_none_or(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| bad(format!("image {digest} has no manifest for linux/{arch}")))?;
        manifest_desc = (m.media_type, m.digest);
    }
    if !is_manifest(&manifest_desc.0) {
        return Err(bad(format!("image {digest} has unsupported media type {}", manifest_desc.0)));
    }
    let manifest: OciManifest =
        parse_json("the image manifest", &read_content(api, &manifest_desc.1, digest).await?)?;
    let config: OciConfigFile =
        parse_json("the image config", &read_content(api, &manifest.config.digest, digest).await?)?;
    let top_chain = chain_ids(&config.rootfs.diff_ids).pop().unwrap_or_default();
    Ok(ResolvedImage { name: image.name, top_chain, config: config.config.unwrap_or_default() })
}

async fn read_content(api: &Api, blob: &str, image: &ImageDigest) -> Result<Vec<u8>, ExecError> {
    match api.read_blob(blob, usize::try_from(MAX_JSON_BLOB).unwrap_or(usize::MAX)).await {
        Err(ExecError::Containerd { detail, .. }) if detail.starts_with("NotFound") => {
            Err(bad(format!(
                "image {image} is incomplete in containerd: blob {blob} is missing; import it again"
            )))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        assert_eq!(chains[1], Sha256Digest::of(format!("{a} {b}").as_bytes()).to_string());
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize(Path::new("./blobs/sha256/x")), "blobs/sha256/x");
        assert_eq!(normalize(Path::new("blobs/sha256/../sha256/y")), "blobs/sha256/y");
    }
}
