//! What the caches keep of each object: only what reconcile and status read.
//!
//! Every replica caches every MyApp and every child, so the bytes per cached object set the
//! memory a replica needs (and the limit `deploy/` ships). The API server sends much more than
//! the operator reads: `managedFields`, `kubectl`'s last-applied annotation, the defaults it
//! filled into each pod template, a Service's cluster IPs, a Deployment's conditions with their
//! messages. Those are dropped as each object arrives, before it is stored or fanned out.
//!
//! # What is kept
//! - **MyApp:** everything but `managedFields` and annotations outside `myapp.dev/` (reconcile
//!   reads the spec, the status, the finalizers, the trace annotation).
//! - **Children:** the fields the operator applies, found from the *shape* of the documents
//!   [`children::deployment`] and [`children::service`] build for a MyApp that sets every
//!   optional field, so that a field added to a builder is kept without a change here (the drift
//!   check, [`children::up_to_date`], compares exactly those fields); plus the metadata the
//!   controller reads (uid, resourceVersion, generation, deletionTimestamp) and, for a Deployment,
//!   the status that [`crate::api::conditions::RolloutFacts`] reads.
//!
//! # Caveat
//! A field the operator does not apply is invisible in the cache. That is the point: drift in a
//! field the operator does not own is not the operator's to correct.

use super::children;
use crate::api::{EnvVar, MyApp, MyAppSpec, ResourceAmounts, Resources, ServiceType};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use serde_json::{Map, Value};
use std::sync::LazyLock;

/// Metadata every cached child keeps besides what the builders set.
const META_KEPT: &[&str] = &["uid", "resourceVersion", "generation", "deletionTimestamp"];

/// The Deployment status fields [`crate::api::conditions::RolloutFacts`] reads.
const DEPLOYMENT_STATUS_KEPT: &[&str] =
    &["observedGeneration", "replicas", "updatedReplicas", "readyReplicas", "availableReplicas"];

/// Annotations of ours (the applied hash, the trace link, the port-change opt-in).
const OUR_ANNOTATIONS: &str = "myapp.dev/";

/// A MyApp that sets every optional field, so that its children have every key a child can have.
fn maximal() -> MyApp {
    let amounts = || ResourceAmounts { cpu: Some("1".into()), memory: Some("1Mi".into()) };
    let mut app = MyApp::new(
        "shape",
        MyAppSpec {
            image: "shape:1".into(),
            replicas: 1,
            port: 8080,
            env: vec![EnvVar { name: "A".into(), value: "b".into() }],
            resources: Some(Resources { requests: Some(amounts()), limits: Some(amounts()) }),
            service_type: Some(ServiceType::LoadBalancer),
        },
    );
    app.metadata.namespace = Some("shape".into());
    app.metadata.uid = Some("shape".into());
    app
}

fn shape_of<K: kube::Resource + serde::Serialize + Clone>(doc: K) -> Value {
    let mut shape = children::stamp(doc).ok().and_then(|d| serde_json::to_value(d).ok()).unwrap_or(Value::Null);
    if let Some(meta) = shape.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in META_KEPT {
            meta.insert((*k).into(), Value::Null);
        }
    }
    shape
}

static DEPLOYMENT_SHAPE: LazyLock<Value> = LazyLock::new(|| {
    let mut shape = shape_of(children::deployment(&maximal()));
    let status: Map<String, Value> = DEPLOYMENT_STATUS_KEPT.iter().map(|k| ((*k).to_string(), Value::Null)).collect();
    shape["status"] = Value::Object(status);
    // Only the condition that says a rollout is stuck, and only its type and reason.
    shape["status"]["conditions"] = serde_json::json!([{"type": null, "reason": null}]);
    shape
});

static SERVICE_SHAPE: LazyLock<Value> = LazyLock::new(|| shape_of(children::service(&maximal())));

/// Keeps in `value` only the keys `shape` has, recursively; an array keeps each of its elements,
/// pruned by the shape's first element; a `null` in the shape keeps the value whole.
fn prune(value: &mut Value, shape: &Value) {
    match (value, shape) {
        (Value::Object(v), Value::Object(s)) => {
            v.retain(|k, _| s.contains_key(k));
            for (k, child) in v.iter_mut() {
                if let Some(sub) = s.get(k) {
                    prune(child, sub);
                }
            }
        }
        (Value::Array(v), Value::Array(s)) => {
            if let Some(first) = s.first() {
                v.iter_mut().for_each(|e| prune(e, first));
            }
        }
        _ => {}
    }
}

/// Prunes `obj` through JSON against `shape`; leaves it as it was if a round trip fails.
fn pruned<K: serde::Serialize + serde::de::DeserializeOwned>(obj: &mut K, shape: &Value) {
    let Ok(mut v) = serde_json::to_value(&*obj) else { return };
    prune(&mut v, shape);
    if let Ok(p) = serde_json::from_value(v) {
        *obj = p;
    }
}

/// Drops from a cached Deployment what the operator never reads; see the module documentation.
pub fn deployment(d: &mut Deployment) {
    pruned(d, &DEPLOYMENT_SHAPE);
    if let Some(conditions) = d.status.as_mut().and_then(|s| s.conditions.as_mut()) {
        conditions.retain(|c| c.type_.as_deref() == Some("Progressing"));
    }
}

