//! The bounded on-disk cache of DICOM series fetched from the site's PACS, and the staging of
//! a series into a job's input folder.
//!
//! ```text
//! DATA_DIR/pacs-cache/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   a complete series
//! DATA_DIR/pacs-cache/<SeriesInstanceUID>/.series.json           what it holds (files, sizes)
//! DATA_DIR/pacs-cache/.partial-<series>-<n>/                     a series being fetched
//! ```
//!
//! A series is fetched by WADO-RS into a `.partial-*` folder (each instance written as it
//! streams in) and renamed to its UID's folder once every instance is there, so the cache
//! never holds part of a series under its name. Staging hard-links the series' files into the
//! job's folder (`DATA_DIR/jobs/<job>/input/<SeriesInstanceUID>/`): no copy, and evicting the
//! series from the cache later does not take the files from a job that still reads them (its
//! links keep them until the job's input folder is removed when the job ends).
//!
//! The cache holds at most `[datasets] pacs_cache_bytes` (least recently used series go
//! first); a series larger than the bound is still staged, then evicted. Series being staged
//! are never evicted under a job. Before a cached series is used, the PACS is asked (QIDO-RS)
//! whether it still holds it with as many instances: the PACS stays the authority, so a series
//! deleted there (e.g. after a withdrawn consent) is not served from the cache, and a series
//! that changed is fetched again.
//!
//! Files are not fsynced (a cache can be refetched): after a crash, a cached series whose files
//! do not have the sizes its `.series.json` lists is fetched again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::pacs::{DicomWeb, InstanceSink, PacsError, RetrieveError, SeriesQuery};

/// The default bound of the cache: 50 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 50 << 30;
/// The name of a cached series' description file.
const SERIES_FILE: &str = ".series.json";

/// Why a series could not be staged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The PACS no longer holds the series.
    #[error("series {series} is no longer in the PACS at {pacs} ({detail})")]
    NotInPacs {
        /// The series.
        series: String,
        /// The PACS's DICOMweb URL.
        pacs: String,
        /// What the PACS answered.
        detail: String,
    },
    /// The PACS failed (down, refusing the credentials, an error status).
    #[error("cannot fetch series {series}: {source}")]
    Pacs {
        /// The series.
        series: String,
        /// The PACS's error.
        #[source]
        source: PacsError,
    },
    /// A file of the cache or of the job's folder.
    #[error("cannot stage series {series}: {}: {source}", path.display())]
    Io {
        /// The series.
        series: String,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A UID that cannot be a folder name.
    #[error("{0:?} is not a DICOM UID (digits and dots, at most 64)")]
    BadUid(String),
}

/// What staging one series did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedSeries {
    /// Instances staged.
    pub instances: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether the cache had it (else it came from the PACS).
    pub from_cache: bool,
}

/// Whether `uid` is a DICOM UID (`[0-9.]`, 1-64 characters, not `.`/`..`), so a safe folder
/// and file name.
pub fn is_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && uid.bytes().any(|b| b.is_ascii_digit())
}

/// A cached series' description (`.series.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SeriesRecord {
    /// The DICOMweb URL it came from.
    source: String,
    study_uid: String,
    series_uid: String,
    /// File name and size of each instance, in the order the PACS sent them.
    files: Vec<(String, u64)>,
}

impl SeriesRecord {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }

    /// Whether every file is there with its size.
    fn intact(&self, dir: &Path) -> bool {
        self.files.iter().all(|(name, size)| {
            std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.len() == *size)
        })
    }
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    /// Milliseconds since the epoch of the last use.
    last_used: u64,
    /// Stagings using it right now (not evicted while above 0).
    pins: u32,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Entry>,
    total: u64,
}

