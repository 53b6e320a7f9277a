//! The admin HTTP listener (loopback by default): `GET /status` (JSON: the
//! running pipelines, their live plugin versions, reload counts) and
//! `POST /reload` (re-read the pipeline files and apply them, as a file change
//! or SIGHUP does; answers with the outcome).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::net::SocketAddr;
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
        .route("/reload", post(reload_handler))
        .with_state(AppState { status, reloads });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "admin listener stopped");
        }
    });
    info!(addr = %bound, "admin listener ready (GET /status, POST /reload)");
    Ok(bound)
}

async fn status_handler(State(state): State<AppState>) -> Json<Status> {
    Json(state.status.read().map(|s| s.clone()).unwrap_or_default())
}

async fn reload_handler(State(state): State<AppState>) -> (StatusCode, String) {
    let (tx, rx) = oneshot::channel();
    if state.reloads.send(tx).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match rx.await {
        Ok(Ok(summary)) => (StatusCode::OK, format!("{summary}\n")),
        Ok(Err(reasons)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{reasons}\n")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}
