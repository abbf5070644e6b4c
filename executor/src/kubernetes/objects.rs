//! The configuration of the Kubernetes executor and the objects it creates for a job: pure
//! functions from a [`JobRun`] and a [`KubernetesConfig`] to a `batch/v1` [`Job`] and a
//! `networking.k8s.io/v1` [`NetworkPolicy`]. Nothing here talks to a cluster or touches a
//! file, so the objects are golden-tested and validated against the official schemas.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, HostPathVolumeSource,
    LocalObjectReference, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kaapana_protocol::{JobId, ResourceLimits};
use serde::{Deserialize, Serialize};

use super::KubernetesError;
use crate::JobRun;

/// The label every object of the executor carries, with the value [`MANAGED_BY`].
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "kaapana-node";
/// The label holding the job id (32 hex digits) on the Job, its pods and its NetworkPolicy.
pub const LABEL_JOB_ID: &str = "kaapana.io/job-id";
/// The name of the job's container in its pod.
pub const CONTAINER: &str = "job";

/// The name of a job's Job and NetworkPolicy: `kn-` and the job id's 32 hex digits (a
/// DNS-1123 label of 35 characters, so the pods' generated names fit too).
pub fn job_name(job: &JobId) -> String {
    format!("kn-{job}")
}

/// The label selector (`kaapana.io/job-id=<id>`) of a job's pods.
pub fn job_selector(job: &JobId) -> String {
    format!("{LABEL_JOB_ID}={job}")
}

/// The label selector of everything the executor created.
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

/// Where a volume the node sees at [`DataVolume::local_path`] comes from in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VolumeSource {
    /// A PersistentVolumeClaim in the executor's namespace (in the Helm chart: the node's own
    /// data claim). `sub_path` is the folder of the claim that the node sees at `local_path`
    /// (empty: the claim's root).
    PersistentVolumeClaim {
        /// The claim's name.
        claim_name: String,
        /// The claim's folder seen at `local_path` (relative; empty for its root).
        #[serde(default)]
        sub_path: String,
    },
    /// A folder on the cluster node (single-node sites: the node daemon runs on the host and
    /// the job pods are pinned to it, e.g. with `node_selector`).
    HostPath {
        /// The host's folder seen at `local_path` (absolute).
        path: PathBuf,
    },
}

/// A volume through which job folders reach the pod: every folder of a [`JobRun`] (dataset,
/// upstream results, output) must lie under the `local_path` of one of them, and is mounted
/// as the sub-path of the volume at the same place relative to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataVolume {
    /// Where the node sees the volume (absolute), e.g. its data directory.
    pub local_path: PathBuf,
    /// What it is in the cluster.
    #[serde(flatten)]
    pub source: VolumeSource,
}

/// The settings of a [`super::KubernetesExecutor`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The namespace of the job's Jobs, pods and NetworkPolicies (default `kaapana-jobs`);
    /// one node per namespace.
    pub namespace: String,
    /// The repository the cluster pulls job images from: a job's image is
    /// `<image_repository>@sha256:<digest>`, as manifests name only digests. Required.
    pub image_repository: String,
    /// How the job's folders reach its pod (at least one; see [`DataVolume`]).
    pub volumes: Vec<DataVolume>,
    /// The pods' RuntimeClass (e.g. `gvisor` or `kata`), if any.
    pub runtime_class: Option<String>,
    /// The pods' node selector (empty: any node).
    pub node_selector: BTreeMap<String, String>,
    /// Secrets (in the namespace) for pulling from `image_repository`, if it needs any.
    pub image_pull_secrets: Vec<String>,
    /// Requests and limits of jobs whose manifest says 0 (default 1000 millicores, 1 GiB).
    pub default_limits: ResourceLimits,
    /// The extended resource that counts GPUs (default `nvidia.com/gpu`).
    pub gpu_resource: String,
    /// Refuse images that run as root (`runAsNonRoot`; default false: the image's user).
    pub run_as_non_root: bool,
    /// The user id the job runs as, instead of the image's.
    pub run_as_user: Option<i64>,
    /// The group id the job runs as, instead of the image's.
    pub run_as_group: Option<i64>,
    /// The size limit of the writable `/tmp` (an emptyDir; default 1 GiB).
    pub tmp_size_bytes: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            namespace: "kaapana-jobs".into(),
            image_repository: String::new(),
            volumes: Vec::new(),
            runtime_class: None,
            node_selector: BTreeMap::new(),
            image_pull_secrets: Vec::new(),
            default_limits: ResourceLimits { cpu_millis: 1000, memory_bytes: 1 << 30, gpus: 0 },
            gpu_resource: "nvidia.com/gpu".into(),
            run_as_non_root: false,
            run_as_user: None,
            run_as_group: None,
            tmp_size_bytes: 1 << 30,
        }
    }
}

