//! The node's store: registered instances, seen manifest ids and small values, in one redb
//! file behind a typed API. Nothing outside this module touches redb.
//!
//! # Durability
//!
//! Every write is committed with redb's default (immediate) durability, which fsyncs the file:
//! when a write method returns `Ok`, the change is on disk and survives a crash or power loss.
//! A write that fails with any error but [`StoreError::WriterGone`] changed nothing.
//!
//! # Group commit
//!
//! One writer thread owns every write transaction. Callers send write requests over a bounded
//! channel and wait for the answer. The writer takes every request already queued (up to
//! [`MAX_BATCH`]), applies them all in one transaction with one commit (one fsync), then answers
//! each request with its own result. So many concurrent writers cost about one fsync per batch
//! instead of one each. If the batch transaction fails, each of its requests is retried in a
//! transaction of its own, so one failing request does not fail the others. The operations of
//! one request ([`Store::write`]) are atomic: all of them are committed or none.
//!
//! Writes come in two forms: blocking methods ([`Store::put_instance`], [`Store::write`], ...)
//! for plain threads such as the CLI (they panic if called from within an async runtime, like
//! tokio's own blocking calls), and [`Store::write_async`] for async code. Reads use
//! redb read transactions (MVCC snapshots) directly on the calling thread and never wait for
//! the writer.
//!
//! # Adding a table
//!
//! # Workflows
//!
//! A workflow this node owns is stored as several records, as the federation core persists it
//! (`Record::Workflow` and `Record::WorkflowJob`): its own fields ([`WorkflowHeader`]: state,
//! steps, training rounds, the number of jobs) in `workflows.v5`, and each job's owner record
//! ([`WorkflowJob`]) in `workflow_jobs.v1` under the workflow id and the job's position. An
//! event that changes one job of a 10,000-job workflow writes that job's record (about
//! 200 bytes), not the workflow (`benches/large.rs` measures both). [`Store::workflow`] and
//! [`Store::workflows`] put the records of one snapshot together again
//! ([`WorkflowRecord::from_records`]); a missing job record is [`StoreError::Corrupt`].
//! Workflows are never removed. A store written before (`workflows.v4`, one whole
//! [`WorkflowRecord`] per workflow) is split into the two tables when it is opened.
//!
//! # Audit log
//!
//! The `audit.v1` table holds the hash-chained, signed audit log ([`crate::audit`]). A
//! [`WriteOp::Audit`] seals its entry after the table's last one inside the same write
//! transaction as the ops before it in the request, so an action and its audit entry are
//! committed together or not at all. Sealing needs the instance key: open the store with
//! [`Store::open_audited`] to append; [`Store::open`] can read and verify the log only.
//!
//! # Adding a table
//!
//! Define its `TableDefinition` next to the others, open it in `Tables::open` (which also
//! creates it when the store is opened), add [`WriteOp`] variants and apply them in
//! `Tables::apply`, and add read methods to [`Store`]. Values with a schema get a version
//! byte in front, as instances do.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use kaapana_certs::Identity;
use kaapana_federation::{RegisteredInstance, Registry, WorkflowHeader, WorkflowJob};
use kaapana_protocol::{InstanceId, JobId, ManifestId, Timestamp, WorkflowId};
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{Table, TableDefinition, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

/// Registered instances: `InstanceId` bytes → schema version byte + postcard of
/// [`RegisteredInstance`].
const INSTANCES: TableDefinition<&[u8], &[u8]> = TableDefinition::new(INSTANCES_NAME);
const INSTANCES_NAME: &str = "instances";
/// Ids of accepted signed messages → their `expires_at` in ms since the epoch (8 bytes,
/// big-endian), then their signer's `InstanceId` bytes (none for ids recorded without one).
/// Replaces `seen_manifest_ids` (id → expiry only), whose entries are moved here, without a
/// signer, when the store is opened.
const SEEN: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("seen_ids.v2");
/// The table `seen_ids.v2` replaces.
const SEEN_V1: TableDefinition<&[u8; 32], u64> = TableDefinition::new("seen_manifest_ids");
/// Small values by name.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Accepted messages in the order they were received: sequence → postcard of [`InboxRecord`].
const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
/// The latest signed capability ad of each peer: `InstanceId` bytes → envelope bytes.
const PEER_CAPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peer_capabilities");
/// Messages waiting for delivery: [`outbox_key`] (peer, sequence) → envelope bytes.
const OUTBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");
/// Jobs this node runs (for others and for its own workflows): `JobId` bytes → postcard of
/// [`RunnerJobRecord`] (the runner's state and the verified manifest). The `.v3` tables (and
/// `workflow_manifests.v2`) hold manifests whose work is a container or a DAG run (protocol
/// version 2, issue 15); the `.v2` ones of earlier stores, and the `runner_jobs`,
/// `owner_jobs` and `workflows` of stores written before the one federation core (issue 13),
/// are left unread.
const RUNNER_JOBS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("runner_jobs.v3");
/// The last outbox sequence number used per peer, so that numbers only grow even when the
/// outbox empties (delivery workers keep a cursor).
const OUTBOX_SEQ: TableDefinition<&[u8], u64> = TableDefinition::new("outbox_seq");
/// Results received as a workflow's owner: `JobId` bytes → the runner's signed
/// `ResultManifest` envelope (its bundle is in the blob store, see [`crate::blobs`]).
const RESULTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("results");
/// Datasets registered at this site: name → [`DATASET_SCHEMA_V2`] + postcard of
/// [`DatasetRecord`]. Replaces `datasets` (name → postcard of the record without its DICOMweb
/// definition), whose entries are moved here when the store is opened.
const DATASETS: TableDefinition<&str, &[u8]> = TableDefinition::new("datasets.v2");
/// The table `datasets.v2` replaces.
const DATASETS_V1: TableDefinition<&str, &[u8]> = TableDefinition::new("datasets");
/// The schema version byte in front of each value of the datasets table.
const DATASET_SCHEMA_V2: u8 = 2;
/// The own fields of each workflow this node owns: `WorkflowId` bytes →
/// [`WORKFLOW_SCHEMA_V1`] + postcard of [`WorkflowHeader`]. Its jobs are in
/// [`WORKFLOW_JOBS`]; [`Store::workflow`] puts the two together. Replaces `workflows.v4`
/// (the whole [`WorkflowRecord`] in one value, rewritten on every job event), whose entries
/// are split into the two tables when the store is opened.
const WORKFLOWS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("workflows.v5");
/// The owner's record of each job of each owned workflow: [`workflow_job_key`] (workflow id,
/// the job's position in [`WorkflowRecord::jobs`]) → [`WORKFLOW_SCHEMA_V1`] + postcard of
/// [`WorkflowJob`]. An event that changes one job rewrites this one entry.
const WORKFLOW_JOBS: TableDefinition<&[u8; 20], &[u8]> = TableDefinition::new("workflow_jobs.v1");
/// The table `workflows.v5` and `workflow_jobs.v1` replace.
const WORKFLOWS_V4: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("workflows.v4");
/// The schema version byte in front of each value of the workflow tables.
const WORKFLOW_SCHEMA_V1: u8 = 1;
/// The signed `WorkflowManifest` each owned workflow was planned from: `WorkflowId` bytes →
/// envelope bytes (written once, at submission).
const WORKFLOW_MANIFESTS: TableDefinition<&[u8; 16], &[u8]> =
    TableDefinition::new("workflow_manifests.v3");

/// Instances revoked here (by this site's admin, by the federation CA's revocation list, or
/// replaced by a key hand-over): `InstanceId` bytes → postcard of [`RevocationRecord`]. A
/// revoked instance is not registered and cannot be registered again while it is listed.
const REVOCATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("revocations.v1");

/// The audit log: sequence number (from 1) → a sealed entry (see [`crate::audit`]).
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit.v1");

/// The schema version byte in front of each value of the instances table.
const INSTANCE_SCHEMA_V1: u8 = 1;

/// The most write requests committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// How many write requests may wait for the writer before senders wait too.
const QUEUE_CAPACITY: usize = 4 * MAX_BATCH;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("cannot open the store {}: {source}", path.display())]
    Open {
        /// The store file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another process has the file open.
    #[error("another kaapana-node process is using {}; stop it or use its API", path.display())]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// A stored value cannot be decoded.
    #[error(
        "the store's {table} table holds a value this kaapana-node cannot read ({detail}); was it written by a newer version?"
    )]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong with the value.
        detail: String,
    },
    /// redb failed (I/O error, full disk, ...).
    #[error("the store failed: {0}; check the disk and the file's permissions")]
    Backend(String),
    /// An audit entry could not be sealed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The writer thread has stopped, so no write can be made durable.
    #[error("the store's writer thread has stopped; restart kaapana-node")]
    WriterGone,
}

