//! The results buffer (plugin → host): the guest's [`Writer`], the host's
//! checked [`Results`] reader.

use crate::{
    le32, le64, le_words, put_words, FLAG_KEY, FLAG_ROUTE, FLAG_TIMESTAMP, HEADER_BYTES, HEADER_ENTRY_BYTES,
    OUTPUT_BYTES, RESULTS_MAGIC, RESULT_BYTES,
};
use std::ops::Range;

/// The metadata of an output written with [`Writer::write`]: everything but
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

/// Writes a results buffer: per input record, its outputs or an error.
/// Bytes are written straight into the buffer the host reads.
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
    /// The tables, each entry already in its little-endian layout: `finish`
    /// appends each table with one copy.
    results: Vec<[u8; RESULT_BYTES]>,
    outputs: Vec<[u8; OUTPUT_BYTES]>,
    headers: Vec<[u8; HEADER_ENTRY_BYTES]>,
    /// (buf, outputs, headers) lengths when the current record began.
    mark: (usize, usize, usize),
}

impl Writer {
    /// An empty results buffer, with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(HEADER_BYTES));
        buf.resize(HEADER_BYTES, 0);
        Writer { buf, results: Vec::new(), outputs: Vec::new(), headers: Vec::new(), mark: (HEADER_BYTES, 0, 0) }
    }

    /// An empty results buffer for a batch of `records` records (its tables
    /// sized for one output each), with room for about `capacity` bytes.
    pub fn for_batch(records: usize, capacity: usize) -> Self {
        let mut writer = Self::with_capacity(capacity);
        writer.results.reserve(records);
        writer.outputs.reserve(records);
        writer
    }

    fn bytes(&mut self, bytes: &[u8]) -> (u32, u32) {
        let off = self.buf.len() as u32;
        self.buf.extend_from_slice(bytes);
        (off, bytes.len() as u32)
    }

    /// Adds an output of the current record from borrowed parts.
    pub fn write(&mut self, meta: OutputMeta<'_>, value: &[u8]) {
        self.write_with(meta, |buf| buf.extend_from_slice(value));
    }

    /// Adds an output whose value `value` appends to the buffer it is given
    /// (the results buffer itself: the value is never copied again).
    pub fn write_with(&mut self, meta: OutputMeta<'_>, value: impl FnOnce(&mut Vec<u8>)) {
        let flags = (u32::from(meta.key.is_some()) * FLAG_KEY)
            | (u32::from(meta.timestamp.is_some()) * FLAG_TIMESTAMP)
            | (u32::from(meta.route.is_some()) * FLAG_ROUTE);
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
                self.discard_current();
                let (off, len) = self.bytes(message.as_bytes());
                self.results.push(le_words([1, off, len]));
            }
        }
        self.mark = (self.buf.len(), self.outputs.len(), self.headers.len());
    }

    /// Drops the outputs written for the current record so far.
    pub fn discard_current(&mut self) {
        self.buf.truncate(self.mark.0);
        self.outputs.truncate(self.mark.1);
        self.headers.truncate(self.mark.2);
    }

    /// The current record's outputs so far, borrowed (for native tests).
    pub fn current(&self) -> Vec<OutputView<'_>> {
        let buf = &self.buf;
        let slice = |off: u32, len: u32| &buf[off as usize..(off + len) as usize];
        self.outputs[self.mark.1..]
            .iter()
            .map(|o| {
                let (flags, first, count) = (le32(o, 0), le32(o, 4) as usize, le32(o, 8) as usize);
                OutputView {
                    key: (flags & FLAG_KEY != 0).then(|| slice(le32(o, 24), le32(o, 28))),
                    value: slice(le32(o, 32), le32(o, 36)),
                    headers: self.headers[first..first + count]
                        .iter()
                        .map(|h| (slice(le32(h, 0), le32(h, 4)), slice(le32(h, 8), le32(h, 12))))
                        .collect(),
                    timestamp: (flags & FLAG_TIMESTAMP != 0).then(|| le64(o, 16)),
                    route: (flags & FLAG_ROUTE != 0).then(|| slice(le32(o, 40), le32(o, 44))),
                }
            })
            .collect()
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
        put_words(&mut self.buf, &header);
        self.buf
    }
}

/// One output as [`Writer::current`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputView<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    pub timestamp: Option<i64>,
    pub route: Option<&'a [u8]>,
}

/// A results buffer the host cannot read as a whole: a contract violation
/// of the whole call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultsError(pub String);

impl std::fmt::Display for ResultsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ResultsError {}

/// What a result entry says of its input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status<'a> {
    /// Its outputs: the next `count` of the outputs table.
    Ok(usize),
    /// Its error message, or why the message cannot be read.
    Error(Result<&'a [u8], String>),
    /// A status this reader does not know.
    Unknown(u32),
}

