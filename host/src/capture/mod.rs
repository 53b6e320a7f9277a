//! Captures of a live chain stage (`sluice record`), and their replay
//! (`sluice replay`).
//!
//! A capture holds what one stage of a running pipeline was given and what
//! it made of it, call by call, with the state it started from, so that the
//! stage can be run again on a laptop exactly as it ran live:
//!
//! - [`recorder`]: the stage's side (a request waits in a registry until
//!   the stage's next call; the calls of a batch are sent once the batch is
//!   delivered) and the writer thread that frames the entries and keeps
//!   the bounds;
//! - this module: the format, its encoder and its reader.
//!
//! # The format (version 1)
//!
//! A capture is a sequence of frames: a length (4 bytes, little-endian)
//! then that many bytes of one JSON object. The first frame is the
//! [`Header`]; every other frame is one [`Entry`]. A capture cut short (the
//! recording process killed) is readable up to its last whole frame: the
//! reader reports the cut tail and goes on. Bytes ([`Data`]) are a JSON
//! string when they are valid UTF-8, else `{"hex": "…"}`; stored state keys
//! and values are always hex, as the store keeps them.

pub mod recorder;

use crate::record::{Bytes, Header as RecordHeader, Origin, Output, Record};
use crate::state::time::{EventTime, LatePolicy};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// The `format` of every capture's header.
pub const FORMAT: &str = "sluice-capture";
/// The version of the format this build writes and reads.
pub const VERSION: u32 = 1;
/// A frame longer than this is corrupt, not a capture's.
const MAX_FRAME: usize = 1 << 30;

/// What a capture is of: the first frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always `sluice-capture`.
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    pub pipeline: String,
    /// The stage recorded, 1-based as in the pipeline file.
    pub stage: usize,
    pub plugin: PluginInfo,
    /// The plugin's configuration. A secret's value is `***`
    /// (`masked` lists those keys): give it to a replay with `-c`.
    pub config: Vec<(String, String)>,
    pub masked: Vec<String>,
    pub limits: LimitsInfo,
    /// The stage's `[transforms.event_time]`, if it has one.
    pub event_time: Option<EventTimeInfo>,
    /// When the recording started (ms since the Unix epoch).
    pub started_at_ms: i64,
}

/// The plugin version that ran live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginInfo {
    pub name: String,
    /// Its file on the recording machine.
    pub path: String,
    /// The component's SHA-256 (hex): the version.
    pub hash: String,
    /// The contract it exports (`0.1`, `0.2`, `0.3`).
    pub contract: String,
}

/// The stage's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsInfo {
    pub cpu_ms: u64,
    pub memory_bytes: usize,
    pub state_bytes: usize,
    pub state_ttl_ms: Option<u64>,
}

/// `[transforms.event_time]` as the stage had it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeInfo {
    pub allowed_lateness_ms: i64,
    /// 0: partitions never go idle.
    pub idle_timeout_ms: u64,
    pub max_ahead_ms: i64,
    /// `dead_letter`, `drop` or `route:NAME`.
    pub late: String,
}

impl EventTimeInfo {
    pub fn new(event: &EventTime) -> Self {
        EventTimeInfo {
            allowed_lateness_ms: event.allowed_lateness_ms,
            idle_timeout_ms: event.idle_timeout.map_or(0, |d| d.as_millis() as u64),
            max_ahead_ms: event.max_ahead_ms,
            late: match &event.late {
                LatePolicy::Drop => "drop".to_string(),
                LatePolicy::DeadLetter => "dead_letter".to_string(),
                LatePolicy::Route(route) => format!("route:{route}"),
            },
        }
    }

    pub fn event_time(&self) -> EventTime {
        let late = match self.late.as_str() {
            "drop" => LatePolicy::Drop,
            other => match other.strip_prefix("route:") {
                Some(route) => LatePolicy::Route(route.to_string()),
                None => LatePolicy::DeadLetter,
            },
        };
        EventTime {
            allowed_lateness_ms: self.allowed_lateness_ms,
            idle_timeout: (self.idle_timeout_ms > 0).then(|| std::time::Duration::from_millis(self.idle_timeout_ms)),
            late,
            max_ahead_ms: self.max_ahead_ms,
        }
    }
}

/// One frame after the header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Entry {
    /// A partition's state as the stage held it before the calls that
    /// follow (at the start, each partition the stage held; later, a
    /// partition the first time a call reads it, or after the stage
    /// loaded it again: a rebalance gave it back).
    State(StateEntry),
    /// One call of the stage.
    Call(Call),
    /// The recording ended, and why.
    End(End),
}

