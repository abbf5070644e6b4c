//! Each way a message can be wrong gets its own error variant, a readable message and (for
//! verification errors) its own `reason()` label.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{NOW, header_at, key, opts};
use kaapana_protocol::{
    Cancel, DecodeError, ENVELOPE_FORMAT, EncodeError, ImageDigest, JobManifest, Manifest,
    ManifestKind, PROTOCOL_VERSION, ReplayWindow, ResultManifest, Signed, ValidationError,
    VerifyError, VerifyOptions, WorkflowManifest,
};
use serde::{Deserialize, Serialize};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The envelope fields before the signature, as the wire layout documents them.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Head<'a> {
    format: u8,
    domain: &'a str,
    signer: &'a [u8],
    payload: &'a [u8],
}

fn job_with_header(header: kaapana_protocol::Header) -> JobManifest {
    JobManifest { header, ..common::typical_job_manifest() }
}

fn verify_err<T: Manifest>(signed: &Signed<T>) -> VerifyError {
    let parsed = Signed::<T>::from_bytes(signed.as_bytes()).unwrap();
    parsed.verify(NOW, &opts()).err().expect("should be rejected")
}

fn assert_mentions(err: &dyn std::fmt::Display, words: &[&str]) {
    let text = err.to_string();
    for w in words {
        assert!(text.contains(w), "message {text:?} does not mention {w:?}");
    }
}

fn expired() -> VerifyError {
    let signed = Signed::sign(key(), &job_with_header(header_at(-2 * HOUR, -HOUR))).unwrap();
    verify_err(&signed)
}

#[test]
fn expired_message() {
    let e = expired();
    assert!(matches!(e, VerifyError::Expired { kind: ManifestKind::JobManifest, .. }), "{e:?}");
    assert_mentions(&e, &["expired", "JobManifest", "2026-11-25T21:30:41.123Z"]);
    // The exact instant of expiry is already expired.
    let signed = Signed::sign(key(), &job_with_header(header_at(-HOUR, 0))).unwrap();
    assert!(matches!(verify_err(&signed), VerifyError::Expired { .. }));
}

fn not_yet_valid() -> VerifyError {
    let signed = Signed::sign(key(), &job_with_header(header_at(HOUR, 2 * HOUR))).unwrap();
    verify_err(&signed)
}

#[test]
fn not_yet_valid_message() {
    let e = not_yet_valid();
    assert!(matches!(e, VerifyError::NotYetValid { .. }), "{e:?}");
    assert_mentions(&e, &["not yet valid", "issued at 2026-11-25T23:30:41.123Z", "clock"]);
    // Within the allowed clock skew (5 minutes by default) it is accepted.
    let signed = Signed::sign(key(), &job_with_header(header_at(4 * 60_000, HOUR))).unwrap();
    signed.verify(NOW, &opts()).unwrap();
    let strict = VerifyOptions { max_clock_skew: Duration::from_secs(60), ..opts() };
    assert!(matches!(signed.verify(NOW, &strict), Err(VerifyError::NotYetValid { .. })));
}

fn replayed() -> VerifyError {
    let signed = Signed::sign(key(), &common::typical_job_manifest()).unwrap();
    let mut window = ReplayWindow::default();
    let first = Signed::<JobManifest>::from_bytes(signed.as_bytes()).unwrap();
    first.verify_fresh(NOW, &opts(), &mut window).unwrap();
    let second = Signed::<JobManifest>::from_bytes(signed.as_bytes()).unwrap();
    second.verify_fresh(NOW, &opts(), &mut window).expect_err("replay accepted")
}

#[test]
fn replayed_message() {
    let signed = Signed::sign(key(), &common::typical_job_manifest()).unwrap();
    let e = replayed();
    assert_eq!(e, VerifyError::Replayed { id: signed.id() });
    assert_mentions(&e, &["replayed", &signed.id().to_string(), "already received"]);
    // A rejected message is not recorded: after a failed attempt the message is not "seen".
    let mut window = ReplayWindow::default();
    let stale = Signed::sign(key(), &job_with_header(header_at(-2 * HOUR, -HOUR))).unwrap();
    assert!(matches!(
        stale.verify_fresh(NOW, &opts(), &mut window),
        Err(VerifyError::Expired { .. })
    ));
    assert!(window.is_empty());
}

