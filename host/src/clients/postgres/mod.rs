//! Connecting to PostgreSQL, with TLS as libpq does it.
//!
//! tokio-postgres understands `sslmode` `disable`, `prefer` and `require`
//! only, and leaves certificates to the TLS connector. This module reads the
//! libpq options (`sslmode` with `verify-ca` and `verify-full`,
//! `sslrootcert`, `sslcert`, `sslkey`) from the URL or the sink's options,
//! hands the rest of the connection string to tokio-postgres, and builds an
//! OpenSSL connector (postgres-openssl, over the OpenSSL build librdkafka
//! already links) that verifies what the mode says:
//!
//! | sslmode | encrypted | chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (default) | if the server offers TLS | no | no |
//! | `require` | yes | only with a root file (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! The roots are libpq's: `sslrootcert`, else `~/.postgresql/root.crt`
//! when it exists. `verify-ca` and `verify-full` with neither are refused
//! (libpq refuses them too), and `sslrootcert=system` (the system's trusted
//! roots, which trust any public CA for any name) goes with `verify-full`
//! only, which it makes the default (as libpq 16).
//!
//! One client for every part that reaches PostgreSQL: the postgres sink,
//! the state store and keeper (`[state.postgres]`), and `sluice state`;
//! [`offsets`] holds the offsets table they share.

pub mod offsets;

use crate::secrets::Secret;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use tokio_postgres::config::{Host, SslMode as PgSslMode};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plaintext first: not worth a downgrade path.
            other => {
                return Err(format!("sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"))
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// Where `sslrootcert` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// The system's trusted roots (libpq 16's `sslrootcert=system`).
    System,
    File(PathBuf),
}

/// The TLS half of a connection: what to verify and with which files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub mode: SslMode,
    pub root: Option<RootCert>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A PostgreSQL server to connect to: tokio-postgres's config without the
/// TLS options, the TLS settings, and a name for messages (no password).
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    /// `host:port/dbname (sslmode=…)`, for logs and errors.
    pub endpoint: String,
}

/// Which option of the connection string (or the sink) is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError {
    /// The sink option at fault (`url`, `sslmode`, `sslrootcert`, …).
    pub option: &'static str,
    pub message: String,
}