/// One change to the store. A [`Store::write`] request applies its ops in order, atomically.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WriteOp {
    /// Inserts or replaces a registered instance (by id). Answers [`WriteOutcome::Done`].
    PutInstance(Box<RegisteredInstance>),
    /// Removes a registered instance. Answers [`WriteOutcome::Removed`].
    RemoveInstance(InstanceId),
    /// Records message ids with their expiry. Answers [`WriteOutcome::Done`].
    RecordSeen(Vec<(ManifestId, Timestamp)>),
    /// Records message ids with their expiry and signer. Answers [`WriteOutcome::Done`].
    RecordSeenFrom(Vec<(InstanceId, ManifestId, Timestamp)>),
    /// Forgets the message ids that expire at or before this instant (as
    /// [`kaapana_protocol::ReplayWindow::prune`] does). Answers [`WriteOutcome::Pruned`].
    PruneSeen(Timestamp),
    /// Sets a small value. Answers [`WriteOutcome::Done`].
    PutMeta {
        /// Its name.
        key: String,
        /// Its bytes.
        value: Vec<u8>,
    },
    /// Appends accepted messages to the inbox. Answers [`WriteOutcome::Done`].
    AppendInbox(Vec<InboxRecord>),
    /// Removes the oldest inbox entries received at or before `before`, at most `limit` of
    /// them (stopping at the first newer one). Answers [`WriteOutcome::InboxPruned`].
    PruneInbox {
        /// The newest reception time pruned.
        before: Timestamp,
        /// The most entries removed by this op.
        limit: usize,
    },
    /// Keeps a peer's latest signed capability ad. Answers [`WriteOutcome::Done`].
    PutPeerCapabilities {
        /// The peer.
        peer: InstanceId,
        /// The ad's envelope bytes.
        envelope: Vec<u8>,
    },
    /// Queues envelopes for `peer` after the ones already queued. Answers
    /// [`WriteOutcome::Done`].
    EnqueueOutbox {
        /// The receiver.
        peer: InstanceId,
        /// Envelope bytes, in delivery order.
        envelopes: Vec<Vec<u8>>,
    },
    /// Removes delivered outbox entries. Answers [`WriteOutcome::Done`].
    AckOutbox {
        /// The receiver.
        peer: InstanceId,
        /// The entries' sequence numbers.
        seqs: Vec<u64>,
    },
    /// Drops everything kept for a peer that is no longer registered (its outbox and its
    /// capability ad). Answers [`WriteOutcome::Done`].
    ForgetPeer(InstanceId),
    /// Keeps the signed `ResultManifest` of a job whose bundle was stored (replacing an
    /// earlier one for the same job). Answers [`WriteOutcome::Done`].
    PutResult {
        /// The job.
        job: JobId,
        /// The verified envelope bytes.
        envelope: Vec<u8>,
    },
    /// Inserts or replaces a job this node runs. Answers [`WriteOutcome::Done`].
    PutRunnerJob(Box<RunnerJobRecord>),
    /// Inserts or replaces a registered dataset (by name). Answers [`WriteOutcome::Done`].
    PutDataset(DatasetRecord),
    /// Forgets a registered dataset (its files stay). Answers [`WriteOutcome::Done`].
    RemoveDataset(String),
    /// Inserts or replaces a whole workflow this node owns: its header and every job's record.
    /// Answers [`WriteOutcome::Done`].
    PutWorkflow(Box<WorkflowRecord>),
    /// Inserts or replaces the own fields of a workflow this node owns (its jobs' records
    /// stay). Answers [`WriteOutcome::Done`].
    PutWorkflowHeader(Box<WorkflowHeader>),
    /// Inserts or replaces the record of one job of a workflow this node owns. Answers
    /// [`WriteOutcome::Done`].
    PutWorkflowJob {
        /// The workflow.
        workflow: WorkflowId,
        /// The job's position in [`WorkflowRecord::jobs`].
        index: u32,
        /// The job's record.
        job: Box<WorkflowJob>,
    },
    /// Keeps the signed manifest of a workflow this node submitted. Answers
    /// [`WriteOutcome::Done`].
    PutWorkflowManifest {
        /// The workflow.
        workflow: WorkflowId,
        /// The signed `WorkflowManifest` envelope.
        envelope: Vec<u8>,
    },
    /// Appends an entry to the audit log, sealed (numbered, linked to the last entry and
    /// signed) in this transaction. Needs a store opened with [`Store::open_audited`]. Answers
    /// [`WriteOutcome::Audited`].
    Audit(crate::audit::AuditRecord),
    /// Records an instance as revoked (replacing an earlier record for it). Answers
    /// [`WriteOutcome::Done`].
    PutRevocation(Box<RevocationRecord>),
}

/// Why an instance is revoked here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RevocationSource {
    /// This site's admin revoked it (`instance revoke`).
    Local,
    /// The federation CA's revocation list with this number names it.
    FederationCa {
        /// The list's number.
        number: u64,
    },
    /// It handed over to a new key (`instance rotate` at that site); the new key is
    /// registered instead.
    HandedOver {
        /// The new key's instance id.
        to: InstanceId,
    },
}

/// An instance revoked here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevocationRecord {
    /// The revoked instance (its key).
    pub instance_id: InstanceId,
    /// Its name when it was revoked (empty if it was never registered here).
    pub name: String,
    /// The fingerprint of its certificate as known here or as the CA listed it.
    pub fingerprint: [u8; 32],
    /// Why.
    pub reason: String,
    /// Who revoked it.
    pub source: RevocationSource,
    /// When it was revoked here.
    pub revoked_at: Timestamp,
}

/// A workflow this node owns: its state and the owner's record of each of its jobs, as the
/// federation core persists it (stored as a [`WorkflowHeader`] and one [`WorkflowJob`] each).
pub type WorkflowRecord = kaapana_federation::Workflow;

/// The key of a job's record in `workflow_jobs.v1`: the workflow id, then the job's position
/// (big-endian, so a workflow's jobs are one range, in position order).
fn workflow_job_key(workflow: &WorkflowId, index: u32) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(workflow.as_bytes());
    key[16..].copy_from_slice(&index.to_be_bytes());
    key
}

fn encode_workflow_value<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![WORKFLOW_SCHEMA_V1]).map_err(backend)
}

fn decode_workflow_value<T: serde::de::DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { table, detail };
    match bytes.split_first() {
        Some((&WORKFLOW_SCHEMA_V1, rest)) => {
            postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("unknown schema version {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

/// Writes a whole workflow: its header and every job's record.
fn put_whole_workflow(
    workflows: &mut Table<'_, &'static [u8; 16], &'static [u8]>,
    jobs: &mut Table<'_, &'static [u8; 20], &'static [u8]>,
    w: &WorkflowRecord,
) -> Result<(), StoreError> {
    let header = encode_workflow_value(&w.header())?;
    workflows.insert(w.workflow_id.as_bytes(), header.as_slice()).map_err(backend)?;
    for (index, job) in (0u32..).zip(&w.jobs) {
        let key = workflow_job_key(&w.workflow_id, index);
        jobs.insert(&key, encode_workflow_value(job)?.as_slice()).map_err(backend)?;
    }
    Ok(())
}

/// Splits the whole-workflow records of `workflows.v4` of an older store into `workflows.v5`
/// and `workflow_jobs.v1`, then deletes the old table.
fn migrate_workflows(txn: &WriteTransaction) -> Result<(), StoreError> {
    use redb::TableHandle;
    let old_exists = txn.list_tables().map_err(backend)?.any(|t| t.name() == WORKFLOWS_V4.name());
    if !old_exists {
        return Ok(());
    }
    {
        let old = txn.open_table(WORKFLOWS_V4).map_err(backend)?;
        let mut workflows = txn.open_table(WORKFLOWS).map_err(backend)?;
        let mut jobs = txn.open_table(WORKFLOW_JOBS).map_err(backend)?;
        for entry in old.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            let w: WorkflowRecord = postcard::from_bytes(v.value()).map_err(|e| {
                StoreError::Corrupt { table: "workflows.v4", detail: e.to_string() }
            })?;
            if workflows.get(w.workflow_id.as_bytes()).map_err(backend)?.is_none() {
                put_whole_workflow(&mut workflows, &mut jobs, &w)?;
            }
        }
    }
    txn.delete_table(WORKFLOWS_V4).map_err(backend)?;
    Ok(())
}

/// A dataset registered at this site: where its provider finds it. For a DICOMweb dataset the
/// record is its whole definition (the series it resolved to when it was registered), so the
/// daemon needs no PACS to start or to advertise it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatasetRecord {
    /// Its name, as advertised to peers.
    pub name: String,
    /// Its provider (`directory` or `dicomweb`).
    pub provider: String,
    /// Where the provider finds it (for `directory`: the folder with one sub-folder per item;
    /// for `dicomweb`: the PACS's DICOMweb URL).
    pub location: String,
    /// When it was registered.
    pub added_at: Timestamp,
    /// The series of a `dicomweb` dataset.
    pub dicomweb: Option<DicomWebDefinition>,
}

/// What a DICOMweb dataset is: the series its selection resolved to at registration, and how
/// to reach the PACS.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DicomWebDefinition {
    /// The credentials (paths of the files holding the secret).
    pub credentials: crate::pacs::PacsCredentials,
    /// The selection as given (`series 1.2.3 1.2.4`, `study 1.2.3`, `query Modality=CT`).
    pub selection: String,
    /// The series, in the order the PACS listed them.
    pub series: Vec<PacsSeries>,
}

