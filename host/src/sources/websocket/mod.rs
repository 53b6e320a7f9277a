//! The WebSocket source: a live feed (e.g. Finnhub's trades), reconnecting
//! with backoff, bounded in records and bytes.
//!
//! - [`source`]: the connection task, its phases and timeouts, and the batches.

pub mod source;

pub use source::{display_url, request, WebSocketSource};

use super::{Connector, RunOptions, Source};
use crate::connector::{Build, Check};
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `type = "websocket"`: a live feed (e.g. Finnhub's trades). Each text or
/// binary frame is one record; timestamp = time received; origin = the
/// URL's host and this run's random id (`HOST#RUN`), partition 0, the
/// frame's number in the run as offset. A WebSocket cannot replay: frames
/// sent while disconnected are lost (at-most-once across reconnects);
/// within a connection nothing is dropped.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSourceConfig {
    /// `ws://` or `wss://` URL; a token in its query (`?token=…`) is a secret.
    pub url: String,
    /// HTTP headers of the handshake (e.g. `Authorization`); their values are secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Messages sent after every connect and reconnect: strings as they
    /// are, tables as JSON (e.g. `{ type = "subscribe", symbol = "BINANCE:BTCUSDT" }`).
    #[serde(default)]
    #[schemars(with = "Vec<serde_json::Value>")]
    pub subscribe: Vec<toml::Value>,
    /// PEM file of CA certificates to trust for `wss://` (default: the system's roots).
    pub ca: Option<String>,
    /// Seconds between the pings Sluice sends (default 20; 0: none).
    #[serde(default = "default_ping_secs")]
    pub ping_secs: u64,
    /// Reconnect when no frame arrives for this many seconds (default 60; 0: never).
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Frames over this many bytes are dead-lettered (cut to 64 KiB) instead
    /// of transformed (default 1 MiB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Frames received but not yet transformed, at most; past it Sluice stops
    /// reading and TCP slows the server down (default 10,000).
    #[serde(default = "default_buffer_records")]
    pub buffer_records: usize,
    /// Bytes of frames received but not yet transformed, at most (default
    /// 64 MiB); past it Sluice stops reading, as for `buffer_records`. A
    /// source holds at most this plus one frame being read (up to twice
    /// `max_message_bytes`).
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: usize,
    /// A batch closes at this many records, as soon as no further record
    /// is ready (a trickle goes out at once)...
    #[serde(default = "crate::sources::default_batch_max_records")]
    pub batch_max_records: usize,
    /// ...or this many milliseconds after its first record, whichever comes first.
    #[serde(default = "crate::sources::default_batch_max_ms")]
    pub batch_max_ms: u64,
}

fn default_ping_secs() -> u64 {
    20
}
fn default_idle_timeout_secs() -> u64 {
    60
}
fn default_max_message_bytes() -> usize {
    1 << 20
}
fn default_buffer_records() -> usize {
    10_000
}
fn default_buffer_bytes() -> usize {
    64 << 20
}

impl Connector for WebSocketSourceConfig {
    fn check(&mut self, cx: &mut Check<'_>) {
        let url = self.url.trim();
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            cx.error_at(&["url"], format!("url {:?} must start with ws:// or wss://", display_url(url)));
        }
        if let Err(e) = request(self) {
            cx.error_at(&["url"], e);
        }
        if let Some(ca) = &self.ca {
            let path = cx.dir().join(ca);
            if !path.is_file() {
                cx.error_at(&["ca"], format!("ca file {} does not exist", path.display()));
            }
            self.ca = Some(path.display().to_string());
        }
        for (i, message) in self.subscribe.iter().enumerate() {
            if !(message.is_str() || message.is_table()) {
                cx.error_at(&["subscribe"], format!("subscribe message {} must be a string or a table", i + 1));
            }
        }
        cx.range("batch_max_records", self.batch_max_records as u64, 1..=crate::connector::MAX_BATCH_RECORDS);
        cx.range("batch_max_ms", self.batch_max_ms, 1..=600_000);
        cx.range("buffer_records", self.buffer_records as u64, 1..=crate::connector::MAX_BATCH_RECORDS);
        cx.range("buffer_bytes", self.buffer_bytes as u64, 1..=16 << 30);
        cx.range("max_message_bytes", self.max_message_bytes as u64, 1..=1 << 30);
        cx.range("ping_secs", self.ping_secs, 0..=86_400);
        cx.range("idle_timeout_secs", self.idle_timeout_secs, 0..=86_400);
    }

    /// A WebSocket cannot replay, and its offsets restart with each connection.
    fn replays(&self) -> bool {
        false
    }

    fn build(&self, cx: &Build<'_>, options: &RunOptions) -> anyhow::Result<Arc<dyn Source>> {
        anyhow::ensure!(options.range.is_none(), "a websocket source cannot read a range of its input");
        Ok(Arc::new(WebSocketSource::new(self, cx.pipeline)?))
    }
}
