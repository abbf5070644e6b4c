//! Result bundle throughput: `/kaapana/results/1` from an in-process runner peer to an owner
//! `kaapana-node run` process, beside baselines doing the same work, in one run.
//!
//! Prints MB/s (10^6 bytes per second) for one bundle (default 1 GiB, generated into a
//! temporary file), all streams in [`CHUNK`]-sized writes (ours: 1 MiB):
//! * on loopback: a rustls TLS 1.3 stream (ring, AES-256-GCM; then ChaCha20-Poly1305, the
//!   suite libp2p-tls negotiates), threads, no disk;
//! * a raw libp2p-stream over TCP+TLS+yamux between two in-process swarms (no disk);
//! * **baseline A**, the simplest correct program doing our work on the same transport: the
//!   same raw libp2p stream, the sender reading the bundle file, the receiver SHA-256-hashing
//!   and writing each chunk in its receive loop (one task, no pipelining), then fsyncing the
//!   file in the owner's data directory and checking the digest;
//! * `/kaapana/results/1` over TCP and over QUIC: the owner verifies the manifest, hashes and
//!   writes the bundle, fsyncs it and records the result before it answers `Stored`;
//!   **ratio results TCP / baseline A** (goal 0.8);
//! * the owner's disk alone (write + fsync of the same size) and SHA-256 alone, one core;
//! * over a **WAN-like path** ([`WanPath`]: hosts a and b in network namespaces, a router
//!   delaying every packet by 25 ms each way through a TUN device, `tbf` at 1 Gbit/s each way,
//!   TCP buffers up to 32 MiB in both hosts): a rustls stream from a to b (timed from its TCP
//!   connect), and ours from a runner peer in a to an owner daemon in b (timed from opening
//!   the stream, on a connection made before); **ratio results WAN / rustls WAN** (goal 0.8).
//!   yamux needs no setting for it: its stream window auto-tunes towards the BDP within a
//!   1 GiB connection window (yamux 0.14 defaults, see Cargo.lock).
//!
//! `cargo bench -p kaapana-node --bench results` (add `-- N` for N MiB). Needs root (network
//! namespaces, TUN). Figures here swing with the machine's load: compare within one run.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::netns::WanPath;
use common::{Daemon, Site, TestPeer, federation};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kaapana_node::blobs::hash_file;
use kaapana_node::net::results::{SendOutcome, send_result};
use kaapana_node::net::{SwarmLoop, build_swarm};
use kaapana_protocol::{
    BlobRef, ExitStatus, Header, JobId, JobTimings, ResultManifest, Signed, Timestamp, WorkflowId,
};
use libp2p::{Multiaddr, StreamProtocol};

/// The same chunk size as ours (the runner's reads and writes), for every stream here.
const CHUNK: usize = kaapana_node::net::results::CHUNK;

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

fn line(what: &str, bytes: u64, took: Duration) -> f64 {
    let r = mb_per_s(bytes, took);
    println!("  {what:<58} {r:>8.0} MB/s  {:>5.1} Gbit/s  ({took:.2?})", r * 8e6 / 1e9);
    r
}

/// A chunk of pseudo-random bytes (xorshift), different for each `seed`.
fn noise(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
}

fn write_bundle(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    let mut seed = 1;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        noise(seed, &mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
        seed += 1;
    }
    f.sync_all().unwrap();
}

// ----- rustls -----

/// A rustls stream on loopback, or with `wan` from host `a` to host `b` of that path.
fn rustls_stream(size: u64, chacha: bool) -> Duration {
    rustls_stream_over(size, chacha, None)
}

