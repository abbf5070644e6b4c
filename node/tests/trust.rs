//! Revocation and key rotation with real daemons: a federation CA's revocation list imported
//! at one site reaches the others and cuts the instance off everywhere; a site revokes an
//! instance on its own; an instance moves to a new key and its peers follow without anyone
//! registering it again by hand.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Daemon, Site, TestPeer, kaapana_node, test_dir};
use kaapana_protocol::{Cancel, Delivery, Header, RejectReason, Signed, Timestamp, WorkflowId};

const WAIT: Duration = Duration::from_secs(60);

/// Sites whose certificates the CA in `ca` issued, registered with each other (all pairs).
fn ca_federation(root: &Path, ca: &Path, names: &[&str]) -> (Vec<Site>, Vec<PathBuf>) {
    let sites: Vec<Site> = names.iter().map(|n| Site::init_networked(root, n)).collect();
    for s in &sites {
        s.ok(&["ca", "sign", "--ca", ca.to_str().unwrap()]);
    }
    let bundles: Vec<PathBuf> = sites.iter().map(|s| s.export(root)).collect();
    for (i, s) in sites.iter().enumerate() {
        for (j, other) in sites.iter().enumerate() {
            if i != j {
                s.register(other, &bundles[j]);
            }
        }
    }
    (sites, bundles)
}

fn wait_connected(daemons: &[&Daemon], names: &[&str]) {
    for d in daemons {
        for n in names.iter().filter(|n| **n != d.name) {
            d.wait_until(&format!("{n} connected"), WAIT, |d| d.is_connected_to(n));
        }
    }
}

/// A `Cancel` signed with `site`'s key, as any registered instance could send it.
fn cancel_signed_by(site: &Site) -> Vec<u8> {
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    let cancel = Cancel {
        header: Header::new(now, Duration::from_secs(600)),
        workflow_id: WorkflowId::from_bytes([7; 16]),
        job_id: None,
        reason: "test".into(),
    };
    Signed::sign(site.identity().signing_key(), &cancel).unwrap().as_bytes().to_vec()
}

fn revocations(d: &Daemon) -> kaapana_node::daemon::RevocationsView {
    d.api().get("/v1/revocations").unwrap()
}

