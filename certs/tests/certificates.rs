//! Instance certificates: self-signed and CA paths, and every rejection with its own error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::SystemTime;

use kaapana_certs::{CaCertificate, CertError, FederationCa, Identity, InstanceCertificate, Trust};
use kaapana_protocol::Timestamp;

const DAY: u64 = 86_400_000;
/// 2026-11-25T22:30:41Z: whole seconds, as X.509 stores them.
const T0: Timestamp = Timestamp::from_millis(1_795_645_841_000);

fn at(days: u64) -> Timestamp {
    Timestamp::from_millis(T0.as_millis() + days * DAY)
}

fn self_signed(name: &str) -> (Identity, InstanceCertificate) {
    let id = Identity::generate().unwrap();
    let cert = InstanceCertificate::self_signed(&id, name, T0, at(365)).unwrap();
    (id, cert)
}

/// Replaces every occurrence of `from` in `der` by `to` (same length).
fn replace_bytes(der: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = der.to_vec();
    let mut found = 0;
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            found += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(found > 0, "pattern not found");
    out
}

#[test]
fn self_signed_round_trip_and_fields() {
    let (id, cert) = self_signed("site-a");
    let pem = cert.to_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    let back = InstanceCertificate::from_pem(&pem).unwrap();
    assert_eq!(back, cert);
    assert_eq!(back.name(), "site-a");
    assert_eq!(back.instance_id(), id.instance_id());
    assert_eq!(back.public_key(), id.public_key());
    assert_eq!(back.not_before(), T0);
    assert_eq!(back.not_after(), at(365));
    assert!(back.is_self_signed());
    assert_eq!(back.issuer_name(), "CN=site-a");
    assert_eq!(back.fingerprint(), cert.fingerprint());
    back.check_identity(&id).unwrap();
    let err = back.check_identity(&Identity::generate().unwrap()).unwrap_err();
    assert!(matches!(err, CertError::IdentityMismatch { .. }), "{err:?}");
    back.verify(at(1), &Trust::SelfSigned).unwrap();
    // Bounds are inclusive.
    back.verify(T0, &Trust::SelfSigned).unwrap();
    back.verify(at(365), &Trust::SelfSigned).unwrap();
}

#[test]
fn ca_signed_certificate_verifies_under_its_ca_only() {
    let ca = FederationCa::generate("Kaapana Federation CA", T0, at(3650)).unwrap();
    let id = Identity::generate().unwrap();
    let cert = ca.sign_instance(&id.public_key(), "site-b", T0, at(365)).unwrap();
    assert_eq!(cert.instance_id(), id.instance_id());
    assert_eq!(cert.name(), "site-b");
    assert!(!cert.is_self_signed());
    assert_eq!(cert.issuer_name(), "CN=Kaapana Federation CA");
    let trust = Trust::FederationCa(ca.certificate().clone());
    cert.verify(at(1), &trust).unwrap();
    // Under SelfSigned only self-signed certificates verify.
    let err = cert.verify(at(1), &Trust::SelfSigned).unwrap_err();
    assert!(matches!(err, CertError::UntrustedIssuer { .. }), "{err:?}");
}

#[test]
fn ca_save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = FederationCa::generate("Consortium CA", T0, at(3650)).unwrap();
    ca.save(&ca_dir).unwrap();
    assert_eq!(fs::metadata(ca_dir.join("ca.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let err = ca.save(&ca_dir).unwrap_err();
    assert!(matches!(err, CertError::KeyFileExists { .. }), "{err:?}");

    let loaded = FederationCa::load(&ca_dir).unwrap();
    assert_eq!(loaded.certificate(), ca.certificate());
    let pem = fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let ca_cert = CaCertificate::from_pem(&pem).unwrap();
    assert_eq!(ca_cert.name(), "Consortium CA");
    assert_eq!(ca_cert.fingerprint(), ca.certificate().fingerprint());
    // A certificate issued by the loaded CA chains to the original certificate.
    let id = Identity::generate().unwrap();
    let cert = loaded.sign_instance(&id.public_key(), "site-c", T0, at(30)).unwrap();
    cert.verify(at(1), &Trust::FederationCa(ca_cert)).unwrap();
}

#[test]
fn ca_load_refuses_a_key_of_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    FederationCa::generate("CA one", T0, at(3650)).unwrap().save(&one).unwrap();
    FederationCa::generate("CA two", T0, at(3650)).unwrap().save(&two).unwrap();
    fs::copy(two.join("ca.key"), one.join("ca.key")).unwrap();
    let err = FederationCa::load(&one).unwrap_err();
    assert!(matches!(err, CertError::CaKeyMismatch { .. }), "{err:?}");
}

#[test]
fn certificate_of_another_ca_is_untrusted_issuer() {
    let ca = FederationCa::generate("CA one", T0, at(3650)).unwrap();
    let other = FederationCa::generate("CA two", T0, at(3650)).unwrap();
    let id = Identity::generate().unwrap();
    let cert = ca.sign_instance(&id.public_key(), "site-a", T0, at(365)).unwrap();
    let err = cert.verify(at(1), &Trust::FederationCa(other.certificate().clone())).unwrap_err();
    assert!(
        matches!(&err, CertError::UntrustedIssuer { issuer, .. } if issuer == "CN=CA one"),
        "{err:?}"
    );
}

#[test]
fn self_signed_certificate_under_ca_trust_is_untrusted_issuer() {
    let ca = FederationCa::generate("CA", T0, at(3650)).unwrap();
    let (_, cert) = self_signed("site-a");
    let err = cert.verify(at(1), &Trust::FederationCa(ca.certificate().clone())).unwrap_err();
    assert!(matches!(err, CertError::UntrustedIssuer { .. }), "{err:?}");
}

#[test]
fn expired_and_not_yet_valid_are_distinct() {
    let (_, cert) = self_signed("site-a");
    let now = Timestamp::from_millis(at(365).as_millis() + 1);
    let err = cert.verify(now, &Trust::SelfSigned).unwrap_err();
    assert!(matches!(err, CertError::Expired { not_after, .. } if not_after == at(365)), "{err:?}");
    let early = Timestamp::from_millis(T0.as_millis() - 1);
    let err = cert.verify(early, &Trust::SelfSigned).unwrap_err();
    assert!(
        matches!(err, CertError::NotYetValid { not_before, .. } if not_before == T0),
        "{err:?}"
    );
}

#[test]
fn expired_ca_rejects_its_certificates() {
    let ca = FederationCa::generate("Old CA", T0, at(10)).unwrap();
    let id = Identity::generate().unwrap();
    let cert = ca.sign_instance(&id.public_key(), "site-a", T0, at(365)).unwrap();
    let err = cert.verify(at(11), &Trust::FederationCa(ca.certificate().clone())).unwrap_err();
    assert!(matches!(&err, CertError::Expired { name, .. } if name == "Old CA"), "{err:?}");
}

#[test]
fn san_naming_another_key_is_key_mismatch() {
    let victim = Identity::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "site-a");
    let uri = format!("kaapana-node://{}", victim.instance_id());
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let attacker = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let cert = params.self_signed(&attacker).unwrap();
    let err = InstanceCertificate::from_der(cert.der().to_vec()).unwrap_err();
    assert!(
        matches!(&err, CertError::KeyMismatch { named, .. } if *named == victim.instance_id().to_string()),
        "{err:?}"
    );
}

