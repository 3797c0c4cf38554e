//! The operator against a real API server: `cargo xtask test` starts the control plane and an
//! operator replica, then runs these with `--include-ignored`. Each test has its own namespace.

mod common;

use common::{TestNamespace, client, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use myapp_operator::api::conditions;
use myapp_operator::api::policy::ALLOW_PORT_CHANGE;
use myapp_operator::api::quantity;
use myapp_operator::api::{APPLIED_HASH, FIELD_MANAGER, FINALIZER, MyApp, MyAppSpec, ResourceAmounts};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const ROLLOUT: Duration = Duration::from_secs(60);

fn myapp(name: &str, image: &str, replicas: i32) -> MyApp {
    let spec = json!({"image": image, "replicas": replicas, "env": [{"name": "MODE", "value": "e2e"}]});
    chaos::fixtures::myapp(name, spec).expect("MyApp")
}

/// Waits until the MyApp is Ready for its current generation; returns it.
async fn wait_ready(api: &Api<MyApp>, name: &str) -> MyApp {
    eventually(&format!("MyApp {name} Ready"), ROLLOUT, || async {
        let app = api.get(name).await.ok()?;
        app.ready_at_generation().then_some(app)
    })
    .await
}

async fn create(client: &Client, ns: &str, app: &MyApp) -> Api<MyApp> {
    let api: Api<MyApp> = Api::namespaced(client.clone(), ns);
    let created = api.create(&PostParams::default(), app).await.expect("create MyApp");
    // The mutating webhook puts the finalizer on at creation, which saves the reconciler a write.
    assert!(
        created.finalizers().iter().any(|f| f == FINALIZER),
        "created with the finalizer: {:?}",
        created.finalizers()
    );
    api
}

fn image_of(d: &Deployment) -> Option<String> {
    d.spec.template.spec.as_ref()?.containers.first()?.image.clone()
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn create_then_ready_with_owned_children() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "create").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 2)).await;
    let app = wait_ready(&api, "web").await;

    let status = app.status.clone().expect("status");
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(status.selector, "myapp.dev/name=web");
    assert!(app.finalizers().iter().any(|f| f == FINALIZER));
    for c in [conditions::RECONCILING, conditions::STALLED] {
        assert!(!conditions::is_true(&status.conditions, c), "{c} should be False");
    }

    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("web").await.expect("Deployment");
    let s = Api::<Service>::namespaced(client.clone(), &ns.name).get("web").await.expect("Service");
    for owners in [d.metadata.owner_references.clone(), s.metadata.owner_references.clone()] {
        let owner = owners.and_then(|o| o.into_iter().next()).expect("owner reference");
        assert_eq!(owner.uid, app.uid().expect("uid"));
        assert_eq!(owner.controller, Some(true));
    }
    assert_eq!(d.spec.replicas, Some(2));
    assert_eq!(image_of(&d).as_deref(), Some("nginx:1.27"));
    assert_eq!(s.spec.and_then(|s| s.ports).map(|p| p[0].port), Some(8080), "port defaults to 8080");

    // The first Ready is worth an Event; creating the children is not (it is in the status and
    // in the children themselves), so a fresh MyApp costs one Event write, not three.
    let events = eventually("a RolloutComplete event", Duration::from_secs(10), || async {
        let ev = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.ok()?;
        // Ours only: the namespace also has the scheduler's and the controller-manager's.
        let reasons: Vec<String> = ev
            .items
            .into_iter()
            .filter(|e| e.reporting_component.as_deref() == Some("myapp-operator"))
            .filter_map(|e| e.reason)
            .collect();
        reasons.iter().any(|r| r == "RolloutComplete").then_some(reasons)
    })
    .await;
    assert_eq!(events, ["RolloutComplete"], "only the first Ready is an Event");
    ns.cleanup().await;
}

