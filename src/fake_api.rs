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
//! - Server-side apply (`application/apply-patch+yaml`; kube sends JSON, which is YAML) creates
//!   the object when absent (201) and otherwise is approximated by a JSON merge of the applied
//!   document: there are no managedFields, so a field that an earlier apply set and this one
//!   omits is NOT removed, and lists are replaced rather than merged by key. Tests that depend on
//!   field ownership need a real API server.
//! - The status subresource (`…/NAME/status`): a patch there changes only `status`, whatever
//!   else it carries, as on the real server. Writes to the object itself do not protect its
//!   status (the real server ignores them for kinds with a status subresource; the fake does not).
//! - `DELETE` of an object with finalizers only sets its `deletionTimestamp` (a MODIFIED event);
//!   a write that leaves an object with a `deletionTimestamp` and no finalizer removes it (a
//!   DELETED event), as on the real server. A `DELETE` with `propagationPolicy: Foreground` adds
//!   the `foregroundDeletion` finalizer, as the real server does. There is no garbage collector:
//!   owner references are ignored, nothing removes `foregroundDeletion` but the test (playing
//!   the collector, e.g. with [`FakeApi::finish_foreground_deletion`]), and a deleted owner
//!   leaves its dependents in place.
//! - `labelSelector` (equality terms `k=v`, comma-separated) and `fieldSelector=metadata.name=…`
//!   filter lists and watches; other selector forms are not supported (they match nothing).
//! - `metadata.generation` is not maintained: objects keep the generation they were written with.
//! - Any collection takes a `POST`: Events (`events.k8s.io`) are stored like any object, and
//!   their repeats (a merge patch with a series count) patch the stored Event.
//! - A request's `timeout` query parameter (a Go duration in `ms` or `s`) is its deadline, as
//!   on the real server: a request that the delay below holds past it is abandoned with 504
//!   and changes nothing.
//! - Faults: a delay before each request is served, a blackhole that never answers, paths
//!   refused with 403 ([`FakeApi::forbid`]), or a
//!   compaction ([`FakeApi::compact`]) ends every open watch and answers a watch resumed from
//!   before it with 410 Gone.
//!
//! - Every answer carries a `Date` header, as the real server's do: the wall clock by default,
//!   or a time a test sets ([`FakeApi::set_time`]) that then runs on with tokio's clock; a test
//!   can also leave the header out.
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
    /// The request's `Content-Type`, empty if none.
    pub content_type: String,
    /// The request body, if JSON.
    pub body: Option<Value>,
}

impl Seen {
    /// True for a request that writes (`POST`, `PUT`, `PATCH` or `DELETE`).
    pub fn is_write(&self) -> bool {
        [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(&self.method)
    }

    /// The method and the path without the query, e.g. `"PATCH /apis/…/myapps/web/status"`.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.uri.split('?').next().unwrap_or_default())
    }
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
    /// Paths under these prefixes are refused with 403, as RBAC refuses them.
    forbidden: Vec<String>,
    log: Vec<Seen>,
    /// The revision of the last [`FakeApi::compact`]: a watch from before it gets 410 Gone.
    compacted: u64,
    /// What the `Date` header says.
    clock: ServerClock,
}

/// The fake server's clock, as its `Date` header tells it.
#[derive(Clone, Copy, Default)]
enum ServerClock {
    /// The wall clock.
    #[default]
    Wall,
    /// This time at this tokio instant, running on with tokio's clock.
    At(time::OffsetDateTime, Instant),
    /// No `Date` header.
    Off,
}

impl ServerClock {
    /// The `Date` header's value (an HTTP date, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`), if any.
    fn date(self) -> Option<http::HeaderValue> {
        let now = match self {
            ServerClock::Wall => time::OffsetDateTime::now_utc(),
            ServerClock::At(t, at) => t + Instant::now().saturating_duration_since(at),
            ServerClock::Off => return None,
        };
        let text = now.to_offset(time::UtcOffset::UTC).format(&time::format_description::well_known::Rfc2822).ok()?;
        http::HeaderValue::from_str(&text.replace("+0000", "GMT")).ok()
    }
}

