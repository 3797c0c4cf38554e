//! Prometheus metrics of the operator, in the OpenMetrics text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a reconcile outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or the error kind.
    pub result: String,
}

/// The exemplar of a reconcile-duration observation: the trace of that reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabels {
    /// W3C trace id (32 hex digits).
    pub trace_id: String,
}

/// Labels of an API write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `deployment`, `service`, `myapp`, `myapp_status`, `event`.
    pub resource: String,
    /// `apply`, `patch`, `delete`, `create`.
    pub verb: String,
}

/// Labels of a webhook request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `/mutate` or `/validate`.
    pub path: String,
    /// `true` or `false`.
    pub allowed: String,
}

/// All metrics of one replica.
pub struct Metrics {
    /// Registry that [`crate::probes`] encodes.
    pub registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Reconcile duration in seconds, with the trace id of a sampled reconcile as exemplar.
    pub reconcile_duration: HistogramWithExemplars<TraceLabels>,
    /// MyApps waiting for a reconcile (see [`crate::controller::queue`]).
    pub queue_depth: Gauge,
    /// API writes made by the controller, by resource and verb.
    pub writes: Family<WriteLabels, Counter>,
    /// 1 while this replica runs the controller.
    pub controller_running: Gauge,
    /// 1 while this replica holds the lease.
    pub is_leader: Gauge,
    /// Times this replica acquired the lease.
    pub leader_transitions: Counter,
    /// Duration of successful lease renewals.
    pub lease_renew_seconds: Histogram,
    /// Time from acquiring the lease to the first finished reconcile of the term.
    pub acquire_to_first_reconcile_seconds: Histogram,
    /// Admission requests answered.
    pub webhook_requests: Family<WebhookLabels, Counter>,
    /// Time to answer an admission request.
    pub webhook_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("myapp_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        let reconcile_duration = HistogramWithExemplars::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_duration.clone());
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "MyApps waiting for a reconcile", queue_depth.clone());
        let writes = Family::<WriteLabels, Counter>::default();
        registry.register("api_writes", "API writes made by the controller", writes.clone());
        let controller_running = Gauge::default();
        registry.register("controller_running", "1 while this replica runs the controller", controller_running.clone());
        let is_leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the lease", is_leader.clone());
        let leader_transitions = Counter::default();
        registry.register("leader_acquisitions", "Times this replica acquired the lease", leader_transitions.clone());
        let lease_renew_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "lease_renew_duration_seconds",
            "Duration of successful lease renewals",
            lease_renew_seconds.clone(),
        );
        let acquire_to_first_reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "acquire_to_first_reconcile_seconds",
            "Time from acquiring the lease to the first finished reconcile",
            acquire_to_first_reconcile_seconds.clone(),
        );
        let webhook_requests = Family::<WebhookLabels, Counter>::default();
        registry.register("webhook_requests", "Admission requests answered", webhook_requests.clone());
        let webhook_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register("webhook_duration_seconds", "Time to answer an admission request", webhook_duration.clone());
        Self {
            registry,
            webhook_requests,
            webhook_duration,
            reconciles,
            reconcile_duration,
            queue_depth,
            writes,
            controller_running,
            is_leader,
            leader_transitions,
            lease_renew_seconds,
            acquire_to_first_reconcile_seconds,
        }
    }
}

impl Metrics {
    /// Counts one write.
    pub fn write(&self, resource: &str, verb: &str) {
        self.writes.get_or_create(&WriteLabels { resource: resource.into(), verb: verb.into() }).inc();
    }

    /// Counts one reconcile, by its result (`ok`, or the error's kind).
    pub fn reconciled(&self, result: &str) {
        self.reconciles.get_or_create(&ResultLabels { result: result.into() }).inc();
    }

    /// Records a reconcile's duration, with its trace id (if it was sampled) as exemplar.
    pub fn reconcile_took(&self, seconds: f64, trace_id: Option<String>) {
        self.reconcile_duration.observe(seconds, trace_id.map(|trace_id| TraceLabels { trace_id }), None);
    }

    /// Counts one admission request.
    pub fn webhook(&self, path: &str, allowed: bool, seconds: f64) {
        self.webhook_requests.get_or_create(&WebhookLabels { path: path.into(), allowed: allowed.to_string() }).inc();
        self.webhook_duration.observe(seconds);
    }

    /// The registry in OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_durations_carry_the_trace_id_as_exemplar() {
        let m = Metrics::default();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        m.reconcile_took(0.003, Some(trace.into()));
        m.reconcile_took(0.5, None);
        m.queue_depth.set(7);
        let text = m.encode();
        let with_exemplar: Vec<&str> = text.lines().filter(|l| l.contains("# {trace_id=")).collect();
        assert_eq!(with_exemplar.len(), 1, "one exemplar, on the bucket of the sampled reconcile:\n{text}");
        assert!(with_exemplar[0].starts_with("myapp_operator_reconcile_duration_seconds_bucket{le=\"0.004\"}"));
        assert!(with_exemplar[0].contains(&format!("trace_id=\"{trace}\"")));
        assert!(text.contains("myapp_operator_reconcile_duration_seconds_count 2"));
        assert!(text.contains("myapp_operator_queue_depth 7"));
    }
}
