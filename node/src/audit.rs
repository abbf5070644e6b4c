//! The audit log: an append-only, hash-chained record of what this instance decided and did
//! (registrations, policy changes, job approvals and rejections, job starts, results sent and
//! stored), each entry signed with the instance's own Ed25519 key.
//!
//! This module owns the entry format and the chain logic (sealing a new entry after the last
//! one, verifying a whole chain); it does no I/O. The store ([`crate::store`]) keeps the
//! entries in its `audit.v1` table and seals them inside the write transaction of the change
//! they record; the daemon and the offline CLI say what to record ([`AuditRecord`]).
//!
//! # Format
//!
//! Table `audit.v1`: `seq` (u64, from 1, no gaps) → [`AUDIT_SCHEMA_V1`] + postcard of
//! [`StoredEntry`] `{ body, signature }`, where `body` is the postcard of [`AuditBody`]
//! `{ seq, at, kind, subject, detail, prev_hash }` and `signature` is the Ed25519 signature of
//! [`SIGNING_TAG`] followed by `body`. `prev_hash` is the SHA-256 of the previous entry's
//! stored value (version byte, body and signature); all zeros for the first entry. The body
//! is verified as stored, never re-encoded.
//!
//! The chain shows an entry that was altered (its signature fails), removed or reordered (a
//! gap in `seq` or a `prev_hash` that does not match). Cutting entries off the end leaves a
//! valid, shorter chain; [`ChainSummary::head`] (the last entry's hash) is what to write down
//! elsewhere to detect that.

use kaapana_protocol::{SigningKey, Timestamp, verify_ed25519};
use ring::digest::{SHA256, digest};

/// The version byte in front of each stored entry.
pub const AUDIT_SCHEMA_V1: u8 = 1;
/// What each signature covers in front of the body, so that an audit signature can never be
/// taken for a protocol message's.
pub const SIGNING_TAG: &[u8] = b"kaapana-node audit entry v1\0";

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum AuditKind {
    /// An instance was registered here.
    InstanceAdded,
    /// An instance was unregistered here.
    InstanceRemoved,
    /// What a registered instance may do here changed.
    PolicyChanged,
    /// The local admin approved a job waiting here.
    JobApproved,
    /// The local admin rejected a job waiting here.
    JobRejected,
    /// A job started running here (as its runner).
    JobStarted,
    /// This runner delivered a job's result to its owner (the owner stored it).
    ResultSent,
    /// This owner received and stored a job's result (or its log).
    ResultStored,
    /// An instance was revoked here (by the admin, a federation CA's list, or its hand-over
    /// to a new key).
    InstanceRevoked,
    /// A federation CA's revocation list was adopted here.
    RevocationListAdopted,
    /// A registered instance handed over to a new key, which is registered in its place.
    InstanceRotated,
    /// This instance started using a new key (the entry is signed with the old one; the
    /// entries after it with the new one, named by its subject).
    KeyRotated,
    /// A dataset was registered here.
    DatasetAdded,
    /// A dataset was unregistered here.
    DatasetRemoved,
    /// A workflow was submitted here (this instance owns it).
    WorkflowSubmitted,
    /// A workflow owned here was cancelled.
    WorkflowCancelled,
}

impl AuditKind {
    /// Its name as `audit list` prints it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InstanceAdded => "instance_added",
            Self::InstanceRemoved => "instance_removed",
            Self::PolicyChanged => "policy_changed",
            Self::JobApproved => "job_approved",
            Self::JobRejected => "job_rejected",
            Self::JobStarted => "job_started",
            Self::ResultSent => "result_sent",
            Self::ResultStored => "result_stored",
            Self::InstanceRevoked => "instance_revoked",
            Self::RevocationListAdopted => "revocation_list_adopted",
            Self::InstanceRotated => "instance_rotated",
            Self::KeyRotated => "key_rotated",
            Self::DatasetAdded => "dataset_added",
            Self::DatasetRemoved => "dataset_removed",
            Self::WorkflowSubmitted => "workflow_submitted",
            Self::WorkflowCancelled => "workflow_cancelled",
        }
    }
}

