//! A federation CA: for consortia that provision instances centrally.

use std::fmt;
use std::path::Path;

use kaapana_protocol::Timestamp;
use rcgen::Issuer;

use crate::cert::{RawPublicKey, RcgenKey, params};
use crate::identity::write_new_file;
use crate::{CaCertificate, CertError, Identity, InstanceCertificate};

/// File name of the CA key inside its directory (PEM PKCS#8, mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CA certificate inside its directory (PEM).
pub const CA_CERT_FILE: &str = "ca.crt";

/// A CA key (Ed25519) and its self-signed CA certificate. `Debug` never shows the key.
pub struct FederationCa {
    key: Identity,
    certificate: CaCertificate,
}

impl FederationCa {
    /// Generates a CA key and a self-signed CA certificate named `name`.
    pub fn generate(
        name: &str,
        not_before: Timestamp,
        not_after: Timestamp,
    ) -> Result<Self, CertError> {
        let key = Identity::generate()?;
        let cert = params(name, not_before, not_after, None)?
            .self_signed(&RcgenKey(key.signing_key()))
            .map_err(CertError::generate("a CA certificate"))?;
        let certificate = CaCertificate::from_der(cert.der().to_vec())?;
        Ok(Self { key, certificate })
    }

    /// Writes `ca.key` (mode 0600) and `ca.crt` into `dir`, creating it if needed. Refuses to
    /// overwrite an existing key ([`CertError::KeyFileExists`]).
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        std::fs::create_dir_all(dir).map_err(CertError::io(dir))?;
        self.key.save(&dir.join(CA_KEY_FILE))?;
        write_new_file(&dir.join(CA_CERT_FILE), self.certificate.to_pem().as_bytes(), 0o644)
    }

    /// Reads `ca.key` and `ca.crt` from `dir` and checks that they belong together.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let key = Identity::load(&key_path)?;
        let text = std::fs::read_to_string(&cert_path).map_err(CertError::io(&cert_path))?;
        let certificate = CaCertificate::from_pem(&text)?;
        if certificate.public_key() != key.public_key() {
            return Err(CertError::CaKeyMismatch { path: key_path });
        }
        Ok(Self { key, certificate })
    }

    /// The CA certificate, to hand to every member as [`crate::Trust::FederationCa`].
    pub const fn certificate(&self) -> &CaCertificate {
        &self.certificate
    }

    /// The CA's signing key, for what the CA signs beyond certificates (its revocation
    /// lists).
    pub const fn signing_key(&self) -> &kaapana_protocol::SigningKey {
        self.key.signing_key()
    }

    /// Issues an instance certificate for `public_key` (the CA never sees the instance's
    /// private key), named `name`, valid from `not_before` to `not_after`.
    pub fn sign_instance(
        &self,
        public_key: &[u8; 32],
        name: &str,
        not_before: Timestamp,
        not_after: Timestamp,
    ) -> Result<InstanceCertificate, CertError> {
        let instance = kaapana_protocol::InstanceId::from_ed25519_public_key(public_key)
            .map_err(|e| CertError::InvalidKey { detail: e.to_string() })?;
        let mut params = params(name, not_before, not_after, Some(instance))?;
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_ca_cert_der(
            &self.certificate.der().into(),
            RcgenKey(self.key.signing_key()),
        )
        .map_err(CertError::generate("an issuer from the CA certificate"))?;
        let cert = params
            .signed_by(&RawPublicKey(*public_key), &issuer)
            .map_err(CertError::generate("an instance certificate"))?;
        InstanceCertificate::from_der(cert.der().to_vec())
    }
}

impl fmt::Debug for FederationCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FederationCa")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}
