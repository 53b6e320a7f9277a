//! Property tests (the fuzzing of issue #5) for pipeline files: arbitrary
//! text and random mutations of a valid file are either accepted or answered
//! with errors that point into the file, never a panic.

use proptest::prelude::*;
use sluice::config::parse_pipeline;
use std::path::Path;

const VALID: &str = r#"name = "fuzz"
default_sink = "pg"

[source]
type = "kafka"
brokers = "${FUZZ_UNSET_BROKERS:-127.0.0.1:9092}"
topics = ["trades_raw"]
batch_max_records = 100
properties = { "session.timeout.ms" = "10000" }

[[transforms]]
plugin = "plugin.wasm"
config = { a = 1, b = [1, 2], c = { d = true } }
limits = { cpu_ms = 10, memory_mib = 8 }
grants = { read_dirs = ["."] }

[sinks.pg]
type = "postgres"
url = "postgres://postgres@127.0.0.1/postgres"
table = "s.trades"
create_table = true
upsert_key = ["symbol"]
columns = [{ name = "symbol", type = "text" }, { name = "p", type = "double precision", field = "price" }]

[sinks.out]
type = "stdout"

[dead_letter]
type = "kafka"
brokers = "127.0.0.1:9092"
topic = "dlq"
"#;

/// Checks the errors of one parse: at least one, each inside the text.
fn check(text: &str) -> Result<(), TestCaseError> {
    let file = Path::new("/nonexistent/fuzz.toml");
    if let Err(errors) = parse_pipeline(text, file, None) {
        prop_assert!(!errors.is_empty(), "rejected without an error");
        let lines = text.lines().count().max(1);
        for e in &errors {
            prop_assert!(
                e.line >= 1 && e.line <= lines + 1,
                "error line {} outside the file ({lines} lines): {e}",
                e.line
            );
            prop_assert!(!e.message.is_empty());
            prop_assert!(e.to_string().starts_with("/nonexistent/fuzz.toml:"), "{e}");
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    DropLine(usize),
    DupLine(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..20).prop_map(|(at, n)| Edit::Delete(at, n)),
        (
            any::<usize>(),
            prop_oneof![
                Just("[".to_string()),
                Just("\"".to_string()),
                Just("=".to_string()),
                Just("\n".to_string()),
                Just("${".to_string()),
                Just("[[transforms]]\n".to_string()),
                Just("type = \"nope\"\n".to_string()),
                ".{0,8}".prop_map(String::from)
            ]
        )
            .prop_map(|(at, s)| Edit::Insert(at, s)),
        any::<usize>().prop_map(Edit::DropLine),
        any::<usize>().prop_map(Edit::DupLine),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Delete(at, n) => {
                let at = at % (chars.len() + 1);
                let end = (at + n).min(chars.len());
                chars.drain(at..end);
            }
            Edit::Insert(at, s) => {
                let at = at % (chars.len() + 1);
                chars.splice(at..at, s.chars());
            }
            Edit::DropLine(i) | Edit::DupLine(i) => {
                let text: String = chars.iter().collect();
                let mut lines: Vec<&str> = text.lines().collect();
                if lines.is_empty() {
                    continue;
                }
                let i = i % lines.len();
                if matches!(e, Edit::DropLine(_)) {
                    lines.remove(i);
                } else {
                    lines.insert(i, lines[i]);
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

#[test]
fn the_seed_file_is_valid_but_for_its_missing_files() {
    let errors = parse_pipeline(VALID, Path::new("/nonexistent/fuzz.toml"), None).unwrap_err();
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "/nonexistent/fuzz.toml:12:10: transform 1: granted directory /nonexistent/. does not exist",
            "/nonexistent/fuzz.toml:12:10: plugin file /nonexistent/plugin.wasm does not exist",
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        check(&text)?;
    }

    #[test]
    fn mutated_pipeline_files_never_panic(edits in prop::collection::vec(edit(), 1..6)) {
        check(&apply(VALID, &edits))?;
    }
}
