//! Replay protection: ids of accepted messages, kept until the messages expire.

use std::collections::{BTreeSet, HashMap};

use crate::error::VerifyError;
use crate::ids::{InstanceId, ManifestId};
use crate::time::Timestamp;

/// The ids of messages already accepted, each kept until its message's `expires_at`.
///
/// After that the message itself is rejected as expired, so the id can be forgotten: memory is
/// bounded by the message rate times the longest accepted lifetime, and by `capacity`. Ids
/// recorded with their signer ([`ReplayWindow::insert_from`]) are also bounded per signer, so
/// that one instance cannot fill the window for everyone. A full window never forgets an
/// unexpired id: it refuses the new one ([`VerifyError::ReplayWindowFull`],
/// [`VerifyError::SignerWindowFull`]) until ids expire.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Id → (expiry, index into `signers`, if known).
    seen: HashMap<ManifestId, (Timestamp, Option<u32>)>,
    by_expiry: BTreeSet<(Timestamp, ManifestId)>,
    capacity: usize,
    per_signer: usize,
    /// Signers by index (ids keep a small index instead of the whole `InstanceId`).
    signers: Vec<InstanceId>,
    signer_index: HashMap<InstanceId, u32>,
    /// Unexpired ids per signer index.
    counts: HashMap<u32, usize>,
}

impl ReplayWindow {
    /// The default number of unexpired ids kept.
    pub const DEFAULT_CAPACITY: usize = 1 << 20;

    /// An empty window holding at most `capacity` unexpired ids (as many from one signer).
    pub fn with_capacity(capacity: usize) -> Self {
        Self::with_limits(capacity, capacity)
    }

