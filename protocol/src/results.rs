//! The `/kaapana/results/1` protocol: a runner streams one blob of a signed `ResultManifest`
//! (the result bundle or the job's log) to the workflow's owner.
//!
//! These are the frames both sides must agree on; the streams, the resuming, the hashing and
//! the storage are the node's (`kaapana_node::net::results`).
//!
//! ```text
//! frame = length:u32 big-endian ‖ postcard body   (an offer ≤ MAX_OFFER, a reply ≤ MAX_REPLY)
//!
//! runner → owner   frame Offer { part, envelope }      the signed ResultManifest, exact bytes
//! owner  → runner  frame Reply::Resume { offset }      "send from byte `offset`"
//!                     | Reply::Complete                the blob is here already: done
//!                     | Reply::Rejected { reason, detail }   nothing is read after this
//! runner → owner   bytes offset..size of the blob, raw, in chunks; then it closes its write side
//! owner  → runner  frame Reply::Stored                 blob verified, durable, result recorded
//!                     | Reply::Rejected { reason, detail }
//! ```

use serde::{Deserialize, Serialize};

use crate::manifest::{BlobRef, ResultManifest};
use crate::signed::Signed;
use crate::wire::RejectReason;

/// The libp2p protocol name of result transfers.
pub const RESULTS_PROTOCOL: &str = "/kaapana/results/1";
/// The largest offer frame: the largest `ResultManifest` envelope and a few bytes.
pub const MAX_OFFER: usize = Signed::<ResultManifest>::MAX_ENVELOPE + 16;
/// The largest reply frame.
pub const MAX_REPLY: usize = 64 * 1024;

/// Which blob of a result a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultPart {
    /// The tar of the job's `/output` (`ResultManifest::bundle`).
    Bundle,
    /// The job's log (`ResultManifest::log`).
    Log,
}

impl ResultPart {
    /// The blob this part names in `manifest`.
    pub fn blob(self, manifest: &ResultManifest) -> Option<BlobRef> {
        match self {
            Self::Bundle => Some(manifest.bundle),
            Self::Log => manifest.log,
        }
    }

    /// The part's name in messages: `bundle` or `log`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bundle => "bundle",
            Self::Log => "log",
        }
    }
}

/// The runner's first frame.
#[derive(Debug, Serialize, Deserialize)]
pub struct Offer {
    /// Which blob follows.
    pub part: ResultPart,
    /// The signed `ResultManifest`, its exact bytes.
    pub envelope: Vec<u8>,
}

/// The owner's answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Send the blob from this byte on.
    Resume {
        /// Bytes the owner has already.
        offset: u64,
    },
    /// The owner has the blob already (the result is recorded): nothing to send.
    Complete,
    /// The blob arrived whole and matches the manifest; it and the result are durable.
    Stored,
    /// Refused.
    Rejected {
        /// Why, as a countable reason.
        reason: RejectCode,
        /// The owner's message.
        detail: String,
    },
}

/// Why an owner refused a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectCode {
    /// The manifest was refused (size, encoding, signer, signature, time, ...).
    Manifest(RejectReason),
    /// The bytes do not hash to the manifest's digest (nothing was kept).
    DigestMismatch,
    /// More bytes than the manifest's size, or a stored blob of another size.
    SizeMismatch,
    /// A log was offered for a manifest that names none.
    NoSuchPart,
    /// Too many uploads, or one of the same blob that would not let go: try later.
    Busy,
    /// The stream ended before the whole blob arrived; what came is kept: send again.
    Incomplete,
    /// The owner could not write the blob or the result: try later.
    Storage,
    /// The result is for a job the owner did not submit to this runner.
    NotYourJob,
    /// The result is of a job attempt the owner has replaced (e.g. after it took the runner
    /// for lost and ran the job elsewhere): recognised, and discarded.
    Superseded,
    /// Storing the blob would take the result bytes the owner holds from this runner beyond
    /// the owner's per-runner quota (nothing was read); later, once the owner freed space or
    /// raised the quota, it may succeed.
    QuotaExceeded,
}

impl RejectCode {
    /// The label in `kaapana_node_rejections_total{reason}`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Manifest(r) => r.label(),
            Self::DigestMismatch => "digest_mismatch",
            Self::SizeMismatch => "size_mismatch",
            Self::NoSuchPart => "no_such_part",
            Self::Busy => "busy",
            Self::Incomplete => "incomplete",
            Self::Storage => "storage",
            Self::NotYourJob => "not_your_job",
            Self::Superseded => "superseded",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }

    /// Whether sending the same result again later may succeed.
    pub const fn is_transient(self) -> bool {
        match self {
            Self::Manifest(r) => r.is_transient(),
            Self::Busy | Self::Incomplete | Self::Storage | Self::QuotaExceeded => true,
            Self::DigestMismatch
            | Self::SizeMismatch
            | Self::NoSuchPart
            | Self::NotYourJob
            | Self::Superseded => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding is the wire format: variants and fields in declaration order.
    #[test]
    fn frames_have_the_wire_encoding() {
        let offer = Offer { part: ResultPart::Log, envelope: vec![7, 8, 9] };
        assert_eq!(postcard::to_allocvec(&offer).unwrap(), [1, 3, 7, 8, 9]);
        assert_eq!(postcard::to_allocvec(&Reply::Resume { offset: 300 }).unwrap(), [0, 0xac, 2]);
        assert_eq!(postcard::to_allocvec(&Reply::Complete).unwrap(), [1]);
        assert_eq!(postcard::to_allocvec(&Reply::Stored).unwrap(), [2]);
        let busy = Reply::Rejected { reason: RejectCode::Busy, detail: "x".into() };
        assert_eq!(postcard::to_allocvec(&busy).unwrap(), [3, 4, 1, b'x']);
        let back: Offer = postcard::from_bytes(&[0, 0]).unwrap();
        assert_eq!((back.part, back.envelope), (ResultPart::Bundle, vec![]));
    }
}

/// The libp2p protocol name of input fetches: a runner fetches an upstream result bundle a job
/// of it reads (a model of the previous round, an earlier stage's output) from the workflow's
/// owner.
///
/// ```text
/// runner → owner   frame InputRequest { job_id, digest, offset }
/// owner  → runner  frame InputReply::Sending { size }   then bytes offset..size, raw; the owner closes
///                     | InputReply::Refused { detail }  nothing follows
/// ```
///
/// The owner sends only a blob that is an input of a job it dispatched to the requesting
/// runner; the runner checks size and digest against the job's signed manifest.
pub const INPUTS_PROTOCOL: &str = "/kaapana/inputs/1";
/// The largest input request or reply frame.
pub const MAX_INPUT_FRAME: usize = 4 * 1024;

/// A runner asks for the bytes of one input bundle of one of its jobs, from `offset` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRequest {
    /// The job (its current attempt) that reads the bundle.
    pub job_id: crate::ids::JobId,
    /// The bundle, as the job's manifest names it.
    pub digest: crate::ids::Sha256Digest,
    /// Bytes the runner holds already (a resumed fetch).
    pub offset: u64,
}

/// The owner's answer to an [`InputRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum InputReply {
    /// The bytes from the request's offset to `size` follow.
    Sending {
        /// The bundle's whole size.
        size: u64,
    },
    /// Not sent, and why.
    Refused {
        /// For people.
        detail: String,
    },
}
