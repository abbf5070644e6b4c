//! The node's configuration: one TOML file written by `kaapana-node init`.
//!
//! Every key is documented here and in the file `init` writes. Unknown keys are an error, so a
//! typo is reported instead of silently ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why the configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("cannot access configuration file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("configuration file {path} is invalid: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        detail: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this instance is.
    pub instance: InstanceConfig,
    /// The peer-to-peer network.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The local HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// Which certificates are trusted.
    #[serde(default)]
    pub trust: TrustConfig,
    /// Where jobs run.
    #[serde(default)]
    pub executor: ExecutorSection,
    /// Workflows this instance owns.
    #[serde(default)]
    pub workflows: WorkflowSection,
    /// The site's datasets.
    #[serde(default)]
    pub datasets: DatasetSection,
    /// What a peer can make this node keep, and for how long.
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `[limits]`: per-peer quotas on what accepted messages make this node keep, and retention.
///
/// "Peer" is a message's verified signer. Capability ads are not inbox entries (one per peer
/// is kept) but their ids count as seen ids. A message beyond a quota is refused with
/// `quota_exceeded`, a transient reason: the sender's outbox keeps it and tries again later,
/// once retention made room, so an honest peer is slowed down, never loses a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// The most inbox entries (accepted job manifests, updates and cancels, kept in the
    /// store's `inbox` table) from one peer. Default 262144.
    #[serde(default = "default_inbox_entries")]
    pub inbox_entries_per_peer: u64,
    /// The most envelope bytes of inbox entries from one peer. Default 1073741824 (1 GiB).
    #[serde(default = "default_inbox_bytes")]
    pub inbox_bytes_per_peer: u64,
    /// Inbox entries older than this many seconds are pruned (they are a record of what
    /// arrived; the workflows and jobs they changed keep their own state). Default 604800
    /// (7 days).
    #[serde(default = "default_inbox_retention")]
    pub inbox_retention_secs: u64,
    /// The most unexpired message ids (replay protection) kept for one peer. An id is kept
    /// until its message expires, whatever this says: when a peer has this many, its new
    /// messages are refused (`quota_exceeded`) until some expire. Default 262144.
    #[serde(default = "default_seen_ids_per_peer")]
    pub seen_ids_per_peer: u64,
    /// The most unexpired message ids kept in all: beyond it every new message is refused
    /// (`overloaded`) until ids expire; no unexpired id is ever forgotten. Default 1048576.
    #[serde(default = "default_seen_ids_max")]
    pub seen_ids_max: u64,
    /// Seconds between two retention passes (expired ids and old inbox entries are pruned by
    /// a background task, never while a message is handled). Default 60.
    #[serde(default = "default_prune_interval")]
    pub prune_interval_secs: u64,
}

const fn default_inbox_entries() -> u64 {
    1 << 18
}

const fn default_inbox_bytes() -> u64 {
    1 << 30
}

const fn default_inbox_retention() -> u64 {
    7 * 24 * 3600
}

const fn default_seen_ids_per_peer() -> u64 {
    1 << 18
}

const fn default_seen_ids_max() -> u64 {
    1 << 20
}

const fn default_prune_interval() -> u64 {
    60
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            inbox_entries_per_peer: default_inbox_entries(),
            inbox_bytes_per_peer: default_inbox_bytes(),
            inbox_retention_secs: default_inbox_retention(),
            seen_ids_per_peer: default_seen_ids_per_peer(),
            seen_ids_max: default_seen_ids_max(),
            prune_interval_secs: default_prune_interval(),
        }
    }
}

/// `[datasets]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// The most bytes the cache of series fetched from the PACS (`DATA_DIR/pacs-cache`) keeps
    /// for DICOMweb datasets; least recently used series are evicted beyond it. Default 50 GiB
    /// ([`crate::pacs_cache::DEFAULT_CACHE_BYTES`]). Series a running job reads stay on disk
    /// (hard-linked into its input folder) until the job ends, beyond the bound.
    #[serde(default = "default_pacs_cache_bytes")]
    pub pacs_cache_bytes: u64,
}

