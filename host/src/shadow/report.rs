//! A shadow run's report: counts, a bounded sample of differences, the
//! candidate's CPU and its state, shared by the stage, the candidate's
//! thread and the admin listener; and its text form (`sluice shadow report`).

use super::diff::{Counts, Difference};
use super::Place;
use crate::config::ShadowSpec;
use crate::runtime::Plugin;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

/// Where a shadow run is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Running,
    /// The candidate failed (a fault streak, or it could not start): no
    /// longer run.
    Dropped(String),
    /// The pipeline file now names the candidate; the reload swaps it in.
    Promoting,
    /// `promote_after` was met but the file could not be rewritten.
    PromoteFailed(String),
    /// The stage was replaced (a reload, a promotion, a stop).
    Stopped,
}

impl State {
    fn text(&self) -> String {
        match self {
            State::Running => "running".into(),
            State::Dropped(why) => format!("dropped: {why}"),
            State::Promoting => "promoted: the pipeline file names the candidate".into(),
            State::PromoteFailed(why) => format!("running; promotion failed: {why}"),
            State::Stopped => "stopped".into(),
        }
    }
}

/// What `/status` and `GET /pipelines/NAME/shadow` show of one shadow run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    pub pipeline: String,
    /// The transform's number in the chain (1-based, as `sluice check` counts).
    pub stage: usize,
    /// The live plugin and its version (SHA-256 prefix).
    pub plugin: String,
    pub live_version: String,
    /// The candidate's file and version.
    pub candidate: String,
    pub candidate_version: String,
    /// `running`, `dropped: WHY`, `promoted: …`, `stopped`.
    pub state: String,
    /// When the run started (RFC 3339).
    pub since: String,
    pub sample: f64,
    pub tolerance: f64,
    pub ignore: Vec<String>,
    /// `promote_after`, as written, if set.
    pub promote_after: Option<String>,
    /// Batches the candidate ran and was compared on.
    pub batches_compared: u64,
    /// Sampled batches that arrived while the candidate was behind (its
    /// queue full): not compared.
    pub batches_skipped: u64,
    /// Batches left out by `sample`.
    pub batches_unsampled: u64,
    /// Input records compared.
    pub records: u64,
    pub counts: Counts,
    /// Differing outcomes over all compared ones (0 with none compared).
    pub diff_ratio: f64,
    /// CPU the candidate's thread spent running it, in seconds.
    pub cpu_seconds: f64,
    /// The first differences seen, at most `sample_limit`.
    pub samples: Vec<Difference>,
    pub sample_limit: usize,
}

/// The totals after a batch, for the promotion rule.
pub struct Totals {
    pub batches: u64,
    pub counts: Counts,
    pub state: State,
}

#[derive(Debug)]
struct Inner {
    /// The report; its `state` is written from `state` when it is read.
    report: ShadowReport,
    state: State,
}

/// A shadow run's shared report.
#[derive(Debug, Clone)]
pub struct Report(Arc<Mutex<Inner>>);

type Registry = Mutex<BTreeMap<String, BTreeMap<usize, Report>>>;

fn registry() -> &'static Registry {
    static REPORTS: OnceLock<Registry> = OnceLock::new();
    REPORTS.get_or_init(Registry::default)
}

/// The shadow runs of `pipeline` (the last one of each stage), in stage order.
pub fn reports(pipeline: &str) -> Vec<ShadowReport> {
    let stages = registry().lock().ok().and_then(|r| r.get(pipeline).cloned()).unwrap_or_default();
    stages.values().map(Report::snapshot).collect()
}

/// A promotion was asked for `pipeline`'s transform `stage` (1-based).
pub fn promoted(pipeline: &str, stage: usize) {
    let report = registry().lock().ok().and_then(|r| r.get(pipeline).and_then(|s| s.get(&(stage - 1)).cloned()));
    if let Some(report) = report {
        report.set_state(State::Promoting);
    }
}

fn short(hash: &str) -> String {
    hash.get(..12).unwrap_or(hash).to_string()
}

