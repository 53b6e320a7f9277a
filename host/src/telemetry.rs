//! What the running pipelines report: Prometheus metrics (`GET /metrics`),
//! and the live state behind `GET /status` and `GET /health` (assignment,
//! lag, failing sinks, last error). One process-wide instance, [`telemetry`],
//! fed by the sources, the chain and the delivery stage.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub pipeline: String,
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub pipeline: String,
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub pipeline: String,
    pub plugin: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub pipeline: String,
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub pipeline: String,
    pub plugin: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub pipeline: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LateLabels {
    pub pipeline: String,
    pub plugin: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 100 µs to ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// What one pipeline is doing now (its source, sinks, plugins, counts and
/// stateful stages), for `/status` and `/health`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineLive {
    /// The source has joined its group and been given its partitions (maybe none).
    pub consuming: bool,
    /// Partitions this instance owns, as `topic/partition`.
    pub assignment: Vec<String>,
    /// Consumer lag per owned partition (records behind the high watermark).
    pub lag: BTreeMap<String, i64>,
    /// Sinks whose last write failed, with the error.
    pub failing_sinks: BTreeMap<String, String>,
    /// Why the source cannot read, while it cannot (e.g. "kafka source
    /// cannot connect to host:port: SASL authentication failed").
    pub failing_source: Option<String>,
    /// The plugin version the pipeline is paused on, and why.
    pub failing_plugin: Option<String>,
    /// Hot swaps rolled back since the pipeline started.
    pub rollbacks: u64,
    /// The last rollback: when, which version, why.
    pub last_rollback: Option<String>,
    /// The last error seen (sink, source or commit), with its time (RFC 3339).
    pub last_error: Option<String>,
    pub records_in: u64,
    pub records_out: u64,
    pub dead_lettered: u64,
    pub batches: u64,
    /// Per stateful stage (by index): its keys, bytes and watermark lag.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub state: BTreeMap<usize, StageStatus>,
}

/// A stateful stage as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StageStatus {
    pub keys: usize,
    pub bytes: usize,
    /// How far the slowest partition's watermark is behind the clock
    /// (stages with event time).
    pub watermark_lag_seconds: Option<f64>,
}

/// All metrics families and the per-pipeline state.
pub struct Telemetry {
    registry: Registry,
    pub records_in: Family<PipelineLabels, Counter>,
    pub records_out: Family<SinkLabels, Counter>,
    pub dead_lettered: Family<PipelineLabels, Counter>,
    pub batches: Family<PipelineLabels, Counter>,
    pub batch_seconds: Histograms<PipelineLabels>,
    pub plugin_seconds: Histograms<PluginLabels>,
    pub sink_seconds: Histograms<SinkLabels>,
    pub sink_errors: Family<SinkLabels, Counter>,
    pub lag: Family<PartitionLabels, Gauge>,
    pub reloads: Family<ResultLabels, Counter>,
    pub plugin_version: Family<VersionLabels, Gauge>,
    pub plugin_log_suppressed: Family<PluginLabels, Counter>,
    pub plugin_rollbacks: Family<PluginLabels, Counter>,
    pub source_reconnects: Family<PipelineLabels, Counter>,
    pub source_connected: Family<PipelineLabels, Gauge>,
    pub source_gap_seconds: Family<PipelineLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub shadow_outputs: Family<ShadowLabels, Counter>,
    pub shadow_cpu_seconds: Family<PluginLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub state_keys: Family<StageLabels, Gauge>,
    pub state_bytes: Family<StageLabels, Gauge>,
    pub watermark_lag: Family<StageLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub late_records: Family<LateLabels, Counter>,
    state: Mutex<BTreeMap<String, PipelineLive>>,
    /// Sink names per pipeline.
    sinks: Mutex<BTreeMap<String, Vec<String>>>,
    /// Live (plugin, version) per pipeline.
    plugins: Mutex<BTreeMap<String, Vec<(String, String)>>>,
}

