//! The state of one plugin `Store`: its WASI context and resource table, the
//! memory cap, its stderr, and the log budget of the `log` import (which each
//! contract's bindings call through [`HostState::log_line`]).

use super::limits::Limits;
use super::stderr::PluginStderr;
use crate::state::{CallState, StateError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, trace, warn};
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Per-store state: WASI context, resource table and memory limiter.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
    stderr: PluginStderr,
    /// `pipeline/plugin`, for the plugin's log lines.
    label: Arc<str>,
    /// The instance's log budget (it outlives the store across replacements).
    log: Arc<Mutex<LogBucket>>,
    /// The keyed state of the call running (contract 0.3), if the stage has state.
    state: Option<CallState>,
    /// Why a state call was refused: the trap that follows is that.
    state_error: Option<StateError>,
}

/// Bytes of one plugin log line; the rest is cut.
pub(crate) const MAX_LOG_LINE: usize = 8 << 10;

/// The plugin log's token bucket: `rate` lines a second on average, `burst`
/// at once. Checked before any formatting, so a flood costs the host one
/// comparison per line. Suppressed lines are counted and summed up in one
/// line at most once a second.
pub struct LogBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    /// Suppressed lines not yet added to the metric (it is kept current after
    /// every batch; the summary line comes at most once a second).
    uncounted: u64,
    /// When the first line of the current suppression was refused.
    since: Option<Instant>,
    pipeline: String,
    plugin: String,
}

impl LogBucket {
    pub(super) fn new(limits: &Limits, pipeline: &str, plugin: &str) -> Self {
        LogBucket {
            rate: f64::from(limits.log_lines_per_s),
            burst: f64::from(limits.log_burst.max(1)),
            tokens: f64::from(limits.log_burst.max(1)),
            refilled: Instant::now(),
            suppressed: 0,
            uncounted: 0,
            since: None,
            pipeline: pipeline.to_string(),
            plugin: plugin.to_string(),
        }
    }

    /// Whether one more line may be written now.
    fn admit(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        if self.tokens < 1.0 {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate).min(self.burst);
            self.refilled = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.suppressed += 1;
        self.uncounted += 1;
        self.since.get_or_insert_with(Instant::now);
        false
    }

    /// Logs how many lines were suppressed, once a second at most (or now, with `force`).
    pub(super) fn summarize(&mut self, force: bool) {
        if self.uncounted > 0 {
            crate::telemetry::telemetry().plugin_logs_suppressed(&self.pipeline, &self.plugin, self.uncounted);
            self.uncounted = 0;
        }
        let Some(since) = self.since else { return };
        let elapsed = since.elapsed();
        if self.suppressed == 0 || (!force && elapsed < Duration::from_secs(1)) {
            return;
        }
        warn!(
            pipeline = %self.pipeline,
            plugin = %self.plugin,
            suppressed = self.suppressed,
            "suppressed {} log lines from {}/{} in the last {:.1} s",
            self.suppressed,
            self.pipeline,
            self.plugin,
            elapsed.as_secs_f64().max(0.1)
        );
        self.suppressed = 0;
        self.since = None;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl HostState {
    /// A store's state: `wasi` as the grants allow, memory capped at
    /// `memory_bytes`, stderr kept in `stderr`, log lines labelled `label`
    /// and counted against `log` (which outlives the store).
    pub(super) fn new(
        wasi: WasiCtx,
        memory_bytes: usize,
        stderr: PluginStderr,
        label: Arc<str>,
        log: Arc<Mutex<LogBucket>>,
    ) -> Self {
        HostState {
            wasi,
            table: ResourceTable::new(),
            memory: MemoryCap::new(memory_bytes),
            stderr,
            label,
            log,
            state: None,
            state_error: None,
        }
    }

    /// The memory cap, for [`wasmtime::Store::limiter`].
    pub(super) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.memory
    }

    /// Whether the memory cap refused a growth (a trap that follows is the memory limit).
    pub(super) fn memory_limit_hit(&self) -> bool {
        self.memory.hit
    }

    /// Gives the next call its state (`None`: the stage has none).
    pub(super) fn begin_call(&mut self, state: Option<CallState>) {
        self.state = state;
        self.state_error = None;
    }

    /// Ends a call: its state changes, kept only if it succeeded.
    pub(super) fn end_call(&mut self) -> Option<CallState> {
        self.state.take()
    }

    /// Why a state call of the last call was refused, if one was.
    pub(super) fn state_error(&self) -> Option<&StateError> {
        self.state_error.as_ref()
    }

    /// One call of the `state` import: a refusal traps the plugin, and is
    /// remembered so that the fault names it.
    pub(super) fn state_call<T>(
        &mut self,
        call: impl FnOnce(&mut CallState) -> Result<T, StateError>,
    ) -> wasmtime::Result<T> {
        let result = match self.state.as_mut() {
            Some(state) => call(state),
            None => Err(StateError::Unavailable),
        };
        result.map_err(|error| {
            let trap = wasmtime::Error::msg(error.to_string());
            self.state_error = Some(error);
            trap
        })
    }

    /// The plugin's recent stderr.
    pub(super) fn stderr(&self) -> &PluginStderr {
        &self.stderr
    }

    /// One line from the plugin's `log` import (either contract), within its budget.
    pub(super) fn log_line(&mut self, level: tracing::Level, mut message: String) {
        if !self.log.lock().is_ok_and(|mut bucket| bucket.admit()) {
            return;
        }
        if message.len() > MAX_LOG_LINE {
            let total = message.len();
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(&format!("… ({total} bytes in all)"));
        }
        let plugin = &*self.label;
        match level {
            tracing::Level::TRACE => trace!(plugin, "{message}"),
            tracing::Level::DEBUG => debug!(plugin, "{message}"),
            tracing::Level::INFO => info!(plugin, "{message}"),
            tracing::Level::WARN => warn!(plugin, "{message}"),
            _ => error!(plugin, "{message}"),
        }
    }
}

/// Refuses memory growth past the limit and remembers that it did, so a
/// resulting trap is reported as the memory limit rather than a plain trap.
/// The limit is on the total of the instance's linear memories: a
/// component made of several core modules has one memory each.
#[derive(Default)]
struct MemoryCap {
    limit: usize,
    /// Bytes of all the instance's memories.
    total: usize,
    hit: bool,
}

impl MemoryCap {
    fn new(limit: usize) -> Self {
        MemoryCap { limit, ..MemoryCap::default() }
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.hit = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_limit_is_on_the_total_of_all_memories() {
        let mib = 1 << 20;
        let mut cap = MemoryCap::new(64 * mib);
        // Two memories created at 16 MiB each, then grown.
        assert!(cap.memory_growing(0, 16 * mib, None).unwrap());
        assert!(cap.memory_growing(0, 16 * mib, None).unwrap());
        assert!(cap.memory_growing(16 * mib, 40 * mib, None).unwrap(), "56 MiB in all");
        assert!(!cap.hit);
        assert!(
            !cap.memory_growing(16 * mib, 32 * mib, None).unwrap(),
            "72 MiB in all: refused, though each is under 64"
        );
        assert!(cap.hit);
        assert!(cap.memory_growing(16 * mib, 24 * mib, None).unwrap(), "64 MiB in all");
    }
}
