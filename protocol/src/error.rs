//! Errors at the protocol boundary: one enum per operation, each variant actionable.

use crate::ids::ManifestId;
use crate::signed::ManifestKind;
use crate::time::Timestamp;

/// A value that is well-formed on the wire but not acceptable (a tag instead of a digest,
/// a job that names an unknown input, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// An image was named by tag; the protocol pins code by digest.
    #[error(
        "image `{reference}` is a tag; images are referenced by digest only (sha256:<64 hex>), so a signed manifest pins exactly the code that runs"
    )]
    ImageTag {
        /// What was given.
        reference: String,
    },
    /// `sha256:` followed by something other than 64 lowercase hex digits.
    #[error("image digest `{reference}` is malformed: expected sha256:<64 lowercase hex digits>")]
    BadImageDigest {
        /// What was given.
        reference: String,
    },
    /// A content digest that is not `sha256:<64 hex>`.
    #[error("digest `{value}` is malformed: expected sha256:<64 lowercase hex digits>")]
    BadDigest {
        /// What was given.
        value: String,
    },
    /// An id that is not the expected number of hex digits.
    #[error("`{value}` is not a valid {kind} (lowercase hex)")]
    BadId {
        /// Which kind of id.
        kind: &'static str,
        /// What was given.
        value: String,
    },
    /// Bytes that are not a libp2p PeerId.
    #[error("not a valid instance id (libp2p PeerId)")]
    InvalidInstanceId,
    /// 32 bytes that are not an Ed25519 public key.
    #[error("not a valid Ed25519 public key")]
    InvalidPublicKey,
    /// A name that is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error(
        "{field} `{value}` is not a valid name: use 1 to {max} characters from A-Z a-z 0-9 . _ - , not starting with . or -"
    )]
    BadName {
        /// Which field.
        field: &'static str,
        /// What was given.
        value: String,
        /// The maximum length.
        max: usize,
    },
    /// A list longer than its bound.
    #[error("{field} has {len} entries; at most {max} are allowed")]
    TooMany {
        /// Which field.
        field: &'static str,
        /// How many were given.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A text field longer than its bound.
    #[error("{field} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// `expires_at` is not after `issued_at`.
    #[error("expires_at ({expires_at}) is not after issued_at ({issued_at})")]
    ExpiresBeforeIssued {
        /// When it was issued.
        issued_at: Timestamp,
        /// When it expires.
        expires_at: Timestamp,
    },
    /// Two jobs of one workflow have the same name.
    #[error("workflow has two jobs named `{name}`")]
    DuplicateJob {
        /// The name.
        name: String,
    },
    /// A job lists an input that is no job of the workflow.
    #[error("job `{job}` takes input from `{input}`, which is not a job of this workflow")]
    UnknownInput {
        /// The job.
        job: String,
        /// The missing input.
        input: String,
    },
    /// The jobs' inputs form a cycle.
    #[error("the workflow's jobs depend on each other in a cycle (involving `{job}`)")]
    Cycle {
        /// A job on the cycle.
        job: String,
    },
    /// A training's rounds are inconsistent with its jobs or out of range.
    #[error("rounds: {detail}")]
    BadRounds {
        /// What is wrong, in words.
        detail: String,
    },
    /// A numeric field outside its range.
    #[error("{field} must be {expected}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The accepted range, in words.
        expected: &'static str,
    },
}

/// Bytes that cannot be decoded as the expected message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Longer than the maximum for this message type; checked before decoding.
    #[error("{kind} message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The expected message type.
        kind: ManifestKind,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An envelope format this build does not know.
    #[error("unknown envelope format {found} (this node understands format {supported})")]
    UnsupportedFormat {
        /// The format byte found.
        found: u8,
        /// The format this node writes.
        supported: u8,
    },
    /// A message kind byte that names no known message type.
    #[error("unknown message kind {found}")]
    UnknownKind {
        /// The kind byte found.
        found: u8,
    },
    /// A payload written for a protocol version this build does not speak.
    #[error(
        "{kind} uses protocol version {found}, but this node speaks version {supported}; upgrade the older node"
    )]
    UnsupportedVersion {
        /// The message type.
        kind: ManifestKind,
        /// The version found.
        found: u16,
        /// The version this node speaks.
        supported: u16,
    },
    /// The bytes do not follow the postcard layout of the expected type.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// Bytes left over after a complete value (the encoding is canonical: no padding).
    #[error("{extra} unexpected bytes after the end of the {what}")]
    TrailingBytes {
        /// What was decoded.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

/// A message that cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The payload fails validation; nothing is signed.
    #[error("refusing to sign an invalid {kind}: {source}")]
    Invalid {
        /// The message type.
        kind: ManifestKind,
        /// Why.
        #[source]
        source: ValidationError,
    },
    /// The encoded payload exceeds the type's limit; a receiver would reject it.
    #[error("{kind} payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The message type.
        kind: ManifestKind,
        /// The encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// serde could not encode the value.
    #[error("cannot encode {kind}: {detail}")]
    Serialize {
        /// The message type.
        kind: ManifestKind,
        /// The encoder's message.
        detail: String,
    },
}

