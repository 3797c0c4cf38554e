//! The watches behind the caches: each writes its events into a store ([`Apply`]), applies a
//! relist in place ([`InPlace`]), and sends on what it saw to the controller, if it listens.

use super::compact::child_key;
use crate::api::scope::Scope;
use futures::{Stream, StreamExt};
use kube::runtime::reflector::{self, Store};
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
    /// Applies `event` of the store's only watch. Returns the objects that a list, at its end,
    /// found gone: deleted while the watch was away, they are in no event of their own.
    fn apply(&mut self, event: &Event<K>) -> Vec<K> {
        self.apply_from(0, event)
    }

    /// Applies `event` of the store's watch number `watch` (one per namespace of the scope; see
    /// [`Lists`]).
    fn apply_from(&mut self, watch: usize, event: &Event<K>) -> Vec<K>;

    /// Whether the controller hears of `obj`'s events (it does of every object the store keeps).
    fn concerns(&self, _obj: &K) -> bool {
        true
    }
}

/// Watches each of `apis` (one per namespace of the scope, or one of every namespace), writes
/// their events with `writer`, and sends every object an event names, or that a relist found
/// gone, to `tx`.
pub(crate) fn spawn_watch<K, W>(
    apis: Vec<Api<K>>,
    config: watcher::Config,
    mut writer: W,
    tx: broadcast::Sender<Arc<K>>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    W: Apply<K> + Send + 'static,
{
    let streams = apis.into_iter().enumerate().map(|(i, api)| {
        watcher(api, config.clone()).backoff(crate::client::watch_backoff()).map(move |item| (i, item)).boxed()
    });
    let mut stream = futures::stream::select_all(streams);
    tokio::spawn(async move {
        while let Some((watch, item)) = stream.next().await {
            match item {
                Ok(event) => {
                    let gone = writer.apply_from(watch, &event);
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

/// The lists of the watches that feed one store: one watch per namespace of the scope, or one of
/// every namespace. A list ends a relist of its own namespace only: what the store holds of other
/// namespaces stays. The store is ready once every watch has listed.
pub struct Lists {
    /// Per watch: its namespace, `None` for every namespace.
    namespaces: Vec<Option<String>>,
    /// Per watch, during its list: the keys (`namespace/name`) listed so far.
    seen: Vec<Option<HashSet<String>>>,
    /// Per watch: whether its first list has completed.
    listed: Vec<bool>,
}

/// What the end of one watch's list tells its store.
pub(crate) struct Listed {
    /// The keys the list named.
    pub(crate) seen: HashSet<String>,
    /// The namespace it covered, `None` for every namespace.
    pub(crate) namespace: Option<String>,
    /// Whether this list was the last of the first lists: the store is now ready.
    pub(crate) now_ready: bool,
}

impl Lists {
    /// The lists of one watch per entry of `namespaces` (`[None]`: one watch of every namespace).
    pub fn new(namespaces: Vec<Option<String>>) -> Self {
        let n = namespaces.len();
        Self { namespaces, seen: vec![None; n], listed: vec![false; n] }
    }

    /// How many watches feed the store.
    pub(crate) fn watches(&self) -> usize {
        self.namespaces.len()
    }

    /// Whether watch `w` has completed its first list.
    pub(crate) fn listed(&self, w: usize) -> bool {
        self.listed.get(w).copied().unwrap_or(false)
    }

    /// Watch `w` begins a list.
    pub(crate) fn begin(&mut self, w: usize) {
        if let Some(seen) = self.seen.get_mut(w) {
            *seen = Some(HashSet::new());
        }
    }

    /// Watch `w`'s list named `key`.
    pub(crate) fn saw(&mut self, w: usize, key: String) {
        if let Some(Some(seen)) = self.seen.get_mut(w) {
            seen.insert(key);
        }
    }

    /// Watch `w`'s list ended.
    pub(crate) fn end(&mut self, w: usize) -> Listed {
        let seen = self.seen.get_mut(w).and_then(Option::take).unwrap_or_default();
        let was_ready = self.listed.iter().all(|l| *l);
        if let Some(l) = self.listed.get_mut(w) {
            *l = true;
        }
        let now_ready = !was_ready && self.listed.iter().all(|l| *l);
        Listed { seen, namespace: self.namespaces.get(w).cloned().flatten(), now_ready }
    }
}

impl Listed {
    /// Whether the list covered an object of `namespace` named `key`, and did not name it.
    pub(crate) fn missed(&self, namespace: Option<&str>, key: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| namespace == Some(ns)) && !self.seen.contains(key)
    }
}

/// A reflector store's writer that applies a relist in place. With one watch, the first list goes
/// through kube's own path, which makes the store ready. On a later list (or on every list when
/// several watches feed the store), each object listed replaces its entry as it arrives, and at
/// the end of the list the entries of its namespace it did not name are deleted, and returned:
/// the store holds one copy of each object throughout, plus the names seen so far.
///
/// During such a relist, the store mixes objects as they were before and as listed; it never lacks
/// one that existed before the list began and is still there.
pub(crate) struct InPlace<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: reflector::store::Writer<K>,
    reader: Store<K>,
    lists: Lists,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> InPlace<K> {
    pub(crate) fn new(writer: reflector::store::Writer<K>, reader: Store<K>, lists: Lists) -> Self {
        Self { writer, reader, lists }
    }

    /// kube's store becomes ready only through a list of its own: replay what the store holds
    /// as one, once every watch has listed.
    fn make_ready(&mut self) {
        let all = self.reader.state();
        self.writer.apply_watcher_event(&Event::Init);
        for obj in all {
            self.writer.apply_watcher_event(&Event::InitApply(obj.as_ref().clone()));
        }
        self.writer.apply_watcher_event(&Event::InitDone);
    }
}

/// The key a list marks `obj` seen under: its namespace and name, as [`child_key`] spells them.
pub(crate) fn key_of<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    child_key(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Apply<K> for InPlace<K> {
    fn apply_from(&mut self, w: usize, event: &Event<K>) -> Vec<K> {
        // One watch, first list: kube's path (it fills a second store and swaps, once).
        if self.lists.watches() == 1 && !self.lists.listed(w) {
            self.writer.apply_watcher_event(event);
            if matches!(event, Event::InitDone) {
                self.lists.end(w);
            }
            return Vec::new();
        }
        match event {
            Event::Init => self.lists.begin(w),
            Event::InitApply(obj) => {
                self.lists.saw(w, key_of(obj));
                self.writer.apply_watcher_event(&Event::Apply(obj.clone()));
            }
            Event::InitDone => {
                let listed = self.lists.end(w);
                let gone: Vec<K> = self
                    .reader
                    .state()
                    .iter()
                    .filter(|o| listed.missed(o.meta().namespace.as_deref(), &key_of(o.as_ref())))
                    .map(|o| o.as_ref().clone())
                    .collect();
                for obj in &gone {
                    self.writer.apply_watcher_event(&Event::Delete(obj.clone()));
                }
                if listed.now_ready {
                    self.make_ready();
                }
                return gone;
            }
            Event::Apply(_) | Event::Delete(_) => self.writer.apply_watcher_event(event),
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

/// One `Api` per watch of `scope`: per namespace of its list, or one of every namespace.
pub(crate) fn apis<K>(client: &Client, scope: &Scope) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    scope
        .watches()
        .into_iter()
        .map(|ns| match ns {
            Some(ns) => Api::namespaced(client.clone(), &ns),
            None => Api::all(client.clone()),
        })
        .collect()
}
