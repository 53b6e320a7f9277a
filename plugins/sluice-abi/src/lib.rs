//! # sluice-abi: contract 0.2's two buffers, in one place
//!
//! Contract 0.2 (`wit/transform.wit`) moves a batch into the plugin as one
//! buffer and its results back as one buffer. This crate is that layout,
//! written once and used by both sides: the host encodes batches and
//! decodes results; the Rust SDK (`sluice-plugin`) reads batches and writes
//! results. It has no dependencies, so it builds natively (where it is
//! tested) and inside a `wasm32-wasip2` plugin.
//!
//! # Layout
//!
//! - [`batch`]: the host's [`Encoder`] (its buffers kept across batches) and
//!   the guest's [`Batch`] reader, whose [`RecordView`]s borrow the buffer;
//! - [`results`]: the guest's [`Writer`], which plugins write their outputs
//!   through, and the host's checked [`Results`] reader: every table and
//!   range is checked against the buffer before it is read;
//! - [`testing`]: hand-built results buffers, for tests of hostile guests.
//!
//! Policy stays out: output limits, what a bad output costs and how outputs
//! are stored are the host's; the owned `Record`/`Output` types are the SDK's.

pub mod batch;
pub mod results;
pub mod testing;

pub use batch::{Batch, Encoder, Headers, Malformed, OriginView, RecordIn, RecordView, TooLarge};
pub use results::{OutputMeta, OutputParts, OutputView, Results, ResultsError, Status, Writer};

/// `S L B 2`: the first four bytes of a batch.
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SLB2");
/// `S L O 2`: the first four bytes of a results buffer.
pub const RESULTS_MAGIC: u32 = u32::from_le_bytes(*b"SLO2");
/// Bytes of either buffer's header.
pub const HEADER_BYTES: usize = 32;
/// Bytes of a record entry (batch).
pub const RECORD_BYTES: usize = 56;
/// Bytes of a topic entry (batch).
pub const TOPIC_BYTES: usize = 8;
/// Bytes of a header entry (either buffer).
pub const HEADER_ENTRY_BYTES: usize = 16;
/// Bytes of a result entry (results).
pub const RESULT_BYTES: usize = 12;
/// Bytes of an output entry (results).
pub const OUTPUT_BYTES: usize = 48;

/// Flag bit of a record or output entry: a key is present.
pub const FLAG_KEY: u32 = 1;
/// Flag bit of a record or output entry: a timestamp is present.
pub const FLAG_TIMESTAMP: u32 = 2;
/// Flag bit of an output entry: a route is present.
pub const FLAG_ROUTE: u32 = 4;

/// `words`, little-endian, as one table entry.
#[inline(always)]
pub(crate) fn le_words<const W: usize, const B: usize>(words: [u32; W]) -> [u8; B] {
    let mut entry = [0u8; B];
    put_words(&mut entry, &words);
    entry
}

/// Writes `words` little-endian at the start of `dst`.
#[inline(always)]
pub(crate) fn put_words(dst: &mut [u8], words: &[u32]) {
    for (chunk, n) in dst.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&n.to_le_bytes());
    }
}

/// The little-endian word at byte `at` of `bytes` (zero past its end).
#[inline(always)]
pub(crate) fn le32(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The little-endian signed 64-bit value at byte `at` of `bytes` (zero past its end).
#[inline(always)]
pub(crate) fn le64(bytes: &[u8], at: usize) -> i64 {
    (u64::from(le32(bytes, at)) | u64::from(le32(bytes, at + 4)) << 32) as i64
}
