//! The admin HTTP listener (loopback by default):
//! - `GET /metrics`: Prometheus text format (see [`crate::telemetry`]);
//! - `GET /health`: 200 when every pipeline is consuming and none of its sinks
//!   is failing, else 503; JSON with the reasons;
//! - `GET /status`: JSON: the running pipelines with their live plugin
//!   versions, assignment, lag, counters, failing sinks and last error, and
//!   the reload counts;
//! - `POST /reload`: re-read the pipeline files and apply them, as a file
//!   change or SIGHUP does; answers with the outcome.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use std::net::SocketAddr;
use crate::telemetry::{telemetry, PipelineState};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// What `GET /status` shows; the run loop updates it after every reload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub pipelines: Vec<PipelineStatus>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The outcome of the last reload attempt, if any.
    pub last_reload: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineStatus {
    pub name: String,
    pub file: String,
    pub plugins: Vec<PluginStatus>,
    /// Live state and counters, filled in when `/status` is asked.
    #[serde(flatten)]
    pub state: PipelineState,
}

/// One pipeline in `GET /health`.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineHealth {
    pub ready: bool,
    /// Why not, when not.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    pub path: String,
    /// SHA-256 of the component now configured for the pipeline.
    pub version: String,
}

/// A reload request from the listener, answered with `Ok(summary)` or `Err(reasons)`.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

#[derive(Clone)]
struct AppState {
    status: Arc<RwLock<Status>>,
    reloads: mpsc::UnboundedSender<ReloadRequest>,
}

/// Serves the admin API on `addr` in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    status: Arc<RwLock<Status>>,
    reloads: mpsc::UnboundedSender<ReloadRequest>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .route("/reload", post(reload_handler))
        .with_state(AppState { status, reloads });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "admin listener stopped");
        }
    });
    info!(addr = %bound, "admin listener ready (GET /status, /metrics, /health; POST /reload)");
    Ok(bound)
}

fn live_status(state: &AppState) -> Status {
    let mut status = state.status.read().map(|s| s.clone()).unwrap_or_default();
    for p in &mut status.pipelines {
        p.state = telemetry().state(&p.name);
    }
    status
}

/// `value` as a JSON response, with every secret Sluice knows hidden (an
/// error quoted in a status may come from a library).
fn redacted_json(status: StatusCode, value: &impl Serialize) -> (StatusCode, [(axum::http::HeaderName, &'static str); 1], String) {
    let body = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], crate::secrets::redact(&body))
}

async fn status_handler(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    redacted_json(StatusCode::OK, &live_status(&state))
}

async fn metrics_handler() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::secrets::redact(&telemetry().encode()))
}

async fn health_handler(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    let status = live_status(&state);
    let health: BTreeMap<String, PipelineHealth> = status
        .pipelines
        .iter()
        .map(|p| {
            let mut reasons = Vec::new();
            if let Some(error) = &p.state.failing_source {
                reasons.push(format!("source failing: {error}"));
            }
            if let Some(reason) = &p.state.failing_plugin {
                reasons.push(format!("paused: {reason}"));
            }
            if !p.state.consuming {
                reasons.push("not consuming yet (no partition assignment from the group)".to_string());
            }
            for (sink, error) in &p.state.failing_sinks {
                reasons.push(format!("sink {sink} failing: {error}"));
            }
            (p.name.clone(), PipelineHealth { ready: reasons.is_empty(), reasons })
        })
        .collect();
    let ready = !health.is_empty() && health.values().all(|h| h.ready);
    redacted_json(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &health)
}

async fn reload_handler(State(state): State<AppState>) -> (StatusCode, String) {
    let (tx, rx) = oneshot::channel();
    if state.reloads.send(tx).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match rx.await {
        Ok(Ok(summary)) => (StatusCode::OK, format!("{summary}\n")),
        Ok(Err(reasons)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{}\n", crate::secrets::redact(&reasons))),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}
