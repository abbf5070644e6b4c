//! Revocation and key rotation: what cuts an instance off for good, and how an instance moves
//! to a new key without its peers registering it again by hand.
//!
//! # Revocation
//!
//! An instance is revoked here by
//! - this site's admin (`kaapana-node instance revoke NAME --reason ...`),
//! - the federation CA's revocation list ([`RevocationList`], signed with the CA's key; made
//!   with `kaapana-node ca revoke`, imported at any one site with `instance revocations
//!   import FILE`): a site that adopts a list passes it on to every instance registered with
//!   it (through their outboxes, so an instance offline now gets it when it is back), and each
//!   of them does the same, so the list reaches every site of the federation in as many hops
//!   as the registrations need. A list is adopted only if its number is higher than the one
//!   held and it verifies under the CA certificate of `[trust] federation_ca`;
//! - a key hand-over (below): the old key is revoked, the new one registered.
//!
//! Revoking unregisters the instance (its live connections close at once, its queued messages
//! are dropped) and records it in the store's `revocations.v1` table; from then on its
//! connections are refused by the gate, its messages (also those relayed by others) are
//! refused, and `instance add` refuses its bundle. Every revocation is in the audit log.
//!
//! # Key rotation
//!
//! `kaapana-node instance rotate` (with the daemon running) makes a new key and certificate
//! (`next-identity.key`, `next-instance.crt`; self-signed, or issued by the federation CA with
//! `--ca DIR`), and queues a [`KeyHandOver`] to every registered instance: signed with the
//! *current* key, it carries the new key's exchange bundle (so the new key proves that it is
//! held). A peer accepts it from the registered instance it names if the new certificate
//! verifies under its trust setting and has the same instance name; it then registers the new
//! key in place of the old one, with the same policy, and revokes the old one (source
//! `handed over`). The rotating daemon switches to the new key when it starts next and every
//! registered instance has confirmed the hand-over (`instance rotate --status`); `instance
//! rotate --finish` (daemon stopped) switches at once. The switch writes a
//! [`AuditKind::KeyRotated`] entry with the old key, moves the old key's id to
//! `retired-keys` (what verifies the older audit entries) and keeps the old key file as
//! `retired-identity-<id>.key`.
//!
//! Limits: jobs in flight between the two across the switch end as any job of a lost peer
//! does (the peer's records name the old key); a peer that was not registered when the
//! hand-over was sent needs the new bundle by hand.

use std::fs;
use std::path::Path;
use std::time::Duration;

use kaapana_certs::{
    CaCertificate, ExchangeBundle, FederationCa, Fingerprint, Identity, InstanceCertificate, Trust,
};
use kaapana_federation::RegisteredInstance;
use kaapana_protocol::{
    Header, InstanceId, KeyHandOver, RevocationList, RevokedInstance, Signed, Timestamp, Verified,
    VerifyOptions,
};

use crate::admin::{AdminError, NodeFiles};
use crate::audit::{AuditKind, AuditRecord};
use crate::data_dir::DataDir;
use crate::store::{RevocationRecord, RevocationSource, Store, WriteOp};

/// PEM tag of a revocation list file.
pub const REVOCATION_LIST_TAG: &str = "KAAPANA REVOCATION LIST";
/// The store's meta key holding the revocation list adopted here (envelope bytes).
pub const REVOCATION_LIST_META: &str = "revocation_list";
/// The store's meta key holding the number of the revocation list adopted here (u64, BE).
pub const REVOCATION_LIST_NUMBER_META: &str = "revocation_list_number";
/// The store's meta key holding the hand-over of a rotation in progress (envelope bytes).
pub const ROTATION_META: &str = "rotation";
/// The longest a revocation list may be valid (it is re-issued before it expires).
pub const MAX_LIST_LIFETIME: Duration = Duration::from_secs(400 * 24 * 3600);
/// How long a hand-over may wait in outboxes for peers that are away.
pub const HANDOVER_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a revocation list or a hand-over is not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Revocation lists need a federation CA.
    #[error(
        "this instance trusts no federation CA ([trust] federation_ca is not set), so it cannot check a revocation list; revoke instances one by one with `instance revoke`"
    )]
    NoFederationCa,
    /// The list is signed by another key than the CA's.
    #[error("the revocation list is signed by {signer}, not by the federation CA {ca} ({ca_id})")]
    NotTheCa {
        /// Who signed it.
        signer: String,
        /// The CA's name.
        ca: String,
        /// The id of the CA's key.
        ca_id: String,
    },
    /// The envelope does not verify (signature, time, validity).
    #[error("the {what} does not verify: {source}")]
    Verify {
        /// What it is.
        what: &'static str,
        /// Why.
        #[source]
        source: kaapana_protocol::VerifyError,
    },
    /// Not a revocation list file.
    #[error("not a revocation list: {0}")]
    Malformed(String),
    /// The hand-over's new bundle or certificate is refused.
    #[error("the key hand-over of {name} is refused: {why}")]
    HandOver {
        /// The instance handing over.
        name: String,
        /// Why.
        why: String,
    },
}

