//! The host side of contract 0.2 (`wit/transform.wit`): a batch is encoded
//! into one buffer (reused across batches), and the plugin's results buffer
//! is decoded in one pass, every offset and length checked against it.
//!
//! The layouts are documented in the WIT file and the README. A results
//! buffer the host cannot read as a whole fails the call (a contract fault:
//! the batch is retried record by record); a bad range inside one output
//! fails only that output's input record.

use super::instance::Limits;
use crate::record::{Bytes, Header, Outputs, Record, Results};

pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SLB2");
pub const RESULTS_MAGIC: u32 = u32::from_le_bytes(*b"SLO2");
const HEADER_BYTES: usize = 32;
const RECORD_BYTES: usize = 56;
const RESULT_BYTES: usize = 12;
const OUTPUT_BYTES: usize = 48;
const HEADER_ENTRY_BYTES: usize = 16;

/// The encoder's buffers, kept across batches so that encoding allocates
/// nothing once they have grown to the batch size.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
    /// The topics and headers tables, in their little-endian layout: built
    /// while the records are read, appended after them.
    topics: Vec<[u8; 8]>,
    headers: Vec<[u8; HEADER_ENTRY_BYTES]>,
}

impl Encoder {
    /// Encodes `batch`; the result borrows the encoder's buffer.
    ///
    /// Layout: header, record table, then each record's key, value and
    /// headers (and each topic's name where it first appears), then the
    /// topic and header tables. One pass over the records: each is read once.
    pub fn encode(&mut self, batch: &[Record]) -> Result<&[u8], String> {
        let Encoder { buf, topics, headers } = self;
        topics.clear();
        headers.clear();
        // Topics repeat: a batch usually holds one or a few, mostly the same
        // string as the record before.
        let mut names: Vec<&str> = Vec::new();
        let mut last = None;
        let records_off = HEADER_BYTES;
        buf.clear();
        buf.resize(records_off + batch.len() * RECORD_BYTES, 0);
        // Offsets past 4 GiB wrap here; such a batch is refused below.
        let append = |buf: &mut Vec<u8>, bytes: &[u8]| {
            let off = buf.len() as u32;
            buf.extend_from_slice(bytes);
            [off, bytes.len() as u32]
        };
        for (i, r) in batch.iter().enumerate() {
            let topic: &str = &r.origin.topic;
            let same = |t: &&str| (std::ptr::eq(t.as_ptr(), topic.as_ptr()) && t.len() == topic.len()) || *t == topic;
            let index = match last.filter(|&last: &usize| names.get(last).is_some_and(same)) {
                Some(last) => last,
                None => match names.iter().rposition(same) {
                    Some(index) => index,
                    None => {
                        let range = append(buf, topic.as_bytes());
                        topics.push(le_words(range));
                        names.push(topic);
                        names.len() - 1
                    }
                },
            };
            last = Some(index);
            let key = r.key.as_deref().map_or([0, 0], |k| append(buf, k));
            let value = append(buf, &r.value);
            let first = headers.len() as u32;
            for h in &r.headers {
                let (n, v) = (append(buf, h.name.as_bytes()), append(buf, &h.value));
                headers.push(le_words([n[0], n[1], v[0], v[1]]));
            }
            // The entry is put together whole, then written with one copy.
            let flags = u32::from(r.key.is_some()) | u32::from(r.timestamp.is_some()) << 1;
            let mut entry = [0u8; RECORD_BYTES];
            put_u32s(
                &mut entry,
                0,
                &[flags, index as u32, r.origin.partition as u32, first, r.headers.len() as u32, 0],
            );
            entry[24..32].copy_from_slice(&r.origin.offset.to_le_bytes());
            entry[32..40].copy_from_slice(&r.timestamp.unwrap_or(0).to_le_bytes());
            put_u32s(&mut entry, 40, &[key[0], key[1], value[0], value[1]]);
            let at = records_off + i * RECORD_BYTES;
            buf[at..at + RECORD_BYTES].copy_from_slice(&entry);
        }
        let topics_off = buf.len();
        buf.extend_from_slice(topics.as_flattened());
        let headers_off = buf.len();
        buf.extend_from_slice(headers.as_flattened());
        let total = buf.len();
        u32::try_from(total).map_err(|_| format!("batch of {total} bytes is over the contract's 4 GiB"))?;
        let counts = [
            BATCH_MAGIC,
            batch.len() as u32,
            names.len() as u32,
            headers.len() as u32,
            records_off as u32,
            topics_off as u32,
            headers_off as u32,
            0,
        ];
        put_u32s(buf, 0, &counts);
        Ok(buf)
    }
}

