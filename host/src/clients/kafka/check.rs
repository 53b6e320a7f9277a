//! The Kafka side of checking a pipeline file: each named connection
//! resolved into its brokers and librdkafka properties ([`connections`]),
//! and a Kafka source's or sink's `brokers`, `connection` and `properties`
//! resolved against them ([`resolve`]), every property checked.

use super::{check_client, check_property, connection_properties, ConnectionConfig};
use crate::connector::{Check, KafkaConnection, Report};
use std::collections::BTreeMap;
use std::path::Path;
use toml::Spanned;

/// librdkafka properties by name.
type KafkaProperties = BTreeMap<String, String>;

/// The named connections of a file, each with its librdkafka properties
/// (from `tls`, `sasl` and `properties`), checked.
pub fn connections(
    connections: &BTreeMap<String, Spanned<ConnectionConfig>>,
    dir: &Path,
    report: &mut dyn Report,
) -> BTreeMap<String, KafkaConnection> {
    let none = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (name, connection) in connections {
        let mut cx = Check::new(&["connections", name], connection.span(), dir, &none, &mut *report);
        let ConnectionConfig::Kafka(kafka) = connection.get_ref();
        if kafka.brokers.trim().is_empty() {
            cx.error_at(&["brokers"], "`brokers` is empty");
        }
        let errors_before = cx.errors();
        let mut properties = KafkaProperties::new();
        match connection_properties(kafka) {
            Ok(derived) => {
                for (key, value) in derived {
                    match check_property(key, &value, dir) {
                        Ok(value) => {
                            properties.insert(key.to_string(), value);
                        }
                        Err(message) => match typed_field(key) {
                            Some((table, field)) => cx.error_at(&[table, field], message),
                            None => cx.error(message),
                        },
                    }
                }
            }
            Err(messages) => {
                for message in messages {
                    cx.error(message);
                }
            }
        }
        check_properties(&mut cx, &kafka.properties, &mut properties);
        if cx.errors() == errors_before {
            if let Err(message) = check_client(&properties) {
                cx.error(message);
            }
        }
        out.insert(name.clone(), KafkaConnection { brokers: kafka.brokers.clone(), properties });
    }
    out
}

/// The `tls`/`sasl` field of a connection that a librdkafka property came from.
fn typed_field(property: &str) -> Option<(&'static str, &'static str)> {
    Some(match property {
        "ssl.ca.location" => ("tls", "ca"),
        "ssl.certificate.location" => ("tls", "cert"),
        "ssl.key.location" => ("tls", "key"),
        "ssl.key.password" => ("tls", "key_password"),
        "sasl.username" => ("sasl", "username"),
        "sasl.password" => ("sasl", "password"),
        "sasl.oauthbearer.token.endpoint.url" => ("sasl", "token_endpoint"),
        "sasl.oauthbearer.client.id" => ("sasl", "client_id"),
        "sasl.oauthbearer.client.secret" => ("sasl", "client_secret"),
        "sasl.oauthbearer.scope" => ("sasl", "scope"),
        "sasl.mechanism" | "sasl.oauthbearer.method" => ("sasl", "mechanism"),
        _ => return None,
    })
}

/// Checks each of `own` (the `properties` of the table checked) and adds it
/// to `into` (over what is there).
fn check_properties(cx: &mut Check<'_>, own: &KafkaProperties, into: &mut KafkaProperties) {
    for (key, value) in own {
        match check_property(key, value, cx.dir()) {
            Ok(checked) => {
                into.insert(key.clone(), checked);
            }
            Err(message) => {
                let place = cx.place();
                cx.error_as_is_at(&["properties", key.as_str()], format!("{place}.properties: {message}"));
            }
        }
    }
}

/// A Kafka source's or sink's `brokers`, `connection` and `properties`,
/// resolved: the brokers of its connection, the connection's properties
/// under its own, every property checked.
pub fn resolve(
    cx: &mut Check<'_>,
    brokers: &mut Option<String>,
    connection: &Option<String>,
    properties: &mut KafkaProperties,
) {
    let mut merged = KafkaProperties::new();
    match (brokers.as_ref(), connection) {
        (Some(_), Some(_)) => {
            cx.error_at(&["connection"], "give `brokers` or `connection`, not both (the connection has the brokers)")
        }
        (None, None) => cx.error("say where Kafka is: `brokers = \"host:port\"` or `connection = \"NAME\"`"),
        (Some(b), None) if b.trim().is_empty() => cx.error_at(&["brokers"], "`brokers` is empty"),
        (None, Some(c)) => match cx.connections().get(c) {
            Some(named) => {
                *brokers = Some(named.brokers.clone());
                merged = named.properties.clone();
            }
            None => {
                let known: Vec<&str> = cx.connections().keys().map(String::as_str).collect();
                let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
                cx.error_at(&["connection"], format!("no connection {c:?} in this file (connections: {known})"));
            }
        },
        (Some(_), None) => {}
    }
    let errors_before = cx.errors();
    check_properties(cx, properties, &mut merged);
    if cx.errors() == errors_before && !properties.is_empty() {
        if let Err(message) = check_client(&merged) {
            cx.error(message);
        }
    }
    *properties = merged;
}