/// A MyApp larger than the cache keeps ([`myapp_operator::cache::MAX_KEPT`]) is read whole from
/// the API server at each reconcile, under the operator's own grants, and its children carry all
/// of it.
#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn a_myapp_too_large_to_cache_is_read_whole_and_reconciled() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "large").await;
    let env: Vec<_> = (0..8).map(|i| json!({"name": format!("LARGE_{i}"), "value": "x".repeat(1000)})).collect();
    let spec = json!({"image": "nginx:1.27", "replicas": 1, "env": env});
    let app = chaos::fixtures::myapp("large", spec).expect("MyApp");
    assert!(
        serde_json::to_vec(&app.spec).expect("json").len() > myapp_operator::cache::MAX_KEPT,
        "the spec alone is over what the cache keeps"
    );
    let api = create(&client, &ns.name, &app).await;
    wait_ready(&api, "large").await;
    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("large").await.expect("Deployment");
    let env = app_env(&d);
    let whole = (0..8).all(|i| env.contains(&format!("LARGE_{i}={}", "x".repeat(1000))));
    assert!(whole, "every variable reaches the pods whole: {} variables", env.len());

    // A change is reconciled too: the next read is whole again.
    let patch = Patch::Merge(json!({"spec": {"image": "nginx:1.28"}}));
    api.patch("large", &PatchParams::default(), &patch).await.expect("patch");
    wait_ready(&api, "large").await;
    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("large").await.expect("Deployment");
    assert_eq!(image_of(&d).as_deref(), Some("nginx:1.28"));
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn image_change_rolls_out_and_status_follows() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "image").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 2)).await;
    let first = wait_ready(&api, "web").await;

    let patch = Patch::Merge(json!({"spec": {"image": "nginx:1.28"}}));
    api.patch("web", &PatchParams::default(), &patch).await.expect("patch image");
    let second = wait_ready(&api, "web").await;
    assert!(second.metadata.generation > first.metadata.generation);

    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("web").await.expect("Deployment");
    assert_eq!(image_of(&d).as_deref(), Some("nginx:1.28"));
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default().labels("myapp.dev/name=web"))
        .await
        .expect("pods");
    let images: Vec<_> = pods
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.containers[0].image.clone()))
        .collect();
    assert!(images.iter().all(|i| i == "nginx:1.28"), "{images:?}");
    ns.cleanup().await;
}

