//! The watches behind the caches: each writes its events into a store ([`Apply`]), applies a
//! relist in place ([`InPlace`]), and sends on what it saw to the controller, if it listens.

use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

/// What a watch's events are written into: a store of one kind.
pub trait Apply<K> {
    /// Applies `event`. Returns the objects that a list, at its end, found gone: deleted while
    /// the watch was away, they are in no event of their own.
    fn apply(&mut self, event: &Event<K>) -> Vec<K>;

    /// Whether the controller hears of `obj`'s events (it does of every object the store keeps).
    fn concerns(&self, _obj: &K) -> bool {
        true
    }
}

/// Watches `api`, writes its events with `writer`, and sends every object an event names, or
/// that a relist found gone, to `tx`.
pub(crate) fn spawn_watch<K, W>(api: Api<K>, config: watcher::Config, mut writer: W, tx: broadcast::Sender<Arc<K>>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    W: Apply<K> + Send + 'static,
{
    let stream = watcher(api, config).backoff(crate::client::watch_backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    let gone = writer.apply(&event);
                    let named = match event {
                        Event::Apply(obj) | Event::Delete(obj) | Event::InitApply(obj) => Some(obj),
                        Event::Init | Event::InitDone => None,
                    };
                    // No receiver (a standby) is the normal case, not an error.
                    for obj in named.into_iter().chain(gone).filter(|o| writer.concerns(o)) {
                        drop(tx.send(Arc::new(obj)));
                    }
                }
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch error, retrying with backoff")
                }
            }
        }
    });
}

/// A reflector store's writer that applies a relist in place. The first list goes through kube's
/// own path, which makes the store ready. On a later list, each object listed replaces its entry
/// as it arrives, and at the end of the list the entries it did not name are deleted, and
/// returned: the store holds one copy of each object throughout, plus the set of names seen so
/// far.
///
/// During such a relist, the store mixes objects as they were before and as listed; it never lacks
/// one that existed before the list began and is still there.
pub(crate) struct InPlace<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: reflector::store::Writer<K>,
    reader: Store<K>,
    /// Whether the first list has completed (the store is ready).
    listed: bool,
    /// During a relist: the objects listed so far.
    seen: Option<HashSet<ObjectRef<K>>>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> InPlace<K> {
    pub(crate) fn new(writer: reflector::store::Writer<K>, reader: Store<K>) -> Self {
        Self { writer, reader, listed: false, seen: None }
    }
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Apply<K> for InPlace<K> {
    fn apply(&mut self, event: &Event<K>) -> Vec<K> {
        match (event, self.seen.as_mut()) {
            (Event::Init, _) if self.listed => self.seen = Some(HashSet::new()),
            (Event::InitApply(obj), Some(seen)) => {
                seen.insert(ObjectRef::from_obj(obj));
                self.writer.apply_watcher_event(&Event::Apply(obj.clone()));
            }
            (Event::InitDone, Some(seen)) => {
                let seen = std::mem::take(seen);
                self.seen = None;
                let state = self.reader.state();
                let gone: Vec<K> = state
                    .iter()
                    .filter(|o| !seen.contains(&ObjectRef::from_obj(o.as_ref())))
                    .map(|o| o.as_ref().clone())
                    .collect();
                for obj in &gone {
                    self.writer.apply_watcher_event(&Event::Delete(obj.clone()));
                }
                return gone;
            }
            (event, _) => {
                self.writer.apply_watcher_event(event);
                self.listed |= matches!(event, Event::InitDone);
            }
        }
        Vec::new()
    }
}

/// A stream of what `tx` sends from now on; `lagged` hears when some was missed.
pub(crate) fn subscribe<K: Send + Sync + 'static>(
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

/// `K`s in `namespace`, or in every namespace.
pub(crate) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}
