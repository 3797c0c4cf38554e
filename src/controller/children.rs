//! Pure builders of the children of a `MyApp`: its Deployment and its Service, as the
//! server-side-apply documents the operator sends, and the comparison that tells whether what the
//! API server holds already matches them (so an unchanged resync writes nothing).
//!
//! # Children shared with other managers
//!
//! The operator owns the fields it applies, and only those, as server-side apply means it: the
//! apply is forced under one field manager ([`crate::api::FIELD_MANAGER`]), so a field the
//! operator sets is taken back when someone else changed it, while what other managers *added*
//! stays. An env entry added with `kubectl set env`, a sidecar container injected by a webhook, a
//! label or an annotation: the API server keeps them through every apply, so the operator does
//! not call the child stale for them either (it would re-apply forever, and change nothing).
//! `spec.replicas` of the Deployment is the operator's: scaling the Deployment by hand (or by a
//! HorizontalPodAutoscaler aimed at the Deployment) is taken back; scale the `MyApp` instead.
//!
//! # Guarantees
//!
//! - [`up_to_date`] is false whenever the document to apply differs from the one last applied,
//!   including when a field was *removed* from it (`spec.env` or `spec.resources.limits` taken
//!   out of the `MyApp`): every document is [`stamp`]ed with a digest of itself in the
//!   [`APPLIED_HASH`] annotation, which the apply writes on the child. A removal changes the
//!   digest, and server-side apply then removes the field the operator no longer sends.
//! - It is also false when a field the operator sets was changed or removed by hand on the
//!   child (the image, `spec.replicas`, one of its env entries, its label values).
//! - It is true for a child as the operator last applied it, with whatever the API server or other
//!   managers added (defaults, status, quantities in canonical form, map keys, entries of the
//!   lists that server-side apply merges by key: see [`KEYED_LISTS`]): a resync writes nothing.
//!
//! # Caveats
//!
//! A child last applied by a version of the operator that did not stamp it, or whose builders
//! produced a different document, is applied once more. An entry added by someone else to a list
//! that server-side apply treats as atomic (none in the documents of today's builders) makes the
//! child stale, and the forced apply removes it.

use crate::api::{APPLIED_HASH, INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use crate::api::{MyApp, MyAppSpec, ResourceAmounts, Resources, ServiceType, quantity};
use crate::cache::{Shape, deletion, merge, shape_of};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Name of the container and of the port.
pub const CONTAINER: &str = "app";

/// The labels selecting the pods of `app`.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(INSTANCE_LABEL.to_string(), name.to_string())])
}

/// The label selector of `app`'s pods, as a string for `status.selector`.
pub fn selector_string(name: &str) -> String {
    format!("{INSTANCE_LABEL}={name}")
}

/// Labels on every child: the user's recommended labels plus ours.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert("app.kubernetes.io/name".into(), name.into());
    l.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    l
}

fn metadata(app: &MyApp) -> ObjectMeta {
    let name = app.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(name.clone()),
        namespace: app.metadata.namespace.clone(),
        labels: Some(labels(&name)),
        // blockOwnerDeletion: a foreground delete of the MyApp waits for its children.
        owner_references: app
            .controller_owner_ref(&())
            .map(|o| vec![OwnerReference { block_owner_deletion: Some(true), ..o }]),
        ..ObjectMeta::default()
    }
}

fn amounts(a: &crate::api::ResourceAmounts) -> Option<BTreeMap<String, Quantity>> {
    let m: BTreeMap<String, Quantity> = [("cpu", &a.cpu), ("memory", &a.memory)]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Quantity(v.clone()))))
        .collect();
    (!m.is_empty()).then_some(m)
}

