//! The CRD committed in `deploy/` is exactly what the Rust types generate.

use kube::CustomResourceExt;
use myapp_operator::api::MyApp;

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crd/myapps.myapp.dev.yaml");
    let committed = std::fs::read_to_string(path).expect("read the committed CRD");
    let generated = serde_yaml::to_string(&MyApp::crd()).expect("serialize the CRD");
    assert!(
        committed == generated,
        "deploy/crd/myapps.myapp.dev.yaml is out of date; regenerate it with\n  cargo run -- crd > deploy/crd/myapps.myapp.dev.yaml"
    );
}

#[test]
fn crd_has_the_subresources_and_names_kubectl_relies_on() {
    let crd = serde_json::to_value(MyApp::crd()).expect("CRD as JSON");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["subresources"]["scale"]["specReplicasPath"], ".spec.replicas");
    assert_eq!(v["subresources"]["scale"]["labelSelectorPath"], ".status.selector");
    assert!(v["subresources"]["status"].is_object());
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "mya");
    assert_eq!(crd["spec"]["names"]["categories"][0], "all");
    let columns: Vec<&str> =
        v["additionalPrinterColumns"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(columns, ["Image", "Replicas", "Ready", "Status", "Age"]);
    let conditions = &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
}

#[test]
fn crd_refuses_names_that_cannot_name_a_service_on_creation_only() {
    let crd = serde_json::to_value(MyApp::crd()).expect("CRD as JSON");
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let rules = root["x-kubernetes-validations"].as_array().expect("root CEL rules");
    let rule = rules
        .iter()
        .find(|r| r["rule"].as_str().is_some_and(|r| r.contains("self.metadata.name")))
        .expect("a rule on metadata.name");
    let text = rule["rule"].as_str().unwrap_or_default();
    assert!(text.contains(myapp_operator::api::validation::NAME_PATTERN), "{text}");
    assert!(text.contains("size() <= 63"), "{text}");
    // Only on creation: an object created before the rule must still take updates (finalizers).
    assert!(text.starts_with("oldSelf.hasValue() || "), "{text}");
    assert_eq!(rule["optionalOldSelf"], true);
    let message = rule["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("metadata.name ") && message.contains("DNS-1035"), "the rule is named: {message}");
}
