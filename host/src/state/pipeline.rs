//! The state of a pipeline's stateful stages ([`PipelineState`]): restored
//! from the store per partition, applied per batch into a [`Delta`].

use super::stage::{lock, now_ms, SharedState, StageState};
use super::store::{Delta, StateStore};
use super::time::EventTime;
use super::{Partition, StateLimits};
use crate::record::Record;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    pub fn stage(&mut self, stage: u32, limits: &StateLimits, event: Option<EventTime>) -> SharedState {
        let limit_bytes = limits.bytes;
        let shared =
            self.stages.entry(stage).or_insert_with(|| Arc::new(Mutex::new(StageState::new(stage, limit_bytes))));
        let mut state = lock(shared);
        state.set_limit(limit_bytes);
        state.set_ttl(limits.ttl);
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
        let ttl = self.stages.values().filter_map(|s| Some((lock(s).ttl()? / 4).min(Duration::from_secs(10))));
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
