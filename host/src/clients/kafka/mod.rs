//! How every Kafka client of Sluice (the source, the Kafka sinks, the
//! dead-letter producer) is configured, checked and watched:
//!
//! - [`connection_properties`]: a `[connections.NAME]`'s `tls` and `sasl`
//!   as librdkafka properties;
//! - [`check_property`] and [`check_client`]: what `sluice check` asks
//!   librdkafka itself, without connecting anywhere (property names and
//!   values, files, TLS material, SASL mechanisms);
//! - [`client_config`]: the `ClientConfig` a client is created from;
//! - [`ClientEvents`]: librdkafka's errors and log lines, classified ("SASL
//!   authentication failed", "certificate verify failed"), logged once per
//!   cause and interval instead of once per reconnect, and shown in
//!   `/health` until the client works again;
//! - [`config`]: the `[connections.NAME]` table; [`check`]: connections and
//!   a client's `brokers`/`connection`/`properties` resolved and checked.

pub mod check;
pub mod config;

use crate::telemetry::telemetry;
pub use check::resolve;
pub use config::*;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseProducer;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Properties whose values are files (relative paths are taken from the
/// pipeline file's folder, as plugin paths are).
const FILE_PROPERTIES: [&str; 5] =
    ["ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.keystore.location", "ssl.crl.location"];

/// librdkafka properties for `connection`'s `tls` and `sasl` (its own
/// `properties` not included), or what is missing.
pub fn connection_properties(connection: &KafkaConnectionConfig) -> Result<Vec<(&'static str, String)>, Vec<String>> {
    let mut props = Vec::new();
    let mut errors = Vec::new();
    let protocol = match (&connection.tls, &connection.sasl) {
        (Some(_), Some(_)) => Some("sasl_ssl"),
        (Some(_), None) => Some("ssl"),
        (None, Some(_)) => Some("sasl_plaintext"),
        (None, None) => None,
    };
    if let Some(protocol) = protocol {
        props.push(("security.protocol", protocol.to_string()));
    }
    if let Some(tls) = &connection.tls {
        let mut file = |key: &'static str, value: &Option<String>| {
            if let Some(v) = value {
                props.push((key, v.clone()));
            }
        };
        file("ssl.ca.location", &tls.ca);
        file("ssl.certificate.location", &tls.cert);
        file("ssl.key.location", &tls.key);
        if tls.cert.is_some() != tls.key.is_some() {
            errors.push("tls: `cert` and `key` go together (mutual TLS needs both)".to_string());
        }
        if let Some(password) = &tls.key_password {
            props.push(("ssl.key.password", password.expose().to_string()));
        }
        if !tls.verify_hostname {
            props.push(("ssl.endpoint.identification.algorithm", "none".to_string()));
        }
    }
    if let Some(sasl) = &connection.sasl {
        props.push(("sasl.mechanism", sasl.mechanism.name().to_string()));
        match sasl.mechanism {
            SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
                match (&sasl.username, &sasl.password) {
                    (Some(user), Some(password)) => {
                        props.push(("sasl.username", user.clone()));
                        props.push(("sasl.password", password.expose().to_string()));
                    }
                    _ => errors.push(format!("sasl: {} needs `username` and `password`", sasl.mechanism.name())),
                }
                if sasl.token_endpoint.is_some() || sasl.client_id.is_some() || sasl.client_secret.is_some() {
                    errors.push(format!(
                        "sasl: `token_endpoint`, `client_id` and `client_secret` are for OAUTHBEARER, not {}",
                        sasl.mechanism.name()
                    ));
                }
            }
            SaslMechanism::OAuthBearer => {
                match (&sasl.token_endpoint, &sasl.client_id, &sasl.client_secret) {
                    (Some(endpoint), Some(id), Some(secret)) => {
                        props.push(("sasl.oauthbearer.method", "oidc".to_string()));
                        props.push(("sasl.oauthbearer.token.endpoint.url", endpoint.clone()));
                        props.push(("sasl.oauthbearer.client.id", id.clone()));
                        props.push(("sasl.oauthbearer.client.secret", secret.expose().to_string()));
                    }
                    _ => errors.push(
                        "sasl: OAUTHBEARER needs `token_endpoint`, `client_id` and `client_secret` (OIDC client credentials)".to_string(),
                    ),
                }
                if let Some(scope) = &sasl.scope {
                    props.push(("sasl.oauthbearer.scope", scope.clone()));
                }
                if sasl.username.is_some() || sasl.password.is_some() {
                    errors.push("sasl: `username` and `password` are for PLAIN and SCRAM, not OAUTHBEARER".to_string());
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(props)
    } else {
        Err(errors)
    }
}

/// Checks one property as librdkafka would take it (its name, its value,
/// the file it names). Returns the value to use (file paths anchored at
/// `dir`) or what is wrong; the message never quotes a secret.
pub fn check_property(key: &str, value: &str, dir: &Path) -> Result<String, String> {
    let secret = crate::secrets::is_secret_key(key);
    if secret {
        crate::secrets::register(value);
    }
    let mut config = ClientConfig::new();
    config.set(key, value);
    if let Err(e) = config.create_native_config() {
        let message = match e {
            KafkaError::ClientConfig(_, desc, _, _) if !secret => desc,
            KafkaError::ClientConfig(..) => format!("invalid value for `{key}` (not shown: it is a secret)"),
            other => other.to_string(),
        };
        return Err(crate::secrets::redact(&message));
    }
    if matches!(key, "sasl.mechanism" | "sasl.mechanisms") && value.eq_ignore_ascii_case("GSSAPI") {
        return Err("SASL mechanism GSSAPI (Kerberos) is not built into this Sluice (see the README); \
                    use PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER"
            .to_string());
    }
    if FILE_PROPERTIES.contains(&key) && !(key == "ssl.ca.location" && value == "probe") {
        let path = dir.join(value);
        if !path.exists() {
            return Err(format!("`{key}`: file {} does not exist", path.display()));
        }
        return Ok(path.display().to_string());
    }
    Ok(value.to_string())
}

/// A client context that says nothing: for [`check_client`].
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
    fn error(&self, _: KafkaError, _: &str) {}
}

impl rdkafka::producer::ProducerContext for Quiet {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// Creates (and drops) a client from `properties` without bootstrap
/// servers: librdkafka then loads the TLS material and selects the SASL
/// mechanism, as `run` will, but connects nowhere. OIDC is left out: its
/// token request would go out at once.
pub fn check_client(properties: &BTreeMap<String, String>) -> Result<(), String> {
    let oidc = properties.get("sasl.oauthbearer.method").is_some_and(|m| m.eq_ignore_ascii_case("oidc"));
    if oidc {
        return Ok(());
    }
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(k, v);
    }
    match config.create_with_context::<_, BaseProducer<Quiet>>(Quiet) {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientCreation(message)) => Err(crate::secrets::redact(&message)),
        Err(e) => Err(crate::secrets::redact(&e.to_string())),
    }
}

