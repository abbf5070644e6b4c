//! `/kaapana/results/1`: a runner streams a job's result bundle to the workflow's owner.
//!
//! A raw libp2p stream ([`libp2p_stream`]) on the gated swarm: only registered instances get
//! a connection at all. One stream carries one blob (the bundle, or the job's log) of one
//! signed `ResultManifest`.
//!
//! # Protocol
//!
//! ```text
//! frame = length:u32 big-endian ‖ postcard body   (an offer ≤ MAX_OFFER, a reply ≤ MAX_REPLY)
//!
//! runner → owner   frame Offer { part, envelope }      the signed ResultManifest, exact bytes
//! owner  → runner  frame Resume { offset }             "send from byte `offset`"
//!                     | Complete                       the blob is here already: done
//!                     | Rejected { reason, detail }    nothing is read after this
//! runner → owner   bytes offset..size of the blob, raw, in chunks; then it closes its write side
//! owner  → runner  frame Stored                        blob verified, durable, result recorded
//!                     | Rejected { reason, detail }
//! ```
//!
//! * **Verification first.** The owner parses the envelope (size-limited), checks that its
//!   signer is a registered instance and verifies it (signature, domain, version, validity,
//!   time) before it answers `Resume`; a rejected offer has no byte of the blob read.
//! * **Resuming.** The blob is appended to `DATA_DIR/blobs/partial/<hex>.part`
//!   ([`crate::blobs`]); `offset` is that file's length (its content is re-hashed, not
//!   trusted). A broken connection, a reset stream or an early end (yamux reports a reset as
//!   an end) leave the partial file, and the next attempt continues from there; if the runner
//!   is still listening it gets `Rejected { Incomplete }` (a `result_incomplete` event at the
//!   owner). The caller of [`send_result`] retries (see [`ResultError::is_retryable`]). A new
//!   upload of a digest that is still being received preempts the old one, so a retry after a
//!   half-open connection does not wait for it.
//! * **Flow control** is the transport's (yamux windows over TCP, QUIC's stream credit): the
//!   sender's `write_all` waits while the owner is behind. Neither side holds a blob in memory:
//!   the runner reads the file in [`CHUNK`]s (1 MiB) on a blocking thread; the owner writes
//!   chunks on a blocking thread while the next ones arrive, hashing each (SHA-256,
//!   incrementally) on a second thread while it is written ([`crate::blobs`]). Every 64 MiB the
//!   partial file is checkpointed in the background (fsync and a durable length record), so
//!   the final fsync before `Stored` has little left to do.
//! * **Durable resume points.** When an upload stops short (broken or reset stream, idle,
//!   preempted) the owner checkpoints the partial file before it answers or lets the digest
//!   go, and `Resume { offset }` only ever offers the checkpointed prefix: after a crash it
//!   never offers bytes that were not on disk (see [`crate::blobs`]).
//! * **Checking.** After the runner's end of stream the owner compares size and SHA-256 with
//!   the manifest's `BlobRef`. A mismatch is `Rejected { DigestMismatch | SizeMismatch }` and
//!   the partial file is deleted: a tampered bundle leaves nothing stored. Otherwise the blob
//!   is fsynced and renamed to `blobs/sha256/<hex>`, the envelope is recorded durably in the
//!   store's results table (by job id), then `Stored` is sent and a `result_received` event
//!   pushed.
//!
//! Rejections are counted in `kaapana_node_rejections_total{reason}` (the labels of
//! [`RejectCode::label`]) and reported as `result_rejected` events.
//!
//! The frames ([`Offer`], [`Reply`], [`RejectCode`], [`ResultPart`]) and their limits are
//! wire types of `kaapana-protocol` (its `results` module), re-exported here.
//!
//! * **Quota.** Before `Resume`, a blob that is not stored yet must fit the owner's
//!   per-runner quota (`[workflows] max_result_bytes_per_runner`, [`ResultOwner::within_quota`]):
//!   the result bytes already stored from the manifest's signer plus this blob. Otherwise
//!   `Rejected { QuotaExceeded }` (transient: the owner may free space or raise the quota),
//!   counted and reported like every rejection; no byte of the blob is read. Uploads in
//!   progress are not counted: parallel uploads of one runner can together exceed the quota
//!   by what they carry.
//!
//! Not checked here: that the job is one this owner submitted to that runner (the job
//! records' business).

