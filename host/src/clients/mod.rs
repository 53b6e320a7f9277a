//! How Sluice reaches the services it reads from and writes to, shared by
//! the sources and sinks: Kafka client properties, TLS and SASL, checks
//! that need no connection, and connection errors people can act on
//! ([`kafka`]); PostgreSQL with libpq's TLS modes ([`postgres`]).

pub mod kafka;
pub mod postgres;