#[test]
fn a_federation_ca_revocation_list_reaches_every_site_and_cuts_the_instance_off() {
    let tmp = test_dir();
    let ca = tmp.path().join("ca");
    let out = kaapana_node()
        .args(["ca", "create", "--name", "Consortium CA", "--out"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names = ["site-a", "site-b", "site-c"];
    let (sites, bundles) = ca_federation(tmp.path(), &ca, &names);
    let daemons: Vec<Daemon> = sites.iter().map(Site::start).collect();
    let [a, b, c] = [&daemons[0], &daemons[1], &daemons[2]];
    wait_connected(&[a, b, c], &names);
    let c_id = sites[2].instance_id();

    // The CA revokes site-c; the list is imported at site-a only.
    let list = tmp.path().join("revocations.pem");
    let out = kaapana_node()
        .args(["ca", "revoke", "--ca", ca.to_str().unwrap(), "--list", list.to_str().unwrap()])
        .args(["--bundle", bundles[2].to_str().unwrap(), "--reason", "key compromised"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("revocation list 1"));
    let after_b = b.last_event();
    let imported = sites[0].ok(&["instance", "revocations", "--import", list.to_str().unwrap()]);
    assert!(imported.contains(&c_id), "{imported}");

    // Site-a cut site-c off at once; site-b got the list from site-a and did the same.
    assert!(a.instance("site-c").is_none());
    let revoked = b.wait_for_event(after_b, WAIT, |e| e.kind == "instance_revoked");
    assert!(revoked.detail.contains("site-c") && revoked.detail.contains("key compromised"));
    for d in [a, b] {
        assert!(d.instance("site-c").is_none(), "{} still has site-c", d.name);
        let r = revocations(d);
        assert_eq!(r.list_number, Some(1), "{}", d.name);
        assert_eq!(r.revoked.len(), 1);
        assert_eq!(r.revoked[0].instance_id, c_id);
        assert!(r.revoked[0].source.contains("federation CA revocation list 1"));
    }
    // Site-c's connections are gone from its own side too.
    c.wait_until("site-a and site-b gone", WAIT, |c| {
        !c.is_connected_to("site-a") && !c.is_connected_to("site-b")
    });
    assert!(a.is_connected_to("site-b") && b.is_connected_to("site-a"));

    // Its connections are refused: a peer with site-c's key does not get through.
    let after_a = a.last_event();
    let stranger = TestPeer::new(&sites[2]);
    stranger.allow(&sites[0]);
    stranger.dial(&sites[0]);
    a.wait_for_event(after_a, WAIT, |e| {
        e.kind == "connection_denied" && e.peer.as_deref() == Some(c_id.as_str())
    });
    drop(stranger);
    // Its messages are refused even when a registered instance passes them on.
    let as_b = TestPeer::new(&sites[1]);
    as_b.allow(&sites[0]);
    as_b.connect(&sites[0], WAIT);
    match &as_b.send(&sites[0], vec![cancel_signed_by(&sites[2])])[..] {
        [Delivery::Rejected { reason: RejectReason::UnknownSigner, detail }] => {
            assert!(detail.contains("revoked"), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(as_b);

    // Its bundle cannot be registered again; the same list again changes nothing.
    let err = sites[1].fails(&["instance", "add", bundles[2].to_str().unwrap()]);
    assert!(err.contains("revoked"), "{err}");
    let again = sites[1].ok(&["instance", "revocations", "--import", list.to_str().unwrap()]);
    assert!(again.contains("Nothing new"), "{again}");

    // Every step is in the audit logs, which verify.
    for (d, site) in [(a, &sites[0]), (b, &sites[1])] {
        let log = site.ok(&["audit", "list"]);
        assert!(log.contains("revocation_list_adopted"), "{}: {log}", d.name);
        assert!(log.contains("instance_revoked"), "{}: {log}", d.name);
        assert!(site.ok(&["audit", "verify"]).contains("audit log verified"));
    }
}

#[test]
fn a_site_revokes_an_instance_on_its_own() {
    let tmp = test_dir();
    let names = ["site-a", "site-b"];
    let sites = common::federation(tmp.path(), &names);
    let a = sites[0].start();
    let b = sites[1].start();
    wait_connected(&[&a, &b], &names);

    let out = sites[0].ok(&["instance", "revoke", "site-b", "--reason", "left the consortium"]);
    assert!(out.contains("Revoked instance site-b"), "{out}");
    assert!(a.instance("site-b").is_none());
    // The connection closed at once, so site-b sees it go.
    b.wait_until("site-a gone", WAIT, |b| !b.is_connected_to("site-a"));
    let r = revocations(&a);
    assert_eq!(r.list_number, None);
    assert_eq!(r.revoked[0].source, "revoked by this site");
    assert_eq!(a.metric("kaapana_node_instances_revoked_total"), 1.0);

    // Site-b keeps trying (it still has site-a registered): each attempt is refused.
    let after = a.last_event();
    a.wait_for_event(after, WAIT, |e| e.kind == "connection_denied");
    assert!(!a.is_connected_to("site-b"));
    assert!(a.metric("kaapana_node_connections_denied_total") >= 1.0);
    let bundle_b = tmp.path().join("site-b.bundle");
    let err = sites[0].fails(&["instance", "add", bundle_b.to_str().unwrap()]);
    assert!(err.contains("revoked"), "{err}");
    let listed = sites[0].ok(&["instance", "revocations"]);
    assert!(listed.contains("left the consortium"), "{listed}");
}

#[test]
fn an_instance_moves_to_a_new_key_and_its_peers_follow_without_registering_it_again() {
    let tmp = test_dir();
    let names = ["site-a", "site-b", "site-c"];
    let sites = common::federation(tmp.path(), &names);
    let mut a = Some(sites[0].start());
    let b = sites[1].start();
    let c = sites[2].start();
    wait_connected(&[a.as_ref().unwrap(), &b, &c], &names);
    let old_id = sites[0].instance_id();
    let policy_before = b.instance("site-a").unwrap().policy;

    // Site-c is away when site-a rotates: the hand-over waits in site-a's outbox.
    c.kill();
    a.as_ref().unwrap().wait_until("site-c gone", WAIT, |a| !a.is_connected_to("site-c"));
    let after_b = b.last_event();
    let out = sites[0].ok(&["instance", "rotate", "--reason", "yearly rotation"]);
    assert!(out.contains("New key: instance id"), "{out}");
    b.wait_for_event(after_b, WAIT, |e| e.kind == "instance_rotated");
    let status = sites[0].ok(&["instance", "rotate", "--status"]);
    assert!(status.contains("waiting for: site-c"), "{status}");

    // Site-b registered the new key in place of the old one, with the same policy.
    let new_at_b = b.instance("site-a").unwrap();
    assert_ne!(new_at_b.instance_id, old_id);
    assert_eq!(new_at_b.policy, policy_before);
    let r = revocations(&b);
    assert_eq!(r.revoked[0].instance_id, old_id);
    assert!(r.revoked[0].source.contains(&new_at_b.instance_id), "{:?}", r.revoked);

    // Not every peer has it: a restart keeps the old key.
    assert!(a.take().unwrap().stop());
    let a2 = sites[0].start();
    assert_eq!(sites[0].instance_id(), old_id);
    // Site-c comes back and gets the hand-over from the outbox.
    let c = sites[2].start();
    c.wait_until("site-a handed over", WAIT, |c| {
        c.instance("site-a").is_some_and(|i| i.instance_id == new_at_b.instance_id)
    });
    a2.wait_until("hand-over delivered everywhere", WAIT, |a| {
        let s: kaapana_node::daemon::RotationView = a.api().get("/v1/rotation").unwrap();
        s.pending.is_empty()
    });

    // The next start switches to the new key; both peers connect to it.
    assert!(a2.stop());
    let a3 = sites[0].start();
    assert_eq!(sites[0].instance_id(), new_at_b.instance_id);
    wait_connected(&[&a3, &b, &c], &names);
    assert!(a3.log_text().contains("switched to the new instance key"));
    // Messages signed with the new key are accepted: a job from site-a reaches site-b.
    let after = b.last_event();
    a3.submit_placeholder_job("site-b");
    b.wait_for_event(after, WAIT, |e| e.kind == "job_received" || e.kind == "job_refused");

    // Site-a's audit log verifies across the switch (old entries under the retired key).
    let log = sites[0].ok(&["audit", "list"]);
    assert!(log.contains("key_rotated"), "{log}");
    assert!(sites[0].ok(&["audit", "verify"]).contains("audit log verified"));
    let log_b = sites[1].ok(&["audit", "list"]);
    assert!(log_b.contains("instance_rotated") && log_b.contains("instance_revoked"), "{log_b}");
    assert!(sites[1].ok(&["audit", "verify"]).contains("audit log verified"));
}
