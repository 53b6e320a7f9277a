//! Keyed state of stateful plugins (contract 0.3, `wit/0.3/transform.wit`).
//!
//! Each stateful stage of a pipeline has one [`StageState`]: per source
//! partition, the entries as of the batches handed to delivery, and the
//! source offset they include records up to. A plugin call reads through
//! its own changes, then those of earlier calls of the same batch, then the
//! entries; its writes land in the call's changes ([`CallState`]). A call
//! that faults is forgotten; a batch whose results are delivered is applied
//! ([`StageState::apply`]) and its [`Delta`] goes to the state's store (the
//! exactly-once PostgreSQL sink, in the transaction of the batch's rows and
//! offsets); a batch that is run again (a rollback) is discarded.
//!
//! A partition is loaded from the store ([`StateStore::load`]) the first
//! time a batch holds it, and forgotten when the source's assignment
//! changes (a rebalance), so that it is read again as committed.

pub mod time;

use crate::record::Record;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use time::{idle_watermark, stored, Clock, EventTime, Seen};

/// A source partition: the scope of a stage's state.
pub type Partition = (Arc<str>, i32);

/// A partition's state as its store holds it: the stored keys (see
/// [`time::stored`]: plugin entries, timers and the clock) and their values.
#[derive(Debug, Default)]
pub struct Loaded {
    pub entries: HashMap<Vec<u8>, Vec<u8>>,
    /// The offset after the last record the entries include: a record below
    /// it was applied (and its rows written) before.
    pub next_offset: i64,
}

/// Where a pipeline's state is kept: read per partition on assignment,
/// written with each batch (see [`crate::sinks::Sink::write_committed`]).
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Stage `stage`'s entries for `partition`, and how far they go.
    async fn load(&self, stage: u32, partition: &Partition) -> anyhow::Result<Loaded>;

    /// Every stored key of the pipeline that `filter` lets through, in
    /// order (for `sluice state`).
    async fn scan(&self, filter: &Filter) -> anyhow::Result<Vec<Stored>>;

    /// The state versions ([`time::stored::VERSION`]) of stage `stage`'s
    /// partitions that hold entries, in every partition (those other
    /// instances own too).
    async fn versions(&self, stage: u32) -> anyhow::Result<std::collections::BTreeSet<u32>>;

    /// The stages (transform indices, from 0) the pipeline's store holds
    /// keys of.
    async fn stages(&self) -> anyhow::Result<std::collections::BTreeSet<u32>>;

    /// Moves stage `from`'s stored state to stage `to` (which must hold
    /// none), for a stage whose place in the chain changed; returns how
    /// many rows moved.
    async fn move_stage(&self, from: u32, to: u32) -> anyhow::Result<u64>;

    /// Deletes stage `stage`'s stored state; returns how many rows went.
    async fn drop_stage(&self, stage: u32) -> anyhow::Result<u64>;
}

/// Which stored keys [`StateStore::scan`] returns: `None` is any.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub stage: Option<u32>,
    pub partition: Option<i32>,
    /// A plugin key: its entry and its timers.
    pub key: Option<Vec<u8>>,
}

/// One stored key (see [`time::stored`]) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub stage: u32,
    pub partition: Partition,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// What one delivered batch changed, for the store: per stage and
/// partition, each key's new value (`None`: deleted), and every partition
/// of the batch with the offset after its last record (the store moves the
/// partition's stored offset there even when no row came of it).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    pub changes: Vec<Change>,
    pub positions: Vec<(Partition, i64)>,
    /// The fence: every partition the batch holds (records or fired
    /// timers), with the offset its state went to before the batch. The
    /// store commits the batch only if it still holds each partition at
    /// that offset; else another instance committed the partition since
    /// this one read it ([`Fenced`]).
    pub fences: Vec<(Partition, i64)>,
}

/// A batch's state was computed from a partition's state that another
/// instance has moved on since (a consumer-group hand-over in which the
/// old owner's last batch committed after the new owner read the state):
/// committing it would apply records twice, or fire a timer again. The
/// batch is not committed; the pipeline starts again and reads the state
/// as committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the state of {topic}/{partition} was committed up to offset {stored} by another instance, and this batch was computed from it at offset {expected}: another instance owns the partition now (a rebalance)")]
pub struct Fenced {
    pub topic: String,
    pub partition: i32,
    pub expected: i64,
    pub stored: i64,
}

