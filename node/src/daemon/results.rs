//! The daemon's side of receiving results: what `/kaapana/results/1`'s owner side
//! ([`crate::net::results`]) asks of this node — the registry, the verification options, the
//! federation core's word on whether a result is expected, and the durable record.

use std::sync::Arc;

use kaapana_federation::Expected;
use kaapana_protocol::{InstanceId, RejectReason, ResultManifest, Signed};

use super::{EventKind, NodeState, now};
use crate::net::results::{Refusal, RejectCode, ResultOwner};

/// The node as the owner side of result transfers sees it.
#[derive(Debug)]
pub(super) struct Owner(pub(super) Arc<NodeState>);

impl ResultOwner for Owner {
    fn accept(&self, envelope: &[u8]) -> Result<(Signed<ResultManifest>, ResultManifest), Refusal> {
        let manifest = |r: RejectReason, d: String| (RejectCode::Manifest(r), d);
        let signed = Signed::<ResultManifest>::from_bytes(envelope)
            .map_err(|e| manifest(RejectReason::from(&e), e.to_string()))?;
        let signer = signed.claimed_signer();
        if !self.0.registry().is_registered(&signer) {
            return Err(manifest(
                RejectReason::UnknownSigner,
                format!("signed by {signer}, which is not a registered instance"),
            ));
        }
        let verified = signed
            .verify(now(), &self.0.verify_options)
            .map_err(|e| manifest(RejectReason::from(&e), e.to_string()))?;
        let (signed, payload) = verified.into_parts();
        let expected = self.0.site().expects_result(&payload, &signer);
        match expected {
            Expected::Yes => Ok((signed, payload)),
            Expected::NotYours => {
                // Counted per signer like the job messages of `/kaapana/fed/1` (the runner is
                // right but the attempt is not: `other_attempt`).
                let why = self
                    .0
                    .site()
                    .runs_for_us(&signer, &payload.job_id)
                    .err()
                    .map_or("other_attempt", |(u, _)| u.label());
                self.0.metrics.peer_refused(&self.0.name_of(&signer), "ResultManifest", why);
                Err((
                    RejectCode::NotYourJob,
                    format!(
                        "job {} was not submitted to {signer} by this instance ({why})",
                        payload.job_id
                    ),
                ))
            }
            Expected::Superseded { current } => Err((
                RejectCode::Superseded,
                format!(
                    "job {} attempt {} was replaced by job {current}; its result is discarded",
                    payload.job_id, payload.attempt
                ),
            )),
        }
    }

    async fn record(
        &self,
        from: InstanceId,
        signed: &Signed<ResultManifest>,
        manifest: &ResultManifest,
        bundle_part: bool,
    ) -> Result<(), String> {
        self.0.result_stored(from, signed, manifest, bundle_part).await.map_err(|e| e.to_string())
    }

    fn report(&self, kind: EventKind, peer: &InstanceId, detail: String) {
        self.0.event(kind, Some(peer), detail);
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.0.metrics
    }
}
