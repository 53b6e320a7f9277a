//! The admin HTTP listener (loopback by default):
//! - `GET /metrics`: Prometheus text format (see [`crate::telemetry`]);
//! - `GET /health`: 200 when every pipeline is consuming and none of its sinks
//!   is failing, else 503; JSON with the reasons;
//! - `GET /status`: JSON: the running pipelines with their live plugin
//!   versions, assignment, lag, counters, failing sinks and last error, and
//!   the reload counts;
//! - `POST /reload`: re-read the pipeline files and apply them, as a file
//!   change or SIGHUP does; answers with the outcome. Requests that arrive
//!   while a reload runs share the next one: at most one is ever pending.
//! - `GET /pipelines/NAME/shadow`: the pipeline's shadow runs (JSON; also
//!   in `/status`); `POST /pipelines/NAME/shadow/start` (JSON `{"plugin":
//!   PATH, "stage": N}`), `…/shadow/stop` and `…/shadow/promote` (or
//!   `…/shadow/STAGE/stop|promote`, with several): each rewrites the
//!   pipeline file ([`crate::shadow::edit`]) and reloads it (a promotion is
//!   then the ordinary hot swap); answers with the outcome.
//! - `POST /pipelines/NAME/record` (JSON `{"stage": N, "records": N,
//!   "for_ms": MS, "max_mib": M}`): records the stage's next calls; the
//!   answer's body is the capture ([`crate::capture`]), streamed as it is
//!   written, until a bound is reached (`sluice record`).
//!
//! # Protection
//! - The `Host` header must name a loopback address (`localhost`,
//!   `127.0.0.1`, `[::1]`, any port) or a name given with `--admin-host`:
//!   a page on another site cannot read `/status` through DNS rebinding.
//! - `POST` refuses a cross-origin request (an `Origin` that is not an
//!   allowed host, or `Sec-Fetch-Site: cross-site`): a page the operator
//!   opens cannot trigger a reload.
//! - With `--admin-token-file`, every endpoint but `/health` and `/metrics`
//!   needs `Authorization: Bearer <token>`. A listener on a non-loopback
//!   address without a token is refused at start; `--metrics-addr` serves
//!   `/metrics` and `/health` alone (read-only, for Prometheus) on another
//!   address.

use crate::telemetry::{telemetry, PipelineLive};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use std::collections::BTreeMap;
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
    /// Live state and counters, filled in when `/status` is asked.
    #[serde(flatten)]
    pub state: PipelineLive,
    /// Its shadow runs, filled in when `/status` is asked.
    pub shadows: Vec<crate::shadow::ShadowReport>,
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

/// How many reload requests may wait for the run loop at once (they are
/// answered together, by one reload); more get 503.
pub const RELOAD_QUEUE: usize = 64;

#[derive(Clone)]
struct AppState {
    status: Arc<RwLock<Status>>,
    reloads: mpsc::Sender<ReloadRequest>,
}

/// Who may use the admin listener.
#[derive(Clone, Default)]
pub struct Guard {
    /// Host names, beyond the loopback ones, that the `Host` and `Origin`
    /// headers may name.
    pub hosts: Vec<String>,
    /// The bearer token every endpoint but `/health` and `/metrics` needs.
    pub token: Option<crate::secrets::Secret>,
}

impl Guard {
    /// Refuses to serve everything on a non-loopback address without a token.
    pub fn check_bind(&self, addr: SocketAddr) -> Result<(), String> {
        if addr.ip().is_loopback() || self.token.is_some() {
            return Ok(());
        }
        Err(format!(
            "the admin listener would serve POST /reload and /status to anyone who reaches {addr}: bind it to a loopback address, \
             give it --admin-token-file, or serve only /metrics and /health there with --metrics-addr {addr}"
        ))
    }

