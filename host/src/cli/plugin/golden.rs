//! Golden files for `sluice plugin test --expect FILE`: the outputs as
//! `--json` prints them, one per line, compared with the run's outputs by
//! the shadow's diff engine ([`crate::shadow::diff`]): per input line (or
//! fired timer), paired by key, field by field, within `--tolerance`,
//! without the `--ignore`d fields. A line that fails is a line of its own,
//! `{"line":3,"error":"..."}`: an expected error matches an error that
//! begins with its text (`--update` writes the whole message; keep as much
//! of it as the test cares about). `--update` writes the file instead.

use crate::record::{Header, Origin, Output};
use crate::shadow::diff::{compare_record, Counts, DiffOptions};
use anyhow::Context;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

/// The outputs of a run, gathered for the golden file.
pub struct Golden {
    path: PathBuf,
    update: bool,
    options: DiffOptions,
    /// The outputs' lines, as `--json` prints them (and failures'), in order.
    actual: Vec<String>,
}

impl Golden {
    pub fn new(path: PathBuf, update: bool, options: DiffOptions) -> Self {
        Golden { path, update, options, actual: Vec::new() }
    }

    /// One output's line as `--json` prints it, or a failed input's
    /// (`{"line":N,"error":"..."}`).
    pub fn push(&mut self, line: String) {
        self.actual.push(line);
    }

    /// Writes the file (`--update`), or compares it with the outputs and
    /// prints the differences to `out`. Returns whether they matched (or
    /// were written).
    pub fn finish(self, out: &mut dyn Write) -> anyhow::Result<bool> {
        if self.update {
            super::write_replacing(&self.path, |file| {
                for line in &self.actual {
                    file.write_all(line.as_bytes())?;
                    file.write_all(b"\n")?;
                }
                Ok(())
            })?;
            writeln!(out, "wrote {} outputs to {}", self.actual.len(), self.path.display())?;
            return Ok(true);
        }
        let text = std::fs::read_to_string(&self.path).with_context(|| {
            format!("cannot read the expected outputs {} (write it with --update)", self.path.display())
        })?;
        let mut expected = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let value: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not an output line of `--json`", self.path.display(), n + 1))?;
            anyhow::ensure!(
                value.get("value").is_some() || value.get("error").is_some_and(Value::is_string),
                "{}:{}: an output line needs a `value` (or a failed line an `error` text)",
                self.path.display(),
                n + 1
            );
            expected.push(value);
        }
        let actual: Vec<Value> = self.actual.iter().map(|l| serde_json::from_str(l)).collect::<Result<_, _>>()?;
        let (counts, report) = compare(&expected, &actual, &self.options);
        if counts.differing() == 0 {
            writeln!(out, "all {} outputs match {}", counts.identical, self.path.display())?;
            return Ok(true);
        }
        writeln!(out, "--- expected {}\n+++ actual", self.path.display())?;
        out.write_all(report.as_bytes())?;
        writeln!(
            out,
            "{} of {} outputs differ ({} different, {} missing, {} unexpected); if the new outputs are right, accept them with --update",
            counts.differing(),
            counts.total(),
            counts.different,
            counts.only_live,
            counts.only_candidate
        )?;
        Ok(false)
    }
}

/// Where an output came from: its input line, or the timer it fired from.
fn origin_label(output: &Value) -> String {
    match (output.get("line").and_then(Value::as_i64), output.get("timer")) {
        (Some(line), _) => format!("line {line}"),
        (None, Some(timer)) if !timer.is_null() => format!(
            "timer {} at {} (partition {})",
            timer.get("key").map_or_else(|| "null".to_string(), Value::to_string),
            timer.get("at").map_or_else(|| "null".to_string(), Value::to_string),
            timer.get("partition").map_or_else(|| "null".to_string(), Value::to_string)
        ),
        _ => "(no origin)".into(),
    }
}

/// An output line back as an output: its `value` as JSON text (a text
/// value is a JSON string on both sides, so both compare alike).
fn output(v: &Value) -> Output {
    let text = |field: &str| v.get(field).and_then(Value::as_str).map(str::to_string);
    let headers = v.get("headers").and_then(Value::as_array).map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .map(|h| Header {
                name: h.get(0).and_then(Value::as_str).unwrap_or_default().to_string(),
                value: h.get(1).and_then(Value::as_str).unwrap_or_default().as_bytes().to_vec(),
            })
            .collect()
    });
    Output {
        key: text("key").map(|k| k.into_bytes().into()),
        value: v.get("value").map_or_else(String::new, Value::to_string).into_bytes().into(),
        headers,
        timestamp: v.get("timestamp").and_then(Value::as_i64),
        route: text("route"),
    }
}

/// What one origin gave: its outputs, or its error.
#[derive(Default)]
struct Given {
    outputs: Vec<Output>,
    error: Option<String>,
}

