//! The trade feed the end-to-end tests send, what the flattener must make of
//! it, and what landed in PostgreSQL.

use super::plugin_path;
use super::services::{Broker, PgSchema};
use sluice::feed::FeedGenerator;

/// Topics `trades_raw` (`partitions`) and `trades_dlq` (one partition) on `broker`.
pub async fn create_trades_topics(broker: &Broker, partitions: i32) {
    broker.create_topic("trades_raw", partitions).await;
    broker.create_topic("trades_dlq", 1).await;
}

/// What most trades tests start from: a broker with the trades topics, a
/// fresh PostgreSQL schema named after `prefix`, and its `trades` table's name.
pub async fn trades_setup(prefix: &str, partitions: i32) -> (Broker, PgSchema, String) {
    let broker = Broker::start();
    create_trades_topics(&broker, partitions).await;
    let pg = PgSchema::create(prefix).await;
    let table = format!("{}.trades", pg.name);
    (broker, pg, table)
}

/// `(symbol, price, volume, ts)` of one trade.
pub type Trade = (String, f64, f64, i64);

/// `count` generated Finnhub frames.
pub fn generated(count: usize, seed: u64) -> Vec<Vec<u8>> {
    FeedGenerator::new(seed).take(count).map(|f| f.json.into_bytes()).collect()
}

/// Every trade the flattener makes of `frames`, sorted.
pub fn expected_trades(frames: &[Vec<u8>]) -> Vec<Trade> {
    let mut out: Vec<_> = frames
        .iter()
        .filter_map(|f| trade_flattener::flatten(f).ok())
        .flatten()
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.value).unwrap();
            (
                v["symbol"].as_str().unwrap().to_string(),
                v["price"].as_f64().unwrap(),
                v["volume"].as_f64().unwrap(),
                v["ts"].as_i64().unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

/// Every row of `table` (a table the trades pipeline writes), sorted.
pub async fn stored_trades_in(client: &tokio_postgres::Client, table: &str) -> Vec<Trade> {
    let rows = client
        .query(
            &format!("SELECT symbol, price, volume, (extract(epoch from traded_at) * 1000)::bigint FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    let mut out: Vec<_> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    out.sort_by(|a: &Trade, b| a.partial_cmp(b).unwrap());
    out
}

/// Rows in `table`, 0 while it does not exist.
pub async fn count_rows(client: &tokio_postgres::Client, table: &str) -> usize {
    match client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await {
        Ok(row) => row.get::<_, i64>(0) as usize,
        Err(_) => 0,
    }
}

/// The columns of a `trades` table (the flattener's fields), as a PostgreSQL sink lists them.
pub const TRADE_COLUMNS: &str = r#"columns = [
  { name = "symbol", type = "text" },
  { name = "price", type = "double precision" },
  { name = "volume", type = "double precision" },
  { name = "traded_at", type = "timestamptz", field = "ts" },
  { name = "conditions", type = "text[]" },
]"#;

/// The trades pipeline (`trades_raw` → flattener → `table` in PostgreSQL at
/// `pg_url`, dead letters to `trades_dlq`); `source_extra` adds lines to `[source]`.
pub fn trades_pipeline_to(table: &str, group: &str, batch: usize, pg_url: &str, source_extra: &str) -> String {
    format!(
        r#"
name = "trades"
[source]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topics = ["trades_raw"]
group = "{group}"
batch_max_records = {batch}
{source_extra}
[[transforms]]
plugin = "{plugin}"
[sinks.pg]
type = "postgres"
url = "{pg_url}"
table = "{table}"
create_table = true
{TRADE_COLUMNS}
[dead_letter]
type = "kafka"
brokers = "${{SLUICE_BROKERS}}"
topic = "trades_dlq"
"#,
        plugin = plugin_path("trade_flattener").display()
    )
}