    /// Whether `host` (a `Host` header, or an origin's authority) names this listener.
    fn allows_host(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map_or(v6, |(ip, _)| ip),
            None => host
                .rsplit_once(':')
                .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
                .map_or(host, |(name, _)| name),
        };
        let name = name.to_ascii_lowercase();
        matches!(name.as_str(), "localhost" | "::1")
            || name.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(&name))
    }

    /// Why the request is refused, if it is.
    fn refuse(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<(StatusCode, String)> {
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        match text(header::HOST) {
            Some(host) if self.allows_host(host) => {}
            host => {
                return Some((
                    StatusCode::FORBIDDEN,
                    format!(
                    "Host {:?} is not this listener's: use a loopback address, or allow the name with --admin-host\n",
                    host.unwrap_or_default()
                ),
                ))
            }
        }
        if method != Method::GET && method != Method::HEAD {
            let cross_site = text(header::HeaderName::from_static("sec-fetch-site"))
                .is_some_and(|s| s == "cross-site" || s == "same-site");
            let foreign_origin = text(header::ORIGIN).is_some_and(|origin| {
                let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
                !self.allows_host(authority.split('/').next().unwrap_or_default())
            });
            if cross_site || foreign_origin {
                return Some((StatusCode::FORBIDDEN, "cross-origin requests may not change this instance\n".into()));
            }
        }
        if let Some(token) = &self.token {
            let open = method == Method::GET && (path == "/health" || path == "/metrics");
            let given = text(header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
            if !open && !token.matches(given) {
                return Some((
                    StatusCode::UNAUTHORIZED,
                    "this endpoint needs Authorization: Bearer <the --admin-token-file token>\n".into(),
                ));
            }
        }
        None
    }
}

async fn guarded(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    match guard.refuse(request.method(), request.uri().path(), request.headers()) {
        Some((code, reason)) => {
            warn!(method = %request.method(), path = %request.uri().path(), %reason, "admin request refused");
            (code, reason).into_response()
        }
        None => next.run(request).await,
    }
}

/// Serves the admin API on `addr` in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    guard: Guard,
    status: Arc<RwLock<Status>>,
    reloads: mpsc::Sender<ReloadRequest>,
) -> anyhow::Result<SocketAddr> {
    guard.check_bind(addr).map_err(anyhow::Error::msg)?;
    let app = Router::new()
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .route("/reload", post(reload_handler))
        .route("/pipelines/{name}/shadow", get(shadow_handler))
        .route("/pipelines/{name}/shadow/start", post(start_handler))
        .route("/pipelines/{name}/shadow/stop", post(stop_handler))
        .route("/pipelines/{name}/shadow/{stage}/stop", post(stop_stage_handler))
        .route("/pipelines/{name}/shadow/promote", post(promote_handler))
        .route("/pipelines/{name}/shadow/{stage}/promote", post(promote_stage_handler))
        .route("/pipelines/{name}/record", post(record_handler))
        .with_state(AppState { status, reloads })
        .layer(axum::middleware::from_fn_with_state(Arc::new(guard), guarded));
    let bound = spawn(addr, app).await?;
    info!(addr = %bound, "admin listener ready (GET /status, /metrics, /health, /pipelines/NAME/shadow; POST /reload, /pipelines/NAME/shadow/promote, /pipelines/NAME/record)");
    Ok(bound)
}

/// Serves `GET /metrics` and `GET /health` alone on `addr` (for a
/// Prometheus scraper on another host); returns the bound address.
pub async fn serve_metrics(addr: SocketAddr, status: Arc<RwLock<Status>>) -> anyhow::Result<SocketAddr> {
    let (reloads, _) = mpsc::channel(1);
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(health_handler))
        .with_state(AppState { status, reloads });
    let bound = spawn(addr, app).await?;
    info!(addr = %bound, "metrics listener ready (GET /metrics, /health)");
    Ok(bound)
}

async fn spawn(addr: SocketAddr, app: Router) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "admin listener stopped");
        }
    });
    Ok(bound)
}

fn live_status(state: &AppState) -> Status {
    let mut status = state.status.read().map(|s| s.clone()).unwrap_or_default();
    for p in &mut status.pipelines {
        p.state = telemetry().state(&p.name);
        p.shadows = crate::shadow::reports(&p.name);
    }
    status
}

/// `value` as a JSON response, with every secret Sluice knows hidden (an
/// error quoted in a status may come from a library).
fn redacted_json(
    status: StatusCode,
    value: &impl Serialize,
) -> (StatusCode, [(axum::http::HeaderName, &'static str); 1], String) {
    let body = serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], crate::secrets::redact(&body))
}

async fn status_handler(State(state): State<AppState>) -> impl IntoResponse {
    redacted_json(StatusCode::OK, &live_status(&state))
}

async fn metrics_handler() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::secrets::redact(&telemetry().encode()),
    )
}

async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
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

async fn shadow_handler(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let known = state.status.read().is_ok_and(|s| s.pipelines.iter().any(|p| p.name == name));
    if !known {
        return (StatusCode::NOT_FOUND, format!("no pipeline {name:?} runs here\n")).into_response();
    }
    redacted_json(StatusCode::OK, &crate::shadow::reports(&name)).into_response()
}

