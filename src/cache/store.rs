//! The store of the children the operator manages (Deployments, Services), each packed in one
//! string ([`Packed`]) in a set keyed by namespace and name.
//!
//! kube's reflector `Store` keeps an `Arc` of a `Resource` per object (so an `ObjectMeta` struct
//! each) under an `ObjectRef` key that repeats its name, namespace and resourceVersion in strings
//! of their own. For a child that is about as much again as the fields reconcile reads. The
//! controller needs kube's `Store` for the MyApps it reconciles; it reads children only by name
//! (see `reconcile::live_child`), so they are kept here.
//!
//! A relist (after 410 Gone, or a watch that broke off) updates the store in place, as
//! [`super::watch::InPlace`], the writer of kube's stores, does, and reports what it found gone, so that the
//! owner of a child deleted while the watch was away is woken.

use super::compact::{Cached, Packed, Shape, child_key, owner};
use super::watch::{Apply, Listed, Lists, key_of};
use kube::runtime::watcher::Event;
use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};
use tokio::sync::watch;

/// Packed children of kind `K`, shared by the watch that writes them and every reader.
pub struct Children<K> {
    set: Arc<RwLock<HashSet<Packed<K>>>>,
    ready: watch::Sender<bool>,
}

impl<K> Clone for Children<K> {
    fn clone(&self) -> Self {
        Self { set: self.set.clone(), ready: self.ready.clone() }
    }
}

impl<K: Shape> Default for Children<K> {
    fn default() -> Self {
        Self { set: Arc::default(), ready: watch::Sender::new(false) }
    }
}

