//! End-to-end tests of the offline CLI: the built `kaapana-node` binary on real data
//! directories, real certificates and a real store file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Site, kaapana_node};

#[test]
fn two_instances_register_each_other_by_certificate_exchange() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Site::init(tmp.path(), "site-a");
    let b = Site::init(tmp.path(), "site-b");
    let bundle_a = a.export(tmp.path());
    let bundle_b = b.export(tmp.path());

    // openssl reads the certificate block of the bundle.
    let openssl = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&bundle_a)
        .output()
        .unwrap();
    assert!(openssl.status.success(), "{}", String::from_utf8_lossy(&openssl.stderr));
    let text = String::from_utf8(openssl.stdout).unwrap();
    assert!(text.contains("CN=site-a") || text.contains("CN = site-a"), "{text}");
    assert!(text.contains(&format!("URI:kaapana-node://{}", a.instance_id())), "{text}");

    let added = b.ok(&[
        "instance",
        "add",
        bundle_a.to_str().unwrap(),
        "--expect-fingerprint",
        &a.fingerprint(),
        "--allow-workflow",
        "federated-statistics",
        "--allow-dataset",
        "lung-ct",
    ]);
    assert!(added.contains("Registered instance site-a"), "{added}");
    assert!(added.contains(&a.fingerprint()), "{added}");
    assert!(added.contains("federated-statistics"), "{added}");
    a.register(&b, &bundle_b);

    // Each side lists the other, with its policy; these are separate processes reading the
    // store from disk.
    let list_b = b.ok(&["instance", "list"]);
    assert!(list_b.contains("site-a") && list_b.contains(&a.instance_id()), "{list_b}");
    assert!(list_b.contains("approval") && list_b.contains("lung-ct"), "{list_b}");
    let list_a = a.ok(&["instance", "list"]);
    assert!(list_a.contains("site-b") && list_a.contains("automatic"), "{list_a}");

    // Registering twice is refused; removal by name and by id works once.
    let again = b.fails(&["instance", "add", bundle_a.to_str().unwrap()]);
    assert!(again.contains("already registered"), "{again}");
    let removed = b.ok(&["instance", "remove", "site-a"]);
    assert!(removed.contains("Removed instance site-a"), "{removed}");
    assert!(b.ok(&["instance", "list"]).contains("No instances registered"));
    let missing = b.fails(&["instance", "remove", "site-a"]);
    assert!(missing.contains("site-a"), "{missing}");
    a.ok(&["instance", "remove", &b.instance_id()]);
    assert!(a.ok(&["instance", "list"]).contains("No instances registered"));
}

#[test]
fn bad_bundles_are_refused_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Site::init(tmp.path(), "site-a");
    let b = Site::init(tmp.path(), "site-b");
    let bundle_a = a.export(tmp.path());
    let bundle_b = b.export(tmp.path());
    let text_a = std::fs::read_to_string(&bundle_a).unwrap();
    let text_b = std::fs::read_to_string(&bundle_b).unwrap();

    // A wrong fingerprint: nothing is registered.
    let err = b.fails(&[
        "instance",
        "add",
        bundle_a.to_str().unwrap(),
        "--expect-fingerprint",
        &b.fingerprint(),
    ]);
    assert!(err.contains("fingerprint mismatch"), "{err}");

    // Its own bundle.
    let err = a.fails(&["instance", "add", bundle_a.to_str().unwrap()]);
    assert!(err.contains("own"), "{err}");

    // site-a's certificate with site-b's signed block: the signed part names another
    // certificate (or key).
    let cert_a = pem_block(&text_a, "CERTIFICATE");
    let signed_b = pem_block(&text_b, "KAAPANA INSTANCE BUNDLE");
    let swapped = tmp.path().join("swapped.bundle");
    std::fs::write(&swapped, format!("{cert_a}{signed_b}")).unwrap();
    let err = b.fails(&["instance", "add", swapped.to_str().unwrap()]);
    assert!(err.to_lowercase().contains("bundle"), "{err}");

    // A flipped character inside the signed block.
    let mut tampered = text_a.clone();
    let block = pem_block(&text_a, "KAAPANA INSTANCE BUNDLE");
    let start = tampered.find(&block).unwrap();
    let line_start = start + block.find('\n').unwrap() + 1 + 10;
    let ch = tampered.as_bytes()[line_start];
    let replacement = if ch == b'A' { "B" } else { "A" };
    tampered.replace_range(line_start..=line_start, replacement);
    let tampered_path = tmp.path().join("tampered.bundle");
    std::fs::write(&tampered_path, tampered).unwrap();
    let err = b.fails(&["instance", "add", tampered_path.to_str().unwrap()]);
    assert!(!err.is_empty());

    // Not a bundle at all.
    let junk = tmp.path().join("junk.bundle");
    std::fs::write(&junk, "hello").unwrap();
    b.fails(&["instance", "add", junk.to_str().unwrap()]);

    // None of these registered anything.
    assert!(b.ok(&["instance", "list"]).contains("No instances registered"));
    // The genuine bundle still works.
    b.register(&a, &bundle_a);
}

