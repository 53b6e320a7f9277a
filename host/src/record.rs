//! The host's record types: what sources produce, transforms consume and sinks write.
//! They mirror `wit/transform.wit` but belong to the host, so connectors never
//! depend on a WIT version.
//!
//! Keys and values are [`Bytes`]. The outputs of a batch are kept as
//! [`Outputs`]: ranges of the one results buffer the plugin returned (for
//! contract 0.2), which the sinks read as borrowed [`OutputRef`] views and
//! a chain hands on to its next stage without copying.

pub use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;

/// A record header (ordered; a name may repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// Where a record was read from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// Shared by the records of a batch read from one topic: no allocation
    /// per record, and the 0.2 encoder recognises it by pointer.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

impl Origin {
    /// The origin of a fired timer's record (contract 0.3) in `partition`:
    /// offset -1, which no source record has.
    pub fn timer(topic: Arc<str>, partition: i32) -> Self {
        Origin { topic, partition, offset: -1 }
    }

    /// Whether a source record is at this origin (not a fired timer): only
    /// those move offsets, and only their rows are checked against them.
    pub fn is_source(&self) -> bool {
        self.offset >= 0
    }
}

/// One record read from a source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub origin: Origin,
    /// Set by a source that could not take the record whole (e.g. a
    /// WebSocket frame over `max_message_bytes`): the record skips the
    /// transforms and goes to the dead letters with this reason.
    pub rejected: Option<String>,
}

impl Record {
    /// The record as a transform stage reads it.
    pub fn view(&self) -> RecordRef<'_> {
        RecordRef {
            key: self.key.as_deref(),
            value: &self.value,
            headers: &self.headers,
            timestamp: self.timestamp,
            origin: &self.origin,
        }
    }
}

/// A record as a transform stage reads it, borrowed: from the source's batch
/// (the first stage), or an output of the stage before with the origin of
/// its source record (the stages after). Nothing is copied between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: &'a [Header],
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub origin: &'a Origin,
}

impl RecordRef<'_> {
    /// The record, owned: its bytes copied, its topic shared (for a thread
    /// of its own: a shadow's candidate, a recording's writer).
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key.map(Bytes::copy_from_slice),
            value: Bytes::copy_from_slice(self.value),
            headers: self.headers.to_vec(),
            timestamp: self.timestamp,
            origin: self.origin.clone(),
            rejected: None,
        }
    }
}

impl<'a> OutputRef<'a> {
    /// The output as the next stage's input, from the source record at `origin`.
    pub fn as_input(&self, origin: &'a Origin) -> RecordRef<'a> {
        RecordRef { key: self.key, value: self.value, headers: self.headers, timestamp: self.timestamp, origin }
    }
}

/// One record produced by a transform (or passed through when there is
/// none), owned: the 0.1 contract's outputs, dead letters, tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    /// A named sink of the pipeline; `None` is the default sink.
    pub route: Option<String>,
}

impl From<Record> for Output {
    /// Passthrough: the record as it came, to the default sink.
    fn from(r: Record) -> Self {
        Output { key: r.key, value: r.value, headers: r.headers, timestamp: r.timestamp, route: None }
    }
}

impl Output {
    /// The output as the sinks take it.
    pub fn view(&self) -> OutputRef<'_> {
        OutputRef {
            key: self.key.as_deref(),
            value: &self.value,
            headers: &self.headers,
            timestamp: self.timestamp,
            route: self.route.as_deref(),
        }
    }
}

/// An output as the sinks read it: borrowed from the batch's [`Outputs`]
/// (or from an [`Output`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputRef<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: &'a [Header],
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    /// A named sink of the pipeline; `None` is the default sink.
    pub route: Option<&'a str>,
}

impl OutputRef<'_> {
    /// Bytes of key, value and headers (what the output limits count).
    pub fn bytes(&self) -> usize {
        self.value.len()
            + self.key.map_or(0, <[u8]>::len)
            + self.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
    }
}

/// `len` bytes from `start` of one of the batch's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Slice {
    start: usize,
    len: usize,
}

/// [`Entry::key_buf`] of an output without a key.
const NO_KEY: u32 = u32::MAX;

/// One output: 64 bytes of ranges and indices, no reference count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    key: Slice,
    value: Slice,
    timestamp: i64,
    key_buf: u32,
    value_buf: u32,
    first_header: u32,
    headers: u32,
    /// 0: none (the default sink); else the index in `routes` plus one.
    route: u32,
    has_timestamp: bool,
}