const fn default_pacs_cache_bytes() -> u64 {
    crate::pacs_cache::DEFAULT_CACHE_BYTES
}

impl Default for DatasetSection {
    fn default() -> Self {
        Self { pacs_cache_bytes: default_pacs_cache_bytes() }
    }
}

/// `[workflows]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSection {
    /// After how many seconds out of reach a runner counts as lost: its jobs whose runner was
    /// chosen by a capability query move to another matching instance (if their retries allow).
    #[serde(default = "default_runner_lost_after")]
    pub runner_lost_after_secs: u64,
    /// After how many seconds out of reach a runner counts as gone: its jobs that could not
    /// move fail with that reason, so that their workflows end.
    #[serde(default = "default_runner_give_up_after")]
    pub runner_give_up_after_secs: u64,
    /// The most result bytes (bundles and logs, counted once per blob) this owner keeps from
    /// one runner instance: a result offer whose blob would take that runner's stored bytes
    /// beyond it is refused before any byte is read (`quota_exceeded`, see
    /// [`crate::net::results`]). Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_result_bytes_per_runner: Option<u64>,
}

const fn default_runner_give_up_after() -> u64 {
    24 * 3600
}

const fn default_runner_lost_after() -> u64 {
    300
}

impl Default for WorkflowSection {
    fn default() -> Self {
        Self {
            runner_lost_after_secs: default_runner_lost_after(),
            runner_give_up_after_secs: default_runner_give_up_after(),
            max_result_bytes_per_runner: None,
        }
    }
}

/// `[executor]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSection {
    /// `containerd` (default), `kubernetes` (jobs become `batch/v1` Jobs, see
    /// `[executor.kubernetes]`), `airflow` (jobs are DAG runs of the site's Airflow) or `none`
    /// (this instance runs no jobs; jobs sent to it fail with that reason).
    #[serde(default)]
    pub kind: ExecutorKindSetting,
    /// The Kubernetes executor (with `kind = "kubernetes"`): namespace, image repository, the
    /// volumes through which job pods see the node's data directory, security settings. The
    /// cluster is reached with `KUBECONFIG` or the pod's service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::executor::kubernetes::KubernetesConfig>,
    /// containerd's socket. Unset: the node starts and supervises its own containerd, with
    /// its state under the data directory.
    #[serde(default)]
    pub containerd_address: Option<PathBuf>,
    /// OCI repositories (`host[:port]/path`) to pull a job's image from, by digest, when it
    /// is not in containerd yet; tried in order.
    #[serde(default)]
    pub pull_from: Vec<String>,
    /// Pull over plain HTTP (a registry on loopback or a trusted site network only).
    #[serde(default)]
    pub insecure_registry: bool,
    /// `kind = "airflow"`: the Airflow API server, e.g. `http://127.0.0.1:8080`.
    #[serde(default)]
    pub airflow_url: Option<String>,
    /// `kind = "airflow"`: `auto` (default: ask the server), `2` (Airflow 2, `/api/v1`, basic
    /// authentication) or `3` (Airflow 3, `/api/v2`, a token from `/auth/token`).
    #[serde(default)]
    pub airflow_api_version: AirflowApiSetting,
    /// `kind = "airflow"`: the Airflow user the node acts as.
    #[serde(default)]
    pub airflow_user: Option<String>,
    /// `kind = "airflow"`: a file (mode 0600) holding that user's password.
    #[serde(default)]
    pub airflow_password_file: Option<PathBuf>,
    /// `kind = "airflow"`: where Airflow's workers see the node's files, as prefixes
    /// `{ "/node/path" = "/path/in/airflow" }` (the first matching prefix is replaced). Empty:
    /// the same paths (Airflow on this machine). A DAG run reads its input and writes its
    /// output under `DATA_DIR/jobs/<job id>/`.
    #[serde(default)]
    pub airflow_path_map: std::collections::BTreeMap<PathBuf, PathBuf>,
    /// `kind = "airflow"`: milliseconds between two reads of a running DAG run's state
    /// (default 250).
    #[serde(default = "default_airflow_poll_ms")]
    pub airflow_poll_ms: u64,
}

