//! The client the controller writes with: its connections check the [`Fence`] immediately before
//! every byte they hand to the kernel.
//!
//! `Writer` checks the fence before it starts a call, but a call is not on
//! the wire yet when that check passes. It still waits in the client's buffer, hyper's connection
//! pool and the connection task, and a retry can send it again later. A process paused inside that
//! gap (SIGSTOP, a frozen VM, a stalled node) resumes after its leadership has ended and would send
//! the request anyway, into the next leader's term.
//!
//! Here the check sits in the connection's `poll_write`, under TLS. A request that fails it never
//! leaves: the write errors, hyper drops the connection and the call returns an error.
//!
//! # The fence at commit time
//!
//! A check at the socket bounds when a write is *sent*, not when the API server *commits* it. So
//! every write (any method but `GET`) also carries a deadline
//! (`CallTimeoutLayer::with_write_deadline`): the
//! client gives up on it after [`Timings::write_timeout`](crate::leader::Timings), and the API
//! server is told the same in the `timeout` query parameter, as client-go does for a request
//! with a timeout. The server sets that deadline on the request's context from when it received
//! it; admission webhooks and the etcd transaction run under that context, so a write that has
//! not reached etcd by then fails instead of landing late. What is left is an etcd transaction
//! already sent at the deadline, bounded by etcd's commit latency
//! ([`crate::leader::Timings::in_flight`] allows for it). `ARCHITECTURE.md` ("The fence at commit
//! time") has the arithmetic.
//!
//! A request handed to the kernel is not yet at the API server either: across a partition the
//! kernel retransmits it until the network heals, and the server's deadline counts from that
//! late receipt. So every connection carries `TCP_USER_TIMEOUT`
//! ([`crate::leader::DELIVERY_TIMEOUT`]): bytes not acknowledged within it abort the
//! connection, and nothing is sent after that, by a live process or a dead one.
//!
//! What remains is the handful of instructions between reading the monotonic clock and the
//! `write(2)` call. Bytes handed to the kernel before a pause are still delivered at once, while the
//! lease is valid. Closing the last gap would need a fencing token that the API server checks, and
//! Kubernetes has none for arbitrary objects.

use crate::leader::Fence;
use crate::telemetry::propagation::TraceParentLayer;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::NamespaceResourceScope;
use kube::client::ConfigExt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The client the controller writes with: a kube client whose every socket write is fenced.
/// A type of its own, so that it cannot be passed where the plain (read) client is meant, nor
/// the other way round; it is made only by [`client`].
#[derive(Clone)]
pub struct FencedClient(kube::Client);

impl FencedClient {
    /// The API of the namespaced resources `K` in `namespace`, through this client.
    pub fn api<K>(&self, namespace: &str) -> kube::Api<K>
    where
        K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        kube::Api::namespaced(self.0.clone(), namespace)
    }

    /// A test's client, taken as fenced (the fake API server's).
    #[cfg(test)]
    pub(crate) fn for_tests(client: kube::Client) -> Self {
        Self(client)
    }
}

/// Builds a kube client for `config` whose every socket write is fenced by `fence`, and whose
/// every write request lives at most `write_timeout`, on both ends. It
/// has the same layers as the default client (base URI, credentials, extra headers such as the
/// User-Agent, client spans with `traceparent`) and the same timeouts, the
/// `crate::client::CALL_TIMEOUT` included (for reads).
pub fn client(config: &kube::Config, fence: Fence, write_timeout: Duration) -> kube::Result<FencedClient> {
    let https = config.rustls_https_connector_with_connector(FencedConnector { inner: tcp(), fence })?;
    let mut timeouts = hyper_timeout::TimeoutConnector::new(https);
    timeouts.set_connect_timeout(config.connect_timeout);
    timeouts.set_read_timeout(config.read_timeout);
    timeouts.set_write_timeout(config.write_timeout);
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Builder::new(TokioExecutor::new()).build(timeouts);
    let service = tower::ServiceBuilder::new()
        .layer(TraceParentLayer)
        .layer(crate::client::CallTimeoutLayer::default().with_write_deadline(write_timeout))
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(FencedClient(kube::Client::new(service, config.default_namespace.clone())))
}

/// The TCP connector under the fenced client: plain HTTP allowed (TLS is layered above), and
/// `TCP_USER_TIMEOUT` set to [`crate::leader::DELIVERY_TIMEOUT`].
fn tcp() -> HttpConnector {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_tcp_user_timeout(Some(crate::leader::DELIVERY_TIMEOUT));
    tcp
}

/// Wraps a connector so that its connections are [`FencedStream`]s.
#[derive(Clone, Debug)]
pub(crate) struct FencedConnector<C> {
    inner: C,
    fence: Fence,
}

impl<C> tower::Service<http::Uri> for FencedConnector<C>
where
    C: tower::Service<http::Uri>,
    C::Future: Send + 'static,
{
    type Response = FencedStream<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let fence = self.fence.clone();
        Box::pin(async move { Ok(FencedStream { inner: connecting.await?, fence }) })
    }
}

