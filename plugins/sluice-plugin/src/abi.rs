//! The guest side of contract 0.2 (`wit/transform.wit`): borrowed views of
//! the records in the host's batch buffer, and the writer of the results
//! buffer. Pure Rust, so it runs (and is tested) natively too.
//!
//! A plugin sees [`RecordView`]s and writes through [`Outputs`]; the owned
//! [`Record`]/[`Output`] API of [`crate::Transform::process`] is built on them.

use crate::{Header, Origin, Output, Record};

/// `S L B 2`: the first four bytes of a batch.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SLB2");
/// `S L O 2`: the first four bytes of a results buffer.
pub const RESULTS_MAGIC: u32 = u32::from_le_bytes(*b"SLO2");
const HEADER_BYTES: usize = 32;
const RECORD_BYTES: usize = 56;
const OUTPUT_BYTES: usize = 48;

/// Why a batch from the host cannot be read (a host bug: the guest traps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed batch from the host: {}", self.0)
    }
}

fn u32_at(buf: &[u8], at: usize) -> Result<u32, Malformed> {
    buf.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(Malformed("table outside the buffer"))
}

fn range(buf: &[u8], off: u32, len: u32) -> Result<&[u8], Malformed> {
    let start = off as usize;
    start
        .checked_add(len as usize)
        .and_then(|end| buf.get(start..end))
        .ok_or(Malformed("byte range outside the buffer"))
}

fn table(buf: &[u8], off: u32, count: u32, entry: usize) -> Result<usize, Malformed> {
    let size = (count as usize).checked_mul(entry).ok_or(Malformed("table too large"))?;
    range(buf, off, u32::try_from(size).map_err(|_| Malformed("table too large"))?)?;
    Ok(off as usize)
}

/// A decoded batch: its records, borrowed from the host's buffer.
pub struct Batch<'a> {
    buf: &'a [u8],
    count: u32,
    records: usize,
    /// The topic names, checked once per batch.
    topics: Vec<&'a str>,
    headers: (usize, u32),
}

impl<'a> Batch<'a> {
    /// Checks the header and tables of `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Malformed> {
        if buf.len() < HEADER_BYTES || u32_at(buf, 0)? != BATCH_MAGIC {
            return Err(Malformed("no batch header"));
        }
        let count = u32_at(buf, 4)?;
        let (topics, headers) = (u32_at(buf, 8)?, u32_at(buf, 12)?);
        let records = table(buf, u32_at(buf, 16)?, count, RECORD_BYTES)?;
        let topics_at = table(buf, u32_at(buf, 20)?, topics, 8)?;
        let topics = (0..topics as usize)
            .map(|t| {
                let at = topics_at + t * 8;
                std::str::from_utf8(range(buf, u32_at(buf, at)?, u32_at(buf, at + 4)?)?)
                    .map_err(|_| Malformed("topic is not UTF-8"))
            })
            .collect::<Result<_, _>>()?;
        let headers_at = table(buf, u32_at(buf, 24)?, headers, 16)?;
        Ok(Batch { buf, count, records, topics, headers: (headers_at, headers) })
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Record `i` (`i < len()`).
    pub fn get(&self, i: usize) -> Result<RecordView<'a>, Malformed> {
        let buf = self.buf;
        let at = self.records + i * RECORD_BYTES;
        // The 56-byte entry is checked once, then read without a check per field.
        let entry: &[u8; RECORD_BYTES] = buf
            .get(at..at + RECORD_BYTES)
            .and_then(|e| e.try_into().ok())
            .ok_or(Malformed("record outside the records table"))?;
        let word = |j: usize| u32::from_le_bytes([entry[j], entry[j + 1], entry[j + 2], entry[j + 3]]);
        let dword = |j: usize| (u64::from(word(j)) | u64::from(word(j + 4)) << 32) as i64;
        let flags = word(0);
        let topic = *self.topics.get(word(4) as usize).ok_or(Malformed("topic index out of range"))?;
        let (first, count) = (word(12), word(16));
        if first.checked_add(count).is_none_or(|end| end > self.headers.1) {
            return Err(Malformed("header range out of the headers table"));
        }
        Ok(RecordView {
            key: if flags & 1 != 0 { Some(range(buf, word(40), word(44))?) } else { None },
            value: range(buf, word(48), word(52))?,
            headers: Headers { buf, at: self.headers.0 + first as usize * 16, count: count as usize },
            timestamp: (flags & 2 != 0).then(|| dword(32)),
            origin: OriginView { topic, partition: word(8) as i32, offset: dword(24) },
        })
    }
}

/// Where an input record came from, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginView<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// One input record, borrowed from the batch buffer: no copy, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Headers<'a>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub origin: OriginView<'a>,
}

