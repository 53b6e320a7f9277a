//! The WebSocket source: a live feed such as Finnhub's trades.
//!
//! A connection task (started on the first read, so that a pipeline being
//! replaced on reload does not hold two connections) connects, sends the
//! `subscribe` messages, and hands every text or binary frame to a bounded
//! channel. When the channel is full (`buffer_records` frames, or
//! `buffer_bytes` of them) the task stops reading, so the kernel's TCP
//! window slows the server down: memory stays bounded by `buffer_bytes` and
//! the one frame being read, which tungstenite refuses unread past twice
//! `max_message_bytes`. Each phase of a connection (TCP, TLS, the
//! WebSocket handshake) has a timeout. The task reconnects after any failure with
//! exponential backoff and jitter (100 ms doubling to 30 s), and counts
//! reconnects and the time spent disconnected.
//!
//! Delivery: a WebSocket cannot replay, so frames sent while disconnected
//! are lost (at-most-once across reconnects); within a connection every
//! frame received becomes a record, or a dead letter when it is over
//! `max_message_bytes`. [`Source::commit`] has nothing to do.

use super::WebSocketSourceConfig;
use crate::record::{Bytes, Origin, Record};
use crate::sources::Source;
use crate::telemetry::telemetry;
use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use openssl::ssl::{SslConnector, SslMethod};
use rand::Rng;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{info, warn};

/// Bytes of an oversized frame kept in its dead letter.
const REJECTED_HEAD: usize = 64 << 10;

/// How long each phase of a connection (TCP, TLS, the handshake) may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A received frame, holding its bytes' share of `buffer_bytes` until it
/// is taken into a batch.
type Buffered = (Record, OwnedSemaphorePermit);

/// A stream that is plain TCP or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

type Socket = WebSocketStream<Pin<Box<dyn Stream>>>;

/// `url` without its query, user info or fragment: safe to show (a token
/// often travels in the query).
pub fn display_url(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    crate::secrets::redact_url(&url[..cut])
}

/// `url` with a `/` path when it has none (`wss://ws.finnhub.io?token=…`):
/// the request line needs one.
fn with_path(url: &str) -> String {
    let Some(authority_start) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let rest = &url[authority_start..];
    match rest.find(['/', '?', '#']) {
        Some(i) if rest[i..].starts_with('/') => url.to_string(),
        Some(i) => format!("{}/{}", &url[..authority_start + i], &rest[i..]),
        None => format!("{url}/"),
    }
}

/// The handshake request of `config`: its URL and headers. Query parameter
/// values and header values are registered as secrets.
pub fn request(config: &WebSocketSourceConfig) -> anyhow::Result<Request> {
    if let Some((_, query)) = config.url.split_once('?') {
        for pair in query.split('&') {
            if let Some((_, value)) = pair.split_once('=') {
                crate::secrets::register(value);
            }
        }
    }
    let mut request = with_path(&config.url)
        .into_client_request()
        .map_err(|e| anyhow::anyhow!("invalid WebSocket url {}: {e}", display_url(&config.url)))?;
    for (name, value) in &config.headers {
        crate::secrets::register(value);
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("invalid header name {name:?}"))?;
        let value = tokio_tungstenite::tungstenite::http::HeaderValue::from_str(value)
            .map_err(|_| anyhow::anyhow!("invalid value for header {name} (not shown)"))?;
        request.headers_mut().insert(name, value);
    }
    Ok(request)
}

/// The subscribe messages as text: strings as they are, tables as JSON.
fn subscribe_messages(config: &WebSocketSourceConfig) -> Vec<String> {
    config
        .subscribe
        .iter()
        .map(|m| match m {
            toml::Value::String(s) => s.clone(),
            other => serde_json::to_string(other).unwrap_or_default(),
        })
        .collect()
}

pub struct WebSocketSource {
    config: WebSocketSourceConfig,
    pipeline: String,
    records: Mutex<mpsc::Receiver<Buffered>>,
    /// Taken by the connection task when the first batch is asked for.
    sender: std::sync::Mutex<Option<mpsc::Sender<Buffered>>>,
    /// `buffer_bytes`, as permits of one byte.
    bytes: Arc<Semaphore>,
    started: AtomicBool,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl WebSocketSource {
    pub fn new(config: &WebSocketSourceConfig, pipeline: &str) -> anyhow::Result<Self> {
        request(config)?;
        let (tx, rx) = mpsc::channel(config.buffer_records.max(1));
        Ok(WebSocketSource {
            config: config.clone(),
            pipeline: pipeline.to_string(),
            records: Mutex::new(rx),
            sender: std::sync::Mutex::new(Some(tx)),
            bytes: Arc::new(Semaphore::new(config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS))),
            started: AtomicBool::new(false),
            task: std::sync::Mutex::new(None),
        })
    }

