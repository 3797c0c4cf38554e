//! Reconcile and cleanup against the fake API server ([`crate::fake_api`]): what they write, in
//! which order, and what the server then holds. No cluster; paused time, so each runs in
//! milliseconds.

use super::Context;
use super::fenced::FencedClient;
use super::fixtures::{DEPLOYMENTS, MYAPPS, NS, SERVICES};
use crate::api::policy::Policy;
use crate::api::{EnvVar, FINALIZER, MyApp};
use crate::cache::Caches;
use crate::fake_api::{FakeApi, Seen};
use crate::leader::{Fence, Mandate};
use crate::telemetry::metrics::Metrics;
use kube::api::{Api, DeleteParams};
use std::sync::Arc;
use std::time::Duration;

/// The path of the events collection in [`NS`].
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

/// A fake API server holding `app`, and a context over it whose caches have synced.
async fn start(app: &MyApp) -> (FakeApi, Context) {
    let fake = FakeApi::default();
    fake.put(MYAPPS, app.json());
    let caches = Caches::start(fake.client(), &crate::api::scope::Scope::Namespaces(vec![NS.into()]));
    tokio::time::timeout(Duration::from_secs(30), caches.wait_ready()).await.expect("the caches sync");
    let ctx = Context::new(
        fake.client(),
        FencedClient::for_tests(fake.client()),
        caches,
        Arc::new(Metrics::default()),
        "test-replica",
        Fence::of(Mandate::Unelected),
        tokio::time::Instant::now(),
    );
    (fake, ctx)
}

/// The MyApp as the server now holds it.
async fn stored(fake: &FakeApi) -> MyApp {
    Api::<MyApp>::namespaced(fake.client(), NS).get("web").await.expect("the MyApp is stored")
}

/// The writes among the requests from the `from`th on, as `"METHOD path"`.
fn writes(fake: &FakeApi, from: usize) -> Vec<String> {
    fake.requests().iter().skip(from).filter(|r| r.is_write()).map(Seen::line).collect()
}

/// Waits (in paused time) until `done` holds of the caches.
async fn until(ctx: &Context, what: &str, done: impl Fn(&Caches) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !done(&ctx.caches) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the caches never saw {what}");
}

