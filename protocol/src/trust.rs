//! Signed messages about trust itself: a federation CA's revocation list, and an instance's
//! hand-over from its old key to a new one.
//!
//! Both travel on `/kaapana/fed/1` like every other signed message, but their signer is
//! special: a [`RevocationList`] is signed by the *federation CA's* key (the receiver checks
//! the signer against the CA certificate it trusts, not against its registry), and a
//! [`KeyHandOver`] by the instance's *old* key, naming the new one inside a complete exchange
//! bundle (certificate and signed block of the new key, so the new key proves that it is
//! held). What a receiver does with them (cutting off revoked instances, re-registering a
//! rotated one) is the node's business.

use serde::{Deserialize, Serialize};

use crate::manifest::{MAX_TEXT_LEN, validate_count, validate_text};
use crate::{Header, InstanceId, Manifest, ManifestKind, Sha256Digest, ValidationError};

/// The most instances one revocation list names.
pub const MAX_REVOKED: usize = 2_000;
/// The largest exchange bundle a hand-over carries (PEM text).
pub const MAX_HANDOVER_BUNDLE: usize = 16 * 1024;

/// One revoked instance in a [`RevocationList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedInstance {
    /// The instance (its key): every certificate of this key is revoked.
    pub instance_id: InstanceId,
    /// The fingerprint (SHA-256 of the DER) of the certificate the CA issued, for people to
    /// compare; the revocation holds for the key whatever certificate it shows.
    pub certificate_sha256: Sha256Digest,
    /// Why (free text).
    pub reason: String,
}

/// A federation CA's list of revoked instances, signed with the CA's key.
///
/// Lists are numbered: a receiver adopts a list only if its `number` is higher than the one
/// it holds, and a revocation, once applied, stays (a later list that leaves an instance out
/// does not reinstate it; the site's admin registers it again by hand if wanted). The header's
/// expiry bounds how long a copy is passed on, as a CRL's next update does: the CA re-issues
/// the list before it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// Version, issue and expiry.
    pub header: Header,
    /// The CA's name (its certificate's CN), for messages.
    pub federation: String,
    /// Grows with every list the CA issues.
    pub number: u64,
    /// Every instance revoked so far.
    pub revoked: Vec<RevokedInstance>,
}

impl Manifest for RevocationList {
    const KIND: ManifestKind = ManifestKind::RevocationList;
    const MAX_PAYLOAD: usize = 512 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        validate_text("federation", &self.federation, MAX_TEXT_LEN)?;
        validate_count("revoked", &self.revoked, MAX_REVOKED)?;
        for r in &self.revoked {
            validate_text("reason", &r.reason, MAX_TEXT_LEN)?;
        }
        Ok(())
    }
}

/// An instance's hand-over to a new key, signed with its old key: "from now on I am the
/// instance of this bundle". Peers that have the old key registered replace its registration
/// by the new key's, keeping name and policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHandOver {
    /// Version, issue and expiry.
    pub header: Header,
    /// The new key's exchange bundle (PEM text, as `instance export` writes it), signed by
    /// the new key; its certificate must carry the same instance name.
    pub new_bundle: String,
    /// Why (free text), for the peers' audit logs.
    pub reason: String,
}

impl Manifest for KeyHandOver {
    const KIND: ManifestKind = ManifestKind::KeyHandOver;
    const MAX_PAYLOAD: usize = MAX_HANDOVER_BUNDLE + 2 * 1024;
    fn header(&self) -> &Header {
        &self.header
    }
    fn validate(&self) -> Result<(), ValidationError> {
        if self.new_bundle.len() > MAX_HANDOVER_BUNDLE {
            return Err(ValidationError::TooLong {
                field: "new_bundle",
                len: self.new_bundle.len(),
                max: MAX_HANDOVER_BUNDLE,
            });
        }
        validate_text("reason", &self.reason, MAX_TEXT_LEN)
    }
}
