//! Wire types of kaapana-node: identifiers, manifests, their canonical postcard encoding and
//! the signed envelope [`Signed<T>`].
//!
//! This crate owns what two instances must agree on byte for byte. It does no I/O, reads no
//! clock and spawns nothing: time comes in as [`Timestamp`] arguments, keys as
//! [`SigningKey`]s. Persistence of keys and certificates is `kaapana-certs`' job; what a
//! verified message *means* is `kaapana-federation`'s.
//!
//! Receiving a message: [`Signed::from_bytes`] (bounded by the type's size limit before any
//! decoding) → [`Signed::verify`] or [`Signed::verify_fresh`] (domain, signature, version,
//! validity, time, replay) → [`Verified::payload`].
//!
//! Two protocols carry them: `/kaapana/fed/1` ([`FedRequest`], [`FedResponse`]: batches of
//! signed messages) and `/kaapana/results/1` ([`Offer`], [`Reply`]: a result's blob).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod error;
mod ids;
mod key;
mod manifest;
mod replay;
mod results;
mod signed;
mod time;
mod trust;
mod wire;

pub use error::{DecodeError, EncodeError, ValidationError, VerifyError};
pub use ids::{ImageDigest, InstanceId, JobId, ManifestId, Sha256Digest, WorkflowId, hex};
pub use key::{KeyError, SigningKey, verify_ed25519};
pub use libp2p_identity::PeerId;
pub use manifest::{
    BlobRef, Cancel, CapabilityAd, CapabilityQuery, ContainerWork, DAG_CONF_NODE_KEY, DagRun,
    DatasetRef, DatasetSummary, EnvVar, ExecutorKind, ExitStatus, Gpu, Header, InputBundle,
    InstanceBundleInfo, ItemToken, JobManifest, JobSpec, JobState, JobTimings, JobUpdate,
    LateUpdates, MAX_DAG_CONF_LEN, MAX_ITEM_TOKENS, MAX_MODALITIES, MAX_NAME_LEN, MAX_RETRIES,
    MAX_ROUNDS, MAX_TEXT_LEN, ModalityCount, NameScope, Pick, Processing, ResourceLimits,
    Resources, ResultManifest, ResumeFrom, Rounds, RunnerSelector, Work, WorkflowManifest,
    fit_text, validate_modality, validate_name, validate_text,
};
pub use replay::ReplayWindow;
pub use results::{
    INPUTS_PROTOCOL, InputReply, InputRequest, MAX_INPUT_FRAME, MAX_OFFER, MAX_REPLY, Offer,
    RESULTS_PROTOCOL, RejectCode, Reply, ResultPart,
};
pub use signed::{
    ENVELOPE_FORMAT, ENVELOPE_OVERHEAD, Manifest, ManifestKind, PROTOCOL_VERSION, Signed, Verified,
    VerifyOptions,
};
pub use time::Timestamp;
pub use trust::{KeyHandOver, MAX_HANDOVER_BUNDLE, MAX_REVOKED, RevocationList, RevokedInstance};
pub use wire::{
    AnySigned, AnyVerified, Delivery, FED_PROTOCOL, FedRequest, FedResponse, MAX_BATCH,
    MAX_FED_REQUEST, MAX_FED_RESPONSE, RejectReason, peek_kind,
};