use std::collections::HashMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kaapana_protocol::{
    BlobRef, InstanceId, Offer, RejectReason, ResultManifest, Sha256Digest, Signed, VerifyOptions,
};
// The wire types of the protocol are `kaapana-protocol`'s; re-exported where they were.
pub use kaapana_protocol::{MAX_OFFER, MAX_REPLY, RESULTS_PROTOCOL, RejectCode, Reply, ResultPart};
use libp2p::swarm::Stream;
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::blobs::{BlobError, BlobStore, Upload};
use crate::events::EventKind;

fn now() -> kaapana_protocol::Timestamp {
    kaapana_protocol::Timestamp::from_system_time(std::time::SystemTime::now())
}
use crate::metrics::{KindLabel, ReasonLabel};

/// The size of the pieces a blob is read, sent and written in.
pub const CHUNK: usize = 1024 * 1024;
/// Uploads an owner receives at once; more are answered `Busy`.
pub const MAX_UPLOADS: usize = 16;

/// How long the owner waits for the offer.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the owner waits for the next [`CHUNK`] of a blob (or its end) before it gives up,
/// keeping what came.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new upload waits for an older one of the same digest to let go.
const PREEMPT_TIMEOUT: Duration = Duration::from_secs(15);
/// Chunks queued between the owner's network reader and its writer thread.
const WRITE_QUEUE: usize = 8;
/// Chunks queued between the runner's file reader thread and the stream.
const READ_QUEUE: usize = 4;

/// How a result was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendOutcome {
    /// The owner received the blob and stored it.
    Stored {
        /// Where the owner asked to start (bytes it had from earlier attempts).
        resumed_from: u64,
        /// Bytes sent in this attempt.
        sent: u64,
    },
    /// The owner had the blob already.
    AlreadyStored,
}

/// Why sending a result failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResultError {
    /// The manifest does not verify here (checked before anything is sent).
    #[error("the result manifest does not verify: {0}")]
    Manifest(#[from] kaapana_protocol::VerifyError),
    /// The manifest names no blob for this part (a log when it has none).
    #[error("the result manifest names no {0}")]
    NoSuchPart(&'static str),
    /// The local file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Bundle {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The local file's size is not the manifest's.
    #[error("{} has {actual} bytes, the manifest says {expected}", path.display())]
    BundleSize {
        /// The file.
        path: PathBuf,
        /// The size in the manifest.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// No stream could be opened (not reachable, protocol not supported).
    #[error("cannot open a {RESULTS_PROTOCOL} stream to {peer}: {detail}")]
    Open {
        /// The owner.
        peer: PeerId,
        /// Why.
        detail: String,
    },
    /// The stream broke; sending again resumes.
    #[error("the {RESULTS_PROTOCOL} stream broke: {0}")]
    Stream(#[source] io::Error),
    /// The owner did not answer or take bytes in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The owner refused.
    #[error("the owner rejected the result ({}): {detail}", reason.label())]
    Rejected {
        /// Why.
        reason: RejectCode,
        /// The owner's message.
        detail: String,
    },
    /// The owner broke the protocol.
    #[error("unexpected answer on {RESULTS_PROTOCOL}: {0}")]
    Protocol(String),
    /// Stopped on purpose after [`SendOptions::stop_after`] bytes (tests).
    #[error("stopped after sending {sent} bytes from offset {resumed_from}, as asked")]
    Interrupted {
        /// Where the owner asked to start.
        resumed_from: u64,
        /// Bytes sent before stopping.
        sent: u64,
    },
}

impl ResultError {
    /// Whether sending the same result again later may succeed (it resumes where the owner
    /// stands).
    pub const fn is_retryable(&self) -> bool {
        match self {
            Self::Open { .. } | Self::Stream(_) | Self::Timeout(_) | Self::Interrupted { .. } => {
                true
            }
            Self::Rejected { reason, .. } => reason.is_transient(),
            _ => false,
        }
    }
}

/// Tuning of one send.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Bytes per write.
    pub chunk_size: usize,
    /// How long opening the stream (and dialing) may take.
    pub open_timeout: Duration,
    /// How long to wait for each answer (the last one follows the owner's fsync).
    pub reply_timeout: Duration,
    /// How long one chunk may wait for the owner's flow control.
    pub idle_timeout: Duration,
    /// Stop after this many bytes and drop the stream without closing it, as a broken
    /// connection would (for tests of resuming).
    pub stop_after: Option<u64>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            chunk_size: CHUNK,
            open_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            stop_after: None,
        }
    }
}