fn wrong_domain() -> VerifyError {
    let signed = Signed::sign(key(), &common::typical_job_manifest()).unwrap();
    let as_result = Signed::<ResultManifest>::from_bytes(signed.as_bytes()).unwrap();
    assert_eq!(as_result.kind(), ManifestKind::JobManifest);
    as_result.verify(NOW, &opts()).expect_err("job manifest accepted as a result")
}

#[test]
fn job_manifest_presented_as_result_manifest() {
    let e = wrong_domain();
    assert_eq!(
        e,
        VerifyError::WrongDomain {
            expected: ManifestKind::ResultManifest,
            found: ManifestKind::JobManifest
        }
    );
    assert_mentions(&e, &["wrong domain", "ResultManifest", "JobManifest"]);
}

/// A JobManifest's signer, payload and signature re-wrapped under the ResultManifest domain.
fn rewrapped_as_result() -> Vec<u8> {
    let signed = Signed::sign(key(), &common::typical_job_manifest()).unwrap();
    let bytes = signed.as_bytes();
    let (signed_part, signature) = bytes.split_at(bytes.len() - 64);
    let (head, rest) = postcard::take_from_bytes::<Head<'_>>(signed_part).unwrap();
    assert!(rest.is_empty());
    assert_eq!(head.domain, "kaapana-node/1/JobManifest");
    // Sanity: re-encoding the parts unchanged reproduces the envelope exactly.
    let mut same = postcard::to_allocvec(&head).unwrap();
    same.extend_from_slice(signature);
    assert_eq!(same, bytes);

    let domain = ManifestKind::ResultManifest.domain();
    assert_ne!(domain.len(), head.domain.len());
    let mut out = postcard::to_allocvec(&Head { domain, ..head }).unwrap();
    out.extend_from_slice(signature);
    out
}

fn rewrapped_bad_signature() -> VerifyError {
    let bytes = rewrapped_as_result();
    let parsed = Signed::<ResultManifest>::from_bytes(&bytes).unwrap();
    assert_eq!(parsed.kind(), ManifestKind::ResultManifest);
    assert_eq!(parsed.claimed_signer(), key().instance_id());
    parsed.verify(NOW, &opts()).expect_err("re-wrapped signature accepted")
}

#[test]
fn job_manifest_rewrapped_with_result_domain_fails_the_signature() {
    let e = rewrapped_bad_signature();
    assert_eq!(
        e,
        VerifyError::BadSignature {
            kind: ManifestKind::ResultManifest,
            signer: key().instance_id().to_string()
        }
    );
    assert_mentions(&e, &["bad signature", "ResultManifest", &key().instance_id().to_string()]);
    // Read as a JobManifest, the re-wrapped envelope is of the wrong domain.
    let bytes = rewrapped_as_result();
    let as_job = Signed::<JobManifest>::from_bytes(&bytes).unwrap();
    assert!(matches!(as_job.verify(NOW, &opts()), Err(VerifyError::WrongDomain { .. })));
}

#[test]
fn signature_by_another_key_under_a_claimed_signer_is_bad() {
    // The envelope claims key() but other_key() signed it.
    let genuine = Signed::sign(key(), &common::typical_cancel()).unwrap();
    let bytes = genuine.as_bytes();
    let signed_part = &bytes[..bytes.len() - 64];
    let mut forged = signed_part.to_vec();
    forged.extend_from_slice(&common::other_key().sign_raw(signed_part));
    let e = Signed::<Cancel>::from_bytes(&forged).unwrap().verify(NOW, &opts()).unwrap_err();
    assert!(matches!(e, VerifyError::BadSignature { kind: ManifestKind::Cancel, .. }), "{e:?}");
}

