//! The dead letters: a failed record as read, with headers that say where
//! it came from and why it failed.

use crate::record::{Header, Output, Record};

/// Bytes of a `sluice.error` header: a plugin's message may quote a whole
/// (huge) input.
const MAX_ERROR_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes on a character boundary, saying so.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// Bytes of the value a truncated dead letter keeps.
const TRUNCATED_HEAD: usize = 64 << 10;

/// `dead` with its value cut to [`TRUNCATED_HEAD`] bytes, for a dead-letter
/// destination that refused it whole.
pub(super) fn truncated(dead: &Output, reason: &str) -> Output {
    let mut out = dead.clone();
    out.value.truncate(TRUNCATED_HEAD);
    for h in &mut out.headers {
        h.value.truncate(TRUNCATED_HEAD);
    }
    out.headers.push(Header { name: "sluice.truncated".into(), value: dead.value.len().to_string().into_bytes() });
    out.headers.push(Header { name: "sluice.truncated.reason".into(), value: reason.as_bytes().to_vec() });
    out
}

/// The dead-letter record for `record`: its key, value, headers and timestamp
/// as read, plus headers naming the pipeline, the failing stage, the error
/// and the origin.
pub fn dead_letter(pipeline: &str, record: &Record, stage: &str, error: &str) -> Output {
    let mut headers = record.headers.clone();
    let mut add =
        |name: &str, value: String| headers.push(Header { name: name.to_string(), value: value.into_bytes() });
    add("sluice.pipeline", pipeline.to_string());
    add("sluice.plugin", stage.to_string());
    add("sluice.error", clip(error, MAX_ERROR_BYTES));
    add("sluice.topic", record.origin.topic.to_string());
    add("sluice.partition", record.origin.partition.to_string());
    add("sluice.offset", record.origin.offset.to_string());
    Output { key: record.key.clone(), value: record.value.clone(), headers, timestamp: record.timestamp, route: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_keep_the_record_and_a_bounded_error() {
        let record = Record {
            value: "v".into(),
            origin: crate::record::Origin { topic: "t".into(), partition: 2, offset: 9 },
            ..Record::default()
        };
        let huge = "é".repeat(10_000);
        let dead = dead_letter("p", &record, "plug", &huge);
        let header = |name: &str| {
            dead.headers.iter().find(|h| h.name == name).map(|h| String::from_utf8(h.value.clone()).unwrap())
        };
        assert_eq!(dead.value, "v");
        assert_eq!(header("sluice.offset").as_deref(), Some("9"));
        let error = header("sluice.error").unwrap();
        assert!(error.len() < MAX_ERROR_BYTES + 40 && error.ends_with("(20000 bytes in all)"), "{}", error.len());
        assert_eq!(clip("short", 10), "short");

        let cut = truncated(&Output { value: vec![1; TRUNCATED_HEAD * 2].into(), ..dead.clone() }, "too large");
        assert_eq!(cut.value.len(), TRUNCATED_HEAD);
        assert!(cut
            .headers
            .iter()
            .any(|h| h.name == "sluice.truncated" && h.value == (TRUNCATED_HEAD * 2).to_string().as_bytes()));
    }
}
