//! Pure builders of the children of a `MyApp`: its Deployment and its Service, as the
//! server-side-apply documents the operator sends, and the comparison that tells whether what the
//! API server holds already matches them (so an unchanged resync writes nothing).

use crate::api::{MyApp, ServiceType, quantity};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde_json::Value;
use std::collections::BTreeMap;

/// Label that selects the pods of one `MyApp`.
pub const INSTANCE_LABEL: &str = "myapp.dev/name";
/// Label on everything the operator manages; its watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "myapp-operator";
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
        owner_references: app.controller_owner_ref(&()).map(|o| vec![o]),
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

/// True when the object the API server holds already carries everything we would apply.
pub fn up_to_date<K: serde::Serialize>(desired: &K, actual: &K) -> bool {
    match (serde_json::to_value(desired), serde_json::to_value(actual)) {
        (Ok(d), Ok(a)) => is_subset(&d, &a),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
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
