//! Unit tests of a stage's state through its calls: reads, limits, timers,
//! migrations and TTLs.

use super::stage::{deadline_bytes, entry_bytes};
use super::time::timer_bytes;
use super::time::{self, EventTime};
use super::*;
use crate::record::{Origin, Record};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

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
    assert_eq!(stored.get(&stored::timer(60_000, b"w1")), Some(&None), "the fired timer is deleted");
    assert_eq!(stored.get(&stored::timer(120_000, b"w2")), Some(&Some(vec![])));
    assert_eq!(stored.get(&vec![stored::CLOCK]), Some(&Some(stored::clock(Some(60_000), Some(61_000)))));

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
    let entries = [(vec![stored::CLOCK], stored::clock(Some(10_000), Some(10_000)))];
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
        .map(|&(p, o)| Record { origin: Origin { topic: "t".into(), partition: p, offset: o }, ..Record::default() })
        .collect();
    assert_eq!(positions(&batch), vec![(("t".into(), 0), 8), (("t".into(), 1), 3)]);
}

/// A partition exported (a shadow candidate's copy of the live state) and
/// restored elsewhere reads as it did: entries, timers, clock, version and
/// deadlines, without the batch still pending; a timer forgotten is gone.
#[test]
fn an_exported_partition_restores_as_it_was() {
    let shared: SharedState = Arc::new(Mutex::new(StageState::new(0, 1 << 20)));
    shared.lock().unwrap().set_event_time(event(0));
    shared.lock().unwrap().set_ttl(Some(std::time::Duration::from_secs(60)));
    let p: Partition = ("t".into(), 0);
    let mut c = call(&shared, &[0]);
    c.put(0, b"k".to_vec(), Some(b"v".to_vec())).unwrap();
    c.set_timer(0, b"w".to_vec(), 10_000).unwrap();
    c.keep();
    let mut live = shared.lock().unwrap();
    live.observe(&p, 5_000);
    live.apply_at(&[(p.clone(), 3)], 1_000);
    drop(live);
    // A batch in progress: not part of the copy.
    let mut pending = call(&shared, &[0]);
    pending.put(0, b"k".to_vec(), Some(b"pending".to_vec())).unwrap();
    pending.keep();
    let copy = shared.lock().unwrap().export(&p).unwrap();
    assert!(shared.lock().unwrap().export(&("t".into(), 9)).is_none());
    let mut scratch = StageState::new(0, 1 << 20);
    scratch.restore(p.clone(), copy);
    let live = shared.lock().unwrap();
    assert_eq!((scratch.keys(), scratch.bytes()), (live.keys(), live.bytes()));
    assert_eq!(scratch.watermark(&p), Some(5_000));
    assert_eq!(scratch.next_offset(&p), Some(3));
    drop(live);
    let shared_scratch: SharedState = Arc::new(Mutex::new(scratch));
    assert_eq!(call(&shared_scratch, &[0]).get(0, b"k").unwrap(), Some(b"v".to_vec()));
    let mut scratch = shared_scratch.lock().unwrap();
    assert_eq!(scratch.take_due(true), vec![(p.clone(), 10_000, b"w".to_vec())]);
    scratch.discard();
    let before = scratch.bytes();
    scratch.forget_timer(&p, 10_000, b"w");
    assert_eq!(scratch.bytes(), before - timer_bytes(b"w"));
    assert!(scratch.take_due(true).is_empty(), "the timer is gone");
}
