//! Exchange bundles: round trip, OpenSSL readability, and each way a bundle is rejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use kaapana_certs::{
    BUNDLE_TAG, CertError, ExchangeBundle, FederationCa, Identity, InstanceCertificate, Trust,
};
use kaapana_protocol::{Header, InstanceBundleInfo, Sha256Digest, Signed, Timestamp, VerifyError};

const DAY: u64 = 86_400_000;
const T0: Timestamp = Timestamp::from_millis(1_795_645_841_000);

fn at(days: u64) -> Timestamp {
    Timestamp::from_millis(T0.as_millis() + days * DAY)
}

fn addrs() -> Vec<String> {
    vec!["/ip4/192.0.2.10/udp/4001/quic-v1".to_owned(), "/ip4/192.0.2.10/tcp/4001".to_owned()]
}

fn site(name: &str) -> (Identity, InstanceCertificate) {
    let id = Identity::generate().unwrap();
    let cert = InstanceCertificate::self_signed(&id, name, T0, at(365)).unwrap();
    (id, cert)
}

fn bundle(id: &Identity, cert: &InstanceCertificate) -> String {
    ExchangeBundle::create(id, cert, "Site A (Heidelberg)", addrs(), at(1)).unwrap()
}

/// The bundle's two PEM blocks, with `f` applied, written back as a bundle.
fn edit(text: &str, f: impl FnOnce(&mut Vec<u8>, &mut Vec<u8>)) -> String {
    let blocks = pem::parse_many(text).unwrap();
    let (mut cert, mut signed) = (blocks[0].contents().to_vec(), blocks[1].contents().to_vec());
    f(&mut cert, &mut signed);
    pem::encode_many(&[pem::Pem::new("CERTIFICATE", cert), pem::Pem::new(BUNDLE_TAG, signed)])
}

fn reject(text: &str, now: Timestamp) -> CertError {
    ExchangeBundle::parse_and_verify(text, now, &Trust::SelfSigned).unwrap_err()
}

#[test]
fn bundle_round_trip() {
    let (id, cert) = site("site-a");
    let text = bundle(&id, &cert);
    assert!(text.starts_with("# kaapana-node instance bundle for Site A (Heidelberg)\n"), "{text}");
    assert!(text.contains(&cert.fingerprint().to_string()));
    let b = ExchangeBundle::parse_and_verify(&text, at(2), &Trust::SelfSigned).unwrap();
    assert_eq!(b.instance_id(), id.instance_id());
    assert_eq!(b.display_name(), "Site A (Heidelberg)");
    assert_eq!(b.listen_addrs(), addrs().as_slice());
    assert_eq!(b.certificate(), &cert);
    assert_eq!(b.fingerprint(), cert.fingerprint());
    assert_eq!(b.info().payload().header.expires_at, cert.not_after());
}

#[test]
fn bundle_with_ca_signed_certificate() {
    let ca = FederationCa::generate("Consortium CA", T0, at(3650)).unwrap();
    let id = Identity::generate().unwrap();
    let cert = ca.sign_instance(&id.public_key(), "site-b", T0, at(365)).unwrap();
    let text = bundle(&id, &cert);
    let trust = Trust::FederationCa(ca.certificate().clone());
    ExchangeBundle::parse_and_verify(&text, at(2), &trust).unwrap();
    let err = reject(&text, at(2));
    assert!(matches!(err, CertError::UntrustedIssuer { .. }), "{err:?}");
}

