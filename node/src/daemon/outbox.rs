//! Store-and-forward: one worker per registered instance delivers its outbox in order.
//!
//! Messages wait in the store until the peer acknowledges them. A worker sends the oldest
//! entries as one request, removes what the peer accepted (or already had, or refused for
//! good), and keeps the rest; after a failure it waits with exponential backoff, or until the
//! peer reconnects. Because the receiver records message ids durably before it answers, a
//! message sent twice (an answer lost in a crash) is recognised there and applied once.

use std::sync::Arc;
use std::time::Duration;

use kaapana_protocol::{
    Delivery, FedRequest, FedResponse, InstanceId, ManifestKind, RejectReason, peek_kind,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use super::{EventKind, NodeState, kind_label, lock};
use crate::net::FedFrame;
use crate::store::WriteOp;

/// Entries per request at most.
const BATCH: usize = kaapana_protocol::MAX_BATCH;
/// Bytes per request at most (beyond the first entry).
const BATCH_BYTES: usize = 3 * 1024 * 1024;
/// The longest wait before a retry.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts a worker for every instance id it is sent, until cancelled.
pub(super) async fn supervise(
    state: Arc<NodeState>,
    mut spawn: mpsc::UnboundedReceiver<InstanceId>,
) {
    let mut workers = JoinSet::new();
    let mut running = std::collections::HashSet::new();
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => break,
            Some(id) = spawn.recv() => {
                if running.insert(id) {
                    let notify = lock(&state.outbox_wakers)
                        .entry(id)
                        .or_insert_with(|| Arc::new(Notify::new()))
                        .clone();
                    workers.spawn(deliver(Arc::clone(&state), id, notify));
                }
            }
            Some(done) = workers.join_next(), if !workers.is_empty() => {
                if let Ok(id) = done {
                    running.remove(&id);
                }
            }
        }
    }
    workers.shutdown().await;
}

/// Delivers `peer`'s outbox until the peer is unregistered or the node stops.
///
/// `cursor` is the last entry the peer settled: the next request starts after it while the
/// removal of the settled entries is still being committed, so that the store's fsync and the
/// next round trip overlap. Entries whose removal failed are sent again after a restart and
/// answered `Replayed`.
async fn deliver(state: Arc<NodeState>, peer: InstanceId, notify: Arc<Notify>) -> InstanceId {
    let mut failures: u32 = 0;
    let mut cursor = 0u64;
    let mut acks: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if state.cancel.is_cancelled() || !state.registry().is_registered(&peer) {
            break;
        }
        let batch = if state.is_connected(&peer) {
            match state.store.outbox_peek(&peer, cursor, BATCH, BATCH_BYTES) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if batch.is_empty() {
            failures = 0;
            tokio::select! {
                () = state.cancel.cancelled() => break,
                () = notify.notified() => continue,
            }
        }
        let (seqs, messages): (Vec<u64>, Vec<Vec<u8>>) = batch.into_iter().unzip();
        let kinds: Vec<&'static str> =
            messages.iter().map(|m| peek_kind(m).map_or("unknown", |k| k.name())).collect();
        // Job manifests the peer refuses for good fail their job at this owner: keep them.
        let jobs: Vec<Option<Vec<u8>>> = messages
            .iter()
            .zip(&kinds)
            .map(|(m, k)| (*k == ManifestKind::JobManifest.name()).then(|| m.clone()))
            .collect();
        let frame = FedFrame::Batch(FedRequest { messages });
        let (settled, retry) = match state.net.request(peer.peer_id(), frame).await {
            Ok(FedResponse::Results(results)) => {
                for (job, result) in jobs.into_iter().zip(&results) {
                    if let (Some(envelope), Delivery::Rejected { reason, detail }) = (job, result)
                        && !reason.is_transient()
                        && *reason != RejectReason::Replayed
                    {
                        let why = format!("{}: {detail}", reason.label());
                        let s = Arc::clone(&state);
                        tokio::spawn(async move {
                            s.manifest_refused(peer, &envelope, why).await;
                        });
                    }
                }
                settle(&state, &peer, &seqs, &kinds, &results)
            }
            Ok(FedResponse::Refused { reason, detail }) => {
                tracing::warn!(peer = %peer, reason = reason.label(), %detail, "outbox request refused");
                (Vec::new(), true)
            }
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "outbox delivery failed");
                (Vec::new(), true)
            }
        };
        if let Some(&last) = settled.last() {
            cursor = last;
            // One removal at a time: wait for the previous one before starting the next.
            if let Some(previous) = acks.take() {
                let _ = previous.await;
            }
            let s = Arc::clone(&state);
            acks = Some(tokio::spawn(async move { remove_settled(&s, peer, settled).await }));
        }
        if retry {
            failures = failures.saturating_add(1);
            let backoff =
                Duration::from_millis(100u64.saturating_mul(1 << failures.min(9))).min(MAX_BACKOFF);
            tokio::select! {
                () = state.cancel.cancelled() => break,
                () = notify.notified() => {}
                () = tokio::time::sleep(backoff) => {}
            }
        } else {
            failures = 0;
        }
    }
    if let Some(previous) = acks.take() {
        let _ = previous.await;
    }
    peer
}

/// The entries the peer settled, in order, and whether something must be retried.
///
/// Entries are settled in order up to the first transient refusal: accepted, already received
/// (`Replayed`) and permanently refused ones leave the outbox; the transient one and everything
/// after it stay, so the order holds on the retry.
fn settle(
    state: &NodeState,
    peer: &InstanceId,
    seqs: &[u64],
    kinds: &[&'static str],
    results: &[Delivery],
) -> (Vec<u64>, bool) {
    let mut done = Vec::new();
    let mut retry = results.len() < seqs.len();
    for ((seq, kind), result) in seqs.iter().zip(kinds).zip(results) {
        match result {
            Delivery::Accepted | Delivery::Rejected { reason: RejectReason::Replayed, .. } => {
                state.metrics.messages_out.get_or_create(&kind_label(kind)).inc();
                state.metrics.peer_message(&state.name_of(peer), crate::metrics::Direction::Out);
                done.push(*seq);
            }
            Delivery::Rejected { reason, detail } if reason.is_transient() => {
                tracing::debug!(peer = %peer, reason = reason.label(), %detail, "delivery deferred");
                retry = true;
                break;
            }
            Delivery::Rejected { reason, detail } => {
                tracing::warn!(peer = %peer, reason = reason.label(), %detail, "peer refused a message; dropping it");
                state.metrics.peer_rejection(&state.name_of(peer), crate::metrics::Direction::Out);
                state.event(
                    EventKind::DeliveryRejected,
                    Some(peer),
                    format!("{kind}: {}: {detail}", reason.label()),
                );
                done.push(*seq);
            }
        }
    }
    (done, retry)
}

/// Removes settled entries from the outbox.
async fn remove_settled(state: &NodeState, peer: InstanceId, seqs: Vec<u64>) {
    let n = seqs.len();
    match state.store.write_async(vec![WriteOp::AckOutbox { peer, seqs }]).await {
        Ok(_) => {
            state.metrics.outbox_depth.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
            state.event(EventKind::Delivered, Some(&peer), format!("{n} message(s)"));
        }
        // The peer has them; after a restart it answers `Replayed` to the resend.
        Err(e) => tracing::error!(error = %e, "cannot remove delivered messages from the outbox"),
    }
}
