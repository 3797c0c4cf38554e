//! AdmissionReview in, AdmissionReview out: pure, so malformed input, huge input and every
//! policy branch are unit-tested without a server. Nothing here panics on any input; the worst
//! case is a well-formed denial.

use super::mutate;
use super::policy::Policy;
use crate::api::MyApp;
use crate::api::validation::join;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use std::collections::BTreeMap;

/// Which webhook is answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/mutate`: defaulting.
    Mutate,
    /// `/validate`: policy.
    Validate,
}

/// A denial that cannot be tied to a request (no uid): the body was not an AdmissionReview.
pub fn malformed(reason: impl std::fmt::Display) -> AdmissionReview<DynamicObject> {
    AdmissionResponse::invalid(format!("malformed AdmissionReview: {reason}")).into_review()
}

fn deny(resp: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut r = resp.deny(message);
    r.result.code = 422;
    r.result.reason = "Invalid".into();
    r
}

fn read_app(obj: &DynamicObject) -> Result<MyApp, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| format!("cannot read the MyApp: {e}"))
}

fn mutate(
    req: &AdmissionRequest<DynamicObject>,
    resp: AdmissionResponse,
    traceparent: Option<&str>,
) -> AdmissionResponse {
    let Some(obj) = req.object.as_ref() else { return resp };
    let Ok(value) = serde_json::to_value(obj) else { return resp };
    let mut patch = mutate::defaults(&value);
    let spec_changed = match (&req.operation, req.old_object.as_ref().and_then(|o| serde_json::to_value(o).ok())) {
        (Operation::Create, _) => true,
        (Operation::Update, Some(old)) => old["spec"] != value["spec"],
        _ => false,
    };
    if let (true, Some(tp)) = (spec_changed, traceparent) {
        patch.0.extend(mutate::record_trace(&value, tp));
    }
    if patch.0.is_empty() {
        return resp;
    }
    match resp.clone().with_patch(patch) {
        Ok(r) => r,
        Err(e) => deny(resp, format!("cannot encode the defaulting patch: {e}")),
    }
}

fn validate(req: &AdmissionRequest<DynamicObject>, resp: AdmissionResponse, policy: &Policy) -> AdmissionResponse {
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return resp;
    }
    let Some(obj) = req.object.as_ref() else { return deny(resp, "the request has no object".into()) };
    let app = match read_app(obj) {
        Ok(a) => a,
        Err(e) => return deny(resp, e),
    };
    let old = match (req.operation.clone(), req.old_object.as_ref().map(read_app)) {
        (Operation::Update, Some(Ok(old))) => Some(old.spec),
        _ => None,
    };
    let annotations: BTreeMap<String, String> = app.metadata.annotations.clone().unwrap_or_default();
    let errors = policy.check(&app.spec, &annotations, old.as_ref());
    if errors.is_empty() { resp } else { deny(resp, join(&errors)) }
}

/// Answers one AdmissionReview body.
pub fn answer(body: &[u8], kind: Kind, policy: &Policy) -> AdmissionReview<DynamicObject> {
    answer_traced(body, kind, policy, None)
}

/// [`answer`], recording `traceparent` on objects whose spec the request changes.
pub fn answer_traced(
    body: &[u8],
    kind: Kind,
    policy: &Policy,
    traceparent: Option<&str>,
) -> AdmissionReview<DynamicObject> {
    answer_review(body, kind, policy, traceparent).unwrap_or_else(|NotAReview(e)| malformed(e))
}

/// A body that is no AdmissionReview with a request uid, so no answer can be tied to a request:
/// the server answers it with HTTP 400.
#[derive(Debug)]
pub struct NotAReview(pub String);

/// [`answer_traced`], telling apart a body that is no AdmissionReview (`Err`) from a review whose
/// object is unreadable, which gets a denial carrying its uid.
pub fn answer_review(
    body: &[u8],
    kind: Kind,
    policy: &Policy,
    traceparent: Option<&str>,
) -> Result<AdmissionReview<DynamicObject>, NotAReview> {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return unreadable_request(body, e),
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return Err(NotAReview("no request".into())),
    };
    let resp = AdmissionResponse::from(&req);
    let resp = match kind {
        Kind::Mutate => mutate(&req, resp, traceparent),
        Kind::Validate => validate(&req, resp, policy),
    };
    Ok(resp.into_review())
}