impl std::fmt::Display for AuditKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the caller records; the store adds the sequence number, the link and the signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// When it happened.
    pub at: Timestamp,
    /// What happened.
    pub kind: AuditKind,
    /// Whom or what it concerns (an instance id, a job id).
    pub subject: String,
    /// Particulars (an instance's name and fingerprint, a policy, a reason).
    pub detail: String,
}

impl AuditRecord {
    /// A record of `kind` about `subject`, now.
    pub fn now(kind: AuditKind, subject: impl ToString, detail: impl Into<String>) -> Self {
        Self {
            at: Timestamp::from_system_time(std::time::SystemTime::now()),
            kind,
            subject: subject.to_string(),
            detail: detail.into(),
        }
    }
}

/// The signed part of an entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditBody {
    /// Its position in the chain, from 1.
    pub seq: u64,
    /// When it happened, in ms since the Unix epoch.
    pub at: u64,
    /// What happened.
    pub kind: AuditKind,
    /// Whom or what it concerns.
    pub subject: String,
    /// Particulars.
    pub detail: String,
    /// SHA-256 of the previous entry's stored value; zeros for the first entry.
    pub prev_hash: [u8; 32],
}

/// An entry as stored (after the version byte).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredEntry {
    /// The postcard of the [`AuditBody`], as signed.
    pub body: Vec<u8>,
    /// The Ed25519 signature of [`SIGNING_TAG`] + `body` (64 bytes).
    pub signature: Vec<u8>,
}

impl StoredEntry {
    /// Decodes a stored value (version byte included).
    pub fn decode(value: &[u8]) -> Result<Self, String> {
        match value.split_first() {
            Some((&AUDIT_SCHEMA_V1, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
            Some((v, _)) => Err(format!("unknown schema version {v}")),
            None => Err("empty value".into()),
        }
    }

    /// The stored value: version byte + postcard.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = vec![AUDIT_SCHEMA_V1];
        out.extend(postcard::to_allocvec(self).map_err(|e| e.to_string())?);
        Ok(out)
    }

    /// The body, decoded (its signature is not checked: see [`verify_chain`]).
    pub fn body(&self) -> Result<AuditBody, String> {
        postcard::from_bytes(&self.body).map_err(|e| e.to_string())
    }
}

/// Why a chain does not verify, naming the first entry that breaks it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An entry is missing: the chain jumps from `seq - 1` to `found`.
    #[error(
        "audit entry {seq} is missing (the entry after {prev} is {found}): entries were removed from the log"
    )]
    Missing {
        /// The missing sequence number.
        seq: u64,
        /// The entry before it (0: none).
        prev: u64,
        /// The next entry present.
        found: u64,
    },
    /// An entry was altered: its signature or its contents do not match.
    #[error("audit entry {seq} was altered: {why}")]
    Altered {
        /// The entry.
        seq: u64,
        /// What does not match.
        why: String,
    },
    /// An entry does not link to the one before it: that one was replaced or entries between
    /// them were removed.
    #[error(
        "audit entry {seq} does not follow entry {}: its prev_hash does not match (entry {} was replaced, or entries were removed)",
        seq - 1,
        seq - 1
    )]
    BrokenLink {
        /// The entry whose link fails.
        seq: u64,
    },
    /// This store cannot seal entries: it was opened without the instance key.
    #[error(
        "cannot sign audit entries: the store was opened without the instance key (open it through the data directory)"
    )]
    NoKey,
    /// The entry could not be encoded.
    #[error("cannot encode an audit entry: {0}")]
    Encode(String),
}

impl AuditError {
    /// The sequence number of the entry that breaks the chain, if any.
    pub const fn seq(&self) -> Option<u64> {
        match self {
            Self::Missing { seq, .. } | Self::Altered { seq, .. } | Self::BrokenLink { seq } => {
                Some(*seq)
            }
            Self::NoKey | Self::Encode(_) => None,
        }
    }
}

