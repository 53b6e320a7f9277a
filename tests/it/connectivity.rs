//! Connecting to secured services, against a real broker (Tansu, SCRAM on
//! its SQLite engine, behind a `socat` TLS terminator), a real PostgreSQL
//! serving TLS with the test's certificates, and real compressed topics.

use crate::common;

use common::plugin_path;
use common::services::{
    consume_from, free_port, http, produce_to, wait_until, write_pipeline, Broker, PgSchema, PrivatePostgres,
    SluiceProcess,
};
use common::tls::{postgres_with_tls, Certs, TlsTerminator};
use common::trades::{count_rows, create_trades_topics, expected_trades, generated, stored_trades_in};
use std::path::Path;
use std::time::Duration;

const USER: &str = "sluice";
const KAFKA_PASSWORD: &str = "kafka-Pa55word-7f3e";
const PG_PASSWORD: &str = "pg-Pa55word-91c2";

use common::trades::TRADE_COLUMNS as COLUMNS;

/// A durable broker with the trades topics, restarted behind a TLS
/// terminator (which asks for a client certificate signed by `client_ca`,
/// if given), with SCRAM-SHA-512 user [`USER`] required when `sasl`.
async fn secured_broker(
    dir: &Path,
    certs: &Certs,
    client_ca: Option<&Path>,
    sasl: bool,
    frames: &[Vec<u8>],
) -> (Broker, TlsTerminator) {
    let mut broker = Broker::start_durable(dir);
    create_trades_topics(&broker, 2).await;
    broker.produce("trades_raw", frames).await;
    if sasl {
        broker.create_user(USER, KAFKA_PASSWORD);
    }
    let tls_port = free_port();
    broker.restart_behind(tls_port, sasl);
    let terminator = TlsTerminator::start_on(tls_port, certs, &broker.addr, client_ca);
    (broker, terminator)
}

/// librdkafka properties of a test client reaching the secured broker.
fn sasl_ssl_properties(certs: &Certs) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "sasl_ssl".into()),
        ("sasl.mechanism", "SCRAM-SHA-512".into()),
        ("sasl.username", USER.into()),
        ("sasl.password", KAFKA_PASSWORD.into()),
        ("ssl.ca.location", certs.path("ca.pem").display().to_string()),
    ]
}

fn as_refs<'a>(props: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    props.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The trades pipeline over a named Kafka `connection` (its TOML given) into
/// PostgreSQL at `pg_url` (`pg_extra` adds lines to the sink).
fn secured_pipeline(connection: &str, table: &str, pg_url: &str, pg_extra: &str) -> String {
    format!(
        r#"
name = "secure"
{connection}
[source]
type = "kafka"
connection = "cluster"
topics = ["trades_raw"]
group = "g-secure"
batch_max_records = 200

[[transforms]]
plugin = "{plugin}"

[sinks.pg]
type = "postgres"
url = "{pg_url}"
{pg_extra}
table = "{table}"
create_table = true
{COLUMNS}

[dead_letter]
type = "kafka"
connection = "cluster"
topic = "trades_dlq"
compression = "zstd"
"#,
        plugin = plugin_path("trade_flattener").display()
    )
}

/// Every file and answer a run produced must be free of both passwords.
fn assert_no_secret(what: &str, text: &str) {
    for secret in [KAFKA_PASSWORD, PG_PASSWORD] {
        assert!(
            !text.contains(secret),
            "{what} shows a password:\n{}",
            text.lines().filter(|l| l.contains(secret)).collect::<Vec<_>>().join("\n")
        );
    }
}

