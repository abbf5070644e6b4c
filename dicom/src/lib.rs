//! DICOM for kaapana-node's jobs and demo: synthetic CT sites written as real DICOM Part-10
//! files ([`synthetic`]), and statistics computed from DICOM files ([`stats`]) by the job
//! program `kaapana-stats` (`src/bin/kaapana-stats.rs`), which is built statically so that it
//! runs in the busybox job image (`kn_build_job_programs` in `scripts/common.sh`).
//!
//! This crate owns the DICOM encoding and decoding (through the dicom-rs crates), the synthetic
//! phantom and its ground truth, and the JSON layout of the statistics. It only reads and
//! writes files: it must not open network connections, and it must not know federation rules,
//! the node's store, datasets or daemon (those stay in `kaapana-node`, which may call it).

mod error;
pub mod stats;
pub mod synthetic;

pub use error::DicomError;
pub use stats::{AgeDecades, HuHistogram, SexCounts, SiteStats, SliceCounts};
pub use synthetic::{SeriesTruth, SiteSpec, SiteTruth, write_site};
