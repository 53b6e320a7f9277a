//! What a plugin instance may use ([`Limits`]) and reach ([`Grants`]).

use crate::state::StateLimits;
use std::path::PathBuf;
use std::time::Duration;

/// Resource limits of one plugin instance. The defaults are safe for any plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call (`init` or one batch), in milliseconds,
    /// whatever the plugin spends it on: running, or waiting in a host call
    /// (a sleep, a poll, a socket).
    pub cpu_ms: u64,
    /// Linear memory the instance may grow to, in bytes.
    pub memory_bytes: usize,
    /// Bytes (keys, values, headers) the outputs of one input record may total.
    pub output_bytes: usize,
    /// Outputs one input record may produce.
    pub outputs: usize,
    /// Bytes the outputs of one batch may total, ranges counted as often as
    /// they are given (the host copies each): past it, records fail.
    pub batch_output_bytes: usize,
    /// Log lines per second the plugin may write through the `log` import,
    /// on average (a token bucket); 0: no limit.
    pub log_lines_per_s: u32,
    /// Log lines the plugin may write at once, above the rate.
    pub log_burst: u32,
    /// Keyed state the stage may hold (contract 0.3), and how long a key lives.
    pub state: StateLimits,
}

impl Default for Limits {
    /// 128 MiB of memory: plugins that embed an interpreter start at 9 MiB
    /// (JavaScript) to 13 MiB (Python), and SpiderMonkey lets its heap grow
    /// past 64 MiB over batches of 1,000 records before it collects.
    fn default() -> Self {
        Limits {
            cpu_ms: 1_000,
            memory_bytes: 128 << 20,
            output_bytes: 16 << 20,
            outputs: 100_000,
            batch_output_bytes: 256 << 20,
            log_lines_per_s: 100,
            log_burst: 1_000,
            state: StateLimits::default(),
        }
    }
}

impl Limits {
    /// Bytes the host copies out of the plugin in one call at most: its
    /// memory (a 0.2 results buffer) plus the batch's outputs (0.1 results,
    /// which may point at the same guest bytes many times).
    pub fn copy_limit(&self) -> usize {
        self.memory_bytes.saturating_add(self.batch_output_bytes)
    }

    /// Checks one record's outputs against the output caps, and adds their
    /// bytes to the batch's `so_far`.
    pub(crate) fn check_outputs(&self, outputs: crate::record::Iter<'_>, so_far: &mut usize) -> Result<(), String> {
        let bytes = outputs.clone().map(|o| o.bytes()).sum();
        self.check_totals(outputs.len(), bytes)?;
        self.add_to_batch(so_far, bytes)
    }

    /// Adds one record's `bytes` of output to the batch's `so_far`, unless
    /// that takes the batch over its cap.
    pub(crate) fn add_to_batch(&self, so_far: &mut usize, bytes: usize) -> Result<(), String> {
        let total = so_far.saturating_add(bytes);
        if total > self.batch_output_bytes {
            return Err(format!(
                "output limit: the batch's outputs would reach {total} bytes with this record's (limit {} per batch)",
                self.batch_output_bytes
            ));
        }
        *so_far = total;
        Ok(())
    }

    /// Checks one record's `count` outputs of `bytes` in all against the output caps.
    pub(crate) fn check_totals(&self, count: usize, bytes: usize) -> Result<(), String> {
        if count > self.outputs {
            return Err(format!("output limit: {count} outputs for one record (limit {})", self.outputs));
        }
        if bytes > self.output_bytes {
            return Err(format!("output limit: {bytes} bytes of output for one record (limit {})", self.output_bytes));
        }
        Ok(())
    }
}

/// What the sandbox lets a plugin reach. The default grants nothing: no
/// files, no network, no environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Environment variables visible to the plugin.
    pub env: Vec<(String, String)>,
    /// Host directories the plugin may read, as (host path, guest path).
    pub read_dirs: Vec<(PathBuf, String)>,
    /// Whether the plugin may open sockets and resolve names.
    pub network: bool,
    /// A replay's clock (`sluice replay`): WASI's clocks read it and its
    /// random numbers come from a fixed seed, so that a run is repeatable.
    pub replay_clock: Option<ReplayClock>,
}

/// The processing time of the recorded call being replayed (ms since the
/// Unix epoch), shared by the replay and the plugin's WASI clocks.
#[derive(Debug, Clone, Default)]
pub struct ReplayClock(pub std::sync::Arc<std::sync::atomic::AtomicI64>);

impl ReplayClock {
    pub fn set(&self, ms: i64) {
        self.0.store(ms, std::sync::atomic::Ordering::Release);
    }

    pub fn ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl wasmtime_wasi::HostWallClock for ReplayClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.ms().max(0) as u64)
    }
}

impl wasmtime_wasi::HostMonotonicClock for ReplayClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    /// Nanoseconds: the recorded clock's milliseconds.
    fn now(&self) -> u64 {
        (self.ms().max(0) as u64).saturating_mul(1_000_000)
    }
}

impl ReplayClock {
    /// The random bytes a replayed plugin reads (over and over): fixed, so
    /// that two replays read the same (splitmix64 from 0).
    pub fn random() -> wasmtime_wasi::Deterministic {
        let mut state = 0u64;
        let bytes = (0..512)
            .flat_map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)).to_le_bytes()
            })
            .collect();
        wasmtime_wasi::Deterministic::new(bytes)
    }
}

impl PartialEq for ReplayClock {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ReplayClock {}