/// SHA-256 of a stored value: what the next entry's `prev_hash` must be.
pub fn hash(value: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, value).as_ref());
    out
}

/// Seals `record` as the entry after `last` (its sequence number and stored value; `None` for
/// the first entry): returns the new sequence number and stored value.
pub fn seal(
    last: Option<(u64, &[u8])>,
    record: &AuditRecord,
    key: &SigningKey,
) -> Result<(u64, Vec<u8>), AuditError> {
    let (seq, prev_hash) = match last {
        Some((seq, value)) => (seq + 1, hash(value)),
        None => (1, [0u8; 32]),
    };
    let body = AuditBody {
        seq,
        at: record.at.as_millis(),
        kind: record.kind,
        subject: record.subject.clone(),
        detail: record.detail.clone(),
        prev_hash,
    };
    let body = postcard::to_allocvec(&body).map_err(|e| AuditError::Encode(e.to_string()))?;
    let signature = key.sign_raw(&signed_bytes(&body)).to_vec();
    let value = StoredEntry { body, signature }.encode().map_err(AuditError::Encode)?;
    Ok((seq, value))
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_TAG.len() + body.len());
    m.extend_from_slice(SIGNING_TAG);
    m.extend_from_slice(body);
    m
}

/// What a verified chain holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainSummary {
    /// How many entries.
    pub entries: u64,
    /// The last entry's sequence number (0: empty).
    pub last_seq: u64,
    /// SHA-256 of the last entry (zeros: empty), hex: note it down to detect truncation.
    pub head: String,
}

/// Verifies a whole chain, given in key order as (table key, stored value), against the
/// instance's public keys in the order it used them (`keys`: the retired ones, oldest first,
/// then the current one; just the current one for an instance that never rotated its key):
/// every entry must decode, be signed by the key in use, carry its key as its `seq`, follow
/// the previous entry without a gap and link to its hash. A [`AuditKind::KeyRotated`] entry,
/// signed by the key in use, hands over to the next key of `keys`, which its subject must
/// name (as an instance id).
pub fn verify_chain(
    entries: impl IntoIterator<Item = (u64, Vec<u8>)>,
    keys: &[[u8; 32]],
) -> Result<ChainSummary, AuditError> {
    let mut prev: Option<(u64, [u8; 32])> = None;
    let mut count = 0u64;
    let mut in_use = 0usize;
    let Some(mut public_key) = keys.first() else {
        return Err(AuditError::Encode("no instance key to verify the audit log with".into()));
    };
    for (key, value) in entries {
        let expected = prev.map_or(1, |(s, _)| s + 1);
        if key != expected {
            return Err(AuditError::Missing {
                seq: expected,
                prev: prev.map_or(0, |(s, _)| s),
                found: key,
            });
        }
        let altered = |why: String| AuditError::Altered { seq: key, why };
        let stored =
            StoredEntry::decode(&value).map_err(|e| altered(format!("it cannot be read ({e})")))?;
        let signature: [u8; 64] = stored
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| altered("its signature is not 64 bytes".into()))?;
        if !verify_ed25519(public_key, &signed_bytes(&stored.body), &signature) {
            return Err(altered(
                "its signature does not match its contents under this instance's key".into(),
            ));
        }
        let body = stored.body().map_err(|e| altered(format!("its body cannot be read ({e})")))?;
        if body.seq != key {
            return Err(altered(format!("it is stored as entry {key} but says {}", body.seq)));
        }
        if body.prev_hash != prev.map_or([0u8; 32], |(_, h)| h) {
            return Err(AuditError::BrokenLink { seq: key });
        }
        if body.kind == AuditKind::KeyRotated {
            let next = keys.get(in_use + 1).ok_or_else(|| {
                altered(format!(
                    "it hands over to key {}, which is not among this instance's keys",
                    body.subject
                ))
            })?;
            let named = kaapana_protocol::InstanceId::from_ed25519_public_key(next)
                .map(|id| id.to_string())
                .unwrap_or_default();
            if named != body.subject {
                return Err(altered(format!(
                    "it hands over to {}, but this instance's next key is {named}",
                    body.subject
                )));
            }
            in_use += 1;
            public_key = next;
        }
        prev = Some((key, hash(&value)));
        count += 1;
    }
    Ok(ChainSummary {
        entries: count,
        last_seq: prev.map_or(0, |(s, _)| s),
        head: kaapana_protocol::hex(&prev.map_or([0u8; 32], |(_, h)| h)),
    })
}

