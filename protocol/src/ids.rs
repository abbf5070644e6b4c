//! Identifiers: instances, manifests, workflows, jobs, content digests and image digests.

use std::fmt;
use std::str::FromStr;

use libp2p_identity::PeerId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ValidationError;

/// The identity of an instance: the libp2p `PeerId` derived from its Ed25519 key.
///
/// Network identity and instance identity are the same thing. An Ed25519 `PeerId` embeds the
/// public key itself (identity multihash), so a signature can be checked against an
/// `InstanceId` without any lookup.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(PeerId);

/// Protobuf prefix of an Ed25519 public key inside an identity-multihash `PeerId`:
/// field 1 (key type) = 1 (Ed25519), field 2 (data) of length 32.
const ED25519_PEER_ID_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];
/// Multihash code of the identity "hash".
const IDENTITY_MULTIHASH: u64 = 0x00;

impl InstanceId {
    /// The instance id of an Ed25519 public key.
    pub fn from_ed25519_public_key(public_key: &[u8; 32]) -> Result<Self, ValidationError> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(public_key)
            .map_err(|_| ValidationError::InvalidPublicKey)?;
        Ok(Self(libp2p_identity::PublicKey::from(key).to_peer_id()))
    }

    /// Wraps a libp2p `PeerId`.
    pub const fn from_peer_id(peer_id: PeerId) -> Self {
        Self(peer_id)
    }

    /// The libp2p `PeerId`.
    pub const fn peer_id(&self) -> PeerId {
        self.0
    }

    /// The raw Ed25519 public key embedded in this id, or `None` when the id is not an
    /// identity-multihash Ed25519 `PeerId` (e.g. an RSA peer's SHA-256 based id).
    ///
    /// This only slices bytes; the point is decompressed when a signature is checked.
    pub fn ed25519_public_key(&self) -> Option<[u8; 32]> {
        let mh = self.0.as_ref();
        if mh.code() != IDENTITY_MULTIHASH {
            return None;
        }
        let digest = mh.digest();
        let rest = digest.strip_prefix(&ED25519_PEER_ID_PREFIX)?;
        rest.try_into().ok()
    }

    /// The binary form (multihash bytes), as carried on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// Parses the binary form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
        PeerId::from_bytes(bytes).map(Self).map_err(|_| ValidationError::InvalidInstanceId)
    }
}

impl From<PeerId> for InstanceId {
    fn from(p: PeerId) -> Self {
        Self(p)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({})", self.0)
    }
}

impl FromStr for InstanceId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PeerId::from_str(s).map(Self).map_err(|_| ValidationError::InvalidInstanceId)
    }
}

impl Serialize for InstanceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.to_bytes())
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = InstanceId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the bytes of a libp2p PeerId")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<InstanceId, E> {
                InstanceId::from_bytes(v).map_err(E::custom)
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A SHA-256 digest, shown as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    /// The 64 lowercase hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses `sha256:<64 hex>`.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let hexpart = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ValidationError::BadDigest { value: s.to_owned() })?;
        parse_hex_array::<32>(hexpart)
            .map(Self)
            .ok_or_else(|| ValidationError::BadDigest { value: s.to_owned() })
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Sha256Digest {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A container image, pinned by the SHA-256 digest of its manifest.
///
/// Only digests can be expressed: a signed job manifest pins exactly the code that will run.
/// Parsing a tag (`busybox:latest`, `registry/x`) is a [`ValidationError::ImageTag`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageDigest(pub Sha256Digest);

impl ImageDigest {
    /// Parses `sha256:<64 hex>`; also accepts `name@sha256:<64 hex>` and keeps the digest.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let digest_part = match s.rsplit_once('@') {
            Some((_, d)) => d,
            None => s,
        };
        if !digest_part.starts_with("sha256:") {
            return Err(ValidationError::ImageTag { reference: s.to_owned() });
        }
        Sha256Digest::parse(digest_part)
            .map(Self)
            .map_err(|_| ValidationError::BadImageDigest { reference: s.to_owned() })
    }

    /// The digest.
    pub const fn digest(&self) -> Sha256Digest {
        self.0
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageDigest({})", self.0)
    }
}

impl FromStr for ImageDigest {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// The id made of these bytes (the caller supplies randomness).
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), hex(&self.0))
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex_array::<$len>(s).map(Self).ok_or_else(|| ValidationError::BadId {
                    kind: stringify!($name),
                    value: s.to_owned(),
                })
            }
        }
    };
}

random_id!(
    /// The id of a signed message: SHA-256 of its domain tag and payload bytes.
    ManifestId,
    32
);
random_id!(
    /// A workflow's id, chosen by its owner.
    WorkflowId,
    16
);
random_id!(
    /// A job's id (one run at one runner-instance), chosen by the workflow's owner.
    JobId,
    16
);

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn parse_hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0])?;
        let lo = hex_val(pair[1])?;
        out[i] = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn image_digest_accepts_digests_only() {
        let d = ImageDigest::parse(D).unwrap();
        assert_eq!(d.to_string(), D);
        assert_eq!(ImageDigest::parse(&format!("busybox@{D}")).unwrap(), d);
        assert!(matches!(
            ImageDigest::parse("busybox:latest"),
            Err(ValidationError::ImageTag { .. })
        ));
        assert!(matches!(
            ImageDigest::parse("registry.local/kaapana/stats"),
            Err(ValidationError::ImageTag { .. })
        ));
        assert!(matches!(
            ImageDigest::parse("sha256:abc"),
            Err(ValidationError::BadImageDigest { .. })
        ));
        // Uppercase hex is not canonical.
        assert!(ImageDigest::parse(&D.to_uppercase().replace("SHA256", "sha256")).is_err());
    }

    #[test]
    fn ids_round_trip_as_hex() {
        let id = JobId::from_bytes([7; 16]);
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("zz".parse::<JobId>().is_err());
    }

    #[test]
    fn instance_id_embeds_public_key() {
        let pk = [
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ];
        let id = InstanceId::from_ed25519_public_key(&pk).unwrap();
        assert_eq!(id.ed25519_public_key(), Some(pk));
        assert_eq!(id.to_string().parse::<InstanceId>().unwrap(), id);
        assert_eq!(InstanceId::from_bytes(&id.to_bytes()).unwrap(), id);
    }
}
