//! Administration of one node's data directory: what the offline CLI commands do.
//!
//! Each command is a function here so that tests and (later) the daemon's API call the same
//! code; [`crate::cli`] only parses flags and prints.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kaapana_certs::{
    CaCertificate, CertError, ExchangeBundle, FederationCa, Fingerprint, Identity,
    InstanceCertificate, Trust,
};
use kaapana_federation::{InstanceRef, Policy, RegisteredInstance, RegistryError};
use kaapana_protocol::{InstanceId, Timestamp};

use crate::audit::{AuditKind, AuditRecord};
use crate::config::{Config, ConfigError};
use crate::data_dir::DataDir;
use crate::store::{Store, StoreError, WriteOp};

/// Why an administrative command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// `init` has not been run for this data directory.
    #[error(
        "no instance in {dir}: run `kaapana-node init --name NAME --data-dir {dir}` first, or point --data-dir / KAAPANA_NODE_DATA_DIR at an initialised directory"
    )]
    NotInitialised {
        /// The data directory.
        dir: PathBuf,
    },
    /// `init` was already run here.
    #[error(
        "{dir} already holds instance {name} ({id}); use another --data-dir, or delete the directory to start over (this discards the instance's identity)"
    )]
    AlreadyInitialised {
        /// The data directory.
        dir: PathBuf,
        /// The existing instance's name.
        name: String,
        /// Its id.
        id: String,
    },
    /// A bundle of this very instance was given to `instance add`.
    #[error("this bundle is this instance's own ({id}); import the other instance's bundle")]
    OwnBundle {
        /// This instance's id.
        id: String,
    },
    /// `--expect-fingerprint` did not match the bundle's certificate.
    #[error(
        "fingerprint mismatch: the bundle's certificate has fingerprint {actual}, but {expected} was expected; do not register it and check with the other site how the file was transferred"
    )]
    FingerprintMismatch {
        /// What the admin confirmed out of band.
        expected: String,
        /// What the bundle has.
        actual: Fingerprint,
    },
    /// A value given on the command line is not acceptable.
    #[error("{0}")]
    BadArgument(String),
    /// The instance is revoked here.
    #[error(
        "{name} is revoked here: {why}. A revoked key cannot be registered again; the instance needs a new key (and the site's admin a new bundle)"
    )]
    Revoked {
        /// Its name.
        name: String,
        /// Why, and by whom.
        why: String,
    },
    /// Certificates, keys or bundles.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The registry refused the change.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AdminError + '_ {
    move |source| AdminError::Io { path: path.to_owned(), source }
}

/// Options of `kaapana-node init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The instance's name (certificate CN).
    pub name: String,
    /// Listen multiaddresses; `None` = the defaults.
    pub listen: Option<Vec<String>>,
    /// Advertised multiaddresses; empty = the listen addresses.
    pub advertise: Vec<String>,
    /// The local API's address; `None` = the default.
    pub api_listen: Option<String>,
    /// Certificate validity in days.
    pub valid_days: u32,
}

/// What `init` created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The new instance's id.
    pub instance_id: InstanceId,
    /// Its certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// The certificate's expiry.
    pub not_after: Timestamp,
}

/// How long certificates are valid unless told otherwise (about 27 months).
pub const DEFAULT_VALID_DAYS: u32 = 825;

fn validity(now: Timestamp, days: u32) -> Result<(Timestamp, Timestamp), AdminError> {
    if days == 0 {
        return Err(AdminError::BadArgument("--valid-days must be at least 1".into()));
    }
    // Back-date by an hour so that peers whose clocks lag a little accept it at once.
    let not_before = now.saturating_sub(Duration::from_secs(3600));
    Ok((not_before, now.saturating_add(Duration::from_secs(u64::from(days) * 86_400))))
}

