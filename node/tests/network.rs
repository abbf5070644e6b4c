//! End-to-end tests of the daemon: real `kaapana-node run` processes on loopback, registered
//! with each other through the CLI, talking libp2p (TCP + TLS + yamux, QUIC).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::federation;

const T: Duration = Duration::from_secs(30);

#[test]
fn three_registered_instances_connect_and_see_each_others_capabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let sites = federation(tmp.path(), &["site-a", "site-b", "site-c"]);
    let daemons: Vec<_> = sites.iter().map(|s| s.start()).collect();
    for d in &daemons {
        for other in &sites {
            if other.name == d.name {
                continue;
            }
            d.wait_until(&format!("capabilities of {}", other.name), T, |d| {
                d.instance(&other.name)
                    .is_some_and(|i| i.connected == Some(true) && i.capabilities.is_some())
            });
            let view = d.instance(&other.name).unwrap();
            let caps = view.capabilities.unwrap();
            assert!(caps.cpu_millis >= 1000, "{caps:?}");
            assert!(caps.memory_bytes > 0, "{caps:?}");
            assert_eq!(caps.allowed_workflows, vec!["any".to_owned()]);
            assert_eq!(view.status, "connected");
            assert!(view.rtt_ms.is_some() || view.last_seen.is_some());
        }
        let list = d.api().instances().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(d.metric("kaapana_node_peers_connected"), 2.0);
    }
    // The CLI talks to the running daemon and shows the live state.
    let out = sites[0].ok(&["instance", "list"]);
    assert!(out.contains("status:        connected"), "{out}");
    assert!(out.contains("capabilities:  node"), "{out}");
    for d in daemons {
        assert!(d.stop(), "daemon did not exit cleanly");
    }
}
