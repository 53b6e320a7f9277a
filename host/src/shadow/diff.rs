//! The comparison of a live stage's outputs with its candidate's, one source
//! record at a time.
//!
//! Outputs are paired by output key: the n-th live output with key K pairs
//! with the n-th candidate output with key K, and outputs without a key pair
//! by their position among the keyless ones (the record is the unit, so
//! this is the input record and output position). A pair is compared field
//! by field when both values are JSON (numbers within `tolerance`, the
//! `ignore`d fields left out), byte for byte when not; the route, the
//! timestamp and the headers are compared too.

use crate::record::{Origin, Output};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a pair of outputs is compared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffOptions {
    /// Numbers that differ by at most this much are equal.
    pub tolerance: f64,
    /// Fields left out, as paths of object keys (`["meta", "received_at"]`).
    pub ignore: Vec<Vec<String>>,
}

impl DiffOptions {
    /// Options from the pipeline file's `tolerance` and dotted `ignore` paths.
    pub fn new(tolerance: f64, ignore: &[String]) -> Self {
        DiffOptions { tolerance, ignore: ignore.iter().map(|p| p.split('.').map(str::to_string).collect()).collect() }
    }
}

/// Outputs (and records, for errors) by how they compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// Pairs equal in every compared field.
    pub identical: u64,
    /// Pairs with at least one differing field.
    pub different: u64,
    /// Live outputs the candidate did not produce.
    pub only_live: u64,
    /// Candidate outputs the live version did not produce.
    pub only_candidate: u64,
    /// Records the live version failed (not compared).
    pub live_errors: u64,
    /// Records the candidate failed where the live version did not.
    pub candidate_errors: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.identical += other.identical;
        self.different += other.different;
        self.only_live += other.only_live;
        self.only_candidate += other.only_candidate;
        self.live_errors += other.live_errors;
        self.candidate_errors += other.candidate_errors;
    }

    /// Outcomes that are not "identical" (live errors aside: both sides
    /// are judged on what the live version produced).
    pub fn differing(&self) -> u64 {
        self.different + self.only_live + self.only_candidate + self.candidate_errors
    }

    /// Every outcome compared.
    pub fn total(&self) -> u64 {
        self.identical + self.differing()
    }

    /// `(result label, count)` for the metrics.
    pub fn labelled(&self) -> [(&'static str, u64); 6] {
        [
            ("identical", self.identical),
            ("different", self.different),
            ("only_live", self.only_live),
            ("only_candidate", self.only_candidate),
            ("live_error", self.live_errors),
            ("candidate_error", self.candidate_errors),
        ]
    }
}

/// One difference, as a sample in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// `topic/partition@offset` of the source record.
    pub origin: String,
    /// The output key (lossy UTF-8), if any.
    pub key: Option<String>,
    /// `different`, `only_live`, `only_candidate` or `candidate_error`.
    pub kind: String,
    /// What differs, field by field (or the error, or the lone output).
    pub fields: Vec<FieldDiff>,
}

/// One field that differs: its path and both values (as JSON text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDiff {
    /// `price`, `conditions[1]`, `meta.venue`; `(value)` for a non-JSON
    /// value, `(route)`, `(timestamp)`, `(headers)`.
    pub path: String,
    pub live: String,
    pub candidate: String,
}

/// Longest value text a sample keeps.
const SHOWN: usize = 200;

fn shown(text: impl Into<String>) -> String {
    let mut text = text.into();
    if text.len() > SHOWN {
        let mut end = SHOWN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn origin_text(origin: &Origin) -> String {
    format!("{}/{}@{}", origin.topic, origin.partition, origin.offset)
}

/// Compares what the live version and the candidate made of one record.
/// Returns the counts and the differences (the caller keeps a few).
pub fn compare_record(
    origin: &Origin,
    live: &Result<Vec<Output>, String>,
    candidate: &Result<Vec<Output>, String>,
    options: &DiffOptions,
) -> (Counts, Vec<Difference>) {
    let mut counts = Counts::default();
    let mut differences = Vec::new();
    let (live, candidate) = match (live, candidate) {
        (Err(_), _) => {
            counts.live_errors = 1;
            return (counts, differences);
        }
        (Ok(_), Err(error)) => {
            counts.candidate_errors = 1;
            differences.push(Difference {
                origin: origin_text(origin),
                key: None,
                kind: "candidate_error".into(),
                fields: vec![FieldDiff {
                    path: "(error)".into(),
                    live: String::new(),
                    candidate: shown(error.clone()),
                }],
            });
            return (counts, differences);
        }
        (Ok(live), Ok(candidate)) => (live, candidate),
    };
    let mut taken = vec![false; candidate.len()];
    for l in live {
        // The first candidate output not yet paired with the same key.
        let pair = candidate.iter().enumerate().position(|(i, c)| !taken[i] && c.key == l.key);
        let key = l.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned());
        match pair {
            Some(i) => {
                taken[i] = true;
                let fields = compare_outputs(l, &candidate[i], options);
                if fields.is_empty() {
                    counts.identical += 1;
                } else {
                    counts.different += 1;
                    differences.push(Difference { origin: origin_text(origin), key, kind: "different".into(), fields });
                }
            }
            None => {
                counts.only_live += 1;
                let fields = vec![FieldDiff {
                    path: "(value)".into(),
                    live: shown(String::from_utf8_lossy(&l.value)),
                    candidate: String::new(),
                }];
                differences.push(Difference { origin: origin_text(origin), key, kind: "only_live".into(), fields });
            }
        }
    }
    for (c, _) in candidate.iter().zip(&taken).filter(|(_, taken)| !**taken) {
        counts.only_candidate += 1;
        let fields = vec![FieldDiff {
            path: "(value)".into(),
            live: String::new(),
            candidate: shown(String::from_utf8_lossy(&c.value)),
        }];
        let key = c.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned());
        differences.push(Difference { origin: origin_text(origin), key, kind: "only_candidate".into(), fields });
    }
    (counts, differences)
}