impl RecordView<'_> {
    /// The record, copied into the owned type [`crate::Transform::process`] takes.
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.to_vec(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| Header { name: String::from_utf8_lossy(name).into_owned(), value: value.to_vec() })
                .collect(),
            timestamp: self.timestamp,
            origin: Origin {
                topic: self.origin.topic.to_string(),
                partition: self.origin.partition,
                offset: self.origin.offset,
            },
        }
    }
}

/// A record's headers, in order, as (name, value) byte slices.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a> {
    buf: &'a [u8],
    at: usize,
    count: usize,
}

impl<'a> Headers<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// (name, value) pairs; a header whose range lies outside the buffer is skipped.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let Headers { buf, at, count } = *self;
        (0..count).filter_map(move |i| {
            let e = at + i * 16;
            let name = range(buf, u32_at(buf, e).ok()?, u32_at(buf, e + 4).ok()?).ok()?;
            let value = range(buf, u32_at(buf, e + 8).ok()?, u32_at(buf, e + 12).ok()?).ok()?;
            Some((name, value))
        })
    }

    /// The first header named `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| *n == name.as_bytes()).map(|(_, v)| v)
    }
}

/// The metadata of an output written with [`Outputs::write`]: everything but
/// the value, borrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputMeta<'a> {
    pub key: Option<&'a [u8]>,
    /// Milliseconds since the Unix epoch; `None` lets the sink decide.
    pub timestamp: Option<i64>,
    /// A named sink of the pipeline; `None` is the default sink.
    pub route: Option<&'a str>,
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// Where one input record's outputs go. Bytes are written straight into the
/// results buffer the host reads.
pub struct Outputs {
    buf: Vec<u8>,
    /// The tables, each entry already in its little-endian layout: `finish`
    /// appends each table with one copy.
    results: Vec<[u8; 12]>,
    outputs: Vec<[u8; OUTPUT_BYTES]>,
    headers: Vec<[u8; 16]>,
    /// (buf, outputs, headers) lengths when the current record began.
    mark: (usize, usize, usize),
}

