//! Exchange bundles: what one site hands another to register with it.
//!
//! A bundle is PEM text: a few `#` comment lines, a `CERTIFICATE` block (so `openssl x509
//! -in FILE -noout -text` shows it) and a `KAAPANA INSTANCE BUNDLE` block holding a
//! [`Signed<InstanceBundleInfo>`] (display name, listen addresses, SHA-256 of the
//! certificate), signed by the certificate's key.

use std::time::Duration;

use kaapana_protocol::{
    Header, InstanceBundleInfo, InstanceId, Sha256Digest, Signed, Timestamp, Verified,
    VerifyOptions,
};

use crate::cert::pem_block;
use crate::{CertError, Fingerprint, Identity, InstanceCertificate, Trust};

/// PEM tag of the signed block.
pub const BUNDLE_TAG: &str = "KAAPANA INSTANCE BUNDLE";
/// The longest bundle lifetime accepted (and made): 20 years, to cover certificate lifetimes.
pub const MAX_BUNDLE_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// A parsed and verified exchange bundle.
#[derive(Clone, Debug)]
pub struct ExchangeBundle {
    certificate: InstanceCertificate,
    info: Verified<InstanceBundleInfo>,
}

impl ExchangeBundle {
    /// Writes the bundle for `identity` and its `certificate`. The signed part is valid from
    /// `now` until the certificate expires (at most [`MAX_BUNDLE_LIFETIME`]).
    pub fn create(
        identity: &Identity,
        certificate: &InstanceCertificate,
        display_name: &str,
        listen_addrs: Vec<String>,
        now: Timestamp,
    ) -> Result<String, CertError> {
        certificate.check_identity(identity)?;
        if now >= certificate.not_after() {
            return Err(CertError::Expired {
                name: certificate.name().to_owned(),
                not_after: certificate.not_after(),
                now,
            });
        }
        let lifetime = certificate.not_after().duration_since(now).min(MAX_BUNDLE_LIFETIME);
        let info = InstanceBundleInfo {
            header: Header::new(now, lifetime),
            display_name: display_name.to_owned(),
            listen_addrs,
            certificate_sha256: Sha256Digest::of(certificate.der()),
        };
        let signed =
            Signed::sign(identity.signing_key(), &info).map_err(CertError::BundleEncode)?;
        // Signing validated the display name: it has no control characters (no newlines).
        let mut text = format!(
            "# kaapana-node instance bundle for {display_name}\n\
             # instance name: {}\n\
             # instance id:   {}\n\
             # fingerprint:   {}\n\
             # valid until:   {}\n\
             # Register it with `kaapana-node instance add FILE` and confirm the fingerprint\n\
             # with its owner by phone.\n",
            certificate.name().escape_debug(),
            certificate.instance_id(),
            certificate.fingerprint(),
            info.header.expires_at,
        );
        text.push_str(&certificate.to_pem());
        text.push_str(&pem_block(BUNDLE_TAG, signed.as_bytes()));
        Ok(text)
    }

    /// Parses a bundle and checks it at `now`: the certificate under `trust` (dates,
    /// issuer, signature, SAN = key), then the signed block (signature, expiry), that the
    /// certificate's key signed it and that it names this very certificate.
    pub fn parse_and_verify(text: &str, now: Timestamp, trust: &Trust) -> Result<Self, CertError> {
        let malformed = |detail: String| CertError::BundleMalformed { detail };
        let blocks = pem::parse_many(text).map_err(|e| malformed(e.to_string()))?;
        let [cert_block, bundle_block] = blocks.as_slice() else {
            return Err(malformed(format!("expected 2 PEM blocks, found {}", blocks.len())));
        };
        if cert_block.tag() != "CERTIFICATE" || bundle_block.tag() != BUNDLE_TAG {
            return Err(malformed(format!(
                "expected blocks `CERTIFICATE` and `{BUNDLE_TAG}`, found `{}` and `{}`",
                cert_block.tag(),
                bundle_block.tag()
            )));
        }
        let certificate = InstanceCertificate::from_der(cert_block.contents().to_vec())?;
        certificate.verify(now, trust)?;
        let signed = Signed::<InstanceBundleInfo>::from_bytes(bundle_block.contents())
            .map_err(|e| malformed(e.to_string()))?;
        if signed.claimed_signer() != certificate.instance_id() {
            return Err(CertError::BundleSignerMismatch {
                signer: signed.claimed_signer().to_string(),
                certificate: certificate.instance_id().to_string(),
            });
        }
        let opts = VerifyOptions { max_lifetime: MAX_BUNDLE_LIFETIME, ..VerifyOptions::default() };
        let info = signed.verify(now, &opts).map_err(CertError::BundleSignature)?;
        if info.payload().certificate_sha256 != Sha256Digest::of(certificate.der()) {
            return Err(CertError::BundleCertificateMismatch);
        }
        Ok(Self { certificate, info })
    }

    /// The verified certificate.
    pub const fn certificate(&self) -> &InstanceCertificate {
        &self.certificate
    }

    /// The instance the bundle describes.
    pub const fn instance_id(&self) -> InstanceId {
        self.certificate.instance_id()
    }

    /// Its display name.
    pub fn display_name(&self) -> &str {
        &self.info.payload().display_name
    }

    /// Where to dial it.
    pub fn listen_addrs(&self) -> &[String] {
        &self.info.payload().listen_addrs
    }

    /// The certificate's fingerprint, to confirm out of band.
    pub fn fingerprint(&self) -> Fingerprint {
        self.certificate.fingerprint()
    }

    /// The verified signed block, e.g. to store its exact bytes.
    pub const fn info(&self) -> &Verified<InstanceBundleInfo> {
        &self.info
    }
}