impl Entry {
    /// Key and value as (buffer, slice); headers as (first, count); route as in [`Entry::route`].
    #[inline(always)]
    fn new(
        key: Option<(u32, Slice)>,
        (value_buf, value): (u32, Slice),
        timestamp: Option<i64>,
        (first_header, headers): (u32, u32),
        route: u32,
    ) -> Self {
        let (key_buf, key) = key.unwrap_or((NO_KEY, Slice::default()));
        Entry {
            key,
            key_buf,
            value,
            value_buf,
            timestamp: timestamp.unwrap_or(0),
            has_timestamp: timestamp.is_some(),
            first_header,
            headers,
            route,
        }
    }
}

/// Every output of a batch, in order. Their keys and values are ranges of
/// a few shared buffers (for contract 0.2: the plugin's one results
/// buffer), so that an output costs a 64-byte entry: no `Bytes` with its
/// reference count, no vector per output. Routes are stored once per batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    buffers: Vec<Bytes>,
    entries: Vec<Entry>,
    headers: Vec<Header>,
    routes: Vec<Box<str>>,
}

impl Outputs {
    pub fn with_capacity(outputs: usize) -> Self {
        Outputs { entries: Vec::with_capacity(outputs), ..Outputs::default() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Output `i`.
    pub fn get(&self, i: usize) -> Option<OutputRef<'_>> {
        self.entries.get(i).map(|e| self.view(e))
    }

    /// All the outputs, in order.
    pub fn iter(&self) -> Iter<'_> {
        self.range(0..self.len())
    }

