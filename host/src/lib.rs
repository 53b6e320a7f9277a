//! # Sluice: a WebAssembly plugin-based stream router
//!
//! Sluice reads records from sources (Kafka, WebSocket, files), runs them through a chain of
//! user-compiled WebAssembly transform components, and writes the results to
//! sinks (Kafka, PostgreSQL, stdout).
//!
//! # Layout
//!
//! - [`record`]: the host's record types, shared by sources, transforms and sinks
//!   (keys and values are `Bytes`; a transform's results are one `Results` per
//!   batch: its outputs are ranges of the plugin's results buffer, which the
//!   sinks read as borrowed `OutputRef` views);
//! - [`runtime`]: the wasmtime engine, the plugin loader with its compile cache,
//!   plugin instances with time and memory limits (async calls, so that the
//!   time limit holds inside host calls) and sandbox grants, and the
//!   plugin contracts (0.1 typed records, 0.2 one buffer per batch, 0.3
//!   with keyed state, timers and state versions);
//! - [`config`]: pipeline files: TOML structures, `${VAR}` expansion, validation,
//!   and the JSON Schema and reference chapter generated from the structures;
//! - [`feed`]: a Finnhub-style trade feed generator (demo, tests, benchmarks)
//!   and a stand-in for Finnhub's WebSocket;
//! - [`crash`]: crash points (`SLUICE_CRASH_AT`) for the tests of the windows between two writes;
//! - [`connector`]: what every source and sink is given (`Check` when a
//!   file is read, `Build` when a pipeline starts) and the `registry!` that lists them;
//! - [`sources`]: where records come from, one folder each behind
//!   [`sources::Connector`] and [`sources::Source`] (`kafka/`, `websocket/`, `file/`),
//!   listed in [`sources::SourceConfig`], and what a source is asked to read
//!   ([`sources::RunOptions`]: to its end, or a backfill's [`sources::Range`]);
//! - [`sinks`]: where outputs go, one folder each behind [`sinks::Connector`]
//!   and [`sinks::Sink`] (`kafka/`, `postgres/`, `stdout/`), listed in
//!   [`sinks::SinkConfig`];
//! - [`clients`]: the clients several parts share: Kafka (the source, sinks
//!   and dead letters: named connections, TLS, SASL, properties checked
//!   without connecting, connection errors classified), PostgreSQL (the
//!   postgres sink, the state store and `sluice state`: libpq's sslmodes,
//!   and the offsets table), and TLS roots;
//! - [`secrets`]: secret values remembered and hidden from every output;
//! - [`transforms`]: the chain of plugin instances a batch runs through;
//! - [`state`]: keyed state of contract 0.3 plugins: per stage and source
//!   partition, read through a call's changes, applied when a batch is
//!   delivered, read back from a [`state::StateStore`] and committed by a
//!   [`state::StateKeeper`] (the exactly-once PostgreSQL sink, in the
//!   transaction of the rows and offsets, or `[state.postgres]`, or in
//!   memory for `sluice plugin test`);
//! - [`capture`]: a live stage recorded call by call (the capture format,
//!   the stage's recorder and its writer thread) for `sluice replay`;
//! - [`shadow`]: shadow runs: a candidate version beside a live stage on the
//!   same batches, on its own thread; the per-key diff, its report, and
//!   promotion (the pipeline file rewritten, then the ordinary hot swap);
//! - [`supervisor`]: plugin-version health: probation after a hot swap,
//!   error surges, rollback, pause and refused versions;
//! - [`topology`]: the running set of pipelines, started and changed by
//!   applying a diff; a pipeline's task, its transform step, its delivery
//!   and the keeper of its state; and a chain run through the same
//!   transform step in-process (`sluice plugin test` of a stateful plugin);
//! - [`telemetry`]: Prometheus metrics and the live per-pipeline state (lag, failing sinks, errors);
//! - [`admin`]: the admin HTTP listener (`/metrics`, `/health`, `/status`,
//!   `/reload`, a pipeline's shadow report and promotion)
//!   and who may use it (`Host`, `Origin`, a bearer token);
//! - [`scaffold`]: `sluice plugin new`, the plugin skeletons in Rust, Python and JavaScript;
//! - [`top`]: `sluice top`, the terminal dashboard over an instance's `/status`;
//! - [`cli`]: the `sluice` command line, one module per sub-command (`run`
//!   with its reload path, `check`, `backfill`, `shadow`, `state`, `feed`,
//!   `plugin`, `schema`, `top`); `main.rs` only calls
//!   [`cli::main`].

/// glibc's malloc spends a third of the WASM path's time consolidating the
/// per-batch buffers of the component boundary; mimalloc does not (see the
/// `flatten` benchmark). It is built without its transparent-huge-page
/// advice (`no_thp`): with it, each first touch of fresh memory zeroed a
/// 2 MiB page, up to a tenth of a pipeline's CPU (the book's performance
/// chapter).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod capture;
pub mod cli;
pub mod clients;
pub mod config;
pub mod connector;
pub mod crash;
pub mod feed;
pub mod record;
pub mod runtime;
pub mod scaffold;
pub mod secrets;
pub mod shadow;
pub mod sinks;
pub mod sources;
pub mod state;
pub mod supervisor;
pub mod telemetry;
pub mod top;
pub mod topology;
pub mod transforms;
