//! `sluice run`: starts the pipelines (the diff from nothing), then loops on
//! signals, admin requests and file changes, each a reload
//! ([`super::reload`]), with a progress line per pipeline now and then.

use super::reload::reload;
use super::{print_config_errors, tokio_runtime, PipelineArgs};
use crate::runtime::Runtime;
use anyhow::Context;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipelines: PipelineArgs,
    /// Address of the admin HTTP listener (GET /status, POST /reload); port 0
    /// picks a free one (logged); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:8686", value_parser = parse_admin_addr)]
    pub admin_addr: AdminAddr,
    /// A file holding the admin listener's bearer token: every endpoint but
    /// `/health` and `/metrics` then needs `Authorization: Bearer <token>`.
    /// Needed to bind the listener to a non-loopback address.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// A host name (beyond the loopback ones) that requests to the admin
    /// listener may give in `Host` and `Origin`, e.g. the name it is reached
    /// by through a proxy. Repeatable.
    #[arg(long = "admin-host")]
    pub admin_hosts: Vec<String>,
    /// Also serve `GET /metrics` and `GET /health` alone (read-only) on this
    /// address, e.g. `0.0.0.0:9598` for a Prometheus on another host.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between the one-line progress summaries per pipeline (rate,
    /// lag, dead letters, failing sinks); 0 disables them.
    #[arg(long, env = "SLUICE_PROGRESS_SECS", default_value_t = 10)]
    pub progress_secs: u64,
    /// Stop at the end of the input: a `file` source ends its pipeline once
    /// it has read its files to the end (instead of following them as they
    /// grow), and `sluice run` exits once every pipeline has ended (status
    /// 0 when none failed). Other sources never end.
    #[arg(long)]
    pub until_eof: bool,
}

/// Where the admin listener listens, if anywhere.
#[derive(Debug, Clone, Copy)]
pub struct AdminAddr(pub Option<std::net::SocketAddr>);

fn parse_admin_addr(raw: &str) -> Result<AdminAddr, String> {
    if raw == "off" {
        return Ok(AdminAddr(None));
    }
    raw.parse().map(|a| AdminAddr(Some(a))).map_err(|e| format!("{raw:?}: {e} (e.g. 127.0.0.1:8686, or off)"))
}

/// The admin listener's guard from the flags.
fn admin_guard(run: &RunArgs) -> anyhow::Result<crate::admin::Guard> {
    let token = match &run.admin_token_file {
        None => None,
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --admin-token-file {}", path.display()))?;
            let token = token.trim();
            anyhow::ensure!(
                token.len() >= 16,
                "--admin-token-file {}: the token must be at least 16 characters",
                path.display()
            );
            Some(crate::secrets::Secret::new(token.to_string()))
        }
    };
    let guard = crate::admin::Guard { hosts: run.admin_hosts.clone(), token };
    if let AdminAddr(Some(addr)) = run.admin_addr {
        guard.check_bind(addr).map_err(anyhow::Error::msg).context("--admin-addr")?;
    }
    Ok(guard)
}

