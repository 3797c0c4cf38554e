//! The real server on 127.0.0.1:0 over TLS, driven by hyper clients and raw sockets.

use super::*;
use crate::api::policy::Policy;
use crate::telemetry::metrics::Metrics;
use crate::webhook::certs;
use crate::webhook::limits::{Limits, MAX_BODY};
use futures::SinkExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Short timeouts, so that the tests that wait for them are quick.
fn fast() -> Limits {
    Limits {
        tls_handshake_timeout: Duration::from_millis(500),
        first_request_timeout: Duration::from_millis(800),
        header_read_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

struct Running {
    server: Server,
    shared: Arc<Shared>,
    ca: String,
}

async fn start(limits: Limits) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bundle = certs::issue(&["127.0.0.1".into()], None, time::OffsetDateTime::now_utc()).expect("certificate");
    let tls = RustlsConfig::from_pem(bundle.tls_crt.into_bytes(), bundle.tls_key.into_bytes()).await.expect("tls");
    let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let shared = Arc::new(Shared::new(Policy::default(), Arc::new(Metrics::default()), limits));
    let server = Server::spawn(listener, tls, shared.clone()).expect("spawn");
    Running { server, shared, ca: bundle.ca_crt }
}

impl Running {
    async fn tls(&self, alpn: &[u8]) -> std::io::Result<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("root");
        }
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(self.server.addr).await?;
        let name = ServerName::try_from("127.0.0.1").expect("name");
        connector.connect(name, tcp).await
    }

    /// An HTTP/1 connection; its driver runs in a task.
    async fn h1(&self) -> hyper::client::conn::http1::SendRequest<Body> {
        let io = TokioIo::new(self.tls(b"http/1.1").await.expect("tls"));
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("http/1 handshake");
        tokio::spawn(conn);
        sender
    }

    /// An HTTP/2 connection and the task driving it, which ends when the connection closes.
    async fn h2(&self) -> (hyper::client::conn::http2::SendRequest<Body>, tokio::task::JoinHandle<()>) {
        let io = TokioIo::new(self.tls(b"h2").await.expect("tls"));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("http/2 handshake");
        (sender, tokio::spawn(async move { drop(conn.await) }))
    }
}

fn post(body: Body) -> http::Request<Body> {
    http::Request::post("https://127.0.0.1/validate")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("request")
}

/// Status and body of an answer.
async fn read(res: http::Response<hyper::body::Incoming>) -> (StatusCode, Vec<u8>) {
    let status = res.status();
    let body = axum::body::to_bytes(Body::new(res.into_body()), 16 * MAX_BODY).await.expect("answer body");
    (status, body.to_vec())
}

fn review(uid: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid, "operation": "CREATE", "name": "web", "namespace": "ns",
            "kind": {"group": "myapp.dev", "version": "v1", "kind": "MyApp"},
            "resource": {"group": "myapp.dev", "version": "v1", "resource": "myapps"},
            "userInfo": {"username": "alice"}, "object": object
        }
    }))
    .expect("json")
}

fn myapp(image: &str) -> Value {
    json!({"apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": "web", "namespace": "ns"}, "spec": {"image": image}})
}

/// Polls `f` every 10 ms until it gives `Some`, failing after `limit`.
async fn within<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads until the peer closes, failing if that takes longer than `limit`; returns what came.
async fn closed_within(stream: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut got)).await {
        Ok(_) => got,
        Err(_) => panic!("the server kept the connection open for {limit:?}; got {:?}", String::from_utf8_lossy(&got)),
    }
}

