//! The instance's Ed25519 key and its key file.
//!
//! Key files hold PKCS#8 as PEM (`-----BEGIN PRIVATE KEY-----`, what `openssl genpkey
//! -algorithm ED25519` writes); [`Identity::load`] also accepts raw DER. They must be readable
//! by their owner only.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use kaapana_protocol::{InstanceId, SigningKey};

use crate::CertError;
use crate::cert::pem_block;

/// PEM tag of a PKCS#8 private key.
const PRIVATE_KEY_TAG: &str = "PRIVATE KEY";

/// The instance's Ed25519 key: it signs messages and certificates, and it is the libp2p
/// network key, so the [`InstanceId`] is the `PeerId`.
///
/// `Debug` shows the instance id only, never key material.
pub struct Identity {
    key: SigningKey,
    pkcs8: Vec<u8>,
    libp2p: libp2p_identity::Keypair,
}

impl Identity {
    /// Generates a new random identity.
    pub fn generate() -> Result<Self, CertError> {
        let der = SigningKey::generate_pkcs8()
            .map_err(|e| CertError::Generate { what: "a key", detail: e.to_string() })?;
        Self::from_pkcs8(&der)
    }

    /// Loads a key from PKCS#8 DER (v1, as OpenSSL writes it, or v2, as ring writes it).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CertError> {
        let invalid = |detail: String| CertError::InvalidKey { detail };
        let key = SigningKey::from_pkcs8(der).map_err(|e| invalid(e.to_string()))?;
        let mut seed =
            ed25519_seed(der).ok_or_else(|| invalid("unexpected PKCS#8 layout".into()))?;
        let libp2p = libp2p_identity::Keypair::ed25519_from_bytes(&mut seed)
            .map_err(|e| invalid(e.to_string()))?;
        if libp2p.public().to_peer_id() != key.instance_id().peer_id() {
            return Err(invalid("the embedded public key does not match the private key".into()));
        }
        Ok(Self { key, pkcs8: der.to_vec(), libp2p })
    }

    /// Loads a key file written by [`Identity::save`] (PEM) or holding PKCS#8 DER.
    ///
    /// Refuses a file that group or others may access ([`CertError::KeyFilePermissions`]).
    pub fn load(path: &Path) -> Result<Self, CertError> {
        Self::from_pkcs8(&read_key_file(path)?)
    }

    /// Writes the key to a new file with mode 0600, as PEM `PRIVATE KEY` (PKCS#8), and syncs
    /// the file and its directory. Never overwrites: an existing file is
    /// [`CertError::KeyFileExists`].
    pub fn save(&self, path: &Path) -> Result<(), CertError> {
        let text = pem_block(PRIVATE_KEY_TAG, &self.pkcs8);
        write_new_file(path, text.as_bytes(), 0o600).map_err(|e| match e {
            CertError::Io { path, source } if source.kind() == ErrorKind::AlreadyExists => {
                CertError::KeyFileExists { path }
            }
            e => e,
        })
    }

    /// The instance this key belongs to.
    pub fn instance_id(&self) -> InstanceId {
        self.key.instance_id()
    }

    /// The key that signs protocol messages.
    pub const fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.key.public_key()
    }

    /// The same key as a libp2p keypair: its `PeerId` is [`Identity::instance_id`].
    pub fn libp2p_keypair(&self) -> libp2p_identity::Keypair {
        self.libp2p.clone()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("instance", &self.instance_id()).finish_non_exhaustive()
    }
}

/// The 32-byte seed of an Ed25519 PKCS#8 document (RFC 8410): `SEQUENCE { INTEGER 0|1,
/// AlgorithmIdentifier { id-Ed25519 }, OCTET STRING { OCTET STRING (32) }, ... }`.
/// ring has already checked the whole document; this only locates the seed.
fn ed25519_seed(der: &[u8]) -> Option<[u8; 32]> {
    /// AlgorithmIdentifier { 1.3.101.112 }, OCTET STRING (34) { OCTET STRING (32) }.
    const SEED_HEADER: [u8; 11] =
        [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    match der {
        [0x30, _, 0x02, 0x01, 0 | 1, rest @ ..] => {
            rest.strip_prefix(&SEED_HEADER)?.get(..32)?.try_into().ok()
        }
        _ => None,
    }
}

/// Reads a private key file (PEM or DER) after checking that only its owner can access it.
pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>, CertError> {
    let mut file = File::open(path).map_err(CertError::io(path))?;
    let mode = file.metadata().map_err(CertError::io(path))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(CertError::KeyFilePermissions { path: path.to_owned(), mode: mode & 0o7777 });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(CertError::io(path))?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Ok(bytes);
    }
    let block = pem::parse(&bytes)
        .map_err(|e| CertError::InvalidKey { detail: format!("{}: {e}", path.display()) })?;
    if block.tag() != PRIVATE_KEY_TAG {
        return Err(CertError::InvalidKey {
            detail: format!(
                "{}: PEM block is `{}`, not `{PRIVATE_KEY_TAG}`",
                path.display(),
                block.tag()
            ),
        });
    }
    Ok(block.into_contents())
}

/// Creates `path` (failing if it exists) with `mode`, writes `bytes` and syncs the file and
/// its directory, so the file survives a crash once this returns.
pub(crate) fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(CertError::io(path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(CertError::io(path))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(CertError::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_found_in_v1_and_v2() {
        let v2 = SigningKey::generate_pkcs8().unwrap();
        assert_eq!(v2[..5], [0x30, 0x51, 0x02, 0x01, 0x01]);
        let seed = ed25519_seed(&v2).unwrap();
        let mut v1 = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
        v1.extend_from_slice(&[0x04, 0x22, 0x04, 0x20]);
        v1.extend_from_slice(&seed);
        let a = Identity::from_pkcs8(&v1).unwrap();
        let b = Identity::from_pkcs8(&v2).unwrap();
        assert_eq!(a.instance_id(), b.instance_id());
        assert!(ed25519_seed(&v1[..40]).is_none());
    }
}
