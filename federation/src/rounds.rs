//! Trainings: workflows with rounds (federated learning), at their owner.
//!
//! A [`WorkflowManifest`] with [`Rounds`] has two job specs, `train` and `aggregate`. Round `k`
//! adds two steps to its [`Workflow`]: `<train>-r<k>`, one job per site chosen when the
//! training started (named `<train>-r<k>-<n>`, the sites numbered in a fixed order), and, once
//! the round closes, `<aggregate>-r<k>` at the owner, which reads the round's updates. The
//! aggregate's result is the model of round `k`: the input of every job of round `k + 1`.
//!
//! A round closes when every site's job has ended, or at its deadline (`round_deadline` after
//! it opened) once `min_sites` updates are stored; past the deadline it closes as soon as the
//! quorum is there, and the training fails when the quorum can no longer be reached. A site
//! that fails or is away misses the round and is asked again in the next one. Jobs still
//! running when their round closes are cancelled ([`LateUpdates::Drop`]), or keep running and
//! are aggregated in the next round if their update arrives before it closes
//! ([`LateUpdates::Fold`]).
//!
//! An update is a train job's successful result with a sample count (its bundle's `samples`
//! file, which the node reads). A count of 0 or above the items that the site advertises for
//! the training's dataset fails the job: FedAvg weights updates by their counts, so one site
//! must not outweigh the others by claiming data it does not have.
//!
//! Jobs see their round in the environment (`KAAPANA_ROUND`, `KAAPANA_ROUNDS`) of their
//! container. Everything is driven by [`Workflow::handle`], with the time as an argument: the
//! deadline arrives as [`WorkflowEvent::Tick`](crate::WorkflowEvent::Tick) after a
//! [`WorkflowCommand::WakeAt`].

use std::fmt::Write as _;
use std::time::Duration;

use kaapana_protocol::{
    BlobRef, EnvVar, InputBundle, InstanceId, JobId, JobSpec, JobState, LateUpdates, Rounds,
    RunnerSelector, Timestamp, Work, WorkflowManifest, fit_text,
};
use serde::{Deserialize, Serialize};

use crate::capability::Candidate;
use crate::workflow::{
    Changes, Index, MAX_INPUTS, PlanError, Revision, Step, StepRound, Workflow, WorkflowCommand,
    WorkflowJob, WorkflowState, job_id, numbered, resolve_runners,
};

/// A training's durable state: its spec, its sites and its rounds so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Training {
    /// The manifest's rounds.
    pub rounds: Rounds,
    /// The train job spec, as the manifest has it.
    pub train: JobSpec,
    /// The aggregate job spec, as the manifest has it.
    pub aggregate: JobSpec,
    /// The dataset the sites train on.
    pub dataset: String,
    /// The sites chosen when the training started, in the order of their job numbers.
    pub sites: Vec<TrainingSite>,
    /// Every round opened so far, oldest first; the last one is in progress (or the final
    /// one).
    pub history: Vec<RoundRecord>,
}

/// A site of a training.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingSite {
    /// Its identity.
    pub instance: InstanceId,
    /// Its registered name.
    pub name: String,
    /// The items it advertised for the training's dataset: the most samples it may claim.
    pub items: u64,
}

/// One round of a training.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Its number (from 1).
    pub round: u32,
    /// Its train step, as an index into [`Workflow::steps`].
    pub train_step: usize,
    /// Its aggregate step, once the round closed.
    pub aggregate_step: Option<usize>,
    /// When it opened (its train jobs were dispatched).
    pub opened_at: Timestamp,
    /// When it closes at the latest, given its quorum.
    pub deadline: Timestamp,
    /// When it closed.
    pub closed_at: Option<Timestamp>,
    /// The jobs of this round whose updates were aggregated.
    pub updates: Vec<JobId>,
    /// Late updates of the round before that were aggregated with this round's.
    pub folded: Vec<JobId>,
    /// Jobs that had not delivered when the round closed (dropped, or left to be folded).
    pub late: Vec<JobId>,
    /// The samples of all aggregated updates.
    pub samples: u64,
    /// The model it made (its aggregate's result).
    pub model: Option<BlobRef>,
    /// When its model was stored.
    pub ended_at: Option<Timestamp>,
}

impl Training {
    /// The round in progress, or the last one.
    pub fn current(&self) -> Option<&RoundRecord> {
        self.history.last()
    }

    /// How many rounds made their model (in this workflow; a resumed training's earlier
    /// rounds are not counted).
    pub fn completed(&self) -> usize {
        self.history.iter().filter(|r| r.model.is_some()).count()
    }