/// `words`, little-endian, as one table entry.
fn le_words<const W: usize, const B: usize>(words: [u32; W]) -> [u8; B] {
    let mut entry = [0u8; B];
    put_u32s(&mut entry, 0, &words);
    entry
}

/// Writes `words` little-endian from byte `at`.
fn put_u32s(buf: &mut [u8], at: usize, words: &[u32]) {
    for (j, n) in words.iter().enumerate() {
        buf[at + j * 4..at + j * 4 + 4].copy_from_slice(&n.to_le_bytes());
    }
}

/// Reads a results buffer, checking every access.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u32(&self, at: usize) -> Result<u32, String> {
        at.checked_add(4)
            .and_then(|end| self.0.get(at..end))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("read at byte {at} is outside the {}-byte results buffer", self.0.len()))
    }

    fn bytes(&self, off: u32, len: u32, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        let (start, len) = (off as usize, len as usize);
        start
            .checked_add(len)
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| format!("{} at {off}+{len} is outside the {}-byte results buffer", what(), self.0.len()))
    }

    /// The table of `count` entries of `size` bytes at the offset read at `at`.
    fn table(&self, at: usize, count: u32, size: usize, what: &str) -> Result<&'a [u8], String> {
        let off = self.u32(at)? as usize;
        let end = (count as usize).checked_mul(size).and_then(|n| n.checked_add(off));
        match end.and_then(|end| self.0.get(off..end)) {
            Some(table) => Ok(table),
            None => Err(format!(
                "the {what} table ({count} entries at byte {off}) is outside the {}-byte results buffer",
                self.0.len()
            )),
        }
    }
}

/// Decodes the results of a batch of `inputs` records. `Err` is a contract
/// violation of the whole buffer; a bad output fails only its record.
///
/// Keys and values are not copied: the outputs are checked ranges of
/// `buf`, which the results keep.
pub fn decode(buf: &Bytes, inputs: usize, limits: &Limits) -> Result<Results<String>, String> {
    let r = Reader(buf);
    if buf.len() < HEADER_BYTES {
        return Err(format!("results buffer of {} bytes is shorter than its {HEADER_BYTES}-byte header", buf.len()));
    }
    let magic = r.u32(0)?;
    if magic != RESULTS_MAGIC {
        return Err(format!(
            "results buffer starts with {magic:#010x}, not the magic {RESULTS_MAGIC:#010x} (\"SLO2\")"
        ));
    }
    let (results, outputs, headers) = (r.u32(4)?, r.u32(8)?, r.u32(12)?);
    if results as usize != inputs {
        return Err(format!("{results} results for {inputs} records"));
    }
    // The tables, checked whole: their entries are read without a check each.
    let result_table = r.table(16, results, RESULT_BYTES, "results")?;
    let output_table = r.table(20, outputs, OUTPUT_BYTES, "outputs")?;
    let header_table = r.table(24, headers, HEADER_ENTRY_BYTES, "headers")?;
    // The ok counts must add up to the outputs table, so that every record's
    // outputs are where the sum of the previous counts says.
    let (result_table, output_table) =
        (result_table.as_chunks::<RESULT_BYTES>().0, output_table.as_chunks::<OUTPUT_BYTES>().0);
    let (mut total, mut all_ok, mut most) = (0u64, true, 0u32);
    for e in result_table {
        let (status, count) = (le32(e, 0), le32(e, 4));
        if status == 0 {
            total += u64::from(count);
            most = most.max(count);
        }
        all_ok &= status == 0;
    }
    if total != u64::from(outputs) {
        return Err(format!("the results' output counts add up to {total}, the outputs table holds {outputs}"));
    }
    // The common batch: every record ok, every output plain, and all of them
    // together within one record's limits. Then no record needs a check of
    // its own: its outputs are written in one go, and its count kept.
    if all_ok && most as usize <= limits.outputs {
        let (plain, bytes) = plain_prefix(buf.len(), output_table);
        if plain == output_table.len() && bytes <= limits.output_bytes.min(limits.batch_output_bytes) as u64 {
            let mut all = Outputs::with_capacity(output_table.len());
            let shared = all.add_buffer(buf.clone());
            extend_plain(&mut all, shared, output_table);
            return Ok(Results::from_parts(all, result_table.iter().map(|e| Ok(le32(e, 4) as usize)).collect()));
        }
    }
    // One store for the whole batch's outputs: the table says how many.
    let mut decoded = Results::with_capacity(inputs, outputs as usize);
    let shared = decoded.add_buffer(buf.clone());
    let mut next = 0usize;
    let mut batch_bytes = 0usize;
    for (i, entry) in result_table.iter().enumerate() {
        let (status, a, b) = (le32(entry, 0), le32(entry, 4), le32(entry, 8));
        match status {
            0 => {
                let (first, count) = (next, a as usize);
                next += count;
                let mine = output_table.get(first..next).unwrap_or_default();
                // Every range is checked as it is read; the limits apply after.
                decoded.push_with(|all| {
                    // Most outputs have no headers and no route: those come
                    // first, then the general path takes the rest.
                    let (plain, bytes) = plain_prefix(buf.len(), mine);
                    extend_plain(all, shared, mine.get(..plain).unwrap_or_default());
                    let mut bytes = bytes as usize;
                    for (j, entry) in mine.iter().enumerate().skip(plain) {
                        bytes += push_output(all, shared, buf, entry, first + j, header_table)
                            .map_err(|e| format!("plugin broke the contract: {e}"))?;
                    }
                    limits.check_totals(count, bytes)?;
                    limits.add_to_batch(&mut batch_bytes, bytes)
                });
            }
            1 => decoded.push_err(match r.bytes(a, b, &|| format!("the error message of result {i}")) {
                Ok(message) => String::from_utf8_lossy(message).into_owned(),
                Err(e) => format!("plugin broke the contract: {e}"),
            }),
            other => {
                decoded.push_err(format!("plugin broke the contract: result {i} has status {other} (0 ok, 1 error)"))
            }
        }
    }
    Ok(decoded)
}

