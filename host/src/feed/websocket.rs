//! A local stand-in for Finnhub's WebSocket (`sluice feed --serve-websocket`),
//! for the demo, the tests and anyone without a Finnhub key.
//!
//! It speaks Finnhub's protocol: clients send `{"type":"subscribe","symbol":S}`
//! and `{"type":"unsubscribe","symbol":S}`; the server sends trade frames
//! (the [`FeedGenerator`]'s) carrying only subscribed symbols' trades, and
//! `{"type":"ping"}` regularly. With a token set, a client whose `?token=`
//! differs gets `{"type":"error","msg":"Invalid API key"}` and a close.

use super::FeedGenerator;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Frames per second per connection (0: as fast as the client reads).
    pub rate: u32,
    /// The token clients must give as `?token=`; `None`: any.
    pub token: Option<String>,
    /// Seed of the generator (connection N uses seed + N).
    pub seed: u64,
    /// Seconds between `{"type":"ping"}` frames (0: none).
    pub ping_secs: u64,
    /// Drop (no close frame) each of the first `drops` connections after
    /// `drop_after` frames: for reconnect tests.
    pub drop_after: u64,
    pub drops: u64,
    /// Stop sending after this many trade frames in all (0: never).
    pub max_frames: u64,
    /// Keep every frame sent, for tests to compare with what was stored.
    pub record: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            rate: 100,
            token: None,
            seed: 1,
            ping_secs: 10,
            drop_after: 0,
            drops: 0,
            max_frames: 0,
            record: false,
        }
    }
}

/// What a running stand-in has sent.
#[derive(Debug, Default)]
pub struct Sent {
    pub connections: AtomicU64,
    pub frames: AtomicU64,
    pub trades: AtomicU64,
    /// Set to stop sending (before the counts are read for good).
    pub stopped: std::sync::atomic::AtomicBool,
    /// Every trade frame sent, with `record`.
    pub log: Mutex<Vec<String>>,
}

/// Serves the stand-in on `listener` until the task is dropped; returns the
/// counters of what it sent.
pub fn spawn(listener: TcpListener, options: ServeOptions) -> (Arc<Sent>, tokio::task::JoinHandle<()>) {
    let sent = Arc::new(Sent::default());
    let counters = sent.clone();
    let handle = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { continue };
            let (options, counters) = (options.clone(), counters.clone());
            tokio::spawn(async move {
                if let Err(error) = serve_one(stream, &options, &counters).await {
                    info!(%peer, %error, "feed client gone");
                }
            });
        }
    });
    (sent, handle)
}

/// `sluice feed --serve-websocket ADDR`: serves until interrupted.
pub async fn serve(addr: SocketAddr, options: ServeOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "serving a Finnhub-style WebSocket feed on ws://{} ({} frames/s per connection)",
        listener.local_addr()?,
        options.rate
    );
    let (sent, _task) = spawn(listener, options);
    tokio::signal::ctrl_c().await?;
    // Stop sending first, so that the counts are final.
    sent.stopped.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!(
        "sent {} frames ({} trades) over {} connections",
        sent.frames.load(Ordering::SeqCst),
        sent.trades.load(Ordering::SeqCst),
        sent.connections.load(Ordering::SeqCst)
    );
    Ok(())
}

/// The trades of `frame` whose symbol is subscribed, as a frame (`None`: none).
fn filter(frame: &str, subscribed: &BTreeSet<String>) -> Option<(String, u64)> {
    let mut v: Value = serde_json::from_str(frame).ok()?;
    let data = v.get_mut("data")?.as_array_mut()?;
    data.retain(|t| t["s"].as_str().is_some_and(|s| subscribed.contains(s)));
    let n = data.len() as u64;
    (n > 0).then(|| (v.to_string(), n))
}

async fn serve_one(stream: TcpStream, options: &ServeOptions, sent: &Sent) -> anyhow::Result<()> {
    let mut token_ok = options.token.is_none();
    // The error type is tungstenite's, fixed by its handshake callback.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, response: Response| {
        if let Some(want) = &options.token {
            let query = request.uri().query().unwrap_or_default();
            token_ok = query.split('&').any(|p| p.strip_prefix("token=") == Some(want.as_str()));
        }
        Ok(response)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, check).await?;
    // Counted once the handshake is done: a port probe is no connection.
    let n = sent.connections.fetch_add(1, Ordering::SeqCst);
    if !token_ok {
        ws.send(Message::text(r#"{"type":"error","msg":"Invalid API key"}"#)).await?;
        ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Policy,
            reason: "invalid token".into(),
        }))
        .await?;
        return Ok(());
    }
    let mut generator = FeedGenerator::new(options.seed.wrapping_add(n));
    generator.ping_every = 0;
    let mut subscribed = BTreeSet::new();
    let period = if options.rate == 0 {
        Duration::from_micros(1)
    } else {
        Duration::from_secs_f64(1.0 / f64::from(options.rate))
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping = tokio::time::interval(Duration::from_secs(options.ping_secs.max(1)));
    ping.tick().await;
    let mut on_this_connection = 0u64;
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    let symbol = v["symbol"].as_str().unwrap_or_default().to_string();
                    match v["type"].as_str() {
                        Some("subscribe") => { subscribed.insert(symbol); }
                        Some("unsubscribe") => { subscribed.remove(&symbol); }
                        _ => warn!(message = %text.as_str(), "feed: unknown message"),
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
            _ = ping.tick(), if options.ping_secs > 0 => {
                ws.send(Message::text(r#"{"type":"ping"}"#)).await?;
            }
            _ = ticker.tick(), if !subscribed.is_empty() => {
                if sent.stopped.load(Ordering::SeqCst) || (options.max_frames > 0 && sent.frames.load(Ordering::SeqCst) >= options.max_frames) {
                    continue;
                }
                let frame = generator.next_frame();
                let Some((frame, trades)) = filter(&frame.json, &subscribed) else { continue };
                ws.send(Message::text(frame.clone())).await?;
                // Counted once the frame is in the socket: a test compares what was sent with what was stored.
                sent.frames.fetch_add(1, Ordering::SeqCst);
                sent.trades.fetch_add(trades, Ordering::SeqCst);
                if options.record {
                    if let Ok(mut log) = sent.log.lock() {
                        log.push(frame);
                    }
                }
                on_this_connection += 1;
                if options.drop_after > 0 && n < options.drops && on_this_connection >= options.drop_after {
                    // Abruptly: no close frame, as a network failure would.
                    drop(ws);
                    return Ok(());
                }
            }
        }
    }
}
