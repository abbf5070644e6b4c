//! Datasets at this site: named lists of items (DICOM series) behind the [`DatasetProvider`]
//! trait: a folder with one sub-folder per item ([`DirectoryDataset`]), or series in the
//! site's PACS reached over DICOMweb ([`DicomWebDataset`]), which are fetched when a job
//! starts ([`DatasetProvider::stage`], through the bounded cache of [`crate::pacs_cache`]).
//!
//! Nothing about an item but an opaque token leaves the site: capability ads carry dataset
//! names, item counts, sizes, per-modality item counts and one [`ItemToken`] per item, keyed
//! for the receiving instance (HMAC-SHA-256 under this site's secret key over the peer's id,
//! the dataset's name and the item's identifier). A peer cannot invert a token, and two peers
//! get different tokens for the same item, so tokens cannot be joined across instances.
//! Kaapana encrypts dataset identifiers with a key its orchestrator never sees for the same
//! reason. A job for one item names its token; only this site can map it back.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kaapana_protocol::{
    DatasetSummary, InstanceId, ItemToken, MAX_ITEM_TOKENS, MAX_MODALITIES, ModalityCount,
    validate_modality, validate_name,
};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::pacs::{DicomWeb, PacsCredentials, PacsError, SeriesQuery};
use crate::pacs_cache::{PacsCache, StageError, is_uid};
use crate::store::{DatasetRecord, DicomWebDefinition, PacsSeries, Store, StoreError, WriteOp};

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
    /// The registration request does not say what the dataset is.
    #[error("{0}")]
    BadRequest(String),
    /// The PACS could not resolve the selection.
    #[error("{0}")]
    Pacs(#[from] PacsError),
    /// The selection names no series.
    #[error(
        "the PACS at {url} holds no series for {selection}; check the UIDs or the query (QIDO-RS matches attribute values exactly, e.g. Modality=CT)"
    )]
    EmptySelection {
        /// The DICOMweb URL.
        url: String,
        /// What was asked.
        selection: String,
    },
    /// The PACS describes a series in a way that cannot be used.
    #[error("the PACS at {url} lists {what}")]
    BadSeries {
        /// The DICOMweb URL.
        url: String,
        /// What is wrong.
        what: String,
    },
    /// A job's data could not be staged. The message names no identifier from the PACS (no
    /// UID, URL or file of this site): it goes to the job's owner, which may be another
    /// instance. `detail` has them, for this site only (its log and event log).
    #[error("dataset {dataset}: {why}")]
    Staging {
        /// The dataset.
        dataset: String,
        /// Why, with what to check, without identifiers.
        why: String,
        /// The same with the series UIDs, the PACS's URL and files, for this site only.
        detail: String,
    },
}

/// What a provider found in a dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetScan {
    /// Item identifiers (e.g. DICOM series UIDs), in a stable order.
    pub items: Vec<String>,
    /// Total size of the items in bytes (for a DICOMweb dataset: the estimated pixel data).
    pub bytes: u64,
    /// How many items have each modality (empty when the provider does not know).
    pub modalities: Vec<ModalityCount>,
}

/// What a job's staging needs from the node.
#[derive(Clone, Copy, Debug)]
pub struct StageContext<'a> {
    /// The folder a provider that copies or links items fills (`DATA_DIR/jobs/<job>/input`;
    /// replaced if it exists). It is mounted read-only at `/input`.
    pub input: &'a Path,
    /// The PACS cache.
    pub cache: &'a PacsCache,
}

/// A source of one dataset's items.
pub trait DatasetProvider: Send + Sync + fmt::Debug {
    /// The dataset's name.
    fn name(&self) -> &str;
    /// The provider's kind, as stored (`directory`, `dicomweb`).
    fn kind(&self) -> &'static str;
    /// Where it is, as stored (a folder, a DICOMweb URL).
    fn location(&self) -> String;
    /// What the dataset was registered from, if more than its location (a PACS selection).
    fn selection(&self) -> Option<String> {
        None
    }
    /// Lists the items, their size and modalities (without a PACS: from what is stored).
    fn scan(&self) -> Result<DatasetScan, DatasetError>;
    /// Makes the items a job reads available and says where they are: every item (`item`
    /// `None`, batch) or one item (single-file). A job sees the result at `/input` with one
    /// sub-folder per item (`/input/<item>/`). `progress` gets a line for each step, for the
    /// job's log. Blocking: call it off the async runtime.
    fn stage(
        &self,
        item: Option<&str>,
        ctx: &StageContext<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<JobData, DatasetError>;
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
        Ok(DatasetScan { items, bytes, modalities: Vec::new() })
    }