/// One series of a DICOMweb dataset as QIDO-RS described it at registration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PacsSeries {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// StudyInstanceUID.
    pub study_uid: String,
    /// Modality (empty if the PACS gave none).
    pub modality: String,
    /// Number of instances.
    pub instances: u64,
    /// Its estimated pixel-data size in bytes (see [`crate::pacs::SeriesSize`]).
    pub bytes: u64,
}

/// A record of the `datasets` table that `datasets.v2` replaces.
#[derive(serde::Deserialize)]
struct DatasetRecordV1 {
    name: String,
    provider: String,
    location: String,
    added_at: Timestamp,
}

fn encode_dataset(d: &DatasetRecord) -> Result<Vec<u8>, StoreError> {
    let mut value = vec![DATASET_SCHEMA_V2];
    value.extend(postcard::to_allocvec(d).map_err(backend)?);
    Ok(value)
}

fn decode_dataset(bytes: &[u8]) -> Result<DatasetRecord, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { table: "datasets.v2", detail };
    match bytes.split_first() {
        Some((&DATASET_SCHEMA_V2, rest)) => {
            postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("unknown schema version {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

/// Moves the entries of the `datasets` table of an older store into `datasets.v2`.
fn migrate_datasets(txn: &WriteTransaction) -> Result<(), StoreError> {
    use redb::TableHandle;
    let old_exists = txn.list_tables().map_err(backend)?.any(|t| t.name() == DATASETS_V1.name());
    if !old_exists {
        return Ok(());
    }
    let mut records = Vec::new();
    {
        let old = txn.open_table(DATASETS_V1).map_err(backend)?;
        for entry in old.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            let r: DatasetRecordV1 = postcard::from_bytes(v.value())
                .map_err(|e| StoreError::Corrupt { table: "datasets", detail: e.to_string() })?;
            records.push(DatasetRecord {
                name: r.name,
                provider: r.provider,
                location: r.location,
                added_at: r.added_at,
                dicomweb: None,
            });
        }
    }
    let mut new = txn.open_table(DATASETS).map_err(backend)?;
    for r in &records {
        if new.get(r.name.as_str()).map_err(backend)?.is_none() {
            new.insert(r.name.as_str(), encode_dataset(r)?.as_slice()).map_err(backend)?;
        }
    }
    drop(new);
    txn.delete_table(DATASETS_V1).map_err(backend)?;
    Ok(())
}

/// A job this node runs, with the verified manifest it came in, as the federation core
/// persists it.
pub type RunnerJobRecord = kaapana_federation::RunnerRecord;

/// An accepted message as kept in the inbox.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InboxRecord {
    /// The verified signer.
    pub from: InstanceId,
    /// When it was accepted.
    pub received_at: Timestamp,
    /// The exact envelope bytes.
    #[serde(with = "serde_bytes_vec")]
    pub envelope: Vec<u8>,
}

/// A `Vec<u8>` as one byte string (same postcard layout as the derived one, without per-byte
/// visitor calls).
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A `seen_ids.v2` value: expiry (8 bytes, big-endian), then the signer's id bytes, if any.
fn encode_seen(expires_at: Timestamp, signer: Option<&InstanceId>) -> Vec<u8> {
    let mut value = expires_at.as_millis().to_be_bytes().to_vec();
    if let Some(s) = signer {
        value.extend_from_slice(&s.to_bytes());
    }
    value
}

fn decode_seen(value: &[u8]) -> Result<(Timestamp, Option<InstanceId>), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { table: "seen_ids.v2", detail };
    let (at, signer) = value.split_at_checked(8).ok_or_else(|| corrupt("short value".into()))?;
    let mut ms = [0u8; 8];
    ms.copy_from_slice(at);
    let signer = if signer.is_empty() {
        None
    } else {
        Some(InstanceId::from_bytes(signer).map_err(|e| corrupt(e.to_string()))?)
    };
    Ok((Timestamp::from_millis(u64::from_be_bytes(ms)), signer))
}

/// The sender and envelope size of a stored inbox record.
fn inbox_sender(value: &[u8]) -> Result<(InstanceId, u64), StoreError> {
    let r: InboxRecord = postcard::from_bytes(value)
        .map_err(|e| StoreError::Corrupt { table: "inbox", detail: e.to_string() })?;
    Ok((r.from, r.envelope.len() as u64))
}

/// Moves the ids of the `seen_manifest_ids` table of an older store into `seen_ids.v2`
/// (without a signer).
fn migrate_seen(txn: &WriteTransaction) -> Result<(), StoreError> {
    use redb::TableHandle;
    let old_exists = txn.list_tables().map_err(backend)?.any(|t| t.name() == SEEN_V1.name());
    if !old_exists {
        return Ok(());
    }
    let mut ids = Vec::new();
    {
        let old = txn.open_table(SEEN_V1).map_err(backend)?;
        for entry in old.iter().map_err(backend)? {
            let (id, at) = entry.map_err(backend)?;
            ids.push((*id.value(), at.value()));
        }
    }
    let mut new = txn.open_table(SEEN).map_err(backend)?;
    for (id, at) in &ids {
        let value = encode_seen(Timestamp::from_millis(*at), None);
        new.insert(id, value.as_slice()).map_err(backend)?;
    }
    drop(new);
    txn.delete_table(SEEN_V1).map_err(backend)?;
    Ok(())
}