/// `spec.replicas` is the MyApp's: scaling it through its `/scale` subresource (as `kubectl
/// scale myapp/web` and a HorizontalPodAutoscaler aimed at the MyApp do) reaches the Deployment,
/// and scaling the Deployment by hand (or an autoscaler aimed at it) is taken back.
#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn scale_subresource_scales_the_deployment_and_hand_scaling_is_taken_back() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "scale").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 1)).await;
    wait_ready(&api, "web").await;

    let scale = api.get_scale("web").await.expect("get scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
    // What `kubectl scale myapp/web --replicas=3` does.
    api.patch_scale("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .expect("patch scale");
    let app = wait_ready(&api, "web").await;
    assert_eq!(app.spec.replicas, 3);
    assert_eq!(app.status.as_ref().map(|s| s.ready_replicas), Some(3));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deployments.get("web").await.expect("Deployment");
    assert_eq!(d.spec.replicas, Some(3));
    let scale = api.get_scale("web").await.expect("get scale");
    let status = scale.status.expect("the scale's status");
    assert_eq!(status.replicas, 3);
    // What a HorizontalPodAutoscaler reads to find the pods whose metrics it averages.
    assert_eq!(status.selector.as_deref(), Some("myapp.dev/name=web"));

    // What `kubectl scale deployment/web --replicas=5` does: the operator takes it back.
    let hand = Patch::Merge(json!({"spec": {"replicas": 5}}));
    let scaled = deployments.patch_scale("web", &PatchParams::default(), &hand).await.expect("scale the Deployment");
    assert_eq!(scaled.spec.and_then(|s| s.replicas), Some(5), "the hand scaling was written");
    eventually("the Deployment scaled back to 3", Duration::from_secs(15), || async {
        let d = deployments.get("web").await.ok()?;
        (d.spec.replicas == Some(3)).then_some(())
    })
    .await;
    assert_eq!(api.get("web").await.expect("MyApp").spec.replicas, 3, "the MyApp is untouched");
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn drift_is_repaired() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "drift").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 2)).await;
    wait_ready(&api, "web").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    // A hand edit, as `kubectl edit` would make it.
    let edit = Patch::Strategic(
        json!({"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "app", "image": "evil:1"}]}}}}),
    );
    deployments.patch("web", &PatchParams::default(), &edit).await.expect("hand edit");
    eventually("the hand edit undone", Duration::from_secs(15), || async {
        let d = deployments.get("web").await.ok()?;
        (d.spec.replicas == Some(2) && image_of(&d).as_deref() == Some("nginx:1.27")).then_some(())
    })
    .await;

    let old_uid = services.get("web").await.expect("Service").uid();
    services.delete("web", &DeleteParams::default()).await.expect("delete Service");
    eventually("the Service recreated", Duration::from_secs(15), || async {
        let s = services.get("web").await.ok()?;
        (s.uid() != old_uid).then_some(())
    })
    .await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn delete_removes_children_then_releases_the_finalizer() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "delete").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 2)).await;
    wait_ready(&api, "web").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    api.delete("web", &DeleteParams::default()).await.expect("delete MyApp");
    // While the MyApp exists, its children may still be there; once it is gone, they must be.
    eventually("MyApp gone", Duration::from_secs(60), || async {
        matches!(api.get_opt("web").await, Ok(None)).then_some(())
    })
    .await;
    assert!(deployments.get_opt("web").await.expect("get Deployment").is_none(), "Deployment outlived its MyApp");
    assert!(services.get_opt("web").await.expect("get Service").is_none(), "Service outlived its MyApp");
    let left = pods.list(&ListParams::default().labels("myapp.dev/name=web")).await.expect("pods");
    assert!(left.items.is_empty(), "pods outlived their MyApp (foreground deletion)");

    let events = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.expect("events");
    assert!(events.items.iter().any(|e| e.reason.as_deref() == Some("Deleting")), "a Deleting event was published");
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn invalid_specs_are_rejected_naming_the_field() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "invalid").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    let cases = [
        (json!({"image": "nginx:latest"}), "spec.image"),
        (json!({"image": "nginx"}), "spec.image"),
        (json!({"image": "nginx:1.27", "replicas": 5000}), "spec.replicas"),
        (json!({"image": "nginx:1.27", "env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}), "spec.env"),
        (json!({"image": "nginx:1.27", "env": [{"name": "1BAD"}]}), "spec.env[0].name"),
        (
            json!({"image": "nginx:1.27", "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "500m"}}}),
            "spec.resources.limits.cpu",
        ),
        (
            json!({"image": "nginx:1.27", "resources": {"requests": {"memory": "lots"}}}),
            "spec.resources.requests.memory",
        ),
    ];
    for (i, (spec, field)) in cases.into_iter().enumerate() {
        let app = chaos::fixtures::myapp(&format!("bad-{i}"), spec).expect("MyApp");
        match api.create(&PostParams::default(), &app).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "case {i}: {s:?}");
                assert!(s.message.contains(field), "case {i}: {:?} does not name {field}", s.message);
            }
            other => panic!("case {i} ({field}) was not rejected: {other:?}"),
        }
    }
    assert!(api.list(&ListParams::default()).await.expect("list").items.is_empty(), "nothing was stored");
    ns.cleanup().await;
}

/// Lines of the operator replicas' logs that record a finished reconcile of `ns/name`.
fn reconciles_logged(ns: &str, name: &str) -> usize {
    let paths = std::env::var("MYAPP_E2E_OPERATOR_LOGS").expect("MYAPP_E2E_OPERATOR_LOGS is set by `cargo xtask test`");
    let needle = format!("\"myapp\":\"{ns}/{name}\"");
    paths
        .split(':')
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .map(|log| log.lines().filter(|l| l.contains("reconciled") && l.contains(&needle)).count())
        .sum()
}

/// Touches the MyApp `web` `rounds` times without changing its spec (an annotation), waiting after
/// each for one more reconcile of it in the operator's logs.
async fn touch_and_wait_reconciles(api: &Api<MyApp>, ns: &str, rounds: usize) {
    let logged = reconciles_logged(ns, "web");
    for round in 0..rounds {
        let touch = Patch::Merge(json!({"metadata": {"annotations": {"e2e/touch": round.to_string()}}}));
        api.patch("web", &PatchParams::default(), &touch).await.expect("touch");
        eventually("a reconcile of the touched MyApp", Duration::from_secs(15), || async {
            (reconciles_logged(ns, "web") > logged + round).then_some(())
        })
        .await;
    }
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_unchanged_resync_makes_zero_writes() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "resync").await;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns.name);
    let created = api.create(&PostParams::default(), &myapp("web", "nginx:1.27", 2)).await.expect("create MyApp");
    // The mutating webhook puts the finalizer on at creation, which saves the reconciler a write.
    assert!(
        created.finalizers().iter().any(|f| f == FINALIZER),
        "created with the finalizer: {:?}",
        created.finalizers()
    );
    wait_ready(&api, "web").await;
    // Let the last status write land in the audit log.
    let operator = "myapp-operator/";
    let settled = eventually("operator writes to settle", Duration::from_secs(20), || async {
        let before = common::audit_writes(&ns.name, operator).len();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        (common::audit_writes(&ns.name, operator).len() == before).then_some(before)
    })
    .await;
    assert!(settled >= 3, "a fresh MyApp needs its children and status written ({settled} writes)");

    // Touch the MyApp without changing its spec: it is reconciled again, and must write nothing.
    touch_and_wait_reconciles(&api, &ns.name, 3).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let writes = common::audit_writes(&ns.name, operator);
    let extra: Vec<_> = writes[settled..].iter().map(|e| format!("{} {}", e["verb"], e["requestURI"])).collect();
    assert!(extra.is_empty(), "unchanged resyncs wrote: {extra:?}");
    ns.cleanup().await;
}

