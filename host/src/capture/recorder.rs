//! Recording a live stage: the request, the stage's [`Recorder`], and the
//! writer thread.
//!
//! - [`start`] (the admin API's `POST /pipelines/NAME/record`) puts a
//!   request in the registry and starts a writer thread that sends framed
//!   entries to the caller's channel (the HTTP response's body).
//! - The chain takes the request at the stage's next batch (never halfway
//!   through one) as a [`Recorder`]: the header, then a copy of the state
//!   of each partition the stage holds, then each call. A cheap counter
//!   keeps the look-up off the path of a chain that nobody records.
//! - The calls of a batch wait in the recorder until the batch is
//!   delivered ([`Recorder::release`]): a batch run again after a rollback
//!   is recorded once, as it went out. The live path never waits: a writer
//!   that falls behind by [`QUEUE`] batches ends the recording, and says so.
//! - The writer keeps the bounds (records, time, bytes) and writes the
//!   [`End`] entry; when it ends, the stage drops its recorder.

use super::{frame, Cause, End, Entry, Header, StateEntry, Watermark};
use crate::record::{Bytes, RecordRef, Results};
use crate::record::{Output, Record};
use crate::state::{lock, Partition, SharedState};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Batches of entries that may wait for the writer.
pub const QUEUE: usize = 64;

/// When a recording stops by itself.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// After this many input records.
    pub records: Option<u64>,
    /// After this long (from the request).
    pub duration: Option<Duration>,
    /// After this many bytes of capture.
    pub max_bytes: u64,
}

/// What goes to the writer: the header, or the entries of a delivered batch.
enum Item {
    Header(Box<Header>),
    Entries(Vec<Pending>),
}

/// A recording asked for, until the stage takes it.
struct Request {
    id: u64,
    pipeline: String,
    /// 0-based.
    stage: usize,
    items: SyncSender<Item>,
    stop: Arc<Mutex<Option<String>>>,
    done: Arc<AtomicBool>,
}

/// Requests waiting for their stage, and how many (read on every batch).
static WAITING: AtomicUsize = AtomicUsize::new(0);
static REQUESTS: Mutex<Vec<Request>> = Mutex::new(Vec::new());
static IDS: AtomicU64 = AtomicU64::new(0);
/// Writer threads still sending.
static WRITERS: AtomicUsize = AtomicUsize::new(0);
/// The stages with a recording asked for or running: one at a time each.
static ACTIVE: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());