/// Drops from a cached Service what the operator never reads; see the module documentation.
pub fn service(s: &mut Service) {
    pruned(s, &SERVICE_SHAPE);
}

/// Drops from a cached MyApp what the operator never reads; see the module documentation.
pub fn myapp(a: &mut MyApp) {
    a.metadata.managed_fields = None;
    if let Some(annotations) = a.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with(OUR_ANNOTATIONS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::RolloutFacts;
    use serde_json::json;

    /// A Deployment as the API server returns it: our applied document plus its defaults, status
    /// and bookkeeping.
    fn served_deployment(app: &MyApp) -> Deployment {
        let mut v = serde_json::to_value(children::stamp(children::deployment(app)).expect("stamp")).expect("json");
        v["metadata"]["uid"] = json!("d-uid");
        v["metadata"]["resourceVersion"] = json!("42");
        v["metadata"]["generation"] = json!(3);
        v["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        v["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("3");
        v["metadata"]["managedFields"] = json!([{"manager": "myapp-operator", "operation": "Apply", "fieldsV1": {"f:spec": {}}}]);
        v["spec"]["progressDeadlineSeconds"] = json!(600);
        v["spec"]["revisionHistoryLimit"] = json!(10);
        v["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
        let pod = &mut v["spec"]["template"]["spec"];
        pod["dnsPolicy"] = json!("ClusterFirst");
        pod["restartPolicy"] = json!("Always");
        pod["schedulerName"] = json!("default-scheduler");
        pod["terminationGracePeriodSeconds"] = json!(30);
        pod["containers"][0]["terminationMessagePath"] = json!("/dev/termination-log");
        pod["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
        v["status"] = json!({
            "observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability."},
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"web-1\" has timed out progressing."}
            ]
        });
        serde_json::from_value(v).expect("deployment")
    }

    #[test]
    fn a_pruned_deployment_keeps_what_reconcile_reads_and_drops_the_rest() {
        let app = children::tests::app();
        let served = served_deployment(&app);
        let mut cached = served.clone();
        deployment(&mut cached);

        let desired = children::stamp(children::deployment(&app)).expect("stamp");
        assert!(children::up_to_date(&desired, &cached), "the drift check sees no drift");
        assert_eq!(RolloutFacts::from_deployment(&cached), RolloutFacts::from_deployment(&served));
        assert_eq!(cached.metadata.uid.as_deref(), Some("d-uid"));
        assert_eq!(cached.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(cached.metadata.owner_references, served.metadata.owner_references);

        let v = serde_json::to_value(&cached).expect("json");
        assert!(v["metadata"].get("managedFields").is_none());
        assert!(v["metadata"]["annotations"].get("deployment.kubernetes.io/revision").is_none());
        assert!(v["spec"].get("strategy").is_none() && v["spec"].get("revisionHistoryLimit").is_none());
        assert!(v["spec"]["template"]["spec"].get("dnsPolicy").is_none());
        assert!(v["spec"]["template"]["spec"]["containers"][0].get("terminationMessagePath").is_none());
        assert_eq!(v["status"]["conditions"], json!([{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]));
        let (before, after) = (serde_json::to_vec(&served).expect("json").len(), serde_json::to_vec(&cached).expect("json").len());
        assert!(after * 3 < before * 2, "pruned by a third at least: {before} -> {after} bytes");
    }

    #[test]
    fn drift_in_an_applied_field_is_still_seen() {
        let app = children::tests::app();
        let mut served = served_deployment(&app);
        if let Some(c) = served.spec.template.spec.as_mut().and_then(|p| p.containers.first_mut()) {
            c.image = Some("someone/else:1".into());
        }
        deployment(&mut served);
        let desired = children::stamp(children::deployment(&app)).expect("stamp");
        assert!(!children::up_to_date(&desired, &served));
    }

    #[test]
    fn a_pruned_service_keeps_what_is_applied() {
        let app = children::tests::app();
        let mut v = serde_json::to_value(children::stamp(children::service(&app)).expect("stamp")).expect("json");
        v["metadata"]["uid"] = json!("s-uid");
        v["spec"]["clusterIP"] = json!("10.96.0.12");
        v["spec"]["clusterIPs"] = json!(["10.96.0.12"]);
        v["spec"]["sessionAffinity"] = json!("None");
        v["status"] = json!({"loadBalancer": {}});
        let mut cached: Service = serde_json::from_value(v).expect("service");
        service(&mut cached);
        let desired = children::stamp(children::service(&app)).expect("stamp");
        assert!(children::up_to_date(&desired, &cached));
        let v = serde_json::to_value(&cached).expect("json");
        assert!(v["spec"].get("clusterIP").is_none() && v.get("status").is_none());
        assert_eq!(v["metadata"]["uid"], "s-uid");
    }

    #[test]
    fn a_pruned_myapp_keeps_our_annotations_only() {
        let mut app = children::tests::app();
        app.metadata.annotations = Some(
            [
                ("kubectl.kubernetes.io/last-applied-configuration".to_string(), "{\"big\": true}".to_string()),
                ("myapp.dev/traceparent".to_string(), "00-1-2-01".to_string()),
            ]
            .into(),
        );
        myapp(&mut app);
        let kept: Vec<&String> = app.metadata.annotations.iter().flatten().map(|(k, _)| k).collect();
        assert_eq!(kept, ["myapp.dev/traceparent"]);
        assert_eq!(app.spec, children::tests::app().spec);
    }
}