/// What an admin action does to a pipeline's shadow.
enum ShadowAction {
    Start(String),
    Stop,
    Promote,
}

impl ShadowAction {
    fn verb(&self) -> &'static str {
        match self {
            ShadowAction::Start(_) => "start a shadow",
            ShadowAction::Stop => "stop the shadow",
            ShadowAction::Promote => "promote",
        }
    }

    /// Rewrites `file` for transform `stage` (0-based); returns the candidate.
    fn apply(&self, file: &std::path::Path, stage: usize) -> anyhow::Result<String> {
        match self {
            ShadowAction::Start(plugin) => crate::shadow::edit::start(file, stage, plugin),
            ShadowAction::Stop => crate::shadow::edit::stop(file, stage),
            ShadowAction::Promote => crate::shadow::edit::promote(file, stage),
        }
    }

    /// What was done to transform `stage` (1-based) of `pipeline`.
    fn done(&self, pipeline: &str, stage: usize, plugin: &str) -> String {
        match self {
            ShadowAction::Start(_) => format!("transform {stage} of {pipeline} now shadows {plugin}"),
            ShadowAction::Stop => format!("transform {stage} of {pipeline} no longer shadows {plugin}"),
            ShadowAction::Promote => format!("transform {stage} of {pipeline} now runs {plugin}"),
        }
    }
}

async fn promote_handler(State(state): State<AppState>, Path(name): Path<String>) -> (StatusCode, String) {
    shadow_action(state, name, None, ShadowAction::Promote).await
}

async fn promote_stage_handler(
    State(state): State<AppState>,
    Path((name, stage)): Path<(String, usize)>,
) -> (StatusCode, String) {
    shadow_action(state, name, Some(stage), ShadowAction::Promote).await
}

async fn stop_handler(State(state): State<AppState>, Path(name): Path<String>) -> (StatusCode, String) {
    shadow_action(state, name, None, ShadowAction::Stop).await
}

async fn stop_stage_handler(
    State(state): State<AppState>,
    Path((name, stage)): Path<(String, usize)>,
) -> (StatusCode, String) {
    shadow_action(state, name, Some(stage), ShadowAction::Stop).await
}

/// The body of `POST /pipelines/NAME/shadow/start`.
#[derive(serde::Deserialize)]
struct StartShadow {
    /// The candidate's path (absolute, or relative to the pipeline file).
    plugin: String,
    /// The transform (1-based); may be left out when there is one.
    stage: Option<usize>,
}

async fn start_handler(
    State(state): State<AppState>,
    Path(name): Path<String>,
    axum::Json(body): axum::Json<StartShadow>,
) -> (StatusCode, String) {
    shadow_action(state, name, body.stage, ShadowAction::Start(body.plugin)).await
}

