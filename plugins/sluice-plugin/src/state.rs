//! Keyed state (the `state` feature: contract 0.3, `wit/0.3/transform.wit`).
//!
//! Inside [`crate::Transform::process`], [`get`], [`put`] and [`delete`]
//! read and change the state of the source partition of the record being
//! processed; [`get_json`] and [`put_json`] do the same with any serde type.
//! The state survives batches, restarts, rebalances and hot swaps; what a
//! record that returns `Err` changed is undone.
//!
//! ```ignore
//! fn process(&mut self, record: Record) -> Result<Vec<Output>, String> {
//!     let key = record.key.clone().unwrap_or_default();
//!     let count = state::get_json::<u64>(&key)?.unwrap_or(0) + 1;
//!     state::put_json(&key, &count)?;
//!     Ok(vec![Output::new(count.to_string()).with_key(key)])
//! }
//! ```
//!
//! # Cost
//!
//! The first read of a key in a batch asks the host (one call that copies
//! the value in); later reads and writes of it stay in the plugin, and each
//! key written is handed to the host once, when the batch ends.
//!
//! Natively (`cargo test`), the state is a map in the test's thread, so the
//! plugin's logic can be tested across records and batches without a host.

use hashbrown::{Equivalent, HashMap, HashSet};
use std::cell::RefCell;

/// One key's value as the batch sees it.
#[derive(Clone)]
struct Entry {
    value: Option<Vec<u8>>,
    /// Changed in this batch: handed to the host at its end.
    dirty: bool,
}

/// The keys of one partition the batch has touched.
struct Scope {
    topic: String,
    partition: i32,
    /// A record of the batch from this partition: the host's calls name it.
    record: u32,
    entries: HashMap<Vec<u8>, Entry>,
}

#[derive(Default)]
struct Cache {
    scopes: Vec<Scope>,
    /// Timers asked for by the batch: (scope, key, time), each once (a
    /// window's timer is asked for by every record of the window).
    timers: Vec<(usize, Vec<u8>, i64)>,
    timer_set: HashSet<(usize, Vec<u8>, i64)>,
    /// Timers asked for before the record being processed.
    timers_before: usize,
    /// The scope of the record being processed; `None` outside a batch.
    current: Option<usize>,
    /// What the record being processed changed: (scope, the key's bytes in
    /// `undo_keys`, its entry before; `None`: it was not cached).
    undo: Vec<(usize, std::ops::Range<usize>, Option<Entry>)>,
    /// The keys `undo` names, end to end (one buffer, kept across records).
    undo_keys: Vec<u8>,
}

/// A timer of [`Cache::timer_set`], looked up by a borrowed key: it hashes
/// as the tuple does.
#[derive(Hash)]
struct TimerRef<'a>(usize, &'a [u8], i64);

impl Equivalent<(usize, Vec<u8>, i64)> for TimerRef<'_> {
    fn equivalent(&self, timer: &(usize, Vec<u8>, i64)) -> bool {
        self.0 == timer.0 && self.1 == timer.1.as_slice() && self.2 == timer.2
    }
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// The value stored under `key` in the current record's partition.
pub fn get(key: &[u8]) -> Option<Vec<u8>> {
    read(key, |value| value.map(<[u8]>::to_vec))
}

/// `f` of the value stored under `key` (borrowed: [`get`] without a copy).
pub(crate) fn read<R>(key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let Some(scope) = cache.current else { return f(host::get(0, key).as_deref()) };
        f(cache.entry(scope, key).value.as_deref())
    })
}

/// Stores `value` under `key`.
pub fn put(key: &[u8], value: impl Into<Vec<u8>>) {
    set(key, Some(value.into()))
}

/// Removes `key`.
pub fn delete(key: &[u8]) {
    set(key, None)
}

/// Asks for [`crate::Transform::on_timer`] with `key` once the watermark of
/// the current record's partition reaches `at` (ms). Needs the stage's
/// `[transforms.event_time]`.
pub fn set_timer(key: &[u8], at: i64) {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        match cache.current {
            Some(scope) => {
                // A window's timer is asked for by each of its records: the
                // look-up copies nothing.
                if !cache.timer_set.contains(&TimerRef(scope, key, at)) {
                    cache.timer_set.insert((scope, key.to_vec(), at));
                    cache.timers.push((scope, key.to_vec(), at));
                }
            }
            None => host::set_timer(0, key, at),
        }
    })
}

