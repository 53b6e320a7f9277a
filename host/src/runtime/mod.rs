//! The WebAssembly plugin runtime.
//!
//! # Layout
//!
//! - [`engine`]: the one wasmtime [`Engine`](wasmtime::Engine) per process, its
//!   epoch ticker thread (the CPU limit's clock) and the shared linker;
//! - [`loader`]: reads a component, compiles it once and caches the machine
//!   code on disk keyed by content hash, and keeps a ready-to-instantiate
//!   `InstancePre` per plugin version ([`Plugin`]);
//! - `contracts`: the contracts served, one module each (0.1: records
//!   lifted field by field; 0.2: a batch as one buffer each way, through the
//!   shared codec `sluice-abi`). A component's contract is decided once, when
//!   it is loaded;
//! - [`instance`]: a live plugin instance, one `Store` with its limits and
//!   sandbox grants ([`PluginInstance`]), that runs batches within their
//!   deadline and replaces itself after a trap;
//! - `host_state`: the state of one `Store` (WASI, memory cap, stderr, log
//!   budget); [`limits`]: what an instance may use and reach;
//! - `stderr`: the plugin's stderr, kept in memory for the fault's reason;
//! - `error`: [`PluginError`] and [`Fault`].
//!
//! Modules depend downwards only: `instance` → `loader` → `engine` →
//! `contracts` → `host_state` → `limits`.

mod contracts;
pub mod engine;
mod error;
mod host_state;
pub mod instance;
pub mod limits;
pub mod loader;
mod stderr;

pub use contracts::Contract;
pub use engine::Runtime;
pub use error::{Fault, PluginError};
pub use instance::{version_key, PluginInstance, RecordResult};
pub use limits::{Grants, Limits};
pub use loader::Plugin;