// ----- frames -----

#[derive(Debug)]
pub(crate) enum FrameError {
    Io(io::Error),
    TooLarge(usize),
    Malformed(String),
}

pub(crate) async fn write_frame<T: Serialize>(io: &mut Stream, msg: &T) -> io::Result<()> {
    let body =
        postcard::to_allocvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let len = u32::try_from(body.len())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        .to_be_bytes();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&body);
    io.write_all(&frame).await?;
    io.flush().await
}

pub(crate) async fn read_frame<T: DeserializeOwned>(
    io: &mut Stream,
    max: usize,
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await.map_err(FrameError::Io)?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.map_err(FrameError::Io)?;
    postcard::from_bytes(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

// ----- the runner's side -----

/// Sends `signed`'s bundle, the file at `bundle`, to the workflow's owner `peer` and waits
/// until the owner has stored it. Verifies the manifest first. Resumes where the owner
/// stands; retrying is the caller's business (see [`ResultError::is_retryable`]).
pub async fn send_result(
    control: Control,
    peer: PeerId,
    signed: &Signed<ResultManifest>,
    bundle: &Path,
) -> Result<SendOutcome, ResultError> {
    send_result_part(control, peer, signed, ResultPart::Bundle, bundle, &SendOptions::default())
        .await
}

/// [`send_result`] for either part, with options.
pub async fn send_result_part(
    control: Control,
    peer: PeerId,
    signed: &Signed<ResultManifest>,
    part: ResultPart,
    file: &Path,
    opts: &SendOptions,
) -> Result<SendOutcome, ResultError> {
    let manifest = signed.verify(now(), &VerifyOptions::default())?.into_payload();
    let blob = part.blob(&manifest).ok_or(ResultError::NoSuchPart(part.name()))?;
    send_envelope(control, peer, signed.as_bytes(), part, blob, file, opts).await
}

/// Offers `envelope` as it is (no local check: the owner decides) and sends `file` as the
/// blob `blob`. [`send_result_part`] is this after verifying the manifest.
pub async fn send_envelope(
    mut control: Control,
    peer: PeerId,
    envelope: &[u8],
    part: ResultPart,
    blob: BlobRef,
    file: &Path,
    opts: &SendOptions,
) -> Result<SendOutcome, ResultError> {
    let bundle_err = |source| ResultError::Bundle { path: file.to_owned(), source };
    let actual = tokio::fs::metadata(file).await.map_err(bundle_err)?.len();
    if actual != blob.size {
        return Err(ResultError::BundleSize { path: file.to_owned(), expected: blob.size, actual });
    }
    let mut stream = timeout(
        opts.open_timeout,
        control.open_stream(peer, StreamProtocol::new(RESULTS_PROTOCOL)),
    )
    .await
    .map_err(|_| ResultError::Timeout("opening a stream"))?
    .map_err(|e| ResultError::Open { peer, detail: e.to_string() })?;

    let offer = Offer { part, envelope: envelope.to_vec() };
    timeout(opts.reply_timeout, write_frame(&mut stream, &offer))
        .await
        .map_err(|_| ResultError::Timeout("sending the offer"))?
        .map_err(ResultError::Stream)?;
    let offset = match read_reply(&mut stream, opts.reply_timeout).await? {
        Reply::Resume { offset } if offset <= blob.size => offset,
        Reply::Complete => {
            let _ = stream.close().await;
            return Ok(SendOutcome::AlreadyStored);
        }
        Reply::Rejected { reason, detail } => return Err(ResultError::Rejected { reason, detail }),
        other => return Err(ResultError::Protocol(format!("{other:?} to an offer"))),
    };

    let to_send = blob.size - offset;
    let limit = opts.stop_after.map_or(to_send, |n| n.min(to_send));
    let sent = stream_file(&mut stream, file, offset, limit, opts).await?;
    if opts.stop_after.is_some_and(|n| n < to_send) {
        // Dropped without closing: the owner sees a reset stream, as after a broken link.
        drop(stream);
        return Err(ResultError::Interrupted { resumed_from: offset, sent });
    }
    timeout(opts.idle_timeout, stream.close())
        .await
        .map_err(|_| ResultError::Timeout("closing the stream"))?
        .map_err(ResultError::Stream)?;
    match read_reply(&mut stream, opts.reply_timeout).await? {
        Reply::Stored => Ok(SendOutcome::Stored { resumed_from: offset, sent }),
        Reply::Rejected { reason, detail } => Err(ResultError::Rejected { reason, detail }),
        other => Err(ResultError::Protocol(format!("{other:?} after the blob"))),
    }
}

async fn read_reply(stream: &mut Stream, wait: Duration) -> Result<Reply, ResultError> {
    match timeout(wait, read_frame::<Reply>(stream, MAX_REPLY)).await {
        Err(_) => Err(ResultError::Timeout("waiting for the owner's answer")),
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(FrameError::Io(e))) => Err(ResultError::Stream(e)),
        Ok(Err(FrameError::TooLarge(n))) => Err(ResultError::Protocol(format!("{n}-byte answer"))),
        Ok(Err(FrameError::Malformed(e))) => Err(ResultError::Protocol(e)),
    }
}

/// Writes `limit` bytes of `file` from `offset`: a blocking thread reads chunks, this task
/// writes them as the transport's flow control allows. Returns the bytes written.
async fn stream_file(
    stream: &mut Stream,
    file: &Path,
    offset: u64,
    limit: u64,
    opts: &SendOptions,
) -> Result<u64, ResultError> {
    let (tx, mut rx) = mpsc::channel::<io::Result<Vec<u8>>>(READ_QUEUE);
    // Sent buffers come back for the next reads.
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let path = file.to_owned();
    let chunk = opts.chunk_size.max(1);
    let reader = tokio::task::spawn_blocking(move || {
        let read = || -> io::Result<()> {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut left = limit;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk);
                let mut buf = free_rx.try_recv().unwrap_or_default();
                buf.resize(want, 0);
                f.read_exact(&mut buf)?;
                left -= want as u64;
                if tx.blocking_send(Ok(buf)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = read() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    let mut sent = 0u64;
    let result = async {
        while let Some(buf) = rx.recv().await {
            let buf =
                buf.map_err(|source| ResultError::Bundle { path: file.to_owned(), source })?;
            timeout(opts.idle_timeout, stream.write_all(&buf))
                .await
                .map_err(|_| ResultError::Timeout("sending: the owner takes no bytes"))?
                .map_err(ResultError::Stream)?;
            sent += buf.len() as u64;
            let _ = free_tx.send(buf);
        }
        Ok::<u64, ResultError>(sent)
    }
    .await;
    drop(rx);
    let _ = reader.await;
    let sent = result?;
    if sent < limit {
        return Err(ResultError::Bundle {
            path: file.to_owned(),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while sent"),
        });
    }
    Ok(sent)
}

// ----- the owner's side -----

/// Uploads in progress, by digest: at most one each.
#[derive(Debug, Default)]
struct Inflight {
    uploads: Mutex<HashMap<Sha256Digest, CancellationToken>>,
    released: Notify,
}

/// The right to receive one digest; released on drop.
struct InflightGuard<'a> {
    inflight: &'a Inflight,
    digest: Sha256Digest,
    token: CancellationToken,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.inflight.lock().remove(&self.digest);
        self.inflight.released.notify_waiters();
    }
}

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Sha256Digest, CancellationToken>> {
        self.uploads.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `digest`, preempting an upload of it that is still running; `None` if that one
    /// does not let go in time.
    async fn acquire(
        &self,
        digest: Sha256Digest,
        parent: &CancellationToken,
    ) -> Option<InflightGuard<'_>> {
        let deadline = Instant::now() + PREEMPT_TIMEOUT;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut uploads = self.lock();
                match uploads.get(&digest) {
                    None => {
                        let token = parent.child_token();
                        uploads.insert(digest, token.clone());
                        return Some(InflightGuard { inflight: self, digest, token });
                    }
                    Some(older) => older.cancel(),
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// What the owner's side of `/kaapana/results/1` needs of the node it runs in: the checks of
/// an offered manifest that need the registry and the federation core, recording a stored
/// result, and reporting. The daemon implements it; this module needs nothing else of it.
pub trait ResultOwner: Send + Sync + 'static {
    /// Verifies an offered signed manifest (a registered signer, signature and times) and says
    /// whether this owner takes its result; the verified manifest, or why not.
    fn accept(&self, envelope: &[u8]) -> Result<(Signed<ResultManifest>, ResultManifest), Refusal>;

    /// Records durably that a verified result's part is stored.
    fn record(
        &self,
        from: InstanceId,
        signed: &Signed<ResultManifest>,
        manifest: &ResultManifest,
        bundle_part: bool,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Whether this owner may store `blob` (a part of `signed`'s result, not stored yet) within
    /// its per-runner quota; why not. Blocking (it may read the store): called on a blocking
    /// thread. The default takes everything.
    fn within_quota(&self, signed: &Signed<ResultManifest>, blob: BlobRef) -> Result<(), Refusal> {
        let _ = (signed, blob);
        Ok(())
    }

    /// Reports an event about `peer`.
    fn report(&self, kind: EventKind, peer: &InstanceId, detail: String);

    /// The node's metrics.
    fn metrics(&self) -> &crate::metrics::Metrics;
}

struct Server<O> {
    owner: Arc<O>,
    blobs: BlobStore,
    inflight: Inflight,
    cancel: CancellationToken,
}

/// Accepts `/kaapana/results/1` streams until `cancel` fires; each upload runs in its own
/// task (see the module docs).
pub async fn serve_results<O: ResultOwner>(
    owner: Arc<O>,
    blobs: Result<BlobStore, BlobError>,
    mut control: Control,
    cancel: CancellationToken,
) {
    let mut incoming = match control.accept(StreamProtocol::new(RESULTS_PROTOCOL)) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept {RESULTS_PROTOCOL} streams");
            return;
        }
    };
    let blobs = match blobs {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the blob store; results cannot be received");
            return;
        }
    };
    let server = Arc::new(Server { owner, blobs, inflight: Inflight::default(), cancel });
    let mut uploads = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = server.cancel.cancelled() => break,
            Some(_) = uploads.join_next(), if !uploads.is_empty() => {}
            next = incoming.next() => {
                let Some((peer, mut stream)) = next else { break };
                if uploads.len() >= MAX_UPLOADS {
                    tokio::spawn(async move {
                        let detail = format!("{MAX_UPLOADS} uploads in progress; try later");
                        let reply = Reply::Rejected { reason: RejectCode::Busy, detail };
                        let _ = timeout(OFFER_TIMEOUT, write_frame(&mut stream, &reply)).await;
                    });
                    continue;
                }
                let server = Arc::clone(&server);
                uploads.spawn(async move { server.handle(peer, stream).await });
            }
        }
    }
    // Uploads see the cancellation and stop, keeping their partial files.
    let _ = timeout(Duration::from_secs(5), async { while uploads.join_next().await.is_some() {} })
        .await;
    uploads.abort_all();
}

