//! X.509 instance and CA certificates: made with rcgen, read with x509-parser, signatures
//! checked with ring.
//!
//! X.509 validity has whole-second precision: times are truncated to the second when a
//! certificate is made, and read back as such.

use std::fmt;
use std::str::FromStr;

use kaapana_protocol::{InstanceId, Sha256Digest, SigningKey, Timestamp, verify_ed25519};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose,
    PKCS_ED25519, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::time::ASN1Time;

use crate::CertError;
use crate::identity::Identity;

/// URI scheme of the subject alternative name that names an instance:
/// `kaapana-node://<peer-id>`.
pub const INSTANCE_URI_SCHEME: &str = "kaapana-node://";
const CERTIFICATE_TAG: &str = "CERTIFICATE";

/// SHA-256 of a certificate's DER: what two sites compare by phone before registering each
/// other. Displayed as uppercase hex in 16 groups of 4 (`3F2A 9C01 ...`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a certificate's DER.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256Digest::of(der).0)
    }

    /// The same bytes as a protocol digest.
    pub const fn digest(&self) -> Sha256Digest {
        Sha256Digest(self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks_exact(2).enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{:02X}{:02X}", pair[0], pair[1])?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = CertError;
    /// Parses 64 hex digits in either case; spaces and colons between them are ignored.
    fn from_str(s: &str) -> Result<Self, CertError> {
        let digits: Vec<u8> = s
            .chars()
            .filter(|c| !matches!(c, ' ' | ':'))
            .map(|c| c.to_digit(16).and_then(|d| u8::try_from(d).ok()))
            .collect::<Option<_>>()
            .filter(|d: &Vec<u8>| d.len() == 64)
            .ok_or_else(|| CertError::Parse {
                what: "fingerprint",
                detail: format!("`{s}` is not 64 hex digits"),
            })?;
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *o = (pair[0] << 4) | pair[1];
        }
        Ok(Self(out))
    }
}

/// Which issuers a certificate may have.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Only self-signed certificates, verified under their own key; the peer is trusted
    /// because its fingerprint was confirmed out of band. A CA-signed certificate is
    /// [`CertError::UntrustedIssuer`] here.
    SelfSigned,
    /// Only certificates issued by this CA and verified under its key.
    FederationCa(CaCertificate),
}

/// What every certificate we handle has, read once when parsing.
#[derive(Clone, PartialEq, Eq)]
struct Fields {
    common_name: Option<String>,
    subject: String,
    subject_raw: Vec<u8>,
    issuer: String,
    issuer_raw: Vec<u8>,
    public_key: [u8; 32],
    not_before: Timestamp,
    not_after: Timestamp,
}

impl Fields {
    fn of(x: &X509Certificate<'_>) -> Result<Self, CertError> {
        let common_name = x.subject().iter_common_name().find_map(|cn| cn.as_str().ok());
        let subject = x.subject().to_string();
        let spki = x.public_key();
        let public_key = (spki.algorithm.algorithm == OID_SIG_ED25519)
            .then(|| spki.subject_public_key.data.as_ref().try_into().ok())
            .flatten()
            .ok_or_else(|| CertError::UnsupportedKey {
                what: format!("certificate `{subject}`"),
                algorithm: spki.algorithm.algorithm.to_id_string(),
            })?;
        Ok(Self {
            common_name: common_name.map(str::to_owned),
            subject_raw: x.subject().as_raw().to_vec(),
            issuer: x.issuer().to_string(),
            issuer_raw: x.issuer().as_raw().to_vec(),
            public_key,
            not_before: from_asn1(x.validity().not_before),
            not_after: from_asn1(x.validity().not_after),
            subject,
        })
    }

    fn name(&self) -> &str {
        self.common_name.as_deref().unwrap_or(&self.subject)
    }

