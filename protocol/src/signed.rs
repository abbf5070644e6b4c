//! `Signed<T>`: a postcard payload, its signer and an Ed25519 signature, in one envelope.
//!
//! # Wire layout (envelope format 1)
//!
//! ```text
//! signed bytes = format:u8 ‖ domain:str ‖ signer:bytes ‖ payload:bytes     (postcard encoding)
//! envelope     = signed bytes ‖ signature:[u8; 64]
//! ```
//!
//! `str` and `bytes` are postcard's varint length followed by the bytes. The domain tag
//! (`kaapana-node/1/JobManifest`, ...) names the payload type, so a signature made for one type
//! never verifies as another. The signature covers the domain, the signer and the payload;
//! verification checks these exact bytes and never re-encodes. A message's id is the SHA-256 of
//! the signed bytes.
//!
//! # Misuse resistance
//!
//! A [`Signed<T>`] can only be made with a [`SigningKey`] ([`Signed::sign`]) or parsed from
//! bytes ([`Signed::from_bytes`]); it has no accessor for the payload. The payload is reached
//! only through [`Verified<T>`], which [`Signed::verify`] returns after checking domain,
//! signature, protocol version, validity and time.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DecodeError, EncodeError, ValidationError, VerifyError};
use crate::ids::{InstanceId, ManifestId};
use crate::key::{SigningKey, verify_ed25519};
use crate::manifest::Header;
use crate::replay::ReplayWindow;
use crate::time::Timestamp;

/// The envelope format this build writes and reads.
pub const ENVELOPE_FORMAT: u8 = 1;
/// The protocol version of the payloads this build writes and reads. Version 2: a job's work
/// is a container or an Airflow DAG run (`Work`), not always an image.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes an envelope adds around its payload at most: format, domain tag, signer, length
/// prefixes and signature.
pub const ENVELOPE_OVERHEAD: usize = 1 + 1 + 48 + 1 + 64 + 3 + 64;
const SIGNATURE_LEN: usize = 64;

/// The message types that travel signed. Each has its own signature domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ManifestKind {
    /// [`crate::CapabilityAd`].
    CapabilityAd,
    /// [`crate::WorkflowManifest`].
    WorkflowManifest,
    /// [`crate::JobManifest`].
    JobManifest,
    /// [`crate::JobUpdate`].
    JobUpdate,
    /// [`crate::ResultManifest`].
    ResultManifest,
    /// [`crate::Cancel`].
    Cancel,
    /// [`crate::InstanceBundleInfo`].
    InstanceBundle,
    /// [`crate::RevocationList`].
    RevocationList,
    /// [`crate::KeyHandOver`].
    KeyHandOver,
}

impl ManifestKind {
    /// Every kind.
    pub const ALL: [Self; 9] = [
        Self::CapabilityAd,
        Self::WorkflowManifest,
        Self::JobManifest,
        Self::JobUpdate,
        Self::ResultManifest,
        Self::Cancel,
        Self::InstanceBundle,
        Self::RevocationList,
        Self::KeyHandOver,
    ];

    /// The type's name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::CapabilityAd => "CapabilityAd",
            Self::WorkflowManifest => "WorkflowManifest",
            Self::JobManifest => "JobManifest",
            Self::JobUpdate => "JobUpdate",
            Self::ResultManifest => "ResultManifest",
            Self::Cancel => "Cancel",
            Self::InstanceBundle => "InstanceBundle",
            Self::RevocationList => "RevocationList",
            Self::KeyHandOver => "KeyHandOver",
        }
    }

    /// The signature domain tag written into the envelope.
    pub const fn domain(self) -> &'static str {
        match self {
            Self::CapabilityAd => "kaapana-node/1/CapabilityAd",
            Self::WorkflowManifest => "kaapana-node/1/WorkflowManifest",
            Self::JobManifest => "kaapana-node/1/JobManifest",
            Self::JobUpdate => "kaapana-node/1/JobUpdate",
            Self::ResultManifest => "kaapana-node/1/ResultManifest",
            Self::Cancel => "kaapana-node/1/Cancel",
            Self::InstanceBundle => "kaapana-node/1/InstanceBundle",
            Self::RevocationList => "kaapana-node/1/RevocationList",
            Self::KeyHandOver => "kaapana-node/1/KeyHandOver",
        }
    }

    fn from_domain(domain: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.domain() == domain)
    }
}

