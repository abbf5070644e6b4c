//! Trainings (workflows with rounds) on the simulated federation: a small training with
//! stragglers and a partition runs to its last round deterministically with every invariant
//! checked, round deadlines fire at their virtual time (also after the owner restarted), and a
//! quorum the reachable sites cannot make fails the training with the core's reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kaapana_federation::WorkflowState;
use simulations::config::{Late, Quorum, WorkflowKind};
use simulations::engine::SEC;
use simulations::report::{rounds_csv, rows_csv, summarize, trainings_csv};
use simulations::{Scenario, Sim, SimOptions};

/// 30 sites, site 0 trains 10 rounds; 10 % stragglers (150-220 s) miss every 120 s deadline; 3
/// sites are cut off from 300 s to 900 s.
const SMALL: &str = r#"
name = "training-ci"
sites = 30
seed = 5
max_time_s = 86400.0
[[workflow]]
kind = "training"
owners = [0]
at_s = 5.0
rounds = 10
min_sites = 0.8
round_deadline_s = 120.0
late = "drop"
straggler_fraction = 0.1
straggler_job_s = { uniform = [150.0, 220.0] }
site_job_s = { uniform = [30.0, 60.0] }
[[partition]]
fraction = 0.1
start_s = 300.0
duration_s = 600.0
"#;

fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, "inline").unwrap()
}

fn run(sc: &Scenario) -> Sim {
    let v = &sc.variants()[0];
    let mut sim = Sim::new(v, SimOptions { invariants: true, trace: false }).unwrap();
    sim.run().unwrap();
    sim
}

fn csv(sc: &Scenario, sim: &Sim) -> String {
    let row = summarize(&sc.variants()[0], sim);
    let rows = [row];
    format!("{}{}{}", rows_csv(&rows), trainings_csv(&rows), rounds_csv(&rows))
}

#[test]
fn a_training_with_stragglers_and_a_partition_completes_every_round_deterministically() {
    for late in [Late::Drop, Late::Fold] {
        let mut sc = scenario(SMALL);
        sc.workflow[0].late = late;
        let sim = run(&sc);
        assert!(!sim.timed_out());
        let outcome = &sim.outcomes()[0];
        assert_eq!(outcome.kind, WorkflowKind::Training);
        assert_eq!(outcome.state, Some(WorkflowState::Finished), "{outcome:?}");
        let w = sim.workflow(0).unwrap();
        let t = w.training.as_ref().unwrap();
        assert_eq!((t.completed(), t.history.len()), (10, 10));
        assert_eq!((t.sites.len(), t.rounds.min_sites), (30, 24), "80 % of 30, rounded up");
        let stragglers = 30 - t.history[0].updates.len();
        assert!((1..=6).contains(&stragglers), "{stragglers} stragglers");
        for r in &t.history {
            assert!(r.updates.len() >= 24, "round {}: {} updates", r.round, r.updates.len());
            // Every round has late jobs (stragglers, cut-off sites), so each closed at its
            // deadline, fired by the simulator at that virtual time to the millisecond.
            assert!(!r.late.is_empty(), "round {}", r.round);
            let close = r.closed_at.unwrap().as_millis() - r.opened_at.as_millis();
            assert_eq!(close, 120_000, "round {} closed at its deadline", r.round);
            assert!(r.samples >= r.updates.len() as u64);
        }
        // The cut-off sites missed the rounds that ran during the partition.
        let during = t.history.iter().filter(|r| r.updates.len() < t.history[0].updates.len());
        assert!(during.count() >= 3);
        let folded: usize = t.history.iter().map(|r| r.folded.len()).sum();
        match late {
            Late::Drop => assert_eq!(folded, 0),
            // Stragglers deliver during the round after theirs (120 s + aggregation + 120 s).
            Late::Fold => assert!(folded >= 10, "folded {folded}"),
        }
        // The same seed gives the same bytes.
        let again = run(&sc);
        assert_eq!(csv(&sc, &sim), csv(&sc, &again));
    }
}