/// Creates a new instance in `dir`: key (mode 0600), self-signed certificate, commented
/// configuration and API token. Refuses to touch a directory that already has an instance.
pub fn init(dir: &DataDir, opts: &InitOptions, now: Timestamp) -> Result<InitReport, AdminError> {
    kaapana_protocol::validate_text("instance name", &opts.name, 128)
        .map_err(|e| AdminError::BadArgument(e.to_string()))?;
    if opts.name.trim().is_empty() {
        return Err(AdminError::BadArgument("--name must not be empty".into()));
    }
    if dir.is_initialised() {
        let node = NodeFiles::open(dir)?;
        return Err(AdminError::AlreadyInitialised {
            dir: dir.root().to_owned(),
            name: node.config.instance.name,
            id: node.certificate.instance_id().to_string(),
        });
    }
    let (not_before, not_after) = validity(now, opts.valid_days)?;
    dir.create().map_err(io_err(dir.root()))?;
    let identity = Identity::generate()?;
    let certificate =
        InstanceCertificate::self_signed(&identity, &opts.name, not_before, not_after)?;

    let mut config = Config::new(&opts.name);
    if let Some(listen) = &opts.listen {
        config.network.listen = listen.clone();
    }
    config.network.advertise = opts.advertise.clone();
    if let Some(api) = &opts.api_listen {
        config.api.listen = api.clone();
    }
    // The key is written last: its presence marks a complete `init`.
    write_file(&dir.certificate_path(), certificate.to_pem().as_bytes(), 0o644)?;
    write_file(&dir.config_path(), config.to_commented_toml().as_bytes(), 0o644)?;
    write_file(&dir.api_token_path(), new_token()?.as_bytes(), 0o600)?;
    // Create the store now so that a broken disk shows at once.
    drop(Store::open(&dir.store_path())?);
    identity.save(&dir.key_path())?;
    Ok(InitReport {
        instance_id: identity.instance_id(),
        fingerprint: certificate.fingerprint(),
        not_after: certificate.not_after(),
    })
}

fn new_token() -> Result<String, AdminError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AdminError::BadArgument("the system random number generator failed".into()))?;
    Ok(kaapana_protocol::hex(&bytes))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the directory).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AdminError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io_err(parent))?;
    }
    Ok(())
}

/// The files of an initialised node, loaded and checked.
#[derive(Debug)]
pub struct NodeFiles {
    /// The directory.
    pub dir: DataDir,
    /// Its configuration.
    pub config: Config,
    /// Its certificate.
    pub certificate: InstanceCertificate,
}

impl NodeFiles {
    /// Loads configuration and certificate (not the key: see [`NodeFiles::identity`]).
    pub fn open(dir: &DataDir) -> Result<Self, AdminError> {
        if !dir.is_initialised() {
            return Err(AdminError::NotInitialised { dir: dir.root().to_owned() });
        }
        let config = Config::load(&dir.config_path())?;
        let pem =
            fs::read_to_string(dir.certificate_path()).map_err(io_err(&dir.certificate_path()))?;
        let certificate = InstanceCertificate::from_pem(&pem)?;
        Ok(Self { dir: dir.clone(), config, certificate })
    }

    /// Loads the private key; refuses a key file that others can read.
    pub fn identity(&self) -> Result<Identity, AdminError> {
        let identity = Identity::load(&self.dir.key_path())?;
        self.certificate.check_identity(&identity)?;
        Ok(identity)
    }

    /// The trust anchor configured for certificates.
    pub fn trust(&self) -> Result<Trust, AdminError> {
        match &self.config.trust.federation_ca {
            None => Ok(Trust::SelfSigned),
            Some(path) => {
                let path = self.dir.root().join(path);
                let pem = fs::read_to_string(&path).map_err(io_err(&path))?;
                Ok(Trust::FederationCa(CaCertificate::from_pem(&pem)?))
            }
        }
    }

    /// Opens the store.
    pub fn store(&self) -> Result<Store, AdminError> {
        Ok(Store::open(&self.dir.store_path())?)
    }

    /// Opens the store with the instance key, so that it can append to the audit log.
    pub fn audited_store(&self) -> Result<Store, AdminError> {
        Ok(Store::open_audited(&self.dir.store_path(), self.identity()?)?)
    }

    /// This instance's exchange bundle with these dial addresses, and its fingerprint.
    pub fn bundle(
        &self,
        identity: &Identity,
        addrs: Vec<String>,
        now: Timestamp,
    ) -> Result<(String, Fingerprint), AdminError> {
        let text = ExchangeBundle::create(
            identity,
            &self.certificate,
            &self.config.instance.name,
            addrs,
            now,
        )?;
        Ok((text, self.certificate.fingerprint()))
    }
}

/// `instance export`: this instance's exchange bundle (PEM text) and its fingerprint.
pub fn export_bundle(dir: &DataDir, now: Timestamp) -> Result<(String, Fingerprint), AdminError> {
    let node = NodeFiles::open(dir)?;
    let addrs = node.config.network.bundle_addrs();
    node.bundle(&node.identity()?, addrs, now)
}

/// Normalises a fingerprint as people type it: hex digits only, uppercase.
fn normalise_fingerprint(s: &str) -> String {
    s.chars().filter(char::is_ascii_hexdigit).map(|c| c.to_ascii_uppercase()).collect()
}

