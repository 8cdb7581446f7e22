//! The operating surface (`[host] listen = "127.0.0.1:9464"`, off by
//! default): `/metrics` (Prometheus), `/healthz` (liveness and readiness),
//! and `/`, a read-only dashboard for a person on call.
//!
//! Served with `axum` (tokio's own HTTP stack, already beneath wasmtime's
//! HTTP support); the dashboard is rendered on the server with `maud`, whose
//! templates escape every value (job names, error messages) by construction.
//! Nothing here can change anything: every route is a `GET` that reads.

mod dashboard;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use sqlx::PgPool;

use crate::in_flight::InFlight;
use crate::jobset::Current;
use crate::metrics::Metrics;

/// What the routes read.
#[derive(Clone)]
pub struct Served {
    /// The host's pool (reads only).
    pub pool: PgPool,
    /// The run connections, for how many runs wait for one.
    pub runs: crate::pools::RunPools,
    /// The jobs as loaded now, and the host's settings.
    pub current: Current,
    /// The host's metrics.
    pub metrics: Arc<Metrics>,
    /// The host's runs in flight.
    pub in_flight: InFlight,
    /// This host's id.
    pub host_id: String,
}

/// Binds `addr` and serves until the task is aborted. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    served: Served,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`[host] listen`)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(served);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics and dashboard listener failed");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and the dashboard");
    Ok((bound, task))
}

/// `/metrics`: counters as they stand, and the gauges read now (stuck locks
/// are counted by the host's stuck-lock watch each heartbeat, not here).
async fn metrics(State(s): State<Served>) -> Response {
    let size = s.pool.size() as usize;
    let idle = s.pool.num_idle();
    s.metrics.set_scraped(crate::metrics::Scraped {
        in_flight: s.in_flight.len(),
        in_use: size.saturating_sub(idle),
        idle,
        waiting_for_connection: s.runs.waiting(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// `/healthz`: 200 when the database answers within 2 s and the host has its
/// jobs loaded (it only listens once they are), 503 with the reason
/// otherwise.
async fn healthz(State(s): State<Served>) -> Response {
    let ping = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::raw_sql("select 1").execute(&s.pool),
    )
    .await;
    let jobs = s.current.jobs().len();
    match ping {
        Ok(Ok(_)) => (
            StatusCode::OK,
            format!("ok: database reachable, {jobs} job(s) loaded\n"),
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: database error: {e}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the database did not answer within 2 s\n".to_owned(),
        )
            .into_response(),
    }
}

/// `/`: the dashboard.
async fn dashboard(State(s): State<Served>) -> Response {
    let config = s.current.config();
    let jobs = s.current.jobs();
    match dashboard::gather(&s.pool, &config, &jobs, &s.host_id).await {
        Ok(view) => Html(dashboard::render(&view).into_string()).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the database: {e:#}\n"),
        )
            .into_response(),
    }
}