/// The Deployment of `app`.
pub fn deployment(app: &MyApp) -> Deployment {
    let name = app.metadata.name.clone().unwrap_or_default();
    let spec = &app.spec;
    let env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|e| EnvVar {
            name: e.name.clone(),
            value: (!e.value.is_empty()).then(|| e.value.clone()),
            ..EnvVar::default()
        })
        .collect();
    let resources = spec.resources.as_ref().and_then(|r| {
        let requests = r.requests.as_ref().and_then(amounts);
        let limits = r.limits.as_ref().and_then(amounts);
        (requests.is_some() || limits.is_some()).then_some(ResourceRequirements {
            requests,
            limits,
            ..ResourceRequirements::default()
        })
    });
    Deployment {
        metadata: metadata(app),
        spec: DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(&name)), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(&name)), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: CONTAINER.into(),
                        image: Some(spec.image.clone()),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: spec.port,
                            protocol: Some("TCP".into()),
                            ..ContainerPort::default()
                        }]),
                        env: (!env.is_empty()).then_some(env),
                        resources,
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The Service of `app`.
pub fn service(app: &MyApp) -> Service {
    let name = app.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: metadata(app),
        spec: Some(ServiceSpec {
            type_: Some(app.spec.service_type.unwrap_or(ServiceType::ClusterIP).as_str().into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: app.spec.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The digest of `doc` as [`stamp`] computes it: SHA-256 of its JSON without the [`APPLIED_HASH`]
/// annotation, as 32 hex digits (128 bits). The JSON of a Kubernetes object is deterministic
/// (struct fields in declaration order, maps sorted by key), so the digest is the same on every
/// replica and every run.
pub fn applied_hash<K: Resource + Serialize + Clone>(doc: &K) -> Result<String, serde_json::Error> {
    let mut doc = doc.clone();
    let meta = doc.meta_mut();
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(APPLIED_HASH);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
    let json = serde_json::to_vec(&doc)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &json);
    Ok(digest.as_ref().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// `doc` with its digest ([`applied_hash`]) in the [`APPLIED_HASH`] annotation: the document to
/// apply. Since the digest is part of what [`up_to_date`] compares, a child applied from another
/// document (one that had a field this one lacks) is never taken as up to date. Idempotent.
pub fn stamp<K: Resource + Serialize + Clone>(mut doc: K) -> Result<K, serde_json::Error> {
    let hash = applied_hash(&doc)?;
    doc.meta_mut().annotations.get_or_insert_with(BTreeMap::new).insert(APPLIED_HASH.into(), hash);
    Ok(doc)
}

/// The lists of the children's documents that server-side apply merges by key: each as the path
/// of object keys that leads to it from the top of the document (list levels not counted), and the
/// fields that key its entries. They are the lists of the builders' documents that the API's
/// schema marks `x-kubernetes-list-type: map` (or, for `env`, with a patch merge key, which
/// server-side apply reads the same way), with the same keys:
/// - `metadata.ownerReferences`, by `uid`;
/// - a pod's `containers`, by `name`, and in each container `env`, by `name`, and `ports`, by
///   `containerPort` and `protocol`;
/// - a Service's `ports`, by `port` and `protocol`.
///
/// Every other list is atomic: an apply replaces it whole, so it compares whole. The builders set
/// every key field of every entry (`protocol` too, which the API server would default), so that an
/// entry is found by the key the API server stores it under.
pub const KEYED_LISTS: &[(&[&str], &[&str])] = &[
    (&["metadata", "ownerReferences"], &["uid"]),
    (&["spec", "template", "spec", "containers"], &["name"]),
    (&["spec", "template", "spec", "containers", "env"], &["name"]),
    (&["spec", "template", "spec", "containers", "ports"], &["containerPort", "protocol"]),
    (&["spec", "ports"], &["port", "protocol"]),
];

/// True when every field set in `desired` has the same value in `actual`, as the API server
/// would hold it after applying `desired` over `actual`. Fields that only `actual` has (defaults,
/// status, fields of other managers) are ignored, and so are entries that only `actual` has in a
/// list merged by key ([`KEYED_LISTS`]): each entry of `desired` is looked up by its key, in any
/// order. Other lists must have as many entries, each matching in order. Quantities compare by
/// value, since the API server stores them in canonical form (`1000m` becomes `1`).
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    subset_at(&mut Vec::new(), desired, actual)
}

/// [`is_subset`] of the values at `path` (object keys from the top of the document).
fn subset_at<'a>(path: &mut Vec<&'a str>, desired: &'a Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| {
            path.push(k);
            let ok = a.get(k).is_some_and(|av| subset_at(path, dv, av)) || dv.is_null();
            path.pop();
            ok
        }),
        (Value::Array(d), Value::Array(a)) => match list_keys(path) {
            Some(keys) => d.iter().all(|dv| {
                let same_key = |av: &&Value| keys.iter().all(|k| dv.get(k) == av.get(k));
                a.iter().find(same_key).is_some_and(|av| subset_at(path, dv, av))
            }),
            None => d.len() == a.len() && d.iter().zip(a).all(|(x, y)| subset_at(path, x, y)),
        },
        (Value::String(d), Value::String(a)) => d == a || quantity::same_value(d, a),
        (d, a) => d == a,
    }
}