    /// No copy: the folder itself (batch), or the item's folder bound at `/input/<item>/`.
    fn stage(
        &self,
        item: Option<&str>,
        _ctx: &StageContext<'_>,
        _progress: &mut dyn FnMut(&str),
    ) -> Result<JobData, DatasetError> {
        let Some(item) = item else {
            return if self.root.is_dir() {
                Ok(JobData::Dataset(self.root.clone()))
            } else {
                Err(DatasetError::BadFolder { path: self.root.clone(), why: "is gone".into() })
            };
        };
        if item.is_empty() || item.contains(['/', '\0']) || item == "." || item == ".." {
            return Err(DatasetError::BadFolder {
                path: self.root.clone(),
                why: format!("invalid item {item:?}"),
            });
        }
        let path = self.root.join(item);
        if path.is_dir() {
            Ok(JobData::Item { item: item.to_owned(), folder: path })
        } else {
            Err(DatasetError::BadFolder { path, why: "the item is gone".into() })
        }
    }
}

/// What a DICOMweb dataset is made of, as `dataset add --dicomweb` asks for it: exactly one
/// of `series`, `studies` and `query`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DicomWebSelection {
    /// The DICOMweb URL (QIDO-RS and WADO-RS hang off it), e.g. `http://pacs:8042/dicom-web`.
    pub url: String,
    /// Series by SeriesInstanceUID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<String>,
    /// Every series of these studies (StudyInstanceUID).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub studies: Vec<String>,
    /// A QIDO-RS attribute match, `Modality=CT&BodyPartExamined=CHEST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The user of HTTP basic authentication (with `password_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The absolute path of the file holding the password (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The absolute path of the file holding a bearer token (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl DicomWebSelection {
    /// The QIDO-RS query and its description (`series 1.2.3`, `query Modality=CT`).
    fn query(&self) -> Result<(SeriesQuery, String), DatasetError> {
        let bad = |m: &str| DatasetError::BadRequest(m.to_owned());
        let given = [!self.series.is_empty(), !self.studies.is_empty(), self.query.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(bad(
                "a DICOMweb dataset needs exactly one of --series UID..., --study UID... and --query 'KEYWORD=value&...'",
            ));
        }
        for uid in self.series.iter().chain(&self.studies) {
            if !is_uid(uid) {
                return Err(DatasetError::BadRequest(format!(
                    "{uid:?} is not a DICOM UID (digits and dots, at most 64)"
                )));
            }
        }
        if let Some(q) = &self.query {
            return Ok((SeriesQuery::parse_match(q)?, format!("query {q}")));
        }
        if !self.series.is_empty() {
            let what = format!("series {}", self.series.join(" "));
            return Ok((SeriesQuery::Series(self.series.clone()), what));
        }
        let what = format!("study {}", self.studies.join(" "));
        Ok((SeriesQuery::Studies(self.studies.clone()), what))
    }

    /// The credentials as stored.
    fn credentials(&self) -> Result<PacsCredentials, DatasetError> {
        let absolute = |p: &PathBuf| {
            if p.is_absolute() {
                Ok(p.clone())
            } else {
                Err(DatasetError::BadRequest(format!(
                    "the credentials file {} must be given as an absolute path",
                    p.display()
                )))
            }
        };
        match (&self.user, &self.password_file, &self.token_file) {
            (None, None, None) => Ok(PacsCredentials::None),
            (Some(user), Some(file), None) => {
                Ok(PacsCredentials::Basic { user: user.clone(), password_file: absolute(file)? })
            }
            (None, None, Some(file)) => Ok(PacsCredentials::Bearer { token_file: absolute(file)? }),
            _ => Err(DatasetError::BadRequest(
                "PACS credentials are --pacs-user USER with --pacs-password-file FILE, or --pacs-token-file FILE"
                    .into(),
            )),
        }
    }
}