/// The operator's writes to Deployments in `ns`, as the audit log records them.
fn operator_deployment_writes(ns: &str) -> Vec<String> {
    common::audit_writes(ns, "myapp-operator/")
        .iter()
        .filter(|e| e["objectRef"]["resource"] == "deployments")
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect()
}

/// The env of the `app` container of `d`, as `name=value` (`name=<from>` for a reference), sorted:
/// where server-side apply puts an entry it merges is not what these tests are about.
fn app_env(d: &Deployment) -> Vec<String> {
    let containers = d.spec.template.spec.iter().flat_map(|s| &s.containers);
    let app = containers.into_iter().find(|c| c.name == "app");
    let env = app.into_iter().flat_map(|c| c.env.iter().flatten());
    let mut env: Vec<String> = env.map(|e| format!("{}={}", e.name, e.value.as_deref().unwrap_or("<from>"))).collect();
    env.sort();
    env
}

/// Another manager adds to the Deployment (`kubectl set env`, a sidecar, a label): the additions
/// stay, as server-side apply keeps them, and the operator makes no write for them, however often
/// the MyApp is reconciled. A field of the operator's changed by hand is still taken back.
#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_additions_by_other_managers_are_kept_without_a_write() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "shared").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 2)).await;
    wait_ready(&api, "web").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let before = operator_deployment_writes(&ns.name);
    assert!(!before.is_empty(), "the Deployment was applied");

    // What `kubectl set env deployment/web X=1` sends (a strategic merge patch under its own
    // field manager), with a sidecar and a label added the same way.
    let other = PatchParams { field_manager: Some("kubectl-set".into()), ..PatchParams::default() };
    let addition = Patch::Strategic(json!({
        "metadata": {"labels": {"team": "a"}},
        "spec": {"template": {"spec": {"containers": [
            {"name": "app", "env": [{"name": "X", "value": "1"}]},
            {"name": "proxy", "image": "envoy:1"},
        ]}}},
    }));
    deployments.patch("web", &other, &addition).await.expect("the additions");

    // The Deployment's change, then each touch of the MyApp, is a reconcile.
    touch_and_wait_reconciles(&api, &ns.name, 3).await;
    let after = operator_deployment_writes(&ns.name);
    let extra = after.get(before.len()..).unwrap_or_default();
    assert!(extra.is_empty(), "the additions made the operator write: {extra:?}");
    let d = deployments.get("web").await.expect("Deployment");
    assert_eq!(app_env(&d), ["MODE=e2e", "X=1"], "ours and the addition");
    let names: Vec<&str> = d.spec.template.spec.iter().flat_map(|s| &s.containers).map(|c| c.name.as_str()).collect();
    assert!(names.contains(&"app") && names.contains(&"proxy"), "the sidecar stays: {names:?}");
    assert_eq!(d.labels().get("team").map(String::as_str), Some("a"), "the label stays");

    // `kubectl set env deployment/web MODE=hacked` changes a field of ours: taken back, while
    // the addition stays.
    let ours = Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "env": [{"name": "MODE", "value": "hacked"}]},
    ]}}}}));
    deployments.patch("web", &other, &ours).await.expect("the hand change");
    eventually("MODE taken back, X kept", Duration::from_secs(15), || async {
        let env = app_env(&deployments.get("web").await.ok()?);
        (env == ["MODE=e2e", "X=1"]).then_some(())
    })
    .await;
    ns.cleanup().await;
}

/// How the API server's side of an operator API call shows up in Jaeger.
#[derive(Debug, PartialEq)]
enum ApiServerSide {
    /// Its span is a child of the call, in the reconcile's trace: the caller is privileged
    /// (`system:masters` or `system:monitoring`), so the API server honoured the `traceparent`.
    Child,
    /// Its span starts a trace of its own with a link to the call: what every other caller, a
    /// ServiceAccount included, gets.
    Linked,
}

/// Traces of reconciles of `ns/name` in Jaeger.
fn reconcile_traces(ns: &str, name: &str) -> Option<Vec<serde_json::Value>> {
    common::jaeger_traces("myapp-operator", Some("reconcile"), Some(&json!({ "myapp": format!("{ns}/{name}") })), 20)
}

