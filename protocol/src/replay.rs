//! Replay protection: ids of accepted messages, kept until the messages expire.

use std::collections::{BTreeSet, HashMap};

use crate::error::VerifyError;
use crate::ids::ManifestId;
use crate::time::Timestamp;

/// The ids of messages already accepted, each kept until its message's `expires_at`.
///
/// After that the message itself is rejected as expired, so the id can be forgotten: memory is
/// bounded by the message rate times the longest accepted lifetime, and by `capacity`.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    seen: HashMap<ManifestId, Timestamp>,
    by_expiry: BTreeSet<(Timestamp, ManifestId)>,
    capacity: usize,
}

impl ReplayWindow {
    /// The default number of unexpired ids kept.
    pub const DEFAULT_CAPACITY: usize = 1 << 20;

    /// An empty window holding at most `capacity` unexpired ids.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { seen: HashMap::new(), by_expiry: BTreeSet::new(), capacity }
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
        if self.seen.contains_key(&id) {
            return Err(VerifyError::Replayed { id });
        }
        if self.seen.len() >= self.capacity {
            self.prune(now);
            if self.seen.len() >= self.capacity {
                return Err(VerifyError::ReplayWindowFull { capacity: self.capacity });
            }
        }
        self.seen.insert(id, expires_at);
        self.by_expiry.insert((expires_at, id));
        Ok(())
    }

    /// Restores an id from durable storage (no capacity check: what was accepted stays known).
    pub fn restore(&mut self, id: ManifestId, expires_at: Timestamp) {
        if self.seen.insert(id, expires_at).is_none() {
            self.by_expiry.insert((expires_at, id));
        }
    }

    /// Forgets one id, e.g. when recording the message it belongs to failed.
    pub fn forget(&mut self, id: &ManifestId) {
        if let Some(expires_at) = self.seen.remove(id) {
            self.by_expiry.remove(&(expires_at, *id));
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
            self.seen.remove(&id);
            dropped.push(id);
        }
        dropped
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.seen.len()
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
}