/// The keys of the list at `path`, if server-side apply merges it by key.
fn list_keys(path: &[&str]) -> Option<&'static [&'static str]> {
    KEYED_LISTS.iter().find(|(p, _)| *p == path).map(|(_, keys)| *keys)
}

/// True when `actual`, the object the API server holds as JSON (or what the caches keep of it,
/// `Cached::document`), already carries everything of `desired`, the JSON of the document we
/// would apply. With a [`stamp`]ed `desired`, that includes the digest of the whole document: a
/// field that `desired` no longer has, but the last applied document had, makes it false (see
/// the module's guarantees). It compares JSON with JSON: a cached child is never rebuilt as a
/// typed object for it.
pub fn up_to_date(desired: &Value, actual: &Value) -> bool {
    is_subset(desired, actual)
}

// The child shapes: what the caches keep of a Deployment and of a Service (see
// `crate::cache::Shape`), derived from the builders above.

/// A `MyApp` with every optional field set, so its children carry every field the builders can
/// write.
fn maximal() -> MyApp {
    let amounts = || Some(ResourceAmounts { cpu: Some("1".into()), memory: Some("1Mi".into()) });
    let mut app = MyApp::new(
        "shape",
        MyAppSpec {
            image: "shape:1".into(),
            replicas: 1,
            port: 1,
            env: vec![crate::api::EnvVar { name: "A".into(), value: "a".into() }],
            resources: Some(Resources { requests: amounts(), limits: amounts() }),
            service_type: Some(ServiceType::NodePort),
        },
    );
    app.metadata.namespace = Some("shape".into());
    app.metadata.uid = Some("shape".into());
    app
}

fn applied<K: serde::Serialize + Resource + Clone>(doc: K) -> Value {
    let doc = stamp(doc.clone()).unwrap_or(doc);
    serde_json::to_value(doc).unwrap_or_default()
}

impl Shape for Deployment {
    fn shape() -> &'static Value {
        static SHAPE: LazyLock<Value> = LazyLock::new(|| {
            let mut read = deletion();
            // What `RolloutFacts::from_deployment` reads.
            merge(
                &mut read,
                json!({
                    "metadata": {"generation": true},
                    "status": {
                        "observedGeneration": true, "replicas": true, "updatedReplicas": true,
                        "readyReplicas": true, "availableReplicas": true,
                        "conditions": [{"type": true, "reason": true}],
                    },
                }),
            );
            shape_of(applied(deployment(&maximal())), read)
        });
        &SHAPE
    }
}

impl Shape for Service {
    fn shape() -> &'static Value {
        static SHAPE: LazyLock<Value> = LazyLock::new(|| shape_of(applied(service(&maximal())), deletion()));
        &SHAPE
    }
}

