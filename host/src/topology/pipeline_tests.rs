//! The pipeline task against fakes: delivery order, commits, and crashes
//! at any write.

use super::*;
use crate::record::{Origin, Record};
use crate::record::{OutputRef, Refusals};
use crate::sinks::Rejected;
use async_trait::async_trait;
use std::sync::Mutex;
use std::time::Duration;

/// What the fakes saw, in order.
type Log = Arc<Mutex<Vec<String>>>;

/// A source handing out `batches`, then the end of its input.
struct MemorySource {
    batches: Mutex<std::collections::VecDeque<Vec<Record>>>,
    log: Log,
}

#[async_trait]
impl Source for MemorySource {
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
        Ok(self.batches.lock().unwrap().pop_front().unwrap_or_default())
    }

    async fn commit(&self, batch: &[Record]) -> anyhow::Result<()> {
        let offsets: Vec<String> = batch.iter().map(|r| r.origin.offset.to_string()).collect();
        self.log.lock().unwrap().push(format!("commit {}", offsets.join(",")));
        Ok(())
    }

    async fn flush_commits(&self) -> anyhow::Result<()> {
        self.log.lock().unwrap().push("flush".into());
        Ok(())
    }
}

/// A sink that logs what it writes and, if `refuses`, refuses values
/// starting with "refuse".
struct MemorySink {
    name: &'static str,
    refuses: bool,
    log: Log,
}

#[async_trait]
impl Sink for MemorySink {
    async fn write(&self, batch: &[OutputRef<'_>], _origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        let mut rejected = Vec::new();
        let mut written = Vec::new();
        for (index, out) in batch.iter().enumerate() {
            let value = String::from_utf8_lossy(out.value).into_owned();
            if self.refuses && value.starts_with("refuse") {
                rejected.push(Rejected { index, reason: format!("{value} refused") });
            } else {
                let error = out.headers.iter().find(|h| h.name == "sluice.error");
                match error {
                    Some(h) => written.push(format!("{value} ({})", String::from_utf8_lossy(&h.value))),
                    None => written.push(value),
                }
            }
        }
        self.log.lock().unwrap().push(format!("{} {}", self.name, written.join(",")));
        Ok(rejected)
    }
}

fn record(value: &str, offset: i64, rejected: Option<&str>) -> Record {
    Record {
        value: value.to_string().into(),
        origin: Origin { topic: "t".into(), partition: 0, offset },
        rejected: rejected.map(str::to_string),
        ..Record::default()
    }
}

/// Delivery with no plugin (records pass through): each batch goes to
/// the sink, what the source rejected and what the sink refuses go to the
/// dead letters with their reasons, and the batch is committed only
/// after both have it; at the end of the input the pipeline stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_committed_after_the_sink_and_the_dead_letters_have_it() {
    let log: Log = Arc::default();
    let runtime = Runtime::new(None).unwrap();
    // A pipeline file whose connectors the fakes stand in for.
    let text = "[source]\ntype = \"kafka\"\nbrokers = \"none:9092\"\ntopics = [\"t\"]\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n";
    let spec = crate::config::parse_pipeline(text, std::path::Path::new("/nonexistent/mem.toml"), None).unwrap();
    let source = Arc::new(MemorySource {
        batches: Mutex::new(
            [
                vec![record("a", 0, None), record("cut", 1, Some("too long")), record("b", 2, None)],
                vec![record("refuse-c", 3, None), record("d", 4, None)],
            ]
            .into(),
        ),
        log: log.clone(),
    });
    let chain = Chain::new(&runtime, &[], "mem").unwrap();
    let task = PipelineTask {
        refused: Refused::default(),
        spec,
        source,
        chain,
        sinks: [(
            "out".to_string(),
            Box::new(MemorySink { name: "out", refuses: true, log: log.clone() }) as Box<dyn Sink>,
        )]
        .into(),
        dead_letter: Box::new(MemorySink { name: "dead", refuses: false, log: log.clone() }),
        state: None,
    };
    let (_swap, swaps) = mpsc::unbounded_channel();
    task.run(CancellationToken::new(), swaps).await.unwrap();
    assert_eq!(
        log.lock().unwrap().clone(),
        [
            "out a,b",
            "dead cut (too long)",
            "commit 0,1,2",
            "out d",
            "dead refuse-c (sink out: refuse-c refused)",
            "commit 3,4",
            "flush",
        ]
    );
}

/// What outlives a crash: the exactly-once sink's rows and the offset
/// stored with them, and the dead letters (source offsets), plus the
/// write at which this run crashes.
#[derive(Default)]
struct Durable {
    rows: Vec<i64>,
    next: i64,
    dead: Vec<i64>,
    /// Writes so far (sink commits and dead-letter writes).
    writes: usize,
    /// The write that never returns (the crash), and whether it is
    /// durable before the crash.
    crash_at: Option<(usize, bool)>,
    crashed: bool,
}

type Shared = Arc<Mutex<Durable>>;

/// One write: durable (`apply`) unless the crash comes first; at the
/// crash the write never returns.
async fn durable_write(shared: &Shared, apply: impl FnOnce(&mut Durable)) {
    let crash = {
        let mut d = shared.lock().unwrap();
        d.writes += 1;
        let crash = d.crash_at.filter(|(at, _)| *at == d.writes);
        if crash.is_none_or(|(_, durable)| durable) {
            apply(&mut d);
        }
        d.crashed |= crash.is_some();
        crash.is_some()
    };
    if crash {
        std::future::pending::<()>().await;
    }
}

