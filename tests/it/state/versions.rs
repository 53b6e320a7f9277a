//! State versions and places: orphaned state, hot swaps that hand the
//! state over, migrations, and versions that cannot take it over.

use super::*;
use crate::common;
use common::services::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// A pass-through stage inserted before a stateful one: the state stored
/// for the stateful stage's old place would be orphaned (its totals would
/// start again from 1), so the start is refused with the reason and the
/// commands; `sluice state` lists the orphaned state, `--move` gives it to
/// the stage's new place, and the totals go on from where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_would_orphan_stored_state_is_refused_until_it_is_moved() {
    let pg = PgSchema::create("state_orphan").await;
    let table = format!("{}.totals", pg.name);
    let dir = tempfile::tempdir().unwrap();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| trade_frame("MSFT", 300.0 + i as f64, 1_700_000_000_000 + i)).collect();
    let write = |n: usize| {
        let text: Vec<u8> = frames[..n].iter().flat_map(|f| f.iter().copied().chain([b'\n'])).collect();
        std::fs::write(dir.path().join("feed.jsonl"), text).unwrap();
    };
    write(2);
    let source = "[source]\ntype = \"file\"\npath = \"feed.jsonl\"";
    let text = totals_pipeline(source, &table, "", "[dead_letter]\ntype = \"stdout\"");
    let file = write_pipeline(dir.path(), "totals", &text);
    let out = run_until_eof(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stored_totals(&pg.client, &table).await["MSFT"].0, 2);

    // A pass-through stage before the totals: their state would be orphaned.
    let totals = format!("plugin = \"{}\"", common::plugin_path("symbol_totals").display());
    let echo = format!("plugin = \"{}\"", common::plugin_path("raw_echo").display());
    write_pipeline(dir.path(), "totals", &text.replacen(&totals, &format!("{echo}\n[[transforms]]\n{totals}"), 1));
    write(3);
    let out = run_until_eof(&file);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("holds keys of transform 2, and transform 2 is now raw_echo, which keeps no state"), "{log}");
    assert!(log.contains("--move 2 --to 3"), "{log}");
    assert_eq!(stored_totals(&pg.client, &table).await["MSFT"].0, 2, "nothing written");
    let state = |args: &[&str]| sluice_state(&file, args);
    assert!(state(&[]).contains("transform 2's state is orphaned"), "{}", state(&[]));
    assert!(state(&["--move", "2", "--to", "3"]).contains("to transform 3"));
    let out = run_until_eof(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = pg.client.query(&format!("SELECT trades FROM {table} WHERE symbol = 'MSFT'"), &[]).await.unwrap();
    let trades: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(trades, [3], "the third trade counted on from 2: {trades:?}");
}

/// Hot swaps mid-window under a paced feed: each new version takes over
/// the state (open windows, timers, watermarks), and the candles are exact:
/// no gap, no double count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_mid_window_hand_the_state_over() {
    let (rig, frames) = SwapRig::new("ohlc_swap", 6_000, 75, &common::plugin_path("ohlc_candles")).await;
    let sluice = rig.run();
    let feed = paced_feed(&rig.fx.broker.addr, "trades_raw", frames, 200, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    for swap in 0..3 {
        let before = sluice.log_count("plugin swap ready");
        rig.deploy(&rebuilt(&common::plugin_path("ohlc_candles"), rig.fx.dir.path(), &format!("v{swap}")));
        let committed = rig.committed_sum().await;
        assert!(sluice.wait_log("plugin swap ready", before).await, "swap {swap} was not applied");
        assert!(rig.batch_committed(committed).await, "swap {swap}: no batch after it");
    }
    let sluice = rig.finish(feed, sluice).await;
    assert!(sluice.log_count("reload applied") >= 3, "three swaps");
}

