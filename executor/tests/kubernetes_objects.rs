//! The Kubernetes executor's objects: golden files (`tests/golden/kubernetes/*.json`;
//! `UPDATE_GOLDEN=1` rewrites them) and strict validation of every generated object against
//! the official schemas with `kubernetes-validate` (from the project's Python tools venv,
//! `kn_python_tools` in `scripts/common.sh`).
#![cfg(feature = "kubernetes")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kaapana_executor::JobRun;
use kaapana_executor::kubernetes::{
    DataVolume, KubernetesConfig, KubernetesError, VolumeSource, job_object, network_policy_object,
};
use kaapana_protocol::{ImageDigest, JobId, ResourceLimits};
use serde_json::Value;

/// The Kubernetes versions the objects are validated for: the one of the k8s-openapi
/// feature (`v1_33`) and the newest the validator knows.
const VERSIONS: [&str; 2] = ["1.33", "1.37"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The Python of the tools venv (created on first use by `kn_python_tools`).
fn python() -> PathBuf {
    let out = Command::new("bash")
        .arg("-c")
        .arg(". scripts/common.sh && kn_python_tools")
        .current_dir(workspace())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "kn_python_tools failed (it makes a venv with kubernetes-validate): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(!path.is_empty(), "kn_python_tools printed no path");
    PathBuf::from(path)
}

/// Validates the files strictly for `version`: `Err` with the validator's output unless it
/// exits 0 *and* reports every file as passed (it exits 0 for kinds it has no schema for).
fn validate(files: &[PathBuf], version: &str) -> Result<(), String> {
    let out = Command::new(python())
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .map_err(|e| format!("cannot run kubernetes-validate: {e}"))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("kubernetes-validate exited with {}:\n{text}", out.status));
    }
    for f in files {
        let f = f.display().to_string();
        let passed = text.lines().any(|l| l.contains(&f) && l.contains(" passed for resource "));
        if !passed {
            return Err(format!("kubernetes-validate did not pass {f}:\n{text}"));
        }
    }
    Ok(())
}

fn write_json(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(v).unwrap()).unwrap();
    path
}

const DATA: &str = "/var/lib/kaapana-node";

fn job_id() -> JobId {
    JobId::from_bytes([0x5a; 16])
}

fn digest() -> ImageDigest {
    ImageDigest::parse(&format!("sha256:{}", "ab12".repeat(16))).unwrap()
}

fn default_config() -> KubernetesConfig {
    KubernetesConfig {
        image_repository: "registry.example.org/kaapana/jobs".into(),
        volumes: vec![DataVolume {
            local_path: DATA.into(),
            source: VolumeSource::PersistentVolumeClaim {
                claim_name: "kaapana-node-data".into(),
                sub_path: String::new(),
            },
        }],
        ..KubernetesConfig::default()
    }
}

/// Every non-default setting.
fn custom_config() -> KubernetesConfig {
    KubernetesConfig {
        namespace: "site-a-jobs".into(),
        image_repository: "registry.local:5000/kaapana/jobs".into(),
        volumes: vec![
            DataVolume {
                local_path: DATA.into(),
                source: VolumeSource::PersistentVolumeClaim {
                    claim_name: "node-data".into(),
                    sub_path: "site-a".into(),
                },
            },
            DataVolume {
                local_path: "/srv/datasets".into(),
                source: VolumeSource::HostPath { path: "/mnt/pacs-export".into() },
            },
        ],
        runtime_class: Some("gvisor".into()),
        node_selector: BTreeMap::from([("kaapana.io/jobs".into(), "true".into())]),
        image_pull_secrets: vec!["registry-credentials".into()],
        default_limits: ResourceLimits { cpu_millis: 500, memory_bytes: 256 << 20, gpus: 0 },
        gpu_resource: "amd.com/gpu".into(),
        run_as_non_root: true,
        run_as_user: Some(1000),
        run_as_group: Some(1000),
        tmp_size_bytes: 64 << 20,
    }
}

fn job_dir() -> PathBuf {
    Path::new(DATA).join("jobs").join(job_id().to_string())
}