impl fmt::Display for ManifestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A payload type that travels inside a [`Signed`] envelope.
pub trait Manifest: Serialize + DeserializeOwned {
    /// Its kind, which selects the signature domain.
    const KIND: ManifestKind;
    /// The largest encoded payload accepted, checked before decoding.
    const MAX_PAYLOAD: usize;
    /// The common header (version, issue and expiry time).
    fn header(&self) -> &Header;
    /// Checks the content rules beyond the wire layout.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// What a receiver tolerates in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyOptions {
    /// How far `issued_at` may lie in the receiver's future (clock skew between sites).
    pub max_clock_skew: Duration,
    /// The longest `expires_at - issued_at` accepted; bounds how long replay ids are kept.
    pub max_lifetime: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            max_clock_skew: Duration::from_secs(5 * 60),
            max_lifetime: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// A signed message whose payload has not been looked at yet. See the module docs.
pub struct Signed<T> {
    /// Shared: a `Verified` keeps the same bytes without copying them.
    bytes: std::sync::Arc<[u8]>,
    kind: ManifestKind,
    signer: InstanceId,
    payload: Range<usize>,
    id: ManifestId,
    _payload_type: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            bytes: std::sync::Arc::clone(&self.bytes),
            kind: self.kind,
            signer: self.signer,
            payload: self.payload.clone(),
            id: self.id,
            _payload_type: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("kind", &self.kind)
            .field("signer", &self.signer)
            .field("id", &self.id)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// The envelope fields before the signature, borrowed from the bytes.
#[derive(serde::Serialize, serde::Deserialize)]
struct SignedHead<'a> {
    format: u8,
    domain: &'a str,
    signer: &'a [u8],
    payload: &'a [u8],
}

impl<T: Manifest> Signed<T> {
    /// The largest envelope accepted for `T`.
    pub const MAX_ENVELOPE: usize = T::MAX_PAYLOAD + ENVELOPE_OVERHEAD;

    /// Validates, encodes and signs `payload` with `key`.
    pub fn sign(key: &SigningKey, payload: &T) -> Result<Self, EncodeError> {
        payload.validate().map_err(|source| EncodeError::Invalid { kind: T::KIND, source })?;
        let body = postcard::to_allocvec(payload)
            .map_err(|e| EncodeError::Serialize { kind: T::KIND, detail: e.to_string() })?;
        if body.len() > T::MAX_PAYLOAD {
            return Err(EncodeError::TooLarge {
                kind: T::KIND,
                len: body.len(),
                max: T::MAX_PAYLOAD,
            });
        }
        Ok(Self::sign_encoded(key, &body))
    }

    /// Signs already-encoded payload bytes as they are. Used by [`Signed::sign`] and by tests
    /// that need well-signed but otherwise faulty messages.
    #[doc(hidden)]
    pub fn sign_encoded(key: &SigningKey, body: &[u8]) -> Self {
        let signer = key.instance_id();
        let signer_bytes = signer.to_bytes();
        let head = SignedHead {
            format: ENVELOPE_FORMAT,
            domain: T::KIND.domain(),
            signer: &signer_bytes,
            payload: body,
        };
        // Encoding borrowed strings and byte slices into a Vec cannot fail.
        let mut bytes = postcard::to_allocvec(&head).unwrap_or_default();
        let signed_len = bytes.len();
        let signature = key.sign_raw(&bytes);
        bytes.extend_from_slice(&signature);
        let payload_start = signed_len - body.len();
        Self {
            id: ManifestId(sha256(&bytes[..signed_len])),
            bytes: bytes.into(),
            kind: T::KIND,
            signer,
            payload: payload_start..signed_len,
            _payload_type: PhantomData,
        }
    }