/// One entry as `GET /v1/audit` and `audit list` show it (not verified: see
/// [`VerifyReport`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntryView {
    /// Its sequence number.
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// What happened (`instance_added`, ...); `unreadable` for an entry that does not decode.
    pub kind: String,
    /// Whom or what it concerns.
    pub subject: String,
    /// Particulars (for an unreadable entry: why).
    pub detail: String,
}

impl AuditEntryView {
    /// The view of a stored entry.
    pub fn of(seq: u64, value: &[u8]) -> Self {
        match StoredEntry::decode(value).and_then(|e| e.body()) {
            Ok(b) => Self {
                seq,
                at: Timestamp::from_millis(b.at),
                kind: b.kind.as_str().to_owned(),
                subject: b.subject,
                detail: b.detail,
            },
            Err(e) => Self {
                seq,
                at: Timestamp::from_millis(0),
                kind: "unreadable".into(),
                subject: String::new(),
                detail: e,
            },
        }
    }
}

/// The outcome of verifying a chain, as `GET /v1/audit/verify` answers it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// The chain up to its head, when it verifies.
    pub verified: Option<ChainSummary>,
    /// The first entry that breaks the chain.
    pub broken_seq: Option<u64>,
    /// Why it does not verify.
    pub error: Option<String>,
}

