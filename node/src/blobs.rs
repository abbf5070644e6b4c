//! Content-addressed blobs on disk: result bundles and job logs.
//!
//! # Layout
//!
//! ```text
//! DATA_DIR/blobs/sha256/<64 hex>        complete blobs, verified against their digest, 0444
//! DATA_DIR/blobs/partial/<64 hex>.part  uploads in progress (resumable), 0600
//! DATA_DIR/blobs/partial/<64 hex>.part.synced  how many bytes of that file are durable
//! DATA_DIR/blobs/partial/put-*.tmp      files being hashed in by `put_file`
//! ```
//!
//! A file appears under `sha256/` only complete: it is written under `partial/`, checked
//! (size and SHA-256 against the expected [`BlobRef`]), fsynced, made read-only and renamed
//! into place (then the directory is fsynced). So a blob that exists is whole and verified; a
//! crash leaves at most a partial file, from which the next upload resumes.
//!
//! # Resuming
//!
//! [`BlobStore::begin`] opens the partial file of the expected digest and hashes what it
//! already holds, so the upload continues at [`Upload::offset`] with the digest state of the
//! whole prefix.
//!
//! Only durable bytes are offered: the prefix a *checkpoint* fsynced. A checkpoint fsyncs the
//! partial file, then records its length in `<hex>.part.synced` (8 bytes, big-endian,
//! written to a temporary file, fsynced and renamed over the old record). [`Upload::write`]
//! starts one every [`CHECKPOINT_EVERY`] bytes on a thread of its own (the writer does not
//! wait for the disk), and [`Upload::checkpoint`] takes one at a resume point (the results
//! protocol when an upload stops short). `begin` offers `min(file length, record)` and cuts
//! the file there: what was written after the last checkpoint (a crash can leave it torn or
//! as zeros) is dropped, not hashed in; a partial file without a record starts from zero. A
//! lost record update only makes the offer smaller. Beyond that nothing in a partial file is
//! trusted: if its durable bytes were wrong, the final check fails with
//! [`BlobError::DigestMismatch`], the partial file is deleted and the next upload starts
//! from zero.
//!
//! The store takes no locks: at most one [`Upload`] per digest may be open at a time (the
//! results protocol serialises uploads of the same digest). Everything here is blocking file
//! I/O: async code calls it from `spawn_blocking`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use kaapana_protocol::{BlobRef, Sha256Digest};
use ring::digest::{Context, SHA256};

use crate::data_dir::DataDir;

/// How much is read at a time when hashing or copying a file.
const READ_BUFFER: usize = 1 << 20;

/// Chunks of at least this size are hashed on a second thread while they are written.
const HASH_ASIDE: usize = 256 * 1024;

/// An upload takes a checkpoint (fsync, then a durable record of the length) every this many
/// bytes, in the background: at most this much is received again after a crash.
pub const CHECKPOINT_EVERY: u64 = 64 << 20;

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The bytes do not hash to the expected digest; the partial file was deleted.
    #[error("the received bytes hash to {actual}, not to the expected {expected}")]
    DigestMismatch {
        /// The digest the bytes should have.
        expected: Sha256Digest,
        /// Their digest.
        actual: Sha256Digest,
    },
    /// More or fewer bytes than expected. Too few keeps the partial file (an upload can
    /// resume); too many leaves it as it was before the refused write.
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Sha256Digest,
        /// Its expected size.
        expected: u64,
        /// The size received (or that would have been reached).
        actual: u64,
    },
    /// A file operation failed.
    #[error("blob store: {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobError + 'a {
    move |source| BlobError::Io { what, path: path.to_owned(), source }
}

/// The blob directory of one node. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct BlobStore {
    complete: PathBuf,
    partial: PathBuf,
}