/// The `ClientConfig` of a client at `brokers` with `properties`; Sluice's
/// own settings go on top, by the caller.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(k, v);
    }
    config.set("bootstrap.servers", brokers);
    config
}

/// What went wrong with a Kafka connection, in the words people search for.
fn cause(error: &KafkaError, reason: &str) -> Option<(&'static str, u8)> {
    let text = format!("{error} {reason}");
    let has = |s: &str| text.contains(s);
    // (cause, priority): a broad cause does not hide a precise one.
    Some(if has("SASL authentication error") || has("Authentication failed") || has("SASL authentication failed") {
        ("SASL authentication failed", 3)
    } else if has("certificate verify failed") {
        ("certificate verify failed", 3)
    } else if has("SSL handshake failed") || has("SSL_HANDSHAKE") || has("ssl handshake") {
        ("TLS handshake failed", 2)
    } else if has("OAUTHBEARER") || has("oauthbearer") || has("OIDC") || has("token retrieval") {
        ("OAUTHBEARER token refresh failed", 3)
    } else if has("Failed to resolve") {
        ("cannot resolve the broker's host name", 2)
    } else if has("Connection refused") {
        ("connection refused", 1)
    } else if has("brokers are down") {
        ("all brokers are down", 0)
    } else if has("Disconnected") || has("Connection reset") {
        ("disconnected", 0)
    } else {
        return None;
    })
}

/// Whether `error` (from a consumer's poll) is a connection failure that
/// the client's [`ClientEvents`] already report.
pub fn is_connection_error(error: &KafkaError) -> bool {
    cause(error, "").is_some()
}

/// The broker a librdkafka message is about (`sasl_ssl://host:port/id: …`).
fn endpoint(reason: &str) -> Option<String> {
    let tail = &reason[reason.find("://")? + 3..];
    let end = tail.find(|c: char| c == '/' || c.is_whitespace()).unwrap_or(tail.len());
    Some(tail[..end].trim_end_matches(':').to_string())
}

/// How often one cause of one client is logged while it lasts.
const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// Which of the pipeline's parts a client is, for messages and `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Source,
    Sink(String),
}

struct Failing {
    cause: &'static str,
    priority: u8,
    since_log: Instant,
    repeats: u64,
}

/// A Kafka client's errors and log lines, for its context.
pub struct ClientEvents {
    pipeline: String,
    role: Role,
    brokers: String,
    failing: Mutex<Option<Failing>>,
    /// The last other error logged, and when.
    other: Mutex<Option<(String, Instant)>>,
}

impl ClientEvents {
    pub fn new(pipeline: &str, role: Role, brokers: &str) -> Self {
        ClientEvents {
            pipeline: pipeline.to_string(),
            role,
            brokers: brokers.to_string(),
            failing: Mutex::new(None),
            other: Mutex::new(None),
        }
    }

    fn client(&self) -> String {
        match &self.role {
            Role::Source => "kafka source".to_string(),
            Role::Sink(name) => format!("kafka sink {name}"),
        }
    }

