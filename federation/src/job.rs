//! Jobs: the runner's state machine and the owner's view of a job.
//!
//! States follow Kaapana's names and order: queued (at the owner) → pending (the runner holds
//! it; `awaiting_approval` while its policy wants a local decision) → scheduled → running →
//! finished | failed. An abort is a failure with the reason "aborted by <instance>".
//!
//! Sans-IO: [`RunnerJob::receive`] and [`RunnerJob::handle`] take events and the current time
//! and return [`RunnerCommand`]s in the order the node must carry them out — `Persist` first,
//! so that nothing is announced before it is durable. The node signs and sends the updates,
//! runs the executor and ships the result.

use std::fmt;

use kaapana_protocol::{
    ExitStatus, InstanceId, JobId, JobManifest, JobState, Timestamp, WorkflowId,
};
use serde::{Deserialize, Serialize};

use crate::policy::{Execution, Policy};

/// What happened to a job at its runner.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunnerEvent {
    /// The site admin approved a job that waited for approval.
    Approved,
    /// The site admin refused it.
    Rejected {
        /// Why, in the admin's words.
        reason: String,
    },
    /// The executor started its container.
    Started,
    /// Its container (or DAG run) ended.
    Exited {
        /// How.
        exit: ExitStatus,
        /// What the executor knows beyond the exit status (e.g. which Airflow task failed and
        /// why), added to the failure's reason.
        detail: Option<String>,
    },
    /// The owner or the local admin aborted it.
    Aborted {
        /// Who: an instance name, or "the local admin".
        by: String,
    },
    /// The executor could not run it (image missing, container runtime error, node restarted
    /// and the container is gone).
    ExecutorFailed {
        /// Why.
        reason: String,
    },
}

/// What the node must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunnerCommand {
    /// Record the job's state durably before anything below is done.
    Persist,
    /// Sign this update and push it to the owner.
    SendUpdate(Update),
    /// Start the container.
    Execute,
    /// Kill the container.
    Kill,
    /// Pack `/output` (and, if the policy allows, the log) as the result, sign a
    /// `ResultManifest` and send it to the owner.
    SendResult {
        /// How the container ended.
        exit: ExitStatus,
    },
}

/// The content of a [`JobUpdate`] (the node adds job ids and header when it signs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The new state.
    pub state: JobState,
    /// Why (failures).
    pub reason: Option<String>,
    /// Increases with every update of this job attempt.
    pub sequence: u32,
    /// For failures: whether trying again may succeed.
    pub retryable: bool,
}

/// An event that does not apply to the job's current state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("job {job}: {event} does not apply in state {state:?}")]
pub struct TransitionError {
    /// The job.
    pub job: JobId,
    /// Its state.
    pub state: JobState,
    /// The event, in words.
    pub event: String,
}

/// One job at its runner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerJob {
    /// The job.
    pub job_id: JobId,
    /// Its workflow.
    pub workflow_id: WorkflowId,
    /// Which attempt.
    pub attempt: u32,
    /// The workflow's owner.
    pub owner: InstanceId,
    /// The owner's registered name.
    pub owner_name: String,
    /// The job spec's name.
    pub job_name: String,
    /// Where it is.
    pub state: JobState,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// Whether its failure is one that trying again may cure (the executor failed).
    pub retryable: bool,
    /// The sequence number of the last update sent.
    pub sequence: u32,
    /// When the runner received it.
    pub received_at: Timestamp,
    /// When its container started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// How its container ended.
    pub exit: Option<ExitStatus>,
    /// The timeout it ran with, for failure messages.
    pub timeout_secs: u32,
}

impl RunnerJob {
    /// A verified job manifest from `owner_name` arrives; `policy` is this site's policy for
    /// that owner. A denied job fails at once with the exact rule that denied it.
    pub fn receive(
        job: &JobManifest,
        owner_name: &str,
        policy: &Policy,
        now: Timestamp,
    ) -> (Self, Vec<RunnerCommand>) {
        let mut me = Self {
            job_id: job.job_id,
            workflow_id: job.workflow_id,
            attempt: job.attempt,
            owner: job.owner,
            owner_name: owner_name.to_owned(),
            job_name: job.job_name.clone(),
            state: JobState::Pending { awaiting_approval: false },
            reason: None,
            retryable: false,
            sequence: 0,
            received_at: now,
            started_at: None,
            finished_at: None,
            exit: None,
            timeout_secs: job.timeout_secs,
        };
        // A DAG job runs what the runner's Airflow defines under that DAG id: the id is what its
        // policy allows (Kaapana's allowed_dags), whatever the owner called its workflow.
        let allowed = match job.work.dag_run() {
            Some(run) => policy.check_dag(owner_name, &run.dag_id),
            None => policy.check_workflow(owner_name, &job.workflow_name),
        };
        let denial = allowed.err().or_else(|| {
            job.dataset.as_ref().and_then(|d| policy.check_dataset(owner_name, &d.name).err())
        });
        let mut out = vec![RunnerCommand::Persist];
        if let Some(denial) = denial {
            me.finish(now, None, Some(denial.rule));
            out.push(me.next_update());
            return (me, out);
        }
        match policy.execution {
            Execution::Approval => {
                me.state = JobState::Pending { awaiting_approval: true };
                out.push(me.next_update());
            }
            Execution::Automatic => {
                out.push(me.next_update());
                me.state = JobState::Scheduled;
                out.push(me.next_update());
                out.push(RunnerCommand::Execute);
            }
        }
        (me, out)
    }

