//! `CertError`: everything that can go wrong with keys, certificates and bundles.

use std::path::PathBuf;

use kaapana_protocol::{EncodeError, Timestamp, VerifyError};

/// Why a key, certificate or exchange bundle could not be created, loaded or accepted.
///
/// Each rejection has its own variant, so callers (and the CLI) can tell an expired
/// certificate from a forged one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A private key file that other users can read or write.
    #[error(
        "private key file {} has mode {mode:04o}, so other users can access it; run `chmod 600 {}` and check who may have read it",
        path.display(),
        path.display()
    )]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Saving a key would replace an existing one (and with it an identity).
    #[error(
        "refusing to overwrite the existing key file {}: it holds an instance identity; move it away first if you really mean to replace it",
        path.display()
    )]
    KeyFileExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Bytes that are not a usable Ed25519 private key.
    #[error("invalid private key: {detail} (expected an Ed25519 key in PKCS#8, PEM or DER)")]
    InvalidKey {
        /// What is wrong with it.
        detail: String,
    },
    /// Bytes that are not DER or PEM of the expected kind.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// A key other than Ed25519, which is the only kind kaapana-node uses.
    #[error("{what} uses {algorithm}; only Ed25519 keys and signatures are supported")]
    UnsupportedKey {
        /// Which certificate or key.
        what: String,
        /// The algorithm found (OID).
        algorithm: String,
    },
    /// A well-formed X.509 certificate that lacks what an instance certificate carries.
    #[error(
        "not a kaapana-node instance certificate: it has no {missing} (create one with `kaapana-node init`)"
    )]
    NotAnInstanceCertificate {
        /// What is missing.
        missing: &'static str,
    },
    /// The certificate's validity period is over.
    #[error(
        "certificate `{name}` expired at {not_after}, it is now {now}; ask its owner for a renewed one"
    )]
    Expired {
        /// The certificate's subject name.
        name: String,
        /// End of its validity.
        not_after: Timestamp,
        /// The time it was checked at.
        now: Timestamp,
    },
    /// The certificate's validity period has not begun.
    #[error(
        "certificate `{name}` is not valid before {not_before}, it is now {now}; check both machines' clocks"
    )]
    NotYetValid {
        /// The certificate's subject name.
        name: String,
        /// Start of its validity.
        not_before: Timestamp,
        /// The time it was checked at.
        now: Timestamp,
    },
    /// The certificate names one instance (SAN) but carries another instance's key.
    #[error(
        "certificate `{name}` names instance {named} but its key belongs to instance {key}; it is forged or broken"
    )]
    KeyMismatch {
        /// The certificate's subject name.
        name: String,
        /// The instance named in the subject alternative name.
        named: String,
        /// The instance whose key the certificate carries.
        key: String,
    },
    /// A certificate used with a key it was not made for (e.g. key and certificate files of
    /// two different instances).
    #[error(
        "certificate `{name}` belongs to instance {certificate}, but the key is instance {key}; the key and certificate files do not belong together"
    )]
    IdentityMismatch {
        /// The certificate's subject name.
        name: String,
        /// The instance the certificate is for.
        certificate: String,
        /// The instance of the key.
        key: String,
    },
    /// A CA's key file and certificate do not belong together.
    #[error("CA key {} does not match the CA certificate next to it", path.display())]
    CaKeyMismatch {
        /// The key file.
        path: PathBuf,
    },
    /// The certificate's signature does not verify: altered after signing, or forged.
    #[error("certificate `{name}` has a bad signature: it was altered after signing or forged")]
    BadSignature {
        /// The certificate's subject name.
        name: String,
    },
    /// The certificate was issued by someone the trust setting does not accept.
    #[error("certificate `{name}` is issued by `{issuer}`, but only `{expected}` is trusted")]
    UntrustedIssuer {
        /// The certificate's subject name.
        name: String,
        /// Its issuer.
        issuer: String,
        /// Who would have been accepted.
        expected: String,
    },
    /// A certificate used as a CA that is not marked as one (basicConstraints CA=true).
    #[error("certificate `{name}` is not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotACa {
        /// The certificate's subject name.
        name: String,
    },
    /// The bundle text is not the expected sequence of PEM blocks.
    #[error(
        "malformed instance bundle: {detail}; export it again with `kaapana-node instance export`"
    )]
    BundleMalformed {
        /// What is wrong.
        detail: String,
    },
    /// The bundle could not be signed (e.g. an empty display name).
    #[error("cannot create the instance bundle: {0}")]
    BundleEncode(#[source] EncodeError),
    /// The bundle's signed part was rejected: bad or tampered signature, expired, ...
    #[error("instance bundle rejected: {0}")]
    BundleSignature(#[source] VerifyError),
    /// The bundle was signed by another key than the certificate's.
    #[error(
        "instance bundle is signed by {signer}, but its certificate belongs to {certificate}; it was put together from two identities"
    )]
    BundleSignerMismatch {
        /// Who signed the bundle (instance id).
        signer: String,
        /// Whose certificate it carries (instance id).
        certificate: String,
    },
    /// The signed part names a different certificate than the one in the bundle.
    #[error(
        "instance bundle carries a different certificate than the one its signature covers; it was swapped or altered"
    )]
    BundleCertificateMismatch,
    /// Generating a key or certificate failed.
    #[error("cannot generate {what}: {detail}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

impl CertError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn generate(what: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |e| Self::Generate { what, detail: e.to_string() }
    }
}
