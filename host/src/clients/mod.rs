//! The clients that several connectors share: Kafka (the source, the Kafka
//! sinks and the dead letters: properties, TLS and SASL, named connections,
//! checks that need no connection, and connection errors people can act
//! on) in [`kafka`]; PostgreSQL (the postgres sink, the state store and
//! `sluice state`: connections with libpq's TLS options, and the offsets
//! table) in [`postgres`]; and [`trust`] (TLS roots for PostgreSQL and the
//! WebSocket source).

pub mod kafka;
pub mod postgres;

use anyhow::Context;
use openssl::ssl::SslConnectorBuilder;
use std::path::Path;

/// Makes `builder` trust the CA certificates in `ca` (a PEM file), or the
/// system's trusted roots without one: the vendored OpenSSL has no default
/// store of its own, so they are found where the distribution keeps them.
/// Shared by PostgreSQL's TLS and the WebSocket source (librdkafka probes
/// the same places itself).
pub fn trust(builder: &mut SslConnectorBuilder, ca: Option<&Path>) -> anyhow::Result<()> {
    match ca {
        Some(ca) => {
            builder.set_ca_file(ca).with_context(|| format!("cannot load CA certificates from {}", ca.display()))
        }
        None => {
            let probe = openssl_probe::probe();
            builder
                .load_verify_locations(
                    probe.cert_file.as_deref(),
                    probe.cert_dir.first().map(std::path::PathBuf::as_path),
                )
                .context("cannot load the system's trusted certificates")
        }
    }
}
