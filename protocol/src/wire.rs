//! The `/kaapana/fed/1` protocol: batches of signed messages and per-message verdicts.
//!
//! A request carries envelopes in the order the sender queued them; the receiver verifies and
//! durably records each one before it answers, and answers every message with a [`Delivery`].
//! A sender treats [`Delivery::Accepted`] and a [`RejectReason::Replayed`] rejection (the
//! receiver already has it) as delivered: delivery is exactly-once from the receiver's point
//! of view.

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, VerifyError};
use crate::ids::{InstanceId, ManifestId};
use crate::manifest::{
    Cancel, CapabilityAd, JobManifest, JobUpdate, ResultManifest, WorkflowManifest,
};
use crate::replay::ReplayWindow;
use crate::signed::{Manifest, ManifestKind, Signed, Verified, VerifyOptions};
use crate::time::Timestamp;
use crate::trust::{KeyHandOver, RevocationList};

/// The libp2p protocol name of federation messages.
pub const FED_PROTOCOL: &str = "/kaapana/fed/1";
/// The largest request frame (a batch of envelopes) a receiver reads.
pub const MAX_FED_REQUEST: usize = 4 * 1024 * 1024;
/// The largest response frame.
pub const MAX_FED_RESPONSE: usize = 1024 * 1024;
/// The most envelopes in one request.
pub const MAX_BATCH: usize = 1024;

/// A batch of envelopes, in the sender's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FedRequest {
    /// The envelopes' exact bytes.
    #[serde(with = "byte_vecs")]
    pub messages: Vec<Vec<u8>>,
}

/// `Vec<Vec<u8>>` as a sequence of byte strings. postcard writes a byte string exactly like a
/// sequence of `u8` (length, then the bytes), so the wire format is the same as the derived
/// one; only the per-byte visitor calls are gone.
mod byte_vecs {
    use std::fmt;

    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    /// Serializes each inner vector with `serialize_bytes`.
    pub(super) fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for bytes in v {
            seq.serialize_element(&BytesRef(bytes))?;
        }
        seq.end()
    }

    /// Deserializes a sequence of byte strings.
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        struct Outer;
        impl<'de> Visitor<'de> for Outer {
            type Value = Vec<Vec<u8>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of byte strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // The length comes from the peer: grow as elements arrive, not up front.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(ByteBuf(b)) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Outer)
    }

    /// A borrowed byte string that serializes with `serialize_bytes`.
    #[derive(Debug)]
    struct BytesRef<'a>(&'a [u8]);

    impl serde::Serialize for BytesRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    /// An owned byte string read with `deserialize_byte_buf`.
    #[derive(Debug)]
    struct ByteBuf(Vec<u8>);

    impl<'de> serde::Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

/// The receiver's answer to a [`FedRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FedResponse {
    /// One verdict per message, in the request's order.
    Results(Vec<Delivery>),
    /// The whole request was refused (too large, malformed, too many messages).
    Refused {
        /// Why.
        reason: RejectReason,
        /// Details for the log.
        detail: String,
    },
}

/// The verdict on one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// Verified and durably recorded.
    Accepted,
    /// Not recorded, for this reason.
    Rejected {
        /// Why, as a countable reason.
        reason: RejectReason,
        /// The receiver's full message.
        detail: String,
    },
}

/// Why a message (or a whole request) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// Larger than its type's or the frame's limit.
    Oversized,
    /// Not decodable.
    Malformed,
    /// A protocol version the receiver does not speak.
    UnsupportedVersion,
    /// A message type that is not accepted on this protocol.
    UnsupportedKind,
    /// A message of one type presented as another.
    WrongDomain,
    /// The signature does not verify.
    BadSignature,
    /// The signer is neither the connected peer nor a registered instance.
    UnknownSigner,
    /// Well-formed but not acceptable content.
    Invalid,
    /// Past its `expires_at`.
    Expired,
    /// `issued_at` is in the receiver's future beyond the allowed skew.
    NotYetValid,
    /// Valid for longer than the receiver accepts.
    LifetimeTooLong,
    /// Already received (a sender treats this as delivered).
    Replayed,
    /// The receiver cannot take it now; the sender retries later.
    Overloaded,
    /// The receiver failed to record it; the sender retries later.
    Internal,
    /// A job message about a job the sender has no part in (an update or result for a job
    /// the receiver did not send it, a manifest or cancel from someone not the job's owner).
    NotYourJob,
    /// The sender has as much recorded at the receiver as it may (inbox entries or bytes,
    /// unexpired message ids); the sender retries later, once retention made room.
    QuotaExceeded,
}

impl RejectReason {
    /// A short, stable label for metrics (`rejections_total{reason="expired"}`).
    pub const fn label(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnsupportedKind => "unsupported_kind",
            Self::WrongDomain => "wrong_domain",
            Self::BadSignature => "bad_signature",
            Self::UnknownSigner => "unknown_signer",
            Self::Invalid => "invalid",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::Replayed => "replayed",
            Self::Overloaded => "overloaded",
            Self::Internal => "internal",
            Self::NotYourJob => "not_your_job",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }

    /// Every reason, for pre-registering metrics.
    pub const ALL: [Self; 16] = [
        Self::Oversized,
        Self::Malformed,
        Self::UnsupportedVersion,
        Self::UnsupportedKind,
        Self::WrongDomain,
        Self::BadSignature,
        Self::UnknownSigner,
        Self::Invalid,
        Self::Expired,
        Self::NotYetValid,
        Self::LifetimeTooLong,
        Self::Replayed,
        Self::Overloaded,
        Self::Internal,
        Self::NotYourJob,
        Self::QuotaExceeded,
    ];

    /// Whether the sender should try the same message again later.
    pub const fn is_transient(self) -> bool {
        matches!(self, Self::Overloaded | Self::Internal | Self::QuotaExceeded)
    }
}