impl From<TrustError> for AdminError {
    fn from(e: TrustError) -> Self {
        Self::BadArgument(e.to_string())
    }
}

/// Reads a revocation list file (PEM, as `ca revoke` writes it).
pub fn parse_revocation_list(text: &str) -> Result<Signed<RevocationList>, TrustError> {
    let block = pem::parse(text).map_err(|e| TrustError::Malformed(e.to_string()))?;
    if block.tag() != REVOCATION_LIST_TAG {
        return Err(TrustError::Malformed(format!(
            "expected a `{REVOCATION_LIST_TAG}` PEM block, found `{}`",
            block.tag()
        )));
    }
    Signed::from_bytes(block.contents()).map_err(|e| TrustError::Malformed(e.to_string()))
}

/// A revocation list as a PEM file, with a comment saying what it holds.
pub fn revocation_list_pem(list: &Verified<RevocationList>) -> String {
    let p = list.payload();
    let mut text = format!(
        "# kaapana-node revocation list {} of federation {}: {} revoked instance(s), valid until {}\n\
         # Import it at a site with `kaapana-node instance revocations import FILE`; it spreads to\n\
         # the other sites by itself.\n",
        p.number,
        p.federation,
        p.revoked.len(),
        p.header.expires_at,
    );
    for r in &p.revoked {
        text.push_str(&format!("# revoked: {} ({})\n", r.instance_id, r.reason));
    }
    text.push_str(&pem::encode(&pem::Pem::new(REVOCATION_LIST_TAG, list.signed().as_bytes())));
    text
}

/// The CA certificate that signs revocation lists here, if one is trusted.
fn trusted_ca(trust: &Trust) -> Result<&CaCertificate, TrustError> {
    match trust {
        Trust::FederationCa(ca) => Ok(ca),
        Trust::SelfSigned => Err(TrustError::NoFederationCa),
    }
}

/// Checks a revocation list: signed by the trusted CA's key, valid at `now`.
pub fn verify_revocation_list(
    list: &Signed<RevocationList>,
    trust: &Trust,
    now: Timestamp,
) -> Result<Verified<RevocationList>, TrustError> {
    check_ca_signer(list, trust)?;
    let opts = VerifyOptions { max_lifetime: MAX_LIST_LIFETIME, ..VerifyOptions::default() };
    list.verify(now, &opts).map_err(|source| TrustError::Verify { what: "revocation list", source })
}

/// Checks a revocation list read back from a file the CA wrote: signed by the trusted CA's
/// key, whether or not it has expired.
pub fn verify_revocation_list_stored(
    list: &Signed<RevocationList>,
    trust: &Trust,
) -> Result<Verified<RevocationList>, TrustError> {
    check_ca_signer(list, trust)?;
    list.verify_stored().map_err(|source| TrustError::Verify { what: "revocation list", source })
}

fn check_ca_signer(list: &Signed<RevocationList>, trust: &Trust) -> Result<(), TrustError> {
    let ca = trusted_ca(trust)?;
    let ca_id = InstanceId::from_ed25519_public_key(&ca.public_key())
        .map_err(|e| TrustError::Malformed(format!("the CA key: {e}")))?;
    if list.claimed_signer() != ca_id {
        return Err(TrustError::NotTheCa {
            signer: list.claimed_signer().to_string(),
            ca: ca.name().to_owned(),
            ca_id: ca_id.to_string(),
        });
    }
    Ok(())
}