/// Why a signed message was rejected. Each variant is a distinct, countable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The bytes could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message of one type presented as another (e.g. a `JobManifest` as a `ResultManifest`).
    #[error("wrong domain: expected a signed {expected}, got a signed {found}")]
    WrongDomain {
        /// The type the receiver expected.
        expected: ManifestKind,
        /// The type the envelope says it carries.
        found: ManifestKind,
    },
    /// The signer's id does not embed an Ed25519 key.
    #[error("signer {signer} does not have an Ed25519 identity; only Ed25519 instances can sign")]
    UnsupportedSignerKey {
        /// The claimed signer, as text.
        signer: String,
    },
    /// The signature does not match the signer, domain and payload: tampered or forged.
    #[error("bad signature: the {kind} was not signed by {signer} or was altered after signing")]
    BadSignature {
        /// The message type.
        kind: ManifestKind,
        /// The claimed signer, as text.
        signer: String,
    },
    /// The payload is well-formed but not acceptable.
    #[error("invalid {kind}: {source}")]
    Invalid {
        /// The message type.
        kind: ManifestKind,
        /// Why.
        #[source]
        source: ValidationError,
    },
    /// `expires_at` has passed.
    #[error("expired: the {kind} expired at {expires_at}, it is now {now}")]
    Expired {
        /// The message type.
        kind: ManifestKind,
        /// When it expired.
        expires_at: Timestamp,
        /// The receiver's clock.
        now: Timestamp,
    },
    /// `issued_at` lies further in the future than the allowed clock skew.
    #[error(
        "not yet valid: the {kind} was issued at {issued_at}, it is now {now} (check both clocks)"
    )]
    NotYetValid {
        /// The message type.
        kind: ManifestKind,
        /// When it claims to be issued.
        issued_at: Timestamp,
        /// The receiver's clock.
        now: Timestamp,
    },
    /// The lifetime from `issued_at` to `expires_at` exceeds what the receiver accepts
    /// (the replay window must be able to remember the id until it expires).
    #[error("the {kind} is valid for {lifetime_secs} s; at most {max_secs} s are accepted")]
    LifetimeTooLong {
        /// The message type.
        kind: ManifestKind,
        /// Its lifetime.
        lifetime_secs: u64,
        /// The limit.
        max_secs: u64,
    },
    /// The same message was seen before and has not expired yet.
    #[error("replayed: message {id} was already received")]
    Replayed {
        /// Its id.
        id: ManifestId,
    },
    /// The replay window holds as many ids as it may; the message is refused rather than
    /// risking a replay going unnoticed.
    #[error("replay window full ({capacity} unexpired ids); try again later")]
    ReplayWindowFull {
        /// Its capacity.
        capacity: usize,
    },
    /// The replay window holds as many unexpired ids of this signer as it may take from one
    /// signer; its messages are refused until some of its ids expire.
    #[error(
        "{signer} has {capacity} unexpired messages recorded here, the most one instance may have; try again once some expire"
    )]
    SignerWindowFull {
        /// The signer.
        signer: crate::ids::InstanceId,
        /// Its share of the window.
        capacity: usize,
    },
}

impl VerifyError {
    /// A short, stable label for metrics and logs (`rejections{reason="expired"}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(DecodeError::TooLarge { .. }) => "oversized",
            Self::Decode(DecodeError::UnsupportedVersion { .. }) => "unsupported_version",
            Self::Decode(_) => "malformed",
            Self::WrongDomain { .. } => "wrong_domain",
            Self::UnsupportedSignerKey { .. } => "unsupported_key",
            Self::BadSignature { .. } => "bad_signature",
            Self::Invalid { .. } => "invalid",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::LifetimeTooLong { .. } => "lifetime_too_long",
            Self::Replayed { .. } => "replayed",
            Self::ReplayWindowFull { .. } => "replay_window_full",
            Self::SignerWindowFull { .. } => "signer_window_full",
        }
    }
}
