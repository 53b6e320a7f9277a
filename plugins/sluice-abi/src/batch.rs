//! The batch buffer (host → plugin): the host's [`Encoder`], the guest's
//! [`Batch`] reader.

use crate::{
    le32, le64, le_words, put_words, BATCH_MAGIC, FLAG_KEY, FLAG_TIMESTAMP, HEADER_BYTES, HEADER_ENTRY_BYTES,
    RECORD_BYTES, TOPIC_BYTES,
};

/// One record to encode, borrowed: `headers` yields (name, value) pairs.
#[derive(Debug, Clone, Copy)]
pub struct RecordIn<'a, H> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: H,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// A batch too large for the contract's 32-bit offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {} bytes is over the contract's 4 GiB", self.0)
    }
}

impl std::error::Error for TooLarge {}

/// The encoder's buffers, kept across batches so that encoding allocates
/// nothing once they have grown to the batch size.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
    /// The tables, each entry in its little-endian layout: built while the
    /// records are read, appended after their bytes.
    records: Vec<[u8; RECORD_BYTES]>,
    topics: Vec<[u8; TOPIC_BYTES]>,
    headers: Vec<[u8; HEADER_ENTRY_BYTES]>,
}

impl Encoder {
    /// Encodes `batch`; the result borrows the encoder's buffer.
    ///
    /// Layout: the header, each record's key, value and headers (and each
    /// topic's name where it first appears), then the record, topic and
    /// header tables. One pass over the records: each is read once.
    pub fn encode<'a, H>(&mut self, batch: impl IntoIterator<Item = RecordIn<'a, H>>) -> Result<&[u8], TooLarge>
    where
        H: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        let Encoder { buf, records, topics, headers } = self;
        records.clear();
        topics.clear();
        headers.clear();
        buf.clear();
        buf.resize(HEADER_BYTES, 0);
        // Topics repeat: a batch usually holds one or a few, mostly the same
        // string (often the same pointer) as the record before.
        let mut names: Vec<&str> = Vec::new();
        let mut last = None;
        // Offsets past 4 GiB wrap here; such a batch is refused below.
        let append = |buf: &mut Vec<u8>, bytes: &[u8]| {
            let off = buf.len() as u32;
            buf.extend_from_slice(bytes);
            [off, bytes.len() as u32]
        };
        for r in batch {
            let topic = r.topic;
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
            let key = r.key.map_or([0, 0], |k| append(buf, k));
            let value = append(buf, r.value);
            let first = headers.len() as u32;
            for (name, value) in r.headers {
                let (n, v) = (append(buf, name.as_bytes()), append(buf, value));
                headers.push(le_words([n[0], n[1], v[0], v[1]]));
            }
            let flags = (u32::from(r.key.is_some()) * FLAG_KEY) | (u32::from(r.timestamp.is_some()) * FLAG_TIMESTAMP);
            let mut entry = [0u8; RECORD_BYTES];
            put_words(&mut entry, &[flags, index as u32, r.partition as u32, first, headers.len() as u32 - first, 0]);
            entry[24..32].copy_from_slice(&r.offset.to_le_bytes());
            entry[32..40].copy_from_slice(&r.timestamp.unwrap_or(0).to_le_bytes());
            put_words(&mut entry[40..], &[key[0], key[1], value[0], value[1]]);
            records.push(entry);
        }
        let records_off = buf.len();
        buf.extend_from_slice(records.as_flattened());
        let topics_off = buf.len();
        buf.extend_from_slice(topics.as_flattened());
        let headers_off = buf.len();
        buf.extend_from_slice(headers.as_flattened());
        let total = buf.len();
        u32::try_from(total).map_err(|_| TooLarge(total))?;
        let counts = [
            BATCH_MAGIC,
            records.len() as u32,
            topics.len() as u32,
            headers.len() as u32,
            records_off as u32,
            topics_off as u32,
            headers_off as u32,
            0,
        ];
        put_words(buf, &counts);
        Ok(buf)
    }

    /// Bytes the encoder's buffer holds room for (it is reused).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Why a batch cannot be read (from the host: a host bug, the guest traps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed batch from the host: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

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
#[derive(Debug, Clone)]
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
        let topics_at = table(buf, u32_at(buf, 20)?, topics, TOPIC_BYTES)?;
        let topics = (0..topics as usize)
            .map(|t| {
                let at = topics_at + t * TOPIC_BYTES;
                std::str::from_utf8(range(buf, u32_at(buf, at)?, u32_at(buf, at + 4)?)?)
                    .map_err(|_| Malformed("topic is not UTF-8"))
            })
            .collect::<Result<_, _>>()?;
        let headers_at = table(buf, u32_at(buf, 24)?, headers, HEADER_ENTRY_BYTES)?;
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
        if i >= self.len() {
            return Err(Malformed("record outside the records table"));
        }
        let at = self.records + i * RECORD_BYTES;
        // The 56-byte entry is checked once, then read without a check per field.
        let entry: &[u8; RECORD_BYTES] = buf
            .get(at..at + RECORD_BYTES)
            .and_then(|e| e.try_into().ok())
            .ok_or(Malformed("record outside the records table"))?;
        let word = |j: usize| u32::from_le_bytes([entry[j], entry[j + 1], entry[j + 2], entry[j + 3]]);
        let flags = word(0);
        let topic = *self.topics.get(word(4) as usize).ok_or(Malformed("topic index out of range"))?;
        let (first, count) = (word(12), word(16));
        if first.checked_add(count).is_none_or(|end| end > self.headers.1) {
            return Err(Malformed("header range out of the headers table"));
        }
        Ok(RecordView {
            key: if flags & FLAG_KEY != 0 { Some(range(buf, word(40), word(44))?) } else { None },
            value: range(buf, word(48), word(52))?,
            headers: Headers { buf, at: self.headers.0 + first as usize * HEADER_ENTRY_BYTES, count: count as usize },
            timestamp: (flags & FLAG_TIMESTAMP != 0).then(|| le64(entry, 32)),
            origin: OriginView { topic, partition: word(8) as i32, offset: le64(entry, 24) },
        })
    }

    /// Every record, in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<RecordView<'a>, Malformed>> + '_ {
        (0..self.len()).map(|i| self.get(i))
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
            let e = at + i * HEADER_ENTRY_BYTES;
            let name = range(buf, le32(buf, e), le32(buf, e + 4)).ok()?;
            let value = range(buf, le32(buf, e + 8), le32(buf, e + 12)).ok()?;
            Some((name, value))
        })
    }

    /// The first header named `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| *n == name.as_bytes()).map(|(_, v)| v)
    }
}
