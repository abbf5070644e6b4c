//! Shared helpers of the integration tests: fixed keys, a fixed `now`, a typical job manifest
//! and proptest strategies for every manifest type and its parts.
//!
//! Every generated manifest passes validation, is valid at [`NOW`] under the default
//! [`VerifyOptions`] and stays well below its type's size limit.
#![allow(dead_code, unreachable_pub)]

use std::sync::OnceLock;
use std::time::Duration;

use kaapana_protocol::{
    BlobRef, Cancel, CapabilityAd, CapabilityQuery, ContainerWork, DagRun, DatasetRef,
    DatasetSummary, EnvVar, ExecutorKind, ExitStatus, Gpu, Header, ImageDigest, InputBundle,
    InstanceBundleInfo, InstanceId, ItemToken, JobId, JobManifest, JobSpec, JobState, JobTimings,
    JobUpdate, ModalityCount, NameScope, PROTOCOL_VERSION, Pick, Processing, ResourceLimits,
    Resources, ResultManifest, RunnerSelector, Sha256Digest, SigningKey, Timestamp, VerifyOptions,
    Work, WorkflowId, WorkflowManifest,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

/// The receiver's clock in every test: 2026-11-25T22:30:41.123Z.
pub const NOW_MILLIS: u64 = 1_795_645_841_123;
/// [`NOW_MILLIS`] as a timestamp.
pub const NOW: Timestamp = Timestamp::from_millis(NOW_MILLIS);

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

/// DER prefix of an Ed25519 PKCS#8 v1 document (RFC 8410); the 32-byte seed follows.
const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A fixed PKCS#8 document for the Ed25519 seed `[seed; 32]`.
pub fn pkcs8_for_seed(seed: u8) -> Vec<u8> {
    let mut der = PKCS8_V1_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&[seed; 32]);
    der
}

/// The fixed key most tests sign with.
pub fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_pkcs8(&pkcs8_for_seed(0x4b)).expect("fixed test key"))
}

/// A second fixed key (a different instance).
pub fn other_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_pkcs8(&pkcs8_for_seed(0x5c)).expect("fixed test key"))
}

/// Instance ids of a few fixed Ed25519 keys.
pub fn instance_pool() -> &'static [InstanceId] {
    static POOL: OnceLock<Vec<InstanceId>> = OnceLock::new();
    POOL.get_or_init(|| {
        (1..=4u8)
            .map(|s| SigningKey::from_pkcs8(&pkcs8_for_seed(s)).expect("fixed key").instance_id())
            .collect()
    })
}

/// A SHA-256 based `PeerId` (as an RSA instance would have): valid as an owner or runner
/// field, but it embeds no key, so it cannot sign.
pub fn sha256_instance_id(digest: [u8; 32]) -> InstanceId {
    let mut bytes = vec![0x12, 0x20];
    bytes.extend_from_slice(&digest);
    InstanceId::from_bytes(&bytes).expect("sha256 multihash PeerId")
}

/// The default receiver options.
pub fn opts() -> VerifyOptions {
    VerifyOptions::default()
}

/// A header valid at [`NOW`]: issued `issued_ago` before now, valid `valid_for` after now.
pub fn header_around_now(issued_ago: Duration, valid_for: Duration) -> Header {
    Header {
        protocol_version: PROTOCOL_VERSION,
        issued_at: NOW.saturating_sub(issued_ago),
        expires_at: NOW.saturating_add(valid_for),
    }
}

/// A header from absolute millisecond offsets relative to [`NOW`].
pub fn header_at(issued_offset_ms: i64, expires_offset_ms: i64) -> Header {
    let at = |off: i64| {
        let abs = Duration::from_millis(off.unsigned_abs());
        if off < 0 { NOW.saturating_sub(abs) } else { NOW.saturating_add(abs) }
    };
    Header {
        protocol_version: PROTOCOL_VERSION,
        issued_at: at(issued_offset_ms),
        expires_at: at(expires_offset_ms),
    }
}

fn digest_of(s: &str) -> Sha256Digest {
    Sha256Digest::of(s.as_bytes())
}