impl BlobStore {
    /// The store at `root` (`DATA_DIR/blobs`), creating its directories if missing.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        let me = Self { complete: root.join("sha256"), partial: root.join("partial") };
        for dir in [&me.complete, &me.partial] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("cannot create", dir))?;
        }
        Ok(me)
    }

    /// The store of the node in `dir`: `DATA_DIR/blobs`.
    pub fn in_data_dir(dir: &DataDir) -> Result<Self, BlobError> {
        Self::open(&dir.root().join("blobs"))
    }

    /// Where the complete blob `digest` lives, if it is here.
    pub fn path(&self, digest: &Sha256Digest) -> Option<PathBuf> {
        let path = self.complete_path(digest);
        path.is_file().then_some(path)
    }

    /// Where the complete blob `digest` lives or would live.
    pub fn complete_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.complete.join(digest.hex())
    }

    /// The partial file of an upload of `digest` (which may not exist).
    pub fn partial_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.partial.join(format!("{}.part", digest.hex()))
    }

    /// Where the durable length of the partial file of `digest` is recorded.
    fn record_path(&self, digest: &Sha256Digest) -> PathBuf {
        self.partial.join(format!("{}.part.synced", digest.hex()))
    }

    /// Deletes the partial file of `digest` (and its record), if there is one.
    pub fn remove_partial(&self, digest: &Sha256Digest) -> Result<(), BlobError> {
        remove_if_there(&self.partial_path(digest))?;
        remove_if_there(&self.record_path(digest))
    }

    /// Starts or resumes the upload of `expected`: opens its partial file, cuts it to its
    /// last checkpoint (see the module docs) and hashes what it then holds (a partial file
    /// longer than the blob is emptied).
    pub fn begin(&self, expected: BlobRef) -> Result<Upload, BlobError> {
        let partial = self.partial_path(&expected.digest);
        let record = self.record_path(&expected.digest);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io_err("cannot open", &partial))?;
        let len = file.metadata().map_err(io_err("cannot read", &partial))?.len();
        let durable = read_record(&record).map_err(io_err("cannot read", &record))?;
        let mut keep = len.min(durable);
        if keep > expected.size {
            keep = 0;
        }
        if keep < len {
            file.set_len(keep).map_err(io_err("cannot truncate", &partial))?;
        }
        let mut ctx = Context::new(&SHA256);
        let written = hash_into(&mut file, &mut ctx).map_err(io_err("cannot read", &partial))?;
        let target = self.complete_path(&expected.digest);
        Ok(Upload {
            expected,
            file,
            ctx,
            written,
            next_checkpoint: written.saturating_add(CHECKPOINT_EVERY),
            syncing: None,
            partial,
            record,
            target,
            dir: self.complete.clone(),
        })
    }

    /// Copies the file at `path` into the store, hashing it on the way (a runner's finished
    /// bundle), and returns its reference. A blob that is already here is not written again.
    pub fn put_file(&self, path: &Path) -> Result<BlobRef, BlobError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut src = File::open(path).map_err(io_err("cannot open", path))?;
        let tmp = self.partial.join(format!(
            "put-{}-{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut dst = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("cannot create", &tmp))?;
            let mut ctx = Context::new(&SHA256);
            let mut buf = vec![0u8; READ_BUFFER];
            let mut size = 0u64;
            loop {
                let n = read_some(&mut src, &mut buf).map_err(io_err("cannot read", path))?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
                dst.write_all(&buf[..n]).map_err(io_err("cannot write", &tmp))?;
                size += n as u64;
            }
            let blob = BlobRef { digest: digest_of(ctx), size };
            if self.path(&blob.digest).is_none() {
                self.install(&dst, &tmp, &self.complete_path(&blob.digest))?;
            }
            Ok(blob)
        })();
        // After a successful install the temporary name is gone already.
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Makes `file` (at `from`) durable and read-only and renames it to `to`.
    fn install(&self, file: &File, from: &Path, to: &Path) -> Result<(), BlobError> {
        install(file, from, to, &self.complete)
    }
}

