//! The admission webhooks through the real API server, served by the running replicas.

mod common;

use base64::Engine;
use common::{TestNamespace, client, eventually};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use myapp_operator::api::policy::Policy;
use myapp_operator::api::{FINALIZER, MyApp};
use myapp_operator::telemetry::metrics::Metrics;
use myapp_operator::webhook::limits::Limits;
use myapp_operator::webhook::{CertSource, Shared, Webhooks, certs};
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

fn myapp(name: &str, spec: serde_json::Value) -> MyApp {
    chaos::fixtures::myapp(name, spec).expect("MyApp")
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

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn names_that_cannot_name_a_service_are_refused() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "names").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    // Each is a valid name for a MyApp (a DNS subdomain), and none is for a Service.
    let long = "a".repeat(64);
    for name in ["web.v2", "1web", long.as_str()] {
        match api.create(&PostParams::default(), &myapp(name, json!({"image": "nginx:1.27"}))).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{name}: {s:?}");
                assert!(s.message.contains("metadata.name"), "{name}: the field is named: {}", s.message);
                assert!(s.message.contains("DNS-1035"), "{name}: the rule is named: {}", s.message);
            }
            other => panic!("{name} was not refused: {other:?}"),
        }
    }
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let longest = "a".repeat(63);
    api.create(&dry_run, &myapp(&longest, json!({"image": "nginx:1.27"}))).await.expect("63 characters are fine");
    ns.cleanup().await;
}

/// This crate's `/validate`, served in the test process under a policy of the test's choosing
/// and registered with the API server for one namespace only, with the rules and failure policy
/// of deploy/webhook/webhooks.yaml. This is how a test tightens the policy: the shared replicas
/// take theirs from flags and are not restarted. The API server calls it on 127.0.0.1, which only
/// the local control plane can (hence `local_only_`).
struct PolicyWebhook {
    name: String,
    server: Webhooks,
    dir: std::path::PathBuf,
    client: Client,
}

impl PolicyWebhook {
    /// Serves `policy` and registers it for namespace `ns`; returns once the API server calls it
    /// (a dry-run create of `probe` is refused naming `field`).
    async fn start(client: &Client, ns: &str, policy: Policy, probe: &MyApp, field: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let now = time::OffsetDateTime::now_utc();
        let bundle = certs::issue(&["127.0.0.1".to_string()], None, now).expect("a serving certificate");
        let dir = std::env::temp_dir().join(format!("myapp-e2e-webhook-{ns}"));
        std::fs::create_dir_all(&dir).expect("certificate folder");
        for (file, pem) in
            [(certs::CA_CRT, &bundle.ca_crt), (certs::TLS_CRT, &bundle.tls_crt), (certs::TLS_KEY, &bundle.tls_key)]
        {
            std::fs::write(dir.join(file), pem).expect("write the certificate");
        }
        let source = CertSource::Dir { dir: dir.clone(), server_name: "127.0.0.1".into() };
        let shared = Arc::new(Shared::new(policy, Arc::new(Metrics::default()), Limits::default()));
        let addr = "127.0.0.1:0".parse().expect("address");
        let server = Webhooks::start(client.clone(), addr, source, shared).await.expect("serve /validate");

        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/webhook/webhooks.yaml");
        let text = std::fs::read_to_string(path).expect("read webhooks.yaml");
        let mut config = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
            .find(|doc: &serde_json::Value| doc["kind"] == "ValidatingWebhookConfiguration")
            .expect("a ValidatingWebhookConfiguration in webhooks.yaml");
        let name = format!("myapp-e2e-{ns}");
        config["metadata"] = json!({"name": name, "labels": {"myapp.dev/e2e": "true"}});
        let ca = base64::engine::general_purpose::STANDARD.encode(&bundle.ca_crt);
        for w in config["webhooks"].as_array_mut().into_iter().flatten() {
            let url = format!("https://127.0.0.1:{}/validate", server.addr.port());
            w["clientConfig"] = json!({"url": url, "caBundle": ca});
            w["namespaceSelector"] = json!({"matchLabels": {"kubernetes.io/metadata.name": ns}});
        }
        let config: ValidatingWebhookConfiguration = serde_json::from_value(config).expect("configuration");
        let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        configs.create(&PostParams::default(), &config).await.expect("register the webhook");
        let hook = Self { name, server, dir, client: client.clone() };

        let api: Api<MyApp> = Api::namespaced(client.clone(), ns);
        let dry_run = PostParams { dry_run: true, ..PostParams::default() };
        eventually("the API server calling the test's webhook", Duration::from_secs(30), || async {
            match api.create(&dry_run, probe).await {
                Err(kube::Error::Api(s)) if s.message.contains(field) => Some(()),
                _ => None,
            }
        })
        .await;
        hook
    }