/// `ca revoke`: the next revocation list after `previous` (number + 1, its entries kept) with
/// `add` revoked too, valid for `valid` from `now`, signed by the CA.
pub fn issue_revocation_list(
    ca: &FederationCa,
    previous: Option<&RevocationList>,
    add: Vec<RevokedInstance>,
    valid: Duration,
    now: Timestamp,
) -> Result<Verified<RevocationList>, AdminError> {
    if valid > MAX_LIST_LIFETIME {
        return Err(AdminError::BadArgument(format!(
            "a revocation list is valid for at most {} days",
            MAX_LIST_LIFETIME.as_secs() / 86_400
        )));
    }
    let mut revoked = previous.map(|p| p.revoked.clone()).unwrap_or_default();
    for r in add {
        if !revoked.iter().any(|old| old.instance_id == r.instance_id) {
            revoked.push(r);
        }
    }
    let list = RevocationList {
        header: Header::new(now, valid),
        federation: ca.certificate().name().to_owned(),
        number: previous.map_or(1, |p| p.number.saturating_add(1)),
        revoked,
    };
    let signed = Signed::sign(ca.signing_key(), &list)
        .map_err(|e| AdminError::BadArgument(format!("cannot sign the revocation list: {e}")))?;
    let trust = Trust::FederationCa(ca.certificate().clone());
    Ok(verify_revocation_list(&signed, &trust, now)?)
}

/// Checks a hand-over from the registered instance `old` and makes the registration of its
/// new key: same name and policy, the new certificate and addresses.
pub fn verify_handover(
    handover: &KeyHandOver,
    old: &RegisteredInstance,
    own: InstanceId,
    trust: &Trust,
    now: Timestamp,
) -> Result<RegisteredInstance, TrustError> {
    let refuse = |why: String| TrustError::HandOver { name: old.name.clone(), why };
    let bundle = ExchangeBundle::parse_and_verify(&handover.new_bundle, now, trust)
        .map_err(|e| refuse(format!("its new bundle: {e}")))?;
    let certificate = bundle.certificate();
    if certificate.name() != old.name {
        return Err(refuse(format!(
            "the new certificate is for `{}`, not `{}`",
            certificate.name(),
            old.name
        )));
    }
    if bundle.instance_id() == old.instance_id {
        return Err(refuse("the new key is the old one".into()));
    }
    if bundle.instance_id() == own {
        return Err(refuse("the new key is this instance's".into()));
    }
    let listen_addrs = if bundle.listen_addrs().is_empty() {
        old.listen_addrs.clone()
    } else {
        bundle.listen_addrs().to_vec()
    };
    Ok(RegisteredInstance {
        instance_id: bundle.instance_id(),
        name: old.name.clone(),
        certificate_der: certificate.der().to_vec(),
        fingerprint: bundle.fingerprint().0,
        listen_addrs,
        certificate_not_after: certificate.not_after(),
        registered_at: now,
        policy: old.policy.clone(),
    })
}

/// The store operations that revoke `id` here: unregister it if it is registered, forget
/// what was queued for it, record the revocation and audit it.
pub fn revocation_ops(
    record: &RevocationRecord,
    registered: Option<&RegisteredInstance>,
) -> Vec<WriteOp> {
    let mut ops = Vec::new();
    if registered.is_some() {
        ops.push(WriteOp::RemoveInstance(record.instance_id));
        ops.push(WriteOp::ForgetPeer(record.instance_id));
    }
    ops.push(WriteOp::PutRevocation(Box::new(record.clone())));
    ops.push(WriteOp::Audit(AuditRecord::now(
        AuditKind::InstanceRevoked,
        record.instance_id,
        format!(
            "{} fingerprint {}: {} ({})",
            if record.name.is_empty() { "(not registered)" } else { &record.name },
            Fingerprint(record.fingerprint),
            record.reason,
            source_text(&record.source)
        ),
    )));
    ops
}

