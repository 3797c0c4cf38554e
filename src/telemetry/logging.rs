//! Logs and traces with `tracing`.
//!
//! - Logs: JSON (production) or text, filtered by `RUST_LOG` (default `info`). Lines inside a
//!   reconcile carry its `trace_id`.
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, spans are
//!   exported over OTLP/gRPC, configured by the standard `OTEL_*` variables (service name,
//!   resource attributes, sampler). Exported: the operator's own spans and the kube runtime's
//!   "reconciling object" span that roots each reconcile. Off when no endpoint is set.
//! - Propagation: W3C TraceContext.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::Level;
use tracing_subscriber::filter::{FilterExt, FilterFn, Targets};
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

/// How this replica logs. Flattened into the binary's `run` flags. (Traces are configured by the
/// standard `OTEL_*` environment variables, not by flags.)
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LogArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub(crate) log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

/// Keeps the trace pipeline alive; call [`Telemetry::shutdown`] on exit so no span is lost.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported.
    pub(crate) fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes every pending span and stops the exporter.
    pub(crate) fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.force_flush() {
                eprintln!("flushing spans failed: {e}");
            }
            if let Err(e) = p.shutdown() {
                eprintln!("stopping the span exporter failed: {e}");
            }
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn provider(identity: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("myapp-operator");
    }
    let mut attrs = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", identity.to_string()),
    ];
    if let Ok(pod) = std::env::var("POD_NAME") {
        attrs.push(KeyValue::new("k8s.pod.name", pod));
    }
    if let Ok(ns) = std::env::var("POD_NAMESPACE") {
        attrs.push(KeyValue::new("k8s.namespace.name", ns));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.with_attributes(attrs).build())
        .build())
}

/// How often the OpenTelemetry SDK may log: when the collector is down, it logs each failed export
/// (one a batch, every few seconds), which would drown the operator's own lines. Its span queue is
/// bounded (2,048 by default): the spans that do not fit are dropped, and the operator reconciles
/// on.
const SDK_LOG_EVERY: Duration = Duration::from_secs(60);

/// Lets one line of the OpenTelemetry SDK through per [`SDK_LOG_EVERY`]; every other target passes.
fn sdk_once_a_minute<S>() -> impl tracing_subscriber::layer::Filter<S> {
    let last = Mutex::new(None);
    FilterFn::new(move |meta| {
        !meta.target().starts_with("opentelemetry")
            || allow(&mut last.lock().unwrap_or_else(PoisonError::into_inner), Instant::now(), SDK_LOG_EVERY)
    })
}

/// Whether a line at `now` may pass when the last one passed at `last`, at most one per `every`.
fn allow(last: &mut Option<Instant>, now: Instant, every: Duration) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < every) {
        return false;
    }
    *last = Some(now);
    true
}

/// Installs the global subscriber and propagator. `identity` names this replica in the traces.
pub(crate) fn init(format: LogFormat, identity: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")).and(sdk_once_a_minute());
    let logs = match format {
        LogFormat::Json => {
            fmt::layer().json().flatten_event(true).with_current_span(true).with_span_list(false).boxed()
        }
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
    }
    .with_filter(filter);

    let mut error = None;
    let provider = if env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        provider(identity).map_err(|e| error = Some(e)).ok()
    } else {
        None
    };
    let traces = provider.as_ref().map(|p| {
        let targets = Targets::new()
            .with_target("myapp_operator", Level::INFO)
            .with_target("kube_runtime::controller", Level::INFO);
        tracing_opentelemetry::layer().with_tracer(p.tracer("myapp-operator")).with_filter(targets)
    });
    tracing_subscriber::registry().with(logs).with(traces).with(super::trigger::layer()).init();
    if let Some(e) = error {
        tracing::warn!(error = %e, "OTLP exporter could not be built: traces are off");
    }
    Telemetry { provider }
}

/// The trace id of the current span, as 32 hex digits (empty when not sampled or not traced).
pub(crate) fn current_trace_id() -> String {
    current_span_context().filter(|sc| sc.is_valid()).map(|sc| sc.trace_id().to_string()).unwrap_or_default()
}

/// The trace id of the current span if that trace is sampled (exported), for exemplars.
pub(crate) fn sampled_trace_id() -> Option<String> {
    current_span_context().filter(|sc| sc.is_valid() && sc.is_sampled()).map(|sc| sc.trace_id().to_string())
}

fn current_span_context() -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    Some(cx.span().span_context().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_logs_at_most_once_per_period() {
        let (t0, every) = (Instant::now(), Duration::from_secs(60));
        let mut last = None;
        assert!(allow(&mut last, t0, every), "the first line passes");
        assert!(!allow(&mut last, t0 + Duration::from_secs(5), every), "the next batch's failure does not");
        assert!(!allow(&mut last, t0 + Duration::from_secs(59), every));
        assert!(allow(&mut last, t0 + Duration::from_secs(60), every), "a minute later, one passes again");
        assert!(!allow(&mut last, t0 + Duration::from_secs(65), every));
    }
}