const fn default_airflow_poll_ms() -> u64 {
    250
}

/// `[executor] airflow_api_version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AirflowApiSetting {
    /// Ask the server.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Airflow 2 (`/api/v1`).
    #[serde(rename = "2")]
    V2,
    /// Airflow 3 (`/api/v2`).
    #[serde(rename = "3")]
    V3,
}

impl Default for ExecutorSection {
    fn default() -> Self {
        Self {
            kind: ExecutorKindSetting::Containerd,
            kubernetes: None,
            containerd_address: None,
            pull_from: Vec::new(),
            insecure_registry: false,
            airflow_url: None,
            airflow_api_version: AirflowApiSetting::Auto,
            airflow_user: None,
            airflow_password_file: None,
            airflow_path_map: std::collections::BTreeMap::new(),
            airflow_poll_ms: default_airflow_poll_ms(),
        }
    }
}

/// The executor kinds a node can be configured with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKindSetting {
    /// containerd's gRPC API.
    #[default]
    Containerd,
    /// A Kubernetes cluster's API (`[executor.kubernetes]`).
    Kubernetes,
    /// DAG runs of the site's Apache Airflow (its REST API).
    Airflow,
    /// No executor.
    None,
}

/// `[instance]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// The display name other instances see (and the certificate's CN).
    pub name: String,
}

/// `[network]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Multiaddresses the daemon listens on: TCP (TLS 1.3 + yamux) and QUIC.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Addresses written into exported bundles for peers to dial; empty = `listen`.
    #[serde(default)]
    pub advertise: Vec<String>,
    /// Relays to reserve a slot at, e.g. `/ip4/203.0.113.7/tcp/7400/p2p/12D3KooW...` (a
    /// registered instance's address ending in its peer id): peers that cannot dial this node
    /// (behind NAT or a firewall that lets only outbound connections out) reach it through
    /// them. Their circuit addresses go into the bundles this node exports.
    #[serde(default)]
    pub relays: Vec<String>,
    /// Relay circuits between registered instances (never for anyone else). `kaapana-node
    /// relay` runs a node that does only this.
    #[serde(default)]
    pub relay_service: bool,
    /// Upgrade a relayed connection to a direct one by hole punching (DCUtR), when both
    /// sides' routers allow it.
    #[serde(default = "yes")]
    pub hole_punching: bool,
    /// Ask registered peers whether this node is reachable from outside (AutoNAT); an
    /// address they confirm goes into the bundles the daemon exports.
    #[serde(default = "yes")]
    pub autonat: bool,
}

const fn yes() -> bool {
    true
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            advertise: Vec::new(),
            relays: Vec::new(),
            relay_service: false,
            hole_punching: true,
            autonat: true,
        }
    }
}

fn default_listen() -> Vec<String> {
    vec!["/ip4/0.0.0.0/tcp/7400".into(), "/ip4/0.0.0.0/udp/7400/quic-v1".into()]
}

impl NetworkConfig {
    /// The addresses peers should dial.
    pub fn advertised(&self) -> &[String] {
        if self.advertise.is_empty() { &self.listen } else { &self.advertise }
    }

    /// The circuit addresses through the configured relays (`<relay>/p2p-circuit`), which
    /// go into exported bundles besides the direct ones.
    pub fn relayed(&self) -> Vec<String> {
        self.relays.iter().map(|r| format!("{}/p2p-circuit", r.trim_end_matches('/'))).collect()
    }

    /// The addresses an exported bundle names: the advertised ones, then the relayed ones.
    pub fn bundle_addrs(&self) -> Vec<String> {
        let mut addrs = self.advertised().to_vec();
        addrs.extend(self.relayed());
        addrs
    }
}