    fn start(&self) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(tx) = self.sender.lock().ok().and_then(|mut s| s.take()) else { return };
        // The records' origin: the host and this run's own id, numbered
        // across reconnects, so that an exactly-once sink's offsets make a
        // batch written again after an ambiguous commit (the connection to
        // the database lost during COMMIT) skip the rows it has, while no
        // later run's records are ever taken for this one's.
        let topic = format!("{}#{:016x}", host_of(&self.config.url), rand::random::<u64>()).into();
        let connection = Connection {
            config: self.config.clone(),
            pipeline: self.pipeline.clone(),
            tx,
            bytes: self.bytes.clone(),
            topic,
            next_offset: std::sync::atomic::AtomicI64::new(0),
        };
        let handle = tokio::spawn(connection.run());
        if let Ok(mut task) = self.task.lock() {
            *task = Some(handle);
        }
    }
}

impl Drop for WebSocketSource {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
        telemetry().source_connected(&self.pipeline, false);
    }
}

#[async_trait]
impl Source for WebSocketSource {
    async fn next_batch(&self) -> anyhow::Result<Vec<Record>> {
        self.start();
        let mut records = self.records.lock().await;
        let mut batch = Vec::with_capacity(self.config.batch_max_records.min(1024));
        // Each frame's bytes go back to `buffer_bytes` as it is taken.
        match records.recv().await {
            Some((r, _bytes)) => batch.push(r),
            None => anyhow::bail!("the WebSocket connection task ended"),
        }
        // Then what is ready: the batch closes when nothing more is waiting.
        let deadline = Instant::now() + Duration::from_millis(self.config.batch_max_ms);
        while batch.len() < self.config.batch_max_records && Instant::now() < deadline {
            match records.try_recv() {
                Ok((r, _bytes)) => batch.push(r),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Nothing to commit: a WebSocket cannot replay.
    async fn commit(&self, _batch: &[Record]) -> anyhow::Result<()> {
        Ok(())
    }

    async fn flush_commits(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The connection task's state.
struct Connection {
    config: WebSocketSourceConfig,
    pipeline: String,
    tx: mpsc::Sender<Buffered>,
    bytes: Arc<Semaphore>,
    /// The records' origin topic: `HOST#RUN`, one per source started.
    topic: std::sync::Arc<str>,
    /// The next frame's offset, counted across reconnects.
    next_offset: std::sync::atomic::AtomicI64,
}

/// Why a connection ended or could not start.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    Failed(String),
    /// The pipeline stopped: no reconnect.
    #[error("stopped")]
    Stopped,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Connection {
    async fn run(self) {
        let url = display_url(&self.config.url);
        let mut delay = Duration::from_millis(100);
        let mut failures = 0u64;
        let mut connections = 0u64;
        let mut down_since = Instant::now();
        loop {
            let reason = match self.connect().await {
                Ok(socket) => {
                    connections += 1;
                    let gap = down_since.elapsed();
                    if connections > 1 {
                        telemetry().source_reconnected(&self.pipeline, gap.as_secs_f64());
                        info!(pipeline = %self.pipeline, %url, gap_ms = gap.as_millis() as u64, reconnects = connections - 1, "websocket reconnected (frames sent during the gap are lost)");
                    } else {
                        info!(pipeline = %self.pipeline, %url, "websocket connected");
                    }
                    telemetry().source_connected(&self.pipeline, true);
                    telemetry().source_ok(&self.pipeline);
                    telemetry().assigned(&self.pipeline, &[(host_of(&self.config.url), 0)]);
                    let connected_at = Instant::now();
                    let ended = self.read(socket).await;
                    down_since = Instant::now();
                    // Only a connection that lasted resets the backoff: a
                    // server that accepts and closes at once (a bad token)
                    // is not hammered.
                    if connected_at.elapsed() >= Duration::from_secs(10) {
                        delay = Duration::from_millis(100);
                        failures = 0;
                    }
                    telemetry().source_connected(&self.pipeline, false);
                    ended
                }
                Err(e) => Err(e),
            };
            let reason = match reason {
                Err(Ended::Stopped) | Ok(()) => return,
                Err(Ended::Failed(reason)) => reason,
            };
            failures += 1;
            telemetry().source_failed(&self.pipeline, &format!("not connected: {reason}"));
            // Logged on the first failure and at each backoff doubling up to 30 s, then every 30 s.
            if failures.is_power_of_two() || delay >= Duration::from_secs(30) {
                warn!(pipeline = %self.pipeline, %url, %reason, failures, retry_in = ?delay, "websocket not connected; reconnecting");
            }
            let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Opens the connection (TCP, TLS for `wss://`, the handshake).
    async fn connect(&self) -> Result<Socket, Ended> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| Ended::Failed(crate::secrets::redact(&format!("{what}: {e}")));
        let request = request(&self.config).map_err(|e| fail("bad request", &e))?;
        let uri = request.uri().clone();
        let tls = uri.scheme_str() == Some("wss");
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tcp = tokio::time::timeout(PHASE_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| Ended::Failed(format!("connecting to {host}:{port} timed out")))?
            .map_err(|e| {
                if e.to_string().contains("lookup") || e.to_string().contains("resolve") {
                    Ended::Failed(format!("cannot resolve host {host}: {e}"))
                } else {
                    Ended::Failed(format!("cannot connect to {host}:{port}: {e}"))
                }
            })?;
        let _ = tcp.set_nodelay(true);
        let stream: Pin<Box<dyn Stream>> = if tls {
            let ssl = self.tls_connector().map_err(|e| fail("TLS setup failed", &format!("{e:#}")))?;
            let ssl = ssl.configure().and_then(|c| c.into_ssl(&host)).map_err(|e| fail("TLS setup failed", &e))?;
            let mut stream = tokio_openssl::SslStream::new(ssl, tcp).map_err(|e| fail("TLS setup failed", &e))?;
            tokio::time::timeout(PHASE_TIMEOUT, Pin::new(&mut stream).connect())
                .await
                .map_err(|_| {
                    Ended::Failed(format!(
                        "the TLS handshake with {host}:{port} timed out (no answer in {} s)",
                        PHASE_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(|e| {
                    let detail = e.ssl_error().map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
                    Ended::Failed(format!("TLS handshake with {host}:{port} failed: {detail}"))
                })?;
            Box::pin(stream)
        } else {
            Box::pin(tcp)
        };
        // Frames up to twice the limit are read and dead-lettered; larger ones end the connection.
        let limit = self.config.max_message_bytes.saturating_mul(2).saturating_add(64 << 10);
        let ws_config = WebSocketConfig::default().max_message_size(Some(limit)).max_frame_size(Some(limit));
        let (socket, _) = tokio::time::timeout(
            PHASE_TIMEOUT,
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config)),
        )
        .await
        .map_err(|_| Ended::Failed("the WebSocket handshake timed out".into()))?
        .map_err(|e| match e {
            WsError::Http(response) => {
                let status = response.status();
                let hint = match status.as_u16() {
                    401 | 403 => " (check the token or credentials)",
                    _ => "",
                };
                Ended::Failed(format!("handshake refused: HTTP {status}{hint}"))
            }
            other => fail("handshake failed", &other),
        })?;
        Ok(socket)
    }

    fn tls_connector(&self) -> anyhow::Result<SslConnector> {
        let mut builder = SslConnector::builder(SslMethod::tls_client())?;
        crate::clients::trust(&mut builder, self.config.ca.as_deref().map(std::path::Path::new))?;
        Ok(builder.build())
    }

    /// Subscribes, then reads frames into the channel until the connection ends.
    async fn read(&self, mut socket: Socket) -> Result<(), Ended> {
        let failed = |what: &str, e: &dyn std::fmt::Display| Ended::Failed(format!("{what}: {e}"));
        for message in subscribe_messages(&self.config) {
            if let Err(e) = socket.send(Message::text(message)).await {
                // The server may have said why before it closed (Finnhub: an error frame, then a close).
                let mut why = Vec::new();
                while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(200), socket.next()).await {
                    match m {
                        Message::Text(t) => why.push(crate::secrets::redact(t.as_str())),
                        Message::Close(Some(f)) => {
                            why.push(format!("close code {} {:?}", u16::from(f.code), f.reason.as_str()))
                        }
                        _ => {}
                    }
                }
                let said =
                    if why.is_empty() { String::new() } else { format!(" (the server said: {})", why.join("; ")) };
                return Err(failed("cannot send a subscribe message", &format!("{e}{said}")));
            }
        }
        let topic = self.topic.clone();
        let next = || self.next_offset.fetch_add(1, Ordering::Relaxed);
        let idle = (self.config.idle_timeout_secs > 0).then(|| Duration::from_secs(self.config.idle_timeout_secs));
        let mut ping =
            (self.config.ping_secs > 0).then(|| tokio::time::interval(Duration::from_secs(self.config.ping_secs)));
        if let Some(p) = ping.as_mut() {
            p.tick().await;
        }
        let mut last_frame = tokio::time::Instant::now();
        loop {
            let idle_deadline = idle.map(|i| last_frame + i);
            let message = tokio::select! {
                _ = self.tx.closed() => return Err(Ended::Stopped),
                _ = async { match idle_deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    return Err(Ended::Failed(format!("no frame for {} s (idle_timeout_secs)", self.config.idle_timeout_secs)));
                }
                _ = async { match ping.as_mut() { Some(p) => { p.tick().await; } None => std::future::pending().await } } => {
                    socket.send(Message::Ping(Default::default())).await.map_err(|e| failed("cannot send a ping", &e))?;
                    continue;
                }
                message = socket.next() => message,
            };
            last_frame = tokio::time::Instant::now();
            let value = match message {
                None => return Err(Ended::Failed("the server closed the connection without a close frame".into())),
                Some(Err(WsError::Capacity(e))) => {
                    // Refused unread: the stream cannot skip it, so the
                    // connection ends; the dead letter says what was lost.
                    let reason = format!(
                        "websocket frame over twice max_message_bytes ({}), refused unread: {e}",
                        self.config.max_message_bytes
                    );
                    let record = Record {
                        timestamp: Some(now_ms()),
                        origin: Origin { topic: topic.clone(), partition: 0, offset: next() },
                        rejected: Some(reason.clone()),
                        ..Record::default()
                    };
                    self.buffer(record).await?;
                    return Err(Ended::Failed(reason));
                }
                Some(Err(e)) => return Err(failed("connection lost", &e)),
                Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                Some(Ok(Message::Close(frame))) => {
                    let why = frame
                        .map(|f| format!("code {} {:?}", u16::from(f.code), f.reason.as_str()))
                        .unwrap_or_else(|| "no reason".into());
                    return Err(Ended::Failed(format!("the server closed the connection: {why}")));
                }
                Some(Ok(_)) => continue, // pings are answered by the library; pongs need nothing
            };
            let mut record = Record {
                timestamp: Some(now_ms()),
                origin: Origin { topic: topic.clone(), partition: 0, offset: next() },
                ..Record::default()
            };
            if value.len() > self.config.max_message_bytes {
                record.rejected = Some(format!(
                    "websocket frame of {} bytes is over max_message_bytes ({}); cut to its first {} bytes",
                    value.len(),
                    self.config.max_message_bytes,
                    REJECTED_HEAD
                ));
                record.value = Bytes::copy_from_slice(&value[..REJECTED_HEAD.min(value.len())]);
            } else {
                record.value = value.into();
            }
            self.buffer(record).await?;
        }
    }

    /// Hands `record` to the pipeline. A full buffer (records or bytes):
    /// waits, and stops reading the socket, until the pipeline catches up.
    async fn buffer(&self, record: Record) -> Result<(), Ended> {
        let cost = record.value.len().clamp(1, self.config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS));
        let bytes = tokio::select! {
            _ = self.tx.closed() => return Err(Ended::Stopped),
            permit = self.bytes.clone().acquire_many_owned(u32::try_from(cost).unwrap_or(u32::MAX)) => permit.map_err(|_| Ended::Stopped)?,
        };
        self.tx.send((record, bytes)).await.map_err(|_| Ended::Stopped)
    }
}

/// The host of a WebSocket URL (the records' origin "topic").
fn host_of(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_query() {
        assert_eq!(display_url("wss://ws.finnhub.io?token=abc123"), "wss://ws.finnhub.io");
        assert_eq!(display_url("ws://u:p@127.0.0.1:9000/feed?x=1"), "ws://u:***@127.0.0.1:9000/feed");
        assert_eq!(host_of("wss://ws.finnhub.io?token=abc"), "ws.finnhub.io");
        assert_eq!(host_of("ws://127.0.0.1:9000/feed"), "127.0.0.1:9000");
        assert_eq!(with_path("wss://ws.finnhub.io?token=abc"), "wss://ws.finnhub.io/?token=abc");
        assert_eq!(with_path("ws://h:1/feed?x"), "ws://h:1/feed?x");
        assert_eq!(with_path("ws://h:1"), "ws://h:1/");
    }
}