/// The libpq TLS options tokio-postgres does not take, pulled out of `url`
/// (URL query or `key=value` form); returns the rest of the string and the
/// options found, in order.
fn split_tls_options(url: &str) -> (String, Vec<(String, String)>) {
    const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];
    let mut found = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else { return (url.to_string(), found) };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_KEYS.contains(&k) {
                found.push((k.to_string(), percent_decode(v)));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        return (rest, found);
    }
    // key=value form: spaces may surround `=`; values may be 'quoted', with \ escapes.
    let mut kept = Vec::new();
    let chars: Vec<char> = url.chars().collect();
    let mut i = 0;
    let skip_spaces = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_spaces(&mut i);
        if i >= chars.len() {
            break;
        }
        let key_start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[key_start..i].iter().collect();
        skip_spaces(&mut i);
        if i >= chars.len() || chars[i] != '=' {
            kept.push(key); // not key=value: tokio-postgres will say so
            continue;
        }
        i += 1;
        skip_spaces(&mut i);
        let value_start = i;
        let mut value = String::new();
        let quoted = i < chars.len() && chars[i] == '\'';
        if quoted {
            i += 1;
        }
        while i < chars.len() {
            match chars[i] {
                '\\' if i + 1 < chars.len() => {
                    value.push(chars[i + 1]);
                    i += 2;
                    continue;
                }
                '\'' if quoted => {
                    i += 1;
                    break;
                }
                c if c.is_whitespace() && !quoted => break,
                c => value.push(c),
            }
            i += 1;
        }
        if TLS_KEYS.contains(&key.as_str()) {
            found.push((key, value));
        } else {
            kept.push(format!("{key}={}", chars[value_start..i].iter().collect::<String>()));
        }
    }
    (kept.join(" "), found)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = s.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Declares a config table that names a PostgreSQL server (a postgres
/// sink, `[state.postgres]`): the connection fields, declared here once
/// with their documentation (the reference and the JSON Schema are made
/// from it), then the table's own fields, and its [`ServerConfig`].
#[macro_export]
macro_rules! postgres_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            /// Connection string, as a URL (`postgres://user@host:5432/db?sslmode=verify-full`)
            /// or libpq's `key=value` form. `sslmode`, `sslrootcert`, `sslcert` and
            /// `sslkey` have libpq's meaning, in the URL or as the options below.
            pub url: String,
            /// Password, when it is not in `url`: best from `${VAR}` or `${file:/path}`.
            #[schemars(with = "Option<String>")]
            pub password: Option<$crate::secrets::Secret>,
            /// TLS: `disable`, `prefer` (libpq's default: TLS if the server offers
            /// it, unverified), `require` (TLS, unverified unless a root file is
            /// set or `~/.postgresql/root.crt` exists), `verify-ca` (the server's
            /// certificate chains to the root) or `verify-full` (and names the
            /// host). `verify-*` need a root, as in libpq. Overrides the URL's.
            pub sslmode: Option<String>,
            /// PEM file of the CA certificates to trust (libpq's default:
            /// `~/.postgresql/root.crt`), or `system` for the system's trusted roots,
            /// which only `sslmode=verify-full` may use (and is then the default).
            pub sslrootcert: Option<String>,
            /// PEM file of this client's certificate, for mutual TLS.
            pub sslcert: Option<String>,
            /// PEM file of this client's private key, for mutual TLS.
            pub sslkey: Option<String>,
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl $crate::clients::postgres::ServerConfig for $name {
            fn server(&self) -> $crate::clients::postgres::Server<'_> {
                $crate::clients::postgres::Server {
                    url: &self.url,
                    password: self.password.as_ref(),
                    sslmode: &self.sslmode,
                    sslrootcert: &self.sslrootcert,
                    sslcert: &self.sslcert,
                    sslkey: &self.sslkey,
                }
            }
        }
    };
}

/// How a pipeline file says to reach a PostgreSQL server: a connection
/// string and libpq's TLS options (a postgres sink's, or `[state.postgres]`).
pub struct Server<'a> {
    pub url: &'a str,
    pub password: Option<&'a Secret>,
    pub sslmode: &'a Option<String>,
    pub sslrootcert: &'a Option<String>,
    pub sslcert: &'a Option<String>,
    pub sslkey: &'a Option<String>,
}

/// A config that names a PostgreSQL server.
pub trait ServerConfig {
    fn server(&self) -> Server<'_>;
}

/// The connection target of a config's server: its URL and TLS options, the
/// config's own options taking precedence over the URL's. `dir` anchors
/// relative file paths; libpq's default root file is looked for under `$HOME`.
pub fn target(from: &impl ServerConfig, dir: &std::path::Path) -> Result<Target, Vec<TargetError>> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    target_with_home(from, dir, home.as_deref())
}

