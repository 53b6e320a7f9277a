//! Hand-built results buffers, for tests of what a hostile or broken guest
//! may return: the tables are written as given, nothing is checked.

use crate::{HEADER_BYTES, OUTPUT_BYTES, RESULTS_MAGIC, RESULT_BYTES};

/// A results buffer: the header, the result `entries` (status, a, b), the
/// output entries (twelve words each, as in `wit/transform.wit`), then
/// `tail`, the payload. It has no headers table.
pub fn results(entries: &[[u32; 3]], outputs: &[[u32; 12]], tail: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let results_off = HEADER_BYTES;
    let outputs_off = results_off + entries.len() * RESULT_BYTES;
    let payload = outputs_off + outputs.len() * OUTPUT_BYTES;
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
    buf
}

/// Byte `i` of the payload (the `tail`) of a [`results`] buffer with that
/// many results and outputs.
pub fn payload_at(results: usize, outputs: usize) -> impl Fn(usize) -> u32 {
    move |i| (HEADER_BYTES + results * RESULT_BYTES + outputs * OUTPUT_BYTES + i) as u32
}