/// The watermark of the current record's partition (ms): records behind it
/// are late and never reach the plugin. `None` before the partition's first
/// record, or without event time.
pub fn watermark() -> Option<i64> {
    CACHE.with(|cache| {
        let cache = cache.borrow();
        let record = cache.current.map_or(0, |scope| cache.scopes[scope].record);
        host::watermark(record)
    })
}

/// [`get`], decoded from JSON.
pub fn get_json<T: serde::de::DeserializeOwned>(key: &[u8]) -> Result<Option<T>, String> {
    get(key)
        .map(|bytes| serde_json::from_slice(&bytes).map_err(|e| format!("state under key {:?}: {e}", show(key))))
        .transpose()
}

/// [`put`], encoded as JSON.
pub fn put_json<T: serde::Serialize>(key: &[u8], value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| format!("state under key {:?}: {e}", show(key)))?;
    put(key, bytes);
    Ok(())
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

fn set(key: &[u8], value: Option<Vec<u8>>) {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let Some(scope) = cache.current else {
            return match value {
                Some(v) => host::put(0, key, &v),
                None => host::delete(0, key),
            };
        };
        let cache = &mut *cache;
        let at = cache.undo_keys.len();
        cache.undo_keys.extend_from_slice(key);
        let entry = Entry { value, dirty: true };
        let before = match cache.scopes[scope].entries.get_mut(key) {
            Some(cached) => Some(std::mem::replace(cached, entry)),
            None => {
                cache.scopes[scope].entries.insert(key.to_vec(), entry);
                None
            }
        };
        cache.undo.push((scope, at..at + key.len(), before));
    })
}

impl Cache {
    /// `key`'s entry in `scope`, read from the host the first time.
    fn entry(&mut self, scope: usize, key: &[u8]) -> &Entry {
        let s = &mut self.scopes[scope];
        let record = s.record;
        // One look-up; the key is copied only the first time.
        s.entries.entry_ref(key).or_insert_with(|| Entry { value: host::get(record, key), dirty: false })
    }
}

/// The SDK's side of a batch (called by [`crate::__rt::process`]).
#[doc(hidden)]
pub mod batch {
    use super::*;

    /// Record `index` of the batch, from `topic`/`partition`, is processed next.
    pub fn begin_record(index: u32, topic: &str, partition: i32) {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            cache.undo.clear();
            cache.undo_keys.clear();
            cache.timers_before = cache.timers.len();
            let found = cache.scopes.iter().position(|s| s.partition == partition && s.topic == topic);
            let scope = found.unwrap_or_else(|| {
                cache.scopes.push(Scope {
                    topic: topic.to_string(),
                    partition,
                    record: index,
                    entries: HashMap::new(),
                });
                cache.scopes.len() - 1
            });
            cache.current = Some(scope);
        })
    }

    /// The record failed: what it changed is undone.
    pub fn undo_record() {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            let cache = &mut *cache;
            let before = cache.timers_before;
            for timer in cache.timers.drain(before..) {
                cache.timer_set.remove(&timer);
            }
            // Newest first: a key written twice ends as it was before both.
            while let Some((scope, key, before)) = cache.undo.pop() {
                let key = &cache.undo_keys[key];
                let entries = &mut cache.scopes[scope].entries;
                match before {
                    Some(entry) => entries.insert(key.to_vec(), entry),
                    // Not cached before: read from the host again if asked.
                    None => entries.remove(key),
                };
            }
            cache.undo_keys.clear();
        })
    }

    /// The batch is done: every key it changed goes to the host once.
    pub fn end() {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            cache.timer_set.clear();
            for (scope, key, at) in std::mem::take(&mut cache.timers) {
                host::set_timer(cache.scopes[scope].record, &key, at);
            }
            cache.timers_before = 0;
            for scope in cache.scopes.drain(..) {
                for (key, entry) in scope.entries {
                    match (entry.dirty, entry.value) {
                        (false, _) => {}
                        (true, Some(value)) => host::put(scope.record, &key, &value),
                        (true, None) => host::delete(scope.record, &key),
                    }
                }
            }
            cache.current = None;
            cache.undo.clear();
            cache.undo_keys.clear();
        })
    }
}

/// The host's state calls.
#[cfg(target_arch = "wasm32")]
mod host {
    use crate::bindings::sluice::transform::state;

    pub fn get(record: u32, key: &[u8]) -> Option<Vec<u8>> {
        state::get(record, key)
    }
    pub fn put(record: u32, key: &[u8], value: &[u8]) {
        state::put(record, key, value)
    }
    pub fn delete(record: u32, key: &[u8]) {
        state::delete(record, key)
    }
    pub fn set_timer(record: u32, key: &[u8], at: i64) {
        state::set_timer(record, key, at)
    }
    pub fn watermark(record: u32) -> Option<i64> {
        state::watermark(record)
    }
}