/// A realistic job manifest whose encoded payload is about 1 KiB: a command line, an
/// environment, three upstream inputs and a dataset.
pub fn typical_job_manifest() -> JobManifest {
    let pool = instance_pool();
    JobManifest {
        header: header_around_now(Duration::from_secs(5), Duration::from_secs(24 * 3600)),
        job_id: JobId::from_bytes([0x11; 16]),
        workflow_id: WorkflowId::from_bytes([0x22; 16]),
        owner: pool[0],
        runner: pool[1],
        job_name: "nnunet-predict-liver".into(),
        attempt: 0,
        dataset: Some(DatasetRef {
            name: "lits-ct-abdomen-2024".into(),
            item: Some(ItemToken([0x33; 32])),
        }),
        work: Work::Container(ContainerWork {
            image: ImageDigest(digest_of("registry.kaapana.local/nnunet-predict:0.4.1")),
            command: [
                "python3",
                "-m",
                "nnunet.inference.predict",
                "--input",
                "/input/dicom-to-nifti",
                "--output",
                "/output/segmentations",
                "--task",
                "Task003_Liver",
                "--model",
                "3d_fullres",
                "--folds",
                "0,1,2,3,4",
                "--disable-tta",
                "--num-threads-preprocessing",
                "4",
                "--mode",
                "normal",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            env: [
                ("NNUNET_PREPROCESSED", "/models/nnunet/preprocessed"),
                ("RESULTS_FOLDER", "/models/nnunet/results"),
                ("OMP_NUM_THREADS", "4"),
                ("CUDA_VISIBLE_DEVICES", "0"),
                ("KAAPANA_WORKFLOW_ID", "2222222222222222"),
                ("KAAPANA_OPERATOR", "nnunet-predict"),
                ("LOG_LEVEL", "info"),
                ("NNUNET_INFERENCE_STEP_SIZE", "0.5"),
                ("KAAPANA_ITEM_FILTER", "modality=CT;body_part=ABDOMEN;slice_thickness<=2.5mm"),
            ]
            .iter()
            .map(|(n, v)| EnvVar { name: (*n).to_owned(), value: (*v).to_owned() })
            .collect(),
        }),
        limits: ResourceLimits { cpu_millis: 4000, memory_bytes: 16 << 30, gpus: 1 },
        timeout_secs: 4 * 3600,
        inputs: ["dicom-to-nifti", "get-input-data", "organ-segmentation-prep"]
            .iter()
            .enumerate()
            .map(|(i, name)| InputBundle {
                job_name: (*name).to_owned(),
                job_id: JobId::from_bytes([u8::try_from(i).unwrap_or(0) + 0x40; 16]),
                bundle: BlobRef { digest: digest_of(name), size: 734_003_200 },
            })
            .collect(),
        workflow_name: "liver-segmentation".into(),
    }
}

/// A small, valid cancel message.
pub fn typical_cancel() -> Cancel {
    Cancel {
        header: header_around_now(Duration::from_secs(1), Duration::from_secs(600)),
        workflow_id: WorkflowId::from_bytes([0x22; 16]),
        job_id: Some(JobId::from_bytes([0x11; 16])),
        reason: "aborted by the owner".into(),
    }
}

/// A valid two-step workflow (`prep` → `train`).
pub fn typical_workflow() -> WorkflowManifest {
    let spec = |name: &str, inputs: &[&str]| JobSpec {
        name: name.into(),
        runner: RunnerSelector::Owner,
        dataset: None,
        processing: Processing::Batch,
        work: Work::Container(ContainerWork {
            image: ImageDigest(digest_of(name)),
            command: vec!["run".into()],
            env: vec![],
        }),
        limits: ResourceLimits::default(),
        timeout_secs: 60,
        inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
        max_retries: 2,
    };
    WorkflowManifest {
        header: header_around_now(Duration::from_secs(1), Duration::from_secs(3600)),
        workflow_id: WorkflowId::from_bytes([0x22; 16]),
        owner: instance_pool()[0],
        name: "federated-training".into(),
        jobs: vec![spec("prep", &[]), spec("train", &["prep"])],
        rounds: None,
    }
}

/// Postcard's varint encoding of `v` (LEB128, 7 bits per byte).
pub fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let low = u8::try_from(v & 0x7f).unwrap_or(0);
        v >>= 7;
        if v == 0 {
            out.push(low);
            return out;
        }
        out.push(low | 0x80);
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Headers valid at [`NOW`]: issued up to 4 minutes ahead (within the default 5-minute skew)
/// or up to a day ago; expiring 1 s to 20 days after now (lifetime below the 30-day limit).
pub fn header() -> impl Strategy<Value = Header> {
    (0..=DAY, 0..=240_000u64, 1_000..=20 * DAY).prop_map(|(ago, ahead, remaining)| {
        let issued = NOW_MILLIS - ago + ahead;
        Header {
            protocol_version: PROTOCOL_VERSION,
            issued_at: Timestamp::from_millis(issued),
            expires_at: Timestamp::from_millis(issued.max(NOW_MILLIS) + remaining),
        }
    })
}

/// Valid names (`[A-Za-z0-9._-]`, not starting with `.` or `-`).
pub fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9._-]{0,24}"
}