    /// Applies an event; the commands come in the order the node must carry them out.
    pub fn handle(
        &mut self,
        event: RunnerEvent,
        now: Timestamp,
    ) -> Result<Vec<RunnerCommand>, TransitionError> {
        use JobState::{Pending, Running, Scheduled};
        let out = match (self.state, event) {
            (Pending { awaiting_approval: true }, RunnerEvent::Approved) => {
                self.state = Scheduled;
                vec![RunnerCommand::Persist, self.next_update(), RunnerCommand::Execute]
            }
            (Pending { awaiting_approval: true }, RunnerEvent::Rejected { reason }) => {
                self.finish(now, None, Some(format!("rejected at this site: {reason}")));
                vec![RunnerCommand::Persist, self.next_update()]
            }
            (Scheduled, RunnerEvent::Started) => {
                self.state = Running;
                self.started_at = Some(now);
                vec![RunnerCommand::Persist, self.next_update()]
            }
            (Scheduled | Running, RunnerEvent::Exited { exit, detail }) => {
                let reason = self.describe(exit).map(|r| match detail {
                    Some(d) => kaapana_protocol::fit_text(&format!("{r}: {d}")),
                    None => r,
                });
                self.finish(now, Some(exit), reason);
                vec![RunnerCommand::Persist, self.next_update(), RunnerCommand::SendResult { exit }]
            }
            (state, RunnerEvent::Aborted { by }) if !state.is_terminal() => {
                let running = matches!(state, Scheduled | Running);
                self.finish(now, None, Some(format!("aborted by {by}")));
                let mut out = vec![RunnerCommand::Persist];
                if running {
                    out.push(RunnerCommand::Kill);
                }
                out.push(self.next_update());
                out
            }
            (state, RunnerEvent::ExecutorFailed { reason }) if !state.is_terminal() => {
                self.finish(now, None, Some(reason));
                self.retryable = true;
                vec![RunnerCommand::Persist, self.next_update()]
            }
            (state, event) => {
                return Err(TransitionError {
                    job: self.job_id,
                    state,
                    event: format!("{event:?}"),
                });
            }
        };
        Ok(out)
    }

    /// The job update that announces the current state (the next sequence number).
    fn next_update(&mut self) -> RunnerCommand {
        self.sequence += 1;
        RunnerCommand::SendUpdate(Update {
            state: self.state,
            reason: self.reason.clone(),
            sequence: self.sequence,
            retryable: self.retryable,
        })
    }

    fn finish(&mut self, now: Timestamp, exit: Option<ExitStatus>, reason: Option<String>) {
        self.state = match (exit, &reason) {
            (Some(ExitStatus::Exited(0)), None) => JobState::Finished,
            _ => JobState::Failed,
        };
        self.exit = exit;
        self.reason = reason;
        self.finished_at = Some(now);
    }

    /// Why an exit is a failure, in words; `None` for success.
    fn describe(&self, exit: ExitStatus) -> Option<String> {
        match exit {
            ExitStatus::Exited(0) => None,
            ExitStatus::Exited(code) => Some(format!("the job exited with status {code}")),
            ExitStatus::TimedOut => {
                Some(format!("killed after its timeout of {} s", self.timeout_secs))
            }
            ExitStatus::OutOfMemory => Some("out of memory: killed at its memory limit".into()),
            ExitStatus::Killed(sig) => Some(format!("killed by signal {sig}")),
        }
    }
}

