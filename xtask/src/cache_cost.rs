//! Heap bytes per cached object, by kind: the bench's MyApps and children, read from the API
//! server as it sends them, then deserialized in this process into what the operator's caches
//! keep (the same compact form), counted by this process's allocator ([`Counting`]).

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::{Client, Resource};
use myapp_operator::api::MyApp;
use myapp_operator::controller::cached::Cached;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::alloc::{GlobalAlloc, Layout, System};
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

/// Heap bytes held per object by `docs` deserialized as `K`.
fn per_object<K: DeserializeOwned>(docs: &[Vec<u8>]) -> f64 {
    let mut kept = Vec::with_capacity(docs.len());
    let before = IN_USE.load(Ordering::Relaxed);
    for doc in docs {
        if let Ok(k) = serde_json::from_slice::<K>(doc) {
            kept.push(std::sync::Arc::new(k));
        }
    }
    let held = IN_USE.load(Ordering::Relaxed) - before;
    held as f64 / kept.len().max(1) as f64
}

/// The objects of kind `K` in `namespace`, as the API server sends them (JSON, with
/// managedFields).
async fn served<K: Resource<DynamicType = ()>>(client: &Client, namespace: &str) -> Result<Vec<Vec<u8>>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ApiResource::erase::<K>(&()));
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.iter().filter_map(|o| serde_json::to_vec(o).ok()).collect())
}

/// Bytes per object of each kind in `namespace`: as a `k8s_openapi` object with everything the
/// server sent, and as the caches keep it.
pub async fn measure(client: &Client, namespace: &str) -> Result<Value> {
    let myapps = served::<MyApp>(client, namespace).await?;
    let deployments = served::<Deployment>(client, namespace).await?;
    let services = served::<Service>(client, namespace).await?;
    let entry =
        |n: usize, sent: f64, cached: f64| json!({"objects": n, "as_sent": sent.round(), "as_cached": cached.round()});
    let m = entry(myapps.len(), per_object::<MyApp>(&myapps), per_object::<Cached<MyApp>>(&myapps));
    let d = entry(
        deployments.len(),
        per_object::<Deployment>(&deployments),
        per_object::<Cached<Deployment>>(&deployments),
    );
    let s = entry(services.len(), per_object::<Service>(&services), per_object::<Cached<Service>>(&services));
    let total = |k: &str| m[k].as_f64().unwrap_or(0.0) + d[k].as_f64().unwrap_or(0.0) + s[k].as_f64().unwrap_or(0.0);
    let per_myapp = json!({"as_sent": total("as_sent"), "as_cached": total("as_cached")});
    Ok(json!({"myapp": m, "deployment": d, "service": s, "per_myapp": per_myapp}))
}
