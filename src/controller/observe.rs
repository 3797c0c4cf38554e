//! What one reconcile leaves behind for whoever watches the operator: its span (object,
//! generation, leader, trigger, result), linked to the admission that produced its generation;
//! its duration, with its trace id as the exemplar; and its count by result.

use super::error::Error;
use crate::api::{MyApp, TRACE_ANNOTATION};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{logging, propagation, trigger};
use std::time::{Duration, Instant};
use tracing::Span;

/// One reconcile, observed from its start.
pub(super) struct Observed {
    span: Span,
    started: Instant,
    /// The trace id, when the trace is sampled: the exemplar of the duration.
    sampled: Option<String>,
}

impl Observed {
    /// Opens the `reconcile` span of `app`, by `leader`, which began at `started`.
    pub(super) fn start(app: &MyApp, leader: &str, started: Instant) -> Self {
        let meta = &app.metadata;
        let span = tracing::info_span!(
            "reconcile",
            otel.name = "reconcile",
            myapp = %format!("{}/{}", meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default()),
            generation = meta.generation.unwrap_or(0),
            leader = %leader,
            trigger = trigger::current().unwrap_or_else(|| "unknown".into()),
            result = tracing::field::Empty,
            error = tracing::field::Empty,
            requeue_ms = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(sc) = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRACE_ANNOTATION))
            .and_then(|tp| propagation::parse_traceparent(tp))
        {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            span.add_link(sc);
        }
        let (trace_id, sampled) = span.in_scope(|| (logging::current_trace_id(), logging::sampled_trace_id()));
        span.record("trace_id", trace_id);
        Self { span, started, sampled }
    }

    /// The span the reconcile runs in.
    pub(super) fn span(&self) -> &Span {
        &self.span
    }

    /// Records how the reconcile ended: in its span, its duration and its count.
    pub(super) fn finish(self, result: &Result<Option<Duration>, Error>, metrics: &Metrics) {
        match result {
            Ok(requeue) => {
                self.span.record("result", "ok");
                if let Some(d) = requeue {
                    self.span.record("requeue_ms", d.as_millis() as u64);
                }
            }
            Err(e) => {
                self.span.record("result", e.kind());
                self.span.record("error", e.to_string());
                self.span.record("otel.status_code", "ERROR");
            }
        }
        metrics.reconcile_took(self.started.elapsed().as_secs_f64(), self.sampled);
        metrics.reconciled(result.as_ref().map_or_else(Error::kind, |_| "ok"));
    }
}