/// Whether `s` is a DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether `s` is a DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn config_error(detail: impl Into<String>) -> KubernetesError {
    KubernetesError::Config { detail: detail.into() }
}

/// `p` as its normal components, if it is absolute and has no `.` or `..`.
fn normal_components(p: &Path) -> Option<Vec<&str>> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => out.push(s.to_str()?),
            _ => return None,
        }
    }
    Some(out)
}

/// Whether `s` is a relative path of plain components (a valid `subPath`).
fn valid_sub_path(s: &str) -> bool {
    !s.starts_with('/') && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

impl KubernetesConfig {
    /// Checks the settings; the error says which one is wrong and how.
    pub fn validate(&self) -> Result<(), KubernetesError> {
        if !is_dns_label(&self.namespace) {
            return Err(config_error(format!(
                "namespace {:?} is not a DNS-1123 label (lowercase letters, digits and '-', at \
                 most 63)",
                self.namespace
            )));
        }
        let repo = &self.image_repository;
        let last = repo.rsplit('/').next().unwrap_or_default();
        if repo.is_empty()
            || repo.contains(['@', ' ', '\t', '\n'])
            || last.contains(':')
            || repo.ends_with('/')
        {
            return Err(config_error(format!(
                "image_repository {repo:?} must be a repository without tag or digest, e.g. \
                 `registry.example.org/kaapana/jobs` (images are pulled as \
                 `<repository>@sha256:<digest>`)"
            )));
        }
        if self.volumes.is_empty() {
            return Err(config_error(
                "no `volumes`: add one whose `local_path` is the node's data directory (a \
                 persistent_volume_claim, or a host_path on single-node sites)",
            ));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if normal_components(&v.local_path).is_none() {
                return Err(config_error(format!(
                    "volumes[{i}].local_path {} must be an absolute path without `.` or `..`",
                    v.local_path.display()
                )));
            }
            if self.volumes[..i].iter().any(|o| o.local_path == v.local_path) {
                return Err(config_error(format!(
                    "volumes[{i}].local_path {} appears twice",
                    v.local_path.display()
                )));
            }
            match &v.source {
                VolumeSource::PersistentVolumeClaim { claim_name, sub_path } => {
                    if !is_dns_subdomain(claim_name) {
                        return Err(config_error(format!(
                            "volumes[{i}].claim_name {claim_name:?} is not a valid claim name"
                        )));
                    }
                    if !sub_path.is_empty() && !valid_sub_path(sub_path) {
                        return Err(config_error(format!(
                            "volumes[{i}].sub_path {sub_path:?} must be relative, without `.` \
                             or `..`"
                        )));
                    }
                }
                VolumeSource::HostPath { path } => {
                    if normal_components(path).is_none() {
                        return Err(config_error(format!(
                            "volumes[{i}].path {} must be an absolute path without `.` or `..`",
                            path.display()
                        )));
                    }
                }
            }
        }
        if let Some(rc) = &self.runtime_class
            && !is_dns_subdomain(rc)
        {
            return Err(config_error(format!("runtime_class {rc:?} is not a valid name")));
        }
        if let Some(s) = self.image_pull_secrets.iter().find(|s| !is_dns_subdomain(s)) {
            return Err(config_error(format!("image_pull_secrets: {s:?} is not a valid name")));
        }
        if self.default_limits.cpu_millis == 0 || self.default_limits.memory_bytes == 0 {
            return Err(config_error(
                "default_limits needs cpu_millis and memory_bytes above 0 (they apply to jobs \
                 whose manifest says 0)",
            ));
        }
        if self.gpu_resource.is_empty() || self.gpu_resource.contains(char::is_whitespace) {
            return Err(config_error(format!(
                "gpu_resource {:?} is not a resource name such as `nvidia.com/gpu`",
                self.gpu_resource
            )));
        }
        if self.tmp_size_bytes == 0 {
            return Err(config_error("tmp_size_bytes must be above 0"));
        }
        if self.run_as_non_root && self.run_as_user == Some(0) {
            return Err(config_error("run_as_non_root contradicts run_as_user = 0"));
        }
        Ok(())
    }

    /// The image reference of `digest` in the configured repository.
    pub fn image_reference(&self, digest: &kaapana_protocol::ImageDigest) -> String {
        format!("{}@{digest}", self.image_repository)
    }
}

/// Which volume (index into [`KubernetesConfig::volumes`]) holds `path`, and the `subPath`
/// of the folder in it (`None`: the volume's root). The longest matching `local_path` wins.
fn locate(
    config: &KubernetesConfig,
    what: &str,
    path: &Path,
) -> Result<(usize, Option<String>), KubernetesError> {
    let not_on_volume = || KubernetesError::NotOnVolume {
        what: what.to_owned(),
        path: path.to_owned(),
        volumes: config
            .volumes
            .iter()
            .map(|v| v.local_path.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let parts = normal_components(path).ok_or_else(not_on_volume)?;
    let mut best: Option<(usize, usize)> = None;
    for (i, v) in config.volumes.iter().enumerate() {
        let Some(root) = normal_components(&v.local_path) else { continue };
        if parts.starts_with(&root) && best.is_none_or(|(_, len)| root.len() > len) {
            best = Some((i, root.len()));
        }
    }
    let (i, len) = best.ok_or_else(not_on_volume)?;
    let mut sub: Vec<&str> = Vec::new();
    if let VolumeSource::PersistentVolumeClaim { sub_path, .. } = &config.volumes[i].source
        && !sub_path.is_empty()
    {
        sub.extend(sub_path.split('/'));
    }
    sub.extend(&parts[len..]);
    Ok((i, (!sub.is_empty()).then(|| sub.join("/"))))
}

fn labels(job: &JobId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_JOB_ID.to_owned(), job.to_string()),
    ])
}

