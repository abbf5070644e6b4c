//! Revocation and key rotation in the running daemon (see [`crate::trust`] for what they
//! mean): every change is durable (with its audit entry) before the registry, the federation
//! core and the network follow.

use std::sync::Arc;

use kaapana_certs::FederationCa;
use kaapana_federation::{Event as FedEvent, InstanceRef, RegisteredInstance};
use kaapana_protocol::{AnySigned, InstanceId, KeyHandOver, RevocationList, Signed, Verified};
use serde::{Deserialize, Serialize};

use super::{EventKind, NodeState, lock, now};
use crate::admin::AdminError;
use crate::audit::{AuditKind, AuditRecord};
use crate::store::{RevocationRecord, RevocationSource, WriteOp};
use crate::trust::{self, ROTATION_META};

/// A revoked instance as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationView {
    /// Its instance id.
    pub instance_id: String,
    /// Its name when it was revoked (empty if it was not registered here).
    pub name: String,
    /// Its certificate's fingerprint.
    pub fingerprint: String,
    /// Why.
    pub reason: String,
    /// Who revoked it, in words.
    pub source: String,
    /// When (ms since the epoch).
    pub revoked_at: u64,
}

impl From<&RevocationRecord> for RevocationView {
    fn from(r: &RevocationRecord) -> Self {
        Self {
            instance_id: r.instance_id.to_string(),
            name: r.name.clone(),
            fingerprint: kaapana_certs::Fingerprint(r.fingerprint).to_string(),
            reason: r.reason.clone(),
            source: trust::source_text(&r.source),
            revoked_at: r.revoked_at.as_millis(),
        }
    }
}

/// `GET /v1/revocations`: the federation CA's list adopted here and every revoked instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationsView {
    /// The number of the CA's list held here, if any.
    pub list_number: Option<u64>,
    /// Revoked instances.
    pub revoked: Vec<RevocationView>,
}

/// A key rotation's state (`POST` and `GET /v1/rotation`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationView {
    /// Whether a rotation is prepared and waits for the switch.
    pub in_progress: bool,
    /// The new key's instance id.
    pub new_instance_id: Option<String>,
    /// Registered instances that do not have the hand-over yet.
    pub pending: Vec<String>,
    /// Registered instances in all.
    pub instances: usize,
}

/// `POST /v1/rotation`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateRequest {
    /// Why (for the peers' audit logs).
    #[serde(default)]
    pub reason: String,
    /// A federation CA directory (as `ca create` writes it) to issue the new certificate;
    /// default: self-signed.
    #[serde(default)]
    pub ca_dir: Option<String>,
}

impl NodeState {
    /// Whether `id` is revoked here.
    pub fn is_revoked(&self, id: &InstanceId) -> bool {
        lock(&self.revoked).contains(id)
    }

    /// What follows once an instance's unregistration is durable: the registry, the core,
    /// metrics, its outbox worker; and its live connections close unless `keep_connections`
    /// (a hand-over: the old key's connection carries the answer, and closes when the new key
    /// connects).
    pub(super) async fn unregistered(
        self: &Arc<Self>,
        inst: &RegisteredInstance,
        keep_connections: bool,
    ) {
        let id = inst.instance_id;
        let _ = self.registry().remove(&InstanceRef::Id(id));
        self.tell_site(FedEvent::InstanceRemoved(id)).await;
        self.metrics.instances_registered.dec();
        self.metrics.forget_peer(&inst.name);
        if !keep_connections {
            // Disallowing closes the live connections at once.
            let _ = self.net.disallow(id.peer_id()).await;
        }
        if let Some(n) = lock(&self.outbox_wakers).remove(&id) {
            n.notify_one();
        }
        lock(&self.peers).remove(&id);
    }

    async fn apply_revocations(self: &Arc<Self>, records: &[RevocationRecord], keep: bool) {
        for r in records {
            lock(&self.revoked).insert(r.instance_id);
            let inst = self.registry().get(&r.instance_id).cloned();
            match inst {
                Some(inst) => self.unregistered(&inst, keep).await,
                None if !keep => {
                    let _ = self.net.disallow(r.instance_id.peer_id()).await;
                }
                None => {}
            }
            self.metrics.instances_revoked.inc();
            self.event(
                EventKind::InstanceRevoked,
                Some(&r.instance_id),
                format!(
                    "{} {}: {}",
                    if r.name.is_empty() { "(not registered)" } else { r.name.as_str() },
                    trust::source_text(&r.source),
                    r.reason
                ),
            );
        }
    }

