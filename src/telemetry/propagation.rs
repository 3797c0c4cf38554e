//! W3C trace context across process boundaries.
//!
//! `TraceParentLayer` wraps the kube client's HTTP stack: every API call becomes a client span
//! (method, path, status code, duration) under the current span, and its context travels to the
//! API server in the `traceparent` header, so the API server's own spans join the trace. The API
//! server honours an incoming parent only for privileged callers (`system:masters`, or users
//! allowed the `tracing` verb); for others it starts its own trace with a link to ours.
//!
//! Incoming, we do the same as the API server does for callers it does not trust, for every
//! caller: anything that reaches the webhook port can send a `traceparent`, so `caller_link`
//! reads it only as a *link*. The webhook's span is a new root: our sampler decides whether it is
//! recorded (a caller cannot force sampling, or make us export spans into a trace of its choosing),
//! and the caller's trace stays one click away through the link. The caller's `tracestate` is
//! dropped. This is also what a trace of the API server's own call looks like when its caller is
//! not privileged, so both sides read the same way.

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use opentelemetry::propagation::Injector;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes propagation fields into HTTP headers.
pub(crate) struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// The W3C `traceparent` of the current span, if it is sampled.
pub(crate) fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut headers = HeaderMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(&mut headers)));
    headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Parses a W3C `traceparent` (`version-traceid-parentid-flags`) into the remote span context it
/// names, strictly: lowercase hex only, the exact field lengths, a trace id and a parent id that
/// are not all zero, and version `ff` refused. Version `00` has exactly four fields; a later
/// version may append fields after a `-`, which are ignored. Of the flags, only "sampled" is
/// kept. It does not depend on the global propagator, so it reads the same in every process.
pub(crate) fn parse_traceparent(value: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    fn hex(s: &str, len: usize) -> Option<&str> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(s)
    }
    let value = value.trim_matches([' ', '\t']);
    // A header is ASCII; an annotation need not be, and byte offsets below must be characters.
    if !value.is_ascii() {
        return None;
    }
    let (version, rest) = value.split_once('-')?;
    let version = u8::from_str_radix(hex(version, 2)?, 16).ok()?;
    // After the version and its dash, the three known fields take 52 characters.
    if version == 0xff || rest.len() < 52 {
        return None;
    }
    let (known, extra) = rest.split_at(52);
    match (version, extra) {
        (0, "") => {}
        (0, _) => return None,
        (_, extra) if extra.is_empty() || extra.starts_with('-') => {}
        _ => return None,
    }
    let mut fields = known.split('-');
    let trace_id = TraceId::from_hex(hex(fields.next()?, 32)?).ok()?;
    let span_id = SpanId::from_hex(hex(fields.next()?, 16)?).ok()?;
    let flags = u8::from_str_radix(hex(fields.next()?, 2)?, 16).ok()?;
    if fields.next().is_some() {
        return None;
    }
    let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags) & TraceFlags::SAMPLED, true, TraceState::NONE);
    sc.is_valid().then_some(sc)
}

/// The caller's span context, to be *linked* from a server span, never made its parent (see the
/// module doc). Only a single, valid `traceparent` header counts: W3C asks a receiver to ignore
/// one that is repeated.
pub(crate) fn caller_link(headers: &HeaderMap) -> Option<opentelemetry::trace::SpanContext> {
    let mut values = headers.get_all("traceparent").iter();
    match (values.next(), values.next()) {
        (Some(v), None) => parse_traceparent(v.to_str().ok()?),
        _ => None,
    }
}

/// A tower layer for `kube::client::ClientBuilder::with_layer`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TraceParentLayer;

impl<S> tower::Layer<S> for TraceParentLayer {
    type Service = TraceParent<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceParent { inner }
    }
}

