//! The receive path of a typical ~1 KiB `JobManifest` against a raw ring Ed25519 verification
//! of the very same bytes.
//!
//! `cargo bench -p kaapana-protocol --bench manifest [-- --warm-up-time 1 --measurement-time 3]`
//!
//! After the run it prints `verify-path ratio = ring_verify_raw / verify` from the medians
//! criterion saved (target: ≥ 0.9, i.e. envelope parsing, payload decoding and checks add at
//! most ~10 % to the signature check itself).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::path::PathBuf;

use common::{NOW, key, opts};
use criterion::{Criterion, Throughput};
use kaapana_protocol::{JobManifest, Signed};
use ring::signature::{ED25519, UnparsedPublicKey};

const GROUP: &str = "manifest";

fn bench(c: &mut Criterion) {
    let manifest = common::typical_job_manifest();
    let payload_len = postcard::to_allocvec(&manifest).unwrap().len();
    let signed = Signed::sign(key(), &manifest).unwrap();
    let envelope = signed.as_bytes().to_vec();
    println!("JobManifest: payload {payload_len} B, envelope {} B", envelope.len());
    let (message, signature) = envelope.split_at(envelope.len() - 64);
    let public = UnparsedPublicKey::new(&ED25519, *key().public_key());
    public.verify(message, signature).unwrap();
    Signed::<JobManifest>::from_bytes(&envelope).unwrap().verify(NOW, &opts()).unwrap();

    let mut g = c.benchmark_group(GROUP);
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| {
        b.iter(|| Signed::sign(key(), black_box(&manifest)).unwrap());
    });
    g.bench_function("verify", |b| {
        b.iter(|| {
            let s = Signed::<JobManifest>::from_bytes(black_box(&envelope)).unwrap();
            s.verify(NOW, &opts()).unwrap()
        });
    });
    g.bench_function("decode", |b| {
        b.iter(|| Signed::<JobManifest>::from_bytes(black_box(&envelope)).unwrap());
    });
    g.bench_function("ring_verify_raw", |b| {
        b.iter(|| {
            let pk = UnparsedPublicKey::new(&ED25519, black_box(key().public_key()));
            pk.verify(black_box(message), black_box(signature)).unwrap();
        });
    });
    g.finish();
}

/// Where criterion stored its results: `$CRITERION_HOME`, else `<target>/criterion` next to
/// `<target>/release/deps/<this bench>`.
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.ancestors().nth(3)?.join("criterion"))
}

/// The median (ns) criterion saved for `name` in this run, from `new/estimates.json`.
fn median_ns(name: &str) -> Option<f64> {
    let path = criterion_dir()?.join(GROUP).join(name).join("new").join("estimates.json");
    let json = std::fs::read_to_string(path).ok()?;
    let median = &json[json.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    let names = ["sign", "verify", "decode", "ring_verify_raw"];
    if let [Some(sign), Some(verify), Some(decode), Some(raw)] = names.map(median_ns) {
        println!(
            "medians: sign {:.2} µs, verify {:.2} µs, decode {:.3} µs, ring_verify_raw {:.2} µs",
            sign / 1e3,
            verify / 1e3,
            decode / 1e3,
            raw / 1e3
        );
        println!(
            "verify-path ratio (ring_verify_raw / verify) = {:.3} (target >= 0.9)",
            raw / verify
        );
    }
}
