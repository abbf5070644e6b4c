//! Workflows at their owner: a DAG of job specs planned into jobs, dispatched as their inputs
//! become available, retried, failed or cancelled.
//!
//! [`Workflow::start`] plans a verified [`WorkflowManifest`] over the instances the owner knows
//! ([`Candidate`]s): every step becomes one job per runner (batch processing) or one job per
//! dataset item (single-file processing). [`Workflow::handle`] then takes what happens to the
//! jobs ([`WorkflowEvent`]) and returns what the node must do ([`WorkflowCommand`]): sign and
//! send job manifests, cancel jobs, announce the end. A job is dispatched once every job of
//! every step it reads from has finished and its result bundle is stored at the owner.
//!
//! Sans-IO and deterministic: time comes in as arguments and job ids are derived from the
//! workflow id, the job's name and its attempt, so replaying the same events gives the same
//! commands.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use kaapana_protocol::{
    BlobRef, CapabilityQuery, DatasetRef, Header, InputBundle, InstanceId, ItemToken, JobId,
    JobManifest, JobSpec, JobState, JobUpdate, MAX_NAME_LEN, Manifest, Pick, Processing,
    ResultManifest, RunnerSelector, Sha256Digest, Timestamp, ValidationError, WorkflowId,
    WorkflowManifest, fit_text,
};
use serde::{Deserialize, Serialize};

use crate::capability::{self, Candidate, QueryText};
use crate::job::{Expected, UpdateError};
use crate::rounds::Training;

/// The most upstream results one job manifest may list (the protocol's limit on `inputs`).
pub const MAX_INPUTS: usize = 1024;

/// Where a workflow is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkflowState {
    /// Some of its jobs have not finished yet.
    Running,
    /// Every job finished and its result is stored here.
    Finished,
    /// A job failed for good; the others were cancelled.
    Failed,
    /// A user cancelled it.
    Cancelled,
}

impl WorkflowState {
    /// Whether no further transition follows.
    pub const fn is_final(self) -> bool {
        !matches!(self, Self::Running)
    }
}

impl fmt::Display for WorkflowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        })
    }
}

/// One step of a workflow: its job spec and what planning resolved for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The spec, as the manifest has it.
    pub spec: JobSpec,
    /// The dataset its jobs read: the spec's, or else its capability query's.
    pub dataset: Option<String>,
    /// The steps it reads from, as indices into [`Workflow::steps`], in the spec's order.
    pub inputs: Vec<usize>,
    /// Results its jobs read besides those of `inputs`: for a training's rounds, the model
    /// of the round before (train) or the round's updates (aggregate).
    pub external: Vec<InputBundle>,
    /// Its place in a training's rounds; `None` in a plain workflow.
    pub round: Option<StepRound>,
}

/// What a step of a training is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRound {
    /// The round (from 1).
    pub round: u32,
    /// Whether it is the round's aggregate step (else its train step).
    pub aggregate: bool,
}

impl Step {
    /// The capability query its jobs may move along after a runner is lost or its executor
    /// failed: only a [`Pick::Best`] batch step's, whose single job may run at any matching
    /// instance. Jobs of [`Pick::All`] steps and single-file jobs are bound to the data of
    /// their runner (item tokens name items at that runner), so they never move.
    pub fn movable_query(&self) -> Option<&CapabilityQuery> {
        match (&self.spec.runner, self.spec.processing) {
            (RunnerSelector::Query(q), Processing::Batch) if q.pick == Pick::Best => Some(q),
            _ => None,
        }
    }

    /// How many of its jobs may be dispatched and not yet ended at one runner.
    fn parallel_bound(&self) -> usize {
        match self.spec.processing {
            Processing::Batch => usize::MAX,
            Processing::SingleFile { max_parallel } => {
                usize::try_from(max_parallel.max(1)).unwrap_or(usize::MAX)
            }
        }
    }
}

/// One job of a workflow, in its current attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowJob {
    /// The current attempt's id.
    pub job_id: JobId,
    /// Its step, as an index into [`Workflow::steps`].
    pub step: usize,
    /// Its name: the step's, or `<step>-<k>` when the step expands into several jobs. Its
    /// result appears under `/input/<name>/` for the steps that read it.
    pub name: String,
    /// The instance that runs it.
    pub runner: InstanceId,
    /// That instance's registered name (`owner` for the owner when it has no other).
    pub runner_name: String,
    /// For single-file processing: the one item it reads.
    pub item: Option<ItemToken>,
    /// 0 for the first attempt, then 1, 2, ...
    pub attempt: u32,
    /// False while it waits for its inputs or for a `max_parallel` slot.
    pub dispatched: bool,
    /// Its state: `Queued` until its runner reports.
    pub state: JobState,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// Its result bundle, once stored here (successful runs only).
    pub result: Option<BlobRef>,
    /// The ids of its earlier attempts, oldest first.
    pub previous: Vec<JobId>,
    /// The runners of its earlier attempts, in the order of `previous`.
    pub previous_runners: Vec<InstanceId>,
    /// For failures: whether its runner said trying again may succeed.
    pub retryable: bool,
    /// The highest update sequence applied in this attempt.
    pub last_sequence: u32,
    /// When its record last changed (dispatch or an applied update).
    pub updated_at: Timestamp,
    /// For a training's update: the sample count it reported, once its result is stored.
    pub samples: Option<u64>,
}

impl WorkflowJob {
    /// Whether it finished and its result is stored here, so that the steps reading from it
    /// may start.
    pub fn is_done(&self) -> bool {
        self.state == JobState::Finished && self.result.is_some()
    }
}

/// What happened to a workflow.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkflowEvent {
    /// A verified job update from the job's runner (the node already applied it to its
    /// [`OwnerJob`](crate::OwnerJob) record).
    JobUpdated {
        /// The job.
        job_id: JobId,
        /// Its new state.
        state: JobState,
        /// Why (failures).
        reason: Option<String>,
        /// For failures: whether trying again may succeed.
        retryable: bool,
    },
    /// A job's verified result bundle is stored at the owner; `success` = it exited 0.
    ResultStored {
        /// The job.
        job_id: JobId,
        /// The bundle.
        bundle: BlobRef,
        /// Whether the job exited with status 0.
        success: bool,
        /// The sample count the bundle reports (its `samples` file), read by the node for a
        /// training's updates ([`Workflow::is_update`]); `None` otherwise.
        samples: Option<u64>,
    },
    /// Time passed: a training checks its round deadline (the node feeds it at the time a
    /// [`WorkflowCommand::WakeAt`] asked for; early or repeated ticks change nothing).
    Tick,
    /// The node decided this runner is gone (unreachable longer than its grace period).
    RunnerLost {
        /// The runner.
        instance: InstanceId,
    },
    /// A user cancels the workflow.
    Cancel {
        /// Who, in words (a user or an instance name).
        by: String,
    },
    /// The owner gives a dispatched job up (its runner has been gone too long, or refused the
    /// job manifest for good): it fails with `reason`, whether it had ended or not, and is not
    /// tried again.
    GiveUp {
        /// The job.
        job_id: JobId,
        /// Why.
        reason: String,
    },
}

/// What the node must do, in order.
// Most commands are dispatches and live only until the node has carried them out: boxing the
// manifest would cost an allocation each and buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkflowCommand {
    /// Sign this job manifest and send it to its runner (or run it here when runner == owner).
    Dispatch(JobManifest),
    /// Feed [`WorkflowEvent::Tick`] at this time (it replaces an earlier wake-up).
    WakeAt(Timestamp),
    /// Send a signed Cancel for this job to its runner.
    CancelJob {
        /// The job's runner.
        runner: InstanceId,
        /// The job.
        job_id: JobId,
        /// Why.
        reason: String,
    },
    /// The workflow reached a final state.
    Ended {
        /// Which.
        state: WorkflowState,
        /// Why (failures and cancellations).
        reason: Option<String>,
    },
}

/// Why a workflow manifest cannot be planned into jobs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The manifest itself is malformed.
    #[error("the workflow manifest is invalid: {0}")]
    Invalid(#[from] ValidationError),
    /// No known instance satisfies a step's capability query.
    #[error("no registered instance matches job {job}'s query ({query}): {why}")]
    NoRunner {
        /// The step.
        job: String,
        /// The query, in words.
        query: String,
        /// Why each known instance does not match.
        why: String,
    },
    /// A step names an instance the owner does not know.
    #[error(
        "job {job} runs at instance {instance}, which is not registered here or has not sent \
         its capabilities; register it with `kaapana-node instance add`, wait until it is \
         connected, or choose another runner"
    )]
    UnknownInstance {
        /// The step.
        job: String,
        /// The instance id.
        instance: String,
    },
    /// A single-file step names no dataset.
    #[error(
        "job {job} uses single-file processing but names no dataset; give it a dataset (or a \
         query with one) or use batch processing"
    )]
    NoDataset {
        /// The step.
        job: String,
    },
    /// A single-file step's runner offers no items of its dataset to the owner.
    #[error(
        "job {job}: instance {runner} offers no items of dataset {dataset} to this instance \
         (the dataset is missing, empty or not allowed for us there); ask its admin to allow \
         it, or use batch processing"
    )]
    NoItems {
        /// The step.
        job: String,
        /// The runner's name.
        runner: String,
        /// The dataset.
        dataset: String,
    },
    /// Two steps expand into jobs of the same name.
    #[error("steps {first} and {second} both make a job named {name}; rename one of the steps")]
    NameClash {
        /// The job name.
        name: String,
        /// The step that made it first.
        first: String,
        /// The other step.
        second: String,
    },
    /// A training's train step names no dataset, so its updates' sample counts cannot be
    /// checked.
    #[error(
        "job {job} is a training's train step but names no dataset; give it a dataset (or a \
         query with one): each site's sample count is checked against the items it advertises"
    )]
    TrainingWithoutDataset {
        /// The step.
        job: String,
    },
    /// Fewer sites match a training's train step than its quorum needs.
    #[error(
        "job {job} matches {found} site(s) ({sites}), fewer than min_sites = {min}; register \
         more sites, wait until they are connected, or lower min_sites"
    )]
    TooFewSites {
        /// The step.
        job: String,
        /// How many match.
        found: usize,
        /// Their names.
        sites: String,
        /// The quorum.
        min: u32,
    },
    /// A step reads more upstream results than one job manifest may list.
    #[error(
        "job {job} reads {count} upstream results, more than the {max} a job manifest may \
         list; split its upstream steps or aggregate in stages"
    )]
    TooManyInputs {
        /// The step.
        job: String,
        /// How many upstream jobs it reads from.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// How many of a workflow's jobs are where, for display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    /// Not dispatched yet (waiting for inputs or a slot).
    pub waiting: usize,
    /// Dispatched, not yet reported by the runner.
    pub queued: usize,
    /// Held by the runner.
    pub pending: usize,
    /// Held by the runner until its admin approves.
    pub awaiting_approval: usize,
    /// Accepted, waiting for resources.
    pub scheduled: usize,
    /// Running.
    pub running: usize,
    /// Finished (with or without the result stored yet).
    pub finished: usize,
    /// Failed.
    pub failed: usize,
}

impl fmt::Display for JobCounts {
    /// The non-zero counts, e.g. `2 running, 3 finished`, or `no jobs`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [
            (self.waiting, "waiting"),
            (self.queued, "queued"),
            (self.pending, "pending"),
            (self.awaiting_approval, "awaiting approval"),
            (self.scheduled, "scheduled"),
            (self.running, "running"),
            (self.finished, "finished"),
            (self.failed, "failed"),
        ];
        let mut first = true;
        for (n, what) in parts.into_iter().filter(|(n, _)| *n > 0) {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{n} {what}")?;
        }
        if first {
            f.write_str("no jobs")?;
        }
        Ok(())
    }
}

