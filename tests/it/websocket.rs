//! The WebSocket source over real sockets: the Finnhub stand-in
//! (`sluice::feed::websocket`) in process, small hostile servers, the real
//! broker and PostgreSQL, and TLS through a `socat` terminator.

use crate::common;

use common::plugin_path;
use common::services::*;
use common::tls::{Certs, TlsTerminator};
use common::trades::{count_rows, create_trades_topics, expected_trades, stored_trades_in, trades_setup};
use futures::{SinkExt, StreamExt};
use rdkafka::Message as _;
use sluice::feed::websocket::{spawn, Sent, ServeOptions};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use common::trades::TRADE_COLUMNS as COLUMNS;

const SUBSCRIBED: [&str; 3] = ["BINANCE:BTCUSDT", "BINANCE:ETHUSDT", "AAPL"];

/// A stand-in on a free port; returns its address and what it sent.
async fn stand_in(options: ServeOptions) -> (String, Arc<Sent>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (sent, task) = spawn(listener, options);
    (addr, sent, task)
}

/// `[source]` of a WebSocket pipeline at `url` subscribing to [`SUBSCRIBED`] (`extra`: more keys).
fn ws_source(url: &str, extra: &str) -> String {
    let subscribe: Vec<String> =
        SUBSCRIBED.iter().map(|s| format!("{{ type = \"subscribe\", symbol = \"{s}\" }}")).collect();
    format!(
        "[source]\ntype = \"websocket\"\nurl = \"{url}\"\nsubscribe = [{}]\nbatch_max_ms = 20\n{extra}\n",
        subscribe.join(", ")
    )
}

/// WebSocket → flattener → PostgreSQL `table` at `pg_url`; dead letters to Kafka `trades_dlq`.
fn ws_to_postgres(source: &str, table: &str, pg_url: &str) -> String {
    format!(
        "name = \"live\"\n{source}\n[[transforms]]\nplugin = \"{}\"\n[sinks.pg]\ntype = \"postgres\"\nurl = \"{pg_url}\"\ntable = \"{table}\"\ncreate_table = true\n{COLUMNS}\n[dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"trades_dlq\"\n",
        plugin_path("trade_flattener").display()
    )
}

fn sent_frames(sent: &Sent) -> Vec<Vec<u8>> {
    sent.log.lock().unwrap().iter().map(|f| f.clone().into_bytes()).collect()
}

async fn wait_for_rows(pg: &tokio_postgres::Client, table: &str, expected: usize, sluice: &SluiceProcess) {
    let stored = wait_until(Duration::from_secs(90), || async { count_rows(pg, table).await >= expected }).await;
    assert!(stored, "{} of {expected} rows; log {}", count_rows(pg, table).await, sluice.log.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_pipeline_stack_stores_exactly_the_subscribed_trades() {
    let (broker, pg, table) = trades_setup("ws_stack", 2).await;
    let options =
        ServeOptions { rate: 300, max_frames: 400, record: true, token: Some("tok-5a1e".into()), ..Default::default() };
    let (addr, sent, _server) = stand_in(options).await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = format!(
        "name = \"ingest\"\n{}[sinks.raw]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"trades_raw\"\n[dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"trades_dlq\"\n",
        ws_source(&format!("ws://{addr}?token=${{FINNHUB_TOKEN}}"), "")
    );
    write_pipeline(dir.path(), "ingest", &ingest);
    write_pipeline(
        dir.path(),
        "trades",
        &common::trades::trades_pipeline_to(&table, "g-ws-stack", 500, "${SLUICE_PG_URL}", ""),
    );
    let sluice = SluiceProcess::run_with(&[dir.path()], &broker.addr, &[("FINNHUB_TOKEN", "tok-5a1e")]);

    assert!(
        wait_until(Duration::from_secs(60), || async { sent.frames.load(Ordering::SeqCst) >= 400 }).await,
        "the stand-in did not send"
    );
    let frames = sent_frames(&sent);
    let expected = expected_trades(&frames);
    assert_eq!(expected.len() as u64, sent.trades.load(Ordering::SeqCst));
    wait_for_rows(&pg.client, &table, expected.len(), &sluice).await;
    let stored = stored_trades_in(&pg.client, &table).await;
    assert_eq!(stored, expected, "every trade sent, exactly once");
    assert!(stored.iter().all(|t| SUBSCRIBED.contains(&t.0.as_str())), "only subscribed symbols");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    assert!(!log.contains("tok-5a1e"), "the token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_resumed_and_every_frame_sent_while_connected_is_stored() {
    let (broker, pg, table) = trades_setup("ws_reconnect", 1).await;
    let options =
        ServeOptions { rate: 200, drop_after: 60, drops: 3, max_frames: 300, record: true, ..Default::default() };
    let (addr, sent, _server) = stand_in(options).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "live",
        &ws_to_postgres(&ws_source(&format!("ws://{addr}/"), ""), &table, "${SLUICE_PG_URL}"),
    );
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;

    assert!(
        wait_until(Duration::from_secs(60), || async { sent.frames.load(Ordering::SeqCst) >= 300 }).await,
        "the stand-in did not send"
    );
    let expected = expected_trades(&sent_frames(&sent));
    wait_for_rows(&pg.client, &table, expected.len(), &sluice).await;
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected, "the rows are the frames sent while connected");
    assert_eq!(sent.connections.load(Ordering::SeqCst), 4, "three drops, three reconnects");
    assert_eq!(metric(&admin, "sluice_source_reconnects_total{pipeline=\"live\"}"), Some(3.0));
    assert_eq!(metric(&admin, "sluice_source_connected{pipeline=\"live\"}"), Some(1.0));
    assert!(metric(&admin, "sluice_source_disconnected_seconds_total{pipeline=\"live\"}").is_some_and(|s| s > 0.0));
    assert_eq!(sluice.log_count("websocket reconnected"), 3);
}

/// A server that answers every handshake with HTTP 401.
async fn unauthorized_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ =
                stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        }
    });
    addr
}