impl Delta {
    /// The first fence `stored` breaks: `stored` gives a partition's
    /// offset in the store (`None`: none stored, which is 0).
    pub fn fenced(&self, stored: impl Fn(&str, i32) -> Option<i64>) -> Option<Fenced> {
        self.fences.iter().find_map(|((topic, partition), expected)| {
            let stored = stored(topic, *partition).unwrap_or(0);
            (stored != *expected).then(|| Fenced {
                topic: topic.to_string(),
                partition: *partition,
                expected: *expected,
                stored,
            })
        })
    }
}

/// One stored key's change (see [`time::stored`] for the keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub stage: u32,
    pub partition: Partition,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.positions.is_empty() && self.fences.is_empty()
    }
}

/// Why a state call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state limit of {limit_mib} MiB reached (limits.state_mib): the stage's state would hold {bytes} bytes")]
    Limit { limit_mib: u64, bytes: usize },
    #[error("state call names record {index}, but the batch has {len} records")]
    NoRecord { index: u32, len: usize },
    #[error("this instance has no state")]
    Unavailable,
    #[error("set-timer needs event time: add [transforms.event_time] to the stage in the pipeline file")]
    NoEventTime,
    #[error("the state of {topic}/{partition} is version {from}, and this plugin keeps version {to} without a migrate from {from}")]
    NoMigrate { topic: String, partition: i32, from: u32, to: u32 },
    #[error("migrating the state of {topic}/{partition} from version {from} to {to} failed: {reason}")]
    Migrate { topic: String, partition: i32, from: u32, to: u32, reason: String },
}

/// The version of the state a plugin keeps, and the versions it converts
/// from (contract 0.3's `schema`; a plugin without it keeps version 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateVersion {
    pub current: u32,
    pub migrates_from: Vec<u32>,
}

impl StateVersion {
    /// Whether a plugin of this version can take over state holding the
    /// versions `held` (the same version, or one it migrates from); the
    /// reason when it cannot.
    pub fn takes_over(&self, held: &std::collections::BTreeSet<u32>) -> Result<(), String> {
        let unreadable: Vec<String> = held
            .iter()
            .filter(|v| **v != self.current && !self.migrates_from.contains(v))
            .map(u32::to_string)
            .collect();
        if unreadable.is_empty() {
            return Ok(());
        }
        let from = match self.migrates_from.as_slice() {
            [] => "it has no migrate".to_string(),
            versions => {
                format!("it migrates from {}", versions.iter().map(u32::to_string).collect::<Vec<_>>().join(", "))
            }
        };
        Err(format!(
            "it keeps state version {}, and the pipeline's state holds version {}: {from} (declare the versions it converts in its migrate, or keep the state version)",
            self.current,
            unreadable.join(", ")
        ))
    }
}

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

/// Bytes a timer counts for.
pub(crate) fn timer_bytes(key: &[u8]) -> usize {
    key.len() + 40
}

/// Bytes a key's deadline counts for (it is indexed twice).
fn deadline_bytes(key: &[u8]) -> usize {
    2 * key.len() + 40
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Changes not yet applied: per partition, each key's new value.
type Changes = HashMap<Partition, HashMap<Vec<u8>, Option<Vec<u8>>>>;

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
}

