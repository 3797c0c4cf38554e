//! The bounds of the webhook server: every replica's webhook port is reachable by anything that
//! can reach the pod, so what one caller can make the process hold is limited here.
//!
//! # Guarantees
//!
//! - **Connections**: at most [`Limits::max_connections`] at once, and at most
//!   [`Limits::max_connections_per_source`] from one remote address. A connection over a cap is
//!   closed as soon as it is accepted, before the TLS handshake, so a flood costs an `accept` and
//!   a `close`, not a handshake or a task that waits. Connections from the pod's own loopback (the
//!   readiness self-check) have [`LOOPBACK_RESERVE`] places beyond the cap, so a flood from
//!   elsewhere never makes the replica unready. A connection that does not finish its TLS
//!   handshake within [`Limits::tls_handshake_timeout`], or its first request within
//!   [`Limits::first_request_timeout`], is closed; so is an HTTP/2 peer that stops answering
//!   pings.
//! - **Requests**: at most [`Limits::max_in_flight`] handlers at once, half of them from one remote
//!   address, counted from the moment hyper hands the request over until its answer is built.
//!   Over the cap a request gets `503 Service Unavailable` with `Retry-After: 1` at once. We answer
//!   fast instead of queueing: the API server waits at most `timeoutSeconds` (5 s) for us, and a
//!   queue would give every legitimate request the latency of the attackers ahead of it; a fast
//!   503 keeps the failure visible and the `failurePolicy` of the webhook decides.
//! - **HTTP/2**: at most [`Limits::h2_max_streams`] concurrent streams per connection, and small
//!   flow-control windows, so a peer can push at most [`H2_CONNECTION_WINDOW`] bytes that nobody
//!   has read yet per connection.
//! - **Headers**: an HTTP/1 request whose headers do not arrive within
//!   [`Limits::header_read_timeout`] is cut off; header blocks are limited to [`MAX_HEADERS`].
//! - **Bodies**: a body must arrive whole within [`Limits::body_timeout`] of its headers (else
//!   `408`, and an HTTP/1 connection is closed), and be at most [`Limits::max_body`] bytes (else
//!   `413`, checked first against `Content-Length` without reading).
//! - **Memory, parse included**: what a request holds is counted against
//!   [`Limits::memory_budget`], half of it at most for one remote address: its body's bytes as
//!   they arrive (so a client that trickles a body holds only what it sent), then, before the body
//!   is parsed, what parsing it will cost, read off the text in one pass that allocates nothing
//!   ([`JsonShape`]). A review with more than [`MAX_ITEMS`] values and keys is denied unparsed;
//!   so one admission holds at most [`MAX_REQUEST_COST`]. A request that would go over the budget
//!   gets `503`. [`MEMORY_BUDGET`] shows how the pod's memory limit adds up.
//!
//! # Caveats
//!
//! - An HTTP/2 connection that has sent a request may stay open while idle (the API server keeps
//!   its connection that way); idle connections count against the connection cap, which is the
//!   bound on them.
//! - The limits bound memory and tasks, not bandwidth: a caller that sends fast and much can take
//!   a share of the CPU, which the in-flight cap and the memory budget keep to a share.

use axum::body::Body;
use futures::StreamExt;
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
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
    /// Connections open at once. Each costs about 50 KiB (TLS and HTTP buffers); the API server
    /// needs a handful.
    pub max_connections: usize,
    /// Connections open at once from one remote address. The API server needs a handful (HTTP/2,
    /// [`Limits::h2_max_streams`] requests per connection); one pod cannot take every place.
    pub max_connections_per_source: usize,
    /// Requests being handled at once, body reading included. One remote address may hold half.
    pub max_in_flight: usize,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Heap that all requests together may hold at once: the bytes of their bodies as they
    /// arrive, then each body's [`JsonShape::parse_cost`] before it is parsed. One remote address
    /// may hold half. See [`MEMORY_BUDGET`] for the arithmetic.
    pub memory_budget: usize,
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
            max_connections: 512,
            max_connections_per_source: 64,
            max_in_flight: 256,
            max_body: MAX_BODY,
            memory_budget: MEMORY_BUDGET,
            h2_max_streams: 32,
            tls_handshake_timeout: Duration::from_secs(5),
            first_request_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            h2_keep_alive: Duration::from_secs(30),
        }
    }
}