/// A WebSocket server that runs `script` on every connection it accepts.
async fn scripted_server<F, Fut>(script: F) -> String
where
    F: Fn(tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                    script(ws).await;
                }
            });
        }
    });
    addr
}

/// A pipeline from the WebSocket to Kafka topic `out`, dead letters to `trades_dlq`.
fn ws_to_kafka(source: &str) -> String {
    format!(
        "name = \"live\"\n{source}\n[sinks.out]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"out\"\n[dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"trades_dlq\"\n"
    )
}

async fn broker_with_out() -> Broker {
    let broker = Broker::start();
    create_trades_topics(&broker, 1).await;
    broker.create_topic("out", 1).await;
    broker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_is_a_clear_error_with_the_token_never_shown_and_an_idle_server_is_left() {
    let broker = broker_with_out().await;
    let dir = tempfile::tempdir().unwrap();
    let token = "secret-token-77c1";
    let refusing = unauthorized_server().await;
    let idle = scripted_server(|mut ws| async move {
        // Reads the subscriptions, then says nothing.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let a = write_pipeline(
        dir.path(),
        "refused",
        &ws_to_kafka(&ws_source(&format!("ws://{refusing}/?token={token}"), "")).replace("\"live\"", "\"refused\""),
    );
    let b = write_pipeline(
        dir.path(),
        "idle",
        &ws_to_kafka(&ws_source(&format!("ws://{idle}/"), "idle_timeout_secs = 1\nping_secs = 0"))
            .replace("\"live\"", "\"idle\""),
    );
    let sluice = SluiceProcess::run(&[&a, &b], &broker.addr);
    let admin = sluice.admin_addr().await;

    assert!(
        sluice.wait_log("handshake refused: HTTP 401 Unauthorized (check the token or credentials)", 0).await,
        "log {}",
        sluice.log.display()
    );
    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 503);
    assert!(health.contains("not connected: handshake refused: HTTP 401"), "{health}");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let line = log.lines().find(|l| l.contains("HTTP 401")).unwrap();
    assert!(
        line.contains("pipeline=refused") && line.contains(&format!("url=ws://{refusing}/")),
        "names the pipeline and URL: {line}"
    );

    assert!(sluice.wait_log("no frame for 1 s (idle_timeout_secs)", 0).await, "log {}", sluice.log.display());
    assert!(sluice.wait_log("websocket reconnected", 0).await, "no reconnect after the idle timeout");
    let (_, status) = http(&admin, "GET", "/status");
    let (_, metrics) = http(&admin, "GET", "/metrics");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    for (what, text) in [("log", &log), ("/health", &health), ("/status", &status), ("/metrics", &metrics)] {
        assert!(!text.contains(token), "{what} shows the token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_dead_lettered_and_the_stream_goes_on() {
    let broker = broker_with_out().await;
    let server = scripted_server(|mut ws| async move {
        let _ = ws.next().await; // the subscription
        for frame in ["small".to_string(), "x".repeat(5_000), "after".to_string()] {
            let _ = ws.send(Message::text(frame)).await;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "live",
        &ws_to_kafka(&ws_source(&format!("ws://{server}/"), "max_message_bytes = 1000")),
    );
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let out = broker.consume("out", 2, Duration::from_secs(30));
    let values: Vec<&[u8]> = out.iter().filter_map(|m| m.payload()).collect();
    assert_eq!(values, vec![&b"small"[..], &b"after"[..]], "log {}", sluice.log.display());
    let dead = broker.consume("trades_dlq", 1, Duration::from_secs(10));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload().map(<[u8]>::len), Some(5_000));
    let reason = header(&dead[0], "sluice.error").unwrap();
    assert!(reason.contains("websocket frame of 5000 bytes is over max_message_bytes (1000)"), "{reason}");
    assert_eq!(header(&dead[0], "sluice.plugin").as_deref(), Some("source"));
}

/// The bytes waiting unread in the receive queues of the loopback TCP
/// sockets connected to `port` (the client's side of a connection to a
/// server listening there), from /proc/net/tcp.
fn unread_bytes(port: &str) -> u64 {
    let port = format!("{:04X}", port.parse::<u16>().unwrap());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields.get(2)?.rsplit(':').next()?;
            let rx = fields.get(4)?.split(':').nth(1)?;
            (remote_port == port).then(|| u64::from_str_radix(rx, 16).ok()).flatten()
        })
        .sum()
}

/// The resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_server_and_a_stopped_postgresql_keep_memory_bounded_and_lose_nothing() {
    let broker = broker_with_out().await;
    let pg = PrivatePostgres::start();
    let client = pg.client().await;
    // The server sends as fast as the socket takes; PostgreSQL (the sink) stops for 10 s.
    let options = ServeOptions { rate: 0, max_frames: 100_000, record: true, ping_secs: 0, ..Default::default() };
    let (addr, sent, _server) = stand_in(options).await;
    let dir = tempfile::tempdir().unwrap();
    let source = ws_source(&format!("ws://{addr}/"), "buffer_records = 2000\nbatch_max_records = 500");
    let file = write_pipeline(dir.path(), "live", &ws_to_postgres(&source, "public.trades", &pg.url()));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let pid = sluice.pid().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || async { count_rows(&client, "public.trades").await > 1_000 }).await,
        "log {}",
        sluice.log.display()
    );

    pg.stop_server();
    let stopped_at = Instant::now();
    let mut peak = 0.0_f64;
    let mut sent_at_half = 0;
    while stopped_at.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_mib(pid));
        if sent_at_half == 0 && stopped_at.elapsed() >= Duration::from_secs(5) {
            sent_at_half = sent.frames.load(Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent_late = sent.frames.load(Ordering::SeqCst) - sent_at_half;
    let unread = unread_bytes(addr.rsplit(':').next().unwrap());
    pg.start_server();
    eprintln!("bytes waiting unread in Sluice's socket at the end of the outage: {unread}");
    eprintln!(
        "peak RSS while PostgreSQL was down: {peak:.0} MiB; frames the server got out in its last 5 s: {sent_late}"
    );
    // Bounded: Sluice buffers 2,000 frames and stops reading the socket;
    // what the server sends next waits in the kernel's socket buffers (up
    // to tcp_rmem's maximum, 32 MiB on some machines: more than the server
    // sends in 10 s there) until TCP holds the server back. So the test
    // asks the kernel: bytes unread by Sluice wait in its socket.
    assert!(peak < 400.0, "RSS reached {peak:.0} MiB");
    assert!(
        unread > 0 || sent_late < 1_000,
        "Sluice kept reading the socket: nothing waits in it, {sent_late} frames in the last 5 s of the outage"
    );
    assert!(sent.frames.load(Ordering::SeqCst) < 100_000, "the server finished while the sink was down");

    assert!(
        wait_until(Duration::from_secs(120), || async { sent.frames.load(Ordering::SeqCst) >= 100_000 }).await,
        "the stand-in did not finish"
    );
    let client = pg.client().await;
    let expected = expected_trades(&sent_frames(&sent));
    wait_for_rows(&client, "public.trades", expected.len(), &sluice).await;
    assert_eq!(stored_trades_in(&client, "public.trades").await, expected, "every frame received is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_ca_file_and_an_untrusted_server() {
    let (broker, pg, table) = trades_setup("ws_tls", 1).await;
    let certs = Certs::generate();
    let options = ServeOptions { rate: 200, max_frames: 100, record: true, ..Default::default() };
    let (addr, sent, _server) = stand_in(options).await;
    let tls = TlsTerminator::start(&certs, &addr, None);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("wss://{}/", tls.addr());
    // First with the system's roots, which do not know the test CA.
    let file = write_pipeline(dir.path(), "live", &ws_to_postgres(&ws_source(&url, ""), &table, "${SLUICE_PG_URL}"));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    assert!(sluice.wait_log("certificate verify failed", 0).await, "log {}", sluice.log.display());

    let reloads = sluice.log_count("reload applied");
    let with_ca = ws_source(&url, &format!("ca = \"{}\"", certs.path("ca.pem").display()));
    write_pipeline(dir.path(), "live", &ws_to_postgres(&with_ca, &table, "${SLUICE_PG_URL}"));
    assert!(sluice.wait_log("reload applied", reloads).await);
    assert!(
        wait_until(Duration::from_secs(60), || async { sent.frames.load(Ordering::SeqCst) >= 100 }).await,
        "nothing sent over TLS"
    );
    let expected = expected_trades(&sent_frames(&sent));
    wait_for_rows(&pg.client, &table, expected.len(), &sluice).await;
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_frames_stays_within_buffer_bytes() {
    let broker = broker_with_out().await;
    let pg = PrivatePostgres::start();
    pg.stop_server();
    // 400 frames of 1 MB, sent as fast as the socket takes them, to a pipeline whose sink is down.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let server = scripted_server(move |mut ws| {
        let counter = counter.clone();
        async move {
            let _ = ws.next().await; // the subscription
            let frame = format!("{{\"v\":\"{}\"}}", "x".repeat(1_000_000));
            for _ in 0..400 {
                if ws.send(Message::text(frame.clone())).await.is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(
        dir.path(),
        "live",
        &format!(
            "name = \"live\"\n{}\n[sinks.pg]\ntype = \"postgres\"\nurl = \"{}\"\ntable = \"public.big\"\ncreate_table = true\ncolumns = [{{ name = \"v\", type = \"text\" }}]\n[dead_letter]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"trades_dlq\"\n",
            ws_source(&format!("ws://{server}/"), "buffer_bytes = 8388608"),
            pg.url()
        ),
    );
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let pid = sluice.pid().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || async { sent.load(Ordering::SeqCst) >= 5 }).await,
        "nothing sent; log {}",
        sluice.log.display()
    );
    let started = Instant::now();
    let mut peak = 0.0_f64;
    while started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let frames = sent.load(Ordering::SeqCst);
    eprintln!(
        "peak RSS with 8 MiB of buffer_bytes and 1 MB frames: {peak:.0} MiB; frames the server got out: {frames}"
    );
    // 8 MiB buffered, a few batches in flight and the sockets' buffers: tens of frames, not 400.
    assert!(frames < 100, "the server was not held back: {frames} frames of 1 MB sent");
    assert!(peak < 250.0, "RSS reached {peak:.0} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_that_never_answers_the_handshake_times_out_and_is_retried() {
    let broker = broker_with_out().await;
    // Accepts TCP and says nothing: the TLS handshake would wait forever.
    let addr = silent_server();
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "live", &ws_to_kafka(&ws_source(&format!("wss://{addr}/"), "")));
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    let needle = format!("the TLS handshake with {addr} timed out");
    assert!(sluice.wait_log(&needle, 0).await, "log {}", sluice.log.display());
    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 503);
    assert!(health.contains(&needle), "{health}");
}