    fn check_dates(&self, now: Timestamp) -> Result<(), CertError> {
        if now < self.not_before {
            return Err(CertError::NotYetValid {
                name: self.name().to_owned(),
                not_before: self.not_before,
                now,
            });
        }
        if now > self.not_after {
            return Err(CertError::Expired {
                name: self.name().to_owned(),
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }
}

/// A certificate for one instance's key: subject CN = instance name, SAN URI
/// `kaapana-node://<peer-id>` naming the same key. Self-signed, or issued by a
/// [`crate::FederationCa`].
///
/// Constructing one checks its structure and that the SAN names the certificate's own key;
/// whether it is *trusted* is [`InstanceCertificate::verify`]'s question.
#[derive(Clone, PartialEq, Eq)]
pub struct InstanceCertificate {
    der: Vec<u8>,
    fields: Fields,
    instance: InstanceId,
}

impl InstanceCertificate {
    /// Makes a self-signed certificate for `identity`, valid from `not_before` to `not_after`.
    pub fn self_signed(
        identity: &Identity,
        name: &str,
        not_before: Timestamp,
        not_after: Timestamp,
    ) -> Result<Self, CertError> {
        let params = params(name, not_before, not_after, Some(identity.instance_id()))?;
        let cert = params
            .self_signed(&RcgenKey(identity.signing_key()))
            .map_err(CertError::generate("a certificate"))?;
        Self::from_der(cert.der().to_vec())
    }

    /// Parses DER and checks that it is an instance certificate whose SAN names its key.
    pub fn from_der(der: Vec<u8>) -> Result<Self, CertError> {
        let (fields, instance) = {
            let x = parse_x509(&der)?;
            let fields = Fields::of(&x)?;
            let name = fields.common_name.clone().ok_or(CertError::NotAnInstanceCertificate {
                missing: "subject common name (the instance name)",
            })?;
            let key = InstanceId::from_ed25519_public_key(&fields.public_key)
                .map_err(|e| CertError::InvalidKey { detail: e.to_string() })?;
            let sans = x.subject_alternative_name().map_err(|e| CertError::Parse {
                what: "subject alternative name",
                detail: e.to_string(),
            })?;
            let named: Vec<&str> = sans
                .iter()
                .flat_map(|san| &san.value.general_names)
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => uri.strip_prefix(INSTANCE_URI_SCHEME),
                    _ => None,
                })
                .collect();
            if named.is_empty() {
                return Err(CertError::NotAnInstanceCertificate {
                    missing: "subject alternative name URI kaapana-node://<peer-id>",
                });
            }
            if let Some(other) = named.iter().find(|n| n.parse::<InstanceId>().ok() != Some(key)) {
                return Err(CertError::KeyMismatch {
                    name,
                    named: (*other).to_owned(),
                    key: key.to_string(),
                });
            }
            (fields, key)
        };
        Ok(Self { der, fields, instance })
    }

    /// Parses one PEM `CERTIFICATE` block.
    pub fn from_pem(text: &str) -> Result<Self, CertError> {
        Self::from_der(der_from_pem(text)?)
    }

    /// The certificate as a PEM `CERTIFICATE` block.
    pub fn to_pem(&self) -> String {
        pem_block(CERTIFICATE_TAG, &self.der)
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The instance name (subject CN).
    pub fn name(&self) -> &str {
        self.fields.name()
    }

    /// The instance the certificate is for (its key, equal to the SAN).
    pub const fn instance_id(&self) -> InstanceId {
        self.instance
    }

    /// The instance's raw Ed25519 public key.
    pub const fn public_key(&self) -> [u8; 32] {
        self.fields.public_key
    }

    /// Start of validity.
    pub const fn not_before(&self) -> Timestamp {
        self.fields.not_before
    }

    /// End of validity (inclusive).
    pub const fn not_after(&self) -> Timestamp {
        self.fields.not_after
    }

    /// The issuer's distinguished name, e.g. `CN=Kaapana Federation CA`.
    pub fn issuer_name(&self) -> String {
        self.fields.issuer.clone()
    }

    /// Whether issuer and subject are the same name. The signature is checked by
    /// [`InstanceCertificate::verify`], not here.
    pub fn is_self_signed(&self) -> bool {
        self.fields.issuer_raw == self.fields.subject_raw
    }

    /// SHA-256 of the DER.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.der)
    }

    /// Checks that `identity` is the key this certificate was made for
    /// ([`CertError::IdentityMismatch`] otherwise).
    pub fn check_identity(&self, identity: &Identity) -> Result<(), CertError> {
        if identity.instance_id() == self.instance {
            return Ok(());
        }
        Err(CertError::IdentityMismatch {
            name: self.name().to_owned(),
            certificate: self.instance.to_string(),
            key: identity.instance_id().to_string(),
        })
    }

    /// Checks the certificate at `now` under `trust`: validity period, issuer and signature
    /// (for a CA, also the CA certificate's own validity).
    pub fn verify(&self, now: Timestamp, trust: &Trust) -> Result<(), CertError> {
        self.fields.check_dates(now)?;
        let (issuer, key, expected) = match trust {
            Trust::SelfSigned => (
                &self.fields.subject_raw,
                &self.fields.public_key,
                "the certificate itself (self-signed)".to_owned(),
            ),
            Trust::FederationCa(ca) => {
                ca.fields.check_dates(now)?;
                let expected = format!("the federation CA `{}`", ca.fields.subject);
                (&ca.fields.subject_raw, &ca.fields.public_key, expected)
            }
        };
        if self.fields.issuer_raw != *issuer {
            return Err(CertError::UntrustedIssuer {
                name: self.name().to_owned(),
                issuer: self.fields.issuer.clone(),
                expected,
            });
        }
        check_signature(&self.der, key, self.name())
    }
}

impl fmt::Debug for InstanceCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceCertificate")
            .field("name", &self.name())
            .field("instance", &self.instance)
            .field("issuer", &self.fields.issuer)
            .field("not_after", &self.fields.not_after)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// A federation CA's certificate: an Ed25519 key marked CA (basicConstraints CA=true).
/// It is a configured trust anchor; only its validity and CA flag are checked.
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate {
    der: Vec<u8>,
    fields: Fields,
}

impl CaCertificate {
    /// Parses DER; a certificate without CA=true is [`CertError::NotACa`].
    pub fn from_der(der: Vec<u8>) -> Result<Self, CertError> {
        let fields = {
            let x = parse_x509(&der)?;
            let fields = Fields::of(&x)?;
            let is_ca = x.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(CertError::NotACa { name: fields.name().to_owned() });
            }
            fields
        };
        Ok(Self { der, fields })
    }

