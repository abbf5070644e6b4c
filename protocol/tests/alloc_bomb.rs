//! Length fields cannot make the decoder allocate what the message does not contain.
//!
//! A counting global allocator records the largest single allocation and the bytes allocated
//! while decoding tiny messages that declare huge `Vec`/`String`/byte lengths. This binary
//! has one test so that no other test allocates concurrently.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{NOW, key, opts, varint};
use kaapana_protocol::{
    CapabilityAd, DatasetSummary, DecodeError, ExecutorKind, JobManifest, Manifest, ManifestKind,
    NameScope, Resources, Signed, VerifyError, WorkflowManifest,
};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds relaxed counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        TOTAL.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        TOTAL.fetch_add(new_size, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f`, returning its result, the largest single allocation and the total allocated.
fn measured<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    TOTAL.store(0, Ordering::SeqCst);
    let r = f();
    (r, LARGEST.load(Ordering::SeqCst), TOTAL.load(Ordering::SeqCst))
}

const LIMIT: usize = 2 << 20;

/// Signs `body` as a `T` (so decoding gets past the signature) and verifies it.
fn payload_bomb<T: Manifest>(label: &str, body: &[u8]) {
    assert!(body.len() < 300, "{label}: the bomb itself must be tiny");
    let signed = Signed::<T>::sign_encoded(key(), body);
    let bytes = signed.into_bytes();
    let (res, largest, total) = measured(|| {
        let s = Signed::<T>::from_bytes(&bytes).unwrap();
        s.verify(NOW, &opts()).map(|_| ())
    });
    let err = res.expect_err(label);
    assert!(matches!(err, VerifyError::Decode(DecodeError::Malformed { .. })), "{label}: {err:?}");
    println!(
        "{label}: {} byte message, largest allocation {largest} B, total {total} B ({err})",
        bytes.len()
    );
    assert!(largest < LIMIT && total < 2 * LIMIT, "{label}: allocated {largest} / {total} bytes");
}

fn header_bytes() -> Vec<u8> {
    postcard::to_allocvec(&common::typical_cancel().header).unwrap()
}

#[test]
fn huge_declared_lengths_fail_fast_without_allocating() {
    let huge_lengths = [u64::from(u32::MAX), u64::MAX >> 1, u64::MAX];

    // Each bomb is `prefix ‖ huge length ‖ a few bytes`. Control: an honest encoding starts
    // with the same prefix followed by the field's real length, so the huge length sits
    // exactly where the field's length is read.
    let honest_ad = CapabilityAd {
        header: common::typical_cancel().header,
        sequence: 0,
        instance_name: String::new(),
        node_version: String::new(),
        executors: vec![ExecutorKind::Containerd, ExecutorKind::Kubernetes],
        allowed_images: vec![],
        allowed_workflows: NameScope::Only(vec![]),
        datasets: vec![DatasetSummary {
            name: "a".into(),
            items: 0,
            bytes: 0,
            tokens: vec![],
            modalities: vec![],
        }],
        resources: Resources::default(),
    };
    let honest_ad = postcard::to_allocvec(&honest_ad).unwrap();
    let mut ad_executors = header_bytes();
    ad_executors.extend_from_slice(&[0, 0, 0]); // sequence, instance_name, node_version
    assert!(honest_ad.starts_with(&[&ad_executors[..], &[2]].concat()));
    let ad_datasets = [&ad_executors[..], &[2, 0, 1, 0, 1, 0]].concat(); // .., images, workflows (Only(empty))
    assert!(honest_ad.starts_with(&[&ad_datasets[..], &[1]].concat()));

    let w = common::typical_workflow();
    let wf_jobs = postcard::to_allocvec(&(w.header, w.workflow_id, w.owner, &w.name)).unwrap();
    assert!(postcard::to_allocvec(&w).unwrap().starts_with(&[&wf_jobs[..], &[2]].concat()));

    let mut j = common::typical_job_manifest();
    j.dataset = None;
    let container = j.work.container().unwrap().clone();
    let honest_job = postcard::to_allocvec(&j).unwrap();
    let job_name =
        postcard::to_allocvec(&(j.header, j.job_id, j.workflow_id, j.owner, j.runner)).unwrap();
    assert!(honest_job.starts_with(&[&job_name[..], &varint(20)].concat()));
    assert_eq!(j.job_name.len(), 20);
    let job_command = postcard::to_allocvec(&(
        j.header,
        j.job_id,
        j.workflow_id,
        j.owner,
        j.runner,
        &j.job_name,
        j.attempt,
        None::<u8>,
        0u8, // Work::Container
        container.image,
    ))
    .unwrap();
    assert!(honest_job.starts_with(&[&job_command[..], &varint(18)].concat()));
    assert_eq!(container.command.len(), 18);

    let bomb = |prefix: &[u8], n: u64, tail: &[u8]| [prefix, &varint(n), tail].concat();
    for &n in &huge_lengths {
        payload_bomb::<CapabilityAd>(
            &format!("CapabilityAd.executors len {n}"),
            &bomb(&ad_executors, n, &[0, 1, 0, 1]),
        );
        payload_bomb::<CapabilityAd>(
            &format!("CapabilityAd.datasets len {n}"),
            &bomb(&ad_datasets, n, &[1, b'a', 0, 0]),
        );
        payload_bomb::<WorkflowManifest>(
            &format!("WorkflowManifest.jobs len {n}"),
            &bomb(&wf_jobs, n, b"\x04prep\x00"),
        );
        payload_bomb::<JobManifest>(
            &format!("JobManifest.job_name len {n}"),
            &bomb(&job_name, n, b"abc"),
        );
        payload_bomb::<JobManifest>(
            &format!("JobManifest.command len {n}"),
            &bomb(&job_command, n, b"\x02ls\x02-l"),
        );
    }

    // Envelope level: the payload field declares u32::MAX bytes in a tiny message.
    let signer = key().instance_id().to_bytes();
    let domain = ManifestKind::JobManifest.domain();
    for &n in &huge_lengths {
        let mut env = vec![1];
        env.extend_from_slice(&varint(u64::try_from(domain.len()).unwrap()));
        env.extend_from_slice(domain.as_bytes());
        env.extend_from_slice(&varint(u64::try_from(signer.len()).unwrap()));
        env.extend_from_slice(&signer);
        env.extend_from_slice(&varint(n));
        env.extend_from_slice(&[0x01; 8]);
        env.extend_from_slice(&[0u8; 64]);
        let (res, largest, total) = measured(|| Signed::<JobManifest>::from_bytes(&env));
        let err = res.unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { what: "envelope", .. }), "{err:?}");
        println!(
            "envelope payload len {n}: largest allocation {largest} B, total {total} B ({err})"
        );
        assert!(largest < LIMIT && total < 2 * LIMIT);
    }
}