/// Free text without control characters (any other Unicode), at most 40 chars.
pub fn text() -> impl Strategy<Value = String> {
    "\\PC{0,40}"
}

pub fn sha256_digest() -> impl Strategy<Value = Sha256Digest> {
    any::<[u8; 32]>().prop_map(Sha256Digest)
}

pub fn image_digest() -> impl Strategy<Value = ImageDigest> {
    sha256_digest().prop_map(ImageDigest)
}

pub fn job_id() -> impl Strategy<Value = JobId> {
    any::<[u8; 16]>().prop_map(JobId::from_bytes)
}

pub fn workflow_id() -> impl Strategy<Value = WorkflowId> {
    any::<[u8; 16]>().prop_map(WorkflowId::from_bytes)
}

/// Ed25519 instance ids from a fixed pool, or SHA-256 based ones.
pub fn instance_id() -> impl Strategy<Value = InstanceId> {
    prop_oneof![
        (0..instance_pool().len()).prop_map(|i| instance_pool()[i]),
        any::<[u8; 32]>().prop_map(sha256_instance_id),
    ]
}

pub fn timestamp() -> impl Strategy<Value = Timestamp> {
    any::<u64>().prop_map(Timestamp::from_millis)
}

pub fn executor_kind() -> impl Strategy<Value = ExecutorKind> {
    prop_oneof![
        Just(ExecutorKind::Containerd),
        Just(ExecutorKind::Kubernetes),
        Just(ExecutorKind::Airflow)
    ]
}

pub fn dataset_summary() -> impl Strategy<Value = DatasetSummary> {
    (
        name(),
        any::<u64>(),
        any::<u64>(),
        vec(any::<[u8; 32]>(), 0..3),
        proptest::sample::subsequence(vec!["CT", "MR", "CR", "SEG", "OT"], 0..3),
        vec(0u64..1000, 3),
    )
        .prop_map(|(name, items, bytes, tokens, modalities, counts)| {
            let modalities: Vec<ModalityCount> = modalities
                .into_iter()
                .zip(counts)
                .map(|(m, items)| ModalityCount { modality: m.to_owned(), items })
                .collect();
            let counted: u64 = modalities.iter().map(|m| m.items).sum();
            DatasetSummary {
                name,
                items: items.max(tokens.len() as u64).max(counted),
                bytes,
                tokens: tokens.into_iter().map(ItemToken).collect(),
                modalities,
            }
        })
}

pub fn gpu() -> impl Strategy<Value = Gpu> {
    ("\\PC{0,30}", any::<u64>()).prop_map(|(model, memory_bytes)| Gpu { model, memory_bytes })
}

pub fn resources() -> impl Strategy<Value = Resources> {
    (any::<u32>(), any::<u64>(), vec(gpu(), 0..3))
        .prop_map(|(cpu_millis, memory_bytes, gpus)| Resources { cpu_millis, memory_bytes, gpus })
}

pub fn capability_ad() -> impl Strategy<Value = CapabilityAd> {
    (
        header(),
        any::<u64>(),
        text(),
        "\\PC{0,30}",
        vec(executor_kind(), 0..3),
        vec(image_digest(), 0..4),
        prop_oneof![Just(NameScope::Any), vec(name(), 0..4).prop_map(NameScope::Only)],
        vec(dataset_summary(), 0..4),
        resources(),
    )
        .prop_map(
            |(
                header,
                sequence,
                instance_name,
                node_version,
                executors,
                allowed_images,
                allowed_workflows,
                datasets,
                resources,
            )| CapabilityAd {
                header,
                sequence,
                instance_name,
                node_version,
                executors,
                allowed_images,
                allowed_workflows,
                datasets,
                resources,
            },
        )
}

