//! A store and keeper in memory ([`MemoryState`]): `sluice plugin test`
//! runs a stateful plugin through the pipeline's transform step with it,
//! without a database. It keeps what the PostgreSQL store keeps (entries,
//! timers, clocks and versions under [`super::stored`]'s keys, and each
//! partition's position), commits a [`Delta`] fenced as the others do, and
//! reads and writes its entries as JSON lines ([`MemoryState::read_json`],
//! [`MemoryState::write_json`]).

use super::keeper::StateKeeper;
use super::store::{Delta, Filter, Loaded, StateStore, Stored};
use super::{stored, Partition};
use crate::record::{Origin, OutputRef, Refusals, Rejected};
use anyhow::Context;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// (stage, topic, partition, stored key).
type Place = (u32, Arc<str>, i32, Vec<u8>);

#[derive(Default)]
struct Inner {
    entries: BTreeMap<Place, Vec<u8>>,
    positions: BTreeMap<Partition, i64>,
}

/// A pipeline's state kept in memory: its store and its keeper.
#[derive(Default, Clone)]
pub struct MemoryState(Arc<Mutex<Inner>>);

impl MemoryState {
    pub fn new() -> Self {
        MemoryState::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every stored key, in order.
    pub fn entries(&self) -> Vec<Stored> {
        self.inner()
            .entries
            .iter()
            .map(|((stage, topic, partition, key), value)| Stored {
                stage: *stage,
                partition: (topic.clone(), *partition),
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }

    /// Writes every stored key as a JSON line (see [`StateLine`]).
    pub fn write_json(&self, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
        for s in self.entries() {
            serde_json::to_writer(&mut *out, &StateLine::of(&s))?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    /// A store holding the keys of `input`, written by
    /// [`MemoryState::write_json`]. Positions start at 0: the records of a
    /// new input are all new to it. An error names the line.
    pub fn read_json(input: &str, file: &std::path::Path) -> anyhow::Result<Self> {
        let state = MemoryState::new();
        {
            let mut inner = state.inner();
            for (n, line) in input.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let at = || format!("{}:{}", file.display(), n + 1);
                let line: StateLine =
                    serde_json::from_str(line).with_context(|| format!("{}: not a state line", at()))?;
                let key = hex::decode(&line.key_hex).with_context(|| format!("{}: `key_hex` is not hex", at()))?;
                let value =
                    hex::decode(&line.value_hex).with_context(|| format!("{}: `value_hex` is not hex", at()))?;
                inner.entries.insert((line.stage, line.topic.into(), line.partition, key), value);
            }
        }
        Ok(state)
    }

    fn apply(&self, delta: &Delta) -> Result<(), super::Fenced> {
        let mut inner = self.inner();
        delta.check(|topic, partition| inner.positions.get(&(Arc::from(topic), partition)).copied())?;
        for change in &delta.changes {
            let place = (change.stage, change.partition.0.clone(), change.partition.1, change.key.clone());
            match &change.value {
                Some(value) => inner.entries.insert(place, value.clone()),
                None => inner.entries.remove(&place),
            };
        }
        for (partition, at) in &delta.positions {
            let stored = inner.positions.entry(partition.clone()).or_insert(0);
            *stored = (*stored).max(*at);
        }
        Ok(())
    }
}

/// One stored key of `--state-out` / `--state-in`: the stage (transform
/// index, from 0), the source partition, the stored key and its value in
/// hex (exact), and, for reading, what they hold: `entry` (the plugin's key
/// as UTF-8 when it is, else hex) for a plugin entry, `timer` (time, key)
/// for a timer, `clock` (watermark, newest timestamp) for the partition's
/// clock, `version` for its state version.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct StateLine {
    pub stage: u32,
    pub topic: String,
    pub partition: i32,
    pub key_hex: String,
    pub value_hex: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<(i64, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<(Option<i64>, Option<i64>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

impl StateLine {
    fn of(s: &Stored) -> Self {
        let shown = |bytes: &[u8]| match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => hex::encode(bytes),
        };
        let entry = (s.key.first() == Some(&stored::ENTRY)).then(|| shown(&s.key[1..]));
        let timer = match s.key.first() {
            Some(&stored::TIMER) => stored::parse_timer(&s.key).map(|(at, key)| (at, shown(&key))),
            _ => None,
        };
        let clock = (s.key[..] == [stored::CLOCK]).then(|| stored::parse_clock(&s.value));
        let version = (s.key[..] == [stored::VERSION]).then(|| stored::parse_version(&s.value));
        StateLine {
            stage: s.stage,
            topic: s.partition.0.to_string(),
            partition: s.partition.1,
            key_hex: hex::encode(&s.key),
            value_hex: hex::encode(&s.value),
            entry,
            timer,
            clock,
            version,
        }
    }
}

#[async_trait]
impl StateStore for MemoryState {
    async fn load(&self, stage: u32, partition: &Partition) -> anyhow::Result<Loaded> {
        let inner = self.inner();
        let entries = inner
            .entries
            .iter()
            .filter(|((s, topic, p, _), _)| *s == stage && *topic == partition.0 && *p == partition.1)
            .map(|((_, _, _, key), value)| (key.clone(), value.clone()))
            .collect();
        Ok(Loaded { entries, next_offset: inner.positions.get(partition).copied().unwrap_or(0) })
    }

    async fn scan(&self, filter: &Filter) -> anyhow::Result<Vec<Stored>> {
        let entry = filter.key.as_ref().map(|k| stored::entry(k));
        Ok(self
            .entries()
            .into_iter()
            .filter(|s| filter.stage.is_none_or(|stage| stage == s.stage))
            .filter(|s| filter.partition.is_none_or(|p| p == s.partition.1))
            .filter(|s| match (&entry, &filter.key) {
                (Some(entry), Some(key)) => {
                    s.key == *entry || (s.key.first() == Some(&stored::TIMER) && s.key.get(9..) == Some(&key[..]))
                }
                _ => true,
            })
            .collect())
    }

    async fn versions(&self, stage: u32) -> anyhow::Result<BTreeSet<u32>> {
        let inner = self.inner();
        let mut versions = BTreeSet::new();
        let with_entries: BTreeSet<(&Arc<str>, i32)> = inner
            .entries
            .keys()
            .filter(|(s, _, _, key)| *s == stage && key.first() == Some(&stored::ENTRY))
            .map(|(_, topic, partition, _)| (topic, *partition))
            .collect();
        for (topic, partition) in with_entries {
            let version = inner.entries.get(&(stage, topic.clone(), partition, vec![stored::VERSION]));
            versions.insert(version.map_or(0, |v| stored::parse_version(v)));
        }
        Ok(versions)
    }

    async fn stages(&self) -> anyhow::Result<BTreeSet<u32>> {
        Ok(self.inner().entries.keys().map(|(stage, ..)| *stage).collect())
    }

    async fn move_stage(&self, from: u32, to: u32) -> anyhow::Result<u64> {
        let mut inner = self.inner();
        anyhow::ensure!(
            !inner.entries.keys().any(|(s, ..)| *s == to),
            "transform {} holds state already: drop it first",
            to + 1
        );
        let moving: Vec<Place> = inner.entries.keys().filter(|(s, ..)| *s == from).cloned().collect();
        for place in &moving {
            if let Some(value) = inner.entries.remove(place) {
                inner.entries.insert((to, place.1.clone(), place.2, place.3.clone()), value);
            }
        }
        Ok(moving.len() as u64)
    }

    async fn drop_stage(&self, stage: u32) -> anyhow::Result<u64> {
        let mut inner = self.inner();
        let before = inner.entries.len();
        inner.entries.retain(|(s, ..), _| *s != stage);
        Ok((before - inner.entries.len()) as u64)
    }
}

#[async_trait]
impl StateKeeper for MemoryState {
    fn store(&self) -> Arc<dyn StateStore> {
        Arc::new(self.clone())
    }

    async fn commit(
        &self,
        delta: &Delta,
        batch: &[OutputRef<'_>],
        _origins: &[&Origin],
        _refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        anyhow::ensure!(batch.is_empty(), "the state in memory takes no records ({} given)", batch.len());
        self.apply(delta)?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Change;

    fn partition() -> Partition {
        (Arc::from("in"), 0)
    }

    #[tokio::test]
    async fn a_committed_delta_is_loaded_back_and_a_stale_fence_is_refused() {
        let state = MemoryState::new();
        let delta = Delta {
            changes: vec![
                Change { stage: 1, partition: partition(), key: stored::entry(b"k"), value: Some(b"v".to_vec()) },
                Change {
                    stage: 1,
                    partition: partition(),
                    key: vec![stored::VERSION],
                    value: Some(stored::version(2)),
                },
            ],
            positions: vec![(partition(), 10)],
            fences: vec![],
        };
        state.commit(&delta, &[], &[], &()).await.unwrap();
        let loaded = state.load(1, &partition()).await.unwrap();
        assert_eq!((loaded.entries.len(), loaded.next_offset), (2, 10));
        assert_eq!(state.versions(1).await.unwrap(), BTreeSet::from([2]));
        assert_eq!(state.stages().await.unwrap(), BTreeSet::from([1]));
        let stale = Delta { fences: vec![(partition(), 3)], ..Delta::default() };
        assert!(state.commit(&stale, &[], &[], &()).await.unwrap_err().to_string().contains("offset 10"));
    }

    #[tokio::test]
    async fn the_json_lines_read_back_the_same_entries_from_offset_0() {
        let state = MemoryState::new();
        let changes = vec![
            Change { stage: 0, partition: partition(), key: stored::entry(b"BTC\x0060000"), value: Some(vec![0, 255]) },
            Change { stage: 0, partition: partition(), key: stored::timer(120_000, b"BTC"), value: Some(vec![]) },
        ];
        state.apply(&Delta { changes, positions: vec![(partition(), 5)], fences: vec![] }).unwrap();
        let mut out = Vec::new();
        state.write_json(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""entry":"BTC\u000060000""#) && text.contains(r#""timer":[120000,"BTC"]"#), "{text}");
        let back = MemoryState::read_json(&text, std::path::Path::new("s.jsonl")).unwrap();
        assert_eq!(back.entries(), state.entries());
        assert_eq!(back.load(0, &partition()).await.unwrap().next_offset, 0);
        let bad = MemoryState::read_json("{}\n", std::path::Path::new("s.jsonl")).err().unwrap();
        assert!(format!("{bad:#}").contains("s.jsonl:1"), "{bad:#}");
    }
}
