//! The host's record types: what sources produce, transforms consume and sinks write.
//! They mirror `wit/transform.wit` but belong to the host, so connectors never
//! depend on a WIT version.
//!
//! Keys and values are [`Bytes`]: the outputs of a batch are slices of the
//! one results buffer the plugin returned, and a chain hands them on to the
//! next stage and to the sinks without copying.

pub use bytes::Bytes;

/// A record header (ordered; a name may repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// Where a record was read from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One record read from a source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    pub origin: Origin,
    /// Set by a source that could not take the record whole (e.g. a
    /// WebSocket frame over `max_message_bytes`): the record skips the
    /// transforms and goes to the dead letters with this reason.
    pub rejected: Option<String>,
}

/// One record produced by a transform (or passed through when there is none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: Option<i64>,
    /// A named sink of the pipeline; `None` is the default sink.
    pub route: Option<String>,
}

impl From<Record> for Output {
    /// Passthrough: the record as it came, to the default sink.
    fn from(r: Record) -> Self {
        Output { key: r.key, value: r.value, headers: r.headers, timestamp: r.timestamp, route: None }
    }
}