impl From<&DecodeError> for RejectReason {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::TooLarge { .. } => Self::Oversized,
            DecodeError::UnsupportedVersion { .. } => Self::UnsupportedVersion,
            _ => Self::Malformed,
        }
    }
}

impl From<&VerifyError> for RejectReason {
    fn from(e: &VerifyError) -> Self {
        match e {
            VerifyError::Decode(d) => d.into(),
            VerifyError::WrongDomain { .. } => Self::WrongDomain,
            VerifyError::UnsupportedSignerKey { .. } | VerifyError::BadSignature { .. } => {
                Self::BadSignature
            }
            VerifyError::Invalid { .. } => Self::Invalid,
            VerifyError::Expired { .. } => Self::Expired,
            VerifyError::NotYetValid { .. } => Self::NotYetValid,
            VerifyError::LifetimeTooLong { .. } => Self::LifetimeTooLong,
            VerifyError::Replayed { .. } => Self::Replayed,
            VerifyError::ReplayWindowFull { .. } => Self::Overloaded,
            VerifyError::SignerWindowFull { .. } => Self::QuotaExceeded,
        }
    }
}

/// Reads the kind an envelope claims without decoding the rest.
pub fn peek_kind(bytes: &[u8]) -> Result<ManifestKind, DecodeError> {
    crate::signed::peek_kind(bytes)
}

macro_rules! any_signed {
    ($($kind:ident),* $(,)?) => {
        /// A signed message of any type that travels on `/kaapana/fed/1`.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum AnySigned {
            $(
                #[doc = concat!("A signed [`", stringify!($kind), "`].")]
                $kind(Signed<$kind>),
            )*
        }

        /// A verified message of any type.
        // Short-lived (verify, record, apply): boxing the large variants buys nothing.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug)]
        pub enum AnyVerified {
            $(
                #[doc = concat!("A verified [`", stringify!($kind), "`].")]
                $kind(Verified<$kind>),
            )*
        }

        impl AnySigned {
            /// Parses an envelope of whatever type it declares (bounded by that type's limit).
            pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
                match peek_kind(bytes)? {
                    $(ManifestKind::$kind => Signed::<$kind>::from_bytes(bytes).map(Self::$kind),)*
                    other => Err(DecodeError::Malformed {
                        what: "envelope",
                        detail: format!("{other} messages are not sent on {FED_PROTOCOL}"),
                    }),
                }
            }

            /// The envelope bytes.
            pub fn as_bytes(&self) -> &[u8] {
                match self { $(Self::$kind(s) => s.as_bytes(),)* }
            }

            /// The message id.
            pub fn id(&self) -> ManifestId {
                match self { $(Self::$kind(s) => s.id(),)* }
            }

            /// The message type.
            pub fn kind(&self) -> ManifestKind {
                match self { $(Self::$kind(s) => s.kind(),)* }
            }

            /// The signer the envelope claims.
            pub fn claimed_signer(&self) -> InstanceId {
                match self { $(Self::$kind(s) => s.claimed_signer(),)* }
            }

            /// [`Signed::verify`] for whichever type it is.
            pub fn verify(&self, now: Timestamp, opts: &VerifyOptions) -> Result<AnyVerified, VerifyError> {
                match self { $(Self::$kind(s) => s.verify(now, opts).map(AnyVerified::$kind),)* }
            }

            /// [`Signed::verify_fresh`] for whichever type it is.
            pub fn verify_fresh(
                &self,
                now: Timestamp,
                opts: &VerifyOptions,
                window: &mut ReplayWindow,
            ) -> Result<AnyVerified, VerifyError> {
                match self { $(Self::$kind(s) => s.verify_fresh(now, opts, window).map(AnyVerified::$kind),)* }
            }
        }

        impl AnyVerified {
            /// The message id.
            pub fn id(&self) -> ManifestId {
                match self { $(Self::$kind(v) => v.id(),)* }
            }

            /// The verified signer.
            pub fn signer(&self) -> InstanceId {
                match self { $(Self::$kind(v) => v.signer(),)* }
            }

            /// The message type.
            pub fn kind(&self) -> ManifestKind {
                match self { $(Self::$kind(_) => <$kind as Manifest>::KIND,)* }
            }

            /// When it expires.
            pub fn expires_at(&self) -> Timestamp {
                match self { $(Self::$kind(v) => v.payload().header().expires_at,)* }
            }

            /// The envelope bytes.
            pub fn as_bytes(&self) -> &[u8] {
                match self { $(Self::$kind(v) => v.signed().as_bytes(),)* }
            }
        }

        $(
            impl From<Signed<$kind>> for AnySigned {
                fn from(s: Signed<$kind>) -> Self {
                    Self::$kind(s)
                }
            }
        )*
    };
}

any_signed!(
    CapabilityAd,
    WorkflowManifest,
    JobManifest,
    JobUpdate,
    ResultManifest,
    Cancel,
    RevocationList,
    KeyHandOver,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_string_encoding_matches_the_derived_layout() {
        #[derive(Serialize)]
        struct Derived {
            messages: Vec<Vec<u8>>,
        }
        let messages = vec![vec![1, 2, 3], vec![], vec![0xff; 300]];
        let ours = postcard::to_allocvec(&FedRequest { messages: messages.clone() }).unwrap();
        let derived = postcard::to_allocvec(&Derived { messages: messages.clone() }).unwrap();
        assert_eq!(ours, derived);
        let back: FedRequest = postcard::from_bytes(&ours).unwrap();
        assert_eq!(back.messages, messages);
        // A length field far beyond the input fails without allocating it.
        assert!(postcard::from_bytes::<FedRequest>(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1]).is_err());
    }
}