/// A results buffer, checked as a whole: the header, the three tables, the
/// result count and the output counts adding up to the outputs table. The
/// ranges inside each output are checked as it is read
/// ([`Results::output`], [`plain_prefix`]).
#[derive(Debug, Clone, Copy)]
pub struct Results<'a> {
    buf: &'a [u8],
    results: &'a [[u8; RESULT_BYTES]],
    outputs: &'a [[u8; OUTPUT_BYTES]],
    headers: &'a [[u8; HEADER_ENTRY_BYTES]],
    all_ok: bool,
    most: u32,
}

/// The table of `count` entries of `N` bytes whose offset is at byte `at`.
fn table<'a, const N: usize>(buf: &'a [u8], at: usize, count: u32, what: &str) -> Result<&'a [[u8; N]], ResultsError> {
    let off = le32(buf, at) as usize;
    let end = (count as usize).checked_mul(N).and_then(|n| n.checked_add(off));
    match end.and_then(|end| buf.get(off..end)) {
        Some(table) => Ok(table.as_chunks::<N>().0),
        None => Err(ResultsError(format!(
            "the {what} table ({count} entries at byte {off}) is outside the {}-byte results buffer",
            buf.len()
        ))),
    }
}

impl<'a> Results<'a> {
    /// Checks `buf` as the results of a batch of `inputs` records.
    pub fn parse(buf: &'a [u8], inputs: usize) -> Result<Self, ResultsError> {
        if buf.len() < HEADER_BYTES {
            return Err(ResultsError(format!(
                "results buffer of {} bytes is shorter than its {HEADER_BYTES}-byte header",
                buf.len()
            )));
        }
        let magic = le32(buf, 0);
        if magic != RESULTS_MAGIC {
            return Err(ResultsError(format!(
                "results buffer starts with {magic:#010x}, not the magic {RESULTS_MAGIC:#010x} (\"SLO2\")"
            )));
        }
        let (count, outputs, headers) = (le32(buf, 4), le32(buf, 8), le32(buf, 12));
        if count as usize != inputs {
            return Err(ResultsError(format!("{count} results for {inputs} records")));
        }
        // The tables, checked whole: their entries are read without a check each.
        let results = table(buf, 16, count, "results")?;
        let outputs = table(buf, 20, outputs, "outputs")?;
        let headers = table(buf, 24, headers, "headers")?;
        // The ok counts must add up to the outputs table, so that every record's
        // outputs are where the sum of the previous counts says.
        let (mut total, mut all_ok, mut most) = (0u64, true, 0u32);
        for e in results {
            let (status, count) = (le32(e, 0), le32(e, 4));
            if status == 0 {
                total += u64::from(count);
                most = most.max(count);
            }
            all_ok &= status == 0;
        }
        if total != outputs.len() as u64 {
            return Err(ResultsError(format!(
                "the results' output counts add up to {total}, the outputs table holds {}",
                outputs.len()
            )));
        }
        Ok(Results { buf, results, outputs, headers, all_ok, most })
    }

    /// The whole buffer (outputs are ranges of it).
    pub fn buffer(&self) -> &'a [u8] {
        self.buf
    }

    /// Results: one per input record.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Whether every record has outputs (no error, no unknown status).
    pub fn all_ok(&self) -> bool {
        self.all_ok
    }

    /// The most outputs one record has.
    pub fn most_outputs(&self) -> usize {
        self.most as usize
    }

    /// The outputs table, in record order.
    pub fn outputs(&self) -> &'a [[u8; OUTPUT_BYTES]] {
        self.outputs
    }

    /// What result `i` says (`i < len()`).
    pub fn status(&self, i: usize) -> Status<'a> {
        let Some(e) = self.results.get(i) else { return Status::Unknown(u32::MAX) };
        match le32(e, 0) {
            0 => Status::Ok(le32(e, 4) as usize),
            1 => Status::Error(self.range(le32(e, 4), le32(e, 8)).map(|r| &self.buf[r]).map_err(|(off, len)| {
                format!(
                    "the error message of result {i} at {off}+{len} is outside the {}-byte results buffer",
                    self.buf.len()
                )
            })),
            other => Status::Unknown(other),
        }
    }

    fn range(&self, off: u32, len: u32) -> Result<Range<usize>, (u32, u32)> {
        let end = u64::from(off) + u64::from(len);
        if end <= self.buf.len() as u64 {
            Ok(off as usize..end as usize)
        } else {
            Err((off, len))
        }
    }

    /// Output entry `entry`, number `index` of the outputs table, decoded in
    /// full with every range checked. `Err` says what is wrong with it (its
    /// record fails; the rest of the batch stands).
    pub fn output(&self, index: usize, entry: &[u8; OUTPUT_BYTES]) -> Result<OutputParts<'a>, String> {
        let word = |j: usize| le32(entry, j * 4);
        let (flags, first, count) = (word(0), word(1), word(2));
        let buf = self.buf;
        let range = |off: u32, len: u32, field: &str| {
            self.range(off, len).map_err(|(off, len)| outside(index, field, off, len, buf.len()))
        };
        let text = |off: u32, len: u32, field: &str| {
            std::str::from_utf8(&buf[range(off, len, field)?])
                .map_err(|_| format!("output {index}'s {field} is not UTF-8"))
        };
        let key = if flags & FLAG_KEY != 0 { Some(range(word(6), word(7), "key")?) } else { None };
        let value = range(word(8), word(9), "value")?;
        let route = if flags & FLAG_ROUTE != 0 { Some(text(word(10), word(11), "route")?) } else { None };
        let timestamp = (flags & FLAG_TIMESTAMP != 0).then(|| le64(entry, 16));
        let headers = if count == 0 {
            Vec::new()
        } else {
            let mine =
                (first as usize).checked_add(count as usize).and_then(|end| self.headers.get(first as usize..end));
            let Some(mine) = mine else {
                return Err(format!(
                    "output {index}'s headers {first}+{count} are outside the {}-entry headers table",
                    self.headers.len()
                ));
            };
            mine.iter()
                .map(|e| {
                    let name = text(le32(e, 0), le32(e, 4), "header name")?;
                    Ok((name, &buf[range(le32(e, 8), le32(e, 12), "header value")?]))
                })
                .collect::<Result<_, String>>()?
        };
        Ok(OutputParts { key, value, timestamp, route, headers })
    }
}