    /// Runs `test` with this webhook in place, then removes it, even when `test` panics (a
    /// webhook that fails closed must not outlive its server).
    async fn around(self, test: impl Future<Output = ()> + Send + 'static) {
        let outcome = tokio::spawn(test).await;
        let configs: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        let _ = configs.delete(&self.name, &DeleteParams::default()).await;
        let _ = self.server.shutdown(Duration::from_secs(1)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Err(e) = outcome {
            match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("the test did not finish: {e}"),
            }
        }
    }
}

/// The API server's refusal of `result`, which must name `field`.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>, field: &str) -> String {
    match result {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains(field), "{field} is not named: {}", s.message);
            assert!(s.message.contains("denied the request"), "the webhook answered: {}", s.message);
            s.message
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local control plane: run `cargo xtask test`"]
async fn local_only_kubectl_scale_is_held_to_the_replica_cap() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "scalecap").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &myapp("web", json!({"image": "nginx:1.27", "replicas": 1})))
        .await
        .expect("create");
    let policy = Policy { max_replicas: Some(3), ..Policy::default() };
    let probe = myapp("probe", json!({"image": "nginx:1.27", "replicas": 4}));
    let hook =
        PolicyWebhook::start(&client, &ns.name, policy, &probe, "spec.replicas: 4 is more than the allowed 3").await;
    let namespace = ns.name.clone();
    hook.around(async move {
        // What `kubectl scale myapp/web --replicas=5` sends: a merge patch of the scale subresource.
        let scale = |n: i32| Patch::Merge(json!({"spec": {"replicas": n}}));
        let message = refusal(api.patch_scale("web", &PatchParams::default(), &scale(5)).await, "spec.replicas");
        assert!(message.contains("5 is more than the allowed 3"), "{message}");
        if let Ok(kubectl) = std::env::var("MYAPP_E2E_KUBECTL") {
            // Async: a blocking wait would hold a runtime worker, and with it, possibly, the
            // in-process webhook server that must answer this very request.
            let out = tokio::process::Command::new(kubectl)
                .args(["-n", &namespace, "scale", "myapp/web", "--replicas=7"])
                .output()
                .await
                .expect("run kubectl");
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && said.contains("spec.replicas"), "kubectl scale was not refused: {said}");
        }
        assert_eq!(api.get("web").await.expect("get").spec.replicas, 1, "nothing was scaled");
        api.patch_scale("web", &PatchParams::default(), &scale(3)).await.expect("within the cap");
        assert_eq!(api.get("web").await.expect("get").spec.replicas, 3);
    })
    .await;
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the local control plane: run `cargo xtask test`"]
async fn local_only_a_tightened_policy_never_traps_a_namespace_in_deletion() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "ratchet").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let names = ["web-0", "web-1", "web-2"];
    let spec = json!({"image": "nginx:1.27", "replicas": 2, "env": [{"name": "MODE", "value": "e2e"}]});
    for name in names {
        api.create(&PostParams::default(), &myapp(name, spec.clone())).await.expect("create");
    }
    for name in names {
        eventually(&format!("{name} with its finalizer and Deployment"), Duration::from_secs(60), || async {
            let app = api.get(name).await.ok()?;
            deployments.get_opt(name).await.ok()??;
            app.finalizers().iter().any(|f| f == FINALIZER).then_some(())
        })
        .await;
    }

    // The admin tightens the policy: every MyApp here now breaks each of its rules.
    let policy = Policy {
        allowed_registries: vec!["registry.internal:5000".into()],
        forbidden_env: vec!["MODE".into()],
        max_replicas: Some(1),
    };
    let probe = myapp("probe", json!({"image": "registry.internal:5000/app:1", "replicas": 2}));
    let hook =
        PolicyWebhook::start(&client, &ns.name, policy, &probe, "spec.replicas: 2 is more than the allowed 1").await;
    let namespace = ns.name.clone();
    hook.around(async move {
        // What it changes is checked; what it leaves alone is not.
        let touch = Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}}));
        api.patch("web-0", &PatchParams::default(), &touch).await.expect("a metadata-only update");
        let more = Patch::Merge(json!({"spec": {"replicas": 3}}));
        let message = refusal(api.patch("web-0", &PatchParams::default(), &more).await, "spec.replicas");
        assert!(!message.contains("spec.image") && !message.contains("spec.env"), "unchanged fields: {message}");

        // Deleting the namespace deletes the MyApps, whose finalizers the operator removes with
        // updates that this webhook is called for.
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces.delete(&namespace, &DeleteParams::default()).await.expect("delete the namespace");
        eventually("the namespace gone", Duration::from_secs(120), || async {
            matches!(namespaces.get_opt(&namespace).await, Ok(None)).then_some(())
        })
        .await;
    })
    .await;
}