/// An outbox key: peer id length, peer id bytes, sequence (big-endian, so keys sort by it).
fn outbox_key(peer: &InstanceId, seq: u64) -> Vec<u8> {
    let id = peer.to_bytes();
    let mut key = Vec::with_capacity(1 + id.len() + 8);
    key.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    key.extend_from_slice(&id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn outbox_seq(key: &[u8]) -> u64 {
    let mut seq = [0u8; 8];
    if let Some(tail) = key.len().checked_sub(8).map(|start| &key[start..]) {
        seq.copy_from_slice(tail);
    }
    u64::from_be_bytes(seq)
}

/// The answer to one [`WriteOp`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// Done; nothing to report.
    Done,
    /// The removed instance, if there was one.
    Removed(Option<Box<RegisteredInstance>>),
    /// How many entries were removed.
    Pruned(usize),
    /// The sequence number of the new audit entry.
    Audited(u64),
    /// The inbox entries removed, per sender: (sender, entries, envelope bytes).
    InboxPruned(Vec<(InstanceId, u64, u64)>),
}

/// A write request on its way to the writer thread.
struct Request {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<Vec<WriteOutcome>, StoreError>>,
}

/// The node's store. Cheap to clone: clones share one database and one writer thread.
///
/// Dropping the last clone closes the channel; the writer finishes the requests already queued,
/// then stops, and the drop waits for it, so the file is closed (and its lock released) when
/// the drop returns.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            // A writer that panicked has answered nothing more; there is nothing left to do.
            let _ = writer.join();
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store at `path`, creating the file (and its parent directory) if missing.
    ///
    /// Fails with [`StoreError::Locked`] if another process (or another `Store` in this one)
    /// has it open. After a crash the open repairs the file, which may take a moment.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, None)
    }

    /// Opens the store as [`Store::open`] does, with the instance key that signs the audit
    /// entries it appends ([`WriteOp::Audit`]).
    pub fn open_audited(path: &Path, key: Identity) -> Result<Self, StoreError> {
        Self::open_with(path, Some(Arc::new(key)))
    }

    fn open_with(path: &Path, key: Option<Arc<Identity>>) -> Result<Self, StoreError> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            fs::create_dir_all(parent).map_err(|e| open_err(e.into()))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path.to_owned() },
            other => open_err(other.into()),
        })?;
        // Create the tables, so that read transactions find them all.
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        Tables::open(&txn, None).map_err(|e| open_err(e.into()))?;
        migrate_datasets(&txn).map_err(|e| open_err(e.into()))?;
        migrate_seen(&txn).map_err(|e| open_err(e.into()))?;
        migrate_workflows(&txn).map_err(|e| open_err(e.into()))?;
        txn.commit().map_err(|e| open_err(e.into()))?;

        let db = Arc::new(db);
        let (requests, queue) = mpsc::channel(QUEUE_CAPACITY);
        let writer_db = Arc::clone(&db);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(&writer_db, key.as_deref(), queue))
            .map_err(|e| open_err(e.into()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                db,
                requests: Some(requests),
                writer: Some(writer),
            }),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    // ----- writes -----

    /// Applies `ops` atomically and durably, blocking until they are on disk; one outcome per
    /// op, in order.
    ///
    /// # Panics
    ///
    /// When called from within an async runtime (blocking there could stall it): use
    /// [`Store::write_async`] there.
    pub fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.blocking_send(Request { ops, reply }).map_err(|_| StoreError::WriterGone)?;
        answer.blocking_recv().map_err(|_| StoreError::WriterGone)?
    }

    /// Applies `ops` atomically and durably; resolves once they are on disk.
    ///
    /// The write is not cancelled by dropping the future once the request is queued: it may
    /// still be committed.
    pub async fn write_async(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.send(Request { ops, reply }).await.map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Inserts or replaces a registered instance. Durable when it returns `Ok`. The store does
    /// not check names: [`Registry::add`] does, on [`Store::load_registry`].
    pub fn put_instance(&self, inst: &RegisteredInstance) -> Result<(), StoreError> {
        self.write_one(WriteOp::PutInstance(Box::new(inst.clone()))).map(drop)
    }

    /// Removes a registered instance and returns it, if it was there. Durable when it returns.
    pub fn remove_instance(
        &self,
        id: &InstanceId,
    ) -> Result<Option<RegisteredInstance>, StoreError> {
        match self.write_one(WriteOp::RemoveInstance(*id))? {
            WriteOutcome::Removed(removed) => Ok(removed.map(|b| *b)),
            other => Err(unexpected("RemoveInstance", &other)),
        }
    }

    /// Records accepted message ids with their expiry. Durable when it returns.
    pub fn record_seen(&self, ids: Vec<(ManifestId, Timestamp)>) -> Result<(), StoreError> {
        self.write_one(WriteOp::RecordSeen(ids)).map(drop)
    }

    /// Forgets the message ids that expire at or before `now`; returns how many.
    pub fn prune_seen(&self, now: Timestamp) -> Result<usize, StoreError> {
        match self.write_one(WriteOp::PruneSeen(now))? {
            WriteOutcome::Pruned(n) => Ok(n),
            other => Err(unexpected("PruneSeen", &other)),
        }
    }

    /// Sets a small value. Durable when it returns.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write_one(WriteOp::PutMeta { key: key.to_owned(), value: value.to_vec() }).map(drop)
    }

    fn write_one(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        self.write(vec![op])?.pop().ok_or(StoreError::Backend("the writer gave no answer".into()))
    }

    fn sender(&self) -> Result<&mpsc::Sender<Request>, StoreError> {
        self.inner.requests.as_ref().ok_or(StoreError::WriterGone)
    }

    // ----- reads -----

    /// The registered instance with this id.
    pub fn instance(&self, id: &InstanceId) -> Result<Option<RegisteredInstance>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(INSTANCES).map_err(backend)?;
        let key = id.to_bytes();
        match table.get(key.as_slice()).map_err(backend)? {
            Some(value) => decode_instance(&key, value.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every registered instance, ordered by id bytes.
    pub fn instances(&self) -> Result<Vec<RegisteredInstance>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(INSTANCES).map_err(backend)?;
        let mut out =
            Vec::with_capacity(usize::try_from(table.len().map_err(backend)?).unwrap_or(0));
        for entry in table.iter().map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            out.push(decode_instance(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The registry of every stored instance. Fails with [`StoreError::Corrupt`] if two stored
    /// instances have the same name.
    pub fn load_registry(&self) -> Result<Registry, StoreError> {
        let mut registry = Registry::new();
        for inst in self.instances()? {
            registry.add(inst).map_err(|e| StoreError::Corrupt {
                table: INSTANCES_NAME,
                detail: e.to_string(),
            })?;
        }
        Ok(registry)
    }

    /// Every recorded message id with its expiry, ordered by id.
    pub fn seen_ids(&self) -> Result<Vec<(ManifestId, Timestamp)>, StoreError> {
        Ok(self.seen_ids_with_signers()?.into_iter().map(|(id, at, _)| (id, at)).collect())
    }

    /// Every recorded message id with its expiry and signer (if recorded with one), ordered
    /// by id (to restore a [`kaapana_protocol::ReplayWindow`]).
    pub fn seen_ids_with_signers(
        &self,
    ) -> Result<Vec<(ManifestId, Timestamp, Option<InstanceId>)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(SEEN).map_err(backend)?;
        let mut out =
            Vec::with_capacity(usize::try_from(table.len().map_err(backend)?).unwrap_or(0));
        for entry in table.iter().map_err(backend)? {
            let (id, value) = entry.map_err(backend)?;
            let (expires_at, signer) = decode_seen(value.value())?;
            out.push((ManifestId(*id.value()), expires_at, signer));
        }
        Ok(out)
    }

    /// How many inbox entries and envelope bytes each sender has in the inbox (read once at
    /// start; the daemon keeps the counts current).
    pub fn inbox_usage(
        &self,
    ) -> Result<std::collections::HashMap<InstanceId, (u64, u64)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(INBOX).map_err(backend)?;
        let mut usage = std::collections::HashMap::<InstanceId, (u64, u64)>::new();
        for entry in table.iter().map_err(backend)? {
            let (_, value) = entry.map_err(backend)?;
            let (from, bytes) = inbox_sender(value.value())?;
            let u = usage.entry(from).or_default();
            u.0 += 1;
            u.1 += bytes;
        }
        Ok(usage)
    }

    /// A small value, if set.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(META).map_err(backend)?;
        Ok(table.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    /// Up to `limit` audit entries (sequence number, stored value) with a sequence number
    /// above `after`, in order, from one snapshot. Decode them with
    /// [`crate::audit::StoredEntry::decode`].
    pub fn audit_entries(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(AUDIT).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.range(after.saturating_add(1)..).map_err(backend)?.take(limit) {
            let (seq, value) = entry.map_err(backend)?;
            out.push((seq.value(), value.value().to_vec()));
        }
        Ok(out)
    }

    /// Verifies the whole audit log, as of one snapshot (a read transaction: appends made
    /// meanwhile are not seen), against `public_key` (this instance's Ed25519 key). The outer
    /// error is a store failure; the inner one names the first entry that breaks the chain.
    pub fn verify_audit(
        &self,
        keys: &[[u8; 32]],
    ) -> Result<Result<crate::audit::ChainSummary, crate::audit::AuditError>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(AUDIT).map_err(backend)?;
        let mut entries = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (seq, value) = entry.map_err(backend)?;
            entries.push((seq.value(), value.value().to_vec()));
        }
        Ok(crate::audit::verify_chain(entries, keys))
    }

    /// Up to `limit` inbox records with a sequence number above `after`, in order.
    pub fn inbox(&self, after: u64, limit: usize) -> Result<Vec<(u64, InboxRecord)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(INBOX).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.range(after.saturating_add(1)..).map_err(backend)?.take(limit) {
            let (seq, value) = entry.map_err(backend)?;
            let record = postcard::from_bytes(value.value())
                .map_err(|e| StoreError::Corrupt { table: "inbox", detail: e.to_string() })?;
            out.push((seq.value(), record));
        }
        Ok(out)
    }

    /// Every peer's latest capability ad (envelope bytes, verified when it was stored).
    pub fn peer_capabilities(&self) -> Result<Vec<(InstanceId, Vec<u8>)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(PEER_CAPS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let peer = InstanceId::from_bytes(key.value()).map_err(|e| StoreError::Corrupt {
                table: "peer_capabilities",
                detail: e.to_string(),
            })?;
            out.push((peer, value.value().to_vec()));
        }
        Ok(out)
    }

    /// The oldest outbox entries for `peer` with a sequence number above `after`: at most
    /// `limit` of them and, beyond the first, at most `max_bytes` in all.
    pub fn outbox_peek(
        &self,
        peer: &InstanceId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(OUTBOX).map_err(backend)?;
        let (start, end) = (outbox_key(peer, after.saturating_add(1)), outbox_key(peer, u64::MAX));
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in table.range(start.as_slice()..=end.as_slice()).map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            bytes += value.value().len();
            if out.len() >= limit || (!out.is_empty() && bytes > max_bytes) {
                break;
            }
            out.push((outbox_seq(key.value()), value.value().to_vec()));
        }
        Ok(out)
    }

    /// The signed `ResultManifest` envelope recorded for `job`, if its result arrived.
    pub fn result(&self, job: &JobId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RESULTS).map_err(backend)?;
        Ok(table.get(job.as_bytes().as_slice()).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    /// Every recorded result: job id and `ResultManifest` envelope, ordered by job id.
    pub fn results(&self) -> Result<Vec<(JobId, Vec<u8>)>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RESULTS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(backend)? {
            let (key, value) = entry.map_err(backend)?;
            let job = <[u8; 16]>::try_from(key.value()).map_err(|_| StoreError::Corrupt {
                table: "results",
                detail: format!("a key of {} bytes is not a job id", key.value().len()),
            })?;
            out.push((JobId::from_bytes(job), value.value().to_vec()));
        }
        Ok(out)
    }

    /// A job this node runs.
    pub fn runner_job(&self, id: &JobId) -> Result<Option<RunnerJobRecord>, StoreError> {
        self.get_job(RUNNER_JOBS, "runner_jobs", id.as_bytes())
    }

    /// Every job this node runs or ran.
    pub fn runner_jobs(&self) -> Result<Vec<RunnerJobRecord>, StoreError> {
        self.all_jobs(RUNNER_JOBS, "runner_jobs")
    }

    /// The signed manifest of a workflow this node submitted.
    pub fn workflow_manifest(&self, id: &WorkflowId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let t = txn.open_table(WORKFLOW_MANIFESTS).map_err(backend)?;
        Ok(t.get(id.as_bytes()).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    /// A value of a table keyed by a 16-byte id (runner jobs).
    fn get_job<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&[u8; 16], &[u8]>,
        name: &'static str,
        key: &[u8; 16],
    ) -> Result<Option<T>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let t = txn.open_table(table).map_err(backend)?;
        match t.get(key).map_err(backend)? {
            Some(v) => postcard::from_bytes(v.value())
                .map(Some)
                .map_err(|e| StoreError::Corrupt { table: name, detail: e.to_string() }),
            None => Ok(None),
        }
    }

    fn all_jobs<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&[u8; 16], &[u8]>,
        name: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let t = txn.open_table(table).map_err(backend)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            out.push(
                postcard::from_bytes(v.value())
                    .map_err(|e| StoreError::Corrupt { table: name, detail: e.to_string() })?,
            );
        }
        Ok(out)
    }

    /// A workflow this node owns, put together from its header and its jobs' records (from
    /// one snapshot).
    pub fn workflow(&self, id: &WorkflowId) -> Result<Option<WorkflowRecord>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let headers = txn.open_table(WORKFLOWS).map_err(backend)?;
        let jobs = txn.open_table(WORKFLOW_JOBS).map_err(backend)?;
        match headers.get(id.as_bytes()).map_err(backend)? {
            Some(v) => assemble_workflow(&jobs, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every workflow this node owns, ordered by id (from one snapshot).
    pub fn workflows(&self) -> Result<Vec<WorkflowRecord>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let headers = txn.open_table(WORKFLOWS).map_err(backend)?;
        let jobs = txn.open_table(WORKFLOW_JOBS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in headers.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            out.push(assemble_workflow(&jobs, v.value())?);
        }
        Ok(out)
    }

    /// Every registered dataset, ordered by name.
    pub fn datasets(&self) -> Result<Vec<DatasetRecord>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let t = txn.open_table(DATASETS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            out.push(decode_dataset(v.value())?);
        }
        Ok(out)
    }

    /// Every instance revoked here, by id.
    pub fn revocations(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let t = txn.open_table(REVOCATIONS).map_err(backend)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            out.push(postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                table: "revocations.v1",
                detail: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// How many entries wait for `peer`.
    pub fn outbox_depth(&self, peer: &InstanceId) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read().map_err(backend)?;
        let table = txn.open_table(OUTBOX).map_err(backend)?;
        let (start, end) = (outbox_key(peer, 0), outbox_key(peer, u64::MAX));
        let n = table.range(start.as_slice()..=end.as_slice()).map_err(backend)?.count();
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

/// A workflow from its header (a `workflows.v5` value) and its job records.
fn assemble_workflow(
    jobs: &impl ReadableTable<&'static [u8; 20], &'static [u8]>,
    header: &[u8],
) -> Result<WorkflowRecord, StoreError> {
    let header: WorkflowHeader = decode_workflow_value("workflows.v5", header)?;
    let id = header.workflow_id;
    let (start, end) = (workflow_job_key(&id, 0), workflow_job_key(&id, u32::MAX));
    let mut records = Vec::with_capacity(usize::try_from(header.job_count).unwrap_or(0));
    for (expected, entry) in (0u32..).zip(jobs.range::<&[u8; 20]>(&start..=&end).map_err(backend)?)
    {
        let (k, v) = entry.map_err(backend)?;
        if k.value()[16..] != expected.to_be_bytes() {
            return Err(StoreError::Corrupt {
                table: "workflow_jobs.v1",
                detail: format!("workflow {id} has no record of its job {expected}"),
            });
        }
        records.push(decode_workflow_value("workflow_jobs.v1", v.value())?);
    }
    WorkflowRecord::from_records(header, records)
        .map_err(|e| StoreError::Corrupt { table: "workflow_jobs.v1", detail: e.to_string() })
}

fn backend(e: impl fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn unexpected(op: &str, outcome: &WriteOutcome) -> StoreError {
    StoreError::Backend(format!("internal error: {op} was answered with {outcome:?}"))
}

fn encode_instance(inst: &RegisteredInstance) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(inst, vec![INSTANCE_SCHEMA_V1])
        .map_err(|e| StoreError::Backend(format!("cannot encode instance {}: {e}", inst.name)))
}

fn decode_instance(key: &[u8], value: &[u8]) -> Result<RegisteredInstance, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { table: INSTANCES_NAME, detail };
    let inst: RegisteredInstance = match value.split_first() {
        Some((&INSTANCE_SCHEMA_V1, rest)) => {
            postcard::from_bytes(rest).map_err(|e| corrupt(format!("instance record: {e}")))?
        }
        Some((version, _)) => {
            return Err(corrupt(format!(
                "instance record of schema version {version}, this version reads {INSTANCE_SCHEMA_V1}"
            )));
        }
        None => return Err(corrupt("empty instance record".into())),
    };
    if inst.instance_id.to_bytes() != key {
        return Err(corrupt(format!("instance record of {} under another key", inst.instance_id)));
    }
    Ok(inst)
}

/// The writer thread: group commit until every [`Store`] handle is gone.
fn run_writer(db: &Database, key: Option<&Identity>, mut queue: mpsc::Receiver<Request>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        commit_batch(db, key, batch);
    }
}

