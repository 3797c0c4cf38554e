//! The child shapes against the caches: a Deployment or Service as the API server sends it,
//! kept in compact form, is judged by `up_to_date` as the whole object would be; and the
//! shapes keep every field the builders write.

use super::tests::up_to_date_typed;
use super::*;
use crate::api::validation::validate_spec;
use crate::api::{EnvVar, MyAppSpec, ResourceAmounts, Resources, ServiceType};
use crate::cache::{Cached, Shape, merge, project, untyped};
use proptest::prelude::*;
use serde_json::{Value, json};

fn json<K: Serialize>(doc: &K) -> Value {
    serde_json::to_value(doc).expect("serializes")
}

/// What the cache keeps of `doc` as the API server sends it (`served`), as a document.
fn kept<K: Shape>(served: Value) -> Value {
    Cached::<K>::from_json(served).expect("cached").document().expect("kept")
}

/// A Deployment as the API server sends it: the applied document plus defaults, status,
/// managedFields and fields of other managers.
fn served(app: &MyApp) -> Value {
    let mut d = applied(deployment(app));
    merge(
        &mut d,
        json!({
            "metadata": {
                "resourceVersion": "42", "uid": "d-uid", "generation": 3,
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "annotations": {"deployment.kubernetes.io/revision": "2"},
                "managedFields": [{"manager": "myapp-operator", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"progressDeadlineSeconds": 600, "revisionHistoryLimit": 10,
                     "strategy": {"type": "RollingUpdate"},
                     "template": {"spec": {"restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}}},
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                       "availableReplicas": 2,
                       "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                       "message": "long text", "lastUpdateTime": "2026-12-01T00:00:00Z"}]},
        }),
    );
    if let Some(c) = d.pointer_mut("/spec/template/spec/containers/0").and_then(Value::as_object_mut) {
        c.insert("imagePullPolicy".into(), "IfNotPresent".into());
        c.insert("terminationMessagePath".into(), "/dev/termination-log".into());
    }
    d
}

#[test]
fn a_cached_deployment_keeps_what_reconcile_reads_and_drops_the_rest() {
    let app = tests::app();
    let cached = Cached::<Deployment>::from_json(served(&app)).expect("cached");
    assert_eq!(cached.meta().name.as_deref(), Some("web"));
    assert_eq!(cached.meta().resource_version.as_deref(), Some("42"));
    assert_eq!(cached.meta().owner_references.as_ref().map(Vec::len), Some(1));
    for dropped in ["managedFields", "progressDeadlineSeconds", "imagePullPolicy", "lastUpdateTime", "long text"] {
        assert!(!cached.rest().contains(dropped), "{dropped} is dropped: {}", cached.rest());
    }
    let d = cached.object().expect("rebuilt");
    let desired = stamp(deployment(&app)).expect("stamped");
    let kept = cached.document().expect("kept");
    assert!(up_to_date(&json(&desired), &kept), "an unchanged child is up to date, judged on what is kept");
    assert!(up_to_date_typed(&desired, &d), "and on the typed object alike");
    let facts = crate::api::conditions::RolloutFacts::from_deployment(&d);
    assert!(facts.complete() && facts.generation == 3 && facts.ready == 2, "{facts:?}");
    assert!(d.meta().annotations.as_ref().is_some_and(|a| a.contains_key(crate::api::APPLIED_HASH)));
}

#[test]
fn what_is_not_an_object_is_an_error_not_a_panic() {
    for bad in [json!([]), json!("x"), json!(null), json!({"metadata": "x"})] {
        assert!(Cached::<Deployment>::from_json(bad.clone()).is_err(), "{bad}");
    }
}

#[test]
fn a_cached_child_shows_drift_and_deletion() {
    let app = tests::app();
    let desired = stamp(deployment(&app)).expect("stamped");
    let mut changed = served(&app);
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1".into();
    changed["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z".into();
    let cached = Cached::<Deployment>::from_json(changed).expect("cached");
    let kept = cached.document().expect("kept");
    assert!(!up_to_date(&json(&desired), &kept), "a hand-changed image is drift");
    let d = cached.object().expect("rebuilt");
    assert!(!up_to_date_typed(&desired, &d), "on the typed object alike");
    assert!(d.metadata.deletion_timestamp.is_some());
    assert!(kept.pointer("/metadata/deletionTimestamp").is_some());
    let mut s = applied(service(&app));
    s["spec"]["clusterIP"] = "10.0.0.1".into();
    s["spec"]["ports"][0]["nodePort"] = 30001.into();
    let cached = Cached::<Service>::from_json(s).expect("cached");
    assert!(!cached.rest().contains("clusterIP") && !cached.rest().contains("30001"));
    let desired = stamp(service(&app)).expect("stamped");
    assert!(up_to_date(&json(&desired), &cached.document().expect("kept")));
    assert!(up_to_date_typed(&desired, &cached.object().expect("rebuilt")));
}

/// What other managers add to a child survives the cache's projection as far as
/// `up_to_date` reads it: entries of lists merged by key are kept with their keys, so the
/// rebuilt child is judged as the API server's own (see `KEYED_LISTS`).
#[test]
fn a_cached_child_with_additions_by_others_is_still_up_to_date() {
    let app = tests::app();
    let desired = stamp(deployment(&app)).expect("stamped");
    let mut shared = served(&app);
    let containers = shared.pointer_mut("/spec/template/spec/containers").and_then(Value::as_array_mut);
    let containers = containers.expect("containers");
    if let Some(env) = containers[0].get_mut("env").and_then(Value::as_array_mut) {
        env.insert(0, json!({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}));
        env.push(json!({"name": "X", "value": "1"}));
    }
    containers.insert(0, json!({"name": "proxy", "image": "envoy:1", "args": ["--long", "--list"]}));
    merge(&mut shared, json!({"metadata": {"labels": {"team": "a"}}}));
    let cached = Cached::<Deployment>::from_json(shared.clone()).expect("cached");
    assert!(!cached.rest().contains("secretKeyRef") && !cached.rest().contains("--long"), "{}", cached.rest());
    let kept = cached.document().expect("kept");
    assert!(up_to_date(&json(&desired), &kept), "additions by others are no drift: {}", cached.rest());
    assert!(up_to_date_typed(&desired, &cached.object().expect("rebuilt")));

    shared["spec"]["template"]["spec"]["containers"][1]["env"][1]["value"] = "debug".into();
    let cached = Cached::<Deployment>::from_json(shared).expect("cached");
    assert!(!up_to_date(&json(&desired), &cached.document().expect("kept")), "our env entry changed is drift");
    assert!(!up_to_date_typed(&desired, &cached.object().expect("rebuilt")));
}

#[test]
fn a_cached_myapp_keeps_what_reconcile_reads_and_drops_the_rest() {
    let mut app = tests::app();
    app.metadata.generation = Some(4);
    app.metadata.resource_version = Some("77".into());
    app.metadata.finalizers = Some(vec![crate::api::FINALIZER.into()]);
    app.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-01T00:00:00Z".parse().expect("a timestamp"),
    ));
    app.status = Some(crate::api::MyAppStatus {
        observed_generation: Some(3),
        replicas: 2,
        ready_replicas: 1,
        selector: "app=web".into(),
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "Progressing".into(),
            message: "1 of 2 ready".into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-01T00:00:00Z".parse().expect("a timestamp"),
            ),
            observed_generation: Some(3),
        }],
    });
    let mut served = serde_json::to_value(&app).expect("a MyApp serializes");
    merge(
        &mut served,
        json!({"metadata": {
            "labels": {"team": "a"},
            "creationTimestamp": "2026-12-01T00:00:00Z",
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}",
                "myapp.dev/traceparent": "00-1-2-01",
            },
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
        }}),
    );
    let cached = Cached::<MyApp>::from_json(served).expect("cached");
    for dropped in ["managedFields", "last-applied", "team", "creationTimestamp"] {
        assert!(!cached.rest().contains(dropped), "{dropped} is dropped: {}", cached.rest());
    }
    let rebuilt = cached.object().expect("rebuilt");
    assert_eq!(rebuilt.spec, app.spec);
    assert_eq!(rebuilt.status, app.status);
    let kept: Vec<&String> = rebuilt.metadata.annotations.iter().flatten().map(|(k, _)| k).collect();
    assert_eq!(kept, ["myapp.dev/traceparent"]);
    let (m, want) = (&rebuilt.metadata, &app.metadata);
    assert_eq!((&m.name, &m.namespace, &m.uid, m.generation), (&want.name, &want.namespace, &want.uid, Some(4)));
    assert_eq!((&m.resource_version, &m.finalizers), (&want.resource_version, &want.finalizers));
    assert_eq!(m.deletion_timestamp, want.deletion_timestamp);
    assert_eq!(m.labels, None);
}