/// Applies `action` to transform `stage` (1-based) of pipeline `name` by
/// rewriting its file ([`crate::shadow::edit`]), then reloads. Left out,
/// the stage is the one with a running shadow (stop, promote) or the only
/// transform (start).
async fn shadow_action(
    state: AppState,
    name: String,
    stage: Option<usize>,
    action: ShadowAction,
) -> (StatusCode, String) {
    let found = state
        .status
        .read()
        .ok()
        .and_then(|s| s.pipelines.iter().find(|p| p.name == name).map(|p| (p.file.clone(), p.plugins.len())));
    let Some((file, transforms)) = found else {
        return (StatusCode::NOT_FOUND, format!("no pipeline {name:?} runs here\n"));
    };
    let conflict = |why: String| (StatusCode::CONFLICT, format!("{why}\n"));
    let stage = if let ShadowAction::Start(_) = action {
        match stage.or((transforms == 1).then_some(1)) {
            Some(n) if (1..=transforms).contains(&n) => n,
            Some(n) => return conflict(format!("pipeline {name} has {transforms} transform(s), not {n}")),
            None => {
                return conflict(format!("pipeline {name} has {transforms} transforms: say which one with \"stage\""))
            }
        }
    } else {
        let reports = crate::shadow::reports(&name);
        let running: Vec<usize> = reports.iter().filter(|r| r.state.starts_with("running")).map(|r| r.stage).collect();
        match (stage, running.as_slice()) {
            (Some(n), _) if running.contains(&n) => n,
            (Some(n), _) => return conflict(format!("transform {n} of {name} has no running shadow")),
            (None, [n]) => *n,
            (None, []) => return conflict(format!("pipeline {name} has no running shadow")),
            (None, several) => {
                return conflict(format!(
                    "pipeline {name} has shadows on transforms {several:?}: say which one, in …/shadow/STAGE/…"
                ))
            }
        }
    };
    let path = std::path::PathBuf::from(&file);
    let verb = action.verb();
    // What the caller gives is checked before the file is touched.
    if let ShadowAction::Start(plugin) = &action {
        if let Err(why) = candidate_is_a_file(&path, plugin) {
            return (StatusCode::UNPROCESSABLE_ENTITY, format!("cannot {verb}: {why}\n"));
        }
    }
    let before = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot {verb}: cannot read {file}: {error}\n"))
        }
    };
    let edited = path.clone();
    let (action, plugin) = match tokio::task::spawn_blocking(move || {
        let result = action.apply(&edited, stage - 1);
        (action, result)
    })
    .await
    {
        Ok((action, Ok(plugin))) => (action, plugin),
        Ok((_, Err(error))) => {
            let error = crate::secrets::redact(&format!("{error:#}"));
            return (StatusCode::UNPROCESSABLE_ENTITY, format!("cannot {verb}: {error}\n"));
        }
        Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot {verb}: {error}\n")),
    };
    if let ShadowAction::Promote = action {
        crate::shadow::report::promoted(&name, stage);
    }
    let done = action.done(&name, stage, &plugin);
    info!(pipeline = %name, stage, %plugin, %file, action = verb, "shadow action by request: pipeline file rewritten, reloading");
    let (code, reload) = reload_handler(State(state.clone())).await;
    if code != StatusCode::OK {
        // The edit did not take: the file goes back to what it was, so
        // that a restart runs what runs now.
        if let Err(error) = crate::shadow::edit::restore(&path, &before) {
            warn!(pipeline = %name, %file, error = %format!("{error:#}"), "cannot put the pipeline file back after a failed shadow action");
        } else {
            let _ = reload_handler(State(state)).await;
        }
        return (code, format!("cannot {verb}: {file} is left as it was; {reload}"));
    }
    (code, format!("{done} ({file} rewritten); {reload}"))
}

/// Whether the candidate `plugin` (absolute, or relative to the pipeline
/// file `file`) names a regular file, with no control characters.
fn candidate_is_a_file(file: &std::path::Path, plugin: &str) -> Result<(), String> {
    if plugin.is_empty() || plugin.chars().any(char::is_control) {
        return Err("\"plugin\" must be a path without control characters".into());
    }
    let dir = file.parent().unwrap_or(std::path::Path::new("."));
    match std::fs::metadata(dir.join(plugin)) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(format!("plugin {plugin:?} is not a regular file")),
        Err(error) => Err(format!("plugin {plugin:?}: {error}")),
    }
}

/// The body of `POST /pipelines/NAME/record`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRecording {
    /// The transform (1-based); may be left out when there is one.
    stage: Option<usize>,
    /// Stop after this many input records.
    records: Option<u64>,
    /// Stop after this long.
    for_ms: Option<u64>,
    /// Stop after this many MiB of capture (default 64).
    max_mib: Option<u64>,
}

/// Starts a recording of a stage ([`crate::capture::recorder`]); the
/// capture is the answer's body, streamed.
async fn record_handler(
    State(state): State<AppState>,
    Path(name): Path<String>,
    axum::Json(body): axum::Json<StartRecording>,
) -> Response {
    let transforms =
        state.status.read().ok().and_then(|s| s.pipelines.iter().find(|p| p.name == name).map(|p| p.plugins.len()));
    let Some(transforms) = transforms else {
        return (StatusCode::NOT_FOUND, format!("no pipeline {name:?} runs here\n")).into_response();
    };
    let stage = match body.stage.or((transforms == 1).then_some(1)) {
        Some(n) if (1..=transforms).contains(&n) => n,
        Some(n) => {
            return (StatusCode::CONFLICT, format!("pipeline {name} has {transforms} transform(s), not {n}\n"))
                .into_response()
        }
        None => {
            return (
                StatusCode::CONFLICT,
                format!("pipeline {name} has {transforms} transforms: say which one with \"stage\"\n"),
            )
                .into_response()
        }
    };
    if body.records == Some(0) || body.for_ms == Some(0) || body.max_mib == Some(0) {
        return (StatusCode::UNPROCESSABLE_ENTITY, "records, for_ms and max_mib must be above 0\n".to_string())
            .into_response();
    }
    let bounds = crate::capture::recorder::Bounds {
        records: body.records,
        duration: body.for_ms.map(std::time::Duration::from_millis),
        max_bytes: body.max_mib.unwrap_or(64).saturating_mul(1 << 20),
    };
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(64);
    if let Err(error) = crate::capture::recorder::start(&name, stage - 1, bounds.clone(), tx) {
        let code = match error.is::<crate::capture::recorder::Busy>() {
            true => StatusCode::CONFLICT,
            false => StatusCode::INTERNAL_SERVER_ERROR,
        };
        return (code, format!("{error:#}\n")).into_response();
    }
    info!(pipeline = %name, stage, records = ?bounds.records, for_ms = ?body.for_ms, max_bytes = bounds.max_bytes, "recording requested: it starts at the stage's next batch");
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    ([(header::CONTENT_TYPE, "application/vnd.sluice.capture")], axum::body::Body::from_stream(stream)).into_response()
}

