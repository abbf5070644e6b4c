//! Partition semantics: nothing crosses a cut, the peers notice it after the ping timeout,
//! reconnect after it heals, and deliver what waited, in order, exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use kaapana_federation::WorkflowState;
use simulations::engine::{Micros, SEC};
use simulations::{Scenario, Sim, SimError, SimOptions, TraceEvent};

fn sim(text: &str) -> Sim {
    let sc = Scenario::parse(text, "inline").unwrap();
    let v = &sc.variants()[0];
    Sim::new(v, SimOptions { invariants: true, trace: true }).unwrap()
}

const START: Micros = 5 * SEC;
const HEAL: Micros = 405 * SEC;

/// 12 sites, site 0 owns a statistics workflow; a quarter of the others are cut off from 5 s
/// to 405 s, while their jobs run.
const CUT: &str = r#"
name = "cut"
sites = 12
seed = 9
[network]
loss = 0.0
[[workflow]]
kind = "statistics"
at_s = 1.0
site_job_s = 20.0
[[partition]]
fraction = 0.25
start_s = 5.0
duration_s = 400.0
"#;

#[test]
fn nothing_crosses_a_cut_and_everything_waiting_crosses_after_the_heal() {
    let mut s = sim(CUT);
    s.run().unwrap();
    let cut: BTreeSet<u32> = s.partition_members(0).iter().copied().collect();
    assert_eq!(cut.len(), 3);
    assert!(!cut.contains(&0), "owners are not cut off unless asked");
    let across = |a: u32, b: u32| cut.contains(&a) != cut.contains(&b);

    // No message is accepted across the cut while it lasts; after the heal, the updates that
    // waited in the cut sites' outboxes arrive (their jobs finished during the partition).
    let mut late = BTreeSet::new();
    for e in s.trace() {
        if let TraceEvent::Accepted { at, from, to, .. } = *e
            && across(from, to)
        {
            assert!(
                !(START..HEAL).contains(&at),
                "message {from} -> {to} at {at} µs crossed the cut"
            );
            if at >= HEAL {
                late.insert(from);
            }
        }
    }
    assert_eq!(late, cut, "every cut site delivered its updates after the heal");

    // The owner notices each cut site after the ping timeout (20-25 s), and reconnects after
    // the heal within one redial period (30 s) plus the handshake.
    for &site in &cut {
        let links: Vec<(Micros, bool)> = s
            .trace()
            .iter()
            .filter_map(|e| match *e {
                TraceEvent::Link { at, a, b, connected }
                    if (a, b) == (site, 0) || (a, b) == (0, site) =>
                {
                    Some((at, connected))
                }
                _ => None,
            })
            .collect();
        assert_eq!(links.len(), 2, "site {site}: {links:?}");
        let (down, up) = (links[0], links[1]);
        assert!(!down.1 && up.1);
        assert!((START + 20 * SEC..=START + 25 * SEC).contains(&down.0), "noticed at {}", down.0);
        assert!((HEAL..=HEAL + 32 * SEC).contains(&up.0), "reconnected at {}", up.0);
        assert!(s.connected(0, site));
    }

    // Every message was delivered exactly once and in order (checked as invariants), and
    // nothing is left in any outbox.
    for site in 0..12 {
        assert_eq!(s.outbox_len(site, 0), 0);
        assert_eq!(s.outbox_len(0, site), 0);
    }
    let outcome = &s.outcomes()[0];
    assert_eq!(outcome.state, Some(WorkflowState::Finished));
    assert!(outcome.ended_at.unwrap() > HEAL);
    assert!(s.counters().requests_failed > 0, "requests sent before the cut was noticed failed");
}

#[test]
fn a_cut_shorter_than_the_ping_timeout_goes_unnoticed_but_still_delays() {
    let text = CUT.replace("duration_s = 400.0", "duration_s = 10.0");
    let mut s = sim(&text);
    s.run().unwrap();
    assert!(
        !s.trace().iter().any(|e| matches!(e, TraceEvent::Link { connected: false, .. })),
        "a 10 s cut is healed before the 20 s ping timeout"
    );
    assert_eq!(s.outcomes()[0].state, Some(WorkflowState::Finished));
}

#[test]
fn larger_fractions_cut_off_a_superset_of_the_sites() {
    let cut_at = |f: f64| -> BTreeSet<u32> {
        let text = CUT
            .replace("sites = 12", "sites = 200")
            .replace("fraction = 0.25", &format!("fraction = {f}"));
        sim(&text).partition_members(0).iter().copied().collect()
    };
    let (small, large) = (cut_at(0.05), cut_at(0.3));
    assert_eq!((small.len(), large.len()), (10, 60));
    assert!(small.is_subset(&large));
}

