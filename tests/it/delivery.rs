//! The delivery promise at its seams: every record read ends in the sinks
//! (once, for an exactly-once sink) or in the dead letters, whatever step a
//! crash cuts. Each crash is an abort at a named point of a batch's
//! delivery (`SLUICE_CRASH_AT`, see `sluice::crash`), as a kill -9 there
//! would be; a restart then finishes the input.

use crate::common;

use common::services::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `sluice run --until-eof PIPELINE` with `env`; waits for it to exit and
/// returns its exit code (None: killed by a signal), its stdout and its log.
fn run_to_end(pipeline: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = pipeline.parent().unwrap();
    let (out, log) = (dir.join(format!("stdout-{}", free_port())), dir.join(format!("log-{}", free_port())));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .envs(env.iter().copied())
        .arg("--cache-dir")
        .arg(common::test_cache_dir())
        .args(["run", "--admin-addr", "off", "--until-eof"])
        .arg(pipeline)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("sluice did not stop: {}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&out).unwrap(), std::fs::read_to_string(&log).unwrap())
}

/// Three JSON lines and one that is not JSON, into a table whose CHECK
/// refuses the second: rows `a` and `c`, dead letters `not json` (the
/// source's) and `bad` (PostgreSQL's), through a crash at each point of a
/// batch's delivery and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_of_a_delivery_loses_no_dead_letter_and_doubles_no_row() {
    for point in
        ["dead-letters-written", "postgres-before-commit", "postgres-committed", "delivered", "source-committed"]
    {
        let pg = PgSchema::create("crash").await;
        pg.client.batch_execute(&format!("CREATE TABLE {}.t (s text, CHECK (s <> 'bad'))", pg.name)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), "{\"s\":\"a\"}\n{\"s\":\"bad\"}\nnot json\n{\"s\":\"c\"}\n")
            .unwrap();
        let pipeline = write_pipeline(
            dir.path(),
            "crash",
            &format!(
                r#"
[source]
type = "file"
path = "in.jsonl"
format = "json"
[sinks.pg]
type = "postgres"
url = "{PG_URL}"
table = "{}.t"
columns = [{{ name = "s", type = "text" }}]
[dead_letter]
type = "stdout"
"#,
                pg.name
            ),
        );
        let (code, first, log) = run_to_end(&pipeline, &[("SLUICE_CRASH_AT", point)]);
        assert_eq!(code, None, "{point}: the run aborts at the point: {log}");
        assert!(log.contains(&format!("crash point {point}")), "{point}: {log}");
        let (code, second, log) = run_to_end(&pipeline, &[]);
        assert_eq!(code, Some(0), "{point}: the restart finishes: {log}");
        let mut rows: Vec<String> = pg
            .client
            .query(&format!("SELECT s FROM {}.t ORDER BY s", pg.name), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        rows.sort();
        assert_eq!(rows, ["a", "c"], "{point}: each good row once");
        let dead = format!("{first}{second}");
        for line in ["{\"s\":\"bad\"}", "not json"] {
            assert!(dead.lines().any(|l| l == line), "{point}: {line} is dead-lettered: {dead:?}");
        }
        assert!(
            dead.lines().all(|l| l == "{\"s\":\"bad\"}" || l == "not json"),
            "{point}: only dead letters: {dead:?}"
        );
    }
}

/// A `BEFORE INSERT` trigger that raises (SQLSTATE P0001) for one row is a
/// refusal of that row, not an outage: the row is dead-lettered with
/// PostgreSQL's message, the others are stored, and the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_raises_dead_letters_its_row_instead_of_retrying_forever() {
    let pg = PgSchema::create("trigger").await;
    pg.client
        .batch_execute(&format!(
            "CREATE TABLE {s}.t (s text);
             CREATE FUNCTION {s}.no_bad() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.s = 'bad' THEN RAISE EXCEPTION 'no bad rows here'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER no_bad BEFORE INSERT ON {s}.t FOR EACH ROW EXECUTE FUNCTION {s}.no_bad();",
            s = pg.name
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), "{\"s\":\"a\"}\n{\"s\":\"bad\"}\n{\"s\":\"c\"}\n").unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "trigger",
        &format!(
            "[source]\ntype = \"file\"\npath = \"in.jsonl\"\nformat = \"json\"\n[sinks.pg]\ntype = \"postgres\"\nurl = \"{PG_URL}\"\ntable = \"{}.t\"\ncolumns = [{{ name = \"s\", type = \"text\" }}]\n[dead_letter]\ntype = \"stdout\"\n",
            pg.name
        ),
    );
    let (code, dead, log) = run_to_end(&pipeline, &[]);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(dead.lines().collect::<Vec<_>>(), ["{\"s\":\"bad\"}"], "{log}");
    assert!(log.contains("no bad rows here") || log.contains("refused a value"), "{log}");
    assert_eq!(pg.count("t").await, 2);
}