    /// The round whose train or aggregate step is `step`.
    pub fn round_of_step(&self, step: usize) -> Option<&RoundRecord> {
        self.history.iter().find(|r| r.train_step == step || r.aggregate_step == Some(step))
    }
}

/// What a round's train jobs allow.
enum Verdict {
    Wait,
    Close,
    Fail(String),
}

impl Workflow {
    /// Whether `job` is a training's update (a train job, current attempt), whose bundle's
    /// sample count the node reads for [`WorkflowEvent::ResultStored`](crate::WorkflowEvent).
    pub fn is_update(&self, job: &JobId) -> bool {
        self.job(job)
            .and_then(|j| self.steps.get(j.step))
            .and_then(|s| s.round)
            .is_some_and(|r| !r.aggregate)
    }

    /// Plans a training: chooses its sites and opens its first round.
    pub(crate) fn start_training(
        manifest: &WorkflowManifest,
        rounds: &Rounds,
        candidates: &[Candidate],
        now: Timestamp,
        job_lifetime: Duration,
    ) -> Result<(Self, Vec<WorkflowCommand>), PlanError> {
        let owner = manifest.owner;
        let owner_name = candidates
            .iter()
            .find(|c| c.instance == owner)
            .map_or("owner", |c| c.name.as_str())
            .to_owned();
        let spec = |name: &str| manifest.jobs.iter().find(|j| j.name == name).cloned();
        // Validation made sure both exist.
        let (Some(train), Some(aggregate)) = (spec(&rounds.train), spec(&rounds.aggregate)) else {
            return Err(PlanError::Invalid(kaapana_protocol::ValidationError::BadRounds {
                detail: "the train or aggregate job is missing".to_owned(),
            }));
        };
        let query_dataset = match &train.runner {
            RunnerSelector::Query(q) => q.dataset.clone(),
            _ => None,
        };
        let Some(dataset) = train.dataset.clone().or(query_dataset) else {
            return Err(PlanError::TrainingWithoutDataset { job: train.name.clone() });
        };
        let mut sites = Vec::new();
        for (instance, name) in resolve_runners(&train, owner, &owner_name, candidates)? {
            let items = candidates
                .iter()
                .find(|c| c.instance == instance)
                .and_then(|c| c.ad.datasets.iter().find(|d| d.name == dataset))
                .map_or(0, |d| d.items);
            if items == 0 {
                return Err(PlanError::NoItems { job: train.name.clone(), runner: name, dataset });
            }
            sites.push(TrainingSite { instance, name, items });
        }
        let min = rounds.min_sites;
        if sites.len() < usize::try_from(min).unwrap_or(usize::MAX) {
            let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
            return Err(PlanError::TooFewSites {
                job: train.name.clone(),
                found: sites.len(),
                sites: names.join(", "),
                min,
            });
        }
        // The aggregate reads every site's update, and at most as many late ones.
        if sites.len() > MAX_INPUTS {
            return Err(PlanError::TooManyInputs {
                job: aggregate.name.clone(),
                count: sites.len(),
                max: MAX_INPUTS,
            });
        }
        let first = rounds.first_round();
        let model = rounds.resume.as_ref().map(|r| r.model.clone());
        let mut wf = Self {
            workflow_id: manifest.workflow_id,
            name: manifest.name.clone(),
            owner,
            owner_name,
            state: WorkflowState::Running,
            reason: None,
            created_at: now,
            ended_at: None,
            steps: Vec::new(),
            jobs: Vec::new(),
            training: Some(Training {
                rounds: rounds.clone(),
                train,
                aggregate,
                dataset,
                sites,
                history: Vec::new(),
            }),
            index: Index::default(),
            revision: Revision::default(),
            changes: Changes::default(),
        };
        let mut out = Vec::new();
        wf.open_round(first, model, now, job_lifetime, &mut out);
        Ok((wf, out))
    }

