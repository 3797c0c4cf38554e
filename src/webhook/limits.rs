//! The bounds of the webhook server: every replica's webhook port is reachable by anything that
//! can reach the pod, so what one caller can make the process hold is limited here.
//!
//! # Guarantees
//!
//! - **Connections**: at most [`Limits::max_connections`] at once. A connection over the cap is
//!   closed as soon as it is accepted, before the TLS handshake, so a flood costs an `accept` and a
//!   `close`, not a handshake or a task that waits. A connection that does not finish its TLS
//!   handshake within [`Limits::tls_handshake_timeout`], or its first request within
//!   [`Limits::first_request_timeout`], is closed; so is an HTTP/2 peer that stops answering
//!   pings.
//! - **Requests**: at most [`Limits::max_in_flight`] handlers at once, counted from the moment
//!   hyper hands the request over until its answer is built. Over the cap a request gets
//!   `503 Service Unavailable` with `Retry-After: 1` at once. We answer fast instead of queueing:
//!   the API server waits at most `timeoutSeconds` (5 s) for us, and a queue would give every
//!   legitimate request the latency of the attackers ahead of it; a fast 503 keeps the failure
//!   visible and the `failurePolicy` of the webhook decides.
//! - **HTTP/2**: at most [`Limits::h2_max_streams`] concurrent streams per connection, and small
//!   flow-control windows, so a peer can push at most [`H2_CONNECTION_WINDOW`] bytes that nobody
//!   has read yet per connection.
//! - **Headers**: an HTTP/1 request whose headers do not arrive within
//!   [`Limits::header_read_timeout`] is cut off; header blocks are limited to [`MAX_HEADERS`].
//! - **Bodies**: a body must arrive whole within [`Limits::body_timeout`] of its headers (else
//!   `408`, and an HTTP/1 connection is closed), and be at most [`Limits::max_body`] bytes (else
//!   `413`, checked first against `Content-Length` without reading). The bytes buffered by all
//!   requests together are at most [`Limits::body_budget`]; a request that would go over it gets
//!   `503`. The budget is taken as bytes arrive, not as they are announced, so a client that
//!   trickles a body holds only what it sent.
//!
//! # Caveats
//!
//! - An HTTP/2 connection that has sent a request may stay open while idle (the API server keeps
//!   its connection that way); idle connections count against the connection cap, which is the
//!   bound on them.
//! - The limits bound memory and tasks, not bandwidth: a caller that sends fast and much can take
//!   a share of the CPU, which the in-flight cap and the body budget keep to a share.

use axum::body::Body;
use futures::StreamExt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most bytes etcd stores in one value: its default `--max-request-bytes` (1.5 MiB). An object
/// bigger than this, as the API server encodes it, can never be stored.
pub const ETCD_MAX_OBJECT: usize = 3 * 512 * 1024;

/// Room for everything in an AdmissionReview besides the objects: uid, kind, resource, name,
/// namespace, operation, `userInfo` (groups and extra can be long for OIDC users) and `options`.
/// A few KiB in practice; 256 KiB leaves room for large group lists.
pub const REVIEW_ENVELOPE: usize = 256 * 1024;

/// The largest AdmissionReview body accepted (3.25 MiB).
///
/// The schema does not bound a MyApp below what the API server accepts: `env` may hold 128
/// entries of a 253-character name and a 32768-character value, about 4.2 MB of ASCII alone (and
/// up to six times that as JSON escapes), more than the 3 MiB request body the API server reads.
/// What bounds a *legal* MyApp is storage: etcd refuses values over [`ETCD_MAX_OBJECT`], and the
/// API server stores a custom resource as the same JSON it sends us. So an UPDATE review of the
/// largest MyApp that can exist carries an `oldObject` of at most 1.5 MiB (it is stored) and an
/// `object` of at most 1.5 MiB (if it were bigger it could not be stored, so refusing its review
/// changes no outcome), plus the [`REVIEW_ENVELOPE`]. `tests::largest_legal_update_review_fits`
/// builds that review.
pub const MAX_BODY: usize = 2 * ETCD_MAX_OBJECT + REVIEW_ENVELOPE;

/// The HTTP/2 flow-control window of a stream: what a peer may send before we read it.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// The HTTP/2 flow-control window of a connection, shared by its streams.
pub const H2_CONNECTION_WINDOW: u32 = 512 * 1024;

