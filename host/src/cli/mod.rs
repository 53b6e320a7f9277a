//! The `sluice` command line: argument parsing, logging, and one module per
//! sub-command:
//!
//! - [`run`](mod@run): `sluice run`, the run loop (signals, admin requests, file
//!   changes, progress lines); [`reload`]: the one reload path it takes;
//! - [`check`]: `sluice check`;
//! - [`backfill`]: `sluice backfill`, a past range recomputed into side tables;
//! - [`shadow`](mod@shadow): `sluice shadow report|promote`, a running
//!   instance's shadow runs;
//! - [`state`](mod@state): `sluice state`, the keyed state a pipeline's
//!   stateful plugins keep;
//! - [`feed`]: `sluice feed` (stdout, Kafka, or the WebSocket stand-in);
//! - [`plugin`]: `sluice plugin test` and `sluice plugin new`;
//! - [`record`]: `sluice record`, a running instance's stage recorded into
//!   a capture; [`replay`]: `sluice replay`, a capture run again;
//! - [`schema`](mod@schema): `sluice schema`, the pipeline file's JSON Schema.
//!
//! `sluice top` lives in [`crate::top`].

pub mod backfill;
pub mod check;
pub mod feed;
pub mod plugin;
pub mod record;
pub mod reload;
pub mod replay;
pub mod run;
pub mod schema;
pub mod shadow;
pub mod state;

use crate::runtime::Runtime;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use feed::FeedArgs;
use plugin::PluginCommand;
use run::RunArgs;
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
    /// Recompute a past range of a pipeline's Kafka input into side tables
    /// or topics (`--into`), optionally with another plugin version, beside
    /// the live pipeline and without touching its consumer group. Exits once
    /// the range is done; running it again after a crash completes it, each
    /// row written once (PostgreSQL).
    Backfill(backfill::BackfillArgs),
    /// A running instance's shadow runs (a candidate plugin version beside
    /// a live one, its outputs compared key by key): their report, and
    /// promotion of the candidate.
    #[command(subcommand)]
    Shadow(shadow::ShadowCommand),
    /// The keyed state a pipeline's stateful (contract 0.3) plugins keep
    /// with its PostgreSQL sink: per stage and partition the keys, timers
    /// and watermark, or one key's value (`--key`).
    State(state::StateArgs),
    /// Record a stage of a running pipeline (through the instance's admin
    /// listener) into a capture file: each call's inputs, watermarks, clock
    /// and live outputs, and the state the stage held. It stops by itself
    /// at its bound (--records, --for, --max-mib).
    Record(record::RecordArgs),
    /// Run a capture (`sluice record`) again, call by call as it ran live,
    /// through the recorded plugin version or another (--plugin): print
    /// the outputs, compare them with the live ones (--diff), or trace the
    /// state keys of a prefix (--trace).
    Replay(replay::ReplayArgs),
    /// Print the pipeline file's JSON Schema (for editors: taplo, Even Better
    /// TOML), or with --markdown the reference chapter rendered from it.
    Schema(schema::SchemaArgs),
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
    /// The file holding the instance's admin token (its `--admin-token-file`).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Pipeline files, or folders whose *.toml files are pipelines.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

pub(crate) fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {raw:?}"))
}

/// Parses the arguments, runs the command, prints the error chain on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    redact_panics();
    // `plugin test` reports its inputs' failures on stderr: the plugin's
    // own log lines go there too, the machinery's progress does not.
    let quiet = matches!(cli.command, Command::Plugin(PluginCommand::Test(_)) | Command::Replay(_));
    init_logging(cli.log_format, if quiet { "warn,sluice::runtime::host_state=trace" } else { "info" });
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice: error: {}", crate::secrets::redact(&format!("{error:#}")));
            ExitCode::from(2)
        }
    }
}

/// Panic messages go through the redaction like every other line: a value
/// quoted in one may be a secret.
fn redact_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = format!("thread '{}' {info}", thread.name().unwrap_or("<unnamed>"));
        eprintln!("{}", crate::secrets::redact(&message));
    }));
}

/// Logs to stderr, filtered by `RUST_LOG`, else by `default`.
fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
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
        Command::Plugin(PluginCommand::Test(args)) => plugin::test(&runtime()?, *args),
        Command::Plugin(PluginCommand::New(args)) => plugin::new(args),
        Command::Feed(args) => feed::feed(args),
        Command::Check(args) => check::check(&runtime()?, &args),
        Command::Run(args) => run::run(runtime()?, &args),
        Command::Backfill(args) => backfill::backfill(runtime()?, &args),
        Command::Schema(args) => schema::schema(&args),
        Command::Shadow(command) => shadow::shadow(&command),
        Command::Record(args) => record::record(&args),
        Command::Replay(args) => replay::replay(&runtime()?, &args),
        Command::State(args) => state::state(&runtime()?, &args),
        Command::Top(args) => {
            let token = shadow::read_token(args.token_file.as_ref())?;
            crate::top::run(&args.addr, token.as_deref(), std::time::Duration::from_millis(args.interval_ms.max(100)))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

pub(crate) fn print_config_errors(errors: &[crate::config::ConfigError]) {
    for error in errors {
        eprintln!("{}", crate::secrets::redact(&error.to_string()));
    }
    eprintln!("sluice: {} error(s) in pipeline files", errors.len());
}
