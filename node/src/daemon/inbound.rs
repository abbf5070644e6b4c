//! Inbound `/kaapana/fed/1` requests: verify every message, record the accepted ones durably,
//! and only then answer.
//!
//! Checks, in order, before anything else looks at a payload: size (by the codec and
//! `Signed::from_bytes`), the signer (the connected peer or a registered instance), domain,
//! signature, version, validity and time (`Signed::verify`), then whether a job message is
//! about a job its signer has a part in ([`Site::concerns`]: refused `not_your_job`
//! otherwise), then the replay window (with its per-signer share, `[limits]
//! seen_ids_per_peer`) and the signer's inbox quota (`[limits] inbox_entries_per_peer`,
//! `inbox_bytes_per_peer`: refused `quota_exceeded`, which the sender retries later).
//! Workflow and result manifests do not travel on `/kaapana/fed/1` and are refused
//! (`unsupported_kind`). Refusals of these three kinds are counted per signer, message type
//! and reason (`kaapana_node_peer_refused_total`). Accepted messages are recorded (their ids
//! with their signer, the inbox, or the peer's capability ad) in one group commit; the answer
//! follows the fsync.
//!
//! [`Site::concerns`]: kaapana_federation::Site::concerns

use std::sync::Arc;

use kaapana_protocol::{
    AnySigned, AnyVerified, Delivery, FedResponse, InstanceId, MAX_BATCH, MAX_FED_REQUEST,
    RejectReason,
};

#[cfg(doc)]
use kaapana_federation::Unrelated;
use kaapana_federation::{Event, Message};

use super::{EventKind, NodeState, kind_label, lock, now};
use crate::metrics::Direction;
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

    // Record everything accepted in one durable write, then answer. Job messages and ads go
    // to the federation core, whose records and messages are written in the same commit.
    let received_at = now();
    let mut seen = Vec::new();
    let mut reserved = Vec::new();
    let mut inbox = Vec::new();
    let mut ops = Vec::new();
    let mut events = Vec::new();
    for v in &verdicts {
        if let Verdict::Accepted(m) = v {
            seen.push((m.signer(), m.id(), m.expires_at()));
            let from = m.signer();
            let message = match m.as_ref() {
                AnyVerified::JobManifest(v) => Some(Message::JobManifest(v.payload().clone())),
                AnyVerified::JobUpdate(v) => Some(Message::JobUpdate(v.payload().clone())),
                AnyVerified::Cancel(v) => Some(Message::Cancel(v.payload().clone())),
                AnyVerified::CapabilityAd(ad) => {
                    events.push(Event::Capabilities { from, ad: ad.payload().clone() });
                    None
                }
                _ => None,
            };
            if let Some(message) = message {
                events.push(Event::Received { from, message });
            }
            match m.as_ref() {
                AnyVerified::CapabilityAd(ad) => ops.push(WriteOp::PutPeerCapabilities {
                    peer: ad.signer(),
                    envelope: ad.signed().as_bytes().to_vec(),
                }),
                other => {
                    reserved.push((other.signer(), other.as_bytes().len() as u64));
                    inbox.push(InboxRecord {
                        from: other.signer(),
                        received_at,
                        envelope: other.as_bytes().to_vec(),
                    });
                }
            }
        }
    }
    if !seen.is_empty() {
        let ids: Vec<_> = seen.iter().map(|(_, id, _)| *id).collect();
        ops.insert(0, WriteOp::RecordSeenFrom(seen));
        if !inbox.is_empty() {
            ops.push(WriteOp::AppendInbox(inbox));
        }
        if let Err(e) = state.feed(events, ops).await {
            tracing::error!(error = %e, "cannot record accepted messages");
            let mut window = lock(&state.replay);
            for id in ids {
                window.forget(&id);
            }
            drop(window);
            state.release_inbox(&reserved);
            for v in &mut verdicts {
                if matches!(v, Verdict::Accepted(_)) {
                    *v = Verdict::Rejected(RejectReason::Internal, format!("not recorded: {e}"));
                }
            }
        }
    }

    // Trust messages take effect before the answer: an accepted one has been applied.
    for v in &mut verdicts {
        let Verdict::Accepted(m) = v else { continue };
        let applied = match m.as_ref() {
            AnyVerified::RevocationList(list) => state.adopt_revocation_list(list).await.map(drop),
            AnyVerified::KeyHandOver(h) => state.accept_handover(h).await.map(drop),
            _ => continue,
        };
        if let Err(e) = applied {
            *v = Verdict::Rejected(RejectReason::Invalid, e.to_string());
        }
    }

    let results = verdicts.into_iter().map(|v| apply(state, &peer, v)).collect();
    FedResponse::Results(results)
}

enum Verdict {
    Accepted(Box<AnyVerified>),
    Rejected(RejectReason, String),
    /// Refused for its signer's sake (a job it has no part in, a quota), counted per signer.
    Refused(Box<Refusal>),
}