/// How the bytes of an upload stopped coming.
#[derive(Debug)]
enum End {
    Eof,
    TooLong,
    Broken(io::Error),
    Idle,
    Cancelled,
    WriterStopped,
}

/// Why an upload is refused: the code the runner gets and the detail.
pub type Refusal = (RejectCode, String);

impl<O: ResultOwner> Server<O> {
    async fn handle(&self, peer: PeerId, mut stream: Stream) {
        let from = InstanceId::from_peer_id(peer);
        let offer = match timeout(OFFER_TIMEOUT, read_frame::<Offer>(&mut stream, MAX_OFFER)).await
        {
            Err(_) | Ok(Err(FrameError::Io(_))) => return,
            Ok(Err(FrameError::TooLarge(len))) => {
                let detail = format!("an offer of {len} bytes; at most {MAX_OFFER}");
                return self
                    .refuse(
                        &from,
                        &mut stream,
                        (RejectCode::Manifest(RejectReason::Oversized), detail),
                    )
                    .await;
            }
            Ok(Err(FrameError::Malformed(e))) => {
                let detail = format!("the offer is not a postcard Offer: {e}");
                return self
                    .refuse(
                        &from,
                        &mut stream,
                        (RejectCode::Manifest(RejectReason::Malformed), detail),
                    )
                    .await;
            }
            Ok(Ok(offer)) => offer,
        };
        let (signed, manifest, blob) = match self.check(&offer) {
            Ok(checked) => checked,
            Err(refusal) => return self.refuse(&from, &mut stream, refusal).await,
        };
        match self.receive_and_store(&from, &mut stream, &signed, &manifest, offer.part, blob).await
        {
            Some(refusal) => self.refuse(&from, &mut stream, refusal).await,
            None => {
                let _ = timeout(OFFER_TIMEOUT, stream.close()).await;
            }
        }
    }