fn oversized() -> DecodeError {
    // An invalid format byte: had anything been decoded, the error would name the format.
    let bytes = vec![0xee; Signed::<Cancel>::MAX_ENVELOPE + 1];
    Signed::<Cancel>::from_bytes(&bytes).unwrap_err()
}

#[test]
fn oversized_envelope_is_rejected_before_decoding() {
    let e = oversized();
    let max = Cancel::MAX_PAYLOAD + kaapana_protocol::ENVELOPE_OVERHEAD;
    assert_eq!(e, DecodeError::TooLarge { kind: ManifestKind::Cancel, len: max + 1, max });
    assert_mentions(&e, &["Cancel", &(max + 1).to_string(), "exceeds the limit", &max.to_string()]);
    // At exactly the limit, the length is no reason for rejection.
    let at_limit = vec![0xee; Signed::<Cancel>::MAX_ENVELOPE];
    assert!(matches!(
        Signed::<Cancel>::from_bytes(&at_limit),
        Err(DecodeError::UnsupportedFormat { found: 0xee, .. })
    ));
    // The largest payload `sign` allows fits the receiver's envelope limit, for each type.
    fn largest_fits<T: Manifest>() {
        let body = vec![0u8; T::MAX_PAYLOAD];
        let signed = Signed::<T>::sign_encoded(key(), &body);
        assert!(signed.as_bytes().len() <= Signed::<T>::MAX_ENVELOPE, "{}", T::KIND);
        Signed::<T>::from_bytes(signed.as_bytes()).unwrap();
    }
    largest_fits::<kaapana_protocol::CapabilityAd>();
    largest_fits::<WorkflowManifest>();
    largest_fits::<JobManifest>();
    largest_fits::<kaapana_protocol::JobUpdate>();
    largest_fits::<ResultManifest>();
    largest_fits::<Cancel>();
    largest_fits::<kaapana_protocol::InstanceBundleInfo>();
}