fn base_job() -> JobRun {
    JobRun {
        job_id: job_id(),
        work: kaapana_executor::JobWork::Container {
            image: digest(),
            command: vec!["/bin/kaapana-stats".into(), "/input".into(), "/output".into()],
            env: vec![("SITE".into(), "a".into()), ("LEVEL".into(), "2".into())],
        },
        input: Some(job_dir().join("input")),
        upstream: Vec::new(),
        output: job_dir().join("output"),
        log: job_dir().join("job.log"),
        limits: ResourceLimits { cpu_millis: 2000, memory_bytes: 4 << 30, gpus: 0 },
        timeout: Duration::from_secs(3600),
    }
}

/// The cases: (golden name, object).
fn cases() -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    let job = base_job();
    out.push(("job-default", json(&job_object(&job, &default_config()).unwrap())));

    // Upstream results only (an aggregation), limits 0 (the defaults), a fractional timeout,
    // every non-default setting.
    let aggregation = JobRun {
        input: None,
        upstream: vec![
            ("stats-site-a".into(), job_dir().join("inputs/stats-site-a")),
            ("stats-site-b".into(), job_dir().join("inputs/stats-site-b")),
        ],
        limits: ResourceLimits::default(),
        timeout: Duration::from_millis(90_500),
        ..base_job()
    };
    out.push(("job-upstream-custom", json(&job_object(&aggregation, &custom_config()).unwrap())));

    // A dataset on a host path and upstream results beside it.
    let both = JobRun {
        input: Some("/srv/datasets/ct-chest".into()),
        upstream: vec![("masks".into(), job_dir().join("inputs/masks"))],
        ..base_job()
    };
    out.push(("job-dataset-and-upstream", json(&job_object(&both, &custom_config()).unwrap())));

    // No data at all, the image's own command, one GPU.
    let bare = JobRun {
        work: kaapana_executor::JobWork::Container {
            image: digest(),
            command: Vec::new(),
            env: Vec::new(),
        },
        input: None,
        limits: ResourceLimits { cpu_millis: 0, memory_bytes: 0, gpus: 1 },
        ..base_job()
    };
    out.push(("job-no-data-gpu", json(&job_object(&bare, &default_config()).unwrap())));

    out.push(("networkpolicy-default", json(&network_policy_object(&job_id(), &default_config()))));
    out.push(("networkpolicy-custom", json(&network_policy_object(&job_id(), &custom_config()))));
    out
}

/// A k8s-openapi object as JSON (with its `apiVersion` and `kind`).
fn json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

#[test]
fn objects_match_their_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kubernetes");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    if update {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut mismatches = Vec::new();
    for (name, value) in cases() {
        let path = dir.join(format!("{name}.json"));
        let text = format!("{}\n", serde_json::to_string_pretty(&value).unwrap());
        if update {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(golden) if golden == text => {}
            Ok(_) => mismatches.push(format!("{} differs:\n{text}", path.display())),
            Err(e) => mismatches.push(format!(
                "{} cannot be read ({e}); run with UPDATE_GOLDEN=1 to write it",
                path.display()
            )),
        }
    }
    assert!(
        mismatches.is_empty(),
        "objects differ from their golden files (UPDATE_GOLDEN=1 rewrites them after review):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn every_object_passes_strict_schema_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> =
        cases().iter().map(|(name, v)| write_json(tmp.path(), name, v)).collect();
    for version in VERSIONS {
        if let Err(e) = validate(&files, version) {
            panic!("Kubernetes {version}: {e}");
        }
    }
}

