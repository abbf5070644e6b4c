//! Datasets at this site: named lists of items (DICOM series), each item a folder, behind the
//! [`DatasetProvider`] trait so that Kaapana's own backend can be added beside the directory
//! provider.
//!
//! Nothing about an item but an opaque token leaves the site: capability ads carry dataset
//! names, item counts, sizes and one [`ItemToken`] per item, keyed for the receiving instance
//! (HMAC-SHA-256 under this site's secret key over the peer's id, the dataset's name and the
//! item's identifier). A peer cannot invert a token, and two peers get different tokens for the
//! same item, so tokens cannot be joined across instances. Kaapana encrypts dataset identifiers
//! with a key its orchestrator never sees for the same reason. A job for one item names its
//! token; only this site can map it back.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kaapana_protocol::{DatasetSummary, InstanceId, ItemToken, MAX_ITEM_TOKENS, validate_name};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::{DatasetRecord, Store, StoreError, WriteOp};

/// The store's meta key of the item token secret.
const TOKEN_KEY_META: &str = "item_token_key";

/// Why a dataset cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The name is not usable.
    #[error(
        "invalid dataset name {0:?}: use letters, digits, '.', '_' and '-' (not first), at most 64"
    )]
    BadName(String),
    /// No dataset of this name here.
    #[error("no dataset {0} at this instance; see `kaapana-node dataset list`")]
    NotFound(String),
    /// The name is taken.
    #[error(
        "a dataset {name} is already registered (at {location}); remove it first with `kaapana-node dataset remove {name}`"
    )]
    Exists {
        /// The name.
        name: String,
        /// Where the registered one is.
        location: String,
    },
    /// The folder is not a usable dataset folder.
    #[error("{}: {why}", path.display())]
    BadFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Reading the folder failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An unknown provider in the store.
    #[error("dataset {name} uses provider {provider}, which this kaapana-node does not have")]
    UnknownProvider {
        /// The dataset.
        name: String,
        /// Its provider.
        provider: String,
    },
}

/// What a provider found in a dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetScan {
    /// Item identifiers (e.g. DICOM series UIDs), in a stable order.
    pub items: Vec<String>,
    /// Total size of the items in bytes.
    pub bytes: u64,
}

/// A source of one dataset's items.
pub trait DatasetProvider: Send + Sync + fmt::Debug {
    /// The dataset's name.
    fn name(&self) -> &str;
    /// The provider's kind, as stored (`directory`).
    fn kind(&self) -> &'static str;
    /// Where it is, as stored.
    fn location(&self) -> String;
    /// Lists the items and their size.
    fn scan(&self) -> Result<DatasetScan, DatasetError>;
    /// The folder a batch job sees at `/input` (one sub-folder per item).
    fn dataset_folder(&self) -> Result<PathBuf, DatasetError>;
    /// The folder of one item, which a single-file job sees at `/input/<item>/`.
    fn item_folder(&self, item: &str) -> Result<PathBuf, DatasetError>;
}

/// A dataset that is a folder with one sub-folder per item.
#[derive(Clone, Debug)]
pub struct DirectoryDataset {
    name: String,
    root: PathBuf,
}

impl DirectoryDataset {
    /// The provider kind's stored name.
    pub const KIND: &'static str = "directory";

    /// A directory dataset; checks the name and that `root` is a folder holding at least one
    /// item folder.
    pub fn open(name: &str, root: &Path) -> Result<Self, DatasetError> {
        validate_name("dataset", name).map_err(|_| DatasetError::BadName(name.to_owned()))?;
        let root =
            root.canonicalize().map_err(|e| DatasetError::Io { path: root.into(), source: e })?;
        if !root.is_dir() {
            return Err(DatasetError::BadFolder { path: root, why: "not a folder".into() });
        }
        Ok(Self { name: name.to_owned(), root })
    }
}

