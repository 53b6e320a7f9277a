//! How a stage's state is kept in a store: the plugin's entries, and under
//! reserved keys beside them its timers, clock, version and key deadlines
//! (the first byte of a stored key says which).

/// A plugin entry: the byte, then the plugin's key.
pub const ENTRY: u8 = 0;
/// A timer: the byte, the time (8 bytes, big-endian, sign bit flipped,
/// so that the keys sort by time), then the timer's key; empty value.
pub const TIMER: u8 = 1;
/// The partition's clock: the byte alone; value = watermark, newest
/// timestamp (8 bytes each, little-endian; `i64::MIN`: none).
pub const CLOCK: u8 = 2;

/// The state version of the partition's entries: the byte alone;
/// value = the version (4 bytes, little-endian). Absent: version 0.
pub const VERSION: u8 = 3;

/// A key's deadline under a TTL: the byte, then the plugin's key;
/// value = the deadline (ms since the Unix epoch, 8 bytes little-endian).
pub const DEADLINE: u8 = 4;

pub fn deadline(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DEADLINE);
    k.extend_from_slice(key);
    k
}

pub fn deadline_value(at: i64) -> Vec<u8> {
    at.to_le_bytes().to_vec()
}

pub fn parse_deadline(value: &[u8]) -> i64 {
    value.get(..8).and_then(|b| b.try_into().ok()).map_or(0, i64::from_le_bytes)
}

pub fn version(version: u32) -> Vec<u8> {
    version.to_le_bytes().to_vec()
}

pub fn parse_version(value: &[u8]) -> u32 {
    value.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes)
}

pub fn entry(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(ENTRY);
    k.extend_from_slice(key);
    k
}

pub fn timer(at: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 9);
    k.push(TIMER);
    k.extend_from_slice(&((at as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(key);
    k
}

pub fn parse_timer(stored: &[u8]) -> Option<(i64, Vec<u8>)> {
    let at: [u8; 8] = stored.get(1..9)?.try_into().ok()?;
    Some(((u64::from_be_bytes(at) ^ (1 << 63)) as i64, stored[9..].to_vec()))
}

pub fn clock(watermark: Option<i64>, max_ts: Option<i64>) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&watermark.unwrap_or(i64::MIN).to_le_bytes());
    v.extend_from_slice(&max_ts.unwrap_or(i64::MIN).to_le_bytes());
    v
}

pub fn parse_clock(value: &[u8]) -> (Option<i64>, Option<i64>) {
    let word = |at: usize| {
        value.get(at..at + 8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).filter(|v| *v != i64::MIN)
    };
    (word(0), word(8))
}
