//! What the caches keep of each object.
//!
//! Every replica caches every MyApp and every child, so what a cached object holds sets the
//! memory a replica needs. Dropped as each object arrives, before it is stored or fanned out:
//! - from every object, `managedFields`, which nothing reads;
//! - from a MyApp, annotations outside `myapp.dev/`: above all `kubectl`'s last-applied
//!   configuration, a second copy of the whole object for MyApps applied with `kubectl apply`.
//!
//! Children keep their bodies: the drift check ([`super::children::up_to_date`]) compares the
//! applied fields, and status reads the Deployment's. (Pruning them down to those fields, through
//! a JSON round trip per event, was measured with 1,000 MyApps and saved about 0.5 MiB per replica
//! of 17 to 28 MiB: not worth its CPU; see `bench/README.md`.)

use crate::api::MyApp;
use kube::Resource;

/// Annotations of ours (the applied hash, the trace link, the port-change opt-in).
const OUR_ANNOTATIONS: &str = "myapp.dev/";

/// Drops `managedFields` from a cached child.
pub fn child<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Drops `managedFields` and every annotation outside `myapp.dev/` from a cached MyApp.
pub fn myapp(app: &mut MyApp) {
    child(app);
    if let Some(annotations) = app.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with(OUR_ANNOTATIONS));
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
        myapp(&mut app);
        let kept: Vec<&String> = app.metadata.annotations.iter().flatten().map(|(k, _)| k).collect();
        assert_eq!(kept, ["myapp.dev/traceparent"]);
        assert_eq!(app.metadata.managed_fields, None);
        assert_eq!(app.spec, children::tests::app().spec);
    }
}
