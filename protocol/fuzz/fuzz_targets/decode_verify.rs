//! Fuzzes the receive path of every signed message type: `Signed::<T>::from_bytes`, then
//! `verify` and `verify_fresh` at a fixed `now`. Nothing may panic.
//!
//! Input: the first byte selects the type, `(b & 0x7f) % 7` in `ManifestKind::ALL` order.
//! - high bit clear: the rest is an envelope as received from the network;
//! - high bit set: the rest is a payload, signed here with a fixed key (`sign_encoded`), so
//!   that arbitrary payload bytes get past the signature check into payload decoding,
//!   version, time and content checks.
#![no_main]
#![allow(missing_docs)]

use std::fmt::Debug;
use std::sync::OnceLock;

use kaapana_protocol::{
    Cancel, CapabilityAd, InstanceBundleInfo, JobManifest, JobUpdate, Manifest, ReplayWindow,
    ResultManifest, Signed, SigningKey, Timestamp, VerifyError, VerifyOptions, WorkflowManifest,
};
use libfuzzer_sys::fuzz_target;

/// Same instant as the integration tests' `common::NOW`, so seeds verify.
const NOW: Timestamp = Timestamp::from_millis(1_795_645_841_123);

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        // Ed25519 PKCS#8 v1 with the seed [0x4b; 32] (the integration tests' `common::key`).
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&[0x4b; 32]);
        SigningKey::from_pkcs8(&der).expect("fixed key")
    })
}

fn check<T: Manifest + PartialEq + Debug>(data: &[u8], sign_here: bool) {
    let own;
    let bytes = if sign_here {
        own = Signed::<T>::sign_encoded(key(), data).into_bytes();
        &own[..]
    } else {
        data
    };
    let signed = match Signed::<T>::from_bytes(bytes) {
        Ok(s) => s,
        Err(e) => {
            let _ = e.to_string();
            // Our own well-formed envelope of an in-limit payload must parse.
            assert!(!(sign_here && data.len() <= T::MAX_PAYLOAD), "own envelope rejected: {e}");
            return;
        }
    };
    assert_eq!(signed.as_bytes(), bytes);
    let opts = VerifyOptions::default();
    let first = signed.verify(NOW, &opts);
    let mut window = ReplayWindow::with_capacity(4);
    let fresh = signed.verify_fresh(NOW, &opts, &mut window);
    match (first, fresh) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "verify and verify_fresh disagree");
            let _ = (a.reason(), a.to_string());
            assert!(window.is_empty(), "a rejected message was recorded");
            if sign_here {
                assert!(
                    !matches!(
                        a,
                        VerifyError::BadSignature { .. }
                            | VerifyError::WrongDomain { .. }
                            | VerifyError::UnsupportedSignerKey { .. }
                    ),
                    "own signature rejected: {a}"
                );
            }
        }
        (Ok(a), Ok(b)) => {
            assert_eq!(a.payload(), b.payload());
            assert_eq!(a.id(), signed.id());
            assert!(matches!(
                signed.verify_fresh(NOW, &opts, &mut window),
                Err(VerifyError::Replayed { .. })
            ));
            // A verified payload re-encodes to a value that decodes back equal, no longer
            // than the bytes it came from, and can be signed again.
            let re = postcard::to_allocvec(a.payload()).expect("encode");
            let back: T = postcard::from_bytes(&re).expect("decode re-encoded");
            assert_eq!(&back, a.payload());
            if sign_here {
                assert!(re.len() <= data.len());
            }
            let again = Signed::sign(key(), a.payload()).expect("re-sign a verified payload");
            again.verify(NOW, &opts).expect("re-signed payload verifies");
        }
        (a, b) => panic!("verify {:?} but verify_fresh {:?}", a.err(), b.err()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let sign_here = selector & 0x80 != 0;
    match (selector & 0x7f) % 7 {
        0 => check::<CapabilityAd>(rest, sign_here),
        1 => check::<WorkflowManifest>(rest, sign_here),
        2 => check::<JobManifest>(rest, sign_here),
        3 => check::<JobUpdate>(rest, sign_here),
        4 => check::<ResultManifest>(rest, sign_here),
        5 => check::<Cancel>(rest, sign_here),
        _ => check::<InstanceBundleInfo>(rest, sign_here),
    }
});