/// A message refused because of what its signer may do here.
struct Refusal {
    reason: RejectReason,
    /// What was refused: [`Unrelated::label`] or the quota's name.
    why: &'static str,
    signer: InstanceId,
    kind: &'static str,
    detail: String,
}

impl Verdict {
    fn refused(reason: RejectReason, why: &'static str, m: &AnyVerified, detail: String) -> Self {
        let (signer, kind) = (m.signer(), m.kind().name());
        Self::Refused(Box::new(Refusal { reason, why, signer, kind, detail }))
    }

    fn transient(&self) -> bool {
        match self {
            Self::Accepted(_) => false,
            Self::Rejected(reason, _) => reason.is_transient(),
            Self::Refused(r) => r.reason.is_transient(),
        }
    }
}

/// Refuses job messages about jobs their signer has no part in, and the kinds that do not
/// travel on `/kaapana/fed/1`; one look at the core for the whole request.
fn check_relevance(state: &NodeState, checked: Vec<Verdict>) -> Vec<Verdict> {
    let site = state.site();
    let mut manifests: Vec<kaapana_protocol::JobManifest> = Vec::new();
    checked
        .into_iter()
        .map(|verdict| {
            let Verdict::Accepted(m) = verdict else { return verdict };
            let from = m.signer();
            let message = match m.as_ref() {
                AnyVerified::JobManifest(v) => Message::JobManifest(v.payload().clone()),
                AnyVerified::JobUpdate(v) => Message::JobUpdate(v.payload().clone()),
                AnyVerified::Cancel(v) => Message::Cancel(v.payload().clone()),
                // Trust messages are checked when they are applied (see `handle`).
                AnyVerified::CapabilityAd(_)
                | AnyVerified::RevocationList(_)
                | AnyVerified::KeyHandOver(_) => return Verdict::Accepted(m),
                AnyVerified::WorkflowManifest(_) | AnyVerified::ResultManifest(_) => {
                    let detail = format!(
                        "{} messages are not sent on {}; results go on /kaapana/results/1",
                        m.kind(),
                        kaapana_protocol::FED_PROTOCOL
                    );
                    return Verdict::refused(
                        RejectReason::UnsupportedKind,
                        "unsupported_kind",
                        &m,
                        detail,
                    );
                }
            };
            let sent_with: Vec<&kaapana_protocol::JobManifest> = manifests.iter().collect();
            match site.concerns(&from, &message, &sent_with) {
                Ok(()) => {
                    if let Message::JobManifest(jm) = message {
                        manifests.push(jm);
                    }
                    Verdict::Accepted(m)
                }
                Err((why, detail)) => {
                    Verdict::refused(RejectReason::NotYourJob, why.label(), &m, detail)
                }
            }
        })
        .collect()
}

/// Below this many messages a request is verified on one thread.
const PARALLEL_FROM: usize = 32;

/// Verifies each message: signatures on every core (they are independent), then the replay
/// window in the request's order. After a transient failure the rest are not processed, so
/// that the sender's retry keeps the order.
fn verify_all(state: &NodeState, peer: InstanceId, messages: &[Vec<u8>]) -> Vec<Verdict> {
    let now = now();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(8);
    let checked: Vec<Verdict> = if threads > 1 && messages.len() >= PARALLEL_FROM {
        let chunk = messages.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = messages
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter().map(|m| check_one(state, peer, m, now)).collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    w.join().unwrap_or_else(|_| {
                        vec![Verdict::Rejected(RejectReason::Internal, "verifier panicked".into())]
                    })
                })
                .collect()
        })
    } else {
        messages.iter().map(|m| check_one(state, peer, m, now)).collect()
    };
    if checked.len() != messages.len() {
        return messages
            .iter()
            .map(|_| Verdict::Rejected(RejectReason::Internal, "verification failed".into()))
            .collect();
    }

    let checked = check_relevance(state, checked);

    let limits = &state.files.config.limits;
    let mut window = lock(&state.replay);
    let mut usage = lock(&state.inbox_usage);
    let mut stop = false;
    checked
        .into_iter()
        .map(|verdict| {
            if stop {
                return Verdict::Rejected(
                    RejectReason::Overloaded,
                    "not processed: an earlier message of this request failed transiently".into(),
                );
            }
            let verdict = match verdict {
                Verdict::Accepted(m) => {
                    match window.insert_from(m.signer(), m.id(), m.expires_at(), now) {
                        Ok(()) if matches!(*m, AnyVerified::CapabilityAd(_)) => Verdict::Accepted(m),
                        Ok(()) => {
                            // Capability ads are kept one per peer; everything else is an
                            // inbox entry of its signer.
                            let used = usage.entry(m.signer()).or_default();
                            let bytes = m.as_bytes().len() as u64;
                            let over = if used.0 >= limits.inbox_entries_per_peer {
                                Some(("inbox_entries", format!("{} entries", used.0)))
                            } else if used.1.saturating_add(bytes) > limits.inbox_bytes_per_peer {
                                Some(("inbox_bytes", format!("{} bytes", used.1)))
                            } else {
                                None
                            };
                            match over {
                                None => {
                                    used.0 += 1;
                                    used.1 += bytes;
                                    Verdict::Accepted(m)
                                }
                                Some((why, held)) => {
                                    window.forget(&m.id());
                                    let detail = format!(
                                        "{} has {held} in this instance's inbox, the most it may have (`[limits] {why}_per_peer`); try again once older entries are pruned",
                                        m.signer()
                                    );
                                    Verdict::refused(RejectReason::QuotaExceeded, why, &m, detail)
                                }
                            }
                        }
                        Err(e @ kaapana_protocol::VerifyError::SignerWindowFull { .. }) => {
                            Verdict::refused(RejectReason::from(&e), "seen_ids", &m, e.to_string())
                        }
                        Err(e) => Verdict::Rejected(RejectReason::from(&e), e.to_string()),
                    }
                }
                other => other,
            };
            stop = verdict.transient();
            verdict
        })
        .collect()
}

