//! The layout of a node's data directory.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where one node keeps everything: key, certificate, configuration, store.
///
/// ```text
/// DIR/identity.key       Ed25519 private key, PKCS#8, mode 0600
/// DIR/instance.crt       the instance certificate (PEM)
/// DIR/config.toml        configuration written by `init`
/// DIR/api-token          bearer token of the local HTTP API, mode 0600
/// DIR/federation-ca.crt  the federation CA, when one is configured
/// DIR/node.redb          the store
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `KAAPANA_NODE_DATA_DIR` is handled by the CLI; this is the fallback `~/.kaapana-node`.
    pub fn default_root() -> PathBuf {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".kaapana-node")
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory with mode 0700 if it does not exist.
    pub fn create(&self) -> io::Result<()> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.root)?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
    }

    /// The identity key.
    pub fn key_path(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    /// The instance certificate.
    pub fn certificate_path(&self) -> PathBuf {
        self.root.join("instance.crt")
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// The API token.
    pub fn api_token_path(&self) -> PathBuf {
        self.root.join("api-token")
    }

    /// The federation CA certificate copied in by `ca sign`.
    pub fn federation_ca_path(&self) -> PathBuf {
        self.root.join("federation-ca.crt")
    }

    /// The store.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("node.redb")
    }

    /// The key an `instance rotate` prepared (it replaces `identity.key` once every
    /// registered instance has the hand-over).
    pub fn next_key_path(&self) -> PathBuf {
        self.root.join("next-identity.key")
    }

    /// The certificate of the key an `instance rotate` prepared.
    pub fn next_certificate_path(&self) -> PathBuf {
        self.root.join("next-instance.crt")
    }

    /// The instance ids of the keys this instance used before its current one, oldest first,
    /// one per line: what verifies the older entries of its audit log.
    pub fn retired_keys_path(&self) -> PathBuf {
        self.root.join("retired-keys")
    }

    /// Whether `init` has run here.
    pub fn is_initialised(&self) -> bool {
        self.key_path().exists()
    }
}