/// A dataset of series in the site's PACS, reached over DICOMweb: defined by the series its
/// selection resolved to when it was registered; a job's series are fetched by WADO-RS when
/// it starts.
#[derive(Clone, Debug)]
pub struct DicomWebDataset {
    name: String,
    url: String,
    definition: DicomWebDefinition,
}

impl DicomWebDataset {
    /// The provider kind's stored name.
    pub const KIND: &'static str = "dicomweb";

    /// The dataset a stored record defines.
    pub fn from_record(record: &DatasetRecord) -> Result<Self, DatasetError> {
        let definition = record.dicomweb.clone().ok_or_else(|| DatasetError::UnknownProvider {
            name: record.name.clone(),
            provider: format!("{} without its series", record.provider),
        })?;
        Ok(Self { name: record.name.clone(), url: record.location.clone(), definition })
    }

    /// Resolves `selection` by QIDO-RS into the series it names, with each one's pixel-data
    /// size estimated from its instances' attributes. Blocking.
    pub fn resolve(name: &str, selection: &DicomWebSelection) -> Result<Self, DatasetError> {
        validate_name("dataset", name).map_err(|_| DatasetError::BadName(name.to_owned()))?;
        let url = selection.url.trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(DatasetError::BadRequest(format!(
                "{url:?} is not a DICOMweb URL (http:// or https://, e.g. http://pacs:8042/dicom-web)"
            )));
        }
        let (query, what) = selection.query()?;
        let credentials = selection.credentials()?;
        let pacs = DicomWeb::new(&url, credentials.load()?);
        let found = pacs.series(&query)?;
        if found.is_empty() {
            return Err(DatasetError::EmptySelection { url, selection: what });
        }
        if found.len() > MAX_ITEM_TOKENS {
            return Err(DatasetError::BadRequest(format!(
                "{what} selects {} series; at most {MAX_ITEM_TOKENS} per site",
                found.len()
            )));
        }
        let mut series = Vec::with_capacity(found.len());
        for s in found {
            if !is_uid(&s.series_uid) || !is_uid(&s.study_uid) {
                return Err(DatasetError::BadSeries {
                    url,
                    what: format!(
                        "series {:?} of study {:?}, which are not both DICOM UIDs",
                        s.series_uid, s.study_uid
                    ),
                });
            }
            let size = pacs.series_size(&s.study_uid, &s.series_uid)?;
            series.push(PacsSeries {
                instances: if s.instances > 0 { s.instances } else { size.instances },
                bytes: size.pixel_bytes,
                modality: s.modality.unwrap_or_default(),
                study_uid: s.study_uid,
                series_uid: s.series_uid,
            });
        }
        Ok(Self {
            name: name.to_owned(),
            url,
            definition: DicomWebDefinition { credentials, selection: what, series },
        })
    }

    /// Its definition, as stored.
    pub fn definition(&self) -> &DicomWebDefinition {
        &self.definition
    }

    fn staging_error(&self, why: impl Into<String>, detail: impl Into<String>) -> DatasetError {
        DatasetError::Staging { dataset: self.name.clone(), why: why.into(), detail: detail.into() }
    }
}

impl DatasetProvider for DicomWebDataset {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn location(&self) -> String {
        self.url.clone()
    }

    fn selection(&self) -> Option<String> {
        Some(self.definition.selection.clone())
    }

