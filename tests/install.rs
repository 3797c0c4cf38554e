//! The install as users run it, on the local control plane's real node: `kubectl apply -k` of
//! `deploy/` (through `deploy/overlays/local`, which changes only the image, the placement and
//! the trace endpoint), three operator pods that really run the image, the webhooks answering
//! through their Service, the examples Ready, and a pod's reconcile in Jaeger.
//!
//! Run by `cargo xtask test` when the real node is up (`MYAPP_E2E_NODE` names it), after the
//! image is imported and with no operator process running on the host.

mod common;

use common::{TestNamespace, client, eventually};
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use myapp_operator::api::MyApp;
use std::process::Command;
use std::time::{Duration, Instant};

const NAMESPACE: &str = "myapp-system";
const SELECTOR: &str = "app.kubernetes.io/name=myapp-operator,app.kubernetes.io/component=controller";
/// The webhook configurations (both kinds) and the certificate Secret of the install.
const WEBHOOKS: &str = "myapp-operator";
const CERT_SECRET: &str = "myapp-operator-webhook-cert";

fn node() -> String {
    std::env::var("MYAPP_E2E_NODE").expect("MYAPP_E2E_NODE (the real node) is set by `cargo xtask test`")
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let bin = std::env::var("MYAPP_E2E_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(bin).args(args).output().expect("run kubectl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The state and last log lines of every operator pod (and its previous container's, after a
/// restart).
async fn pod_logs(pods: &Api<Pod>) -> String {
    match pods.list(&ListParams::default().labels(SELECTOR)).await {
        Ok(list) => chaos::pods::logs(pods, &list.items).await,
        Err(_) => "cannot list the operator pods".into(),
    }
}

/// Waits until the operator's Deployment has rolled out `want` ready pods; on timeout, fails with
/// every pod's last log lines (a crash loop shows there). Returns how long it took.
async fn rolled_out(client: &kube::Client, want: i32, timeout: Duration) -> Duration {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let started = Instant::now();
    let done = || async {
        deployments.get("myapp-operator").await.is_ok_and(|d| chaos::pods::rolled_out(&d, want)).then_some(())
    };
    if chaos::wait::within(timeout, Duration::from_millis(200), done).await.is_none() {
        panic!("the operator's pods were not {want}/{want} ready within {timeout:?}:\n{}", pod_logs(&pods).await);
    }
    started.elapsed()
}

/// The caBundle of every webhook of both configurations.
async fn ca_bundles(client: &kube::Client) -> Option<Vec<Option<Vec<u8>>>> {
    let m = Api::<MutatingWebhookConfiguration>::all(client.clone()).get(WEBHOOKS).await.ok()?;
    let v = Api::<ValidatingWebhookConfiguration>::all(client.clone()).get(WEBHOOKS).await.ok()?;
    let m = m.webhooks.unwrap_or_default().into_iter().map(|w| w.client_config.ca_bundle);
    let v = v.webhooks.unwrap_or_default().into_iter().map(|w| w.client_config.ca_bundle);
    Some(m.chain(v).map(|b| b.map(|b| b.0)).collect())
}

/// The trust bundle (`ca.crt`) of the certificate Secret, when all webhooks carry exactly it.
async fn ca_everywhere(client: &kube::Client) -> Option<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE).get_opt(CERT_SECRET).await.ok()??;
    let ca = secret.data?.get("ca.crt")?.0.clone();
    let bundles = ca_bundles(client).await?;
    (bundles.len() >= 2 && bundles.iter().all(|b| b.as_ref() == Some(&ca))).then_some(ca)
}

/// Replaces both webhook configurations with what `deploy/overlays/local` renders, which carries
/// no caBundle: a re-apply with replace semantics (`kubectl replace`, or a tool that does the
/// same) wipes the caBundle the pods patched in.
fn replace_webhook_configurations() {
    let overlay = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/overlays/local");
    let (ok, rendered) = kubectl(&["kustomize", overlay]);
    assert!(ok, "kubectl kustomize:\n{rendered}");
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let doc: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind.ends_with("WebhookConfiguration") {
            assert!(doc["webhooks"][0]["clientConfig"]["caBundle"].is_null(), "the manifest carries no caBundle");
            docs.push(serde_yaml::to_string(&doc).expect("yaml"));
        }
    }
    assert_eq!(docs.len(), 2, "both webhook configurations rendered");
    let file = std::env::temp_dir().join("myapp-e2e-webhooks.yaml");
    std::fs::write(&file, docs.join("---\n")).expect("write the manifest");
    // kubectl replace reads the resourceVersion and then writes at it: a write by a pod in between
    // is a conflict, and the replace is tried again.
    let mut out = String::new();
    for _ in 0..3 {
        let (ok, said) = kubectl(&["replace", "-f", &file.display().to_string()]);
        if ok {
            return;
        }
        assert!(said.contains("the object has been modified"), "kubectl replace:\n{said}");
        out = said;
    }
    panic!("kubectl replace kept conflicting:\n{out}");
}