#[tokio::test]
async fn garbage_gets_400_and_a_bad_object_a_denial_with_its_uid() {
    let s = start(Limits::default()).await;
    let mut c = s.h1().await;
    for garbage in [&b"not json"[..], b"{", b"null", b"[]", b"{\"kind\":\"AdmissionReview\"}", &[0xff, 0xfe]] {
        let (status, body) = read(c.send_request(post(Body::from(garbage.to_vec()))).await.expect("answer")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{garbage:?}: {}", String::from_utf8_lossy(&body));
    }
    // A review whose object is no object: a denial under its uid, not a 400.
    let (status, body) = read(c.send_request(post(Body::from(review("u-1", json!(42))))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_slice(&body).expect("review");
    assert_eq!((out["response"]["uid"].as_str(), out["response"]["allowed"].as_bool()), (Some("u-1"), Some(false)));
    // A review whose object breaks policy: a denial under its uid.
    let (status, body) =
        read(c.send_request(post(Body::from(review("u-2", myapp("nginx:latest"))))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK);
    let out: Value = serde_json::from_slice(&body).expect("review");
    assert_eq!((out["response"]["uid"].as_str(), out["response"]["allowed"].as_bool()), (Some("u-2"), Some(false)));
    // The 400s are counted as errors by their code; the denials are answers, not errors.
    let text = s.shared.metrics.encode();
    let count =
        |series: &str| text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<u64>().ok());
    assert_eq!(count("myapp_operator_webhook_errors_total{path=\"/validate\",code=\"400\"}"), Some(6), "{text}");
    assert_eq!(count("myapp_operator_webhook_requests_total{path=\"/validate\",allowed=\"false\"}"), Some(2), "{text}");
    assert!(!text.contains("code=\"200\""), "{text}");
}

#[tokio::test]
async fn oversized_bodies_get_413_and_the_largest_accepted_gets_200() {
    let s = start(Limits::default()).await;
    // A valid review padded with whitespace to exactly MAX_BODY is answered.
    let mut exact = review("u-max", myapp("nginx:1.27"));
    exact.resize(MAX_BODY, b' ');
    let mut c = s.h1().await;
    let (status, body) = read(c.send_request(post(Body::from(exact))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body[..body.len().min(200)]));
    // One byte more, announced: 413 without reading it.
    let mut over = review("u-over", myapp("nginx:1.27"));
    over.resize(MAX_BODY + 1, b' ');
    let mut c = s.h1().await;
    let (status, _) = read(c.send_request(post(Body::from(over.clone()))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Not announced (chunked on HTTP/1, no content-length on HTTP/2): 413 once it goes over.
    let chunked = || {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = over.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
        post(Body::from_stream(futures::stream::iter(chunks)))
    };
    let mut c = s.h1().await;
    let (status, _) = read(c.send_request(chunked()).await.expect("answer")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (mut c, _) = s.h2().await;
    let (status, _) = read(c.send_request(chunked()).await.expect("answer")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let text = s.shared.metrics.encode();
    assert!(text.contains("myapp_operator_webhook_errors_total{path=\"/validate\",code=\"413\"} 3\n"), "{text}");
}

#[tokio::test]
async fn a_client_that_stops_after_its_headers_is_cut_off() {
    let s = start(fast()).await;
    let mut tls = s.tls(b"http/1.1").await.expect("tls");
    tls.write_all(
        b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .expect("write");
    let got = closed_within(&mut tls, Duration::from_secs(3)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&got));
    // The same over HTTP/2: the stream is answered 408 within the body timeout.
    let (mut c, _) = s.h2().await;
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx.send(Ok(b"{".to_vec())).await.expect("first byte");
    let answer = tokio::time::timeout(Duration::from_secs(3), c.send_request(post(Body::from_stream(rx))))
        .await
        .expect("answered within the timeout")
        .expect("answer");
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    drop(tx);
}

#[tokio::test]
async fn slow_headers_and_silent_connections_are_cut_off() {
    let s = start(fast()).await;
    // Half a request head, then nothing.
    let mut tls = s.tls(b"http/1.1").await.expect("tls");
    tls.write_all(b"POST /validate HTTP/1.1\r\nHost").await.expect("write");
    closed_within(&mut tls, Duration::from_secs(3)).await;
    // A TLS connection that sends no request at all.
    let mut tls = s.tls(b"h2").await.expect("tls");
    closed_within(&mut tls, Duration::from_secs(3)).await;
    // A TCP connection that never starts its TLS handshake.
    let mut tcp = TcpStream::connect(s.server.addr).await.expect("connect");
    closed_within(&mut tcp, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn the_connection_cap_holds() {
    use crate::webhook::limits::LOOPBACK_RESERVE;
    let s = start(Limits { max_connections: 4, ..Limits::default() }).await;
    // From loopback (these tests' only address) the cap is the shared places and the reserve the
    // pod's own self-check may use.
    let cap = 4 + LOOPBACK_RESERVE;
    let mut held = Vec::new();
    for i in 0..cap {
        let mut c = s.h1().await;
        let (status, _) = read(
            c.send_request(post(Body::from(review(&format!("u-{i}"), myapp("nginx:1.27"))))).await.expect("answer"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        held.push(c);
    }
    // The next is closed at once, before any handshake.
    assert!(s.tls(b"http/1.1").await.is_err(), "a connection over the cap was served");
    let mut tcp = TcpStream::connect(s.server.addr).await.expect("connect");
    closed_within(&mut tcp, Duration::from_secs(1)).await;
    // One closes, and a place is free again.
    held.pop();
    within("a free place after a close", Duration::from_secs(5), || async { s.tls(b"http/1.1").await.ok() }).await;
    drop(held);
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_get_a_fast_503() {
    let s = start(Limits { max_in_flight: 2, ..Limits::default() }).await;
    let (c, _) = s.h2().await;
    let body = review("u-held", myapp("nginx:1.27"));
    let mut senders = Vec::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        tx.send(Ok(body[..10].to_vec())).await.expect("first bytes");
        let mut c = c.clone();
        held.push(tokio::spawn(async move {
            read(c.send_request(post(Body::from_stream(rx))).await.expect("answer")).await
        }));
        senders.push(tx);
    }
    within("two requests in flight", Duration::from_secs(5), || async {
        (s.shared.gate.in_flight() == 2).then_some(())
    })
    .await;
    let t = Instant::now();
    let res = c.clone().send_request(post(Body::from(body.clone()))).await.expect("answer");
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
    assert!(t.elapsed() < Duration::from_secs(1), "refused at once, not queued: {:?}", t.elapsed());
    for mut tx in senders {
        tx.send(Ok(body[10..].to_vec())).await.expect("rest");
    }
    for h in held {
        assert_eq!(h.await.expect("join").0, StatusCode::OK);
    }
}

#[tokio::test]
async fn the_memory_budget_is_shared_by_all_requests_and_counts_the_parse() {
    let s = start(Limits { memory_budget: 1024 * 1024, ..Limits::default() }).await;
    let (c, _) = s.h2().await;
    // One request holds most of the budget with a body it has not finished.
    let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let mut hog = c.clone();
    let hog =
        tokio::spawn(async move { read(hog.send_request(post(Body::from_stream(rx))).await.expect("answer")).await });
    tx.send(Ok(vec![b' '; 700 * 1024])).await.expect("send");
    within("the first body buffered", Duration::from_secs(5), || async {
        (s.shared.gate.memory_held() >= 700 * 1024).then_some(())
    })
    .await;
    // 128 KiB of body fit in what is left, but not with what parsing them will cost.
    let mut big = review("u-big", myapp("nginx:1.27"));
    big.resize(128 * 1024, b' ');
    let (status, _) = read(c.clone().send_request(post(Body::from(big))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "the budget is spent");
    drop(tx);
    drop(hog.await);
    // Spent no longer: the same request passes.
    let mut big = review("u-big", myapp("nginx:1.27"));
    big.resize(128 * 1024, b' ');
    let (status, _) = read(c.clone().send_request(post(Body::from(big))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK);
    within("everything given back", Duration::from_secs(5), || async {
        (s.shared.gate.memory_held() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_review_with_more_items_than_any_myapp_is_denied_under_its_uid_unparsed() {
    let s = start(Limits::default()).await;
    let (c, _) = s.h2().await;
    // Well under the body limit, but 30,000 values: a MyApp has nowhere near as many.
    let mut obj = myapp("nginx:1.27");
    obj["metadata"]["labels"] = Value::Object((0..15_000).map(|i| (format!("l{i}"), json!("v"))).collect());
    let body = review("u-many", obj);
    assert!(body.len() < MAX_BODY / 10);
    let (status, out) = read(c.clone().send_request(post(Body::from(body))).await.expect("answer")).await;
    let out: Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "a well-formed denial: {out}");
    assert_eq!(out["response"]["uid"], "u-many");
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["status"]["code"], 413);
    let message = out["response"]["status"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("JSON values and keys") && message.contains("labels"), "{message}");
    // Without a uid to answer under, an HTTP error.
    let bare = serde_json::to_vec(&json!({"kind": "AdmissionReview", "junk": vec![0; 30_000]})).expect("json");
    let (status, _) = read(c.clone().send_request(post(Body::from(bare))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(s.shared.gate.memory_held(), 0);
}

#[tokio::test]
async fn draining_sends_goaway_on_http2_and_still_accepts() {
    let s = start(Limits::default()).await;
    let (mut c, conn) = s.h2().await;
    let (status, _) =
        read(c.send_request(post(Body::from(review("u-1", myapp("nginx:1.27"))))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK);
    begin_drain(&s.shared);
    let (status, _) =
        read(c.send_request(post(Body::from(review("u-2", myapp("nginx:1.27"))))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK, "the request that meets the drain is answered");
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("GOAWAY closes the HTTP/2 connection")
        .expect("join");
    // Callers that have not yet seen this replica leave are still served, once per connection.
    let (mut c2, conn2) = s.h2().await;
    let (status, _) =
        read(c2.send_request(post(Body::from(review("u-3", myapp("nginx:1.27"))))).await.expect("answer")).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(3), conn2).await.expect("closed too").expect("join");
}

#[tokio::test]
async fn shutdown_answers_every_admission_in_flight_over_http2_then_refuses() {
    let s = start(Limits::default()).await;
    let addr = s.server.addr;
    let (connections, per_connection) = (4, 16);
    let mut senders = Vec::new();
    let mut answers = Vec::new();
    for i in 0..connections {
        let (c, _) = s.h2().await;
        for j in 0..per_connection {
            let uid = format!("u-{i}-{j}");
            let body = review(&uid, myapp("nginx:1.27"));
            let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
            tx.send(Ok(body[..body.len() / 2].to_vec())).await.expect("first half");
            let mut c = c.clone();
            answers.push(tokio::spawn(async move {
                let res = c.send_request(post(Body::from_stream(rx))).await.map_err(|e| e.to_string())?;
                let (status, body) = read(res).await;
                let out: Value = serde_json::from_slice(&body).map_err(|e| format!("{status}: {e}"))?;
                (status == StatusCode::OK && out["response"]["uid"] == uid.as_str())
                    .then_some(())
                    .ok_or(format!("{status}: {out}"))
            }));
            senders.push((tx, body[body.len() / 2..].to_vec()));
        }
    }
    let all = connections * per_connection;
    within("every admission in flight", Duration::from_secs(10), || async {
        (s.shared.gate.in_flight() == all).then_some(())
    })
    .await;
    let stopping = tokio::spawn(s.server.shutdown(Duration::from_secs(10)));
    within("new connections refused", Duration::from_secs(5), || async { TcpStream::connect(addr).await.err() }).await;
    for (mut tx, rest) in senders {
        tx.send(Ok(rest)).await.expect("second half");
    }
    let mut failures = Vec::new();
    for a in answers {
        if let Err(e) = a.await.expect("join") {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {all} admissions failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown returns once drained")
        .expect("join")
        .expect("drained within the grace");
}

mod traces {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
    use std::sync::Mutex;
    use tower::ServiceExt;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Debug, Default)]
    struct Capture(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Capture {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(mut spans) = self.0.lock() {
                spans.extend(batch);
            }
            Ok(())
        }
    }

    const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";

    /// The spans exported while `/validate` answers one request carrying a sampled
    /// `traceparent`, under `sampler` (the replica's own sampling decision).
    async fn admission_spans(sampler: Sampler) -> Vec<SpanData> {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let capture = Capture::default();
        let provider = SdkTracerProvider::builder().with_sampler(sampler).with_simple_exporter(capture.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);
        let shared = Arc::new(Shared::new(Policy::default(), Arc::new(Metrics::default()), Limits::default()));
        let req = axum::http::Request::post("/validate")
            .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
            .body(Body::from(review("u-trace", myapp("nginx:1.27"))))
            .expect("request");
        let res = router(shared).oneshot(req).await.expect("answer");
        assert_eq!(res.status(), StatusCode::OK);
        let _ = provider.force_flush();
        let spans = capture.0.lock().map(|s| s.clone()).unwrap_or_default();
        spans.into_iter().filter(|s| s.name == "webhook /validate").collect()
    }

    #[tokio::test]
    async fn the_admission_span_is_a_new_root_linked_to_the_caller() {
        let spans = admission_spans(Sampler::AlwaysOn).await;
        assert_eq!(spans.len(), 1, "one admission span");
        let span = &spans[0];
        assert_eq!(span.parent_span_id, SpanId::INVALID, "a root, not a child of the caller");
        let caller = TraceId::from_hex(CALLER_TRACE).expect("trace id");
        assert_ne!(span.span_context.trace_id(), caller, "a trace of its own");
        let linked: Vec<(TraceId, SpanId)> =
            span.links.iter().map(|l| (l.span_context.trace_id(), l.span_context.span_id())).collect();
        assert_eq!(linked, vec![(caller, SpanId::from_hex(CALLER_SPAN).expect("span id"))]);
    }

    #[tokio::test]
    async fn a_caller_cannot_force_sampling() {
        // Our sampler says no to roots; the caller's traceparent says "sampled".
        let spans = admission_spans(Sampler::ParentBased(Box::new(Sampler::AlwaysOff))).await;
        assert!(spans.is_empty(), "the caller's flag decided: {spans:?}");
    }
}