/// A workflow as its owner sees it: the owner's durable view.
///
/// Change it only through [`Workflow::handle`]; the fields are public to be read and stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workflow {
    /// Its id, chosen by the owner.
    pub workflow_id: WorkflowId,
    /// Its name (what runners' policies allow or not).
    pub name: String,
    /// The owner: this instance.
    pub owner: InstanceId,
    /// The owner's name as job names and reasons show it.
    pub owner_name: String,
    /// Where it is.
    pub state: WorkflowState,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// When it was started.
    pub created_at: Timestamp,
    /// When it reached its final state.
    pub ended_at: Option<Timestamp>,
    /// One per job spec, in manifest order; for a training, two per round (train and
    /// aggregate), added as the rounds open and close.
    pub steps: Vec<Step>,
    /// Every job of every step, in its current attempt, grouped by step in step order.
    pub jobs: Vec<WorkflowJob>,
    /// For a workflow with rounds: where its training is.
    pub training: Option<Training>,
    /// Lookup tables derived from `steps` and `jobs`; rebuilt after deserializing.
    #[serde(skip)]
    pub(crate) index: Index,
    /// Counts changes, so that a caller can tell an event that changed nothing without
    /// comparing whole workflows ([`Workflow::revision`]).
    #[serde(skip)]
    pub(crate) revision: Revision,
    /// Which of its records changed since the site last took them
    /// ([`Workflow::take_changes`]).
    #[serde(skip)]
    pub(crate) changes: Changes,
}

/// A workflow's own fields, without its jobs: the record its owner stores for the workflow
/// itself. Each job has a record of its own (its [`WorkflowJob`], by its position in
/// [`Workflow::jobs`]), so an event that changes one job rewrites that job's record only.
/// [`Workflow::from_records`] puts the two together again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowHeader {
    /// [`Workflow::workflow_id`].
    pub workflow_id: WorkflowId,
    /// [`Workflow::name`].
    pub name: String,
    /// [`Workflow::owner`].
    pub owner: InstanceId,
    /// [`Workflow::owner_name`].
    pub owner_name: String,
    /// [`Workflow::state`].
    pub state: WorkflowState,
    /// [`Workflow::reason`].
    pub reason: Option<String>,
    /// [`Workflow::created_at`].
    pub created_at: Timestamp,
    /// [`Workflow::ended_at`].
    pub ended_at: Option<Timestamp>,
    /// [`Workflow::steps`].
    pub steps: Vec<Step>,
    /// [`Workflow::training`].
    pub training: Option<Training>,
    /// How many jobs it has: its job records are those at positions `0..job_count`.
    pub job_count: u32,
}

/// Why stored records do not make a workflow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// Job records are missing or extra.
    #[error(
        "workflow {workflow}: its record names {expected} jobs, but {found} job records were found"
    )]
    JobCount {
        /// The workflow.
        workflow: WorkflowId,
        /// How many its header names.
        expected: u32,
        /// How many were given.
        found: usize,
    },
    /// A job names a step the workflow does not have.
    #[error("workflow {workflow}: job record {index} names step {step}, but it has {steps} steps")]
    NoSuchStep {
        /// The workflow.
        workflow: WorkflowId,
        /// The job's position.
        index: usize,
        /// The step it names.
        step: usize,
        /// How many steps there are.
        steps: usize,
    },
}

impl Workflow {
    /// Plans the jobs of a verified manifest (owned by `manifest.owner`) over the known
    /// candidates and returns the first dispatches (jobs without inputs). `job_lifetime` is
    /// the JobManifest header lifetime.
    pub fn start(
        manifest: &WorkflowManifest,
        candidates: &[Candidate],
        now: Timestamp,
        job_lifetime: Duration,
    ) -> Result<(Self, Vec<WorkflowCommand>), PlanError> {
        manifest.validate()?;
        if let Some(rounds) = &manifest.rounds {
            return Self::start_training(manifest, rounds, candidates, now, job_lifetime);
        }
        let owner = manifest.owner;
        let owner_name = candidate(candidates, &owner).map_or("owner", |c| c.name.as_str());
        // Each instance's first entry, for lookups in time O(log n) while planning.
        let mut by_id: BTreeMap<InstanceId, &Candidate> = BTreeMap::new();
        for c in candidates {
            by_id.entry(c.instance).or_insert(c);
        }
        let step_index: BTreeMap<&str, usize> =
            manifest.jobs.iter().enumerate().map(|(i, j)| (j.name.as_str(), i)).collect();

        let mut steps = Vec::with_capacity(manifest.jobs.len());
        let mut jobs: Vec<WorkflowJob> = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut counts: Vec<usize> = Vec::with_capacity(manifest.jobs.len());
        for (s, spec) in manifest.jobs.iter().enumerate() {
            let query = match &spec.runner {
                RunnerSelector::Query(q) => Some(q),
                _ => None,
            };
            let dataset = spec.dataset.clone().or_else(|| query.and_then(|q| q.dataset.clone()));
            let runners = resolve_runners(spec, owner, owner_name, candidates)?;
            let mut units: Vec<(InstanceId, String, Option<ItemToken>)> = Vec::new();
            match spec.processing {
                Processing::Batch => {
                    units.extend(runners.into_iter().map(|(id, name)| (id, name, None)));
                }
                Processing::SingleFile { .. } => {
                    let Some(d) = &dataset else {
                        return Err(PlanError::NoDataset { job: spec.name.clone() });
                    };
                    for (id, name) in runners {
                        let tokens = by_id
                            .get(&id)
                            .copied()
                            .and_then(|c| c.ad.datasets.iter().find(|x| &x.name == d))
                            .map(|x| x.tokens.as_slice())
                            .unwrap_or_default();
                        if tokens.is_empty() {
                            return Err(PlanError::NoItems {
                                job: spec.name.clone(),
                                runner: name,
                                dataset: d.clone(),
                            });
                        }
                        units.extend(tokens.iter().map(|t| (id, name.clone(), Some(*t))));
                    }
                }
            }
            let single = units.len() == 1;
            counts.push(units.len());
            for (k, (runner, runner_name, item)) in units.into_iter().enumerate() {
                let name = if single { spec.name.clone() } else { numbered(&spec.name, k + 1) };
                if let Some(&first) = names.get(&name) {
                    let first =
                        manifest.jobs.get(first).map(|j| j.name.clone()).unwrap_or_default();
                    return Err(PlanError::NameClash { name, first, second: spec.name.clone() });
                }
                names.insert(name.clone(), s);
                jobs.push(WorkflowJob {
                    job_id: job_id(&manifest.workflow_id, &name, 0),
                    step: s,
                    name,
                    runner,
                    runner_name,
                    item,
                    attempt: 0,
                    dispatched: false,
                    state: JobState::Queued,
                    reason: None,
                    result: None,
                    previous: Vec::new(),
                    previous_runners: Vec::new(),
                    retryable: false,
                    last_sequence: 0,
                    updated_at: now,
                    samples: None,
                });
            }
            let mut inputs: Vec<usize> = Vec::with_capacity(spec.inputs.len());
            for &i in spec.inputs.iter().filter_map(|i| step_index.get(i.as_str())) {
                if !inputs.contains(&i) {
                    inputs.push(i);
                }
            }
            steps.push(Step {
                spec: spec.clone(),
                dataset,
                inputs,
                external: Vec::new(),
                round: None,
            });
        }
        for step in &steps {
            let count: usize = step.inputs.iter().filter_map(|&i| counts.get(i)).sum();
            if count > MAX_INPUTS {
                return Err(PlanError::TooManyInputs {
                    job: step.spec.name.clone(),
                    count,
                    max: MAX_INPUTS,
                });
            }
        }

        let mut wf = Self {
            workflow_id: manifest.workflow_id,
            name: manifest.name.clone(),
            owner,
            owner_name: owner_name.to_owned(),
            state: WorkflowState::Running,
            reason: None,
            created_at: now,
            ended_at: None,
            steps,
            jobs,
            training: None,
            index: Index::default(),
            revision: Revision::default(),
            changes: Changes::default(),
        };
        wf.touch_header();
        for i in 0..wf.jobs.len() {
            wf.touch(i);
        }
        wf.ensure_index();
        let mut out = Vec::new();
        let all: BTreeSet<usize> = (0..wf.steps.len()).collect();
        wf.settle(all, now, job_lifetime, &mut out);
        Ok((wf, out))
    }

    /// Applies one event; unknown job ids (e.g. late updates of replaced attempts) change
    /// nothing, and neither does anything after the workflow's final state.
    pub fn handle(
        &mut self,
        event: WorkflowEvent,
        candidates: &[Candidate],
        now: Timestamp,
        job_lifetime: Duration,
    ) -> Vec<WorkflowCommand> {
        let mut out = Vec::new();
        if self.state.is_final() {
            return out;
        }
        self.ensure_index();
        let mut touched = BTreeSet::new();
        match event {
            WorkflowEvent::JobUpdated { job_id, state, reason, retryable } => {
                let Some(i) = self.live_job(&job_id) else { return out };
                touched.insert(self.jobs[i].step);
                match state {
                    JobState::Finished => self.set_terminal(i, JobState::Finished, reason),
                    JobState::Failed => {
                        self.set_terminal(i, JobState::Failed, reason);
                        self.after_failure(i, retryable, None, candidates, now, &mut out);
                    }
                    other => {
                        let job = &mut self.jobs[i];
                        job.state = other;
                        job.reason = reason;
                        self.touch(i);
                    }
                }
            }
            WorkflowEvent::ResultStored { job_id, bundle, success, samples } => {
                let Some(i) = self.live_job_or_finished(&job_id) else { return out };
                if !success {
                    // The runner's Failed update says why; it decides what happens next.
                    return out;
                }
                touched.insert(self.jobs[i].step);
                match self.check_update(i, samples) {
                    Ok(n) => {
                        self.jobs[i].samples = n;
                        self.touch(i);
                        self.store_result(i, bundle);
                    }
                    Err(reason) => {
                        self.fail(i, fit_text(&reason));
                        self.jobs[i].updated_at = now;
                        self.touch(i);
                    }
                }
            }
            WorkflowEvent::Tick => {}
            WorkflowEvent::RunnerLost { instance } => {
                self.runner_lost(instance, candidates, now, &mut touched, &mut out);
            }
            WorkflowEvent::Cancel { by } => {
                let reason = fit_text(&format!("workflow {} cancelled by {by}", self.name));
                self.end(WorkflowState::Cancelled, reason.clone(), &reason, now, &mut out);
            }
            WorkflowEvent::GiveUp { job_id, reason } => {
                let Some(i) = self.live_job_or_finished(&job_id) else { return out };
                touched.insert(self.jobs[i].step);
                self.fail(i, fit_text(&reason));
                self.jobs[i].updated_at = now;
                self.touch(i);
                self.after_failure(i, false, None, candidates, now, &mut out);
            }
        }
        self.settle(touched, now, job_lifetime, &mut out);
        out
    }

    /// Applies a verified job update signed by `from`, as the owner's record of the job:
    /// only the job's runner may update it, only for its current attempt, and updates arrive
    /// at least once and possibly out of order, so older ones are ignored and a final state
    /// is never left. `Ok(None)`: nothing changed.
    pub fn apply_update(
        &mut self,
        from: InstanceId,
        update: &JobUpdate,
        candidates: &[Candidate],
        now: Timestamp,
        job_lifetime: Duration,
    ) -> Result<Option<Vec<WorkflowCommand>>, UpdateError> {
        self.ensure_index();
        let Some(i) = self.find(&update.job_id) else {
            return Err(UpdateError::UnknownJob { job: update.job_id });
        };
        let job = &mut self.jobs[i];
        if from != job.runner {
            return Err(UpdateError::NotTheRunner {
                job: job.job_id,
                from: from.to_string(),
                runner: job.runner.to_string(),
            });
        }
        if update.attempt != job.attempt {
            return Err(UpdateError::OtherAttempt {
                job: job.job_id,
                got: update.attempt,
                current: job.attempt,
            });
        }
        if update.sequence <= job.last_sequence || job.state.is_terminal() || !job.dispatched {
            return Ok(None);
        }
        job.last_sequence = update.sequence;
        job.retryable = update.retryable;
        job.updated_at = now;
        self.touch(i);
        let event = WorkflowEvent::JobUpdated {
            job_id: update.job_id,
            state: update.state,
            reason: update.reason.clone(),
            retryable: update.retryable,
        };
        Ok(Some(self.handle(event, candidates, now, job_lifetime)))
    }

