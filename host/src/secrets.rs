//! Secrets never leave the process: passwords, SASL secrets and key
//! passwords are remembered here when a pipeline file is read, and every
//! output Sluice writes (the log in both formats, `/status`, `/health`,
//! `sluice check`, error messages) goes through [`redact`], which replaces
//! them with `***`. URLs are shown with [`redact_url`].
//!
//! This is the second line of defence: Sluice's own messages do not print
//! secret values in the first place (a connection is named by its host, a
//! property by its key); the registry catches what a library might quote
//! back (an error repeating a value, a URL in a driver's message).

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{OnceLock, RwLock};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Shorter values are hidden only where they stand as a whole token
/// (between characters that are not letters or digits, as in `password=ab,`
/// or `"ab"`): scrubbing them inside words would mangle ordinary output.
const MIN_LEN: usize = 4;

fn registry() -> &'static RwLock<BTreeSet<String>> {
    static SECRETS: OnceLock<RwLock<BTreeSet<String>>> = OnceLock::new();
    SECRETS.get_or_init(Default::default)
}

fn short_registry() -> &'static RwLock<BTreeSet<String>> {
    static SHORT: OnceLock<RwLock<BTreeSet<String>>> = OnceLock::new();
    SHORT.get_or_init(Default::default)
}

/// A secret value: registered for [`redact`] when made, and shown as `***`
/// by `Debug` and `Display`, so neither a log line nor a `{:?}` of the
/// struct holding it prints it. [`Secret::expose`] gives the value to the
/// one place that sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        register(&value);
        Secret(value)
    }

    /// The value, for the client that authenticates with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the secret, in time that does not depend on where
    /// they differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Remembers `value` as a secret: from now on [`redact`] hides it.
pub fn register(value: &str) {
    let value = value.trim();
    if value.is_empty() {
        return;
    }
    let registry = if value.len() >= MIN_LEN { registry() } else { short_registry() };
    if let Ok(mut secrets) = registry.write() {
        if !secrets.contains(value) {
            secrets.insert(value.to_string());
            // The JSON log escapes quotes and backslashes: hide that form too.
            let escaped = serde_json::to_string(value).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            if escaped != value {
                secrets.insert(escaped.to_string());
            }
        }
    }
}

/// Whether a configuration key names a secret: librdkafka's password, secret
/// and private-key properties, a sink's `password`, and the like.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "sasl.jaas.config", "ssl.key.pem", "ssl_key_pem", "private", "token", "sasl.oauthbearer.config"]
        .iter()
        .any(|s| key.contains(s))
        // The token endpoint is an address, not a token.
        && !key.contains("endpoint")
}

/// Whether an environment variable's name says that it holds a secret.
pub fn is_secret_var(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIAL", "API_KEY", "PRIVATE"].iter().any(|s| name.contains(s))
}

/// `text` with every registered secret replaced by [`MASK`], and the password
/// of every URL in it too.
pub fn redact(text: &str) -> String {
    let mut out = redact_urls(text);
    if let Ok(secrets) = registry().read() {
        // Longest first, so that a secret containing another is hidden whole.
        let mut sorted: Vec<&String> = secrets.iter().filter(|s| out.contains(s.as_str())).collect();
        sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in sorted {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    if let Ok(short) = short_registry().read() {
        for secret in short.iter() {
            if out.contains(secret.as_str()) {
                out = replace_tokens(&out, secret);
            }
        }
    }
    out
}

/// `text` with each occurrence of `secret` that is a whole token (no letter
/// or digit right before or after it) replaced by [`MASK`].
fn replace_tokens(text: &str, secret: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (at, _) in text.match_indices(secret) {
        if at < last {
            continue;
        }
        let end = at + secret.len();
        if !word(text[..at].chars().next_back()) && !word(text[end..].chars().next()) {
            out.push_str(&text[last..at]);
            out.push_str(MASK);
            last = end;
        }
    }
    out.push_str(&text[last..]);
    out
}

/// `scheme://user:password@host…` → `scheme://user:***@host…`, for every
/// URL in `text`.
fn redact_urls(text: &str) -> String {
    if !text.contains("://") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let authority_start = at + 3;
        out.push_str(&rest[..authority_start]);
        let tail = &rest[authority_start..];
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(userinfo_end), Some(colon)) if colon < userinfo_end => {
                out.push_str(&authority[..=colon]);
                out.push_str(MASK);
                out.push_str(&authority[userinfo_end..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// A URL for display: its password (if any) replaced by [`MASK`].
pub fn redact_url(url: &str) -> String {
    redact_urls(url)
}

/// The log's writer: each formatted event passes through [`redact`] before
/// it reaches stderr.
pub struct RedactingWriter<W: Write> {
    inner: W,
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes one event per call, so a secret is never split.
        let text = String::from_utf8_lossy(buf);
        self.inner.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Makes a [`RedactingWriter`] over stderr for each log event.
pub fn redacting_stderr() -> RedactingWriter<std::io::Stderr> {
    RedactingWriter { inner: std::io::stderr() }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_secret_shows_as_a_mask_in_debug_and_display() {
        let secret = Secret::new("debug-hidden-pw-1".into());
        assert_eq!((format!("{secret:?}"), format!("{secret}")), ("***".to_string(), "***".to_string()));
        assert!(secret.matches("debug-hidden-pw-1") && !secret.matches("debug-hidden-pw-2") && !secret.matches(""));
    }

    use super::*;

    #[test]
    fn hides_registered_secrets_and_url_passwords() {
        register("s3cr3t-value");
        register("q9"); // short: hidden only as a whole token
        assert_eq!(redact("login failed for s3cr3t-value (q9)"), "login failed for *** (***)");
        assert_eq!(redact("password=q9, q9x, xq9, aq9b, \"q9\""), "password=***, q9x, xq9, aq9b, \"***\"");
        assert_eq!(
            redact("cannot reach postgres://app:pa%40ss@db.example.com:5432/x?sslmode=require, nor kafka://h:1"),
            "cannot reach postgres://app:***@db.example.com:5432/x?sslmode=require, nor kafka://h:1"
        );
        assert_eq!(redact_url("postgres://app@h/db"), "postgres://app@h/db");
        assert_eq!(redact_url("postgres://app:p@h/db"), "postgres://app:***@h/db");
        register(r#"quo"te\d"#);
        assert_eq!(redact(r#"{"msg":"bad password quo\"te\\d"}"#), r#"{"msg":"bad password ***"}"#);
    }

    #[test]
    fn knows_secret_keys_and_variables() {
        for key in
            ["sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret", "password", "ssl.keystore.password"]
        {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["sasl.username", "ssl.ca.location", "sasl.oauthbearer.token.endpoint.url", "security.protocol"] {
            assert!(!is_secret_key(key), "{key}");
        }
        assert!(is_secret_var("KAFKA_PASSWORD") && is_secret_var("FINNHUB_TOKEN") && !is_secret_var("SLUICE_BROKERS"));
    }
}
