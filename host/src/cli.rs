//! The `sluice` command line: argument parsing and sub-commands.

use crate::record::{Origin, Record};
use crate::runtime::{Grants, Limits, Plugin, PluginInstance, Runtime};
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Sluice: a WebAssembly plugin-based stream router.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Where compiled plugins are cached [default: $SLUICE_CACHE_DIR, else ~/.cache/sluice].
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Compile plugins on every start instead of caching them.
    #[arg(long, global = true)]
    pub no_cache: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with transform plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Generate a Finnhub-style trade feed: to a Kafka topic, one JSON frame
    /// per line on stdout, or served as a Finnhub-like WebSocket.
    Feed(FeedArgs),
    /// Validate pipeline files without running them (exit 1 on any error).
    ///
    /// Reports every error with its file:line:column: unknown keys, missing
    /// plugin files, plugins rejecting their config, unknown sink names, unset
    /// environment variables.
    Check(PipelineArgs),
    /// Run pipelines until SIGINT/SIGTERM, then stop gracefully (in-flight
    /// batches finish, sinks flush, offsets commit).
    ///
    /// Editing a pipeline file, adding or removing one in a given folder, or
    /// replacing a plugin's .wasm reloads without a restart (so does SIGHUP):
    /// plugin changes swap between two batches; other changes restart only the
    /// pipeline concerned. An invalid change is logged and not applied.
    Run(RunArgs),
    /// A terminal dashboard of a running instance (its admin listener): one
    /// row per pipeline with throughput, lag, errors and plugin versions. q quits.
    Top(TopArgs),
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The admin listener of the instance to watch.
    #[arg(long, default_value = "127.0.0.1:8686")]
    pub addr: String,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Pipeline files, or folders whose *.toml files are pipelines.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipelines: PipelineArgs,
    /// Address of the admin HTTP listener (GET /status, POST /reload); port 0
    /// picks a free one (logged); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:8686", value_parser = parse_admin_addr)]
    pub admin_addr: AdminAddr,
    /// Seconds between the one-line progress summaries per pipeline (rate,
    /// lag, dead letters, failing sinks); 0 disables them.
    #[arg(long, env = "SLUICE_PROGRESS_SECS", default_value_t = 10)]
    pub progress_secs: u64,
}

/// Where the admin listener listens, if anywhere.
#[derive(Debug, Clone, Copy)]
pub struct AdminAddr(pub Option<std::net::SocketAddr>);

fn parse_admin_addr(raw: &str) -> Result<AdminAddr, String> {
    if raw == "off" {
        return Ok(AdminAddr(None));
    }
    raw.parse().map(|a| AdminAddr(Some(a))).map_err(|e| format!("{raw:?}: {e} (e.g. 127.0.0.1:8686, or off)"))
}

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

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin over input values, one per line, and print its outputs.
    ///
    /// Each output value is printed on its own line on stdout; each failing
    /// input is reported on stderr as `line N: <error>`. Exit status: 0 when
    /// no input failed, 1 when some did, 2 when the plugin could not run.
    Test(PluginTestArgs),
    /// Write a ready-to-build plugin skeleton in Rust, Python or JavaScript.
    ///
    /// The folder gets the WIT contract, the language's SDK, a sample
    /// transform with unit tests, sample input, a README and `build.sh`, which
    /// installs the toolchain, runs the unit tests and writes NAME.wasm.
    New(PluginNewArgs),
}

#[derive(Debug, Args)]
pub struct PluginNewArgs {
    /// The plugin's name (lower case, digits, '-' or '_'); also its folder.
    pub name: String,
    /// The language to write it in.
    #[arg(long, value_enum, default_value_t = crate::scaffold::Lang::Rust)]
    pub lang: crate::scaffold::Lang,
    /// Where to create it (default: ./NAME). Must not exist or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PluginTestArgs {
    /// The plugin component (.wasm).
    pub plugin: PathBuf,
    /// A plugin configuration entry, KEY=VALUE (repeatable).
    #[arg(long = "config", short = 'c', value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Read input values from this file instead of stdin.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,
    /// Print each output as a JSON object with its key, route, timestamp and
    /// headers (value: embedded when it is JSON, else a string).
    #[arg(long)]
    pub json: bool,
    /// Records per call into the plugin.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// CPU limit per call, in milliseconds.
    #[arg(long, default_value_t = Limits::default().cpu_ms)]
    pub cpu_ms: u64,
    /// Memory limit of the instance, in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes >> 20)]
    pub memory_mib: usize,
    /// Write every log line of the plugin (no rate limit): for debugging.
    #[arg(long)]
    pub no_log_limit: bool,
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {raw:?}"))
}

