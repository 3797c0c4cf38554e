//! Heap bytes per cached object, by kind: the bench's MyApps and children, read from the API
//! server as it sends them, then deserialized in this process into what the operator's caches
//! keep (the same compact form, in the same stores), counted by this process's allocator
//! ([`Counting`]).

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;
use kube::{Client, Resource};
use myapp_operator::api::MyApp;
use myapp_operator::cache::Apply;
use myapp_operator::cache::Children;
use myapp_operator::cache::{Cached, Shape};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

/// The system allocator, counting the bytes in use (requested sizes, without the allocator's own
/// overhead). The task runner's global allocator.
pub struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        IN_USE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Heap bytes held per object by what `keep` builds from `n` objects (and holds until it returns).
fn per_object<T>(n: usize, keep: impl FnOnce() -> T) -> f64 {
    let before = IN_USE.load(Ordering::Relaxed);
    let kept = keep();
    let held = IN_USE.load(Ordering::Relaxed) - before;
    drop(kept);
    held as f64 / n.max(1) as f64
}

/// `docs` deserialized as `K`, each in an `Arc` (as an event or a store holds it).
fn decoded<K: DeserializeOwned>(docs: &[Vec<u8>]) -> Vec<Arc<K>> {
    docs.iter().filter_map(|d| serde_json::from_slice::<K>(d).ok()).map(Arc::new).collect()
}

/// `docs` in a kube reflector `Store`, keys included.
fn in_kube_store<K>(docs: &[Vec<u8>]) -> Store<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    for doc in docs {
        if let Ok(k) = serde_json::from_slice::<K>(doc) {
            writer.apply_watcher_event(&Event::Apply(k));
        }
    }
    reader
}

/// Child `docs` packed in the operator's store of children.
fn in_child_store<K: Shape>(docs: &[Vec<u8>]) -> Children<K> {
    let store = Children::default();
    let mut writer = store.writer();
    for doc in docs {
        if let Ok(k) = serde_json::from_slice::<Cached<K>>(doc) {
            writer.apply(&Event::Apply(k));
        }
    }
    store
}

/// One kind's heap bytes per object: as sent, as a [`Cached`] object, in kube's `Store` (where
/// the caches kept children before [`Children`]; `None` for MyApps, which are kept there), and in
/// the store the caches use, keys and table included.
#[derive(Serialize)]
pub struct KindBytes {
    pub objects: usize,
    pub as_sent: f64,
    pub as_cached: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_kube_store: Option<f64>,
    pub in_store: f64,
}

/// A MyApp and its two children together.
#[derive(Serialize)]
pub struct PerMyApp {
    pub as_sent: f64,
    pub as_cached: f64,
    /// With the children in kube's stores, as before.
    pub in_kube_stores: f64,
    pub in_stores: f64,
}

/// Heap bytes per cached object of each kind.
#[derive(Serialize)]
pub struct CacheBytes {
    pub myapp: KindBytes,
    pub deployment: KindBytes,
    pub service: KindBytes,
    pub per_myapp: PerMyApp,
}

impl CacheBytes {
    /// The bench table's rows.
    pub fn rows(&self) -> Vec<(String, String)> {
        let kinds = [("myapp", &self.myapp), ("deployment", &self.deployment), ("service", &self.service)];
        let mut rows: Vec<(String, String)> = kinds
            .iter()
            .map(|(kind, b)| {
                let v = format!("{:.1} -> {:.1} -> {:.1}", b.as_sent, b.as_cached, b.in_store);
                (format!("heap bytes per {kind}: as sent -> cached -> in its store"), v)
            })
            .collect();
        let p = &self.per_myapp;
        let v = format!("{:.1} -> {:.1}", p.in_kube_stores, p.in_stores);
        rows.push(("heap bytes per MyApp and its children in the stores: kube's -> ours".into(), v));
        rows
    }
}

/// One child kind's figures.
fn child<K: Shape + Clone + 'static>(docs: &[Vec<u8>]) -> KindBytes {
    let n = docs.len();
    KindBytes {
        objects: n,
        as_sent: per_object(n, || decoded::<K>(docs)).round(),
        as_cached: per_object(n, || decoded::<Cached<K>>(docs)).round(),
        in_kube_store: Some(per_object(n, || in_kube_store::<Cached<K>>(docs)).round()),
        in_store: per_object(n, || in_child_store::<K>(docs)).round(),
    }
}

/// The objects of kind `K` in `namespace`, as the API server sends them (JSON, with
/// managedFields).
async fn served<K: Resource<DynamicType = ()>>(client: &Client, namespace: &str) -> Result<Vec<Vec<u8>>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ApiResource::erase::<K>(&()));
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.iter().filter_map(|o| serde_json::to_vec(o).ok()).collect())
}

/// Bytes per object of each kind in `namespace`: as a `k8s_openapi` object with everything the
/// server sent, as a [`Cached`] object, and as a replica's store holds it, the store's keys and
/// table included (`in_store`; for children, also `in_kube_store`, their store before).
pub async fn measure(client: &Client, namespace: &str) -> Result<CacheBytes> {
    let myapps = served::<MyApp>(client, namespace).await?;
    let deployments = served::<Deployment>(client, namespace).await?;
    let services = served::<Service>(client, namespace).await?;
    let n = myapps.len();
    let myapp = KindBytes {
        objects: n,
        as_sent: per_object(n, || decoded::<MyApp>(&myapps)).round(),
        as_cached: per_object(n, || decoded::<Cached<MyApp>>(&myapps)).round(),
        in_kube_store: None,
        in_store: per_object(n, || in_kube_store::<Cached<MyApp>>(&myapps)).round(),
    };
    let (d, s) = (child::<Deployment>(&deployments), child::<Service>(&services));
    let in_kube = |b: &KindBytes| b.in_kube_store.unwrap_or(b.in_store);
    let per_myapp = PerMyApp {
        as_sent: myapp.as_sent + d.as_sent + s.as_sent,
        as_cached: myapp.as_cached + d.as_cached + s.as_cached,
        in_kube_stores: in_kube(&myapp) + in_kube(&d) + in_kube(&s),
        in_stores: myapp.in_store + d.in_store + s.in_store,
    };
    Ok(CacheBytes { myapp, deployment: d, service: s, per_myapp })
}
