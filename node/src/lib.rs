//! The kaapana-node daemon and CLI: everything that does I/O for one Kaapana instance.
//!
//! This crate owns the data directory ([`data_dir`]), the configuration ([`config`]), the
//! store ([`store`], redb behind a small typed API) and the administrative commands
//! ([`admin`]); the network, the executors and the HTTP API come with the daemon. It drives
//! `kaapana-federation`'s sans-IO core and must not re-implement its rules (registry, policy,
//! state machines), nor the wire format of `kaapana-protocol` or the certificate checks of
//! `kaapana-certs`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod config;
pub mod data_dir;
pub mod store;