#[test]
fn signing_an_oversized_payload_fails() {
    let mut m = common::typical_job_manifest();
    if let kaapana_protocol::Work::Container(c) = &mut m.work {
        c.command = vec!["x".repeat(40 * 1024), "y".repeat(40 * 1024)];
    }
    let e = Signed::sign(key(), &m).unwrap_err();
    match &e {
        EncodeError::TooLarge { kind: ManifestKind::JobManifest, len, max } => {
            assert_eq!(*max, JobManifest::MAX_PAYLOAD);
            assert!(*len > *max);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_mentions(&e, &["JobManifest", "payload", "exceeds the limit", "65536"]);
}

fn unsupported_version() -> VerifyError {
    let mut m = common::typical_job_manifest();
    m.header.protocol_version = 99;
    // `sign` checks content rules, not the version.
    let signed = Signed::sign(key(), &m).unwrap();
    verify_err(&signed)
}

#[test]
fn unknown_protocol_version() {
    let e = unsupported_version();
    assert_eq!(
        e,
        VerifyError::Decode(DecodeError::UnsupportedVersion {
            kind: ManifestKind::JobManifest,
            found: 99,
            supported: PROTOCOL_VERSION,
        })
    );
    assert_mentions(&e, &["JobManifest", "protocol version 99", "speaks version 2", "upgrade"]);
    // A version that needs a two-byte varint is named just as well.
    let mut c = common::typical_cancel();
    c.header.protocol_version = 300;
    let e = verify_err(&Signed::sign(key(), &c).unwrap());
    assert!(matches!(e, VerifyError::Decode(DecodeError::UnsupportedVersion { found: 300, .. })));
}

fn unsupported_format() -> DecodeError {
    let signed = Signed::sign(key(), &common::typical_cancel()).unwrap();
    let mut bytes = signed.into_bytes();
    bytes[0] = 2;
    Signed::<Cancel>::from_bytes(&bytes).unwrap_err()
}

#[test]
fn unknown_envelope_format_byte() {
    let e = unsupported_format();
    assert_eq!(e, DecodeError::UnsupportedFormat { found: 2, supported: ENVELOPE_FORMAT });
    assert_mentions(&e, &["unknown envelope format 2", "format 1"]);
}

fn payload_trailing_bytes() -> VerifyError {
    let mut body = postcard::to_allocvec(&common::typical_cancel()).unwrap();
    body.extend_from_slice(&[0, 0, 0]);
    let signed = Signed::<Cancel>::sign_encoded(key(), &body);
    verify_err(&signed)
}

#[test]
fn trailing_bytes_after_the_payload_value() {
    let e = payload_trailing_bytes();
    assert_eq!(e, VerifyError::Decode(DecodeError::TrailingBytes { what: "Cancel", extra: 3 }));
    assert_mentions(&e, &["3 unexpected bytes", "Cancel"]);
}

#[test]
fn trailing_bytes_inside_the_signed_envelope() {
    // Correctly signed, but the signed part has junk after the payload field.
    let body = postcard::to_allocvec(&common::typical_cancel()).unwrap();
    let signer = key().instance_id().to_bytes();
    let head =
        Head { format: 1, domain: ManifestKind::Cancel.domain(), signer: &signer, payload: &body };
    let mut bytes = postcard::to_allocvec(&head).unwrap();
    bytes.extend_from_slice(b"junk");
    let signature = key().sign_raw(&bytes);
    bytes.extend_from_slice(&signature);
    let e = Signed::<Cancel>::from_bytes(&bytes).unwrap_err();
    assert_eq!(e, DecodeError::TrailingBytes { what: "envelope", extra: 4 });
    assert_mentions(&e, &["4 unexpected bytes", "envelope"]);
}

fn lifetime_too_long() -> VerifyError {
    let signed = Signed::sign(key(), &job_with_header(header_at(-HOUR, 31 * DAY))).unwrap();
    verify_err(&signed)
}

#[test]
fn lifetime_longer_than_accepted() {
    let e = lifetime_too_long();
    let lifetime_secs = u64::try_from((31 * DAY + HOUR) / 1000).unwrap();
    assert_eq!(
        e,
        VerifyError::LifetimeTooLong {
            kind: ManifestKind::JobManifest,
            lifetime_secs,
            max_secs: 30 * 24 * 3600
        }
    );
    assert_mentions(&e, &["JobManifest", &format!("{lifetime_secs} s"), "at most 2592000 s"]);
}

fn invalid_content() -> VerifyError {
    // Signed with the raw path, so it gets past `sign`'s own validation.
    let mut m = common::typical_job_manifest();
    m.timeout_secs = 0;
    let signed = Signed::<JobManifest>::sign_encoded(key(), &postcard::to_allocvec(&m).unwrap());
    verify_err(&signed)
}

#[test]
fn invalid_content_is_rejected_at_verify_too() {
    let e = invalid_content();
    assert!(
        matches!(
            &e,
            VerifyError::Invalid {
                kind: ManifestKind::JobManifest,
                source: ValidationError::OutOfRange { field: "timeout_secs", .. }
            }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["invalid JobManifest", "timeout_secs", "at least 1 second"]);
    // expires_at not after issued_at
    let signed = Signed::sign(key(), &job_with_header(header_at(HOUR, HOUR))).unwrap();
    let e = verify_err(&signed);
    assert!(
        matches!(
            &e,
            VerifyError::Invalid { source: ValidationError::ExpiresBeforeIssued { .. }, .. }
        ),
        "{e:?}"
    );
    assert_mentions(&e, &["expires_at", "is not after issued_at"]);
}

#[test]
fn image_tag_instead_of_digest() {
    let e = ImageDigest::parse("busybox:latest").unwrap_err();
    assert_eq!(e, ValidationError::ImageTag { reference: "busybox:latest".into() });
    assert_mentions(&e, &["busybox:latest", "is a tag", "by digest only", "sha256:"]);
    let e = ImageDigest::parse("sha256:0123").unwrap_err();
    assert!(matches!(e, ValidationError::BadImageDigest { .. }));
    assert_mentions(&e, &["malformed", "64 lowercase hex"]);
}

fn sign_workflow_err(edit: impl FnOnce(&mut WorkflowManifest)) -> EncodeError {
    let mut w = common::typical_workflow();
    Signed::sign(key(), &w).unwrap();
    edit(&mut w);
    Signed::sign(key(), &w).unwrap_err()
}

#[test]
fn invalid_workflows_are_not_signed() {
    let dup = sign_workflow_err(|w| w.jobs[1].name = "prep".into());
    assert_eq!(
        dup,
        EncodeError::Invalid {
            kind: ManifestKind::WorkflowManifest,
            source: ValidationError::DuplicateJob { name: "prep".into() }
        }
    );
    assert_mentions(&dup, &["refusing to sign", "WorkflowManifest", "two jobs named `prep`"]);

    let unknown = sign_workflow_err(|w| w.jobs[1].inputs = vec!["missing".into()]);
    assert_eq!(
        unknown,
        EncodeError::Invalid {
            kind: ManifestKind::WorkflowManifest,
            source: ValidationError::UnknownInput { job: "train".into(), input: "missing".into() }
        }
    );
    assert_mentions(&unknown, &["`train`", "`missing`", "not a job of this workflow"]);

    let cycle = sign_workflow_err(|w| w.jobs[0].inputs = vec!["train".into()]);
    assert!(
        matches!(
            &cycle,
            EncodeError::Invalid { source: ValidationError::Cycle { job }, .. }
                if job == "prep" || job == "train"
        ),
        "{cycle:?}"
    );
    assert_mentions(&cycle, &["cycle"]);

    let self_loop = sign_workflow_err(|w| w.jobs[1].inputs = vec!["train".into()]);
    assert!(
        matches!(&self_loop, EncodeError::Invalid { source: ValidationError::Cycle { job }, .. } if job == "train"),
        "{self_loop:?}"
    );

    // A cycle behind a valid prefix: a → b → c → b.
    let three = sign_workflow_err(|w| {
        let mut c = w.jobs[1].clone();
        c.name = "eval".into();
        c.inputs = vec!["train".into()];
        w.jobs.push(c);
        w.jobs[1].inputs = vec!["prep".into(), "eval".into()];
    });
    assert!(
        matches!(&three, EncodeError::Invalid { source: ValidationError::Cycle { .. }, .. }),
        "{three:?}"
    );

    let empty = sign_workflow_err(|w| w.jobs.clear());
    assert!(matches!(
        empty,
        EncodeError::Invalid { source: ValidationError::OutOfRange { .. }, .. }
    ));

    // The same input listed twice is no cycle.
    let mut w = common::typical_workflow();
    w.jobs[1].inputs = vec!["prep".into(), "prep".into()];
    Signed::sign(key(), &w).unwrap();
}

#[test]
fn reason_labels_are_distinct() {
    let cases: Vec<(&str, VerifyError)> = vec![
        ("expired", expired()),
        ("not_yet_valid", not_yet_valid()),
        ("replayed", replayed()),
        ("wrong_domain", wrong_domain()),
        ("bad_signature", rewrapped_bad_signature()),
        ("oversized", VerifyError::from(oversized())),
        ("unsupported_version", unsupported_version()),
        ("malformed", VerifyError::from(unsupported_format())),
        ("lifetime_too_long", lifetime_too_long()),
        ("invalid", invalid_content()),
    ];
    let mut seen = BTreeSet::new();
    for (label, err) in &cases {
        assert_eq!(err.reason(), *label, "{err:?}");
        assert!(seen.insert(err.reason()), "label {label} used twice");
        assert!(!err.to_string().is_empty());
    }
    // Decoding failures other than size and version share one label.
    assert_eq!(payload_trailing_bytes().reason(), "malformed");
    // Different variants produce different messages too.
    let messages: BTreeSet<String> = cases.iter().map(|(_, e)| e.to_string()).collect();
    assert_eq!(messages.len(), cases.len());
}