impl DatasetProvider for DirectoryDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn scan(&self) -> Result<DatasetScan, DatasetError> {
        let io = |path: &Path, source| DatasetError::Io { path: path.to_owned(), source };
        let mut items = Vec::new();
        let mut bytes = 0u64;
        for entry in std::fs::read_dir(&self.root).map_err(|e| io(&self.root, e))? {
            let entry = entry.map_err(|e| io(&self.root, e))?;
            let path = entry.path();
            if !entry.file_type().map_err(|e| io(&path, e))?.is_dir() {
                continue;
            }
            let Some(item) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(DatasetError::BadFolder {
                    path,
                    why: "item folder names must be UTF-8 (e.g. DICOM series UIDs)".into(),
                });
            };
            bytes = bytes.saturating_add(folder_size(&path)?);
            items.push(item);
        }
        if items.is_empty() {
            return Err(DatasetError::BadFolder {
                path: self.root.clone(),
                why:
                    "no item folders; a dataset folder holds one sub-folder per item (DICOM series)"
                        .into(),
            });
        }
        if items.len() > MAX_ITEM_TOKENS {
            return Err(DatasetError::BadFolder {
                path: self.root.clone(),
                why: format!("{} items; at most {MAX_ITEM_TOKENS} per site", items.len()),
            });
        }
        items.sort();
        Ok(DatasetScan { items, bytes })
    }

    fn dataset_folder(&self) -> Result<PathBuf, DatasetError> {
        if self.root.is_dir() {
            Ok(self.root.clone())
        } else {
            Err(DatasetError::BadFolder { path: self.root.clone(), why: "is gone".into() })
        }
    }

    fn item_folder(&self, item: &str) -> Result<PathBuf, DatasetError> {
        if item.is_empty() || item.contains(['/', '\0']) || item == "." || item == ".." {
            return Err(DatasetError::BadFolder {
                path: self.root.clone(),
                why: format!("invalid item {item:?}"),
            });
        }
        let path = self.root.join(item);
        if path.is_dir() {
            Ok(path)
        } else {
            Err(DatasetError::BadFolder { path, why: "the item is gone".into() })
        }
    }
}

fn folder_size(dir: &Path) -> Result<u64, DatasetError> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| DatasetError::Io { path: d.clone(), source: e })?;
        for entry in entries {
            let entry = entry.map_err(|e| DatasetError::Io { path: d.clone(), source: e })?;
            let meta =
                entry.metadata().map_err(|e| DatasetError::Io { path: entry.path(), source: e })?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}

/// Opens the provider a stored record names.
pub fn provider_for(record: &DatasetRecord) -> Result<Arc<dyn DatasetProvider>, DatasetError> {
    match record.provider.as_str() {
        DirectoryDataset::KIND => {
            Ok(Arc::new(DirectoryDataset::open(&record.name, Path::new(&record.location))?))
        }
        other => Err(DatasetError::UnknownProvider {
            name: record.name.clone(),
            provider: other.to_owned(),
        }),
    }
}

/// A registered dataset with its last scan.
#[derive(Clone, Debug)]
pub struct DatasetEntry {
    /// Where its items come from.
    pub provider: Arc<dyn DatasetProvider>,
    /// What the last scan found (None: the scan failed, see `error`).
    pub scan: Option<DatasetScan>,
    /// Why the last scan failed.
    pub error: Option<String>,
}

/// The site's datasets as the daemon serves them: scanned once when loaded (and again when one
/// is added), with the key for item tokens.
pub struct Datasets {
    entries: BTreeMap<String, DatasetEntry>,
    key: hmac::Key,
    /// What this instance shows itself (its own workflows plan over it on every event), kept
    /// until a dataset changes.
    own: std::sync::Mutex<Option<(InstanceId, Vec<DatasetSummary>)>>,
}

impl fmt::Debug for Datasets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datasets").field("entries", &self.entries).finish_non_exhaustive()
    }
}

/// Where a job's data is, resolved at its runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobData {
    /// Batch: the whole dataset at `/input`.
    Dataset(PathBuf),
    /// Single-file: one item at `/input/<item>/`.
    Item {
        /// The item's identifier (its folder name).
        item: String,
        /// Its folder.
        folder: PathBuf,
    },
}

impl Datasets {
    /// Loads every registered dataset (scanning each) and the token key, creating the key on
    /// first use. A dataset whose folder is unreadable is kept, with its error, and advertised
    /// to nobody.
    pub async fn load(store: &Store) -> Result<Self, DatasetError> {
        let key = token_key(store).await?;
        let mut entries = BTreeMap::new();
        for record in store.datasets()? {
            let entry = match provider_for(&record) {
                Ok(provider) => scan_entry(provider),
                Err(e) => {
                    tracing::warn!(dataset = %record.name, error = %e, "dataset unusable");
                    continue;
                }
            };
            entries.insert(record.name.clone(), entry);
        }
        Ok(Self { entries, key, own: std::sync::Mutex::new(None) })
    }

    /// The registered datasets, by name.
    pub fn entries(&self) -> &BTreeMap<String, DatasetEntry> {
        &self.entries
    }