impl Report {
    /// A new report for the run at `place`, replacing the stage's last one.
    pub fn register(place: &Place, spec: &ShadowSpec, live: &Plugin) -> Report {
        let report = ShadowReport {
            pipeline: place.pipeline.clone(),
            stage: place.stage + 1,
            plugin: live.name.clone(),
            live_version: live.short_hash().to_string(),
            candidate: spec.path.display().to_string(),
            candidate_version: short(&spec.hash),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            sample: spec.sample,
            tolerance: spec.tolerance,
            ignore: spec.ignore.clone(),
            promote_after: spec
                .promote_after
                .map(|p| format!("{{ batches = {}, max_diff_ratio = {} }}", p.batches, p.max_diff_ratio)),
            sample_limit: spec.samples,
            ..ShadowReport::default()
        };
        let shared = Report(Arc::new(Mutex::new(Inner { report, state: State::Running })));
        if let Ok(mut r) = registry().lock() {
            r.entry(place.pipeline.clone()).or_default().insert(place.stage, shared.clone());
        }
        shared
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> Option<T> {
        self.0.lock().ok().map(|mut inner| f(&mut inner))
    }

    pub fn snapshot(&self) -> ShadowReport {
        self.with(|i| ShadowReport { state: i.state.text(), ..i.report.clone() }).unwrap_or_default()
    }

    pub fn candidate(&self) -> String {
        self.with(|i| i.report.candidate.clone()).unwrap_or_default()
    }

    pub fn live_plugin(&self) -> String {
        self.with(|i| i.report.plugin.clone()).unwrap_or_default()
    }

    pub fn set_state(&self, state: State) {
        self.with(|i| i.state = state);
    }

    /// The stage is gone: a run still going is stopped (a dropped or
    /// promoted one keeps saying so).
    pub fn stopped(&self) {
        self.with(|i| {
            if matches!(i.state, State::Running | State::PromoteFailed(_)) {
                i.state = State::Stopped;
            }
        });
    }

    pub fn batch_skipped(&self) {
        self.with(|i| i.report.batches_skipped += 1);
    }

    pub fn batch_unsampled(&self) {
        self.with(|i| i.report.batches_unsampled += 1);
    }

    /// One batch of `records` was compared.
    pub fn compared(&self, records: usize, counts: &Counts, differences: Vec<Difference>, cpu: f64) -> Totals {
        self.with(|i| {
            let r = &mut i.report;
            r.batches_compared += 1;
            r.records += records as u64;
            r.counts.add(counts);
            r.cpu_seconds += cpu;
            let total = r.counts.total();
            r.diff_ratio = if total == 0 { 0.0 } else { r.counts.differing() as f64 / total as f64 };
            let room = r.sample_limit.saturating_sub(r.samples.len());
            r.samples.extend(differences.into_iter().take(room));
            Totals { batches: r.batches_compared, counts: r.counts, state: i.state.clone() }
        })
        .unwrap_or(Totals { batches: 0, counts: Counts::default(), state: State::Stopped })
    }
}

/// A report as `sluice shadow report` prints it.
pub fn render(r: &ShadowReport) -> String {
    let mut out = String::new();
    let c = &r.counts;
    let _ = writeln!(out, "pipeline {}, transform {}: {} {}", r.pipeline, r.stage, r.plugin, r.live_version);
    let _ = writeln!(out, "  candidate  {} {}", r.candidate, r.candidate_version);
    let _ = writeln!(out, "  state      {} (since {})", r.state, r.since);
    let mut options = format!("sample {}, tolerance {}", r.sample, r.tolerance);
    if !r.ignore.is_empty() {
        let _ = write!(options, ", ignoring {}", r.ignore.join(", "));
    }
    if let Some(p) = &r.promote_after {
        let _ = write!(options, ", promote_after {p}");
    }
    let _ = writeln!(out, "  options    {options}");
    let _ = writeln!(
        out,
        "  batches    {} compared, {} skipped (candidate behind), {} not sampled; {} records",
        r.batches_compared, r.batches_skipped, r.batches_unsampled, r.records
    );
    let _ = writeln!(
        out,
        "  outputs    {} identical, {} different, {} only live, {} only candidate",
        c.identical, c.different, c.only_live, c.only_candidate
    );
    let _ = writeln!(out, "  errors     {} live, {} candidate", c.live_errors, c.candidate_errors);
    let _ = writeln!(out, "  diff ratio {:.6} ({} of {})", r.diff_ratio, c.differing(), c.total());
    let _ = writeln!(out, "  cpu        {:.3} s in the candidate", r.cpu_seconds);
    if r.samples.is_empty() {
        let _ = writeln!(out, "  no differences");
    } else {
        let _ = writeln!(out, "  samples (the first {} of {}):", r.samples.len(), c.differing());
    }
    for d in &r.samples {
        let key = d.key.as_deref().map(|k| format!(" key {k}")).unwrap_or_default();
        let _ = writeln!(out, "  - {} {}{key}", d.origin, d.kind.replace('_', " "));
        for f in &d.fields {
            let _ = writeln!(out, "      {}: {} -> {}", f.path, f.live, f.candidate);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::diff::FieldDiff;
    use super::*;

    #[test]
    fn the_text_report_shows_counts_and_samples() {
        let report = ShadowReport {
            pipeline: "trades".into(),
            stage: 1,
            plugin: "trade_flattener".into(),
            candidate: "round.wasm".into(),
            state: "running".into(),
            batches_compared: 3,
            counts: Counts { identical: 5, different: 2, ..Counts::default() },
            diff_ratio: 2.0 / 7.0,
            samples: vec![Difference {
                origin: "trades_raw/0@7".into(),
                key: Some("BINANCE:BTCUSDT".into()),
                kind: "different".into(),
                fields: vec![FieldDiff { path: "price".into(), live: "7296.89".into(), candidate: "7297".into() }],
            }],
            ..ShadowReport::default()
        };
        let text = render(&report);
        assert!(text.contains("5 identical, 2 different, 0 only live"), "{text}");
        assert!(text.contains("diff ratio 0.285714 (2 of 7)"), "{text}");
        assert!(
            text.contains("- trades_raw/0@7 different key BINANCE:BTCUSDT\n      price: 7296.89 -> 7297"),
            "{text}"
        );
    }
}