/// Connections from this pod's own loopback (the readiness self-check) that are accepted beyond
/// [`Limits::max_connections`]: nothing outside the pod can send from its loopback, so a flood can
/// never take the slot the self-check needs.
pub const LOOPBACK_RESERVE: usize = 8;

/// An acceptor (see `axum_server::accept::Accept`) that keeps at most `max_connections` open, at
/// most `max_connections_per_source` of them from one address: each accepted connection holds its
/// place until it closes; without one it is closed at once.
///
/// Loopback connections count against no source's cap and may use [`LOOPBACK_RESERVE`] places
/// beyond the shared cap, so that this pod's own self-check is never refused for a flood from
/// elsewhere.
#[derive(Clone, Debug)]
pub struct ConnectionCap(Arc<Places>);

#[derive(Debug)]
struct Places {
    shared: Arc<Semaphore>,
    loopback: Arc<Semaphore>,
    per_source: usize,
    /// Connections open per remote address; an address leaves the map with its last connection,
    /// so it holds at most `max_connections` entries.
    by_source: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

/// `map` locked. Every change to such a map is one step on one entry, so it is consistent after
/// a panic elsewhere.
fn lock<T>(map: &std::sync::Mutex<HashMap<IpAddr, T>>) -> std::sync::MutexGuard<'_, HashMap<IpAddr, T>> {
    map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Places {
    /// A place for a connection from `source`, if one is free.
    fn take(self: &Arc<Self>, source: Option<IpAddr>) -> Option<Place> {
        match source {
            Some(ip) if !ip.is_loopback() => {
                let mut open = lock(&self.by_source);
                if open.get(&ip).is_some_and(|n| *n >= self.per_source) {
                    return None;
                }
                let permit = self.shared.clone().try_acquire_owned().ok()?;
                *open.entry(ip).or_insert(0) += 1;
                Some(Place { _permit: permit, source: Some(ip), places: self.clone() })
            }
            // Loopback, or a peer whose address the socket no longer knows.
            _ => {
                let mut permit = self.shared.clone().try_acquire_owned().ok();
                if permit.is_none() && source.is_some() {
                    permit = self.loopback.clone().try_acquire_owned().ok();
                }
                Some(Place { _permit: permit?, source: None, places: self.clone() })
            }
        }
    }
}

/// A connection's place under the [`ConnectionCap`], given back when it is dropped.
#[derive(Debug)]
struct Place {
    _permit: OwnedSemaphorePermit,
    source: Option<IpAddr>,
    places: Arc<Places>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(ip) = self.source {
            let mut open = lock(&self.places.by_source);
            if let Some(n) = open.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

impl ConnectionCap {
    /// A cap of `max` connections, `per_source` of them from one remote address.
    pub fn new(max: usize, per_source: usize) -> Self {
        Self(Arc::new(Places {
            shared: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            loopback: Arc::new(Semaphore::new(LOOPBACK_RESERVE)),
            per_source,
            by_source: std::sync::Mutex::default(),
        }))
    }

    /// The cap of `limits`.
    pub fn of(limits: &Limits) -> Self {
        Self::new(limits.max_connections, limits.max_connections_per_source)
    }

    /// Connections open from `ip` now (loopback ones are not counted by source).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        lock(&self.0.by_source).get(&ip).copied().unwrap_or(0)
    }
}

impl<S> axum_server::accept::Accept<TcpStream, S> for ConnectionCap {
    type Stream = Counted;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Counted, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let source = stream.peer_addr().ok().map(|a| a.ip().to_canonical());
        let Some(place) = self.0.take(source) else {
            // Dropping the stream closes it.
            return std::future::ready(Err(io::Error::other("connection cap reached")));
        };
        // Small answers must not wait for Nagle's algorithm and the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        std::future::ready(Ok((Counted { stream, _place: place }, service)))
    }
}

/// A connection that holds its place under the [`ConnectionCap`] until it is dropped.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    _place: Place,
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
    /// The [`Limits::memory_budget`] is spent, or the caller's half of it: 503.
    #[error("too much request memory in use")]
    Busy,
    /// The client broke off: 400.
    #[error("the body could not be read: {0}")]
    Read(String),
}

