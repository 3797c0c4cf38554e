//! The probe and metrics server, on every replica: `/livez`, `/readyz`, `/metrics`.
//! Readiness never depends on leadership: a standby serves webhooks and must receive traffic.

use crate::telemetry::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared state of the probe server.
#[derive(Clone)]
pub struct Probes {
    /// Metrics to serve.
    pub metrics: Arc<Metrics>,
    /// True once the caches are synced and the process can do its work.
    pub ready: Arc<AtomicBool>,
    /// True while the webhook server has a certificate and answers a TLS handshake.
    pub webhooks_ready: Option<Arc<AtomicBool>>,
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    let webhooks = p.webhooks_ready.as_ref().is_none_or(|w| w.load(Ordering::Relaxed));
    match (p.ready.load(Ordering::Relaxed), webhooks) {
        (true, true) => (StatusCode::OK, "ok"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "caches not synced (or shutting down)"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "webhook server not answering TLS"),
    }
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], p.metrics.encode())
}

/// The probe router.
pub fn router(probes: Probes) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

/// Serves the probes on `addr` until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    probes: Probes,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "probe server listening");
    axum::serve(listener, router(probes)).with_graceful_shutdown(stop).await
}