    /// Adds (or, after a re-scan, replaces) a dataset in memory.
    pub fn insert(&mut self, provider: Arc<dyn DatasetProvider>) {
        let name = provider.name().to_owned();
        self.entries.insert(name, scan_entry(provider));
        self.forget_own();
    }

    /// Forgets a dataset in memory.
    pub fn remove(&mut self, name: &str) -> bool {
        self.forget_own();
        self.entries.remove(name).is_some()
    }

    fn forget_own(&self) {
        *self.own.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Every dataset with its tokens for `me` (this instance, as a runner of its own
    /// workflows), computed once until a dataset changes.
    pub fn own_summaries(&self, me: &InstanceId) -> Vec<DatasetSummary> {
        let mut own = self.own.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match own.as_ref() {
            Some((id, summaries)) if id == me => summaries.clone(),
            _ => {
                let summaries = self.summaries_for(me, |_| true);
                *own = Some((*me, summaries.clone()));
                summaries
            }
        }
    }

    /// What `peer` is shown: the datasets `allowed` lets it use, with their item tokens keyed
    /// for it.
    pub fn summaries_for(
        &self,
        peer: &InstanceId,
        allowed: impl Fn(&str) -> bool,
    ) -> Vec<DatasetSummary> {
        self.entries
            .iter()
            .filter(|(name, _)| allowed(name))
            .filter_map(|(name, e)| {
                let scan = e.scan.as_ref()?;
                Some(DatasetSummary {
                    name: name.clone(),
                    items: scan.items.len() as u64,
                    bytes: scan.bytes,
                    tokens: scan.items.iter().map(|i| self.token(peer, name, i)).collect(),
                })
            })
            .collect()
    }

    /// The token of `item` of `dataset` for `peer`.
    pub fn token(&self, peer: &InstanceId, dataset: &str, item: &str) -> ItemToken {
        let mut ctx = hmac::Context::with_key(&self.key);
        let id = peer.to_bytes();
        ctx.update(&(id.len() as u64).to_be_bytes());
        ctx.update(&id);
        ctx.update(&(dataset.len() as u64).to_be_bytes());
        ctx.update(dataset.as_bytes());
        ctx.update(item.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        ItemToken(out)
    }

    /// The data a job from `owner` reads: the dataset's folder, or the one item its token
    /// names.
    pub fn resolve(
        &self,
        owner: &InstanceId,
        dataset: &str,
        item: Option<&ItemToken>,
    ) -> Result<JobData, DatasetError> {
        let entry =
            self.entries.get(dataset).ok_or_else(|| DatasetError::NotFound(dataset.into()))?;
        let Some(token) = item else {
            return entry.provider.dataset_folder().map(JobData::Dataset);
        };
        let scan = entry.scan.as_ref().ok_or_else(|| DatasetError::BadFolder {
            path: PathBuf::from(entry.provider.location()),
            why: entry.error.clone().unwrap_or_default(),
        })?;
        let item = scan.items.iter().find(|i| self.token(owner, dataset, i) == *token).ok_or_else(
            || DatasetError::BadFolder {
                path: PathBuf::from(entry.provider.location()),
                why: format!(
                    "no item of dataset {dataset} has the job's item token (was it removed?)"
                ),
            },
        )?;
        Ok(JobData::Item { item: item.clone(), folder: entry.provider.item_folder(item)? })
    }
}

fn scan_entry(provider: Arc<dyn DatasetProvider>) -> DatasetEntry {
    match provider.scan() {
        Ok(scan) => DatasetEntry { provider, scan: Some(scan), error: None },
        Err(e) => {
            tracing::warn!(dataset = provider.name(), error = %e, "cannot scan dataset");
            DatasetEntry { provider, scan: None, error: Some(e.to_string()) }
        }
    }
}

/// The site's item token key, created (32 random bytes, stored durably) on first use.
async fn token_key(store: &Store) -> Result<hmac::Key, DatasetError> {
    if let Some(bytes) = store.meta(TOKEN_KEY_META)? {
        return Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes));
    }
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| StoreError::Backend("the system's random generator failed".into()))?;
    let op = WriteOp::PutMeta { key: TOKEN_KEY_META.into(), value: bytes.to_vec() };
    store.write_async(vec![op]).await?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

/// Checks a dataset folder for registration under `name`: the name is free among `existing`,
/// the folder holds items. Returns the record to store, the provider and its scan.
pub fn check_new(
    name: &str,
    folder: &Path,
    existing: &[DatasetRecord],
    now: kaapana_protocol::Timestamp,
) -> Result<(DatasetRecord, Arc<dyn DatasetProvider>, DatasetScan), DatasetError> {
    let provider = DirectoryDataset::open(name, folder)?;
    if let Some(d) = existing.iter().find(|d| d.name == name) {
        return Err(DatasetError::Exists { name: name.into(), location: d.location.clone() });
    }
    let scan = provider.scan()?;
    let record = DatasetRecord {
        name: name.to_owned(),
        provider: provider.kind().to_owned(),
        location: provider.location(),
        added_at: now,
    };
    Ok((record, Arc::new(provider), scan))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> InstanceId {
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[n; 32]).unwrap();
        InstanceId::from_ed25519_public_key(
            ring::signature::KeyPair::public_key(&key).as_ref().try_into().unwrap(),
        )
        .unwrap()
    }