pub fn processing() -> impl Strategy<Value = Processing> {
    prop_oneof![
        Just(Processing::Batch),
        (1..=u32::MAX).prop_map(|max_parallel| Processing::SingleFile { max_parallel }),
    ]
}

pub fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![Just(Pick::All), Just(Pick::Best)]
}

pub fn capability_query() -> impl Strategy<Value = CapabilityQuery> {
    (option::of(name()), any::<bool>(), any::<u32>(), any::<u64>(), pick()).prop_map(
        |(dataset, gpu, min_cpu_millis, min_memory_bytes, pick)| CapabilityQuery {
            dataset,
            gpu,
            min_cpu_millis,
            min_memory_bytes,
            pick,
        },
    )
}

pub fn runner_selector() -> impl Strategy<Value = RunnerSelector> {
    prop_oneof![
        Just(RunnerSelector::Owner),
        instance_id().prop_map(RunnerSelector::Instance),
        capability_query().prop_map(RunnerSelector::Query),
    ]
}

pub fn env_var() -> impl Strategy<Value = EnvVar> {
    ("[A-Za-z_][A-Za-z0-9_]{0,24}", text()).prop_map(|(name, value)| EnvVar { name, value })
}

/// A DAG run's conf: a JSON object of a few string and number values.
pub fn dag_conf() -> impl Strategy<Value = String> {
    vec(("[a-z_]{1,12}", text(), any::<i32>()), 0..4).prop_map(|entries| {
        let map: serde_json::Map<String, serde_json::Value> = entries
            .into_iter()
            .flat_map(|(k, v, n)| {
                [(format!("{k}_s"), serde_json::Value::from(v)), (k, serde_json::Value::from(n))]
            })
            .collect();
        serde_json::Value::Object(map).to_string()
    })
}

/// A job's work: a container (image, command, environment) or an Airflow DAG run.
pub fn work() -> impl Strategy<Value = Work> {
    prop_oneof![
        (image_digest(), vec(text(), 0..6), vec(env_var(), 0..4)).prop_map(
            |(image, command, env)| Work::Container(ContainerWork { image, command, env })
        ),
        (name(), dag_conf()).prop_map(|(dag_id, conf)| Work::AirflowDag(DagRun { dag_id, conf })),
    ]
}

pub fn resource_limits() -> impl Strategy<Value = ResourceLimits> {
    (any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(cpu_millis, memory_bytes, gpus)| {
        ResourceLimits { cpu_millis, memory_bytes, gpus }
    })
}

/// A job spec without inputs; [`workflow_manifest`] names them and wires the DAG.
pub fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        name(),
        runner_selector(),
        option::of(name()),
        processing(),
        work(),
        resource_limits(),
        1..=u32::MAX,
    )
        .prop_map(|(name, runner, dataset, processing, work, limits, timeout_secs)| JobSpec {
            name,
            runner,
            dataset,
            processing,
            work,
            limits,
            timeout_secs,
            inputs: vec![],
            max_retries: timeout_secs % 4,
        })
}

/// Workflows whose jobs form a DAG (job `i` reads a subset of jobs `0..i`), listed in a
/// random order.
pub fn workflow_manifest() -> impl Strategy<Value = WorkflowManifest> {
    (header(), workflow_id(), instance_id(), name(), vec(job_spec(), 1..6))
        .prop_flat_map(|(header, workflow_id, owner, name, jobs)| {
            let inputs: Vec<_> = (0..jobs.len())
                .map(|i| proptest::sample::subsequence((0..i).collect::<Vec<_>>(), 0..=i))
                .collect();
            (Just(header), Just(workflow_id), Just(owner), Just(name), Just(jobs), inputs)
        })
        .prop_flat_map(|(header, workflow_id, owner, name, mut jobs, inputs)| {
            for (i, job) in jobs.iter_mut().enumerate() {
                job.name = format!("j{i}-{}", job.name);
            }
            let names: Vec<String> = jobs.iter().map(|j| j.name.clone()).collect();
            for (job, ins) in jobs.iter_mut().zip(inputs) {
                job.inputs = ins.into_iter().map(|k| names[k].clone()).collect();
            }
            (Just(header), Just(workflow_id), Just(owner), Just(name), Just(jobs).prop_shuffle())
        })
        .prop_map(|(header, workflow_id, owner, name, jobs)| WorkflowManifest {
            header,
            workflow_id,
            owner,
            name,
            jobs,
            rounds: None,
        })
}

