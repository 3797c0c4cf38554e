//! The HTTPS server of the webhooks (axum over rustls with the ring provider), on every replica.
//!
//! # Guarantees
//!
//! - **Bounded**: connections, requests in flight, HTTP/2 streams, header and body read times,
//!   body sizes and the bytes buffered are capped as [`super::limits`] says.
//! - **Answers**: a body that is an AdmissionReview with a request uid gets `200` and an
//!   AdmissionReview carrying that uid, a denial when its object is bad or unreadable. Anything
//!   else gets an HTTP error, never a `200` with an empty uid: `400` for a body that is no
//!   AdmissionReview, `413` for one over [`super::limits::MAX_BODY`], `408` for one that does not
//!   arrive in time, `503` (with `Retry-After`) at the in-flight cap or the memory budget. No input
//!   makes a handler panic.
//! - **Traces**: the span of an admission is a new root, linked to the caller's `traceparent`
//!   (see [`crate::telemetry::propagation`]): a caller cannot force sampling or pick the parent.
//! - **Drain**: after [`begin_drain`], each connection that carries a request is closed gracefully
//!   once that request is answered: a GOAWAY on HTTP/2 (where hyper drops a `Connection: close`
//!   header), `Connection: close` on HTTP/1. The server still accepts new connections, so callers
//!   that have not yet seen this replica leave the endpoints are served. [`Server::shutdown`] then
//!   stops accepting (new connections are refused), sends GOAWAY on every connection, and waits
//!   for the requests in flight, within a bound.

use super::limits::{
    BodyError, ConnectionCap, H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, JsonShape, MAX_HEADERS, MAX_ITEMS, Ticket,
};
use super::review::{self, Endpoint, NotAReview};
use super::shared::Shared;
use crate::telemetry::propagation::{caller_link, current_traceparent};
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::ConnectionShutdown;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// An HTTP error answer. On HTTP/1, `close` ends the connection after it (the body may be
/// unread, and the client must not go on sending it).
fn refuse(status: StatusCode, why: impl std::fmt::Display, close: Option<&ConnectionShutdown>) -> Response {
    if let Some(c) = close {
        c.graceful_shutdown();
    }
    let mut r = (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{why}\n")).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

fn path_of(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Mutate => "/mutate",
        Endpoint::Validate => "/validate",
    }
}

/// [`answer`], counting an HTTP error answer in the metrics (an AdmissionReview, allowed or
/// denied, is counted by [`answer`] itself).
async fn handle(shared: Arc<Shared>, endpoint: Endpoint, req: Request) -> Response {
    let metrics = shared.metrics.clone();
    let response = answer(shared, endpoint, req).await;
    if !response.status().is_success() {
        metrics.webhook_error(path_of(endpoint), response.status().as_u16());
    }
    response
}

/// Admits the request under the gate's bounds, then [`judge`]s it in its admission span.
async fn answer(shared: Arc<Shared>, endpoint: Endpoint, req: Request) -> Response {
    let started = Instant::now();
    let path = path_of(endpoint);
    let connection = req.extensions().get::<ConnectionShutdown>().cloned();
    if shared.draining.load(Ordering::Relaxed)
        && let Some(c) = &connection
    {
        c.graceful_shutdown();
    }
    // What to close when a body is left unread: an HTTP/1 connection (an HTTP/2 stream is reset
    // on its own, and its connection carries other streams).
    let close = connection.as_ref().filter(|_| req.version() < Version::HTTP_2);
    let source = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let Some(ticket) = shared.gate.enter(source) else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many requests in flight", close);
    };
    let max = shared.gate.limits().max_body;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, BodyError::TooLarge(max), close);
    }
    let span = tracing::info_span!(parent: None, "admission", otel.name = %format!("webhook {path}"), otel.kind = "server", allowed = tracing::field::Empty);
    if let Some(caller) = caller_link(req.headers()) {
        span.add_link(caller);
    }
    judge(&shared, endpoint, req.into_body(), ticket, close, started).instrument(span).await
}