    /// Receives and stores the blob and records the result; `None` once the last answer
    /// (`Complete` or `Stored`) is sent or when nobody is left to answer. The upload's files
    /// are closed and its digest released when this returns.
    async fn receive_and_store(
        &self,
        from: &InstanceId,
        stream: &mut Stream,
        signed: &Signed<ResultManifest>,
        manifest: &ResultManifest,
        part: ResultPart,
        blob: BlobRef,
    ) -> Option<Refusal> {
        let Some(guard) = self.inflight.acquire(blob.digest, &self.cancel).await else {
            let detail = format!("an upload of {} is still in progress", blob.digest);
            return Some((RejectCode::Busy, detail));
        };
        let what = format!(
            "job {} {} {} ({} bytes)",
            manifest.job_id,
            part.name(),
            blob.digest,
            blob.size
        );

        // Already here: record the result, nothing to receive.
        if let Some(path) = self.blobs.path(&blob.digest) {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size != blob.size {
                let detail =
                    format!("{} is stored with {size} bytes, not {}", blob.digest, blob.size);
                return Some((RejectCode::SizeMismatch, detail));
            }
            if let Err(refusal) = self.record(from, signed, manifest, part, &what, true).await {
                return Some(refusal);
            }
            let _ = write_frame(stream, &Reply::Complete).await;
            return None;
        }

        let (owner, offered) = (Arc::clone(&self.owner), signed.clone());
        match tokio::task::spawn_blocking(move || owner.within_quota(&offered, blob)).await {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => return Some(refusal),
            Err(e) => return Some((RejectCode::Storage, e.to_string())),
        }
        let blobs = self.blobs.clone();
        let upload = match tokio::task::spawn_blocking(move || blobs.begin(blob)).await {
            Ok(Ok(upload)) => upload,
            Ok(Err(e)) => return Some((RejectCode::Storage, e.to_string())),
            Err(e) => return Some((RejectCode::Storage, e.to_string())),
        };
        let offset = upload.offset();
        write_frame(stream, &Reply::Resume { offset }).await.ok()?;
        let (end, upload, written) =
            receive(stream, upload, blob.size - offset, &guard.token).await;
        let have = upload.as_ref().map_or(offset, Upload::offset);
        let why = match &end {
            End::Broken(e) => format!(", then the stream broke ({e})"),
            End::Idle => format!(", then too little for {} s", IDLE_TIMEOUT.as_secs()),
            _ => String::new(),
        };
        match (end, written) {
            (End::Cancelled, _) => None,
            (_, Err(e)) => Some((RejectCode::Storage, format!("cannot write {what}: {e}"))),
            (End::WriterStopped, Ok(())) => {
                Some((RejectCode::Storage, format!("cannot write {what}")))
            }
            (End::TooLong, Ok(())) => {
                if let Some(upload) = upload {
                    let _ = tokio::task::spawn_blocking(move || upload.discard()).await;
                }
                let detail = format!("more than {} bytes for {what}; nothing was kept", blob.size);
                Some((RejectCode::SizeMismatch, detail))
            }
            (End::Broken(_) | End::Idle | End::Eof, Ok(())) if have < blob.size => {
                let detail =
                    format!("{have} of {} bytes of {what} arrived{why}; they are kept", blob.size);
                self.event(EventKind::ResultIncomplete, from, detail.clone());
                Some((RejectCode::Incomplete, detail))
            }
            (End::Broken(_) | End::Idle | End::Eof, Ok(())) => {
                let upload = upload?;
                match tokio::task::spawn_blocking(move || upload.finish()).await {
                    Ok(Ok(_)) => {
                        match self.record(from, signed, manifest, part, &what, false).await {
                            Ok(()) => {
                                let _ = write_frame(stream, &Reply::Stored).await;
                                None
                            }
                            Err(refusal) => Some(refusal),
                        }
                    }
                    Ok(Err(e @ BlobError::DigestMismatch { .. })) => {
                        Some((RejectCode::DigestMismatch, format!("{what}: {e}; nothing was kept")))
                    }
                    Ok(Err(e)) => Some((RejectCode::Storage, format!("cannot store {what}: {e}"))),
                    Err(e) => Some((RejectCode::Storage, format!("cannot store {what}: {e}"))),
                }
            }
        }
    }

