//! `cargo xtask otel`: the in-cluster trace pipeline of `otel/`, applied the way its README says,
//! on the real node, with the images built here ([`crate::image::otel`]).
//!
//! 1. `kubectl apply -k otel/` (with the real node's placement added to its two Deployments,
//!    nothing else), and both become Available;
//! 2. `kubectl apply -k otel/operator` on the local overlay: the operator's pods export to the
//!    Collector;
//! 3. a new MyApp's reconcile arrives in the in-cluster Jaeger through the Collector, with its API
//!    calls as children and the resource attributes of `OTEL_RESOURCE_ATTRIBUTES` on its spans;
//! 4. with the Collector scaled to 0, a new MyApp still becomes Ready, and no replica logs the
//!    OpenTelemetry SDK's lines more than once in 20 s.
//!
//! Then the operator goes back to the local overlay and `otel/` is deleted. The figures go to
//! `.run/otel.json`.

use crate::operator::TargetArgs;
use crate::{cluster, cluster::node, install, paths};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The namespace of `otel/`.
const OBSERVABILITY: &str = "observability";
/// The namespace of the traced MyApp.
const WORKLOAD: &str = "otel-e2e";

/// Writes a kustomization in `.run/otel/<name>` over `base` (relative to the repository) with
/// `extra` (YAML lines: patches, more resources), and copies `files` of the repository beside it.
fn kustomization(name: &str, base: &str, extra: &str, files: &[&str]) -> Result<PathBuf> {
    let dir = paths::run_dir().join("otel").join(name);
    std::fs::create_dir_all(&dir)?;
    for f in files {
        let from = paths::repo().join(f);
        std::fs::copy(&from, dir.join(from.file_name().context("file name")?))?;
    }
    let text = format!(
        "# Written by cargo xtask otel.\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - ../../../{base}\n{extra}"
    );
    std::fs::write(dir.join("kustomization.yaml"), text)?;
    Ok(dir)
}

/// The real node's placement for every Deployment of a kustomization (its taint keeps other pods away).
fn placement() -> String {
    let (key, value) = node::LABEL;
    format!(
        "patches:\n  - target:\n      kind: Deployment\n    patch: |-\n\
         \x20     - op: add\n        path: /spec/template/spec/tolerations\n        value:\n\
         \x20         - {{key: {}, operator: Equal, value: {value}, effect: NoSchedule}}\n\
         \x20     - op: add\n        path: /spec/template/spec/nodeSelector\n        value:\n\
         \x20         {key}: {value}\n",
        node::TAINT
    )
}

/// The value of `OTEL_RESOURCE_ATTRIBUTES` in `otel/operator/patch.yaml`, as (key, value) pairs.
fn resource_attributes() -> Result<Vec<(String, String)>> {
    let patch: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(paths::repo().join("otel/operator/patch.yaml"))?)?;
    let env = patch["spec"]["template"]["spec"]["containers"][0]["env"].as_sequence().context("patch: no env")?;
    let value = env
        .iter()
        .find(|e| e["name"] == "OTEL_RESOURCE_ATTRIBUTES")
        .and_then(|e| e["value"].as_str())
        .context("patch: no OTEL_RESOURCE_ATTRIBUTES")?;
    Ok(value.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect())
}

/// The in-cluster Jaeger's query address (its pod, on the node's pod network).
async fn jaeger_query(client: &Client) -> Result<String> {
    let pods = Api::<Pod>::namespaced(client.clone(), OBSERVABILITY)
        .list(&ListParams::default().labels("app.kubernetes.io/name=jaeger"))
        .await?;
    let ip = pods.items.iter().find_map(|p| p.status.as_ref()?.pod_ip.clone()).context("no Jaeger pod IP")?;
    Ok(format!("{ip}:16686"))
}