/// The fake server; clone it freely, every clone sees the same store.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(u64, String, Value)>,
    /// Counts compactions; every open watch ends at the next one.
    compactions: tokio::sync::watch::Sender<u64>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            events: broadcast::channel(4096).0,
            compactions: tokio::sync::watch::Sender::new(0),
        }
    }
}

fn split(path: &str) -> (String, Option<String>) {
    let (collection, name, _) = split_sub(path);
    (collection, name)
}

/// A LIST of `collection`, filtered by the selectors in `q`, at the current revision.
fn list(s: &State, collection: &str, q: &BTreeMap<String, String>) -> Value {
    let items: Vec<Value> =
        s.objects.iter().filter(|((c, _), o)| c == collection && selected(o, q)).map(|(_, o)| o.clone()).collect();
    let kind = items
        .first()
        .and_then(|o| o.get("kind"))
        .and_then(Value::as_str)
        .map(|k| format!("{k}List"))
        .unwrap_or_else(|| "List".into());
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": s.revision.to_string()}, "items": items})
}

/// The collection, the object's name and the subresource (`status`) of a path.
fn split_sub(path: &str) -> (String, Option<String>, Option<String>) {
    // A collection path ends in its plural; an object path has one more segment, and a
    // subresource path one more again.
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let plural_at = match parts.get(1) {
        Some(&"api") => 3,
        _ => 4,
    };
    let plural_at = if parts.get(plural_at) == Some(&"namespaces") { plural_at + 2 } else { plural_at };
    if parts.len() > plural_at + 1 {
        let sub = parts.get(plural_at + 2).map(|s| s.to_string());
        (parts[..=plural_at].join("/"), Some(parts[plural_at + 1].to_string()), sub)
    } else {
        (parts.join("/"), None, None)
    }
}

/// Decodes `%XX` escapes and `+` (a space) in a query value.
fn unescape(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `obj` matches the query's `fieldSelector` (only `metadata.name=…`) and
/// `labelSelector` (only equality terms); an unsupported form matches nothing.
fn selected(obj: &Value, q: &BTreeMap<String, String>) -> bool {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str);
    let by_field = match q.get("fieldSelector").filter(|f| !f.is_empty()) {
        None => true,
        Some(f) => f.strip_prefix("metadata.name=").is_some_and(|n| Some(n) == name),
    };
    let by_label = match q.get("labelSelector").filter(|l| !l.is_empty()) {
        None => true,
        Some(l) => l.split(',').all(|term| match term.split_once('=') {
            Some((k, v)) if !k.ends_with('!') => {
                obj.pointer("/metadata/labels").and_then(|ls| ls.get(k)).and_then(Value::as_str) == Some(v)
            }
            _ => false,
        }),
    };
    by_field && by_label
}

/// A Go duration as the fake reads it: a whole number of `ms` or `s`.
fn go_duration(v: &str) -> Option<Duration> {
    match v.strip_suffix("ms") {
        Some(ms) => ms.parse().ok().map(Duration::from_millis),
        None => v.strip_suffix('s')?.parse().ok().map(Duration::from_secs),
    }
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), unescape(v)))
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

/// The finalizer the garbage collector removes once a foreground deletion's dependents are gone.
pub const FOREGROUND: &str = "foregroundDeletion";