fn spec() -> impl Strategy<Value = MyAppSpec> {
    let amounts = (proptest::option::of("[1-9]00m"), proptest::option::of("[1-9]Mi"))
        .prop_map(|(cpu, memory)| ResourceAmounts { cpu, memory });
    (
        "[a-z]{1,8}:[0-9]",
        0..5i32,
        1..65535i32,
        proptest::collection::vec(("[A-Z]{1,4}", "[a-z]{0,3}"), 0..3),
        proptest::option::of((proptest::option::of(amounts.clone()), proptest::option::of(amounts))),
        proptest::option::of(prop_oneof![Just(ServiceType::ClusterIP), Just(ServiceType::NodePort)]),
    )
        .prop_map(|(image, replicas, port, env, resources, service_type)| MyAppSpec {
            image,
            replicas,
            port,
            env: env.into_iter().map(|(name, value)| EnvVar { name, value }).collect(),
            resources: resources.map(|(requests, limits)| Resources { requests, limits }),
            service_type,
        })
}

proptest! {
    /// The shape keeps every field a document of the builders has: so `is_subset` of a
    /// document against a cached child reads exactly what it reads against the whole child.
    #[test]
    fn the_shapes_keep_every_field_the_builders_write(spec in spec()) {
        let mut app = tests::app();
        app.spec = spec;
        for (doc, shape) in [
            (applied(deployment(&app)), Deployment::shape()),
            (applied(service(&app)), Service::shape()),
        ] {
            let mut expected = doc.clone();
            untyped(&mut expected);
            prop_assert_eq!(project(&doc, shape), expected);
        }
    }

    /// The up-to-date check on what the cache keeps judges as it does on the whole object, and
    /// finds a child out of date exactly when its MyApp's spec changed: for any two valid specs, a
    /// child applied from the first and served back with the API server's additions is up to
    /// date for the second if and only if the applied documents are the same.
    #[test]
    fn a_cached_child_is_up_to_date_exactly_when_nothing_changed(before in spec(), after in spec()) {
        // Only MyApps the reconciler rolls out: it refuses the others (env names repeated, say)
        // before any child is compared.
        prop_assume!(validate_spec(&before).is_empty() && validate_spec(&after).is_empty());
        let (mut old, mut new) = (tests::app(), tests::app());
        (old.spec, new.spec) = (before, after);
        let same = applied(deployment(&old)) == applied(deployment(&new));
        let desired = stamp(deployment(&new)).expect("stamped");
        let served_d = served(&old);
        let cached = Cached::<Deployment>::from_json(served_d.clone()).expect("cached");
        prop_assert_eq!(up_to_date(&json(&desired), &kept::<Deployment>(served_d.clone())), same);
        prop_assert_eq!(up_to_date_typed(&desired, &cached.object().expect("rebuilt")), same);
        prop_assert_eq!(up_to_date(&json(&desired), &served_d), same, "as on the object the API server sent");
        prop_assert!(up_to_date(&json(&desired), &kept::<Deployment>(served(&new))));

        let same = applied(service(&old)) == applied(service(&new));
        let desired = stamp(service(&new)).expect("stamped");
        prop_assert_eq!(up_to_date(&json(&desired), &kept::<Service>(applied(service(&old)))), same);
    }
}