    /// The outputs in `range` (none of those outside).
    pub fn range(&self, range: Range<usize>) -> Iter<'_> {
        Iter { outputs: self, entries: self.entries.get(range).unwrap_or_default().iter() }
    }

    /// Output `i`, owned (its bytes still shared, not copied).
    pub fn to_output(&self, i: usize) -> Option<Output> {
        let e = self.entries.get(i)?;
        let bytes = |buf: u32, s: Slice| self.locate(buf, s).map(|(b, range)| b.slice(range)).unwrap_or_default();
        let view = self.view(e);
        Some(Output {
            key: (e.key_buf != NO_KEY).then(|| bytes(e.key_buf, e.key)),
            value: bytes(e.value_buf, e.value),
            headers: view.headers.to_vec(),
            timestamp: view.timestamp,
            route: view.route.map(str::to_string),
        })
    }

    fn view(&self, e: &Entry) -> OutputRef<'_> {
        let bytes = |buf: u32, s: Slice| self.locate(buf, s).map_or(&[][..], |(b, range)| &b[range]);
        let first = e.first_header as usize;
        OutputRef {
            key: (e.key_buf != NO_KEY).then(|| bytes(e.key_buf, e.key)),
            value: bytes(e.value_buf, e.value),
            headers: self.headers.get(first..first + e.headers as usize).unwrap_or_default(),
            timestamp: e.has_timestamp.then_some(e.timestamp),
            route: e.route.checked_sub(1).and_then(|r| self.routes.get(r as usize)).map(|r| &**r),
        }
    }

    /// The buffer of slice `s` and its range there; `None` if it lies outside.
    fn locate(&self, buf: u32, s: Slice) -> Option<(&Bytes, Range<usize>)> {
        let b = self.buffers.get(buf as usize)?;
        let end = s.start.checked_add(s.len).filter(|&end| end <= b.len())?;
        Some((b, s.start..end))
    }

    /// Keeps `buf` for the outputs pushed with [`Outputs::push_slices`]; returns its index.
    pub fn add_buffer(&mut self, buf: Bytes) -> u32 {
        self.buffers.push(buf);
        (self.buffers.len() - 1) as u32
    }

    /// Adds an output whose key and value are ranges of buffer `buf`
    /// ([`Outputs::add_buffer`]); the caller has checked them against it
    /// (one that is not reads as empty).
    #[inline]
    pub fn push_slices(
        &mut self,
        buf: u32,
        key: Option<Range<usize>>,
        value: Range<usize>,
        timestamp: Option<i64>,
        headers: Vec<Header>,
        route: Option<&str>,
    ) {
        let slice = |r: Range<usize>| Slice { start: r.start, len: r.end.saturating_sub(r.start) };
        self.push_entry(key.map(|k| (buf, slice(k))), (buf, slice(value)), timestamp, headers, route);
    }

    /// Adds outputs without headers or route: (key, value, timestamp), the
    /// key and value as (start, length) in buffer `buf`, checked by the
    /// caller as for [`Outputs::push_slices`]. One reservation for all of
    /// them when `outputs` knows its length.
    #[inline(always)]
    pub fn extend_slices(
        &mut self,
        buf: u32,
        outputs: impl Iterator<Item = (Option<(usize, usize)>, (usize, usize), Option<i64>)>,
    ) {
        let first_header = self.headers.len() as u32;
        self.entries.extend(outputs.map(|(key, (start, len), timestamp)| {
            Entry::new(
                key.map(|(start, len)| (buf, Slice { start, len })),
                (buf, Slice { start, len }),
                timestamp,
                (first_header, 0),
                0,
            )
        }));
    }

    /// Adds an owned output (its key and value become buffers of their own).
    pub fn push(&mut self, out: Output) {
        let mut own = |b: Bytes| {
            let whole = Slice { start: 0, len: b.len() };
            (self.add_buffer(b), whole)
        };
        let key = out.key.map(&mut own);
        let value = own(out.value);
        self.push_entry(key, value, out.timestamp, out.headers, out.route.as_deref());
    }

    /// Adds an output: key and value as (buffer, slice) pairs.
    #[inline(always)]
    fn push_entry(
        &mut self,
        key: Option<(u32, Slice)>,
        (value_buf, value): (u32, Slice),
        timestamp: Option<i64>,
        headers: Vec<Header>,
        route: Option<&str>,
    ) {
        let (first_header, count) = (self.headers.len() as u32, headers.len() as u32);
        if count > 0 {
            self.headers.extend(headers);
        }
        let route = route.map_or(0, |r| self.intern(r));
        self.entries.push(Entry::new(key, (value_buf, value), timestamp, (first_header, count), route));
    }

    /// Output `i` without a route gets `route` (a chain's later stage keeps
    /// the route its input had).
    pub fn inherit_route(&mut self, i: usize, route: Option<&str>) {
        let Some(route) = route else { return };
        if self.entries.get(i).is_some_and(|e| e.route == 0) {
            let index = self.intern(route);
            self.entries[i].route = index;
        }
    }

    /// Keeps the outputs whose `keep` is true (those past its end too).
    pub fn retain(&mut self, keep: &[bool]) {
        if !keep.contains(&false) {
            return;
        }
        let mut i = 0;
        self.entries.retain(|_| {
            i += 1;
            keep.get(i - 1).copied().unwrap_or(true)
        });
    }

    /// Drops the outputs from `len` on.
    fn truncate(&mut self, len: usize) {
        if let Some(e) = self.entries.get(len) {
            self.headers.truncate(e.first_header as usize);
        }
        self.entries.truncate(len);
    }

    /// Appends the outputs of `other`.
    pub fn append(&mut self, other: Outputs) {
        let (buffers, headers) = (self.buffers.len() as u32, self.headers.len() as u32);
        let routes: Vec<u32> = other.routes.iter().map(|r| self.intern(r)).collect();
        self.buffers.extend(other.buffers);
        self.headers.extend(other.headers);
        self.entries.extend(other.entries.into_iter().map(|mut e| {
            if e.key_buf != NO_KEY {
                e.key_buf += buffers;
            }
            e.value_buf += buffers;
            e.first_header += headers;
            e.route = e.route.checked_sub(1).and_then(|r| routes.get(r as usize)).copied().unwrap_or(0);
            e
        }));
    }

    /// The index (plus one) of `route` in the batch's routes.
    fn intern(&mut self, route: &str) -> u32 {
        let index = match self.routes.iter().rposition(|r| **r == *route) {
            Some(index) => index,
            None => {
                self.routes.push(route.into());
                self.routes.len() - 1
            }
        };
        index as u32 + 1
    }
}

/// Iterates over outputs as [`OutputRef`] views.
#[derive(Clone)]
pub struct Iter<'a> {
    outputs: &'a Outputs,
    entries: std::slice::Iter<'a, Entry>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = OutputRef<'a>;

    fn next(&mut self) -> Option<OutputRef<'a>> {
        self.entries.next().map(|e| self.outputs.view(e))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// What a transform made of a batch: every output in one [`Outputs`], in
/// the order of their input records, and per input record how many of
/// them are its own, or why it failed (`E`).
///
/// One store per batch, not a vector per record: the 0.2 decoder knows the
/// batch's output count, and the chain and the sinks take the outputs in
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Results<E> {
    outputs: Outputs,
    records: Vec<Result<usize, E>>,
}

impl<E> Default for Results<E> {
    fn default() -> Self {
        Results { outputs: Outputs::default(), records: Vec::new() }
    }
}

