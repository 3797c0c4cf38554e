//! Prometheus metrics of the operator, in the OpenMetrics text format.
//!
//! Every label takes its values from a fixed set (a result kind, a path, a condition, an HTTP
//! status the server itself answers), never from user input such as a MyApp's name or
//! namespace, so the number of series is bounded whatever the cluster holds. The operator's own
//! metrics carry the prefix `myapp_operator_`; the process metrics ([`super::process`]) have the
//! names every Prometheus client library gives them (`process_resident_memory_bytes`, ...).

use super::process::ProcessCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

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

/// Labels of a webhook request answered with an HTTP error instead of an AdmissionReview.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookErrorLabels {
    /// `/mutate` or `/validate`.
    pub path: String,
    /// The HTTP status answered: one the server itself chooses (400, 408, 413, 500, 503).
    pub code: String,
}

/// Labels of a count of MyApps: one of their kstatus conditions and its status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// `Ready`, `Reconciling` or `Stalled`.
    pub condition: String,
    /// `True`, `False` or `Unknown` (also for a MyApp that has no such condition yet).
    pub status: String,
}

/// The label set of a series that has no labels, for a [`Family`] that is either empty (the
/// value is not known: nothing is exported) or holds that one series.
pub type NoLabels = Vec<(String, String)>;

/// Buckets of the webhook latency, from 100 µs doubling to 6.55 s: beyond the 5 s
/// `timeoutSeconds` of the webhook configurations (`deploy/webhook/webhooks.yaml`), so that a
/// p99 near the API server's timeout can be told from one far below it.
pub const WEBHOOK_BUCKETS: (f64, f64, u16) = (0.0001, 2.0, 17);

/// All metrics of one replica.
pub struct Metrics {
    /// Registry that [`crate::probes`] encodes: the process metrics at its root, the operator's
    /// own under the prefix `myapp_operator`.
    pub registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Reconcile duration in seconds, with the trace id of a sampled reconcile as exemplar.
    pub reconcile_duration: HistogramWithExemplars<TraceLabels>,
    /// MyApps waiting for a reconcile (see `crate::controller::queue`).
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
    /// Admission requests answered with an HTTP error, by path and status.
    pub webhook_errors: Family<WebhookErrorLabels, Counter>,
    /// The `notAfter` of the serving certificate the webhook server serves, in unix seconds;
    /// no series until a certificate is loaded.
    pub certificate_expiry: Family<NoLabels, Gauge>,
    /// MyApps in this replica's cache, by condition and status (see [`super::myapps`]).
    pub myapps: Family<ConditionLabels, Gauge>,
    /// The earliest `lastTransitionTime` of a `Ready` condition that is not `True`, in unix
    /// seconds: since when the longest-waiting MyApp has not been Ready. No series when every
    /// MyApp is Ready.
    pub not_ready_since: Family<NoLabels, Gauge>,
}

/// The name and help of each metric, in the order `/metrics` lists them (after `build`).
type Row = (&'static str, &'static str);
const RECONCILES: Row = ("reconciles", "Reconciles by result");
const RECONCILE_DURATION: Row = ("reconcile_duration_seconds", "Time spent in one reconcile");
const QUEUE_DEPTH: Row = ("queue_depth", "MyApps waiting for a reconcile");
const WRITES: Row = ("api_writes", "API writes made by the controller");
const CONTROLLER_RUNNING: Row = ("controller_running", "1 while this replica runs the controller");
const IS_LEADER: Row = ("leader", "1 while this replica holds the lease");
const LEADER_TRANSITIONS: Row = ("leader_acquisitions", "Times this replica acquired the lease");
const LEASE_RENEW_SECONDS: Row = ("lease_renew_duration_seconds", "Duration of successful lease renewals");
const ACQUIRE_TO_FIRST_RECONCILE_SECONDS: Row =
    ("acquire_to_first_reconcile_seconds", "Time from acquiring the lease to the first finished reconcile");
const WEBHOOK_REQUESTS: Row = ("webhook_requests", "Admission requests answered");
const WEBHOOK_DURATION: Row = ("webhook_duration_seconds", "Time to answer an admission request");
const WEBHOOK_ERRORS: Row =
    ("webhook_errors", "Admission requests answered with an HTTP error instead of an AdmissionReview");