fn active() -> std::sync::MutexGuard<'static, Vec<(String, usize)>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn requests() -> std::sync::MutexGuard<'static, Vec<Request>> {
    REQUESTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits, at most `limit`, for the recordings' writers to send their
/// last entries (a graceful stop, once the pipelines are stopped: each
/// recording ends with its `end` entry).
pub async fn drain(limit: Duration) {
    let until = Instant::now() + limit;
    while WRITERS.load(Ordering::Acquire) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether any recording waits for its stage (one atomic load: the check
/// a chain makes at each batch).
pub fn waiting() -> bool {
    WAITING.load(Ordering::Acquire) > 0
}

/// Removes request `id` if no stage took it.
fn withdraw(id: u64) {
    let mut requests = requests();
    if let Some(i) = requests.iter().position(|r| r.id == id) {
        requests.remove(i);
        WAITING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Asks stage `stage` (0-based) of `pipeline` for a recording within
/// `bounds`; the framed capture goes to `out` as it is written. The
/// recording ends at its bounds, when `out`'s receiver is dropped, or when
/// the stage goes away (a hot swap, the pipeline stopped). A stage is
/// recorded by one recording at a time: [`Busy`] while another runs.
pub fn start(
    pipeline: &str,
    stage: usize,
    bounds: Bounds,
    out: tokio::sync::mpsc::Sender<Bytes>,
) -> anyhow::Result<()> {
    {
        let mut active = active();
        if active.iter().any(|(p, s)| p == pipeline && *s == stage) {
            return Err(Busy { pipeline: pipeline.to_string(), stage: stage + 1 }.into());
        }
        active.push((pipeline.to_string(), stage));
    }
    let (items, rx) = sync_channel(QUEUE);
    let id = IDS.fetch_add(1, Ordering::AcqRel);
    let stop = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        id,
        pipeline: pipeline.to_string(),
        stage,
        rx,
        out,
        bounds,
        stop: stop.clone(),
        done: done.clone(),
        calls: 0,
        records: 0,
        bytes: 0,
    };
    requests().push(Request { id, pipeline: pipeline.to_string(), stage, items, stop, done });
    WAITING.fetch_add(1, Ordering::AcqRel);
    WRITERS.fetch_add(1, Ordering::AcqRel);
    let spawned =
        std::thread::Builder::new().name(format!("record-{pipeline}-{}", stage + 1)).spawn(move || writer.run());
    if let Err(error) = spawned {
        WRITERS.fetch_sub(1, Ordering::AcqRel);
        withdraw(id);
        release_stage(pipeline, stage);
        anyhow::bail!("cannot start the recording's thread: {error}");
    }
    Ok(())
}

/// A recording of the stage is already asked for or running.
#[derive(Debug, thiserror::Error)]
#[error("transform {stage} of {pipeline} is already being recorded: one recording at a time")]
pub struct Busy {
    pub pipeline: String,
    /// 1-based.
    pub stage: usize,
}

fn release_stage(pipeline: &str, stage: usize) {
    active().retain(|(p, s)| !(p == pipeline && *s == stage));
}

/// The writer thread: frames what the stage sends and keeps the bounds.
struct Writer {
    id: u64,
    pipeline: String,
    stage: usize,
    rx: Receiver<Item>,
    out: tokio::sync::mpsc::Sender<Bytes>,
    bounds: Bounds,
    stop: Arc<Mutex<Option<String>>>,
    done: Arc<AtomicBool>,
    calls: u64,
    records: u64,
    bytes: u64,
}

impl Writer {
    fn run(mut self) {
        let deadline = self.bounds.duration.map(|d| Instant::now() + d);
        let mut started = false;
        let reason = loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break "its time bound (--for) was reached".to_string();
            }
            if self.out.is_closed() {
                break "the reader went away".to_string();
            }
            let item = match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(item) => item,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let stopped = self.stop.lock().ok().and_then(|s| s.clone());
                    break stopped.unwrap_or_else(|| {
                        "the stage went away (a hot swap or rollback replaced its plugin, or the pipeline stopped)"
                            .to_string()
                    });
                }
            };
            let entries = match item {
                Item::Header(header) => {
                    started = true;
                    if !self.send(frame(&*header)) {
                        break "the reader went away".to_string();
                    }
                    continue;
                }
                Item::Entries(entries) => entries,
            };
            let mut gone = false;
            for entry in &entries {
                let bytes = match entry {
                    Pending::State(state, _) => frame(state),
                    Pending::Call(call) => {
                        self.calls += 1;
                        self.records += call.inputs.len() as u64;
                        frame(&view::Call(call))
                    }
                };
                if !self.send(bytes) {
                    gone = true;
                    break;
                }
            }
            if gone {
                break "the reader went away".to_string();
            }
            if self.bounds.records.is_some_and(|n| self.records >= n) {
                break "its record bound (--records) was reached".to_string();
            }
            if self.bytes >= self.bounds.max_bytes {
                break "its size bound (--max-mib) was reached".to_string();
            }
        };
        // The stage drops its recorder when it next delivers a batch.
        self.done.store(true, Ordering::Release);
        withdraw(self.id);
        release_stage(&self.pipeline, self.stage);
        if started {
            let end = End { reason: format!("stopped: {reason}"), calls: self.calls, records: self.records };
            self.send(frame(&Entry::End(end)));
        }
        tracing::info!(recording = self.id, calls = self.calls, records = self.records, bytes = self.bytes, %reason, "recording ended");
        // What is sent is taken by the reader's connection before the
        // thread counts as done (a graceful stop waits for it).
        let until = Instant::now() + Duration::from_secs(2);
        while !self.out.is_closed() && self.out.capacity() < self.out.max_capacity() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        WRITERS.fetch_sub(1, Ordering::AcqRel);
    }

    fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.bytes += bytes.len() as u64;
        self.out.blocking_send(Bytes::from(bytes)).is_ok()
    }
}