/// Parses the arguments, runs the command, prints the error chain on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice: error: {}", crate::secrets::redact(&format!("{error:#}")));
            ExitCode::from(2)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::secrets::redacting_stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cache_dir = if cli.no_cache { None } else { cli.cache_dir.or_else(Runtime::default_cache_dir) };
    let runtime = || Runtime::new(cache_dir.clone());
    match cli.command {
        Command::Plugin(PluginCommand::Test(args)) => plugin_test(&runtime()?, args),
        Command::Plugin(PluginCommand::New(args)) => plugin_new(args),
        Command::Feed(args) => feed(args),
        Command::Check(args) => check(&runtime()?, &args),
        Command::Run(args) => run_pipelines(runtime()?, &args),
        Command::Top(args) => {
            crate::top::run(&args.addr, std::time::Duration::from_millis(args.interval_ms.max(100)))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn print_config_errors(errors: &[crate::config::ConfigError]) {
    for error in errors {
        eprintln!("{}", crate::secrets::redact(&error.to_string()));
    }
    eprintln!("sluice: {} error(s) in pipeline files", errors.len());
}

fn check(runtime: &Runtime, args: &PipelineArgs) -> anyhow::Result<ExitCode> {
    match crate::config::load_dir_or_files(&args.paths, Some(runtime)) {
        Ok(pipelines) => {
            for p in &pipelines {
                let plugins: Vec<String> =
                    p.transforms.iter().map(|t| t.path.file_stem().unwrap_or_default().to_string_lossy().into_owned()).collect();
                let sinks: Vec<&str> = p.sinks.keys().map(String::as_str).collect();
                println!(
                    "{}: ok: pipeline {} [{}] -> sinks [{}] (default {})",
                    p.file.display(),
                    p.name,
                    plugins.join(" -> "),
                    sinks.join(", "),
                    p.default_sink
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            print_config_errors(&errors);
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_pipelines(runtime: Runtime, run: &RunArgs) -> anyhow::Result<ExitCode> {
    let args = &run.pipelines;
    let pipelines = match crate::config::load_dir_or_files(&args.paths, Some(&runtime)) {
        Ok(p) => p,
        Err(errors) => {
            print_config_errors(&errors);
            return Ok(ExitCode::FAILURE);
        }
    };
    tokio_runtime()?.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = crate::config::watcher::Watcher::new(&args.paths, &pipelines, changes_tx)
            .context("cannot watch the pipeline and plugin files")?;
        let mut topology = crate::topology::Topology::new(runtime.clone());
        topology.apply(pipelines).await?;
        let status = std::sync::Arc::new(std::sync::RwLock::new(crate::admin::Status::default()));
        update_status(&status, &topology, None);
        let (admin_tx, mut admin_requests) = tokio::sync::mpsc::unbounded_channel::<crate::admin::ReloadRequest>();
        if let AdminAddr(Some(addr)) = run.admin_addr {
            if let Err(error) = crate::admin::serve(addr, status.clone(), admin_tx).await {
                tracing::warn!(%addr, %error, "cannot start the admin listener; running without it");
            }
        }
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut progress = Progress::new(run.progress_secs);
        let mut failed = 0;
        loop {
            let mut reply = None;
            let reason = tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = terminate.recv() => break,
                _ = hangup.recv() => "SIGHUP".to_string(),
                Some(request) = admin_requests.recv() => {
                    reply = Some(request);
                    "POST /reload".to_string()
                }
                Some(path) = changes.recv() => {
                    // Debounce: editors and compilers write in several steps.
                    let mut changed = std::collections::BTreeSet::from([path]);
                    while let Ok(Some(more)) = tokio::time::timeout(std::time::Duration::from_millis(250), changes.recv()).await {
                        changed.insert(more);
                    }
                    changed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                }
                _ = tick.tick() => {
                    progress.maybe_log(&topology);
                    failed += topology.reap();
                    if topology.is_empty() {
                        return Ok(ExitCode::FAILURE);
                    }
                    continue;
                }
            };
            let outcome = reload(&runtime, &args.paths, &mut topology, &mut watcher, &reason).await;
            update_status(&status, &topology, Some(&outcome));
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
        tracing::info!("shutting down: finishing in-flight batches");
        topology.shutdown().await;
        Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

/// Re-reads the pipeline files and applies them. Anything invalid (a file
/// `sluice check` would reject, a plugin that does not compile or rejects its
/// config) is logged and leaves the running pipelines as they were.
/// Returns a one-line summary, or the reasons for the rejection.
async fn reload(
    runtime: &Runtime,
    paths: &[PathBuf],
    topology: &mut crate::topology::Topology,
    watcher: &mut crate::config::watcher::Watcher,
    reason: &str,
) -> Result<String, String> {
    use tracing::{info, warn};
    let started = std::time::Instant::now();
    let wanted = match tokio::task::block_in_place(|| crate::config::load_dir_or_files(paths, Some(runtime))) {
        Ok(wanted) => wanted,
        Err(errors) => {
            for error in &errors {
                warn!(%reason, %error, "reload rejected: invalid pipeline; running pipelines unchanged");
            }
            return Err(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"));
        }
    };
    match topology.apply(wanted).await {
        Ok(applied) => {
            watcher.follow(topology.pipelines());
            let ms = started.elapsed().as_secs_f64() * 1e3;
            info!(
                %reason,
                started = ?applied.started,
                stopped = ?applied.stopped,
                swapped = ?applied.swapped,
                unchanged = ?applied.kept,
                ms,
                "reload applied"
            );
            Ok(format!(
                "reload applied in {ms:.0} ms: started {:?}, stopped {:?}, swapped {:?}, unchanged {:?}",
                applied.started, applied.stopped, applied.swapped, applied.kept
            ))
        }
        Err(error) => {
            let error = format!("{error:#}");
            warn!(%reason, %error, "reload rejected; running pipelines unchanged");
            Err(error)
        }
    }
}

/// The periodic one-line summary per pipeline, so a long run is never silent.
struct Progress {
    every: std::time::Duration,
    last: std::time::Instant,
    /// Records read per pipeline at the last summary.
    seen: std::collections::BTreeMap<String, u64>,
}

impl Progress {
    fn new(secs: u64) -> Self {
        Progress { every: std::time::Duration::from_secs(secs), last: std::time::Instant::now(), seen: Default::default() }
    }

    fn maybe_log(&mut self, topology: &crate::topology::Topology) {
        let elapsed = self.last.elapsed();
        if self.every.is_zero() || elapsed < self.every {
            return;
        }
        self.last = std::time::Instant::now();
        for p in topology.pipelines() {
            let s = crate::telemetry::telemetry().state(&p.name);
            let before = self.seen.insert(p.name.clone(), s.records_in).unwrap_or(0);
            let rate = s.records_in.saturating_sub(before) as f64 / elapsed.as_secs_f64();
            tracing::info!(
                pipeline = %p.name,
                records_per_s = format!("{rate:.0}"),
                records_in = s.records_in,
                records_out = s.records_out,
                dead_lettered = s.dead_lettered,
                lag = s.lag.values().sum::<i64>(),
                partitions = s.assignment.len(),
                failing_sinks = s.failing_sinks.len(),
                "progress"
            );
        }
    }
}

fn update_status(
    status: &std::sync::RwLock<crate::admin::Status>,
    topology: &crate::topology::Topology,
    outcome: Option<&Result<String, String>>,
) {
    use crate::admin::{PipelineStatus, PluginStatus};
    let Ok(mut status) = status.write() else { return };
    status.pipelines = topology
        .pipelines()
        .map(|p| PipelineStatus {
            name: p.name.clone(),
            file: p.file.display().to_string(),
            plugins: p.transforms.iter().map(|t| PluginStatus { path: t.path.display().to_string(), version: t.hash.clone() }).collect(),
            state: Default::default(),
        })
        .collect();
    match outcome {
        Some(Ok(summary)) => {
            crate::telemetry::telemetry().reload(true);
            status.reloads_ok += 1;
            status.last_reload = Some(summary.clone());
        }
        Some(Err(error)) => {
            crate::telemetry::telemetry().reload(false);
            status.reloads_failed += 1;
            status.last_reload = Some(format!("rejected: {error}"));
        }
        None => {}
    }
}

fn feed(args: FeedArgs) -> anyhow::Result<ExitCode> {
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

async fn feed_kafka(generator: crate::feed::FeedGenerator, brokers: &str, topic: &str, args: &FeedArgs) -> anyhow::Result<ExitCode> {
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

fn plugin_test(runtime: &Runtime, args: PluginTestArgs) -> anyhow::Result<ExitCode> {
    let plugin = Plugin::load(runtime, &args.plugin)?;
    let mut limits = Limits { cpu_ms: args.cpu_ms, memory_bytes: args.memory_mib << 20, ..Limits::default() };
    if args.no_log_limit {
        limits.log_lines_per_s = 0;
    }
    let mut instance = PluginInstance::new(plugin, args.config, limits, Grants::default(), "plugin-test")?;

    let (topic, mut input): (String, Box<dyn BufRead>) = match &args.input {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
            (path.display().to_string(), Box::new(std::io::BufReader::new(file)))
        }
        None => ("stdin".to_string(), Box::new(std::io::stdin().lock())),
    };
    let mut stdout = BufWriter::new(std::io::stdout().lock());
    let mut failed = 0u64;
    let mut line_no = 0i64;
    let mut batch = Vec::with_capacity(args.batch_size as usize);
    loop {
        let mut value = Vec::new();
        let read = input.read_until(b'\n', &mut value).context("cannot read input")?;
        if read > 0 {
            if value.last() == Some(&b'\n') {
                value.pop();
                if value.last() == Some(&b'\r') {
                    value.pop();
                }
            }
            line_no += 1;
            let origin = Origin { topic: topic.clone(), partition: 0, offset: line_no };
            batch.push(Record { value, origin, ..Record::default() });
        }
        if batch.len() == args.batch_size as usize || (read == 0 && !batch.is_empty()) {
            let results = instance.process(&batch);
            if let Some(reason) = instance.take_failing() {
                eprintln!("sluice: the plugin version is failing: {reason}; the batch's remaining records were not run");
            }
            for (record, result) in batch.iter().zip(results) {
                match result {
                    Ok(outputs) => {
                        for output in outputs {
                            if args.json {
                                serde_json::to_writer(&mut stdout, &OutputJson::new(record.origin.offset, &output))?;
                            } else {
                                stdout.write_all(&output.value)?;
                            }
                            stdout.write_all(b"\n")?;
                        }
                    }
                    Err(error) => {
                        failed += 1;
                        stdout.flush()?;
                        eprintln!("line {}: {error}", record.origin.offset);
                    }
                }
            }
            batch.clear();
        }
        if read == 0 {
            break;
        }
    }
    stdout.flush()?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One output of `sluice plugin test --json`.
#[derive(serde::Serialize)]
struct OutputJson<'a> {
    line: i64,
    route: Option<&'a str>,
    key: Option<std::borrow::Cow<'a, str>>,
    timestamp: Option<i64>,
    headers: Vec<(&'a str, std::borrow::Cow<'a, str>)>,
    value: JsonOrText<'a>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum JsonOrText<'a> {
    Json(&'a serde_json::value::RawValue),
    Text(std::borrow::Cow<'a, str>),
}

impl<'a> OutputJson<'a> {
    fn new(line: i64, output: &'a crate::record::Output) -> Self {
        let value = match serde_json::from_slice::<&serde_json::value::RawValue>(&output.value) {
            Ok(raw) => JsonOrText::Json(raw),
            Err(_) => JsonOrText::Text(String::from_utf8_lossy(&output.value)),
        };
        OutputJson {
            line,
            route: output.route.as_deref(),
            key: output.key.as_deref().map(String::from_utf8_lossy),
            timestamp: output.timestamp,
            headers: output.headers.iter().map(|h| (h.name.as_str(), String::from_utf8_lossy(&h.value))).collect(),
            value,
        }
    }
}

fn plugin_new(args: PluginNewArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let written = crate::scaffold::new_plugin(&dir, &args.name, args.lang)?;
    for path in &written {
        println!("created {}", path.display());
    }
    println!(
        "\nnext: build it (installs the toolchain, runs the unit tests) and try it on the sample input:\n  cd {} && ./build.sh && sluice plugin test {}.wasm -i sample.jsonl",
        dir.display(),
        args.name
    );
    Ok(ExitCode::SUCCESS)
}
