//! The PostgreSQL sink: one row per output record, binary COPY in one
//! transaction per batch; optional table creation and upsert.
//!
//! - [`rows`]: converting output JSON into typed column values;
//! - [`sink`]: the connection, the DDL and the COPY.

pub mod rows;
pub mod sink;

pub use sink::PostgresSink;
