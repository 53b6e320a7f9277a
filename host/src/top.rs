//! `sluice top`: a terminal dashboard of a running instance, in the spirit of
//! `vector top`. It polls the admin listener's `GET /status` every interval
//! and shows one row per pipeline: state, throughput with a sparkline, totals,
//! dead letters, lag, failing sinks and live plugin versions. `q` quits.

use anyhow::Context;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How many rates a sparkline shows.
const HISTORY: usize = 24;

/// What the dashboard knows: the last `/status` and each pipeline's rate history.
#[derive(Default)]
pub struct Dashboard {
    addr: String,
    status: Option<Value>,
    error: Option<String>,
    /// Per pipeline: records read at the last poll, and when.
    last: BTreeMap<String, (u64, Instant)>,
    rates: BTreeMap<String, VecDeque<f64>>,
}

impl Dashboard {
    pub fn new(addr: &str) -> Self {
        Dashboard { addr: addr.to_string(), ..Dashboard::default() }
    }

    /// Takes in one `/status` answer (or the error getting it).
    pub fn update(&mut self, status: anyhow::Result<Value>, now: Instant) {
        let status = match status {
            Ok(status) => status,
            Err(error) => {
                self.error = Some(format!("{error:#}"));
                return;
            }
        };
        self.error = None;
        for p in pipelines(&status) {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let records = p["records_in"].as_u64().unwrap_or(0);
            if let Some((before, at)) = self.last.insert(name.clone(), (records, now)) {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    let rates = self.rates.entry(name).or_default();
                    rates.push_back(records.saturating_sub(before) as f64 / secs);
                    while rates.len() > HISTORY {
                        rates.pop_front();
                    }
                }
            }
        }
        self.status = Some(status);
    }

    /// Draws the dashboard.
    pub fn draw(&self, frame: &mut Frame) {
        let [header, table, errors] =
            Layout::vertical([Constraint::Length(3), Constraint::Min(5), Constraint::Length(8)]).areas(frame.area());
        let summary = match (&self.error, &self.status) {
            (Some(error), _) => format!("cannot reach {}: {error}", self.addr),
            (None, Some(s)) => format!(
                "{}  ·  reloads ok {} / failed {}  ·  q quits",
                self.addr,
                s["reloads_ok"].as_u64().unwrap_or(0),
                s["reloads_failed"].as_u64().unwrap_or(0)
            ),
            (None, None) => format!("connecting to {}…", self.addr),
        };
        frame.render_widget(
            Paragraph::new(summary).block(Block::default().borders(Borders::ALL).title(" sluice top ")),
            header,
        );

        let head = ["Pipeline", "State", "In/s", "Trend", "In", "Out", "Dead", "Lag", "Errors", "Plugins"]
            .map(|h| Cell::from(h).style(Style::default().add_modifier(Modifier::BOLD)));
        let mut rows = Vec::new();
        let mut last_errors = Vec::new();
        for p in self.status.iter().flat_map(pipelines) {
            let name = p["name"].as_str().unwrap_or_default();
            let rates = self.rates.get(name);
            let rate = rates.and_then(|r| r.back()).copied().unwrap_or(0.0);
            let failing = p["failing_sinks"].as_object().map_or(0, |m| m.len());
            let paused = !p["failing_plugin"].is_null();
            let (state, color) = match (p["consuming"].as_bool().unwrap_or(false), failing) {
                _ if paused => ("paused", Color::Red),
                _ if !p["failing_source"].is_null() => ("source failing", Color::Red),
                (_, n) if n > 0 => ("sink failing", Color::Red),
                (true, _) => ("running", Color::Green),
                (false, _) => ("joining", Color::Yellow),
            };
            let lag: i64 = p["lag"].as_object().map_or(0, |m| m.values().filter_map(Value::as_i64).sum());
            let plugins: Vec<String> = p["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|pl| {
                    let path = pl["path"].as_str().unwrap_or_default();
                    let stem = std::path::Path::new(path)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    format!("{stem}@{}", pl["version"].as_str().unwrap_or_default().get(..8).unwrap_or("-"))
                })
                .collect();
            let mut plugins = plugins.join(" → ");
            if let Some(n) = p["rollbacks"].as_u64().filter(|n| *n > 0) {
                plugins.push_str(&format!(" (rolled back ×{n})"));
            }
            for shadow in p["shadows"].as_array().into_iter().flatten() {
                plugins.push_str(&format!("  [{}]", shadow_summary(shadow)));
            }
            for (stage, state) in p["state"].as_object().into_iter().flatten() {
                plugins.push_str(&format!("  [{}]", state_summary(stage, state)));
            }
            rows.push(Row::new(vec![
                Cell::from(name.to_string()),
                Cell::from(state).style(Style::default().fg(color)),
                Cell::from(format!("{rate:.0}/s")),
                Cell::from(sparkline(&rates.map(|r| r.iter().copied().collect::<Vec<f64>>()).unwrap_or_default())),
                Cell::from(p["records_in"].as_u64().unwrap_or(0).to_string()),
                Cell::from(p["records_out"].as_u64().unwrap_or(0).to_string()),
                Cell::from(p["dead_lettered"].as_u64().unwrap_or(0).to_string()),
                Cell::from(lag.to_string()),
                Cell::from(failing.to_string()),
                Cell::from(plugins),
            ]));
            if let Some(error) = p["last_error"].as_str() {
                last_errors.push(Line::from(format!("{name}: {error}")));
            }
        }
        let widths = [
            Constraint::Length(16),
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(HISTORY as u16),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Min(20),
        ];
        let table_widget = Table::new(rows, widths)
            .header(Row::new(head))
            .block(Block::default().borders(Borders::ALL).title(" pipelines "));
        frame.render_widget(table_widget, table);
        frame.render_widget(
            Paragraph::new(last_errors)
                .wrap(Wrap { trim: true })
                .block(Block::default().borders(Borders::ALL).title(" last errors ")),
            errors,
        );
    }
}