pub fn run(runtime: Runtime, run: &RunArgs) -> anyhow::Result<ExitCode> {
    let args = &run.pipelines;
    let guard = admin_guard(run)?;
    // The stop signals are taken first thing: a stop asked for while the
    // plugins compile and the pipelines start ends the process cleanly once
    // they have started.
    let tokio = tokio_runtime()?;
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _context = tokio.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?, signal(SignalKind::hangup())?)
    };
    let pipelines = match crate::config::load_dir_or_files(&args.paths, Some(&runtime)) {
        Ok(p) => p,
        Err(errors) => {
            print_config_errors(&errors);
            return Ok(ExitCode::FAILURE);
        }
    };
    tokio.block_on(async move {
        let (mut interrupt, mut terminate, mut hangup) = signals;
        let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = crate::config::watcher::Watcher::new(&args.paths, &pipelines, changes_tx)
            .context("cannot watch the pipeline and plugin files")?;
        let options = crate::sources::RunOptions { until_eof: run.until_eof, range: None };
        let mut topology = crate::topology::Topology::with_options(runtime.clone(), options);
        topology.apply(pipelines).await?;
        let status = std::sync::Arc::new(std::sync::RwLock::new(crate::admin::Status::default()));
        update_status(&status, &topology, None);
        let (admin_tx, mut admin_requests) = tokio::sync::mpsc::channel::<crate::admin::ReloadRequest>(crate::admin::RELOAD_QUEUE);
        if let AdminAddr(Some(addr)) = run.admin_addr {
            if let Err(error) = crate::admin::serve(addr, guard, status.clone(), admin_tx).await {
                tracing::warn!(%addr, error = format!("{error:#}"), "cannot start the admin listener; running without it");
            }
        }
        if let Some(addr) = run.metrics_addr {
            crate::admin::serve_metrics(addr, status.clone()).await?;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut progress = Progress::new(run.progress_secs);
        let mut failed = 0;
        loop {
            let mut replies = Vec::new();
            let reason = tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                _ = hangup.recv() => "SIGHUP".to_string(),
                Some(request) = admin_requests.recv() => {
                    // Every request waiting now shares this reload.
                    replies.push(request);
                    while let Ok(more) = admin_requests.try_recv() {
                        replies.push(more);
                    }
                    "POST /reload".to_string()
                }
                Some(path) = changes.recv() => {
                    // Debounce: editors and compilers write in several steps.
                    let mut changed = std::collections::BTreeSet::from([path]);
                    while let Ok(Some(more)) = tokio::time::timeout(std::time::Duration::from_millis(250), changes.recv()).await {
                        changed.insert(more);
                    }
                    changed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                }
                _ = tick.tick() => {
                    progress.maybe_log(&topology);
                    failed += topology.reap().await;
                    if topology.is_empty() {
                        return Ok(if failed == 0 && run.until_eof { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                    }
                    continue;
                }
            };
            let outcome = reload(&runtime, &args.paths, &mut topology, &mut watcher, &reason).await;
            update_status(&status, &topology, Some(&outcome));
            for reply in replies {
                let _ = reply.send(outcome.clone());
            }
        }
        tracing::info!("shutting down: finishing in-flight batches");
        topology.shutdown().await;
        // A recording's reader gets its last entries.
        crate::capture::recorder::drain(std::time::Duration::from_secs(3)).await;
        Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

/// The periodic one-line summary per pipeline, so a long run is never
/// silent (`sluice run`, `sluice backfill`).
pub(super) struct Progress {
    every: std::time::Duration,
    last: std::time::Instant,
    /// Records read per pipeline at the last summary.
    seen: std::collections::BTreeMap<String, u64>,
}

impl Progress {
    pub(super) fn new(secs: u64) -> Self {
        Progress {
            every: std::time::Duration::from_secs(secs),
            last: std::time::Instant::now(),
            seen: Default::default(),
        }
    }

    pub(super) fn maybe_log(&mut self, topology: &crate::topology::Topology) {
        let elapsed = self.last.elapsed();
        if self.every.is_zero() || elapsed < self.every {
            return;
        }
        self.last = std::time::Instant::now();
        for p in topology.pipelines() {
            let s = crate::telemetry::telemetry().state(&p.name);
            let before = self.seen.insert(p.name.clone(), s.records_in).unwrap_or(0);
            let rate = s.records_in.saturating_sub(before) as f64 / elapsed.as_secs_f64();
            let lag = s.lag.values().sum::<i64>();
            // At this rate, the time to read what is behind (a backfill: to its end).
            let eta = if rate >= 1.0 && lag > 0 { format!("{:.0}s", lag as f64 / rate) } else { "-".to_string() };
            tracing::info!(
                pipeline = %p.name,
                records_per_s = format!("{rate:.0}"),
                records_in = s.records_in,
                records_out = s.records_out,
                dead_lettered = s.dead_lettered,
                lag,
                eta = %eta,
                partitions = s.assignment.len(),
                failing_sinks = s.failing_sinks.len(),
                "progress"
            );
        }
    }
}

fn update_status(
    status: &std::sync::RwLock<crate::admin::Status>,
    topology: &crate::topology::Topology,
    outcome: Option<&Result<String, String>>,
) {
    use crate::admin::{PipelineStatus, PluginStatus};
    let Ok(mut status) = status.write() else { return };
    status.pipelines = topology
        .pipelines()
        .map(|p| PipelineStatus {
            name: p.name.clone(),
            file: p.file.display().to_string(),
            plugins: p
                .transforms
                .iter()
                .map(|t| PluginStatus { path: t.path.display().to_string(), version: t.hash.clone() })
                .collect(),
            state: Default::default(),
            shadows: Vec::new(),
        })
        .collect();
    match outcome {
        Some(Ok(summary)) => {
            crate::telemetry::telemetry().reload(true);
            status.reloads_ok += 1;
            status.last_reload = Some(summary.clone());
        }
        Some(Err(error)) => {
            crate::telemetry::telemetry().reload(false);
            status.reloads_failed += 1;
            status.last_reload = Some(format!("rejected: {error}"));
        }
        None => {}
    }
}