impl<K: Shape> Children<K> {
    /// The child `name` in `namespace`, if the store holds it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Packed<K>> {
        self.set.read().unwrap_or_else(PoisonError::into_inner).get(child_key(namespace, name).as_str()).cloned()
    }

    /// How many children it holds.
    pub fn len(&self) -> usize {
        self.set.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once the first list is in. Any number of tasks may wait.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// A writer fed by one watch of every namespace.
    pub fn writer(&self) -> ChildWriter<K> {
        self.writer_for(Lists::new(vec![None]))
    }

    /// A writer fed by the watches of `lists`.
    pub fn writer_for(&self, lists: Lists) -> ChildWriter<K> {
        ChildWriter { store: self.clone(), lists }
    }

    fn insert(&self, cached: &Cached<K>) {
        let mut set = self.set.write().unwrap_or_else(PoisonError::into_inner);
        match cached.pack() {
            Ok(packed) => {
                set.replace(packed);
            }
            Err(e) => {
                // Never expected (the owner references serialize). Without an entry, a reader
                // asks the API server: slower, still right.
                tracing::warn!(kind = %K::kind(&()), error = %e, "a child could not be packed; it is read from the API server");
                let meta = kube::Resource::meta(cached);
                let key =
                    child_key(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
                set.remove(key.as_str());
            }
        }
    }

    fn remove(&self, cached: &Cached<K>) {
        let meta = kube::Resource::meta(cached);
        let key = child_key(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
        self.set.write().unwrap_or_else(PoisonError::into_inner).remove(key.as_str());
    }

    /// Drops every child of the list's namespace that it did not name, and returns them.
    fn retain_seen(&self, listed: &Listed) -> Vec<Packed<K>> {
        let mut set = self.set.write().unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<Packed<K>> =
            set.iter().filter(|p| listed.missed(p.key().split_once('/').map(|(ns, _)| ns), p.key())).cloned().collect();
        for p in &gone {
            set.remove(p.key());
        }
        gone
    }
}

/// Applies its watches' events to a [`Children`] store. Every list, the first one or a relist,
/// updates the store in place: each listed child replaces its entry as it arrives, and at the end
/// of the list the children of its namespace it did not name are dropped, and returned.
pub struct ChildWriter<K> {
    store: Children<K>,
    /// The lists of the watches that feed the store.
    lists: Lists,
}

/// Whether a MyApp controls `child`: only such children are kept. Anyone who can create a
/// Deployment or a Service can give it the operator's label, so the label alone must not cost
/// every replica memory; an object some MyApp controls is one the operator wrote, or one whose
/// owner reference a user forged, which the garbage collector deletes once it finds no such
/// owner. A reconcile that finds no child in the store reads it from the API server, so a foreign
/// object of a child's name is still seen, and never taken over.
fn owned<K: Shape>(child: &Cached<K>) -> bool {
    owner(kube::Resource::meta(child)).is_some()
}

impl<K: Shape> Apply<Cached<K>> for ChildWriter<K> {
    fn concerns(&self, child: &Cached<K>) -> bool {
        owned(child)
    }

    fn apply_from(&mut self, w: usize, event: &Event<Cached<K>>) -> Vec<Cached<K>> {
        match event {
            Event::Init => self.lists.begin(w),
            // Not kept, and not marked seen: had it been kept (a child a MyApp no longer
            // controls), the end of the list drops it.
            // So is one too large to keep (see `cached::MAX_KEPT`): reconcile reads it from the
            // API server, as any child the store does not hold.
            Event::InitApply(child) if !owned(child) || !child.kept() => {}
            // A child that lost its controller reference, or grew too large, leaves the store.
            Event::Apply(child) if !owned(child) || !child.kept() => self.store.remove(child),
            Event::InitApply(child) => {
                self.lists.saw(w, key_of(child));
                self.store.insert(child);
            }
            Event::InitDone => {
                let listed = self.lists.end(w);
                let gone = self.store.retain_seen(&listed);
                if listed.now_ready {
                    self.store.ready.send_replace(true);
                }
                return gone.iter().filter_map(|p| p.unpack().ok()).collect();
            }
            Event::Apply(child) => self.store.insert(child),
            Event::Delete(child) => self.store.remove(child),
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kube::Resource;
    use serde_json::json;

    /// A Service of the operator's, as the API server sends it.
    fn service(name: &str, port: i32) -> Cached<Service> {
        Cached::from_json(served(name, port)).expect("cached")
    }

    fn served(name: &str, port: i32) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": name, "namespace": "ns", "resourceVersion": "7",
                "labels": {"app.kubernetes.io/managed-by": "myapp-operator", "myapp.dev/name": name},
                "ownerReferences": [{"apiVersion": "myapp.dev/v1", "kind": "MyApp", "name": name, "uid": "uid-1",
                                     "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": {"selector": {"myapp.dev/name": name}, "ports": [{"name": "http", "port": port, "targetPort": port}]},
        })
    }

    fn held(store: &Children<Service>) -> Vec<(String, i32)> {
        let set = store.set.read().expect("not poisoned");
        let mut all: Vec<(String, i32)> = set
            .iter()
            .map(|p| {
                let s = p.object().expect("unpacks");
                (s.metadata.name.unwrap_or_default(), s.spec.and_then(|s| s.ports).unwrap_or_default()[0].port)
            })
            .collect();
        all.sort();
        all
    }

    fn names(v: &[(&str, i32)]) -> Vec<(String, i32)> {
        v.iter().map(|(n, p)| (n.to_string(), *p)).collect()
    }

    #[test]
    fn a_packed_child_rebuilds_as_it_was_cached_but_its_resource_version() {
        let cached = service("web", 8080);
        let packed = cached.pack().expect("packs");
        assert_eq!(packed.key(), "ns/web");
        let (a, b) = (cached.object().expect("rebuilt"), packed.object().expect("rebuilt"));
        assert_eq!(b.metadata.resource_version, None, "not kept");
        assert_eq!(a.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!((&a.metadata.name, &a.metadata.namespace), (&b.metadata.name, &b.metadata.namespace));
        assert_eq!(a.metadata.owner_references, b.metadata.owner_references);
        assert!(b.metadata.owner_references.as_ref().is_some_and(|o| o.len() == 1), "its owner is kept");
        assert_eq!((&a.metadata.labels, &a.metadata.annotations), (&b.metadata.labels, &b.metadata.annotations));
        assert_eq!(a.spec, b.spec);
        let unpacked = packed.unpack().expect("unpacks");
        assert_eq!(unpacked.meta().owner_references, cached.meta().owner_references);
    }

    #[test]
    fn a_child_without_owners_or_with_line_breaks_in_its_fields_packs_and_unpacks() {
        let mut doc = served("web", 8080);
        doc["metadata"].as_object_mut().expect("metadata").remove("ownerReferences");
        doc["metadata"]["annotations"][crate::api::APPLIED_HASH] = json!("a\nb");
        let cached: Cached<Service> = Cached::from_json(doc).expect("cached");
        let back = cached.pack().expect("packs").object().expect("unpacks");
        assert_eq!(back.metadata.owner_references, None);
        assert_eq!(
            back.metadata.annotations.and_then(|a| a.get(crate::api::APPLIED_HASH).cloned()).as_deref(),
            Some("a\nb")
        );
    }

    /// `service` as someone else's: the operator's label, no controller reference to a MyApp.
    fn foreign(name: &str) -> Cached<Service> {
        let mut doc = served(name, 8080);
        doc["metadata"].as_object_mut().expect("metadata").remove("ownerReferences");
        Cached::from_json(doc).expect("cached")
    }

    #[tokio::test]
    async fn an_object_with_our_label_that_no_myapp_controls_is_not_kept_nor_sent_on() {
        let store = Children::<Service>::default();
        let mut w = store.writer();
        for e in [Event::Init, Event::InitApply(foreign("x")), Event::InitApply(service("a", 1)), Event::InitDone] {
            w.apply(&e);
        }
        assert_eq!(held(&store), names(&[("a", 1)]), "only the child a MyApp controls is kept");
        assert!(!w.concerns(&foreign("x")), "a foreign object's events are not sent to the controller");
        assert!(w.concerns(&service("a", 1)));
        w.apply(&Event::Apply(foreign("y")));
        assert_eq!(store.len(), 1, "nor is one that arrives by a watch event");
        // A child that loses its controller reference leaves the store.
        w.apply(&Event::Apply(foreign("a")));
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn lists_update_the_store_in_place_and_report_what_they_did_not_list() {
        let store = Children::<Service>::default();
        let mut w = store.writer();
        let mut gone = Vec::new();
        for e in [Event::Init, Event::InitApply(service("a", 1)), Event::InitApply(service("b", 1)), Event::InitDone] {
            gone.extend(w.apply(&e));
        }
        assert!(gone.is_empty(), "a first list finds nothing gone");
        tokio::time::timeout(std::time::Duration::from_secs(1), store.wait_until_ready())
            .await
            .expect("the first list makes the store ready");
        assert_eq!(held(&store), names(&[("a", 1), ("b", 1)]));
        assert!(store.get("ns", "a").is_some() && store.get("other", "a").is_none());

        // A relist: `a` was deleted while the watch was away, `b` changed, `c` is new.
        assert!(w.apply(&Event::Init).is_empty());
        assert_eq!(held(&store), names(&[("a", 1), ("b", 1)]), "nothing is dropped when the list begins");
        assert!(w.apply(&Event::InitApply(service("b", 2))).is_empty());
        assert_eq!(held(&store), names(&[("a", 1), ("b", 2)]), "a listed child replaces its entry at once");
        assert!(w.apply(&Event::InitApply(service("c", 2))).is_empty());
        let gone = w.apply(&Event::InitDone);
        assert_eq!(held(&store), names(&[("b", 2), ("c", 2)]), "what the list did not name is gone at its end");
        let gone: Vec<_> = gone.iter().map(|c| (c.meta().name.clone(), c.meta().owner_references.clone())).collect();
        assert_eq!(gone, vec![(Some("a".to_string()), service("a", 1).meta().owner_references.clone())]);

        // Watch events after it apply as usual.
        assert!(w.apply(&Event::Delete(service("b", 2))).is_empty());
        assert!(w.apply(&Event::Apply(service("d", 4))).is_empty());
        assert_eq!(held(&store), names(&[("c", 2), ("d", 4)]));
        assert_eq!(store.len(), 2);
    }

    fn service_in(ns: &str, name: &str, port: i32) -> Cached<Service> {
        let mut doc = served(name, port);
        doc["metadata"]["namespace"] = json!(ns);
        Cached::from_json(doc).expect("cached")
    }

    #[tokio::test]
    async fn with_a_watch_per_namespace_the_store_is_ready_after_every_first_list_and_a_relist_touches_its_own() {
        let store = Children::<Service>::default();
        let mut w = store.writer_for(Lists::new(vec![Some("a".into()), Some("b".into())]));
        w.apply_from(0, &Event::Init);
        w.apply_from(1, &Event::Init);
        w.apply_from(0, &Event::InitApply(service_in("a", "x", 1)));
        w.apply_from(1, &Event::InitApply(service_in("b", "y", 1)));
        assert!(w.apply_from(0, &Event::InitDone).is_empty(), "a's first list finds nothing of b's gone");
        assert!(!*store.ready.borrow(), "not ready before b is listed");
        assert!(w.apply_from(1, &Event::InitDone).is_empty());
        assert!(*store.ready.borrow(), "ready once both are listed");
        assert_eq!(held(&store), names(&[("x", 1), ("y", 1)]));

        // a relists without x: x is gone, b's y stays.
        w.apply_from(0, &Event::Init);
        w.apply_from(0, &Event::InitApply(service_in("a", "w", 2)));
        let gone: Vec<_> = w.apply_from(0, &Event::InitDone).iter().map(|c| c.meta().name.clone()).collect();
        assert_eq!(gone, vec![Some("x".to_string())]);
        assert_eq!(held(&store), names(&[("w", 2), ("y", 1)]));
    }
}
