//! Instance identity and certificates of kaapana-node.
//!
//! This crate owns:
//! - the instance's Ed25519 key ([`Identity`]) and its key file (PKCS#8 PEM, mode 0600),
//!   which is also the libp2p key, so the network identity is the instance identity;
//! - X.509 instance certificates ([`InstanceCertificate`]: CN = instance name, SAN URI
//!   `kaapana-node://<peer-id>`), self-signed or issued by a [`FederationCa`], and their
//!   verification under a [`Trust`] setting;
//! - exchange bundles ([`ExchangeBundle`]): the PEM file two sites swap to register each
//!   other, checked by fingerprint ([`Fingerprint`]) out of band.
//!
//! It does no networking and keeps no store: which peers are registered is
//! `kaapana-federation`'s and the node's business. It reads no clock: every check takes
//! `now` as a [`kaapana_protocol::Timestamp`]. The only files it touches are the key and CA
//! files it is pointed at.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod bundle;
mod ca;
mod cert;
mod error;
mod identity;

pub use bundle::{BUNDLE_TAG, ExchangeBundle, MAX_BUNDLE_LIFETIME};
pub use ca::{CA_CERT_FILE, CA_KEY_FILE, FederationCa};
pub use cert::{CaCertificate, Fingerprint, INSTANCE_URI_SCHEME, InstanceCertificate, Trust};
pub use error::CertError;
pub use identity::Identity;
