//! What a stateful stage may hold and keep: the state limit, key TTLs,
//! and where the state must be kept.

use super::*;
use crate::common;
use common::fixture::Fixture;
use common::services::*;
use std::time::Duration;

/// Past `limits.state_mib` a put faults the batch: with `on_plugin_failure
/// = "dead_letter"` the records go to the dead letters, the limit is the
/// reason logged, and nothing reaches the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_past_the_state_limit_fails_its_records_with_the_reason() {
    let pg = PgSchema::create("state_limit").await;
    let table = format!("{}.totals", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames = common::trades::generated(20, 73);
    let text: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
    std::fs::write(dir.path().join("feed.jsonl"), text).unwrap();
    let source = "on_plugin_failure = \"dead_letter\"\n[source]\ntype = \"file\"\npath = \"feed.jsonl\"";
    let limits = "[transforms.limits]\nstate_mib = 0";
    let file = write_pipeline(
        dir.path(),
        "totals",
        &totals_pipeline(source, &table, limits, "[dead_letter]\ntype = \"stdout\""),
    );
    let out = run_until_eof(&file);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("state limit of 0 MiB reached (limits.state_mib)"), "{log}");
    // Every frame is dead-lettered (the stdout dead letters print the values).
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), frames.len());
    assert_eq!(trades_in(&pg.client, &table).await, 0);
}

/// `limits.state_ttl_ms`: a symbol not traded for longer than the TTL is
/// deleted from the state (and from `sluice_state` with the next commit),
/// so its running total starts again; a symbol within it is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_not_written_within_its_ttl_is_deleted() {
    let fx = Fixture::new("state_ttl", &[("trades_raw", 1)]).await;
    let (broker, pg) = (&fx.broker, &fx.pg);
    let table = format!("{}.totals", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let source =
        "[source]\ntype = \"kafka\"\nbrokers = \"${SLUICE_BROKERS}\"\ntopics = [\"trades_raw\"]\ngroup = \"g-ttl\"";
    let limits = "[transforms.limits]\nstate_ttl_ms = 2000";
    let text = totals_pipeline(source, &table, limits, "[dead_letter]\ntype = \"stdout\"");
    let file = write_pipeline(dir.path(), "totals", &text);
    let mut sluice = SluiceProcess::run(&[&file], &broker.addr);
    let trades_of = |symbol: &'static str| {
        let (client, table) = (&pg.client, &table);
        async move { stored_totals(client, table).await.get(symbol).map_or(0, |t| t.0) }
    };
    let stored_keys = || async {
        let sql = format!(
            "SELECT convert_from(substring(key from 2), 'UTF8') FROM {}.sluice_state WHERE get_byte(key, 0) = 0 ORDER BY 1",
            pg.name
        );
        pg.client.query(&sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    broker.produce("trades_raw", &[trade_frame("A", 1.0, 1_000), trade_frame("A", 2.0, 2_000)]).await;
    assert!(wait_until(WAIT, || async { trades_of("A").await == 2 }).await, "A's two trades");
    tokio::time::sleep(Duration::from_millis(3_000)).await; // past A's TTL
    broker.produce("trades_raw", &[trade_frame("B", 1.0, 3_000)]).await;
    assert!(wait_until(WAIT, || async { trades_of("B").await == 1 }).await, "B's trade");
    assert_eq!(stored_keys().await, ["B"], "A expired, in the store too");
    broker.produce("trades_raw", &[trade_frame("A", 3.0, 4_000), trade_frame("B", 2.0, 4_000)]).await;
    assert!(wait_until(WAIT, || async { trades_of("B").await == 2 }).await, "B's second trade");
    assert_eq!(trades_of("A").await, 1, "A's total started again after its key expired");
    assert_eq!(stored_keys().await, ["A", "B"]);
    assert_eq!(sluice.stop(), Some(0));
}

/// A stateful stage needs an exactly-once PostgreSQL sink to keep its state.
#[test]
fn a_stateful_stage_without_a_state_sink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("feed.jsonl"), "{}\n").unwrap();
    let text = format!(
        "name = \"nostate\"\n[source]\ntype = \"file\"\npath = \"feed.jsonl\"\n[[transforms]]\nplugin = \"{}\"\n[sinks.out]\ntype = \"stdout\"\n[dead_letter]\ntype = \"stdout\"\n",
        common::plugin_path("symbol_totals").display()
    );
    let file = write_pipeline(dir.path(), "nostate", &text);
    let out = run_until_eof(&file);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(
            "transform 1 (symbol_totals) keeps state (contract 0.3): the pipeline needs an exactly-once postgres sink"
        ),
        "{log}"
    );
}
