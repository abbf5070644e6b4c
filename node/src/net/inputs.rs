//! `/kaapana/inputs/1`: a runner fetches the upstream result bundles its job reads (the model
//! of the previous round, an earlier stage's output) from the workflow's owner. See
//! [`kaapana_protocol::INPUTS_PROTOCOL`] for the frames.
//!
//! * **Only to the job's runner.** The owner sends a blob only when its federation core says
//!   it is an input of a live job it dispatched to the requesting instance
//!   ([`kaapana_federation::Site::input_for`]); anything else is refused with the reason.
//! * **Content-addressed, deduplicated.** A runner that already holds the blob (its own
//!   result, or an input of an earlier job) does not fetch it again.
//! * **Resumable.** The runner appends to its blob store's partial file (`blobs/partial`) and
//!   asks from the bytes it holds; a broken fetch is continued by the next attempt. The
//!   bytes are checked against the size and SHA-256 of the job's *signed* manifest before
//!   the blob becomes visible: a tampering owner or network yields nothing.
//! * Neither side holds a blob in memory: it moves in [`CHUNK`]s.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use kaapana_protocol::{
    BlobRef, INPUTS_PROTOCOL, InputReply, InputRequest, InstanceId, JobId, MAX_INPUT_FRAME,
};
use libp2p::swarm::Stream;
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::results::{FrameError, read_frame, write_frame};
use crate::blobs::{BlobError, BlobStore};

/// The size of the pieces a blob moves in.
pub const CHUNK: usize = 256 * 1024;
/// Fetches an owner serves at once; more wait for their turn.
pub const MAX_SENDS: usize = 16;
/// How long either side waits for a frame or the next chunk.
const IDLE: Duration = Duration::from_secs(60);

/// What the owner may send: the daemon answers from its federation core.
pub trait InputSource: Send + Sync + 'static {
    /// The bundle `digest` if it is an input of `job`, dispatched to `runner` and live.
    fn input_for(
        &self,
        runner: &InstanceId,
        job: &JobId,
        digest: &kaapana_protocol::Sha256Digest,
    ) -> Option<BlobRef>;

    /// A fetch was served or refused (for the event log).
    fn served(&self, runner: &InstanceId, detail: String);

    /// `bytes` of the input `digest` went to `runner` (for the metrics).
    fn sent(&self, runner: &InstanceId, digest: &kaapana_protocol::Sha256Digest, bytes: u64);
}

/// How an input came to be here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    /// This instance held the blob already: nothing was sent.
    AlreadyHere,
    /// Fetched from the owner.
    Fetched {
        /// Bytes held from an earlier attempt.
        resumed_from: u64,
        /// Bytes received in this attempt.
        received: u64,
    },
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No stream to the owner (not connected, protocol not supported).
    #[error("cannot reach the workflow's owner for the input: {0}")]
    Connect(String),
    /// The transfer broke off; what came is kept for the next attempt.
    #[error("the input's transfer from the owner broke off: {0}")]
    Transfer(String),
    /// The owner refused.
    #[error("the workflow's owner refused to send the input: {0}")]
    Refused(String),
    /// The bytes are not the blob the signed manifest names (nothing was kept), or the store
    /// failed.
    #[error("the input from the owner cannot be stored: {0}")]
    Blob(#[from] BlobError),
}

impl FetchError {
    /// Whether trying again may succeed.
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Transfer(_))
    }
}

fn frame_error(e: FrameError) -> String {
    match e {
        FrameError::Io(e) => e.to_string(),
        FrameError::TooLarge(n) => format!("a frame of {n} bytes"),
        FrameError::Malformed(m) => format!("a malformed frame: {m}"),
    }
}

// ----- the runner's side -----

type FetchLocks = std::sync::Mutex<
    std::collections::HashMap<kaapana_protocol::Sha256Digest, Arc<tokio::sync::Mutex<()>>>,
>;

fn fetch_lock(digest: &kaapana_protocol::Sha256Digest) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<FetchLocks> = std::sync::OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Forget the locks nobody holds (the map stays as small as the fetches in progress).
    locks.retain(|_, l| Arc::strong_count(l) > 1);
    Arc::clone(locks.entry(*digest).or_default())
}