/// Who revoked, in words.
pub fn source_text(source: &RevocationSource) -> String {
    match source {
        RevocationSource::Local => "revoked by this site".into(),
        RevocationSource::FederationCa { number } => {
            format!("federation CA revocation list {number}")
        }
        RevocationSource::HandedOver { to } => format!("handed over to {to}"),
    }
}

/// The revocation of a registered instance `inst` (or of an unregistered `id`).
pub fn revocation_record(
    id: InstanceId,
    inst: Option<&RegisteredInstance>,
    fingerprint: Option<[u8; 32]>,
    reason: &str,
    source: RevocationSource,
    now: Timestamp,
) -> RevocationRecord {
    RevocationRecord {
        instance_id: id,
        name: inst.map(|i| i.name.clone()).unwrap_or_default(),
        fingerprint: inst.map(|i| i.fingerprint).or(fingerprint).unwrap_or([0; 32]),
        reason: kaapana_protocol::fit_text(reason),
        source,
        revoked_at: now,
    }
}

/// The revocation list adopted here, if any.
pub fn adopted_list(store: &Store) -> Result<Option<Signed<RevocationList>>, AdminError> {
    match store.meta(REVOCATION_LIST_META)? {
        None => Ok(None),
        Some(bytes) => Signed::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| AdminError::BadArgument(format!("the stored revocation list: {e}"))),
    }
}

/// The public keys this instance used, oldest first, ending with the current one: what
/// verifies its whole audit log.
pub fn audit_keys(
    dir: &DataDir,
    current: &InstanceCertificate,
) -> Result<Vec<[u8; 32]>, AdminError> {
    let mut keys = Vec::new();
    let path = dir.retired_keys_path();
    match fs::read_to_string(&path) {
        Ok(text) => {
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let key = line
                    .parse::<InstanceId>()
                    .ok()
                    .and_then(|id| id.ed25519_public_key())
                    .ok_or_else(|| {
                        AdminError::BadArgument(format!(
                            "{}: `{line}` is not an Ed25519 instance id",
                            path.display()
                        ))
                    })?;
                keys.push(key);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(AdminError::BadArgument(format!("cannot read {}: {e}", path.display())));
        }
    }
    keys.push(current.public_key());
    Ok(keys)
}

/// What `instance rotate` prepared: the new key's instance id and the hand-over.
#[derive(Debug)]
pub struct Rotation {
    /// The new key's instance id.
    pub new_id: InstanceId,
    /// The new certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// The hand-over, signed with the current key.
    pub handover: Signed<KeyHandOver>,
}

/// `instance rotate`: a new key and certificate (self-signed, or issued by `ca`), written as
/// `next-identity.key` and `next-instance.crt`, and the hand-over to it signed with
/// `current`. Refuses if a rotation is already prepared.
pub fn prepare_rotation(
    files: &NodeFiles,
    current: &Identity,
    addrs: Vec<String>,
    ca: Option<&FederationCa>,
    reason: &str,
    now: Timestamp,
) -> Result<Rotation, AdminError> {
    let dir = &files.dir;
    if dir.next_key_path().exists() {
        return Err(AdminError::BadArgument(format!(
            "a key rotation is already prepared ({} exists): wait until the daemon switches to it, or run `instance rotate --finish` with the daemon stopped",
            dir.next_key_path().display()
        )));
    }
    let name = files.config.instance.name.as_str();
    let not_after = files.certificate.not_after();
    let valid = if not_after > now {
        not_after.duration_since(now)
    } else {
        Duration::from_secs(365 * 24 * 3600)
    };
    let next = Identity::generate()?;
    let certificate = match ca {
        Some(ca) => ca.sign_instance(&next.public_key(), name, now, now.saturating_add(valid))?,
        None => InstanceCertificate::self_signed(&next, name, now, now.saturating_add(valid))?,
    };
    certificate.verify(now, &files.trust()?)?;
    let new_bundle = ExchangeBundle::create(&next, &certificate, name, addrs, now)?;
    let handover = KeyHandOver {
        header: Header::new(now, HANDOVER_LIFETIME),
        new_bundle,
        reason: kaapana_protocol::fit_text(reason),
    };
    let handover = Signed::sign(current.signing_key(), &handover)
        .map_err(|e| AdminError::BadArgument(format!("cannot sign the hand-over: {e}")))?;
    next.save(&dir.next_key_path())?;
    fs::write(dir.next_certificate_path(), certificate.to_pem())
        .map_err(|e| AdminError::BadArgument(format!("cannot write the new certificate: {e}")))?;
    Ok(Rotation { new_id: next.instance_id(), fingerprint: certificate.fingerprint(), handover })
}

