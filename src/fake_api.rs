//! A fake API server for tests that need no cluster: an in-memory object store behind a
//! [`kube::Client`], with the semantics the operator depends on.
//!
//! - Objects are JSON, addressed by their collection path (`/apis/g/v/namespaces/ns/plural`)
//!   and name; every write bumps one global resourceVersion, as etcd's revision does.
//! - `PUT` with a stale resourceVersion gets 409; `PUT` of an absent object creates it (201),
//!   as the real server does for kinds that allow create-on-update, such as Leases.
//! - `POST` of an existing name gets 409 AlreadyExists; `GET`/`DELETE` of an absent one 404.
//! - `GET` of a collection lists it (honouring `fieldSelector=metadata.name=…`); with
//!   `watch=true` it streams every event after the given resourceVersion, then stays open.
//! - `PATCH` of an object: a JSON patch (`application/json-patch+json`, whose failed `test`
//!   operation gets 422 as on the real server) or a JSON merge patch
//!   (`application/merge-patch+json`). A resourceVersion in the patched object is a
//!   precondition (409 when stale), as on the real server; other patch types get 415.
//! - Faults: a delay before each request is served, or a blackhole that never answers.
//!
//! Time comes from tokio, so tests run with `start_paused = true` and take no wall time.
#![allow(dead_code)]

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

pub(crate) type Chunks = Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// One request as the fake received it, for assertions.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When it was served (after any delay).
    pub at: Instant,
    /// The HTTP method.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// The response status.
    pub status: u16,
    /// The request body, if JSON.
    pub body: Option<Value>,
}

#[derive(Default)]
struct State {
    revision: u64,
    uids: u64,
    objects: BTreeMap<(String, String), Value>,
    /// Every event so far: (revision, collection, watch event).
    history: Vec<(u64, String, Value)>,
    delay: Duration,
    blackhole: bool,
    log: Vec<Seen>,
}

/// The fake server; clone it freely, every clone sees the same store.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(u64, String, Value)>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self { state: Arc::default(), events: broadcast::channel(4096).0 }
    }
}

fn split(path: &str) -> (String, Option<String>) {
    // A collection path ends in its plural; an object path has one more segment.
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let plural_at = match parts.get(1) {
        Some(&"api") => 3,
        _ => 4,
    };
    let plural_at = if parts.get(plural_at) == Some(&"namespaces") { plural_at + 2 } else { plural_at };
    if parts.len() > plural_at + 1 {
        (parts[..=plural_at].join("/"), Some(parts[plural_at + 1].to_string()))
    } else {
        (parts.join("/"), None)
    }
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%3d", "=")))
        .collect()
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message}),
    )
}

fn name_of(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string)
}

fn one(body: Value) -> Chunks {
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    Box::pin(futures::stream::once(async move { Ok(Frame::data(bytes)) }))
}