/// `sluice check` on `file`: (exit code, stdout + stderr).
fn check(file: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .arg("check")
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_kafka_and_verify_full_postgres_store_every_trade_once_and_show_no_secret() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let (broker, tls) = secured_broker(dir.path(), &certs, None, true, &[]).await;
    let pg = postgres_with_tls(&certs);
    let client = pg.client().await;

    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("pg_password"), format!("{PG_PASSWORD}\n")).unwrap();
    let connection = format!(
        r#"[connections.cluster]
type = "kafka"
brokers = "{}"
tls = {{ ca = "{}" }}
sasl = {{ mechanism = "SCRAM-SHA-512", username = "{USER}", password = "${{KAFKA_PASSWORD}}" }}"#,
        tls.addr(),
        certs.path("ca.pem").display()
    );
    let pg_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port,
        certs.path("ca.pem").display()
    );
    let pg_extra = format!("password = \"${{file:{}}}\"", secrets.path().join("pg_password").display());
    let file =
        write_pipeline(dir.path(), "secure", &secured_pipeline(&connection, "public.trades", &pg_url, &pg_extra));

    // Frames fed over the secured connection, zstd-compressed, with malformed ones among them.
    let mut frames = generated(400, 31);
    frames.insert(100, b"{not json".to_vec());
    frames.insert(250, b"[]".to_vec());
    let props = sasl_ssl_properties(&certs);
    let mut producer_props = as_refs(&props);
    producer_props.push(("compression.type", "zstd"));
    produce_to(&tls.addr(), "trades_raw", &frames, &producer_props).await;
    let expected = expected_trades(&frames);

    let env = [("KAFKA_PASSWORD", KAFKA_PASSWORD), ("RUST_LOG", "debug")];
    let mut sluice = SluiceProcess::run_args(&["--log-format", "json"], &[&file], "unused", &env);
    let admin = sluice.admin_addr().await;
    let stored =
        wait_until(Duration::from_secs(90), || async { count_rows(&client, "public.trades").await >= expected.len() })
            .await;
    assert!(
        stored,
        "only {} of {} trades stored; log {}",
        count_rows(&client, "public.trades").await,
        expected.len(),
        sluice.log.display()
    );
    assert_eq!(stored_trades_in(&client, "public.trades").await, expected, "every trade exactly once");

    // Sluice's connection to PostgreSQL is encrypted (the test's own is not).
    let encrypted: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.pid <> pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "Sluice's PostgreSQL connection is not TLS");

    // Dead letters went over the same secured connection.
    let dead = consume_from(&tls.addr(), &as_refs(&props), "trades_dlq", 2, Duration::from_secs(30));
    let mut dead_values: Vec<&[u8]> = dead.iter().filter_map(|m| rdkafka::Message::payload(m)).collect();
    dead_values.sort();
    assert_eq!(dead_values, vec![&b"[]"[..], &b"{not json"[..]]);

    let (health_code, health) = http(&admin, "GET", "/health");
    assert_eq!(health_code, 200, "{health}");
    let (_, status) = http(&admin, "GET", "/status");
    let (_, metrics) = http(&admin, "GET", "/metrics");
    let (check_code, checked) = {
        // check reads the same variables run does.
        std::env::set_var("KAFKA_PASSWORD", KAFKA_PASSWORD);
        check(&file)
    };
    assert_eq!(check_code, 0, "{checked}");
    assert_eq!(sluice.stop(), Some(0));
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    assert!(log.contains("\"level\":\"DEBUG\""), "the log was not at debug level");
    for (what, text) in
        [("log", &log), ("/health", &health), ("/status", &status), ("/metrics", &metrics), ("check", &checked)]
    {
        assert_no_secret(what, text);
    }
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_one_clear_error_and_a_fixed_secret_file_resumes_with_nothing_lost() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let frames = generated(300, 32);
    let (_broker, tls) = secured_broker(dir.path(), &certs, None, true, &frames).await;
    let pg = PgSchema::create("conn_wrong_pw").await;
    let table = format!("{}.trades", pg.name);

    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("kafka_password");
    let wrong = "wrong-Pa55word-0000";
    std::fs::write(&password_file, wrong).unwrap();
    let connection = format!(
        r#"[connections.cluster]
type = "kafka"
brokers = "{}"
tls = {{ ca = "{}" }}
sasl = {{ mechanism = "SCRAM-SHA-512", username = "{USER}", password = "${{file:{}}}" }}"#,
        tls.addr(),
        certs.path("ca.pem").display(),
        password_file.display()
    );
    let file =
        write_pipeline(dir.path(), "secure", &secured_pipeline(&connection, &table, common::services::PG_URL, ""));
    let sluice = SluiceProcess::run_with(&[&file], "unused", &[("RUST_LOG", "debug")]);
    let admin = sluice.admin_addr().await;

    assert!(sluice.wait_log("SASL authentication failed", 0).await, "no SASL error in {}", sluice.log.display());
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let first =
        log.lines().find(|l| l.contains("ERROR") && l.contains("SASL authentication failed")).expect("an ERROR line");
    assert!(
        first.contains("pipeline=secure") && first.contains(&tls.addr()),
        "the error names the pipeline and the broker: {first}"
    );
    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("SASL authentication failed"), "{health}");

    // librdkafka retries every second or so; the log says it once per interval per client.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let errors = std::fs::read_to_string(&sluice.log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("SASL authentication failed"))
        .count();
    assert!((1..=4).contains(&errors), "{errors} error lines in 6 s: the log floods");
    assert_eq!(count_rows(&pg.client, &table).await, 0);

    // The secret file is fixed: the pipeline reloads and reads everything.
    std::fs::write(&password_file, format!("{KAFKA_PASSWORD}\n")).unwrap();
    let expected = expected_trades(&frames);
    let stored =
        wait_until(Duration::from_secs(90), || async { count_rows(&pg.client, &table).await >= expected.len() }).await;
    assert!(
        stored,
        "{} of {} trades after the fix; log {}",
        count_rows(&pg.client, &table).await,
        expected.len(),
        sluice.log.display()
    );
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected, "every trade exactly once");
    let healthy = wait_until(Duration::from_secs(30), || async { http(&admin, "GET", "/health").0 == 200 }).await;
    assert!(healthy, "{}", http(&admin, "GET", "/health").1);

    let (_, status) = http(&admin, "GET", "/status");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    for (what, text) in [("log", &log), ("/health", &health), ("/status", &status)] {
        assert_no_secret(what, text);
        assert!(!text.contains(wrong), "{what} shows the wrong password");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_and_mutual_tls() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let frames = generated(200, 33);
    let (_broker, tls) = secured_broker(dir.path(), &certs, Some(&certs.path("client-ca.pem")), false, &frames).await;
    let pg = PgSchema::create("conn_mtls").await;
    let table = format!("{}.trades", pg.name);
    let pipeline = |tls_table: &str| {
        let connection =
            format!("[connections.cluster]\ntype = \"kafka\"\nbrokers = \"{}\"\ntls = {tls_table}", tls.addr());
        secured_pipeline(&connection, &table, common::services::PG_URL, "")
    };
    let ca = certs.path("ca.pem").display().to_string();

    // 1. A CA that did not sign the broker's certificate.
    let untrusted = format!("{{ ca = \"{}\" }}", certs.path("other-ca.pem").display());
    let file = write_pipeline(dir.path(), "secure", &pipeline(&untrusted));
    let sluice = SluiceProcess::run(&[&file], "unused");
    let admin = sluice.admin_addr().await;
    assert!(sluice.wait_log("certificate verify failed", 0).await, "no certificate error in {}", sluice.log.display());
    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 503);
    assert!(health.contains("certificate verify failed"), "{health}");

    // 2. The right CA, but no client certificate: the terminator refuses the connection.
    let before = sluice.log_count("reload applied");
    write_pipeline(dir.path(), "secure", &pipeline(&format!("{{ ca = \"{ca}\" }}")));
    assert!(sluice.wait_log("reload applied", before).await);
    let refused = wait_until(Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(&sluice.log).unwrap_or_default();
        log.lines()
            .skip_while(|l| !l.contains("reload applied"))
            .any(|l| l.contains("ERROR") && l.contains("cannot connect to"))
    })
    .await;
    assert!(refused, "no connection error without a client certificate; log {}", sluice.log.display());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count_rows(&pg.client, &table).await, 0, "records flowed without a client certificate");

    // 3. With the client certificate, every record arrives.
    let before = sluice.log_count("reload applied");
    let with_cert = format!(
        "{{ ca = \"{ca}\", cert = \"{}\", key = \"{}\" }}",
        certs.path("client.pem").display(),
        certs.path("client.key").display()
    );
    write_pipeline(dir.path(), "secure", &pipeline(&with_cert));
    assert!(sluice.wait_log("reload applied", before).await);
    let expected = expected_trades(&frames);
    let stored =
        wait_until(Duration::from_secs(90), || async { count_rows(&pg.client, &table).await >= expected.len() }).await;
    assert!(
        stored,
        "{} of {} trades with mutual TLS; log {}",
        count_rows(&pg.client, &table).await,
        expected.len(),
        sluice.log.display()
    );
    assert_eq!(stored_trades_in(&pg.client, &table).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_is_consumed_exactly_and_produced_readably() {
    const CODECS: [&str; 4] = ["zstd", "lz4", "snappy", "gzip"];
    let broker = Broker::start();
    let pg = PgSchema::create("conn_codecs").await;
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    for (i, codec) in CODECS.iter().enumerate() {
        broker.create_topic(&format!("in_{codec}"), 1).await;
        broker.create_topic(&format!("out_{codec}"), 1).await;
        let frames = generated(150, 40 + i as u64);
        produce_to(&broker.addr, &format!("in_{codec}"), &frames, &[("compression.type", codec)]).await;
        let table = format!("{}.t_{codec}", pg.name);
        write_pipeline(
            dir.path(),
            &format!("pg_{codec}"),
            &format!(
                r#"[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["in_{codec}"]
[[transforms]]
plugin = "{plugin}"
[sinks.pg]
type = "postgres"
url = "${{SLUICE_PG_URL}}"
table = "{table}"
create_table = true
{COLUMNS}
[dead_letter]
type = "stdout"
"#,
                plugin = plugin_path("trade_flattener").display()
            ),
        );
        write_pipeline(
            dir.path(),
            &format!("copy_{codec}"),
            &format!(
                "[source]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopics = [\"in_{codec}\"]\n\
                 [sinks.out]\ntype = \"kafka\"\nbrokers = \"${{SLUICE_BROKERS}}\"\ntopic = \"out_{codec}\"\ncompression = \"{codec}\"\n\
                 [dead_letter]\ntype = \"stdout\"\n"
            ),
        );
        inputs.push((codec, table, frames));
    }
    let sluice = SluiceProcess::run(&[dir.path()], &broker.addr);
    for (codec, table, frames) in &inputs {
        let expected = expected_trades(frames);
        let stored =
            wait_until(Duration::from_secs(60), || async { count_rows(&pg.client, table).await >= expected.len() })
                .await;
        assert!(
            stored,
            "{codec}: {} of {} trades; log {}",
            count_rows(&pg.client, table).await,
            expected.len(),
            sluice.log.display()
        );
        assert_eq!(stored_trades_in(&pg.client, table).await, expected, "{codec}: every trade exactly once");
        let copied = broker.consume(&format!("out_{codec}"), frames.len(), Duration::from_secs(30));
        let mut values: Vec<Vec<u8>> =
            copied.iter().filter_map(|m| rdkafka::Message::payload(m).map(<[u8]>::to_vec)).collect();
        let mut sent = frames.clone();
        values.sort();
        sent.sort();
        assert_eq!(values, sent, "{codec}: the Kafka sink's {codec} batches read back whole");
    }
    assert!(!std::fs::read_to_string(&sluice.log).unwrap().contains("Decompression"), "a codec failed to decompress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_against_a_postgres_without_tls_is_a_clear_error() {
    let broker = Broker::start();
    create_trades_topics(&broker, 1).await;
    broker.produce("trades_raw", &generated(20, 34)).await;
    let pg = PrivatePostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}?sslmode=require", pg.url());
    let file = write_pipeline(
        dir.path(),
        "trades",
        &common::trades::trades_pipeline_to("public.trades", "g-require", 50, &url, ""),
    );
    let sluice = SluiceProcess::run(&[&file], &broker.addr);
    let admin = sluice.admin_addr().await;
    assert!(sluice.wait_log("server does not support TLS", 0).await, "log {}", sluice.log.display());
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let line = log.lines().find(|l| l.contains("server does not support TLS")).unwrap();
    assert!(
        line.contains(&format!("127.0.0.1:{}/postgres (sslmode=require)", pg.port)),
        "the error names the server: {line}"
    );
    let (code, health) = http(&admin, "GET", "/health");
    assert_eq!(code, 503);
    assert!(health.contains("sink pg failing") && health.contains("server does not support TLS"), "{health}");
    // Nothing was skipped: the offsets did not move.
    assert_eq!(broker.committed("g-require", "trades_raw", 1), vec![-1]);
}

/// What a connection attempt with one `sslmode` × `sslrootcert` gives.
#[derive(Debug)]
enum Outcome {
    /// `target` refuses the options (so `sluice check` does), saying this.
    Refused(&'static str),
    /// Connected; over TLS or not.
    Connects { tls: bool },
    /// The TLS handshake fails, saying this.
    Fails(&'static str),
}

/// Every `sslmode` × `sslrootcert` (unset, the server's CA, another CA,
/// `system`, libpq's default file), against a PostgreSQL serving TLS with a
/// certificate for 127.0.0.1 and localhost. Sluice's outcome beside libpq's
/// (libpq 16): the same in every row, but `prefer` with a root file, where
/// libpq checks the chain and falls back to plaintext when that fails, and
/// Sluice leaves the chain unchecked (no downgrade path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_and_sslrootcert_are_as_strict_as_libpq() {
    use sluice::clients::postgres::{connect, target_with_home};
    use Outcome::*;
    let certs = Certs::generate();
    let pg = postgres_with_tls(&certs);
    let no_home = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".postgresql")).unwrap();
    std::fs::copy(certs.path("ca.pem"), home.path().join(".postgresql/root.crt")).unwrap();
    let (ca, other) = (certs.path("ca.pem").display().to_string(), certs.path("other-ca.pem").display().to_string());
    let wrong_name = format!("host=wrong.example hostaddr=127.0.0.1 port={} user=postgres dbname=postgres", pg.port);
    let by_ip = pg.url();
    let by_name = format!("postgres://postgres@localhost:{}/postgres", pg.port);
    let need_root = "needs the root certificate";
    let system_weak = "sslrootcert=system goes with sslmode=verify-full only";
    let verify_failed = "certificate verify failed";
    // (url, sslmode, sslrootcert, $HOME has ~/.postgresql/root.crt, outcome)
    type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, bool, Outcome);
    let table: Vec<Row> = vec![
        (&by_ip, Some("disable"), None, false, Connects { tls: false }),
        (&by_ip, Some("disable"), Some(&ca), false, Refused("sslmode=disable with certificates set")),
        (&by_ip, Some("disable"), Some("system"), false, Refused(system_weak)),
        (&by_ip, None, None, false, Connects { tls: true }),
        (&by_ip, Some("prefer"), None, false, Connects { tls: true }),
        (&by_ip, Some("prefer"), Some("system"), false, Refused(system_weak)),
        (&by_ip, Some("require"), None, false, Connects { tls: true }),
        (&by_ip, Some("require"), None, true, Connects { tls: true }),
        (&by_ip, Some("require"), Some(&ca), false, Connects { tls: true }),
        (&by_ip, Some("require"), Some(&other), false, Fails(verify_failed)),
        (&by_ip, Some("require"), Some("system"), false, Refused(system_weak)),
        (&by_ip, Some("verify-ca"), None, false, Refused(need_root)),
        (&by_ip, Some("verify-ca"), None, true, Connects { tls: true }),
        (&by_ip, Some("verify-ca"), Some(&ca), false, Connects { tls: true }),
        (&by_ip, Some("verify-ca"), Some(&other), false, Fails(verify_failed)),
        (&by_ip, Some("verify-ca"), Some("system"), false, Refused(system_weak)),
        (&wrong_name, Some("verify-ca"), Some(&ca), false, Connects { tls: true }),
        (&by_ip, Some("verify-full"), None, false, Refused(need_root)),
        (&by_ip, Some("verify-full"), None, true, Connects { tls: true }),
        (&by_ip, Some("verify-full"), Some(&ca), false, Connects { tls: true }),
        (&by_name, Some("verify-full"), Some(&ca), false, Connects { tls: true }),
        (&wrong_name, Some("verify-full"), Some(&ca), false, Fails(verify_failed)),
        (&by_ip, Some("verify-full"), Some(&other), false, Fails(verify_failed)),
        (&by_ip, Some("verify-full"), Some("system"), false, Fails(verify_failed)),
        (&by_ip, None, Some("system"), false, Fails(verify_failed)),
    ];
    for (url, mode, root, with_home, want) in &table {
        let mut text = format!("url = {url:?}\ntable = \"t\"\ncolumns = [{{ name = \"a\", type = \"text\" }}]\n");
        if let Some(mode) = mode {
            text.push_str(&format!("sslmode = {mode:?}\n"));
        }
        if let Some(root) = root {
            text.push_str(&format!("sslrootcert = {root:?}\n"));
        }
        let config: sluice::sinks::postgres::PostgresSinkConfig = toml::from_str(&text).unwrap();
        let row = format!("sslmode={mode:?} sslrootcert={root:?} home root.crt={with_home} url={url}");
        let home = if *with_home { home.path() } else { no_home.path() };
        let target = target_with_home(&config, Path::new("/"), Some(home));
        match (want, target) {
            (Refused(why), Err(errors)) => assert!(errors.iter().any(|e| e.message.contains(why)), "{row}: {errors:?}"),
            (Refused(why), Ok(_)) => panic!("{row}: accepted, should be refused ({why})"),
            (_, Err(errors)) => panic!("{row}: refused: {errors:?}"),
            (Connects { tls }, Ok(target)) => {
                let (client, connection) = connect(&target).await.unwrap_or_else(|e| panic!("{row}: {e:#}"));
                tokio::spawn(connection);
                let ssl: bool = client
                    .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(ssl, *tls, "{row}");
            }
            (Fails(why), Ok(target)) => match connect(&target).await {
                Ok(_) => panic!("{row}: connected, should fail ({why})"),
                Err(e) => assert!(format!("{e:#}").contains(why), "{row}: {e:#}"),
            },
        }
    }
    // Unset with system: verify-full, as libpq 16 makes it.
    let config: sluice::sinks::postgres::PostgresSinkConfig = toml::from_str(&format!(
        "url = {by_ip:?}\ntable = \"t\"\nsslrootcert = \"system\"\ncolumns = [{{ name = \"a\", type = \"text\" }}]\n"
    ))
    .unwrap();
    assert!(target_with_home(&config, Path::new("/"), None).unwrap().endpoint.ends_with("(sslmode=verify-full)"));
}
