//! Warm caches: watches and stores of MyApps and of the Deployments and Services the operator
//! manages, in compact form ([`Cached`], [`Packed`]), each object bounded ([`MAX_KEPT`]: the
//! memory budget of the caches). They run on every replica for the life of the process. The controller of the current
//! leadership term subscribes to their events; a standby keeps them up to date and pays only the
//! memory, so that when it becomes leader it reconciles without a cold list.
//!
//! Events are fanned out through a `tokio::sync::broadcast` channel: with no subscriber (a
//! standby) they are dropped at once, and a subscriber that falls behind loses events rather
//! than stalling the watches. The subscriber is then told (the `lagged` sender), and the
//! controller reconciles everything, so no trigger is lost for good.
//!
//! The channel keeps its last [`CHANNEL`] events until they are overwritten, read or not, so its
//! size bounds the stale copies of objects the leader keeps alive.
//!
//! MyApps are kept in kube's reflector `Store`, which the controller reads; the children in a
//! store of their own, packed ([`Children`]), which costs a fraction of kube's per object.
//!
//! A relist (after 410 Gone, or a watch that broke off) updates both kinds of store in place
//! (`InPlace`, [`ChildWriter`]): kube's reflector would fill a second store beside
//! the first and swap them at the end, so a replica would briefly hold its whole cache twice. The
//! objects a relist finds gone (deleted while the watch was away) are sent on like a deletion:
//! a MyApp waiting for its children to go is woken by their owner references, rather than by its
//! fallback recheck up to a minute later.

mod compact;
mod store;
mod watch;

#[cfg(test)]
pub(crate) use compact::untyped;
pub use compact::{AppRef, Cached, MAX_KEPT, Packed, Shape, child_key, merge, owner, project};
pub(crate) use compact::{deletion, shape_of};
pub use store::{ChildWriter, Children};
pub use watch::{Apply, Lists};

use crate::api::MyApp;
use crate::api::scope::Scope;
use crate::api::{MANAGED_BY, MANAGED_BY_LABEL};
use futures::Stream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use watch::{InPlace, apis, spawn_watch, subscribe};

/// Events kept per kind. A burst larger than this (a relist of everything) makes the controller
/// lag, and reconcile everything.
pub const CHANNEL: usize = 1024;

/// The stores and event channels of the three watched kinds.
#[derive(Clone)]
pub struct Caches {
    /// Every `MyApp` in the watched scope, in compact form.
    pub myapps: Store<Cached<MyApp>>,
    /// Deployments labelled as managed by the operator, packed.
    pub deployments: Children<Deployment>,
    /// Services labelled as managed by the operator, packed.
    pub services: Children<Service>,
    myapp_tx: broadcast::Sender<Arc<Cached<MyApp>>>,
    deployment_tx: broadcast::Sender<Arc<Cached<Deployment>>>,
    service_tx: broadcast::Sender<Arc<Cached<Service>>>,
}

impl Caches {
    /// Starts the watches: of every namespace, or one per namespace of `scope`.
    pub fn start(client: Client, scope: &Scope) -> Self {
        let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let (myapp_tx, _) = broadcast::channel(CHANNEL);
        let (deployment_tx, _) = broadcast::channel(CHANNEL);
        let (service_tx, _) = broadcast::channel(CHANNEL);
        let (myapps, writer) = reflector::store();
        let lists = || Lists::new(scope.watches());
        let in_place = InPlace::new(writer, myapps.clone(), lists());
        spawn_watch(apis(&client, scope), watcher::Config::default(), in_place, myapp_tx.clone());
        let (deployments, services) = (Children::default(), Children::default());
        spawn_watch(apis(&client, scope), managed.clone(), deployments.writer_for(lists()), deployment_tx.clone());
        spawn_watch(apis(&client, scope), managed, services.writer_for(lists()), service_tx.clone());
        Self { myapps, deployments, services, myapp_tx, deployment_tx, service_tx }
    }

    /// Resolves once every store holds its first full list. Await it from one task at a time:
    /// a store's readiness signal wakes a single waiter (it returns at once when already ready).
    pub async fn wait_ready(&self) {
        let _ = tokio::join!(
            self.myapps.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.services.wait_until_ready()
        );
    }

    /// MyApp changes, from now on; `lagged` hears when some were missed.
    pub fn myapp_events(
        &self,
        lagged: &mpsc::UnboundedSender<()>,
    ) -> impl Stream<Item = Arc<Cached<MyApp>>> + Send + use<> {
        subscribe(&self.myapp_tx, lagged)
    }

    /// Changes of managed Deployments, from now on; `lagged` hears when some were missed.
    pub fn deployment_events(
        &self,
        lagged: &mpsc::UnboundedSender<()>,
    ) -> impl Stream<Item = Arc<Cached<Deployment>>> + Send + use<> {
        subscribe(&self.deployment_tx, lagged)
    }