/// One output, decoded and checked: key and value as ranges of the results
/// buffer, the rest borrowed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputParts<'a> {
    pub key: Option<Range<usize>>,
    pub value: Range<usize>,
    pub timestamp: Option<i64>,
    pub route: Option<&'a str>,
    pub headers: Vec<(&'a str, &'a [u8])>,
}

impl OutputParts<'_> {
    /// Bytes of key, value and headers (what output limits count).
    pub fn bytes(&self) -> usize {
        self.value.len()
            + self.key.as_ref().map_or(0, Range::len)
            + self.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
    }
}

/// Why a range of output `index` cannot be read (out of the hot path).
#[cold]
fn outside(index: usize, field: &str, off: u32, len: u32, buf: usize) -> String {
    format!("output {index}'s {field} at {off}+{len} is outside the {buf}-byte results buffer")
}

/// A word of a fixed-size output entry: read without a bounds check.
#[inline(always)]
fn word(e: &[u8; OUTPUT_BYTES], j: usize) -> u32 {
    u32::from_le_bytes([e[j * 4], e[j * 4 + 1], e[j * 4 + 2], e[j * 4 + 3]])
}

/// An output entry's key as (offset, length); (0, 0) when it has none.
#[inline(always)]
fn key_of(e: &[u8; OUTPUT_BYTES]) -> (u32, u32) {
    if word(e, 0) & FLAG_KEY != 0 {
        (word(e, 6), word(e, 7))
    } else {
        (0, 0)
    }
}

/// How many of the leading `entries` are plain: neither headers nor a route
/// (nor a flag this reader does not know), and ranges within the `size`-byte
/// results buffer; and the bytes of their keys and values. The first other
/// entry stops it, for [`Results::output`] to decode or to explain.
///
/// A tight loop apart from the writing ([`plain_parts`]): a loop that may
/// also grow a vector keeps its variables on the stack.
#[inline(always)]
pub fn plain_prefix(size: usize, entries: &[[u8; OUTPUT_BYTES]]) -> (usize, u64) {
    let mut bytes = 0u64;
    let plain = entries
        .iter()
        .position(|e| {
            let (key, value) = (key_of(e), (word(e, 8), word(e, 9)));
            let end = |(off, len): (u32, u32)| u64::from(off) + u64::from(len);
            let stop = word(e, 0) & !(FLAG_KEY | FLAG_TIMESTAMP) != 0
                || word(e, 2) != 0
                || end(key) > size as u64
                || end(value) > size as u64;
            if !stop {
                bytes += u64::from(key.1) + u64::from(value.1);
            }
            stop
        })
        .unwrap_or(entries.len());
    (plain, bytes)
}

/// A plain entry (checked by [`plain_prefix`]) as (key, value, timestamp),
/// the key and value as (start, length) in the results buffer.
#[allow(clippy::type_complexity)]
#[inline(always)]
pub fn plain_parts(e: &[u8; OUTPUT_BYTES]) -> (Option<(usize, usize)>, (usize, usize), Option<i64>) {
    let ((key_off, key_len), (value_off, value_len)) = (key_of(e), (word(e, 8), word(e, 9)));
    let flags = word(e, 0);
    let timestamp = (flags & FLAG_TIMESTAMP != 0).then(|| (u64::from(word(e, 4)) | u64::from(word(e, 5)) << 32) as i64);
    (
        (flags & FLAG_KEY != 0).then_some((key_off as usize, key_len as usize)),
        (value_off as usize, value_len as usize),
        timestamp,
    )
}