/// A stage's recording in progress (see the module's documentation).
pub struct Recorder {
    items: SyncSender<Item>,
    stop: Arc<Mutex<Option<String>>>,
    /// Set by the writer when the recording is over.
    done: Arc<AtomicBool>,
    /// The entries of the batch being run, sent once it is delivered.
    pending: Vec<Pending>,
    /// Partitions whose state the capture holds (sent), with the restore
    /// of the stage's state it was copied from: a partition loaded again
    /// (a rebalance gave it back, maybe changed elsewhere) is copied again.
    seeded: HashMap<Partition, Option<u64>>,
    seq: u64,
}

impl Recorder {
    /// The recording asked of stage `stage` (0-based) of `pipeline`, if
    /// any: its header is sent, then the state of every partition the
    /// stage holds (`state`, before the batch about to run).
    pub fn take(
        pipeline: &str,
        stage: usize,
        state: Option<&SharedState>,
        header: impl FnOnce() -> Header,
    ) -> Option<Recorder> {
        if !waiting() {
            return None;
        }
        let request = {
            let mut requests = requests();
            let i = requests.iter().position(|r| r.pipeline == pipeline && r.stage == stage)?;
            WAITING.fetch_sub(1, Ordering::AcqRel);
            requests.remove(i)
        };
        let mut recorder = Recorder {
            items: request.items,
            stop: request.stop,
            done: request.done,
            pending: Vec::new(),
            seeded: HashMap::new(),
            seq: 0,
        };
        if recorder.items.try_send(Item::Header(Box::new(header()))).is_err() {
            return None;
        }
        if let Some(state) = state {
            let state = lock(state);
            for (partition, _) in state.watermarks() {
                if let Some(loaded) = state.export(&partition) {
                    let load = state.loaded(&partition);
                    recorder.pending.push(state_entry(&partition, loaded, load));
                }
            }
        }
        Some(recorder)
    }

    /// The stage was called on `inputs` (with `cause`, at `now_ms`, the
    /// inputs' partitions at `watermarks`) and gave `results`; `state` is
    /// the stage's (its partitions first seen now are copied as they were
    /// before the batch).
    pub fn offer(
        &mut self,
        cause: Cause,
        now_ms: i64,
        watermarks: Vec<Watermark>,
        inputs: &[RecordRef<'_>],
        results: &Results<String>,
        state: Option<&SharedState>,
    ) {
        if inputs.is_empty() {
            return;
        }
        if let Some(state) = state {
            let mut partitions: Vec<Partition> =
                inputs.iter().map(|r| (r.origin.topic.clone(), r.origin.partition)).collect();
            partitions.sort();
            partitions.dedup();
            let pending: HashSet<Partition> = self.pending_partitions().map(|(p, _)| p).collect();
            let state = lock(state);
            partitions.retain(|p| self.seeded.get(p) != Some(&state.loaded(p)) && !pending.contains(p));
            for partition in partitions {
                if let Some(loaded) = state.export(&partition) {
                    let load = state.loaded(&partition);
                    self.pending.push(state_entry(&partition, loaded, load));
                }
            }
        }
        // The live path only copies the bytes; the writer thread encodes them.
        self.pending.push(Pending::Call(PendingCall {
            seq: 0,
            cause,
            now_ms,
            watermarks,
            inputs: inputs.iter().map(RecordRef::to_record).collect(),
            outputs: results.per_record(),
        }));
    }

    /// The partitions whose state the pending entries copy, with the load.
    fn pending_partitions(&self) -> impl Iterator<Item = (Partition, Option<u64>)> + '_ {
        self.pending.iter().filter_map(|e| match e {
            Pending::State(Entry::State(s), load) => Some(((Arc::from(s.topic.as_str()), s.partition), *load)),
            _ => None,
        })
    }

    /// A batch is run (again): what its last run offered is forgotten.
    pub fn discard(&mut self) {
        self.pending.clear();
    }

