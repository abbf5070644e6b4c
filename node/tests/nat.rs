//! Sites behind NAT (issue 18), on hosts of their own (network namespaces, see
//! `common::netns`): site-a and site-b each sit behind a NAT router of their own (nftables
//! masquerade; nothing can dial in), the relay site is on the public subnet and relays for the
//! instances registered with it (`network.relay_service`). Jobs run on a real containerd.
//!
//! - Without hole punching, site-a and site-b reach each other only through the relay: a
//!   3-site workflow completes, site-a's 1 MB model (an input) and site-b's 4 MB result
//!   crossing the relay (its nftables counter shows the bytes) as TLS it cannot read (a
//!   capture at the relay has none of the jobs' marker, which both carry in plain text).
//! - With hole punching, the relayed connection becomes direct (DCUtR through both NATs) and
//!   the workflow's result goes direct: the relay carries almost none of its bytes.
//! - A stranger cannot reserve a slot at the relay, and a registered instance cannot use the
//!   relay to reach one that did not register it.
//! - The relay (`kaapana-node relay`) killed mid-workflow: the workflow finishes once it is
//!   back; nothing lost, nothing run twice.
//!
//! Needs root, iproute2, nftables, tcpdump, containerd and runc (`scripts/test` installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Site;
use common::nat::{NatFed, RESULT_BYTES, T, capture, count, relay_addr, stop_capture};
use common::netns::Net;

#[test]
fn two_sites_behind_nat_work_together_through_a_relay_then_directly_after_hole_punching() {
    // 1. No hole punching: site-a and site-b meet only through the relay.
    let mut f = NatFed::new(false, false);
    for i in 0..3 {
        f.start(i);
    }
    for (i, j) in [(1, 0), (2, 0), (0, 1), (0, 2)] {
        f.d(i).wait_for_capabilities(&f.sites[j].name, T);
        assert_eq!(f.path(i, j).as_deref(), Some("direct"), "{i} sees {j}");
    }
    f.wait_path("relayed");
    for i in [1, 2] {
        let other = &f.sites[3 - i].name;
        let status = f.d(i).instance(other).unwrap().status;
        assert_eq!(status, "connected, relayed", "{} sees {other}", f.sites[i].name);
        assert_eq!(f.d(i).metric("kaapana_node_peers_relayed"), 1.0);
        let relay_events = f.d(i).event_details(0, "relay");
        assert!(
            relay_events.iter().any(|e| e.contains("reserved a slot at relay relay")),
            "{relay_events:?}"
        );
    }
    // AutoNAT: the relay site learns from its peers' dial-backs that it is reachable, the
    // NATed sites that they are not.
    for (i, verdict) in [(0, "public /ip4/"), (1, "private"), (2, "private")] {
        f.d(i).wait_until(&format!("reachability {verdict}"), T, |d| {
            d.event_details(0, "reachability").iter().any(|e| e.contains(verdict))
        });
    }
    // The bundles name the relay's circuit.
    let bundle = std::fs::read_to_string(f.tmp.path().join("site-b.bundle")).unwrap();
    assert!(!bundle.is_empty());
    let b_view = f.d(1).instance("site-b").unwrap();
    assert!(b_view.listen_addrs.iter().any(|a| a.ends_with("/p2p-circuit")), "{b_view:?}");

    f.count_from_b();
    let pcap = f.path_in("relay.pcap");
    let tcpdump = capture(&f.net, &pcap);
    let marker = format!("kaapana-nat-marker-{}", std::process::id());
    let id = f.submit("through-the-relay", &marker, 0);
    let out = f.check_finished(&id);
    stop_capture(tcpdump);
    assert_eq!(std::fs::read_to_string(out.join("sum/who")).unwrap().trim(), "relay-site");
    // The result went through the relay ...
    let relayed = f.bytes_from_b();
    assert!(relayed > RESULT_BYTES, "the relay got {relayed} bytes from site-b");
    // ... which could not read it: the marker is in the result in plain text, not in what the
    // relay forwarded.
    // (site-a's model went the other way through the relay, with the marker too.)
    for file in ["far/marker.txt", "model/model.txt"] {
        let plain = std::fs::read(out.join(file)).unwrap();
        assert_eq!(count(&plain, marker.as_bytes()), 200, "{file}");
    }
    let captured = std::fs::read(&pcap).unwrap();
    assert!(captured.len() as u64 > 2 * RESULT_BYTES, "captured {} bytes", captured.len());
    assert_eq!(count(&captured, marker.as_bytes()), 0, "the relay saw the marker in clear");
    assert_eq!(count(&captured, f.image.as_bytes()), 0, "the relay saw the job manifest");
    eprintln!(
        "relayed: {relayed} bytes from site-b crossed the relay; it captured {} bytes, none readable",
        captured.len()
    );

    // 2. Hole punching: after a restart with it on, the connection becomes direct and the
    // result goes direct.
    for i in [1, 2] {
        assert!(f.daemons[i].take().unwrap().stop(), "{} stopped gracefully", f.sites[i].name);
        f.sites[i].set_network("hole_punching", "true");
    }
    for i in [1, 2] {
        f.start(i);
    }
    f.wait_path("direct");
    let punched: Vec<String> =
        [1, 2].iter().flat_map(|&i| f.d(i).event_details(0, "hole_punch")).collect();
    assert!(punched.iter().any(|e| e.contains("direct now")), "{punched:?}");
    for i in [1, 2] {
        assert_eq!(f.d(i).metric("kaapana_node_peers_relayed"), 0.0);
    }
    let before = f.bytes_from_b();
    let id = f.submit("direct", &marker, 0);
    f.check_finished(&id);
    let through_relay = f.bytes_from_b() - before;
    eprintln!("direct: {through_relay} bytes from site-b crossed the relay");
    assert!(
        through_relay < RESULT_BYTES / 4,
        "{through_relay} bytes from site-b crossed the relay although the connection is direct"
    );
}

