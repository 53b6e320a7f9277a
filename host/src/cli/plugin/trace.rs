//! `sluice plugin test --trace PREFIX`: what happened to the state keys
//! that begin with PREFIX, batch by batch, instead of the outputs. For each
//! batch that touched one: its lines, the traced timers it fired and what
//! they output, the outputs keyed by a traced key, each traced key's value
//! before and after, and the timers set or cleared. A plugin call runs a
//! whole batch, so a change is told per batch: with `--batch-size 1` each
//! batch is one line, which the trace quotes.

use crate::record::Record;
use crate::state::memory::MemoryState;
use crate::state::stored;
use crate::topology::local::Ran;
use std::collections::BTreeMap;
use std::io::Write;

/// (stage, topic, partition, stored key) → value.
type Traced = BTreeMap<(u32, String, i32, Vec<u8>), Vec<u8>>;

pub struct Trace {
    prefix: Vec<u8>,
    before: Traced,
    batches: u64,
}

impl Trace {
    pub fn new(prefix: &str, state: &MemoryState) -> Self {
        let mut trace = Trace { prefix: prefix.as_bytes().to_vec(), before: Traced::new(), batches: 0 };
        trace.before = trace.traced(state);
        trace
    }

    fn traced(&self, state: &MemoryState) -> Traced {
        state
            .entries()
            .into_iter()
            .filter(|s| plugin_key(&s.key).is_some_and(|k| k.starts_with(&self.prefix)))
            .map(|s| ((s.stage, s.partition.0.to_string(), s.partition.1, s.key), s.value))
            .collect()
    }

    /// Tells what `ran` (just committed into `state`) did to the traced keys.
    pub fn batch(&mut self, ran: &Ran, state: &MemoryState, out: &mut dyn Write) -> anyhow::Result<()> {
        self.batches += 1;
        let now = self.traced(state);
        let mut said = Vec::new();
        for (record, result) in ran.batch.iter().zip(ran.results.iter()) {
            let fired = !record.origin.is_source();
            let traced_timer = fired && record.key.as_deref().is_some_and(|k| k.starts_with(&self.prefix));
            if traced_timer {
                said.push(format!(
                    "  timer {} at {} fired (partition {})",
                    shown_key(record.key.as_deref().unwrap_or_default()),
                    record.timestamp.unwrap_or_default(),
                    record.origin.partition
                ));
            }
            match result {
                Ok(outputs) => {
                    for o in outputs {
                        if traced_timer || o.key.is_some_and(|k| k.starts_with(&self.prefix)) {
                            let key = o.key.map(shown_key).unwrap_or_else(|| "none".into());
                            let from =
                                if fired { "the timer".to_string() } else { format!("line {}", record.origin.offset) };
                            said.push(format!("    output of {from}, key {key}: {}", shown_value(o.value)));
                        }
                    }
                }
                Err(failure) if traced_timer => said.push(format!("    the timer failed: {}", failure.error)),
                Err(_) => {}
            }
        }
        let keys: std::collections::BTreeSet<_> = self.before.keys().chain(now.keys()).collect();
        for place in keys {
            let (was, is) = (self.before.get(place), now.get(place));
            if was == is {
                continue;
            }
            let (stage, _, partition, key) = place;
            said.push(change(key, was, is, &format!("(stage {}, partition {partition})", stage + 1)));
        }
        self.before = now;
        if said.is_empty() {
            return Ok(());
        }
        writeln!(out, "batch {}: {}", self.batches, lines(&ran.batch[..ran.sources]))?;
        for line in said {
            writeln!(out, "{line}")?;
        }
        Ok(())
    }
}

/// The source lines of a batch: a range, or the one line with its value.
fn lines(records: &[Record]) -> String {
    match records {
        [] => "no lines (timers only)".into(),
        [one] => format!("line {}: {}", one.origin.offset, shown_value(&one.value)),
        [first, .., last] => {
            format!("lines {}-{} ({} records)", first.origin.offset, last.origin.offset, records.len())
        }
    }
}

/// A traced stored key that changed from `was` to `is`, `whose` it is: a
/// timer set or cleared, or an entry's value before and after.
pub(crate) fn change(key: &[u8], was: Option<&Vec<u8>>, is: Option<&Vec<u8>>, whose: &str) -> String {
    match key.first() {
        Some(&stored::TIMER) => {
            let (at, plugin_key) = stored::parse_timer(key).unwrap_or_default();
            let what = if is.is_some() { "set" } else { "cleared" };
            format!("  timer {} at {at} {what} {whose}", shown_key(&plugin_key))
        }
        _ => format!(
            "  {} {whose}: {} -> {}",
            shown_key(key.get(1..).unwrap_or_default()),
            was.map_or_else(|| "(none)".into(), |v| shown_value(v)),
            is.map_or_else(|| "(deleted)".into(), |v| shown_value(v))
        ),
    }
}

/// The plugin key a stored key is about, if it is an entry's or a timer's.
pub(crate) fn plugin_key(key: &[u8]) -> Option<&[u8]> {
    match key.first() {
        Some(&stored::ENTRY) => Some(&key[1..]),
        Some(&stored::TIMER) => key.get(9..),
        _ => None,
    }
}

/// A key as a JSON string (`"AAPL\u000060000"`, as `--json` shows it), or
/// hex when it is not UTF-8.
pub(crate) fn shown_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => serde_json::Value::from(text).to_string(),
        Err(_) => format!("0x{}", hex::encode(key)),
    }
}

/// A value as JSON when it is, as text when it is UTF-8, else as hex
/// (with its length).
pub(crate) fn shown_value(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => text.to_string(),
        Ok(text) => serde_json::Value::from(text).to_string(),
        Err(_) => format!("0x{} ({} bytes)", hex::encode(value), value.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_as_json_text_or_hex() {
        assert_eq!(shown_value(br#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(shown_value(b"plain"), r#""plain""#);
        assert_eq!(shown_value(&[0xff, 0]), "0xff00 (2 bytes)");
        assert_eq!(shown_key(b"AAPL\x0060000"), r#""AAPL\u000060000""#);
        assert_eq!(shown_key(&[0xff]), "0xff");
    }
}