#[test]
fn a_job_on_a_runner_lost_for_longer_than_the_grace_period_moves_and_the_old_one_is_cancelled() {
    // Six sites in one cohort; the best (most CPU) runs the training. Cut four of the five
    // non-owner sites, the best among them, for 1,000 s: the owner declares the runner lost
    // after 300 s and moves the job to the best site it can still reach.
    let text = r#"
        name = "lost"
        sites = 6
        seed = 2
        [site]
        cohorts = 1
        [[workflow]]
        kind = "best"
        at_s = 1.0
        dataset = "cohort-{i}"
        max_retries = 2
        site_job_s = 100.0
        [[partition]]
        fraction = 0.7
        start_s = 10.0
        duration_s = 1000.0
    "#;
    let mut s = sim(text);
    s.run().unwrap();
    let cut: BTreeSet<u32> = s.partition_members(0).iter().copied().collect();
    assert_eq!(cut.len(), 4);
    let wf = s.workflow(0).unwrap();
    assert_eq!(wf.state, WorkflowState::Finished);
    let train = &wf.jobs[0];
    assert_eq!(train.attempt, 1, "moved once");
    let first = train.previous[0];
    let first_runner = s
        .trace()
        .iter()
        .find_map(|e| match *e {
            TraceEvent::Started { site, job, .. } if job == first => Some(site),
            _ => None,
        })
        .unwrap();
    assert!(cut.contains(&first_runner), "the best site {first_runner} was cut off");
    let runner = s.site_of(&train.runner).unwrap();
    assert!(!cut.contains(&runner), "moved to a reachable site, not {runner}");
    // It moved after the grace period (noticed at ~30 s, lost 300 s later) and before the heal.
    let ended = s.outcomes()[0].ended_at.unwrap();
    assert!(ended > 330 * SEC && ended < 1010 * SEC, "ended at {ended}");
    assert!(s.counters().runner_lost_events >= 1);
    // The old attempt's runner gets its Cancel after the heal (the run waits for delivery).
    let cancels = s
        .trace()
        .iter()
        .filter(|e| matches!(e, TraceEvent::Accepted { kind: simulations::sim::MsgKind::Cancel, at, .. } if *at >= 1010 * SEC))
        .count();
    assert_eq!(cancels, 1);
}

#[test]
fn a_statistics_workflow_waits_for_a_runner_that_never_comes_back_and_the_run_says_so() {
    // Jobs of a `Pick::All` step are bound to their runner's data: the core does not move them
    // when the runner is lost; it gives them up only after `runner_give_up_after_s` (a day by
    // default), long after this run's 3,000 s. The run must fail loudly.
    let text = r#"
        name = "forever"
        sites = 5
        max_time_s = 3000.0
        [[workflow]]
        kind = "statistics"
        at_s = 1.0
        [[partition]]
        fraction = 0.25
        start_s = 2.0
        duration_s = 1000000.0
    "#;
    let sc = Scenario::parse(text, "inline").unwrap();
    let err = simulations::run_variant(&sc.variants()[0], SimOptions::default()).unwrap_err();
    assert!(matches!(err, SimError::Unfinished { count: 1, .. }), "{err}");
    assert!(err.to_string().contains("did not end"), "{err}");
}

#[test]
fn a_runner_out_of_reach_longer_than_the_give_up_period_fails_its_bound_jobs_and_the_workflow_ends()
{
    // The same workflow with a give-up period of 1,000 s: the cut site's job fails with the
    // core's reason and the workflow ends, 1,000 s after the owner noticed the cut.
    let text = r#"
        name = "give-up"
        sites = 5
        max_time_s = 3000.0
        [node]
        runner_give_up_after_s = 1000.0
        [[workflow]]
        kind = "statistics"
        at_s = 1.0
        [[partition]]
        fraction = 0.25
        start_s = 2.0
        duration_s = 1000000.0
    "#;
    let mut s = sim(text);
    s.run().unwrap();
    let outcome = &s.outcomes()[0];
    assert_eq!(outcome.state, Some(WorkflowState::Failed), "{outcome:?}");
    let reason = outcome.reason.as_deref().unwrap();
    assert!(reason.contains("out of reach for more than 1000 s"), "{reason}");
    // Noticed 20-25 s after the cut at 2 s, given up 1,000 s later, to the millisecond.
    let ended = outcome.ended_at.unwrap();
    assert!((1022 * SEC..=1027 * SEC).contains(&ended), "ended at {ended}");
    assert!(s.counters().runner_lost_events >= 1, "the give-up changed the workflow");
}