const CERTIFICATE_EXPIRY: Row = (
    "webhook_certificate_expiration_timestamp_seconds",
    "notAfter of the serving certificate of the webhook server, in unix seconds",
);
const MYAPPS: Row = ("myapps", "MyApps in this replica's cache, by condition and status");
const NOT_READY_SINCE: Row = (
    "myapps_not_ready_since_timestamp_seconds",
    "Since when the longest-waiting MyApp has not been Ready (its Ready condition's lastTransitionTime)",
);

impl Default for Metrics {
    /// Every metric, registered under `myapp_operator_` in the order of the rows above.
    fn default() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector::new()));
        let r = root.sub_registry_with_prefix("myapp_operator");
        let build = Info::new(vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())]);
        r.register("build", "The operator's version; the value is always 1", build);
        let (start, factor, count) = WEBHOOK_BUCKETS;
        Self {
            reconciles: registered(r, RECONCILES, Family::default()),
            reconcile_duration: registered(
                r,
                RECONCILE_DURATION,
                HistogramWithExemplars::new(exponential_buckets(0.001, 2.0, 14)),
            ),
            queue_depth: registered(r, QUEUE_DEPTH, Gauge::default()),
            writes: registered(r, WRITES, Family::default()),
            controller_running: registered(r, CONTROLLER_RUNNING, Gauge::default()),
            is_leader: registered(r, IS_LEADER, Gauge::default()),
            leader_transitions: registered(r, LEADER_TRANSITIONS, Counter::default()),
            lease_renew_seconds: registered(
                r,
                LEASE_RENEW_SECONDS,
                Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            ),
            acquire_to_first_reconcile_seconds: registered(
                r,
                ACQUIRE_TO_FIRST_RECONCILE_SECONDS,
                Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ),
            webhook_requests: registered(r, WEBHOOK_REQUESTS, Family::default()),
            webhook_duration: registered(
                r,
                WEBHOOK_DURATION,
                Histogram::new(exponential_buckets(start, factor, count)),
            ),
            webhook_errors: registered(r, WEBHOOK_ERRORS, Family::default()),
            certificate_expiry: registered(r, CERTIFICATE_EXPIRY, Family::default()),
            myapps: registered(r, MYAPPS, Family::default()),
            not_ready_since: registered(r, NOT_READY_SINCE, Family::default()),
            registry: root,
        }
    }
}

/// Registers `metric` in `registry` under its row's name and help, and returns it.
fn registered<M: Metric + Clone>(registry: &mut Registry, (name, help): Row, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
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

    /// Counts one admission request answered with the HTTP error `code`.
    pub fn webhook_error(&self, path: &str, code: u16) {
        self.webhook_errors.get_or_create(&WebhookErrorLabels { path: path.into(), code: code.to_string() }).inc();
    }

    /// Records the `notAfter` (unix seconds) of the serving certificate just loaded.
    pub fn certificate_loaded(&self, not_after: i64) {
        self.certificate_expiry.get_or_create(&NoLabels::new()).set(not_after);
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

    #[test]
    fn build_info_names_the_version() {
        let text = Metrics::default().encode();
        let line = format!("myapp_operator_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }

    #[test]
    fn the_certificate_expiry_is_exported_only_once_known() {
        let m = Metrics::default();
        let name = "myapp_operator_webhook_certificate_expiration_timestamp_seconds";
        assert!(!m.encode().lines().any(|l| l.starts_with(name)), "no value before a certificate is loaded");
        m.certificate_loaded(1_900_000_000);
        m.certificate_loaded(1_907_776_000);
        let text = m.encode();
        let values: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix(name)).collect();
        assert_eq!(values, [" 1907776000"], "one series without labels, the last certificate's:\n{text}");
    }

    #[test]
    fn process_metrics_have_their_usual_names_beside_the_prefixed_ones() {
        let text = Metrics::default().encode();
        assert!(text.lines().any(|l| l.starts_with("process_start_time_seconds ")), "{text}");
        if cfg!(target_os = "linux") {
            let rss = text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes "));
            assert!(rss.and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0), "{text}");
            assert!(text.lines().any(|l| l.starts_with("process_cpu_seconds_total ")), "{text}");
        }
        assert!(!text.contains("myapp_operator_process_"), "process metrics are not prefixed:\n{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