#[cfg(test)]
#[path = "shapes_tests.rs"]
mod shapes_tests;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// [`up_to_date`] of two typed objects.
    pub(crate) fn up_to_date_typed<K: Serialize>(desired: &K, actual: &K) -> bool {
        match (serde_json::to_value(desired), serde_json::to_value(actual)) {
            (Ok(d), Ok(a)) => up_to_date(&d, &a),
            _ => false,
        }
    }
    use crate::api::{EnvVar as AppEnv, MyAppSpec, ResourceAmounts, Resources};
    use serde_json::json;

    pub(crate) fn app() -> MyApp {
        let mut a = MyApp::new(
            "web",
            MyAppSpec {
                image: "nginx:1.27".into(),
                replicas: 2,
                port: 8080,
                env: vec![AppEnv { name: "MODE".into(), value: "prod".into() }],
                resources: Some(Resources {
                    requests: Some(ResourceAmounts { cpu: Some("100m".into()), memory: None }),
                    limits: None,
                }),
                service_type: None,
            },
        );
        a.metadata.namespace = Some("ns".into());
        a.metadata.uid = Some("uid-1".into());
        a
    }

    #[test]
    fn deployment_carries_the_spec() {
        let d = deployment(&app());
        let v = serde_json::to_value(&d).expect("serializes");
        assert_eq!(v["metadata"]["name"], "web");
        assert_eq!(v["metadata"]["namespace"], "ns");
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(v["spec"]["selector"]["matchLabels"][INSTANCE_LABEL], "web");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "nginx:1.27");
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        assert_eq!(c["env"][0], json!({"name": "MODE", "value": "prod"}));
        assert_eq!(c["resources"], json!({"requests": {"cpu": "100m"}}));
        assert_eq!(v["spec"]["template"]["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
    }

    #[test]
    fn children_are_controlled_by_the_app() {
        for meta in [deployment(&app()).metadata, service(&app()).metadata] {
            let owners = meta.owner_references.expect("owner references");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "MyApp");
            assert_eq!(owners[0].uid, "uid-1");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(owners[0].block_owner_deletion, Some(true));
        }
    }

    #[test]
    fn service_selects_the_pods() {
        let mut a = app();
        a.spec.service_type = Some(ServiceType::NodePort);
        let s = service(&a);
        let spec = s.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.selector, Some(selector_labels("web")));
        let ports = spec.ports.expect("ports");
        assert_eq!(ports[0].port, 8080);
        assert_eq!(ports[0].target_port, Some(IntOrString::String("http".into())));
    }

    #[test]
    fn empty_env_values_and_resources_are_omitted() {
        let mut a = app();
        a.spec.env = vec![AppEnv { name: "EMPTY".into(), value: String::new() }];
        a.spec.resources = None;
        let v = serde_json::to_value(deployment(&a)).expect("serializes");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["env"][0], json!({"name": "EMPTY"}));
        assert!(c.get("resources").is_none());
    }

    #[test]
    fn subset_ignores_server_defaults_but_sees_drift() {
        let desired = deployment(&app());
        let mut actual = serde_json::to_value(&desired).expect("serializes");
        actual["spec"]["progressDeadlineSeconds"] = json!(600);
        actual["metadata"]["resourceVersion"] = json!("42");
        actual["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("IfNotPresent");
        actual["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("0.1");
        let d = serde_json::to_value(&desired).expect("serializes");
        assert!(is_subset(&d, &actual));

        let mut drifted = actual.clone();
        drifted["spec"]["replicas"] = json!(5);
        assert!(!is_subset(&d, &drifted));
        let mut drifted = actual.clone();
        drifted["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil:1");
        assert!(!is_subset(&d, &drifted));
        let mut drifted = actual;
        drifted["spec"]["template"]["spec"]["containers"][0]["env"] = json!([]);
        assert!(!is_subset(&d, &drifted));
    }

    /// An app that sets every optional field: two env vars, requests and limits, a NodePort.
    fn full_app() -> MyApp {
        let mut a = app();
        a.spec.env = vec![
            AppEnv { name: "MODE".into(), value: "prod".into() },
            AppEnv { name: "LEVEL".into(), value: "debug".into() },
        ];
        a.spec.resources = Some(Resources {
            requests: Some(ResourceAmounts { cpu: Some("100m".into()), memory: Some("128Mi".into()) }),
            limits: Some(ResourceAmounts { cpu: Some("500m".into()), memory: Some("256Mi".into()) }),
        });
        a.spec.service_type = Some(ServiceType::NodePort);
        a
    }

    /// What the API server holds once `applied` was applied: the same document with what the
    /// server fills in (identity, defaults, status) and quantities in canonical form.
    fn stored<K: Serialize + serde::de::DeserializeOwned>(applied: &K) -> K {
        let mut v = serde_json::to_value(applied).expect("serializes");
        v["metadata"]["resourceVersion"] = json!("42");
        v["metadata"]["uid"] = json!("child-uid");
        v["metadata"]["generation"] = json!(3);
        if v["kind"] == "Deployment" {
            v["spec"]["progressDeadlineSeconds"] = json!(600);
            v["spec"]["revisionHistoryLimit"] = json!(10);
            v["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
            let c = &mut v["spec"]["template"]["spec"]["containers"][0];
            c["imagePullPolicy"] = json!("IfNotPresent");
            c["terminationMessagePath"] = json!("/dev/termination-log");
            if c["resources"]["limits"]["cpu"] == "500m" {
                c["resources"]["limits"]["cpu"] = json!("0.5");
            }
            v["status"] = json!({"observedGeneration": 3, "replicas": 2, "readyReplicas": 2});
        } else {
            v["spec"]["clusterIP"] = json!("10.0.0.7");
            v["spec"]["sessionAffinity"] = json!("None");
            if v["spec"]["type"] == "NodePort" {
                v["spec"]["ports"][0]["nodePort"] = json!(31234);
            }
        }
        serde_json::from_value(v).expect("deserializes")
    }

    /// (Deployment up to date, Service up to date) for children last applied from `before`,
    /// when the app is now `after`.
    fn fresh_after(before: &MyApp, after: &MyApp) -> (bool, bool) {
        let live_d = stored(&stamp(deployment(before)).expect("stamp"));
        let live_s = stored(&stamp(service(before)).expect("stamp"));
        let d = up_to_date_typed(&stamp(deployment(after)).expect("stamp"), &live_d);
        let s = up_to_date_typed(&stamp(service(after)).expect("stamp"), &live_s);
        (d, s)
    }

    #[test]
    fn an_unchanged_app_needs_no_write() {
        let a = full_app();
        assert_eq!(fresh_after(&a, &a), (true, true), "a resync of an unchanged MyApp must write nothing");
        assert_eq!(fresh_after(&app(), &app()), (true, true));
        let mut bare = app();
        bare.spec.env.clear();
        bare.spec.resources = None;
        assert_eq!(fresh_after(&bare, &bare), (true, true));
    }

    #[test]
    fn every_removed_or_changed_field_reaches_the_children() {
        type Edit = fn(&mut MyAppSpec);
        // (what, edit, Deployment stale, Service stale)
        let cases: [(&str, Edit, bool, bool); 14] = [
            ("env removed", |s| s.env.clear(), true, false),
            ("an env value set to \"\"", |s| s.env[0].value.clear(), true, false),
            ("one env var removed", |s| s.env.truncate(1), true, false),
            ("an env value changed", |s| s.env[1].value = "info".into(), true, false),
            ("resources removed", |s| s.resources = None, true, false),
            ("limits removed", |s| s.resources.as_mut().expect("resources").limits = None, true, false),
            ("requests removed", |s| s.resources.as_mut().expect("resources").requests = None, true, false),
            (
                "limits.cpu removed",
                |s| s.resources.as_mut().and_then(|r| r.limits.as_mut()).expect("limits").cpu = None,
                true,
                false,
            ),
            (
                "requests.memory removed",
                |s| s.resources.as_mut().and_then(|r| r.requests.as_mut()).expect("requests").memory = None,
                true,
                false,
            ),
            (
                "requests.cpu changed",
                |s| s.resources.as_mut().and_then(|r| r.requests.as_mut()).expect("requests").cpu = Some("200m".into()),
                true,
                false,
            ),
            ("serviceType removed", |s| s.service_type = None, false, true),
            ("serviceType changed", |s| s.service_type = Some(ServiceType::LoadBalancer), false, true),
            ("port changed", |s| s.port = 9090, true, true),
            ("image changed", |s| s.image = "nginx:1.28".into(), true, false),
        ];
        let before = full_app();
        for (what, edit, d_stale, s_stale) in cases {
            let mut after = before.clone();
            edit(&mut after.spec);
            assert_ne!(after.spec, before.spec, "{what}: the edit changes the spec");
            let (d, s) = fresh_after(&before, &after);
            assert_eq!(d, !d_stale, "{what}: Deployment up to date = {d}");
            assert_eq!(s, !s_stale, "{what}: Service up to date = {s}");
        }
    }

    /// Whether the operator calls the child last applied from `doc` up to date once another
    /// manager made `edit` to what the API server holds.
    fn up_to_date_after_edit<K>(doc: K, edit: fn(&mut Value)) -> bool
    where
        K: Resource + Serialize + serde::de::DeserializeOwned + Clone,
    {
        let desired = stamp(doc).expect("stamp");
        let mut live = serde_json::to_value(stored(&desired)).expect("serializes");
        edit(&mut live);
        up_to_date_typed(&desired, &serde_json::from_value::<K>(live).expect("deserializes"))
    }

    fn container(d: &mut Value) -> &mut Value {
        &mut d["spec"]["template"]["spec"]["containers"][0]
    }

    fn push(list: &mut Value, entry: Value) {
        list.as_array_mut().expect("a list").push(entry);
    }

    fn insert_first(list: &mut Value, entry: Value) {
        list.as_array_mut().expect("a list").insert(0, entry);
    }

    type Edit = fn(&mut Value);

    /// Asserts, for each `(what, edit)`, whether the Deployment (or Service) of [`full_app`] is
    /// still up to date after another manager made `edit` to it.
    fn judge<K>(doc: fn(&MyApp) -> K, fresh: bool, cases: &[(&str, Edit)])
    where
        K: Resource + Serialize + serde::de::DeserializeOwned + Clone,
    {
        for (what, edit) in cases {
            let judged = up_to_date_after_edit(doc(&full_app()), *edit);
            assert_eq!(judged, fresh, "{what}: up to date = {judged}");
        }
    }

    // Server-side apply keeps what other managers added to a child (see the module's doc), so
    // that is no reason to apply again: it would change nothing, on every resync. What the
    // operator sets, and someone changed, is.

    #[test]
    fn an_env_entry_added_by_another_manager_needs_no_write() {
        judge(
            deployment,
            true,
            &[
                ("kubectl set env X=1", |d| push(&mut container(d)["env"], json!({"name": "X", "value": "1"}))),
                ("an entry from a Secret, first", |d| {
                    let from = json!({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}});
                    insert_first(&mut container(d)["env"], from);
                }),
            ],
        );
    }

    #[test]
    fn a_sidecar_added_by_another_manager_needs_no_write() {
        judge(
            deployment,
            true,
            &[
                ("a sidecar after ours", |d| {
                    push(
                        &mut d["spec"]["template"]["spec"]["containers"],
                        json!({"name": "proxy", "image": "envoy:1"}),
                    );
                }),
                ("a sidecar injected before ours", |d| {
                    let proxy = json!({"name": "proxy", "image": "envoy:1", "ports": [{"containerPort": 15001, "protocol": "TCP"}]});
                    insert_first(&mut d["spec"]["template"]["spec"]["containers"], proxy);
                }),
            ],
        );
    }

    #[test]
    fn labels_and_annotations_added_by_others_need_no_write() {
        judge(
            deployment,
            true,
            &[
                ("a label", |d| d["metadata"]["labels"]["team"] = json!("a")),
                ("an annotation", |d| d["metadata"]["annotations"]["note"] = json!("hi")),
                ("kubectl rollout restart", |d| {
                    d["spec"]["template"]["metadata"]["annotations"] =
                        json!({"kubectl.kubernetes.io/restartedAt": "2026-12-01T00:00:00Z"});
                }),
            ],
        );
        judge(service, true, &[("a label", |s| s["metadata"]["labels"]["team"] = json!("a"))]);
    }

    #[test]
    fn other_entries_of_lists_merged_by_key_need_no_write() {
        judge(
            deployment,
            true,
            &[
                ("a port on our container", |d| {
                    push(
                        &mut container(d)["ports"],
                        json!({"name": "metrics", "containerPort": 9090, "protocol": "TCP"}),
                    );
                }),
                ("our port number over UDP, first", |d| {
                    insert_first(&mut container(d)["ports"], json!({"containerPort": 8080, "protocol": "UDP"}));
                }),
                ("another owner, not the controller", |d| {
                    let owner = json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "other"});
                    push(&mut d["metadata"]["ownerReferences"], owner);
                }),
            ],
        );
        judge(
            service,
            true,
            &[
                ("a port", |s| push(&mut s["spec"]["ports"], json!({"name": "m", "port": 9090, "protocol": "TCP"}))),
                ("our port number over UDP, first", |s| {
                    insert_first(&mut s["spec"]["ports"], json!({"name": "dns", "port": 8080, "protocol": "UDP"}));
                }),
            ],
        );
    }

    #[test]
    fn our_env_entry_changed_or_removed_is_applied_again() {
        judge(
            deployment,
            false,
            &[
                ("its value changed", |d| container(d)["env"][0]["value"] = json!("debug")),
                ("it removed", |d| {
                    container(d)["env"].as_array_mut().expect("env").remove(0);
                }),
                ("it replaced by one from a Secret", |d| {
                    container(d)["env"][0] =
                        json!({"name": "MODE", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}});
                }),
            ],
        );
    }

    #[test]
    fn replicas_changed_on_the_deployment_are_taken_back() {
        judge(
            deployment,
            false,
            &[
                ("kubectl scale deployment --replicas=5", |d| d["spec"]["replicas"] = json!(5)),
                ("scaled to zero", |d| d["spec"]["replicas"] = json!(0)),
            ],
        );
    }

    #[test]
    fn other_fields_of_ours_changed_by_others_are_taken_back() {
        judge(
            deployment,
            false,
            &[
                ("our image", |d| container(d)["image"] = json!("evil:1")),
                ("our container renamed", |d| container(d)["name"] = json!("other")),
                ("our port's protocol", |d| container(d)["ports"][0]["protocol"] = json!("UDP")),
                ("our label's value", |d| d["metadata"]["labels"][MANAGED_BY_LABEL] = json!("someone")),
                ("our owner reference removed", |d| d["metadata"]["ownerReferences"] = json!([])),
            ],
        );
        judge(service, false, &[("our port's target", |s| s["spec"]["ports"][0]["targetPort"] = json!(9999))]);
    }

    /// The values at `path` (object keys; lists are walked through) in `v`.
    fn at<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a Value> {
        match (v, path.split_first()) {
            (_, None) => vec![v],
            (Value::Array(items), _) => items.iter().flat_map(|x| at(x, path)).collect(),
            (Value::Object(o), Some((k, rest))) => o.get(*k).map(|x| at(x, rest)).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn every_entry_of_a_keyed_list_carries_its_keys() {
        let docs = [
            serde_json::to_value(deployment(&full_app())).expect("serializes"),
            serde_json::to_value(service(&full_app())).expect("serializes"),
        ];
        let mut entries = 0;
        for (path, keys) in KEYED_LISTS {
            for list in docs.iter().flat_map(|d| at(d, path)) {
                for entry in list.as_array().expect("a keyed list is a list") {
                    entries += 1;
                    assert!(keys.iter().all(|k| entry.get(k).is_some()), "{path:?}: {entry} lacks one of {keys:?}");
                }
            }
        }
        assert_eq!(entries, 7, "owner references (2), containers, env (2), container ports, Service ports");
    }

    #[test]
    fn a_field_added_back_is_seen_too() {
        let mut before = full_app();
        before.spec.env.clear();
        before.spec.resources = None;
        before.spec.service_type = None;
        assert_eq!(fresh_after(&before, &full_app()), (false, false));
    }

    #[test]
    fn a_child_applied_without_a_digest_is_applied_once_more() {
        let a = full_app();
        let live = stored(&deployment(&a));
        let desired = stamp(deployment(&a)).expect("stamp");
        assert!(!up_to_date_typed(&desired, &live), "a child written before the digest existed");
        assert!(up_to_date_typed(&desired, &stored(&desired)));
    }

    #[test]
    fn a_hand_edited_digest_is_repaired() {
        let desired = stamp(service(&full_app())).expect("stamp");
        let mut live = stored(&desired);
        live.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(APPLIED_HASH.into(), "0".repeat(32));
        assert!(!up_to_date_typed(&desired, &live));
    }

    #[test]
    fn the_digest_is_stable_and_stamping_idempotent() {
        let once = stamp(deployment(&full_app())).expect("stamp");
        let twice = stamp(once.clone()).expect("stamp");
        assert_eq!(once, twice);
        let hash = applied_hash(&once).expect("hash");
        assert_eq!(hash.len(), 32);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(once.metadata.annotations.as_ref().and_then(|a| a.get(APPLIED_HASH)), Some(&hash));
        assert_eq!(applied_hash(&deployment(&full_app())).expect("hash"), hash, "the annotation is not hashed");
        assert_ne!(applied_hash(&deployment(&app())).expect("hash"), hash);
        // The pod template is not annotated: stamping alone never restarts pods.
        assert!(once.spec.template.metadata.and_then(|m| m.annotations).is_none());
    }

    #[test]
    fn typed_comparison() {
        let d = service(&app());
        assert!(up_to_date_typed(&d, &d.clone()));
        let mut other = d.clone();
        if let Some(spec) = other.spec.as_mut() {
            spec.type_ = Some("LoadBalancer".into());
        }
        assert!(!up_to_date_typed(&d, &other));
    }
}