    /// Parses one PEM `CERTIFICATE` block.
    pub fn from_pem(text: &str) -> Result<Self, CertError> {
        Self::from_der(der_from_pem(text)?)
    }

    /// The certificate as a PEM `CERTIFICATE` block.
    pub fn to_pem(&self) -> String {
        pem_block(CERTIFICATE_TAG, &self.der)
    }

    /// The CA's name (subject CN, or the whole subject if it has no CN).
    pub fn name(&self) -> &str {
        self.fields.name()
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the DER.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.der)
    }

    /// The CA's raw Ed25519 public key.
    pub const fn public_key(&self) -> [u8; 32] {
        self.fields.public_key
    }

    /// Start of validity.
    pub const fn not_before(&self) -> Timestamp {
        self.fields.not_before
    }

    /// End of validity (inclusive).
    pub const fn not_after(&self) -> Timestamp {
        self.fields.not_after
    }
}

impl fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCertificate")
            .field("name", &self.name())
            .field("not_after", &self.fields.not_after)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// rcgen signs with the protocol's key: certificates and messages come from one key.
pub(crate) struct RcgenKey<'a>(pub(crate) &'a SigningKey);

impl PublicKeyData for RcgenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key()
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

impl rcgen::SigningKey for RcgenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.0.sign_raw(msg).to_vec())
    }
}

/// An instance's public key, all a CA needs to issue its certificate.
pub(crate) struct RawPublicKey(pub(crate) [u8; 32]);

