//! Pulling images by digest from an OCI registry into containerd.
//!
//! containerd 1.6 has no Transfer service, so the pull is done client-side (with
//! [`oci_client`], over HTTPS or, for a registry named insecure, plain HTTP) and the image is
//! stored exactly as a tarball import stores it (see [`super::image`]): same blobs, GC labels,
//! image record [`image_name`](super::image::image_name)`(digest)` and unpacked layers.
//!
//! Only digests are pulled, never tags, and nothing from the registry is trusted:
//!
//! 1. the manifest (or image index) is fetched by the digest asked for and refused unless its
//!    SHA-256 is that digest; from an index, the manifest for linux and this machine's
//!    architecture is fetched by its digest and checked the same way;
//! 2. the config is fetched and checked in memory;
//! 3. each layer streams into containerd's content store while its size and SHA-256 are
//!    checked; a layer that does not match is not committed (its partial write is aborted);
//!    layers containerd already has are not downloaded;
//! 4. the layers are unpacked and the lease goes, so a failed pull leaves nothing behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};
use kaapana_protocol::{ImageDigest, Sha256Digest};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use super::ExecError;
use super::containerd::ContainerdExecutor;
use super::image::{
    self, BlobData, BlobFetch, BlobStream, ManifestBlobs, OciDescriptor, OciIndex, OciManifest,
    Plan, StreamCheck, bad, is_index, is_manifest, parse_json,
};