/// Natively: one map per thread, all partitions in one (a unit test's
/// records come from one place); timers are kept for [`testing::take_timers`].
#[cfg(not(target_arch = "wasm32"))]
mod host {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        static STORE: RefCell<HashMap<Vec<u8>, Vec<u8>>> = RefCell::new(HashMap::new());
        static TIMERS: RefCell<Vec<(Vec<u8>, i64)>> = const { RefCell::new(Vec::new()) };
    }

    pub fn set_timer(_record: u32, key: &[u8], at: i64) {
        TIMERS.with(|t| t.borrow_mut().push((key.to_vec(), at)));
    }
    pub fn watermark(_record: u32) -> Option<i64> {
        None
    }
    /// The timers set so far in this thread (natively), taken.
    pub fn take_timers() -> Vec<(Vec<u8>, i64)> {
        TIMERS.with(|t| std::mem::take(&mut *t.borrow_mut()))
    }

    pub fn get(_record: u32, key: &[u8]) -> Option<Vec<u8>> {
        STORE.with(|s| s.borrow().get(key).cloned())
    }
    pub fn put(_record: u32, key: &[u8], value: &[u8]) {
        STORE.with(|s| s.borrow_mut().insert(key.to_vec(), value.to_vec()));
    }
    pub fn delete(_record: u32, key: &[u8]) {
        STORE.with(|s| s.borrow_mut().remove(key));
    }
}

/// Native unit tests of a stateful plugin.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    /// The timers the plugin set so far (in this thread), taken: fire them
    /// by calling [`crate::Transform::on_timer`].
    pub fn take_timers() -> Vec<(Vec<u8>, i64)> {
        super::host::take_timers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_asked_for_by_many_records_is_handed_over_once() {
        testing::take_timers();
        batch::begin_record(0, "t", 0);
        set_timer(b"w", 60);
        batch::begin_record(1, "t", 0);
        set_timer(b"w", 60);
        set_timer(b"x", 60);
        batch::undo_record(); // x is undone; w stays, record 0 asked for it
        batch::begin_record(2, "t", 0);
        set_timer(b"w", 120);
        batch::end();
        assert_eq!(testing::take_timers(), [(b"w".to_vec(), 60), (b"w".to_vec(), 120)]);
    }

    #[test]
    fn a_batch_reads_its_own_writes_and_a_failed_record_is_undone() {
        put(b"n", b"1".to_vec()); // outside a batch: straight to the store
        batch::begin_record(0, "t", 0);
        assert_eq!(get(b"n").as_deref(), Some(&b"1"[..]));
        put(b"n", b"2".to_vec());
        batch::begin_record(1, "t", 0);
        assert_eq!(get(b"n").as_deref(), Some(&b"2"[..]), "an earlier record of the batch");
        put(b"n", b"3".to_vec());
        delete(b"other");
        batch::undo_record();
        assert_eq!(get(b"n").as_deref(), Some(&b"2"[..]), "the failed record's write is undone");
        assert_eq!(host::get(0, b"n").as_deref(), Some(&b"1"[..]), "nothing reaches the host before the end");
        batch::end();
        assert_eq!(host::get(0, b"n").as_deref(), Some(&b"2"[..]));
        assert_eq!(get_json::<u32>(b"n"), Ok(Some(2)));
        put_json(b"j", &vec![1, 2]).unwrap();
        assert_eq!(get_json::<Vec<u8>>(b"j"), Ok(Some(vec![1, 2])));
        assert!(get_json::<Vec<u8>>(b"n").unwrap_err().contains("key \"n\""));
    }

    #[test]
    fn a_failed_records_blind_writes_are_undone_to_the_stored_value() {
        put(b"blind", b"stored".to_vec());
        batch::begin_record(0, "t", 0);
        // Written without a read (not cached yet), twice, then undone.
        put(b"blind", b"one".to_vec());
        put(b"blind", b"two".to_vec());
        delete(b"fresh");
        batch::undo_record();
        assert_eq!(get(b"blind").as_deref(), Some(&b"stored"[..]), "read from the store again");
        assert_eq!(get(b"fresh"), None);
        batch::begin_record(1, "t", 0);
        put(b"blind", b"three".to_vec());
        batch::end();
        assert_eq!(host::get(0, b"blind").as_deref(), Some(&b"three"[..]));
    }
}
