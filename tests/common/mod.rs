//! Helpers shared by the tests that run against a real API server.
//!
//! These tests are `#[ignore]`d so that a plain `cargo test` needs no cluster; `cargo xtask test`
//! starts the local control plane (or uses the cluster it is pointed at), starts the operator, and
//! runs them with `--include-ignored`. What they need comes from the environment:
//! - `KUBECONFIG`: the cluster;
//! - `MYAPP_E2E_AUDIT_LOG`: the API server's audit log (local control plane only);
//! - `MYAPP_E2E_JAEGER`: the Jaeger query API, e.g. `http://127.0.0.1:16686` (local only);
//! - `MYAPP_E2E_OPERATOR_LOGS`: the log files of the operator replicas, separated by `:`.
#![allow(dead_code)]

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// The user agent of the test client, to tell its writes from the operator's in the audit log.
pub const USER_AGENT: &str = "myapp-e2e";

/// The configuration of the cluster under test, with the tests' user agent.
pub async fn config() -> Config {
    let mut config = match std::env::var_os("KUBECONFIG") {
        Some(path) => {
            let kc = Kubeconfig::read_from(PathBuf::from(path)).expect("read KUBECONFIG");
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig")
        }
        None => Config::infer().await.expect("no KUBECONFIG and no in-cluster config: run `cargo xtask test`"),
    };
    config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static(USER_AGENT)));
    config
}

/// A client for the cluster under test.
pub async fn client() -> Client {
    Client::try_from(config().await).expect("client")
}

/// A namespace of its own for one test; delete it with [`TestNamespace::cleanup`] on success
/// (a failed test leaves it for inspection).
pub struct TestNamespace {
    /// The namespace name.
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<random>`.
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let suffix: u32 = rand::random::<u32>() % 1_000_000;
        let name = format!("e2e-{prefix}-{suffix:06}");
        let ns: Namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "labels": {"myapp.dev/e2e": "true"}}}),
        )
        .expect("namespace");
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        Self { name, client: client.clone() }
    }

    /// Deletes the namespace (without waiting).
    pub async fn cleanup(self) {
        let _ = Api::<Namespace>::all(self.client).delete(&self.name, &DeleteParams::default()).await;
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match chaos::wait::within(timeout, Duration::from_millis(100), f).await {
        Some(v) => v,
        None => panic!("timed out after {:?} waiting for {what}", timeout),
    }
}

/// The audit log, when the cluster under test is the local control plane.
pub fn audit_log() -> Option<PathBuf> {
    std::env::var_os("MYAPP_E2E_AUDIT_LOG").map(PathBuf::from)
}

/// Every audit event recorded so far.
pub fn audit_events() -> Vec<serde_json::Value> {
    let path = audit_log().expect("MYAPP_E2E_AUDIT_LOG is set by `cargo xtask test` on the local control plane");
    let content = std::fs::read_to_string(&path).expect("read the audit log");
    content.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Audit events of writes in `namespace` whose user agent starts with `agent_prefix`.
pub fn audit_writes(namespace: &str, agent_prefix: &str) -> Vec<serde_json::Value> {
    audit_events()
        .into_iter()
        .filter(|e| {
            e["verb"].as_str().is_some_and(chaos::audit::is_write_verb)
                && e["objectRef"]["namespace"].as_str() == Some(namespace)
                && e["userAgent"].as_str().is_some_and(|a| a.starts_with(agent_prefix))
        })
        .collect()
}

/// A plain HTTP GET on loopback (Jaeger's query API, the operator's metrics).
pub use chaos::plain_http::get_url as http_get;

pub use chaos::plain_http::query_escape;

/// The local Jaeger's query API, e.g. `http://127.0.0.1:16686` (`MYAPP_E2E_JAEGER`, set by
/// `cargo xtask test` on the local control plane).
pub fn jaeger() -> String {
    std::env::var("MYAPP_E2E_JAEGER").expect("MYAPP_E2E_JAEGER is set by `cargo xtask test`")
}

/// Traces of `service` from the last hour (at most `limit`), of one `operation` and with `tags`
/// (a JSON object of span tags) when given. None while Jaeger cannot answer.
pub fn jaeger_traces(
    service: &str,
    operation: Option<&str>,
    tags: Option<&serde_json::Value>,
    limit: usize,
) -> Option<Vec<serde_json::Value>> {
    let mut url = format!("{}/api/traces?service={}&limit={limit}&lookback=1h", jaeger(), query_escape(service));
    if let Some(op) = operation {
        url += &format!("&operation={}", query_escape(op));
    }
    if let Some(tags) = tags {
        url += &format!("&tags={}", query_escape(&tags.to_string()));
    }
    let (_, body) = http_get(&url)?;
    serde_json::from_str::<serde_json::Value>(&body).ok()?["data"].as_array().cloned()
}

/// Every span of `traces`.
pub fn spans_of(traces: &[serde_json::Value]) -> impl Iterator<Item = &serde_json::Value> {
    traces.iter().flat_map(|t| t["spans"].as_array().into_iter().flatten())
}

/// The service of `span`, a span of `trace`.
pub fn service_of(trace: &serde_json::Value, span: &serde_json::Value) -> Option<String> {
    let pid = span["processID"].as_str()?;
    trace["processes"][pid]["serviceName"].as_str().map(str::to_string)
}

/// The value of the span tag `key`, as a string.
pub fn tag(span: &serde_json::Value, key: &str) -> Option<String> {
    span["tags"].as_array()?.iter().find(|t| t["key"] == key)?["value"].as_str().map(str::to_string)
}

/// The `reconcile` span of a Jaeger trace, and the span ids of the API calls (`kube <verb> <path>`
/// spans) that are its children.
pub fn reconcile_and_calls(trace: &serde_json::Value) -> Option<(&serde_json::Value, Vec<&str>)> {
    let spans = trace["spans"].as_array()?;
    let reconcile = spans.iter().find(|s| s["operationName"] == "reconcile")?;
    let rid = reconcile["spanID"].as_str()?;
    let calls = spans
        .iter()
        .filter(|s| s["operationName"].as_str().is_some_and(|o| o.starts_with("kube ")) && refers_to(s, rid))
        .filter_map(|s| s["spanID"].as_str())
        .collect();
    Some((reconcile, calls))
}

/// True when `span` references (child of, or follows from) the span `id`.
pub fn refers_to(span: &serde_json::Value, id: &str) -> bool {
    span["references"].as_array().is_some_and(|r| r.iter().any(|r| r["spanID"].as_str() == Some(id)))
}