/// A connection that refuses to write once the fence is closed.
#[derive(Debug)]
pub(crate) struct FencedStream<T> {
    inner: T,
    fence: Fence,
}

impl<T> FencedStream<T> {
    fn fenced(&self) -> Option<io::Error> {
        self.fence
            .check()
            .err()
            .map(|_| io::Error::new(io::ErrorKind::PermissionDenied, "fenced: this replica's leadership has ended"))
    }
}

impl<T: Read + Unpin> Read for FencedStream<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for FencedStream<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.fenced() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.fenced() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for FencedStream<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{CallTimeoutLayer, with_timeout};

    #[tokio::test]
    async fn connections_give_up_on_unacknowledged_bytes_after_the_delivery_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let uri: http::Uri = format!("http://{}", listener.local_addr().expect("addr")).parse().expect("uri");
        let mut connector = tcp();
        let stream = tower::ServiceExt::oneshot(&mut connector, uri).await.expect("connect");
        let socket = socket2::SockRef::from(stream.inner());
        assert_eq!(socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"), Some(crate::leader::DELIVERY_TIMEOUT));
        // A plain connector leaves the kernel's default (retransmit for many minutes).
        let mut plain = HttpConnector::new();
        let uri: http::Uri = format!("http://{}", listener.local_addr().expect("addr")).parse().expect("uri");
        let other = tower::ServiceExt::oneshot(&mut plain, uri).await.expect("connect");
        assert_eq!(socket2::SockRef::from(other.inner()).tcp_user_timeout().expect("read"), None);
    }
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt;
    use tokio::sync::watch;
    use tokio::time::Instant;

    async fn write(stream: &mut FencedStream<TokioIo<tokio::io::DuplexStream>>, bytes: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, bytes)).await
    }

    #[tokio::test(start_paused = true)]
    async fn writes_pass_while_the_lease_is_valid_and_fail_after() {
        let (tx, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(3)));
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut stream = FencedStream { inner: TokioIo::new(ours), fence: Fence::new(rx) };

        assert_eq!(write(&mut stream, b"ok").await.ok(), Some(2));
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).await.ok();
        assert_eq!(&got, b"ok");

        // The same connection, after the deadline passed without a renewal: nothing leaves.
        tokio::time::advance(Duration::from_secs(4)).await;
        let err = write(&mut stream, b"late").await.err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::PermissionDenied));

        // A renewal opens it again; losing leadership closes it at once.
        tx.send_replace(Some(Instant::now() + Duration::from_secs(3)));
        assert_eq!(write(&mut stream, b"ok").await.ok(), Some(2));
        tx.send_replace(None);
        assert!(write(&mut stream, b"no").await.is_err());
        let vectored =
            std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &[io::IoSlice::new(b"no")])).await;
        assert!(vectored.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_lives_no_longer_than_its_deadline_on_either_end() {
        use crate::fake_api::FakeApi;
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::api::{Api, Patch, PatchParams, PostParams};

        let fake = FakeApi::default();
        let deadline = Duration::from_millis(400);
        let layer = CallTimeoutLayer::default().with_write_deadline(deadline);
        let service = tower::ServiceBuilder::new().layer(layer).service(fake.service());
        let api: Api<ConfigMap> = Api::namespaced(kube::Client::new(service, "default"), "a");
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}, "data": {"k": "1"}}))
            .expect("configmap");
        api.create(&PostParams::default(), &cm).await.expect("create");
        api.get("x").await.expect("get");
        let seen = fake.requests();
        assert!(seen.iter().filter(|r| r.is_write()).all(|r| r.uri.contains("timeout=400ms")), "{seen:?}");
        assert!(seen.iter().filter(|r| !r.is_write()).all(|r| !r.uri.contains("timeout=")), "reads keep theirs");

        // The server is slower than the deadline: the client gives up at it...
        fake.set_delay(Duration::from_secs(1));
        let started = Instant::now();
        let patch = Patch::Merge(serde_json::json!({"data": {"k": "2"}}));
        let err = api.patch("x", &PatchParams::default(), &patch).await.expect_err("too slow");
        assert_eq!(started.elapsed(), deadline, "{err}");

        // ... and the server, told the deadline, abandons the write instead of committing it
        // late, even when the client is no longer there to give up (it died).
        let told = tower::ServiceBuilder::new()
            .map_request(move |mut req: http::Request<kube::client::Body>| {
                *req.uri_mut() = with_timeout(req.uri(), deadline).expect("uri");
                req
            })
            .service(fake.service());
        let no_client_deadline: Api<ConfigMap> = Api::namespaced(kube::Client::new(told, "default"), "a");
        let err = no_client_deadline.patch("x", &PatchParams::default(), &patch).await.expect_err("abandoned");
        assert!(matches!(err, kube::Error::Api(ref s) if s.code == 504), "{err}");
        let stored = fake.get("/api/v1/namespaces/a/configmaps", "x").expect("stored");
        assert_eq!(stored.pointer("/data/k").and_then(|v| v.as_str()), Some("1"), "the late write never landed");
    }
}