    /// `instance revoke`: revokes an instance here (registered, or named by its id).
    pub async fn revoke_instance(
        self: &Arc<Self>,
        which: &InstanceRef,
        reason: &str,
    ) -> Result<RevocationRecord, AdminError> {
        let (id, inst) = trust::revocation_target(&self.registry(), which)?;
        let record = trust::revocation_record(
            id,
            inst.as_ref(),
            None,
            reason,
            RevocationSource::Local,
            now(),
        );
        self.store.write_async(trust::revocation_ops(&record, inst.as_ref())).await?;
        self.apply_revocations(std::slice::from_ref(&record), false).await;
        Ok(record)
    }

    /// `instance revocations import`: checks a federation CA's list and adopts it.
    pub async fn import_revocation_list(
        self: &Arc<Self>,
        list: &Signed<RevocationList>,
    ) -> Result<Vec<RevocationRecord>, AdminError> {
        let list = trust::verify_revocation_list(list, &self.files.trust()?, now())?;
        self.adopt_revocation_list(&list).await
    }

    /// Adopts a verified list if it is newer than the one held: revokes the instances it
    /// names, then passes it on to every instance still registered.
    pub(super) async fn adopt_revocation_list(
        self: &Arc<Self>,
        list: &Verified<RevocationList>,
    ) -> Result<Vec<RevocationRecord>, AdminError> {
        let _one_at_a_time = self.trust_lock.lock().await;
        let (ops, revoked) = trust::adopt_ops(&self.store, list, now())?;
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.store.write_async(ops).await?;
        self.apply_revocations(&revoked, false).await;
        let p = list.payload();
        self.event(
            EventKind::RevocationList,
            None,
            format!("adopted list {} of {}: {} revoked", p.number, p.federation, p.revoked.len()),
        );
        let peers: Vec<InstanceId> = self.registry().iter().map(|i| i.instance_id).collect();
        for peer in peers {
            let message = AnySigned::RevocationList(list.signed().clone());
            if let Err(e) = self.enqueue(peer, vec![message]).await {
                tracing::error!(error = %e, "cannot queue the revocation list");
            }
        }
        Ok(revoked)
    }