#[test]
fn openssl_reads_the_bundle() {
    let (id, cert) = site("site-a");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site-a.bundle");
    std::fs::write(&path, bundle(&id, &cert)).unwrap();
    let openssl = |args: &[&str]| {
        let out =
            Command::new("/usr/bin/openssl").args(args).arg("-in").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = openssl(&["x509", "-noout", "-text"]);
    assert!(text.contains("Subject: CN = site-a"), "{text}");
    assert!(text.contains(&format!("URI:kaapana-node://{}", id.instance_id())), "{text}");
    assert!(text.contains("ED25519"), "{text}");
    // `openssl x509 -fingerprint -sha256` shows the same fingerprint, colon-separated.
    let fp = openssl(&["x509", "-noout", "-fingerprint", "-sha256"]);
    let hex = |s: &str| s.chars().filter(char::is_ascii_hexdigit).collect::<String>();
    assert_eq!(hex(fp.trim().rsplit('=').next().unwrap()), hex(&cert.fingerprint().to_string()));
}

#[test]
fn tampered_display_name_is_bundle_signature() {
    let (id, cert) = site("site-a");
    let text = edit(&bundle(&id, &cert), |_, signed| {
        let at = signed.windows(6).position(|w| w == b"Site A").unwrap();
        signed[at + 5] = b'B';
    });
    let err = reject(&text, at(2));
    assert!(matches!(err, CertError::BundleSignature(VerifyError::BadSignature { .. })), "{err:?}");
}

#[test]
fn bundle_signed_by_another_key_is_signer_mismatch() {
    let (id, cert) = site("site-a");
    let (other, _) = site("site-m");
    let info = InstanceBundleInfo {
        header: Header::new(at(1), Duration::from_secs(3600)),
        display_name: "Site A".to_owned(),
        listen_addrs: addrs(),
        certificate_sha256: Sha256Digest::of(cert.der()),
    };
    let forged = Signed::sign(other.signing_key(), &info).unwrap().into_bytes();
    let text = edit(&bundle(&id, &cert), |_, signed| *signed = forged);
    let err = reject(&text, at(1));
    assert!(matches!(err, CertError::BundleSignerMismatch { .. }), "{err:?}");
    // create() refuses a certificate of another identity.
    let err = ExchangeBundle::create(&other, &cert, "x", vec![], at(1)).unwrap_err();
    assert!(matches!(err, CertError::IdentityMismatch { .. }), "{err:?}");
}

#[test]
fn swapped_certificate_is_certificate_mismatch() {
    let (id, cert) = site("site-a");
    // A valid certificate for the same key, but not the one that was signed.
    let other_cert = InstanceCertificate::self_signed(&id, "site-a", T0, at(700)).unwrap();
    let text = edit(&bundle(&id, &cert), |c, _| *c = other_cert.der().to_vec());
    let err = reject(&text, at(2));
    assert!(matches!(err, CertError::BundleCertificateMismatch), "{err:?}");
}

#[test]
fn expired_certificate_in_bundle_is_expired() {
    let (id, cert) = site("site-a");
    let err = reject(&bundle(&id, &cert), at(366));
    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
    let err = ExchangeBundle::create(&id, &cert, "Site A", addrs(), at(366)).unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
}

#[test]
fn expired_bundle_is_bundle_signature() {
    let (id, cert) = site("site-a");
    let info = InstanceBundleInfo {
        header: Header::new(at(1), Duration::from_secs(3600)),
        display_name: "Site A".to_owned(),
        listen_addrs: addrs(),
        certificate_sha256: Sha256Digest::of(cert.der()),
    };
    let short = Signed::sign(id.signing_key(), &info).unwrap().into_bytes();
    let text = edit(&bundle(&id, &cert), |_, signed| *signed = short);
    ExchangeBundle::parse_and_verify(&text, at(1), &Trust::SelfSigned).unwrap();
    let err = reject(&text, at(2));
    assert!(matches!(err, CertError::BundleSignature(VerifyError::Expired { .. })), "{err:?}");
}

#[test]
fn malformed_bundles() {
    let (id, cert) = site("site-a");
    let text = bundle(&id, &cert);
    let only_cert = cert.to_pem();
    let garbage_block = edit(&text, |_, signed| signed.truncate(10));
    for bad in ["", "hello", only_cert.as_str(), garbage_block.as_str()] {
        let err = reject(bad, at(2));
        assert!(matches!(err, CertError::BundleMalformed { .. }), "{bad}: {err:?}");
    }
    let err = ExchangeBundle::create(&id, &cert, "", addrs(), at(1)).unwrap_err();
    assert!(matches!(err, CertError::BundleEncode(_)), "{err:?}");
}