    /// Whether the owner takes `result`, signed by `runner`: a result of the current attempt
    /// of one of this workflow's jobs, run by that runner.
    pub fn expects_result(&self, result: &ResultManifest, runner: &InstanceId) -> Expected {
        if let Some(j) = self.job(&result.job_id) {
            return if j.runner == *runner && j.attempt == result.attempt {
                Expected::Yes
            } else {
                Expected::NotYours
            };
        }
        for j in &self.jobs {
            if let Some(k) = j.previous.iter().position(|p| *p == result.job_id) {
                let ran_there = j.previous_runners.get(k).is_none_or(|r| r == runner);
                return if ran_there {
                    Expected::Superseded { current: j.job_id }
                } else {
                    Expected::NotYours
                };
            }
        }
        Expected::NotYours
    }

    /// The upstream bundle `digest` if it is an input of the job `job` that this workflow
    /// dispatched to `runner` and that has not ended: what the owner may send that runner
    /// (`/kaapana/inputs/1`).
    pub fn input_for(
        &self,
        runner: &InstanceId,
        job: &JobId,
        digest: &Sha256Digest,
    ) -> Option<BlobRef> {
        let j = self.jobs.get(self.find(job)?)?;
        if j.runner != *runner || !j.dispatched || j.state.is_terminal() {
            return None;
        }
        let step = self.steps.get(j.step)?;
        if let Some(e) = step.external.iter().find(|e| e.bundle.digest == *digest) {
            return Some(e.bundle);
        }
        step.inputs
            .iter()
            .flat_map(|&up| self.index.step_jobs.get(up).into_iter().flatten())
            .filter_map(|&u| self.jobs.get(u).and_then(|x| x.result))
            .find(|b| b.digest == *digest)
    }

    /// Increases with every change this value went through since it was made or loaded: an
    /// event after which it is the same changed nothing (cheaper than comparing workflows).
    pub const fn revision(&self) -> u64 {
        self.revision.0
    }

    /// Marks job `i`'s record changed.
    pub(crate) fn touch(&mut self, i: usize) {
        self.revision.bump();
        self.changes.jobs.insert(i);
    }

    /// Marks the workflow's own record (its [`WorkflowHeader`]) changed.
    pub(crate) fn touch_header(&mut self) {
        self.revision.bump();
        self.changes.header = true;
    }

    /// Which records changed since the last call (or since it was made or loaded): whether
    /// its header did, and the positions of its jobs that did. A training's header holds its
    /// rounds, which move with its jobs: it counts as changed whenever anything did.
    pub(crate) fn take_changes(&mut self) -> Changes {
        let mut c = std::mem::take(&mut self.changes);
        if self.training.is_some() && !c.jobs.is_empty() {
            c.header = true;
        }
        c
    }

    /// Its own fields, without its jobs: the record the owner stores for the workflow itself
    /// ([`Record::Workflow`](crate::Record::Workflow)), next to one record per job.
    pub fn header(&self) -> WorkflowHeader {
        WorkflowHeader {
            workflow_id: self.workflow_id,
            name: self.name.clone(),
            owner: self.owner,
            owner_name: self.owner_name.clone(),
            state: self.state,
            reason: self.reason.clone(),
            created_at: self.created_at,
            ended_at: self.ended_at,
            steps: self.steps.clone(),
            training: self.training.clone(),
            job_count: u32::try_from(self.jobs.len()).unwrap_or(u32::MAX),
        }
    }

    /// Puts a workflow together again from its stored records: its header and its jobs, in
    /// position order (as [`Workflow::header`] and [`Workflow::jobs`] gave them).
    pub fn from_records(
        header: WorkflowHeader,
        jobs: Vec<WorkflowJob>,
    ) -> Result<Self, RecordsError> {
        let workflow = header.workflow_id;
        if u32::try_from(jobs.len()).ok() != Some(header.job_count) {
            return Err(RecordsError::JobCount {
                workflow,
                expected: header.job_count,
                found: jobs.len(),
            });
        }
        if let Some((index, j)) =
            jobs.iter().enumerate().find(|(_, j)| j.step >= header.steps.len())
        {
            return Err(RecordsError::NoSuchStep {
                workflow,
                index,
                step: j.step,
                steps: header.steps.len(),
            });
        }
        Ok(Self {
            workflow_id: header.workflow_id,
            name: header.name,
            owner: header.owner,
            owner_name: header.owner_name,
            state: header.state,
            reason: header.reason,
            created_at: header.created_at,
            ended_at: header.ended_at,
            steps: header.steps,
            jobs,
            training: header.training,
            index: Index::default(),
            revision: Revision::default(),
            changes: Changes::default(),
        })
    }

    /// The job whose current attempt has this id.
    pub fn job(&self, id: &JobId) -> Option<&WorkflowJob> {
        self.find(id).and_then(|i| self.jobs.get(i))
    }