impl<E> Results<E> {
    pub fn with_capacity(records: usize, outputs: usize) -> Self {
        Results { outputs: Outputs::with_capacity(outputs), records: Vec::with_capacity(records) }
    }

    /// Keeps `buf` for the outputs [`Results::push_with`] adds as its ranges.
    pub fn add_buffer(&mut self, buf: Bytes) -> u32 {
        self.outputs.add_buffer(buf)
    }

    /// Room for `outputs` owned outputs ([`Results::push_ok`]): each brings
    /// its key and value as buffers of their own.
    pub fn with_owned_capacity(records: usize, outputs: usize) -> Self {
        let mut results = Self::with_capacity(records, outputs);
        results.outputs.buffers.reserve(2 * outputs);
        results
    }

    /// Outputs, and per record how many of them are its own (they must add
    /// up to the outputs; those past the sum are never read) or its error.
    pub fn from_parts(outputs: Outputs, records: Vec<Result<usize, E>>) -> Self {
        Results { outputs, records }
    }

    /// Adds the next record's outputs.
    pub fn push_ok(&mut self, outputs: impl IntoIterator<Item = Output>) {
        let before = self.outputs.len();
        for out in outputs {
            self.outputs.push(out);
        }
        self.records.push(Ok(self.outputs.len() - before));
    }

    /// Adds the next record as failed.
    pub fn push_err(&mut self, error: E) {
        self.records.push(Err(error));
    }

    /// Adds the next record: `fill` appends its outputs to the batch's (those
    /// of the records before stay as they are); on `Err` they are taken back.
    pub fn push_with(&mut self, fill: impl FnOnce(&mut Outputs) -> Result<(), E>) {
        let before = self.outputs.len();
        match fill(&mut self.outputs) {
            Ok(()) => self.records.push(Ok(self.outputs.len() - before)),
            Err(error) => {
                self.outputs.truncate(before);
                self.records.push(Err(error));
            }
        }
    }

    /// Appends the records of `other`.
    pub fn append(&mut self, other: Results<E>) {
        self.outputs.append(other.outputs);
        self.records.extend(other.records);
    }

    /// Input records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Outputs of all the records.
    pub fn output_count(&self) -> usize {
        self.outputs.len()
    }

    /// Every output, in order.
    pub fn outputs(&self) -> &Outputs {
        &self.outputs
    }

    /// Per record, how many of the outputs are its own, or its error.
    pub fn records(&self) -> &[Result<usize, E>] {
        &self.records
    }

    /// Each record's outputs, or its error, in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Iter<'_>, &E>> + '_ {
        let mut next = 0;
        self.records.iter().map(move |r| match r {
            Ok(n) => {
                let outputs = self.outputs.range(next..next + n);
                next += n;
                Ok(outputs)
            }
            Err(e) => Err(e),
        })
    }

    /// The failed records' errors.
    pub fn errors(&self) -> impl Iterator<Item = &E> + '_ {
        self.records.iter().filter_map(|r| r.as_ref().err())
    }

    /// The outputs, and per record how many of them are its own, or its error.
    pub fn into_parts(self) -> (Outputs, Vec<Result<usize, E>>) {
        (self.outputs, self.records)
    }

    /// A copy of each record's outputs, or its error (a shadow's and a
    /// recording's copy of what the live stage made).
    pub fn per_record(&self) -> Vec<Result<Vec<Output>, E>>
    where
        E: Clone,
    {
        let mut next = 0;
        self.records
            .iter()
            .map(|r| match r {
                Ok(n) => {
                    let mine = (next..next + n).filter_map(|i| self.outputs.to_output(i)).collect();
                    next += n;
                    Ok(mine)
                }
                Err(e) => Err(e.clone()),
            })
            .collect()
    }

    /// A vector of owned outputs per record (for tests and `sluice plugin test`).
    pub fn into_records(self) -> Vec<Result<Vec<Output>, E>> {
        let mut next = 0;
        let outputs = &self.outputs;
        self.records
            .into_iter()
            .map(|r| {
                r.map(|n| {
                    let mine = (next..next + n).filter_map(|i| outputs.to_output(i)).collect();
                    next += n;
                    mine
                })
            })
            .collect()
    }

    pub fn map_err<F>(self, mut f: impl FnMut(E) -> F) -> Results<F> {
        Results { outputs: self.outputs, records: self.records.into_iter().map(|r| r.map_err(&mut f)).collect() }
    }
}

/// A record the sink can never write (e.g. a value that does not fit the
/// table): it goes to the dead-letter destination instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index in the batch given to the sink.
    pub index: usize,
    pub reason: String,
}