/// The little-endian word at byte `at` of a table entry (zero past its end).
#[inline]
fn le32(entry: &[u8], at: usize) -> u32 {
    entry.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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
    if word(e, 0) & 1 != 0 {
        (word(e, 6), word(e, 7))
    } else {
        (0, 0)
    }
}

/// How many of the leading `entries` have neither headers nor a route (nor
/// a flag this host does not know) and ranges within the `size`-byte results
/// buffer, and the bytes of their keys and values. The first other entry
/// stops it, for [`push_output`] to decode or to explain.
///
/// A tight loop apart from the writing ([`extend_plain`]): a loop that may
/// also grow a vector keeps its variables on the stack.
#[inline(always)]
fn plain_prefix(size: usize, entries: &[[u8; OUTPUT_BYTES]]) -> (usize, u64) {
    let mut bytes = 0u64;
    let plain = entries
        .iter()
        .position(|e| {
            let (key, value) = (key_of(e), (word(e, 8), word(e, 9)));
            let end = |(off, len): (u32, u32)| u64::from(off) + u64::from(len);
            let stop = word(e, 0) & !3 != 0 || word(e, 2) != 0 || end(key) > size as u64 || end(value) > size as u64;
            if !stop {
                bytes += u64::from(key.1) + u64::from(value.1);
            }
            stop
        })
        .unwrap_or(entries.len());
    (plain, bytes)
}

/// Pushes `entries`, checked by [`plain_prefix`], as ranges of the results
/// buffer (`shared` in `all`), with one reservation.
#[inline(always)]
fn extend_plain(all: &mut Outputs, shared: u32, entries: &[[u8; OUTPUT_BYTES]]) {
    all.extend_slices(
        shared,
        entries.iter().map(|e| {
            let ((key_off, key_len), (value_off, value_len)) = (key_of(e), (word(e, 8), word(e, 9)));
            let flags = word(e, 0);
            let timestamp = (flags & 2 != 0).then(|| (u64::from(word(e, 4)) | u64::from(word(e, 5)) << 32) as i64);
            (
                (flags & 1 != 0).then_some((key_off as usize, key_len as usize)),
                (value_off as usize, value_len as usize),
                timestamp,
            )
        }),
    );
}

