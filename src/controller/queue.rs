//! Queue depth: how many MyApps wait for a reconcile.
//!
//! kube's `Controller` keeps its scheduler private, so the depth is counted from outside it: a
//! MyApp enters the queue when a watch event concerns it (its own, or one of its children's through
//! the controller owner reference), when a term starts or after a subscriber lagged (everything
//! waits then), and leaves it when its reconcile starts. Like the scheduler, the queue holds each
//! object once however many events arrive. Requeues by delay (resyncs, retries after an error)
//! happen inside the scheduler and are not counted, even while one waits for a free reconcile
//! slot. A trigger for an object that is gone leaves the queue when the controller reports it
//! missing.

use crate::api::MyApp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashSet;
use std::sync::Mutex;

/// The set of waiting MyApps, mirrored into a gauge.
#[derive(Debug, Default)]
pub struct Pending {
    waiting: Mutex<HashSet<ObjectRef<MyApp>>>,
    gauge: Gauge,
}

impl Pending {
    /// A queue that reports its depth in `gauge`.
    pub fn new(gauge: Gauge) -> Self {
        Self { waiting: Mutex::default(), gauge }
    }

    fn update(&self, f: impl FnOnce(&mut HashSet<ObjectRef<MyApp>>)) {
        if let Ok(mut w) = self.waiting.lock() {
            f(&mut w);
            self.gauge.set(i64::try_from(w.len()).unwrap_or(i64::MAX));
        }
    }

    /// `obj` was triggered.
    pub fn add(&self, obj: ObjectRef<MyApp>) {
        self.update(|w| {
            w.insert(obj);
        });
    }

    /// A child (Deployment, Service) changed: its controller owner, if a MyApp, was triggered.
    pub fn add_owner_of(&self, child: &ObjectMeta) {
        if let Some(obj) = owner(child) {
            self.add(obj);
        }
    }

    /// `obj`'s reconcile started, or the controller found it gone.
    pub fn remove(&self, namespace: Option<&str>, name: &str) {
        self.update(|w| w.retain(|o| !(o.name == name && o.namespace.as_deref() == namespace)));
    }

    /// The current depth.
    pub fn depth(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }
}

impl Drop for Pending {
    /// A term's queue dies with the term (its controller was stopped or cancelled).
    fn drop(&mut self) {
        self.gauge.set(0);
    }
}

/// The MyApp a child's event triggers: its controller owner reference of kind MyApp.
pub fn owner(meta: &ObjectMeta) -> Option<ObjectRef<MyApp>> {
    let owner = meta.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true) && o.kind == "MyApp")?;
    let mut r = ObjectRef::new(&owner.name);
    if let Some(ns) = &meta.namespace {
        r = r.within(ns);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(owners: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(serde_json::json!({"name": "web", "namespace": "ns", "ownerReferences": owners}))
            .expect("meta")
    }

    #[test]
    fn each_object_waits_once_and_leaves_when_started() {
        let gauge = Gauge::default();
        let q = Pending::new(gauge.clone());
        q.add(ObjectRef::new("a").within("ns"));
        q.add(ObjectRef::new("a").within("ns"));
        q.add(ObjectRef::new("b").within("ns"));
        q.add(ObjectRef::new("a").within("other"));
        assert_eq!((q.depth(), gauge.get()), (3, 3));
        q.remove(Some("ns"), "a");
        assert_eq!((q.depth(), gauge.get()), (2, 2));
        q.remove(Some("ns"), "missing");
        assert_eq!(q.depth(), 2);
        drop(q);
        assert_eq!(gauge.get(), 0, "a cancelled term leaves no stale depth");
    }

    #[test]
    fn children_trigger_their_controller_owner_only() {
        let owned = meta(serde_json::json!([
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "1", "controller": false},
            {"apiVersion": "myapp.dev/v1", "kind": "MyApp", "name": "web", "uid": "2", "controller": true}
        ]));
        assert_eq!(owner(&owned), Some(ObjectRef::new("web").within("ns")));
        let not_controller =
            meta(serde_json::json!([{"apiVersion": "myapp.dev/v1", "kind": "MyApp", "name": "web", "uid": "2"}]));
        assert_eq!(owner(&not_controller), None);
        assert_eq!(owner(&meta(serde_json::Value::Null)), None);
        let q = Pending::default();
        q.add_owner_of(&owned);
        q.add_owner_of(&not_controller);
        assert_eq!(q.depth(), 1, "only the controller owner waits");
    }
}