    fn scan(&self) -> Result<DatasetScan, DatasetError> {
        let series = &self.definition.series;
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for s in series {
            // A modality the protocol cannot carry (not a DICOM code string) is not counted.
            if validate_modality(&s.modality).is_ok() {
                *counts.entry(s.modality.as_str()).or_default() += 1;
            }
        }
        let mut modalities: Vec<ModalityCount> = counts
            .into_iter()
            .map(|(m, items)| ModalityCount { modality: m.to_owned(), items })
            .collect();
        modalities.sort_by(|a, b| b.items.cmp(&a.items).then_with(|| a.modality.cmp(&b.modality)));
        modalities.truncate(MAX_MODALITIES);
        modalities.sort_by(|a, b| a.modality.cmp(&b.modality));
        Ok(DatasetScan {
            items: series.iter().map(|s| s.series_uid.clone()).collect(),
            bytes: series.iter().map(|s| s.bytes).fold(0, u64::saturating_add),
            modalities,
        })
    }

    /// Fetches the series (all, or the one item) into `ctx.input/<series>/`, through the PACS
    /// cache; one progress line per series and a total.
    fn stage(
        &self,
        item: Option<&str>,
        ctx: &StageContext<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<JobData, DatasetError> {
        let series: Vec<&PacsSeries> = match item {
            None => self.definition.series.iter().collect(),
            Some(uid) => {
                let s = self.definition.series.iter().find(|s| s.series_uid == uid);
                vec![s.ok_or_else(|| {
                    self.staging_error(
                        "the job's series is not part of the dataset (was it registered again?)",
                        format!("series {uid} is not part of the dataset"),
                    )
                })?]
            }
        };
        let auth = self.definition.credentials.load().map_err(|e| {
            self.staging_error(
                "the credentials for the site's PACS cannot be read; the site's admin must fix \
                 them (see the site's event log)",
                format!(
                    "the PACS at {} cannot be used: {e}; fix the file or register the dataset again",
                    self.url
                ),
            )
        })?;
        let pacs = DicomWeb::new(&self.url, auth);
        let input = ctx.input;
        if input.exists() {
            std::fs::remove_dir_all(input)
                .map_err(|e| DatasetError::Io { path: input.to_owned(), source: e })?;
        }
        std::fs::create_dir_all(input)
            .map_err(|e| DatasetError::Io { path: input.to_owned(), source: e })?;
        let started = std::time::Instant::now();
        let (mut instances, mut bytes, mut from_cache) = (0u64, 0u64, 0usize);
        let n = series.len();
        for (i, s) in series.iter().enumerate() {
            let t = std::time::Instant::now();
            let staged =
                ctx.cache.stage_series(&pacs, &s.study_uid, &s.series_uid, input).map_err(|e| {
                    self.staging_error(
                        format!("series {}/{n}: {}", i + 1, public_reason(&e)),
                        stage_reason(&e, &self.definition),
                    )
                })?;
            instances += staged.instances;
            bytes += staged.bytes;
            from_cache += usize::from(staged.from_cache);
            // No UID: the log goes to the job's owner when this site shares logs with it.
            progress(&format!(
                "staged {}/{n} series: {} instances, {} bytes ({}, {:.2} s)",
                i + 1,
                staged.instances,
                staged.bytes,
                if staged.from_cache { "from cache" } else { "from PACS" },
                t.elapsed().as_secs_f64()
            ));
        }
        let secs = started.elapsed().as_secs_f64();
        progress(&format!(
            "staged dataset {}: {n} series, {instances} instances, {bytes} bytes in {secs:.2} s ({} from PACS, {from_cache} from cache; {:.0} MB/s)",
            self.name,
            n - from_cache,
            bytes as f64 / secs.max(1e-6) / 1e6,
        ));
        Ok(JobData::Dataset(input.to_owned()))
    }
}

/// Why staging failed, for the job's owner: what happened and who can fix it, without the
/// series UID, the PACS's URL or this site's files.
fn public_reason(e: &StageError) -> String {
    match e {
        StageError::NotInPacs { .. } => "the series is no longer in the site's PACS (deleted or \
             moved after the dataset was registered; the site's admin can restore it or register \
             the dataset again)"
            .into(),
        StageError::Pacs { source, .. } => match source {
            PacsError::Unreachable { .. } => {
                "the site's PACS cannot be reached; the job can be retried when it is back".into()
            }
            PacsError::Unauthorized { status, .. } => format!(
                "the site's PACS refused the node's credentials (HTTP {status}); the site's admin \
                 must fix them"
            ),
            PacsError::Status { status, .. } => {
                format!("the site's PACS answered HTTP {status}; the job can be retried")
            }
            _ => "the site's PACS failed (see the site's event log); the job can be retried".into(),
        },
        StageError::Io { source, .. } => {
            format!("the site cannot write its PACS cache ({source}); the job can be retried")
        }
        StageError::BadUid(_) => "the dataset holds an invalid series UID".into(),
    }
}

/// Why staging failed, in words a site admin can act on.
fn stage_reason(e: &StageError, definition: &DicomWebDefinition) -> String {
    match e {
        StageError::NotInPacs { .. } => format!(
            "{e}; it was deleted or moved after the dataset was registered: register the dataset again (`kaapana-node dataset remove` and `dataset add --dicomweb`) or restore the series"
        ),
        StageError::Pacs { source: PacsError::Unauthorized { .. }, .. } => {
            match definition.credentials.file() {
                Some(f) => format!("{e} (credentials from {})", f.display()),
                None => format!("{e} (no credentials are configured for this dataset)"),
            }
        }
        _ => e.to_string(),
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
        DicomWebDataset::KIND => Ok(Arc::new(DicomWebDataset::from_record(record)?)),
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

/// Where a job's data is, once staged at its runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobData {
    /// A folder mounted at `/input`, one sub-folder per item (the whole dataset of a batch job,
    /// or the staged item of a single-file job).
    Dataset(PathBuf),
    /// Single-file from a folder dataset: one item's folder, bound at `/input/<item>/`.
    Item {
        /// The item's identifier (its folder name).
        item: String,
        /// Its folder.
        folder: PathBuf,
    },
}

/// The data a job reads, resolved at its runner but not staged yet.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The dataset's provider.
    pub provider: Arc<dyn DatasetProvider>,
    /// The item of a single-file job (its token mapped back), `None` for a batch job.
    pub item: Option<String>,
}

impl Resolved {
    /// Stages it ([`DatasetProvider::stage`]). Blocking.
    pub fn stage(
        &self,
        ctx: &StageContext<'_>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<JobData, DatasetError> {
        self.provider.stage(self.item.as_deref(), ctx, progress)
    }
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
                    modalities: scan.modalities.clone(),
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

