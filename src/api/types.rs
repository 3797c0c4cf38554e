//! The `MyApp` custom resource.
//!
//! Validation happens in three layers: the OpenAPI schema generated here (types, ranges, patterns),
//! the CEL rules attached with `#[x_kube(validation = ...)]` for what a schema cannot say, and the
//! validating webhook for configurable policy. [`super::validation`] holds the same rules in Rust so
//! that the reconciler can refuse a spec that got past admission (for example, one written while the
//! webhook was down) instead of rolling it out.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired state of a `MyApp`: one container image served by a Deployment behind a Service.
// The repeated `printcolumn(type_ = ...)` keys are separate columns, not duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "myapp.dev",
    version = "v1",
    kind = "MyApp",
    plural = "myapps",
    namespaced,
    status = "MyAppStatus",
    shortname = "mya",
    category = "all",
    doc = "A MyApp runs one container image as a Deployment behind a Service.",
    // The name becomes the Service's name and a label value (see `validate_name`). Checked on
    // creation only (`oldSelf` is empty then): a name never changes, and an object created before
    // this rule must still take updates, such as the removal of its finalizer.
    validation = Rule::new(format!(
        "oldSelf.hasValue() || (self.metadata.name.size() <= {} && self.metadata.name.matches('{}'))",
        super::name::MAX_NAME_LENGTH,
        super::name::NAME_PATTERN
    ))
    .message(kube::core::Message::Message(format!("metadata.name {}", super::name::NAME_RULE)))
    .optional_old_self(true),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MyAppSpec {
    /// Container image. It must carry a tag or a digest; the tag `latest` is refused.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(
        validation = Rule::new("self.matches(':[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$') || self.matches('@[a-z0-9]+([+._-][a-z0-9]+)*:[a-fA-F0-9]{32,}$')").message("must carry a tag or a digest, e.g. nginx:1.27"),
        validation = Rule::new("!self.endsWith(':latest')").message("the tag \"latest\" is not allowed: pin a version or a digest")
    )]
    pub image: String,

    /// Number of pods. Defaults to 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Port the container listens on and the Service exposes. Defaults to 8080.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Environment variables of the container. Names must be unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(
        validation = Rule::new("self.all(e, self.exists_one(f, f.name == e.name))").message("env names must be unique")
    )]
    pub env: Vec<EnvVar>,

    /// Compute resources of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,

    /// Type of the Service. Defaults to ClusterIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
}

fn default_replicas() -> i32 {
    1
}

fn default_port() -> i32 {
    8080
}

/// One environment variable.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    /// Variable name: letters, digits, `_`, `-` and `.`, not starting with a digit.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"))]
    pub name: String,
    /// Variable value.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Requests and limits of the container. A limit must be at least its request.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(
    validation = Rule::new("!has(self.limits) || !has(self.requests) || !has(self.limits.cpu) || !has(self.requests.cpu) || quantity(self.limits.cpu).compareTo(quantity(self.requests.cpu)) >= 0").message("limits.cpu must be at least requests.cpu").field_path(".limits.cpu"),
    validation = Rule::new("!has(self.limits) || !has(self.requests) || !has(self.limits.memory) || !has(self.requests.memory) || quantity(self.limits.memory).compareTo(quantity(self.requests.memory)) >= 0").message("limits.memory must be at least requests.memory").field_path(".limits.memory")
)]
pub struct Resources {
    /// Guaranteed amounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,
    /// Maximum amounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// CPU and memory amounts, as Kubernetes quantities (`250m`, `1`, `128Mi`).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ResourceAmounts {
    /// CPU, e.g. `250m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("must be a quantity, e.g. 250m"))]
    pub cpu: Option<String>,
    /// Memory, e.g. `128Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("must be a quantity, e.g. 128Mi"))]
    pub memory: Option<String>,
}

/// How the Service is exposed.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    /// A cluster-internal virtual IP.
    #[default]
    ClusterIP,
    /// A port on every node.
    NodePort,
    /// An external load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The name Kubernetes uses for this type.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Observed state of a `MyApp`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MyAppStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods created by the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// `Ready`, `Reconciling` and `Stalled`, with the kstatus meaning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
impl MyAppSpec {
    /// A minimal valid spec for tests: `image`, one replica, port 8080.
    pub fn test(image: &str) -> Self {
        Self { image: image.into(), replicas: 1, port: 8080, env: vec![], resources: None, service_type: None }
    }
}
