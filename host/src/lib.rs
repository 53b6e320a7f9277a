//! # Sluice: a WebAssembly plugin-based stream router
//!
//! Sluice reads records from sources (Kafka), runs them through a chain of
//! user-compiled WebAssembly transform components, and writes the results to
//! sinks (Kafka, PostgreSQL, stdout).
//!
//! # Layout
//!
//! - [`record`]: the host's record types, shared by sources, transforms and sinks;
//! - [`runtime`]: the wasmtime engine, the plugin loader with its compile cache,
//!   and plugin instances with CPU and memory limits and sandbox grants;
//! - [`feed`]: a Finnhub-style trade feed generator (demo, tests, benchmarks);
//! - [`cli`]: the `sluice` command line (argument parsing and sub-commands);
//!   `main.rs` only calls [`cli::main`].

/// glibc's malloc spends a third of the WASM path's time consolidating the
/// per-batch buffers of the component boundary; mimalloc does not (see the
/// `flatten` benchmark).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod cli;
pub mod feed;
pub mod record;
pub mod runtime;
