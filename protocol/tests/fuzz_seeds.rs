//! Writes a seed corpus for the `decode_verify` fuzz target (protocol/fuzz) when
//! `KAAPANA_WRITE_FUZZ_SEEDS=<dir>` is set; otherwise it only checks that the seeds verify.
//!
//! Seed layout (see protocol/fuzz/fuzz_targets/decode_verify.rs): the first byte selects the
//! manifest type (`b & 0x7f) % 7`, in `ManifestKind::ALL` order) and the mode: high bit clear
//! = the rest is an envelope; high bit set = the rest is a payload the target signs itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{NOW, key, opts};
use kaapana_protocol::{Manifest, ManifestKind, Signed};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

const SAMPLES_PER_TYPE: usize = 4;

fn seeds_of<T: Manifest>(strategy: impl Strategy<Value = T>, out: &mut Vec<(String, Vec<u8>)>) {
    let index = ManifestKind::ALL.iter().position(|k| *k == T::KIND).unwrap();
    let index = u8::try_from(index).unwrap();
    let mut runner = TestRunner::deterministic();
    for n in 0..SAMPLES_PER_TYPE {
        let value = strategy.new_tree(&mut runner).unwrap().current();
        let signed = Signed::sign(key(), &value).unwrap();
        // The seed must reach the end of the verify path.
        Signed::<T>::from_bytes(signed.as_bytes()).unwrap().verify(NOW, &opts()).unwrap();
        let mut envelope = vec![index];
        envelope.extend_from_slice(signed.as_bytes());
        out.push((format!("{}-envelope-{n}", T::KIND.name()), envelope));
        let mut payload = vec![0x80 | index];
        payload.extend_from_slice(&postcard::to_allocvec(&value).unwrap());
        out.push((format!("{}-payload-{n}", T::KIND.name()), payload));
    }
}

fn all_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    seeds_of(common::capability_ad(), &mut out);
    seeds_of(common::workflow_manifest(), &mut out);
    seeds_of(common::job_manifest(), &mut out);
    seeds_of(common::job_update(), &mut out);
    seeds_of(common::result_manifest(), &mut out);
    seeds_of(common::cancel(), &mut out);
    seeds_of(common::instance_bundle_info(), &mut out);
    out
}

#[test]
fn fuzz_seeds_verify_and_are_written_on_request() {
    let seeds = all_seeds();
    assert_eq!(seeds.len(), 7 * 2 * SAMPLES_PER_TYPE);
    if let Some(dir) = std::env::var_os("KAAPANA_WRITE_FUZZ_SEEDS") {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        println!("wrote {} seeds to {}", seeds.len(), dir.display());
    }
}