    /// Parses and verifies the offered manifest; returns it and the blob to receive.
    fn check(
        &self,
        offer: &Offer,
    ) -> Result<(Signed<ResultManifest>, ResultManifest, BlobRef), Refusal> {
        let (signed, payload) = self.owner.accept(&offer.envelope)?;
        let blob = offer.part.blob(&payload).ok_or_else(|| {
            (RejectCode::NoSuchPart, format!("the manifest names no {}", offer.part.name()))
        })?;
        Ok((signed, payload, blob))
    }

    /// Records the result durably, then counts and reports it.
    async fn record(
        &self,
        from: &InstanceId,
        signed: &Signed<ResultManifest>,
        manifest: &ResultManifest,
        part: ResultPart,
        what: &str,
        had_blob: bool,
    ) -> Result<(), Refusal> {
        let bundle = part == ResultPart::Bundle;
        if let Err(e) = self.owner.record(*from, signed, manifest, bundle).await {
            return Err((RejectCode::Storage, format!("cannot record the result: {e}")));
        }
        self.owner
            .metrics()
            .messages_in
            .get_or_create(&KindLabel { kind: "ResultManifest".into() })
            .inc();
        let how = if had_blob { "already stored" } else { "stored" };
        let signer = signed.claimed_signer();
        self.event(EventKind::ResultReceived, from, format!("{what} {how}, signed by {signer}"));
        Ok(())
    }

