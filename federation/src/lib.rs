//! The federation core of kaapana-node: which instances this one knows, and what each of them
//! may do here.
//!
//! This crate owns the [`Registry`] of registered instances and the per-instance [`Policy`]
//! (allowed workflows, allowed datasets, automatic execution or local approval, mirroring
//! Kaapana's `allowed_dags`, `allowed_datasets` and `automatic_workflow_execution`), and the
//! job state machine at the runner ([`RunnerJob`]).
//!
//! At a workflow's owner, [`Workflow`] plans a DAG of job specs into jobs over the instances
//! whose capabilities match ([`Candidate`], [`select_runners`]): one job per runner (batch) or
//! per dataset item (single-file), dispatched once the results they read are stored, retried
//! after a lost runner or a failed executor, cancelled together when one fails for good. A
//! workflow with rounds is a [`Training`] (federated learning): a train step at the sites and
//! an aggregate step at the owner, round after round, with a quorum and a deadline per round.
//!
//! [`Site`] puts them together: one instance's whole federation logic, as owner and as
//! runner. [`Site::handle`] takes an [`Event`] (a verified message, an executor report, a
//! local request, a timer) and returns the [`Command`]s (persist, send, start or stop a job,
//! deliver a result, arm a timer, notify) in a documented order. The daemon and the simulator
//! only carry those out; neither holds a federation rule of its own.
//!
//! It is sans-IO: no sockets, no files, no clock reads, no threads, no randomness of its own.
//! Time arrives as [`Timestamp`](kaapana_protocol::Timestamp) arguments and everything else as
//! values, so the daemon and the simulator run the same code. Persisting a registry is the
//! node's store's job; parsing certificates is `kaapana-certs`'; wire types are
//! `kaapana-protocol`'s.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod capability;
mod job;
mod policy;
mod registry;
mod rounds;
mod site;
mod workflow;

pub use capability::{Candidate, select_runners};
pub use job::{
    Expected, RunnerCommand, RunnerEvent, RunnerJob, TransitionError, Update, UpdateError,
};
pub use policy::{AllowList, Denial, Execution, Policy};
pub use registry::{InstanceRef, RegisteredInstance, Registry, RegistryError};
pub use rounds::{RoundRecord, Training, TrainingSite};
pub use site::{
    Command, Event, Message, Notice, Outcome, Record, RunnerRecord, Site, SiteConfig, SiteError,
    Timer, Unrelated,
};
pub use workflow::{
    JobCounts, MAX_INPUTS, PlanError, RecordsError, Step, StepRound, Workflow, WorkflowCommand,
    WorkflowEvent, WorkflowHeader, WorkflowJob, WorkflowState, job_id,
};