    /// After every event of a training: closes the current round when it may, starts the
    /// next round once the model is stored, finishes after the last round.
    pub(crate) fn settle_training(
        &mut self,
        now: Timestamp,
        job_lifetime: Duration,
        out: &mut Vec<WorkflowCommand>,
    ) {
        let Some(rec) = self.training.as_ref().and_then(Training::current) else { return };
        let (round, aggregate) = (rec.round, rec.aggregate_step);
        match aggregate {
            None => match self.verdict(now) {
                Verdict::Wait => {}
                Verdict::Close => self.close_round(now, job_lifetime, out),
                Verdict::Fail(reason) => {
                    let cancel = fit_text(&format!("workflow {} failed: {reason}", self.name));
                    self.end(WorkflowState::Failed, fit_text(&reason), &cancel, now, out);
                }
            },
            Some(a) if self.step_done(a) => {
                let model = self.index.step_jobs.get(a).and_then(|js| js.first()).copied();
                let Some(i) = model else { return };
                let (bundle, name, id) =
                    (self.jobs[i].result, self.jobs[i].name.clone(), self.jobs[i].job_id);
                let Some(bundle) = bundle else { return };
                let last = self.training.as_ref().map_or(round, |t| t.rounds.rounds);
                if let Some(rec) = self.training.as_mut().and_then(|t| t.history.last_mut()) {
                    rec.model = Some(bundle);
                    rec.ended_at = Some(now);
                }
                self.touch_header();
                if round >= last {
                    // Late jobs of the last round can no longer be used.
                    let open: Vec<usize> =
                        (0..self.jobs.len()).filter(|&i| is_open(&self.jobs[i])).collect();
                    for i in open {
                        let reason =
                            format!("the training finished with round {round} without its update");
                        self.drop_late(i, &reason, out);
                    }
                    self.state = WorkflowState::Finished;
                    self.ended_at = Some(now);
                    out.push(WorkflowCommand::Ended {
                        state: WorkflowState::Finished,
                        reason: None,
                    });
                    return;
                }
                let input = InputBundle { job_name: name, job_id: id, bundle };
                self.open_round(round + 1, Some(input), now, job_lifetime, out);
            }
            Some(_) => {}
        }
    }

    /// Whether a train step's round is still open (its updates still count).
    pub(crate) fn round_open(&self, step: &Step) -> bool {
        let Some(r) = step.round else { return false };
        self.training
            .as_ref()
            .and_then(Training::current)
            .is_some_and(|c| c.round == r.round && c.aggregate_step.is_none())
    }

    /// Checks a training update's sample count: `Ok(Some(n))` for an update, `Ok(None)` for
    /// any other job, `Err(reason)` when the update must not be used.
    pub(crate) fn check_update(
        &self,
        i: usize,
        samples: Option<u64>,
    ) -> Result<Option<u64>, String> {
        let job = &self.jobs[i];
        let is_update =
            self.steps.get(job.step).and_then(|s| s.round).is_some_and(|r| !r.aggregate);
        let Some(t) = self.training.as_ref().filter(|_| is_update) else { return Ok(None) };
        let Some(n) = samples else {
            return Err("its update reports no sample count (a train job writes the number of \
                        samples it trained on to /output/samples)"
                .to_owned());
        };
        let items = t.sites.iter().find(|s| s.instance == job.runner).map_or(0, |s| s.items);
        if n == 0 || n > items {
            return Err(format!(
                "its update claims {n} samples, but {} advertises {items} items of dataset {}",
                job.runner_name, t.dataset
            ));
        }
        Ok(Some(n))
    }

    /// The work of a job of step `step`: the spec's, with the round in a training's
    /// container environment.
    pub(crate) fn work_of(&self, step: &Step) -> Work {
        let mut work = step.spec.work.clone();
        if let (Some(r), Some(t), Work::Container(c)) = (step.round, &self.training, &mut work) {
            c.env.push(EnvVar { name: "KAAPANA_ROUND".into(), value: r.round.to_string() });
            c.env
                .push(EnvVar { name: "KAAPANA_ROUNDS".into(), value: t.rounds.rounds.to_string() });
        }
        work
    }

    // ---- rounds ----------------------------------------------------------------------------

    /// Adds round `round`'s train step with one job per site, reading `model`, dispatches
    /// them and asks to be woken at the deadline.
    fn open_round(
        &mut self,
        round: u32,
        model: Option<InputBundle>,
        now: Timestamp,
        job_lifetime: Duration,
        out: &mut Vec<WorkflowCommand>,
    ) {
        let Some(t) = &self.training else { return };
        let mut spec = t.train.clone();
        spec.name = suffixed(&t.train.name, &format!("-r{round}"));
        // For display: the step it reads from (the workflow's own aggregate step but for a
        // resumed model).
        spec.inputs = model.iter().map(|m| m.job_name.clone()).collect();
        let sites: Vec<(InstanceId, String)> =
            t.sites.iter().map(|s| (s.instance, s.name.clone())).collect();
        let deadline =
            now.saturating_add(Duration::from_secs(u64::from(t.rounds.round_deadline_secs)));
        let step = Step {
            dataset: Some(t.dataset.clone()),
            inputs: Vec::new(),
            external: model.into_iter().collect(),
            round: Some(StepRound { round, aggregate: false }),
            spec,
        };
        let s = self.add_step(step, sites, now);
        if let Some(t) = self.training.as_mut() {
            t.history.push(RoundRecord {
                round,
                train_step: s,
                aggregate_step: None,
                opened_at: now,
                deadline,
                closed_at: None,
                updates: Vec::new(),
                folded: Vec::new(),
                late: Vec::new(),
                samples: 0,
                model: None,
                ended_at: None,
            });
        }
        self.pump(s, now, job_lifetime, out);
        out.push(WorkflowCommand::WakeAt(deadline));
    }