#[test]
fn the_relay_killed_mid_workflow_the_workflow_finishes_once_it_is_back_with_nothing_lost_or_run_twice()
 {
    // A relay-only node (`kaapana-node relay`: no executor) between the two NATed sites.
    let mut f = NatFed::new(false, true);
    for i in 0..3 {
        f.start(i);
    }
    f.wait_path("relayed");
    let id = f.submit("relay-killed", "relay-killed-marker", 4);
    f.d(1).wait_until("the far job running", T, |d| {
        d.workflow(&id).jobs.iter().any(|j| j.name == "far" && j.state == "running")
    });
    f.daemons[0].take().unwrap().kill();
    for (i, j) in [(1, 2), (2, 1)] {
        f.d(i).wait_until(&format!("{} gone", f.sites[j].name), T, |_| f.path(i, j).is_none());
    }
    assert_eq!(f.d(1).workflow(&id).state, "running");
    f.start(0);
    f.wait_path("relayed");
    f.check_finished(&id);
    for i in [1, 2] {
        let events = f.d(i).event_details(0, "relay");
        let reserved = events.iter().filter(|e| e.contains("reserved a slot")).count();
        assert!(reserved >= 2, "{}: reserved again after the restart: {events:?}", f.sites[i].name);
        assert!(events.iter().any(|e| e.contains("ended")), "{events:?}");
    }
}

#[test]
fn a_stranger_gets_no_reservation_and_the_relay_does_not_reach_a_site_that_did_not_register_the_asker()
 {
    let net = Net::with_nat(4, &[2, 3, 4]);
    let tmp = common::test_dir();
    let root = tmp.path();
    let relay = Site::init_netns_nat(root, "relay", &net, 1, &[], false);
    let via = [relay_addr(&net, &relay)];
    let a = Site::init_netns_nat(root, "site-a", &net, 2, &via, false);
    let c = Site::init_netns_nat(root, "site-c", &net, 3, &via, false);
    let stranger = Site::init_netns_nat(root, "stranger", &net, 4, &via, false);
    let bundle = |s: &Site| s.export(root);
    let (br, ba, bc) = (bundle(&relay), bundle(&a), bundle(&c));
    // The relay and site-a, the relay and site-c: registered both ways. site-c registers
    // site-a, but site-a does not register site-c. The stranger registers the relay, which
    // does not know it.
    for (s, other, b) in
        [(&relay, &a, &ba), (&relay, &c, &bc), (&a, &relay, &br), (&c, &relay, &br)]
    {
        s.register(other, b);
    }
    c.register(&a, &ba);
    stranger.register(&relay, &br);

    let dr = relay.start_netns_as(&net, 1, "relay");
    let da = a.start_netns(&net, 2);
    da.wait_until("a reservation", T, |d| {
        d.event_details(0, "relay").iter().any(|e| e.contains("reserved a slot"))
    });
    let denied_before = dr.metric("kaapana_node_connections_denied_total");
    let a_denied_before = da.metric("kaapana_node_connections_denied_total");
    let ds = stranger.start_netns(&net, 4);
    let dc = c.start_netns(&net, 3);
    dc.wait_until("site-c's reservation", T, |d| {
        d.event_details(0, "relay").iter().any(|e| e.contains("reserved a slot"))
    });
    // The stranger's connection to the relay is refused (and counted) before any protocol:
    // it gets no reservation, so nobody could reach it through the relay.
    let stranger_id = stranger.instance_id();
    dr.wait_until("the stranger refused", T, |d| {
        d.event_details(0, "connection_denied").iter().any(|e| e.contains(&stranger_id))
    });
    assert!(dr.metric("kaapana_node_connections_denied_total") > denied_before);
    ds.wait_until("the stranger told why", T, |d| {
        d.instance("relay").is_some_and(|v| v.connected == Some(false) && v.status.contains("not"))
    });
    // site-c asks the relay for a circuit to site-a (registered at the relay both): site-a
    // refuses the relayed connection, because it did not register site-c.
    let c_id = c.instance_id();
    da.wait_until("site-c refused through the relay", T, |d| {
        d.event_details(0, "connection_denied").iter().any(|e| e.contains(&c_id))
    });
    assert!(da.metric("kaapana_node_connections_denied_total") > a_denied_before);
    dc.wait_until("site-c told why", T, |d| {
        d.instance("site-a").is_some_and(|v| {
            v.connected == Some(false) && v.status.contains("not registered there")
        })
    });
    assert!(ds.event_details(0, "relay").iter().all(|e| !e.contains("reserved a slot")));
    assert_eq!(da.instance("relay").unwrap().path.as_deref(), Some("direct"));
    assert!(da.instances().iter().all(|v| v.name != "site-c"));
}
