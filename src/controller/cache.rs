//! Warm caches: watches and stores of MyApps and of the Deployments and Services the operator
//! manages. They run on every replica for the life of the process. The controller of the current
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

use super::cached::Cached;
use crate::api::MyApp;
use crate::api::{MANAGED_BY, MANAGED_BY_LABEL};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

/// Events kept per kind. A burst larger than this (a relist of everything) makes the controller
/// lag, and reconcile everything.
pub const CHANNEL: usize = 1024;

/// The stores and event channels of the three watched kinds.
#[derive(Clone)]
pub struct Caches {
    /// Every `MyApp` in the watched scope, in compact form.
    pub myapps: Store<Cached<MyApp>>,
    /// Deployments labelled as managed by the operator, in compact form.
    pub deployments: Store<Cached<Deployment>>,
    /// Services labelled as managed by the operator, in compact form.
    pub services: Store<Cached<Service>>,
    myapp_tx: broadcast::Sender<Arc<Cached<MyApp>>>,
    deployment_tx: broadcast::Sender<Arc<Cached<Deployment>>>,
    service_tx: broadcast::Sender<Arc<Cached<Service>>>,
}

fn spawn_watch<K>(api: Api<K>, config: watcher::Config, tx: broadcast::Sender<Arc<K>>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).backoff(crate::client::watch_backoff()).reflect(writer).touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                // No receiver (a standby) is the normal case, not an error.
                Ok(obj) => drop(tx.send(Arc::new(obj))),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch error, retrying with backoff")
                }
            }
        }
    });
    reader
}

fn subscribe<K: Send + Sync + 'static>(
    tx: &broadcast::Sender<Arc<K>>,
    lagged: &mpsc::UnboundedSender<()>,
) -> impl Stream<Item = Arc<K>> + Send + use<K> {
    let lagged = lagged.clone();
    BroadcastStream::new(tx.subscribe()).filter_map(move |r| {
        let lagged = lagged.clone();
        async move {
            match r {
                Ok(obj) => Some(obj),
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event subscriber lagged: reconciling everything");
                    let _ = lagged.send(());
                    None
                }
            }
        }
    })
}

impl Caches {
    /// Starts the watches, in every namespace or in one.
    pub fn start(client: Client, namespace: Option<&str>) -> Self {
        let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let (myapp_tx, _) = broadcast::channel(CHANNEL);
        let (deployment_tx, _) = broadcast::channel(CHANNEL);
        let (service_tx, _) = broadcast::channel(CHANNEL);
        let myapps = spawn_watch(scoped(&client, namespace), watcher::Config::default(), myapp_tx.clone());
        let deployments = spawn_watch(scoped(&client, namespace), managed.clone(), deployment_tx.clone());
        let services = spawn_watch(scoped(&client, namespace), managed, service_tx.clone());
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

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