/// Finds, in Jaeger, a trace of a reconcile of `ns/name` with at least three API calls as child
/// spans, and the API server's span for one of those calls. Returns (trace id, span count, how they connect).
fn reconcile_trace(ns: &str, name: &str) -> Option<(String, usize, ApiServerSide, String)> {
    let traces = reconcile_traces(ns, name)?;
    let refers_to = common::refers_to;
    traces.iter().find_map(|trace| {
        let trace_id = trace["traceID"].as_str()?;
        let spans = trace["spans"].as_array()?;
        let (reconcile, calls) = common::reconcile_and_calls(trace)?;
        // The reconcile that created the children: its Deployment, Service and status writes at least.
        if calls.len() < 3 {
            return None;
        }
        let tag = |key: &str| common::tag(reconcile, key);
        let trigger = tag("trigger").unwrap_or_default();
        let found = |side| Some((trace_id.to_string(), spans.len(), side, trigger.clone()));
        if spans.iter().any(|s| {
            common::service_of(trace, s).as_deref() == Some("apiserver") && calls.iter().any(|c| refers_to(s, c))
        }) {
            return found(ApiServerSide::Child);
        }
        // Not privileged: look for the API server's traces of this replica's calls that link back.
        let leader = tag("leader")?;
        let agent = myapp_operator::client::user_agent(&leader);
        let theirs =
            common::jaeger_traces("apiserver", None, Some(&serde_json::json!({ "user_agent.original": agent })), 500)?;
        let linked = common::spans_of(&theirs).any(|s| {
            s["references"].as_array().is_some_and(|r| {
                r.iter().any(|r| {
                    r["traceID"].as_str() == Some(trace_id) && calls.contains(&r["spanID"].as_str().unwrap_or(""))
                })
            })
        });
        if linked { found(ApiServerSide::Linked) } else { None }
    })
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_reconcile_trace_spans_operator_and_api_server() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "trace").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 1)).await;
    wait_ready(&api, "web").await;
    let (trace_id, spans, side, trigger) =
        eventually("a reconcile trace in Jaeger", Duration::from_secs(30), || async {
            reconcile_trace(&ns.name, "web")
        })
        .await;
    assert_eq!(trace_id.len(), 32);
    assert!(spans >= 4, "the reconcile and at least three API calls: {spans}");
    // kube's reason, e.g. "object updated" for the create, or "bulk pass" at a term's start.
    assert!(!trigger.is_empty() && trigger != "unknown", "the reconcile span says what triggered it: {trigger:?}");
    // The replicas run as the operator's ServiceAccount (see `cargo xtask test`), which the API
    // server does not trust with a parent: its spans link to ours.
    assert_eq!(side, ApiServerSide::Linked, "replicas run as a ServiceAccount, so the API server links");
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_reconcile_links_to_the_trace_of_the_change() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "link").await;
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 1)).await;
    let app = wait_ready(&api, "web").await;
    let tp = app
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("myapp.dev/traceparent"))
        .cloned()
        .expect("the mutating webhook records the trace context of the create");
    let change_trace = tp.split('-').nth(1).expect("traceparent trace id").to_string();
    eventually("a reconcile span linked to the create's trace", Duration::from_secs(30), || async {
        let traces = reconcile_traces(&ns.name, "web")?;
        let linked = common::spans_of(&traces).any(|s| {
            s["operationName"] == "reconcile"
                && s["references"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["traceID"].as_str() == Some(change_trace.as_str())))
        });
        linked.then_some(())
    })
    .await;
    // A metadata-only change keeps the recorded context.
    let touch = Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}}));
    let touched = api.patch("web", &PatchParams::default(), &touch).await.expect("touch");
    assert_eq!(touched.metadata.annotations.and_then(|a| a.get("myapp.dev/traceparent").cloned()), Some(tp));
    ns.cleanup().await;
}

