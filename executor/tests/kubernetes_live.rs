//! The Kubernetes executor against a real cluster, only when `KUBECONFIG` is set (no API
//! server can run on the project's machines; without `KUBECONFIG` the test says so and does
//! nothing).
//!
//! Settings, from the environment:
//! - `KN_K8S_IMAGE`: a job image by digest with `/bin/sh`, e.g.
//!   `registry.example.org/library/busybox@sha256:…` (required);
//! - `KN_K8S_NAMESPACE`: the namespace (default `default`); the account needs the permissions
//!   listed in the executor's module docs;
//! - `KN_K8S_DATA_DIR`: a folder this process sees that the pods can mount (default: a new
//!   folder under the system's temp dir), either through `KN_K8S_DATA_PVC` (a claim whose
//!   root is that folder) or as a host path (`KN_K8S_DATA_HOSTPATH`, default the same path:
//!   a single-node cluster on this host).
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use kaapana_executor::kubernetes::{
    DataVolume, KubernetesConfig, KubernetesExecutor, VolumeSource,
};
use kaapana_executor::{Executor, JobRun};
use kaapana_protocol::{ExitStatus, ImageDigest, JobId, ResourceLimits};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn new_job_id(n: u8) -> JobId {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
    let mut bytes = [0u8; 16];
    bytes[..15].copy_from_slice(&nanos.to_le_bytes()[..15]);
    bytes[15] = n;
    JobId::from_bytes(bytes)
}

#[tokio::test]
async fn live_jobs_run_in_the_cluster_when_kubeconfig_is_set() {
    if env("KUBECONFIG").is_none() {
        println!(
            "KUBECONFIG is not set: the live Kubernetes test does nothing (no API server runs \
             here; the mock tests cover the flow)"
        );
        return;
    }
    let image = env("KN_K8S_IMAGE").expect(
        "KUBECONFIG is set, so the live test runs: set KN_K8S_IMAGE to a job image by digest \
         with /bin/sh (repository@sha256:...)",
    );
    let (repository, digest) =
        image.rsplit_once('@').expect("KN_K8S_IMAGE must be repository@sha256:<digest>");
    let digest = ImageDigest::parse(digest).expect("KN_K8S_IMAGE must end in @sha256:<digest>");
    let tmp;
    let data = match env("KN_K8S_DATA_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_owned()
        }
    };
    let data = data.canonicalize().unwrap();
    let source = match env("KN_K8S_DATA_PVC") {
        Some(claim_name) => {
            VolumeSource::PersistentVolumeClaim { claim_name, sub_path: String::new() }
        }
        None => VolumeSource::HostPath {
            path: env("KN_K8S_DATA_HOSTPATH").map_or_else(|| data.clone(), PathBuf::from),
        },
    };
    let config = KubernetesConfig {
        namespace: env("KN_K8S_NAMESPACE").unwrap_or_else(|| "default".into()),
        image_repository: repository.into(),
        volumes: vec![DataVolume { local_path: data.clone(), source }],
        ..KubernetesConfig::default()
    };
    let executor = KubernetesExecutor::from_environment(config).await.unwrap();

    let cases: [(&str, u64, ExitStatus); 3] = [
        (
            "echo hello from kaapana-node; ls /input; echo 42 > /output/answer",
            120,
            ExitStatus::Exited(0),
        ),
        ("echo failing; exit 3", 120, ExitStatus::Exited(3)),
        ("echo sleeping; sleep 300", 5, ExitStatus::TimedOut),
    ];
    for (n, (script, timeout, expected)) in cases.into_iter().enumerate() {
        let id = new_job_id(u8::try_from(n).unwrap());
        let dir = data.join("jobs").join(id.to_string());
        std::fs::create_dir_all(dir.join("output")).unwrap();
        let job = JobRun {
            job_id: id,
            work: kaapana_executor::JobWork::Container {
                image: digest,
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: Vec::new(),
            },
            input: None,
            upstream: Vec::new(),
            output: dir.join("output"),
            log: dir.join("job.log"),
            limits: ResourceLimits { cpu_millis: 200, memory_bytes: 64 << 20, gpus: 0 },
            timeout: Duration::from_secs(timeout),
        };
        let outcome = executor.run(job.clone()).await.unwrap();
        let log = std::fs::read_to_string(&job.log).unwrap_or_default();
        assert_eq!(outcome.exit, expected, "{script}: log:\n{log}");
        let first_word = script.split(';').next().unwrap().trim_start_matches("echo ");
        assert!(log.contains(first_word), "{script}: log:\n{log}");
        if expected == ExitStatus::Exited(0) {
            let answer = std::fs::read_to_string(dir.join("output/answer")).unwrap();
            assert_eq!(answer.trim(), "42");
        }
        assert!(!executor.running().await.unwrap().contains(&id), "{id} was not cleaned up");
    }
}