async fn reload_handler(State(state): State<AppState>) -> (StatusCode, String) {
    let (tx, rx) = oneshot::channel();
    match state.reloads.try_send(tx) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{RELOAD_QUEUE} reload requests are already waiting: try again\n"),
            )
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
        }
    }
    match rx.await {
        Ok(Ok(summary)) => (StatusCode::OK, format!("{summary}\n")),
        Ok(Err(reasons)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{}\n", crate::secrets::redact(&reasons))),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn host_origin_and_token_rules() {
        let open = Guard { hosts: vec!["sluice.internal".into()], token: None };
        let get = |g: &Guard, h: &[(&'static str, &str)]| g.refuse(&Method::GET, "/status", &headers(h)).map(|r| r.0);
        let post = |g: &Guard, h: &[(&'static str, &str)]| g.refuse(&Method::POST, "/reload", &headers(h)).map(|r| r.0);
        for host in ["127.0.0.1:8686", "localhost", "LOCALHOST:1", "[::1]:8686", "127.9.9.9", "sluice.internal:80"] {
            assert_eq!(get(&open, &[("host", host)]), None, "{host}");
        }
        for host in
            ["evil.example", "evil.example:8686", "127.0.0.1.evil.example", "localhost.evil.example:1", "10.0.0.1:8686"]
        {
            assert_eq!(get(&open, &[("host", host)]), Some(StatusCode::FORBIDDEN), "{host}");
        }
        assert_eq!(get(&open, &[]), Some(StatusCode::FORBIDDEN), "no Host");
        assert_eq!(
            post(&open, &[("host", "127.0.0.1:1"), ("origin", "http://evil.example")]),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            post(&open, &[("host", "127.0.0.1:1"), ("sec-fetch-site", "cross-site")]),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(post(&open, &[("host", "127.0.0.1:1"), ("origin", "http://127.0.0.1:1")]), None);
        assert_eq!(post(&open, &[("host", "127.0.0.1:1")]), None, "curl sends no Origin");
        // A GET with a foreign Origin only reads (the browser keeps the answer from the page).
        assert_eq!(get(&open, &[("host", "127.0.0.1:1"), ("origin", "http://evil.example")]), None);

        let locked = Guard { hosts: vec![], token: Some(crate::secrets::Secret::new("tok-123456".into())) };
        assert_eq!(post(&locked, &[("host", "localhost")]), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(
            post(&locked, &[("host", "localhost"), ("authorization", "Bearer nope")]),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(post(&locked, &[("host", "localhost"), ("authorization", "Bearer tok-123456")]), None);
        assert_eq!(get(&locked, &[("host", "localhost")]), Some(StatusCode::UNAUTHORIZED), "/status needs the token");
        assert_eq!(locked.refuse(&Method::GET, "/metrics", &headers(&[("host", "localhost")])), None);
        assert_eq!(locked.refuse(&Method::GET, "/health", &headers(&[("host", "localhost")])), None);
    }

    #[test]
    fn a_non_loopback_listener_needs_a_token() {
        let open = Guard::default();
        assert!(open.check_bind("127.0.0.1:8686".parse().unwrap()).is_ok());
        assert!(open.check_bind("[::1]:8686".parse().unwrap()).is_ok());
        let refused = open.check_bind("0.0.0.0:8686".parse().unwrap()).unwrap_err();
        assert!(refused.contains("--admin-token-file") && refused.contains("--metrics-addr"), "{refused}");
        let locked = Guard { hosts: vec![], token: Some(crate::secrets::Secret::new("tok-123456".into())) };
        assert!(locked.check_bind("0.0.0.0:8686".parse().unwrap()).is_ok());
    }
}