/// The container's env and resources, and the Service's type and port, as `spec` asks for them
/// (read off the spec here, not through the operator's builders): env values that are empty are
/// left out, and so are absent requests and limits. Quantities compare by value.
fn children_match(spec: &MyAppSpec, d: &Deployment, s: &Service) -> Result<(), String> {
    let container = d.spec.template.spec.as_ref().and_then(|p| p.containers.first()).ok_or("no container")?;
    let want_env: Vec<serde_json::Value> = spec
        .env
        .iter()
        .map(|e| if e.value.is_empty() { json!({"name": e.name}) } else { json!({"name": e.name, "value": e.value}) })
        .collect();
    let got_env = serde_json::to_value(container.env.clone().unwrap_or_default()).map_err(|e| e.to_string())?;
    if got_env != json!(want_env) {
        return Err(format!("env is {got_env}, want {}", json!(want_env)));
    }
    let amounts = |a: Option<&ResourceAmounts>| -> BTreeMap<String, String> {
        a.map(|a| [("cpu", &a.cpu), ("memory", &a.memory)])
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
            .collect()
    };
    let res = spec.resources.as_ref();
    let resources = container.resources.clone().unwrap_or_default();
    for (what, want, got) in [
        ("requests", amounts(res.and_then(|r| r.requests.as_ref())), resources.requests.unwrap_or_default()),
        ("limits", amounts(res.and_then(|r| r.limits.as_ref())), resources.limits.unwrap_or_default()),
    ] {
        let same = want.len() == got.len()
            && want.iter().all(|(k, v)| got.get(k).is_some_and(|g| quantity::same_value(v, &g.0)));
        if !same {
            return Err(format!("{what} are {got:?}, want {want:?}"));
        }
    }
    let ports = container.ports.clone().unwrap_or_default();
    if ports.iter().map(|p| p.container_port).collect::<Vec<_>>() != vec![spec.port] {
        return Err(format!("container ports are {ports:?}, want {}", spec.port));
    }
    let sspec = s.spec.clone().unwrap_or_default();
    let want_type = spec.service_type.unwrap_or_default().as_str();
    if sspec.type_.as_deref() != Some(want_type) {
        return Err(format!("Service type is {:?}, want {want_type}", sspec.type_));
    }
    let sports = sspec.ports.unwrap_or_default();
    if sports.iter().map(|p| p.port).collect::<Vec<_>>() != vec![spec.port] {
        return Err(format!("Service ports are {sports:?}, want {}", spec.port));
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn removed_and_changed_fields_reach_the_children() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "fields").await;
    let app: MyApp = serde_json::from_value(json!({
        "apiVersion": "myapp.dev/v1",
        "kind": "MyApp",
        // spec.port changes need this (the validating webhook's policy).
        "metadata": {"name": "web", "annotations": {ALLOW_PORT_CHANGE: "true"}},
        "spec": {
            "image": "nginx:1.27",
            "replicas": 1,
            "env": [{"name": "MODE", "value": "e2e"}, {"name": "LEVEL", "value": "debug"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
            "serviceType": "NodePort"
        }
    }))
    .expect("MyApp");
    let api = create(&client, &ns.name, &app).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let first = wait_ready(&api, "web").await;
    let d = deployments.get("web").await.expect("Deployment");
    let s = services.get("web").await.expect("Service");
    if let Err(e) = children_match(&first.spec, &d, &s) {
        panic!("after the create: {e}");
    }

    // One change at a time, each a merge patch of the spec. The mutating webhook fills requests
    // back in when they are removed (from the limits, or its defaults), so what the children must
    // show is read off the spec as stored; `gone` lists JSON pointers into the container (or, for
    // `/spec/...`, the Service) that must no longer exist.
    let steps: [(&str, serde_json::Value, &[&str]); 15] = [
        (
            "an env value set to \"\"",
            json!({"env": [{"name": "MODE", "value": ""}, {"name": "LEVEL", "value": "debug"}]}),
            &["/env/0/value"],
        ),
        ("one env var removed", json!({"env": [{"name": "LEVEL", "value": "debug"}]}), &["/env/1"]),
        ("env removed", json!({"env": null}), &["/env"]),
        ("env added back", json!({"env": [{"name": "MODE", "value": "e2e"}]}), &[]),
        ("limits.cpu removed", json!({"resources": {"limits": {"cpu": null}}}), &["/resources/limits/cpu"]),
        (
            "requests.memory removed (the webhook sets it from the limit)",
            json!({"resources": {"requests": {"memory": null}}}),
            &[],
        ),
        ("limits removed", json!({"resources": {"limits": null}}), &["/resources/limits"]),
        ("requests.cpu changed", json!({"resources": {"requests": {"cpu": "200m"}}}), &[]),
        ("requests removed (the webhook defaults them)", json!({"resources": {"requests": null}}), &[]),
        ("limits set again", json!({"resources": {"limits": {"memory": "512Mi"}}}), &[]),
        ("resources removed (the webhook defaults the requests)", json!({"resources": null}), &["/resources/limits"]),
        ("serviceType changed", json!({"serviceType": "LoadBalancer"}), &[]),
        ("serviceType removed", json!({"serviceType": null}), &["/spec/ports/0/nodePort"]),
        ("port changed", json!({"port": 9090}), &[]),
        ("port removed (defaults to 8080)", json!({"port": null}), &[]),
    ];
    let mut generation = first.metadata.generation;
    for (what, spec, gone) in steps {
        let patched = api
            .patch("web", &PatchParams::default(), &Patch::Merge(json!({ "spec": spec })))
            .await
            .unwrap_or_else(|e| panic!("{what}: patch: {e}"));
        assert!(patched.metadata.generation > generation, "{what}: the patch did not change the spec");
        generation = patched.metadata.generation;
        // Ready at the new generation: the status says the change rolled out, so the children
        // must show it now.
        let app = wait_ready(&api, "web").await;
        assert_eq!(app.metadata.generation, generation, "{what}: changed again behind the test's back");
        let d = deployments.get("web").await.expect("Deployment");
        let s = services.get("web").await.expect("Service");
        if let Err(e) = children_match(&app.spec, &d, &s) {
            panic!("{what}: Ready at generation {generation:?}, but {e}");
        }
        let container = serde_json::to_value(&d.spec.template.spec.as_ref().expect("pod spec").containers[0])
            .expect("container JSON");
        let service = serde_json::to_value(&s).expect("Service JSON");
        for pointer in gone {
            let found =
                if pointer.starts_with("/spec/") { service.pointer(pointer) } else { container.pointer(pointer) };
            assert!(found.is_none(), "{what}: {pointer} is still there: {found:?}");
        }
    }
    assert_eq!(api.get("web").await.expect("MyApp").spec.port, 8080);
    ns.cleanup().await;
}

/// An object made by hand under the name of the MyApp a test creates next: a Service or a
/// Deployment that selects `app=web`, with neither the operator's labels nor an owner.
#[derive(Clone, Copy, Debug)]
enum Foreign {
    Service,
    Deployment,
}

impl Foreign {
    fn kind(self) -> &'static str {
        match self {
            Foreign::Service => "Service",
            Foreign::Deployment => "Deployment",
        }
    }

    /// The MyApp's other child, which a refused MyApp does not create either.
    fn other(self) -> Foreign {
        match self {
            Foreign::Service => Foreign::Deployment,
            Foreign::Deployment => Foreign::Service,
        }
    }

    async fn create(self, client: &Client, ns: &str) {
        let labels = json!({"app": "web"});
        let pp = PostParams::default();
        match self {
            Foreign::Service => {
                let s: Service = serde_json::from_value(json!({
                    "metadata": {"name": "web", "labels": labels},
                    "spec": {"selector": labels, "ports": [{"name": "web", "port": 80, "targetPort": 8080}]}
                }))
                .expect("Service");
                Api::<Service>::namespaced(client.clone(), ns).create(&pp, &s).await.expect("create the Service");
            }
            Foreign::Deployment => {
                let d: Deployment = serde_json::from_value(json!({
                    "metadata": {"name": "web", "labels": labels},
                    "spec": {
                        "replicas": 1,
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]}
                        }
                    }
                }))
                .expect("Deployment");
                Api::<Deployment>::namespaced(client.clone(), ns).create(&pp, &d).await.expect("create the Deployment");
            }
        }
    }

    /// The object `web` of this kind as JSON, if there is one.
    async fn get(self, client: &Client, ns: &str) -> Option<serde_json::Value> {
        let found = match self {
            Foreign::Service => Api::<Service>::namespaced(client.clone(), ns).get_opt("web").await.map(|o| json!(o)),
            Foreign::Deployment => {
                Api::<Deployment>::namespaced(client.clone(), ns).get_opt("web").await.map(|o| json!(o))
            }
        };
        let v = found.unwrap_or_else(|e| panic!("get {} web: {e}", self.kind()));
        (!v.is_null()).then_some(v)
    }

    async fn delete(self, client: &Client, ns: &str) {
        let dp = DeleteParams::default();
        let deleted = match self {
            Foreign::Service => Api::<Service>::namespaced(client.clone(), ns).delete("web", &dp).await.map(drop),
            Foreign::Deployment => Api::<Deployment>::namespaced(client.clone(), ns).delete("web", &dp).await.map(drop),
        };
        deleted.unwrap_or_else(|e| panic!("delete the foreign {}: {e}", self.kind()));
    }
}