/// An exactly-once sink: skips records below its stored offset, refuses
/// values starting with "refuse" and hands them to the dead letters
/// before it commits its rows with the offset.
struct CommittingSink(Shared);

#[async_trait]
impl Sink for CommittingSink {
    async fn write(&self, batch: &[OutputRef<'_>], origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        self.write_committed(batch, origins, &()).await
    }

    fn commits_positions(&self) -> bool {
        true
    }

    async fn write_committed(
        &self,
        batch: &[OutputRef<'_>],
        origins: &[&Origin],
        refusals: &dyn Refusals,
    ) -> anyhow::Result<Vec<Rejected>> {
        let stored = self.0.lock().unwrap().next;
        let (mut rows, mut refused) = (Vec::new(), Vec::new());
        for (index, (out, origin)) in batch.iter().zip(origins).enumerate() {
            if origin.offset < stored {
                continue;
            }
            if out.value.starts_with(b"refuse") {
                refused.push(Rejected { index, reason: "refused".into() });
            } else {
                rows.push(origin.offset);
            }
        }
        if !refused.is_empty() {
            refusals.keep(&refused).await?;
        }
        let next = origins.iter().map(|o| o.offset + 1).max().unwrap_or(stored).max(stored);
        durable_write(&self.0, |d| {
            d.rows.extend(rows);
            d.next = next;
        })
        .await;
        Ok(refused)
    }
}

/// The dead-letter destination: keeps each dead letter's origin offset.
struct DeadLetters(Shared);

#[async_trait]
impl Sink for DeadLetters {
    async fn write(&self, _batch: &[OutputRef<'_>], origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        let offsets: Vec<i64> = origins.iter().map(|o| o.offset).collect();
        durable_write(&self.0, |d| d.dead.extend(offsets)).await;
        Ok(Vec::new())
    }
}

/// Runs the pipeline over `batches` (read again from the start, as a
/// file source is after a restart) until it ends or crashes; true when
/// it ended.
async fn run_until_end_or_crash(batches: &[Vec<Record>], shared: &Shared) -> bool {
    let runtime = Runtime::new(None).unwrap();
    let text = "[source]\ntype = \"kafka\"\nbrokers = \"none:9092\"\ntopics = [\"t\"]\n[sinks.pg]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n";
    let spec = crate::config::parse_pipeline(text, std::path::Path::new("/nonexistent/p.toml"), None).unwrap();
    let source = Arc::new(MemorySource { batches: Mutex::new(batches.iter().cloned().collect()), log: Log::default() });
    let task = PipelineTask {
        refused: Refused::default(),
        spec,
        source,
        chain: Chain::new(&runtime, &[], "p").unwrap(),
        sinks: [("pg".to_string(), Box::new(CommittingSink(shared.clone())) as Box<dyn Sink>)].into(),
        dead_letter: Box::new(DeadLetters(shared.clone())),
        state: None,
    };
    let (_swap, swaps) = mpsc::unbounded_channel();
    let run = tokio::spawn(task.run(CancellationToken::new(), swaps));
    loop {
        if run.is_finished() {
            run.await.unwrap().unwrap();
            return true;
        }
        if shared.lock().unwrap().crashed {
            run.abort(); // the crash: nothing after it happens
            let _ = run.await;
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
    /// For any batches of records the source rejects, the sink refuses
    /// or takes, and crashes at any write (before or after it is
    /// durable), restarted until a run ends: every record is in the
    /// sink once or in the dead letters (at least once, one record per
    /// origin), never both, never neither.
    #[test]
    fn every_record_ends_in_the_sink_once_or_in_the_dead_letters_through_crashes(
        kinds in proptest::collection::vec(proptest::collection::vec(0..3u8, 1..6), 1..5),
        crashes in proptest::collection::vec((1..12usize, proptest::bool::ANY), 0..4),
    ) {
        let mut offset = 0;
        let batches: Vec<Vec<Record>> = kinds
            .iter()
            .map(|batch| {
                batch
                    .iter()
                    .map(|kind| {
                        offset += 1;
                        match kind {
                            0 => record(&format!("ok-{offset}"), offset, None),
                            1 => record(&format!("refuse-{offset}"), offset, None),
                            _ => record(&format!("bad-{offset}"), offset, Some("not JSON")),
                        }
                    })
                    .collect()
            })
            .collect();
        let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let shared: Shared = Arc::default();
        for crash in crashes.into_iter().map(Some).chain([None]) {
            {
                let mut d = shared.lock().unwrap();
                d.writes = 0;
                d.crashed = false;
                d.crash_at = crash;
            }
            if tokio.block_on(run_until_end_or_crash(&batches, &shared)) {
                break;
            }
        }
        let d = shared.lock().unwrap();
        let mut rows = d.rows.clone();
        rows.sort();
        let before = rows.len();
        rows.dedup();
        proptest::prop_assert_eq!(before, rows.len(), "a row written twice");
        let mut dead = d.dead.clone();
        dead.sort();
        dead.dedup();
        let mut want_rows = Vec::new();
        let mut want_dead = Vec::new();
        for r in batches.iter().flatten() {
            match r.value.starts_with(b"ok") {
                true => want_rows.push(r.origin.offset),
                false => want_dead.push(r.origin.offset),
            }
        }
        proptest::prop_assert_eq!(rows, want_rows);
        proptest::prop_assert_eq!(dead, want_dead);
    }
}
