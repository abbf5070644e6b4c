//! The signing half of an instance identity.
//!
//! Persistence (file modes, certificates) is `kaapana-certs`' job; this type only signs.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::ids::InstanceId;

/// Why a key could not be created or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not an Ed25519 PKCS#8 document.
    #[error("not an Ed25519 private key in PKCS#8 form: {0}")]
    NotPkcs8Ed25519(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
}

/// An Ed25519 key pair that signs on behalf of one instance.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: [u8; 32],
    instance: InstanceId,
}

impl SigningKey {
    /// Generates a new key and returns its PKCS#8 (v2) encoding, to be stored by the caller.
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| KeyError::Rng)
    }

    /// Loads a key from PKCS#8 (v1 or v2) DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::NotPkcs8Ed25519(e.to_string()))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        let instance = InstanceId::from_ed25519_public_key(&public)
            .map_err(|e| KeyError::NotPkcs8Ed25519(e.to_string()))?;
        Ok(Self { pair, public, instance })
    }

    /// The instance this key signs for.
    pub const fn instance_id(&self) -> InstanceId {
        self.instance
    }

    /// The raw Ed25519 public key.
    pub const fn public_key(&self) -> &[u8; 32] {
        &self.public
    }

    /// Signs `message` as it is (no domain tag: callers add their own).
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        let sig = self.pair.sign(message);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        out
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("instance", &self.instance).finish_non_exhaustive()
    }
}

/// Checks an Ed25519 signature with ring.
pub fn verify_ed25519(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}