/// A partition's stored state: keys and values as the store keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    pub topic: String,
    pub partition: i32,
    /// The offset after the last record the state includes.
    pub next_offset: i64,
    /// (key, value), hex.
    pub entries: Vec<(String, String)>,
}

/// Why the stage was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A batch's records (or, past the first stage, the stage before's outputs).
    Batch,
    /// Timers the batch's watermarks passed.
    TimersAfterBatch,
    /// Timers fired on an idle tick (no batch for a while).
    TimersIdle,
    /// Timers fired at the end of the input.
    TimersEnd,
}

/// One call: the inputs as the stage was given them, the watermarks it
/// saw, the processing clock, and one live result per input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// The call's number in the capture, from 0.
    pub seq: u64,
    pub cause: Cause,
    /// The processing clock at the call (ms since the Unix epoch).
    pub now_ms: i64,
    /// The watermark of each partition of the inputs when the call began.
    pub watermarks: Vec<Watermark>,
    pub inputs: Vec<InputRecord>,
    /// One per input, in order.
    pub outputs: Vec<CallResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    pub topic: String,
    pub partition: i32,
    pub watermark: Option<i64>,
}

/// An input record, with its origin (offset -1: a fired timer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Data>,
    pub value: Data,
    pub headers: Vec<(String, Data)>,
    pub timestamp: Option<i64>,
}

/// What the live stage made of one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CallResult {
    Ok(Vec<OutputRecord>),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRecord {
    pub key: Option<Data>,
    pub value: Data,
    pub headers: Vec<(String, Data)>,
    pub timestamp: Option<i64>,
    pub route: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct End {
    pub reason: String,
    /// Calls and input records in the capture.
    pub calls: u64,
    pub records: u64,
}

/// Bytes: text when they are valid UTF-8, else hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Data {
    Text(String),
    Hex { hex: String },
}

impl Data {
    pub fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Data::Text(text.to_string()),
            Err(_) => Data::Hex { hex: hex::encode(bytes) },
        }
    }

    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Data::Text(text) => Ok(text.as_bytes().to_vec()),
            Data::Hex { hex } => hex::decode(hex).map_err(|e| anyhow::anyhow!("bad hex {hex:?}: {e}")),
        }
    }
}

fn record_headers(headers: &[(String, Data)]) -> anyhow::Result<Vec<RecordHeader>> {
    headers.iter().map(|(name, value)| Ok(RecordHeader { name: name.clone(), value: value.bytes()? })).collect()
}

impl InputRecord {
    /// The record, in `topic` (the capture's topic name, shared).
    pub fn record(&self, topic: Arc<str>) -> anyhow::Result<Record> {
        Ok(Record {
            key: self.key.as_ref().map(|k| k.bytes().map(Bytes::from)).transpose()?,
            value: self.value.bytes()?.into(),
            headers: record_headers(&self.headers)?,
            timestamp: self.timestamp,
            origin: Origin { topic, partition: self.partition, offset: self.offset },
            rejected: None,
        })
    }
}

impl OutputRecord {
    pub fn output(&self) -> anyhow::Result<Output> {
        Ok(Output {
            key: self.key.as_ref().map(|k| k.bytes().map(Bytes::from)).transpose()?,
            value: self.value.bytes()?.into(),
            headers: record_headers(&self.headers)?,
            timestamp: self.timestamp,
            route: self.route.clone(),
        })
    }
}