/// The PACS cache of one node.
#[derive(Debug)]
pub struct PacsCache {
    root: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    /// One lock per series being staged, so that two jobs needing it fetch it once.
    busy: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    counter: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl PacsCache {
    /// The cache in `root` (created) holding at most `limit` bytes: finds the complete series
    /// already there and removes what an interrupted fetch or eviction left.
    pub fn open(root: &Path, limit: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let mut index = Index::default();
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // `.partial-*` and `.evict-*` leftovers.
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let record = std::fs::read(path.join(SERIES_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<SeriesRecord>(&b).ok());
            match record {
                Some(r) if r.series_uid == name => {
                    let last_used = std::fs::metadata(path.join(SERIES_FILE))
                        .and_then(|m| m.modified())
                        .map_or(0, millis);
                    index.total += r.bytes();
                    index.entries.insert(name, Entry { bytes: r.bytes(), last_used, pins: 0 });
                }
                _ => {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        let cache = Self {
            root: root.to_owned(),
            limit,
            index: Mutex::new(index),
            busy: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        };
        cache.evict_to_limit();
        Ok(cache)
    }

    /// Its folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its bound in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes it holds now.
    pub fn total_bytes(&self) -> u64 {
        lock(&self.index).total
    }

    /// Whether it holds `series`.
    pub fn contains(&self, series: &str) -> bool {
        lock(&self.index).entries.contains_key(series)
    }

    /// Makes `series` of `study` available in `into/<series>/` (created, with `into` if
    /// needed; `into/<series>` must not exist):
    /// from the cache if it holds the series as the PACS still lists it, else fetched from
    /// `pacs` by WADO-RS into the cache first. Blocking.
    pub fn stage_series(
        &self,
        pacs: &DicomWeb,
        study: &str,
        series: &str,
        into: &Path,
    ) -> Result<StagedSeries, StageError> {
        if !is_uid(series) {
            return Err(StageError::BadUid(series.to_owned()));
        }
        let series_lock = Arc::clone(lock(&self.busy).entry(series.to_owned()).or_default());
        let result = {
            let _held = lock(&series_lock);
            let result = self.stage_locked(pacs, study, series, into);
            // Its files are linked (or it failed): it may go now.
            if let Some(e) = lock(&self.index).entries.get_mut(series) {
                e.pins = e.pins.saturating_sub(1);
            }
            result
        };
        let mut busy = lock(&self.busy);
        if Arc::strong_count(&series_lock) == 2 {
            busy.remove(series);
        }
        drop(busy);
        self.evict_to_limit();
        result
    }

    /// With the series' lock held. Leaves the series pinned (if it is in the cache).
    fn stage_locked(
        &self,
        pacs: &DicomWeb,
        study: &str,
        series: &str,
        into: &Path,
    ) -> Result<StagedSeries, StageError> {
        let io = |path: &Path, source| StageError::Io {
            series: series.to_owned(),
            path: path.to_owned(),
            source,
        };
        let dir = self.root.join(series);
        let cached = self.pin(series).then(|| self.read_record(series)).flatten();
        if let Some(record) = cached {
            let listed = pacs
                .series(&SeriesQuery::Series(vec![series.to_owned()]))
                .map_err(|source| StageError::Pacs { series: series.to_owned(), source })?;
            let Some(info) = listed.first() else {
                return Err(StageError::NotInPacs {
                    series: series.to_owned(),
                    pacs: pacs.base().to_owned(),
                    detail: "QIDO-RS finds no such series".into(),
                });
            };
            let same = record.source == pacs.base()
                && (info.instances == 0 || info.instances == record.files.len() as u64)
                && record.intact(&dir);
            if same {
                let _ = std::fs::File::options()
                    .append(true)
                    .open(dir.join(SERIES_FILE))
                    .and_then(|f| f.set_modified(SystemTime::now()));
                link_series(&dir, &record, &into.join(series)).map_err(|(p, e)| io(&p, e))?;
                return Ok(StagedSeries {
                    instances: record.files.len() as u64,
                    bytes: record.bytes(),
                    from_cache: true,
                });
            }
            // Stale: fetched again below.
            self.evict(series);
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let partial = self.root.join(format!(".partial-{series}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
        let fetched = self.fetch(pacs, study, series, &partial);
        let record = match fetched {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        let bytes = record.bytes();
        {
            // Renamed and indexed (pinned) together, so that no eviction runs in between.
            let mut index = lock(&self.index);
            std::fs::rename(&partial, &dir).map_err(|e| io(&dir, e))?;
            index.total += bytes;
            let last_used = millis(SystemTime::now());
            index.entries.insert(series.to_owned(), Entry { bytes, last_used, pins: 1 });
        }
        link_series(&dir, &record, &into.join(series)).map_err(|(p, e)| io(&p, e))?;
        Ok(StagedSeries { instances: record.files.len() as u64, bytes, from_cache: false })
    }

    /// Fetches a series into `partial`; its record (also written there).
    fn fetch(
        &self,
        pacs: &DicomWeb,
        study: &str,
        series: &str,
        partial: &Path,
    ) -> Result<SeriesRecord, StageError> {
        let mut writer = SeriesWriter {
            dir: partial.to_owned(),
            file: None,
            index: 0,
            head: Vec::new(),
            size: 0,
            files: Vec::new(),
        };
        let not_in_pacs = |detail: String| StageError::NotInPacs {
            series: series.to_owned(),
            pacs: pacs.base().to_owned(),
            detail,
        };
        match pacs.retrieve_series(study, series, &mut writer) {
            Ok(0) => return Err(not_in_pacs("WADO-RS returned no instance".into())),
            Ok(_) => {}
            Err(RetrieveError::Pacs(PacsError::Status { status: 404, .. })) => {
                return Err(not_in_pacs("WADO-RS answered HTTP 404".into()));
            }
            Err(RetrieveError::Pacs(source)) => {
                return Err(StageError::Pacs { series: series.to_owned(), source });
            }
            Err(RetrieveError::Sink(e)) => {
                return Err(StageError::Io {
                    series: series.to_owned(),
                    path: partial.to_owned(),
                    source: e,
                });
            }
        }
        let record = SeriesRecord {
            source: pacs.base().to_owned(),
            study_uid: study.to_owned(),
            series_uid: series.to_owned(),
            files: writer.files,
        };
        let path = partial.join(SERIES_FILE);
        let json = serde_json::to_vec(&record).unwrap_or_default();
        std::fs::write(&path, json).map_err(|e| StageError::Io {
            series: series.to_owned(),
            path,
            source: e,
        })?;
        Ok(record)
    }

    /// Pins `series` if the cache holds it.
    fn pin(&self, series: &str) -> bool {
        let mut index = lock(&self.index);
        match index.entries.get_mut(series) {
            Some(e) => {
                e.pins += 1;
                e.last_used = millis(SystemTime::now());
                true
            }
            None => false,
        }
    }

    fn read_record(&self, series: &str) -> Option<SeriesRecord> {
        let bytes = std::fs::read(self.root.join(series).join(SERIES_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Takes `series` out of the cache (pinned or not) and deletes its files.
    fn evict(&self, series: &str) {
        let trash = {
            let mut index = lock(&self.index);
            let Some(e) = index.entries.remove(series) else { return };
            index.total = index.total.saturating_sub(e.bytes);
            self.to_trash(series)
        };
        if let Some(t) = trash {
            let _ = std::fs::remove_dir_all(t);
        }
    }

    /// Renames a series' folder away (atomic disappearance); deleted by the caller.
    fn to_trash(&self, series: &str) -> Option<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let trash = self.root.join(format!(".evict-{series}-{n}"));
        std::fs::rename(self.root.join(series), &trash).ok().map(|()| trash)
    }

    /// Evicts least recently used series that no staging holds until the total is within the
    /// bound.
    fn evict_to_limit(&self) {
        let mut trash = Vec::new();
        {
            let mut index = lock(&self.index);
            while index.total > self.limit {
                let victim = index
                    .entries
                    .iter()
                    .filter(|(_, e)| e.pins == 0)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone());
                let Some(victim) = victim else { break };
                if let Some(e) = index.entries.remove(&victim) {
                    index.total = index.total.saturating_sub(e.bytes);
                }
                tracing::debug!(series = %victim, "evicted from the PACS cache");
                trash.extend(self.to_trash(&victim));
            }
        }
        for t in trash {
            let _ = std::fs::remove_dir_all(t);
        }
    }
}

/// Hard-links every file of a cached series into `to` (created).
fn link_series(
    dir: &Path,
    record: &SeriesRecord,
    to: &Path,
) -> Result<(), (PathBuf, std::io::Error)> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| (parent.to_owned(), e))?;
    }
    std::fs::create_dir(to).map_err(|e| (to.to_owned(), e))?;
    for (name, _) in &record.files {
        let target = to.join(name);
        std::fs::hard_link(dir.join(name), &target).map_err(|e| (target, e))?;
    }
    Ok(())
}

/// The most bytes of an instance's start kept to find its SOPInstanceUID.
const HEAD: usize = 16 * 1024;

/// Writes the instances of one WADO-RS answer into a folder, one file each, named by the
/// instance's SOPInstanceUID (from its DICOM meta header) or, without one, by its index.
struct SeriesWriter {
    dir: PathBuf,
    file: Option<std::fs::File>,
    index: usize,
    head: Vec<u8>,
    size: u64,
    files: Vec<(String, u64)>,
}

impl SeriesWriter {
    fn part_path(&self) -> PathBuf {
        self.dir.join(format!("{:06}.part", self.index))
    }
}

impl InstanceSink for SeriesWriter {
    fn begin(&mut self, index: usize) -> std::io::Result<()> {
        self.index = index;
        self.head.clear();
        self.size = 0;
        self.file = Some(std::fs::File::create(self.part_path())?);
        Ok(())
    }

    fn data(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.head.len() < HEAD {
            let n = (HEAD - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
        }
        self.size += bytes.len() as u64;
        match &mut self.file {
            Some(f) => f.write_all(bytes),
            None => Err(std::io::Error::other("instance data before its start")),
        }
    }

    fn end(&mut self) -> std::io::Result<()> {
        drop(self.file.take());
        let name = sop_instance_uid(&self.head)
            .map(|uid| format!("{uid}.dcm"))
            .filter(|n| !self.files.iter().any(|(f, _)| f == n))
            .unwrap_or_else(|| format!("{:06}.dcm", self.index));
        std::fs::rename(self.part_path(), self.dir.join(&name))?;
        self.files.push((name, self.size));
        Ok(())
    }
}

/// The MediaStorageSOPInstanceUID (0002,0003) of a DICOM Part 10 file's meta header, if
/// `head` (the file's start) holds one that is a valid UID.
pub fn sop_instance_uid(head: &[u8]) -> Option<String> {
    if head.len() < 132 || &head[128..132] != b"DICM" {
        return None;
    }
    let mut at = 132;
    // The meta header is explicit VR little endian.
    while at + 8 <= head.len() {
        let group = u16::from_le_bytes([head[at], head[at + 1]]);
        let element = u16::from_le_bytes([head[at + 2], head[at + 3]]);
        if group != 0x0002 {
            return None;
        }
        let vr = &head[at + 4..at + 6];
        let (len, value_at) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            if at + 12 > head.len() {
                return None;
            }
            let len = u32::from_le_bytes(head[at + 8..at + 12].try_into().ok()?);
            (len as usize, at + 12)
        } else {
            (usize::from(u16::from_le_bytes([head[at + 6], head[at + 7]])), at + 8)
        };
        let end = value_at.checked_add(len)?;
        if end > head.len() {
            return None;
        }
        if element == 0x0003 {
            let uid = std::str::from_utf8(&head[value_at..end]).ok()?;
            let uid = uid.trim_end_matches(['\0', ' ']);
            return is_uid(uid).then(|| uid.to_owned());
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part10(uid: &str) -> Vec<u8> {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        // (0002,0000) UL 4
        f.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0, 0, 0, 0, 0]);
        // (0002,0001) OB, 4-byte length
        f.extend_from_slice(&[2, 0, 1, 0, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        f.extend_from_slice(&[2, 0, 3, 0, b'U', b'I']);
        f.extend_from_slice(&(v.len() as u16).to_le_bytes());
        f.extend_from_slice(&v);
        f.extend_from_slice(&[8, 0, 0x18, 0, b'U', b'I', 2, 0, b'1', 0]);
        f
    }

    #[test]
    fn the_sop_instance_uid_is_read_from_the_meta_header() {
        assert_eq!(sop_instance_uid(&part10("1.2.840.3")).as_deref(), Some("1.2.840.3"));
        assert_eq!(sop_instance_uid(&part10("1.2.84")).as_deref(), Some("1.2.84"));
        assert_eq!(sop_instance_uid(&part10("../etc")), None);
        assert_eq!(sop_instance_uid(b"not dicom"), None);
        let mut cut = part10("1.2.840.3");
        cut.truncate(150);
        assert_eq!(sop_instance_uid(&cut), None);
        assert!(is_uid("1.2.3") && !is_uid("..") && !is_uid("1/2") && !is_uid(""));
    }

    #[test]
    fn a_cache_over_its_bound_evicts_the_least_recently_used_unpinned_series() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        for (i, uid) in ["1.1", "1.2", "1.3"].iter().enumerate() {
            let dir = root.join(uid);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("a.dcm"), vec![0u8; 100]).unwrap();
            let r = SeriesRecord {
                source: "x".into(),
                study_uid: "1".into(),
                series_uid: (*uid).into(),
                files: vec![("a.dcm".into(), 100)],
            };
            std::fs::write(dir.join(SERIES_FILE), serde_json::to_vec(&r).unwrap()).unwrap();
            let f = std::fs::File::options().append(true).open(dir.join(SERIES_FILE)).unwrap();
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            f.set_modified(t).unwrap();
        }
        std::fs::create_dir_all(root.join(".partial-1.4-1-0")).unwrap();
        let cache = PacsCache::open(&root, 1000).unwrap();
        assert_eq!(cache.total_bytes(), 300);
        assert!(!root.join(".partial-1.4-1-0").exists());
        drop(cache);
        // Reopened with room for two: the oldest goes.
        let cache = PacsCache::open(&root, 250).unwrap();
        assert_eq!(cache.total_bytes(), 200);
        assert!(!cache.contains("1.1") && cache.contains("1.2") && cache.contains("1.3"));
        assert!(!root.join("1.1").exists());
        // A pinned series stays even when it is the oldest.
        assert!(cache.pin("1.2"));
        let cache = PacsCache { limit: 100, ..cache };
        cache.evict_to_limit();
        assert!(cache.contains("1.2") && !cache.contains("1.3"));
    }
}