/// Makes `bundle` (an input of the runner's job `job`) available in `blobs`, fetching it from
/// the workflow's owner `owner` unless it is here already; returns its path and how it came.
pub async fn fetch_input(
    mut control: Control,
    owner: PeerId,
    job: JobId,
    bundle: BlobRef,
    blobs: &BlobStore,
) -> Result<(PathBuf, FetchOutcome), FetchError> {
    // One fetch per blob at a time in this process: two jobs reading the same model must not
    // append to one partial file together; the second finds the blob here.
    let lock = fetch_lock(&bundle.digest);
    let _guard = lock.lock().await;
    if let Some(path) = blobs.path(&bundle.digest) {
        return Ok((path, FetchOutcome::AlreadyHere));
    }
    let mut upload = blobs.begin(bundle)?;
    let resumed_from = upload.offset();
    let mut stream = control
        .open_stream(owner, StreamProtocol::new(INPUTS_PROTOCOL))
        .await
        .map_err(|e| FetchError::Connect(e.to_string()))?;
    let request = InputRequest { job_id: job, digest: bundle.digest, offset: resumed_from };
    timeout(IDLE, write_frame(&mut stream, &request))
        .await
        .map_err(|_| FetchError::Transfer("the owner did not take the request".into()))?
        .map_err(|e| FetchError::Transfer(e.to_string()))?;
    let reply: InputReply = timeout(IDLE, read_frame(&mut stream, MAX_INPUT_FRAME))
        .await
        .map_err(|_| FetchError::Transfer("the owner did not answer".into()))?
        .map_err(|e| FetchError::Transfer(frame_error(e)))?;
    match reply {
        InputReply::Sending { size } if size == bundle.size => {}
        InputReply::Sending { size } => {
            return Err(FetchError::Refused(format!(
                "the owner offers {size} bytes, the manifest says {}",
                bundle.size
            )));
        }
        InputReply::Refused { detail } => return Err(FetchError::Refused(detail)),
        other => return Err(FetchError::Refused(format!("{other:?}"))),
    }
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    let transfer = async {
        while upload.offset() < bundle.size {
            let n = match timeout(IDLE, stream.read(&mut buf)).await {
                Err(_) => {
                    return Err(FetchError::Transfer("no data from the owner for 60 s".into()));
                }
                Ok(Err(e)) => return Err(FetchError::Transfer(e.to_string())),
                Ok(Ok(0)) => {
                    return Err(FetchError::Transfer(format!(
                        "the owner's stream ended at byte {} of {}",
                        upload.offset(),
                        bundle.size
                    )));
                }
                Ok(Ok(n)) => n,
            };
            // Small synchronous appends to the partial file: the hashing keeps up with a
            // network (checkpoints run on a thread of their own).
            upload.write(&buf[..n])?;
            received += n as u64;
        }
        Ok(())
    }
    .await;
    if let Err(e) = transfer {
        // A resume point: the next fetch continues after what came.
        let _ = tokio::task::spawn_blocking(move || {
            let mut upload = upload;
            upload.checkpoint()
        })
        .await;
        return Err(e);
    }
    let path = tokio::task::spawn_blocking(move || upload.finish())
        .await
        .map_err(|e| FetchError::Transfer(e.to_string()))??;
    Ok((path, FetchOutcome::Fetched { resumed_from, received }))
}

// ----- the owner's side -----

/// Serves input fetches until `cancel` fires.
pub async fn serve_inputs<S: InputSource>(
    source: Arc<S>,
    blobs: Result<BlobStore, BlobError>,
    mut control: Control,
    cancel: CancellationToken,
) {
    let mut incoming = match control.accept(StreamProtocol::new(INPUTS_PROTOCOL)) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept {INPUTS_PROTOCOL} streams");
            return;
        }
    };
    let blobs = match blobs {
        Ok(b) => Arc::new(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the blob store; inputs cannot be served");
            return;
        }
    };
    let mut sends = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(_) = sends.join_next(), if !sends.is_empty() => {}
            next = incoming.next(), if sends.len() < MAX_SENDS => {
                let Some((peer, stream)) = next else { break };
                let (source, blobs, cancel) = (Arc::clone(&source), Arc::clone(&blobs), cancel.clone());
                sends.spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = serve_one(&*source, &blobs, peer, stream) => {}
                    }
                });
            }
        }
    }
    sends.abort_all();
}

async fn serve_one<S: InputSource>(
    source: &S,
    blobs: &BlobStore,
    peer: PeerId,
    mut stream: Stream,
) {
    let runner = InstanceId::from_peer_id(peer);
    let request: InputRequest = match timeout(IDLE, read_frame(&mut stream, MAX_INPUT_FRAME)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return source.served(&runner, format!("unreadable request: {}", frame_error(e)));
        }
        Err(_) => return,
    };
    let refuse = |detail: String| InputReply::Refused { detail };
    let found = source.input_for(&runner, &request.job_id, &request.digest);
    let (reply, file) = match found {
        None => (
            refuse(format!(
                "blob {} is not an input of a live job {} of this instance's workflows at your instance",
                request.digest, request.job_id
            )),
            None,
        ),
        Some(bundle) if request.offset > bundle.size => (
            refuse(format!("offset {} is past the blob's {} bytes", request.offset, bundle.size)),
            None,
        ),
        Some(bundle) => match blobs.path(&bundle.digest) {
            None => (refuse(format!("blob {} is not stored here", bundle.digest)), None),
            Some(path) => (InputReply::Sending { size: bundle.size }, Some((path, bundle))),
        },
    };
    if let InputReply::Refused { detail } = &reply {
        source.served(&runner, format!("refused job {}: {detail}", request.job_id));
    }
    if timeout(IDLE, write_frame(&mut stream, &reply)).await.is_err() {
        return;
    }
    let Some((path, bundle)) = file else { return };
    let result = send_file(&mut stream, path, request.offset).await;
    if let Ok(sent) = &result {
        source.sent(&runner, &bundle.digest, *sent);
    }
    match result {
        Ok(sent) => source.served(
            &runner,
            format!(
                "job {}: input {} ({sent} of {} bytes)",
                request.job_id, bundle.digest, bundle.size
            ),
        ),
        Err(e) => source.served(
            &runner,
            format!("job {}: sending input {} broke off: {e}", request.job_id, bundle.digest),
        ),
    }
    let _ = stream.close().await;
}

/// Sends the file at `path` from `offset` on, reading it on a blocking thread.
async fn send_file(stream: &mut Stream, path: PathBuf, offset: u64) -> io::Result<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(8);
    let reader = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            buf.truncate(n);
            if tx.blocking_send(Ok(buf)).is_err() {
                return Ok(());
            }
        }
    });
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        timeout(IDLE, stream.write_all(&chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the runner stopped reading"))??;
        sent += chunk.len() as u64;
    }
    reader.await.map_err(io::Error::other)??;
    stream.flush().await?;
    Ok(sent)
}