    async fn refuse(&self, from: &InstanceId, stream: &mut Stream, (reason, detail): Refusal) {
        self.owner
            .metrics()
            .rejections
            .get_or_create(&ReasonLabel { reason: reason.label().into() })
            .inc();
        tracing::warn!(peer = %from, reason = reason.label(), %detail, "result rejected");
        self.event(EventKind::ResultRejected, from, format!("{}: {detail}", reason.label()));
        let reply = Reply::Rejected { reason, detail };
        if timeout(OFFER_TIMEOUT, write_frame(stream, &reply)).await.is_ok() {
            let _ = timeout(OFFER_TIMEOUT, stream.close()).await;
        }
    }

    fn event(&self, kind: EventKind, peer: &InstanceId, detail: String) {
        self.owner.report(kind, peer, detail);
    }
}

/// Reads up to `remaining` bytes (and the end of stream) into `upload`, which a blocking
/// thread writes and hashes meanwhile. Returns how the stream ended, the upload (unless its
/// thread failed) and the first write error.
async fn receive(
    stream: &mut Stream,
    upload: Upload,
    remaining: u64,
    cancel: &CancellationToken,
) -> (End, Option<Upload>, Result<(), BlobError>) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    // Written buffers come back for the next reads.
    let (free_tx, mut free_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        while let Some(chunk) = rx.blocking_recv() {
            if let Err(e) = upload.write(&chunk) {
                return (upload, Err(e));
            }
            let _ = free_tx.send(chunk);
        }
        if upload.offset() < upload.expected().size {
            // A resume point: the next offer is all that came (see `crate::blobs`).
            if let Err(e) = upload.checkpoint() {
                tracing::warn!(error = %e, "cannot make a partial upload durable");
            }
        }
        (upload, Ok(()))
    });
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut received = 0u64;
    let end = loop {
        let mut buf = free_rx.try_recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        // One timer per chunk, not per read (a read often returns one transport frame).
        let idle = tokio::time::sleep(IDLE_TIMEOUT);
        tokio::pin!(idle);
        let stop = loop {
            if filled == buf.len() {
                break None;
            }
            let read = tokio::select! {
                biased;
                () = &mut cancelled => break Some(End::Cancelled),
                () = &mut idle => break Some(End::Idle),
                r = stream.read(&mut buf[filled..]) => r,
            };
            match read {
                Err(e) => break Some(End::Broken(e)),
                Ok(0) => break Some(End::Eof),
                Ok(n) => filled += n,
            }
        };
        received += filled as u64;
        if received > remaining {
            break End::TooLong;
        }
        if filled > 0 {
            buf.truncate(filled);
            if tx.send(buf).await.is_err() {
                break End::WriterStopped;
            }
        }
        if let Some(stop) = stop {
            break stop;
        }
    };
    drop(tx);
    match writer.await {
        Ok((upload, written)) => (end, Some(upload), written),
        Err(e) => (
            end,
            None,
            Err(BlobError::Io {
                what: "writer thread failed on",
                path: PathBuf::from("partial file"),
                source: io::Error::other(e.to_string()),
            }),
        ),
    }
}