impl From<Result<ChainSummary, AuditError>> for VerifyReport {
    fn from(r: Result<ChainSummary, AuditError>) -> Self {
        match r {
            Ok(s) => Self { verified: Some(s), broken_seq: None, error: None },
            Err(e) => Self { verified: None, broken_seq: e.seq(), error: Some(e.to_string()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    fn record(n: u32) -> AuditRecord {
        AuditRecord {
            at: Timestamp::from_millis(1_000 + u64::from(n)),
            kind: AuditKind::JobStarted,
            subject: format!("job-{n}"),
            detail: format!("detail {n}"),
        }
    }

    fn chain(key: &SigningKey, n: u32) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for i in 0..n {
            let last = out.last().map(|(s, v)| (*s, v.as_slice()));
            out.push(seal(last, &record(i), key).unwrap());
        }
        out
    }

    #[test]
    fn a_key_rotation_entry_hands_the_chain_over_to_the_next_key() {
        let (old, new) = (key(), key());
        let mut entries = chain(&old, 2);
        let new_id = kaapana_protocol::InstanceId::from_ed25519_public_key(new.public_key())
            .unwrap()
            .to_string();
        let rotated = AuditRecord {
            at: Timestamp::from_millis(5_000),
            kind: AuditKind::KeyRotated,
            subject: new_id,
            detail: String::new(),
        };
        let last = entries.last().map(|(s, v)| (*s, v.clone()));
        entries.push(seal(last.as_ref().map(|(s, v)| (*s, v.as_slice())), &rotated, &old).unwrap());
        let last = entries.last().map(|(s, v)| (*s, v.clone()));
        entries
            .push(seal(last.as_ref().map(|(s, v)| (*s, v.as_slice())), &record(9), &new).unwrap());
        let keys = [*old.public_key(), *new.public_key()];
        assert_eq!(verify_chain(entries.clone(), &keys).unwrap().entries, 4);
        // Without the retired key the first entry fails; an entry after the rotation signed
        // with the old key fails too.
        assert!(matches!(
            verify_chain(entries.clone(), &[*new.public_key()]),
            Err(AuditError::Altered { seq: 1, .. })
        ));
        let last = entries[2].clone();
        entries[3] = seal(Some((last.0, last.1.as_slice())), &record(9), &old).unwrap();
        assert!(matches!(verify_chain(entries, &keys), Err(AuditError::Altered { seq: 4, .. })));
    }

    #[test]
    fn a_sealed_chain_verifies_and_links_each_entry_to_the_last() {
        let k = key();
        let entries = chain(&k, 5);
        assert_eq!(entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        let first = StoredEntry::decode(&entries[0].1).unwrap().body().unwrap();
        assert_eq!(first.prev_hash, [0u8; 32]);
        let third = StoredEntry::decode(&entries[2].1).unwrap().body().unwrap();
        assert_eq!(third.prev_hash, hash(&entries[1].1));
        assert_eq!(third.detail, "detail 2");
        let summary = verify_chain(entries.clone(), &[*k.public_key()]).unwrap();
        assert_eq!(summary.entries, 5);
        assert_eq!(summary.last_seq, 5);
        assert_eq!(summary.head, kaapana_protocol::hex(&hash(&entries[4].1)));
        assert_eq!(verify_chain(Vec::new(), &[*k.public_key()]).unwrap().entries, 0);
    }

    #[test]
    fn an_altered_detail_is_named_by_its_seq() {
        let k = key();
        let mut entries = chain(&k, 4);
        let mut stored = StoredEntry::decode(&entries[1].1).unwrap();
        let mut body = stored.body().unwrap();
        body.detail = "nothing happened".into();
        stored.body = postcard::to_allocvec(&body).unwrap();
        entries[1].1 = stored.encode().unwrap();
        let e = verify_chain(entries, &[*k.public_key()]).unwrap_err();
        assert!(matches!(e, AuditError::Altered { seq: 2, .. }), "{e}");
        assert!(e.to_string().contains("audit entry 2 was altered"), "{e}");
    }

    #[test]
    fn a_removed_entry_is_named_by_its_seq() {
        let k = key();
        let mut entries = chain(&k, 5);
        entries.remove(2);
        let e = verify_chain(entries, &[*k.public_key()]).unwrap_err();
        assert_eq!(e, AuditError::Missing { seq: 3, prev: 2, found: 4 });
        assert_eq!(e.seq(), Some(3));
        // The first entry removed.
        let mut entries = chain(&k, 3);
        entries.remove(0);
        assert_eq!(
            verify_chain(entries, &[*k.public_key()]).unwrap_err(),
            AuditError::Missing { seq: 1, prev: 0, found: 2 }
        );
    }

    #[test]
    fn a_renumbered_or_replaced_entry_breaks_the_chain() {
        let k = key();
        // Entry 3 removed and the later ones moved down: entry 3 (was 4) says seq 4.
        let mut entries = chain(&k, 5);
        entries.remove(2);
        for (i, e) in entries.iter_mut().enumerate() {
            e.0 = i as u64 + 1;
        }
        let e = verify_chain(entries, &[*k.public_key()]).unwrap_err();
        assert!(matches!(e, AuditError::Altered { seq: 3, .. }), "{e}");
        // Entry 2 replaced by a validly signed entry linked to another first entry.
        let mut entries = chain(&k, 4);
        entries[1] = seal(Some((1, b"another first entry")), &record(9), &k).unwrap();
        let e = verify_chain(entries, &[*k.public_key()]).unwrap_err();
        assert!(matches!(e, AuditError::BrokenLink { seq: 2 }), "{e}");
    }

    #[test]
    fn another_instances_key_does_not_verify() {
        let entries = chain(&key(), 2);
        let e = verify_chain(entries, &[*key().public_key()]).unwrap_err();
        assert!(matches!(e, AuditError::Altered { seq: 1, .. }), "{e}");
    }

    #[test]
    fn garbage_values_are_reported_not_panicked_on() {
        let k = key();
        for bad in [vec![], vec![9, 1, 2], vec![AUDIT_SCHEMA_V1, 0xff, 0xff]] {
            let e = verify_chain(vec![(1, bad)], &[*k.public_key()]).unwrap_err();
            assert!(matches!(e, AuditError::Altered { seq: 1, .. }), "{e}");
        }
    }
}