/// The manifest media types asked for (OCI and Docker schema 2, single and multi-platform).
const ACCEPT: &[&str] = &[
    image::MEDIA_OCI_MANIFEST,
    image::MEDIA_OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// The label on an image record that names the registry it was pulled from.
pub const LABEL_PULLED_FROM: &str = "kaapana-node/pulled-from";
/// How long connecting to the registry may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the registry may be silent during a transfer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Pulls the image `digest` (of a manifest or of an image index) from the repository
/// `registry_reference` (`host[:port]/repository`, no tag or digest, e.g.
/// `127.0.0.1:5000/kaapana/busybox`) into the executor's containerd namespace and unpacks it
/// for this machine's platform. `insecure_http` speaks plain HTTP to that registry instead of
/// HTTPS. Idempotent. Returns `digest`.
///
/// Fails with [`ExecError::ImageNotInRegistry`] if the registry does not have it,
/// [`ExecError::DigestMismatch`] if the registry serves something else under that digest, and
/// [`ExecError::Registry`] if the registry cannot be reached or misbehaves otherwise.
pub async fn pull_image(
    exec: &ContainerdExecutor,
    registry_reference: &str,
    digest: &ImageDigest,
    insecure_http: bool,
) -> Result<ImageDigest, ExecError> {
    let api = exec.api();
    let source = Registry::connect(registry_reference, digest, insecure_http)?;

    // 1. The manifest or index, by the digest asked for.
    let top_bytes = source.manifest(&digest.to_string(), "manifest").await?;
    let top_type = media_type(&top_bytes)?;
    let target = OciDescriptor {
        media_type: top_type.clone(),
        digest: digest.to_string(),
        size: i64::try_from(top_bytes.len()).unwrap_or(i64::MAX),
        annotations: Default::default(),
        platform: None,
    };
    let mut index_blob = None;
    let (manifest_desc, manifest_bytes) = if is_index(&top_type) {
        let index: OciIndex = parse_json("the image index", &top_bytes)?;
        let chosen = image::platform_manifest(&index, |_| true).cloned().ok_or_else(|| {
            bad(format!(
                "the image index {digest} has no manifest for linux/{}",
                image::host_arch()
            ))
        })?;
        image::check_digest(&chosen.digest)?;
        let bytes = source.manifest(&chosen.digest, "manifest").await?;
        if i64::try_from(bytes.len()).ok() != Some(chosen.size) {
            return Err(source.error(format!(
                "manifest {} has {} bytes, the index says {}",
                chosen.digest,
                bytes.len(),
                chosen.size
            )));
        }
        let labels =
            HashMap::from([("containerd.io/gc.ref.content.m.0".to_owned(), chosen.digest.clone())]);
        index_blob =
            Some(image::Blob { desc: target.clone(), data: BlobData::Bytes(top_bytes), labels });
        (chosen, bytes)
    } else if is_manifest(&top_type) {
        (target.clone(), top_bytes)
    } else {
        return Err(bad(format!("image {digest} has unsupported media type {top_type:?}")));
    };

    // 2. The config.
    let manifest: OciManifest = parse_json("the image manifest", &manifest_bytes)?;
    image::check_digest(&manifest.config.digest)?;
    if !(0..=i64::try_from(image::MAX_JSON_BLOB).unwrap_or(i64::MAX))
        .contains(&manifest.config.size)
    {
        return Err(bad(format!("image {digest}: a config of {} bytes", manifest.config.size)));
    }
    let config_bytes = source.small_blob(&manifest.config).await?;

    // 3. and 4. Blobs (layers streamed), image record, unpacking: as the tarball import.
    let fetch: Arc<dyn BlobFetch> = Arc::new(source);
    let ManifestBlobs { mut blobs, layers, diff_ids } = image::manifest_blobs(
        manifest_desc,
        manifest_bytes,
        manifest,
        config_bytes,
        &api.snapshotter,
        |layer| {
            image::check_digest(&layer.digest)?;
            Ok(BlobData::Remote(Arc::clone(&fetch)))
        },
    )?;
    blobs.extend(index_blob);
    let plan = Plan { target, blobs, layers, diff_ids };
    let labels = HashMap::from([(LABEL_PULLED_FROM.to_owned(), registry_reference.to_owned())]);
    image::store(api, &plan, digest, labels).await?;
    Ok(*digest)
}

/// The media type of a manifest or index: its `mediaType`, or (OCI allows it to be absent)
/// by its shape.
fn media_type(bytes: &[u8]) -> Result<String, ExecError> {
    #[derive(Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let shape: Shape = parse_json("the manifest", bytes)?;
    Ok(match shape {
        Shape { media_type: Some(t), .. } => t,
        Shape { manifests: Some(_), .. } => image::MEDIA_OCI_INDEX.to_owned(),
        Shape { config: Some(_), .. } => image::MEDIA_OCI_MANIFEST.to_owned(),
        _ => return Err(bad("the manifest has no mediaType, manifests or config")),
    })
}

/// One repository of one registry, and the image digest pulled from it.
struct Registry {
    client: Arc<Client>,
    /// `registry/repository@digest`.
    reference: Reference,
    /// `registry/repository`, for messages.
    name: String,
    digest: ImageDigest,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("name", &self.name).field("digest", &self.digest).finish()
    }
}