#[test]
fn the_validator_rejects_broken_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let mut job = cases().remove(0).1;
    // An unknown field (strict), and a wrong type.
    job["spec"]["backoffLimits"] = Value::from(0);
    let unknown_field = write_json(tmp.path(), "unknown-field", &job);
    let mut job = cases().remove(0).1;
    job["spec"]["activeDeadlineSeconds"] = Value::from("3600");
    let wrong_type = write_json(tmp.path(), "wrong-type", &job);
    // A kind it has no schema for: the tool only warns and exits 0; the helper still fails.
    let unknown_kind = write_json(
        tmp.path(),
        "unknown-kind",
        &serde_json::json!({"apiVersion": "example.org/v1", "kind": "Thing", "metadata": {"name": "x"}}),
    );
    let good = write_json(tmp.path(), "good", &cases().remove(0).1);
    assert!(validate(std::slice::from_ref(&good), VERSIONS[0]).is_ok());
    for broken in [unknown_field, wrong_type, unknown_kind] {
        let e = validate(&[good.clone(), broken.clone()], VERSIONS[0])
            .expect_err(&format!("{} must fail validation", broken.display()));
        assert!(e.contains(&broken.display().to_string()), "{e}");
    }
}

#[test]
fn the_job_object_has_the_sandbox_the_issue_asks_for() {
    let job = cases().remove(0).1;
    let spec = &job["spec"];
    assert_eq!(job["apiVersion"], "batch/v1");
    assert_eq!(job["kind"], "Job");
    assert_eq!(job["metadata"]["name"], format!("kn-{}", job_id()));
    assert_eq!(job["metadata"]["labels"]["app.kubernetes.io/managed-by"], "kaapana-node");
    assert_eq!(job["metadata"]["labels"]["kaapana.io/job-id"], job_id().to_string());
    assert_eq!(spec["backoffLimit"], 0);
    assert_eq!(spec["activeDeadlineSeconds"], 3600);
    assert!(spec.get("ttlSecondsAfterFinished").is_none());
    let pod = &spec["template"]["spec"];
    assert_eq!(spec["template"]["metadata"]["labels"], job["metadata"]["labels"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["enableServiceLinks"], false);
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], format!("registry.example.org/kaapana/jobs@{}", digest()));
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["resources"]["limits"]["cpu"], "2000m");
    assert_eq!(c["resources"]["limits"]["memory"], (4u64 << 30).to_string());
    assert_eq!(c["resources"]["requests"], c["resources"]["limits"]);
    let mounts: Vec<(String, String, bool)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_owned(),
                m["subPath"].as_str().unwrap_or_default().to_owned(),
                m["readOnly"].as_bool().unwrap(),
            )
        })
        .collect();
    let jobs = format!("jobs/{}", job_id());
    assert_eq!(
        mounts,
        [
            ("/input".into(), format!("{jobs}/input"), true),
            ("/output".into(), format!("{jobs}/output"), false),
            ("/tmp".into(), String::new(), false),
        ]
    );

    let np = cases().into_iter().find(|(n, _)| *n == "networkpolicy-default").unwrap().1;
    assert_eq!(np["spec"]["policyTypes"], serde_json::json!(["Ingress", "Egress"]));
    assert!(np["spec"].get("ingress").is_none() && np["spec"].get("egress").is_none());
    assert_eq!(np["spec"]["podSelector"]["matchLabels"], job["metadata"]["labels"]);
}

#[test]
fn folders_off_the_volumes_and_bad_upstream_names_are_refused() {
    let outside = JobRun { input: Some("/home/someone/data".into()), ..base_job() };
    let e = job_object(&outside, &default_config()).unwrap_err();
    assert!(matches!(e, KubernetesError::NotOnVolume { .. }), "{e}");
    assert!(e.to_string().contains("/home/someone/data"), "{e}");
    for name in ["", "..", "a/b"] {
        let bad = JobRun { upstream: vec![(name.into(), job_dir().join("x"))], ..base_job() };
        let e = job_object(&bad, &default_config()).unwrap_err();
        assert!(matches!(e, KubernetesError::BadJob { .. }), "{name:?}: {e}");
    }
    let twice = JobRun {
        input: None,
        upstream: vec![("a".into(), job_dir().join("x")), ("a".into(), job_dir().join("y"))],
        ..base_job()
    };
    assert!(job_object(&twice, &default_config()).unwrap_err().to_string().contains("twice"));
    let no_repo = KubernetesConfig { image_repository: String::new(), ..default_config() };
    assert!(matches!(job_object(&base_job(), &no_repo), Err(KubernetesError::Config { .. })));
}