/// An AdmissionReview whose request has a uid but does not decode (e.g. an `object` that is no
/// object) is denied under that uid; anything else is [`NotAReview`].
fn unreadable_request(body: &[u8], e: serde_json::Error) -> Result<AdmissionReview<DynamicObject>, NotAReview> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| NotAReview(e.to_string()))?;
    match (value["kind"].as_str(), value["request"]["uid"].as_str()) {
        (Some("AdmissionReview"), Some(uid)) if !uid.is_empty() => {
            let mut resp = deny(AdmissionResponse::invalid(""), format!("cannot read the request: {e}"));
            resp.uid = uid.to_string();
            Ok(resp.into_review())
        }
        _ => Err(NotAReview(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn review(op: &str, spec: Value, old_spec: Option<Value>) -> Vec<u8> {
        let obj = |s: Value| json!({"apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": "web", "namespace": "ns"}, "spec": s});
        let mut req = json!({
            "uid": "abc-123",
            "kind": {"group": "myapp.dev", "version": "v1", "kind": "MyApp"},
            "resource": {"group": "myapp.dev", "version": "v1", "resource": "myapps"},
            "name": "web", "namespace": "ns", "operation": op,
            "userInfo": {"username": "alice"},
            "object": obj(spec),
            "dryRun": false
        });
        if let Some(o) = old_spec {
            req["oldObject"] = obj(o);
        }
        serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}))
            .expect("json")
    }

    /// The whole AdmissionReview answered to `body` under the default policy, as JSON.
    fn answered(body: &[u8], kind: Kind) -> Value {
        serde_json::to_value(answer(body, kind, &Policy::default())).expect("json")
    }

    /// Its `response`.
    fn response(body: &[u8], kind: Kind) -> Value {
        answered(body, kind)["response"].clone()
    }

    #[test]
    fn latest_is_denied_naming_the_field() {
        let out = response(&review("CREATE", json!({"image": "nginx:latest"}), None), Kind::Validate);
        assert_eq!(out["uid"], "abc-123");
        assert_eq!(out["allowed"], false);
        let msg = out["status"]["message"].as_str().expect("message");
        assert!(msg.starts_with("spec.image: "), "{msg}");
        assert!(msg.contains("latest"), "{msg}");
        assert_eq!(out["status"]["code"], 422);
    }

    #[test]
    fn valid_create_is_allowed_and_deletes_pass() {
        let ok = response(&review("CREATE", json!({"image": "nginx:1.27"}), None), Kind::Validate);
        assert_eq!(ok["allowed"], true);
        let del = response(&review("DELETE", json!({"image": "nginx:latest"}), None), Kind::Validate);
        assert_eq!(del["allowed"], true);
    }

    #[test]
    fn port_change_on_update_is_denied() {
        let body = review(
            "UPDATE",
            json!({"image": "nginx:1.27", "port": 9090}),
            Some(json!({"image": "nginx:1.27", "port": 8080})),
        );
        let out = response(&body, Kind::Validate);
        assert_eq!(out["allowed"], false);
        assert!(out["status"]["message"].as_str().unwrap_or_default().starts_with("spec.port: "));
    }

    #[test]
    fn mutate_returns_a_json_patch() {
        let out = response(&review("CREATE", json!({"image": "nginx:1.27"}), None), Kind::Mutate);
        assert_eq!(out["allowed"], true);
        assert_eq!(out["patchType"], "JSONPatch");
        // kube serializes the bytes as a JSON array of numbers, which the API server's decoder
        // accepts for a []byte field just like base64.
        let bytes: Vec<u8> = serde_json::from_value(out["patch"].clone()).expect("patch bytes");
        let ops: Value = serde_json::from_slice(&bytes).expect("a JSON Patch");
        let paths: Vec<&str> = ops.as_array().expect("ops").iter().filter_map(|o| o["path"].as_str()).collect();
        assert!(paths.contains(&"/spec/resources"), "{paths:?}");
    }

    #[test]
    fn malformed_bodies_get_a_well_formed_denial() {
        for body in [&b""[..], b"{", b"null", b"[]", b"{\"kind\":\"AdmissionReview\"}", &[0xff, 0xfe, 0x00]] {
            let out = answered(body, Kind::Validate);
            assert_eq!(out["kind"], "AdmissionReview");
            assert_eq!(out["response"]["allowed"], false, "{body:?}");
        }
    }

    #[test]
    fn wrong_types_in_the_object_are_denied_not_panics() {
        let body = review("CREATE", json!({"image": 42, "replicas": "many"}), None);
        let out = response(&body, Kind::Validate);
        assert_eq!(out["allowed"], false);
        assert!(out["status"]["message"].as_str().unwrap_or_default().contains("cannot read the MyApp"));
    }

    proptest! {
        #[test]
        fn any_bytes_give_a_valid_review(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            for kind in [Kind::Mutate, Kind::Validate] {
                let out = answered(&body, kind);
                prop_assert_eq!(&out["kind"], "AdmissionReview");
                prop_assert!(out["response"]["allowed"].is_boolean());
            }
        }

        #[test]
        fn any_spec_gives_a_valid_review(image in ".{0,40}", replicas in any::<i64>(), port in any::<i64>(), name in "[a-zA-Z0-9_.-]{0,12}") {
            let body = review("CREATE", json!({"image": image, "replicas": replicas, "port": port, "env": [{"name": name}]}), None);
            for kind in [Kind::Mutate, Kind::Validate] {
                let out = answered(&body, kind);
                prop_assert_eq!(&out["response"]["uid"], "abc-123");
            }
        }
    }
}