/// Verifies a bundle against the node's trust anchor and makes the registration record
/// (nothing is stored yet): the shared first half of `instance add`, offline and in the daemon.
pub fn verify_bundle(
    node: &NodeFiles,
    bundle_text: &str,
    policy: Policy,
    expect_fingerprint: Option<&str>,
    now: Timestamp,
) -> Result<RegisteredInstance, AdminError> {
    let bundle = ExchangeBundle::parse_and_verify(bundle_text, now, &node.trust()?)?;
    if bundle.instance_id() == node.certificate.instance_id() {
        return Err(AdminError::OwnBundle { id: bundle.instance_id().to_string() });
    }
    let fingerprint = bundle.fingerprint();
    if let Some(expected) = expect_fingerprint
        .filter(|e| normalise_fingerprint(e) != normalise_fingerprint(&fingerprint.to_string()))
    {
        return Err(AdminError::FingerprintMismatch {
            expected: expected.to_owned(),
            actual: fingerprint,
        });
    }
    let certificate = bundle.certificate();
    Ok(RegisteredInstance {
        instance_id: bundle.instance_id(),
        name: certificate.name().to_owned(),
        certificate_der: certificate.der().to_vec(),
        fingerprint: fingerprint.0,
        listen_addrs: bundle.listen_addrs().to_vec(),
        certificate_not_after: certificate.not_after(),
        registered_at: now,
        policy,
    })
}

/// `instance add` without a running daemon: verifies a bundle and registers the instance with
/// `policy`. Durable before it returns.
pub fn add_instance(
    dir: &DataDir,
    bundle_text: &str,
    policy: Policy,
    expect_fingerprint: Option<&str>,
    now: Timestamp,
) -> Result<RegisteredInstance, AdminError> {
    let node = NodeFiles::open(dir)?;
    let instance = verify_bundle(&node, bundle_text, policy, expect_fingerprint, now)?;
    let store = node.audited_store()?;
    if let Some(r) = crate::trust::revocation_of(&store, &instance.instance_id)? {
        return Err(AdminError::Revoked {
            name: instance.name.clone(),
            why: format!("{} ({})", r.reason, crate::trust::source_text(&r.source)),
        });
    }
    let mut registry = store.load_registry()?;
    registry.add(instance.clone())?;
    store.write(vec![
        WriteOp::PutInstance(Box::new(instance.clone())),
        WriteOp::Audit(audit_added(&instance)),
    ])?;
    Ok(instance)
}

/// `instance list`: every registered instance, by name.
pub fn list_instances(dir: &DataDir) -> Result<Vec<RegisteredInstance>, AdminError> {
    list_instances_in(&NodeFiles::open(dir)?.store()?)
}

