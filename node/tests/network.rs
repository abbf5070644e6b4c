//! End-to-end tests of the daemon: real `kaapana-node run` processes on loopback, registered
//! with each other through the CLI, talking libp2p (TCP + TLS + yamux, QUIC).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Daemon, Site, TestPeer, federation};
use kaapana_node::api::{CancelRequest, InboxEntry, SendRequest};
use kaapana_node::daemon::Event;
use kaapana_node::net::{FedFrame, SendError};
use kaapana_protocol::{
    Cancel, Delivery, FedRequest, FedResponse, Header, RejectReason, Signed, SigningKey, Timestamp,
    WorkflowId,
};

const T: Duration = Duration::from_secs(30);

#[test]
fn three_registered_instances_connect_and_see_each_others_capabilities() {
    let tmp = common::test_dir();
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
            assert_eq!(view.status, "connected, direct");
            assert_eq!(view.path.as_deref(), Some("direct"));
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

// ----- helpers -----

const WORKFLOW: &str = "07070707070707070707070707070707";

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// A cancellation issued at `issued_at`, valid for `lifetime`.
fn cancel_at(reason: &str, issued_at: Timestamp, lifetime: Duration) -> Cancel {
    Cancel {
        header: Header::new(issued_at, lifetime),
        workflow_id: WORKFLOW.parse::<WorkflowId>().unwrap(),
        job_id: None,
        reason: reason.to_owned(),
    }
}

/// A valid cancellation signed with `key`.
fn signed_cancel(key: &SigningKey, reason: &str) -> Vec<u8> {
    Signed::sign(key, &cancel_at(reason, now(), Duration::from_secs(3600))).unwrap().into_bytes()
}

/// Queues a cancellation with `reason` at `d` for `to` through the API (`POST /v1/messages`).
fn queue(d: &Daemon, to: &str, reason: &str) {
    let req = SendRequest {
        to: to.to_owned(),
        cancel: CancelRequest {
            workflow_id: WORKFLOW.to_owned(),
            job_id: None,
            reason: reason.to_owned(),
        },
    };
    d.api().send(&req).unwrap();
}

fn inbox(d: &Daemon) -> Vec<InboxEntry> {
    d.api().get("/v1/inbox?limit=10000").unwrap()
}

/// The reasons of the cancellations in `d`'s inbox, in arrival order.
fn inbox_reasons(d: &Daemon) -> Vec<String> {
    inbox(d)
        .iter()
        .map(|e| {
            assert_eq!(e.kind, "Cancel", "{e:?}");
            // `cancel workflow W: REASON` (or a `Debug` dump with `reason: "REASON"`).
            match e.summary.split_once("reason: \"") {
                Some((_, rest)) => rest.split('"').next().unwrap().to_owned(),
                None => e.summary.rsplit(": ").next().unwrap().to_owned(),
            }
        })
        .collect()
}

fn outbox_depth(d: &Daemon, peer: &str) -> u64 {
    d.instance(peer).unwrap().outbox_depth
}

/// Waits until `d` is connected to `peer` and has its capabilities.
fn wait_connected(d: &Daemon, peer: &str) {
    d.wait_until(&format!("a connection to {peer} with capabilities"), T, |d| {
        d.instance(peer).is_some_and(|i| i.connected == Some(true) && i.capabilities.is_some())
    });
}

fn rejections(d: &Daemon, reason: RejectReason) -> f64 {
    d.metric(&format!("kaapana_node_rejections_total{{reason=\"{}\"}}", reason.label()))
}

const DENIED: &str = "kaapana_node_connections_denied_total";

fn is_refusal(e: &SendError) -> bool {
    matches!(e, SendError::Failed { .. })
}

// ----- tests -----

#[test]
fn an_unregistered_instance_gets_no_message_accepted() {
    let tmp = common::test_dir();
    let sites = federation(tmp.path(), &["site-a", "site-b", "site-c"]);
    let stranger = Site::init_networked(tmp.path(), "stranger");
    let stranger_id = stranger.instance_id();
    let daemons: Vec<Daemon> = sites.iter().map(Site::start).collect();
    for d in &daemons {
        for other in sites.iter().filter(|s| s.name != d.name) {
            wait_connected(d, &other.name);
        }
    }

    // A libp2p peer with the stranger's key, which knows the sites' addresses, sends each a
    // validly signed message over a connection of its own.
    let peer = TestPeer::new(&stranger);
    let message = signed_cancel(peer.identity.signing_key(), "from a stranger");
    for (site, d) in sites.iter().zip(&daemons) {
        let denied = d.metric(DENIED);
        let seq = d.last_event();
        peer.allow(site);
        peer.dial(site);
        let frame = FedFrame::Batch(FedRequest { messages: vec![message.clone()] });
        let answer = peer.request(site, frame.clone());
        // The stranger's side: the site closes the connection right after the handshake (or
        // the dial fails), and a request gets no answer, whether sent before or after.
        let target = site.peer_id().to_string();
        peer.wait_for(&format!("{} closing the connection", site.name), T, |l| {
            l.starts_with(&format!("disconnected {target} 0"))
                || (l.contains("DialFailed") && l.contains(&target))
        });
        for answer in [answer, peer.request(site, frame)] {
            match &answer {
                Err(e) if is_refusal(e) => {}
                other => panic!("{} answered a stranger: {other:?}", site.name),
            }
        }
        // The site's side: denied, counted, logged with the stranger's id, nothing recorded.
        let ev = d.wait_for_event(seq, T, |e| {
            e.kind == "connection_denied" && e.peer.as_deref() == Some(stranger_id.as_str())
        });
        assert!(ev.detail.contains(&stranger_id), "{ev:?}");
        assert!(d.metric(DENIED) > denied, "{}: denial not counted", site.name);
        assert!(inbox(d).is_empty(), "{}: {:?}", site.name, inbox(d));
        let events = d.events(seq, Duration::ZERO);
        assert!(
            !events.iter().any(|e| {
                matches!(
                    e.kind.as_str(),
                    "peer_connected" | "message_accepted" | "message_rejected" | "request_refused"
                ) && e.peer.as_deref() != Some(sites[0].name.as_str())
                    && e.peer.as_deref() != Some(sites[1].name.as_str())
                    && e.peer.as_deref() != Some(sites[2].name.as_str())
            }),
            "{}: the stranger got past the gate: {events:#?}",
            site.name
        );
    }
    drop(peer);

    // The stranger's own daemon, with the three registered on its side only, cannot connect
    // either: its queued message stays queued and it says why.
    for site in &sites {
        stranger.register(site, &tmp.path().join(format!("{}.bundle", site.name)));
    }
    let seqs: Vec<u64> = daemons.iter().map(Daemon::last_event).collect();
    let denied: Vec<f64> = daemons.iter().map(|d| d.metric(DENIED)).collect();
    let sd = stranger.start();
    queue(&sd, "site-a", "let me in");
    for ((d, seq), denied) in daemons.iter().zip(&seqs).zip(&denied) {
        d.wait_for_event(*seq, T, |e| {
            e.kind == "connection_denied" && e.peer.as_deref() == Some(stranger_id.as_str())
        });
        assert!(d.metric(DENIED) > *denied);
    }
    for site in &sites {
        sd.wait_until(&format!("{} refusing the stranger", site.name), T, |sd| {
            sd.instance(&site.name).unwrap().status.contains("not registered there")
        });
    }
    let out = stranger.ok(&["instance", "list"]);
    assert!(out.contains("probably not registered there"), "{out}");
    assert_eq!(outbox_depth(&sd, "site-a"), 1);
    for (d, seq) in daemons.iter().zip(&seqs) {
        assert!(inbox(d).is_empty(), "{}: {:?}", d.name, inbox(d));
        let events = d.events(*seq, Duration::ZERO);
        assert!(
            !events.iter().any(|e| e.kind != "connection_denied"
                && (e.peer.as_deref() == Some(stranger_id.as_str())
                    || e.peer.as_deref() == Some("stranger"))),
            "{}: {events:#?}",
            d.name
        );
        assert_eq!(d.metric("kaapana_node_peers_connected"), 2.0, "{}", d.name);
    }
    assert!(sd.stop());
    for d in daemons {
        assert!(d.stop());
    }
}

#[test]
fn registration_must_be_mutual() {
    let tmp = common::test_dir();
    let a = Site::init_networked(tmp.path(), "site-a");
    let b = Site::init_networked(tmp.path(), "site-b");
    let bundle_a = a.export(tmp.path());
    let bundle_b = b.export(tmp.path());
    a.register(&b, &bundle_b);
    let a_id = a.instance_id();

    let da = a.start();
    let db = b.start();
    // A dials B; B refuses A, counts it, and A's `instance list` says why.
    db.wait_for_event(0, T, |e| {
        e.kind == "connection_denied" && e.peer.as_deref() == Some(a_id.as_str())
    });
    assert!(db.metric(DENIED) >= 1.0);
    da.wait_until("`instance list` explaining the refusal", T, |_| {
        let out = a.ok(&["instance", "list"]);
        out.contains("status:        not connected: site-b closed the connection")
            && out.contains("probably not registered there")
    });
    assert!(db.instances().is_empty());
    assert_eq!(db.metric("kaapana_node_peers_connected"), 0.0);
    // A keeps trying, but backs off: after its second refused connection it waits at least
    // a second (250 ms doubled per failure) before the next.
    let refused = |e: &Event| e.kind == "peer_disconnected" && e.peer.as_deref() == Some("site-b");
    let first = da.wait_for_event(0, T, refused);
    let second = da.wait_for_event(first.seq, T, refused);
    let next = da.wait_for_event(second.seq, T, |e| {
        e.kind == "peer_connected" && e.peer.as_deref() == Some("site-b")
    });
    let gap = next.at_ms - second.at_ms;
    assert!(gap >= 950, "redialed {gap} ms after the second refusal: no backoff");
    let events = db.events(0, Duration::ZERO);
    assert!(!events.iter().any(|e| e.kind == "peer_connected"), "{events:#?}");

    // B registers A through the CLI while its daemon runs (through the API): they connect.
    let seq_b = db.last_event();
    b.register(&a, &bundle_a);
    db.wait_for_event(seq_b, T, |e| e.kind == "instance_added");
    wait_connected(&db, "site-a");
    wait_connected(&da, "site-b");
    let out = a.ok(&["instance", "list"]);
    assert!(out.contains("status:        connected"), "{out}");
    let out = b.ok(&["instance", "list"]);
    assert!(out.contains("status:        connected"), "{out}");
    assert!(da.stop());
    assert!(db.stop());
}

#[test]
fn removing_an_instance_drops_its_connection_within_one_second() {
    let tmp = common::test_dir();
    let sites = federation(tmp.path(), &["site-a", "site-b"]);
    let (a, b) = (&sites[0], &sites[1]);
    let b_id = b.instance_id();
    let da = a.start();
    let db = b.start();
    wait_connected(&da, "site-b");
    wait_connected(&db, "site-a");

    let (seq_a, seq_b) = (da.last_event(), db.last_event());
    let t0 = now_ms();
    let out = a.ok(&["instance", "remove", "site-b"]);
    assert!(out.contains("Removed instance site-b"), "{out}");
    da.wait_for_event(seq_a, T, |e| e.kind == "instance_removed");
    let gone_b = db.wait_for_event(seq_b, T, |e| {
        e.kind == "peer_disconnected" && e.peer.as_deref() == Some("site-a")
    });
    let gone_a = da.wait_for_event(seq_a, T, |e| e.kind == "peer_disconnected");
    for gone in [&gone_b, &gone_a] {
        let took = gone.at_ms.saturating_sub(t0);
        eprintln!("closed {took} ms after `instance remove` started: {gone:?}");
        assert!(took < 1000, "connection closed {took} ms after `instance remove`: {gone:?}");
    }
    // B still has A registered and redials; A refuses it now.
    da.wait_for_event(gone_a.seq, T, |e| {
        e.kind == "connection_denied" && e.peer.as_deref() == Some(b_id.as_str())
    });
    assert!(da.instance("site-b").is_none());
    assert_eq!(da.metric("kaapana_node_peers_connected"), 0.0);
    assert_eq!(da.metric("kaapana_node_instances_registered"), 0.0);
    db.wait_until("A's refusal", T, |d| {
        d.instance("site-a").unwrap().status.contains("not registered there")
    });
    assert!(da.stop());
    assert!(db.stop());
}

/// A small deterministic generator for the seeded kill point.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn messages_to_a_stopped_instance_are_delivered_after_it_restarts_exactly_once() {
    const N: usize = 20;
    let seed = std::env::var("KAAPANA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_ms() ^ u64::from(std::process::id()));
    eprintln!("KAAPANA_TEST_SEED={seed}");
    let mut rng = seed;

    let tmp = common::test_dir();
    let sites = federation(tmp.path(), &["site-a", "site-b"]);
    let (a, b) = (&sites[0], &sites[1]);
    let da = a.start();
    let db = b.start();
    wait_connected(&da, "site-b");
    wait_connected(&db, "site-a");

    // 1. B is stopped; A queues N messages; B starts and gets them all, in order.
    assert!(db.stop(), "site-b did not exit cleanly");
    da.wait_until("site-b gone", T, |d| !d.is_connected_to("site-b"));
    let mut expected: Vec<String> = (0..N).map(|i| format!("first-{i:02}")).collect();
    for r in &expected {
        queue(&da, "site-b", r);
    }
    assert_eq!(outbox_depth(&da, "site-b"), N as u64);
    assert_eq!(da.metric("kaapana_node_outbox_depth"), N as f64);
    let db = b.start();
    db.wait_until("the queued messages", T, |d| inbox(d).len() >= N);
    da.wait_until("an empty outbox", T, |d| outbox_depth(d, "site-b") == 0);
    assert_eq!(inbox_reasons(&db), expected);
    assert_eq!(da.metric("kaapana_node_outbox_depth"), 0.0);
    assert_eq!(db.metric("kaapana_node_messages_in_total{kind=\"Cancel\"}"), N as f64);

    // 2. N more, one request each; B is SIGKILLed at a seeded point while they flow, and A
    // right after the last one was acknowledged (202) to the client.
    let kill_after = 1 + usize::try_from(splitmix(&mut rng) % (N as u64 - 1)).unwrap();
    let pause = Duration::from_millis(splitmix(&mut rng) % 15);
    eprintln!("killing site-b after message {kill_after} and {pause:?}");
    let mut db = Some(db);
    for i in 0..N {
        let r = format!("second-{i:02}");
        queue(&da, "site-b", &r);
        expected.push(r);
        if i + 1 == kill_after {
            // Not synchronisation: only varies where in the stream the kill lands.
            std::thread::sleep(pause);
            db.take().unwrap().kill();
        }
    }
    da.kill();

    // B restarts alone: registrations and A's capabilities are there before any connection,
    // and what it accepted it has exactly once.
    let db = b.start();
    let view = db.instance("site-a").expect("site-a still registered at site-b");
    assert_eq!(view.connected, Some(false));
    assert!(view.capabilities.is_some(), "capabilities of site-a lost: {view:?}");
    let out = b.ok(&["instance", "list"]);
    assert!(out.contains("site-a") && out.contains("capabilities:  node"), "{out}");
    let got = inbox_reasons(&db);
    assert!(got.len() >= N && got.len() <= N + kill_after, "{got:?}");
    assert_eq!(got[..], expected[..got.len()]);
    assert!(db.stop(), "site-b did not exit cleanly");

    // A restarts alone: registrations, B's capabilities and the undelivered outbox survived.
    let da = a.start();
    let view = da.instance("site-b").expect("site-b still registered at site-a");
    assert_eq!(view.connected, Some(false));
    assert!(view.capabilities.is_some(), "capabilities of site-b lost: {view:?}");
    let depth = view.outbox_depth;
    let delivered = (got.len() - N) as u64;
    assert!(depth >= (N - kill_after) as u64, "outbox lost messages: {depth}");
    assert!(depth + delivered >= N as u64, "{depth} queued + {delivered} delivered < {N}");
    eprintln!("before the kills: {delivered} delivered, {depth} still queued");
    assert_eq!(da.metric("kaapana_node_outbox_depth"), depth as f64);
    let out = a.ok(&["instance", "list"]);
    assert!(out.contains("site-b") && out.contains("capabilities:  node"), "{out}");
    assert!(out.contains(&format!("outbox:        {depth} message(s) waiting")), "{out}");

    // Both up: the rest arrives, nothing twice, in order.
    let db = b.start();
    da.wait_until("an empty outbox", T, |d| outbox_depth(d, "site-b") == 0);
    assert_eq!(inbox_reasons(&db), expected);
    assert!(da.stop());
    assert!(db.stop());
}

#[test]
fn tampered_expired_replayed_and_oversized_messages_are_rejected_with_their_reason() {
    let tmp = common::test_dir();
    let b = Site::init_networked(tmp.path(), "site-b");
    let tester = Site::init_networked(tmp.path(), "tester");
    let bundle = tester.export(tmp.path());
    b.register(&tester, &bundle);
    let db = b.start();
    let peer = TestPeer::new(&tester);
    peer.allow(&b);
    peer.connect(&b, T);
    db.wait_until("the tester connected", T, |d| d.is_connected_to("tester"));
    let key = peer.identity.signing_key();

    // One message, one verdict, one count under its reason.
    let expect_rejected = |what: &str, envelope: Vec<u8>, reason: RejectReason| {
        let before = rejections(&db, reason);
        let verdicts = peer.send(&b, vec![envelope]);
        match &verdicts[..] {
            [Delivery::Rejected { reason: r, .. }] if *r == reason => {}
            other => panic!("{what}: expected {reason:?}, got {other:?}"),
        }
        assert_eq!(rejections(&db, reason), before + 1.0, "{what} not counted");
    };

    // Tampered: one byte of the payload flipped.
    let mut tampered = signed_cancel(key, "tamper-me");
    let at = tampered.windows(9).position(|w| w == b"tamper-me").unwrap();
    tampered[at] ^= 0x01;
    expect_rejected("tampered", tampered, RejectReason::BadSignature);

    // The domain rewritten (a Cancel presented as a JobUpdate): the signature covers it.
    let cancel = signed_cancel(key, "re-labelled");
    let (body, signature) = cancel.split_at(cancel.len() - 64);
    let (head, rest): ((u8, &str, &[u8], &[u8]), _) = postcard::take_from_bytes(body).unwrap();
    assert!(rest.is_empty() && head.1 == "kaapana-node/1/Cancel");
    let mut relabelled =
        postcard::to_allocvec(&(head.0, "kaapana-node/1/JobUpdate", head.2, head.3)).unwrap();
    relabelled.extend_from_slice(signature);
    expect_rejected("domain rewritten", relabelled, RejectReason::BadSignature);

    // Expired: issued 2 h ago with a 1 h lifetime.
    let two_hours_ago = now().saturating_sub(Duration::from_secs(2 * 3600));
    let expired =
        Signed::sign(key, &cancel_at("too late", two_hours_ago, Duration::from_secs(3600)))
            .unwrap()
            .into_bytes();
    expect_rejected("expired", expired, RejectReason::Expired);

    // Replayed: the same valid message twice.
    let once = signed_cancel(key, "once");
    assert_eq!(peer.send(&b, vec![once.clone()]), vec![Delivery::Accepted]);
    expect_rejected("replayed", once, RejectReason::Replayed);

    // Signed by a key that is neither the sender's nor a registered instance's.
    let other = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
    expect_rejected(
        "unknown signer",
        signed_cancel(&other, "not mine"),
        RejectReason::UnknownSigner,
    );

    // Over its type's limit (a Cancel of 10 KiB), well signed.
    let big = cancel_at(&"x".repeat(10 * 1024), now(), Duration::from_secs(3600));
    let big = Signed::<Cancel>::sign_encoded(key, &postcard::to_allocvec(&big).unwrap());
    expect_rejected("oversized envelope", big.into_bytes(), RejectReason::Oversized);

    // Whole frames: over 4 MiB, and not a request at all.
    for (what, bytes, reason) in [
        ("a 5 MiB frame", vec![0u8; 5 << 20], RejectReason::Oversized),
        ("garbage", b"garbage".to_vec(), RejectReason::Malformed),
    ] {
        let before = rejections(&db, reason);
        match peer.request(&b, FedFrame::Raw(bytes)) {
            Ok(FedResponse::Refused { reason: r, .. }) if r == reason => {}
            other => panic!("{what}: expected a {reason:?} refusal, got {other:?}"),
        }
        assert_eq!(rejections(&db, reason), before + 1.0, "{what} not counted");
    }

    // The daemon keeps serving, over the same connection, and recorded only the valid ones.
    let last = signed_cancel(key, "still serving");
    assert_eq!(peer.send(&b, vec![last]), vec![Delivery::Accepted]);
    assert!(db.is_connected_to("tester"));
    assert_eq!(inbox_reasons(&db), ["once", "still serving"]);
    let tester_id = tester.instance_id();
    assert!(inbox(&db).iter().all(|e| e.from == tester_id));
    assert_eq!(db.metric("kaapana_node_messages_in_total{kind=\"Cancel\"}"), 2.0);
    drop(peer);
    assert!(db.stop());
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let tmp = common::test_dir();
    let sites = federation(tmp.path(), &["site-a", "site-b"]);
    let (a, b) = (&sites[0], &sites[1]);
    let da = a.start();
    let db = b.start();
    wait_connected(&da, "site-b");
    wait_connected(&db, "site-a");
    queue(&da, "site-b", "before shutdown");
    db.wait_until("the message", T, |d| inbox(d).len() == 1);

    let seq_b = db.last_event();
    assert!(a.dir.join("api-address").exists());
    assert!(da.stop(), "site-a did not exit cleanly");
    assert!(!a.dir.join("api-address").exists(), "api-address left behind");
    // It closed its connection on the way out.
    db.wait_for_event(seq_b, T, |e| {
        e.kind == "peer_disconnected" && e.peer.as_deref() == Some("site-a")
    });
    // The store opens afterwards: the CLI works offline.
    let out = a.ok(&["instance", "list"]);
    assert!(out.contains("site-b") && out.contains("unknown: the daemon is not running"), "{out}");
    // And the daemon starts again on it and reconnects.
    let da = a.start();
    wait_connected(&da, "site-b");
    assert!(da.stop());
    assert!(db.stop());
    let out = b.ok(&["instance", "list"]);
    assert!(out.contains("site-a"), "{out}");
}