/// The registered instances whose outbox still holds the hand-over `envelope`.
pub fn handover_pending(
    store: &Store,
    envelope: &[u8],
) -> Result<Vec<RegisteredInstance>, AdminError> {
    let mut pending = Vec::new();
    for inst in store.instances()? {
        let mut after = 0;
        loop {
            let batch = store.outbox_peek(&inst.instance_id, after, 256, 16 << 20)?;
            let Some(last) = batch.last().map(|(seq, _)| *seq) else { break };
            if batch.iter().any(|(_, e)| e == envelope) {
                pending.push(inst.clone());
                break;
            }
            after = last;
        }
    }
    Ok(pending)
}

/// Switches this instance to the key `instance rotate` prepared, if there is one and either
/// every registered instance has the hand-over or `force`. Returns the new instance id if it
/// switched. Runs with the daemon stopped (at its start, or `instance rotate --finish`).
pub fn finish_rotation(dir: &DataDir, force: bool) -> Result<Option<InstanceId>, AdminError> {
    if !dir.next_key_path().exists() {
        return Ok(None);
    }
    let files = NodeFiles::open(dir)?;
    let old = files.identity()?;
    let next = Identity::load(&dir.next_key_path())?;
    let pem = fs::read_to_string(dir.next_certificate_path()).map_err(|e| {
        AdminError::BadArgument(format!(
            "cannot read {}: {e}",
            dir.next_certificate_path().display()
        ))
    })?;
    let certificate = InstanceCertificate::from_pem(&pem)?;
    certificate.check_identity(&next)?;
    {
        let store = Store::open_audited(&dir.store_path(), files.identity()?)?;
        let envelope = store.meta(ROTATION_META)?.unwrap_or_default();
        let pending = handover_pending(&store, &envelope)?;
        if !pending.is_empty() && !force {
            let names: Vec<_> = pending.iter().map(|i| i.name.as_str()).collect();
            tracing::warn!(
                pending = %names.join(", "),
                "the key rotation waits until these instances have the hand-over (or run `instance rotate --finish`)"
            );
            return Ok(None);
        }
        store.write(vec![
            WriteOp::PutMeta { key: ROTATION_META.into(), value: Vec::new() },
            WriteOp::Audit(AuditRecord::now(
                AuditKind::KeyRotated,
                next.instance_id(),
                format!(
                    "from {} to certificate fingerprint {}",
                    old.instance_id(),
                    certificate.fingerprint()
                ),
            )),
        ])?;
    }
    let mut retired = fs::read_to_string(dir.retired_keys_path()).unwrap_or_default();
    retired.push_str(&format!("{}\n", old.instance_id()));
    write_synced(&dir.retired_keys_path(), retired.as_bytes())?;
    let kept = dir.root().join(format!("retired-identity-{}.key", old.instance_id()));
    rename(&dir.key_path(), &kept)?;
    rename(
        &dir.certificate_path(),
        &dir.root().join(format!("retired-instance-{}.crt", old.instance_id())),
    )?;
    rename(&dir.next_certificate_path(), &dir.certificate_path())?;
    rename(&dir.next_key_path(), &dir.key_path())?;
    sync_dir(dir.root())?;
    Ok(Some(next.instance_id()))
}

