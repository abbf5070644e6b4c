//! The invariant checker fails a run loudly on the first violation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kaapana_federation::WorkflowState;
use kaapana_protocol::JobId;
use simulations::Invariants;

#[test]
fn a_job_started_twice_is_a_violation() {
    let mut inv = Invariants::new(true);
    let job = JobId::from_bytes([1; 16]);
    inv.started_once(10, 3, job, 0, 2);
    assert!(inv.take_violation().is_none());
    inv.started_once(20, 4, job, 0, 2);
    let v = inv.take_violation().unwrap();
    assert_eq!(v.at, 20);
    assert!(v.what.contains("started a second time"), "{v}");
    // An attempt beyond the retries is one too.
    inv.started_once(30, 4, JobId::from_bytes([2; 16]), 3, 2);
    assert!(inv.take_violation().unwrap().what.contains("beyond its 2 retries"));
}

#[test]
fn the_other_properties_are_checked_and_the_first_violation_wins() {
    let mut inv = Invariants::new(true);
    inv.inputs_done(1, "aggregate", Some("stats-3 is Running".into()));
    inv.acknowledged_is_durable(2, 1, 0, 7, false);
    let v = inv.take_violation().unwrap();
    assert!(v.what.contains("before its inputs finished: stats-3 is Running"), "{v}");
    inv.acknowledged_is_durable(3, 1, 0, 7, false);
    assert!(
        inv.take_violation().unwrap().what.contains("acknowledged but site 0 has not recorded")
    );
    inv.in_order(4, 1, 0, Some(9), 8);
    assert!(inv.take_violation().unwrap().what.contains("after message 9"));
    inv.ended_with_reason(5, WorkflowState::Failed, None);
    assert!(inv.take_violation().unwrap().what.contains("without a reason"));
    inv.ended_with_reason(6, WorkflowState::Failed, Some("job x failed"));
    inv.ended_with_reason(6, WorkflowState::Finished, None);
    inv.time_moves_forward(7, 6);
    assert!(inv.take_violation().unwrap().what.contains("ran after"));
    assert!(inv.take_violation().is_none());
    assert!(inv.checks() >= 8);
}

#[test]
fn disabled_checks_see_nothing() {
    let mut inv = Invariants::new(false);
    inv.started_once(1, 1, JobId::from_bytes([1; 16]), 0, 0);
    inv.started_once(2, 1, JobId::from_bytes([1; 16]), 0, 0);
    inv.time_moves_forward(5, 1);
    assert!(inv.take_violation().is_none());
    assert_eq!(inv.checks(), 0);
}
