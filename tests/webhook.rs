//! The admission webhooks through the real API server, served by the running replicas.

mod common;

use common::{TestNamespace, client, eventually};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use myapp_operator::api::MyApp;
use serde_json::json;
use std::time::Duration;

fn myapp(name: &str, spec: serde_json::Value) -> MyApp {
    serde_json::from_value(
        json!({"apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": name}, "spec": spec}),
    )
    .expect("MyApp")
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn defaults_and_labels_are_added() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "defaults").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    let created =
        api.create(&PostParams::default(), &myapp("web", json!({"image": "nginx:1.27"}))).await.expect("create");
    let requests = created.spec.resources.and_then(|r| r.requests).expect("requests defaulted");
    assert_eq!(requests.cpu.as_deref(), Some("50m"));
    assert_eq!(requests.memory.as_deref(), Some("64Mi"));
    let labels = created.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some("web"));
    assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("myapp-operator"));
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn port_change_is_refused_unless_annotated() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "port").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &myapp("web", json!({"image": "nginx:1.27"}))).await.expect("create");
    let change = Patch::Merge(json!({"spec": {"port": 9090}}));
    match api.patch("web", &PatchParams::default(), &change).await {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("spec.port"), "{}", s.message);
            assert!(s.message.contains("denied the request"), "the webhook answered: {}", s.message);
        }
        other => panic!("a port change must be refused: {other:?}"),
    }
    let allowed = Patch::Merge(
        json!({"metadata": {"annotations": {"myapp.dev/allow-port-change": "true"}}, "spec": {"port": 9090}}),
    );
    let app = api.patch("web", &PatchParams::default(), &allowed).await.expect("annotated change");
    assert_eq!(app.spec.port, 9090);
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn server_side_dry_run_runs_admission_and_stores_nothing() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "dryrun").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams { dry_run: true, ..PostParams::default() };
    let out = api.create(&pp, &myapp("web", json!({"image": "nginx:1.27"}))).await.expect("dry run");
    assert!(out.spec.resources.is_some(), "the mutating webhook ran");
    assert!(api.get_opt("web").await.expect("get").is_none(), "nothing stored");
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn certificate_rotation_drops_no_admission() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "rotate").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "myapp-system");
    let before = secrets.get("myapp-operator-webhook-cert").await.expect("the certificate Secret");
    let old_crt = before.data.as_ref().and_then(|d| d.get("tls.crt")).cloned().expect("tls.crt");

    // Admissions in a loop while the serving certificate is rotated.
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    let load = tokio::spawn(async move {
        let pp = PostParams { dry_run: true, ..PostParams::default() };
        let (mut ok, mut failed) = (0, Vec::new());
        let until = tokio::time::Instant::now() + Duration::from_secs(8);
        while tokio::time::Instant::now() < until {
            match api.create(&pp, &myapp("web", json!({"image": "nginx:1.27"}))).await {
                Ok(_) => ok += 1,
                Err(e) => failed.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Make the serving certificate look a day from expiry: the replicas renew it (same CA) and
    // every replica reloads it.
    let soon = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(24);
    let expiring = Patch::Merge(json!({"metadata": {"annotations": {"myapp.dev/not-after": soon.to_string()}}}));
    secrets.patch("myapp-operator-webhook-cert", &PatchParams::default(), &expiring).await.expect("rotate");
    let new_crt = eventually("a new serving certificate", Duration::from_secs(30), || async {
        let s = secrets.get("myapp-operator-webhook-cert").await.ok()?;
        let crt = s.data.as_ref().and_then(|d| d.get("tls.crt")).cloned()?;
        (crt != old_crt).then_some(crt)
    })
    .await;
    assert!(!new_crt.0.is_empty());
    let (ok, failed) = load.await.expect("load");
    assert!(
        failed.is_empty(),
        "{} of {} admissions failed during rotation: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 50, "the load ran ({ok} admissions)");
    ns.cleanup().await;
}

/// The chain of (service, operation) from a span up to its trace's root, through parents
/// (`CHILD_OF`) only.
fn ancestry(trace: &serde_json::Value, span: &serde_json::Value) -> Vec<(String, String)> {
    let spans = trace["spans"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut cur = Some(span.clone());
    while let Some(s) = cur {
        let service = common::service_of(trace, &s).unwrap_or_default();
        out.push((service, s["operationName"].as_str().unwrap_or_default().to_string()));
        let parent = references(&s, "CHILD_OF").into_iter().next().map(|(_, span)| span);
        cur = parent.and_then(|p| spans.iter().find(|x| x["spanID"].as_str() == Some(p.as_str())).cloned());
        if out.len() > 64 {
            break;
        }
    }
    out
}

/// The (trace id, span id) that `span` references with `kind` (`CHILD_OF` for its parent,
/// `FOLLOWS_FROM` for its links).
fn references(span: &serde_json::Value, kind: &str) -> Vec<(String, String)> {
    span["references"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["refType"] == kind)
        .filter_map(|r| Some((r["traceID"].as_str()?.to_string(), r["spanID"].as_str()?.to_string())))
        .collect()
}

/// One trace by id from the local Jaeger.
fn jaeger_trace(id: &str) -> Option<serde_json::Value> {
    let (_, body) = common::http_get(&format!("{}/api/traces/{id}", common::jaeger()))?;
    serde_json::from_str::<serde_json::Value>(&body).ok()?["data"].as_array()?.first().cloned()
}

/// The webhook's span is a root of its own trace (the caller does not choose its parent, nor
/// whether it is sampled), with a link to the API server's call of the webhook.
#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_webhook_spans_are_roots_linked_to_the_api_servers_webhook_calls() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "whtrace").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &myapp("web", json!({"image": "nginx:1.27"}))).await.expect("create");
    for (operation, call) in
        [("webhook /mutate", "Call mutating webhook"), ("webhook /validate", "Call validating webhook")]
    {
        let (own, linked) =
            eventually(&format!("a webhook span linked to {call:?}"), Duration::from_secs(30), || async {
                let traces = common::jaeger_traces("myapp-operator", Some(operation), None, 50)?;
                traces.iter().find_map(|t| {
                    t["spans"].as_array()?.iter().filter(|s| s["operationName"] == operation).find_map(|s| {
                        references(s, "FOLLOWS_FROM").into_iter().find_map(|(trace_id, span_id)| {
                            let linked = jaeger_trace(&trace_id)?;
                            let target =
                                linked["spans"].as_array()?.iter().find(|x| x["spanID"] == span_id.as_str())?;
                            let chain = ancestry(&linked, target);
                            chain.iter().any(|(svc, op)| svc == "apiserver" && op == call).then(|| {
                                let own = s["traceID"].as_str().unwrap_or_default().to_string();
                                ((own, references(s, "CHILD_OF")), (trace_id, chain))
                            })
                        })
                    })
                })
            })
            .await;
        let ((own_trace, parents), (linked_trace, chain)) = (own, linked);
        assert!(parents.is_empty(), "the webhook's span is a root, not a child of {parents:?}");
        assert_ne!(own_trace, linked_trace, "the webhook's span is in a trace of its own");
        assert_eq!(chain[0].0, "apiserver", "the link points at the API server's side: {chain:?}");
    }
    ns.cleanup().await;
}