/// One shadow run in a few words: its candidate, how much of its output
/// matched, and its state when it is not running.
fn shadow_summary(s: &Value) -> String {
    let path = s["candidate"].as_str().unwrap_or_default();
    let stem = std::path::Path::new(path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let counts: crate::shadow::diff::Counts = serde_json::from_value(s["counts"].clone()).unwrap_or_default();
    let mut text = format!("shadow {stem}: {} identical, {} differing", counts.identical, counts.differing());
    let state = s["state"].as_str().unwrap_or_default();
    if state != "running" {
        text.push_str(&format!(", {}", state.split(':').next().unwrap_or(state)));
    }
    text
}

/// A stateful stage in a few words: its keys, bytes and watermark lag.
fn state_summary(stage: &str, s: &Value) -> String {
    let mib = s["bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20);
    let mut text = format!("state {stage}: {} keys, {mib:.1} MiB", s["keys"].as_u64().unwrap_or(0));
    if let Some(lag) = s["watermark_lag_seconds"].as_f64() {
        text.push_str(&format!(", watermark {lag:.0} s behind"));
    }
    text
}

fn pipelines(status: &Value) -> impl Iterator<Item = &Value> {
    status["pipelines"].as_array().into_iter().flatten()
}

/// Rates as a line of block characters, scaled to the largest.
pub fn sparkline(rates: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = rates.iter().copied().fold(0.0, f64::max);
    rates
        .iter()
        .map(|r| if max <= 0.0 { BARS[0] } else { BARS[((r / max) * 7.0).round().clamp(0.0, 7.0) as usize] })
        .collect()
}

fn fetch(addr: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let mut request = ureq::get(&format!("http://{addr}/status"));
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request.call().context("GET /status")?;
    let body = response.body_mut().read_to_string().context("reading /status")?;
    serde_json::from_str(&body).context("/status is not JSON")
}

/// Runs the dashboard until `q`, Esc or Ctrl-C.
pub fn run(addr: &str, token: Option<&str>, interval: Duration) -> anyhow::Result<()> {
    let mut dashboard = Dashboard::new(addr);
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            dashboard.update(fetch(addr, token), Instant::now());
            terminal.draw(|f| dashboard.draw(f))?;
            let deadline = Instant::now() + interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(key) = event::read()? {
                    let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;

    #[test]
    fn sparklines_scale_to_the_largest_rate() {
        assert_eq!(sparkline(&[0.0, 50.0, 100.0]), "▁▅█");
        assert_eq!(sparkline(&[0.0, 0.0]), "▁▁");
    }

    #[test]
    fn a_pipeline_row_shows_its_rate_lag_and_plugins() {
        let status = |records: u64| {
            json!({"reloads_ok": 2, "reloads_failed": 1, "pipelines": [{
                "name": "trades", "consuming": true, "records_in": records, "records_out": 3 * records,
                "dead_lettered": 4, "lag": {"raw/0": 5, "raw/1": 6}, "failing_sinks": {}, "rollbacks": 1,
                "last_error": "2026-01-01T00:00:00Z sink pg: down",
                "plugins": [{"path": "x/trade_flattener.wasm", "version": "2a03e70b39dc0000"}],
                "shadows": [{"candidate": "x/rounding.wasm", "state": "dropped: trap",
                             "counts": {"identical": 7, "different": 2, "only_live": 1}}],
                "state": {"1": {"keys": 12, "bytes": 3145728, "watermark_lag_seconds": 4.2}}
            }]})
        };
        let mut d = Dashboard::new("127.0.0.1:8686");
        let t0 = Instant::now();
        d.update(Ok(status(1000)), t0);
        d.update(Ok(status(3000)), t0 + Duration::from_secs(2));
        let mut terminal = Terminal::new(TestBackend::new(260, 20)).unwrap();
        terminal.draw(|f| d.draw(f)).unwrap();
        let screen: String =
            terminal.backend().buffer().content().iter().map(|c| c.symbol()).collect::<Vec<_>>().join("");
        for needle in [
            "reloads ok 2 / failed 1",
            "trades",
            "running",
            "1000/s",
            "3000",
            "9000",
            "11",
            "trade_flattener@2a03e70b",
            "(rolled back ×1)",
            "[shadow rounding: 7 identical, 3 differing, dropped]",
            "[state 1: 12 keys, 3.0 MiB, watermark 4 s behind]",
            "sink pg: down",
        ] {
            assert!(screen.contains(needle), "{needle} not on screen");
        }
    }
}
