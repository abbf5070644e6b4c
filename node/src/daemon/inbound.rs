//! Inbound `/kaapana/fed/1` requests: verify every message, record the accepted ones durably,
//! and only then answer.
//!
//! Checks, in order, before anything else looks at a payload: size (by the codec and
//! `Signed::from_bytes`), the signer (the connected peer or a registered instance), domain,
//! signature, version, validity and time (`Signed::verify`), then the replay window. Accepted
//! messages are recorded (their ids, the inbox, or the peer's capability ad) in one group
//! commit; the answer follows the fsync.

use std::sync::Arc;

use kaapana_protocol::{
    AnySigned, AnyVerified, Delivery, FedResponse, InstanceId, MAX_BATCH, MAX_FED_REQUEST,
    RejectReason,
};

use super::{NodeState, kind_label, lock, now};
use crate::net::FedFrame;
use crate::store::{InboxRecord, WriteOp};

/// Handles one request from `peer`.
pub(super) async fn handle(
    state: &Arc<NodeState>,
    peer: InstanceId,
    frame: FedFrame,
) -> FedResponse {
    let messages = match frame {
        FedFrame::Batch(req) if req.messages.len() <= MAX_BATCH => req.messages,
        FedFrame::Batch(req) => {
            return refuse(
                state,
                &peer,
                RejectReason::Oversized,
                format!("{} messages in one request; at most {MAX_BATCH}", req.messages.len()),
            );
        }
        FedFrame::Oversized { len } => {
            return refuse(
                state,
                &peer,
                RejectReason::Oversized,
                format!("request of {len} bytes exceeds the limit of {MAX_FED_REQUEST} bytes"),
            );
        }
        FedFrame::Malformed { detail } => {
            let detail = format!("request is not a postcard FedRequest: {detail}");
            return refuse(state, &peer, RejectReason::Malformed, detail);
        }
        // The codec never produces raw frames on the receiving side.
        FedFrame::Raw(_) => {
            return refuse(state, &peer, RejectReason::Malformed, "unreadable request".into());
        }
    };

    // Signature checks are CPU work: keep them off the async worker threads.
    let s = Arc::clone(state);
    let checked = tokio::task::spawn_blocking(move || verify_all(&s, peer, &messages)).await;
    let mut verdicts = match checked {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "verification task failed");
            return refuse(state, &peer, RejectReason::Internal, "verification failed".into());
        }
    };

    // Record everything accepted in one durable write, then answer.
    let received_at = now();
    let mut seen = Vec::new();
    let mut inbox = Vec::new();
    let mut ops = Vec::new();
    for v in &verdicts {
        if let Verdict::Accepted(m) = v {
            seen.push((m.id(), m.expires_at()));
            match m.as_ref() {
                AnyVerified::CapabilityAd(ad) => ops.push(WriteOp::PutPeerCapabilities {
                    peer: ad.signer(),
                    envelope: ad.signed().as_bytes().to_vec(),
                }),
                other => inbox.push(InboxRecord {
                    from: other.signer(),
                    received_at,
                    envelope: other.as_bytes().to_vec(),
                }),
            }
        }
    }
    if !seen.is_empty() {
        let ids: Vec<_> = seen.iter().map(|(id, _)| *id).collect();
        ops.insert(0, WriteOp::RecordSeen(seen));
        if !inbox.is_empty() {
            ops.push(WriteOp::AppendInbox(inbox));
        }
        if let Err(e) = state.store.write_async(ops).await {
            tracing::error!(error = %e, "cannot record accepted messages");
            let mut window = lock(&state.replay);
            for id in ids {
                window.forget(&id);
            }
            drop(window);
            for v in &mut verdicts {
                if matches!(v, Verdict::Accepted(_)) {
                    *v = Verdict::Rejected(RejectReason::Internal, format!("not recorded: {e}"));
                }
            }
        }
    }

    let results = verdicts.into_iter().map(|v| apply(state, &peer, v)).collect();
    FedResponse::Results(results)
}

enum Verdict {
    Accepted(Box<AnyVerified>),
    Rejected(RejectReason, String),
}

/// Verifies each message in order. After a transient failure the rest are not processed, so
/// that the sender's retry keeps the order.
fn verify_all(state: &NodeState, peer: InstanceId, messages: &[Vec<u8>]) -> Vec<Verdict> {
    let now = now();
    let mut out = Vec::with_capacity(messages.len());
    let mut stop = false;
    for bytes in messages {
        if stop {
            out.push(Verdict::Rejected(
                RejectReason::Overloaded,
                "not processed: an earlier message of this request failed transiently".into(),
            ));
            continue;
        }
        let verdict = verify_one(state, peer, bytes, now);
        if let Verdict::Rejected(reason, _) = &verdict {
            stop = reason.is_transient();
        }
        out.push(verdict);
    }
    out
}

fn verify_one(
    state: &NodeState,
    peer: InstanceId,
    bytes: &[u8],
    now: kaapana_protocol::Timestamp,
) -> Verdict {
    let reject = |e: &dyn std::fmt::Display, r: RejectReason| Verdict::Rejected(r, e.to_string());
    let signed = match AnySigned::from_bytes(bytes) {
        Ok(s) => s,
        Err(e) => return reject(&e, RejectReason::from(&e)),
    };
    let signer = signed.claimed_signer();
    if signer != peer && !state.registry().is_registered(&signer) {
        return Verdict::Rejected(
            RejectReason::UnknownSigner,
            format!("signed by {signer}, which is neither the sender nor a registered instance"),
        );
    }
    let verified = match signed.verify(now, &state.verify_options) {
        Ok(v) => v,
        Err(e) => return reject(&e, RejectReason::from(&e)),
    };
    if let Err(e) = lock(&state.replay).insert(verified.id(), verified.expires_at(), now) {
        return reject(&e, RejectReason::from(&e));
    }
    Verdict::Accepted(Box::new(verified))
}

/// Counts, logs and applies one verdict; returns what the sender is told.
fn apply(state: &Arc<NodeState>, peer: &InstanceId, v: Verdict) -> Delivery {
    match v {
        Verdict::Accepted(m) => {
            let kind = m.kind();
            state.metrics.messages_in.get_or_create(&kind_label(kind.name())).inc();
            if let AnyVerified::CapabilityAd(ad) = *m {
                let signer = ad.signer();
                let ad = ad.into_payload();
                let detail = format!("sequence {}", ad.sequence);
                state.peer_mut(&signer, |p| {
                    if p.capabilities.as_ref().is_none_or(|old| old.sequence < ad.sequence) {
                        p.capabilities = Some(ad);
                    }
                });
                state.event("capabilities_received", Some(&signer), detail);
            } else {
                state.event("message_accepted", Some(peer), format!("{kind} {}", m.id()));
            }
            Delivery::Accepted
        }
        Verdict::Rejected(reason, detail) => {
            state.metrics.reject(reason);
            tracing::warn!(peer = %peer, reason = reason.label(), %detail, "message rejected");
            state.event("message_rejected", Some(peer), format!("{}: {detail}", reason.label()));
            Delivery::Rejected { reason, detail }
        }
    }
}

fn refuse(
    state: &NodeState,
    peer: &InstanceId,
    reason: RejectReason,
    detail: String,
) -> FedResponse {
    state.metrics.reject(reason);
    tracing::warn!(peer = %peer, reason = reason.label(), %detail, "request refused");
    state.event("request_refused", Some(peer), format!("{}: {detail}", reason.label()));
    FedResponse::Refused { reason, detail }
}