/// Commits `batch` in one transaction and answers each request. If that fails, retries each
/// request in its own transaction, so that only the failing ones fail.
fn commit_batch(db: &Database, key: Option<&Identity>, batch: Vec<Request>) {
    let ops: Vec<&[WriteOp]> = batch.iter().map(|r| r.ops.as_slice()).collect();
    match apply_and_commit(db, key, &ops) {
        Ok(outcomes) => {
            for (request, outcome) in batch.into_iter().zip(outcomes) {
                // A caller that stopped waiting still had its write committed.
                let _ = request.reply.send(Ok(outcome));
            }
        }
        Err(e) if batch.len() == 1 => {
            if let Some(request) = batch.into_iter().next() {
                let _ = request.reply.send(Err(e));
            }
        }
        Err(e) => {
            tracing::warn!(
                requests = batch.len(),
                error = %e,
                "group commit failed; retrying each request on its own"
            );
            for request in batch {
                let result = apply_and_commit(db, key, &[request.ops.as_slice()]).and_then(
                    |mut outcomes| {
                        outcomes.pop().ok_or(StoreError::Backend("no outcome for a request".into()))
                    },
                );
                let _ = request.reply.send(result);
            }
        }
    }
}

/// Applies every request's ops in one write transaction and commits it (durably).
fn apply_and_commit(
    db: &Database,
    key: Option<&Identity>,
    requests: &[&[WriteOp]],
) -> Result<Vec<Vec<WriteOutcome>>, StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    let mut outcomes = Vec::with_capacity(requests.len());
    {
        let mut tables = Tables::open(&txn, key)?;
        for ops in requests {
            let mut answers = Vec::with_capacity(ops.len());
            for op in *ops {
                answers.push(tables.apply(op)?);
            }
            outcomes.push(answers);
        }
    }
    // Default durability is `Immediate`: the commit returns once the file is fsynced. On any
    // error above, dropping `txn` aborts it.
    txn.commit().map_err(backend)?;
    Ok(outcomes)
}

/// The tables of one write transaction.
struct Tables<'txn> {
    instances: Table<'txn, &'static [u8], &'static [u8]>,
    seen: Table<'txn, &'static [u8; 32], &'static [u8]>,
    meta: Table<'txn, &'static str, &'static [u8]>,
    inbox: Table<'txn, u64, &'static [u8]>,
    peer_caps: Table<'txn, &'static [u8], &'static [u8]>,
    outbox: Table<'txn, &'static [u8], &'static [u8]>,
    outbox_seq: Table<'txn, &'static [u8], u64>,
    results: Table<'txn, &'static [u8], &'static [u8]>,
    runner_jobs: Table<'txn, &'static [u8; 16], &'static [u8]>,
    workflow_manifests: Table<'txn, &'static [u8; 16], &'static [u8]>,
    datasets: Table<'txn, &'static str, &'static [u8]>,
    workflows: Table<'txn, &'static [u8; 16], &'static [u8]>,
    workflow_jobs: Table<'txn, &'static [u8; 20], &'static [u8]>,
    audit: Table<'txn, u64, &'static [u8]>,
    revocations: Table<'txn, &'static [u8], &'static [u8]>,
    /// Signs audit entries (`None`: appending fails with [`AuditError::NoKey`]).
    ///
    /// [`AuditError::NoKey`]: crate::audit::AuditError::NoKey
    key: Option<&'txn Identity>,
}

impl<'txn> Tables<'txn> {
    /// Opens (creating if needed) every table.
    fn open(txn: &'txn WriteTransaction, key: Option<&'txn Identity>) -> Result<Self, StoreError> {
        Ok(Self {
            instances: txn.open_table(INSTANCES).map_err(backend)?,
            seen: txn.open_table(SEEN).map_err(backend)?,
            meta: txn.open_table(META).map_err(backend)?,
            inbox: txn.open_table(INBOX).map_err(backend)?,
            peer_caps: txn.open_table(PEER_CAPS).map_err(backend)?,
            outbox: txn.open_table(OUTBOX).map_err(backend)?,
            outbox_seq: txn.open_table(OUTBOX_SEQ).map_err(backend)?,
            results: txn.open_table(RESULTS).map_err(backend)?,
            runner_jobs: txn.open_table(RUNNER_JOBS).map_err(backend)?,
            workflow_manifests: txn.open_table(WORKFLOW_MANIFESTS).map_err(backend)?,
            datasets: txn.open_table(DATASETS).map_err(backend)?,
            workflows: txn.open_table(WORKFLOWS).map_err(backend)?,
            workflow_jobs: txn.open_table(WORKFLOW_JOBS).map_err(backend)?,
            audit: txn.open_table(AUDIT).map_err(backend)?,
            revocations: txn.open_table(REVOCATIONS).map_err(backend)?,
            key,
        })
    }