    /// Changes of managed Services, from now on; `lagged` hears when some were missed.
    pub fn service_events(
        &self,
        lagged: &mpsc::UnboundedSender<()>,
    ) -> impl Stream<Item = Arc<Cached<Service>>> + Send + use<> {
        subscribe(&self.service_tx, lagged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::watcher::Event;

    fn cm(name: &str, version: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c.metadata.resource_version = Some(version.into());
        c
    }

    fn held(store: &Store<ConfigMap>) -> Vec<(String, String)> {
        let mut all: Vec<_> = store
            .state()
            .iter()
            .map(|c| {
                (c.metadata.name.clone().unwrap_or_default(), c.metadata.resource_version.clone().unwrap_or_default())
            })
            .collect();
        all.sort();
        all
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[tokio::test]
    async fn a_relist_updates_the_store_in_place_and_drops_what_it_did_not_list() {
        let (reader, writer) = reflector::store();
        let mut w = InPlace::new(writer, reader.clone(), Lists::new(vec![None]));
        for e in [Event::Init, Event::InitApply(cm("a", "1")), Event::InitApply(cm("b", "1")), Event::InitDone] {
            w.apply(&e);
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), reader.wait_until_ready())
            .await
            .expect("the first list makes the store ready")
            .expect("ready");
        assert_eq!(held(&reader), pairs(&[("a", "1"), ("b", "1")]));

        // A relist: `a` was deleted while the watch was away, `b` changed, `c` is new.
        w.apply(&Event::Init);
        assert_eq!(held(&reader), pairs(&[("a", "1"), ("b", "1")]), "nothing is dropped when the list begins");
        w.apply(&Event::InitApply(cm("b", "2")));
        assert_eq!(held(&reader), pairs(&[("a", "1"), ("b", "2")]), "a listed object replaces its entry at once");
        w.apply(&Event::InitApply(cm("c", "2")));
        let gone = w.apply(&Event::InitDone);
        assert_eq!(held(&reader), pairs(&[("b", "2"), ("c", "2")]), "what the list did not name is gone at its end");
        assert_eq!(gone, vec![cm("a", "1")], "and is reported, so that the controller hears of it");

        // Watch events after it apply as usual.
        w.apply(&Event::Delete(cm("b", "3")));
        w.apply(&Event::Apply(cm("d", "4")));
        assert_eq!(held(&reader), pairs(&[("c", "2"), ("d", "4")]));
    }

    fn in_ns(ns: &str, name: &str, version: &str) -> ConfigMap {
        let mut c = cm(name, version);
        c.metadata.namespace = Some(ns.into());
        c
    }

    #[tokio::test]
    async fn with_a_watch_per_namespace_the_store_is_ready_after_every_first_list_and_a_relist_touches_its_own() {
        let (reader, writer) = reflector::store();
        let mut w = InPlace::new(writer, reader.clone(), Lists::new(vec![Some("a".into()), Some("b".into())]));
        // The two first lists interleave.
        w.apply_from(0, &Event::Init);
        w.apply_from(1, &Event::Init);
        w.apply_from(0, &Event::InitApply(in_ns("a", "x", "1")));
        w.apply_from(1, &Event::InitApply(in_ns("b", "y", "1")));
        assert!(w.apply_from(0, &Event::InitDone).is_empty());
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), reader.wait_until_ready()).await;
        assert!(early.is_err(), "not ready before the second namespace is listed");
        w.apply_from(1, &Event::InitApply(in_ns("b", "z", "1")));
        assert!(w.apply_from(1, &Event::InitDone).is_empty());
        tokio::time::timeout(std::time::Duration::from_secs(1), reader.wait_until_ready())
            .await
            .expect("ready once both are listed")
            .expect("ready");
        assert_eq!(held(&reader), pairs(&[("x", "1"), ("y", "1"), ("z", "1")]));

        // b relists without y: only b's objects can be found gone; a's stay.
        w.apply_from(1, &Event::Init);
        w.apply_from(1, &Event::InitApply(in_ns("b", "z", "2")));
        let gone = w.apply_from(1, &Event::InitDone);
        assert_eq!(gone, vec![in_ns("b", "y", "1")]);
        assert_eq!(held(&reader), pairs(&[("x", "1"), ("z", "2")]));
        // Watch events of either apply as usual.
        w.apply_from(0, &Event::Apply(in_ns("a", "x", "3")));
        assert_eq!(held(&reader), pairs(&[("x", "3"), ("z", "2")]));
    }

    #[tokio::test]
    async fn a_lagging_subscriber_is_told_and_keeps_the_newest_events() {
        let (tx, _) = broadcast::channel::<Arc<u32>>(2);
        let (lagged, mut lags) = mpsc::unbounded_channel();
        let events = subscribe(&tx, &lagged);
        for i in 0..5 {
            let _ = tx.send(Arc::new(i));
        }
        drop(tx);
        let got: Vec<u32> = events.map(|v| *v).collect().await;
        assert_eq!(got, vec![3, 4], "the oldest three were overwritten");
        assert_eq!(lags.try_recv().ok(), Some(()), "the controller hears that it missed some");
        assert!(lags.try_recv().is_err(), "once per lag");
    }
}