/// Why the owner ignores an update.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// No job of this instance's workflows has this id (in its current attempt).
    #[error("unknown job {job}")]
    UnknownJob {
        /// The job.
        job: JobId,
    },
    /// The update is signed by another instance than the job's runner.
    #[error("update for job {job} comes from {from}, but its runner is {runner}")]
    NotTheRunner {
        /// The job.
        job: JobId,
        /// Who sent it.
        from: String,
        /// Its runner.
        runner: String,
    },
    /// The update is for another attempt of the job (e.g. a late one from a runner that was
    /// replaced).
    #[error("update for attempt {got} of job {job}, which is at attempt {current}")]
    OtherAttempt {
        /// The job.
        job: JobId,
        /// The update's attempt.
        got: u32,
        /// The current attempt.
        current: u32,
    },
}

/// Whether a workflow's owner takes a result a runner offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Yes: the current attempt of a job this instance submitted to that runner.
    Yes,
    /// Not a job this instance submitted to that runner.
    NotYours,
    /// A job attempt its workflow has replaced (the job now runs as `current`).
    Superseded {
        /// The job's current attempt.
        current: JobId,
    },
}

impl fmt::Display for RunnerJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "job {} ({}) from {}: {:?}",
            self.job_name, self.job_id, self.owner_name, self.state
        )?;
        if let Some(r) = &self.reason {
            write!(f, ": {r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kaapana_protocol::{
        ContainerWork, DatasetRef, Header, ImageDigest, ResourceLimits, Sha256Digest, Work,
    };

    use super::*;
    use crate::policy::AllowList;

    fn id(n: u8) -> InstanceId {
        let mut pk = [n; 32];
        pk[31] = 1;
        // Any 32 bytes that decode as a point; try until one does.
        for i in 0..=255u8 {
            pk[0] = i;
            if let Ok(id) = InstanceId::from_ed25519_public_key(&pk) {
                return id;
            }
        }
        panic!("no valid key")
    }

    fn manifest(dataset: Option<&str>) -> JobManifest {
        JobManifest {
            header: Header::new(Timestamp::from_millis(1000), Duration::from_secs(3600)),
            job_id: JobId::from_bytes([1; 16]),
            workflow_id: WorkflowId::from_bytes([2; 16]),
            owner: id(1),
            runner: id(2),
            job_name: "stats".into(),
            attempt: 0,
            dataset: dataset.map(|d| DatasetRef { name: d.into(), item: None }),
            work: Work::Container(ContainerWork {
                image: ImageDigest(Sha256Digest::of(b"img")),
                command: vec![],
                env: vec![],
            }),
            limits: ResourceLimits::default(),
            timeout_secs: 60,
            inputs: vec![],
            workflow_name: "federated-statistics".into(),
        }
    }

    fn policy(execution: Execution) -> Policy {
        Policy {
            allowed_workflows: AllowList::only(["federated-statistics"]),
            allowed_datasets: AllowList::only(["lung-ct"]),
            execution,
            share_logs: false,
        }
    }

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn states(cmds: &[RunnerCommand]) -> Vec<JobState> {
        cmds.iter()
            .filter_map(|c| match c {
                RunnerCommand::SendUpdate(u) => Some(u.state),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dag_job_is_allowed_by_its_dag_id_and_a_failure_detail_joins_the_reason() {
        let dag = |dag_id: &str| {
            let mut m = manifest(None);
            m.work = Work::AirflowDag(kaapana_protocol::DagRun {
                dag_id: dag_id.into(),
                conf: "{}".into(),
            });
            m.workflow_name = "owner-chose-this".into();
            m
        };
        let mut p = policy(Execution::Automatic);
        let (job, _) = RunnerJob::receive(&dag("nnunet-predict"), "site-a", &p, t(1));
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(
            job.reason.as_deref(),
            Some("Airflow DAG nnunet-predict is not allowed for instance site-a")
        );
        p.allowed_workflows = AllowList::only(["nnunet-predict"]);
        let (mut job, cmds) = RunnerJob::receive(&dag("nnunet-predict"), "site-a", &p, t(1));
        assert_eq!(job.state, JobState::Scheduled);
        assert!(cmds.contains(&RunnerCommand::Execute));
        job.handle(RunnerEvent::Started, t(2)).unwrap();
        let detail = Some("task process failed: RuntimeError: no series".to_owned());
        job.handle(RunnerEvent::Exited { exit: ExitStatus::Exited(1), detail }, t(3)).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(
            job.reason.as_deref(),
            Some("the job exited with status 1: task process failed: RuntimeError: no series")
        );
    }

    #[test]
    fn automatic_execution_runs_through_kaapanas_states() {
        let (mut job, cmds) = RunnerJob::receive(
            &manifest(Some("lung-ct")),
            "site-a",
            &policy(Execution::Automatic),
            t(1),
        );
        assert_eq!(cmds[0], RunnerCommand::Persist);
        assert_eq!(
            states(&cmds),
            vec![JobState::Pending { awaiting_approval: false }, JobState::Scheduled]
        );
        assert_eq!(cmds.last(), Some(&RunnerCommand::Execute));
        let cmds = job.handle(RunnerEvent::Started, t(2)).unwrap();
        assert_eq!(states(&cmds), vec![JobState::Running]);
        let cmds = job
            .handle(RunnerEvent::Exited { exit: ExitStatus::Exited(0), detail: None }, t(3))
            .unwrap();
        assert_eq!(states(&cmds), vec![JobState::Finished]);
        assert_eq!(cmds.last(), Some(&RunnerCommand::SendResult { exit: ExitStatus::Exited(0) }));
        assert_eq!(job.sequence, 4);
        // Nothing moves a finished job.
        assert!(job.handle(RunnerEvent::Started, t(4)).is_err());
        assert!(job.handle(RunnerEvent::Aborted { by: "site-a".into() }, t(4)).is_err());
    }

    #[test]
    fn approval_waits_in_pending_and_can_be_rejected() {
        let (mut job, cmds) =
            RunnerJob::receive(&manifest(None), "site-a", &policy(Execution::Approval), t(1));
        assert_eq!(states(&cmds), vec![JobState::Pending { awaiting_approval: true }]);
        assert!(!cmds.contains(&RunnerCommand::Execute));
        assert!(job.handle(RunnerEvent::Started, t(2)).is_err(), "not approved yet");
        let mut other = job.clone();
        let cmds = job.handle(RunnerEvent::Approved, t(2)).unwrap();
        assert_eq!(states(&cmds), vec![JobState::Scheduled]);
        assert_eq!(cmds.last(), Some(&RunnerCommand::Execute));
        let cmds =
            other.handle(RunnerEvent::Rejected { reason: "not today".into() }, t(2)).unwrap();
        assert_eq!(states(&cmds), vec![JobState::Failed]);
        assert_eq!(other.reason.as_deref(), Some("rejected at this site: not today"));
    }

    #[test]
    fn a_denied_job_fails_with_the_exact_rule() {
        let (job, cmds) = RunnerJob::receive(
            &manifest(Some("brain-mri")),
            "site-a",
            &policy(Execution::Automatic),
            t(1),
        );
        assert_eq!(states(&cmds), vec![JobState::Failed]);
        assert!(!cmds.contains(&RunnerCommand::Execute));
        assert_eq!(
            job.reason.as_deref(),
            Some("dataset brain-mri is not allowed for instance site-a")
        );
        let mut m = manifest(None);
        m.workflow_name = "mining".into();
        let (job, _) = RunnerJob::receive(&m, "site-a", &policy(Execution::Automatic), t(1));
        assert_eq!(
            job.reason.as_deref(),
            Some("workflow mining is not allowed for instance site-a")
        );
    }

    #[test]
    fn failures_say_why() {
        for (exit, reason) in [
            (ExitStatus::Exited(3), "the job exited with status 3"),
            (ExitStatus::TimedOut, "killed after its timeout of 60 s"),
            (ExitStatus::OutOfMemory, "out of memory: killed at its memory limit"),
            (ExitStatus::Killed(9), "killed by signal 9"),
        ] {
            let (mut job, _) =
                RunnerJob::receive(&manifest(None), "site-a", &policy(Execution::Automatic), t(1));
            job.handle(RunnerEvent::Started, t(2)).unwrap();
            let cmds = job.handle(RunnerEvent::Exited { exit, detail: None }, t(3)).unwrap();
            assert_eq!(states(&cmds), vec![JobState::Failed]);
            assert_eq!(job.reason.as_deref(), Some(reason));
            assert!(cmds.contains(&RunnerCommand::SendResult { exit }));
        }
    }

    #[test]
    fn abort_kills_a_running_job_and_says_who() {
        let (mut job, _) =
            RunnerJob::receive(&manifest(None), "site-a", &policy(Execution::Automatic), t(1));
        job.handle(RunnerEvent::Started, t(2)).unwrap();
        let cmds = job.handle(RunnerEvent::Aborted { by: "site-a".into() }, t(3)).unwrap();
        assert_eq!(cmds[0], RunnerCommand::Persist);
        assert_eq!(cmds[1], RunnerCommand::Kill);
        assert_eq!(states(&cmds), vec![JobState::Failed]);
        assert_eq!(job.reason.as_deref(), Some("aborted by site-a"));
    }
}