impl Registry {
    fn connect(
        registry_reference: &str,
        digest: &ImageDigest,
        insecure_http: bool,
    ) -> Result<Self, ExecError> {
        let name = registry_reference.trim_end_matches('/').to_owned();
        let invalid = |why: &str| {
            bad(format!(
                "registry reference {registry_reference:?} {why}: give host[:port]/repository \
                 (images are pulled by digest only)"
            ))
        };
        if name.contains('@') {
            return Err(invalid("has a digest"));
        }
        let reference: Reference = format!("{name}@{digest}")
            .parse()
            .map_err(|e| invalid(&format!("is invalid ({e})")))?;
        if reference.tag().is_some() {
            return Err(invalid("has a tag"));
        }
        let registry = reference.resolve_registry().to_owned();
        let protocol = if insecure_http {
            ClientProtocol::HttpsExcept(vec![registry.clone(), reference.registry().to_owned()])
        } else {
            ClientProtocol::Https
        };
        // reqwest takes the process's default rustls provider; the daemon installs ring, and
        // so does this (a no-op if one is installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| ExecError::Registry {
            registry: name.clone(),
            detail: format!("cannot create an HTTP client: {e}"),
        })?;
        Ok(Self { client: Arc::new(client), reference, name, digest: *digest })
    }

    fn error(&self, detail: String) -> ExecError {
        ExecError::Registry { registry: self.name.clone(), detail }
    }

    /// Maps an oci-client error about `what` (`manifest …` or `blob …`; `expected` its digest).
    fn map_err(&self, what: &str, expected: &str, e: OciDistributionError) -> ExecError {
        map_oci_error(&self.name, &self.digest, what, expected, e)
    }

    /// Fetches a manifest or index by digest and checks its SHA-256.
    async fn manifest(&self, digest: &str, what: &str) -> Result<Vec<u8>, ExecError> {
        let reference = self.reference.clone_with_digest(digest.to_owned());
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&reference, &RegistryAuth::Anonymous, ACCEPT)
            .await
            .map_err(|e| self.map_err(what, digest, e))?;
        // oci-client checks it too; this check does not depend on that.
        let actual = Sha256Digest::of(&bytes).to_string();
        if actual != digest {
            return Err(ExecError::DigestMismatch {
                registry: self.name.clone(),
                what: what.to_owned(),
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes.to_vec())
    }

    /// Fetches a small blob (a config) into memory, checked.
    async fn small_blob(&self, desc: &OciDescriptor) -> Result<Vec<u8>, ExecError> {
        let mut stream = self.open(desc.clone()).await?;
        let mut check = StreamCheck::new(desc, &self.name);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| check.failed(e))?;
            check.update(&chunk)?;
            out.extend_from_slice(&chunk);
        }
        check.finish()?;
        Ok(out)
    }

    /// Starts the download of a blob.
    fn open(&self, desc: OciDescriptor) -> BoxFuture<'static, Result<BlobStream, ExecError>> {
        let client = Arc::clone(&self.client);
        let reference = self.reference.clone();
        let name = self.name.clone();
        let image = self.digest;
        Box::pin(async move {
            let what = format!("blob {}", desc.digest);
            let oci_desc = oci_client::manifest::OciDescriptor {
                media_type: desc.media_type.clone(),
                digest: desc.digest.clone(),
                size: desc.size,
                ..Default::default()
            };
            // Auth state (anonymous) is per client; a blob request needs it stored.
            client
                .store_auth_if_needed(reference.resolve_registry(), &RegistryAuth::Anonymous)
                .await;
            let sized = client
                .pull_blob_stream(&reference, &oci_desc)
                .await
                .map_err(|e| map_oci_error(&name, &image, &what, &desc.digest, e))?;
            let stream =
                sized.stream.map_ok(|b| b.to_vec()).map_err(move |e| ExecError::Registry {
                    registry: name.clone(),
                    detail: format!("download of {what} failed: {}", with_sources(&e)),
                });
            Ok(stream.boxed())
        })
    }
}

impl BlobFetch for Registry {
    fn registry(&self) -> &str {
        &self.name
    }

    fn fetch(&self, desc: OciDescriptor) -> BoxFuture<'static, Result<BlobStream, ExecError>> {
        self.open(desc)
    }
}

/// An oci-client error about `what` (digest `expected`) of image `image` from `registry`.
fn map_oci_error(
    registry: &str,
    image: &ImageDigest,
    what: &str,
    expected: &str,
    e: OciDistributionError,
) -> ExecError {
    let missing = match &e {
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
            matches!(
                x.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    };
    match e {
        _ if missing && expected == image.to_string() => {
            ExecError::ImageNotInRegistry { digest: *image, registry: registry.to_owned() }
        }
        _ if missing => ExecError::Registry {
            registry: registry.to_owned(),
            detail: format!("{what} of image {image} is not in the registry"),
        },
        OciDistributionError::DigestError(DigestError::VerificationError { actual, .. }) => {
            ExecError::DigestMismatch {
                registry: registry.to_owned(),
                what: what.to_owned(),
                expected: expected.to_owned(),
                actual,
            }
        }
        e => ExecError::Registry {
            registry: registry.to_owned(),
            detail: format!("fetching {what} failed: {}", with_sources(&e)),
        },
    }
}

/// An error with its causes (reqwest's message alone does not say what failed).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