/// The largest header block accepted, on either protocol.
pub const MAX_HEADERS: usize = 32 * 1024;

/// The bounds of the webhook server. [`Limits::default`] is what the operator runs with; tests
/// shorten the timeouts.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once. Each costs about 50 KiB (TLS and HTTP buffers), so the cap
    /// bounds them to a few tens of MiB; the API server needs a handful.
    pub max_connections: usize,
    /// Requests being handled at once, body reading included.
    pub max_in_flight: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Bytes of request bodies buffered at once by all requests together. With
    /// `max_connections`, the parsing of at most one body per runtime worker, and the operator's
    /// own caches, this keeps the process under its 128 MiB memory limit.
    pub body_budget: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub h2_max_streams: u32,
    /// Time for a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time from the end of the handshake to a first complete request head.
    pub first_request_timeout: Duration,
    /// Time for the head of an HTTP/1 request.
    pub header_read_timeout: Duration,
    /// Time from a request's head to the end of its body. The API server gives up on us after
    /// `timeoutSeconds` (5 s, at most 30 s), so longer is never useful.
    pub body_timeout: Duration,
    /// How often an HTTP/2 peer is pinged, so that dead peers do not hold connections.
    pub h2_keep_alive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_in_flight: 256,
            max_body: MAX_BODY,
            body_budget: 24 * 1024 * 1024,
            h2_max_streams: 32,
            tls_handshake_timeout: Duration::from_secs(5),
            first_request_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            h2_keep_alive: Duration::from_secs(30),
        }
    }
}

/// An acceptor (see `axum_server::accept::Accept`) that keeps at most `max_connections` open:
/// each accepted connection holds a permit until it closes; without one it is closed at once.
#[derive(Clone, Debug)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
}

impl ConnectionCap {
    /// A cap of `max` connections.
    pub fn new(max: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))) }
    }
}

impl<S> axum_server::accept::Accept<TcpStream, S> for ConnectionCap {
    type Stream = Counted;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Counted, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            // Dropping the stream closes it.
            return std::future::ready(Err(io::Error::other("connection cap reached")));
        };
        // Small answers must not wait for Nagle's algorithm and the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        std::future::ready(Ok((Counted { stream, _permit: permit }, service)))
    }
}

/// A connection that holds its place under the [`ConnectionCap`] until it is dropped.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Why a request body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Over [`Limits::max_body`]: 413.
    #[error("the body is over {0} bytes")]
    TooLarge(usize),
    /// Not complete within [`Limits::body_timeout`]: 408.
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    /// The [`Limits::body_budget`] is spent by other requests: 503.
    #[error("too many request bytes in flight")]
    Busy,
    /// The client broke off: 400.
    #[error("the body could not be read: {0}")]
    Read(String),
}

/// The in-flight cap and the body budget, shared by every request of the server.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// A request's place under the [`Gate`]'s in-flight cap, and the body bytes it holds.
#[derive(Debug)]
pub struct Ticket {
    _request: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
}

impl Gate {
    /// A gate for `limits`.
    pub fn new(limits: Limits) -> Self {
        let requests = Arc::new(Semaphore::new(limits.max_in_flight.min(Semaphore::MAX_PERMITS)));
        let bytes = Arc::new(Semaphore::new(limits.body_budget.min(Semaphore::MAX_PERMITS)));
        Self { limits, requests, bytes }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_in_flight.saturating_sub(self.requests.available_permits())
    }

    /// A place for one more request, or `None` at the cap.
    pub fn enter(&self) -> Option<Ticket> {
        let request = self.requests.clone().try_acquire_owned().ok()?;
        Some(Ticket { _request: request, bytes: None })
    }

    /// Reads `body` whole under the size, time and memory bounds. The bytes stay counted against
    /// the budget until `ticket` is dropped.
    pub async fn read_body(&self, body: Body, ticket: &mut Ticket) -> Result<Vec<u8>, BodyError> {
        let limit = self.limits.body_timeout;
        match tokio::time::timeout(limit, self.collect(body, ticket)).await {
            Ok(r) => r,
            Err(_) => Err(BodyError::Timeout(limit)),
        }
    }