fn rustls_stream_over(size: u64, chacha: bool, wan: Option<&WanPath>) -> Duration {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &*ca)
        .unwrap();

    let mut provider = rustls::crypto::ring::default_provider();
    if chacha {
        provider.cipher_suites =
            vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    }
    let provider = Arc::new(provider);
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let ip = wan.map_or_else(|| "127.0.0.1".to_owned(), WanPath::ip_b);
    std::thread::scope(|scope| {
        let listener = scope
            .spawn(|| {
                if let Some(w) = wan {
                    w.enter('b');
                }
                TcpListener::bind((ip.as_str(), 0)).unwrap()
            })
            .join()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = scope.spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_nodelay(true).unwrap();
            let conn = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            while got < size {
                let n = tls.read(&mut buf).unwrap();
                assert!(n > 0, "early end of the TLS stream");
                got += n as u64;
            }
            let suite = tls.conn.negotiated_cipher_suite().unwrap().suite();
            (Instant::now(), format!("{suite:?}"))
        });
        let client = scope.spawn(move || {
            if let Some(w) = wan {
                w.enter('a');
            }
            let start = Instant::now();
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = vec![0u8; CHUNK];
            noise(7, &mut buf);
            let mut left = size;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                tls.write_all(&buf[..n]).unwrap();
                left -= n as u64;
            }
            tls.flush().unwrap();
            // Kept open until the server has read everything (closing with the server's unread
            // session tickets would reset the connection).
            (start, tls)
        });
        let (start, _tls) = client.join().unwrap();
        let (end, suite) = server.join().unwrap();
        let expected =
            if chacha { "TLS13_CHACHA20_POLY1305_SHA256" } else { "TLS13_AES_256_GCM_SHA384" };
        assert_eq!(suite, expected);
        end - start
    })
}

// ----- raw libp2p-stream -----

/// What the receiving end of a raw libp2p stream does with the bytes.
#[derive(Clone, Copy)]
enum RawSink<'a> {
    /// Drops them (the bare transport).
    Discard,
    /// Baseline A, the simplest correct program doing our work: the sender reads `bundle`,
    /// the receiver SHA-256-hashes and writes each chunk in its receive loop, then fsyncs
    /// the file in `dir` and checks size and digest.
    Store { bundle: &'a Path, blob: BlobRef, dir: &'a Path },
}

fn raw_libp2p_stream(size: u64, sink: RawSink<'_>) -> Duration {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut nets = Vec::new();
        for _ in 0..2 {
            let id = kaapana_certs::Identity::generate().unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let (swarm_loop, net) =
                SwarmLoop::new(build_swarm(id.libp2p_keypair(), &Default::default()).unwrap(), tx);
            tokio::spawn(swarm_loop.run(cancel.clone()));
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            nets.push(net);
        }
        let (a, b) = (&nets[0], &nets[1]);
        b.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
        let addrs: Vec<Multiaddr> = loop {
            let addrs = b.listen_addrs().await.unwrap();
            if !addrs.is_empty() {
                break addrs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        a.allow(b.local_peer_id(), addrs).await.unwrap();
        b.allow(a.local_peer_id(), Vec::new()).await.unwrap();
        let proto = StreamProtocol::new("/kaapana/bench-raw/1");
        let mut incoming = b.stream_control().accept(proto.clone()).unwrap();
        let target = match sink {
            RawSink::Discard => None,
            RawSink::Store { dir, blob, .. } => Some((dir.join("baseline-a"), blob)),
        };
        let sink_task = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            // A warm-up stream (dial, handshake), then the measured one.
            for want in [1u64, size] {
                let (_, mut s) = incoming.next().await.unwrap();
                let mut out = target
                    .as_ref()
                    .filter(|_| want == size)
                    .map(|(path, _)| std::fs::File::create(path).unwrap());
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut got = 0u64;
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    if let Some(f) = out.as_mut() {
                        ctx.update(&buf[..n]);
                        f.write_all(&buf[..n]).unwrap();
                    }
                    got += n as u64;
                }
                assert_eq!(got, want, "early end of the raw stream");
                if let (Some(f), Some((path, blob))) = (out, target.as_ref()) {
                    f.sync_all().unwrap();
                    assert_eq!(ctx.finish().as_ref(), &blob.digest.0[..], "digest");
                    std::fs::remove_file(path).unwrap();
                }
            }
            Instant::now()
        });
        let mut control = a.stream_control();
        let mut warm = control.open_stream(b.local_peer_id(), proto.clone()).await.unwrap();
        warm.write_all(&[1]).await.unwrap();
        warm.close().await.unwrap();

        let mut buf = vec![0u8; CHUNK];
        noise(9, &mut buf);
        let mut file = match sink {
            RawSink::Discard => None,
            RawSink::Store { bundle, .. } => Some(std::fs::File::open(bundle).unwrap()),
        };
        let start = Instant::now();
        let mut s = control.open_stream(b.local_peer_id(), proto).await.unwrap();
        let mut left = size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            if let Some(f) = file.as_mut() {
                f.read_exact(&mut buf[..n]).unwrap();
            }
            s.write_all(&buf[..n]).await.unwrap();
            left -= n as u64;
        }
        s.close().await.unwrap();
        let end = sink_task.await.unwrap();
        cancel.cancel();
        end - start
    })
}