    /// The jobs of one step, by the step's name.
    pub fn step_jobs<'a>(&'a self, step: &str) -> impl Iterator<Item = &'a WorkflowJob> + 'a {
        let s = self.steps.iter().position(|st| st.spec.name == step);
        self.jobs.iter().filter(move |j| Some(j.step) == s)
    }

    /// How many jobs are in which state.
    pub fn counts(&self) -> JobCounts {
        let mut c = JobCounts::default();
        for j in &self.jobs {
            match j.state {
                JobState::Queued if !j.dispatched => c.waiting += 1,
                JobState::Queued => c.queued += 1,
                JobState::Pending { awaiting_approval: false } => c.pending += 1,
                JobState::Pending { awaiting_approval: true } => c.awaiting_approval += 1,
                JobState::Scheduled => c.scheduled += 1,
                JobState::Running => c.running += 1,
                JobState::Finished => c.finished += 1,
                JobState::Failed => c.failed += 1,
            }
        }
        c
    }

    // ---- events ----------------------------------------------------------------------------

    /// A dispatched, not yet ended job by id.
    fn live_job(&self, id: &JobId) -> Option<usize> {
        let i = self.find(id)?;
        let job = self.jobs.get(i)?;
        (job.dispatched && !job.state.is_terminal()).then_some(i)
    }

    /// A dispatched job that is live, or finished without its result stored yet.
    fn live_job_or_finished(&self, id: &JobId) -> Option<usize> {
        let i = self.find(id)?;
        let job = self.jobs.get(i)?;
        let open =
            !job.state.is_terminal() || (job.state == JobState::Finished && job.result.is_none());
        (job.dispatched && open).then_some(i)
    }

    /// Job `i` has just failed (its state is `Failed` and its reason set): try it again, or
    /// fail the workflow. `lost` is the runner that was lost, if that is why.
    fn after_failure(
        &mut self,
        i: usize,
        retryable: bool,
        lost: Option<InstanceId>,
        candidates: &[Candidate],
        now: Timestamp,
        out: &mut Vec<WorkflowCommand>,
    ) {
        let job = &self.jobs[i];
        let step = &self.steps[job.step];
        let train = step.round.is_some_and(|r| !r.aggregate);
        if train && !self.round_open(step) {
            // A late update of a closed round: nothing waits for it any more.
            return;
        }
        if retryable && job.attempt < step.spec.max_retries {
            let current = job.runner;
            let next = match (step.movable_query(), lost) {
                // The lost runner is out; any other match will do, reachable ones first.
                (Some(q), Some(lost)) => {
                    capability::best(q, candidates, |c| c.instance != lost).map(|c| c.instance)
                }
                // Prefer another reachable match; else try the same runner again.
                (Some(q), None) => Some(
                    capability::best(q, candidates, |c| c.reachable && c.instance != current)
                        .map_or(current, |c| c.instance),
                ),
                (None, Some(_)) => None,
                (None, None) => Some(current),
            };
            if let Some(runner) = next {
                let name = self.runner_name(runner, candidates);
                self.new_attempt(i, runner, name);
                return;
            }
            // Only a lost runner leaves no choice: the job is still recorded at it.
            let lost_name = &self.jobs[i].runner_name;
            self.jobs[i].reason =
                Some(format!("runner {lost_name} was lost and no other instance matches"));
            self.touch(i);
        }
        if train {
            // One site's update is lost for this round; the round's quorum decides.
            return;
        }
        let job = &self.jobs[i];
        let why = job.reason.as_deref().unwrap_or("no reason given");
        let reason = fit_text(&format!("job {} at {} failed: {why}", job.name, job.runner_name));
        let cancel = fit_text(&format!("workflow {} failed: {reason}", self.name));
        self.end(WorkflowState::Failed, reason, &cancel, now, out);
    }

    fn runner_lost(
        &mut self,
        instance: InstanceId,
        candidates: &[Candidate],
        now: Timestamp,
        touched: &mut BTreeSet<usize>,
        out: &mut Vec<WorkflowCommand>,
    ) {
        // Jobs still running there, and jobs that finished there but whose result may now
        // never arrive.
        let at_runner: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| {
                let j = &self.jobs[i];
                j.runner == instance && j.state != JobState::Failed && !j.is_done()
            })
            .collect();
        for i in at_runner {
            if self.state.is_final() {
                return;
            }
            let step = self.jobs[i].step;
            let Some(q) = self.steps[step].movable_query().cloned() else {
                // Bound to this runner: messages to it are durable and it may come back.
                continue;
            };
            touched.insert(step);
            if !self.jobs[i].dispatched {
                // Not sent yet: move it without spending a retry.
                if let Some(c) = capability::best(&q, candidates, |c| c.instance != instance) {
                    let (runner, name) = (c.instance, c.name.clone());
                    self.reassign(i, runner, name);
                }
                continue;
            }
            let job = &self.jobs[i];
            let lost = format!("runner {} was lost", job.runner_name);
            let finished = job.state == JobState::Finished;
            if !finished {
                out.push(WorkflowCommand::CancelJob {
                    runner: instance,
                    job_id: job.job_id,
                    reason: fit_text(&lost),
                });
            }
            let reason = if job.attempt < self.steps[step].spec.max_retries {
                lost
            } else if finished {
                format!("{lost} before the job's result arrived, and the job has no retries left")
            } else {
                format!("{lost} and the job has no retries left")
            };
            self.fail(i, reason);
            self.after_failure(i, true, Some(instance), candidates, now, out);
        }
    }

    /// Ends the workflow: cancels every job that has not ended (a Cancel to its runner if it
    /// was dispatched) and announces the end.
    pub(crate) fn end(
        &mut self,
        state: WorkflowState,
        reason: String,
        cancel_reason: &str,
        now: Timestamp,
        out: &mut Vec<WorkflowCommand>,
    ) {
        for i in 0..self.jobs.len() {
            let job = &self.jobs[i];
            if job.state.is_terminal() {
                continue;
            }
            if job.dispatched {
                out.push(WorkflowCommand::CancelJob {
                    runner: job.runner,
                    job_id: job.job_id,
                    reason: cancel_reason.to_owned(),
                });
                self.set_terminal(i, JobState::Failed, Some(cancel_reason.to_owned()));
            } else {
                self.set_terminal(i, JobState::Failed, Some("cancelled".to_owned()));
            }
        }
        self.state = state;
        self.reason = Some(reason.clone());
        self.ended_at = Some(now);
        self.touch_header();
        out.push(WorkflowCommand::Ended { state, reason: Some(reason) });
    }

    /// Finishes the workflow when every job is done; otherwise dispatches what may run now in
    /// the `touched` steps and the steps that read from them.
    fn settle(
        &mut self,
        touched: BTreeSet<usize>,
        now: Timestamp,
        job_lifetime: Duration,
        out: &mut Vec<WorkflowCommand>,
    ) {
        if self.state.is_final() {
            return;
        }
        if self.training.is_some() {
            for s in touched {
                self.pump(s, now, job_lifetime, out);
            }
            self.settle_training(now, job_lifetime, out);
            return;
        }
        if (0..self.steps.len()).all(|s| self.step_done(s)) {
            self.state = WorkflowState::Finished;
            self.touch_header();
            self.ended_at = Some(now);
            out.push(WorkflowCommand::Ended { state: WorkflowState::Finished, reason: None });
            return;
        }
        let mut pump = BTreeSet::new();
        for s in touched {
            pump.insert(s);
            if self.step_done(s) {
                pump.extend(self.index.consumers.get(s).into_iter().flatten().copied());
            }
        }
        for s in pump {
            self.pump(s, now, job_lifetime, out);
        }
    }

    // ---- job records and the index ---------------------------------------------------------

    /// Dispatches the waiting jobs of step `s` that may run now: all inputs done, and a free
    /// `max_parallel` slot at their runner. In job order.
    pub(crate) fn pump(
        &mut self,
        s: usize,
        now: Timestamp,
        job_lifetime: Duration,
        out: &mut Vec<WorkflowCommand>,
    ) {
        let Some(step) = self.steps.get(s) else { return };
        if !step.inputs.iter().all(|&i| self.step_done(i)) {
            return;
        }
        let bound = step.parallel_bound();
        let mut picks: Vec<usize> = Vec::new();
        if let (Some(waiting), Some(active)) = (self.index.waiting.get(s), self.index.active.get(s))
        {
            for (runner, queue) in waiting {
                let free = bound.saturating_sub(active.get(runner).copied().unwrap_or(0));
                picks.extend(queue.iter().take(free).copied());
            }
        }
        picks.sort_unstable();
        for i in picks {
            out.push(WorkflowCommand::Dispatch(self.dispatch(i, now, job_lifetime)));
        }
    }

    /// Marks job `i` dispatched and makes its manifest.
    pub(crate) fn dispatch(
        &mut self,
        i: usize,
        now: Timestamp,
        job_lifetime: Duration,
    ) -> JobManifest {
        self.touch(i);
        let (s, runner) = (self.jobs[i].step, self.jobs[i].runner);
        self.index.unwait(s, runner, i);
        *self.index.active[s].entry(runner).or_default() += 1;
        self.jobs[i].dispatched = true;
        self.jobs[i].updated_at = now;

        let job = &self.jobs[i];
        let step = &self.steps[s];
        let spec = &step.spec;
        let mut inputs = step.external.clone();
        for &up in &step.inputs {
            for &u in self.index.step_jobs.get(up).into_iter().flatten() {
                let upstream = &self.jobs[u];
                if let Some(bundle) = upstream.result {
                    inputs.push(InputBundle {
                        job_name: upstream.name.clone(),
                        job_id: upstream.job_id,
                        bundle,
                    });
                }
            }
        }
        JobManifest {
            header: Header::new(now, job_lifetime),
            job_id: job.job_id,
            workflow_id: self.workflow_id,
            owner: self.owner,
            runner: job.runner,
            job_name: job.name.clone(),
            attempt: job.attempt,
            dataset: step.dataset.as_ref().map(|d| DatasetRef { name: d.clone(), item: job.item }),
            work: self.work_of(step),
            limits: spec.limits,
            timeout_secs: spec.timeout_secs,
            inputs,
            workflow_name: self.name.clone(),
        }
    }

    /// Moves job `i` into a final state (nothing if it is in one already).
    pub(crate) fn set_terminal(&mut self, i: usize, state: JobState, reason: Option<String>) {
        let job = &self.jobs[i];
        if job.state.is_terminal() {
            return;
        }
        let (s, runner, dispatched) = (job.step, job.runner, job.dispatched);
        self.touch(i);
        if dispatched {
            self.index.release(s, runner);
        } else {
            self.index.unwait(s, runner, i);
        }
        let job = &mut self.jobs[i];
        job.state = state;
        job.reason = reason;
        if job.is_done() {
            self.index.done[s] += 1;
        }
    }

    /// Fails job `i` with `reason`: a live job through [`Self::set_terminal`]; a finished one
    /// whose result has not arrived (its slot is free already, but it is not done) in place.
    pub(crate) fn fail(&mut self, i: usize, reason: String) {
        if self.jobs[i].state == JobState::Finished {
            let job = &mut self.jobs[i];
            job.state = JobState::Failed;
            job.reason = Some(reason);
            self.touch(i);
        } else {
            self.set_terminal(i, JobState::Failed, Some(reason));
        }
    }

    /// Records job `i`'s successful result (which implies that it finished).
    fn store_result(&mut self, i: usize, bundle: BlobRef) {
        if self.jobs[i].result.is_some() || self.jobs[i].state == JobState::Failed {
            return;
        }
        self.touch(i);
        self.jobs[i].result = Some(bundle);
        if self.jobs[i].state == JobState::Finished {
            self.index.done[self.jobs[i].step] += 1;
        } else {
            let reason = self.jobs[i].reason.take();
            self.set_terminal(i, JobState::Finished, reason);
        }
    }

    /// Replaces failed job `i` by its next attempt at `runner`, waiting to be dispatched.
    fn new_attempt(&mut self, i: usize, runner: InstanceId, runner_name: String) {
        self.touch(i);
        let workflow_id = self.workflow_id;
        let job = &mut self.jobs[i];
        let old = job.job_id;
        job.previous.push(old);
        job.previous_runners.push(job.runner);
        job.retryable = false;
        job.last_sequence = 0;
        job.attempt = job.attempt.saturating_add(1);
        job.job_id = job_id(&workflow_id, &job.name, job.attempt);
        job.runner = runner;
        job.runner_name = runner_name;
        job.state = JobState::Queued;
        job.reason = None;
        job.result = None;
        job.samples = None;
        job.dispatched = false;
        let (s, new) = (job.step, job.job_id);
        self.index.by_id.remove(&old);
        self.index.by_id.insert(new, i);
        self.index.wait(s, runner, i);
    }

    /// Moves undispatched job `i` to another runner (same attempt and id: it was never sent).
    fn reassign(&mut self, i: usize, runner: InstanceId, runner_name: String) {
        self.touch(i);
        let (s, old) = (self.jobs[i].step, self.jobs[i].runner);
        self.index.unwait(s, old, i);
        self.jobs[i].runner = runner;
        self.jobs[i].runner_name = runner_name;
        self.index.wait(s, runner, i);
    }

    fn runner_name(&self, runner: InstanceId, candidates: &[Candidate]) -> String {
        if let Some(c) = candidate(candidates, &runner) {
            c.name.clone()
        } else if runner == self.owner {
            self.owner_name.clone()
        } else {
            runner.to_string()
        }
    }

    pub(crate) fn step_done(&self, s: usize) -> bool {
        let total = self.index.step_jobs.get(s).map_or(0, Vec::len);
        self.index.done.get(s).is_some_and(|&d| d >= total)
    }

    pub(crate) fn find(&self, id: &JobId) -> Option<usize> {
        if let Some(&i) = self.index.by_id.get(id)
            && self.jobs.get(i).is_some_and(|j| j.job_id == *id)
        {
            return Some(i);
        }
        self.jobs.iter().position(|j| j.job_id == *id)
    }

    pub(crate) fn ensure_index(&mut self) {
        if !self.index.built {
            self.index = Index::build(&self.steps, &self.jobs);
        }
    }
}

/// A change counter that is not part of a workflow's value: equal to any other, not stored.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Revision(u64);

impl Revision {
    pub(crate) const fn bump(&mut self) {
        self.0 = self.0.wrapping_add(1);
    }
}

impl PartialEq for Revision {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Revision {}

/// The records of a workflow changed since they were last taken: its header (its own fields)
/// and its jobs (by position in [`Workflow::jobs`]). Not part of the workflow's value: equal
/// to any other, not stored.
#[derive(Clone, Debug, Default)]
pub(crate) struct Changes {
    /// Whether its own fields changed (state, steps, training, the number of jobs).
    pub(crate) header: bool,
    /// The positions of the jobs that changed, ascending.
    pub(crate) jobs: BTreeSet<usize>,
}

impl PartialEq for Changes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Changes {}

/// Lookup tables derived from a workflow's steps and jobs, so that an event costs time in
/// proportion to what it changes, not to the size of the workflow.
#[derive(Clone, Default)]
pub(crate) struct Index {
    built: bool,
    /// Current job ids to positions in `jobs`.
    by_id: BTreeMap<JobId, usize>,
    /// Per step: its jobs' positions.
    pub(crate) step_jobs: Vec<Vec<usize>>,
    /// Per step: how many of its jobs are done.
    done: Vec<usize>,
    /// Per step: the steps that read from it.
    consumers: Vec<Vec<usize>>,
    /// Per step and runner: how many jobs are dispatched and not ended.
    active: Vec<BTreeMap<InstanceId, usize>>,
    /// Per step and runner: the jobs waiting to be dispatched, in job order.
    waiting: Vec<BTreeMap<InstanceId, BTreeSet<usize>>>,
}

impl Index {
    pub(crate) fn build(steps: &[Step], jobs: &[WorkflowJob]) -> Self {
        let n = steps.len();
        let mut me = Self {
            built: true,
            by_id: BTreeMap::new(),
            step_jobs: vec![Vec::new(); n],
            done: vec![0; n],
            consumers: vec![Vec::new(); n],
            active: vec![BTreeMap::new(); n],
            waiting: vec![BTreeMap::new(); n],
        };
        for (s, step) in steps.iter().enumerate() {
            for &i in &step.inputs {
                if let Some(c) = me.consumers.get_mut(i) {
                    c.push(s);
                }
            }
        }
        for (i, job) in jobs.iter().enumerate() {
            let s = job.step;
            if s >= n {
                continue;
            }
            me.by_id.insert(job.job_id, i);
            me.step_jobs[s].push(i);
            if job.is_done() {
                me.done[s] += 1;
            }
            if !job.state.is_terminal() {
                if job.dispatched {
                    *me.active[s].entry(job.runner).or_default() += 1;
                } else {
                    me.wait(s, job.runner, i);
                }
            }
        }
        me
    }

    /// Adds the entries of a new last step `s` whose jobs are `jobs[first..]` (none done,
    /// none dispatched, reading no step): what [`Index::build`] would add, without rebuilding.
    pub(crate) fn add_step(&mut self, s: usize, jobs: &[WorkflowJob], first: usize) {
        if !self.built || self.step_jobs.len() != s {
            self.built = false;
            return;
        }
        self.step_jobs.push((first..jobs.len()).collect());
        self.done.push(0);
        self.consumers.push(Vec::new());
        self.active.push(BTreeMap::new());
        self.waiting.push(BTreeMap::new());
        for (i, job) in jobs.iter().enumerate().skip(first) {
            self.by_id.insert(job.job_id, i);
            self.wait(s, job.runner, i);
        }
    }

    fn wait(&mut self, s: usize, runner: InstanceId, i: usize) {
        if let Some(w) = self.waiting.get_mut(s) {
            w.entry(runner).or_default().insert(i);
        }
    }

    fn unwait(&mut self, s: usize, runner: InstanceId, i: usize) {
        if let Some(w) = self.waiting.get_mut(s)
            && let Some(q) = w.get_mut(&runner)
        {
            q.remove(&i);
            if q.is_empty() {
                w.remove(&runner);
            }
        }
    }

    fn release(&mut self, s: usize, runner: InstanceId) {
        if let Some(a) = self.active.get_mut(s)
            && let Some(n) = a.get_mut(&runner)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                a.remove(&runner);
            }
        }
    }
}

impl PartialEq for Index {
    /// Derived data: equal whenever what it is derived from is.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Index {}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Index { .. }")
    }
}

fn candidate<'a>(candidates: &'a [Candidate], id: &InstanceId) -> Option<&'a Candidate> {
    candidates.iter().find(|c| c.instance == *id)
}