impl Outputs {
    /// An empty results buffer, with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_BYTES));
        buf.resize(HEADER_BYTES, 0);
        Outputs { buf, results: Vec::new(), outputs: Vec::new(), headers: Vec::new(), mark: (HEADER_BYTES, 0, 0) }
    }

    /// An empty results buffer for a batch of `records` records (its tables
    /// sized for one output each), with room for about `capacity` bytes.
    pub fn for_batch(records: usize, capacity: usize) -> Self {
        let mut outputs = Self::with_capacity(capacity);
        outputs.results.reserve(records);
        outputs.outputs.reserve(records);
        outputs
    }

    fn bytes(&mut self, bytes: &[u8]) -> (u32, u32) {
        let off = self.buf.len() as u32;
        self.buf.extend_from_slice(bytes);
        (off, bytes.len() as u32)
    }

    /// Adds an output of the current record.
    pub fn push(&mut self, output: Output) {
        let headers: Vec<(&str, &[u8])> =
            output.headers.iter().map(|h| (h.name.as_str(), h.value.as_slice())).collect();
        let meta = OutputMeta {
            key: output.key.as_deref(),
            timestamp: output.timestamp,
            route: output.route.as_deref(),
            headers: &headers,
        };
        self.write(meta, &output.value);
    }

    /// Adds an output from borrowed parts.
    pub fn write(&mut self, meta: OutputMeta<'_>, value: &[u8]) {
        self.write_with(meta, |buf| buf.extend_from_slice(value));
    }

    /// Adds an output whose value `value` appends to the buffer it is given
    /// (the results buffer itself: the value is never copied again).
    pub fn write_with(&mut self, meta: OutputMeta<'_>, value: impl FnOnce(&mut Vec<u8>)) {
        let flags = u32::from(meta.key.is_some())
            | u32::from(meta.timestamp.is_some()) << 1
            | u32::from(meta.route.is_some()) << 2;
        let first_header = self.headers.len() as u32;
        let key = meta.key.map_or((0, 0), |key| self.bytes(key));
        let route = meta.route.map_or((0, 0), |route| self.bytes(route.as_bytes()));
        for (name, value) in meta.headers {
            let (n, v) = (self.bytes(name.as_bytes()), self.bytes(value));
            self.headers.push(le_words([n.0, n.1, v.0, v.1]));
        }
        let start = self.buf.len();
        value(&mut self.buf);
        let value = (start as u32, (self.buf.len() - start) as u32);
        let mut entry = [0u8; OUTPUT_BYTES];
        put_words(&mut entry, &[flags, first_header, meta.headers.len() as u32, 0]);
        entry[16..24].copy_from_slice(&meta.timestamp.unwrap_or(0).to_le_bytes());
        put_words(&mut entry[24..], &[key.0, key.1, value.0, value.1, route.0, route.1]);
        self.outputs.push(entry);
    }

    /// Ends the current record: its outputs, or `error` (which discards them).
    pub fn end_record(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => self.results.push(le_words([0, (self.outputs.len() - self.mark.1) as u32, 0])),
            Err(message) => {
                self.buf.truncate(self.mark.0);
                self.outputs.truncate(self.mark.1);
                self.headers.truncate(self.mark.2);
                let (off, len) = self.bytes(message.as_bytes());
                self.results.push(le_words([1, off, len]));
            }
        }
        self.mark = (self.buf.len(), self.outputs.len(), self.headers.len());
    }

    /// The results buffer, for the host.
    pub fn finish(mut self) -> Vec<u8> {
        let results_off = self.buf.len();
        self.buf.extend_from_slice(self.results.as_flattened());
        let outputs_off = self.buf.len();
        self.buf.extend_from_slice(self.outputs.as_flattened());
        let headers_off = self.buf.len();
        self.buf.extend_from_slice(self.headers.as_flattened());
        let header = [
            RESULTS_MAGIC,
            self.results.len() as u32,
            self.outputs.len() as u32,
            self.headers.len() as u32,
            results_off as u32,
            outputs_off as u32,
            headers_off as u32,
            0,
        ];
        for (i, n) in header.iter().enumerate() {
            self.buf[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
        }
        self.buf
    }

    /// The current record's outputs so far, as owned values (for native tests).
    pub fn take_owned(&mut self) -> Vec<Output> {
        let buf = &self.buf;
        let slice = |(off, len): (u32, u32)| buf[off as usize..(off + len) as usize].to_vec();
        let word = |e: &[u8], at: usize| u32::from_le_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        let outputs = self.outputs[self.mark.1..]
            .iter()
            .map(|o| {
                let (flags, first, count) = (word(o, 0), word(o, 4) as usize, word(o, 8) as usize);
                Output {
                    key: (flags & 1 != 0).then(|| slice((word(o, 24), word(o, 28)))),
                    value: slice((word(o, 32), word(o, 36))),
                    headers: self.headers[first..first + count]
                        .iter()
                        .map(|h| Header {
                            name: String::from_utf8_lossy(&slice((word(h, 0), word(h, 4)))).into_owned(),
                            value: slice((word(h, 8), word(h, 12))),
                        })
                        .collect(),
                    timestamp: (flags & 2 != 0)
                        .then(|| i64::from_le_bytes([o[16], o[17], o[18], o[19], o[20], o[21], o[22], o[23]])),
                    route: (flags & 4 != 0)
                        .then(|| String::from_utf8_lossy(&slice((word(o, 40), word(o, 44)))).into_owned()),
                }
            })
            .collect();
        self.buf.truncate(self.mark.0);
        self.outputs.truncate(self.mark.1);
        self.headers.truncate(self.mark.2);
        outputs
    }
}

/// `words`, little-endian, as one table entry.
fn le_words<const W: usize, const B: usize>(words: [u32; W]) -> [u8; B] {
    let mut entry = [0u8; B];
    put_words(&mut entry, &words);
    entry
}

/// Writes `words` little-endian at the start of `dst`.
fn put_words(dst: &mut [u8], words: &[u32]) {
    for (chunk, n) in dst.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&n.to_le_bytes());
    }
}

/// Runs `f` against a scratch [`Outputs`] and returns what it wrote, owned: how
/// a zero-copy transform's logic is unit-tested natively.
pub fn collect(f: impl FnOnce(&mut Outputs) -> Result<(), String>) -> Result<Vec<Output>, String> {
    let mut out = Outputs::with_capacity(256);
    f(&mut out)?;
    Ok(out.take_owned())
}

