//! A named Kafka connection (`[connections.NAME]`): the cluster's brokers,
//! TLS and SASL, shared by the source, the Kafka sinks and the dead letters.

use crate::secrets::Secret;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;

/// A named connection, chosen by `type`.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ConnectionConfig {
    Kafka(KafkaConnectionConfig),
}

/// `type = "kafka"`: a Kafka cluster and how to reach it. Sluice turns `tls`
/// and `sasl` into librdkafka's properties (`security.protocol` follows from
/// which of them are set); `properties` adds or overrides any other.
#[derive(Debug, Clone, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaConnectionConfig {
    /// Bootstrap servers, comma-separated (`host:port,host:port`).
    pub brokers: String,
    /// Encrypt with TLS (`security.protocol` ssl, or sasl_ssl with `sasl`).
    pub tls: Option<KafkaTlsConfig>,
    /// Authenticate with SASL (`security.protocol` sasl_ssl with `tls`,
    /// else sasl_plaintext).
    pub sasl: Option<KafkaSaslConfig>,
    /// librdkafka properties for every client of this connection; a
    /// source's or sink's own `properties` override them.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// TLS towards the brokers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaTlsConfig {
    /// PEM file of the CA certificates that signed the brokers' certificates
    /// (`ssl.ca.location`). Default: the system's trusted roots.
    pub ca: Option<String>,
    /// PEM file of this client's certificate, for mutual TLS (`ssl.certificate.location`).
    pub cert: Option<String>,
    /// PEM file of this client's private key, for mutual TLS (`ssl.key.location`).
    pub key: Option<String>,
    /// Password of an encrypted `key` (`ssl.key.password`).
    #[schemars(with = "Option<String>")]
    pub key_password: Option<Secret>,
    /// Check that the broker's certificate names the host connected to
    /// (default true; `ssl.endpoint.identification.algorithm`).
    #[serde(default = "verify_hostname_default")]
    pub verify_hostname: bool,
}

/// SASL authentication towards the brokers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaSaslConfig {
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`.
    pub mechanism: SaslMechanism,
    /// User name (PLAIN, SCRAM).
    pub username: Option<String>,
    /// Password (PLAIN, SCRAM): best from `${VAR}` or `${file:/path}`.
    #[schemars(with = "Option<String>")]
    pub password: Option<Secret>,
    /// OAUTHBEARER: the OIDC token endpoint that grants client-credentials
    /// tokens (`sasl.oauthbearer.token.endpoint.url`).
    pub token_endpoint: Option<String>,
    /// OAUTHBEARER: the OIDC client id.
    pub client_id: Option<String>,
    /// OAUTHBEARER: the OIDC client secret: best from `${VAR}` or `${file:/path}`.
    #[schemars(with = "Option<String>")]
    pub client_secret: Option<Secret>,
    /// OAUTHBEARER: the scope requested (optional).
    pub scope: Option<String>,
}

/// The SASL mechanisms this build of librdkafka supports.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

fn verify_hostname_default() -> bool {
    true
}