impl FakeApi {
    /// A client whose every request this fake serves.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.service(), "default")
    }

    /// The fake as an HTTP service, to put layers in front of.
    pub fn service(
        &self,
    ) -> tower::util::BoxCloneService<Request<kube::client::Body>, Response<StreamBody<Chunks>>, Infallible> {
        let fake = self.clone();
        tower::util::BoxCloneService::new(tower::service_fn(move |req: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.serve(req).await) }
        }))
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.lock().log.clone()
    }

    /// Delays every request by `d` before it reads or writes the store.
    pub fn set_delay(&self, d: Duration) {
        self.lock().delay = d;
    }

    /// While on, no request is ever answered (a partition or a hung server).
    pub fn set_blackhole(&self, on: bool) {
        self.lock().blackhole = on;
    }

    /// The object at `collection`/`name`.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(collection.to_string(), name.to_string())).cloned()
    }

    /// Writes an object directly (as another client would), bumping its resourceVersion.
    pub fn put(&self, collection: &str, mut obj: Value) -> Value {
        let mut s = self.lock();
        let name = name_of(&obj).unwrap_or_default();
        let key = (collection.to_string(), name);
        let existed = s.objects.get(&key).cloned();
        let uid = existed.as_ref().and_then(|o| o.pointer("/metadata/uid").cloned());
        let uid = match uid {
            Some(u) => u,
            None => {
                s.uids += 1;
                json!(format!("uid-{}", s.uids))
            }
        };
        obj["metadata"]["uid"] = uid;
        self.commit(&mut s, key, obj, if existed.is_some() { "MODIFIED" } else { "ADDED" })
    }

    /// Deletes an object without telling any watch: what a client sees whose watch was down.
    pub fn delete_unwatched(&self, collection: &str, name: &str) -> Option<Value> {
        let mut s = self.lock();
        s.revision += 1;
        s.objects.remove(&(collection.to_string(), name.to_string()))
    }

    /// Deletes an object directly, as another client would.
    pub fn delete(&self, collection: &str, name: &str) -> Option<Value> {
        let mut s = self.lock();
        let obj = s.objects.remove(&(collection.to_string(), name.to_string()))?;
        s.revision += 1;
        let rev = s.revision;
        let ev = (rev, collection.to_string(), json!({"type": "DELETED", "object": obj}));
        s.history.push(ev.clone());
        let _ = self.events.send(ev);
        Some(obj)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn commit(&self, s: &mut State, key: (String, String), mut obj: Value, kind: &str) -> Value {
        s.revision += 1;
        let rev = s.revision;
        obj["metadata"]["resourceVersion"] = json!(rev.to_string());
        s.objects.insert(key.clone(), obj.clone());
        let ev = (rev, key.0, json!({"type": kind, "object": obj.clone()}));
        s.history.push(ev.clone());
        let _ = self.events.send(ev);
        obj
    }

    async fn serve(&self, req: Request<kube::client::Body>) -> Response<StreamBody<Chunks>> {
        let (delay, blackhole) = {
            let s = self.lock();
            (s.delay, s.blackhole)
        };
        if blackhole {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(delay).await;
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Option<Value> = serde_json::from_slice(&body).ok();
        let (collection, name) = split(parts.uri.path());
        let q = query(&parts.uri);
        let content_type =
            parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let (code, chunks) =
            if parts.method == Method::GET && name.is_none() && q.get("watch").is_some_and(|w| w == "true") {
                (200, self.watch(&collection, &q))
            } else {
                let (code, v) = match parts.method {
                    Method::PATCH => self.patch(&collection, name, &content_type, body.clone()),
                    _ => self.answer(&parts.method, &collection, name, &q, body.clone()),
                };
                (code, one(v))
            };
        self.lock().log.push(Seen {
            at: Instant::now(),
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            status: code,
            body,
        });
        let mut resp = Response::new(StreamBody::new(chunks));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        resp
    }

    fn answer(
        &self,
        method: &Method,
        collection: &str,
        name: Option<String>,
        q: &BTreeMap<String, String>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut s = self.lock();
        match (method.clone(), name) {
            (Method::GET, Some(name)) => match s.objects.get(&(collection.to_string(), name.clone())) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", &format!("{name} not found")),
            },
            (Method::GET, None) => {
                let only = q.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_string);
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((c, n), _)| c == collection && only.as_ref().is_none_or(|o| o == n))
                    .map(|(_, o)| o.clone())
                    .collect();
                let kind = items
                    .first()
                    .and_then(|o| o.get("kind"))
                    .and_then(Value::as_str)
                    .map(|k| format!("{k}List"))
                    .unwrap_or_else(|| "List".into());
                (
                    200,
                    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": s.revision.to_string()}, "items": items}),
                )
            }
            (Method::POST, None) => {
                let Some(mut obj) = body else { return status(400, "BadRequest", "no body") };
                let name = name_of(&obj).unwrap_or_default();
                let key = (collection.to_string(), name.clone());
                if s.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{name} already exists"));
                }
                s.uids += 1;
                obj["metadata"]["uid"] = json!(format!("uid-{}", s.uids));
                (201, self.commit(&mut s, key, obj, "ADDED"))
            }
            (Method::PUT, Some(name)) => {
                let Some(mut obj) = body else { return status(400, "BadRequest", "no body") };
                let key = (collection.to_string(), name.clone());
                let sent = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(str::to_string);
                match s.objects.get(&key).cloned() {
                    Some(existing) => {
                        let current = existing.pointer("/metadata/resourceVersion").and_then(Value::as_str);
                        if sent.is_some() && sent.as_deref() != current {
                            return status(409, "Conflict", "the object has been modified");
                        }
                        obj["metadata"]["uid"] = existing["metadata"]["uid"].clone();
                        (200, self.commit(&mut s, key, obj, "MODIFIED"))
                    }
                    None => {
                        s.uids += 1;
                        obj["metadata"]["uid"] = json!(format!("uid-{}", s.uids));
                        (201, self.commit(&mut s, key, obj, "ADDED"))
                    }
                }
            }
            (Method::DELETE, Some(name)) => {
                drop(s);
                match self.delete(collection, &name) {
                    Some(o) => (200, o),
                    None => status(404, "NotFound", &format!("{name} not found")),
                }
            }
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    fn patch(&self, collection: &str, name: Option<String>, content_type: &str, body: Option<Value>) -> (u16, Value) {
        let (Some(name), Some(patch)) = (name, body) else { return status(400, "BadRequest", "no name or no body") };
        let mut s = self.lock();
        let key = (collection.to_string(), name.clone());
        let Some(existing) = s.objects.get(&key).cloned() else {
            return status(404, "NotFound", &format!("{name} not found"));
        };
        let mut obj = existing.clone();
        match content_type {
            "application/json-patch+json" => {
                let Ok(ops) = serde_json::from_value::<json_patch::Patch>(patch) else {
                    return status(400, "BadRequest", "not a JSON patch");
                };
                if let Err(e) = json_patch::patch(&mut obj, &ops) {
                    return status(422, "Invalid", &e.to_string());
                }
            }
            "application/merge-patch+json" => json_patch::merge(&mut obj, &patch),
            other => return status(415, "UnsupportedMediaType", &format!("{other} is not supported by the fake")),
        }
        let rv = |o: &Value| o.pointer("/metadata/resourceVersion").cloned();
        if rv(&obj) != rv(&existing) {
            return status(409, "Conflict", "the object has been modified");
        }
        obj["metadata"]["uid"] = existing["metadata"]["uid"].clone();
        (200, self.commit(&mut s, key, obj, "MODIFIED"))
    }

    fn watch(&self, collection: &str, q: &BTreeMap<String, String>) -> Chunks {
        let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let only = q.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_string);
        // Subscribe before reading the history, so that nothing falls between the two.
        let rx = self.events.subscribe();
        let past: Vec<(u64, String, Value)> =
            self.lock().history.iter().filter(|(rev, _, _)| *rev > since).cloned().collect();
        let collection = collection.to_string();
        let last = past.last().map(|(r, _, _)| *r).unwrap_or(since);
        let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| async move { e.ok() });
        let live = live.filter(move |(rev, _, _)| futures::future::ready(*rev > last));
        Box::pin(futures::stream::iter(past).chain(live).filter_map(move |(_, c, ev)| {
            let keep = c == collection
                && only.as_ref().is_none_or(|o| ev.pointer("/object/metadata/name").and_then(Value::as_str) == Some(o));
            let line = keep.then(|| {
                let mut bytes = serde_json::to_vec(&ev).unwrap_or_default();
                bytes.push(b'\n');
                Ok(Frame::data(Bytes::from(bytes)))
            });
            futures::future::ready(line)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};

    #[test]
    fn paths_split_into_collection_and_name() {
        assert_eq!(
            split("/api/v1/namespaces/a/configmaps/x"),
            ("/api/v1/namespaces/a/configmaps".into(), Some("x".into()))
        );
        assert_eq!(split("/api/v1/namespaces/a/configmaps"), ("/api/v1/namespaces/a/configmaps".into(), None));
        assert_eq!(
            split("/apis/coordination.k8s.io/v1/namespaces/s/leases/l"),
            ("/apis/coordination.k8s.io/v1/namespaces/s/leases".into(), Some("l".into()))
        );
        assert_eq!(split("/api/v1/namespaces"), ("/api/v1/namespaces".into(), None));
    }

    #[tokio::test(start_paused = true)]
    async fn optimistic_concurrency_like_the_real_server() {
        let fake = FakeApi::default();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "a");
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("cm");
        let created = api.create(&PostParams::default(), &cm).await.expect("create");
        assert!(api.create(&PostParams::default(), &cm).await.is_err(), "a second create is refused");
        let updated = api.replace("x", &PostParams::default(), &created).await.expect("replace at the seen version");
        assert_ne!(updated.metadata.resource_version, created.metadata.resource_version);
        let err = api.replace("x", &PostParams::default(), &created).await.expect_err("stale");
        assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
        assert!(api.get_opt("y").await.expect("get").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn patches_honour_tests_and_resource_versions_like_the_real_server() {
        use kube::api::{Patch, PatchParams};
        let fake = FakeApi::default();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "a");
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("cm");
        let rv = api.create(&PostParams::default(), &cm).await.expect("create").metadata.resource_version;
        let pp = PatchParams::default();
        let set = |rv: &str| {
            serde_json::from_value::<json_patch::Patch>(json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                {"op": "add", "path": "/data", "value": {"k": "v"}},
            ]))
            .expect("patch")
        };
        let patched = api.patch("x", &pp, &Patch::<()>::Json(set(rv.as_deref().unwrap_or_default()))).await;
        assert_eq!(patched.expect("a test that holds").data.and_then(|d| d.get("k").cloned()).as_deref(), Some("v"));
        let stale = api.patch("x", &pp, &Patch::<()>::Json(set(rv.as_deref().unwrap_or_default()))).await;
        assert!(matches!(stale, Err(kube::Error::Api(s)) if s.code == 422), "a failed test");
        let merge = Patch::Merge(json!({"metadata": {"resourceVersion": rv}, "data": {"k": "w"}}));
        assert!(matches!(api.patch("x", &pp, &merge).await, Err(kube::Error::Api(s)) if s.code == 409), "stale");
        let merge = Patch::Merge(json!({"data": {"k": "w"}}));
        let merged = api.patch("x", &pp, &merge).await.expect("an unconditional merge");
        assert_eq!(merged.data.and_then(|d| d.get("k").cloned()).as_deref(), Some("w"));
        assert!(matches!(api.patch("y", &pp, &merge).await, Err(kube::Error::Api(s)) if s.code == 404));
    }
}
