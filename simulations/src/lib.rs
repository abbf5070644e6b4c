//! A deterministic discrete-event simulator of kaapana-node federations.
//!
//! This crate owns the simulated world around the federation core: a virtual clock and a
//! priority queue of events ([`engine`]), seeded randomness ([`rng`]), scenario files
//! ([`config`]), the network, site, executor and fault models ([`sim`]), the invariants checked
//! at every step ([`invariants`]), the reports and charts of a run ([`report`], [`plot`]), and
//! its memory measurement ([`mem`]).
//!
//! It must not copy the federation's logic: every virtual site holds a
//! [`kaapana_federation::Site`], the same federation core the daemon runs, feeds it events
//! and carries out the commands it returns, with the real protocol structs as message
//! payloads. What it leaves to others: signing and verifying (messages are counted at their
//! signed size but not signed), real I/O (modelled in virtual time), and the daemon's own
//! code. It reads no clock and no entropy during a run: the same scenario and seed give
//! byte-identical results.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod engine;
pub mod invariants;
pub mod mem;
pub mod plot;
pub mod report;
pub mod rng;
pub mod sim;

pub use config::{ConfigError, Delivery, Scenario, Variant};
pub use engine::{EventQueue, Micros, SEC};
pub use invariants::{Invariants, Violation};
pub use report::{Perf, Row, run_scenario, run_variant};
pub use sim::{Counters, Sim, SimError, SimOptions, TraceEvent, WorkflowOutcome};
