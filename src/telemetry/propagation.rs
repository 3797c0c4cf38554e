//! W3C trace context across process boundaries.
//!
//! [`TraceParentLayer`] wraps the kube client's HTTP stack: every API call becomes a client span
//! (method, path, status code, duration) under the current span, and its context travels to the
//! API server in the `traceparent` header, so the API server's own spans join the trace. The API
//! server honours an incoming parent only for privileged callers (`system:masters`, or users
//! allowed the `tracing` verb); for others it starts its own trace with a link to ours.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use opentelemetry::propagation::{Extractor, Injector};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes propagation fields into HTTP headers.
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// Reads propagation fields from HTTP headers.
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The annotation that carries the trace context of the request that last changed a MyApp's
/// spec. The reconcile of that generation links to it. It is metadata: it bumps no generation and
/// no drift check looks at it.
pub const TRACE_ANNOTATION: &str = "myapp.dev/traceparent";

/// The W3C `traceparent` of the current span, if it is sampled.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut headers = HeaderMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(&mut headers)));
    headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Parses a `traceparent` into the span context it names.
pub fn parse_traceparent(value: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt;
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", HeaderValue::from_str(value).ok()?);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(&headers)));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Sets `span`'s parent from the `traceparent` of incoming `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &HeaderMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(cx);
}

/// A tower layer for `kube::client::ClientBuilder::with_layer`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceParentLayer;

impl<S> tower::Layer<S> for TraceParentLayer {
    type Service = TraceParent<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceParent { inner }
    }
}

/// The service of [`TraceParentLayer`].
#[derive(Clone, Debug)]
pub struct TraceParent<S> {
    inner: S,
}

/// The span name of an API call: the verb kube tags the request with, else the method.
fn span_name<B>(req: &Request<B>) -> String {
    match req.extensions().get::<&'static str>() {
        Some(verb) => format!("kube {verb}"),
        None => format!("kube {}", req.method()),
    }
}

impl<S, B, R> tower::Service<Request<B>> for TraceParent<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let span = tracing::info_span!(
            "kube",
            otel.name = %span_name(&req),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = %req.method(),
            url.path = %req.uri().path(),
            http.response.status_code = tracing::field::Empty,
        );
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(req.headers_mut()))
        });
        let fut = self.inner.call(req);
        let record = span.clone();
        Box::pin(
            async move {
                let res = fut.await;
                match &res {
                    Ok(r) => {
                        record.record("http.response.status_code", r.status().as_u16());
                        if r.status().is_server_error() || r.status().is_client_error() {
                            record.record("otel.status_code", "ERROR");
                        }
                    }
                    Err(e) => {
                        record.record("otel.status_code", "ERROR");
                        tracing::debug!(error = %e, "request failed");
                    }
                }
                res
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    #[test]
    fn traceparent_round_trips_through_headers() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let prop = TraceContextPropagator::new();
        let mut headers = HeaderMap::new();
        prop.inject_context(&cx, &mut HeaderInjector(&mut headers));
        assert_eq!(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        let back = prop.extract(&HeaderExtractor(&headers));
        assert_eq!(back.span().span_context().trace_id(), sc.trace_id());
        assert_eq!(back.span().span_context().span_id(), sc.span_id());
    }

    #[test]
    fn garbage_traceparent_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static("not-a-trace"));
        let back = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
        assert!(!back.span().span_context().is_valid());
    }
}