/// What one remote address holds under the [`Gate`].
#[derive(Debug, Default)]
struct Share {
    requests: usize,
    bytes: usize,
}

/// The in-flight cap and the memory budget, shared by every request of the server, each with a
/// half share per remote address.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    requests: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    /// What each remote address holds; an address leaves the map with its last request.
    shares: Arc<std::sync::Mutex<HashMap<IpAddr, Share>>>,
}

/// A request's place under the [`Gate`]'s in-flight cap, and the memory it holds, given back when
/// it is dropped.
#[derive(Debug)]
pub struct Ticket {
    _request: OwnedSemaphorePermit,
    memory: Option<OwnedSemaphorePermit>,
    /// The remote address whose share it counts against (none for loopback).
    source: Option<IpAddr>,
    bytes: usize,
    shares: Arc<std::sync::Mutex<HashMap<IpAddr, Share>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(ip) = self.source {
            let mut shares = lock(&self.shares);
            if let Some(s) = shares.get_mut(&ip) {
                s.requests = s.requests.saturating_sub(1);
                s.bytes = s.bytes.saturating_sub(self.bytes);
                if s.requests == 0 {
                    shares.remove(&ip);
                }
            }
        }
    }
}

impl Gate {
    /// A gate for `limits`.
    pub fn new(limits: Limits) -> Self {
        let requests = Arc::new(Semaphore::new(limits.max_in_flight.min(Semaphore::MAX_PERMITS)));
        let memory = Arc::new(Semaphore::new(limits.memory_budget.min(Semaphore::MAX_PERMITS)));
        Self { limits, requests, memory, shares: Arc::default() }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_in_flight.saturating_sub(self.requests.available_permits())
    }

    /// Bytes of the memory budget held now.
    pub fn memory_held(&self) -> usize {
        self.limits.memory_budget.saturating_sub(self.memory.available_permits())
    }

    /// A place for one more request from `source`, or `None` at the cap or at the source's half
    /// of it. Loopback callers (this pod) have no share of their own.
    pub fn enter(&self, source: Option<IpAddr>) -> Option<Ticket> {
        let source = source.map(|ip| ip.to_canonical()).filter(|ip| !ip.is_loopback());
        let half = self.limits.max_in_flight.div_ceil(2);
        let mut shares = lock(&self.shares);
        if let Some(ip) = source
            && shares.get(&ip).is_some_and(|s| s.requests >= half)
        {
            return None;
        }
        let request = self.requests.clone().try_acquire_owned().ok()?;
        if let Some(ip) = source {
            shares.entry(ip).or_default().requests += 1;
        }
        drop(shares);
        Some(Ticket { _request: request, memory: None, source, bytes: 0, shares: self.shares.clone() })
    }

    /// Takes `n` more bytes of the memory budget for `ticket`, held until it is dropped; `Busy` if
    /// the budget, or the ticket's source's half of it, is spent.
    pub fn take(&self, ticket: &mut Ticket, n: usize) -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let count = u32::try_from(n).map_err(|_| BodyError::Busy)?;
        let mut shares = ticket.source.map(|_| lock(&self.shares));
        if let (Some(shares), Some(ip)) = (shares.as_mut(), ticket.source)
            && shares.get(&ip).is_some_and(|s| s.bytes.saturating_add(n) > self.limits.memory_budget / 2)
        {
            return Err(BodyError::Busy);
        }
        let permit = self.memory.clone().try_acquire_many_owned(count).map_err(|_| BodyError::Busy)?;
        if let (Some(shares), Some(ip)) = (shares.as_mut(), ticket.source)
            && let Some(s) = shares.get_mut(&ip)
        {
            s.bytes += n;
        }
        ticket.bytes += n;
        match &mut ticket.memory {
            Some(held) => held.merge(permit),
            None => ticket.memory = Some(permit),
        }
        Ok(())
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
            self.take(ticket, buf.capacity() - before)?;
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    }
}