/// One frame: the length, then the JSON of `value`.
pub fn frame(value: &impl Serialize) -> Vec<u8> {
    let mut out = vec![0; 4];
    // A value of the capture's own types always serialises.
    serde_json::to_writer(&mut out, value).unwrap_or_default();
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// A capture read back.
#[derive(Debug)]
pub struct Capture {
    pub header: Header,
    pub entries: Vec<Entry>,
    /// The capture was cut short: the bytes of its last, partial frame, at
    /// this offset. Everything before it was read.
    pub truncated: Option<(u64, usize)>,
}

impl Capture {
    pub fn read(path: &Path) -> anyhow::Result<Capture> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| anyhow::anyhow!("cannot read the capture {}: {e}", path.display()))?;
        Capture::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> anyhow::Result<Capture> {
        let mut at = 0usize;
        let mut frames = Vec::new();
        let mut truncated = None;
        while at < bytes.len() {
            let Some(len) = bytes.get(at..at + 4) else {
                truncated = Some((at as u64, bytes.len() - at));
                break;
            };
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if len > MAX_FRAME {
                anyhow::bail!(
                    "frame {} at byte {at} claims {len} bytes: this is not a capture, or it is corrupt",
                    frames.len()
                );
            }
            let Some(body) = bytes.get(at + 4..at + 4 + len) else {
                truncated = Some((at as u64, bytes.len() - at));
                break;
            };
            frames.push((at, body));
            at += 4 + len;
        }
        let Some(((_, first), rest)) = frames.split_first() else {
            anyhow::bail!("no header: the capture is empty or was cut before its first frame");
        };
        let probe: serde_json::Value =
            serde_json::from_slice(first).map_err(|e| anyhow::anyhow!("the header is not JSON: {e}"))?;
        if probe.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            anyhow::bail!("not a capture: its header has no \"format\": \"{FORMAT}\"");
        }
        let version = probe.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != u64::from(VERSION) {
            anyhow::bail!("capture format version {version}: this build reads version {VERSION}");
        }
        let header: Header = serde_json::from_value(probe).map_err(|e| anyhow::anyhow!("bad header: {e}"))?;
        let entries = rest
            .iter()
            .enumerate()
            .map(|(i, (at, body))| {
                serde_json::from_slice(body).map_err(|e| anyhow::anyhow!("entry {} at byte {at}: {e}", i + 1))
            })
            .collect::<anyhow::Result<Vec<Entry>>>()?;
        Ok(Capture { header, entries, truncated })
    }

    /// The calls, in order.
    pub fn calls(&self) -> impl Iterator<Item = &Call> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Call(call) => Some(call),
            _ => None,
        })
    }

    /// How the recording ended, if its end was written.
    pub fn end(&self) -> Option<&End> {
        self.entries.iter().rev().find_map(|e| match e {
            Entry::End(end) => Some(end),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn header() -> Header {
        Header {
            format: FORMAT.into(),
            version: VERSION,
            pipeline: "p".into(),
            stage: 2,
            plugin: PluginInfo { name: "x".into(), path: "/x.wasm".into(), hash: "ab".into(), contract: "0.3".into() },
            config: vec![("window".into(), "60".into())],
            masked: vec![],
            limits: LimitsInfo { cpu_ms: 1000, memory_bytes: 1, state_bytes: 2, state_ttl_ms: None },
            event_time: None,
            started_at_ms: 5,
        }
    }

    fn call(seq: u64) -> Entry {
        Entry::Call(Call {
            seq,
            cause: Cause::Batch,
            now_ms: 7,
            watermarks: vec![Watermark { topic: "t".into(), partition: 0, watermark: Some(3) }],
            inputs: vec![InputRecord {
                topic: "t".into(),
                partition: 0,
                offset: 9,
                key: Some(Data::new(&[0xff, 0])),
                value: Data::new(b"{\"a\":1}"),
                headers: vec![("h".into(), Data::new(b"v"))],
                timestamp: Some(1),
            }],
            outputs: vec![CallResult::Error("no".into())],
        })
    }

    #[test]
    fn a_capture_reads_back_and_a_cut_tail_is_reported_not_fatal() {
        let mut bytes = frame(&header());
        bytes.extend(frame(&call(0)));
        bytes.extend(frame(&call(1)));
        let whole = Capture::parse(&bytes).unwrap();
        assert_eq!(whole.header, header());
        assert_eq!(whole.entries, vec![call(0), call(1)]);
        assert_eq!(whole.truncated, None);
        // Binary bytes are hex, text is text.
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(r#""key":{"hex":"ff00"}"#), "{text}");
        assert!(text.contains(r#""value":"{\"a\":1}""#), "{text}");
        for cut in 1..frame(&call(1)).len() {
            let short = &bytes[..bytes.len() - cut];
            let capture = Capture::parse(short).unwrap();
            assert_eq!(capture.entries, vec![call(0)], "cut {cut}");
            assert_eq!(capture.truncated.map(|(_, n)| n), Some(frame(&call(1)).len() - cut));
        }
    }

    #[test]
    fn what_is_not_a_capture_is_refused_with_the_reason() {
        let not = |bytes: &[u8]| Capture::parse(bytes).unwrap_err().to_string();
        assert!(not(b"").contains("no header"));
        assert!(not(&frame(&serde_json::json!({"x": 1}))).contains("not a capture"));
        let mut newer = serde_json::to_value(header()).unwrap();
        newer["version"] = 2.into();
        assert!(not(&frame(&newer)).contains("version 2"));
        let mut bytes = frame(&header());
        bytes.extend(frame(&serde_json::json!({"nonsense": 1})));
        assert!(not(&bytes).contains("entry 1 at byte"));
    }
}
