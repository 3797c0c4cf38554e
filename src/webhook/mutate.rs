//! Defaulting: a JSON Patch that fills in what the user left out. Idempotent: applied to its own
//! output it yields an empty patch, so the API server may call it again (reinvocation) safely.

use crate::api::{FINALIZER, MANAGED_BY, MANAGED_BY_LABEL, TRACE_ANNOTATION};
use json_patch::{AddOperation, Patch, PatchOperation};
use jsonptr::PointerBuf;
use serde_json::{Value, json};

/// Default CPU request when none is given.
pub(crate) const DEFAULT_CPU_REQUEST: &str = "50m";
/// Default memory request when none is given.
pub(crate) const DEFAULT_MEMORY_REQUEST: &str = "64Mi";

fn add(ops: &mut Vec<PatchOperation>, path: &[&str], value: Value) {
    ops.push(PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(path.iter().copied()), value }));
}

/// The patch that records `traceparent` in the [`TRACE_ANNOTATION`] of `obj`, unless it is
/// already there. Call it only for requests that change the spec (a create, or an update whose
/// spec differs), so that the operator's own metadata writes do not overwrite the user's context.
pub(crate) fn record_trace(obj: &Value, traceparent: &str) -> Vec<PatchOperation> {
    let mut ops = Vec::new();
    match obj["metadata"].get("annotations").filter(|a| a.is_object()) {
        None => add(&mut ops, &["metadata", "annotations"], json!({ TRACE_ANNOTATION: traceparent })),
        Some(a) if a.get(TRACE_ANNOTATION).and_then(Value::as_str) == Some(traceparent) => {}
        Some(_) => add(&mut ops, &["metadata", "annotations", TRACE_ANNOTATION], json!(traceparent)),
    }
    ops
}

/// The patch that puts the operator's [`FINALIZER`] on `obj`, unless it is there. Call it for a
/// create only: an update may be the operator's own cleanup taking the finalizer off. It saves
/// the reconciler the write that would add it (the reconciler still adds it when it is missing,
/// for MyApps created while the webhook was not called). Caveat: with server-side apply, the
/// finalizer counts as set by the applier's field manager, so a later apply by the same manager
/// that leaves it out removes it; the reconciler then adds it back, under its own manager.
pub(crate) fn finalizer(obj: &Value) -> Vec<PatchOperation> {
    let mut ops = Vec::new();
    match obj["metadata"].get("finalizers").and_then(Value::as_array) {
        None => add(&mut ops, &["metadata", "finalizers"], json!([FINALIZER])),
        Some(f) if f.iter().any(|v| v.as_str() == Some(FINALIZER)) => {}
        Some(_) => add(&mut ops, &["metadata", "finalizers", "-"], json!(FINALIZER)),
    }
    ops
}