/// [`target`], with `home` for `$HOME`.
pub fn target_with_home(
    from: &impl ServerConfig,
    dir: &std::path::Path,
    home: Option<&std::path::Path>,
) -> Result<Target, Vec<TargetError>> {
    let server = from.server();
    let mut errors = Vec::new();
    let (rest, from_url) = split_tls_options(server.url);
    let mut config = match tokio_postgres::Config::from_str(&rest) {
        Ok(config) => config,
        Err(e) => {
            // tokio-postgres's message names the option, never its value.
            errors.push(TargetError { option: "url", message: format!("invalid connection string: {e}") });
            tokio_postgres::Config::new()
        }
    };
    if let Some(password) = server.password {
        config.password(password.expose().as_bytes());
    }
    if let Some(password) = config.get_password() {
        crate::secrets::register(&String::from_utf8_lossy(password));
    }
    let url_option = |key: &str| from_url.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let option = |own: &Option<String>, key: &'static str| -> Option<(&'static str, String)> {
        match own {
            Some(v) => Some((key, v.clone())),
            None => url_option(key).map(|v| ("url", v)),
        }
    };
    let explicit_mode = option(server.sslmode, "sslmode").and_then(|(place, raw)| match raw.parse::<SslMode>() {
        Ok(mode) => Some(mode),
        Err(message) => {
            errors.push(TargetError { option: place, message });
            None
        }
    });
    let file = |place: &'static str, key: &str, raw: String, errors: &mut Vec<TargetError>| -> PathBuf {
        let path = dir.join(&raw);
        if !path.is_file() {
            errors
                .push(TargetError { option: place, message: format!("{key} file {} does not exist", path.display()) });
        }
        path
    };
    let mut root = option(server.sslrootcert, "sslrootcert").map(|(place, raw)| match raw.as_str() {
        "system" => RootCert::System,
        _ => RootCert::File(file(place, "sslrootcert", raw, &mut errors)),
    });
    let mode =
        explicit_mode.unwrap_or(if root == Some(RootCert::System) { SslMode::VerifyFull } else { SslMode::Prefer });
    if root == Some(RootCert::System) && mode != SslMode::VerifyFull {
        errors.push(TargetError {
            option: "sslrootcert",
            message: format!(
                "sslrootcert=system goes with sslmode=verify-full only, not {mode}: the system's roots trust any public CA for any name, so only the host-name check makes them safe (libpq 16 refuses this too)"
            ),
        });
    }
    if root.is_none() && matches!(mode, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) {
        // libpq's default root file.
        let default = home.map(|h| h.join(".postgresql").join("root.crt")).filter(|p| p.is_file());
        root = default.map(RootCert::File);
        if root.is_none() && mode != SslMode::Require {
            errors.push(TargetError {
                option: "sslmode",
                message: format!(
                    "sslmode={mode} needs the root certificate to verify the server with: set sslrootcert to the CA's file (libpq's default, ~/.postgresql/root.crt, does not exist){}",
                    if mode == SslMode::VerifyFull { ", or sslrootcert=system for the system's trusted roots" } else { "; or say verify-full with sslrootcert=system for the system's trusted roots" }
                ),
            });
        }
    }
    let cert = option(server.sslcert, "sslcert").map(|(place, raw)| file(place, "sslcert", raw, &mut errors));
    let key = option(server.sslkey, "sslkey").map(|(place, raw)| file(place, "sslkey", raw, &mut errors));
    if cert.is_some() != key.is_some() {
        errors.push(TargetError {
            option: "sslcert",
            message: "sslcert and sslkey go together (mutual TLS needs both)".into(),
        });
    }
    if mode == SslMode::Disable && (root.is_some() || cert.is_some()) {
        errors.push(TargetError {
            option: "sslmode",
            message: "sslmode=disable with certificates set: say require, verify-ca or verify-full".into(),
        });
    }
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    let tls = Tls { mode, root, cert, key };
    if errors.is_empty() {
        if let Err(e) = connector(&tls) {
            errors.push(TargetError { option: "sslmode", message: format!("cannot set up TLS: {e}") });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let endpoint = endpoint(&config, mode);
    Ok(Target { config, tls, endpoint })
}

/// `host:port/dbname (sslmode=…)` of `config`.
fn endpoint(config: &tokio_postgres::Config, mode: SslMode) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db} (sslmode={mode})")
}