/// The process-wide telemetry.
pub fn telemetry() -> &'static Telemetry {
    static TELEMETRY: OnceLock<Telemetry> = OnceLock::new();
    TELEMETRY.get_or_init(Telemetry::new)
}

fn now() -> String {
    humantime_rfc3339(SystemTime::now())
}

/// `SystemTime` as RFC 3339 UTC with seconds.
fn humantime_rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Telemetry {
    fn new() -> Self {
        let mut t = Telemetry {
            registry: Registry::with_prefix("sluice"),
            records_in: Family::default(),
            records_out: Family::default(),
            dead_lettered: Family::default(),
            batches: Family::default(),
            batch_seconds: Family::new_with_constructor(seconds_histogram),
            plugin_seconds: Family::new_with_constructor(seconds_histogram),
            sink_seconds: Family::new_with_constructor(seconds_histogram),
            sink_errors: Family::default(),
            lag: Family::default(),
            reloads: Family::default(),
            plugin_version: Family::default(),
            plugin_log_suppressed: Family::default(),
            plugin_rollbacks: Family::default(),
            source_reconnects: Family::default(),
            source_connected: Family::default(),
            source_gap_seconds: Family::default(),
            shadow_outputs: Family::default(),
            shadow_cpu_seconds: Family::default(),
            state_keys: Family::default(),
            state_bytes: Family::default(),
            watermark_lag: Family::default(),
            late_records: Family::default(),
            state: Mutex::new(BTreeMap::new()),
            sinks: Mutex::new(BTreeMap::new()),
            plugins: Mutex::new(BTreeMap::new()),
        };
        let r = &mut t.registry;
        r.register("records_in", "Records read from the source", t.records_in.clone());
        r.register("records_out", "Records written to a sink", t.records_out.clone());
        r.register("records_dead_lettered", "Records written to the dead-letter destination", t.dead_lettered.clone());
        r.register("batches", "Batches delivered and committed", t.batches.clone());
        r.register("batch_seconds", "Time from a batch's read to its commit", t.batch_seconds.clone());
        r.register("plugin_call_seconds", "Time one plugin takes for one batch", t.plugin_seconds.clone());
        r.register("sink_write_seconds", "Time one successful sink write takes", t.sink_seconds.clone());
        r.register("sink_errors", "Failed sink writes (each is retried)", t.sink_errors.clone());
        r.register("consumer_lag", "Records behind the partition's high watermark", t.lag.clone());
        r.register("reloads", "Reload attempts by result (ok, failed)", t.reloads.clone());
        r.register("plugin_info", "The live plugin version (1) per pipeline and plugin", t.plugin_version.clone());
        r.register(
            "plugin_log_lines_suppressed",
            "Plugin log lines dropped by the log rate limit",
            t.plugin_log_suppressed.clone(),
        );
        r.register(
            "plugin_rollbacks",
            "Hot swaps rolled back because the new version failed",
            t.plugin_rollbacks.clone(),
        );
        r.register(
            "source_reconnects",
            "Times a source (WebSocket) connected again after losing its connection",
            t.source_reconnects.clone(),
        );
        r.register(
            "source_connected",
            "Whether a source (WebSocket) is connected (1) or not (0)",
            t.source_connected.clone(),
        );
        r.register(
            "source_disconnected_seconds",
            "Time a source (WebSocket) spent disconnected between connections: frames sent then are lost",
            t.source_gap_seconds.clone(),
        );
        r.register(
            "shadow_outputs",
            "A shadow run's outputs by how they compared with the live version's (identical, different, only_live, only_candidate; records: live_error, candidate_error)",
            t.shadow_outputs.clone(),
        );
        r.register(
            "shadow_cpu_seconds",
            "CPU a shadow run's candidate spent, on its own thread beside the live path",
            t.shadow_cpu_seconds.clone(),
        );
        r.register("state_keys", "Keys a stateful stage holds, over its partitions", t.state_keys.clone());
        r.register(
            "state_bytes",
            "Bytes a stateful stage holds (keys, values, timers), counted against limits.state_mib",
            t.state_bytes.clone(),
        );
        r.register(
            "watermark_lag_seconds",
            "How far the slowest partition's watermark of a stage with event time is behind the clock",
            t.watermark_lag.clone(),
        );
        r.register(
            "late_records",
            "Records behind their partition's watermark, by what became of them (drop, dead_letter, route)",
            t.late_records.clone(),
        );
        t
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn with_state(&self, pipeline: &str, f: impl FnOnce(&mut PipelineLive)) {
        if let Ok(mut state) = self.state.lock() {
            f(state.entry(pipeline.to_string()).or_default());
        }
    }

    /// A snapshot of `pipeline`'s state, with its counters.
    pub fn state(&self, pipeline: &str) -> PipelineLive {
        let mut s = self.state.lock().ok().and_then(|s| s.get(pipeline).cloned()).unwrap_or_default();
        let p = PipelineLabels { pipeline: pipeline.to_string() };
        s.records_in = self.records_in.get_or_create(&p).get();
        s.dead_lettered = self.dead_lettered.get_or_create(&p).get();
        s.batches = self.batches.get_or_create(&p).get();
        s.records_out = self
            .state_sinks(pipeline)
            .iter()
            .map(|sink| self.records_out.get_or_create(&sink_labels(pipeline, sink)).get())
            .sum();
        s
    }

    fn state_sinks(&self, pipeline: &str) -> Vec<String> {
        self.sinks.lock().ok().and_then(|s| s.get(pipeline).cloned()).unwrap_or_default()
    }

    /// A pipeline starts: its sinks and plugin versions are known.
    pub fn pipeline_started(&self, pipeline: &str, sinks: &[String], plugins: &[(String, String)]) {
        if let Ok(mut s) = self.sinks.lock() {
            s.insert(pipeline.to_string(), sinks.to_vec());
        }
        self.set_plugins(pipeline, plugins);
    }

    /// The live plugin versions of `pipeline` (after a start or a swap).
    pub fn set_plugins(&self, pipeline: &str, plugins: &[(String, String)]) {
        if let Ok(mut live) = self.plugins.lock() {
            for (plugin, version) in live.remove(pipeline).unwrap_or_default() {
                self.plugin_version.remove(&VersionLabels { pipeline: pipeline.to_string(), plugin, version });
            }
            for (plugin, version) in plugins {
                let labels =
                    VersionLabels { pipeline: pipeline.to_string(), plugin: plugin.clone(), version: version.clone() };
                self.plugin_version.get_or_create(&labels).set(1);
            }
            live.insert(pipeline.to_string(), plugins.to_vec());
        }
    }

    /// A pipeline stopped: its live state and gauges go.
    pub fn pipeline_stopped(&self, pipeline: &str) {
        self.set_plugins(pipeline, &[]);
        if let Ok(mut state) = self.state.lock() {
            if let Some(old) = state.remove(pipeline) {
                for key in old.lag.keys() {
                    if let Some((topic, partition)) = key.rsplit_once('/') {
                        self.lag.remove(&partition_labels(pipeline, topic, partition));
                    }
                }
            }
        }
    }

    pub fn assigned(&self, pipeline: &str, partitions: &[(String, i32)]) {
        self.with_state(pipeline, |s| {
            s.consuming = true;
            s.assignment = partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect();
            s.lag.retain(|k, _| s.assignment.contains(k));
        });
    }

    pub fn set_lag(&self, pipeline: &str, topic: &str, partition: i32, lag: i64) {
        self.lag.get_or_create(&partition_labels(pipeline, topic, &partition.to_string())).set(lag);
        self.with_state(pipeline, |s| {
            let key = format!("{topic}/{partition}");
            if s.assignment.contains(&key) {
                s.lag.insert(key, lag);
            }
        });
    }

    /// A write to `sink` succeeded in `seconds`: the sink is healthy again.
    pub fn sink_ok(&self, pipeline: &str, sink: &str, seconds: f64) {
        self.sink_seconds.get_or_create(&sink_labels(pipeline, sink)).observe(seconds);
        self.with_state(pipeline, |s| {
            s.failing_sinks.remove(sink);
        });
    }

    /// `records` records are in `sink` (those it rejected went to the dead letters).
    pub fn written(&self, pipeline: &str, sink: &str, records: usize) {
        self.records_out.get_or_create(&sink_labels(pipeline, sink)).inc_by(records as u64);
    }

    pub fn sink_failed(&self, pipeline: &str, sink: &str, error: &str) {
        self.sink_errors.get_or_create(&sink_labels(pipeline, sink)).inc();
        self.with_state(pipeline, |s| {
            s.failing_sinks.insert(sink.to_string(), error.to_string());
            s.last_error = Some(format!("{} sink {sink}: {error}", now()));
        });
    }

    /// The source cannot read: `/health` says why until [`Telemetry::source_ok`].
    pub fn source_failed(&self, pipeline: &str, error: &str) {
        self.with_state(pipeline, |s| {
            s.failing_source = Some(error.to_string());
            s.last_error = Some(format!("{} source: {error}", now()));
        });
    }

    /// A connection-based source (WebSocket) is connected, or not.
    pub fn source_connected(&self, pipeline: &str, connected: bool) {
        self.source_connected
            .get_or_create(&PipelineLabels { pipeline: pipeline.to_string() })
            .set(i64::from(connected));
    }

    /// A connection-based source connected again after `gap_seconds` without a connection.
    pub fn source_reconnected(&self, pipeline: &str, gap_seconds: f64) {
        let labels = PipelineLabels { pipeline: pipeline.to_string() };
        self.source_reconnects.get_or_create(&labels).inc();
        self.source_gap_seconds.get_or_create(&labels).inc_by(gap_seconds);
    }

    pub fn source_ok(&self, pipeline: &str) {
        self.with_state(pipeline, |s| s.failing_source = None);
    }

    /// `lines` log lines of `plugin` were suppressed by its rate limit.
    pub fn plugin_logs_suppressed(&self, pipeline: &str, plugin: &str, lines: u64) {
        self.plugin_log_suppressed
            .get_or_create(&PluginLabels { pipeline: pipeline.to_string(), plugin: plugin.to_string() })
            .inc_by(lines);
    }

    /// The pipeline is paused on a failing plugin version: `/health` says why.
    pub fn plugin_failing(&self, pipeline: &str, reason: &str) {
        self.with_state(pipeline, |s| {
            s.failing_plugin = Some(reason.to_string());
            s.last_error = Some(format!("{} {reason}", now()));
        });
    }

    pub fn plugin_ok(&self, pipeline: &str) {
        self.with_state(pipeline, |s| s.failing_plugin = None);
    }

    /// A hot swap of `plugin` was rolled back (`what`: versions and reason).
    pub fn rolled_back(&self, pipeline: &str, plugin: &str, what: &str) {
        self.plugin_rollbacks
            .get_or_create(&PluginLabels { pipeline: pipeline.to_string(), plugin: plugin.to_string() })
            .inc();
        self.with_state(pipeline, |s| {
            s.rollbacks += 1;
            s.last_rollback = Some(format!("{} {what}", now()));
            s.last_error = s.last_rollback.clone();
        });
    }

    pub fn error(&self, pipeline: &str, error: &str) {
        self.with_state(pipeline, |s| s.last_error = Some(format!("{} {error}", now())));
    }

    pub fn batch_done(&self, pipeline: &str, records: usize, dead: usize, seconds: f64) {
        let p = PipelineLabels { pipeline: pipeline.to_string() };
        self.records_in.get_or_create(&p).inc_by(records as u64);
        self.dead_lettered.get_or_create(&p).inc_by(dead as u64);
        self.batches.get_or_create(&p).inc();
        self.batch_seconds.get_or_create(&p).observe(seconds);
    }

    pub fn plugin_call(&self, pipeline: &str, plugin: &str, seconds: f64) {
        self.plugin_seconds
            .get_or_create(&PluginLabels { pipeline: pipeline.to_string(), plugin: plugin.to_string() })
            .observe(seconds);
    }

    /// A record came behind its partition's watermark.
    pub fn late_record(&self, pipeline: &str, plugin: &str, policy: &str) {
        let labels =
            LateLabels { pipeline: pipeline.to_string(), plugin: plugin.to_string(), policy: policy.to_string() };
        self.late_records.get_or_create(&labels).inc();
    }

    /// A stateful stage's size and watermark lag after a batch; `/status` shows them too.
    pub fn state_size(&self, pipeline: &str, stage: usize, keys: usize, bytes: usize, watermark_lag: Option<f64>) {
        let labels = StageLabels { pipeline: pipeline.to_string(), stage: stage.to_string() };
        self.state_keys.get_or_create(&labels).set(keys as i64);
        self.state_bytes.get_or_create(&labels).set(bytes as i64);
        if let Some(lag) = watermark_lag {
            self.watermark_lag.get_or_create(&labels).set(lag);
        }
        self.with_state(pipeline, |s| {
            s.state.insert(stage, StageStatus { keys, bytes, watermark_lag_seconds: watermark_lag });
        });
    }

    /// A shadow run compared a batch: its outcomes and the candidate's CPU.
    pub fn shadow_compared(&self, pipeline: &str, plugin: &str, counts: &[(&str, u64)], cpu_seconds: f64) {
        for (result, n) in counts {
            let labels =
                ShadowLabels { pipeline: pipeline.to_string(), plugin: plugin.to_string(), result: result.to_string() };
            self.shadow_outputs.get_or_create(&labels).inc_by(*n);
        }
        let labels = PluginLabels { pipeline: pipeline.to_string(), plugin: plugin.to_string() };
        self.shadow_cpu_seconds.get_or_create(&labels).inc_by(cpu_seconds);
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabels { result: if ok { "ok" } else { "failed" }.to_string() }).inc();
    }
}