#[test]
fn certificate_without_san_or_cn_is_not_an_instance_certificate() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let params = rcgen::CertificateParams::new(vec!["example.org".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let err = InstanceCertificate::from_der(cert.der().to_vec()).unwrap_err();
    assert!(
        matches!(err, CertError::NotAnInstanceCertificate { missing } if missing.contains("kaapana-node://")),
        "{err:?}"
    );
}

#[test]
fn non_ed25519_certificate_is_unsupported() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec![]).unwrap().self_signed(&key).unwrap();
    let err = InstanceCertificate::from_der(cert.der().to_vec()).unwrap_err();
    assert!(matches!(err, CertError::UnsupportedKey { .. }), "{err:?}");
}

#[test]
fn tampered_self_signed_certificate_is_bad_signature() {
    let (_, cert) = self_signed("site-a");
    // The name appears as issuer and subject: change both, so only the signature can tell.
    let der = replace_bytes(cert.der(), b"site-a", b"site-x");
    let tampered = InstanceCertificate::from_der(der).unwrap();
    assert_eq!(tampered.name(), "site-x");
    let err = tampered.verify(at(1), &Trust::SelfSigned).unwrap_err();
    assert!(matches!(err, CertError::BadSignature { .. }), "{err:?}");
}

#[test]
fn tampered_ca_signed_certificate_is_bad_signature() {
    let ca = FederationCa::generate("CA", T0, at(3650)).unwrap();
    let id = Identity::generate().unwrap();
    let cert = ca.sign_instance(&id.public_key(), "site-a", T0, at(365)).unwrap();
    let tampered =
        InstanceCertificate::from_der(replace_bytes(cert.der(), b"site-a", b"site-x")).unwrap();
    let err = tampered.verify(at(1), &Trust::FederationCa(ca.certificate().clone())).unwrap_err();
    assert!(matches!(err, CertError::BadSignature { .. }), "{err:?}");
}

#[test]
fn instance_certificate_is_not_a_ca() {
    let (_, cert) = self_signed("site-a");
    let err = CaCertificate::from_pem(&cert.to_pem()).unwrap_err();
    assert!(matches!(err, CertError::NotACa { .. }), "{err:?}");
}

#[test]
fn garbage_is_a_parse_error() {
    for text in ["", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"] {
        let err = InstanceCertificate::from_pem(text).unwrap_err();
        assert!(matches!(err, CertError::Parse { .. }), "{err:?}");
    }
}

#[test]
fn bad_parameters_are_refused() {
    let id = Identity::generate().unwrap();
    for (name, nb, na) in [("", T0, at(1)), ("site-a", at(1), T0)] {
        let err = InstanceCertificate::self_signed(&id, name, nb, na).unwrap_err();
        assert!(matches!(err, CertError::Generate { .. }), "{err:?}");
    }
}

/// OpenSSL, an independent X.509 implementation, accepts the chain we build.
#[test]
fn openssl_verifies_the_ca_chain() {
    let now = Timestamp::from_system_time(SystemTime::now());
    let start = Timestamp::from_millis(now.as_millis() - DAY);
    let end = Timestamp::from_millis(now.as_millis() + 30 * DAY);
    let ca = FederationCa::generate("Kaapana Federation CA", start, end).unwrap();
    let id = Identity::generate().unwrap();
    let cert = ca.sign_instance(&id.public_key(), "site-a", start, end).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.crt");
    let cert_path = dir.path().join("site-a.crt");
    fs::write(&ca_path, ca.certificate().to_pem()).unwrap();
    fs::write(&cert_path, cert.to_pem()).unwrap();
    let out = Command::new("/usr/bin/openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca_path)
        .arg(&cert_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.trim_end().ends_with(": OK"), "{stdout}");
}