/// What a reconcile trace in Jaeger shows: its span count, how many `kube <verb>` spans are
/// children of the reconcile span, and the process tags of the operator's spans.
fn judge_trace(trace: &Value) -> (usize, usize, Vec<(String, String)>) {
    let spans = trace["spans"].as_array().cloned().unwrap_or_default();
    let reconcile: Vec<&str> =
        spans.iter().filter(|s| s["operationName"] == "reconcile").filter_map(|s| s["spanID"].as_str()).collect();
    let children =
        spans
            .iter()
            .filter(|s| s["operationName"].as_str().is_some_and(|n| n.starts_with("kube ")))
            .filter(|s| {
                s["references"].as_array().into_iter().flatten().any(|r| {
                    r["refType"] == "CHILD_OF" && r["spanID"].as_str().is_some_and(|id| reconcile.contains(&id))
                })
            })
            .count();
    let tags = trace["processes"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
        .filter(|p| p["serviceName"] == "myapp-operator")
        .flat_map(|p| p["tags"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| Some((t["key"].as_str()?.to_string(), t["value"].as_str()?.to_string())))
        .collect();
    (spans.len(), children, tags)
}

/// Runs the test; see the module doc.
pub async fn run(args: TargetArgs) -> Result<Figures> {
    let target = args.resolve().await?;
    if !target.local {
        bail!("cargo xtask otel needs the local control plane's real node (it loads images into it)");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    crate::image::otel::import()?;
    install::prepare(&client).await?;
    let pipeline = kustomization("pipeline", "otel", &placement(), &[])?;
    let operator =
        kustomization("operator", install::OVERLAY, "patches:\n  - path: patch.yaml\n", &["otel/operator/patch.yaml"])?;
    let result = pipeline_and_trace(&client, &target.kubeconfig, &pipeline, &operator).await;
    println!("==> the operator back on the local overlay; otel/ deleted");
    let _ = Api::<Namespace>::all(client.clone()).delete(WORKLOAD, &DeleteParams::default()).await;
    install::apply(&client, &target.kubeconfig).await?;
    install::kubectl_k("delete", &pipeline, &target.kubeconfig)?;
    let figures = result?;
    std::fs::write(paths::run_dir().join("otel.json"), serde_json::to_string_pretty(&figures)?)?;
    Ok(figures)
}

/// `.run/otel.json`: what [`run`] measured.
#[derive(Serialize)]
pub struct Figures {
    collector_down: CollectorDown,
    /// From `kubectl apply -k otel/` to its Deployments Available.
    pipeline_available_s: f64,
    operator_rolled_out_s: f64,
    /// From the MyApp's create to its reconcile's trace in the in-cluster Jaeger.
    trace_arrived_after_s: f64,
    spans: usize,
    api_calls_as_children: usize,
    /// `key=value`, as `otel/operator/patch.yaml` sets them.
    resource_attributes: Vec<String>,
}

/// The operator with the Collector scaled to 0.
#[derive(Serialize)]
struct CollectorDown {
    myapp_ready_after_s: f64,
    window_s: u64,
    /// Each replica's OpenTelemetry SDK log lines in the window.
    sdk_lines_per_replica: Vec<(String, usize)>,
}

/// `kubectl apply -k otel/` until the Collector and Jaeger are Available; how long it took.
async fn pipeline_available(client: &Client, kubeconfig: &Path, pipeline: &Path) -> Result<f64> {
    println!("==> kubectl apply -k otel/ (on the real node)");
    let t = Instant::now();
    install::kubectl_k("apply", pipeline, kubeconfig)?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), OBSERVABILITY);
    chaos::wait::poll(
        "otel/'s Deployments Available",
        Duration::from_secs(180),
        Duration::from_millis(250),
        || async {
            let l = deployments.list(&ListParams::default()).await.ok()?;
            (l.items.len() == 2 && l.items.iter().all(|d| chaos::pods::rolled_out(d, d.spec.replicas.unwrap_or(1))))
                .then_some(())
        },
    )
    .await?;
    let available = t.elapsed().as_secs_f64();
    println!("    the Collector and Jaeger Available after {available:.1} s");
    collector_reachable(client).await?;
    println!(
        "    the Collector's Service answers through kube-proxy {:.1} s after the apply",
        t.elapsed().as_secs_f64()
    );
    Ok(available)
}

/// Waits until the Collector's Service takes a connection on its ClusterIP from the node, as the
/// operator's exporter will: an Available pod is reachable through its Service only once
/// kube-proxy has programmed it, and a batch of spans exported before then is lost (the same
/// wait as `install::webhooks_answer`'s for the webhooks).
async fn collector_reachable(client: &Client) -> Result<()> {
    let service = Api::<Service>::namespaced(client.clone(), OBSERVABILITY).get("otel-collector").await?;
    let ip: std::net::IpAddr =
        service.spec.and_then(|s| s.cluster_ip).context("the Collector's Service has no ClusterIP")?.parse()?;
    let addr = std::net::SocketAddr::new(ip, 4317);
    chaos::wait::poll(
        "the Collector's Service reachable",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async { std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok().map(|_| ()) },
    )
    .await
}

async fn pipeline_and_trace(client: &Client, kubeconfig: &Path, pipeline: &Path, operator: &Path) -> Result<Figures> {
    let available = pipeline_available(client, kubeconfig, pipeline).await?;
    println!("==> kubectl apply -k otel/operator (on the local overlay)");
    let rolled_out = install::apply_kustomization(client, kubeconfig, operator).await?.as_secs_f64();
    println!("    the operator's pods rolled out in {rolled_out:.1} s");

    crate::operator::apply_namespace(client, WORKLOAD).await?;
    let apps = Api::<myapp_operator::api::MyApp>::namespaced(client.clone(), WORKLOAD);
    let t = Instant::now();
    apps.create(&PostParams::default(), &chaos::fixtures::nginx("traced", 1)?).await?;
    let query = jaeger_query(client).await?;
    let path = crate::demo::reconcile_traces(&format!("{WORKLOAD}/traced"), 20);
    let found = chaos::wait::poll(
        "the reconcile's trace in the in-cluster Jaeger",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let (200, body) = chaos::plain_http::request(&query, "GET", &path, None).ok()? else { return None };
            let v: Value = serde_json::from_str(&body).ok()?;
            v["data"]
                .as_array()?
                .iter()
                .map(judge_trace)
                .find(|(_, children, _)| *children > 0)
                .map(|j| (j, t.elapsed()))
        },
    )
    .await;
    let ((spans, children, process_tags), arrived) = found?;
    let want = resource_attributes()?;
    let missing: Vec<_> = want.iter().filter(|kv| !process_tags.contains(kv)).collect();
    println!(
        "    a reconcile of {WORKLOAD}/traced arrived through the Collector {:.1} s after the create: {spans} spans, \
         {children} API calls as children of the reconcile; resource attributes {want:?} {}",
        arrived.as_secs_f64(),
        if missing.is_empty() { "on its spans" } else { "MISSING" }
    );
    if !missing.is_empty() {
        bail!("the operator's spans lack {missing:?} (OTEL_RESOURCE_ATTRIBUTES); they carry {process_tags:?}");
    }
    let collector_down = collector_down(client).await?;
    Ok(Figures {
        collector_down,
        pipeline_available_s: available,
        operator_rolled_out_s: rolled_out,
        trace_arrived_after_s: arrived.as_secs_f64(),
        spans,
        api_calls_as_children: children,
        resource_attributes: want.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    })
}

