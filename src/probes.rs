//! The probe and metrics server, on every replica: `/livez`, `/readyz`, `/metrics`.
//! Readiness never depends on leadership: a standby serves webhooks and must receive traffic.

use crate::telemetry::metrics::Metrics;
use crate::webhook::limits::{ConnectionCap, MAX_HEADERS};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Shared state of the probe server.
#[derive(Clone)]
pub(crate) struct Probes {
    /// Metrics to serve.
    pub(crate) metrics: Arc<Metrics>,
    /// True once the caches are synced and the process can do its work.
    pub(crate) ready: Arc<AtomicBool>,
    /// True while the webhook server has a certificate and answers a TLS handshake.
    pub(crate) webhooks_ready: Option<Arc<AtomicBool>>,
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
pub(crate) fn router(probes: Probes) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

/// Connections the probe server keeps open at once: the kubelet's probes and a scraper need a
/// few, each closed or reused within seconds.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Connections open at once from one remote address, so that one pod cannot take the places the
/// kubelet's probes need (they come from the node's address).
pub(crate) const MAX_CONNECTIONS_PER_SOURCE: usize = 8;

/// Time for a request's head, from the connection's start or from the previous answer.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the probes on `addr` until `stop` resolves.
///
/// The port is reachable by anything that reaches the pod, so it is bounded like the webhook
/// server (see [`crate::webhook::limits`]): at most [`MAX_CONNECTIONS`] connections,
/// [`MAX_CONNECTIONS_PER_SOURCE`] from one address, over the cap closed at once; a request head
/// must arrive within [`HEADER_TIMEOUT`]. Answers are built from memory without reading a body.
pub(crate) async fn serve(
    addr: SocketAddr,
    probes: Probes,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tracing::info!(%addr, "probe server listening");
    serve_on(listener, probes, stop).await
}

/// [`serve`] on a bound, non-blocking `listener`.
pub(crate) async fn serve_on(
    listener: std::net::TcpListener,
    probes: Probes,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopping = handle.clone();
    tokio::spawn(async move {
        stop.await;
        stopping.graceful_shutdown(Some(Duration::from_secs(1)));
    });
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(ConnectionCap::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE))
        .handle(handle)
        .first_request_timeout(HEADER_TIMEOUT)
        .accept_error_handler(|peer, e| tracing::debug!(?peer, error = %e, "probe connection refused"));
    server.http_builder().http1().header_read_timeout(HEADER_TIMEOUT).max_buf_size(2 * MAX_HEADERS);
    server.serve(router(probes).into_make_service()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_silent_connection_is_cut_off_and_probes_are_still_answered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let probes = Probes { metrics: Arc::default(), ready: Arc::new(AtomicBool::new(true)), webhooks_ready: None };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, probes, async move { drop(stopped.await) }));
        // Connections that send nothing, more than the cap.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS + crate::webhook::limits::LOOPBACK_RESERVE + 4 {
            if let Ok(c) = TcpStream::connect(addr).await {
                silent.push(c);
            }
        }
        // Each is closed: over the cap at once, the rest when no request head came in time.
        let started = std::time::Instant::now();
        for c in &mut silent {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(HEADER_TIMEOUT + Duration::from_secs(3), c.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0) | Err(_))), "a silent connection stayed open: {read:?}");
        }
        assert!(started.elapsed() < HEADER_TIMEOUT + Duration::from_secs(3));
        drop(silent);
        let ready = get(addr, "/readyz").await.expect("readyz");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        stop.send(()).ok();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops").expect("join").expect("serve");
    }
}