/// The runners of one step, with their names, in a stable order.
pub(crate) fn resolve_runners(
    spec: &JobSpec,
    owner: InstanceId,
    owner_name: &str,
    candidates: &[Candidate],
) -> Result<Vec<(InstanceId, String)>, PlanError> {
    match &spec.runner {
        RunnerSelector::Owner => Ok(vec![(owner, owner_name.to_owned())]),
        RunnerSelector::Instance(id) if *id == owner => Ok(vec![(owner, owner_name.to_owned())]),
        RunnerSelector::Instance(id) => match candidate(candidates, id) {
            Some(c) => Ok(vec![(c.instance, c.name.clone())]),
            None => {
                Err(PlanError::UnknownInstance { job: spec.name.clone(), instance: id.to_string() })
            }
        },
        RunnerSelector::Query(q) => {
            let chosen: Vec<&Candidate> = match q.pick {
                Pick::All => capability::matching(q, candidates),
                Pick::Best => capability::best(q, candidates, |_| true).into_iter().collect(),
            };
            if chosen.is_empty() {
                return Err(PlanError::NoRunner {
                    job: spec.name.clone(),
                    query: QueryText(q).to_string(),
                    why: capability::explain_no_match(q, candidates),
                });
            }
            Ok(chosen.into_iter().map(|c| (c.instance, c.name.clone())).collect())
        }
    }
}

/// `<step>-<k>`, with the step's name shortened so that the whole is a valid name.
pub(crate) fn numbered(step: &str, k: usize) -> String {
    let suffix = format!("-{k}");
    let keep = MAX_NAME_LEN.saturating_sub(suffix.len());
    // Step names are ASCII (validated), so characters are bytes.
    let mut name: String = step.chars().take(keep).collect();
    name.push_str(&suffix);
    name
}

