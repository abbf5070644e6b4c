//! Every single-bit change of a signed envelope is rejected, by `from_bytes` or by `verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{NOW, key, opts};
use kaapana_protocol::{Cancel, DecodeError, Manifest, Signed};

fn decode_label(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge { .. } => "too_large",
        DecodeError::UnsupportedFormat { .. } => "unsupported_format",
        DecodeError::UnsupportedVersion { .. } => "unsupported_version",
        DecodeError::Malformed { .. } => "malformed",
        DecodeError::TrailingBytes { .. } => "trailing_bytes",
        _ => "other",
    }
}

/// Flips each bit of `value`'s envelope in turn; returns (rejected at decode, at verify).
fn flip_every_bit<T: Manifest>(value: &T) -> (usize, usize) {
    let signed = Signed::sign(key(), value).unwrap();
    signed.verify(NOW, &opts()).unwrap();
    let original = signed.as_bytes().to_vec();
    let signature_start = original.len() - 64;
    let mut at_decode = 0;
    let mut at_verify = 0;
    let mut decode_reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut verify_reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut bytes = original.clone();
    for bit in 0..original.len() * 8 {
        let (i, mask) = (bit / 8, 1u8 << (bit % 8));
        bytes[i] ^= mask;
        match Signed::<T>::from_bytes(&bytes) {
            Err(e) => {
                at_decode += 1;
                *decode_reasons.entry(decode_label(&e)).or_default() += 1;
                assert!(i < signature_start, "flip in the signature failed to decode: {e}");
            }
            Ok(s) => match s.verify(NOW, &opts()) {
                Err(e) => {
                    at_verify += 1;
                    *verify_reasons.entry(e.reason()).or_default() += 1;
                }
                Ok(_) => panic!("flipping bit {bit} (byte {i}) still verifies"),
            },
        }
        bytes[i] ^= mask;
    }
    assert_eq!(bytes, original);
    println!(
        "{}: {} bytes, {} flips: {at_decode} rejected at decode {decode_reasons:?}, \
         {at_verify} at verify {verify_reasons:?}",
        T::KIND,
        original.len(),
        original.len() * 8
    );
    assert_eq!(at_decode + at_verify, original.len() * 8);
    (at_decode, at_verify)
}

#[test]
fn every_bit_flip_of_a_job_manifest_is_rejected() {
    let m = common::typical_job_manifest();
    let (at_decode, at_verify) = flip_every_bit(&m);
    // Flips inside the payload and the signature decode fine and fail the signature.
    assert!(at_verify > 7_000, "{at_verify}");
    assert!(at_decode > 0);
}

#[test]
fn every_bit_flip_of_a_cancel_is_rejected() {
    let c: Cancel = common::typical_cancel();
    let (at_decode, at_verify) = flip_every_bit(&c);
    assert!(at_decode > 0 && at_verify > 0);
}