    fn apply(&mut self, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
        match op {
            WriteOp::PutInstance(inst) => {
                let value = encode_instance(inst)?;
                let key = inst.instance_id.to_bytes();
                self.instances.insert(key.as_slice(), value.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::RemoveInstance(id) => {
                let key = id.to_bytes();
                let removed = match self.instances.remove(key.as_slice()).map_err(backend)? {
                    Some(old) => Some(Box::new(decode_instance(&key, old.value())?)),
                    None => None,
                };
                Ok(WriteOutcome::Removed(removed))
            }
            WriteOp::RecordSeen(ids) => {
                for (id, expires_at) in ids {
                    let value = encode_seen(*expires_at, None);
                    self.seen.insert(id.as_bytes(), value.as_slice()).map_err(backend)?;
                }
                Ok(WriteOutcome::Done)
            }
            WriteOp::RecordSeenFrom(ids) => {
                for (signer, id, expires_at) in ids {
                    let value = encode_seen(*expires_at, Some(signer));
                    self.seen.insert(id.as_bytes(), value.as_slice()).map_err(backend)?;
                }
                Ok(WriteOutcome::Done)
            }
            WriteOp::PruneSeen(now) => {
                let now = now.as_millis();
                let before = self.seen.len().map_err(backend)?;
                // A value too short to hold an expiry is dropped with the expired ones.
                self.seen
                    .retain(|_, v| {
                        v.get(..8)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                            .is_some_and(|b| u64::from_be_bytes(b) > now)
                    })
                    .map_err(backend)?;
                let after = self.seen.len().map_err(backend)?;
                Ok(WriteOutcome::Pruned(
                    usize::try_from(before.saturating_sub(after)).unwrap_or(usize::MAX),
                ))
            }
            WriteOp::PutMeta { key, value } => {
                self.meta.insert(key.as_str(), value.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::AppendInbox(records) => {
                let first = match self.inbox.last().map_err(backend)? {
                    Some((seq, _)) => seq.value() + 1,
                    None => 1,
                };
                for (seq, r) in (first..).zip(records) {
                    let value = postcard::to_allocvec(r).map_err(backend)?;
                    self.inbox.insert(seq, value.as_slice()).map_err(backend)?;
                }
                Ok(WriteOutcome::Done)
            }
            WriteOp::PruneInbox { before, limit } => {
                let mut removed = Vec::new();
                let mut last = None;
                for entry in self.inbox.iter().map_err(backend)?.take(*limit) {
                    let (seq, value) = entry.map_err(backend)?;
                    let r: InboxRecord = postcard::from_bytes(value.value()).map_err(|e| {
                        StoreError::Corrupt { table: "inbox", detail: e.to_string() }
                    })?;
                    if r.received_at > *before {
                        break;
                    }
                    last = Some(seq.value());
                    removed.push((r.from, r.envelope.len() as u64));
                }
                if let Some(last) = last {
                    self.inbox.retain_in(..=last, |_, _| false).map_err(backend)?;
                }
                let mut per_peer: Vec<(InstanceId, u64, u64)> = Vec::new();
                for (from, bytes) in removed {
                    match per_peer.iter_mut().find(|(p, _, _)| *p == from) {
                        Some(e) => {
                            e.1 += 1;
                            e.2 += bytes;
                        }
                        None => per_peer.push((from, 1, bytes)),
                    }
                }
                Ok(WriteOutcome::InboxPruned(per_peer))
            }
            WriteOp::PutPeerCapabilities { peer, envelope } => {
                let key = peer.to_bytes();
                self.peer_caps.insert(key.as_slice(), envelope.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::EnqueueOutbox { peer, envelopes } => {
                let id = peer.to_bytes();
                let last = self.outbox_seq.get(id.as_slice()).map_err(backend)?.map(|v| v.value());
                let first = last.map_or(1, |s| s + 1);
                let mut next = first;
                for (seq, e) in (first..).zip(envelopes) {
                    let key = outbox_key(peer, seq);
                    self.outbox.insert(key.as_slice(), e.as_slice()).map_err(backend)?;
                    next = seq;
                }
                if !envelopes.is_empty() {
                    self.outbox_seq.insert(id.as_slice(), next).map_err(backend)?;
                }
                Ok(WriteOutcome::Done)
            }
            WriteOp::AckOutbox { peer, seqs } => {
                for seq in seqs {
                    self.outbox.remove(outbox_key(peer, *seq).as_slice()).map_err(backend)?;
                }
                Ok(WriteOutcome::Done)
            }
            WriteOp::ForgetPeer(peer) => {
                let (start, end) = (outbox_key(peer, 0), outbox_key(peer, u64::MAX));
                self.outbox
                    .retain_in(start.as_slice()..=end.as_slice(), |_, _| false)
                    .map_err(backend)?;
                self.peer_caps.remove(peer.to_bytes().as_slice()).map_err(backend)?;
                self.outbox_seq.remove(peer.to_bytes().as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutRunnerJob(r) => {
                let value = postcard::to_allocvec(r.as_ref()).map_err(backend)?;
                self.runner_jobs
                    .insert(r.job.job_id.as_bytes(), value.as_slice())
                    .map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutResult { job, envelope } => {
                let key = job.as_bytes().as_slice();
                self.results.insert(key, envelope.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutDataset(d) => {
                let value = encode_dataset(d)?;
                self.datasets.insert(d.name.as_str(), value.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::RemoveDataset(name) => {
                self.datasets.remove(name.as_str()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutWorkflow(w) => {
                put_whole_workflow(&mut self.workflows, &mut self.workflow_jobs, w)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutWorkflowHeader(h) => {
                let value = encode_workflow_value(h.as_ref())?;
                self.workflows
                    .insert(h.workflow_id.as_bytes(), value.as_slice())
                    .map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutWorkflowJob { workflow, index, job } => {
                let value = encode_workflow_value(job.as_ref())?;
                let key = workflow_job_key(workflow, *index);
                self.workflow_jobs.insert(&key, value.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutWorkflowManifest { workflow, envelope } => {
                let key = workflow.as_bytes();
                self.workflow_manifests.insert(key, envelope.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::PutRevocation(r) => {
                let value = postcard::to_allocvec(r.as_ref()).map_err(backend)?;
                let key = r.instance_id.to_bytes();
                self.revocations.insert(key.as_slice(), value.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Done)
            }
            WriteOp::Audit(record) => {
                let key = self.key.ok_or(crate::audit::AuditError::NoKey)?;
                let last = self.audit.last().map_err(backend)?;
                let last = last.map(|(k, v)| (k.value(), v.value().to_vec()));
                let last = last.as_ref().map(|(k, v)| (*k, v.as_slice()));
                let (seq, value) = crate::audit::seal(last, record, key.signing_key())?;
                self.audit.insert(seq, value.as_slice()).map_err(backend)?;
                Ok(WriteOutcome::Audited(seq))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::thread::{self, Thread};

    use kaapana_federation::{AllowList, Execution, Policy};

    use super::*;

    fn id(n: u16) -> InstanceId {
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&n.to_be_bytes());
        bytes.extend_from_slice(&[7; 30]);
        InstanceId::from_bytes(&bytes).unwrap()
    }

    fn inst(n: u16) -> RegisteredInstance {
        RegisteredInstance {
            instance_id: id(n),
            name: format!("site-{n}"),
            certificate_der: vec![0x30, 0x82, 1, 2, 3],
            fingerprint: [9; 32],
            listen_addrs: vec!["/ip4/10.0.0.1/udp/4433/quic-v1".into()],
            certificate_not_after: Timestamp::from_millis(2_000_000_000_000),
            registered_at: Timestamp::from_millis(1_700_000_000_000 + u64::from(n)),
            policy: Policy {
                allowed_workflows: AllowList::only(["totalsegmentator"]),
                allowed_datasets: AllowList::Any,
                execution: Execution::Automatic,
                share_logs: true,
            },
        }
    }

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("sub/dir/node.redb")).unwrap();
        (dir, store)
    }

    /// Writes a raw value into the instances table, bypassing the encoder.
    fn put_raw(store: &Store, key: &[u8], value: &[u8]) {
        let txn = store.inner.db.begin_write().unwrap();
        txn.open_table(INSTANCES).unwrap().insert(key, value).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn instances_round_trip_and_survive_reopen() {
        let (dir, store) = temp_store();
        let path = store.path().to_owned();
        assert_eq!(store.instances().unwrap(), vec![]);
        store.put_instance(&inst(1)).unwrap();
        store.put_instance(&inst(2)).unwrap();
        assert_eq!(store.instance(&id(1)).unwrap(), Some(inst(1)));
        assert_eq!(store.instance(&id(3)).unwrap(), None);
        assert_eq!(store.remove_instance(&id(2)).unwrap(), Some(inst(2)));
        assert_eq!(store.remove_instance(&id(2)).unwrap(), None);
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.instances().unwrap(), vec![inst(1)]);
        let registry = store.load_registry().unwrap();
        assert_eq!(registry.len(), 1);
        assert!(registry.is_registered(&id(1)));
        drop(dir);
    }

    #[test]
    fn second_open_is_refused_as_locked() {
        let (_dir, store) = temp_store();
        let err = Store::open(store.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(err.to_string().starts_with("another kaapana-node process is using "), "{err}");
        // A clone shares the open database.
        let clone = store.clone();
        clone.put_meta("k", b"v").unwrap();
        assert_eq!(store.meta("k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(store.meta("missing").unwrap(), None);
    }

    #[test]
    fn seen_ids_are_recorded_and_pruned() {
        let (_dir, store) = temp_store();
        let t = Timestamp::from_millis;
        let m = |n: u8| ManifestId([n; 32]);
        store.record_seen(vec![(m(1), t(100)), (m(2), t(200)), (m(3), t(300))]).unwrap();
        assert_eq!(store.seen_ids().unwrap(), vec![(m(1), t(100)), (m(2), t(200)), (m(3), t(300))]);
        assert_eq!(store.prune_seen(t(99)).unwrap(), 0);
        // Expiring exactly at `now` counts as expired, as in ReplayWindow::prune.
        assert_eq!(store.prune_seen(t(200)).unwrap(), 2);
        assert_eq!(store.seen_ids().unwrap(), vec![(m(3), t(300))]);
        // With a signer: kept with it.
        let peer = id(7);
        store.write(vec![WriteOp::RecordSeenFrom(vec![(peer, m(4), t(400))])]).unwrap();
        assert_eq!(
            store.seen_ids_with_signers().unwrap(),
            vec![(m(3), t(300), None), (m(4), t(400), Some(peer))]
        );
    }

    #[test]
    fn old_inbox_entries_are_pruned_and_counted_per_sender() {
        let (_dir, store) = temp_store();
        let t = Timestamp::from_millis;
        let rec = |from: u16, at: u64, len: usize| InboxRecord {
            from: id(from),
            received_at: t(at),
            envelope: vec![0; len],
        };
        let records = vec![rec(1, 10, 5), rec(2, 20, 7), rec(1, 30, 11), rec(1, 40, 13)];
        store.write(vec![WriteOp::AppendInbox(records)]).unwrap();
        let usage = store.inbox_usage().unwrap();
        assert_eq!((usage[&id(1)], usage[&id(2)]), ((3, 29), (1, 7)));
        let pruned = store.write(vec![WriteOp::PruneInbox { before: t(30), limit: 100 }]).unwrap();
        assert_eq!(pruned, vec![WriteOutcome::InboxPruned(vec![(id(1), 2, 16), (id(2), 1, 7)])]);
        let left: Vec<u64> = store
            .inbox(0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.received_at.as_millis())
            .collect();
        assert_eq!(left, vec![40]);
        // The limit bounds one op's work.
        let again = store.write(vec![WriteOp::PruneInbox { before: t(50), limit: 0 }]).unwrap();
        assert_eq!(again, vec![WriteOutcome::InboxPruned(vec![])]);
        assert_eq!(store.inbox_usage().unwrap()[&id(1)], (1, 13));
    }

    #[test]
    fn undecodable_values_are_reported_as_corrupt() {
        let (_dir, store) = temp_store();
        let key = id(5).to_bytes();
        put_raw(&store, &key, &[9, 1, 2, 3]);
        let err = store.instance(&id(5)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { table: "instances", .. }), "{err:?}");
        assert!(err.to_string().contains("schema version 9"), "{err}");
        assert!(store.load_registry().is_err());
        // A record stored under another instance's key is refused too.
        let mut value = vec![INSTANCE_SCHEMA_V1];
        value.extend(postcard::to_allocvec(&inst(6)).unwrap());
        put_raw(&store, &key, &value);
        assert!(matches!(store.instances(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn a_failing_request_does_not_fail_its_batch() {
        let (_dir, store) = temp_store();
        put_raw(&store, &id(5).to_bytes(), &[]);
        let mut answers = Vec::new();
        let batch = [
            vec![WriteOp::PutInstance(Box::new(inst(1)))],
            // Removing the undecodable record fails; the put before it in the same request
            // must be rolled back with it.
            vec![WriteOp::PutInstance(Box::new(inst(2))), WriteOp::RemoveInstance(id(5))],
            vec![WriteOp::PutMeta { key: "k".into(), value: b"v".to_vec() }],
        ]
        .into_iter()
        .map(|ops| {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            Request { ops, reply }
        })
        .collect();
        commit_batch(&store.inner.db, None, batch);
        let results: Vec<_> = answers.into_iter().map(|a| a.blocking_recv().unwrap()).collect();
        assert_eq!(results[0].as_ref().unwrap(), &vec![WriteOutcome::Done]);
        assert!(matches!(results[1], Err(StoreError::Corrupt { .. })), "{:?}", results[1]);
        assert_eq!(results[2].as_ref().unwrap(), &vec![WriteOutcome::Done]);
        assert_eq!(store.instance(&id(1)).unwrap(), Some(inst(1)));
        assert_eq!(store.instance(&id(2)).unwrap(), None);
        assert!(store.instance(&id(5)).is_err(), "the failed removal changed nothing");
        assert_eq!(store.meta("k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn concurrent_writers_are_all_committed() {
        let (_dir, store) = temp_store();
        let threads: Vec<_> = (0..16u16)
            .map(|t| {
                let store = store.clone();
                thread::spawn(move || {
                    for i in 0..20 {
                        store.put_instance(&inst(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(store.instances().unwrap().len(), 16 * 20);
        assert_eq!(store.load_registry().unwrap().len(), 16 * 20);
    }

    /// Polls a future to completion on this thread (the node has no runtime in its tests).
    fn block_on<F: Future>(fut: F) -> F::Output {
        struct Unpark(Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        loop {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
            thread::park();
        }
    }

    #[test]
    fn async_writes_are_atomic_requests() {
        let (_dir, store) = temp_store();
        let outcomes = block_on(store.write_async(vec![
            WriteOp::PutInstance(Box::new(inst(1))),
            WriteOp::RecordSeen(vec![(ManifestId([1; 32]), Timestamp::from_millis(10))]),
            WriteOp::RemoveInstance(id(1)),
            WriteOp::PruneSeen(Timestamp::from_millis(10)),
        ]))
        .unwrap();
        assert_eq!(
            outcomes,
            vec![
                WriteOutcome::Done,
                WriteOutcome::Done,
                WriteOutcome::Removed(Some(Box::new(inst(1)))),
                WriteOutcome::Pruned(1),
            ]
        );
        assert!(store.instances().unwrap().is_empty());
    }

    #[test]
    fn audit_entries_commit_with_their_change_and_chain_across_reopens() {
        use crate::audit::{AuditError, AuditKind, AuditRecord};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let identity = Identity::generate().unwrap();
        let public = identity.public_key();
        let key_file = dir.path().join("key.pem");
        identity.save(&key_file).unwrap();
        let record = |n: u16| AuditRecord::now(AuditKind::InstanceAdded, id(n), format!("n{n}"));
        {
            let store = Store::open_audited(&path, identity).unwrap();
            let out = store
                .write(vec![WriteOp::PutInstance(Box::new(inst(1))), WriteOp::Audit(record(1))])
                .unwrap();
            assert_eq!(out[1], WriteOutcome::Audited(1));
            store.write(vec![WriteOp::Audit(record(2))]).unwrap();
        }
        // Without the key: reading and verifying work, appending fails and takes the request's
        // other ops with it.
        let store = Store::open(&path).unwrap();
        let e = store
            .write(vec![WriteOp::PutInstance(Box::new(inst(3))), WriteOp::Audit(record(3))])
            .unwrap_err();
        assert!(matches!(e, StoreError::Audit(AuditError::NoKey)), "{e}");
        assert!(store.instance(&id(3)).unwrap().is_none());
        assert!(store.instance(&id(1)).unwrap().is_some());
        let summary = store.verify_audit(&[public]).unwrap().unwrap();
        assert_eq!((summary.entries, summary.last_seq), (2, 2));
        let listed = store.audit_entries(1, 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(crate::audit::AuditEntryView::of(listed[0].0, &listed[0].1).detail, "n2");
        drop(store);
        // Reopened with the key: the chain continues at 3.
        let store = Store::open_audited(&path, Identity::load(&key_file).unwrap()).unwrap();
        assert_eq!(
            store.write(vec![WriteOp::Audit(record(4))]).unwrap(),
            [WriteOutcome::Audited(3)]
        );
        assert_eq!(store.verify_audit(&[public]).unwrap().unwrap().entries, 3);
    }

    #[test]
    fn results_are_kept_per_job_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        let (a, b) = (JobId::from_bytes([1; 16]), JobId::from_bytes([2; 16]));
        assert_eq!(store.result(&a).unwrap(), None);
        store
            .write(vec![
                WriteOp::PutResult { job: b, envelope: vec![2] },
                WriteOp::PutResult { job: a, envelope: vec![1] },
                WriteOp::PutResult { job: a, envelope: vec![1, 1] },
            ])
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.result(&a).unwrap(), Some(vec![1, 1]));
        assert_eq!(store.results().unwrap(), vec![(a, vec![1, 1]), (b, vec![2])]);
    }

    #[test]
    fn outbox_keeps_order_and_sequence_numbers_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (a, b) = (id(1), id(2));
        let env = |n: u8| vec![n; 3];
        store
            .write(vec![
                WriteOp::EnqueueOutbox { peer: a, envelopes: vec![env(1), env(2), env(3)] },
                WriteOp::EnqueueOutbox { peer: b, envelopes: vec![env(9)] },
            ])
            .unwrap();
        let peek = store.outbox_peek(&a, 0, 10, 1 << 20).unwrap();
        assert_eq!(peek, vec![(1, env(1)), (2, env(2)), (3, env(3))]);
        assert_eq!(store.outbox_peek(&a, 1, 1, 1 << 20).unwrap(), vec![(2, env(2))]);
        assert_eq!(store.outbox_depth(&b).unwrap(), 1);
        store.write(vec![WriteOp::AckOutbox { peer: a, seqs: vec![1, 2, 3] }]).unwrap();
        assert_eq!(store.outbox_depth(&a).unwrap(), 0);
        // An emptied outbox does not reuse numbers: a delivery cursor stays valid.
        store.write(vec![WriteOp::EnqueueOutbox { peer: a, envelopes: vec![env(4)] }]).unwrap();
        assert_eq!(store.outbox_peek(&a, 3, 10, 1 << 20).unwrap(), vec![(4, env(4))]);
        drop(store);
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(store.outbox_peek(&a, 0, 10, 1 << 20).unwrap(), vec![(4, env(4))]);
        store.write(vec![WriteOp::ForgetPeer(a)]).unwrap();
        assert_eq!(store.outbox_depth(&a).unwrap(), 0);
        assert_eq!(store.outbox_depth(&b).unwrap(), 1);
    }

    /// A workflow of `jobs` single-file jobs, as the core would hold it.
    fn workflow(n: u8, jobs: u32) -> WorkflowRecord {
        use kaapana_federation::{Step, WorkflowJob, WorkflowState};
        use kaapana_protocol::{
            ContainerWork, ImageDigest, JobSpec, JobState, Processing, ResourceLimits,
            RunnerSelector, Sha256Digest, Work,
        };
        let wid = WorkflowId::from_bytes([n; 16]);
        let spec = JobSpec {
            name: "item".into(),
            runner: RunnerSelector::Owner,
            dataset: Some("lung-ct".into()),
            processing: Processing::SingleFile { max_parallel: 2 },
            work: Work::Container(ContainerWork {
                image: ImageDigest(Sha256Digest::of(b"img")),
                command: vec!["run".into()],
                env: vec![],
            }),
            limits: ResourceLimits::default(),
            timeout_secs: 60,
            inputs: vec![],
            max_retries: 1,
        };
        let header = WorkflowHeader {
            workflow_id: wid,
            name: format!("wf-{n}"),
            owner: id(1),
            owner_name: "site-1".into(),
            state: WorkflowState::Running,
            reason: None,
            created_at: Timestamp::from_millis(10),
            ended_at: None,
            steps: vec![Step {
                spec,
                dataset: Some("lung-ct".into()),
                inputs: vec![],
                external: vec![],
                round: None,
            }],
            training: None,
            job_count: jobs,
        };
        let jobs = (0..jobs)
            .map(|k| {
                let name = format!("item-{}", k + 1);
                WorkflowJob {
                    job_id: kaapana_federation::job_id(&wid, &name, 0),
                    step: 0,
                    name,
                    runner: id(1),
                    runner_name: "site-1".into(),
                    item: Some(kaapana_protocol::ItemToken([u8::try_from(k % 256).unwrap(); 32])),
                    attempt: 0,
                    dispatched: k < 2,
                    state: JobState::Queued,
                    reason: None,
                    result: None,
                    previous: vec![],
                    previous_runners: vec![],
                    retryable: false,
                    last_sequence: 0,
                    updated_at: Timestamp::from_millis(10),
                    samples: None,
                }
            })
            .collect();
        WorkflowRecord::from_records(header, jobs).unwrap()
    }

    #[test]
    fn workflows_are_stored_per_job_and_read_back_whole() {
        use kaapana_federation::WorkflowState;
        use kaapana_protocol::JobState;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = Store::open(&path).unwrap();
        let (mut a, b) = (workflow(2, 300), workflow(1, 3));
        store
            .write(vec![
                WriteOp::PutWorkflow(Box::new(a.clone())),
                WriteOp::PutWorkflow(Box::new(b.clone())),
            ])
            .unwrap();
        assert_eq!(store.workflow(&a.workflow_id).unwrap().as_ref(), Some(&a));
        assert_eq!(store.workflow(&WorkflowId::from_bytes([9; 16])).unwrap(), None);
        // One job changes: only its record is written; the others read back as they were.
        a.jobs[257].state = JobState::Running;
        a.jobs[257].last_sequence = 2;
        let job = Box::new(a.jobs[257].clone());
        store
            .write(vec![WriteOp::PutWorkflowJob { workflow: a.workflow_id, index: 257, job }])
            .unwrap();
        assert_eq!(store.workflow(&a.workflow_id).unwrap().as_ref(), Some(&a));
        // The workflow's own fields change: its jobs stay.
        a.state = WorkflowState::Cancelled;
        a.reason = Some("cancelled by admin".into());
        store.write(vec![WriteOp::PutWorkflowHeader(Box::new(a.header()))]).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.workflows().unwrap(), vec![b, a]);
    }

    #[test]
    fn a_workflow_missing_a_job_record_is_reported_as_corrupt() {
        let (_dir, store) = temp_store();
        let mut w = workflow(3, 4);
        let header = {
            let mut h = w.header();
            h.job_count = 5;
            h
        };
        w.jobs.truncate(4);
        store
            .write(vec![
                WriteOp::PutWorkflow(Box::new(w)),
                WriteOp::PutWorkflowHeader(Box::new(header)),
            ])
            .unwrap();
        let err = store.workflows().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { table: "workflow_jobs.v1", .. }), "{err}");
        assert!(err.to_string().contains("5 jobs, but 4 job records"), "{err}");
    }

    #[test]
    fn workflows_of_a_v4_store_are_split_into_header_and_job_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (a, b) = (workflow(4, 25), workflow(5, 1));
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(WORKFLOWS_V4).unwrap();
                for w in [&a, &b] {
                    let value = postcard::to_allocvec(w).unwrap();
                    t.insert(w.workflow_id.as_bytes(), value.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.workflows().unwrap(), vec![a.clone(), b]);
        {
            use redb::TableHandle;
            let txn = store.inner.db.begin_read().unwrap();
            assert!(!txn.list_tables().unwrap().any(|t| t.name() == "workflows.v4"));
            let jobs = txn.open_table(WORKFLOW_JOBS).unwrap();
            assert_eq!(jobs.len().unwrap(), 26, "one record per job");
        }
        // The migrated workflow takes job writes like any other, and reopening migrates
        // nothing again.
        let mut a = a;
        a.jobs[24].reason = Some("x".into());
        let job = Box::new(a.jobs[24].clone());
        store
            .write(vec![WriteOp::PutWorkflowJob { workflow: a.workflow_id, index: 24, job }])
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.workflow(&a.workflow_id).unwrap(), Some(a));
    }

    #[test]
    fn datasets_of_an_older_store_move_to_the_versioned_table() {
        #[derive(serde::Serialize)]
        struct V1 {
            name: String,
            provider: String,
            location: String,
            added_at: Timestamp,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(DATASETS_V1).unwrap();
                let v1 = V1 {
                    name: "lung-ct".into(),
                    provider: "directory".into(),
                    location: "/data/lung-ct".into(),
                    added_at: Timestamp::from_millis(5),
                };
                t.insert("lung-ct", postcard::to_allocvec(&v1).unwrap().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let expected = DatasetRecord {
            name: "lung-ct".into(),
            provider: "directory".into(),
            location: "/data/lung-ct".into(),
            added_at: Timestamp::from_millis(5),
            dicomweb: None,
        };
        assert_eq!(store.datasets().unwrap(), vec![expected.clone()]);
        // A DICOMweb dataset's definition round-trips, and the old table is gone.
        let pacs = DatasetRecord {
            name: "chest".into(),
            provider: "dicomweb".into(),
            location: "http://pacs/dicom-web".into(),
            added_at: Timestamp::from_millis(6),
            dicomweb: Some(DicomWebDefinition {
                credentials: crate::pacs::PacsCredentials::Bearer { token_file: "/t".into() },
                selection: "query Modality=CT".into(),
                series: vec![PacsSeries {
                    series_uid: "1.2.3".into(),
                    study_uid: "1.2".into(),
                    modality: "CT".into(),
                    instances: 2,
                    bytes: 1 << 20,
                }],
            }),
        };
        store.write(vec![WriteOp::PutDataset(pacs.clone())]).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.datasets().unwrap(), vec![pacs, expected]);
        let txn = store.inner.db.begin_read().unwrap();
        use redb::TableHandle;
        assert!(!txn.list_tables().unwrap().any(|t| t.name() == "datasets"));
    }
}