/// What the operator must never change on a foreign object: its identity, labels, owners,
/// selector, ports and pod template. (Not its annotations: the deployment controller adds one.)
fn fingerprint(v: &serde_json::Value) -> serde_json::Value {
    json!({
        "uid": v["metadata"]["uid"],
        "labels": v["metadata"]["labels"],
        "ownerReferences": v["metadata"]["ownerReferences"],
        "selector": v["spec"]["selector"],
        "ports": v["spec"]["ports"],
        "replicas": v["spec"]["replicas"],
        "template": v["spec"]["template"],
    })
}

/// Asserts that the foreign object still exists as `before` was, and that the operator never
/// wrote to it: no field of it is managed by the operator's field manager, and it carries no
/// applied-hash annotation.
async fn assert_untouched(foreign: Foreign, client: &Client, ns: &str, before: &serde_json::Value) {
    let kind = foreign.kind();
    let now = foreign.get(client, ns).await.unwrap_or_else(|| panic!("the foreign {kind} is gone"));
    assert_eq!(fingerprint(&now), fingerprint(before), "the foreign {kind} was changed");
    let managers: Vec<&str> = now["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(!managers.contains(&FIELD_MANAGER), "the operator wrote to the foreign {kind}: managers {managers:?}");
    assert!(now["metadata"]["annotations"].get(APPLIED_HASH).is_none(), "the operator applied to the foreign {kind}");
}

/// Waits until the MyApp `web` reports, for its current generation, that `kind` "web" holds its
/// child's name; checks the kstatus conditions and returns the Ready condition's message.
async fn wait_name_conflict(api: &Api<MyApp>, kind: &str) -> String {
    let app = eventually("MyApp web reports a NameConflict", Duration::from_secs(30), || async {
        let app = api.get("web").await.ok()?;
        let status = app.status.as_ref()?;
        let ready = conditions::find(&status.conditions, conditions::READY)?;
        (status.observed_generation == app.metadata.generation && ready.reason == conditions::NAME_CONFLICT)
            .then_some(app)
    })
    .await;
    let status = app.status.expect("status");
    let ready = conditions::find(&status.conditions, conditions::READY).expect("Ready");
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains(&format!("{kind} \"web\"")), "the message names the {kind}: {:?}", ready.message);
    assert!(conditions::is_true(&status.conditions, conditions::STALLED), "a conflict is Stalled");
    assert!(!conditions::is_true(&status.conditions, conditions::RECONCILING), "Stalled, not Reconciling");
    ready.message.clone()
}