// ----- /kaapana/results/1 -----

fn signed_result(runner: &Site, blob: BlobRef, job: JobId) -> Signed<ResultManifest> {
    let t = Timestamp::from_system_time(SystemTime::now());
    let manifest = ResultManifest {
        header: Header::new(t, Duration::from_secs(3600)),
        job_id: job,
        workflow_id: WorkflowId::from_bytes([6; 16]),
        attempt: 0,
        exit: ExitStatus::Exited(0),
        bundle: blob,
        log: None,
        timings: JobTimings { received_at: t, started_at: t, finished_at: t },
    };
    Signed::sign(runner.identity().signing_key(), &manifest).unwrap()
}

fn results_protocol(
    owner: &Site,
    daemon: &Daemon,
    runner: &Site,
    bundle: &Path,
    blob: BlobRef,
    quic: bool,
) -> Duration {
    results_protocol_from(TestPeer::new(runner), owner, daemon, runner, bundle, blob, quic)
}

/// [`results_protocol`] from `peer`, a [`TestPeer`] with `runner`'s key.
fn results_protocol_from(
    peer: TestPeer,
    owner: &Site,
    daemon: &Daemon,
    runner: &Site,
    bundle: &Path,
    blob: BlobRef,
    quic: bool,
) -> Duration {
    let stored = owner.dir.join("blobs/sha256").join(blob.digest.hex());
    let _ = std::fs::remove_file(&stored);
    if quic {
        peer.allow_quic(owner);
    } else {
        peer.allow(owner);
    }
    peer.connect(owner, Duration::from_secs(30));
    let signed = signed_result(runner, blob, daemon.submit_placeholder_job(&runner.name));
    let start = Instant::now();
    let outcome =
        peer.block_on(send_result(peer.stream_control(), owner.peer_id(), &signed, bundle));
    let took = start.elapsed();
    assert_eq!(outcome.unwrap(), SendOutcome::Stored { resumed_from: 0, sent: blob.size });
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), blob.size);
    took
}

// ----- what the owner does beyond the transport -----

fn disk_write_fsync(dir: &Path, size: u64) -> Duration {
    let path = dir.join("disk-reference");
    let mut buf = vec![0u8; CHUNK];
    noise(11, &mut buf);
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    let took = start.elapsed();
    std::fs::remove_file(&path).unwrap();
    took
}

fn sha256_alone(size: u64) -> Duration {
    let mut buf = vec![0u8; CHUNK];
    noise(13, &mut buf);
    let start = Instant::now();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = size;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        ctx.update(&buf[..n]);
        left -= n as u64;
    }
    std::hint::black_box(ctx.finish());
    start.elapsed()
}

// ----- the WAN-like path -----

/// Round trip 2 × this.
const WAN_DELAY: Duration = Duration::from_millis(25);
const WAN_RATE_MBIT: u32 = 1000;

/// Over a [`WanPath`] (25 ms each way, 1 Gbit/s each way, per-packet delay in the router):
/// a rustls stream from host a to host b, then `/kaapana/results/1` from a runner peer in
/// host a to an owner daemon in host b. Returns both durations.
fn over_wan(dir: &Path, bundle: &Path, blob: BlobRef) -> (Duration, Duration) {
    let path = WanPath::new(WAN_DELAY, WAN_RATE_MBIT);
    let ip = path.ip_b();
    let owner =
        Site::init_at(dir, "owner-wan", &format!("/ip4/{ip}/tcp/7400"), &format!("{ip}:7401"));
    let runner = Site::init_networked(dir, "runner-wan");
    let (ob, rb) = (owner.export(dir), runner.export(dir));
    owner.register(&runner, &rb);
    runner.register(&owner, &ob);
    let daemon = owner.start_command(path.command('b', common::node_binary()));
    let tls = rustls_stream_over(blob.size, false, Some(&path));
    // The runner's swarm (its runtime's threads) lives in host a.
    let peer = std::thread::scope(|s| {
        s.spawn(|| {
            path.enter('a');
            TestPeer::new(&runner)
        })
        .join()
        .unwrap()
    });
    let ours = results_protocol_from(peer, &owner, &daemon, &runner, bundle, blob, false);
    assert!(daemon.stop());
    (tls, ours)
}