/// `[api]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the local HTTP API (loopback by default).
    #[serde(default = "default_api_listen")]
    pub listen: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { listen: default_api_listen() }
    }
}

fn default_api_listen() -> String {
    "127.0.0.1:7401".into()
}

/// `[trust]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// PEM file of a federation CA. When set, every instance certificate (this node's and the
    /// ones `instance add` imports) must be issued by it; when unset, instances use
    /// self-signed certificates pinned by their fingerprint.
    #[serde(default)]
    pub federation_ca: Option<PathBuf>,
}

impl Config {
    /// A configuration with defaults for everything but the name.
    pub fn new(name: &str) -> Self {
        Self {
            instance: InstanceConfig { name: name.to_owned() },
            network: NetworkConfig::default(),
            api: ApiConfig::default(),
            trust: TrustConfig::default(),
            executor: ExecutorSection::default(),
            workflows: WorkflowSection::default(),
            datasets: DatasetSection::default(),
            limits: LimitsSection::default(),
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Invalid { path: path.to_owned(), detail: e.to_string() })
    }

    /// The file `init` writes: every key with a comment saying what it does.
    pub fn to_commented_toml(&self) -> String {
        let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let ca = match &self.trust.federation_ca {
            Some(p) => format!("federation_ca = {:?}", p.display().to_string()),
            None => "# federation_ca = \"/path/to/federation-ca.crt\"".to_owned(),
        };
        format!(
            r#"# kaapana-node configuration, written by `kaapana-node init`.
# Unknown keys are rejected. Flags and KAAPANA_NODE_* environment variables override values.

[instance]
# The display name other instances see; also the CN of this instance's certificate.
name = {name:?}

[network]
# Multiaddresses the daemon listens on: TCP (TLS 1.3 + yamux) and QUIC.
listen = [{listen}]
# Addresses written into exported bundles for peers to dial; empty means `listen`.
# Set this when peers must use another address (a public name, a NAT mapping).
advertise = [{advertise}]
# Behind NAT or a firewall that lets only outbound connections out: relays (registered
# instances, e.g. a consortium's `kaapana-node relay`) to reserve a slot at, each as
# "/ip4/<address>/tcp/<port>/p2p/<its instance id>"; peers then reach this instance through
# them, and exported bundles name the circuit addresses.
relays = [{relays}]
# Relay circuits between the instances registered here (never for anyone else).
relay_service = {relay_service}
# Upgrade relayed connections to direct ones by hole punching (DCUtR).
hole_punching = {hole_punching}
# Ask registered peers whether this instance is reachable from outside (AutoNAT).
autonat = {autonat}

[api]
# The local HTTP API (CLI, dashboard, /metrics). Keep it on loopback: it is protected only by
# the bearer token in the data directory's `api-token` file.
listen = {api:?}

[trust]
# A federation CA (PEM). When set, every instance certificate must be issued by it;
# when unset, instances present self-signed certificates pinned by fingerprint.
{ca}

[executor]
# Where jobs from other instances run: "containerd", "kubernetes" (batch/v1 Jobs, configured
# in [executor.kubernetes]), "airflow" (jobs are runs of DAGs of the site's Airflow), or "none"
# for an instance that only submits jobs (jobs sent to it fail with that reason).
kind = {kind:?}
# containerd's socket; unset: the node starts its own containerd (state under the data dir).
{containerd}
# Repositories to pull a job's image from (by digest) when it is missing, e.g.
# ["registry.site.local:5000/kaapana/jobs"]; plain HTTP only with insecure_registry = true.
pull_from = [{pull_from}]
insecure_registry = {insecure}
# kind = "airflow": the Airflow API server, its API ("auto", "2" for Airflow 2's /api/v1 with
# basic auth, "3" for Airflow 3's /api/v2 with a token from /auth/token), the user the node acts
# as and a file (mode 0600) with its password. Airflow must see each job's folder
# DATA_DIR/jobs/<job>/ (input/, output/): map path prefixes if it sees them elsewhere, e.g.
# airflow_path_map = {{ "/var/lib/kaapana-node" = "/kaapana/mounted/kaapana-node" }}.
{airflow_url}
airflow_api_version = "{airflow_api}"
{airflow_user}
{airflow_password}
airflow_path_map = {{ {airflow_map} }}
# Milliseconds between two reads of a running DAG run's state.
airflow_poll_ms = {airflow_poll}
{kubernetes}

[workflows]
# Seconds a runner may be out of reach before its jobs that were placed by a capability query
# move to another matching instance (within the job's retries).
runner_lost_after_secs = {lost}
# Seconds a runner may be out of reach before its jobs that cannot move fail (their workflow
# then ends with that reason); a cancel waits for the runner in case it comes back.
runner_give_up_after_secs = {give_up}
# The most bytes of results (bundles and logs) kept from one runner instance; an offer beyond
# it is refused (quota_exceeded) before any byte is sent. Unset: no limit.
{result_quota}

[datasets]
# The most bytes kept in the cache of series fetched from the PACS for DICOMweb datasets
# (DATA_DIR/pacs-cache); least recently used series are evicted beyond it. Series that running
# jobs read stay on disk until those jobs end. Default 53687091200 (50 GiB).
pacs_cache_bytes = {pacs_cache}

[limits]
# Per-peer quotas on what accepted messages make this node keep ("peer": the signer). A
# message beyond one is refused as quota_exceeded; the sender keeps it and retries later.
# Inbox entries (job manifests, updates, cancels as received) and their envelope bytes:
inbox_entries_per_peer = {inbox_entries}
inbox_bytes_per_peer = {inbox_bytes}
# Inbox entries older than this are pruned.
inbox_retention_secs = {inbox_retention}
# Message ids kept for replay protection until their messages expire, per peer and in all;
# when full, new messages are refused (never is an unexpired id forgotten).
seen_ids_per_peer = {seen_per_peer}
seen_ids_max = {seen_max}
# Seconds between two background retention passes.
prune_interval_secs = {prune_interval}
"#,
            inbox_entries = self.limits.inbox_entries_per_peer,
            inbox_bytes = self.limits.inbox_bytes_per_peer,
            inbox_retention = self.limits.inbox_retention_secs,
            seen_per_peer = self.limits.seen_ids_per_peer,
            seen_max = self.limits.seen_ids_max,
            prune_interval = self.limits.prune_interval_secs,
            pacs_cache = self.datasets.pacs_cache_bytes,
            give_up = self.workflows.runner_give_up_after_secs,
            result_quota = match self.workflows.max_result_bytes_per_runner {
                Some(n) => format!("max_result_bytes_per_runner = {n}"),
                None => "# max_result_bytes_per_runner = 1099511627776".to_owned(),
            },
            lost = self.workflows.runner_lost_after_secs,
            name = self.instance.name,
            listen = list(&self.network.listen),
            advertise = list(&self.network.advertise),
            api = self.api.listen,
            kind = match self.executor.kind {
                ExecutorKindSetting::Containerd => "containerd",
                ExecutorKindSetting::Kubernetes => "kubernetes",
                ExecutorKindSetting::Airflow => "airflow",
                ExecutorKindSetting::None => "none",
            },
            airflow_url = match &self.executor.airflow_url {
                Some(u) => format!("airflow_url = {u:?}"),
                None => "# airflow_url = \"http://127.0.0.1:8080\"".to_owned(),
            },
            airflow_api = match self.executor.airflow_api_version {
                AirflowApiSetting::Auto => "auto",
                AirflowApiSetting::V2 => "2",
                AirflowApiSetting::V3 => "3",
            },
            airflow_user = match &self.executor.airflow_user {
                Some(u) => format!("airflow_user = {u:?}"),
                None => "# airflow_user = \"kaapana-node\"".to_owned(),
            },
            airflow_password = match &self.executor.airflow_password_file {
                Some(p) => format!("airflow_password_file = {:?}", p.display().to_string()),
                None =>
                    "# airflow_password_file = \"/etc/kaapana-node/airflow-password\"".to_owned(),
            },
            airflow_map = self
                .executor
                .airflow_path_map
                .iter()
                .map(|(a, b)| format!(
                    "{:?} = {:?}",
                    a.display().to_string(),
                    b.display().to_string()
                ))
                .collect::<Vec<_>>()
                .join(", "),
            airflow_poll = self.executor.airflow_poll_ms,
            kubernetes = match &self.executor.kubernetes {
                // Under its full path, so that its own sub-tables get `[executor.kubernetes.*]`.
                Some(k) => {
                    let mut executor = toml::Table::new();
                    let mut outer = toml::Table::new();
                    let written = toml::Value::try_from(k).and_then(|v| {
                        executor.insert("kubernetes".into(), v);
                        outer.insert("executor".into(), toml::Value::Table(executor));
                        toml::to_string(&outer)
                    });
                    written.unwrap_or_else(|e| format!("# [executor.kubernetes]: {e}\n"))
                }
                None => String::new(),
            },
            pull_from = list(&self.executor.pull_from),
            relays = list(&self.network.relays),
            relay_service = self.network.relay_service,
            hole_punching = self.network.hole_punching,
            autonat = self.network.autonat,
            insecure = self.executor.insecure_registry,
            containerd = match &self.executor.containerd_address {
                Some(p) => format!("containerd_address = {:?}", p.display().to_string()),
                None => "# containerd_address = \"/run/containerd/containerd.sock\"".to_owned(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commented_file_parses_back() {
        let mut c = Config::new("site-a");
        c.network.advertise = vec!["/ip4/10.0.0.1/tcp/7400".into()];
        c.network.relays = vec!["/ip4/10.0.0.2/tcp/7400/p2p/12D3KooWAbc".into()];
        c.network.relay_service = true;
        c.network.hole_punching = false;
        c.network.autonat = false;
        c.trust.federation_ca = Some(PathBuf::from("/etc/ca.crt"));
        let text = c.to_commented_toml();
        assert_eq!(Config::parse(&text, Path::new("x")).unwrap(), c);
        c.executor.kind = ExecutorKindSetting::Kubernetes;
        c.executor.kubernetes = Some(
            toml::from_str(
                "namespace = \"jobs\"\nimage_repository = \"registry.site/kaapana\"\n\
                 [[volumes]]\nlocal_path = \"/data\"\n\
                 type = \"persistent_volume_claim\"\nclaim_name = \"kn\"\nsub_path = \"data\"\n",
            )
            .unwrap(),
        );
        let text = c.to_commented_toml();
        assert_eq!(Config::parse(&text, Path::new("x")).unwrap(), c, "{text}");
        c.executor.kubernetes = None;
        c.executor.kind = ExecutorKindSetting::Airflow;
        c.executor.airflow_url = Some("http://127.0.0.1:8080".into());
        c.executor.airflow_api_version = AirflowApiSetting::V2;
        c.executor.airflow_user = Some("kaapana".into());
        c.executor.airflow_password_file = Some(PathBuf::from("/etc/af-pass"));
        c.executor.airflow_path_map.insert("/var/lib/kn".into(), "/kaapana/mounted/kn".into());
        c.executor.airflow_poll_ms = 500;
        let text = c.to_commented_toml();
        assert_eq!(Config::parse(&text, Path::new("x")).unwrap(), c);
        let plain = Config::new("b");
        assert_eq!(Config::parse(&plain.to_commented_toml(), Path::new("x")).unwrap(), plain);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[instance]\nname = \"a\"\nnmae = \"b\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nmae"), "{err}");
        assert!(err.contains("c.toml"), "{err}");
    }
}