async fn name_conflict_is_refused(foreign: Foreign) {
    let kind = foreign.kind();
    let client = client().await;
    let ns = TestNamespace::new(&client, &format!("conflict-{}", kind.to_lowercase())).await;
    foreign.create(&client, &ns.name).await;
    let before = foreign.get(&client, &ns.name).await.expect("the foreign object");

    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 1)).await;
    wait_name_conflict(&api, kind).await;
    eventually("a Warning NameConflict event naming the object", Duration::from_secs(10), || async {
        let ev = Api::<Event>::namespaced(client.clone(), &ns.name).list(&ListParams::default()).await.ok()?;
        ev.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(conditions::NAME_CONFLICT)
                    && e.type_.as_deref() == Some("Warning")
                    && e.involved_object.kind.as_deref() == Some("MyApp")
                    && e.involved_object.name.as_deref() == Some("web")
                    && e.message.as_deref().is_some_and(|m| m.contains(&format!("{kind} \"web\"")))
            })
            .map(drop)
    })
    .await;
    assert_untouched(foreign, &client, &ns.name, &before).await;
    // Refused as a whole: the other child was not created either.
    assert!(foreign.other().get(&client, &ns.name).await.is_none(), "a {} was created", foreign.other().kind());

    // Deleting the MyApp while in conflict deletes nothing it does not control.
    api.delete("web", &DeleteParams::default()).await.expect("delete MyApp");
    eventually("MyApp gone", Duration::from_secs(30), || async {
        matches!(api.get_opt("web").await, Ok(None)).then_some(())
    })
    .await;
    assert_untouched(foreign, &client, &ns.name, &before).await;

    // A MyApp of that name again: refused until the object is gone, then Ready (the conflict is
    // retried with backoff, since nothing the operator watches changes when the object goes).
    let api = create(&client, &ns.name, &myapp("web", "nginx:1.27", 1)).await;
    wait_name_conflict(&api, kind).await;
    assert_untouched(foreign, &client, &ns.name, &before).await;
    foreign.delete(&client, &ns.name).await;
    let app = wait_ready(&api, "web").await;
    let uid = app.uid().expect("uid");
    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("web").await.expect("Deployment");
    let s = Api::<Service>::namespaced(client.clone(), &ns.name).get("web").await.expect("Service");
    for (child, owners) in [("Deployment", d.metadata.owner_references), ("Service", s.metadata.owner_references)] {
        let controller = owners.into_iter().flatten().find(|o| o.controller == Some(true));
        assert_eq!(controller.map(|o| o.uid), Some(uid.clone()), "the {child} is controlled by the new MyApp");
    }
    assert_eq!(
        s.spec.and_then(|s| s.selector),
        Some(BTreeMap::from([("myapp.dev/name".to_string(), "web".to_string())])),
        "the Service selects the MyApp's pods"
    );
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn a_foreign_service_is_never_taken_over() {
    name_conflict_is_refused(Foreign::Service).await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn a_foreign_deployment_is_never_taken_over() {
    name_conflict_is_refused(Foreign::Deployment).await;
}