impl PublicKeyData for RawPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// Certificate parameters: CN = `name`, a random serial, the validity period; for an
/// instance (`Some(id)`) the SAN URI and digital-signature usage, otherwise a CA.
pub(crate) fn params(
    name: &str,
    not_before: Timestamp,
    not_after: Timestamp,
    instance: Option<InstanceId>,
) -> Result<CertificateParams, CertError> {
    let invalid = |detail: String| CertError::Generate { what: "a certificate", detail };
    if name.trim().is_empty() {
        return Err(invalid("the name must not be empty".into()));
    }
    if not_after.as_millis() / 1000 <= not_before.as_millis() / 1000 {
        return Err(invalid(format!(
            "not_after ({not_after}) is not after not_before ({not_before})"
        )));
    }
    let mut serial = [0u8; 16];
    SystemRandom::new().fill(&mut serial).map_err(|_| invalid("the system RNG failed".into()))?;
    serial[0] &= 0x7f;

    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.not_before = to_offset(not_before).map_err(invalid)?;
    p.not_after = to_offset(not_after).map_err(invalid)?;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    match instance {
        Some(id) => {
            let uri = format!("{INSTANCE_URI_SCHEME}{id}");
            p.subject_alt_names = vec![SanType::URI(
                uri.try_into().map_err(|e: rcgen::Error| invalid(e.to_string()))?,
            )];
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        None => {
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
    }
    Ok(p)
}

fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let parse = |detail: String| CertError::Parse { what: "X.509 certificate", detail };
    let (rest, x) = x509_parser::parse_x509_certificate(der).map_err(|e| parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(parse(format!("{} bytes after the certificate", rest.len())));
    }
    Ok(x)
}

/// Checks the certificate's Ed25519 signature over its TBS bytes under `key`.
fn check_signature(der: &[u8], key: &[u8; 32], name: &str) -> Result<(), CertError> {
    let x = parse_x509(der)?;
    let signature: Option<[u8; 64]> = x.signature_value.data.as_ref().try_into().ok();
    let ok = x.signature_algorithm.algorithm == OID_SIG_ED25519
        && signature.is_some_and(|s| verify_ed25519(key, x.tbs_certificate.as_ref(), &s));
    if ok { Ok(()) } else { Err(CertError::BadSignature { name: name.to_owned() }) }
}

pub(crate) fn der_from_pem(text: &str) -> Result<Vec<u8>, CertError> {
    let block = pem::parse(text)
        .map_err(|e| CertError::Parse { what: "PEM certificate", detail: e.to_string() })?;
    if block.tag() != CERTIFICATE_TAG {
        return Err(CertError::Parse {
            what: "PEM certificate",
            detail: format!("block is `{}`, expected `{CERTIFICATE_TAG}`", block.tag()),
        });
    }
    Ok(block.into_contents())
}

/// One PEM block with `\n` line endings.
pub(crate) fn pem_block(tag: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der), config)
}

fn to_offset(t: Timestamp) -> Result<OffsetDateTime, String> {
    i64::try_from(t.as_millis() / 1000)
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .ok_or_else(|| format!("{t} cannot be written into a certificate"))
}

fn from_asn1(t: ASN1Time) -> Timestamp {
    Timestamp::from_millis(u64::try_from(t.timestamp()).unwrap_or(0).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_display_and_parse() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0x3f;
        bytes[1] = 0x2a;
        bytes[2] = 0x9c;
        bytes[3] = 0x01;
        let fp = Fingerprint(bytes);
        let shown = fp.to_string();
        assert!(shown.starts_with("3F2A 9C01 0000 "), "{shown}");
        assert_eq!(shown.len(), 16 * 4 + 15);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(shown.to_lowercase().replace(' ', ":").parse::<Fingerprint>().unwrap(), fp);
        assert!(matches!("3F2A".parse::<Fingerprint>(), Err(CertError::Parse { .. })));
    }
}
