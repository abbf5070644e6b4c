//! DICOM for kaapana-node's jobs and demo: synthetic CT sites written as real DICOM Part-10
//! files ([`synthetic`]), statistics computed from DICOM files ([`stats`]) by the job program
//! `kaapana-stats` (`src/bin/kaapana-stats.rs`), and federated learning ([`fedavg`]: a
//! logistic regression on features of each series, trained at every site and averaged with
//! FedAvg at the owner) by the job program `kaapana-fedavg` (`src/bin/kaapana-fedavg.rs`).
//! Both programs are built statically so that they run in the busybox job image
//! (`kn_build_job_programs` in `scripts/common.sh`).
//!
//! This crate owns the DICOM encoding and decoding (through the dicom-rs crates), the synthetic
//! phantom and its ground truth, the JSON layout of the statistics and the files of the
//! federated training (`model.json`, `samples`, `metrics.json`). It only reads and
//! writes files: it must not open network connections, and it must not know federation rules,
//! the node's store, datasets or daemon (those stay in `kaapana-node`, which may call it).

mod error;
pub mod fedavg;
pub mod stats;
pub mod synthetic;

pub use error::DicomError;
pub use fedavg::FedAvgError;
pub use stats::{AgeDecades, HuHistogram, SexCounts, SiteStats, SliceCounts};
pub use synthetic::{SeriesTruth, SiteSpec, SiteTruth, write_site};