/// Bytes a key and its value count for: their lengths, plus a fixed cost
/// for the entry itself (so that a million empty keys count too).
fn entry_bytes(key: &[u8], value: &[u8]) -> usize {
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
    fn within_limit(&self, delta: isize, grows: bool) -> Result<(), StateError> {
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
        let mut state = PartitionState { next_offset: loaded.next_offset, ..PartitionState::default() };
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

    /// The watermark of `partition`, with the batch's moves.
    pub fn watermark(&self, partition: &Partition) -> Option<i64> {
        match self.pending_clocks.marks.get(partition) {
            Some((mark, _)) => *mark,
            None => self.partitions.get(partition).and_then(|p| p.clock.watermark),
        }
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
    fn read<'a>(&'a self, partition: &Partition, key: &[u8], call: &'a Changes) -> Option<&'a Vec<u8>> {
        for changes in [call, &self.pending] {
            if let Some(value) = changes.get(partition).and_then(|c| c.get(key)) {
                return value.as_ref();
            }
        }
        self.partitions.get(partition).and_then(|p| p.entries.get(key))
    }

    /// Keeps a call's changes with the batch's.
    fn keep(&mut self, call: Changes, delta: isize, timers: Vec<(Partition, i64, Vec<u8>)>) {
        self.pending_clocks.set.extend(timers);
        self.pending_delta += delta;
        for (partition, keys) in call {
            self.pending.entry(partition).or_default().extend(keys);
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
    fn current_entries(&self, partition: &Partition) -> Vec<(Vec<u8>, Vec<u8>)> {
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
    fn apply_at(&mut self, positions: &[(Partition, i64)], now: i64) -> Vec<Change> {
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

/// The state of one plugin call: the stage's state, the partition of each
/// record of the call's batch, and the call's changes.
pub struct CallState {
    shared: SharedState,
    scopes: Vec<Partition>,
    changes: Changes,
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
        let shared = lock(&self.shared);
        Ok(shared.read(partition, key, &self.changes).cloned())
    }

    /// Stores `value` under `key` (`None`: deletes it). Refused past the
    /// limit. Deleting a key that is not there changes nothing, and is not
    /// held: a call cannot make the host hold more than the limit lets it
    /// write.
    pub fn put(&mut self, index: u32, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), StateError> {
        let partition = self.scope(index)?.clone();
        let shared = lock(&self.shared);
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
        let shared = lock(&self.shared);
        if shared.event.is_none() {
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
        let mut shared = lock(&self.shared);
        shared.pending_versions.extend(self.versions);
        shared.keep(self.changes, self.delta, self.timers);
        if shared.scratch {
            shared.apply(&[]);
        }
    }
}

/// Every partition of `batch` with the offset after its last record (a
/// fired timer, offset -1, is not a source record: it moves nothing).
pub fn positions(batch: &[Record]) -> Vec<(Partition, i64)> {
    let mut next: HashMap<Partition, i64> = HashMap::new();
    for r in batch.iter().filter(|r| r.origin.is_source()) {
        let at = next.entry((r.origin.topic.clone(), r.origin.partition)).or_insert(0);
        *at = (*at).max(r.origin.offset + 1);
    }
    let mut positions: Vec<_> = next.into_iter().collect();
    positions.sort();
    positions
}

/// The state of a pipeline's stateful stages, and the store it is kept in.
pub struct PipelineState {
    stages: std::collections::BTreeMap<u32, SharedState>,
    store: Arc<dyn StateStore>,
    /// The source's assignment generation the loaded partitions belong to.
    generation: u64,
}

impl PipelineState {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        PipelineState { stages: Default::default(), store, generation: 0 }
    }

    /// Where the state is kept.
    pub fn store(&self) -> Arc<dyn StateStore> {
        self.store.clone()
    }

    /// Whether the source's assignment changed since the state was loaded
    /// (its partitions are then forgotten and loaded again).
    pub fn is_stale(&self, generation: u64) -> bool {
        generation != self.generation
    }

    /// Stage `stage`'s state (made empty the first time), with its
    /// `limits` (size, key TTL) and `event` time.
    pub fn stage(&mut self, stage: u32, limits: &crate::runtime::Limits, event: Option<EventTime>) -> SharedState {
        let limit_bytes = limits.state_bytes;
        let shared =
            self.stages.entry(stage).or_insert_with(|| Arc::new(Mutex::new(StageState::new(stage, limit_bytes))));
        let mut state = lock(shared);
        state.set_limit(limit_bytes);
        state.set_ttl(limits.state_ttl);
        state.set_event_time(event);
        drop(state);
        shared.clone()
    }

    /// Every stage's state.
    pub fn stages(&self) -> impl Iterator<Item = &SharedState> {
        self.stages.values()
    }

    /// Every stage's state, by index (shared: a reload reads it).
    pub fn stage_states(&self) -> std::collections::BTreeMap<u32, SharedState> {
        self.stages.clone()
    }

    /// Readies the state for `batch`: after a rebalance (`generation`
    /// changed) every partition is forgotten; a partition no stage holds
    /// yet is loaded from the store. Records the loaded state already
    /// includes (read again after a restart or rebalance) are taken out of
    /// `batch`: their rows were written with that state. Returns how many.
    pub async fn prepare(
        &mut self,
        batch: &mut Vec<Record>,
        generation: u64,
        assigned: &[(String, i32)],
    ) -> anyhow::Result<usize> {
        if generation != self.generation {
            self.generation = generation;
            self.stages.values().for_each(|s| lock(s).forget());
        }
        let mut partitions: Vec<Partition> = positions(batch).into_iter().map(|(p, _)| p).collect();
        partitions.extend(assigned.iter().map(|(t, p)| (Arc::from(t.as_str()), *p)));
        partitions.sort();
        partitions.dedup();
        for partition in partitions {
            for shared in self.stages.values() {
                let (stage, loaded) = {
                    let state = lock(shared);
                    (state.stage(), state.is_loaded(&partition))
                };
                if !loaded {
                    let loaded = self.store.load(stage, &partition).await?;
                    tracing::info!(stage, topic = %partition.0, partition = partition.1, keys = loaded.entries.len(), next_offset = loaded.next_offset, "state restored");
                    lock(shared).restore(partition.clone(), loaded);
                }
            }
        }
        // Keys past their TTL are gone before the batch reads any.
        let now = now_ms();
        for shared in self.stages.values() {
            let expired = lock(shared).expire(now);
            if expired > 0 {
                tracing::debug!(keys = expired, "state keys expired (limits.state_ttl_ms)");
            }
        }
        // Every stage's state goes to the same offset: the one the store
        // keeps with it. A record below it was applied before.
        let Some(first) = self.stages.values().next() else { return Ok(0) };
        let state = lock(first);
        let before = batch.len();
        batch.retain(|r| {
            r.origin.offset >= state.next_offset(&(r.origin.topic.clone(), r.origin.partition)).unwrap_or(0)
        });
        Ok(before - batch.len())
    }

    /// How often to look for idle partitions and expired keys: half the
    /// shortest `idle_timeout` of the stages with event time, a quarter of
    /// the shortest key TTL, at most 10 s (at least 100 ms).
    pub fn idle_tick(&self) -> Option<std::time::Duration> {
        use std::time::Duration;
        let idle = self.stages.values().filter_map(|s| Some(lock(s).event_time()?.idle_timeout? / 2));
        let ttl = self
            .stages
            .values()
            .filter_map(|s| Some((Duration::from_millis(lock(s).ttl_ms? as u64) / 4).min(Duration::from_secs(10))));
        Some(idle.chain(ttl).min()?.max(Duration::from_millis(100)))
    }

    /// Per stage: (index, keys, bytes, watermark lag in seconds behind the
    /// clock of its slowest partition, with event time).
    pub fn sizes(&self) -> Vec<(u32, usize, usize, Option<f64>)> {
        let now_ms = now_ms();
        self.stages
            .values()
            .map(|s| {
                let state = lock(s);
                let lag = state.event_time().and_then(|_| {
                    let slowest = state.watermarks().into_iter().filter_map(|(_, w)| w).min()?;
                    Some(now_ms.saturating_sub(slowest) as f64 / 1e3)
                });
                (state.stage(), state.keys(), state.bytes(), lag)
            })
            .collect()
    }

    /// The batch is run again (a rollback): its changes are forgotten.
    pub fn discard(&self) {
        self.stages.values().for_each(|s| lock(s).discard());
    }

    /// The batch's results go to delivery: its changes are applied, and
    /// returned for the store with the batch's positions.
    pub fn apply(&self, batch: &[Record]) -> Delta {
        let positions = positions(batch);
        // Each partition the batch holds (records or fired timers), at the
        // offset its state went to before the batch: the same in every stage.
        let mut fences: Vec<(Partition, i64)> = Vec::new();
        if let Some(first) = self.stages.values().next() {
            let first = lock(first);
            for r in batch {
                let held = |(p, _): &(Partition, i64)| p.1 == r.origin.partition && p.0 == r.origin.topic;
                if !fences.iter().rev().any(held) {
                    let partition = (r.origin.topic.clone(), r.origin.partition);
                    let from = first.next_offset(&partition).unwrap_or(0);
                    fences.push((partition, from));
                }
            }
        }
        let changes = self.stages.values().flat_map(|s| lock(s).apply(&positions)).collect();
        Delta { changes, positions, fences }
    }
}

/// `shared`, locked (a panic while it was held leaves it usable: every
/// change is applied whole or not at all).
pub fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, StageState> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;

    fn origin(partition: i32) -> Origin {
        Origin { topic: "t".into(), partition, offset: 0 }
    }

    fn call(shared: &SharedState, partitions: &[i32]) -> CallState {
        let origins: Vec<Origin> = partitions.iter().map(|p| origin(*p)).collect();
        CallState::new(shared.clone(), origins.iter())
    }

    #[test]
    fn reads_see_the_calls_changes_then_the_batchs_then_the_entries() {
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
        shared.lock().unwrap().restore(
            ("t".into(), 0),
            Loaded { entries: [(stored::entry(b"k"), b"stored".to_vec())].into(), next_offset: 5 },
        );
        let mut first = call(&shared, &[0, 1]);
        assert_eq!(first.get(0, b"k").unwrap(), Some(b"stored".to_vec()));
        assert_eq!(first.get(1, b"k").unwrap(), None, "partition 1 is another scope");
        first.put(0, b"k".to_vec(), Some(b"one".to_vec())).unwrap();
        first.put(1, b"k".to_vec(), Some(b"p1".to_vec())).unwrap();
        assert_eq!(first.get(0, b"k").unwrap(), Some(b"one".to_vec()));
        first.keep();
        let mut second = call(&shared, &[0]);
        assert_eq!(second.get(0, b"k").unwrap(), Some(b"one".to_vec()), "an earlier call of the batch");
        second.put(0, b"k".to_vec(), None).unwrap();
        assert_eq!(second.get(0, b"k").unwrap(), None);
        drop(second); // faulted: forgotten
        assert_eq!(call(&shared, &[0]).get(0, b"k").unwrap(), Some(b"one".to_vec()));
        assert!(matches!(call(&shared, &[0]).get(3, b"k"), Err(StateError::NoRecord { index: 3, len: 1 })));

        let mut state = shared.lock().unwrap();
        let mut changes = state.apply(&[(("t".into(), 0), 9), (("t".into(), 1), 3)]);
        changes.sort_by_key(|c| c.partition.1);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].value.as_deref(), Some(&b"one"[..]));
        assert_eq!(changes[0].key, stored::entry(b"k"));
        assert_eq!(state.next_offset(&("t".into(), 0)), Some(9));
        assert_eq!(state.next_offset(&("t".into(), 1)), Some(3));
        assert_eq!(state.keys(), 2);
        assert_eq!(state.bytes(), entry_bytes(b"k", b"one") + entry_bytes(b"k", b"p1"));
    }

    #[test]
    fn a_discarded_batch_leaves_the_state_as_it_was() {
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
        let mut c = call(&shared, &[0]);
        c.put(0, b"a".to_vec(), Some(b"1".to_vec())).unwrap();
        c.keep();
        shared.lock().unwrap().discard();
        assert_eq!(call(&shared, &[0]).get(0, b"a").unwrap(), None);
        assert!(shared.lock().unwrap().apply(&[]).is_empty());
    }

    #[test]
    fn the_limit_counts_what_the_batch_would_hold() {
        let limit = 3 * entry_bytes(b"k0", &[0; 10]);
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, limit)));
        let mut c = call(&shared, &[0]);
        for i in 0..3 {
            c.put(0, format!("k{i}").into_bytes(), Some(vec![0; 10])).unwrap();
        }
        // Overwriting a key does not grow the state; a fourth key does.
        c.put(0, b"k0".to_vec(), Some(vec![1; 10])).unwrap();
        let error = c.put(0, b"k3".to_vec(), Some(vec![0; 10])).unwrap_err();
        assert!(matches!(error, StateError::Limit { .. }), "{error}");
        assert!(error.to_string().contains("limits.state_mib"), "{error}");
    }

    /// Timers count against the limit, and deleting keys that are not
    /// there holds nothing.
    #[test]
    fn timers_count_and_deletes_of_absent_keys_are_not_held() {
        let limit = 10 * timer_bytes(&[0; 100]);
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, limit)));
        shared.lock().unwrap().set_event_time(event(0));
        let mut c = call(&shared, &[0]);
        for i in 0..10u8 {
            c.set_timer(0, vec![i; 100], 1_000).unwrap();
        }
        let error = c.set_timer(0, vec![11; 100], 1_000).unwrap_err();
        assert!(matches!(error, StateError::Limit { .. }), "{error}");
        let mut c = call(&shared, &[0]);
        for i in 0..1_000u32 {
            c.put(0, i.to_le_bytes().repeat(1_000), None).unwrap();
        }
        assert!(c.changes.is_empty(), "nothing held for keys that are not there");
        c.put(0, b"k".to_vec(), Some(b"v".to_vec())).unwrap();
        c.put(0, b"k".to_vec(), None).unwrap();
        assert_eq!(c.changes.values().map(HashMap::len).sum::<usize>(), 1, "a key put then deleted in one call");
    }

    fn event(lateness: i64) -> Option<EventTime> {
        Some(EventTime {
            allowed_lateness_ms: lateness,
            idle_timeout: None,
            late: time::LatePolicy::Drop,
            max_ahead_ms: i64::MAX,
        })
    }

    /// Timers fire once the batch's watermark passes them, are gone after
    /// the batch is applied, come back with a restore, and a discarded
    /// batch fires nothing.
    #[test]
    fn timers_fire_at_the_watermark_and_are_stored_with_it() {
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
        shared.lock().unwrap().set_event_time(event(1_000));
        let p: Partition = ("t".into(), 0);
        let mut c = call(&shared, &[0]);
        c.set_timer(0, b"w1".to_vec(), 60_000).unwrap();
        c.set_timer(0, b"w2".to_vec(), 120_000).unwrap();
        c.keep();
        let mut state = shared.lock().unwrap();
        state.observe(&p, 59_500);
        assert_eq!(state.watermark(&p), Some(58_500));
        assert!(state.take_due(false).is_empty(), "58.5 s has not reached 60 s");
        state.observe(&p, 61_000);
        assert_eq!(state.take_due(false), vec![(p.clone(), 60_000, b"w1".to_vec())]);
        assert!(state.take_due(false).is_empty(), "fired once");
        assert!(state.is_late(&p, 59_999) && !state.is_late(&p, 60_000));
        let changes = state.apply(&[(p.clone(), 10)]);
        let stored: HashMap<Vec<u8>, Option<Vec<u8>>> = changes.into_iter().map(|c| (c.key, c.value)).collect();
        assert_eq!(stored.get(&time::stored::timer(60_000, b"w1")), Some(&None), "the fired timer is deleted");
        assert_eq!(stored.get(&time::stored::timer(120_000, b"w2")), Some(&Some(vec![])));
        assert_eq!(
            stored.get(&vec![time::stored::CLOCK]),
            Some(&Some(time::stored::clock(Some(60_000), Some(61_000))))
        );

        // Restored from what was stored, the clock and the timer are back.
        let entries: HashMap<Vec<u8>, Vec<u8>> = stored.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
        let mut restored = StageState::new(0, 1 << 20);
        restored.set_event_time(event(1_000));
        restored.restore(p.clone(), Loaded { entries, next_offset: 10 });
        assert_eq!(restored.watermark(&p), Some(60_000));
        restored.observe(&p, 200_000);
        assert_eq!(restored.take_due(false), vec![(p.clone(), 120_000, b"w2".to_vec())]);
        restored.discard();
        assert_eq!(restored.watermark(&p), Some(60_000), "a discarded batch moves nothing");
        assert_eq!(restored.take_due(true), vec![(p, 120_000, b"w2".to_vec())], "the end fires every timer");
    }

    #[test]
    fn a_version_takes_over_the_state_it_keeps_or_migrates_from() {
        let v1 = StateVersion { current: 1, migrates_from: vec![0] };
        assert!(v1.takes_over(&[0, 1].into()).is_ok());
        assert!(v1.takes_over(&[].into()).is_ok(), "no state yet");
        let error = v1.takes_over(&[2].into()).unwrap_err();
        assert!(error.contains("holds version 2: it migrates from 0"), "{error}");
        let bare = StateVersion { current: 1, migrates_from: vec![] };
        let error = bare.takes_over(&[0].into()).unwrap_err();
        assert!(error.contains("keeps state version 1") && error.contains("it has no migrate"), "{error}");
    }

    /// A call converts the entries of its partitions kept by another
    /// version into its changes: a faulted call or a discarded batch leaves
    /// them as they were; an applied one stores them with the version.
    #[test]
    fn a_migration_is_part_of_the_batch_that_made_it() {
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
        let entries = [(stored::entry(b"a"), b"old-a".to_vec()), (stored::entry(b"b"), b"old-b".to_vec())];
        shared.lock().unwrap().restore(("t".into(), 0), Loaded { entries: entries.into(), next_offset: 3 });
        let migrate = |shared: &SharedState| {
            let mut c = call(shared, &[0, 1]);
            let todo = c.unmigrated(1);
            assert_eq!(todo.len(), 1, "partition 1 holds nothing: it just takes version 1");
            assert_eq!((todo[0].from, todo[0].entries.len()), (0, 2));
            let old = todo.into_iter().next().unwrap();
            // Version 1 renames a to A, and drops b.
            c.migrated(old, vec![(b"A".to_vec(), b"new-a".to_vec())], 1).unwrap();
            c
        };
        drop(migrate(&shared)); // the call faulted
        assert_eq!(call(&shared, &[0]).unmigrated(1).len(), 1, "nothing was converted");
        migrate(&shared).keep();
        assert_eq!(shared.lock().unwrap().version(&("t".into(), 0)), 1);
        assert!(call(&shared, &[0]).unmigrated(1).is_empty(), "converted once per batch");
        shared.lock().unwrap().discard();
        assert_eq!(shared.lock().unwrap().version(&("t".into(), 0)), 0, "a discarded batch converted nothing");

        migrate(&shared).keep();
        let c = call(&shared, &[0]);
        assert_eq!((c.get(0, b"A").unwrap(), c.get(0, b"a").unwrap()), (Some(b"new-a".to_vec()), None));
        let changes = shared.lock().unwrap().apply(&[(("t".into(), 0), 4)]);
        let stored: HashMap<(i32, Vec<u8>), Option<Vec<u8>>> =
            changes.into_iter().map(|c| ((c.partition.1, c.key), c.value)).collect();
        assert_eq!(stored.get(&(0, vec![stored::VERSION])), Some(&Some(stored::version(1))));
        assert_eq!(stored.get(&(1, vec![stored::VERSION])), Some(&Some(stored::version(1))));
        assert_eq!(stored.get(&(0, stored::entry(b"a"))), Some(&None));
        assert_eq!(stored.get(&(0, stored::entry(b"b"))), Some(&None));
        assert_eq!(stored.get(&(0, stored::entry(b"A"))), Some(&Some(b"new-a".to_vec())));

        // Restored from the store, the partition is version 1.
        let kept: HashMap<Vec<u8>, Vec<u8>> =
            stored.into_iter().filter(|((p, _), _)| *p == 0).filter_map(|((_, k), v)| v.map(|v| (k, v))).collect();
        let mut restored = StageState::new(0, 1 << 20);
        restored.restore(("t".into(), 0), Loaded { entries: kept, next_offset: 4 });
        assert_eq!((restored.version(&("t".into(), 0)), restored.keys()), (1, 1));
    }

    /// With a TTL, a key written gets a deadline (stored beside it); past
    /// it the key is deleted from memory at once and from the store with
    /// the next applied batch; a rewrite moves the deadline; restored
    /// deadlines expire too.
    #[test]
    fn keys_past_their_ttl_are_deleted() {
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
        shared.lock().unwrap().set_ttl(Some(std::time::Duration::from_secs(60)));
        let p: Partition = ("t".into(), 0);
        let mut c = call(&shared, &[0]);
        c.put(0, b"old".to_vec(), Some(b"1".to_vec())).unwrap();
        c.put(0, b"new".to_vec(), Some(b"2".to_vec())).unwrap();
        c.keep();
        let written = 1_000_000;
        let changes = shared.lock().unwrap().apply_at(&[(p.clone(), 1)], written);
        let deadline = |changes: &[Change], key: &[u8]| {
            changes.iter().find(|c| c.key == stored::deadline(key)).map(|c| c.value.clone())
        };
        let at = deadline(&changes, b"old").flatten().map(|v| stored::parse_deadline(&v));
        assert_eq!(at, Some(written + 60_000));
        let bytes = shared.lock().unwrap().bytes();
        assert_eq!(
            bytes,
            entry_bytes(b"old", b"1") + entry_bytes(b"new", b"2") + deadline_bytes(b"old") + deadline_bytes(b"new")
        );

        // `new` is written again 30 s later; at 61 s, `old` is gone.
        let mut c = call(&shared, &[0]);
        c.put(0, b"new".to_vec(), Some(b"3".to_vec())).unwrap();
        c.keep();
        let mut state = shared.lock().unwrap();
        state.apply_at(&[(p.clone(), 2)], written + 30_000);
        assert_eq!(state.expire(written + 59_000), 0);
        assert_eq!(state.expire(written + 61_000), 1, "old expired, new was rewritten");
        assert_eq!(state.keys(), 1);
        assert_eq!(state.bytes(), entry_bytes(b"new", b"3") + deadline_bytes(b"new"));
        drop(state);
        assert_eq!(call(&shared, &[0]).get(0, b"old").unwrap(), None);
        let changes = shared.lock().unwrap().apply(&[(p.clone(), 3)]);
        assert!(changes.iter().any(|c| c.key == stored::entry(b"old") && c.value.is_none()), "{changes:?}");
        assert_eq!(deadline(&changes, b"old"), Some(None), "its deadline is deleted too");

        // Restored, a stored deadline expires as it would have.
        let mut restored = StageState::new(0, 1 << 20);
        restored.set_ttl(Some(std::time::Duration::from_secs(60)));
        let entries = [(stored::entry(b"k"), b"v".to_vec()), (stored::deadline(b"k"), stored::deadline_value(1_000))];
        restored.restore(p.clone(), Loaded { entries: entries.into(), next_offset: 0 });
        assert_eq!((restored.keys(), restored.expire(999), restored.expire(1_000)), (1, 0, 1));
        assert_eq!(restored.bytes(), 0);
        // A deleted key drops its deadline.
        let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
        shared.lock().unwrap().set_ttl(Some(std::time::Duration::from_secs(1)));
        let mut c = call(&shared, &[0]);
        c.put(0, b"k".to_vec(), Some(b"v".to_vec())).unwrap();
        c.keep();
        shared.lock().unwrap().apply(&[]);
        let mut c = call(&shared, &[0]);
        c.put(0, b"k".to_vec(), None).unwrap();
        c.keep();
        let changes = shared.lock().unwrap().apply(&[]);
        assert_eq!(deadline(&changes, b"k"), Some(None));
        assert_eq!(shared.lock().unwrap().bytes(), 0);
    }

    /// A partition missing from a full batch may have records waiting: its
    /// idle time starts over, and only quiet past `idle_timeout` from then
    /// moves its watermark.
    #[test]
    fn a_full_batch_holds_the_partitions_it_missed_back_from_idle() {
        let mut state = StageState::new(0, 1 << 20);
        let idle = Some(std::time::Duration::from_secs(5));
        state.set_event_time(Some(EventTime {
            max_ahead_ms: i64::MAX,
            allowed_lateness_ms: 0,
            idle_timeout: idle,
            late: time::LatePolicy::Drop,
        }));
        let p: Partition = ("t".into(), 1);
        let entries = [(vec![time::stored::CLOCK], time::stored::clock(Some(10_000), Some(10_000)))];
        state.restore(p.clone(), Loaded { entries: entries.into(), next_offset: 0 });
        let at = Instant::now();
        state.hold_idle(at + std::time::Duration::from_secs(4));
        state.observe_idle(at + std::time::Duration::from_secs(6));
        assert_eq!(state.watermark(&p), Some(10_000), "quiet for 2 s since the full batch");
        state.observe_idle(at + std::time::Duration::from_secs(11));
        assert_eq!(state.watermark(&p), Some(12_000), "quiet for 7 s: 2 s past the timeout");
    }

    #[test]
    fn positions_are_past_each_partitions_last_record() {
        let batch: Vec<Record> = [(0, 4), (1, 2), (0, 7), (1, -1)]
            .iter()
            .map(|&(p, o)| Record {
                origin: Origin { topic: "t".into(), partition: p, offset: o },
                ..Record::default()
            })
            .collect();
        assert_eq!(positions(&batch), vec![(("t".into(), 0), 8), (("t".into(), 1), 3)]);
    }
}