fn rename(from: &Path, to: &Path) -> Result<(), AdminError> {
    fs::rename(from, to).map_err(|e| {
        AdminError::BadArgument(format!("cannot move {} to {}: {e}", from.display(), to.display()))
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AdminError> {
    use std::io::Write as _;
    let err = |e: std::io::Error| {
        AdminError::BadArgument(format!("cannot write {}: {e}", path.display()))
    };
    let mut f = fs::File::create(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

fn sync_dir(dir: &Path) -> Result<(), AdminError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AdminError::BadArgument(format!("cannot sync {}: {e}", dir.display())))
}

/// Whether `id` is revoked in `store`, and how.
pub fn revocation_of(
    store: &Store,
    id: &InstanceId,
) -> Result<Option<RevocationRecord>, AdminError> {
    Ok(store.revocations()?.into_iter().find(|r| r.instance_id == *id))
}

/// The instance `instance revoke` names: a registered one (by name or id), or any instance
/// by its id.
pub fn revocation_target(
    registry: &kaapana_federation::Registry,
    which: &kaapana_federation::InstanceRef,
) -> Result<(InstanceId, Option<RegisteredInstance>), AdminError> {
    let inst = registry.resolve(which).cloned();
    match (&inst, which) {
        (Some(i), _) => Ok((i.instance_id, inst)),
        (None, kaapana_federation::InstanceRef::Id(id)) => Ok((*id, None)),
        (None, kaapana_federation::InstanceRef::Name(n)) => Err(AdminError::BadArgument(format!(
            "no registered instance `{n}`; name an unregistered instance by its id"
        ))),
    }
}

/// `instance revoke` without a running daemon.
pub fn revoke_offline(
    dir: &DataDir,
    which: &kaapana_federation::InstanceRef,
    reason: &str,
    now: Timestamp,
) -> Result<RevocationRecord, AdminError> {
    let files = NodeFiles::open(dir)?;
    let store = files.audited_store()?;
    let (id, inst) = revocation_target(&store.load_registry()?, which)?;
    let record = revocation_record(id, inst.as_ref(), None, reason, RevocationSource::Local, now);
    store.write(revocation_ops(&record, inst.as_ref()))?;
    Ok(record)
}

/// `instance revocations import` without a running daemon: adopts the list if it is newer
/// than the one held (it is passed on when the daemon runs next). Returns the instances it
/// revoked here now.
pub fn import_list_offline(
    dir: &DataDir,
    text: &str,
    now: Timestamp,
) -> Result<Vec<RevocationRecord>, AdminError> {
    let files = NodeFiles::open(dir)?;
    let list = verify_revocation_list(&parse_revocation_list(text)?, &files.trust()?, now)?;
    let store = files.audited_store()?;
    let (ops, revoked) = adopt_ops(&store, &list, now)?;
    if !ops.is_empty() {
        store.write(ops)?;
    }
    Ok(revoked)
}

/// The store operations that adopt `list` (nothing if the list held is as new), and the
/// instances it revokes that were not revoked yet.
pub fn adopt_ops(
    store: &Store,
    list: &Verified<RevocationList>,
    now: Timestamp,
) -> Result<(Vec<WriteOp>, Vec<RevocationRecord>), AdminError> {
    let held = store
        .meta(REVOCATION_LIST_NUMBER_META)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(u64::from_be_bytes);
    let p = list.payload();
    if held.is_some_and(|n| n >= p.number) {
        return Ok((Vec::new(), Vec::new()));
    }
    let registry = store.load_registry()?;
    let already: std::collections::BTreeSet<InstanceId> =
        store.revocations()?.into_iter().map(|r| r.instance_id).collect();
    let mut ops = vec![
        WriteOp::PutMeta {
            key: REVOCATION_LIST_META.into(),
            value: list.signed().as_bytes().to_vec(),
        },
        WriteOp::PutMeta {
            key: REVOCATION_LIST_NUMBER_META.into(),
            value: p.number.to_be_bytes().to_vec(),
        },
        WriteOp::Audit(AuditRecord::now(
            AuditKind::RevocationListAdopted,
            list.signer(),
            format!("list {} of {}: {} revoked", p.number, p.federation, p.revoked.len()),
        )),
    ];
    let mut revoked = Vec::new();
    for r in &p.revoked {
        if already.contains(&r.instance_id) {
            continue;
        }
        let inst = registry.get(&r.instance_id);
        let record = revocation_record(
            r.instance_id,
            inst,
            Some(r.certificate_sha256.0),
            &r.reason,
            RevocationSource::FederationCa { number: p.number },
            now,
        );
        ops.extend(revocation_ops(&record, inst));
        revoked.push(record);
    }
    Ok((ops, revoked))
}
