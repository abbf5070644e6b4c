//! The CI-sized scenario (100 sites under loss, a partition, crashes and executor failures)
//! with invariants on, and the crash model on its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use kaapana_federation::WorkflowState;
use simulations::config::Delivery;
use simulations::engine::SEC;
use simulations::{Scenario, Sim, SimOptions, TraceEvent, run_variant};

fn ci() -> Scenario {
    Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/ci-100.toml")).unwrap()
}

#[test]
fn the_ci_scenario_ends_every_workflow_with_invariants_checked_at_every_step() {
    let sc = ci();
    let v = &sc.variants()[0];
    let mut sim = Sim::new(v, SimOptions { invariants: true, trace: false }).unwrap();
    sim.run().unwrap();
    assert!(!sim.timed_out());
    let outcomes = sim.outcomes();
    assert_eq!(outcomes.len(), 11);
    for o in &outcomes {
        match o.state {
            Some(WorkflowState::Finished) => {}
            Some(_) => assert!(o.reason.as_deref().is_some_and(|r| !r.is_empty()), "{o:?}"),
            None => panic!("a workflow did not end: {o:?}"),
        }
    }
    let c = sim.counters();
    assert!(c.crashes >= 5, "crashes: {}", c.crashes);
    assert!(c.requests_failed > 0 && c.envelopes_resent > 0);
    assert!(outcomes.iter().map(|o| o.retries).sum::<u64>() > 0, "some jobs were retried");
    assert!(outcomes.iter().filter(|o| o.state == Some(WorkflowState::Finished)).count() >= 9);
    // A job runs at most once per dispatch; some never start (simulated pull failures, or
    // cancelled first).
    assert!(c.executions <= c.dispatches && c.executions + 30 >= c.dispatches);
}

#[test]
fn the_ci_scenario_also_ends_under_polling() {
    let mut sc = ci();
    sc.delivery = Delivery::Poll;
    let (row, _) =
        run_variant(&sc.variants()[0], SimOptions { invariants: true, trace: false }).unwrap();
    assert_eq!(row.unfinished, 0);
    assert_eq!(row.finished + row.failed + row.cancelled, 11);
    assert!(row.delivery_mean_s > 2.0, "polling delays job manifests: {}", row.delivery_mean_s);
}

/// Four sites; site 2 crashes 20 s into its 60 s job and is down for 30 s.
const CRASH: &str = r#"
name = "crash"
sites = 4
[network]
loss = 0.0
[[workflow]]
kind = "statistics"
at_s = 1.0
site_job_s = 60.0
max_retries = 1
"#;

fn crash_run(survive: bool) -> Sim {
    let mut sc = Scenario::parse(CRASH, "inline").unwrap();
    sc.site.containers_survive_crash = survive;
    let v = &sc.variants()[0];
    let mut sim = Sim::new(v, SimOptions { invariants: true, trace: true }).unwrap();
    sim.run_until(20 * SEC).unwrap();
    sim.crash_site(2);
    sim.run_until(50 * SEC).unwrap();
    assert!(!sim.physically_up(0, 2));
    sim.restart_site(2);
    sim.run().unwrap();
    sim
}

#[test]
fn a_crash_loses_the_container_and_the_job_is_retried_at_its_site() {
    let sim = crash_run(false);
    let wf = sim.workflow(0).unwrap();
    assert_eq!(wf.state, WorkflowState::Finished);
    let job = wf.jobs.iter().find(|j| sim.site_of(&j.runner) == Some(2)).unwrap();
    assert_eq!(job.attempt, 1, "failed after the restart (container gone), retried");
    assert_eq!(sim.site_of(&job.runner), Some(2), "bound to its data: retried at the same site");
    let starts_at_2 =
        sim.trace().iter().filter(|e| matches!(e, TraceEvent::Started { site: 2, .. })).count();
    assert_eq!(starts_at_2, 2);
}

#[test]
fn a_daemon_crash_that_keeps_the_container_reattaches_without_a_retry() {
    let sim = crash_run(true);
    let wf = sim.workflow(0).unwrap();
    assert_eq!(wf.state, WorkflowState::Finished);
    assert!(wf.jobs.iter().all(|j| j.attempt == 0));
    // Its outbox survived the crash: every update reached the owner.
    assert_eq!(sim.outbox_len(2, 0), 0);
    let ended = sim.outcomes()[0].ended_at.unwrap();
    assert!(ended < 75 * SEC, "the re-attached job ended on time: {ended}");
}