/// The PEM block labelled `label`, with its BEGIN and END lines and a final newline.
fn pem_block(text: &str, label: &str) -> String {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let s = text.find(&begin).unwrap_or_else(|| panic!("no {label} block in:\n{text}"));
    let e = text[s..].find(&end).unwrap() + s + end.len();
    format!("{}\n", &text[s..e])
}

#[test]
fn a_key_file_readable_by_others_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Site::init(tmp.path(), "site-a");
    let key = a.dir.join("identity.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = a.fails(&["instance", "export"]);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    a.ok(&["instance", "export"]);
}

#[test]
fn init_and_uninitialised_directories_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Site::init(tmp.path(), "site-a");
    let err = a.fails(&["init", "--name", "other"]);
    assert!(err.contains("already holds instance site-a"), "{err}");

    let nothing = Site::new(tmp.path(), "nothing");
    let err = nothing.fails(&["instance", "list"]);
    assert!(err.contains("kaapana-node init"), "{err}");

    // The data directory comes from the environment when no flag is given.
    let out = kaapana_node().arg("info").env("KAAPANA_NODE_DATA_DIR", &a.dir).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("site-a"));

    // A broken configuration names the key.
    let cfg = a.dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\nlisten_typo = 1\n")).unwrap();
    let err = a.fails(&["instance", "list"]);
    assert!(err.contains("listen_typo"), "{err}");
}

#[test]
fn instances_with_certificates_from_a_federation_ca_register() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let out = kaapana_node()
        .args(["ca", "create", "--name", "Consortium CA", "--out"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = Site::init(tmp.path(), "site-a");
    let b = Site::init(tmp.path(), "site-b");
    let stranger = Site::init(tmp.path(), "stranger");
    for s in [&a, &b] {
        let out = s.ok(&["ca", "sign", "--ca", ca_dir.to_str().unwrap()]);
        assert!(out.contains("Consortium CA"), "{out}");
        assert!(s.ok(&["info"]).contains("Consortium CA"));
    }
    let bundle_a = a.export(tmp.path());
    b.register(&a, &bundle_a);
    assert!(b.ok(&["instance", "list"]).contains("site-a"));

    // A self-signed instance is not accepted by a node that trusts the CA.
    let bundle_s = stranger.export(tmp.path());
    let err = b.fails(&["instance", "add", bundle_s.to_str().unwrap()]);
    assert!(err.to_lowercase().contains("issue"), "{err}");
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["init", "--help"],
        vec!["info", "--help"],
        vec!["instance", "--help"],
        vec!["instance", "export", "--help"],
        vec!["instance", "add", "--help"],
        vec!["instance", "list", "--help"],
        vec!["instance", "remove", "--help"],
        vec!["ca", "create", "--help"],
        vec!["ca", "sign", "--help"],
    ] {
        let out = kaapana_node().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage:") && text.lines().count() > 3, "{args:?}: {text}");
    }
}