/// Reads `body` under `ticket`, and answers it: the review judged, or refused before any parse
/// its cost does not fit. Runs in the admission span.
async fn judge(
    shared: &Shared,
    endpoint: Endpoint,
    body: Body,
    mut ticket: Ticket,
    close: Option<&ConnectionShutdown>,
    started: Instant,
) -> Response {
    let path = path_of(endpoint);
    let body = match shared.gate.read_body(body, &mut ticket).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
                BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                BodyError::Read(_) => StatusCode::BAD_REQUEST,
            };
            return refuse(status, e, close);
        }
    };
    // What parsing will cost is taken from the budget before parsing starts.
    let shape = JsonShape::of(&body);
    let answered = if shape.items > MAX_ITEMS {
        let why = format!(
            "the review holds {} JSON values and keys, more than the {MAX_ITEMS} this webhook reads: \
             the object's metadata (labels, annotations, managedFields) is too large",
            shape.items
        );
        match review::refuse_unparsed(&body, &why, 413) {
            Ok(r) => Ok(r),
            Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, why, None),
        }
    } else if let Err(e) = shared.gate.take(&mut ticket, shape.parse_cost()) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, e, None);
    } else {
        review::answer_in(&body, endpoint, &shared.policy, current_traceparent().as_deref(), &shared.scope)
    };
    let review = match answered {
        Ok(r) => r,
        Err(NotAReview(e)) => return refuse(StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {e}"), None),
    };
    drop(body);
    drop(ticket);
    let allowed = review.response.as_ref().is_some_and(|r| r.allowed);
    tracing::Span::current().record("allowed", allowed);
    shared.metrics.webhook(path, allowed, started.elapsed().as_secs_f64());
    match serde_json::to_vec(&review) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, Body::empty()).into_response(),
    }
}

/// The webhook router.
pub fn router(shared: Arc<Shared>) -> Router {
    let (m, v) = (shared.clone(), shared);
    Router::new()
        .route("/mutate", post(move |req: Request| handle(m.clone(), Endpoint::Mutate, req)))
        .route("/validate", post(move |req: Request| handle(v.clone(), Endpoint::Validate, req)))
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

/// Serves until `handle` is told to shut down, within the bounds of `shared`'s limits.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    shared: Arc<Shared>,
    handle: axum_server::Handle<SocketAddr>,
) -> std::io::Result<()> {
    let limits = shared.gate.limits().clone();
    let acceptor =
        RustlsAcceptor::new(tls).handshake_timeout(limits.tls_handshake_timeout).acceptor(ConnectionCap::of(&limits));
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .handle(handle)
        .first_request_timeout(limits.first_request_timeout)
        .accept_error_handler(|peer, e| tracing::debug!(?peer, error = %e, "webhook connection refused"));
    let builder = server.http_builder();
    builder.http1().header_read_timeout(limits.header_read_timeout).max_buf_size(2 * MAX_HEADERS);
    builder
        .http2()
        .max_concurrent_streams(limits.h2_max_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADERS as u32)
        .keep_alive_interval(limits.h2_keep_alive)
        .keep_alive_timeout(limits.h2_keep_alive);
    server.serve(router(shared).into_make_service_with_connect_info::<SocketAddr>()).await
}

/// From now on, close each connection after the request it carries (see the module doc).
pub fn begin_drain(shared: &Shared) {
    shared.draining.store(true, Ordering::Relaxed);
}

/// A webhook server running in its own task.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The server did not stop within its bound; its connections were cut.
#[derive(Debug, thiserror::Error)]
#[error("the webhook server did not drain within {0:?}")]
pub struct DrainTimeout(pub Duration);

impl Server {
    /// Serves `listener` (non-blocking) in a new task.
    pub fn spawn(listener: std::net::TcpListener, tls: RustlsConfig, shared: Arc<Shared>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let handle = axum_server::Handle::new();
        let serving = serve(listener, tls, shared, handle.clone());
        let task = tokio::spawn(async move {
            let result = serving.await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "webhook server stopped");
            }
            result
        });
        Ok(Self { addr, handle, task })
    }

    /// Stops accepting (new connections are refused), sends GOAWAY on HTTP/2 connections and
    /// closes HTTP/1 ones after their current request, and waits for the requests in flight for
    /// up to `grace`; then cuts what is left. Returns once the server has stopped, at most about
    /// `grace` plus a second later.
    pub async fn shutdown(self, grace: Duration) -> Result<(), DrainTimeout> {
        self.handle.graceful_shutdown(Some(grace));
        let bound = grace + Duration::from_secs(1);
        let mut task = self.task;
        match tokio::time::timeout(bound, &mut task).await {
            // An error of the server itself was logged by its task.
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "webhook server task");
                Ok(())
            }
            Err(_) => {
                self.handle.shutdown();
                task.abort();
                Err(DrainTimeout(bound))
            }
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
