//! The kaapana-node daemon and CLI: everything that does I/O for one Kaapana instance.
//!
//! This crate owns the data directory ([`data_dir`]), the configuration ([`config`]), the
//! store ([`store`], redb behind a small typed API) with its signed, hash-chained audit log
//! ([`audit`]), workflow files ([`workflow_file`]), the site's datasets ([`datasets`]), the site's PACS over DICOMweb ([`pacs`]), the administrative commands
//! ([`admin`]), the peer-to-peer network ([`net`], libp2p), the daemon ([`daemon`]) with its
//! local HTTP API ([`api`]: routes, and [`api::views`], the JSON bodies the CLI shares;
//! [`client`]), the dashboard pages served beside it ([`dashboard`]) and metrics ([`metrics`],
//! with short histories for the charts in [`history`]), the command line ([`cli`]: each subcommand of
//! `kaapana-node` as a library function; the binary only parses flags and sets up logging)
//! and the demo ([`demo`]); jobs run in containers through
//! [`executor`] (the `kaapana-executor` crate, re-exported: containerd, a configured one or the
//! node's own child process). It drives
//! `kaapana-federation`'s sans-IO core and must not re-implement its rules (registry, policy,
//! state machines), nor the wire format of `kaapana-protocol` or the certificate checks of
//! `kaapana-certs`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod api;
pub mod audit;
pub mod blobs;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod data_dir;
pub mod datasets;
pub mod demo;
pub mod events;
pub mod history;
pub use kaapana_executor as executor;
pub mod metrics;
pub mod net;
pub mod orthanc;
pub mod pacs;
pub mod pacs_cache;
pub mod store;
pub mod trust;
pub mod workflow_file;