/// The counts and the readable report of `expected` against `actual`,
/// origin by origin in the order they first appear.
fn compare(expected: &[Value], actual: &[Value], options: &DiffOptions) -> (Counts, String) {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, (Given, Given)> = HashMap::new();
    for (side, outputs) in [(0, expected), (1, actual)] {
        for v in outputs {
            let label = origin_label(v);
            let group = groups.entry(label.clone()).or_insert_with(|| {
                order.push(label);
                Default::default()
            });
            let given = if side == 0 { &mut group.0 } else { &mut group.1 };
            match v.get("error").and_then(Value::as_str) {
                Some(error) if v.get("value").is_none() => given.error = Some(error.to_string()),
                _ => given.outputs.push(output(v)),
            }
        }
    }
    let mut counts = Counts::default();
    let mut report = String::new();
    for label in order {
        let (expected, actual) = groups.remove(&label).unwrap_or_default();
        match (&expected.error, &actual.error) {
            (None, None) => {}
            (Some(want), Some(got)) if got.starts_with(want.as_str()) => {
                counts.identical += 1;
                continue;
            }
            (Some(want), Some(got)) => {
                counts.different += 1;
                report.push_str(&format!("{label}: fails otherwise\n    error: expected {want:?}, got {got:?}\n"));
                continue;
            }
            (Some(want), None) => {
                counts.only_live += 1;
                report.push_str(&format!("{label}: missing failure: {want:?}\n"));
            }
            (None, Some(got)) => {
                counts.only_candidate += 1;
                report.push_str(&format!("{label}: unexpected failure: {got:?}\n"));
                continue;
            }
        }
        let (c, differences) = compare_record(&Origin::default(), &Ok(expected.outputs), &Ok(actual.outputs), options);
        counts.add(&c);
        for d in differences {
            let key = d.key.map(|k| format!(", key {k:?}")).unwrap_or_default();
            let (kind, lone) = match d.kind.as_str() {
                "only_live" => ("missing", d.fields.first().map(|f| f.live.clone())),
                "only_candidate" => ("unexpected", d.fields.first().map(|f| f.candidate.clone())),
                _ => ("differs", None),
            };
            match lone {
                Some(value) => report.push_str(&format!("{label}{key}: {kind}: {value}\n")),
                None => {
                    report.push_str(&format!("{label}{key}: {kind}\n"));
                    for f in d.fields {
                        report.push_str(&format!("    {}: expected {}, got {}\n", f.path, f.live, f.candidate));
                    }
                }
            }
        }
    }
    (counts, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_compare_per_origin_by_key_and_field_with_a_tolerance() {
        let expected = [
            json!({"line": 1, "key": "A", "value": {"p": 1.0, "at": 5}}),
            json!({"line": 1, "key": "B", "value": "text"}),
            json!({"line": null, "timer": {"partition": 0, "key": "A", "at": 60}, "value": {"n": 2}}),
        ];
        let actual = [
            json!({"line": 1, "key": "B", "value": "text"}),
            json!({"line": 1, "key": "A", "value": {"p": 1.0000001, "at": 6}}),
            json!({"line": 2, "value": "new"}),
        ];
        let options = DiffOptions::new(1e-3, &[]);
        let (counts, report) = compare(&expected, &actual, &options);
        assert_eq!((counts.identical, counts.different, counts.only_live, counts.only_candidate), (1, 1, 1, 1));
        assert!(report.contains("line 1, key \"A\": differs\n    at: expected 5, got 6\n"), "{report}");
        assert!(report.contains("timer \"A\" at 60 (partition 0): missing: {\"n\":2}"), "{report}");
        assert!(report.contains("line 2: unexpected: \"new\""), "{report}");
        let (counts, _) = compare(&expected, &expected, &DiffOptions::default());
        assert_eq!(counts.differing(), 0);
        let ignoring = DiffOptions::new(1e-3, &["at".to_string()]);
        assert_eq!(compare(&expected[..1], &actual[1..2], &ignoring).0.differing(), 0);
    }

    #[test]
    fn an_expected_error_matches_an_error_that_begins_with_it() {
        let expected = [json!({"line": 3, "error": "expected a JSON object"})];
        let same = [json!({"line": 3, "error": "expected a JSON object: expected ident at line 1"})];
        assert_eq!(compare(&expected, &same, &DiffOptions::default()).0.identical, 1);
        let other = [json!({"line": 3, "error": "no such field"})];
        let (counts, report) = compare(&expected, &other, &DiffOptions::default());
        assert_eq!(counts.different, 1);
        assert!(report.contains("line 3: fails otherwise"), "{report}");
        let ran = [json!({"line": 3, "value": 1})];
        let (counts, report) = compare(&expected, &ran, &DiffOptions::default());
        assert_eq!((counts.only_live, counts.only_candidate), (1, 1), "{report}");
        assert!(report.contains("line 3: missing failure") && report.contains("line 3: unexpected: 1"), "{report}");
    }
}
