//! MyApps as the integration tests, the chaos workload and the benchmark create them.

use myapp_operator::api::MyApp;
use serde_json::{Value, json};

/// A MyApp named `name` with `spec` as given (the webhook defaults the rest).
pub fn myapp(name: &str, spec: Value) -> serde_json::Result<MyApp> {
    serde_json::from_value(
        json!({"apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": name}, "spec": spec}),
    )
}

/// A MyApp of `nginx:1.27` with `replicas`, everything else defaulted.
pub fn nginx(name: &str, replicas: i32) -> serde_json::Result<MyApp> {
    myapp(name, json!({"image": "nginx:1.27", "replicas": replicas}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_typed_myapp() {
        let app = nginx("web", 2).expect("MyApp");
        assert_eq!(app.metadata.name.as_deref(), Some("web"));
        assert_eq!((app.spec.image.as_str(), app.spec.replicas), ("nginx:1.27", 2));
        assert!(myapp("web", json!({"replicas": "many"})).is_err());
    }
}
