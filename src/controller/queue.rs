//! Queue depth: how many MyApps wait for a reconcile; and the bulk pass, fed at low priority.
//!
//! kube's `Controller` keeps its scheduler private, so the depth is counted from outside it: a
//! MyApp enters the queue when a watch event concerns it (its own, or one of its children's through
//! the controller owner reference), when a term starts or after a subscriber lagged (everything
//! waits then), and leaves it when its reconcile starts. Like the scheduler, the queue holds each
//! object once however many events arrive. Requeues by delay (resyncs, retries after an error)
//! happen inside the scheduler and are not counted, even while one waits for a free reconcile
//! slot. A trigger for an object that is gone leaves the queue when the controller reports it
//! missing.
//!
//! # Real changes before bulk passes
//!
//! At the start of a term, and after a subscriber lagged, every MyApp is reconciled (a bulk pass).
//! kube's scheduler has no priorities: 10,000 objects scheduled at once would put a user's change
//! behind all of them. So [`bulk_pass`] hands the objects over one at a time, and only while fewer
//! than [`BULK_WINDOW`] MyApps wait: a watch event (a spec change, a deletion, a child that
//! drifted) enters a queue at most that deep, while the pass still keeps every reconcile slot busy.
//! Periodic resyncs need no such care: each is scheduled on its own, spread by jitter.

use crate::cache::{AppRef, owner};
use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// How many MyApps may wait before a bulk pass hands over the next one: the controller's
/// concurrency, so that the pass keeps every slot busy and a real change waits behind at most one
/// round of reconciles.
pub(crate) const BULK_WINDOW: usize = 16;

/// The set of waiting MyApps, mirrored into a gauge.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<HashSet<AppRef>>,
    gauge: Gauge,
    /// Told whenever an object leaves.
    left: Notify,
}

impl Pending {
    /// A queue that reports its depth in `gauge`.
    pub(crate) fn new(gauge: Gauge) -> Self {
        Self { waiting: Mutex::default(), gauge, left: Notify::new() }
    }

    fn update(&self, f: impl FnOnce(&mut HashSet<AppRef>)) {
        if let Ok(mut w) = self.waiting.lock() {
            f(&mut w);
            self.gauge.set(i64::try_from(w.len()).unwrap_or(i64::MAX));
        }
    }

    /// `obj` was triggered.
    pub(crate) fn add(&self, obj: AppRef) {
        self.update(|w| {
            w.insert(obj);
        });
    }

    /// A child (Deployment, Service) changed: its controller owner, if a MyApp, was triggered.
    pub(crate) fn add_owner_of(&self, child: &ObjectMeta) {
        if let Some(obj) = owner(child) {
            self.add(obj);
        }
    }

    /// `obj`'s reconcile started, or the controller found it gone.
    pub(crate) fn remove(&self, namespace: Option<&str>, name: &str) {
        let mut obj = ObjectRef::new(name);
        obj.namespace = namespace.map(str::to_string);
        self.update(|w| {
            w.remove(&obj);
        });
        self.left.notify_waiters();
    }

    /// Resolves once fewer than `n` objects wait.
    pub(crate) async fn below(&self, n: usize) {
        loop {
            // Registered before the check, so that a removal in between is not missed.
            let left = self.left.notified();
            if self.depth() < n {
                return;
            }
            left.await;
        }
    }

    /// The current depth.
    pub(crate) fn depth(&self) -> usize {
        self.waiting.lock().map(|w| w.len()).unwrap_or(0)
    }
}

impl Drop for Pending {
    /// A term's queue dies with the term (its controller was stopped or cancelled).
    fn drop(&mut self) {
        self.gauge.set(0);
    }
}

/// Every MyApp in `all()` (a snapshot taken when the pass starts), each handed over and counted as
/// waiting only once fewer than [`BULK_WINDOW`] MyApps wait in `pending` (see the module docs).
/// Passes come one after another, one for each item of `passes`.
pub(crate) fn bulk_pass<F>(
    passes: impl Stream<Item = ()> + Send + 'static,
    pending: Arc<Pending>,
    all: F,
) -> impl Stream<Item = AppRef> + Send + 'static
where
    F: Fn() -> Vec<AppRef> + Send + 'static,
{
    passes.flat_map(move |()| {
        let pending = pending.clone();
        futures::stream::iter(all()).then(move |obj| {
            let pending = pending.clone();
            async move {
                pending.below(BULK_WINDOW).await;
                pending.add(obj.clone());
                obj
            }
        })
    })
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

    #[tokio::test]
    async fn a_bulk_pass_waits_for_room_and_a_real_change_does_not() {
        let q = Arc::new(Pending::default());
        let all: Vec<AppRef> = (0..100).map(|i| ObjectRef::new(&format!("app-{i}")).within("ns")).collect();
        let snapshot = all.clone();
        let mut pass = Box::pin(bulk_pass(futures::stream::once(async {}), q.clone(), move || snapshot.clone()));
        let mut handed = Vec::new();
        for _ in 0..BULK_WINDOW {
            handed.push(pass.next().await.expect("one more"));
        }
        assert_eq!(q.depth(), BULK_WINDOW);
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(50), pass.next()).await;
        assert!(stalled.is_err(), "the pass waits while the window is full");
        // A watch event does not wait: it is queued at once, one behind the window.
        q.add(ObjectRef::new("changed").within("ns"));
        assert_eq!(q.depth(), BULK_WINDOW + 1);
        // Two reconciles start: still no room (the change fills one).
        q.remove(Some("ns"), "app-0");
        q.remove(Some("ns"), "app-1");
        handed.push(pass.next().await.expect("room for one"));
        assert_eq!(q.depth(), BULK_WINDOW);
        // Everything else, as room appears: every object once, in order.
        loop {
            for o in &handed {
                q.remove(o.namespace.as_deref(), &o.name);
            }
            match tokio::time::timeout(std::time::Duration::from_secs(1), pass.next()).await {
                Ok(Some(obj)) => handed.push(obj),
                _ => break,
            }
        }
        assert_eq!(handed, all);
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