#[tokio::test(start_paused = true)]
async fn the_finalizer_is_added_before_any_child() {
    let (fake, ctx) = start(&MyApp::test()).await;
    let app = stored(&fake).await;
    let from = fake.requests().len();

    let requeue = app.reconcile(&ctx).await.expect("reconciled");
    assert!(requeue.is_some(), "a running MyApp is resynced");

    let writes = writes(&fake, from);
    assert_eq!(writes.first().map(String::as_str), Some(format!("PATCH {MYAPPS}/web").as_str()), "{writes:#?}");
    let first = fake.requests().into_iter().skip(from).find(Seen::is_write).expect("a write");
    assert_eq!(first.content_type, "application/merge-patch+json");
    let finalizers = first.body.as_ref().and_then(|b| b.pointer("/metadata/finalizers")).cloned();
    assert_eq!(finalizers, Some(serde_json::json!([FINALIZER])), "the first write adds the finalizer");
    let child_writes: Vec<usize> = writes
        .iter()
        .enumerate()
        .filter(|(_, w)| w.contains("/deployments/") || w.contains("/services/"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(child_writes.len(), 2, "both children are applied: {writes:#?}");
    assert!(child_writes.iter().all(|&i| i > 0), "no child before the finalizer: {writes:#?}");
    // The finalizer, two applies and the status: a fresh MyApp's writes before it is Ready. No
    // Event for creating the children.
    assert_eq!(writes.len(), 4, "{writes:#?}");
    assert!(!writes.iter().any(|w| w.contains("/events")), "no Event: {writes:#?}");
    for r in fake.requests().iter().skip(from).filter(|r| r.line().contains("/deployments/") && r.is_write()) {
        assert_eq!((r.method.as_str(), r.content_type.as_str()), ("PATCH", "application/apply-patch+yaml"));
        assert!(r.uri.contains("fieldManager=myapp-operator") && r.uri.contains("force=true"), "{}", r.uri);
    }

    let app = stored(&fake).await;
    assert_eq!(app.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
    assert!(app.status.is_some_and(|s| !s.conditions.is_empty()), "the status is reported");
    let deployment = fake.get(DEPLOYMENTS, "web").expect("the Deployment exists");
    let owner = deployment.pointer("/metadata/ownerReferences/0/uid").and_then(|u| u.as_str());
    assert_eq!(owner, app.metadata.uid.as_deref(), "controlled by the MyApp");
    assert!(fake.get(SERVICES, "web").is_some(), "the Service exists");
}

#[tokio::test(start_paused = true)]
async fn an_invalid_spec_only_updates_the_status() {
    let (fake, ctx) = start(&MyApp::test().finalized().with_spec(|s| s.replicas = 2000)).await;
    let app = stored(&fake).await;
    let from = fake.requests().len();

    assert_eq!(app.reconcile(&ctx).await.expect("reconciled"), None, "nothing to look at until it changes");

    let writes = writes(&fake, from);
    assert_eq!(writes, vec![format!("PATCH {MYAPPS}/web/status"), format!("POST {EVENTS}")], "{writes:#?}");
    assert!(fake.get(DEPLOYMENTS, "web").is_none() && fake.get(SERVICES, "web").is_none(), "no child");
    let status = stored(&fake).await.status.expect("a status");
    let ready = crate::api::conditions::find(&status.conditions, crate::api::conditions::READY).expect("Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", crate::api::conditions::INVALID_SPEC));
}

/// Reconciles `app` under [`Policy::tightened`]: asserts that it writes only the status and a
/// Warning Event, that the MyApp reports `Stalled` with `reason`, and returns its message.
async fn refused_by_the_policy(fake: &FakeApi, ctx: &Context, reason: &str) -> String {
    use crate::api::conditions::{READY, STALLED, find, is_true};
    let from = fake.requests().len();
    assert_eq!(stored(fake).await.reconcile(ctx).await.expect("reconciled"), None, "nothing to do until it changes");
    let writes = writes(fake, from);
    assert_eq!(writes, vec![format!("PATCH {MYAPPS}/web/status"), format!("POST {EVENTS}")], "{writes:#?}");
    let status = stored(fake).await.status.expect("a status");
    assert!(is_true(&status.conditions, STALLED), "Stalled");
    let ready = find(&status.conditions, READY).expect("Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", reason));
    ready.message.clone()
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_registry_gets_no_child_and_is_stalled_by_the_rule() {
    // nginx comes from docker.io; the tightened policy allows ghcr.io only.
    let (fake, ctx) = start(&MyApp::test().finalized()).await;
    let ctx = ctx.with_policy(Policy::tightened());
    let message = refused_by_the_policy(&fake, &ctx, "ImageRegistryNotAllowed").await;
    assert!(message.starts_with("spec.image: registry \"docker.io\" is not allowed"), "{message}");
    assert!(fake.get(DEPLOYMENTS, "web").is_none() && fake.get(SERVICES, "web").is_none(), "no child");
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_env_gets_no_child_and_is_stalled_by_the_rule() {
    let app = MyApp::test().finalized().with_spec(|s| {
        s.image = "ghcr.io/org/app:1".into();
        s.env = vec![EnvVar { name: "LD_PRELOAD".into(), value: "/x.so".into() }];
    });
    let (fake, ctx) = start(&app).await;
    let ctx = ctx.with_policy(Policy::tightened());
    let message = refused_by_the_policy(&fake, &ctx, "EnvForbidden").await;
    assert_eq!(message, "spec.env[0].name: \"LD_PRELOAD\" may not be set");
    assert!(fake.get(DEPLOYMENTS, "web").is_none() && fake.get(SERVICES, "web").is_none(), "no child");
}

#[tokio::test(start_paused = true)]
async fn a_tightened_policy_stalls_the_rollout_but_leaves_running_children_alone() {
    let (fake, ctx) = start(&MyApp::test().finalized()).await;
    stored(&fake).await.reconcile(&ctx).await.expect("rolled out under no policy");
    let (deployment, service) = (fake.get(DEPLOYMENTS, "web"), fake.get(SERVICES, "web"));
    assert!(deployment.is_some() && service.is_some(), "both children run");

    // The admin tightens the policy; the operator restarts with it.
    let ctx = ctx.with_policy(Policy::tightened());
    refused_by_the_policy(&fake, &ctx, "ImageRegistryNotAllowed").await;
    assert_eq!((fake.get(DEPLOYMENTS, "web"), fake.get(SERVICES, "web")), (deployment, service), "untouched");
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_object_makes_no_write() {
    let (fake, ctx) = start(&MyApp::test()).await;
    stored(&fake).await.reconcile(&ctx).await.expect("the first reconcile");
    assert!(!writes(&fake, 0).is_empty(), "the first reconcile writes");
    until(&ctx, "both children", |c| c.deployments.get(NS, "web").is_some() && c.services.get(NS, "web").is_some())
        .await;

    let app = stored(&fake).await;
    let from = fake.requests().len();
    assert!(app.reconcile(&ctx).await.expect("the second reconcile").is_some());
    assert_eq!(writes(&fake, from), Vec::<String>::new(), "a reconcile of an unchanged object writes nothing");
    assert_eq!(stored(&fake).await.metadata.resource_version, app.metadata.resource_version);
}

/// A MyApp too large to cache (large env values) costs the caches its metadata only: reconcile
/// reads it, and its Deployment, from the API server, rolls it out whole, and an unchanged
/// resync still writes nothing.
#[tokio::test(start_paused = true)]
async fn a_myapp_too_large_to_cache_is_read_from_the_api_server_and_rolled_out_whole() {
    use crate::cache::MAX_KEPT;
    let env: Vec<EnvVar> = (0..8).map(|i| EnvVar { name: format!("BIG_{i}"), value: "v".repeat(32 * 1024) }).collect();
    let (fake, ctx) = start(&MyApp::test().with_spec(|s| s.env = env)).await;
    let cached = ctx.caches.myapps.state().first().cloned().expect("the MyApp is in the store");
    assert!(!cached.kept(), "over {MAX_KEPT} bytes, only the metadata is kept");
    let whole = super::whole(&cached, &ctx).await.expect("read").expect("it exists");
    assert_eq!(whole.spec.env.len(), 8);
    whole.reconcile(&ctx).await.expect("the first reconcile");
    let deployment = fake.get(DEPLOYMENTS, "web").expect("the Deployment exists");
    let applied = deployment.pointer("/spec/template/spec/containers/0/env").and_then(|e| e.as_array()).map(Vec::len);
    assert_eq!(applied, Some(8), "the whole env is rolled out");
    until(&ctx, "the Service", |c| c.services.get(NS, "web").is_some()).await;
    assert!(ctx.caches.deployments.get(NS, "web").is_none(), "nor is its Deployment kept");

    let app = stored(&fake).await;
    let from = fake.requests().len();
    assert!(app.reconcile(&ctx).await.expect("the second reconcile").is_some());
    assert_eq!(writes(&fake, from), Vec::<String>::new(), "an unchanged resync writes nothing");
}

/// Someone else adds to the Deployment (`kubectl set env`, an injected sidecar, a label): the
/// API server keeps the additions through every apply, so the next reconcile writes nothing
/// rather than applying again, forever, to no effect.
#[tokio::test(start_paused = true)]
async fn additions_to_a_child_by_others_make_no_write() {
    let mode = crate::api::EnvVar { name: "MODE".into(), value: "prod".into() };
    let (fake, ctx) = start(&MyApp::test().with_spec(|s| s.env = vec![mode])).await;
    stored(&fake).await.reconcile(&ctx).await.expect("the first reconcile");
    let mut deployment = fake.get(DEPLOYMENTS, "web").expect("the Deployment exists");
    let containers = deployment.pointer_mut("/spec/template/spec/containers").and_then(|c| c.as_array_mut());
    let containers = containers.expect("containers");
    let env = containers[0].get_mut("env").and_then(|e| e.as_array_mut()).expect("the app's env");
    env.push(serde_json::json!({"name": "X", "value": "1"}));
    containers.push(serde_json::json!({"name": "proxy", "image": "envoy:1"}));
    deployment["metadata"]["labels"]["team"] = "a".into();
    fake.put(DEPLOYMENTS, deployment);
    until(&ctx, "the additions", |c| {
        c.deployments
            .get(NS, "web")
            .and_then(|d| d.object().ok())
            .is_some_and(|d| d.spec.template.spec.is_some_and(|s| s.containers.len() == 2))
            && c.services.get(NS, "web").is_some()
    })
    .await;

    let app = stored(&fake).await;
    let from = fake.requests().len();
    assert!(app.reconcile(&ctx).await.expect("the second reconcile").is_some());
    assert_eq!(writes(&fake, from), Vec::<String>::new(), "additions by others are kept, not re-applied");
}

#[tokio::test(start_paused = true)]
async fn cleanup_waits_for_the_children() {
    let (fake, ctx) = start(&MyApp::test().finalized()).await;
    stored(&fake).await.reconcile(&ctx).await.expect("the children are made");
    until(&ctx, "both children", |c| c.deployments.get(NS, "web").is_some() && c.services.get(NS, "web").is_some())
        .await;
    // The user deletes it: with our finalizer on, the server only marks it.
    Api::<MyApp>::namespaced(fake.client(), NS).delete("web", &DeleteParams::default()).await.expect("delete");
    let app = stored(&fake).await;
    assert!(app.metadata.deletion_timestamp.is_some());

    // First look: both children are deleted in the foreground, so they stay (marked) until
    // their own dependents are gone; the finalizer stays too.
    let from = fake.requests().len();
    assert!(app.reconcile(&ctx).await.expect("cleanup").is_some(), "it looks again while the children exist");
    assert_eq!(
        writes(&fake, from),
        vec![
            format!("PATCH {MYAPPS}/web/status"),
            format!("POST {EVENTS}"),
            format!("DELETE {DEPLOYMENTS}/web"),
            format!("DELETE {SERVICES}/web"),
        ],
        "the Deleting status, its Event, and the children's deletes"
    );
    let app = stored(&fake).await;
    assert_eq!(app.metadata.finalizers, Some(vec![FINALIZER.to_string()]), "the finalizer stays");
    for collection in [DEPLOYMENTS, SERVICES] {
        let child = fake.get(collection, "web").expect("a child in foreground deletion stays");
        assert!(child.pointer("/metadata/deletionTimestamp").is_some(), "{collection}: marked");
    }

    // Second look, the children still being deleted: nothing to write, the finalizer stays.
    until(&ctx, "the children marked", |c| {
        c.deployments.get(NS, "web").is_some_and(|d| d.object().is_ok_and(|d| d.metadata.deletion_timestamp.is_some()))
            && c.services
                .get(NS, "web")
                .is_some_and(|s| s.object().is_ok_and(|s| s.metadata.deletion_timestamp.is_some()))
    })
    .await;
    let from = fake.requests().len();
    assert!(app.reconcile(&ctx).await.expect("cleanup").is_some(), "still waiting");
    assert_eq!(writes(&fake, from), Vec::<String>::new(), "no second delete, no finalizer removal");
    assert_eq!(stored(&fake).await.metadata.finalizers, Some(vec![FINALIZER.to_string()]));

    // The garbage collector finishes; once the caches see the children gone, the finalizer goes.
    fake.finish_foreground_deletion(DEPLOYMENTS, "web");
    fake.finish_foreground_deletion(SERVICES, "web");
    assert!(fake.get(DEPLOYMENTS, "web").is_none() && fake.get(SERVICES, "web").is_none());
    until(&ctx, "the children gone", |c| c.deployments.get(NS, "web").is_none() && c.services.get(NS, "web").is_none())
        .await;
    let app = stored(&fake).await;
    let from = fake.requests().len();
    assert_eq!(app.reconcile(&ctx).await.expect("cleanup"), None, "done");
    assert_eq!(writes(&fake, from), vec![format!("PATCH {MYAPPS}/web")], "only the finalizer's removal");
    assert!(fake.get(MYAPPS, "web").is_none(), "without its finalizer the MyApp is gone");
}

#[tokio::test(start_paused = true)]
async fn a_child_a_relist_finds_gone_is_sent_on_like_a_deletion() {
    use futures::StreamExt;
    use kube::Resource;
    let (fake, ctx) = start(&MyApp::test().finalized()).await;
    let app = stored(&fake).await;
    app.reconcile(&ctx).await.expect("the children are made");
    until(&ctx, "both children", |c| c.deployments.get(NS, "web").is_some() && c.services.get(NS, "web").is_some())
        .await;
    let (lagged, _lags) = tokio::sync::mpsc::unbounded_channel();
    let mut deployments = std::pin::pin!(ctx.caches.deployment_events(&lagged));

    // The Deployment goes while the watches are away (no DELETED event reaches them), and the
    // history is compacted: every watch gets 410 Gone and lists again.
    fake.delete_unwatched(DEPLOYMENTS, "web").expect("the Deployment was there");
    fake.compact();

    // Its owner must hear of it: the controller maps the Deployment to the MyApp waiting for it.
    let heard = tokio::time::timeout(Duration::from_secs(60), deployments.next())
        .await
        .expect("the relist's end sends the Deployment it found gone")
        .expect("the stream is open");
    assert_eq!(heard.meta().name.as_deref(), Some("web"));
    let owner = heard.meta().owner_references.iter().flatten().find(|o| o.controller == Some(true));
    assert_eq!(owner.map(|o| o.uid.as_str()), app.metadata.uid.as_deref(), "with its owner, to map it to");
    assert!(ctx.caches.deployments.get(NS, "web").is_none(), "gone from the store");
    assert!(ctx.caches.services.get(NS, "web").is_some(), "what the relist listed stays");
}

/// An Event's note is immutable: a repeat with the same note only counts in its series (a PATCH
/// without the note), and another note starts a new Event instead of a PATCH the API server
/// refuses.
#[tokio::test(start_paused = true)]
async fn a_new_note_starts_a_new_event_and_a_repeat_only_counts() {
    use kube::runtime::events::EventType;
    let (fake, ctx) = start(&MyApp::test()).await;
    let app = stored(&fake).await;
    let from = fake.requests().len();
    for note in ["1/1 pods ready with image a", "1/1 pods ready with image a", "1/1 pods ready with image b"] {
        ctx.writer.event(&app, EventType::Normal, "RolloutComplete", "Rollout", note.into()).await;
    }
    let methods: Vec<String> =
        writes(&fake, from).iter().filter_map(|w| w.split(' ').next().map(str::to_string)).collect();
    assert_eq!(methods, ["POST", "PATCH", "POST"]);
}