/// Encodes `records` as the host does (for native tests and benchmarks).
pub fn encode_batch(records: &[Record]) -> Vec<u8> {
    fn topic_of<'a>(t: &'a str, topics: &mut Vec<&'a str>) -> u32 {
        topics.iter().position(|x| *x == t).unwrap_or_else(|| {
            topics.push(t);
            topics.len() - 1
        }) as u32
    }
    let mut topics: Vec<&str> = Vec::new();
    let mut payload = Vec::new();
    let mut put = |bytes: &[u8]| {
        let off = payload.len();
        payload.extend_from_slice(bytes);
        (off as u32, bytes.len() as u32)
    };
    let mut entries = Vec::new();
    let mut headers: Vec<[u32; 4]> = Vec::new();
    for r in records {
        let topic = topic_of(&r.origin.topic, &mut topics);
        let key = r.key.as_deref().map(&mut put).unwrap_or((0, 0));
        let value = put(&r.value);
        let first = headers.len() as u32;
        for h in &r.headers {
            let (n, v) = (put(h.name.as_bytes()), put(&h.value));
            headers.push([n.0, n.1, v.0, v.1]);
        }
        entries.push((r, topic, key, value, first));
    }
    let topic_ranges: Vec<(u32, u32)> = topics.iter().map(|t| put(t.as_bytes())).collect();
    let records_off = HEADER_BYTES;
    let topics_off = records_off + entries.len() * RECORD_BYTES;
    let headers_off = topics_off + topic_ranges.len() * 8;
    let base = (headers_off + headers.len() * 16) as u32;
    let mut buf = Vec::with_capacity(base as usize + payload.len());
    for n in [
        BATCH_MAGIC,
        records.len() as u32,
        topic_ranges.len() as u32,
        headers.len() as u32,
        records_off as u32,
        topics_off as u32,
        headers_off as u32,
        0,
    ] {
        buf.extend_from_slice(&n.to_le_bytes());
    }
    for (r, topic, key, value, first) in entries {
        let flags = u32::from(r.key.is_some()) | u32::from(r.timestamp.is_some()) << 1;
        for n in [flags, topic, r.origin.partition as u32, first, r.headers.len() as u32, 0] {
            buf.extend_from_slice(&n.to_le_bytes());
        }
        buf.extend_from_slice(&r.origin.offset.to_le_bytes());
        buf.extend_from_slice(&r.timestamp.unwrap_or(0).to_le_bytes());
        let key = if r.key.is_some() { (key.0 + base, key.1) } else { (0, 0) };
        for n in [key.0, key.1, value.0 + base, value.1] {
            buf.extend_from_slice(&n.to_le_bytes());
        }
    }
    for (off, len) in topic_ranges {
        buf.extend_from_slice(&(off + base).to_le_bytes());
        buf.extend_from_slice(&len.to_le_bytes());
    }
    for h in headers {
        for n in [h[0] + base, h[1], h[2] + base, h[3]] {
            buf.extend_from_slice(&n.to_le_bytes());
        }
    }
    buf.extend_from_slice(&payload);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: i64) -> Record {
        Record {
            key: (i % 2 == 0).then(|| format!("k{i}").into_bytes()),
            value: format!("v{i}").into_bytes(),
            headers: (0..i % 3).map(|h| Header { name: format!("h{h}"), value: vec![h as u8; h as usize] }).collect(),
            timestamp: (i % 3 != 0).then_some(i * 1000),
            origin: Origin { topic: format!("tópic-{}", i % 2), partition: i as i32, offset: -i },
        }
    }

    #[test]
    fn batches_decode_to_what_was_encoded() {
        let records: Vec<Record> = (0..50).map(record).collect();
        let buf = encode_batch(&records);
        let batch = Batch::parse(&buf).unwrap();
        assert_eq!(batch.len(), 50);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(&batch.get(i).unwrap().to_record(), r);
        }
        assert!(Batch::parse(&buf[..20]).is_err());
        assert!(Batch::parse(&encode_batch(&[])).unwrap().is_empty());
    }

    #[test]
    fn an_error_discards_the_records_partial_outputs() {
        let mut out = Outputs::with_capacity(0);
        out.push(Output::new("a").with_key("k").with_header("h", "v").with_route("r"));
        out.end_record(Ok(()));
        out.push(Output::new("partial"));
        out.end_record(Err("bad".into()));
        out.end_record(Ok(()));
        let buf = out.finish();
        assert_eq!(u32_at(&buf, 0).unwrap(), RESULTS_MAGIC);
        assert_eq!((u32_at(&buf, 4).unwrap(), u32_at(&buf, 8).unwrap(), u32_at(&buf, 12).unwrap()), (3, 1, 1));
        assert!(!buf.windows(7).any(|w| w == b"partial"));
        let results = u32_at(&buf, 16).unwrap() as usize;
        assert_eq!(u32_at(&buf, results + 12).unwrap(), 1);
        let (off, len) = (u32_at(&buf, results + 16).unwrap(), u32_at(&buf, results + 20).unwrap());
        assert_eq!(range(&buf, off, len).unwrap(), b"bad");
    }

    #[test]
    fn collect_returns_owned_outputs() {
        let out = collect(|out| {
            out.write(
                OutputMeta { key: Some(b"k"), timestamp: Some(5), route: None, headers: &[("a", b"1")] },
                b"value",
            );
            Ok(())
        })
        .unwrap();
        assert_eq!(out, vec![Output::new("value").with_key("k").with_timestamp(5).with_header("a", "1")]);
    }
}