/// The OpenSSL connector for `tls`.
pub fn connector(tls: &Tls) -> anyhow::Result<MakeTlsConnector> {
    use anyhow::Context;
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    let verify = match tls.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        // libpq: with a root certificate, `require` verifies the chain.
        SslMode::Require => tls.root.is_some(),
        SslMode::Disable | SslMode::Prefer => false,
    };
    if verify {
        builder.set_verify(SslVerifyMode::PEER);
        let ca = match &tls.root {
            Some(RootCert::File(path)) => Some(path.as_path()),
            Some(RootCert::System) | None => None,
        };
        crate::clients::trust(&mut builder, ca).context("sslrootcert")?;
    } else {
        builder.set_verify(SslVerifyMode::NONE);
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        builder.set_certificate_chain_file(cert).with_context(|| format!("cannot load sslcert {}", cert.display()))?;
        builder
            .set_private_key_file(key, SslFiletype::PEM)
            .with_context(|| format!("cannot load sslkey {}", key.display()))?;
        builder.check_private_key().context("sslkey does not match sslcert")?;
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if tls.mode != SslMode::VerifyFull {
        connector.set_callback(|config, _| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

/// Connects to `target`; the error names the endpoint and the cause, never the password.
/// A connection to `target` for `pipeline`'s `what` (the logs name it),
/// driven by a task of its own, with PostgreSQL's notices below warnings
/// left out (`IF NOT EXISTS` notices would fill the log on every reconnect).
pub async fn open(target: &Target, pipeline: &str, what: &'static str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = connect(target).await?;
    let pipeline = pipeline.to_string();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%pipeline, %error, "postgres {what} connection closed");
        }
    });
    client.batch_execute("SET client_min_messages TO warning").await?;
    Ok(client)
}

pub async fn connect(
    target: &Target,
) -> anyhow::Result<(
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, postgres_openssl::TlsStream<tokio_postgres::Socket>>,
)> {
    let connector = connector(&target.tls)?;
    target.config.connect(connector).await.map_err(|e| {
        // tokio-postgres's error chain ends in OpenSSL's reason (e.g.
        // "certificate verify failed"): show it whole.
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !cause.contains(&text) {
                cause.push_str(": ");
                cause.push_str(&text);
            }
            source = s.source();
        }
        anyhow::anyhow!("cannot connect to PostgreSQL at {}: {}", target.endpoint, crate::secrets::redact(&cause))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config naming a server by URL alone.
    struct Url(String, Option<String>);

    impl ServerConfig for Url {
        fn server(&self) -> Server<'_> {
            Server { url: &self.0, password: None, sslmode: &self.1, sslrootcert: &None, sslcert: &None, sslkey: &None }
        }
    }

    fn sink(url: &str) -> Url {
        Url(url.to_string(), None)
    }

    #[test]
    fn takes_libpq_tls_options_from_urls_and_key_value_strings() {
        let (rest, found) = split_tls_options(
            "postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(found, vec![("sslmode".into(), "verify-full".into()), ("sslrootcert".into(), "/tmp/ca.pem".into())]);
        let (rest, found) = split_tls_options("host=h  sslmode=require user=u password='a b\\'c' sslcert = '/x y.pem'");
        assert_eq!(rest, "host=h user=u password='a b\\'c'");
        assert_eq!(found, vec![("sslmode".into(), "require".into()), ("sslcert".into(), "/x y.pem".into())]);
    }

    #[test]
    fn reports_a_bad_sslmode_and_missing_files() {
        let errors = target(
            &sink("postgres://u@h/db?sslmode=verify_full&sslrootcert=/nonexistent/ca.pem"),
            std::path::Path::new("/"),
        )
        .err()
        .unwrap();
        assert_eq!(errors[0].option, "url");
        assert!(errors[0].message.contains("\"verify_full\" is not one of"), "{:?}", errors);
        assert!(errors[1].message.contains("sslrootcert file /nonexistent/ca.pem does not exist"), "{:?}", errors);
        let ok =
            target(&sink("postgres://u:hidden-pw@db.example.com:6543/app?sslmode=require"), std::path::Path::new("/"))
                .unwrap();
        assert_eq!(ok.endpoint, "db.example.com:6543/app (sslmode=require)");
        assert_eq!(crate::secrets::redact("x hidden-pw"), "x ***");
    }
}