    /// Parses an envelope expected to carry a `T`. The length is checked against `T`'s limit
    /// before anything is decoded; the signature is not checked yet (see [`Signed::verify`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > Self::MAX_ENVELOPE {
            return Err(DecodeError::TooLarge {
                kind: T::KIND,
                len: bytes.len(),
                max: Self::MAX_ENVELOPE,
            });
        }
        check_format(bytes)?;
        let Some(signed_len) = bytes.len().checked_sub(SIGNATURE_LEN) else {
            return Err(DecodeError::Malformed {
                what: "envelope",
                detail: format!("{} bytes is shorter than a signature", bytes.len()),
            });
        };
        let signed = &bytes[..signed_len];
        let (head, rest) = postcard::take_from_bytes::<SignedHead<'_>>(signed)
            .map_err(|e| DecodeError::Malformed { what: "envelope", detail: e.to_string() })?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes { what: "envelope", extra: rest.len() });
        }
        let canonical_len = 1
            + varint_len(head.domain.len())
            + head.domain.len()
            + varint_len(head.signer.len())
            + head.signer.len()
            + varint_len(head.payload.len())
            + head.payload.len();
        if canonical_len != signed_len {
            return Err(non_canonical("envelope"));
        }
        let kind =
            ManifestKind::from_domain(head.domain).ok_or_else(|| DecodeError::Malformed {
                what: "envelope",
                detail: format!("unknown signature domain {:?}", head.domain),
            })?;
        let signer = InstanceId::from_bytes(head.signer)
            .map_err(|e| DecodeError::Malformed { what: "signer", detail: e.to_string() })?;
        // The payload is the last field of the signed bytes.
        let payload_start = signed_len - head.payload.len();
        Ok(Self {
            id: ManifestId(sha256(signed)),
            bytes: bytes.into(),
            kind,
            signer,
            payload: payload_start..signed_len,
            _payload_type: PhantomData,
        })
    }

    /// Checks everything a receiver must check before looking at the payload: the domain
    /// (it carries a `T`), the signature by the claimed signer, the protocol version, the
    /// content rules and the validity period at `now`. Replay is checked by
    /// [`Signed::verify_fresh`].
    pub fn verify(&self, now: Timestamp, opts: &VerifyOptions) -> Result<Verified<T>, VerifyError> {
        self.check(Some((now, opts)))
    }

    /// Everything [`Signed::verify`] checks except time: for a message that was verified when
    /// it arrived and is read back from storage after its validity period may have ended.
    /// Never use it for a message that has just arrived.
    pub fn verify_stored(&self) -> Result<Verified<T>, VerifyError> {
        self.check(None)
    }

    fn check(&self, time: Option<(Timestamp, &VerifyOptions)>) -> Result<Verified<T>, VerifyError> {
        if self.kind != T::KIND {
            return Err(VerifyError::WrongDomain { expected: T::KIND, found: self.kind });
        }
        let public = self
            .signer
            .ed25519_public_key()
            .ok_or_else(|| VerifyError::UnsupportedSignerKey { signer: self.signer.to_string() })?;
        let signed_len = self.bytes.len() - SIGNATURE_LEN;
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&self.bytes[signed_len..]);
        if !verify_ed25519(&public, &self.bytes[..signed_len], &signature) {
            return Err(VerifyError::BadSignature {
                kind: T::KIND,
                signer: self.signer.to_string(),
            });
        }
        let payload = decode_payload::<T>(&self.bytes[self.payload.clone()])?;
        let header = payload.header();
        if header.expires_at <= header.issued_at {
            return Err(VerifyError::Invalid {
                kind: T::KIND,
                source: ValidationError::ExpiresBeforeIssued {
                    issued_at: header.issued_at,
                    expires_at: header.expires_at,
                },
            });
        }
        let Some((now, opts)) = time else {
            payload.validate().map_err(|source| VerifyError::Invalid { kind: T::KIND, source })?;
            return Ok(Verified { signed: self.clone(), payload });
        };
        if header.issued_at > now.saturating_add(opts.max_clock_skew) {
            return Err(VerifyError::NotYetValid {
                kind: T::KIND,
                issued_at: header.issued_at,
                now,
            });
        }
        if now >= header.expires_at {
            return Err(VerifyError::Expired { kind: T::KIND, expires_at: header.expires_at, now });
        }
        let lifetime = header.expires_at.duration_since(header.issued_at);
        if lifetime > opts.max_lifetime {
            return Err(VerifyError::LifetimeTooLong {
                kind: T::KIND,
                lifetime_secs: lifetime.as_secs(),
                max_secs: opts.max_lifetime.as_secs(),
            });
        }
        payload.validate().map_err(|source| VerifyError::Invalid { kind: T::KIND, source })?;
        Ok(Verified { signed: self.clone(), payload })
    }

    /// [`Signed::verify`], then records the id in `window`; a second delivery of the same
    /// message before it expires is [`VerifyError::Replayed`]. Nothing is recorded for a
    /// message that fails verification.
    pub fn verify_fresh(
        &self,
        now: Timestamp,
        opts: &VerifyOptions,
        window: &mut ReplayWindow,
    ) -> Result<Verified<T>, VerifyError> {
        if window.contains(&self.id) {
            return Err(VerifyError::Replayed { id: self.id });
        }
        let verified = self.verify(now, opts)?;
        window.insert(self.id, verified.payload.header().expires_at, now)?;
        Ok(verified)
    }
}