fn install(file: &File, from: &Path, to: &Path, dir: &Path) -> Result<(), BlobError> {
    file.set_permissions(fs::Permissions::from_mode(0o444))
        .map_err(io_err("cannot make read-only", from))?;
    file.sync_all().map_err(io_err("cannot fsync", from))?;
    fs::rename(from, to).map_err(io_err("cannot rename into place", to))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync", dir))
}

fn remove_if_there(path: &Path) -> Result<(), BlobError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("cannot delete", path)(e)),
        _ => Ok(()),
    }
}

/// The durable length recorded at `record`; 0 without a (whole) record.
fn read_record(record: &Path) -> io::Result<u64> {
    match fs::read(record) {
        Ok(bytes) => Ok(<[u8; 8]>::try_from(bytes.as_slice()).map_or(0, u64::from_be_bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Makes the first `len` bytes of `file` durable, then records `len` at `record`.
fn take_checkpoint(file: &File, len: u64, partial: &Path, record: &Path) -> Result<(), BlobError> {
    file.sync_data().map_err(io_err("cannot fsync", partial))?;
    let tmp = record.with_extension("synced.tmp");
    let write = || -> io::Result<()> {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&len.to_be_bytes())?;
        f.sync_data()?;
        fs::rename(&tmp, record)
    };
    write().map_err(io_err("cannot record the durable length in", record))
}

/// Hashes a file without storing it: its [`BlobRef`].
pub fn hash_file(path: &Path) -> Result<BlobRef, BlobError> {
    let mut file = File::open(path).map_err(io_err("cannot open", path))?;
    let mut ctx = Context::new(&SHA256);
    let size = hash_into(&mut file, &mut ctx).map_err(io_err("cannot read", path))?;
    Ok(BlobRef { digest: digest_of(ctx), size })
}

/// Feeds the rest of `file` into `ctx`; returns how many bytes.
fn hash_into(file: &mut File, ctx: &mut Context) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; READ_BUFFER];
    let mut total = 0u64;
    loop {
        let n = read_some(file, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        ctx.update(&buf[..n]);
        total += n as u64;
    }
}

fn read_some(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn digest_of(ctx: Context) -> Sha256Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Sha256Digest(out)
}

/// An upload in progress: appends to the partial file and hashes incrementally. Dropping it
/// keeps the partial file for a later resume.
pub struct Upload {
    expected: BlobRef,
    file: File,
    ctx: Context,
    written: u64,
    /// Where the next background checkpoint is due.
    next_checkpoint: u64,
    /// The background checkpoint running, if any.
    syncing: Option<JoinHandle<Result<(), BlobError>>>,
    partial: PathBuf,
    record: PathBuf,
    target: PathBuf,
    dir: PathBuf,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("expected", &self.expected)
            .field("written", &self.written)
            .field("partial", &self.partial)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// The blob being uploaded.
    pub const fn expected(&self) -> BlobRef {
        self.expected
    }

    /// How many bytes the partial file holds: where the sender continues.
    pub const fn offset(&self) -> u64 {
        self.written
    }

    /// Appends `chunk`. Refuses (writing nothing) a chunk that would make the blob longer than
    /// expected.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        let after = self.written.saturating_add(chunk.len() as u64);
        if after > self.expected.size {
            return Err(BlobError::SizeMismatch {
                digest: self.expected.digest,
                expected: self.expected.size,
                actual: after,
            });
        }
        if chunk.len() >= HASH_ASIDE {
            // Hashing beside writing: the copy into the page cache (which can wait for
            // writeback) and SHA-256 take about as long each.
            let (file, ctx) = (&mut self.file, &mut self.ctx);
            std::thread::scope(|s| {
                s.spawn(|| ctx.update(chunk));
                file.write_all(chunk)
            })
            .map_err(io_err("cannot write", &self.partial))?;
        } else {
            self.file.write_all(chunk).map_err(io_err("cannot write", &self.partial))?;
            self.ctx.update(chunk);
        }
        self.written = after;
        if self.written >= self.next_checkpoint && self.written < self.expected.size {
            self.start_checkpoint()?;
        }
        Ok(())
    }

    /// Starts a checkpoint of what is written so far on a thread of its own, unless the
    /// previous one is still running (then the next write tries again). A failed background
    /// checkpoint fails the upload.
    fn start_checkpoint(&mut self) -> Result<(), BlobError> {
        if self.syncing.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        self.wait_for_checkpoint()?;
        let file = self.file.try_clone().map_err(io_err("cannot reopen", &self.partial))?;
        let (len, partial, record) = (self.written, self.partial.clone(), self.record.clone());
        self.syncing =
            Some(std::thread::spawn(move || take_checkpoint(&file, len, &partial, &record)));
        self.next_checkpoint = len.saturating_add(CHECKPOINT_EVERY);
        Ok(())
    }

    /// Waits for the background checkpoint, if one runs.
    fn wait_for_checkpoint(&mut self) -> Result<(), BlobError> {
        match self.syncing.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(BlobError::Io {
                what: "checkpoint thread failed on",
                path: self.partial.clone(),
                source: io::Error::other("panicked"),
            }),
        }
    }

    /// A resume point: makes everything written so far durable and records it, so that the
    /// next [`BlobStore::begin`] offers all of it. (Dropping an upload without this keeps
    /// only what the last checkpoint recorded.)
    pub fn checkpoint(&mut self) -> Result<(), BlobError> {
        self.wait_for_checkpoint()?;
        take_checkpoint(&self.file, self.written, &self.partial, &self.record)?;
        self.next_checkpoint = self.written.saturating_add(CHECKPOINT_EVERY);
        Ok(())
    }

    /// Checks size and digest, then makes the blob durable, read-only and visible under its
    /// digest; returns its path. A digest mismatch deletes the partial file; too few bytes
    /// keep it (with a checkpoint: the next upload resumes after them).
    pub fn finish(mut self) -> Result<PathBuf, BlobError> {
        if self.written != self.expected.size {
            self.checkpoint()?;
            return Err(BlobError::SizeMismatch {
                digest: self.expected.digest,
                expected: self.expected.size,
                actual: self.written,
            });
        }
        // The final fsync covers everything; a background checkpoint only has to be over.
        let _ = self.wait_for_checkpoint();
        let actual = digest_of(self.ctx.clone());
        if actual != self.expected.digest {
            remove_if_there(&self.partial)?;
            remove_if_there(&self.record)?;
            return Err(BlobError::DigestMismatch { expected: self.expected.digest, actual });
        }
        if self.target.is_file() {
            // Stored meanwhile (e.g. by `put_file`): the same bytes, by their digest.
            remove_if_there(&self.partial)?;
            remove_if_there(&self.record)?;
            return Ok(self.target.clone());
        }
        install(&self.file, &self.partial, &self.target, &self.dir)?;
        // A record left by a crash here names a partial file that is gone: harmless.
        remove_if_there(&self.record)?;
        Ok(self.target.clone())
    }

    /// Abandons the upload and deletes its partial file.
    pub fn discard(mut self) -> Result<(), BlobError> {
        let _ = self.wait_for_checkpoint();
        remove_if_there(&self.partial)?;
        remove_if_there(&self.record)
    }
}

