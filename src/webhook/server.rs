//! The HTTPS server of the webhooks (axum over rustls with the ring provider), on every replica.

use super::Shared;
use super::review::{self, Kind};
use crate::telemetry::propagation::set_parent_from;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::tls_rustls::RustlsConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// Largest AdmissionReview body accepted; the API server's own limit on objects is far lower
/// for a MyApp, so anything bigger is refused with a well-formed denial.
pub const MAX_BODY: usize = 1024 * 1024;

async fn handle(shared: Arc<Shared>, kind: Kind, req: Request) -> Response {
    let started = Instant::now();
    let path = match kind {
        Kind::Mutate => "/mutate",
        Kind::Validate => "/validate",
    };
    let span = tracing::info_span!("admission", otel.name = %format!("webhook {path}"), otel.kind = "server", allowed = tracing::field::Empty);
    set_parent_from(&span, req.headers());
    async move {
        let review = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
            Ok(body) => {
                let tp = crate::telemetry::propagation::current_traceparent();
                review::answer_traced(&body, kind, &shared.policy, tp.as_deref())
            }
            Err(e) => review::malformed(format!("body unreadable or over {MAX_BODY} bytes: {e}")),
        };
        let allowed = review.response.as_ref().is_some_and(|r| r.allowed);
        tracing::Span::current().record("allowed", allowed);
        shared.metrics.webhook(path, allowed, started.elapsed().as_secs_f64());
        let connection =
            if shared.draining.load(std::sync::atomic::Ordering::Relaxed) { "close" } else { "keep-alive" };
        match serde_json::to_vec(&review) {
            Ok(json) => {
                ([(header::CONTENT_TYPE, "application/json"), (header::CONNECTION, connection)], json).into_response()
            }
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, Body::empty()).into_response(),
        }
    }
    .instrument(span)
    .await
}

/// The webhook router.
pub fn router(shared: Arc<Shared>) -> Router {
    let (m, v) = (shared.clone(), shared);
    Router::new()
        .route("/mutate", post(move |req: Request| handle(m.clone(), Kind::Mutate, req)))
        .route("/validate", post(move |req: Request| handle(v.clone(), Kind::Validate, req)))
}

/// Binds `addr` with SO_REUSEPORT, so that several replicas on one host (the local harness) share
/// the port and the kernel spreads connections among them.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    listener.into_std()
}

/// Serves until `handle` is told to shut down.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    shared: Arc<Shared>,
    handle: axum_server::Handle<SocketAddr>,
) -> std::io::Result<()> {
    axum_server::from_tcp_rustls(listener, tls)?.handle(handle).serve(router(shared).into_make_service()).await
}