fn metadata(job: &JobId, config: &KubernetesConfig) -> ObjectMeta {
    ObjectMeta {
        name: Some(job_name(job)),
        namespace: Some(config.namespace.clone()),
        labels: Some(labels(job)),
        ..ObjectMeta::default()
    }
}

/// `activeDeadlineSeconds` for a timeout: whole seconds, rounded up, at least 1.
pub fn deadline_seconds(timeout: Duration) -> i64 {
    let secs = timeout.as_secs().saturating_add(u64::from(timeout.subsec_nanos() > 0));
    i64::try_from(secs).unwrap_or(i64::MAX).max(1)
}

/// The job's `batch/v1` Job: one pod, never restarted (`backoffLimit: 0`), killed by the
/// cluster after the job's timeout (`activeDeadlineSeconds`), kept until the executor deletes
/// it (no `ttlSecondsAfterFinished`). The pod has no service account token and no service
/// links; its container runs without privileges (no privilege escalation, all capabilities
/// dropped, read-only root filesystem, seccomp `RuntimeDefault`) with requests = limits from
/// the job (or the configured defaults), its dataset read-only at `/input`, upstream results
/// read-only at `/input/<name>`, `/output` writable, and a writable emptyDir at `/tmp`.
///
/// The folders of `job` must be absolute, without `.` or `..`, and on a configured
/// [`DataVolume`] (the executor resolves symlinks before it calls this).
pub fn job_object(job: &JobRun, config: &KubernetesConfig) -> Result<Job, KubernetesError> {
    config.validate()?;
    let bad = |detail: String| KubernetesError::BadJob { detail };
    let crate::JobWork::Container { image, command, env } = &job.work else {
        return Err(bad(
            "an Airflow DAG job cannot run on the Kubernetes executor; configure `[executor] \
             kind = \"airflow\"` for DAG jobs"
                .into(),
        ));
    };
    let mut volumes_used: Vec<usize> = Vec::new();
    let mut mounts: Vec<VolumeMount> = Vec::new();
    let mut mount = |what: &str, path: &Path, at: String, read_only: bool| {
        let (i, sub_path) = locate(config, what, path)?;
        if !volumes_used.contains(&i) {
            volumes_used.push(i);
        }
        mounts.push(VolumeMount {
            name: format!("data-{i}"),
            mount_path: at,
            sub_path,
            read_only: Some(read_only),
            ..VolumeMount::default()
        });
        Ok::<(), KubernetesError>(())
    };
    if let Some(input) = &job.input {
        mount("the input", input, "/input".into(), true)?;
    }
    let mut names: Vec<&str> = Vec::new();
    for (name, path) in &job.upstream {
        if !crate::spec::valid_upstream_name(name) {
            return Err(bad(format!("invalid upstream name {name:?}")));
        }
        if names.contains(&name.as_str()) {
            return Err(bad(format!("upstream name {name:?} appears twice")));
        }
        names.push(name);
        mount(&format!("upstream result {name:?}"), path, format!("/input/{name}"), true)?;
    }
    mount("the output", &job.output, "/output".into(), false)?;
    let mut volumes: Vec<Volume> = volumes_used
        .iter()
        .map(|&i| {
            let name = format!("data-{i}");
            match &config.volumes[i].source {
                VolumeSource::PersistentVolumeClaim { claim_name, .. } => Volume {
                    name,
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim_name.clone(),
                        read_only: None,
                    }),
                    ..Volume::default()
                },
                VolumeSource::HostPath { path } => Volume {
                    name,
                    host_path: Some(HostPathVolumeSource {
                        path: path.to_string_lossy().into_owned(),
                        type_: Some("Directory".into()),
                    }),
                    ..Volume::default()
                },
            }
        })
        .collect();
    if job.input.is_none() && job.upstream.is_empty() {
        // No data: an empty, read-only /input, as the containerd executor has.
        volumes.push(Volume {
            name: "input".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: None,
                size_limit: Some(Quantity("1Mi".into())),
            }),
            ..Volume::default()
        });
        mounts.insert(
            0,
            VolumeMount {
                name: "input".into(),
                mount_path: "/input".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        );
    }
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: None,
            size_limit: Some(Quantity(config.tmp_size_bytes.to_string())),
        }),
        ..Volume::default()
    });
    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        read_only: Some(false),
        ..VolumeMount::default()
    });

    let cpu = match job.limits.cpu_millis {
        0 => config.default_limits.cpu_millis,
        n => n,
    };
    let memory = match job.limits.memory_bytes {
        0 => config.default_limits.memory_bytes,
        n => n,
    };
    let requests = BTreeMap::from([
        ("cpu".to_owned(), Quantity(format!("{cpu}m"))),
        ("memory".to_owned(), Quantity(memory.to_string())),
    ]);
    let mut limits = requests.clone();
    if job.limits.gpus > 0 {
        limits.insert(config.gpu_resource.clone(), Quantity(job.limits.gpus.to_string()));
    }
    let seccomp = || SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(config.image_reference(image)),
        image_pull_policy: Some("IfNotPresent".into()),
        command: (!command.is_empty()).then(|| command.clone()),
        env: (!env.is_empty()).then(|| {
            env.iter()
                .map(|(name, value)| EnvVar {
                    name: name.clone(),
                    value: Some(value.clone()),
                    value_from: None,
                })
                .collect()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(requests),
            limits: Some(limits),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities { add: None, drop: Some(vec!["ALL".into()]) }),
            read_only_root_filesystem: Some(true),
            seccomp_profile: Some(seccomp()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        runtime_class_name: config.runtime_class.clone(),
        node_selector: (!config.node_selector.is_empty()).then(|| config.node_selector.clone()),
        image_pull_secrets: (!config.image_pull_secrets.is_empty()).then(|| {
            config
                .image_pull_secrets
                .iter()
                .map(|s| LocalObjectReference { name: s.clone() })
                .collect()
        }),
        security_context: Some(PodSecurityContext {
            run_as_non_root: config.run_as_non_root.then_some(true),
            run_as_user: config.run_as_user,
            run_as_group: config.run_as_group,
            seccomp_profile: Some(seccomp()),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    Ok(Job {
        metadata: metadata(&job.job_id, config),
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            completions: Some(1),
            parallelism: Some(1),
            active_deadline_seconds: Some(deadline_seconds(job.timeout)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&job.job_id)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// The job's NetworkPolicy: it selects the job's pods by their labels and, with both policy
/// types and no rules, denies all ingress and all egress (enforced by the cluster's network
/// plugin; one without NetworkPolicy support ignores it).
pub fn network_policy_object(job: &JobId, config: &KubernetesConfig) -> NetworkPolicy {
    NetworkPolicy {
        metadata: metadata(job, config),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels(job)),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: None,
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KubernetesConfig {
        KubernetesConfig {
            image_repository: "registry.example.org/kaapana/jobs".into(),
            volumes: vec![
                DataVolume {
                    local_path: "/data".into(),
                    source: VolumeSource::PersistentVolumeClaim {
                        claim_name: "node-data".into(),
                        sub_path: "site-a".into(),
                    },
                },
                DataVolume {
                    local_path: "/data/datasets".into(),
                    source: VolumeSource::HostPath { path: "/srv/ds".into() },
                },
            ],
            ..KubernetesConfig::default()
        }
    }

    #[test]
    fn folders_map_to_the_longest_matching_volume() {
        let c = config();
        assert_eq!(
            locate(&c, "x", Path::new("/data/jobs/a/output")).unwrap(),
            (0, Some("site-a/jobs/a/output".into()))
        );
        assert_eq!(
            locate(&c, "x", Path::new("/data/datasets/ct")).unwrap(),
            (1, Some("ct".into()))
        );
        assert_eq!(locate(&c, "x", Path::new("/data/datasets")).unwrap(), (1, None));
        // A prefix of a component is not a prefix of the path.
        assert_eq!(
            locate(&c, "x", Path::new("/data/datasets2")).unwrap(),
            (0, Some("site-a/datasets2".into()))
        );
        for outside in ["/elsewhere/x", "/data/../etc", "relative/x"] {
            let e = locate(&c, "the input", Path::new(outside)).unwrap_err();
            assert!(matches!(e, KubernetesError::NotOnVolume { .. }), "{outside}: {e}");
            assert!(e.to_string().contains("local_path"), "{e}");
        }
    }

    #[test]
    fn configs_are_checked() {
        assert!(config().validate().is_ok());
        type Change = Box<dyn Fn(&mut KubernetesConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("namespace", Box::new(|c| c.namespace = "Bad_NS".into())),
            ("image_repository", Box::new(|c| c.image_repository = "reg/x:latest".into())),
            ("image_repository", Box::new(|c| c.image_repository = "reg/x@sha256:ab".into())),
            ("image_repository", Box::new(|c| c.image_repository = String::new())),
            ("no `volumes`", Box::new(|c| c.volumes.clear())),
            ("local_path", Box::new(|c| c.volumes[0].local_path = "data".into())),
            (
                "sub_path",
                Box::new(|c| {
                    c.volumes[0].source = VolumeSource::PersistentVolumeClaim {
                        claim_name: "x".into(),
                        sub_path: "../up".into(),
                    }
                }),
            ),
            ("default_limits", Box::new(|c| c.default_limits.memory_bytes = 0)),
            (
                "run_as_non_root",
                Box::new(|c| {
                    c.run_as_non_root = true;
                    c.run_as_user = Some(0);
                }),
            ),
        ];
        for (field, change) in cases {
            let mut c = config();
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let ok_port = KubernetesConfig {
            image_repository: "registry.local:5000/kaapana/jobs".into(),
            ..config()
        };
        assert!(ok_port.validate().is_ok());
    }

    #[test]
    fn configs_read_from_toml() {
        let text = r#"
            namespace = "site-a-jobs"
            image_repository = "registry.example.org/kaapana/jobs"
            runtime_class = "gvisor"
            node_selector = { "kaapana.io/jobs" = "true" }

            [[volumes]]
            local_path = "/data"
            type = "persistent_volume_claim"
            claim_name = "node-data"
            sub_path = "site-a"

            [[volumes]]
            local_path = "/data/datasets"
            type = "host_path"
            path = "/srv/ds"
        "#;
        let c: KubernetesConfig = toml::from_str(text).unwrap();
        let expected = KubernetesConfig {
            namespace: "site-a-jobs".into(),
            runtime_class: Some("gvisor".into()),
            node_selector: BTreeMap::from([("kaapana.io/jobs".into(), "true".into())]),
            ..config()
        };
        assert_eq!(c, expected);
        let typo = text.replace("runtime_class", "runtime_klass");
        let e = toml::from_str::<KubernetesConfig>(&typo).unwrap_err().to_string();
        assert!(e.contains("runtime_klass"), "{e}");
        let bad_type = text.replace("\"host_path\"", "\"nfs\"");
        assert!(toml::from_str::<KubernetesConfig>(&bad_type).is_err());
    }

    #[test]
    fn names_are_dns_labels() {
        let name = job_name(&JobId::from_bytes([0xff; 16]));
        assert!(is_dns_label(&name) && name.len() == 35, "{name}");
        assert!(!is_dns_label("-a") && !is_dns_label("a-") && !is_dns_label(&"a".repeat(64)));
        assert_eq!(deadline_seconds(Duration::ZERO), 1);
        assert_eq!(deadline_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(deadline_seconds(Duration::from_secs(3600)), 3600);
    }
}