    /// Sends the revocation list held here (if any) to a newly registered instance.
    pub(super) async fn send_revocation_list(self: &Arc<Self>, peer: InstanceId) {
        match trust::adopted_list(&self.store) {
            Ok(Some(list)) => {
                if let Err(e) = self.enqueue(peer, vec![AnySigned::RevocationList(list)]).await {
                    tracing::error!(error = %e, "cannot queue the revocation list");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the revocation list"),
        }
    }

    /// A registered instance's hand-over to a new key: the new key is registered in its
    /// place (same name and policy) and the old one revoked, durably and in one commit.
    pub(super) async fn accept_handover(
        self: &Arc<Self>,
        handover: &Verified<KeyHandOver>,
    ) -> Result<RegisteredInstance, AdminError> {
        let _one_at_a_time = self.trust_lock.lock().await;
        let old_id = handover.signer();
        let old =
            self.registry().get(&old_id).cloned().ok_or_else(|| {
                AdminError::BadArgument(format!("{old_id} is not registered here"))
            })?;
        let new = trust::verify_handover(
            handover.payload(),
            &old,
            self.instance_id,
            &self.files.trust()?,
            now(),
        )?;
        if self.is_revoked(&new.instance_id) {
            return Err(AdminError::BadArgument(format!(
                "the new key {} of {} is revoked here",
                new.instance_id, old.name
            )));
        }
        let mut next = self.registry().clone();
        let _ = next.remove(&InstanceRef::Id(old_id));
        next.add(new.clone())?;
        let record = trust::revocation_record(
            old_id,
            Some(&old),
            None,
            &handover.payload().reason,
            RevocationSource::HandedOver { to: new.instance_id },
            now(),
        );
        let mut ops = trust::revocation_ops(&record, Some(&old));
        ops.push(WriteOp::PutInstance(Box::new(new.clone())));
        ops.push(WriteOp::Audit(AuditRecord::now(
            AuditKind::InstanceRotated,
            new.instance_id,
            format!(
                "{} handed over from {old_id} to fingerprint {}; policy kept: {}",
                new.name,
                kaapana_certs::Fingerprint(new.fingerprint),
                crate::admin::policy_text(&new.policy)
            ),
        )));
        self.store.write_async(ops).await?;
        // The old key's connection carries the answer; it closes when the new key connects
        // (or at once if the old key reconnects: it is revoked).
        self.apply_revocations(std::slice::from_ref(&record), true).await;
        lock(&self.retiring).insert(new.instance_id, old_id);
        self.registry().add(new.clone())?;
        self.tell_site(FedEvent::InstanceRegistered(Box::new(new.clone()))).await;
        self.metrics.instances_registered.inc();
        self.event(
            EventKind::InstanceRotated,
            Some(&new.instance_id),
            format!("{} handed over from {old_id}", new.name),
        );
        self.admit(&new).await;
        Ok(new)
    }

    /// Closes the old key's connections once the key it handed over to connects.
    pub(super) async fn retire_handed_over(&self, connected: &InstanceId) {
        let old = lock(&self.retiring).remove(connected);
        if let Some(old) = old {
            let _ = self.net.disallow(old.peer_id()).await;
        }
    }

    /// `instance rotate`: prepares a new key and queues the hand-over to every registered
    /// instance. The daemon switches to the new key when it starts next and all have it.
    pub async fn start_rotation(
        self: &Arc<Self>,
        req: &RotateRequest,
    ) -> Result<RotationView, AdminError> {
        let _one_at_a_time = self.trust_lock.lock().await;
        let ca = match &req.ca_dir {
            Some(dir) => Some(FederationCa::load(std::path::Path::new(dir))?),
            None => None,
        };
        let addrs = self.bundle_addrs().await;
        let reason = if req.reason.is_empty() { "key rotation" } else { req.reason.as_str() };
        let rotation = trust::prepare_rotation(
            &self.files,
            &self.identity,
            addrs,
            ca.as_ref(),
            reason,
            now(),
        )?;
        self.store
            .write_async(vec![WriteOp::PutMeta {
                key: ROTATION_META.into(),
                value: rotation.handover.as_bytes().to_vec(),
            }])
            .await?;
        let peers: Vec<InstanceId> = self.registry().iter().map(|i| i.instance_id).collect();
        for peer in peers {
            let message = AnySigned::KeyHandOver(rotation.handover.clone());
            self.enqueue(peer, vec![message]).await?;
        }
        self.event(
            EventKind::KeyRotation,
            None,
            format!(
                "prepared new key {} (fingerprint {}); the hand-over is queued to every registered instance",
                rotation.new_id, rotation.fingerprint
            ),
        );
        self.rotation_status()
    }

    /// Where a key rotation stands.
    pub fn rotation_status(&self) -> Result<RotationView, AdminError> {
        let envelope = self.store.meta(ROTATION_META)?.filter(|e| !e.is_empty());
        let instances = self.registry().len();
        let Some(envelope) = envelope else {
            return Ok(RotationView {
                in_progress: false,
                new_instance_id: None,
                pending: Vec::new(),
                instances,
            });
        };
        let new_instance_id = Signed::<KeyHandOver>::from_bytes(&envelope)
            .ok()
            .and_then(|s| s.verify_stored().ok())
            .and_then(|v| {
                kaapana_certs::ExchangeBundle::parse_and_verify(
                    &v.payload().new_bundle,
                    now(),
                    &self.files.trust().ok()?,
                )
                .ok()
            })
            .map(|b| b.instance_id().to_string());
        let pending =
            trust::handover_pending(&self.store, &envelope)?.into_iter().map(|i| i.name).collect();
        Ok(RotationView { in_progress: true, new_instance_id, pending, instances })
    }

    /// Every revoked instance and the CA list's number.
    pub fn revocations(&self) -> Result<RevocationsView, AdminError> {
        let list_number = self
            .store
            .meta(trust::REVOCATION_LIST_NUMBER_META)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_be_bytes);
        let revoked = self.store.revocations()?.iter().map(RevocationView::from).collect();
        Ok(RevocationsView { list_number, revoked })
    }
}