fn main() {
    // `cargo bench` passes `--bench`; a number sets the bundle size in MiB.
    let mib = std::env::args().skip(1).find_map(|a| a.parse::<u64>().ok()).unwrap_or(1024);
    let size = mib << 20;
    let dir = tempfile::Builder::new().prefix("kaapana-results-bench-").tempdir().unwrap();
    let bundle = dir.path().join("bundle.tar");
    write_bundle(&bundle, size);
    let blob = hash_file(&bundle).unwrap();
    let sites = federation(dir.path(), &["owner", "runner"]);
    let (owner, runner) = (&sites[0], &sites[1]);
    let daemon = owner.start();
    // The same with the owner's data directory in memory, to tell the protocol's cost from
    // the disk's.
    let shm = Path::new("/dev/shm").is_dir().then(|| {
        let dir = tempfile::Builder::new()
            .prefix("kaapana-results-bench-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let sites = federation(dir.path(), &["owner-tmpfs", "runner-tmpfs"]);
        let daemon = sites[0].start();
        (dir, sites, daemon)
    });

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!("result bundle of {mib} MiB, loopback, 2 cores, one run (load average {load}):");
    let tls = line(
        "rustls TLS 1.3 AES-256-GCM stream (threads, no disk)",
        size,
        rustls_stream(size, false),
    );
    let chacha = line("rustls TLS 1.3 ChaCha20-Poly1305 stream", size, rustls_stream(size, true));
    let raw = line(
        "raw libp2p-stream TCP+TLS+yamux (in process, no disk)",
        size,
        raw_libp2p_stream(size, RawSink::Discard),
    );
    // Also warms the page cache up for what follows.
    let disk = line("owner's disk alone: write + fsync", size, disk_write_fsync(&owner.dir, size));
    let ours = line(
        "/kaapana/results/1 TCP: runner -> owner daemon, stored",
        size,
        results_protocol(owner, &daemon, runner, &bundle, blob, false),
    );
    let baseline_a = line(
        "A: raw libp2p-stream, receiver hashes + writes + fsyncs",
        size,
        raw_libp2p_stream(size, RawSink::Store { bundle: &bundle, blob, dir: &owner.dir }),
    );
    let ours_quic = line(
        "/kaapana/results/1 QUIC: runner -> owner daemon, stored",
        size,
        results_protocol(owner, &daemon, runner, &bundle, blob, true),
    );
    let ours_tmpfs = shm.as_ref().map(|(_, sites, daemon)| {
        line(
            "/kaapana/results/1 TCP, owner's data dir on tmpfs (no disk)",
            size,
            results_protocol(&sites[0], daemon, &sites[1], &bundle, blob, false),
        )
    });
    line("SHA-256 alone (ring, one core)", size, sha256_alone(size));
    println!("  ratio results TCP / baseline A: {:.2} (goal 0.8)", ours / baseline_a);
    println!("  ratio results TCP / rustls AES-GCM:       {:.2}", ours / tls);
    println!("  ratio results TCP / rustls ChaCha20:      {:.2}", ours / chacha);
    println!("  ratio results TCP / raw libp2p-stream:    {:.2}", ours / raw);
    println!("  ratio results TCP / disk alone:           {:.2}", ours / disk);
    println!("  ratio results QUIC / rustls AES-GCM:      {:.2}", ours_quic / tls);
    if let Some(r) = ours_tmpfs {
        println!("  ratio results tmpfs / rustls AES-GCM:     {:.2}", r / tls);
        println!("  ratio results tmpfs / raw libp2p-stream:  {:.2}", r / raw);
    }
    let (wan_tls, wan_ours) = over_wan(dir.path(), &bundle, blob);
    println!(
        "WAN-like path: {} ms each way (per packet, user-space TUN delay), tbf {WAN_RATE_MBIT} Mbit/s each way, MTU {}:",
        WAN_DELAY.as_millis(),
        common::netns::WAN_MTU
    );
    let wan_tls = line("rustls TLS 1.3 AES-256-GCM stream, host a -> host b", size, wan_tls);
    let wan_ours = line("/kaapana/results/1 TCP: runner in a -> owner daemon in b", size, wan_ours);
    println!("  ratio results WAN / rustls WAN: {:.2} (goal 0.8)", wan_ours / wan_tls);
    assert!(daemon.stop());
    if let Some((_dir, _sites, daemon)) = shm {
        assert!(daemon.stop());
    }
}