/// Everything but the replay window: size, signer, domain, signature, version, time.
fn check_one(
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
    if state.is_revoked(&peer) || state.is_revoked(&signer) {
        let who = if state.is_revoked(&peer) { peer } else { signer };
        return Verdict::Rejected(RejectReason::UnknownSigner, format!("{who} is revoked here"));
    }
    match &signed {
        // Signed by the federation CA, whichever instance passes it on.
        AnySigned::RevocationList(list) => {
            let checked = state.files.trust().map_err(|e| e.to_string()).and_then(|t| {
                crate::trust::verify_revocation_list(list, &t, now).map_err(|e| e.to_string())
            });
            return match checked {
                Ok(v) => Verdict::Accepted(Box::new(AnyVerified::RevocationList(v))),
                Err(e) => Verdict::Rejected(RejectReason::UnknownSigner, e),
            };
        }
        AnySigned::KeyHandOver(_) if signer != peer => {
            return Verdict::Rejected(
                RejectReason::UnknownSigner,
                format!(
                    "a key hand-over signed by {signer} came from {peer}: only the instance itself sends its own"
                ),
            );
        }
        _ => {}
    }
    if signer != peer && !state.registry().is_registered(&signer) {
        return Verdict::Rejected(
            RejectReason::UnknownSigner,
            format!("signed by {signer}, which is neither the sender nor a registered instance"),
        );
    }
    // A message already recorded is not verified again.
    if lock(&state.replay).contains(&signed.id()) {
        let e = kaapana_protocol::VerifyError::Replayed { id: signed.id() };
        return reject(&e, RejectReason::Replayed);
    }
    match signed.verify(now, &state.verify_options) {
        Ok(v) => Verdict::Accepted(Box::new(v)),
        Err(e) => reject(&e, RejectReason::from(&e)),
    }
}

/// Counts, logs and applies one verdict; returns what the sender is told.
fn apply(state: &Arc<NodeState>, peer: &InstanceId, v: Verdict) -> Delivery {
    match v {
        Verdict::Accepted(m) => {
            let kind = m.kind();
            state.metrics.messages_in.get_or_create(&kind_label(kind.name())).inc();
            state.metrics.peer_message(&state.name_of(peer), Direction::In);
            if let AnyVerified::CapabilityAd(ad) = *m {
                let signer = ad.signer();
                let ad = ad.into_payload();
                let detail = format!("sequence {}", ad.sequence);
                state.peer_mut(&signer, |p| {
                    if p.capabilities.as_ref().is_none_or(|old| old.sequence < ad.sequence) {
                        p.capabilities = Some(ad);
                    }
                });
                state.event(EventKind::CapabilitiesReceived, Some(&signer), detail);
            } else {
                state.event(EventKind::MessageAccepted, Some(peer), format!("{kind} {}", m.id()));
            }
            Delivery::Accepted
        }
        Verdict::Refused(r) => {
            let signer = state.name_of(&r.signer);
            state.metrics.peer_refused(&signer, r.kind, r.why);
            let detail = format!("{} {}: {}", r.kind, r.why, r.detail);
            apply(state, peer, Verdict::Rejected(r.reason, detail))
        }
        Verdict::Rejected(reason, detail) => {
            state.metrics.reject(reason);
            state.metrics.peer_rejection(&state.name_of(peer), Direction::In);
            tracing::warn!(peer = %peer, reason = reason.label(), %detail, "message rejected");
            state.event(
                EventKind::MessageRejected,
                Some(peer),
                format!("{}: {detail}", reason.label()),
            );
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
    state.metrics.peer_rejection(&state.name_of(peer), Direction::In);
    tracing::warn!(peer = %peer, reason = reason.label(), %detail, "request refused");
    state.event(EventKind::RequestRefused, Some(peer), format!("{}: {detail}", reason.label()));
    FedResponse::Refused { reason, detail }
}