    async fn collect(&self, body: Body, ticket: &mut Ticket) -> Result<Vec<u8>, BodyError> {
        let max = self.limits.max_body;
        let mut stream = body.into_data_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
            if buf.len() + chunk.len() > max {
                return Err(BodyError::TooLarge(max));
            }
            // Count what the buffer allocates, not only what it holds.
            let before = buf.capacity();
            buf.try_reserve(chunk.len()).map_err(|_| BodyError::Busy)?;
            let grown = buf.capacity() - before;
            if grown > 0 {
                let n = u32::try_from(grown).map_err(|_| BodyError::TooLarge(max))?;
                let permit = self.bytes.clone().try_acquire_many_owned(n).map_err(|_| BodyError::Busy)?;
                match &mut ticket.bytes {
                    Some(held) => held.merge(permit),
                    None => ticket.bytes = Some(permit),
                }
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::policy::Policy;
    use crate::webhook::review::{self, Endpoint};
    use serde_json::{Value, json};

    /// A MyApp as the API server sends it: metadata with managedFields and a last-applied
    /// annotation (a copy of the spec, as `kubectl apply` writes it), and as many env entries as
    /// fit in `size` bytes of JSON within the schema's limits (128 entries, 32768-character
    /// values).
    fn largest_myapp(size: usize, generation: i64) -> Value {
        let mut obj = json!({
            "apiVersion": "myapp.dev/v1", "kind": "MyApp",
            "metadata": {
                "name": "n".repeat(253), "namespace": "ns", "uid": "6f1c1f4e-4a51-4d2f-9d5a-0d6f1f0b7c11",
                "resourceVersion": "123456789", "generation": generation,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app.kubernetes.io/name": "web"},
                "annotations": {"myapp.dev/traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                "finalizers": ["myapp.dev/cleanup"],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "myapp.dev/v1",
                                   "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {"image": format!("registry.example/{}:1", "i".repeat(490)), "replicas": 1000, "port": 65535,
                     "resources": {"requests": {"cpu": "1".repeat(64), "memory": "1".repeat(64)},
                                   "limits": {"cpu": "1".repeat(64), "memory": "1".repeat(64)}},
                     "serviceType": "LoadBalancer", "env": []}
        });
        let len = |v: &Value| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        for i in 0..128 {
            let name = format!("E{i:0>252}");
            obj["spec"]["env"].as_array_mut().expect("env").push(json!({"name": name, "value": ""}));
            let room = size.saturating_sub(len(&obj)).min(32768);
            obj["spec"]["env"][i]["value"] = Value::String("v".repeat(room));
            if len(&obj) >= size - 64 {
                break;
            }
        }
        obj
    }

    #[test]
    fn largest_legal_update_review_fits() {
        let old = largest_myapp(ETCD_MAX_OBJECT, 1);
        let new = largest_myapp(ETCD_MAX_OBJECT, 2);
        for o in [&old, &new] {
            let n = serde_json::to_vec(o).expect("json").len();
            assert!(n <= ETCD_MAX_OBJECT && n > ETCD_MAX_OBJECT - 1024, "object of {n} bytes");
        }
        let groups: Vec<String> = (0..200).map(|i| format!("oidc:group-{i:04}-{}", "g".repeat(40))).collect();
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "myapp.dev", "version": "v1", "kind": "MyApp"},
                "resource": {"group": "myapp.dev", "version": "v1", "resource": "myapps"},
                "requestKind": {"group": "myapp.dev", "version": "v1", "kind": "MyApp"},
                "requestResource": {"group": "myapp.dev", "version": "v1", "resource": "myapps"},
                "name": "n".repeat(253), "namespace": "ns", "operation": "UPDATE",
                "userInfo": {"username": format!("oidc:{}", "u".repeat(200)), "uid": "u-1", "groups": groups},
                "object": new, "oldObject": old,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions", "fieldManager": "kubectl-client-side-apply"},
                "dryRun": false
            }
        }))
        .expect("json");
        assert!(body.len() <= MAX_BODY, "{} bytes > MAX_BODY {MAX_BODY}", body.len());
        assert!(body.len() > 2 * ETCD_MAX_OBJECT, "the review really carries two maximal objects");
        // And it is answered, not refused as malformed.
        for endpoint in [Endpoint::Validate, Endpoint::Mutate] {
            let out = serde_json::to_value(review::answer(&body, endpoint, &Policy::default())).expect("json");
            assert_eq!(out["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        }
    }
}