impl Drop for Upload {
    /// Waits for a background checkpoint: a later upload of the same digest must not find
    /// its record rewritten under it.
    fn drop(&mut self) {
        let _ = self.wait_for_checkpoint();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn blob_of(bytes: &[u8]) -> BlobRef {
        BlobRef { digest: Sha256Digest::of(bytes), size: bytes.len() as u64 }
    }

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        (dir, store)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn an_upload_in_chunks_is_stored_read_only_under_its_digest() {
        let (_dir, store) = store();
        let bytes = data(3 * READ_BUFFER + 17);
        let blob = blob_of(&bytes);
        assert_eq!(store.path(&blob.digest), None);
        let mut up = store.begin(blob).unwrap();
        assert_eq!(up.offset(), 0);
        for chunk in bytes.chunks(100_000) {
            up.write(chunk).unwrap();
        }
        let path = up.finish().unwrap();
        assert_eq!(store.path(&blob.digest), Some(path.clone()));
        assert!(path.ends_with(format!("sha256/{}", blob.digest.hex())));
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(mode(&path), 0o444);
        assert!(!store.partial_path(&blob.digest).exists());
        assert_eq!(hash_file(&path).unwrap(), blob);
    }

    #[test]
    fn an_interrupted_upload_resumes_from_the_partial_file() {
        let (_dir, store) = store();
        let bytes = data(1_000_000);
        let blob = blob_of(&bytes);
        let mut up = store.begin(blob).unwrap();
        up.write(&bytes[..400_000]).unwrap();
        up.checkpoint().unwrap();
        drop(up);
        assert_eq!(mode(&store.partial_path(&blob.digest)), 0o600);
        let mut up = store.begin(blob).unwrap();
        assert_eq!(up.offset(), 400_000);
        up.write(&bytes[400_000..]).unwrap();
        assert_eq!(fs::read(up.finish().unwrap()).unwrap(), bytes);
    }

    #[test]
    fn wrong_bytes_are_refused_and_leave_nothing() {
        let (_dir, store) = store();
        let bytes = data(500_000);
        let blob = blob_of(&bytes);
        let mut tampered = bytes.clone();
        tampered[123_456] ^= 1;
        let mut up = store.begin(blob).unwrap();
        up.write(&tampered).unwrap();
        match up.finish() {
            Err(BlobError::DigestMismatch { expected, actual }) => {
                assert_eq!(expected, blob.digest);
                assert_eq!(actual, Sha256Digest::of(&tampered));
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert_eq!(store.path(&blob.digest), None);
        assert!(!store.partial_path(&blob.digest).exists());
        assert_eq!(fs::read_dir(&store.complete).unwrap().count(), 0);
    }

    #[test]
    fn sizes_are_enforced() {
        let (_dir, store) = store();
        let bytes = data(1000);
        let blob = blob_of(&bytes);
        let mut up = store.begin(blob).unwrap();
        up.write(&bytes[..600]).unwrap();
        let err = up.write(&bytes[..600]).unwrap_err();
        assert!(
            matches!(err, BlobError::SizeMismatch { expected: 1000, actual: 1200, .. }),
            "{err:?}"
        );
        assert_eq!(up.offset(), 600, "a refused write writes nothing");
        let err = up.finish().unwrap_err();
        assert!(matches!(err, BlobError::SizeMismatch { actual: 600, .. }), "{err:?}");
        // Too short keeps the partial file (with a checkpoint): the upload can resume.
        assert_eq!(store.begin(blob).unwrap().offset(), 600);
        // A partial file longer than its durable record is cut back to it.
        fs::write(store.partial_path(&blob.digest), data(2000)).unwrap();
        assert_eq!(store.begin(blob).unwrap().offset(), 600);
        assert_eq!(fs::metadata(store.partial_path(&blob.digest)).unwrap().len(), 600);
        // A record beyond the blob's size empties the file.
        fs::write(store.partial_path(&blob.digest), data(2000)).unwrap();
        fs::write(store.record_path(&blob.digest), 2000u64.to_be_bytes()).unwrap();
        let mut up = store.begin(blob).unwrap();
        assert_eq!(up.offset(), 0);
        assert_eq!(fs::metadata(store.partial_path(&blob.digest)).unwrap().len(), 0);
        up.write(&bytes).unwrap();
        up.finish().unwrap();
        assert!(store.path(&blob.digest).is_some());
        assert!(!store.record_path(&blob.digest).exists(), "the record goes with the partial file");
    }

    #[test]
    fn only_checkpointed_bytes_are_offered_after_a_crash() {
        let (_dir, store) = store();
        let bytes = data(100_000);
        let blob = blob_of(&bytes);
        // No checkpoint at all: nothing is trusted.
        let mut up = store.begin(blob).unwrap();
        up.write(&bytes[..30_000]).unwrap();
        drop(up);
        assert_eq!(store.begin(blob).unwrap().offset(), 0);
        // A checkpoint at 40 000, then more bytes that a crash left as a torn tail (zeros,
        // as after a power loss with the length updated but the data not written).
        let mut up = store.begin(blob).unwrap();
        up.write(&bytes[..40_000]).unwrap();
        up.checkpoint().unwrap();
        up.write(&bytes[40_000..55_000]).unwrap();
        drop(up);
        let partial = store.partial_path(&blob.digest);
        let mut f = OpenOptions::new().append(true).open(&partial).unwrap();
        f.write_all(&[0u8; 7_000]).unwrap();
        drop(f);
        let mut up = store.begin(blob).unwrap();
        assert_eq!(up.offset(), 40_000, "the offer is what the last checkpoint made durable");
        assert_eq!(fs::metadata(&partial).unwrap().len(), 40_000, "the tail is cut");
        up.write(&bytes[40_000..]).unwrap();
        assert_eq!(fs::read(up.finish().unwrap()).unwrap(), bytes);
    }

    #[test]
    fn uploads_checkpoint_in_the_background_every_so_many_bytes() {
        let (_dir, store) = store();
        let size = usize::try_from(CHECKPOINT_EVERY).unwrap() * 2 + 1000;
        let bytes = data(size);
        let blob = blob_of(&bytes);
        let mut up = store.begin(blob).unwrap();
        for chunk in bytes[..size - 500].chunks(1 << 20) {
            up.write(chunk).unwrap();
        }
        drop(up);
        // Both due checkpoints ran (the second may have been deferred by one chunk while the
        // first was still running, never skipped).
        let offset = store.begin(blob).unwrap().offset();
        assert!(
            (2 * CHECKPOINT_EVERY..=2 * CHECKPOINT_EVERY + (1 << 20)).contains(&offset),
            "{offset}"
        );
    }

    #[test]
    fn durable_but_wrong_bytes_fail_once_then_start_over() {
        let (_dir, store) = store();
        let bytes = data(10_000);
        let blob = blob_of(&bytes);
        let mut up = store.begin(blob).unwrap();
        up.write(&[0u8; 4000]).unwrap();
        up.checkpoint().unwrap();
        drop(up);
        let mut up = store.begin(blob).unwrap();
        assert_eq!(up.offset(), 4000);
        up.write(&bytes[4000..]).unwrap();
        assert!(matches!(up.finish(), Err(BlobError::DigestMismatch { .. })));
        let mut up = store.begin(blob).unwrap();
        assert_eq!(up.offset(), 0);
        up.write(&bytes).unwrap();
        up.finish().unwrap();
    }

    #[test]
    fn put_file_hashes_a_file_into_the_store_once() {
        let (dir, store) = store();
        let src = dir.path().join("bundle.tar");
        let bytes = data(2 * READ_BUFFER + 5);
        fs::write(&src, &bytes).unwrap();
        let blob = store.put_file(&src).unwrap();
        assert_eq!(blob, blob_of(&bytes));
        let path = store.path(&blob.digest).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(mode(&path), 0o444);
        assert_eq!(store.put_file(&src).unwrap(), blob);
        assert_eq!(fs::read_dir(&store.partial).unwrap().count(), 0, "no temporary file left");
        // An upload of a blob that is already here ends in the same file.
        let mut up = store.begin(blob).unwrap();
        up.write(&bytes).unwrap();
        assert_eq!(up.finish().unwrap(), path);
        assert!(store.remove_partial(&blob.digest).is_ok());
    }
}
