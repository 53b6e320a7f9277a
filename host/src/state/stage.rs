//! One stateful stage's state ([`StageState`]): per source partition, the
//! entries, the clock and the key deadlines as of the batches handed to
//! delivery, and the pending changes of the batch being run.

use super::store::{Change, Loaded};
use super::stored;
use super::time::{idle_watermark, timer_bytes, Clock, EventTime, Seen};
use super::{Partition, StateError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A partition's entries, the offset they go to, and its clock.
#[derive(Debug, Default)]
struct PartitionState {
    entries: HashMap<Vec<u8>, Vec<u8>>,
    next_offset: i64,
    clock: Clock,
    /// When the partition last had a record (for `idle_timeout`).
    seen: Option<Seen>,
    /// The state version of its entries (stored under [`stored::VERSION`]).
    version: u32,
    /// With a key TTL: each entry's deadline (ms since the Unix epoch),
    /// and the same in deadline order.
    deadlines: HashMap<Vec<u8>, i64>,
    expiry: std::collections::BTreeSet<(i64, Vec<u8>)>,
    /// Which restore of the stage loaded it ([`StageState::loaded`]).
    load: u64,
}

impl PartitionState {
    /// Sets (or, with `None`, drops) `key`'s deadline; returns the change
    /// of the stage's bytes.
    fn set_deadline(&mut self, key: &[u8], deadline: Option<i64>) -> isize {
        let mut delta = 0;
        if let Some(old) = self.deadlines.remove(key) {
            self.expiry.remove(&(old, key.to_vec()));
            delta -= deadline_bytes(key) as isize;
        }
        if let Some(at) = deadline {
            self.deadlines.insert(key.to_vec(), at);
            self.expiry.insert((at, key.to_vec()));
            delta += deadline_bytes(key) as isize;
        }
        delta
    }
}

/// Bytes a key's deadline counts for (it is indexed twice).
pub(super) fn deadline_bytes(key: &[u8]) -> usize {
    2 * key.len() + 40
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Changes not yet applied: per partition, each key's new value.
pub(super) type Changes = HashMap<Partition, HashMap<Vec<u8>, Option<Vec<u8>>>>;

/// A batch's changes to the clocks: timers set and fired, watermarks moved.
#[derive(Debug, Default)]
struct ClockChanges {
    set: Vec<(Partition, i64, Vec<u8>)>,
    fired: Vec<(Partition, i64, Vec<u8>)>,
    /// Per partition: the new (watermark, newest timestamp).
    marks: HashMap<Partition, (Option<i64>, Option<i64>)>,
}

/// One stateful stage's state.
#[derive(Debug)]
pub struct StageState {
    stage: u32,
    partitions: HashMap<Partition, PartitionState>,
    /// The changes of the batch being run (its calls that succeeded).
    pending: Changes,
    pending_clocks: ClockChanges,
    /// Partitions the batch migrated, and to which version.
    pending_versions: HashMap<Partition, u32>,
    /// How long a key lives after its last write (ms); `None`: for ever.
    ttl_ms: Option<i64>,
    /// Keys expired since the last applied batch, for the store.
    expired: Vec<Change>,
    /// The stage's event time, if it has one.
    event: Option<EventTime>,
    /// Bytes of keys and values in `partitions`.
    bytes: usize,
    /// How `pending` changes `bytes`.
    pending_delta: isize,
    limit_bytes: usize,
    /// Kept by nobody (a shadow candidate, `sluice plugin test`): a call's
    /// changes are applied at once.
    scratch: bool,
    /// `sluice replay --trace`: the keys beginning with this prefix, and
    /// the calls' accesses to them since they were last taken.
    trace: Option<(Vec<u8>, Vec<Access>)>,
    /// Restores so far (each partition keeps the number of its own).
    loads: u64,
}

/// A plugin's access to a traced key ([`StageState::trace_keys`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The input record the plugin named for the access (its partition's
    /// state): the SDKs name one record of the partition for the whole
    /// batch, so this is not the record that caused it.
    pub input: u32,
    pub key: Vec<u8>,
    pub what: AccessKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessKind {
    Get,
    Put,
    Delete,
    SetTimer(i64),
}

/// Bytes a key and its value count for: their lengths, plus a fixed cost
/// for the entry itself (so that a million empty keys count too).
pub(super) fn entry_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + 32
}

impl StageState {
    pub fn new(stage: u32, limit_bytes: usize) -> Self {
        StageState {
            stage,
            partitions: HashMap::new(),
            pending: Changes::new(),
            pending_clocks: ClockChanges::default(),
            pending_versions: HashMap::new(),
            ttl_ms: None,
            expired: Vec::new(),
            event: None,
            bytes: 0,
            pending_delta: 0,
            limit_bytes,
            scratch: false,
            trace: None,
            loads: 0,
        }
    }

    /// A state no store keeps, for an instance outside a pipeline (a
    /// shadow candidate, `sluice plugin test`): it starts empty, and each
    /// call's changes are applied when it returns.
    pub fn scratch(limit_bytes: usize) -> SharedState {
        Arc::new(Mutex::new(StageState { scratch: true, ..StageState::new(0, limit_bytes) }))
    }

    pub fn stage(&self) -> u32 {
        self.stage
    }

    /// Keys held, across partitions.
    pub fn keys(&self) -> usize {
        self.partitions.values().map(|p| p.entries.len()).sum()
    }

    /// Bytes held (keys, values and a fixed cost per entry).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether the stage may hold what it holds, plus the batch's pending
    /// changes, plus a call's `delta`: a call that `grows` past the limit is refused.
    pub(super) fn within_limit(&self, delta: isize, grows: bool) -> Result<(), StateError> {
        let bytes = (self.bytes as isize + self.pending_delta + delta).max(0) as usize;
        if grows && bytes > self.limit_bytes {
            return Err(StateError::Limit { limit_mib: (self.limit_bytes >> 20) as u64, bytes });
        }
        Ok(())
    }

    pub fn set_limit(&mut self, limit_bytes: usize) {
        self.limit_bytes = limit_bytes;
    }

    pub fn set_ttl(&mut self, ttl: Option<std::time::Duration>) {
        self.ttl_ms = ttl.map(|t| t.as_millis() as i64);
    }

    /// How long a key lives after its last write; `None`: for ever.
    pub fn ttl(&self) -> Option<std::time::Duration> {
        self.ttl_ms.map(|ms| std::time::Duration::from_millis(ms as u64))
    }

    /// Deletes the keys whose TTL ran out by `now` (ms since the Unix
    /// epoch) from memory; the store forgets them with the next applied
    /// batch. Returns how many.
    pub fn expire(&mut self, now: i64) -> usize {
        if self.ttl_ms.is_none() {
            return 0;
        }
        let mut count = 0;
        for (partition, state) in &mut self.partitions {
            while let Some((at, key)) = state.expiry.first().cloned() {
                if at > now {
                    break;
                }
                self.bytes = self.bytes.saturating_add_signed(state.set_deadline(&key, None));
                if let Some(value) = state.entries.remove(&key) {
                    self.bytes -= entry_bytes(&key, &value);
                }
                self.expired.push(Change {
                    stage: self.stage,
                    partition: partition.clone(),
                    key: stored::entry(&key),
                    value: None,
                });
                self.expired.push(Change {
                    stage: self.stage,
                    partition: partition.clone(),
                    key: stored::deadline(&key),
                    value: None,
                });
                count += 1;
            }
        }
        count
    }

    /// Notes every access to a key beginning with `prefix` from now on.
    pub fn trace_keys(&mut self, prefix: Vec<u8>) {
        self.trace = Some((prefix, Vec::new()));
    }

    /// The accesses to the traced keys since the last call of this.
    pub fn take_accesses(&mut self) -> Vec<Access> {
        self.trace.as_mut().map(|(_, a)| std::mem::take(a)).unwrap_or_default()
    }

    /// A call accessed `key` for its input `input`.
    pub(super) fn note(&mut self, input: u32, key: &[u8], what: impl FnOnce() -> AccessKind) {
        if let Some((prefix, accesses)) = &mut self.trace {
            if key.starts_with(prefix) {
                accesses.push(Access { input, key: key.to_vec(), what: what() });
            }
        }
    }

    pub fn set_event_time(&mut self, event: Option<EventTime>) {
        self.event = event;
    }

    pub fn event_time(&self) -> Option<&EventTime> {
        self.event.as_ref()
    }

    pub fn is_loaded(&self, partition: &Partition) -> bool {
        self.partitions.contains_key(partition)
    }

    /// Takes `partition` as the store has it.
    pub fn restore(&mut self, partition: Partition, loaded: Loaded) {
        if let Some(old) = self.partitions.remove(&partition) {
            self.bytes -= old.entries.iter().map(|(k, v)| entry_bytes(k, v)).sum::<usize>();
            self.bytes -= old.clock.timer_bytes();
            self.bytes -= old.deadlines.keys().map(|k| deadline_bytes(k)).sum::<usize>();
        }
        self.loads += 1;
        let mut state =
            PartitionState { next_offset: loaded.next_offset, load: self.loads, ..PartitionState::default() };
        for (key, value) in loaded.entries {
            match key.first() {
                Some(&stored::ENTRY) => {
                    state.entries.insert(key[1..].to_vec(), value);
                }
                Some(&stored::TIMER) => {
                    if let Some(timer) = stored::parse_timer(&key) {
                        state.clock.timers.insert(timer);
                    }
                }
                Some(&stored::CLOCK) => {
                    (state.clock.watermark, state.clock.max_ts) = stored::parse_clock(&value);
                }
                Some(&stored::VERSION) => state.version = stored::parse_version(&value),
                Some(&stored::DEADLINE) => {
                    self.bytes += state.set_deadline(&key[1..], Some(stored::parse_deadline(&value))) as usize;
                }
                _ => {}
            }
        }
        self.bytes += state.entries.iter().map(|(k, v)| entry_bytes(k, v)).sum::<usize>();
        self.bytes += state.clock.timer_bytes();
        // Idle from now on, until a record comes.
        state.seen = state.clock.max_ts.map(|max_ts| Seen { at: Instant::now(), max_ts });
        self.partitions.insert(partition, state);
    }

    /// Which restore loaded `partition` (a number that changes each time it
    /// is loaded again, after a rebalance): a recording copies it again.
    pub fn loaded(&self, partition: &Partition) -> Option<u64> {
        self.partitions.get(partition).map(|p| p.load)
    }

    /// `partition`'s state as of the last applied batch, in the stored form
    /// [`StageState::restore`] takes (a shadow candidate starts from a copy
    /// of the live state); `None` when the stage does not hold it.
    pub fn export(&self, partition: &Partition) -> Option<Loaded> {
        let state = self.partitions.get(partition)?;
        let mut entries: HashMap<Vec<u8>, Vec<u8>> =
            state.entries.iter().map(|(k, v)| (stored::entry(k), v.clone())).collect();
        entries.extend(state.clock.timers.iter().map(|(at, key)| (stored::timer(*at, key), Vec::new())));
        if state.clock.watermark.is_some() || state.clock.max_ts.is_some() {
            entries.insert(vec![stored::CLOCK], stored::clock(state.clock.watermark, state.clock.max_ts));
        }
        if state.version != 0 {
            entries.insert(vec![stored::VERSION], stored::version(state.version));
        }
        entries.extend(state.deadlines.iter().map(|(key, at)| (stored::deadline(key), stored::deadline_value(*at))));
        Some(Loaded { entries, next_offset: state.next_offset })
    }

    /// Drops a timer that fired elsewhere (a shadow candidate's copy of a
    /// timer the live stage fired and handed it as a record).
    pub fn forget_timer(&mut self, partition: &Partition, at: i64, key: &[u8]) {
        if let Some(state) = self.partitions.get_mut(partition) {
            if state.clock.timers.remove(&(at, key.to_vec())) {
                self.bytes -= timer_bytes(key);
            }
        }
    }

    /// The watermark of `partition`, with the batch's moves.
    pub fn watermark(&self, partition: &Partition) -> Option<i64> {
        match self.pending_clocks.marks.get(partition) {
            Some((mark, _)) => *mark,
            None => self.partitions.get(partition).and_then(|p| p.clock.watermark),
        }
    }

    /// Sets `partition`'s watermark as it was at a recorded call (a
    /// replay: `sluice replay`), whatever the batch moved.
    pub fn set_watermark(&mut self, partition: &Partition, watermark: Option<i64>) {
        self.pending_clocks.marks.remove(partition);
        self.partitions.entry(partition.clone()).or_default().clock.watermark = watermark;
    }

    /// Whether a record of `partition` at `ts` is behind its watermark.
    pub fn is_late(&self, partition: &Partition, ts: i64) -> bool {
        self.watermark(partition).is_some_and(|w| ts < w)
    }

    /// Records of `partition` up to `max_ts` were run: its watermark moves.
    pub fn observe(&mut self, partition: &Partition, max_ts: i64) {
        let Some(event) = &self.event else { return };
        let lateness = event.allowed_lateness_ms;
        let mut clock = self.partitions.get(partition).map(|p| p.clock.clone()).unwrap_or_default();
        if let Some((mark, max)) = self.pending_clocks.marks.get(partition) {
            (clock.watermark, clock.max_ts) = (*mark, *max);
        }
        let moved = clock.advanced(max_ts, lateness);
        self.pending_clocks.marks.insert(partition.clone(), moved);
    }

    /// Idle partitions (no record for `idle_timeout`) move their watermark on with the clock.
    pub fn observe_idle(&mut self, now: Instant) {
        let Some(event) = &self.event else { return };
        let mut moves = Vec::new();
        for (partition, state) in &self.partitions {
            let Some(mark) = state.seen.and_then(|seen| idle_watermark(seen, now, event)) else { continue };
            if state.clock.watermark.is_none_or(|w| mark > w) && !self.pending_clocks.marks.contains_key(partition) {
                moves.push((partition.clone(), (Some(mark), state.clock.max_ts)));
            }
        }
        self.pending_clocks.marks.extend(moves);
    }

    /// The batch was full (its source had more waiting): a partition it did
    /// not hold may have records waiting too, so its idle time starts over.
    pub fn hold_idle(&mut self, now: Instant) {
        for (partition, state) in &mut self.partitions {
            if let (Some(seen), false) = (&mut state.seen, self.pending_clocks.marks.contains_key(partition)) {
                seen.at = now;
            }
        }
    }

    /// The timers due at the watermarks the batch moved, in time order per
    /// partition; they count as fired (removed) with the batch. With `end`
    /// (the input ended: nothing more will come), every timer is due, and
    /// the watermarks stay as they are.
    pub fn take_due(&mut self, end: bool) -> Vec<(Partition, i64, Vec<u8>)> {
        let mut due = Vec::new();
        let mut partitions: Vec<&Partition> = self.pending_clocks.marks.keys().collect();
        partitions.extend(self.pending_clocks.set.iter().map(|(p, _, _)| p));
        if end {
            partitions.extend(self.partitions.keys());
        }
        partitions.sort();
        partitions.dedup();
        for partition in partitions {
            let mark = if end { Some(i64::MAX) } else { self.watermark(partition) };
            let Some(mark) = mark else { continue };
            let mut timers = self.partitions.get(partition).map(|p| p.clock.timers.clone()).unwrap_or_default();
            for (p, at, key) in &self.pending_clocks.set {
                if p == partition {
                    timers.insert((*at, key.clone()));
                }
            }
            for (p, at, key) in &self.pending_clocks.fired {
                if p == partition {
                    timers.remove(&(*at, key.clone()));
                }
            }
            for (at, key) in timers.into_iter().take_while(|(at, _)| *at <= mark) {
                due.push((partition.clone(), at, key));
            }
        }
        due.sort_by(|a, b| (a.1, &a.0, &a.2).cmp(&(b.1, &b.0, &b.2)));
        self.pending_clocks.fired.extend(due.iter().cloned());
        due
    }

    /// Partitions with records, or timers, for [`crate::telemetry`]: (partition, watermark).
    pub fn watermarks(&self) -> Vec<(Partition, Option<i64>)> {
        self.partitions.iter().map(|(p, s)| (p.clone(), s.clock.watermark)).collect()
    }

    /// The offset after the last record `partition`'s entries include.
    pub fn next_offset(&self, partition: &Partition) -> Option<i64> {
        self.partitions.get(partition).map(|p| p.next_offset)
    }

    /// Forgets every partition (the assignment changed): each is loaded
    /// again from the store when a batch next holds it.
    pub fn forget(&mut self) {
        self.partitions.clear();
        self.discard();
        // Not ours to write any more: the store keeps them, and they expire
        // again wherever the partition is loaded.
        self.expired.clear();
        self.bytes = 0;
    }

    /// `key`'s value as the call sees it: its own changes, then the
    /// batch's, then the entries.
    pub(super) fn read<'a>(&'a self, partition: &Partition, key: &[u8], call: &'a Changes) -> Option<&'a Vec<u8>> {
        for changes in [call, &self.pending] {
            if let Some(value) = changes.get(partition).and_then(|c| c.get(key)) {
                return value.as_ref();
            }
        }
        self.partitions.get(partition).and_then(|p| p.entries.get(key))
    }

    /// Keeps a call's changes with the batch's.
    pub(super) fn keep(
        &mut self,
        call: Changes,
        delta: isize,
        timers: Vec<(Partition, i64, Vec<u8>)>,
        versions: Vec<(Partition, u32)>,
    ) {
        self.pending_versions.extend(versions);
        self.pending_clocks.set.extend(timers);
        self.pending_delta += delta;
        for (partition, keys) in call {
            self.pending.entry(partition).or_default().extend(keys);
        }
        if self.scratch {
            self.apply(&[]);
        }
    }

    /// The state versions of the partitions held that have entries.
    pub fn versions_held(&self) -> std::collections::BTreeSet<u32> {
        self.partitions.values().filter(|p| !p.entries.is_empty()).map(|p| p.version).collect()
    }

    /// The state version of `partition`'s entries, with the batch's migrations.
    pub fn version(&self, partition: &Partition) -> u32 {
        match self.pending_versions.get(partition) {
            Some(version) => *version,
            None => self.partitions.get(partition).map_or(0, |p| p.version),
        }
    }

    /// `partition`'s entries as the batch sees them (for a migration).
    pub(super) fn current_entries(&self, partition: &Partition) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut entries: HashMap<&Vec<u8>, &Vec<u8>> =
            self.partitions.get(partition).map(|p| p.entries.iter().collect()).unwrap_or_default();
        for (key, value) in self.pending.get(partition).into_iter().flatten() {
            match value {
                Some(value) => entries.insert(key, value),
                None => entries.remove(key),
            };
        }
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = entries.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        entries.sort();
        entries
    }

    /// Forgets the changes of the batch being run (it is run again).
    pub fn discard(&mut self) {
        self.pending.clear();
        self.pending_versions.clear();
        self.pending_clocks = ClockChanges::default();
        self.pending_delta = 0;
    }

    /// Applies the batch's changes, and moves each partition of the batch
    /// past its last record; returns the stored keys' changes for the store.
    pub fn apply(&mut self, positions: &[(Partition, i64)]) -> Vec<Change> {
        self.apply_at(positions, now_ms())
    }

    /// [`StageState::apply`] at `now` (ms since the Unix epoch): a key
    /// written lives until its TTL from then.
    pub(super) fn apply_at(&mut self, positions: &[(Partition, i64)], now: i64) -> Vec<Change> {
        let mut out = std::mem::take(&mut self.expired);
        let stage = self.stage;
        self.pending_delta = 0;
        let deadline = self.ttl_ms.map(|ttl| now.saturating_add(ttl));
        for (partition, keys) in std::mem::take(&mut self.pending) {
            let state = self.partitions.entry(partition.clone()).or_default();
            for (key, value) in keys {
                if let Some(old) = state.entries.get(&key) {
                    self.bytes -= entry_bytes(&key, old);
                }
                match &value {
                    Some(v) => {
                        self.bytes += entry_bytes(&key, v);
                        state.entries.insert(key.clone(), v.clone());
                    }
                    None => {
                        state.entries.remove(&key);
                    }
                }
                // A key written lives until its TTL from now; a key deleted
                // has no deadline.
                let at = value.as_ref().and(deadline);
                if at.is_some() || state.deadlines.contains_key(&key) {
                    self.bytes = self.bytes.saturating_add_signed(state.set_deadline(&key, at));
                    let stored_at = at.map(stored::deadline_value);
                    out.push(Change {
                        stage,
                        partition: partition.clone(),
                        key: stored::deadline(&key),
                        value: stored_at,
                    });
                }
                out.push(Change { stage, partition: partition.clone(), key: stored::entry(&key), value });
            }
        }
        for (partition, version) in std::mem::take(&mut self.pending_versions) {
            let state = self.partitions.entry(partition.clone()).or_default();
            state.version = version;
            out.push(Change { stage, partition, key: vec![stored::VERSION], value: Some(stored::version(version)) });
        }
        let ClockChanges { set, fired, marks } = std::mem::take(&mut self.pending_clocks);
        for (partition, at, key) in set {
            let state = self.partitions.entry(partition.clone()).or_default();
            if state.clock.timers.insert((at, key.clone())) {
                self.bytes += timer_bytes(&key);
                out.push(Change { stage, partition, key: stored::timer(at, &key), value: Some(Vec::new()) });
            }
        }
        for (partition, at, key) in fired {
            let state = self.partitions.entry(partition.clone()).or_default();
            if state.clock.timers.remove(&(at, key.clone())) {
                self.bytes -= timer_bytes(&key);
            }
            out.push(Change { stage, partition, key: stored::timer(at, &key), value: None });
        }
        for (partition, (mark, max)) in marks {
            let state = self.partitions.entry(partition.clone()).or_default();
            if (state.clock.watermark, state.clock.max_ts) != (mark, max) {
                (state.clock.watermark, state.clock.max_ts) = (mark, max);
                out.push(Change { stage, partition, key: vec![stored::CLOCK], value: Some(stored::clock(mark, max)) });
            }
        }
        let now = Instant::now();
        for (partition, next) in positions {
            let state = self.partitions.entry(partition.clone()).or_default();
            state.next_offset = state.next_offset.max(*next);
            if let Some(max_ts) = state.clock.max_ts {
                state.seen = Some(Seen { at: now, max_ts });
            }
        }
        out
    }
}

/// A stage's state, shared by the stage's instances (an instance replaced
/// after a fault, a version swapped in or rolled back take it over).
pub type SharedState = Arc<Mutex<StageState>>;

/// `shared`, locked (a panic while it was held leaves it usable: every
/// change is applied whole or not at all).
pub fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, StageState> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}