/// Every instance registered in `store`, by name.
pub fn list_instances_in(store: &Store) -> Result<Vec<RegisteredInstance>, AdminError> {
    let mut all = store.instances()?;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

/// `instance remove`: unregisters an instance by name or id. Durable before it returns.
pub fn remove_instance(
    dir: &DataDir,
    which: &InstanceRef,
) -> Result<RegisteredInstance, AdminError> {
    let node = NodeFiles::open(dir)?;
    let store = node.audited_store()?;
    let mut registry = store.load_registry()?;
    let removed = registry.remove(which)?;
    store.write(vec![
        WriteOp::RemoveInstance(removed.instance_id),
        WriteOp::Audit(audit_removed(&removed)),
    ])?;
    Ok(removed)
}

/// The audit record of registering `inst`.
pub(crate) fn audit_added(inst: &RegisteredInstance) -> AuditRecord {
    AuditRecord::now(
        AuditKind::InstanceAdded,
        inst.instance_id,
        format!(
            "{} fingerprint {}; {}",
            inst.name,
            Fingerprint(inst.fingerprint),
            policy_text(&inst.policy)
        ),
    )
}

/// The audit record of unregistering `inst`.
pub(crate) fn audit_removed(inst: &RegisteredInstance) -> AuditRecord {
    AuditRecord::now(AuditKind::InstanceRemoved, inst.instance_id, inst.name.clone())
}

/// A policy in one line, for the event and audit logs.
pub(crate) fn policy_text(policy: &Policy) -> String {
    format!(
        "workflows {}, datasets {}, execution {}, share logs {}",
        policy.allowed_workflows, policy.allowed_datasets, policy.execution, policy.share_logs
    )
}

/// `ca revoke`: the CA's next revocation list, with the instances of `bundles` and `ids`
/// revoked, written to `list` (read first if it exists). Returns the list and how many
/// instances it adds.
pub fn ca_revoke(
    ca_dir: &Path,
    list: &Path,
    bundles: &[PathBuf],
    ids: &[String],
    reason: &str,
    valid_days: u32,
    now: Timestamp,
) -> Result<(kaapana_protocol::Verified<kaapana_protocol::RevocationList>, usize), AdminError> {
    use kaapana_protocol::{RevokedInstance, Sha256Digest};
    if bundles.is_empty() && ids.is_empty() {
        return Err(AdminError::BadArgument(
            "name at least one instance to revoke (--bundle FILE or --instance ID)".into(),
        ));
    }
    let ca = FederationCa::load(ca_dir)?;
    let trust = Trust::FederationCa(ca.certificate().clone());
    let previous = match fs::read_to_string(list) {
        Ok(text) => {
            // An expired list still carries its entries and its number.
            let signed = crate::trust::parse_revocation_list(&text)?;
            Some(crate::trust::verify_revocation_list_stored(&signed, &trust)?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(list)(e)),
    };
    let reason = kaapana_protocol::fit_text(reason);
    let mut add = Vec::new();
    for path in bundles {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        // A bundle that no longer verifies (expired) still names the key to revoke.
        let blocks = pem::parse_many(&text)
            .map_err(|e| AdminError::BadArgument(format!("{}: {e}", path.display())))?;
        let cert = blocks.iter().find(|b| b.tag() == "CERTIFICATE").ok_or_else(|| {
            AdminError::BadArgument(format!("{}: no certificate", path.display()))
        })?;
        let cert = InstanceCertificate::from_der(cert.contents().to_vec())?;
        add.push(RevokedInstance {
            instance_id: cert.instance_id(),
            certificate_sha256: Sha256Digest::of(cert.der()),
            reason: reason.clone(),
        });
    }
    for id in ids {
        let instance_id = id
            .parse::<InstanceId>()
            .map_err(|e| AdminError::BadArgument(format!("`{id}` is not an instance id: {e}")))?;
        add.push(RevokedInstance {
            instance_id,
            certificate_sha256: Sha256Digest([0; 32]),
            reason: reason.clone(),
        });
    }
    let before = previous.as_ref().map_or(0, |p| p.payload().revoked.len());
    let valid = Duration::from_secs(u64::from(valid_days) * 86_400);
    let next = crate::trust::issue_revocation_list(
        &ca,
        previous.as_ref().map(|p| p.payload()),
        add,
        valid,
        now,
    )?;
    let added = next.payload().revoked.len() - before;
    let tmp = list.with_extension("tmp");
    fs::write(&tmp, crate::trust::revocation_list_pem(&next)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, list).map_err(io_err(list))?;
    Ok((next, added))
}

/// `ca create`: a new federation CA in `out` (`ca.key`, mode 0600, and `ca.crt`).
pub fn ca_create(
    out: &Path,
    name: &str,
    valid_days: u32,
    now: Timestamp,
) -> Result<FederationCa, AdminError> {
    let (not_before, not_after) = validity(now, valid_days)?;
    let ca = FederationCa::generate(name, not_before, not_after)?;
    fs::create_dir_all(out).map_err(io_err(out))?;
    ca.save(out)?;
    Ok(ca)
}

/// `ca sign`: re-issues this node's certificate from the CA in `ca_dir` (same key and name)
/// and configures that CA as the node's trust anchor.
pub fn ca_sign(
    dir: &DataDir,
    ca_dir: &Path,
    valid_days: u32,
    now: Timestamp,
) -> Result<InstanceCertificate, AdminError> {
    let mut node = NodeFiles::open(dir)?;
    let identity = node.identity()?;
    let ca = FederationCa::load(ca_dir)?;
    let (not_before, not_after) = validity(now, valid_days)?;
    let certificate = ca.sign_instance(
        &identity.public_key(),
        &node.config.instance.name,
        not_before,
        not_after,
    )?;
    certificate.verify(now, &Trust::FederationCa(ca.certificate().clone()))?;
    write_file(&dir.federation_ca_path(), ca.certificate().to_pem().as_bytes(), 0o644)?;
    write_file(&dir.certificate_path(), certificate.to_pem().as_bytes(), 0o644)?;
    node.config.trust.federation_ca = Some(PathBuf::from("federation-ca.crt"));
    write_file(&dir.config_path(), node.config.to_commented_toml().as_bytes(), 0o644)?;
    Ok(certificate)
}