/// What parsing a JSON text will cost, read off the text in one pass that allocates nothing.
///
/// Parsing costs far more than the text: a `0` in an array is two bytes of text and a
/// `serde_json::Value` of 32 bytes (plus its share of the array's spare capacity, and the copies
/// that decoding an AdmissionReview makes), a one-character key in an object costs a `String`
/// and a map entry. What a body costs to parse therefore depends on how many values and keys it
/// has, not only on its length. [`JsonShape::items`] bounds that count from above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JsonShape {
    /// The text's length in bytes.
    pub bytes: usize,
    /// An upper bound on the values and keys the text holds: every value or key but the
    /// outermost value follows a `{`, `[`, `,` or `:` outside a string, so it is one more than
    /// those counted.
    pub items: usize,
    /// The deepest nesting of arrays and objects.
    pub depth: usize,
}

impl JsonShape {
    /// The shape of `text`. Malformed JSON gets a shape too; parsing it then fails early, at no
    /// more cost than this shape allows.
    pub fn of(text: &[u8]) -> Self {
        let (mut items, mut depth, mut deepest) = (1usize, 0usize, 0usize);
        let (mut in_string, mut escaped) = (false, false);
        for &b in text {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    items += 1;
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                b',' | b':' => items += 1,
                _ => {}
            }
        }
        Self { bytes: text.len(), items, depth: deepest }
    }

    /// The most heap that answering a review of this shape can hold at once, the body itself
    /// aside: [`PARSE_BYTES_PER_BYTE`] per byte and [`PARSE_BYTES_PER_ITEM`] per item (see
    /// `tests/admission_cost.rs`, which measures both against the worst shapes).
    pub fn parse_cost(&self) -> usize {
        self.bytes.saturating_mul(PARSE_BYTES_PER_BYTE).saturating_add(self.items.saturating_mul(PARSE_BYTES_PER_ITEM))
    }
}

/// Heap per byte of text that answering a review holds at most, beyond the body itself (its
/// strings are copied while the review is decoded and its object read as a MyApp): measured with
/// long strings, the shape with the fewest items per byte (`tests/admission_cost.rs`).
pub const PARSE_BYTES_PER_BYTE: usize = 3;

/// Heap per value or key that answering a review holds at most, beyond
/// [`PARSE_BYTES_PER_BYTE`]: measured with the shapes with the most items per byte (long arrays
/// of small values, many small keys, empty objects, deep nesting; `tests/admission_cost.rs`).
pub const PARSE_BYTES_PER_ITEM: usize = 320;

/// The most values and keys ([`JsonShape::items`]) a review may hold; one with more is denied
/// unparsed.
///
/// The largest legal MyApp holds far fewer: its spec at most about 700 (128 env entries of 3 to
/// 5 each, the resources, the scalars), its `managedFields` about 6 per env entry per manager,
/// its labels and annotations one per key and value. An UPDATE review carries two objects, so
/// 20,000 leaves room for about 9,000 items of metadata per object. What it refuses is text that
/// costs much more to parse than it says: 3.25 MiB of `[0,0,0,...]` holds 1.7 million items.
pub const MAX_ITEMS: usize = 20_000;

/// The most heap one admission holds at once: its body of at most [`MAX_BODY`] bytes and the
/// parse of at most [`MAX_ITEMS`] items, `3.25 + 3 × 3.25 + 20,000 × 320 B` = about 19.1 MiB.
pub const MAX_REQUEST_COST: usize = MAX_BODY + MAX_BODY * PARSE_BYTES_PER_BYTE + MAX_ITEMS * PARSE_BYTES_PER_ITEM;

/// The default [`Limits::memory_budget`]: 40 MiB, two admissions of the worst shape at once, or
/// hundreds of ordinary ones (a typical review of a few KiB costs well under 100 KiB).
///
/// How the 128 MiB limit of `deploy/` adds up under abuse:
///
/// | what | bound |
/// |---|---|
/// | requests: this budget | 40 MiB |
/// | connections: 512 × about 50 KiB (TLS and HTTP buffers, measured with the abuse bench) | 25 MiB |
/// | the probe server: 64 connections, small answers | under 4 MiB |
/// | the process idle (musl) | 10 MiB |
/// | total beside the caches | about 79 MiB |
///
/// which leaves about 49 MiB for the caches: about 10,000 MyApps of the typical size settled on a
/// standby (41 MiB). One remote address holds at most half the budget, so that the API server
/// always has 20 MiB to send reviews in while one pod floods.
pub const MEMORY_BUDGET: usize = 40 * 1024 * 1024;

