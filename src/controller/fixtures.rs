//! Test fixtures: `MyApp`s built step by step, e.g. `MyApp::test().finalized().deleting()`.

use crate::api::{FINALIZER, MyApp, MyAppSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;

/// The namespace every fixture lives in.
pub const NS: &str = "ns";

/// The collection path of MyApps in [`NS`], as the fake API server addresses it.
pub const MYAPPS: &str = "/apis/myapp.dev/v1/namespaces/ns/myapps";
/// The collection path of Deployments in [`NS`].
pub const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ns/deployments";
/// The collection path of Services in [`NS`].
pub const SERVICES: &str = "/api/v1/namespaces/ns/services";

impl MyApp {
    /// A valid `MyApp` named `web` in [`NS`], at generation 1, without finalizer, status or uid
    /// (the fake API server gives it a uid when it is written).
    pub fn test() -> Self {
        let mut app = MyApp::new("web", MyAppSpec::test("nginx:1.27"));
        app.metadata.namespace = Some(NS.into());
        app.metadata.generation = Some(1);
        app
    }

    /// With the operator's finalizer, as after its first reconcile.
    pub fn finalized(mut self) -> Self {
        self.metadata.finalizers.get_or_insert_with(Vec::new).push(FINALIZER.into());
        self
    }

    /// Marked for deletion now.
    pub fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        self
    }

    /// With its spec changed by `change`.
    pub fn with_spec(mut self, change: impl FnOnce(&mut MyAppSpec)) -> Self {
        change(&mut self.spec);
        self
    }

    /// As JSON, to store in the fake API server.
    pub fn json(&self) -> Value {
        serde_json::to_value(self).expect("a MyApp serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    #[test]
    fn fixtures_compose() {
        let app = MyApp::test().finalized().deleting().with_spec(|s| s.replicas = 3);
        assert_eq!((app.name_any().as_str(), app.namespace().as_deref()), ("web", Some(NS)));
        assert_eq!(app.finalizers(), [FINALIZER.to_string()]);
        assert!(app.metadata.deletion_timestamp.is_some());
        assert_eq!(app.spec.replicas, 3);
        assert!(MyApp::test().finalizers().is_empty() && MyApp::test().metadata.deletion_timestamp.is_none());
    }
}
