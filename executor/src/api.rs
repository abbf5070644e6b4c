//! Small helpers around containerd's gRPC clients: namespace and lease headers, error mapping.

use containerd_client::services::v1::ReadContentRequest;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::tonic::metadata::{Ascii, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};

use super::ExecError;

/// containerd's namespace header.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// containerd's lease header: resources created under it belong to the lease.
const LEASE_HEADER: &str = "containerd-lease";

/// A channel to containerd and the namespace and snapshotter the node uses there.
#[derive(Clone, Debug)]
pub(crate) struct Api {
    channel: Channel,
    namespace: String,
    ns_header: MetadataValue<Ascii>,
    /// The snapshotter for image layers and job root filesystems.
    pub(crate) snapshotter: String,
}

/// Whether `ns` is a valid containerd namespace (and label-safe): `[a-z0-9]` then
/// `[a-z0-9._-]`, at most 76 characters.
pub(crate) fn valid_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    !b.is_empty()
        && b.len() <= 76
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

impl Api {
    /// The API of namespace `namespace` (checked with [`valid_namespace`]).
    pub(crate) fn new(
        channel: Channel,
        namespace: &str,
        snapshotter: &str,
    ) -> Result<Self, ExecError> {
        let ns_header = MetadataValue::try_from(namespace)
            .ok()
            .filter(|_| valid_namespace(namespace))
            .ok_or_else(|| ExecError::BadJob {
                detail: format!("invalid containerd namespace {namespace:?}"),
            })?;
        Ok(Self {
            channel,
            namespace: namespace.to_owned(),
            ns_header,
            snapshotter: snapshotter.to_owned(),
        })
    }

    /// The namespace.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A request in the namespace.
    pub(crate) fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(NAMESPACE_HEADER, self.ns_header.clone());
        req
    }

    /// A request in the namespace under a lease.
    pub(crate) fn leased<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut req = self.req(msg);
        if let Ok(v) = MetadataValue::try_from(lease) {
            req.metadata_mut().insert(LEASE_HEADER, v);
        }
        req
    }

    pub(crate) fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub(crate) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }
    pub(crate) fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub(crate) fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel.clone())
    }
    pub(crate) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub(crate) fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    pub(crate) fn namespaces(&self) -> NamespacesClient<Channel> {
        NamespacesClient::new(self.channel.clone())
    }
    pub(crate) fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub(crate) fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// Reads a whole blob from the content store (at most `limit` bytes).
    pub(crate) async fn read_blob(&self, digest: &str, limit: usize) -> Result<Vec<u8>, ExecError> {
        let mut stream = self
            .content()
            .read(self.req(ReadContentRequest { digest: digest.to_owned(), offset: 0, size: 0 }))
            .await
            .map_err(err("Content.Read"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(err("Content.Read"))? {
            out.extend_from_slice(&chunk.data);
            if out.len() > limit {
                return Err(ExecError::BadImage {
                    detail: format!("blob {digest} is larger than {limit} bytes"),
                });
            }
        }
        Ok(out)
    }
}

/// Maps a gRPC status of call `op` to an [`ExecError::Containerd`].
pub(crate) fn err(op: &'static str) -> impl Fn(Status) -> ExecError {
    move |s| ExecError::Containerd { op, detail: format!("{:?}: {}", s.code(), s.message()) }
}

/// `Ok(None)` for NotFound, the value otherwise.
pub(crate) fn not_found_ok<T>(
    r: Result<T, Status>,
    op: &'static str,
) -> Result<Option<T>, ExecError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(err(op)(s)),
    }
}

/// A quoted value for a containerd filter expression.
pub(crate) fn quote(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}