fn sink_labels(pipeline: &str, sink: &str) -> SinkLabels {
    SinkLabels { pipeline: pipeline.to_string(), sink: sink.to_string() }
}

fn partition_labels(pipeline: &str, topic: &str, partition: &str) -> PartitionLabels {
    PartitionLabels { pipeline: pipeline.to_string(), topic: topic.to_string(), partition: partition.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(humantime_rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_764_067_215);
        assert_eq!(humantime_rfc3339(t), "2025-11-25T10:40:15Z");
    }

    #[test]
    fn counters_reach_the_text_format_and_the_state() {
        let t = Telemetry::new();
        t.pipeline_started("p", &["pg".into()], &[("flat".into(), "abc".into())]);
        t.batch_done("p", 10, 2, 0.01);
        t.sink_ok("p", "pg", 0.002);
        t.written("p", "pg", 24);
        t.assigned("p", &[("raw".into(), 0)]);
        t.set_lag("p", "raw", 0, 7);
        let text = t.encode();
        for line in [
            "sluice_records_in_total{pipeline=\"p\"} 10",
            "sluice_records_dead_lettered_total{pipeline=\"p\"} 2",
            "sluice_records_out_total{pipeline=\"p\",sink=\"pg\"} 24",
            "sluice_consumer_lag{pipeline=\"p\",topic=\"raw\",partition=\"0\"} 7",
            "sluice_plugin_info{pipeline=\"p\",plugin=\"flat\",version=\"abc\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let s = t.state("p");
        assert_eq!((s.records_in, s.records_out, s.dead_lettered, s.batches), (10, 24, 2, 1));
        assert_eq!(s.lag.get("raw/0"), Some(&7));
        t.sink_failed("p", "pg", "down");
        assert!(t.state("p").failing_sinks.contains_key("pg"));
        t.sink_ok("p", "pg", 0.001);
        assert!(t.state("p").failing_sinks.is_empty());
        t.pipeline_stopped("p");
        assert!(!t.encode().contains("version=\"abc\""));
    }
}