    /// The data a job from `owner` reads: the whole dataset, or the one item its token names.
    pub fn resolve(
        &self,
        owner: &InstanceId,
        dataset: &str,
        item: Option<&ItemToken>,
    ) -> Result<Resolved, DatasetError> {
        let entry =
            self.entries.get(dataset).ok_or_else(|| DatasetError::NotFound(dataset.into()))?;
        let Some(token) = item else {
            return Ok(Resolved { provider: Arc::clone(&entry.provider), item: None });
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
        Ok(Resolved { provider: Arc::clone(&entry.provider), item: Some(item.clone()) })
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
        dicomweb: None,
    };
    Ok((record, Arc::new(provider), scan))
}

/// Resolves a DICOMweb selection for registration under `name` (free among `existing`) by
/// QIDO-RS. Returns the record to store (the dataset's whole definition), the provider and
/// its scan. Blocking.
pub fn check_new_dicomweb(
    name: &str,
    selection: &DicomWebSelection,
    existing: &[DatasetRecord],
    now: kaapana_protocol::Timestamp,
) -> Result<(DatasetRecord, Arc<dyn DatasetProvider>, DatasetScan), DatasetError> {
    validate_name("dataset", name).map_err(|_| DatasetError::BadName(name.to_owned()))?;
    if let Some(d) = existing.iter().find(|d| d.name == name) {
        return Err(DatasetError::Exists { name: name.into(), location: d.location.clone() });
    }
    let provider = DicomWebDataset::resolve(name, selection)?;
    let scan = provider.scan()?;
    let record = DatasetRecord {
        name: name.to_owned(),
        provider: DicomWebDataset::KIND.to_owned(),
        location: provider.location(),
        added_at: now,
        dicomweb: Some(provider.definition().clone()),
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
        assert!(for_a[0].modalities.is_empty(), "a folder's modalities are not known");
        // A dataset the policy does not allow is not shown at all.
        assert!(d.summaries_for(&a, |n| n != "lung-ct").is_empty());
        // Each token maps back to its item, for that peer only; a folder's item is staged
        // without a copy.
        let cache = PacsCache::open(&tmp.path().join("cache"), 1 << 20).unwrap();
        let ctx = StageContext { input: &tmp.path().join("input"), cache: &cache };
        for (token, item) in for_a[0].tokens.iter().zip(items) {
            let r = d.resolve(&a, "lung-ct", Some(token)).unwrap();
            assert_eq!(r.item.as_deref(), Some(item));
            match r.stage(&ctx, &mut |_| {}).unwrap() {
                JobData::Item { item: got, folder } => {
                    assert_eq!(got, item);
                    assert_eq!(folder, dir.canonicalize().unwrap().join(item));
                }
                other => panic!("{other:?}"),
            }
            assert!(d.resolve(&b, "lung-ct", Some(token)).is_err());
        }
        let all = d.resolve(&a, "lung-ct", None).unwrap().stage(&ctx, &mut |_| {}).unwrap();
        assert_eq!(all, JobData::Dataset(dir.canonicalize().unwrap()));
        assert!(!ctx.input.exists(), "nothing copied");
        assert!(matches!(d.resolve(&a, "brain-mri", None), Err(DatasetError::NotFound(_))));
    }

    #[tokio::test]
    async fn a_pacs_dataset_is_advertised_from_its_record_with_modality_counts_and_no_uids() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store.redb")).unwrap();
        let series = |uid: &str, study: &str, modality: &str| PacsSeries {
            series_uid: uid.into(),
            study_uid: study.into(),
            modality: modality.into(),
            instances: 2,
            bytes: 1000,
        };
        let record = DatasetRecord {
            name: "chest".into(),
            provider: DicomWebDataset::KIND.into(),
            // No PACS answers here: the record alone defines and advertises the dataset.
            location: "http://127.0.0.1:9/dicom-web".into(),
            added_at: kaapana_protocol::Timestamp::from_millis(1),
            dicomweb: Some(DicomWebDefinition {
                credentials: PacsCredentials::Basic {
                    user: "kaapana".into(),
                    password_file: "/etc/kaapana/pacs-password".into(),
                },
                selection: "study 1.2.840.99".into(),
                series: vec![
                    series("1.2.840.99.1", "1.2.840.99", "CT"),
                    series("1.2.840.99.2", "1.2.840.99", "CT"),
                    series("1.2.840.99.3", "1.2.840.99", "SEG"),
                    series("1.2.840.99.4", "1.2.840.99", "not a code string"),
                ],
            }),
        };
        store.write_async(vec![WriteOp::PutDataset(record)]).await.unwrap();
        let d = Datasets::load(&store).await.unwrap();
        let ads = d.summaries_for(&peer(1), |_| true);
        assert_eq!((ads[0].items, ads[0].bytes, ads[0].tokens.len()), (4, 4000, 4));
        let counts: Vec<(&str, u64)> =
            ads[0].modalities.iter().map(|m| (m.modality.as_str(), m.items)).collect();
        assert_eq!(counts, [("CT", 2), ("SEG", 1)]);
        // Neither UIDs nor the PACS's address or credentials are in what a peer receives.
        let wire = postcard::to_allocvec(&ads).unwrap();
        for secret in ["1.2.840.99", "127.0.0.1", "pacs-password", "kaapana"] {
            assert!(memchr::memmem::find(&wire, secret.as_bytes()).is_none(), "{secret}");
            assert!(!format!("{ads:?}").contains(secret), "{secret}");
        }
        // A single item's token maps back to its series, for that peer.
        let r = d.resolve(&peer(1), "chest", Some(&ads[0].tokens[2])).unwrap();
        assert_eq!(r.item.as_deref(), Some("1.2.840.99.3"));
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