impl<T> Signed<T> {
    /// The exact envelope bytes, as received or as sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The envelope bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// SHA-256 of the signed bytes (domain, signer, payload).
    pub const fn id(&self) -> ManifestId {
        self.id
    }

    /// The type the envelope claims to carry.
    pub const fn kind(&self) -> ManifestKind {
        self.kind
    }

    /// The signer the envelope *claims*; trustworthy only after [`Signed::verify`].
    pub const fn claimed_signer(&self) -> InstanceId {
        self.signer
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    crate::ids::Sha256Digest::of(data).0
}

/// The first byte must be the envelope format this build reads.
fn check_format(bytes: &[u8]) -> Result<(), DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Malformed { what: "envelope", detail: "empty message".into() }),
        Some(&f) if f != ENVELOPE_FORMAT => {
            Err(DecodeError::UnsupportedFormat { found: f, supported: ENVELOPE_FORMAT })
        }
        Some(_) => Ok(()),
    }
}

/// Reads the domain an envelope declares, checking only the format byte and the tag.
pub(crate) fn peek_kind(bytes: &[u8]) -> Result<ManifestKind, DecodeError> {
    check_format(bytes)?;
    let (domain, _) = postcard::take_from_bytes::<&str>(&bytes[1..])
        .map_err(|e| DecodeError::Malformed { what: "envelope", detail: e.to_string() })?;
    ManifestKind::from_domain(domain).ok_or_else(|| DecodeError::Malformed {
        what: "envelope",
        detail: format!("unknown signature domain {domain:?}"),
    })
}

/// Decodes a payload: version first (so an unknown version is named as such), then the
/// whole value, which must use every byte.
fn decode_payload<T: Manifest>(payload: &[u8]) -> Result<T, DecodeError> {
    let (version, _) = postcard::take_from_bytes::<u16>(payload)
        .map_err(|e| DecodeError::Malformed { what: "payload", detail: e.to_string() })?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            kind: T::KIND,
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let (value, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|e| DecodeError::Malformed { what: T::KIND.name(), detail: e.to_string() })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { what: T::KIND.name(), extra: rest.len() });
    }
    // postcard accepts overlong varints; a value's canonical encoding is its shortest, so any
    // other encoding of the same value is longer. One content, one id.
    if postcard::experimental::serialized_size(&value).ok() != Some(payload.len()) {
        return Err(non_canonical(T::KIND.name()));
    }
    Ok(value)
}

fn non_canonical(what: &'static str) -> DecodeError {
    DecodeError::Malformed {
        what,
        detail: "non-canonical encoding (overlong length or integer)".into(),
    }
}

/// Bytes postcard uses for the varint of `n`.
const fn varint_len(n: usize) -> usize {
    let mut len = 1;
    let mut n = n >> 7;
    while n > 0 {
        len += 1;
        n >>= 7;
    }
    len
}

/// A signed message that passed [`Signed::verify`]: the only way to its payload.
#[derive(Clone, Debug)]
pub struct Verified<T> {
    signed: Signed<T>,
    payload: T,
}

impl<T> Verified<T> {
    /// The verified payload.
    pub const fn payload(&self) -> &T {
        &self.payload
    }

    /// The verified payload, by value.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The instance whose key made the signature.
    pub const fn signer(&self) -> InstanceId {
        self.signed.signer
    }

    /// The message id.
    pub const fn id(&self) -> ManifestId {
        self.signed.id
    }

    /// The envelope, e.g. to store or forward its exact bytes.
    pub const fn signed(&self) -> &Signed<T> {
        &self.signed
    }

    /// Both parts.
    pub fn into_parts(self) -> (Signed<T>, T) {
        (self.signed, self.payload)
    }
}