/// The id of attempt `attempt` of the job called `name` in workflow `workflow`: the first 16
/// bytes of SHA-256 over a domain tag, the workflow id, the attempt and the name.
pub fn job_id(workflow: &WorkflowId, name: &str, attempt: u32) -> JobId {
    let mut data = Vec::with_capacity(64 + name.len());
    data.extend_from_slice(b"kaapana-node job id\0");
    data.extend_from_slice(workflow.as_bytes());
    data.extend_from_slice(&attempt.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    let digest = Sha256Digest::of(&data);
    let mut bytes = [0u8; 16];
    for (b, d) in bytes.iter_mut().zip(digest.0) {
        *b = d;
    }
    JobId::from_bytes(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use kaapana_protocol::{
        CapabilityAd, DatasetSummary, Gpu, ImageDigest, NameScope, ResourceLimits, Resources,
    };
    use kaapana_protocol::{ContainerWork, MAX_TEXT_LEN, Work};
    use proptest::prelude::*;

    use super::*;
    use crate::job::{RunnerCommand, RunnerJob};
    use crate::policy::{AllowList, Execution, Policy};

    pub(crate) const LIFE: Duration = Duration::from_secs(3600);
    pub(crate) const WORKFLOW: &str = "federated-statistics";

    pub(crate) fn id(n: u8) -> InstanceId {
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&[n; 32]);
        InstanceId::from_bytes(&bytes).unwrap()
    }

    pub(crate) fn owner() -> InstanceId {
        id(0)
    }

    pub(crate) fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(1_800_000_000_000 + ms)
    }

    pub(crate) fn token(site: u8, k: usize) -> ItemToken {
        let mut b = [site; 32];
        b[0] = u8::try_from(k).unwrap();
        ItemToken(b)
    }

    /// A site `n` called `name` that offers us `items` items of dataset `lung-ct` (listed,
    /// possibly empty; `no_dataset` removes it).
    pub(crate) fn site(n: u8, name: &str, cpu: u32, gpu: bool, items: usize) -> Candidate {
        Candidate {
            instance: id(n),
            name: name.to_owned(),
            ad: CapabilityAd {
                header: Header::new(t(0), LIFE),
                sequence: 1,
                instance_name: name.to_owned(),
                node_version: "0.1.0".to_owned(),
                executors: vec![],
                allowed_images: vec![],
                allowed_workflows: NameScope::Any,
                datasets: vec![DatasetSummary {
                    name: "lung-ct".to_owned(),
                    items: items as u64,
                    bytes: 1 << 20,
                    tokens: (0..items).map(|k| token(n, k)).collect(),
                    modalities: Vec::new(),
                }],
                resources: Resources {
                    cpu_millis: cpu,
                    memory_bytes: u64::from(cpu) << 20,
                    gpus: if gpu {
                        vec![Gpu { model: "A100".to_owned(), memory_bytes: 1 << 34 }]
                    } else {
                        vec![]
                    },
                },
            },
            reachable: true,
        }
    }

    pub(crate) fn no_dataset(mut c: Candidate) -> Candidate {
        c.ad.datasets.clear();
        c
    }

    pub(crate) fn three_sites() -> Vec<Candidate> {
        vec![
            site(1, "site-a", 4000, false, 4),
            site(2, "site-b", 8000, true, 3),
            site(3, "site-c", 2000, true, 2),
        ]
    }

    pub(crate) fn query(pick: Pick) -> RunnerSelector {
        RunnerSelector::Query(CapabilityQuery {
            dataset: Some("lung-ct".to_owned()),
            gpu: false,
            min_cpu_millis: 0,
            min_memory_bytes: 0,
            pick,
        })
    }

    pub(crate) fn spec(name: &str, runner: RunnerSelector, inputs: &[&str]) -> JobSpec {
        JobSpec {
            name: name.to_owned(),
            runner,
            dataset: None,
            processing: Processing::Batch,
            work: Work::Container(ContainerWork {
                image: ImageDigest(Sha256Digest::of(name.as_bytes())),
                command: vec!["run".to_owned(), name.to_owned()],
                env: vec![],
            }),
            limits: ResourceLimits::default(),
            timeout_secs: 600,
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
            max_retries: 0,
        }
    }

    pub(crate) fn single_file(mut s: JobSpec, max_parallel: u32) -> JobSpec {
        s.processing = Processing::SingleFile { max_parallel };
        s
    }

    pub(crate) fn retries(mut s: JobSpec, n: u32) -> JobSpec {
        s.max_retries = n;
        s
    }

    pub(crate) fn manifest(jobs: Vec<JobSpec>) -> WorkflowManifest {
        WorkflowManifest {
            header: Header::new(t(0), LIFE),
            workflow_id: WorkflowId::from_bytes([9; 16]),
            owner: owner(),
            name: WORKFLOW.to_owned(),
            jobs,
            rounds: None,
        }
    }

    /// Site jobs on every site with lung-ct, then an aggregation at the owner.
    pub(crate) fn statistics() -> WorkflowManifest {
        manifest(vec![
            spec("stats", query(Pick::All), &[]),
            spec("aggregate", RunnerSelector::Owner, &["stats"]),
        ])
    }

    pub(crate) fn bundle(job: JobId) -> BlobRef {
        BlobRef { digest: Sha256Digest::of(job.as_bytes()), size: 42 }
    }

    pub(crate) fn dispatches(cmds: &[WorkflowCommand]) -> Vec<&JobManifest> {
        cmds.iter()
            .filter_map(|c| match c {
                WorkflowCommand::Dispatch(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn cancels(cmds: &[WorkflowCommand]) -> Vec<(InstanceId, JobId, &str)> {
        cmds.iter()
            .filter_map(|c| match c {
                WorkflowCommand::CancelJob { runner, job_id, reason } => {
                    Some((*runner, *job_id, reason.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    pub(crate) fn names(ms: &[&JobManifest]) -> Vec<String> {
        ms.iter().map(|m| m.job_name.clone()).collect()
    }

    pub(crate) fn update(job_id: JobId, state: JobState) -> WorkflowEvent {
        WorkflowEvent::JobUpdated { job_id, state, reason: None, retryable: false }
    }

    pub(crate) fn failed(job_id: JobId, reason: &str, retryable: bool) -> WorkflowEvent {
        WorkflowEvent::JobUpdated {
            job_id,
            state: JobState::Failed,
            reason: Some(reason.to_owned()),
            retryable,
        }
    }

    pub(crate) fn stored(job_id: JobId) -> WorkflowEvent {
        WorkflowEvent::ResultStored { job_id, bundle: bundle(job_id), success: true, samples: None }
    }

    pub(crate) fn id_of(wf: &Workflow, name: &str) -> JobId {
        wf.jobs.iter().find(|j| j.name == name).unwrap().job_id
    }

    /// Reports `name` finished with its result stored; returns the commands of both events.
    pub(crate) fn complete(
        wf: &mut Workflow,
        name: &str,
        cands: &[Candidate],
    ) -> Vec<WorkflowCommand> {
        let job = id_of(wf, name);
        let mut out = wf.handle(update(job, JobState::Finished), cands, t(10), LIFE);
        out.extend(wf.handle(stored(job), cands, t(11), LIFE));
        out
    }

    #[test]
    fn only_the_runner_of_a_live_job_may_have_its_inputs() {
        // A model at the owner, then one training job per site reading it.
        let cands = three_sites();
        let m = manifest(vec![
            spec("model", RunnerSelector::Owner, &[]),
            spec("train", query(Pick::All), &["model"]),
        ]);
        let (mut wf, _) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let model = id_of(&wf, "model");
        let train = id_of(&wf, "train-2");
        let digest = bundle(model).digest;
        assert_eq!(wf.input_for(&id(2), &train, &digest), None, "not dispatched yet");
        let cmds = complete(&mut wf, "model", &cands);
        let sent = dispatches(&cmds);
        let to_b = sent.iter().find(|j| j.job_id == train).unwrap();
        assert_eq!(to_b.inputs.len(), 1);
        assert_eq!(to_b.inputs[0].bundle, bundle(model));
        assert_eq!(wf.input_for(&id(2), &train, &digest), Some(bundle(model)));
        // Another site, another blob, another job: nothing.
        assert_eq!(wf.input_for(&id(3), &train, &digest), None);
        assert_eq!(wf.input_for(&id(2), &train, &Sha256Digest::of(b"other")), None);
        assert_eq!(wf.input_for(&id(2), &model, &digest), None);
        // Once the job ended, its inputs are not sent any more.
        let _ = complete(&mut wf, "train-2", &cands);
        assert_eq!(wf.input_for(&id(2), &train, &digest), None);
    }

    #[test]
    fn aggregation_runs_only_after_every_site_job_with_all_their_results() {
        let cands = three_sites();
        let (mut wf, cmds) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        assert_eq!(wf.state, WorkflowState::Running);
        assert_eq!(wf.jobs.len(), 4);
        let first = dispatches(&cmds);
        assert_eq!(names(&first), ["stats-1", "stats-2", "stats-3"]);
        assert_eq!(first.iter().map(|m| m.runner).collect::<Vec<_>>(), vec![id(1), id(2), id(3)]);
        let m = first[0];
        assert_eq!(m.job_id, job_id(&wf.workflow_id, "stats-1", 0));
        assert_eq!(m.workflow_id, wf.workflow_id);
        assert_eq!(m.owner, owner());
        assert_eq!(m.attempt, 0);
        assert_eq!(m.header, Header::new(t(1), LIFE));
        assert_eq!(m.dataset, Some(DatasetRef { name: "lung-ct".to_owned(), item: None }));
        assert_eq!(m.workflow_name, WORKFLOW);
        assert_eq!(m.work.container().map(|c| c.command.clone()).unwrap(), ["run", "stats"]);
        assert!(m.inputs.is_empty());
        assert!(m.validate().is_ok());
        let agg = wf.job(&id_of(&wf, "aggregate")).unwrap();
        assert!(!agg.dispatched);
        assert_eq!(agg.runner, owner());
        assert_eq!(agg.runner_name, "owner");

        // stats-1: update, then result. stats-2: result first (it implies Finished).
        assert!(complete(&mut wf, "stats-1", &cands).is_empty());
        let s2 = id_of(&wf, "stats-2");
        assert!(wf.handle(stored(s2), &cands, t(12), LIFE).is_empty());
        assert_eq!(wf.job(&s2).unwrap().state, JobState::Finished);
        assert!(wf.handle(update(s2, JobState::Finished), &cands, t(13), LIFE).is_empty());
        // stats-3 finished but its result is not here yet: the aggregation waits.
        let s3 = id_of(&wf, "stats-3");
        assert!(wf.handle(update(s3, JobState::Running), &cands, t(14), LIFE).is_empty());
        assert!(wf.handle(update(s3, JobState::Finished), &cands, t(15), LIFE).is_empty());
        assert!(!wf.job(&id_of(&wf, "aggregate")).unwrap().dispatched);
        let cmds = wf.handle(stored(s3), &cands, t(16), LIFE);
        let agg = dispatches(&cmds);
        assert_eq!(names(&agg), ["aggregate"]);
        let agg = agg[0];
        assert_eq!(agg.runner, owner());
        assert_eq!(agg.dataset, None);
        assert_eq!(agg.header.issued_at, t(16));
        let inputs: Vec<(String, JobId, BlobRef)> =
            agg.inputs.iter().map(|i| (i.job_name.clone(), i.job_id, i.bundle)).collect();
        let expected: Vec<(String, JobId, BlobRef)> = ["stats-1", "stats-2", "stats-3"]
            .iter()
            .map(|n| {
                let j = id_of(&wf, n);
                ((*n).to_owned(), j, bundle(j))
            })
            .collect();
        assert_eq!(inputs, expected);
        assert_eq!(wf.counts().to_string(), "1 queued, 3 finished");

        let cmds = complete(&mut wf, "aggregate", &cands);
        assert_eq!(
            cmds,
            vec![WorkflowCommand::Ended { state: WorkflowState::Finished, reason: None }]
        );
        assert_eq!(wf.state, WorkflowState::Finished);
        assert_eq!(wf.ended_at, Some(t(11)));
        assert_eq!(wf.counts().finished, 4);
        // Nothing happens after the end.
        assert!(
            wf.handle(WorkflowEvent::Cancel { by: "alice".into() }, &cands, t(20), LIFE).is_empty()
        );
        assert_eq!(wf.state, WorkflowState::Finished);
    }

    #[test]
    fn a_step_on_one_runner_keeps_its_name_and_the_owner_may_have_a_name() {
        let mut cands = three_sites();
        cands.push(no_dataset(site(0, "hub", 1000, false, 0)));
        let m = manifest(vec![
            spec("train", query(Pick::Best), &[]),
            spec("merge", RunnerSelector::Instance(owner()), &["train"]),
            spec("report", RunnerSelector::Instance(id(3)), &["merge"]),
        ]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        assert_eq!(names(&dispatches(&cmds)), ["train"]);
        assert_eq!(dispatches(&cmds)[0].runner, id(2), "site-b has the most CPU");
        assert_eq!(wf.owner_name, "hub");
        assert_eq!(wf.job(&id_of(&wf, "merge")).unwrap().runner_name, "hub");
        assert_eq!(wf.job(&id_of(&wf, "report")).unwrap().runner_name, "site-c");
        let cmds = complete(&mut wf, "train", &cands);
        let merge = dispatches(&cmds);
        assert_eq!(names(&merge), ["merge"]);
        assert_eq!(merge[0].inputs[0].job_name, "train");
        let cmds = complete(&mut wf, "merge", &cands);
        assert_eq!(dispatches(&cmds)[0].runner, id(3));
        let cmds = complete(&mut wf, "report", &cands);
        assert!(matches!(
            cmds[..],
            [WorkflowCommand::Ended { state: WorkflowState::Finished, .. }]
        ));
        assert_eq!(wf.step_jobs("train").count(), 1);
    }

    #[test]
    fn single_file_makes_one_job_per_item_within_max_parallel() {
        let cands = vec![site(1, "site-a", 4000, false, 5), site(2, "site-b", 4000, false, 3)];
        let m = manifest(vec![
            single_file(spec("seg", query(Pick::All), &[]), 2),
            spec("aggregate", RunnerSelector::Owner, &["seg"]),
        ]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        assert_eq!(wf.step_jobs("seg").count(), 8);
        let seg: Vec<&WorkflowJob> = wf.step_jobs("seg").collect();
        assert_eq!(seg[0].name, "seg-1");
        assert_eq!(seg[7].name, "seg-8");
        assert_eq!(seg[4].item, Some(token(1, 4)));
        assert_eq!(seg[5].item, Some(token(2, 0)));
        assert_eq!(seg[5].runner, id(2));
        // Two per runner at first.
        let first = dispatches(&cmds);
        assert_eq!(names(&first), ["seg-1", "seg-2", "seg-6", "seg-7"]);
        assert_eq!(
            first[0].dataset,
            Some(DatasetRef { name: "lung-ct".to_owned(), item: Some(token(1, 0)) })
        );

        // An update that is not final frees nothing; a finished job frees its slot at once,
        // even before its result arrives.
        let s1 = id_of(&wf, "seg-1");
        assert!(wf.handle(update(s1, JobState::Running), &cands, t(2), LIFE).is_empty());
        let cmds = wf.handle(update(s1, JobState::Finished), &cands, t(3), LIFE);
        assert_eq!(names(&dispatches(&cmds)), ["seg-3"]);
        assert!(wf.handle(stored(s1), &cands, t(4), LIFE).is_empty());
        let cmds = complete(&mut wf, "seg-6", &cands);
        assert_eq!(names(&dispatches(&cmds)), ["seg-8"]);
        // site-b has no more items: finishing its jobs dispatches nothing there.
        assert!(complete(&mut wf, "seg-7", &cands).is_empty());
        // Finish the rest in job order; a slot at site-a frees for one waiting job at a time.
        let mut agg = Vec::new();
        for (n, next) in
            [("seg-2", Some("seg-4")), ("seg-3", Some("seg-5")), ("seg-8", None), ("seg-4", None)]
        {
            let cmds = complete(&mut wf, n, &cands);
            assert_eq!(names(&dispatches(&cmds)), next.into_iter().collect::<Vec<_>>());
            let active = wf
                .jobs
                .iter()
                .filter(|j| j.step == 0 && j.runner == id(1))
                .filter(|j| j.dispatched && !j.state.is_terminal())
                .count();
            assert!(active <= 2);
        }
        agg.extend(dispatches(&complete(&mut wf, "seg-5", &cands)).into_iter().cloned());
        assert_eq!(agg.len(), 1);
        assert_eq!(agg[0].inputs.len(), 8);
        assert_eq!(agg[0].inputs[7].job_name, "seg-8");
        complete(&mut wf, "aggregate", &cands);
        assert_eq!(wf.state, WorkflowState::Finished);
    }

    #[test]
    fn single_file_needs_items_offered_to_us() {
        let cands = vec![site(1, "site-a", 4000, false, 2), site(2, "site-b", 4000, false, 0)];
        let m = manifest(vec![single_file(spec("seg", query(Pick::All), &[]), 1)]);
        let err = Workflow::start(&m, &cands, t(1), LIFE).unwrap_err();
        assert_eq!(
            err,
            PlanError::NoItems {
                job: "seg".into(),
                runner: "site-b".into(),
                dataset: "lung-ct".into()
            }
        );
        assert!(err.to_string().starts_with("job seg: instance site-b offers no items"));
        let m = manifest(vec![single_file(spec("seg", RunnerSelector::Owner, &[]), 1)]);
        assert!(matches!(
            Workflow::start(&m, &cands, t(1), LIFE),
            Err(PlanError::NoDataset { .. })
        ));
        let mut owned = spec("seg", RunnerSelector::Owner, &[]);
        owned.dataset = Some("lung-ct".into());
        let m = manifest(vec![single_file(owned.clone(), 1)]);
        assert!(matches!(
            Workflow::start(&m, &cands, t(1), LIFE),
            Err(PlanError::NoItems { runner, .. }) if runner == "owner"
        ));
        // The owner's own ad counts when it is among the candidates.
        let mut with_owner = cands.clone();
        with_owner.push(site(0, "hub", 1000, false, 3));
        let (wf, cmds) = Workflow::start(&m, &with_owner, t(1), LIFE).unwrap();
        assert_eq!(wf.jobs.len(), 3);
        assert_eq!(dispatches(&cmds).len(), 1);
        // One item only: the job keeps the step's name.
        let m = manifest(vec![single_file(spec("seg", RunnerSelector::Instance(id(1)), &[]), 1)]);
        let mut one = cands.clone();
        one[0] = site(1, "site-a", 4000, false, 1);
        let mut spec1 = m.clone();
        spec1.jobs[0].dataset = Some("lung-ct".into());
        let (wf, _) = Workflow::start(&spec1, &one, t(1), LIFE).unwrap();
        assert_eq!(wf.jobs[0].name, "seg");
        assert_eq!(wf.jobs[0].item, Some(token(1, 0)));
    }

    #[test]
    fn capability_queries_pick_all_or_the_best_or_explain_why_none() {
        let cands = three_sites();
        let q = |gpu: bool, min_cpu: u32, pick: Pick| {
            RunnerSelector::Query(CapabilityQuery {
                dataset: Some("lung-ct".to_owned()),
                gpu,
                min_cpu_millis: min_cpu,
                min_memory_bytes: 0,
                pick,
            })
        };
        let runners = |sel: RunnerSelector| {
            let (wf, _) =
                Workflow::start(&manifest(vec![spec("stats", sel, &[])]), &cands, t(1), LIFE)
                    .unwrap();
            wf.jobs.iter().map(|j| (j.name.clone(), j.runner_name.clone())).collect::<Vec<_>>()
        };
        assert_eq!(
            runners(q(true, 0, Pick::All)),
            [("stats-1".into(), "site-b".into()), ("stats-2".into(), "site-c".into())]
        );
        assert_eq!(runners(q(true, 0, Pick::Best)), [("stats".into(), "site-b".into())]);
        assert_eq!(runners(q(false, 3000, Pick::All)).len(), 2);
        assert_eq!(runners(q(false, 0, Pick::All)).len(), 3);

        let m = manifest(vec![spec(
            "stats",
            RunnerSelector::Query(CapabilityQuery {
                dataset: Some("brain-mr".to_owned()),
                gpu: true,
                min_cpu_millis: 0,
                min_memory_bytes: 0,
                pick: Pick::All,
            }),
            &[],
        )]);
        let err = Workflow::start(&m, &cands, t(1), LIFE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no registered instance matches job stats's query (dataset brain-mr, GPU): site-a has \
             no dataset brain-mr; site-b has no dataset brain-mr; site-c has no dataset brain-mr"
        );
        let m = manifest(vec![spec("stats", q(true, 9000, Pick::Best), &[])]);
        assert!(matches!(
            Workflow::start(&m, &cands, t(1), LIFE),
            Err(PlanError::NoRunner { job, .. }) if job == "stats"
        ));
        let m = manifest(vec![spec("stats", RunnerSelector::Instance(id(77)), &[])]);
        assert_eq!(
            Workflow::start(&m, &cands, t(1), LIFE).unwrap_err(),
            PlanError::UnknownInstance { job: "stats".into(), instance: id(77).to_string() }
        );
        // An invalid manifest is refused before planning.
        let m = manifest(vec![spec("stats", RunnerSelector::Owner, &["nowhere"])]);
        assert!(matches!(Workflow::start(&m, &cands, t(1), LIFE), Err(PlanError::Invalid(_))));
    }

    #[test]
    fn job_names_stay_valid_and_clashes_are_refused() {
        let cands = three_sites();
        let long = "x".repeat(MAX_NAME_LEN);
        let (wf, _) = Workflow::start(
            &manifest(vec![spec(&long, query(Pick::All), &[])]),
            &cands,
            t(1),
            LIFE,
        )
        .unwrap();
        for j in &wf.jobs {
            assert!(kaapana_protocol::validate_name("job", &j.name).is_ok(), "{}", j.name);
        }
        assert!(wf.jobs[2].name.ends_with("x-3"));
        let m = manifest(vec![
            spec("stats", query(Pick::All), &[]),
            spec("stats-2", RunnerSelector::Owner, &[]),
        ]);
        assert_eq!(
            Workflow::start(&m, &cands, t(1), LIFE).unwrap_err(),
            PlanError::NameClash {
                name: "stats-2".into(),
                first: "stats".into(),
                second: "stats-2".into()
            }
        );
        // Ids are derived, not drawn: planning twice gives the same jobs.
        let (a, ca) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        let (b, cb) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        assert_eq!((a, ca), (b, cb));
        assert_ne!(
            job_id(&WorkflowId::from_bytes([9; 16]), "stats-1", 0),
            job_id(&WorkflowId::from_bytes([9; 16]), "stats-1", 1)
        );
    }

    #[test]
    fn a_lost_runner_moves_its_job_to_another_match() {
        let mut cands = three_sites();
        let m = manifest(vec![
            retries(spec("train", query(Pick::Best), &[]), 2),
            spec("aggregate", RunnerSelector::Owner, &["train"]),
        ]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let old = dispatches(&cmds)[0].job_id;
        assert_eq!(dispatches(&cmds)[0].runner, id(2));
        assert!(wf.handle(update(old, JobState::Running), &cands, t(2), LIFE).is_empty());

        cands[1].reachable = false;
        let cmds = wf.handle(WorkflowEvent::RunnerLost { instance: id(2) }, &cands, t(3), LIFE);
        assert_eq!(cancels(&cmds), vec![(id(2), old, "runner site-b was lost")]);
        let moved = dispatches(&cmds);
        assert_eq!(moved.len(), 1);
        let new = moved[0];
        assert_eq!(new.runner, id(1), "site-a: the most CPU of the reachable rest");
        assert_eq!(new.attempt, 1);
        assert_eq!(new.job_name, "train");
        assert_eq!(new.job_id, job_id(&wf.workflow_id, "train", 1));
        assert_eq!(new.header.issued_at, t(3));
        let job = wf.job(&new.job_id).unwrap();
        assert_eq!(job.previous, vec![old]);
        assert_eq!(job.runner_name, "site-a");
        assert!(job.dispatched);
        assert!(wf.job(&old).is_none());

        // The lost runner's late report of the old attempt changes nothing.
        assert!(wf.handle(update(old, JobState::Finished), &cands, t(4), LIFE).is_empty());
        assert!(wf.handle(stored(old), &cands, t(4), LIFE).is_empty());
        assert_eq!(wf.job(&new.job_id).unwrap().state, JobState::Queued);
        // Losing a runner that runs nothing of it changes nothing either.
        assert!(
            wf.handle(WorkflowEvent::RunnerLost { instance: id(3) }, &cands, t(4), LIFE).is_empty()
        );

        let cmds = complete(&mut wf, "train", &cands);
        let agg = dispatches(&cmds);
        assert_eq!(agg[0].inputs[0].job_id, new.job_id);
        complete(&mut wf, "aggregate", &cands);
        assert_eq!(wf.state, WorkflowState::Finished);
    }

    #[test]
    fn a_result_lost_with_its_runner_is_made_again_elsewhere() {
        let cands = three_sites();
        let m = manifest(vec![retries(spec("train", query(Pick::Best), &[]), 1)]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let old = dispatches(&cmds)[0].job_id;
        assert!(wf.handle(update(old, JobState::Finished), &cands, t(2), LIFE).is_empty());
        let cmds = wf.handle(WorkflowEvent::RunnerLost { instance: id(2) }, &cands, t(3), LIFE);
        assert!(cancels(&cmds).is_empty(), "nothing runs there any more");
        let d = dispatches(&cmds);
        assert_eq!((d[0].runner, d[0].attempt), (id(1), 1));
        // The old result arriving late changes nothing; the new one finishes the workflow.
        assert!(wf.handle(stored(old), &cands, t(4), LIFE).is_empty());
        complete(&mut wf, "train", &cands);
        assert_eq!(wf.state, WorkflowState::Finished);
    }

    #[test]
    fn a_lost_runner_without_another_match_fails_the_workflow() {
        let cands =
            vec![site(1, "site-a", 4000, false, 1), no_dataset(site(2, "site-b", 8000, false, 0))];
        let m = manifest(vec![retries(spec("train", query(Pick::Best), &[]), 1)]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let job = dispatches(&cmds)[0].job_id;
        let cmds = wf.handle(WorkflowEvent::RunnerLost { instance: id(1) }, &cands, t(2), LIFE);
        let reason =
            "job train at site-a failed: runner site-a was lost and no other instance matches";
        assert_eq!(
            cmds,
            vec![
                WorkflowCommand::CancelJob {
                    runner: id(1),
                    job_id: job,
                    reason: "runner site-a was lost".into()
                },
                WorkflowCommand::Ended {
                    state: WorkflowState::Failed,
                    reason: Some(reason.into())
                },
            ]
        );
        assert_eq!(wf.reason.as_deref(), Some(reason));
        // Without retries left, a lost runner fails the job too.
        let m = manifest(vec![spec("train", query(Pick::Best), &[])]);
        let (mut wf, _) = Workflow::start(&m, &three_sites(), t(1), LIFE).unwrap();
        let cmds =
            wf.handle(WorkflowEvent::RunnerLost { instance: id(2) }, &three_sites(), t(2), LIFE);
        assert_eq!(wf.state, WorkflowState::Failed);
        assert_eq!(
            wf.reason.as_deref(),
            Some(
                "job train at site-b failed: runner site-b was lost and the job has no retries left"
            )
        );
        assert_eq!(cancels(&cmds).len(), 1);
    }

    #[test]
    fn jobs_bound_to_their_runner_wait_for_it_when_it_is_lost() {
        let cands = three_sites();
        let m = manifest(vec![
            retries(spec("stats", query(Pick::All), &[]), 3),
            retries(single_file(spec("seg", query(Pick::Best), &[]), 1), 3),
            retries(spec("site", RunnerSelector::Instance(id(2)), &[]), 3),
        ]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        assert_eq!(dispatches(&cmds).len(), 3 + 1 + 1);
        let before = wf.clone();
        assert!(
            wf.handle(WorkflowEvent::RunnerLost { instance: id(2) }, &cands, t(2), LIFE).is_empty()
        );
        assert_eq!(wf, before);
    }

    #[test]
    fn an_undispatched_job_moves_off_a_lost_runner_without_spending_a_retry() {
        let cands = three_sites();
        let m = manifest(vec![
            spec("prepare", RunnerSelector::Owner, &[]),
            spec("train", query(Pick::Best), &["prepare"]),
        ]);
        let (mut wf, _) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let train = id_of(&wf, "train");
        assert_eq!(wf.job(&train).unwrap().runner, id(2));
        assert!(
            wf.handle(WorkflowEvent::RunnerLost { instance: id(2) }, &cands, t(2), LIFE).is_empty()
        );
        assert_eq!(wf.job(&train).unwrap().runner, id(1), "site-a, the best match left");
        let cmds = complete(&mut wf, "prepare", &cands);
        let d = dispatches(&cmds);
        assert_eq!((d[0].runner, d[0].attempt, d[0].job_id), (id(1), 0, train));
    }

    #[test]
    fn a_retryable_executor_failure_is_tried_again() {
        let cands = three_sites();
        let m = manifest(vec![retries(spec("train", query(Pick::Best), &[]), 1)]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let first = dispatches(&cmds)[0].job_id;
        let cmds = wf.handle(failed(first, "image missing", true), &cands, t(2), LIFE);
        let d = dispatches(&cmds);
        assert_eq!(cancels(&cmds), vec![]);
        assert_eq!((d[0].runner, d[0].attempt), (id(1), 1), "another reachable match");
        let second = d[0].job_id;
        assert_eq!(wf.job(&second).unwrap().previous, vec![first]);
        // The retries are spent now.
        let cmds = wf.handle(failed(second, "image missing", true), &cands, t(3), LIFE);
        assert_eq!(
            cmds,
            vec![WorkflowCommand::Ended {
                state: WorkflowState::Failed,
                reason: Some("job train at site-a failed: image missing".into())
            }]
        );

        // Jobs bound to their runner are tried again there.
        let m = manifest(vec![retries(spec("stats", query(Pick::All), &[]), 2)]);
        let (mut wf, _) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let s2 = id_of(&wf, "stats-2");
        let cmds = wf.handle(failed(s2, "container runtime error", true), &cands, t(2), LIFE);
        let d = dispatches(&cmds);
        assert_eq!((d[0].runner, d[0].attempt, d[0].job_name.as_str()), (id(2), 1, "stats-2"));
        assert_eq!(wf.state, WorkflowState::Running);

        // Single-file retries keep the slot bound: the retry takes the freed slot first.
        let cands = vec![site(1, "site-a", 4000, false, 3)];
        let m = manifest(vec![retries(single_file(spec("seg", query(Pick::All), &[]), 1), 1)]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        assert_eq!(names(&dispatches(&cmds)), ["seg-1"]);
        let s1 = id_of(&wf, "seg-1");
        let cmds = wf.handle(failed(s1, "node restarted", true), &cands, t(2), LIFE);
        let d = dispatches(&cmds);
        assert_eq!(names(&d), ["seg-1"]);
        assert_eq!(d[0].attempt, 1);
    }

    #[test]
    fn a_final_failure_fails_the_workflow_and_cancels_the_others() {
        let cands = three_sites();
        let mut m = statistics();
        m.jobs[0].max_retries = 3;
        let (mut wf, _) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let (s1, s2, s3) = (id_of(&wf, "stats-1"), id_of(&wf, "stats-2"), id_of(&wf, "stats-3"));
        complete(&mut wf, "stats-1", &cands);
        wf.handle(update(s3, JobState::Running), &cands, t(2), LIFE);
        // An exit code is final, whatever the retries.
        let cmds = wf.handle(failed(s2, "the job exited with status 3", false), &cands, t(3), LIFE);
        let reason = "job stats-2 at site-b failed: the job exited with status 3";
        let cancel = format!("workflow {WORKFLOW} failed: {reason}");
        assert_eq!(
            cmds,
            vec![
                WorkflowCommand::CancelJob { runner: id(3), job_id: s3, reason: cancel.clone() },
                WorkflowCommand::Ended {
                    state: WorkflowState::Failed,
                    reason: Some(reason.into())
                },
            ]
        );
        assert_eq!(wf.state, WorkflowState::Failed);
        assert_eq!(wf.ended_at, Some(t(3)));
        assert_eq!(wf.job(&s1).unwrap().state, JobState::Finished);
        assert_eq!(wf.job(&s3).unwrap().state, JobState::Failed);
        assert_eq!(wf.job(&s3).unwrap().reason.as_deref(), Some(cancel.as_str()));
        let agg = wf.job(&id_of(&wf, "aggregate")).unwrap();
        assert!(!agg.dispatched);
        assert_eq!((agg.state, agg.reason.as_deref()), (JobState::Failed, Some("cancelled")));
        // Nothing moves afterwards.
        let after = wf.clone();
        assert!(complete(&mut wf, "stats-3", &cands).is_empty());
        assert!(
            wf.handle(WorkflowEvent::RunnerLost { instance: id(1) }, &cands, t(4), LIFE).is_empty()
        );
        assert_eq!(wf, after);

        // A retryable failure without retries is final too.
        let (mut wf, _) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        let s1 = id_of(&wf, "stats-1");
        let cmds = wf.handle(failed(s1, "image missing", true), &cands, t(2), LIFE);
        assert_eq!(cancels(&cmds).len(), 2);
        assert_eq!(wf.state, WorkflowState::Failed);
    }

    #[test]
    fn cancel_stops_every_dispatched_job_and_dispatches_nothing_more() {
        let cands = three_sites();
        let (mut wf, _) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        complete(&mut wf, "stats-1", &cands);
        let cmds = wf.handle(WorkflowEvent::Cancel { by: "alice".into() }, &cands, t(5), LIFE);
        let reason = format!("workflow {WORKFLOW} cancelled by alice");
        assert_eq!(
            cancels(&cmds),
            vec![
                (id(2), id_of(&wf, "stats-2"), reason.as_str()),
                (id(3), id_of(&wf, "stats-3"), reason.as_str()),
            ]
        );
        assert_eq!(
            cmds.last(),
            Some(&WorkflowCommand::Ended {
                state: WorkflowState::Cancelled,
                reason: Some(reason.clone())
            })
        );
        assert!(dispatches(&cmds).is_empty());
        assert_eq!(wf.state, WorkflowState::Cancelled);
        assert_eq!(wf.reason.as_deref(), Some(reason.as_str()));
        assert_eq!(wf.job(&id_of(&wf, "aggregate")).unwrap().reason.as_deref(), Some("cancelled"));
        // The remaining site jobs finishing do not start the aggregation.
        assert!(complete(&mut wf, "stats-2", &cands).is_empty());
        assert!(complete(&mut wf, "stats-3", &cands).is_empty());
        assert!(
            wf.handle(WorkflowEvent::Cancel { by: "bob".into() }, &cands, t(6), LIFE).is_empty()
        );
        assert_eq!(wf.counts().to_string(), "1 finished, 3 failed");
        // Reasons are fit to sign.
        let (mut wf, _) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        let by = format!("eve\n{}", "x".repeat(2000));
        let cmds = wf.handle(WorkflowEvent::Cancel { by }, &cands, t(2), LIFE);
        for (_, _, r) in cancels(&cmds) {
            assert!(kaapana_protocol::validate_text("reason", r, MAX_TEXT_LEN).is_ok());
        }
    }

    #[test]
    fn a_policy_denial_becomes_the_workflows_reason() {
        let cands = three_sites();
        let (mut wf, cmds) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        let m = dispatches(&cmds)[0].clone();
        let policy = Policy {
            allowed_workflows: AllowList::only(["totalsegmentator"]),
            allowed_datasets: AllowList::Any,
            execution: Execution::Automatic,
            share_logs: false,
        };
        let (_, runner_cmds) = RunnerJob::receive(&m, "hub", &policy, t(2));
        let Some(RunnerCommand::SendUpdate(u)) = runner_cmds.last() else { panic!() };
        let cmds = wf.handle(
            WorkflowEvent::JobUpdated {
                job_id: m.job_id,
                state: u.state,
                reason: u.reason.clone(),
                retryable: u.retryable,
            },
            &cands,
            t(3),
            LIFE,
        );
        let reason = format!(
            "job stats-1 at site-a failed: workflow {WORKFLOW} is not allowed for instance hub"
        );
        assert_eq!(wf.state, WorkflowState::Failed);
        assert_eq!(wf.reason.as_deref(), Some(reason.as_str()));
        assert_eq!(cancels(&cmds).len(), 2);
        assert_eq!(
            cmds.last(),
            Some(&WorkflowCommand::Ended { state: WorkflowState::Failed, reason: Some(reason) })
        );
    }

    #[test]
    fn a_job_awaiting_approval_completes_once_approved() {
        let cands = three_sites();
        let m = manifest(vec![spec("stats", RunnerSelector::Instance(id(1)), &[])]);
        let (mut wf, cmds) = Workflow::start(&m, &cands, t(1), LIFE).unwrap();
        let job = dispatches(&cmds)[0].job_id;
        for (state, shown) in [
            (JobState::Pending { awaiting_approval: true }, "1 awaiting approval"),
            (JobState::Scheduled, "1 scheduled"),
            (JobState::Running, "1 running"),
        ] {
            assert!(wf.handle(update(job, state), &cands, t(2), LIFE).is_empty());
            assert_eq!(wf.job(&job).unwrap().state, state);
            assert_eq!(wf.counts().to_string(), shown);
        }
        assert!(wf.handle(update(job, JobState::Finished), &cands, t(3), LIFE).is_empty());
        let cmds = wf.handle(stored(job), &cands, t(4), LIFE);
        assert_eq!(
            cmds,
            vec![WorkflowCommand::Ended { state: WorkflowState::Finished, reason: None }]
        );
        assert_eq!(wf.job(&job).unwrap().result, Some(bundle(job)));
    }

    #[test]
    fn a_failed_run_leaves_no_result_and_a_stored_workflow_carries_on() {
        let cands = three_sites();
        let (mut wf, _) = Workflow::start(&statistics(), &cands, t(1), LIFE).unwrap();
        let s1 = id_of(&wf, "stats-1");
        let failed_result = WorkflowEvent::ResultStored {
            job_id: s1,
            bundle: bundle(s1),
            success: false,
            samples: None,
        };
        assert!(wf.handle(failed_result, &cands, t(2), LIFE).is_empty());
        assert_eq!(wf.job(&s1).unwrap().result, None);
        complete(&mut wf, "stats-1", &cands);
        complete(&mut wf, "stats-2", &cands);
        // As if stored and loaded again: the lookup tables are rebuilt on the next event.
        let mut loaded = wf.clone();
        loaded.index = Index::default();
        assert_eq!(loaded, wf);
        assert!(loaded.job(&s1).is_some());
        let a = complete(&mut wf, "stats-3", &cands);
        let b = complete(&mut loaded, "stats-3", &cands);
        assert_eq!(names(&dispatches(&a)), ["aggregate"]);
        assert_eq!(a, b);
        fn durable<T: Serialize + for<'de> Deserialize<'de>>() {}
        durable::<Workflow>();
    }

    // ---- property: random DAGs finish, in order, within bounds -----------------------------

    #[derive(Clone, Debug)]
    struct Site {
        cpu: u32,
        gpu: bool,
        items: usize,
    }

    #[derive(Clone, Debug)]
    enum Sel {
        Owner,
        Instance(usize),
        Query { gpu: bool, min_cpu: u32, best: bool },
    }

    #[derive(Clone, Debug)]
    struct StepGen {
        sel: Sel,
        single_file: Option<u32>,
        inputs: Vec<usize>,
    }

    fn site_gen() -> impl Strategy<Value = Site> {
        (prop_oneof![Just(1000u32), Just(2000), Just(4000)], any::<bool>(), 1usize..4)
            .prop_map(|(cpu, gpu, items)| Site { cpu, gpu, items })
    }

    fn step_gen(sites: usize) -> impl Strategy<Value = StepGen> {
        let sel = prop_oneof![
            Just(Sel::Owner),
            (0..sites).prop_map(Sel::Instance),
            (any::<bool>(), prop_oneof![Just(0u32), Just(2000), Just(4000)], any::<bool>())
                .prop_map(|(gpu, min_cpu, best)| Sel::Query { gpu, min_cpu, best }),
        ];
        let processing = prop_oneof![Just(None), (1u32..4).prop_map(Some)];
        (sel, processing, proptest::collection::vec(0usize..64, 0..4))
            .prop_map(|(sel, single_file, inputs)| StepGen { sel, single_file, inputs })
    }

    fn dag() -> impl Strategy<Value = (Vec<Site>, Vec<StepGen>, u64)> {
        proptest::collection::vec(site_gen(), 1..=5).prop_flat_map(|sites| {
            let n = sites.len();
            (Just(sites), proptest::collection::vec(step_gen(n), 1..12), any::<u64>())
        })
    }

    /// xorshift64*: the order in which the simulated sites report.
    struct Order(u64);

    impl Order {
        fn pick(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
        }
    }

    proptest! {
        #[test]
        fn random_dags_finish_with_every_job_dispatched_once_after_its_inputs(
            (sites, gens, seed) in dag()
        ) {
            // Site 0 is the owner itself; the last site offers everything so every query has a
            // match.
            let mut cands: Vec<Candidate> = sites
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let n = u8::try_from(k).unwrap();
                    let name = if k == 0 { "hub".to_owned() } else { format!("site-{k}") };
                    site(n, &name, s.cpu, s.gpu, s.items)
                })
                .collect();
            if let Some(last) = cands.last_mut() {
                last.ad.resources = site(0, "x", 4000, true, 1).ad.resources;
            }
            let specs: Vec<JobSpec> = gens
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let sel = match g.sel {
                        Sel::Owner => RunnerSelector::Owner,
                        Sel::Instance(k) => RunnerSelector::Instance(id(u8::try_from(k).unwrap())),
                        Sel::Query { gpu, min_cpu, best } => RunnerSelector::Query(CapabilityQuery {
                            dataset: Some("lung-ct".to_owned()),
                            gpu,
                            min_cpu_millis: min_cpu,
                            min_memory_bytes: 0,
                            pick: if best { Pick::Best } else { Pick::All },
                        }),
                    };
                    let inputs: BTreeSet<String> = if i == 0 {
                        BTreeSet::new()
                    } else {
                        g.inputs.iter().map(|k| format!("s{}", k % i)).collect()
                    };
                    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                    let mut s = spec(&format!("s{i}"), sel, &inputs);
                    s.dataset = Some("lung-ct".to_owned());
                    match g.single_file {
                        Some(p) => single_file(s, p),
                        None => s,
                    }
                })
                .collect();
            let m = manifest(specs);
            let (mut wf, cmds) = Workflow::start(&m, &cands, t(0), LIFE).unwrap();

            let mut order = Order(seed | 1);
            let mut pool: Vec<WorkflowEvent> = Vec::new();
            let mut dispatched: BTreeSet<JobId> = BTreeSet::new();
            let mut ended = 0;
            let mut check = |wf: &Workflow, cmds: Vec<WorkflowCommand>, pool: &mut Vec<WorkflowEvent>| {
                for c in cmds {
                    match c {
                        WorkflowCommand::Dispatch(jm) => {
                            prop_assert!(jm.validate().is_ok());
                            prop_assert!(dispatched.insert(jm.job_id), "dispatched twice");
                            let job = wf.job(&jm.job_id).unwrap();
                            let step = &wf.steps[job.step];
                            let mut expected = Vec::new();
                            for &up in &step.inputs {
                                for u in wf.jobs.iter().filter(|u| u.step == up) {
                                    prop_assert!(u.is_done(), "{} before {}", jm.job_name, u.name);
                                    expected.push(u.name.clone());
                                }
                            }
                            let got: Vec<String> = jm.inputs.iter().map(|i| i.job_name.clone()).collect();
                            prop_assert_eq!(got, expected);
                            let id = jm.job_id;
                            pool.push(update(id, JobState::Scheduled));
                            pool.push(update(id, JobState::Running));
                            pool.push(update(id, JobState::Finished));
                            pool.push(stored(id));
                        }
                        WorkflowCommand::Ended { state, .. } => {
                            prop_assert_eq!(state, WorkflowState::Finished);
                            ended += 1;
                        }
                        WorkflowCommand::CancelJob { .. } => prop_assert!(false, "nothing fails"),
                        WorkflowCommand::WakeAt(_) => prop_assert!(false, "no rounds here"),
                    }
                }
                // max_parallel per step and runner.
                let mut active: BTreeMap<(usize, InstanceId), usize> = BTreeMap::new();
                for j in wf.jobs.iter().filter(|j| j.dispatched && !j.state.is_terminal()) {
                    *active.entry((j.step, j.runner)).or_default() += 1;
                }
                for ((s, _), n) in active {
                    prop_assert!(n <= wf.steps[s].parallel_bound());
                }
                Ok(())
            };
            check(&wf, cmds, &mut pool)?;
            let mut now = 1;
            while !pool.is_empty() {
                let event = pool.swap_remove(order.pick(pool.len()));
                now += 1;
                let cmds = wf.handle(event, &cands, t(now), LIFE);
                check(&wf, cmds, &mut pool)?;
            }
            prop_assert_eq!(wf.state, WorkflowState::Finished);
            prop_assert_eq!(ended, 1);
            let all: BTreeSet<JobId> = wf.jobs.iter().map(|j| j.job_id).collect();
            prop_assert_eq!(dispatched, all);
            prop_assert!(wf.jobs.iter().all(WorkflowJob::is_done));
        }
    }
}
