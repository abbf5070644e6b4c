//! Property tests of the signed envelope for every manifest type: sign → bytes → parse →
//! verify round-trips; parsing arbitrary, truncated or mutated bytes never panics; the
//! payload encoding is deterministic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Debug;

use common::{NOW, key, opts};
use kaapana_protocol::{
    Cancel, CapabilityAd, InstanceBundleInfo, JobManifest, JobUpdate, Manifest, ReplayWindow,
    ResultManifest, Signed, VerifyError, WorkflowManifest,
};
use proptest::prelude::*;

/// sign → as_bytes → from_bytes → verify gives back the payload, the id and the signer;
/// encoding and signing are deterministic; the payload bytes in the envelope are exactly the
/// postcard encoding.
fn round_trip<T: Manifest + PartialEq + Debug + Clone>(value: &T) {
    let encoded = postcard::to_allocvec(value).unwrap();
    assert_eq!(
        encoded,
        postcard::to_allocvec(&value.clone()).unwrap(),
        "encoding not deterministic"
    );
    let back: T = postcard::from_bytes(&encoded).unwrap();
    assert_eq!(&back, value);
    assert_eq!(postcard::to_allocvec(&back).unwrap(), encoded, "decode → encode changed bytes");

    let signed = Signed::sign(key(), value).unwrap();
    let again = Signed::sign(key(), value).unwrap();
    assert_eq!(signed.as_bytes(), again.as_bytes(), "signing not deterministic");
    assert!(signed.as_bytes().len() <= Signed::<T>::MAX_ENVELOPE);
    // The payload is the tail of the signed bytes, before the 64-byte signature.
    let bytes = signed.as_bytes();
    assert!(bytes[..bytes.len() - 64].ends_with(&encoded));
    assert_eq!(signed.kind(), T::KIND);
    assert_eq!(signed.claimed_signer(), key().instance_id());

    let parsed = Signed::<T>::from_bytes(bytes).unwrap();
    assert_eq!(parsed, signed);
    assert_eq!(parsed.id(), signed.id());
    assert_eq!(parsed.claimed_signer(), key().instance_id());

    let verified = parsed.verify(NOW, &opts()).unwrap();
    assert_eq!(verified.payload(), value);
    assert_eq!(verified.id(), signed.id());
    assert_eq!(verified.signer(), key().instance_id());
    assert_eq!(verified.signed().as_bytes(), bytes);

    let mut window = ReplayWindow::default();
    let fresh = parsed.verify_fresh(NOW, &opts(), &mut window).unwrap();
    assert_eq!(fresh.into_payload(), *value);
    assert!(matches!(
        parsed.verify_fresh(NOW, &opts(), &mut window),
        Err(VerifyError::Replayed { id }) if id == signed.id()
    ));
}

/// Every proper prefix of a valid envelope is rejected by `from_bytes` (and nothing panics).
fn truncations_rejected<T: Manifest>(value: &T) {
    let signed = Signed::sign(key(), value).unwrap();
    let bytes = signed.as_bytes();
    for len in 0..bytes.len() {
        let res = Signed::<T>::from_bytes(&bytes[..len]);
        assert!(res.is_err(), "prefix of {len}/{} bytes accepted", bytes.len());
    }
}

/// Random edits of a valid envelope never panic and are never accepted.
fn mutations_rejected<T: Manifest>(value: &T, edits: &[(usize, u8)]) {
    let signed = Signed::sign(key(), value).unwrap();
    let mut bytes = signed.as_bytes().to_vec();
    for &(pos, xor) in edits {
        let i = pos % bytes.len();
        bytes[i] ^= xor;
    }
    if bytes == signed.as_bytes() {
        return;
    }
    if let Ok(s) = Signed::<T>::from_bytes(&bytes) {
        assert!(s.verify(NOW, &opts()).is_err(), "mutated envelope verified");
    }
}

/// Arbitrary bytes: parsing and verifying never panics and never succeeds.
fn arbitrary_bytes_rejected<T: Manifest>(bytes: &[u8]) {
    if let Ok(s) = Signed::<T>::from_bytes(bytes) {
        let _ = s.id();
        assert!(s.verify(NOW, &opts()).is_err());
    }
}

macro_rules! manifest_properties {
    ($module:ident, $ty:ty, $strategy:expr) => {
        mod $module {
            use super::*;

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(64))]

                #[test]
                fn sign_parse_verify_round_trips(value in $strategy) {
                    round_trip::<$ty>(&value);
                }

                #[test]
                fn mutated_envelopes_rejected(
                    value in $strategy,
                    edits in proptest::collection::vec((any::<usize>(), 1..=255u8), 1..4),
                ) {
                    mutations_rejected::<$ty>(&value, &edits);
                }

                #[test]
                fn arbitrary_bytes_never_panic(
                    bytes in proptest::collection::vec(any::<u8>(), 0..600),
                ) {
                    arbitrary_bytes_rejected::<$ty>(&bytes);
                }

                #[test]
                fn arbitrary_bytes_behind_valid_prefix_never_panic(
                    tail in proptest::collection::vec(any::<u8>(), 0..600),
                ) {
                    // Format byte and a real domain tag, so the parser gets past the first
                    // checks into the signer and payload fields.
                    let domain = <$ty as Manifest>::KIND.domain();
                    let mut bytes = vec![1, u8::try_from(domain.len()).unwrap()];
                    bytes.extend_from_slice(domain.as_bytes());
                    bytes.extend_from_slice(&tail);
                    arbitrary_bytes_rejected::<$ty>(&bytes);
                }
            }

            proptest! {
                // Each case parses every prefix of an envelope: fewer cases.
                #![proptest_config(ProptestConfig::with_cases(8))]

                #[test]
                fn truncated_envelopes_rejected(value in $strategy) {
                    truncations_rejected::<$ty>(&value);
                }
            }
        }
    };
}

manifest_properties!(capability_ad, CapabilityAd, common::capability_ad());
manifest_properties!(workflow_manifest, WorkflowManifest, common::workflow_manifest());
manifest_properties!(job_manifest, JobManifest, common::job_manifest());
manifest_properties!(job_update, JobUpdate, common::job_update());
manifest_properties!(result_manifest, ResultManifest, common::result_manifest());
manifest_properties!(cancel, Cancel, common::cancel());
manifest_properties!(instance_bundle_info, InstanceBundleInfo, common::instance_bundle_info());

#[test]
fn typical_job_manifest_round_trips_and_is_about_one_kib() {
    let m = common::typical_job_manifest();
    let len = postcard::to_allocvec(&m).unwrap().len();
    assert!((900..=1200).contains(&len), "typical payload is {len} bytes");
    round_trip(&m);
    truncations_rejected(&m);
    round_trip(&common::typical_cancel());
    round_trip(&common::typical_workflow());
}

#[test]
fn arbitrary_bytes_for_every_kind_are_rejected_by_name() {
    // A tiny hand-written sample of classic garbage, each against all seven types.
    let samples: [&[u8]; 6] =
        [&[], &[1], &[0], &[0xff; 200], &[1; 65], &[1, 0xff, 0xff, 0xff, 0xff, 0x0f]];
    for s in samples {
        arbitrary_bytes_rejected::<CapabilityAd>(s);
        arbitrary_bytes_rejected::<WorkflowManifest>(s);
        arbitrary_bytes_rejected::<JobManifest>(s);
        arbitrary_bytes_rejected::<JobUpdate>(s);
        arbitrary_bytes_rejected::<ResultManifest>(s);
        arbitrary_bytes_rejected::<Cancel>(s);
        arbitrary_bytes_rejected::<InstanceBundleInfo>(s);
    }
}