/// The fields in which `live` and `candidate` differ (none: identical).
pub fn compare_outputs(live: &Output, candidate: &Output, options: &DiffOptions) -> Vec<FieldDiff> {
    let mut fields = Vec::new();
    let parsed = (serde_json::from_slice::<Value>(&live.value), serde_json::from_slice::<Value>(&candidate.value));
    match parsed {
        (Ok(l), Ok(c)) => compare_json(&mut Vec::new(), &l, &c, options, &mut fields),
        _ if live.value != candidate.value => fields.push(FieldDiff {
            path: "(value)".into(),
            live: shown(String::from_utf8_lossy(&live.value)),
            candidate: shown(String::from_utf8_lossy(&candidate.value)),
        }),
        _ => {}
    }
    let text = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    if live.route != candidate.route {
        fields.push(FieldDiff {
            path: "(route)".into(),
            live: text(live.route.clone()),
            candidate: text(candidate.route.clone()),
        });
    }
    if live.timestamp != candidate.timestamp {
        fields.push(FieldDiff {
            path: "(timestamp)".into(),
            live: text(live.timestamp.map(|t| t.to_string())),
            candidate: text(candidate.timestamp.map(|t| t.to_string())),
        });
    }
    if live.headers != candidate.headers {
        let names = |o: &Output| o.headers.iter().map(|h| h.name.clone()).collect::<Vec<_>>().join(",");
        fields.push(FieldDiff { path: "(headers)".into(), live: names(live), candidate: names(candidate) });
    }
    fields
}

/// A path's text: `a.b[2].c`.
fn path_text(path: &[String]) -> String {
    let mut text = String::new();
    for part in path {
        if part.starts_with('[') || text.is_empty() {
            text.push_str(part);
        } else {
            text.push('.');
            text.push_str(part);
        }
    }
    text
}

fn ignored(path: &[String], options: &DiffOptions) -> bool {
    // Array positions do not count: `conditions` ignores every element.
    let keys: Vec<&String> = path.iter().filter(|p| !p.starts_with('[')).collect();
    options.ignore.iter().any(|i| i.len() <= keys.len() && i.iter().zip(&keys).all(|(a, b)| a == *b))
}