    /// The batch was delivered: its entries go to the writer. `false` when
    /// the recording is over (drop the recorder).
    pub fn release(&mut self) -> bool {
        if self.done.load(Ordering::Acquire) {
            return false;
        }
        if self.pending.is_empty() {
            return true;
        }
        let seeded: Vec<(Partition, Option<u64>)> = self.pending_partitions().collect();
        let mut entries = std::mem::take(&mut self.pending);
        for entry in &mut entries {
            if let Pending::Call(call) = entry {
                call.seq = self.seq;
                self.seq += 1;
            }
        }
        match self.items.try_send(Item::Entries(entries)) {
            Ok(()) => {
                self.seeded.extend(seeded);
                true
            }
            Err(TrySendError::Full(_)) => {
                if let Ok(mut stop) = self.stop.lock() {
                    *stop = Some(format!(
                        "the capture's reader fell {QUEUE} batches behind the live stage (the live path does not wait)"
                    ));
                }
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// An entry of a batch, as the stage hands it to the writer.
enum Pending {
    /// A partition's state (an [`Entry::State`]), from which load of it.
    State(Entry, Option<u64>),
    Call(PendingCall),
}

/// A call as the stage saw it: copies of its inputs and of the live
/// results, encoded by the writer thread as a [`super::Call`].
struct PendingCall {
    seq: u64,
    cause: Cause,
    now_ms: i64,
    watermarks: Vec<Watermark>,
    inputs: Vec<Record>,
    outputs: Vec<Result<Vec<Output>, String>>,
}

/// [`PendingCall`] serialised as the format's `{"call": …}` entry, from
/// the bytes where they are (no owned copy of the entry is built).
mod view {
    use super::PendingCall;
    use crate::record::{Header, Output, Record};
    use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
    use serde::{Serialize, Serializer};

    pub struct Call<'a>(pub &'a PendingCall);

    impl Serialize for Call<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let c = self.0;
            let mut map = s.serialize_map(Some(1))?;
            map.serialize_entry("call", &Body(c))?;
            map.end()
        }
    }

    struct Body<'a>(&'a PendingCall);

    impl Serialize for Body<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let c = self.0;
            let mut st = s.serialize_struct("Call", 6)?;
            st.serialize_field("seq", &c.seq)?;
            st.serialize_field("cause", &c.cause)?;
            st.serialize_field("now_ms", &c.now_ms)?;
            st.serialize_field("watermarks", &c.watermarks)?;
            st.serialize_field("inputs", &Seq(&c.inputs, Input))?;
            st.serialize_field("outputs", &Seq(&c.outputs, Outcome))?;
            st.end()
        }
    }

    /// A slice serialised item by item through `F`.
    struct Seq<'a, T, F>(&'a [T], F);

    trait Item<T> {
        fn item<S: Serializer>(&self, value: &T, s: S) -> Result<S::Ok, S::Error>;
    }

    struct With<'a, T, F>(&'a T, &'a F);

    impl<T, F: Item<T>> Serialize for With<'_, T, F> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.1.item(self.0, s)
        }
    }

    impl<T, F: Item<T>> Serialize for Seq<'_, T, F> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for value in self.0 {
                seq.serialize_element(&With(value, &self.1))?;
            }
            seq.end()
        }
    }

    /// Bytes as the format's `Data`: a string when they are UTF-8, else `{"hex": …}`.
    struct Data<'a>(&'a [u8]);

    impl Serialize for Data<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match std::str::from_utf8(self.0) {
                Ok(text) => s.serialize_str(text),
                Err(_) => {
                    let mut map = s.serialize_map(Some(1))?;
                    map.serialize_entry("hex", &hex::encode(self.0))?;
                    map.end()
                }
            }
        }
    }

    struct Headers<'a>(&'a [Header]);

    impl Serialize for Headers<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for h in self.0 {
                seq.serialize_element(&(h.name.as_str(), Data(&h.value)))?;
            }
            seq.end()
        }
    }

    struct Input;

    impl Item<Record> for Input {
        fn item<S: Serializer>(&self, r: &Record, s: S) -> Result<S::Ok, S::Error> {
            let mut st = s.serialize_struct("InputRecord", 7)?;
            st.serialize_field("topic", &*r.origin.topic)?;
            st.serialize_field("partition", &r.origin.partition)?;
            st.serialize_field("offset", &r.origin.offset)?;
            st.serialize_field("key", &r.key.as_deref().map(Data))?;
            st.serialize_field("value", &Data(&r.value))?;
            st.serialize_field("headers", &Headers(&r.headers))?;
            st.serialize_field("timestamp", &r.timestamp)?;
            st.end()
        }
    }

    struct Outcome;

    impl Item<Result<Vec<Output>, String>> for Outcome {
        fn item<S: Serializer>(&self, r: &Result<Vec<Output>, String>, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(Some(1))?;
            match r {
                Ok(outputs) => map.serialize_entry("ok", &Seq(outputs, OutputItem))?,
                Err(error) => map.serialize_entry("error", error)?,
            }
            map.end()
        }
    }

    struct OutputItem;

    impl Item<Output> for OutputItem {
        fn item<S: Serializer>(&self, o: &Output, s: S) -> Result<S::Ok, S::Error> {
            let mut st = s.serialize_struct("OutputRecord", 5)?;
            st.serialize_field("key", &o.key.as_deref().map(Data))?;
            st.serialize_field("value", &Data(&o.value))?;
            st.serialize_field("headers", &Headers(&o.headers))?;
            st.serialize_field("timestamp", &o.timestamp)?;
            st.serialize_field("route", &o.route)?;
            st.end()
        }
    }
}