/// Where a sink that commits source positions with its data
/// (an exactly-once sink) puts the records it refuses before it
/// commits: the pipeline's dead letters. An `Err` means they may not be
/// kept: the sink must not commit (the caller retries the batch).
#[async_trait::async_trait]
pub trait Refusals: Send + Sync {
    async fn keep(&self, refused: &[Rejected]) -> anyhow::Result<()>;
}

/// No keeper: the refusals are returned to the caller only (tests, tools).
#[async_trait::async_trait]
impl Refusals for () {
    async fn keep(&self, _refused: &[Rejected]) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(v: &str) -> Output {
        Output { value: Bytes::copy_from_slice(v.as_bytes()), ..Output::default() }
    }

    #[test]
    fn results_keep_each_records_outputs_apart() {
        let mut results: Results<String> = Results::default();
        results.push_ok([out("a"), out("b")]);
        results.push_err("bad".to_string());
        // A record that fails half-way: its outputs are taken back, not the ones before.
        results.push_with(|all| {
            all.push(Output { headers: vec![Header { name: "h".into(), value: b"v".to_vec() }], ..out("half") });
            Err("failed after one output".to_string())
        });
        results.push_ok([]);
        results.push_with(|all| {
            all.push(out("c"));
            Ok(())
        });
        let mut more = Results::default();
        more.push_ok([Output {
            route: Some("r".into()),
            key: Some(Bytes::from_static(b"k")),
            timestamp: Some(7),
            ..out("d")
        }]);
        results.append(more);
        assert_eq!((results.len(), results.output_count()), (6, 4));
        assert_eq!(results.errors().collect::<Vec<_>>(), ["bad", "failed after one output"]);
        let values: Vec<Result<Vec<&[u8]>, &String>> =
            results.iter().map(|r| r.map(|o| o.map(|o| o.value).collect())).collect();
        assert_eq!(
            values,
            [
                Ok(vec![&b"a"[..], b"b"]),
                Err(&"bad".to_string()),
                Err(&"failed after one output".to_string()),
                Ok(vec![]),
                Ok(vec![&b"c"[..]]),
                Ok(vec![&b"d"[..]])
            ]
        );
        assert!(results.outputs().iter().all(|o| o.headers.is_empty()), "the failed record's header went with it");
        let d = results.outputs().get(3).unwrap();
        assert_eq!((d.key, d.timestamp, d.route), (Some(&b"k"[..]), Some(7), Some("r")));
        let records = results.clone().into_records();
        assert_eq!(records[0], Ok(vec![out("a"), out("b")]));
        assert_eq!(
            records[5],
            Ok(vec![Output {
                route: Some("r".into()),
                key: Some(Bytes::from_static(b"k")),
                timestamp: Some(7),
                ..out("d")
            }])
        );
        let mapped = results.map_err(|e| e.len());
        assert_eq!(mapped.errors().copied().collect::<Vec<_>>(), [3, 23]);
    }

    #[test]
    fn outputs_are_ranges_of_a_shared_buffer() {
        let mut outputs = Outputs::default();
        let buf = outputs.add_buffer(Bytes::from_static(b"keyvalueroute"));
        outputs.push_slices(buf, Some(0..3), 3..8, None, vec![], Some("route"));
        outputs.push_slices(buf, None, 8..13, Some(1), vec![Header { name: "n".into(), value: vec![1] }], None);
        // A range the caller failed to check reads as empty, never out of bounds.
        outputs.push_slices(buf, None, 10..99, None, vec![], None);
        let views: Vec<OutputRef> = outputs.iter().collect();
        assert_eq!((views[0].key, views[0].value, views[0].route), (Some(&b"key"[..]), &b"value"[..], Some("route")));
        assert_eq!(
            (views[1].key, views[1].value, views[1].timestamp, views[1].headers.len()),
            (None, &b"route"[..], Some(1), 1)
        );
        assert_eq!(views[2].value, b"");
        // Routes are inherited only where there is none; dropped outputs go.
        outputs.inherit_route(0, Some("other"));
        outputs.inherit_route(1, Some("other"));
        assert_eq!(outputs.get(1).unwrap().route, Some("other"));
        assert_eq!(outputs.get(0).unwrap().route, Some("route"));
        outputs.retain(&[true, false]);
        assert_eq!(outputs.iter().map(|o| o.value).collect::<Vec<_>>(), [&b"value"[..], b""]);
        // The owned copy shares the buffer.
        let owned = outputs.to_output(0).unwrap();
        assert_eq!(owned.value.as_ptr(), outputs.get(0).unwrap().value.as_ptr());
    }
}
