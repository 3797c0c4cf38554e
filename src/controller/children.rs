//! Pure builders of the children of a `MyApp`: its Deployment and its Service, as the
//! server-side-apply documents the operator sends, and the comparison that tells whether what the
//! API server holds already matches them (so an unchanged resync writes nothing).
//!
//! # Guarantees
//!
//! - [`up_to_date`] is false whenever the document to apply differs from the one last applied,
//!   including when a field was *removed* from it (`spec.env` or `spec.resources.limits` taken
//!   out of the `MyApp`): every document is [`stamp`]ed with a digest of itself in the
//!   [`APPLIED_HASH`] annotation, which the apply writes on the child. A removal changes the
//!   digest, and server-side apply then removes the field the operator no longer sends.
//! - It is also false when a field the operator sets was changed by hand on the child.
//! - It is true for a child as the operator last applied it, with whatever the API server or other
//!   managers added (defaults, status, quantities in canonical form): a resync writes nothing.
//!
//! # Caveats
//!
//! A child last applied by a version of the operator that did not stamp it, or whose builders
//! produced a different document, is applied once more.

use crate::api::{APPLIED_HASH, INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use crate::api::{MyApp, ServiceType, quantity};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

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

/// True when every field set in `desired` has the same value in `actual`. Fields that only
/// `actual` has (defaults, status, fields of other managers) are ignored. Quantities compare by
/// value, since the API server stores them in canonical form (`1000m` becomes `1`).
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => {
            d.iter().all(|(k, dv)| a.get(k).is_some_and(|av| is_subset(dv, av)) || dv.is_null())
        }
        (Value::Array(d), Value::Array(a)) => d.len() == a.len() && d.iter().zip(a).all(|(x, y)| is_subset(x, y)),
        (Value::String(d), Value::String(a)) => d == a || quantity::same_value(d, a),
        (d, a) => d == a,
    }
}

/// True when the object the API server holds already carries everything we would apply. With a
/// [`stamp`]ed `desired`, that includes the digest of the whole document: a field that `desired`
/// no longer has, but the last applied document had, makes it false (see the module's guarantees).
pub fn up_to_date<K: serde::Serialize>(desired: &K, actual: &K) -> bool {
    match (serde_json::to_value(desired), serde_json::to_value(actual)) {
        (Ok(d), Ok(a)) => is_subset(&d, &a),
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
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
        let d = up_to_date(&stamp(deployment(after)).expect("stamp"), &live_d);
        let s = up_to_date(&stamp(service(after)).expect("stamp"), &live_s);
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
        assert!(!up_to_date(&desired, &live), "a child written before the digest existed");
        assert!(up_to_date(&desired, &stored(&desired)));
    }

    #[test]
    fn a_hand_edited_digest_is_repaired() {
        let desired = stamp(service(&full_app())).expect("stamp");
        let mut live = stored(&desired);
        live.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(APPLIED_HASH.into(), "0".repeat(32));
        assert!(!up_to_date(&desired, &live));
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
        assert!(up_to_date(&d, &d.clone()));
        let mut other = d.clone();
        if let Some(spec) = other.spec.as_mut() {
            spec.type_ = Some("LoadBalancer".into());
        }
        assert!(!up_to_date(&d, &other));
    }
}
