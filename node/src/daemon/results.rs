//! The daemon's side of receiving results: what `/kaapana/results/1`'s owner side
//! ([`crate::net::results`]) asks of this node — the registry, the verification options, the
//! federation core's word on whether a result is expected, and the durable record.

use std::sync::Arc;

use kaapana_federation::Expected;
use std::collections::BTreeSet;

use kaapana_protocol::{BlobRef, InstanceId, RejectReason, ResultManifest, Signed};

use super::{EventKind, NodeState, now};
use crate::blobs::BlobStore;
use crate::net::results::{Refusal, RejectCode, ResultOwner};

impl Owner {
    /// The bytes of the blobs (bundles and logs, each digest once) of the results `runner`
    /// signed that are stored here. Reads every recorded result: O(results).
    fn stored_result_bytes(&self, runner: &InstanceId) -> Result<u64, String> {
        let blobs = BlobStore::in_data_dir(&self.0.files.dir).map_err(|e| e.to_string())?;
        let mut seen = BTreeSet::new();
        let mut used = 0u64;
        for (_, envelope) in self.0.store.results().map_err(|e| e.to_string())? {
            let Ok(signed) = Signed::<ResultManifest>::from_bytes(&envelope) else { continue };
            if signed.claimed_signer() != *runner {
                continue;
            }
            let Ok(verified) = signed.verify_stored() else { continue };
            let manifest = verified.payload();
            for blob in std::iter::once(manifest.bundle).chain(manifest.log) {
                if seen.insert(blob.digest) && blobs.path(&blob.digest).is_some() {
                    used = used.saturating_add(blob.size);
                }
            }
        }
        Ok(used)
    }
}

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

    fn within_quota(&self, signed: &Signed<ResultManifest>, blob: BlobRef) -> Result<(), Refusal> {
        let Some(quota) = self.0.files.config.workflows.max_result_bytes_per_runner else {
            return Ok(());
        };
        let runner = signed.claimed_signer();
        let used = self.stored_result_bytes(&runner).map_err(|e| {
            (RejectCode::Storage, format!("cannot count the result bytes stored: {e}"))
        })?;
        if used.saturating_add(blob.size) > quota {
            return Err((
                RejectCode::QuotaExceeded,
                format!(
                    "{runner} has {used} bytes of results stored here; {} more would exceed \
                     the quota of {quota} bytes per runner",
                    blob.size
                ),
            ));
        }
        Ok(())
    }

    fn report(&self, kind: EventKind, peer: &InstanceId, detail: String) {
        self.0.event(kind, Some(peer), detail);
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.0.metrics
    }
}