    /// librdkafka reports an error (`ClientContext::error`).
    pub fn error(&self, error: KafkaError, reason: &str) {
        let reason = crate::secrets::redact(reason);
        let Some((cause, priority)) = cause(&error, &reason) else {
            // Not a connection failure: logged, but the same text once per interval.
            let text = format!("{error}: {reason}");
            let Ok(mut last) = self.other.lock() else { return };
            if last.as_ref().is_some_and(|(t, at)| *t == text && at.elapsed() < REPEAT_EVERY) {
                return;
            }
            *last = Some((text, Instant::now()));
            warn!(pipeline = %self.pipeline, client = %self.client(), %error, %reason, "kafka client error");
            return;
        };
        let endpoint = endpoint(&reason).unwrap_or_else(|| self.brokers.clone());
        let message = format!("{} cannot connect to {endpoint}: {cause}", self.client());
        let Ok(mut failing) = self.failing.lock() else { return };
        let log = match failing.as_mut() {
            // A broad cause ("all brokers are down") after a precise one
            // ("SASL authentication failed") says nothing new.
            Some(f) if f.priority > priority && f.since_log.elapsed() < REPEAT_EVERY * 2 => {
                f.repeats += 1;
                false
            }
            Some(f) if f.cause == cause && f.since_log.elapsed() < REPEAT_EVERY => {
                f.repeats += 1;
                false
            }
            _ => true,
        };
        if !log {
            return;
        }
        let repeats = failing.as_ref().filter(|f| f.cause == cause).map_or(0, |f| f.repeats);
        *failing = Some(Failing { cause, priority, since_log: Instant::now(), repeats: 0 });
        drop(failing);
        error!(
            pipeline = %self.pipeline,
            client = %self.client(),
            %endpoint,
            %cause,
            detail = %reason,
            repeated = repeats,
            "{message}; retrying"
        );
        let health = format!("{message} ({reason})");
        match &self.role {
            Role::Source => telemetry().source_failed(&self.pipeline, &health),
            Role::Sink(sink) => telemetry().sink_failed(&self.pipeline, sink, &health),
        }
    }

    /// The client works (it received or delivered records): a failure logged
    /// before is over.
    pub fn ok(&self) {
        let was = self.failing.lock().ok().and_then(|mut f| f.take());
        if let Some(f) = was {
            info!(pipeline = %self.pipeline, client = %self.client(), cause = f.cause, "kafka connection works again");
            if self.role == Role::Source {
                telemetry().source_ok(&self.pipeline);
            }
        }
    }

    /// A librdkafka log line (`ClientContext::log`): connection failures are
    /// already reported through [`ClientEvents::error`], once per interval;
    /// their log lines repeat them on every reconnect, so they go to debug.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let message = crate::secrets::redact(message);
        let repeated = cause(&KafkaError::Canceled, &message).is_some();
        match level {
            _ if repeated => debug!(pipeline = %self.pipeline, client = %self.client(), fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                error!(pipeline = %self.pipeline, client = %self.client(), fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => {
                warn!(pipeline = %self.pipeline, client = %self.client(), fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(pipeline = %self.pipeline, client = %self.client(), fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => {
                debug!(pipeline = %self.pipeline, client = %self.client(), fac, "librdkafka: {message}")
            }
        }
    }
}

/// The context of a Kafka sink's producer.
pub struct ProducerContext(pub std::sync::Arc<ClientEvents>);

impl ClientContext for ProducerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.0.log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn classifies_connection_failures_and_names_the_broker() {
        let auth = "sasl_ssl://127.0.0.1:40123/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512 (after 3ms in state AUTH_REQ)";
        let e = KafkaError::Global(RDKafkaErrorCode::Authentication);
        assert_eq!(cause(&e, auth).map(|c| c.0), Some("SASL authentication failed"));
        assert_eq!(endpoint(auth).as_deref(), Some("127.0.0.1:40123"));
        let tls = "ssl://broker.example.com:9093/1: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified";
        assert_eq!(cause(&e, tls).map(|c| c.0), Some("certificate verify failed"));
        assert_eq!(endpoint(tls).as_deref(), Some("broker.example.com:9093"));
        assert_eq!(cause(&e, "1/1 brokers are down").map(|c| c.1), Some(0));
        assert_eq!(endpoint("1/1 brokers are down"), None);
    }

    #[test]
    fn checks_properties_as_librdkafka_does() {
        let dir = Path::new("/");
        assert!(check_property("security.protocol", "sasl_ssl", dir).is_ok());
        let unknown = check_property("no.such.property", "1", dir).unwrap_err();
        assert!(unknown.contains("No such configuration property"), "{unknown}");
        let bad = check_property("security.protocol", "tls", dir).unwrap_err();
        assert!(bad.contains("security.protocol"), "{bad}");
        let missing = check_property("ssl.ca.location", "/nonexistent/ca.pem", dir).unwrap_err();
        assert!(missing.contains("/nonexistent/ca.pem does not exist"), "{missing}");
        assert!(check_property("sasl.mechanism", "GSSAPI", dir).unwrap_err().contains("not built"));
        assert!(check_property("compression.type", "zstd", dir).is_ok());
    }
}