    /// An empty window holding at most `capacity` unexpired ids, at most `per_signer` of them
    /// recorded with the same signer.
    pub fn with_limits(capacity: usize, per_signer: usize) -> Self {
        Self {
            seen: HashMap::new(),
            by_expiry: BTreeSet::new(),
            capacity,
            per_signer,
            signers: Vec::new(),
            signer_index: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    /// Whether `id` was accepted and has not expired (as of the last pruning).
    pub fn contains(&self, id: &ManifestId) -> bool {
        self.seen.contains_key(id)
    }

    /// Records `id` until `expires_at`. Fails with [`VerifyError::Replayed`] if it is already
    /// there, and with [`VerifyError::ReplayWindowFull`] if no room is left after dropping
    /// the ids that expired before `now`.
    pub fn insert(
        &mut self,
        id: ManifestId,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), VerifyError> {
        self.insert_tagged(None, id, expires_at, now)
    }

    /// [`ReplayWindow::insert`] for a message of `signer`; also fails with
    /// [`VerifyError::SignerWindowFull`] if `signer` has its share of unexpired ids already.
    pub fn insert_from(
        &mut self,
        signer: InstanceId,
        id: ManifestId,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), VerifyError> {
        self.insert_tagged(Some(signer), id, expires_at, now)
    }

    fn insert_tagged(
        &mut self,
        signer: Option<InstanceId>,
        id: ManifestId,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), VerifyError> {
        if self.seen.contains_key(&id) {
            return Err(VerifyError::Replayed { id });
        }
        let index = signer.map(|s| self.index_of(s));
        let held = |w: &Self| index.and_then(|i| w.counts.get(&i).copied()).unwrap_or(0);
        if self.seen.len() >= self.capacity || held(self) >= self.per_signer {
            self.prune(now);
            if self.seen.len() >= self.capacity {
                return Err(VerifyError::ReplayWindowFull { capacity: self.capacity });
            }
            if let Some(signer) = signer.filter(|_| held(self) >= self.per_signer) {
                return Err(VerifyError::SignerWindowFull { signer, capacity: self.per_signer });
            }
        }
        self.add(id, expires_at, index);
        Ok(())
    }

    /// Restores an id from durable storage (no capacity check: what was accepted stays known).
    pub fn restore(&mut self, id: ManifestId, expires_at: Timestamp) {
        self.restore_tagged(None, id, expires_at);
    }

    /// [`ReplayWindow::restore`] of an id recorded with its signer (counted in its share).
    pub fn restore_from(&mut self, signer: InstanceId, id: ManifestId, expires_at: Timestamp) {
        self.restore_tagged(Some(signer), id, expires_at);
    }

    fn restore_tagged(&mut self, signer: Option<InstanceId>, id: ManifestId, at: Timestamp) {
        if !self.seen.contains_key(&id) {
            let index = signer.map(|s| self.index_of(s));
            self.add(id, at, index);
        }
    }

    fn index_of(&mut self, signer: InstanceId) -> u32 {
        if let Some(&i) = self.signer_index.get(&signer) {
            return i;
        }
        let i = u32::try_from(self.signers.len()).unwrap_or(u32::MAX);
        self.signers.push(signer);
        self.signer_index.insert(signer, i);
        i
    }

    fn add(&mut self, id: ManifestId, expires_at: Timestamp, index: Option<u32>) {
        self.seen.insert(id, (expires_at, index));
        self.by_expiry.insert((expires_at, id));
        if let Some(i) = index {
            *self.counts.entry(i).or_default() += 1;
        }
    }

    fn uncount(&mut self, index: Option<u32>) {
        if let Some(i) = index
            && let Some(n) = self.counts.get_mut(&i)
        {
            *n = n.saturating_sub(1);
        }
    }

    /// Forgets one id, e.g. when recording the message it belongs to failed.
    pub fn forget(&mut self, id: &ManifestId) {
        if let Some((expires_at, index)) = self.seen.remove(id) {
            self.by_expiry.remove(&(expires_at, *id));
            self.uncount(index);
        }
    }

    /// Forgets the ids whose messages expired at or before `now`; returns them, so that a
    /// durable copy can be pruned too.
    pub fn prune(&mut self, now: Timestamp) -> Vec<ManifestId> {
        let mut dropped = Vec::new();
        while let Some(&(exp, id)) = self.by_expiry.first() {
            if exp > now {
                break;
            }
            self.by_expiry.pop_first();
            if let Some((_, index)) = self.seen.remove(&id) {
                self.uncount(index);
            }
            dropped.push(id);
        }
        dropped
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// How many unexpired ids of `signer` are held (as of the last pruning).
    pub fn held_from(&self, signer: &InstanceId) -> usize {
        self.signer_index.get(signer).and_then(|i| self.counts.get(i)).copied().unwrap_or(0)
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ManifestId {
        ManifestId([n; 32])
    }

    #[test]
    fn remembers_until_expiry() {
        let mut w = ReplayWindow::with_capacity(10);
        let t = Timestamp::from_millis;
        w.insert(id(1), t(100), t(0)).unwrap();
        assert_eq!(w.insert(id(1), t(100), t(50)), Err(VerifyError::Replayed { id: id(1) }));
        assert_eq!(w.prune(t(99)), vec![]);
        assert_eq!(w.prune(t(100)), vec![id(1)]);
        assert!(!w.contains(&id(1)));
    }

    #[test]
    fn full_window_refuses_until_ids_expire() {
        let mut w = ReplayWindow::with_capacity(2);
        let t = Timestamp::from_millis;
        w.insert(id(1), t(10), t(0)).unwrap();
        w.insert(id(2), t(20), t(0)).unwrap();
        assert_eq!(
            w.insert(id(3), t(30), t(5)),
            Err(VerifyError::ReplayWindowFull { capacity: 2 })
        );
        // Once id 1 expires there is room again.
        w.insert(id(3), t(30), t(10)).unwrap();
        assert_eq!(w.len(), 2);
        assert!(w.contains(&id(2)) && w.contains(&id(3)));
    }

    #[test]
    fn one_signer_gets_its_share_and_no_more() {
        let key = || {
            let pkcs8 = crate::key::SigningKey::generate_pkcs8().unwrap();
            crate::key::SigningKey::from_pkcs8(&pkcs8).unwrap().instance_id()
        };
        let (a, b) = (key(), key());
        let mut w = ReplayWindow::with_limits(10, 2);
        let t = Timestamp::from_millis;
        w.insert_from(a, id(1), t(10), t(0)).unwrap();
        w.insert_from(a, id(2), t(20), t(0)).unwrap();
        assert_eq!(
            w.insert_from(a, id(3), t(30), t(5)),
            Err(VerifyError::SignerWindowFull { signer: a, capacity: 2 })
        );
        // Another signer is not affected, and a replay is still recognised.
        w.insert_from(b, id(4), t(30), t(5)).unwrap();
        assert_eq!(w.insert_from(a, id(1), t(10), t(5)), Err(VerifyError::Replayed { id: id(1) }));
        // Once one of a's ids expires, a has room again; restored ids count too.
        w.insert_from(a, id(3), t(30), t(10)).unwrap();
        assert_eq!(w.held_from(&a), 2);
        w.forget(&id(3));
        w.restore_from(a, id(5), t(40));
        assert_eq!(w.held_from(&a), 2);
        assert!(w.insert_from(a, id(6), t(40), t(15)).is_err());
    }
}