/// The service of [`TraceParentLayer`].
#[derive(Clone, Debug)]
pub(crate) struct TraceParent<S> {
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

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn what_we_inject_we_parse() {
        let sc = SpanContext::new(
            TraceId::from_hex(TRACE).expect("trace id"),
            SpanId::from_hex(SPAN).expect("span id"),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let mut headers = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
        let written = headers.get("traceparent").and_then(|v| v.to_str().ok()).expect("traceparent");
        assert_eq!(written, format!("00-{TRACE}-{SPAN}-01"));
        let back = parse_traceparent(written).expect("parsed");
        assert_eq!((back.trace_id(), back.span_id(), back.is_sampled()), (sc.trace_id(), sc.span_id(), true));
        assert!(back.is_remote());
    }

    #[test]
    fn valid_traceparents_parse() {
        let sampled = parse_traceparent(&format!("00-{TRACE}-{SPAN}-01")).expect("sampled");
        assert_eq!(sampled.trace_id().to_string(), TRACE);
        assert_eq!(sampled.span_id().to_string(), SPAN);
        assert!(sampled.is_sampled());
        let unsampled = parse_traceparent(&format!("00-{TRACE}-{SPAN}-00")).expect("unsampled");
        assert!(!unsampled.is_sampled());
        // Unknown flags are accepted and dropped; only "sampled" is kept.
        let other = parse_traceparent(&format!("00-{TRACE}-{SPAN}-ff")).expect("other flags");
        assert_eq!(other.trace_flags(), TraceFlags::SAMPLED);
        // A later version may append fields; version 00 may not.
        assert!(parse_traceparent(&format!("01-{TRACE}-{SPAN}-01-what-comes-next")).is_some());
        assert!(parse_traceparent(&format!("01-{TRACE}-{SPAN}-01")).is_some());
        // Optional whitespace around a header value.
        assert!(parse_traceparent(&format!(" 00-{TRACE}-{SPAN}-01\t")).is_some());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let zero_trace = "0".repeat(32);
        let zero_span = "0".repeat(16);
        for bad in [
            String::new(),
            "not-a-trace".into(),
            // Version ff is forbidden; versions are two lowercase hex digits.
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("0-{TRACE}-{SPAN}-01"),
            format!("000-{TRACE}-{SPAN}-01"),
            format!("zz-{TRACE}-{SPAN}-01"),
            // Version 00 has exactly four fields.
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{TRACE}-{SPAN}-01-"),
            format!("00-{TRACE}-{SPAN}"),
            // A later version's extra fields follow a dash.
            format!("01-{TRACE}-{SPAN}-01x"),
            // All-zero ids are invalid.
            format!("00-{zero_trace}-{SPAN}-01"),
            format!("00-{TRACE}-{zero_span}-01"),
            // Wrong lengths.
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{TRACE}0-{SPAN}-01"),
            format!("00-{TRACE}-{}-01", &SPAN[1..]),
            format!("00-{TRACE}-{SPAN}0-01"),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}-{SPAN}-001"),
            format!("00-1-{SPAN}-01"),
            // Uppercase hex is not W3C hex.
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{}-01", "00F067AA0BA902B7"),
            format!("00-{TRACE}-{SPAN}-0A"),
            format!("0A-{TRACE}-{SPAN}-01"),
            // Other separators, signs and non-ASCII.
            format!("00_{TRACE}_{SPAN}_01"),
            format!("00-+{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{}é-{SPAN}-01", &TRACE[2..]),
            // A multi-byte character where a field would end.
            format!("01-{TRACE}-{SPAN}-0é"),
            format!("01-{TRACE}-{SPAN}-01é"),
        ] {
            assert!(parse_traceparent(&bad).is_none(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn caller_link_takes_a_single_valid_header() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let mut one = HeaderMap::new();
        one.insert("traceparent", HeaderValue::from_str(&tp).expect("value"));
        one.insert("tracestate", HeaderValue::from_static("vendor=chosen-by-the-caller"));
        let link = caller_link(&one).expect("a link");
        assert_eq!(link.trace_id().to_string(), TRACE);
        assert_eq!(link.trace_state().header(), "", "the caller's tracestate is dropped");
        let mut two = one.clone();
        two.append("traceparent", HeaderValue::from_str(&tp).expect("value"));
        assert!(caller_link(&two).is_none());
        assert!(caller_link(&HeaderMap::new()).is_none());
    }
}
