//! What the caches keep of each object.
//!
//! Every replica caches every MyApp and every child, so what a cached object holds sets the
//! memory a replica needs. Dropped as each object arrives, before it is stored or fanned out:
//! - from every object, `managedFields`, which nothing reads;
//! - from a MyApp, annotations outside `myapp.dev/`: above all `kubectl`'s last-applied
//!   configuration, a second copy of the whole object for MyApps applied with `kubectl apply`;
//! - from a MyApp, its labels: the children's labels come from its name, and nothing reads them
//!   (a map of a few labels costs more than half a KiB of heap).
//!
//! Children are kept in their own compact form ([`super::cached`]).

use crate::api::MyApp;

/// Annotations of ours (the applied hash, the trace link, the port-change opt-in).
const OUR_ANNOTATIONS: &str = "myapp.dev/";

/// Drops `managedFields`, the labels and every annotation outside `myapp.dev/` from a cached
/// MyApp.
pub fn myapp(app: &mut MyApp) {
    let meta = &mut app.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with(OUR_ANNOTATIONS));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::children;

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
        app.metadata.managed_fields = Some(vec![Default::default()]);
        app.metadata.labels = Some([("app.kubernetes.io/name".to_string(), "web".to_string())].into());
        myapp(&mut app);
        assert_eq!(app.metadata.labels, None);
        let kept: Vec<&String> = app.metadata.annotations.iter().flatten().map(|(k, _)| k).collect();
        assert_eq!(kept, ["myapp.dev/traceparent"]);
        assert_eq!(app.metadata.managed_fields, None);
        assert_eq!(app.spec, children::tests::app().spec);
    }
}