/// Stored state entries of `schema`'s pipeline `ohlc` by value length, and
/// the partitions' state versions.
async fn state_shapes(client: &tokio_postgres::Client, schema: &str) -> (BTreeMap<i32, i64>, BTreeMap<Vec<u8>, i64>) {
    let lengths = client
        .query(
            &format!("SELECT length(value), count(*) FROM {schema}.sluice_state WHERE pipeline = 'ohlc' AND get_byte(key, 0) = 0 GROUP BY 1"),
            &[],
        )
        .await
        .unwrap();
    let versions = client
        .query(
            &format!("SELECT value, count(*) FROM {schema}.sluice_state WHERE pipeline = 'ohlc' AND key = '\\x03'::bytea GROUP BY 1"),
            &[],
        )
        .await
        .unwrap();
    (lengths.iter().map(|r| (r.get(0), r.get(1))).collect(), versions.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// State versions across hot swaps mid-window, under a paced feed. The
/// pipeline starts on the version 0 build (candles kept as JSON). A
/// version 1 build without a migrate is refused, with the reason, and the
/// running version goes on. The version 1 build (binary candles, a migrate
/// from 0) takes the open windows over, each partition converted in a
/// batch. A build that corrupts the candles it keeps and fails most trades
/// is rolled back, its batches' state changes discarded. The candles are
/// exact, and a restart on a version 0 build is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_versions_migrate_or_are_refused_and_a_failing_version_rolls_back() {
    let build = |name: &str| common::plugin_path(name);
    let (rig, frames) = SwapRig::new("ohlc_versions", 10_000, 76, &build("ohlc_candles_json_state")).await;
    let mut sluice = rig.run();
    let feed = paced_feed(&rig.fx.broker.addr, "trades_raw", frames, 100, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    let (lengths, versions) = state_shapes(&rig.fx.pg.client, &rig.fx.pg.name).await;
    assert!(lengths.keys().all(|len| *len != 72) && versions.is_empty(), "version 0 keeps JSON: {lengths:?}");

    // Version 1 without a migrate: refused, the running version goes on.
    let rejected = sluice.log_count("reload rejected");
    let committed = rig.committed_sum().await;
    rig.deploy(&build("ohlc_candles_no_migrate"));
    assert!(sluice.wait_log("reload rejected", rejected).await, "the swap without a migrate was applied");
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let reason = log.lines().rev().find(|l| l.contains("reload rejected")).unwrap();
    assert!(
        reason.contains("cannot take over the stage's state")
            && reason.contains("keeps state version 1, and the pipeline's state holds version 0: it has no migrate"),
        "{reason}"
    );
    assert!(rig.batch_committed(committed).await, "the running version goes on");

    // Version 1 with its migrate: swapped in mid-window, state converted.
    let ready = sluice.log_count("plugin swap ready");
    rig.deploy(&build("ohlc_candles"));
    assert!(sluice.wait_log("plugin swap ready", ready).await, "the migrating version was not swapped in");
    assert!(sluice.wait_log("state migrated", 0).await, "no partition's state was migrated");
    let committed = rig.committed_sum().await;
    assert!(rig.batch_committed(committed).await, "no batch after the migration");

    // A failing build: rolled back, what it changed discarded.
    let rolled = sluice.log_count("plugin version rolled back");
    rig.deploy(&build("ohlc_candles_failing"));
    assert!(sluice.wait_log("plugin version rolled back", rolled).await, "the failing version was not rolled back");
    let committed = rig.committed_sum().await;
    assert!(rig.batch_committed(committed).await, "no batch after the rollback");

    // Stopped mid-feed, the open windows are stored as version 1 keeps them.
    assert_eq!(sluice.stop(), Some(0));
    assert!(!feed.is_finished(), "the feed ended before the stop: slow it down");
    assert_converted_from_0_once(&sluice);
    let (lengths, versions) = state_shapes(&rig.fx.pg.client, &rig.fx.pg.name).await;
    assert!(!lengths.is_empty() && lengths.keys().all(|len| *len == 72), "open candles are version 1's: {lengths:?}");
    assert_eq!(versions.keys().collect::<Vec<_>>(), [&1u32.to_le_bytes().to_vec()], "{versions:?}");

    // A start on the version 0 build is refused: it cannot read them.
    rig.deploy(&build("ohlc_candles_json_state"));
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["run", "--admin-addr", "off"])
        .arg(&rig.file)
        .env("SLUICE_BROKERS", &rig.fx.broker.addr)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a version 0 build started on version 1 state: {stderr}");
    assert!(
        stderr.contains("transform 2 (ohlc_candles) cannot take over the stage's state: it keeps state version 0, and the pipeline's state holds version 1: it has no migrate"),
        "{stderr}"
    );

    // The version 1 build restores them and finishes the feed exactly.
    rig.deploy(&build("ohlc_candles"));
    let sluice = rig.finish(feed, rig.run()).await;
    assert_eq!(sluice.log_count("state migrated"), 0, "restored as version 1");
}

/// State versions in the Python and JavaScript SDKs: the pipeline starts
/// on the candles' earlier build (state version 0, JSON candles) under a
/// paced feed; the current build (version 1, 72 binary bytes, a `migrate`
/// from 0 written with the SDK) is swapped in mid-window and converts the
/// open windows. The candles are exact, and the state is version 1's.
async fn the_candles_migrate_their_state_in_a_hot_swap(name: &str, earlier: &str, current: &str) {
    // The feed holds at its middle until the swap is ready, however long the
    // reload takes (15 s seen on a loaded machine): the idle timeout is
    // longer than that, so the open windows wait for it too.
    let (rig, frames) = SwapRig::with_idle(name, 3_000, 77, &common::plugin_path(earlier), 45_000).await;
    let (first, rest) = frames.split_at(frames.len() / 2);
    let sluice = rig.run();
    let feed = paced_feed(&rig.fx.broker.addr, "trades_raw", first.to_vec(), 100, Duration::from_millis(300));
    assert!(wait_until(WAIT, || async { rig.candle_trades().await > 0 }).await, "no candle");
    feed.await.unwrap();
    let (lengths, versions) = state_shapes(&rig.fx.pg.client, &rig.fx.pg.name).await;
    assert!(lengths.keys().all(|len| *len != 72) && versions.is_empty(), "version 0 keeps JSON: {lengths:?}");

    let ready = sluice.log_count("plugin swap ready");
    rig.deploy(&common::plugin_path(current));
    assert!(sluice.wait_log("plugin swap ready", ready).await, "the migrating version was not swapped in");
    let feed = paced_feed(&rig.fx.broker.addr, "trades_raw", rest.to_vec(), 100, Duration::from_millis(300));
    assert!(sluice.wait_log("state migrated", 0).await, "no partition's state was migrated");
    let sluice = rig.finish(feed, sluice).await;
    assert_converted_from_0_once(&sluice);
    let (_, versions) = state_shapes(&rig.fx.pg.client, &rig.fx.pg.name).await;
    assert!(versions.keys().all(|v| *v == 1u32.to_le_bytes()), "stored as version 1: {versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_migrates_its_state_in_a_hot_swap() {
    the_candles_migrate_their_state_in_a_hot_swap("py_versions", "py_candles_json_state", "py_candles").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_plugin_migrates_its_state_in_a_hot_swap() {
    the_candles_migrate_their_state_in_a_hot_swap("js_versions", "js_candles_json_state", "js_candles").await;
}

/// Each partition holding entries was converted from version 0 to 1, and
/// never again: a batch run again (on probation, a small batch gathers more
/// records and runs again) converts again from the same version 0 state,
/// which its first run left unchanged; a conversion of state already at
/// version 1 would be wrong.
fn assert_converted_from_0_once(sluice: &SluiceProcess) {
    let log = std::fs::read_to_string(&sluice.log).unwrap();
    let migrated: Vec<&str> = log.lines().filter(|l| l.contains("state migrated")).collect();
    assert!(!migrated.is_empty(), "no partition's state was migrated");
    assert!(migrated.iter().all(|l| l.contains("from=0 to=1")), "{migrated:#?}");
    let mut partitions: Vec<&str> =
        migrated.iter().filter_map(|l| l.split("partition=").nth(1)?.split(' ').next()).collect();
    partitions.sort();
    partitions.dedup();
    assert!((1..=2).contains(&partitions.len()), "{migrated:#?}");
}
