//! Identity key files: round trip, permissions, no overwrite, libp2p key, OpenSSL keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use kaapana_certs::{CertError, Identity};

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn save_load_round_trip_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instance.key");
    let id = Identity::generate().unwrap();
    id.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert!(fs::read_to_string(&path).unwrap().starts_with("-----BEGIN PRIVATE KEY-----\n"));
    let loaded = Identity::load(&path).unwrap();
    assert_eq!(loaded.instance_id(), id.instance_id());
    assert_eq!(loaded.public_key(), id.public_key());
    // Debug never shows key material.
    let shown = format!("{loaded:?}");
    assert!(shown.contains(&id.instance_id().to_string()), "{shown}");
    assert!(!shown.contains("PRIVATE"));
}

#[test]
fn load_refuses_a_key_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instance.key");
    Identity::generate().unwrap().save(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&path).unwrap_err();
    assert!(matches!(err, CertError::KeyFilePermissions { mode: 0o644, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("chmod 600 {}", path.display())), "{msg}");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    Identity::load(&path).unwrap();
}

#[test]
fn save_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instance.key");
    let first = Identity::generate().unwrap();
    first.save(&path).unwrap();
    let err = Identity::generate().unwrap().save(&path).unwrap_err();
    assert!(matches!(err, CertError::KeyFileExists { .. }), "{err:?}");
    assert_eq!(Identity::load(&path).unwrap().instance_id(), first.instance_id());
}

#[test]
fn libp2p_peer_id_is_the_instance_id() {
    let id = Identity::generate().unwrap();
    assert_eq!(id.libp2p_keypair().public().to_peer_id(), id.instance_id().peer_id());
}

/// RFC 8410 §10.3: a v1 PKCS#8 Ed25519 key and (§10.1) its public key.
#[test]
fn loads_the_rfc8410_v1_test_vector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rfc8410.key");
    fs::write(
        &path,
        "-----BEGIN PRIVATE KEY-----\n\
         MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
         -----END PRIVATE KEY-----\n",
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let id = Identity::load(&path).unwrap();
    assert_eq!(
        kaapana_protocol::hex(&id.public_key()),
        "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
    );
    assert_eq!(id.libp2p_keypair().public().to_peer_id(), id.instance_id().peer_id());
}

#[test]
fn loads_openssl_generated_keys_pem_and_der() {
    let dir = tempfile::tempdir().unwrap();
    let pem_path = dir.path().join("openssl.pem");
    let der_path = dir.path().join("openssl.der");
    let run = |args: &[&str]| {
        let out = Command::new("/usr/bin/openssl").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let pem = pem_path.to_str().unwrap();
    run(&["genpkey", "-algorithm", "ED25519", "-out", pem]);
    run(&["pkey", "-in", pem, "-outform", "DER", "-out", der_path.to_str().unwrap()]);
    fs::set_permissions(&pem_path, fs::Permissions::from_mode(0o600)).unwrap();
    let from_pem = Identity::load(&pem_path).unwrap();
    let from_der = Identity::from_pkcs8(&fs::read(&der_path).unwrap()).unwrap();
    assert_eq!(from_pem.instance_id(), from_der.instance_id());
    assert_eq!(from_pem.libp2p_keypair().public().to_peer_id(), from_pem.instance_id().peer_id());
}

#[test]
fn garbage_is_an_invalid_key() {
    let err = Identity::from_pkcs8(b"not a key").unwrap_err();
    assert!(matches!(err, CertError::InvalidKey { .. }), "{err:?}");
}