    fn dataset(root: &Path, items: &[&str]) -> PathBuf {
        let dir = root.join("ds");
        for (i, item) in items.iter().enumerate() {
            std::fs::create_dir_all(dir.join(item)).unwrap();
            std::fs::write(dir.join(item).join("image.dcm"), vec![7u8; i + 1]).unwrap();
        }
        dir
    }

    async fn datasets(root: &Path, dir: &Path) -> (Store, Datasets) {
        let store = Store::open(&root.join("store.redb")).unwrap();
        let (record, _, _) =
            check_new("lung-ct", dir, &[], kaapana_protocol::Timestamp::from_millis(1)).unwrap();
        store.write_async(vec![WriteOp::PutDataset(record)]).await.unwrap();
        let d = Datasets::load(&store).await.unwrap();
        (store, d)
    }

    #[tokio::test]
    async fn peers_see_counts_sizes_and_their_own_tokens_never_item_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let items = ["1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"];
        let dir = dataset(tmp.path(), &items);
        let (_store, d) = datasets(tmp.path(), &dir).await;
        let (a, b) = (peer(1), peer(2));
        let for_a = d.summaries_for(&a, |_| true);
        let for_b = d.summaries_for(&b, |_| true);
        assert_eq!(for_a.len(), 1);
        assert_eq!((for_a[0].items, for_a[0].bytes), (3, 1 + 2 + 3));
        // Tokens are per peer: the same item gets unrelated tokens for two peers.
        assert_eq!(for_a[0].tokens.len(), 3);
        for (ta, tb) in for_a[0].tokens.iter().zip(&for_b[0].tokens) {
            assert_ne!(ta, tb);
        }
        // No item identifier appears in what a peer receives.
        let encoded = format!("{for_a:?}");
        assert!(items.iter().all(|i| !encoded.contains(i)), "{encoded}");
        // A dataset the policy does not allow is not shown at all.
        assert!(d.summaries_for(&a, |n| n != "lung-ct").is_empty());
        // Each token maps back to its item, for that peer only.
        for (token, item) in for_a[0].tokens.iter().zip(items) {
            match d.resolve(&a, "lung-ct", Some(token)).unwrap() {
                JobData::Item { item: got, folder } => {
                    assert_eq!(got, item);
                    assert!(folder.ends_with(item));
                }
                other => panic!("{other:?}"),
            }
            assert!(d.resolve(&b, "lung-ct", Some(token)).is_err());
        }
        assert!(matches!(d.resolve(&a, "lung-ct", None).unwrap(), JobData::Dataset(_)));
        assert!(matches!(d.resolve(&a, "brain-mri", None), Err(DatasetError::NotFound(_))));
    }

    #[tokio::test]
    async fn the_token_key_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = dataset(tmp.path(), &["x"]);
        let (store, d) = datasets(tmp.path(), &dir).await;
        let before = d.token(&peer(1), "lung-ct", "x");
        drop(d);
        let again = Datasets::load(&store).await.unwrap();
        assert_eq!(again.token(&peer(1), "lung-ct", "x"), before);
    }

    #[test]
    fn bad_folders_and_names_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let now = kaapana_protocol::Timestamp::from_millis(1);
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = check_new("lung-ct", &empty, &[], now).err().unwrap().to_string();
        assert!(e.contains("one sub-folder per item"), "{e}");
        let e = check_new("lung ct", &empty, &[], now).err().unwrap().to_string();
        assert!(e.contains("invalid dataset name"), "{e}");
        let e = check_new("x", &tmp.path().join("missing"), &[], now).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
        let dir = dataset(tmp.path(), &["a"]);
        let (record, _, _) = check_new("lung-ct", &dir, &[], now).unwrap();
        let e = check_new("lung-ct", &dir, &[record], now).err().unwrap().to_string();
        assert!(e.contains("already registered"), "{e}");
    }
}
