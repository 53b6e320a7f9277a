//! The state of one plugin call ([`CallState`]): it reads through its own
//! changes, then those of earlier calls of the batch, then the stage's
//! entries; its changes join the batch's only if the call succeeds.

use super::stage::{entry_bytes, lock, Changes, SharedState};
use super::time::timer_bytes;
use super::{Partition, StateError};

/// The state of one plugin call: the stage's state, the partition of each
/// record of the call's batch, and the call's changes.
pub struct CallState {
    shared: SharedState,
    scopes: Vec<Partition>,
    pub(super) changes: Changes,
    /// How `changes` change the stage's bytes.
    delta: isize,
    timers: Vec<(Partition, i64, Vec<u8>)>,
    /// Partitions the call migrated, and to which version.
    versions: Vec<(Partition, u32)>,
}

/// A partition whose state a plugin must convert before it runs on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmigrated {
    pub partition: Partition,
    /// The version its entries are kept in.
    pub from: u32,
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl CallState {
    /// The state of a call on `inputs` (their origins are the scopes).
    pub fn new<'a>(shared: SharedState, origins: impl Iterator<Item = &'a crate::record::Origin>) -> Self {
        let scopes = origins.map(|o| (o.topic.clone(), o.partition)).collect();
        CallState { shared, scopes, changes: Changes::new(), delta: 0, timers: Vec::new(), versions: Vec::new() }
    }

    /// The call's partitions whose state is not of version `current`, with
    /// their entries. A partition without entries just takes `current`.
    pub fn unmigrated(&mut self, current: u32) -> Vec<Unmigrated> {
        let shared = lock(&self.shared);
        // One version lookup per run of records from the same partition; a
        // partition to convert is listed once.
        let mut stale: Vec<(&Partition, u32)> = Vec::new();
        let mut previous = None;
        for partition in &self.scopes {
            if previous == Some(partition) {
                continue;
            }
            previous = Some(partition);
            let from = shared.version(partition);
            if from != current && !stale.iter().any(|(p, _)| *p == partition) {
                stale.push((partition, from));
            }
        }
        let mut out = Vec::new();
        let mut empty = Vec::new();
        for (partition, from) in stale {
            let entries = shared.current_entries(partition);
            if entries.is_empty() {
                empty.push((partition.clone(), current));
            } else {
                out.push(Unmigrated { partition: partition.clone(), from, entries });
            }
        }
        drop(shared);
        self.versions.extend(empty);
        out
    }

    /// `migrated` (the plugin's conversion of `from`'s entries to version
    /// `current`) replaces them in the call's changes.
    pub fn migrated(
        &mut self,
        from: Unmigrated,
        migrated: Vec<(Vec<u8>, Vec<u8>)>,
        current: u32,
    ) -> Result<(), StateError> {
        let index = self.scopes.iter().position(|p| *p == from.partition).unwrap_or_default() as u32;
        for (key, _) in from.entries {
            self.put(index, key, None)?;
        }
        for (key, value) in migrated {
            self.put(index, key, Some(value))?;
        }
        self.versions.push((from.partition, current));
        Ok(())
    }

    fn scope(&self, index: u32) -> Result<&Partition, StateError> {
        self.scopes.get(index as usize).ok_or(StateError::NoRecord { index, len: self.scopes.len() })
    }

    pub fn get(&self, index: u32, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        let partition = self.scope(index)?;
        let mut shared = lock(&self.shared);
        shared.note(index, key, || super::stage::AccessKind::Get);
        Ok(shared.read(partition, key, &self.changes).cloned())
    }

    /// Stores `value` under `key` (`None`: deletes it). Refused past the
    /// limit. Deleting a key that is not there changes nothing, and is not
    /// held: a call cannot make the host hold more than the limit lets it
    /// write.
    pub fn put(&mut self, index: u32, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), StateError> {
        let partition = self.scope(index)?.clone();
        let mut shared = lock(&self.shared);
        let kind = || if value.is_some() { super::stage::AccessKind::Put } else { super::stage::AccessKind::Delete };
        shared.note(index, &key, kind);
        let old = shared.read(&partition, &key, &self.changes).map_or(0, |v| entry_bytes(&key, v));
        if value.is_none() && old == 0 && !self.changes.get(&partition).is_some_and(|c| c.contains_key(&key)) {
            return Ok(());
        }
        let new = value.as_ref().map_or(0, |v| entry_bytes(&key, v));
        let delta = self.delta + new as isize - old as isize;
        shared.within_limit(delta, new > old)?;
        drop(shared);
        self.delta = delta;
        self.changes.entry(partition).or_default().insert(key, value);
        Ok(())
    }

    /// Asks for a fired timer of `key` once the record's partition's
    /// watermark reaches `at`.
    pub fn set_timer(&mut self, index: u32, key: Vec<u8>, at: i64) -> Result<(), StateError> {
        let partition = self.scope(index)?.clone();
        let mut shared = lock(&self.shared);
        shared.note(index, &key, || super::stage::AccessKind::SetTimer(at));
        if shared.event_time().is_none() {
            return Err(StateError::NoEventTime);
        }
        // A timer is held until it fires: it counts against the limit.
        let delta = self.delta + timer_bytes(&key) as isize;
        shared.within_limit(delta, true)?;
        drop(shared);
        self.delta = delta;
        self.timers.push((partition, at, key));
        Ok(())
    }

    /// The watermark of the record's partition.
    pub fn watermark(&self, index: u32) -> Result<Option<i64>, StateError> {
        let partition = self.scope(index)?;
        Ok(lock(&self.shared).watermark(partition))
    }

    /// The call succeeded: its changes join the batch's.
    pub fn keep(self) {
        lock(&self.shared).keep(self.changes, self.delta, self.timers, self.versions);
    }
}
