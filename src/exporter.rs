//! The agent's HTTP surface: `/metrics`, `/healthz`, `/readyz`, `/v1/events`
//! (and `/v1/exec`, merged in by the agent role when enabled).
//!
//! Handlers never read the host themselves: `/metrics` runs the collector
//! [`Runner`], whose deadlines bound the scrape: on the blocking pool when a
//! collector may block (NVML) or wait seconds (statvfs of a network or FUSE
//! mount), else on the async worker itself (host collectors on
//! local filesystems: /proc and /sys reads, and statvfs calls still bounded
//! by `storage.statvfs_deadline`).
//! Responses are gzip-compressed when the client asks (`Accept-Encoding:
//! gzip`, as Prometheus always does), at gzip's fastest level: the 8-GPU
//! training exposition goes from 210 KB to 14 KB for about 0.3 ms of CPU
//! (the default level gives 11 KB for about 1 ms; see benches/gpu_scrape.rs).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::collector::{self, KernelEvents, Runner};
use crate::telemetry::{self, HttpMetrics};

/// Everything the agent's handlers share.
pub struct AgentState {
    pub runner: Arc<Runner>,
    pub events: Arc<KernelEvents>,
    pub http: Arc<HttpMetrics>,
}

impl AgentState {
    /// One full exposition: collectors, then self-metrics.
    pub fn scrape_blocking(&self) -> String {
        let collected = self.runner.collect();
        render_with_self_metrics(&self.runner, &collected, Some(&self.http))
    }
}

/// Renders collected families plus `gpuops_build_info`, process and (for a
/// server) HTTP metrics.
pub fn render_with_self_metrics(
    runner: &Runner,
    collected: &[collector::Collected],
    http: Option<&HttpMetrics>,
) -> String {
    let backend = runner
        .context()
        .gpu_backend
        .get()
        .copied()
        .unwrap_or("none");
    let mut own = telemetry::build_info("agent", backend);
    telemetry::process_text(&mut own);
    let http = http.map(|h| h.gather()).unwrap_or_default();
    collector::render(collected, &own, &http)
}

/// The agent's router (without `/v1/exec`).
pub fn router(state: Arc<AgentState>) -> Router {
    let http = state.http.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/events", get(events))
        .route("/", get(index))
        .with_state(state)
        .layer(
            tower_http::compression::CompressionLayer::new()
                .gzip(true)
                .quality(tower_http::CompressionLevel::Fastest),
        )
        .layer(axum::middleware::from_fn_with_state(
            http,
            telemetry::track_http,
        ))
}

async fn metrics(State(state): State<Arc<AgentState>>) -> Response {
    // Host collectors read /proc and /sys text in a few hundred microseconds
    // all told: served on this thread, without the two thread hand-offs of
    // the blocking pool (most of a scrape's time). With a collector that may
    // block (NVML) or wait on a server, the scrape runs on the blocking pool.
    let scraped = if state.runner.may_block() {
        let s = state.clone();
        tokio::task::spawn_blocking(move || s.scrape_blocking()).await
    } else {
        Ok(state.scrape_blocking())
    };
    match scraped {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "scrape task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AgentState>>) -> Response {
    if state.runner.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first collection has not finished\n",
        )
            .into_response()
    }
}

async fn index() -> &'static str {
    "gpuops agent\n/metrics  Prometheus metrics\n/healthz  liveness\n/readyz   readiness\n/v1/events?since=SECONDS  recent kernel events (JSON)\n"
}

#[derive(Deserialize)]
struct EventsQuery {
    since: Option<String>,
}

/// `since` is a number of seconds back from now (default 3600); a value
/// above 10^9 is read as a Unix timestamp.
async fn events(State(state): State<Arc<AgentState>>, Query(q): Query<EventsQuery>) -> Response {
    let since =
        match q.since.as_deref().map(str::parse::<f64>) {
            None => 3600.0,
            Some(Ok(v)) if v.is_finite() && v >= 0.0 => v,
            Some(_) => return (
                StatusCode::BAD_REQUEST,
                Json(
                    serde_json::json!({"error": "since must be a non-negative number of seconds"}),
                ),
            )
                .into_response(),
        };
    let cutoff = if since > 1e9 {
        since
    } else {
        collector::kmsg::unix_now() - since
    };
    let events = state.events.since(cutoff);
    Json(serde_json::json!({ "since": cutoff, "events": events })).into_response()
}