// Two worst-case admissions fit the budget at once.
const _: () = assert!(2 * MAX_REQUEST_COST <= MEMORY_BUDGET);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::policy::Policy;
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

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn one_address_cannot_take_every_connection_and_loopback_keeps_a_reserve() {
        let cap = ConnectionCap::new(4, 2);
        let a: Vec<Place> = (0..2).filter_map(|_| cap.0.take(ip("10.0.0.1"))).collect();
        assert_eq!(a.len(), 2);
        assert!(cap.0.take(ip("10.0.0.1")).is_none(), "a third from one address is refused");
        assert_eq!(cap.open_from("10.0.0.1".parse().expect("ip")), 2, "a refused one is not counted");
        let b: Vec<Place> = (0..2).filter_map(|_| cap.0.take(ip("10.0.0.2"))).collect();
        assert_eq!(b.len(), 2, "another address still gets its places");
        assert!(cap.0.take(ip("10.0.0.3")).is_none(), "the shared cap is reached");
        assert_eq!(cap.open_from("10.0.0.3".parse().expect("ip")), 0);
        // The pod's own loopback is served beyond the cap, up to the reserve.
        let own: Vec<Place> = (0..LOOPBACK_RESERVE + 1).filter_map(|_| cap.0.take(ip("127.0.0.1"))).collect();
        assert_eq!(own.len(), LOOPBACK_RESERVE);
        assert!(cap.0.take(ip("::ffff:127.0.0.1").map(|i| i.to_canonical())).is_none());
        // A closed connection gives its place back, and its address's count.
        drop(a);
        assert_eq!(cap.open_from("10.0.0.1".parse().expect("ip")), 0);
        assert!(cap.0.take(ip("10.0.0.3")).is_some());
    }

    #[test]
    fn one_address_holds_at_most_half_of_the_requests_and_the_memory() {
        let gate = Gate::new(Limits { max_in_flight: 4, memory_budget: 1000, ..Limits::default() });
        let mut held: Vec<Ticket> = (0..3).filter_map(|_| gate.enter(ip("10.0.0.1"))).collect();
        assert_eq!(held.len(), 2, "half of the in-flight cap");
        let mut other = gate.enter(ip("10.0.0.2")).expect("another address enters");
        assert!(gate.take(&mut held[0], 400).is_ok());
        assert!(matches!(gate.take(&mut held[1], 200), Err(BodyError::Busy)), "over half the budget");
        assert!(gate.take(&mut other, 500).is_ok(), "the other address still has its half");
        assert_eq!(gate.memory_held(), 900);
        let mut own = gate.enter(ip("127.0.0.1")).expect("loopback has no share of its own");
        assert!(matches!(gate.take(&mut own, 200), Err(BodyError::Busy)), "but the budget binds it");
        assert!(gate.take(&mut own, 100).is_ok());
        drop(held);
        assert_eq!(gate.memory_held(), 600);
        let mut again = gate.enter(ip("10.0.0.1")).expect("places given back");
        assert!(gate.take(&mut again, 400).is_ok(), "and the address's memory");
    }

    #[test]
    fn the_shape_counts_values_and_keys_outside_strings() {
        let s = JsonShape::of(br#"{"a":[1,2,{"b":"x,y:[{"}],"c\"":"\\"}"#);
        // The outer object, "a", the array, 1, 2, the inner object, "b", "x,y:[{", "c\"", "\\":
        // every comma, colon and opening bracket outside a string, plus one.
        assert_eq!(s.items, 10);
        assert_eq!(s.depth, 3);
        assert_eq!(JsonShape::of(b"0").items, 1);
        assert_eq!(JsonShape::of(b"[[[[]]]]").depth, 4);
    }

    #[test]
    fn the_largest_legal_review_is_within_the_item_cap_and_the_request_cost() {
        let old = largest_myapp(ETCD_MAX_OBJECT, 1);
        let new = largest_myapp(ETCD_MAX_OBJECT, 2);
        let body =
            serde_json::to_vec(&json!({"kind": "AdmissionReview", "request": {"object": new, "oldObject": old}}))
                .expect("json");
        let shape = JsonShape::of(&body);
        assert!(shape.items < MAX_ITEMS / 10, "{} items", shape.items);
        assert!(body.len() + shape.parse_cost() <= MAX_REQUEST_COST);
    }
}