fn has_finalizer(obj: &Value, finalizer: &str) -> bool {
    obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| f.iter().any(|x| x == finalizer))
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers").and_then(Value::as_array).is_some_and(|f| !f.is_empty())
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
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

    /// Sets the server's clock to `time` from now on, running with tokio's clock; `None` leaves
    /// the `Date` header out of every answer.
    pub fn set_time(&self, time: Option<time::OffsetDateTime>) {
        self.lock().clock = time.map_or(ServerClock::Off, |t| ServerClock::At(t, Instant::now()));
    }

    /// Refuses every request under `prefix` (a collection path) with 403 Forbidden.
    pub fn forbid(&self, prefix: &str) {
        self.lock().forbidden.push(prefix.to_string());
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
        match s.objects.get(&key).and_then(|o| o.pointer("/metadata/uid")).cloned() {
            Some(uid) => {
                obj["metadata"]["uid"] = uid;
                self.commit(&mut s, key, obj, "MODIFIED")
            }
            None => self.create(&mut s, key, obj),
        }
    }

    /// Plays the garbage collector once the dependents of a foreground deletion are gone: removes
    /// the `foregroundDeletion` finalizer of the object, which then goes if it was its last.
    pub fn finish_foreground_deletion(&self, collection: &str, name: &str) -> Option<Value> {
        let mut s = self.lock();
        let key = (collection.to_string(), name.to_string());
        let mut obj = s.objects.get(&key).cloned()?;
        if let Some(f) = obj.pointer_mut("/metadata/finalizers").and_then(Value::as_array_mut) {
            f.retain(|x| x != FOREGROUND);
        }
        Some(self.commit(&mut s, key, obj, "MODIFIED"))
    }

    /// Deletes an object without telling any watch: what a client sees whose watch was down.
    pub fn delete_unwatched(&self, collection: &str, name: &str) -> Option<Value> {
        let mut s = self.lock();
        s.revision += 1;
        s.objects.remove(&(collection.to_string(), name.to_string()))
    }

    /// Compacts the history, as etcd's compaction does: every watch open now ends, and a watch
    /// resumed from an earlier resourceVersion gets 410 Gone, so that its client lists again.
    pub fn compact(&self) {
        {
            let mut s = self.lock();
            s.compacted = s.revision;
            s.history.clear();
        }
        self.compactions.send_modify(|n| *n += 1);
    }

    /// Deletes an object directly, as another client would.
    pub fn delete(&self, collection: &str, name: &str) -> Option<Value> {
        let mut s = self.lock();
        let obj = s.objects.remove(&(collection.to_string(), name.to_string()))?;
        s.revision += 1;
        self.announce(&mut s, collection.to_string(), "DELETED", &obj);
        Some(obj)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a watch event at the current revision and sends it to open watches.
    fn announce(&self, s: &mut State, collection: String, kind: &str, obj: &Value) {
        let ev = (s.revision, collection, json!({"type": kind, "object": obj}));
        s.history.push(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Stores a new object under a fresh uid.
    fn create(&self, s: &mut State, key: (String, String), mut obj: Value) -> Value {
        s.uids += 1;
        obj["metadata"]["uid"] = json!(format!("uid-{}", s.uids));
        self.commit(s, key, obj, "ADDED")
    }

    fn commit(&self, s: &mut State, key: (String, String), mut obj: Value, kind: &str) -> Value {
        s.revision += 1;
        obj["metadata"]["resourceVersion"] = json!(s.revision.to_string());
        let deleting = obj.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null());
        let kind = if deleting && !has_finalizers(&obj) {
            // The last finalizer is gone from an object being deleted: the server removes it.
            s.objects.remove(&key);
            "DELETED"
        } else {
            s.objects.insert(key.clone(), obj.clone());
            kind
        };
        self.announce(s, key.0, kind, &obj);
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
        let (collection, name, sub) = split_sub(parts.uri.path());
        let q = query(&parts.uri);
        let content_type =
            parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let expired = q.get("timeout").and_then(|t| go_duration(t)).is_some_and(|deadline| delay >= deadline);
        let refused = self.lock().forbidden.iter().any(|f| parts.uri.path().starts_with(f.as_str()));
        let (code, chunks) = if refused {
            let (code, v) = status(403, "Forbidden", "forbidden by the fake");
            (code, one(v))
        } else if expired {
            let (code, v) = status(504, "Timeout", "the request's deadline passed before it was served");
            (code, one(v))
        } else if parts.method == Method::GET && name.is_none() && q.get("watch").is_some_and(|w| w == "true") {
            (200, self.watch(&collection, &q))
        } else {
            let (code, v) = match parts.method {
                Method::PATCH => self.patch(&collection, name, sub.as_deref(), &content_type, body.clone()),
                _ => self.answer(&parts.method, &collection, name, &q, body.clone()),
            };
            (code, one(v))
        };
        self.lock().log.push(Seen {
            at: Instant::now(),
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            status: code,
            content_type,
            body,
        });
        let mut resp = Response::new(StreamBody::new(chunks));
        *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        if let Some(date) = self.lock().clock.date() {
            resp.headers_mut().insert(http::header::DATE, date);
        }
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
            (Method::GET, None) => (200, list(&s, collection, q)),
            (Method::POST, None) => {
                let Some(obj) = body else { return status(400, "BadRequest", "no body") };
                let name = name_of(&obj).unwrap_or_default();
                let key = (collection.to_string(), name.clone());
                if s.objects.contains_key(&key) {
                    return status(409, "AlreadyExists", &format!("{name} already exists"));
                }
                (201, self.create(&mut s, key, obj))
            }
            (Method::PUT, Some(name)) => {
                let Some(obj) = body else { return status(400, "BadRequest", "no body") };
                self.replace(&mut s, (collection.to_string(), name), obj)
            }
            (Method::DELETE, Some(name)) => {
                let key = (collection.to_string(), name.clone());
                let foreground = body
                    .as_ref()
                    .and_then(|b| b.get("propagationPolicy"))
                    .is_some_and(|p| p.as_str() == Some("Foreground"));
                if let Some(answer) = self.mark_deleted(&mut s, &key, foreground) {
                    return answer;
                }
                drop(s);
                match self.delete(collection, &name) {
                    Some(o) => (200, o),
                    None => status(404, "NotFound", &format!("{name} not found")),
                }
            }
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    /// A PUT: an update, conditional on the resourceVersion sent if any, or a create.
    fn replace(&self, s: &mut State, key: (String, String), mut obj: Value) -> (u16, Value) {
        let sent = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(str::to_string);
        match s.objects.get(&key).cloned() {
            Some(existing) => {
                let current = existing.pointer("/metadata/resourceVersion").and_then(Value::as_str);
                if sent.is_some() && sent.as_deref() != current {
                    return status(409, "Conflict", "the object has been modified");
                }
                obj["metadata"]["uid"] = existing["metadata"]["uid"].clone();
                (200, self.commit(s, key, obj, "MODIFIED"))
            }
            None => (201, self.create(s, key, obj)),
        }
    }

    /// A DELETE of an object with finalizers, or in the foreground: marked for deletion (the
    /// foreground finalizer added), gone once the last finalizer is removed. None when the object
    /// can go at once, or does not exist.
    fn mark_deleted(&self, s: &mut State, key: &(String, String), foreground: bool) -> Option<(u16, Value)> {
        let mut obj = s.objects.get(key).cloned().filter(|o| foreground || has_finalizers(o))?;
        if foreground && !has_finalizer(&obj, FOREGROUND) {
            match obj.pointer_mut("/metadata/finalizers").and_then(Value::as_array_mut) {
                Some(f) => f.push(json!(FOREGROUND)),
                None => obj["metadata"]["finalizers"] = json!([FOREGROUND]),
            }
        }
        if obj.pointer("/metadata/deletionTimestamp").is_none_or(Value::is_null) {
            obj["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        }
        Some((200, self.commit(s, key.clone(), obj, "MODIFIED")))
    }

    fn patch(
        &self,
        collection: &str,
        name: Option<String>,
        sub: Option<&str>,
        content_type: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (Some(name), Some(patch)) = (name, body) else { return status(400, "BadRequest", "no name or no body") };
        let mut s = self.lock();
        let key = (collection.to_string(), name.clone());
        let apply = content_type == "application/apply-patch+yaml";
        let Some(existing) = s.objects.get(&key).cloned() else {
            if apply && sub.is_none() {
                // Server-side apply creates what is absent.
                if name_of(&patch).as_deref() != Some(name.as_str()) {
                    return status(400, "BadRequest", "the applied name differs from the path's");
                }
                return (201, self.create(&mut s, key, patch));
            }
            return status(404, "NotFound", &format!("{name} not found"));
        };
        if sub.is_some_and(|r| r != "status") {
            return status(404, "NotFound", "the fake knows no subresource but status");
        }
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
            // An approximation: see the module's doc.
            "application/apply-patch+yaml" => json_patch::merge(&mut obj, &patch),
            other => return status(415, "UnsupportedMediaType", &format!("{other} is not supported by the fake")),
        }
        let rv = |o: &Value| o.pointer("/metadata/resourceVersion").cloned();
        if rv(&obj) != rv(&existing) {
            return status(409, "Conflict", "the object has been modified");
        }
        obj["metadata"]["uid"] = existing["metadata"]["uid"].clone();
        if sub == Some("status") {
            // Only the status changes through the status subresource.
            let status = obj.get("status").cloned();
            obj = existing;
            match status {
                Some(st) => obj["status"] = st,
                None => {
                    if let Some(o) = obj.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        (200, self.commit(&mut s, key, obj, "MODIFIED"))
    }

    fn watch(&self, collection: &str, q: &BTreeMap<String, String>) -> Chunks {
        let since: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        if since != 0 && since < self.lock().compacted {
            let (_, gone) = status(410, "Expired", "too old resource version");
            let mut line = serde_json::to_vec(&json!({"type": "ERROR", "object": gone})).unwrap_or_default();
            line.push(b'\n');
            return Box::pin(futures::stream::once(async move { Ok(Frame::data(Bytes::from(line))) }));
        }
        let mut compactions = self.compactions.subscribe();
        let compacted = async move {
            let _ = compactions.changed().await;
        };
        let q = q.clone();
        // Subscribe before reading the history, so that nothing falls between the two.
        let rx = self.events.subscribe();
        let past: Vec<(u64, String, Value)> =
            self.lock().history.iter().filter(|(rev, _, _)| *rev > since).cloned().collect();
        let collection = collection.to_string();
        let last = past.last().map(|(r, _, _)| *r).unwrap_or(since);
        let live = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |e| async move { e.ok() });
        let live = live.filter(move |(rev, _, _)| futures::future::ready(*rev > last));
        Box::pin(futures::stream::iter(past).chain(live).take_until(compacted).filter_map(move |(_, c, ev)| {
            let keep = c == collection && ev.get("object").is_some_and(|o| selected(o, &q));
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

    #[tokio::test(start_paused = true)]
    async fn apply_status_finalizers_and_selectors_like_the_real_server() {
        use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
        let fake = FakeApi::default();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "a");
        let apply = PatchParams::apply("me").force();
        let doc = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "labels": {"k": "v"}}, "data": {"a": "1"}});
        let created = api.patch("x", &apply, &Patch::Apply(&doc)).await.expect("an apply creates");
        assert_eq!(fake.requests().last().map(|r| r.status), Some(201));
        let doc = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"b": "2"}});
        let merged = api.patch("x", &apply, &Patch::Apply(&doc)).await.expect("an apply merges");
        let data = merged.data.unwrap_or_default();
        assert_eq!(
            (data.get("a"), data.get("b")),
            (Some(&"1".to_string()), Some(&"2".to_string())),
            "merged, not owned"
        );
        assert_eq!(merged.metadata.uid, created.metadata.uid);

        // Only the status changes through the status subresource.
        let coll = "/api/v1/namespaces/a/configmaps";
        let patch = Patch::Merge(json!({"status": {"s": 1}, "data": {"a": "changed"}}));
        api.patch_status("x", &PatchParams::default(), &patch).await.expect("status");
        let stored = fake.get(coll, "x").expect("stored");
        assert_eq!((stored["status"]["s"].clone(), stored["data"]["a"].clone()), (json!(1), json!("1")));

        // Selectors, as kube encodes them.
        let selected = |l: &str| {
            let api = api.clone();
            let lp = ListParams::default().labels(l);
            async move { api.list(&lp).await.expect("list").items.len() }
        };
        assert_eq!((selected("k=v").await, selected("k=w").await, selected("").await), (1, 0, 1));

        // A finalizer holds a delete; removing the last one completes it.
        let hold = Patch::Merge(json!({"metadata": {"finalizers": ["f"]}}));
        api.patch("x", &PatchParams::default(), &hold).await.expect("finalizer");
        api.delete("x", &DeleteParams::default()).await.expect("delete");
        assert!(fake.get(coll, "x").and_then(|o| o.pointer("/metadata/deletionTimestamp").cloned()).is_some());
        let release = Patch::Merge(json!({"metadata": {"finalizers": []}}));
        api.patch("x", &PatchParams::default(), &release).await.expect("release");
        assert!(fake.get(coll, "x").is_none(), "gone with its last finalizer");

        // A foreground delete waits for the collector, which the test plays.
        api.patch("x", &apply, &Patch::Apply(&doc)).await.expect("again");
        api.delete("x", &DeleteParams::foreground()).await.expect("foreground");
        assert!(fake.get(coll, "x").is_some(), "held by foregroundDeletion");
        fake.finish_foreground_deletion(coll, "x");
        assert!(fake.get(coll, "x").is_none());
    }
}