pub fn item_token() -> impl Strategy<Value = ItemToken> {
    any::<[u8; 32]>().prop_map(ItemToken)
}

pub fn dataset_ref() -> impl Strategy<Value = DatasetRef> {
    (name(), option::of(item_token())).prop_map(|(name, item)| DatasetRef { name, item })
}

pub fn blob_ref() -> impl Strategy<Value = BlobRef> {
    (sha256_digest(), any::<u64>()).prop_map(|(digest, size)| BlobRef { digest, size })
}

pub fn input_bundle() -> impl Strategy<Value = InputBundle> {
    (name(), job_id(), blob_ref()).prop_map(|(job_name, job_id, bundle)| InputBundle {
        job_name,
        job_id,
        bundle,
    })
}

pub fn job_manifest() -> impl Strategy<Value = JobManifest> {
    (
        (header(), job_id(), workflow_id(), instance_id(), instance_id(), name(), any::<u32>()),
        (
            option::of(dataset_ref()),
            work(),
            resource_limits(),
            1..=u32::MAX,
            vec(input_bundle(), 0..4),
            name(),
        ),
    )
        .prop_map(
            |(
                (header, job_id, workflow_id, owner, runner, job_name, attempt),
                (dataset, work, limits, timeout_secs, inputs, workflow_name),
            )| JobManifest {
                header,
                job_id,
                workflow_id,
                owner,
                runner,
                job_name,
                attempt,
                dataset,
                work,
                limits,
                timeout_secs,
                inputs,
                workflow_name,
            },
        )
}

pub fn job_state() -> impl Strategy<Value = JobState> {
    prop_oneof![
        Just(JobState::Queued),
        any::<bool>().prop_map(|awaiting_approval| JobState::Pending { awaiting_approval }),
        Just(JobState::Scheduled),
        Just(JobState::Running),
        Just(JobState::Finished),
        Just(JobState::Failed),
    ]
}

pub fn job_update() -> impl Strategy<Value = JobUpdate> {
    (
        header(),
        job_id(),
        workflow_id(),
        any::<u32>(),
        any::<u32>(),
        job_state(),
        option::of(text()),
        any::<bool>(),
    )
        .prop_map(
            |(header, job_id, workflow_id, attempt, sequence, state, reason, retryable)| {
                JobUpdate {
                    header,
                    job_id,
                    workflow_id,
                    attempt,
                    sequence,
                    state,
                    reason,
                    retryable,
                }
            },
        )
}

pub fn exit_status() -> impl Strategy<Value = ExitStatus> {
    prop_oneof![
        any::<i32>().prop_map(ExitStatus::Exited),
        Just(ExitStatus::TimedOut),
        Just(ExitStatus::OutOfMemory),
        any::<u8>().prop_map(ExitStatus::Killed),
    ]
}

/// Ordered phase times (received ≤ started ≤ finished).
pub fn job_timings() -> impl Strategy<Value = JobTimings> {
    vec(any::<u64>(), 3).prop_map(|mut t| {
        t.sort_unstable();
        JobTimings {
            received_at: Timestamp::from_millis(t[0]),
            started_at: Timestamp::from_millis(t[1]),
            finished_at: Timestamp::from_millis(t[2]),
        }
    })
}

pub fn result_manifest() -> impl Strategy<Value = ResultManifest> {
    (
        header(),
        job_id(),
        workflow_id(),
        any::<u32>(),
        exit_status(),
        blob_ref(),
        option::of(blob_ref()),
        job_timings(),
    )
        .prop_map(|(header, job_id, workflow_id, attempt, exit, bundle, log, timings)| {
            ResultManifest { header, job_id, workflow_id, attempt, exit, bundle, log, timings }
        })
}

pub fn cancel() -> impl Strategy<Value = Cancel> {
    (header(), workflow_id(), option::of(job_id()), text()).prop_map(
        |(header, workflow_id, job_id, reason)| Cancel { header, workflow_id, job_id, reason },
    )
}

pub fn instance_bundle_info() -> impl Strategy<Value = InstanceBundleInfo> {
    (header(), "\\PC{1,40}", vec("\\PC{0,60}", 0..4), sha256_digest()).prop_map(
        |(header, display_name, listen_addrs, certificate_sha256)| InstanceBundleInfo {
            header,
            display_name,
            listen_addrs,
            certificate_sha256,
        },
    )
}