    /// Appends a step with one job per runner (`<step>-<n>`; the step's own name for an
    /// aggregate) and returns its index.
    fn add_step(
        &mut self,
        step: Step,
        runners: Vec<(InstanceId, String)>,
        now: Timestamp,
    ) -> usize {
        self.ensure_index();
        let (s, first) = (self.steps.len(), self.jobs.len());
        let single = step.round.is_some_and(|r| r.aggregate);
        for (n, (runner, runner_name)) in runners.into_iter().enumerate() {
            let name =
                if single { step.spec.name.clone() } else { numbered(&step.spec.name, n + 1) };
            self.jobs.push(WorkflowJob {
                job_id: job_id(&self.workflow_id, &name, 0),
                step: s,
                name,
                runner,
                runner_name,
                item: None,
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
        self.steps.push(step);
        self.ensure_index();
        self.index.add_step(s, &self.jobs, first);
        self.ensure_index();
        self.touch_header();
        for i in first..self.jobs.len() {
            self.touch(i);
        }
        s
    }

    /// Whether the current round may close, must wait, or can no longer reach its quorum.
    fn verdict(&self, now: Timestamp) -> Verdict {
        let Some(t) = &self.training else { return Verdict::Wait };
        let Some(rec) = t.current() else { return Verdict::Wait };
        let min = usize::try_from(t.rounds.min_sites).unwrap_or(usize::MAX);
        let (mut done, mut open) = (0, 0);
        let mut missing = String::new();
        for &i in self.index.step_jobs.get(rec.train_step).into_iter().flatten() {
            let j = &self.jobs[i];
            if j.is_done() {
                done += 1;
            } else if is_open(j) {
                open += 1;
            } else {
                let why = j.reason.as_deref().unwrap_or("no reason given");
                let _ = write!(missing, "; {} failed: {why}", j.runner_name);
            }
        }
        let past = now >= rec.deadline;
        if open == 0 || (past && done >= min) {
            if done >= min {
                return Verdict::Close;
            }
        } else if done + open >= min {
            return Verdict::Wait;
        }
        Verdict::Fail(format!(
            "round {} has {done} of the {min} updates it needs (min_sites) and cannot get more{missing}",
            rec.round
        ))
    }

    /// Closes the current round: deals with its late jobs (and the round before's), then adds
    /// and dispatches its aggregate over the updates.
    fn close_round(
        &mut self,
        now: Timestamp,
        job_lifetime: Duration,
        out: &mut Vec<WorkflowCommand>,
    ) {
        let Some(t) = &self.training else { return };
        let Some(rec) = t.current() else { return };
        let (round, step, policy) = (rec.round, rec.train_step, t.rounds.late);
        let previous_late: Vec<JobId> = match policy {
            LateUpdates::Fold => {
                t.history.iter().rev().nth(1).map(|r| r.late.clone()).unwrap_or_default()
            }
            LateUpdates::Drop => Vec::new(),
        };
        let mut updates = Vec::new();
        let mut late = Vec::new();
        for &i in self.index.step_jobs.get(step).into_iter().flatten() {
            let j = &self.jobs[i];
            if j.is_done() {
                updates.push(i);
            } else if is_open(j) {
                late.push(i);
            }
        }
        let mut folded = Vec::new();
        for id in &previous_late {
            let Some(i) = self.find(id) else { continue };
            if self.jobs[i].is_done() && updates.len() + folded.len() < MAX_INPUTS {
                folded.push(i);
            } else if is_open(&self.jobs[i]) {
                let reason = format!(
                    "its update of round {} did not arrive before round {round} closed",
                    round.saturating_sub(1)
                );
                self.drop_late(i, &reason, out);
            }
        }
        if policy == LateUpdates::Drop {
            for &i in &late {
                let reason =
                    format!("round {round} closed without its update (late updates are dropped)");
                self.drop_late(i, &reason, out);
            }
        }
        let external: Vec<InputBundle> = updates
            .iter()
            .chain(&folded)
            .filter_map(|&i| {
                let j = &self.jobs[i];
                j.result.map(|bundle| InputBundle {
                    job_name: j.name.clone(),
                    job_id: j.job_id,
                    bundle,
                })
            })
            .collect();
        let samples: u64 =
            updates.iter().chain(&folded).filter_map(|&i| self.jobs[i].samples).sum();
        let folded_step = folded.first().map(|&i| self.jobs[i].step);
        let ids = |v: &[usize], jobs: &[WorkflowJob]| v.iter().map(|&i| jobs[i].job_id).collect();
        let (updates, folded, late): (Vec<JobId>, Vec<JobId>, Vec<JobId>) =
            (ids(&updates, &self.jobs), ids(&folded, &self.jobs), ids(&late, &self.jobs));
        let Some(t) = &self.training else { return };
        let mut spec = t.aggregate.clone();
        spec.name = suffixed(&t.aggregate.name, &format!("-r{round}"));
        // For display: the steps it reads from.
        spec.inputs = vec![self.steps[step].spec.name.clone()];
        if let Some(f) = folded_step {
            spec.inputs.push(self.steps[f].spec.name.clone());
        }
        let aggregate = Step {
            dataset: spec.dataset.clone(),
            inputs: Vec::new(),
            external,
            round: Some(StepRound { round, aggregate: true }),
            spec,
        };
        let owner = (self.owner, self.owner_name.clone());
        let a = self.add_step(aggregate, vec![owner], now);
        if let Some(rec) = self.training.as_mut().and_then(|t| t.history.last_mut()) {
            rec.aggregate_step = Some(a);
            rec.closed_at = Some(now);
            rec.updates = updates;
            rec.folded = folded;
            rec.late = late;
            rec.samples = samples;
        }
        self.pump(a, now, job_lifetime, out);
    }

    /// Gives up a late job: cancels it at its runner if it still runs there.
    fn drop_late(&mut self, i: usize, reason: &str, out: &mut Vec<WorkflowCommand>) {
        let j = &self.jobs[i];
        let reason = fit_text(reason);
        if j.dispatched && !j.state.is_terminal() {
            out.push(WorkflowCommand::CancelJob {
                runner: j.runner,
                job_id: j.job_id,
                reason: reason.clone(),
            });
        }
        self.fail(i, reason);
    }
}

/// Not ended, or finished with its result still to come.
fn is_open(j: &WorkflowJob) -> bool {
    !j.state.is_terminal() || (j.state == JobState::Finished && j.result.is_none())
}

/// `base` + `suffix`, with `base` shortened so that the whole is a valid name.
fn suffixed(base: &str, suffix: &str) -> String {
    let keep = kaapana_protocol::MAX_NAME_LEN.saturating_sub(suffix.len());
    let mut name: String = base.chars().take(keep).collect();
    name.push_str(suffix);
    name
}

#[cfg(test)]
mod tests {
    use kaapana_protocol::{
        BlobRef, JobManifest, JobState, LateUpdates, Pick, ResumeFrom, Rounds, RunnerSelector,
        Sha256Digest, WorkflowManifest,
    };

    use crate::workflow::tests::{
        LIFE, bundle, cancels, dispatches, failed, id, id_of, manifest, names, query, site, spec,
        t, three_sites, update,
    };
    use crate::{Candidate, PlanError, Workflow, WorkflowCommand, WorkflowEvent, WorkflowState};

    /// A training over the three sites (4, 3 and 2 items of lung-ct).
    fn training(rounds: u32, min_sites: u32, late: LateUpdates) -> WorkflowManifest {
        let mut m = manifest(vec![
            spec("train", query(Pick::All), &[]),
            spec("aggregate", RunnerSelector::Owner, &["train"]),
        ]);
        m.rounds = Some(Rounds {
            rounds,
            min_sites,
            round_deadline_secs: 60,
            late,
            train: "train".to_owned(),
            aggregate: "aggregate".to_owned(),
            resume: None,
        });
        m
    }

    fn start(m: &WorkflowManifest, cands: &[Candidate]) -> (Workflow, Vec<WorkflowCommand>) {
        Workflow::start(m, cands, t(0), LIFE).unwrap()
    }

    /// `name` finishes with `samples` samples at `ms`.
    fn deliver(
        wf: &mut Workflow,
        name: &str,
        samples: Option<u64>,
        cands: &[Candidate],
        ms: u64,
    ) -> Vec<WorkflowCommand> {
        let job = id_of(wf, name);
        let mut out = wf.handle(update(job, JobState::Finished), cands, t(ms), LIFE);
        let stored = WorkflowEvent::ResultStored {
            job_id: job,
            bundle: bundle(job),
            success: true,
            samples,
        };
        out.extend(wf.handle(stored, cands, t(ms), LIFE));
        out
    }

    fn env(m: &JobManifest, name: &str) -> Option<String> {
        let c = m.work.container()?;
        c.env.iter().find(|e| e.name == name).map(|e| e.value.clone())
    }

    fn wake_at(cmds: &[WorkflowCommand]) -> Vec<u64> {
        cmds.iter()
            .filter_map(|c| match c {
                WorkflowCommand::WakeAt(at) => Some(at.as_millis() - t(0).as_millis()),
                _ => None,
            })
            .collect()
    }

    fn inputs(m: &JobManifest) -> Vec<String> {
        m.inputs.iter().map(|i| i.job_name.clone()).collect()
    }

    #[test]
    fn each_rounds_model_is_the_input_of_every_site_in_the_next_round() {
        let cands = three_sites();
        let (mut wf, cmds) = start(&training(3, 2, LateUpdates::Drop), &cands);
        let first = dispatches(&cmds);
        assert_eq!(names(&first), ["train-r1-1", "train-r1-2", "train-r1-3"]);
        assert!(first.iter().all(|m| m.inputs.is_empty()), "round 1 starts from no model");
        assert_eq!(env(first[0], "KAAPANA_ROUND").as_deref(), Some("1"));
        assert_eq!(env(first[0], "KAAPANA_ROUNDS").as_deref(), Some("3"));
        assert_eq!(wake_at(&cmds), [60_000]);
        for round in 1..=3u32 {
            let mut out = Vec::new();
            for (k, n) in [(1, 4), (2, 3), (3, 2)] {
                out = deliver(&mut wf, &format!("train-r{round}-{k}"), Some(n), &cands, 100);
            }
            // Every site reported: the round closes before its deadline.
            let agg = dispatches(&out);
            assert_eq!(names(&agg), [format!("aggregate-r{round}")]);
            assert_eq!(agg[0].runner, id(0));
            let mut expected: Vec<String> =
                (1..=3).map(|k| format!("train-r{round}-{k}")).collect();
            expected.sort();
            let mut got = inputs(agg[0]);
            got.sort();
            assert_eq!(got, expected);
            let rec = wf.training.as_ref().unwrap().current().unwrap().clone();
            assert_eq!((rec.round, rec.samples, rec.updates.len()), (round, 9, 3));

            let out = deliver(&mut wf, &format!("aggregate-r{round}"), None, &cands, 200);
            let model = id_of(&wf, &format!("aggregate-r{round}"));
            if round < 3 {
                let next = dispatches(&out);
                assert_eq!(next.len(), 3);
                for m in &next {
                    assert_eq!(inputs(m), [format!("aggregate-r{round}")]);
                    assert_eq!(m.inputs[0].bundle, bundle(model));
                    assert_eq!(env(m, "KAAPANA_ROUND"), Some((round + 1).to_string()));
                    // The runner of a live job of the next round may fetch the model.
                    let got = wf.input_for(&m.runner, &m.job_id, &bundle(model).digest);
                    assert_eq!(got, Some(bundle(model)));
                }
            } else {
                assert!(matches!(out.last(), Some(WorkflowCommand::Ended { .. })), "{out:?}");
            }
        }
        assert_eq!(wf.state, WorkflowState::Finished);
        let t = wf.training.as_ref().unwrap();
        assert_eq!(t.completed(), 3);
        assert!(t.history.iter().all(|r| r.model.is_some()));
    }

    #[test]
    fn a_round_closes_at_its_deadline_with_its_quorum_and_drops_the_late_site() {
        let cands = three_sites();
        let (mut wf, _) = start(&training(2, 2, LateUpdates::Drop), &cands);
        deliver(&mut wf, "train-r1-1", Some(4), &cands, 1_000);
        let out = deliver(&mut wf, "train-r1-2", Some(3), &cands, 2_000);
        assert!(dispatches(&out).is_empty(), "site-c may still report before the deadline");
        // An early tick changes nothing.
        assert!(wf.handle(WorkflowEvent::Tick, &cands, t(59_999), LIFE).is_empty());
        let out = wf.handle(WorkflowEvent::Tick, &cands, t(60_000), LIFE);
        let late = id_of(&wf, "train-r1-3");
        let cancelled = cancels(&out);
        assert_eq!(cancelled.len(), 1);
        assert_eq!((cancelled[0].0, cancelled[0].1), (id(3), late));
        assert!(cancelled[0].2.contains("round 1 closed without its update"), "{}", cancelled[0].2);
        let agg = dispatches(&out);
        assert_eq!(names(&agg), ["aggregate-r1"]);
        assert_eq!(inputs(agg[0]), ["train-r1-1", "train-r1-2"]);
        // Its late update is not used.
        assert!(deliver(&mut wf, "train-r1-3", Some(2), &cands, 61_000).is_empty());
        // The next round asks every site again, site-c too, with a new deadline.
        let out = deliver(&mut wf, "aggregate-r1", None, &cands, 70_000);
        assert_eq!(names(&dispatches(&out)), ["train-r2-1", "train-r2-2", "train-r2-3"]);
        assert_eq!(wake_at(&out), [130_000]);
        let rec = &wf.training.as_ref().unwrap().history[0];
        assert_eq!((rec.updates.len(), rec.late.clone(), rec.samples), (2, vec![late], 7));
    }

    #[test]
    fn without_quorum_a_round_waits_past_its_deadline_and_fails_once_it_cannot_be_reached() {
        let cands = three_sites();
        let (mut wf, _) = start(&training(2, 2, LateUpdates::Drop), &cands);
        deliver(&mut wf, "train-r1-1", Some(4), &cands, 1_000);
        let b = id_of(&wf, "train-r1-2");
        wf.handle(failed(b, "out of memory", false), &cands, t(2_000), LIFE);
        assert_eq!(wf.state, WorkflowState::Running, "site-c may still bring the quorum");
        assert!(wf.handle(WorkflowEvent::Tick, &cands, t(60_000), LIFE).is_empty());
        // Past the deadline, the round closes as soon as the quorum is there.
        let mut late = wf.clone();
        let out = deliver(&mut late, "train-r1-3", Some(2), &cands, 90_000);
        assert_eq!(names(&dispatches(&out)), ["aggregate-r1"]);
        // And fails when the last site fails too.
        let c = id_of(&wf, "train-r1-3");
        let out = wf.handle(failed(c, "disk full", false), &cands, t(90_000), LIFE);
        assert!(matches!(out.last(), Some(WorkflowCommand::Ended { .. })));
        assert_eq!(wf.state, WorkflowState::Failed);
        let reason = wf.reason.clone().unwrap();
        for part in ["round 1", "1 of the 2 updates", "site-b failed: out of memory", "disk full"] {
            assert!(reason.contains(part), "{reason:?} lacks {part:?}");
        }
    }

    #[test]
    fn a_failed_site_retries_within_its_round_only() {
        let cands = three_sites();
        let mut m = training(2, 2, LateUpdates::Drop);
        m.jobs[0].max_retries = 1;
        let (mut wf, _) = start(&m, &cands);
        let c = id_of(&wf, "train-r1-3");
        let out = wf.handle(failed(c, "container runtime restarted", true), &cands, t(10), LIFE);
        let again = dispatches(&out);
        assert_eq!((names(&again), again[0].attempt), (vec!["train-r1-3".to_owned()], 1));
        assert_eq!(again[0].runner, id(3));
    }

    #[test]
    fn late_updates_fold_into_the_next_round() {
        let cands = three_sites();
        let (mut wf, _) = start(&training(3, 2, LateUpdates::Fold), &cands);
        deliver(&mut wf, "train-r1-1", Some(4), &cands, 1_000);
        deliver(&mut wf, "train-r1-2", Some(3), &cands, 2_000);
        let out = wf.handle(WorkflowEvent::Tick, &cands, t(60_000), LIFE);
        assert!(cancels(&out).is_empty(), "site-c's job may go on");
        assert_eq!(inputs(dispatches(&out)[0]), ["train-r1-1", "train-r1-2"]);
        deliver(&mut wf, "aggregate-r1", None, &cands, 61_000);
        // Site-c's round-1 update arrives during round 2 ...
        assert!(dispatches(&deliver(&mut wf, "train-r1-3", Some(2), &cands, 62_000)).is_empty());
        for k in 1..=3 {
            let out = deliver(&mut wf, &format!("train-r2-{k}"), Some(1), &cands, 63_000);
            if k == 3 {
                // ... and is aggregated with round 2's.
                let agg = dispatches(&out);
                let expected = ["train-r2-1", "train-r2-2", "train-r2-3", "train-r1-3"];
                assert_eq!(inputs(agg[0]), expected);
            }
        }
        let rec = wf.training.as_ref().unwrap().current().unwrap().clone();
        assert_eq!((rec.folded.len(), rec.samples), (1, 5));
        // A late job of round 2 that has not delivered when round 3 closes is cancelled.
        deliver(&mut wf, "aggregate-r2", None, &cands, 64_000);
        deliver(&mut wf, "train-r3-1", Some(1), &cands, 65_000);
        deliver(&mut wf, "train-r3-2", Some(1), &cands, 65_000);
        let out = wf.handle(WorkflowEvent::Tick, &cands, t(64_000 + 60_000), LIFE);
        assert!(cancels(&out).is_empty());
        let rec = wf.training.as_ref().unwrap().current().unwrap().clone();
        assert_eq!(rec.late.len(), 1, "train-r3-3 is late; round 3 is the last");
        // When the training finishes, it is cancelled: nothing could use it any more.
        let out = deliver(&mut wf, "aggregate-r3", None, &cands, 130_000);
        assert_eq!(cancels(&out).len(), 1);
        assert_eq!(cancels(&out)[0].1, id_of(&wf, "train-r3-3"));
        assert_eq!(wf.state, WorkflowState::Finished);
        assert!(wf.jobs.iter().all(|j| j.state.is_terminal()));
    }

    #[test]
    fn sample_counts_must_be_reported_and_within_the_advertised_items() {
        let cands = three_sites();
        let (mut wf, _) = start(&training(1, 1, LateUpdates::Drop), &cands);
        deliver(&mut wf, "train-r1-1", Some(4), &cands, 10);
        deliver(&mut wf, "train-r1-2", None, &cands, 10);
        let out = deliver(&mut wf, "train-r1-3", Some(5), &cands, 10);
        let b = wf.jobs.iter().find(|j| j.name == "train-r1-2").unwrap();
        assert_eq!(b.state, JobState::Failed);
        assert!(b.reason.as_deref().unwrap().contains("/output/samples"), "{:?}", b.reason);
        let c = wf.jobs.iter().find(|j| j.name == "train-r1-3").unwrap();
        let why = c.reason.as_deref().unwrap();
        assert!(why.contains("claims 5 samples") && why.contains("site-c advertises 2 items"));
        // Only the honest update is aggregated.
        assert_eq!(inputs(dispatches(&out)[0]), ["train-r1-1"]);
        assert_eq!(wf.training.as_ref().unwrap().current().unwrap().samples, 4);
        let zero = training(1, 1, LateUpdates::Drop);
        let (mut wf, _) = start(&zero, &cands);
        deliver(&mut wf, "train-r1-1", Some(0), &cands, 10);
        assert_eq!(wf.jobs[0].state, JobState::Failed);
    }

    #[test]
    fn a_resumed_training_starts_after_the_given_round_from_its_model() {
        let cands = three_sites();
        let mut m = training(4, 2, LateUpdates::Drop);
        let model = BlobRef { digest: Sha256Digest::of(b"model of round 2"), size: 7 };
        let old = crate::job_id(&kaapana_protocol::WorkflowId::from_bytes([1; 16]), "x", 0);
        m.rounds.as_mut().unwrap().resume = Some(ResumeFrom {
            round: 2,
            model: kaapana_protocol::InputBundle {
                job_name: "aggregate-r2".to_owned(),
                job_id: old,
                bundle: model,
            },
        });
        let (wf, cmds) = start(&m, &cands);
        let first = dispatches(&cmds);
        assert_eq!(names(&first), ["train-r3-1", "train-r3-2", "train-r3-3"]);
        assert!(first.iter().all(|m| m.inputs.len() == 1 && m.inputs[0].bundle == model));
        assert_eq!(wf.input_for(&id(1), &first[0].job_id, &model.digest), Some(model));
        assert_eq!(wf.input_for(&id(2), &first[0].job_id, &model.digest), None);
    }

    #[test]
    fn a_training_needs_a_dataset_and_enough_sites() {
        let cands = vec![site(1, "site-a", 1000, false, 3)];
        let err = Workflow::start(&training(2, 2, LateUpdates::Drop), &cands, t(0), LIFE);
        assert!(matches!(err, Err(PlanError::TooFewSites { found: 1, min: 2, .. })), "{err:?}");
        let mut m = training(2, 1, LateUpdates::Drop);
        m.jobs[0].runner = RunnerSelector::Instance(id(1));
        let err = Workflow::start(&m, &cands, t(0), LIFE);
        assert!(matches!(err, Err(PlanError::TrainingWithoutDataset { .. })), "{err:?}");
        let mut m = training(2, 1, LateUpdates::Drop);
        m.jobs.push(spec("extra", RunnerSelector::Owner, &[]));
        let err = Workflow::start(&m, &cands, t(0), LIFE).unwrap_err().to_string();
        assert!(err.contains("exactly two jobs"), "{err}");
    }
}