/// The restarts of the operator's containers, summed.
async fn restarts(pods: &Api<Pod>) -> i32 {
    let list = pods.list(&ListParams::default().labels(SELECTOR)).await.expect("pods");
    list.items.iter().map(chaos::pods::restarts).sum()
}

fn myapp_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("myapp.dev", "v1", "MyApp"), "myapps");
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// The reconcile span of `ns/name` done by `leader`'s pod, with its API calls as children: the
/// count of those calls, when a trace has at least three.
fn pod_reconcile_calls(ns: &str, name: &str, pod_names: &[String]) -> Option<usize> {
    let tags = serde_json::json!({ "myapp": format!("{ns}/{name}") });
    let traces = common::jaeger_traces("myapp-operator", Some("reconcile"), Some(&tags), 20)?;
    traces.iter().find_map(|trace| {
        let (reconcile, calls) = common::reconcile_and_calls(trace)?;
        let leader = common::tag(reconcile, "leader")?;
        let by_pod = pod_names.iter().any(|p| leader.strip_prefix(p.as_str()).is_some_and(|s| s.starts_with('-')));
        (by_pod && calls.len() >= 3).then_some(calls.len())
    })
}

#[tokio::test]
#[ignore = "needs the local control plane's real node: run `cargo xtask test`"]
async fn node_only_apply_k_runs_three_pods_that_lead_admit_reconcile_and_trace() {
    let node = node();
    let client = client().await;
    let overlay = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/overlays/local");
    let (ok, out) = kubectl(&["apply", "-k", overlay]);
    assert!(ok, "kubectl apply -k deploy/overlays/local failed:\n{out}");
    let took = rolled_out(&client, 3, Duration::from_secs(180)).await;
    eprintln!("install: 3/3 operator pods ready {:.1} s after kubectl apply -k", took.as_secs_f64());

    // Three pods of the shipped image on the real node, as the manifest says they run.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let list = pods.list(&ListParams::default().labels(SELECTOR)).await.expect("pods");
    let running: Vec<&Pod> = list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    assert_eq!(running.len(), 3, "three operator pods");
    let names: Vec<String> = running.iter().filter_map(|p| p.metadata.name.clone()).collect();
    for p in &running {
        let spec = p.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some(node.as_str()), "{:?} runs on the real node", p.metadata.name);
        let status = p.status.as_ref().expect("status");
        assert!(chaos::pods::is_ready(p), "{:?} is Ready", p.metadata.name);
        let c = &status.container_statuses.as_ref().expect("container statuses")[0];
        assert_eq!(c.restart_count, 0, "{:?} never restarted", p.metadata.name);
        assert!(c.image.contains("myapp-operator"), "runs the operator image, not {}", c.image);
        let sc = spec.containers[0].security_context.as_ref().expect("securityContext");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(spec.security_context.as_ref().and_then(|s| s.run_as_user), Some(65532));
    }

    // One of them leads, under the identity <pod name>-<suffix>.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let holder = eventually("a pod holds the Lease", Duration::from_secs(60), || async {
        let h = leases.get("myapp-operator").await.ok()?.spec?.holder_identity?;
        let (pod, suffix) = h.rsplit_once('-')?;
        (names.iter().any(|n| n == pod) && suffix.len() == 5).then_some(h)
    })
    .await;
    eprintln!("install: the leader is {holder}");

    // The pods patched their CA into both webhook configurations.
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    eventually("caBundle in both webhook configurations", Duration::from_secs(60), || async {
        let m = mutating.get("myapp-operator").await.ok()?;
        let v = validating.get("myapp-operator").await.ok()?;
        let m_ca = m.webhooks?.first()?.client_config.ca_bundle.clone()?;
        let v_ca = v.webhooks?.first()?.client_config.ca_bundle.clone()?;
        (!m_ca.0.is_empty() && !v_ca.0.is_empty()).then_some(())
    })
    .await;

    // The API server reaches the webhooks through the Service: policy refuses, defaults apply.
    let ns = TestNamespace::new(&client, "install").await;
    let apps = myapp_api(&client, &ns.name);
    let latest: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": "latest"},
        "spec": {"image": "nginx:latest"}
    }))
    .expect("myapp");
    match apps.create(&PostParams::default(), &latest).await {
        Err(kube::Error::Api(e)) => assert!(e.message.contains("spec.image"), "the refusal names the field: {e:?}"),
        other => panic!("a :latest MyApp was not refused: {other:?}"),
    }
    let plain: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": "plain"},
        "spec": {"image": "nginx:1.27"}
    }))
    .expect("myapp");
    // Ready pods take a moment to be Service endpoints that kube-proxy has programmed; until then
    // the API server's calls are refused, and the validating webhook fails closed.
    let ready_at = Instant::now();
    let created = eventually("the webhooks answer through their Service", Duration::from_secs(30), || async {
        match apps.create(&PostParams::default(), &plain).await {
            Ok(c) => Some(c),
            Err(kube::Error::Api(e)) if e.message.contains("failed calling webhook") => None,
            Err(e) => panic!("create a MyApp: {e}"),
        }
    })
    .await;
    eprintln!(
        "install: the webhooks answered through the Service {:.1} s after the pods were Ready",
        ready_at.elapsed().as_secs_f64()
    );
    assert!(
        created.data["spec"]["resources"]["requests"]["cpu"].is_string(),
        "the mutating webhook defaulted the requests: {}",
        created.data["spec"]
    );
    assert_eq!(
        created.metadata.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/name")).map(String::as_str),
        Some("plain")
    );

    // A re-apply that wipes the caBundle is repaired within seconds, on the pods' watch of the
    // configurations (not on their 60 s check), with the same CA. (The next step retries until
    // the API server calls the webhook again, so its informer may lag the repair a little.)
    let ca = eventually("the Secret's CA in every webhook", Duration::from_secs(30), || ca_everywhere(&client)).await;
    replace_webhook_configurations();
    let wiped = Instant::now();
    let repaired = eventually("the wiped caBundle repaired", Duration::from_secs(5), || ca_everywhere(&client)).await;
    assert_eq!(repaired, ca, "the same CA");
    eprintln!("install: a wiped caBundle was repaired {:.2} s after the replace", wiped.elapsed().as_secs_f64());

    // A policy only the validating webhook holds (the CRD cannot see the old object's port).
    let moved = serde_json::json!({"spec": {"port": 9999}});
    let refused = eventually("the validating webhook refuses a port change", Duration::from_secs(30), || async {
        match apps.patch("plain", &PatchParams::default(), &Patch::Merge(&moved)).await {
            Err(kube::Error::Api(e)) if e.message.contains("admission webhook") => Some(e.message),
            _ => None,
        }
    })
    .await;
    assert!(refused.contains("spec.port"), "the refusal names the field: {refused}");

    // The examples become Ready, reconciled by the leader pod.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let (ok, out) = kubectl(&["apply", "-n", &ns.name, "-f", dir]);
    assert!(ok, "kubectl apply -f examples/:\n{out}");
    let typed: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    for name in ["web", "api", "plain"] {
        eventually(&format!("myapp/{name} Ready"), Duration::from_secs(120), || async {
            typed.get(name).await.ok()?.ready_at_generation().then_some(())
        })
        .await;
    }

    // A reconcile done by a pod is in the local Jaeger, with its API calls as children.
    let calls = eventually("a pod's reconcile of myapp/web in Jaeger", Duration::from_secs(60), || async {
        pod_reconcile_calls(&ns.name, "web", &names)
    })
    .await;
    eprintln!("install: a pod's reconcile trace of myapp/web has {calls} API calls as children");

    // A spec change rolls out through the pods too.
    typed
        .patch("plain", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})))
        .await
        .expect("scale");
    eventually("myapp/plain Ready at 2 replicas", Duration::from_secs(60), || async {
        let a = typed.get("plain").await.ok()?;
        (a.ready_at_generation() && a.status?.ready_replicas == 2).then_some(())
    })
    .await;

    // The certificate Secret deleted: the pods make a new CA and serving certificate (one of them
    // creates it, the others take it), patch both caBundles and reload, and the webhooks admit
    // again through the Service; no pod restarts.
    let restarted = restarts(&pods).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    secrets.delete(CERT_SECRET, &DeleteParams::default()).await.expect("delete the certificate Secret");
    let deleted = Instant::now();
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let healed: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": "healed"},
        "spec": {"image": "nginx:1.27"}
    }))
    .expect("myapp");
    eventually("a new CA everywhere, and admissions through it", Duration::from_secs(60), || async {
        let new_ca = ca_everywhere(&client).await.filter(|new_ca| new_ca != &ca)?;
        apps.create(&dry_run, &healed).await.ok().map(|_| new_ca)
    })
    .await;
    eprintln!(
        "install: a deleted certificate Secret was replaced, patched in and admitting {:.1} s later",
        deleted.elapsed().as_secs_f64()
    );
    assert_eq!(restarts(&pods).await, restarted, "no pod restarted:\n{}", pod_logs(&pods).await);
    ns.cleanup().await;
}