#[test]
fn a_round_deadline_armed_before_the_owner_crashed_is_armed_again_at_the_restart() {
    let sc = scenario(SMALL);
    let v = &sc.variants()[0];
    let mut sim = Sim::new(v, SimOptions { invariants: true, trace: false }).unwrap();
    // Round 1 opens at 5 s; its deadline is at 125 s. The owner crashes at 100 s: the timer it
    // armed is gone. It restarts at the first event after 150 s, and its core arms the timer
    // again when it is fed `Started`: at once, as the deadline has passed.
    sim.run_until(100 * SEC).unwrap();
    sim.crash_site(0);
    while sim.now() < 150 * SEC {
        assert!(sim.step().unwrap());
    }
    let restarted = sim.now();
    sim.restart_site(0);
    sim.run().unwrap();
    let w = sim.workflow(0).unwrap();
    assert_eq!(w.state, WorkflowState::Finished, "{:?}", w.reason);
    let t = w.training.as_ref().unwrap();
    assert_eq!(t.completed(), 10);
    let first = &t.history[0];
    let closed = first.closed_at.unwrap().as_millis() - simulations::sim::T0_MS;
    assert_eq!(closed * 1000, restarted / 1000 * 1000, "round 1 closed at the restart");
    assert!(first.closed_at.unwrap() > first.deadline);
}

#[test]
fn a_quorum_the_reachable_sites_cannot_make_fails_the_training_with_the_quorum_reason() {
    // 6 of 30 sites are cut off for good at 100 s; 28 updates are needed. The round waits past
    // its deadline for the cut-off sites; once their jobs are given up (600 s after the cut was
    // noticed), the quorum cannot be reached and the training fails.
    let mut sc = scenario(SMALL);
    let w = &mut sc.workflow[0];
    w.min_sites = Quorum::Sites(28);
    w.straggler_fraction = 0.0;
    sc.partition[0].fraction = 0.2;
    sc.partition[0].start_s = 100.0;
    sc.partition[0].duration_s = 1e6;
    sc.node.runner_give_up_after_s = 600.0;
    let sim = run(&sc);
    let outcome = &sim.outcomes()[0];
    assert_eq!(outcome.state, Some(WorkflowState::Failed), "{outcome:?}");
    let reason = outcome.reason.as_deref().unwrap();
    // Round 1 closed before the cut; round 2 had the 24 reachable sites' updates.
    assert!(
        reason.starts_with("round 2 has 24 of the 28 updates it needs (min_sites)"),
        "{reason}"
    );
    assert!(reason.contains("out of reach for more than 600 s"), "{reason}");
    // Cut at 100 s, noticed 20-25 s later, given up 600 s after that.
    let ended = outcome.ended_at.unwrap();
    assert!((720 * SEC..=726 * SEC).contains(&ended), "ended at {ended}");
    let t = sim.workflow(0).unwrap().training.as_ref().unwrap();
    let open = t.current().unwrap();
    assert!(open.closed_at.is_none() && open.model.is_none());
    assert_eq!(t.completed() + 1, t.history.len(), "the rounds before the cut completed");
}

#[test]
fn a_quorum_above_the_matching_sites_is_refused_at_submission() {
    let mut sc = scenario(SMALL);
    sc.workflow[0].min_sites = Quorum::Sites(31);
    let sim = run(&sc);
    let outcome = &sim.outcomes()[0];
    assert_eq!(outcome.state, Some(WorkflowState::Failed));
    let reason = outcome.reason.as_deref().unwrap();
    assert!(reason.starts_with("not planned") && reason.contains("min_sites = 31"), "{reason}");
}

#[test]
fn training_keys_parse_and_bad_values_are_refused() {
    let sc = scenario(&SMALL.replace("min_sites = 0.8", "min_sites = 25"));
    assert_eq!(sc.workflow[0].min_sites, Quorum::Sites(25));
    assert_eq!(scenario(SMALL).workflow[0].min_sites, Quorum::Fraction(0.8));
    assert_eq!(Quorum::Fraction(0.8).resolve(1000), 800);
    assert_eq!(Quorum::Fraction(0.01).resolve(30), 1);
    for (from, to) in [
        ("min_sites = 0.8", "min_sites = 1.5"),
        ("min_sites = 0.8", "min_sites = 0"),
        ("straggler_fraction = 0.1", "straggler_fraction = 2.0"),
        ("round_deadline_s = 120.0", "round_deadline_s = 0.5"),
        ("rounds = 10", "rounds = 0"),
        ("late = \"drop\"", "late = \"later\""),
    ] {
        let text = SMALL.replace(from, to);
        assert!(Scenario::parse(&text, "inline").is_err(), "{to} was accepted");
    }
    let swept = scenario(&format!("{SMALL}\n[sweep]\nlate = [\"drop\", \"fold\"]\n"));
    let labels: Vec<String> = swept.variants().into_iter().map(|v| v.label).collect();
    assert_eq!(labels, ["late=drop", "late=fold"]);
}