fn state_entry(partition: &Partition, loaded: crate::state::Loaded, load: Option<u64>) -> Pending {
    let mut entries: Vec<(String, String)> =
        loaded.entries.iter().map(|(k, v)| (hex::encode(k), hex::encode(v))).collect();
    entries.sort();
    Pending::State(
        Entry::State(StateEntry {
            topic: partition.0.to_string(),
            partition: partition.1,
            next_offset: loaded.next_offset,
            entries,
        }),
        load,
    )
}

/// The watermark of each partition of `inputs` in `state`, now.
pub fn watermarks(state: Option<&SharedState>, inputs: &[RecordRef<'_>]) -> Vec<Watermark> {
    let Some(state) = state else { return Vec::new() };
    let mut partitions: Vec<Partition> = inputs.iter().map(|r| (r.origin.topic.clone(), r.origin.partition)).collect();
    partitions.sort();
    partitions.dedup();
    let state = lock(state);
    partitions
        .into_iter()
        .map(|p| Watermark { watermark: state.watermark(&p), topic: p.0.to_string(), partition: p.1 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{CallResult, Capture, Entry};
    use crate::record::{Origin, Output, Record};

    #[test]
    fn a_recording_sends_delivered_batches_once_and_ends_at_its_record_bound() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let bounds = Bounds { records: Some(3), duration: None, max_bytes: 1 << 20 };
        start("unit-recording", 1, bounds.clone(), tx).unwrap();
        let (busy, _) = tokio::sync::mpsc::channel(1);
        let refused = start("unit-recording", 1, bounds, busy).unwrap_err();
        assert!(refused.is::<Busy>(), "one recording of a stage at a time: {refused}");
        assert!(Recorder::take("unit-recording", 0, None, crate::capture::tests::header).is_none(), "another stage");
        let mut recorder = Recorder::take("unit-recording", 1, None, crate::capture::tests::header).unwrap();
        assert!(Recorder::take("unit-recording", 1, None, crate::capture::tests::header).is_none(), "taken once");
        let records: Vec<Record> = (0..2)
            .map(|i| Record {
                value: format!("{{\"n\":{i}}}").into(),
                origin: Origin { topic: "t".into(), partition: 0, offset: i },
                ..Record::default()
            })
            .collect();
        let views: Vec<RecordRef> = records.iter().map(Record::view).collect();
        let mut results = Results::<String>::default();
        results.push_ok([Output { value: "out".into(), route: Some("r".into()), ..Output::from(Record::default()) }]);
        results.push_err("bad".to_string());
        recorder.offer(Cause::Batch, 5, Vec::new(), &views, &results, None);
        // The batch is run again (a rollback): its first run is not recorded.
        recorder.discard();
        recorder.offer(Cause::Batch, 6, Vec::new(), &views, &results, None);
        assert!(recorder.release());
        recorder.offer(Cause::TimersAfterBatch, 7, Vec::new(), &views, &results, None);
        assert!(recorder.release());
        let mut bytes = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            bytes.extend_from_slice(&chunk);
        }
        let capture = Capture::parse(&bytes).unwrap();
        let calls: Vec<_> = capture.calls().map(|c| (c.seq, c.cause, c.now_ms)).collect();
        assert_eq!(calls, vec![(0, Cause::Batch, 6), (1, Cause::TimersAfterBatch, 7)]);
        let first = capture.calls().next().unwrap();
        assert_eq!(first.outputs[1], CallResult::Error("bad".into()));
        assert_eq!(first.inputs[1].value, crate::capture::Data::Text("{\"n\":1}".into()));
        let end = capture.end().unwrap();
        assert!(end.reason.contains("record bound"), "{}", end.reason);
        assert_eq!((end.calls, end.records), (2, 4));
        assert!(matches!(capture.entries.last(), Some(Entry::End(_))));
        // The stage learns that the recording is over, and drops it; the
        // stage may be recorded again.
        assert!(!recorder.release());
        let (again, _) = tokio::sync::mpsc::channel(1);
        let bounds = Bounds { records: None, duration: Some(Duration::from_millis(1)), max_bytes: 1 };
        start("unit-recording", 1, bounds, again).unwrap();
    }

    /// After a rebalance the stage loads a partition again (another
    /// instance may have changed it): the capture copies it again.
    #[test]
    fn a_partition_loaded_again_is_copied_again() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        start("unit-reload", 0, Bounds { records: None, duration: None, max_bytes: 1 << 20 }, tx).unwrap();
        let state = crate::state::StageState::scratch(1 << 20);
        let partition: Partition = ("t".into(), 0);
        let loaded = |v: &[u8]| crate::state::Loaded {
            entries: [(crate::state::stored::entry(b"k"), v.to_vec())].into_iter().collect(),
            next_offset: 0,
        };
        lock(&state).restore(partition.clone(), loaded(b"1"));
        let mut recorder = Recorder::take("unit-reload", 0, Some(&state), crate::capture::tests::header).unwrap();
        let record = Record {
            value: "x".into(),
            origin: Origin { topic: "t".into(), partition: 0, offset: 0 },
            ..Record::default()
        };
        let mut results = Results::<String>::default();
        results.push_ok([]);
        for _ in 0..2 {
            recorder.offer(Cause::Batch, 1, Vec::new(), &[record.view()], &results, Some(&state));
            assert!(recorder.release());
        }
        lock(&state).restore(partition, loaded(b"2"));
        recorder.offer(Cause::Batch, 2, Vec::new(), &[record.view()], &results, Some(&state));
        assert!(recorder.release());
        drop(recorder);
        let mut bytes = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            bytes.extend_from_slice(&chunk);
        }
        let capture = Capture::parse(&bytes).unwrap();
        let copies: Vec<String> = capture
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::State(s) => Some(s.entries[0].1.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(copies, vec!["31".to_string(), "32".to_string()], "copied at the start, and again after the reload");
        assert_eq!(capture.calls().count(), 3);
        assert!(capture.end().unwrap().reason.contains("the stage went away"));
    }

    #[test]
    fn a_recording_stops_at_its_size_bound() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        start("unit-size", 0, Bounds { records: None, duration: None, max_bytes: 1 }, tx).unwrap();
        let mut recorder = Recorder::take("unit-size", 0, None, crate::capture::tests::header).unwrap();
        let record = Record { value: "x".into(), ..Record::default() };
        let mut results = Results::<String>::default();
        results.push_err("e".to_string());
        recorder.offer(Cause::Batch, 1, Vec::new(), &[record.view()], &results, None);
        assert!(recorder.release());
        let mut bytes = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            bytes.extend_from_slice(&chunk);
        }
        let end = Capture::parse(&bytes).unwrap().end().cloned().unwrap();
        assert!(end.reason.contains("size bound (--max-mib)"), "{}", end.reason);
    }
}
