//! The encoding is canonical (crate description, ARCHITECTURE.md, `DecodeError::TrailingBytes`):
//! one value has one byte string, so a message's id (SHA-256 of the signed bytes) names its
//! content. A receiver must therefore reject correctly signed bytes that decode to a value
//! whose encoding is different, e.g. postcard varints with redundant continuation bytes
//! (`0x81 0x00` for 1), which postcard's decoder accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NOW, key, opts, varint};
use kaapana_protocol::{Cancel, JobManifest, Manifest, ManifestKind, Signed};

/// `varint(v)` with one redundant continuation byte: same value, one byte longer.
fn overlong(v: u64) -> Vec<u8> {
    let mut out = varint(v);
    let last = out.len() - 1;
    out[last] |= 0x80;
    out.push(0);
    out
}

/// Signs `body` as it is and reports whether a receiver accepts it.
fn accepted<T: Manifest>(body: &[u8]) -> bool {
    let signed = Signed::<T>::sign_encoded(key(), body);
    Signed::<T>::from_bytes(signed.as_bytes()).is_ok_and(|s| s.verify(NOW, &opts()).is_ok())
}

#[test]
fn overlong_helper_decodes_to_the_same_value() {
    for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX)] {
        let long = overlong(v);
        assert_eq!(long.len(), varint(v).len() + 1);
        assert_eq!(postcard::from_bytes::<u64>(&long).unwrap(), v);
    }
}

#[test]
fn honest_payloads_are_accepted() {
    assert!(accepted::<Cancel>(&postcard::to_allocvec(&common::typical_cancel()).unwrap()));
    let job = postcard::to_allocvec(&common::typical_job_manifest()).unwrap();
    assert!(accepted::<JobManifest>(&job));
}

#[test]
fn payload_with_overlong_varint_is_rejected() {
    let c = common::typical_cancel();
    let honest = postcard::to_allocvec(&c).unwrap();
    // The payload starts with header.protocol_version (one byte).
    assert_eq!(u16::from(honest[0]), kaapana_protocol::PROTOCOL_VERSION);
    let padded = [&overlong(honest[0].into())[..], &honest[1..]].concat();
    assert_eq!(postcard::from_bytes::<Cancel>(&padded).unwrap(), c, "same value");
    assert_ne!(
        Signed::<Cancel>::sign_encoded(key(), &padded).id(),
        Signed::<Cancel>::sign_encoded(key(), &honest).id(),
        "different id"
    );
    assert!(
        !accepted::<Cancel>(&padded),
        "a non-canonical encoding of a Cancel (overlong protocol_version varint) verifies: \
         the same content then has two ManifestIds"
    );
}

#[test]
fn envelope_with_overlong_length_is_rejected() {
    // format ‖ domain ‖ signer ‖ payload, with the payload's length prefix one byte too long,
    // correctly signed.
    let body = postcard::to_allocvec(&common::typical_cancel()).unwrap();
    let domain = ManifestKind::Cancel.domain();
    let signer = key().instance_id().to_bytes();
    let mut bytes = vec![1];
    bytes.extend_from_slice(&varint(u64::try_from(domain.len()).unwrap()));
    bytes.extend_from_slice(domain.as_bytes());
    bytes.extend_from_slice(&varint(u64::try_from(signer.len()).unwrap()));
    bytes.extend_from_slice(&signer);
    bytes.extend_from_slice(&overlong(u64::try_from(body.len()).unwrap()));
    bytes.extend_from_slice(&body);
    let signature = key().sign_raw(&bytes);
    bytes.extend_from_slice(&signature);
    let accepted =
        Signed::<Cancel>::from_bytes(&bytes).is_ok_and(|s| s.verify(NOW, &opts()).is_ok());
    assert!(!accepted, "an envelope with an overlong payload-length varint verifies");
}