/// One 48-byte output entry, pushed onto `all` as ranges of the results
/// buffer (`shared` in `all`), every range checked; nothing is copied or
/// reference-counted. Returns the output's bytes, for the limits.
#[inline]
fn push_output(
    all: &mut Outputs,
    shared: u32,
    buf: &[u8],
    entry: &[u8],
    index: usize,
    header_table: &[u8],
) -> Result<usize, String> {
    let word = |j: usize| le32(entry, j * 4);
    let (flags, first, count) = (word(0), word(1), word(2));
    let size = buf.len() as u64;
    let range = |off: u32, len: u32, field: &str| {
        let end = u64::from(off) + u64::from(len);
        if end <= size {
            Ok(off as usize..end as usize)
        } else {
            Err(outside(index, field, off, len, buf.len()))
        }
    };
    let text = |off: u32, len: u32, field: &str| {
        std::str::from_utf8(&buf[range(off, len, field)?]).map_err(|_| format!("output {index}'s {field} is not UTF-8"))
    };
    let key = if flags & 1 != 0 { Some(range(word(6), word(7), "key")?) } else { None };
    let value = range(word(8), word(9), "value")?;
    let mut bytes = value.len() + key.as_ref().map_or(0, |k| k.len());
    let route = if flags & 4 != 0 { Some(text(word(10), word(11), "route")?) } else { None };
    let timestamp = (flags & 2 != 0).then(|| (u64::from(word(4)) | u64::from(word(5)) << 32) as i64);
    let headers = if count == 0 {
        Vec::new()
    } else {
        let mine = (first as usize)
            .checked_add(count as usize)
            .and_then(|end| header_table.get(first as usize * HEADER_ENTRY_BYTES..end * HEADER_ENTRY_BYTES));
        let Some(mine) = mine else {
            return Err(format!(
                "output {index}'s headers {first}+{count} are outside the {}-entry headers table",
                header_table.len() / HEADER_ENTRY_BYTES
            ));
        };
        mine.chunks_exact(HEADER_ENTRY_BYTES)
            .map(|e| {
                let (name, value) = (
                    text(le32(e, 0), le32(e, 4), "header name")?,
                    &buf[range(le32(e, 8), le32(e, 12), "header value")?],
                );
                bytes += name.len() + value.len();
                Ok(Header { name: name.to_string(), value: value.to_vec() })
            })
            .collect::<Result<_, String>>()?
    };
    all.push_slices(shared, key, value, timestamp, headers, route);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;

    fn results(entries: &[[u32; 3]], outputs: &[[u32; 12]], tail: &[u8]) -> Bytes {
        let mut buf = Vec::new();
        let results_off = 32;
        let outputs_off = results_off + entries.len() * 12;
        let payload = outputs_off + outputs.len() * 48;
        for n in [
            RESULTS_MAGIC,
            entries.len() as u32,
            outputs.len() as u32,
            0,
            results_off as u32,
            outputs_off as u32,
            payload as u32,
            0,
        ] {
            buf.extend_from_slice(&n.to_le_bytes());
        }
        for n in entries.iter().flatten().chain(outputs.iter().flatten()) {
            buf.extend_from_slice(&n.to_le_bytes());
        }
        buf.extend_from_slice(tail);
        buf.into()
    }

    /// Byte `i` of the payload of a [`results`] buffer with that many results and outputs.
    fn payload_at(results: usize, outputs: usize) -> impl Fn(usize) -> u32 {
        move |i| (32 + results * 12 + outputs * 48 + i) as u32
    }

    #[test]
    fn encodes_what_the_guest_sdk_decodes() {
        let records: Vec<Record> = (0..20)
            .map(|i| Record {
                key: (i % 2 == 0).then(|| vec![i as u8; i].into()),
                value: format!("value {i}").into(),
                headers: (0..i % 4).map(|h| Header { name: format!("h{h}"), value: vec![7; h] }).collect(),
                timestamp: (i % 3 == 0).then_some(i as i64),
                origin: Origin { topic: ["a", "b", "ü"][i % 3].into(), partition: i as i32, offset: 1 << 40 },
                rejected: None,
            })
            .collect();
        let refs = &records;
        let mut encoder = Encoder::default();
        let ours = encoder.encode(refs).unwrap().to_vec();
        let batch = sluice_plugin::abi::Batch::parse(&ours).unwrap();
        for (i, r) in records.iter().enumerate() {
            let view = batch.get(i).unwrap().to_record();
            assert_eq!(
                (view.key.as_deref(), &view.value[..], view.timestamp, &view.origin.topic, view.origin.offset),
                (r.key.as_deref(), &r.value[..], r.timestamp, &r.origin.topic.to_string(), r.origin.offset)
            );
            let headers = |hs: &[Header]| hs.iter().map(|h| (h.name.clone(), h.value.clone())).collect::<Vec<_>>();
            assert_eq!(
                view.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect::<Vec<_>>(),
                headers(&r.headers)
            );
        }
        let capacity = encoder.buf.capacity();
        encoder.encode(refs).unwrap();
        assert_eq!(encoder.buf.capacity(), capacity, "the buffer is reused");
    }

    /// A record's plain outputs (no headers, no route) take the fast path
    /// until one that is not; the rest are decoded in full, and the limits
    /// count the bytes of all of them, no more and no fewer.
    #[test]
    fn plain_outputs_then_the_rest_keep_their_fields_and_byte_counts() {
        let tail = b"k1v1routev3k4v4";
        let at = payload_at(2, 4);
        let outputs = [
            // key "k1", value "v1", timestamp 7
            [3, 0, 0, 0, 7, 0, at(0), 2, at(2), 2, 0, 0],
            // value "v1" again, route "route": leaves the fast path
            [4, 0, 0, 0, 0, 0, 0, 0, at(2), 2, at(4), 5],
            // after it, plain again: decoded by the general path
            [0, 0, 0, 0, 0, 0, 99, 99, at(9), 2, 0, 0],
            // the second record's output, key "k4", value "v4"
            [1, 0, 0, 0, 0, 0, at(11), 2, at(13), 2, 0, 0],
        ];
        let buf = results(&[[0, 3, 0], [0, 1, 0]], &outputs, tail);
        // Bytes per record: 2+2 + 2 + 2 = 8 (the route is not counted), then 4.
        let exact = Limits { output_bytes: 8, ..Limits::default() };
        let decoded = decode(&buf, 2, &exact).unwrap();
        let records = decoded.clone().into_records();
        let first = records[0].as_ref().unwrap();
        assert_eq!(
            first.iter().map(|o| (o.key.as_deref(), &o.value[..], o.timestamp, o.route.as_deref())).collect::<Vec<_>>(),
            [
                (Some(&b"k1"[..]), &b"v1"[..], Some(7), None),
                (None, &b"v1"[..], None, Some("route")),
                (None, &b"v3"[..], None, None),
            ]
        );
        assert_eq!(records[1].as_ref().unwrap()[0].key.as_deref(), Some(&b"k4"[..]));
        let tight = Limits { output_bytes: 7, ..Limits::default() };
        let records = decode(&buf, 2, &tight).unwrap().into_records();
        assert!(records[0].as_ref().unwrap_err().contains("8 bytes of output"), "{records:?}");
        assert!(records[1].is_ok(), "only the record over the limit fails");
        let two = Limits { outputs: 2, ..Limits::default() };
        assert!(decode(&buf, 2, &two).unwrap().into_records()[0].as_ref().unwrap_err().contains("3 outputs"));
    }

    /// Overlapping ranges are counted each time (the host copies each one
    /// on): a batch whose outputs add up past `batch_output_bytes` fails its
    /// records from the one that crosses it, however few bytes the buffer has.
    #[test]
    fn a_batch_over_its_output_cap_fails_the_records_past_it() {
        let tail = b"vvvvvvvvvv";
        let at = payload_at(3, 3);
        // Three records, each one output: the same 10 bytes three times.
        let outputs = [[0, 0, 0, 0, 0, 0, 0, 0, at(0), 10, 0, 0]; 3];
        let buf = results(&[[0, 1, 0], [0, 1, 0], [0, 1, 0]], &outputs, tail);
        let cap = Limits { batch_output_bytes: 25, ..Limits::default() };
        let records = decode(&buf, 3, &cap).unwrap().into_records();
        assert!(records[0].is_ok() && records[1].is_ok(), "{records:?}");
        let error = records[2].as_ref().unwrap_err();
        assert!(error.contains("would reach 30 bytes") && error.contains("limit 25 per batch"), "{error}");
        assert!(decode(&buf, 3, &Limits { batch_output_bytes: 30, ..Limits::default() })
            .unwrap()
            .into_records()
            .iter()
            .all(Result::is_ok));
    }

    /// A batch of plain outputs only is written in one go when all of it fits
    /// one record's limits; past them, each record is checked on its own, so
    /// only the records over a limit fail.
    #[test]
    fn an_all_plain_batch_keeps_each_records_limits() {
        let tail = b"k0aaaabbbbccccc";
        let at = payload_at(3, 4);
        let outputs = [
            // record 0: key "k0" + value "aaaa" (6 bytes), timestamp 5
            [3, 0, 0, 0, 5, 0, at(0), 2, at(2), 4, 0, 0],
            // record 1 (no outputs), record 2: "bbbb", "ccccc" (9 bytes)
            [0, 0, 0, 0, 0, 0, 0, 0, at(6), 4, 0, 0],
            [2, 0, 0, 0, u32::MAX, u32::MAX, 0, 0, at(10), 5, 0, 0],
            // record 2's third output, empty
            [0, 0, 0, 0, 0, 0, 0, 0, at(15), 0, 0, 0],
        ];
        let buf = results(&[[0, 1, 0], [0, 0, 0], [0, 3, 0]], &outputs, tail);
        let shapes = |limits: &Limits| {
            decode(&buf, 3, limits)
                .unwrap()
                .into_records()
                .into_iter()
                .map(|r| {
                    r.map(|outs| outs.iter().map(|o| (o.key.clone(), o.value.clone(), o.timestamp)).collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
        };
        let whole = shapes(&Limits::default());
        assert_eq!(whole[0], Ok(vec![(Some(Bytes::from_static(b"k0")), Bytes::from_static(b"aaaa"), Some(5))]));
        assert_eq!(whole[1], Ok(vec![]));
        assert_eq!(
            whole[2],
            Ok(vec![
                (None, Bytes::from_static(b"bbbb"), None),
                (None, Bytes::from_static(b"ccccc"), Some(-1)),
                (None, Bytes::new(), None)
            ])
        );
        // 15 bytes in all, 9 for the biggest record: the batch is over, no record is.
        assert_eq!(shapes(&Limits { output_bytes: 9, ..Limits::default() }), whole);
        let eight = shapes(&Limits { output_bytes: 8, ..Limits::default() });
        assert_eq!(eight[..2], whole[..2]);
        assert!(eight[2].as_ref().is_err_and(|e| e.contains("9 bytes of output")), "{eight:?}");
        let two = shapes(&Limits { outputs: 2, ..Limits::default() });
        assert_eq!(two[..2], whole[..2]);
        assert!(two[2].as_ref().is_err_and(|e| e.contains("3 outputs")), "{two:?}");
    }

    #[test]
    fn hostile_results_are_reported_not_read() {
        let limits = Limits::default();
        // A value range past the end fails its record only.
        let bad_value = results(&[[0, 1, 0], [1, 0, 0]], &[[0, 0, 0, 0, 0, 0, 0, 0, 1000, 5, 0, 0]], b"");
        let decoded = decode(&bad_value, 2, &limits).unwrap().into_records();
        assert!(decoded[0].as_ref().unwrap_err().contains("output 0's value at 1000+5 is outside"), "{decoded:?}");
        // An offset + length that overflows 32 bits.
        let overflow = results(&[[0, 1, 0]], &[[0, 0, 0, 0, 0, 0, 0, 0, u32::MAX, u32::MAX, 0, 0]], b"");
        assert!(decode(&overflow, 1, &limits).unwrap().into_records()[0].as_ref().unwrap_err().contains("outside"));
        // Whole-buffer violations.
        let two = results(&[[0, 0, 0], [0, 0, 0]], &[], b"");
        assert_eq!(decode(&two, 3, &limits).unwrap_err(), "2 results for 3 records");
        assert!(decode(&two.slice(..20), 2, &limits).unwrap_err().contains("shorter than its 32-byte header"));
        assert!(decode(&two.slice(..40), 2, &limits).unwrap_err().contains("results table"));
        let miscount = results(&[[0, 3, 0]], &[], b"");
        assert!(decode(&miscount, 1, &limits).unwrap_err().contains("add up to 3"));
        let mut magic = two.to_vec();
        magic[0] = b'X';
        assert!(decode(&magic.into(), 2, &limits).unwrap_err().contains("magic"));
        let huge = {
            let mut b = results(&[[0, 0, 0]], &[], b"").to_vec();
            b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            Bytes::from(b)
        };
        assert!(decode(&huge, 1, &limits).unwrap_err().contains("outputs table"));
        // A route that is not UTF-8; an unknown status; an error message read back.
        let route = results(&[[0, 1, 0]], &[[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32 + 12 + 48, 2]], &[0xff, 0xfe]);
        assert!(decode(&route, 1, &limits).unwrap().into_records()[0]
            .as_ref()
            .unwrap_err()
            .contains("route is not UTF-8"));
        let status = results(&[[7, 0, 0]], &[], b"");
        assert!(decode(&status, 1, &limits).unwrap().into_records()[0].as_ref().unwrap_err().contains("status 7"));
        let message = results(&[[1, 44, 3]], &[], b"bad");
        assert_eq!(decode(&message, 1, &limits).unwrap().into_records()[0], Err("bad".to_string()));
    }
}
