//! The integration tests, in one binary (one link of wasmtime, librdkafka
//! and OpenSSL instead of one per suite): each module is a suite, against
//! the real compiled components, a Tansu broker each test starts on a free
//! loopback port, and the local PostgreSQL. `cargo test --test it SUITE::`
//! runs one suite.

mod common;

mod backfill;
mod candles;
mod connectivity;
mod contracts;
mod delivery;
mod faults;
mod file_source;
mod fuzz_config;
mod hot_reload;
mod languages;
mod operations;
mod pipeline_check;
mod pipeline_e2e;
mod plugin_cli;
mod plugin_failures;
mod plugin_runtime;
mod shadow;
mod state;
mod websocket;
