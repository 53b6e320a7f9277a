//! `sluice feed`: a generated Finnhub-style feed to stdout or a Kafka topic,
//! or served as a stand-in for Finnhub's WebSocket.

use super::{parse_key_value, tokio_runtime};
use anyhow::Context;
use clap::Args;
use std::io::{BufWriter, Write};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct FeedArgs {
    /// How many frames to generate.
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// Seed of the generator: the same seed gives the same feed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One frame in N is a ping (0: none).
    #[arg(long, default_value_t = 20)]
    pub ping_every: u32,
    /// Kafka bootstrap servers, for `--topic`.
    #[arg(long, env = "SLUICE_BROKERS")]
    pub brokers: Option<String>,
    /// Produce to this Kafka topic instead of printing to stdout.
    #[arg(long)]
    pub topic: Option<String>,
    /// Frames per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// A librdkafka producer property, KEY=VALUE (repeatable).
    #[arg(long = "property", short = 'X', value_parser = parse_key_value)]
    pub properties: Vec<(String, String)>,
    /// Serve the feed as a local stand-in for Finnhub's WebSocket on this
    /// address (e.g. 127.0.0.1:8765) instead: subscribe/unsubscribe
    /// messages, trade frames of subscribed symbols at --rate per
    /// connection, pings. Runs until SIGINT.
    #[arg(long, value_name = "ADDR")]
    pub serve_websocket: Option<std::net::SocketAddr>,
    /// With --serve-websocket: the token clients must give as `?token=`
    /// (others get Finnhub's error frame); default: any.
    #[arg(long, env = "FINNHUB_TOKEN")]
    pub token: Option<String>,
}

pub fn feed(args: FeedArgs) -> anyhow::Result<ExitCode> {
    if let Some(addr) = args.serve_websocket {
        let options = crate::feed::websocket::ServeOptions {
            rate: args.rate,
            token: args.token.clone(),
            seed: args.seed,
            ..Default::default()
        };
        tokio_runtime()?.block_on(crate::feed::websocket::serve(addr, options))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut generator = crate::feed::FeedGenerator::new(args.seed);
    generator.ping_every = args.ping_every;
    if let Some(topic) = &args.topic {
        let brokers = args.brokers.as_deref().context("--topic needs --brokers (or SLUICE_BROKERS)")?;
        return tokio_runtime()?.block_on(feed_kafka(generator, brokers, topic, &args));
    }
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    for frame in generator.take(args.count as usize) {
        stdout.write_all(frame.json.as_bytes())?;
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn feed_kafka(
    generator: crate::feed::FeedGenerator,
    brokers: &str,
    topic: &str,
    args: &FeedArgs,
) -> anyhow::Result<ExitCode> {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let (count, rate) = (args.count, args.rate);
    let mut config = rdkafka::ClientConfig::new();
    config.set("linger.ms", "5");
    for (k, v) in &args.properties {
        config.set(k, v);
    }
    let producer: FutureProducer = config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .context("cannot create the Kafka producer")?;
    let mut pacer = (rate > 0).then(|| tokio::time::interval(std::time::Duration::from_secs_f64(1.0 / rate as f64)));
    let (mut frames, mut trades) = (0u64, 0u64);
    let mut pending = std::collections::VecDeque::new();
    for frame in generator.take(count as usize) {
        if let Some(p) = pacer.as_mut() {
            p.tick().await;
        }
        let delivery = producer
            .send_result(FutureRecord::<(), _>::to(topic).payload(&frame.json))
            .map_err(|(e, _)| e)
            .with_context(|| format!("cannot produce to {topic}"))?;
        pending.push_back(delivery);
        if pending.len() >= 10_000 {
            if let Some(d) = pending.pop_front() {
                d.await?.map_err(|(e, _)| e).with_context(|| format!("delivery to {topic} failed"))?;
            }
        }
        frames += 1;
        trades += frame.trades as u64;
    }
    for d in pending {
        d.await?.map_err(|(e, _)| e).with_context(|| format!("delivery to {topic} failed"))?;
    }
    producer.flush(rdkafka::util::Timeout::After(std::time::Duration::from_secs(30)))?;
    eprintln!("fed {frames} frames ({trades} trades) to {topic}");
    Ok(ExitCode::SUCCESS)
}