fn compare_json(path: &mut Vec<String>, l: &Value, c: &Value, options: &DiffOptions, out: &mut Vec<FieldDiff>) {
    if ignored(path, options) {
        return;
    }
    let differ = |out: &mut Vec<FieldDiff>, path: &[String], l: Option<&Value>, c: Option<&Value>| {
        let text = |v: Option<&Value>| v.map_or_else(|| "(absent)".to_string(), |v| shown(v.to_string()));
        out.push(FieldDiff {
            path: if path.is_empty() { "(value)".into() } else { path_text(path) },
            live: text(l),
            candidate: text(c),
        });
    };
    match (l, c) {
        (Value::Object(lo), Value::Object(co)) => {
            for (k, lv) in lo {
                path.push(k.clone());
                match co.get(k) {
                    Some(cv) => compare_json(path, lv, cv, options, out),
                    None if !ignored(path, options) => differ(out, path, Some(lv), None),
                    None => {}
                }
                path.pop();
            }
            for (k, cv) in co.iter().filter(|(k, _)| !lo.contains_key(*k)) {
                path.push(k.clone());
                if !ignored(path, options) {
                    differ(out, path, None, Some(cv));
                }
                path.pop();
            }
        }
        (Value::Array(la), Value::Array(ca)) if la.len() == ca.len() => {
            for (i, (lv, cv)) in la.iter().zip(ca).enumerate() {
                path.push(format!("[{i}]"));
                compare_json(path, lv, cv, options, out);
                path.pop();
            }
        }
        (Value::Number(ln), Value::Number(cn)) => {
            let equal = match (ln.as_i64(), cn.as_i64(), ln.as_u64(), cn.as_u64()) {
                (Some(a), Some(b), _, _) if options.tolerance == 0.0 => a == b,
                (_, _, Some(a), Some(b)) if options.tolerance == 0.0 => a == b,
                _ => match (ln.as_f64(), cn.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= options.tolerance,
                    _ => ln == cn,
                },
            };
            if !equal {
                differ(out, path, Some(l), Some(c));
            }
        }
        _ if l == c => {}
        _ => differ(out, path, Some(l), Some(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(key: Option<&str>, value: &str) -> Output {
        Output { key: key.map(|k| k.to_string().into()), value: value.to_string().into(), ..Output::default() }
    }

    fn origin() -> Origin {
        Origin { topic: "trades_raw".into(), partition: 1, offset: 42 }
    }

    #[test]
    fn a_rounded_price_is_one_different_field_and_the_rest_identical() {
        let live = Ok(vec![
            out(Some("A"), r#"{"symbol":"A","price":7296.89,"ts":1}"#),
            out(Some("A"), r#"{"symbol":"A","price":7297,"ts":2}"#),
            out(Some("B"), r#"{"symbol":"B","price":1.5,"ts":3}"#),
        ]);
        let candidate = Ok(vec![
            out(Some("A"), r#"{"symbol":"A","price":7297,"ts":1}"#),
            out(Some("A"), r#"{"symbol":"A","price":7297.0,"ts":2}"#),
            out(Some("B"), r#"{"ts":3,"price":2,"symbol":"B"}"#),
        ]);
        let (counts, diffs) = compare_record(&origin(), &live, &candidate, &DiffOptions::default());
        assert_eq!(counts, Counts { identical: 1, different: 2, ..Counts::default() });
        assert_eq!(diffs.len(), 2);
        assert_eq!(diffs[0].origin, "trades_raw/1@42");
        assert_eq!(diffs[0].key.as_deref(), Some("A"));
        assert_eq!(
            diffs[0].fields,
            [FieldDiff { path: "price".into(), live: "7296.89".into(), candidate: "7297".into() }]
        );
        assert_eq!(diffs[1].fields[0].path, "price");

        // Within the tolerance, or with the field ignored, they are identical.
        let (within, _) = compare_record(&origin(), &live, &candidate, &DiffOptions::new(0.5, &[]));
        assert_eq!(within, Counts { identical: 3, ..Counts::default() });
        let (ignoring, _) = compare_record(&origin(), &live, &candidate, &DiffOptions::new(0.0, &["price".into()]));
        assert_eq!(ignoring.identical, 3);
    }

    #[test]
    fn unpaired_outputs_errors_and_other_fields_are_counted_apart() {
        let live = Ok(vec![out(Some("A"), "1"), out(None, "x"), out(None, "y")]);
        let candidate = Ok(vec![out(None, "x"), out(Some("C"), "3")]);
        let (counts, diffs) = compare_record(&origin(), &live, &candidate, &DiffOptions::default());
        assert_eq!(counts, Counts { identical: 1, only_live: 2, only_candidate: 1, ..Counts::default() });
        let kinds: Vec<_> = diffs.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["only_live", "only_live", "only_candidate"]);
        assert_eq!(counts.differing(), 3);
        assert_eq!(counts.total(), 4);

        let (counts, diffs) = compare_record(&origin(), &live, &Err("trap".into()), &DiffOptions::default());
        assert_eq!(counts.candidate_errors, 1);
        assert_eq!(diffs[0].fields[0].candidate, "trap");
        let (counts, diffs) = compare_record(&origin(), &Err("bad".into()), &candidate, &DiffOptions::default());
        assert_eq!((counts.live_errors, counts.total(), diffs.len()), (1, 0, 0));

        // Not JSON: bytes; routes, timestamps, nested fields and arrays.
        let mut a = out(None, r#"{"m":{"v":"x","w":1},"c":["1","2"]}"#);
        let mut b = out(None, r#"{"m":{"v":"y"},"c":["1","3"],"n":null}"#);
        a.route = Some("pg".into());
        b.timestamp = Some(5);
        let mut fields: Vec<String> =
            compare_outputs(&a, &b, &DiffOptions::default()).into_iter().map(|f| f.path).collect();
        fields.sort();
        assert_eq!(fields, ["(route)", "(timestamp)", "c[1]", "m.v", "m.w", "n"]);
        let ignoring = DiffOptions::new(0.0, &["m".into(), "c".into(), "n".into()]);
        assert_eq!(compare_outputs(&a, &b, &ignoring).len(), 2);
        let raw = compare_outputs(&out(None, "not json"), &out(None, "not jsom"), &DiffOptions::default());
        assert_eq!(raw[0].path, "(value)");
        assert!(compare_outputs(&out(None, "same"), &out(None, "same"), &DiffOptions::default()).is_empty());
    }
}