/// How long the operator runs with the Collector gone: four export batches (5 s apart).
const DOWN_FOR: Duration = Duration::from_secs(20);

/// The Collector scaled to 0: the operator reconciles a new MyApp to Ready all the same, and each
/// replica logs the failed exports at most once in [`DOWN_FOR`] (the SDK's lines pass once a minute).
async fn collector_down(client: &Client) -> Result<CollectorDown> {
    use kube::api::{LogParams, Patch, PatchParams};
    println!("==> the Collector scaled to 0");
    let deployments = Api::<Deployment>::namespaced(client.clone(), OBSERVABILITY);
    let zero = json!({"spec": {"replicas": 0}});
    deployments.patch("otel-collector", &PatchParams::default(), &Patch::Merge(&zero)).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), OBSERVABILITY);
    chaos::wait::poll("the Collector's pod gone", Duration::from_secs(60), Duration::from_millis(250), || async {
        let l = pods.list(&ListParams::default().labels("app.kubernetes.io/name=otel-collector")).await.ok()?;
        l.items.is_empty().then_some(())
    })
    .await?;
    let down = Instant::now();
    let apps = Api::<myapp_operator::api::MyApp>::namespaced(client.clone(), WORKLOAD);
    apps.create(&PostParams::default(), &chaos::fixtures::nginx("untraced", 1)?).await?;
    chaos::wait::poll(
        "a MyApp Ready with the Collector down",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            apps.get("untraced").await.ok().filter(myapp_operator::api::MyApp::ready_at_generation).map(|_| ())
        },
    )
    .await?;
    let ready = down.elapsed().as_secs_f64();
    // A window of time to observe, not a condition to wait for.
    tokio::time::sleep(DOWN_FOR.saturating_sub(down.elapsed())).await;
    let mut lines = Vec::new();
    for p in install::pods(client).await? {
        let name = p.metadata.name.clone().unwrap_or_default();
        let since = Some(down.elapsed().as_secs() as i64 + 1);
        let log = Api::<Pod>::namespaced(client.clone(), crate::operator::NAMESPACE)
            .logs(&name, &LogParams { since_seconds: since, ..Default::default() })
            .await?;
        lines.push((name, log.lines().filter(|l| l.contains("\"target\":\"opentelemetry")).count()));
    }
    println!(
        "    a MyApp Ready {ready:.1} s after its creation; the SDK's lines per replica in {} s: {lines:?}",
        DOWN_FOR.as_secs()
    );
    if let Some((pod, n)) = lines.iter().find(|(_, n)| *n > 1) {
        bail!("{pod} logged {n} lines of the OpenTelemetry SDK in {} s: at most one a minute", DOWN_FOR.as_secs());
    }
    // No lower bound: in the runs so far the SDK logged nothing in this window (its exports to a
    // Service without endpoints had not failed by then), so only the upper bound is checked.
    Ok(CollectorDown { myapp_ready_after_s: ready, window_s: DOWN_FOR.as_secs(), sdk_lines_per_replica: lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_judged_by_the_api_calls_under_its_reconcile_span_and_its_process_tags() {
        let trace = json!({
            "spans": [
                {"spanID": "r", "operationName": "reconcile", "references": []},
                {"spanID": "a", "operationName": "kube patch", "references": [{"refType": "CHILD_OF", "spanID": "r"}]},
                {"spanID": "b", "operationName": "kube get", "references": [{"refType": "CHILD_OF", "spanID": "x"}]},
            ],
            "processes": {"p1": {"serviceName": "myapp-operator", "tags": [{"key": "k8s.cluster.name", "value": "c"}]}},
        });
        let (spans, children, tags) = judge_trace(&trace);
        assert_eq!((spans, children), (3, 1));
        assert_eq!(tags, [("k8s.cluster.name".to_string(), "c".to_string())]);
    }

    #[test]
    fn the_patch_sets_resource_attributes() {
        let attrs = resource_attributes().expect("attributes");
        assert!(attrs.iter().any(|(k, _)| k == "k8s.cluster.name"), "{attrs:?}");
    }

    #[test]
    fn the_placement_patch_is_yaml_that_tolerates_the_taint_and_selects_the_node() {
        let text = format!("resources: [x]\n{}", placement());
        let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let ops: serde_yaml::Value =
            serde_yaml::from_str(v["patches"][0]["patch"].as_str().expect("patch")).expect("ops");
        assert_eq!(ops[0]["value"][0]["key"], node::TAINT);
        assert_eq!(ops[1]["value"][node::LABEL.0], node::LABEL.1);
        assert_eq!(v["patches"][0]["target"]["kind"], "Deployment");
    }
}