/// The patch that defaults `obj` (a MyApp as JSON): replicas 1, port 8080, resource requests,
/// and the recommended `app.kubernetes.io/*` labels.
pub(crate) fn defaults(obj: &Value) -> Patch {
    let mut ops = Vec::new();
    let spec = &obj["spec"];
    if spec.is_object() {
        if spec.get("replicas").is_none_or(Value::is_null) {
            add(&mut ops, &["spec", "replicas"], json!(1));
        }
        if spec.get("port").is_none_or(Value::is_null) {
            add(&mut ops, &["spec", "port"], json!(8080));
        }
        match spec.get("resources").filter(|r| r.is_object()) {
            None => add(
                &mut ops,
                &["spec", "resources"],
                json!({"requests": {"cpu": DEFAULT_CPU_REQUEST, "memory": DEFAULT_MEMORY_REQUEST}}),
            ),
            Some(res) => match res.get("requests").filter(|r| r.is_object()) {
                None => {
                    // Requests default to the limits when there are limits (as Kubernetes does),
                    // else to the operator's defaults.
                    let limits = res.get("limits").filter(|l| l.is_object());
                    let cpu = limits.and_then(|l| l.get("cpu")).cloned().unwrap_or(json!(DEFAULT_CPU_REQUEST));
                    let mem = limits.and_then(|l| l.get("memory")).cloned().unwrap_or(json!(DEFAULT_MEMORY_REQUEST));
                    add(&mut ops, &["spec", "resources", "requests"], json!({"cpu": cpu, "memory": mem}));
                }
                Some(req) => {
                    let limits = res.get("limits");
                    for (k, d) in [("cpu", DEFAULT_CPU_REQUEST), ("memory", DEFAULT_MEMORY_REQUEST)] {
                        if req.get(k).is_none_or(Value::is_null) {
                            let v = limits.and_then(|l| l.get(k)).filter(|v| !v.is_null()).cloned().unwrap_or(json!(d));
                            add(&mut ops, &["spec", "resources", "requests", k], v);
                        }
                    }
                }
            },
        }
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let wanted = [("app.kubernetes.io/name", name), (MANAGED_BY_LABEL, MANAGED_BY)];
    match obj["metadata"].get("labels").filter(|l| l.is_object()) {
        None => {
            let labels: serde_json::Map<String, Value> =
                wanted.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_string(), json!(v))).collect();
            if !labels.is_empty() {
                add(&mut ops, &["metadata", "labels"], Value::Object(labels));
            }
        }
        Some(labels) => {
            for (k, v) in wanted {
                if !v.is_empty() && labels.get(k).is_none() {
                    add(&mut ops, &["metadata", "labels", k], json!(v));
                }
            }
        }
    }
    Patch(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(obj: &Value, patch: &Patch) -> Value {
        let mut out = obj.clone();
        json_patch::patch(&mut out, patch).expect("patch applies");
        out
    }

    #[test]
    fn fills_in_defaults_and_labels() {
        let obj = json!({"metadata": {"name": "web"}, "spec": {"image": "nginx:1.27"}});
        let out = apply(&obj, &defaults(&obj));
        assert_eq!(out["spec"]["replicas"], 1);
        assert_eq!(out["spec"]["port"], 8080);
        assert_eq!(out["spec"]["resources"]["requests"], json!({"cpu": "50m", "memory": "64Mi"}));
        assert_eq!(out["metadata"]["labels"]["app.kubernetes.io/name"], "web");
        assert_eq!(out["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
    }

    #[test]
    fn keeps_what_the_user_set() {
        let obj = json!({
            "metadata": {"name": "web", "labels": {"app.kubernetes.io/name": "custom", "team": "a"}},
            "spec": {"image": "nginx:1.27", "replicas": 0, "port": 9000,
                     "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}}
        });
        let out = apply(&obj, &defaults(&obj));
        assert_eq!(out["spec"]["replicas"], 0);
        assert_eq!(out["spec"]["port"], 9000);
        assert_eq!(
            out["spec"]["resources"]["requests"],
            json!({"cpu": "1", "memory": "1Gi"}),
            "memory request from the limit"
        );
        assert_eq!(out["metadata"]["labels"]["app.kubernetes.io/name"], "custom");
        assert_eq!(out["metadata"]["labels"]["team"], "a");
    }

    #[test]
    fn is_idempotent() {
        for obj in [
            json!({"metadata": {"name": "web"}, "spec": {"image": "nginx:1.27"}}),
            json!({"metadata": {"name": "w", "labels": {}}, "spec": {"image": "x:1", "resources": {"limits": {"cpu": "2"}}}}),
        ] {
            let once = apply(&obj, &defaults(&obj));
            assert!(defaults(&once).0.is_empty(), "second pass patched {:?}", defaults(&once));
        }
    }

    #[test]
    fn trace_context_is_recorded_once() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let obj = json!({"metadata": {"name": "web"}, "spec": {}});
        let out = apply(&obj, &Patch(record_trace(&obj, tp)));
        assert_eq!(out["metadata"]["annotations"][TRACE_ANNOTATION], tp);
        assert!(record_trace(&out, tp).is_empty(), "already recorded");
        let mut other = out.clone();
        other["metadata"]["annotations"]["team"] = json!("a");
        let newer = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-01";
        let updated = apply(&other, &Patch(record_trace(&other, newer)));
        assert_eq!(updated["metadata"]["annotations"][TRACE_ANNOTATION], newer);
        assert_eq!(updated["metadata"]["annotations"]["team"], "a");
    }

    #[test]
    fn a_created_myapp_gets_the_finalizer_once() {
        let obj = json!({"metadata": {"name": "web"}, "spec": {}});
        let out = apply(&obj, &Patch(finalizer(&obj)));
        assert_eq!(out["metadata"]["finalizers"], json!([FINALIZER]));
        assert!(finalizer(&out).is_empty(), "reinvoked: nothing more");
        let theirs = json!({"metadata": {"name": "web", "finalizers": ["example.com/keep"]}, "spec": {}});
        let out = apply(&theirs, &Patch(finalizer(&theirs)));
        assert_eq!(out["metadata"]["finalizers"], json!(["example.com/keep", FINALIZER]), "theirs kept, ours added");
    }

    #[test]
    fn label_keys_with_slashes_are_escaped() {
        let obj = json!({"metadata": {"name": "web", "labels": {"x": "y"}}, "spec": {}});
        let patch = serde_json::to_value(defaults(&obj)).expect("json");
        let paths: Vec<&str> = patch.as_array().into_iter().flatten().filter_map(|o| o["path"].as_str()).collect();
        assert!(paths.contains(&"/metadata/labels/app.kubernetes.io~1name"), "{paths:?}");
    }
}
