//! What the caches keep of each object (MyApp, Deployment, Service): only what reconcile reads,
//! in compact form.
//!
//! A `k8s_openapi` Deployment costs about 11 KiB of heap however few of its fields are set (its
//! `PodSpec` and `Container` structs alone are 1.5 and 2.3 KiB), and about 28 KiB with the
//! `managedFields` the API server sends. A typed MyApp costs about 1.4 KiB once pruned, most of
//! it the many small allocations of its status conditions and metadata. Every replica caches
//! every MyApp and every child, so that size sets the memory a replica needs. A [`Cached`] object
//! instead holds:
//! - a small `ObjectMeta` (name, namespace, resourceVersion, ownerReferences), which the watch,
//!   the store and the controller's owner mapping read;
//! - everything else reconcile reads, as one compact JSON string ([`Shape::shape`]):
//!   - of a child, the fields the operator applies (labels, the applied-hash annotation, the
//!     spec fields of the builders), the deletion mark, and for a Deployment the generation and
//!     the status counts;
//!   - of a MyApp, its spec and status, and the metadata reconcile reads (uid, generation,
//!     deletion mark, finalizers, and the `myapp.dev/` annotations: see [`Shape::trim`]).
//!
//! [`Cached::object`] rebuilds the typed object from that, for the one reconcile that reads it,
//! and drops it afterwards.
//!
//! # Guarantees
//!
//! - For every document the builders make, `controller::children::up_to_date` judges the kept
//!   document as it would the object the API server sent: the shape keeps every field path a
//!   document of the builders can set (tests check this over random specs), and
//!   `controller::children::is_subset` reads no other. In a list merged by key it also reads the key
//!   fields of entries that other managers added; every entry of a list is projected by the shape
//!   of the builders' entry, which carries those keys.
//! - `managedFields` are never deserialized into structs: an object arrives as JSON, is projected,
//!   and the rest is dropped at once, so a relist costs one object's worth of transient memory per
//!   object being read, not a page of full objects.

use crate::api::MyApp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::LazyLock;

/// A kind of child the caches keep in compact form: which fields of it are kept.
pub trait Shape: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + DeserializeOwned {
    /// The tree of fields kept, beyond the typed metadata: an object keeps the keys it lists
    /// (each projected by its value), an array projects every element by its first element, and
    /// any other value keeps the field whole.
    fn shape() -> &'static Value;

    /// Drops, from the object as sent, what the shape keeps whole but reconcile does not read.
    fn trim(_object: &mut Value) {}
}

/// The most bytes of compact JSON a [`Cached`] object keeps. A typical MyApp keeps about 600, its
/// Deployment about 1,000. An object whose compact form is larger (a MyApp with large env values,
/// up to what etcd stores, 1.5 MiB) keeps its metadata only ([`Cached::kept`] is false), and
/// reconcile reads it from the API server. So no object costs a replica more than this plus its
/// metadata, however large it is: the size a user can give a MyApp cannot grow every replica's
/// cache.
pub const MAX_KEPT: usize = 4 * 1024;

/// The shape of a kind of child: every field path of `applied`, a document of the builders
/// from a `MyApp` that sets every optional field, merged with `read`, what reconcile reads
/// beyond them (the child shapes are in `controller::children`, which owns the builders).
pub(crate) fn shape_of(applied: Value, read: Value) -> Value {
    let mut shape = applied;
    merge(&mut shape, read);
    untyped(&mut shape);
    shape
}

/// Removes from `doc` what a [`Cached`] keeps outside its JSON: the typed metadata, and the
/// object's kind, which is in its type.
pub(crate) fn untyped(doc: &mut Value) {
    if let Some(o) = doc.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
    }
    if let Some(meta) = doc.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in TYPED_META {
            meta.remove(*key);
        }
    }
}

/// Merges `from` into `into`: objects key by key, recursively; any other value of `from` replaces
/// what `into` has there.
pub fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (into, from) => *into = from,
    }
}

/// The metadata fields kept typed, outside the JSON.
const TYPED_META: &[&str] = &["name", "namespace", "resourceVersion", "ownerReferences"];

/// The deletion mark, which cleanup reads.
pub(crate) fn deletion() -> Value {
    json!({"metadata": {"deletionTimestamp": true}})
}

impl Shape for MyApp {
    fn shape() -> &'static Value {
        static SHAPE: LazyLock<Value> = LazyLock::new(|| {
            let mut shape = json!({"spec": true, "status": true});
            merge(&mut shape, deletion());
            merge(
                &mut shape,
                json!({"metadata": {"uid": true, "generation": true, "finalizers": true, "annotations": true}}),
            );
            shape
        });
        &SHAPE
    }

    /// Keeps only the annotations under `myapp.dev/` (the applied hash, the trace link, the
    /// port-change opt-in). Above all this drops `kubectl`'s last-applied configuration, a second
    /// copy of the whole object for MyApps applied with `kubectl apply`. Labels and
    /// `managedFields` are outside the shape: nothing reads them.
    fn trim(object: &mut Value) {
        if let Some(annotations) = object.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
            annotations.retain(|k, _| k.starts_with("myapp.dev/"));
        }
    }
}

/// `value` cut down to `shape` (see [`Shape::shape`]).
pub fn project(value: &Value, shape: &Value) -> Value {
    match (value, shape) {
        (Value::Object(v), Value::Object(s)) => Value::Object(
            s.iter()
                .filter_map(|(k, sub)| v.get(k).map(|field| (k.clone(), project(field, sub))))
                .collect::<Map<_, _>>(),
        ),
        (Value::Array(v), Value::Array(s)) => match s.first() {
            Some(element) => Value::Array(v.iter().map(|x| project(x, element)).collect()),
            None => Value::Array(v.clone()),
        },
        (v, _) => v.clone(),
    }
}

/// An object as the caches keep it (see the module docs).
pub struct Cached<K> {
    metadata: ObjectMeta,
    rest: Box<str>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Cached<K> {
    fn clone(&self) -> Self {
        Self { metadata: self.metadata.clone(), rest: self.rest.clone(), kind: PhantomData }
    }
}

impl<K> fmt::Debug for Cached<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cached").field("metadata", &self.metadata).field("rest", &self.rest).finish()
    }
}

impl<K: Shape> Cached<K> {
    /// The compact form of `object`, as the API server sends it (JSON).
    pub fn from_json(mut object: Value) -> Result<Self, serde_json::Error> {
        if !object.is_object() {
            return Err(serde_json::Error::custom("a Kubernetes object must be a JSON object"));
        }
        let meta = object.get_mut("metadata").map(Value::take).unwrap_or_default();
        if !meta.is_object() {
            return Err(serde_json::Error::custom("a Kubernetes object must have metadata"));
        }
        let typed = TYPED_META.iter().filter_map(|k| meta.get(*k).map(|v| (k.to_string(), v.clone())));
        let metadata: ObjectMeta = serde_json::from_value(Value::Object(typed.collect()))?;
        object["metadata"] = meta;
        K::trim(&mut object);
        let mut rest = serde_json::to_string(&project(&object, K::shape()))?;
        if rest.len() > MAX_KEPT {
            rest = String::new();
        }
        Ok(Self { metadata, rest: rest.into_boxed_str(), kind: PhantomData })
    }

    /// Whether the fields reconcile reads are kept; if not (over [`MAX_KEPT`]), only the
    /// metadata is, and [`Cached::object`] fails.
    pub fn kept(&self) -> bool {
        !self.rest.is_empty()
    }

    /// The object rebuilt as its typed self: the kept fields only.
    pub fn object(&self) -> Result<K, serde_json::Error> {
        if !self.kept() {
            return Err(serde_json::Error::custom(format!(
                "over {MAX_KEPT} bytes, not kept: read from the API server"
            )));
        }
        let mut object: K = serde_json::from_str(&self.rest)?;
        let meta = object.meta_mut();
        meta.name.clone_from(&self.metadata.name);
        meta.namespace.clone_from(&self.metadata.namespace);
        meta.resource_version.clone_from(&self.metadata.resource_version);
        meta.owner_references.clone_from(&self.metadata.owner_references);
        Ok(object)
    }
}

impl<K: Shape> Cached<K> {
    /// The object as JSON, as kept: the kept fields with the typed metadata, the kind and the
    /// apiVersion put back, read straight from the compact text. It holds what [`Cached::object`] would serialize back to
    /// for every field a document of the builders can set, so `up_to_date` judges it as it would
    /// the object, without a typed object in between.
    pub fn document(&self) -> Result<Value, serde_json::Error> {
        if !self.kept() {
            return Err(serde_json::Error::custom(format!(
                "over {MAX_KEPT} bytes, not kept: read from the API server"
            )));
        }
        let mut doc: Value = serde_json::from_str(&self.rest)?;
        let Some(object) = doc.as_object_mut() else {
            return Err(serde_json::Error::custom("a kept object is a JSON object"));
        };
        let meta = object.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
        let Some(meta) = meta.as_object_mut() else {
            return Err(serde_json::Error::custom("a kept object's metadata is a JSON object"));
        };
        if let Value::Object(typed) = serde_json::to_value(&self.metadata)? {
            meta.extend(typed);
        }
        object.insert("apiVersion".into(), K::api_version(&()).into());
        object.insert("kind".into(), K::kind(&()).into());
        Ok(doc)
    }
}

/// A cached child packed into one string, as [`super::Children`] keeps it:
/// `"{namespace}/{name}\n{ownerReferences}\n{rest}"`, the owner references as JSON (empty when
/// there are none) and `rest` the [`Cached`]'s JSON. Neither JSON text holds a raw line break
/// (serde_json escapes them in strings), and neither a namespace nor a name holds a `/`.
///
/// A [`Cached`] child costs an `ObjectMeta` struct (about 340 bytes, nearly all of it empty
/// options) and an allocation for each of its name, namespace, resourceVersion and owner
/// reference strings; kube's `Store` adds a key that repeats the name, namespace and
/// resourceVersion. Packed, it is one allocation of its text. The resourceVersion is not kept:
/// nothing reads a child's.
pub struct Packed<K> {
    text: Box<str>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Packed<K> {
    /// `namespace/name`, the key of a child in its store.
    pub fn key(&self) -> &str {
        self.text.split_once('\n').map_or(&self.text, |(key, _)| key)
    }

    /// The bytes it holds.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Whether it holds nothing (never: a packed child has at least its key).
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

/// The key of the child `name` in `namespace` (see [`Packed::key`]).
pub fn child_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl<K: Shape> Cached<K> {
    /// This child packed (see [`Packed`]).
    pub fn pack(&self) -> Result<Packed<K>, serde_json::Error> {
        let m = &self.metadata;
        let owners = match &m.owner_references {
            Some(refs) if !refs.is_empty() => serde_json::to_string(refs)?,
            _ => String::new(),
        };
        let key = child_key(m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default());
        let text = [key.as_str(), &owners, &self.rest].join("\n").into_boxed_str();
        Ok(Packed { text, kind: PhantomData })
    }
}

impl<K: Shape> Packed<K> {
    /// The child as a [`Cached`] again, its resourceVersion aside.
    pub fn unpack(&self) -> Result<Cached<K>, serde_json::Error> {
        let mut parts = self.text.splitn(3, '\n');
        let (key, owners, rest) = (parts.next(), parts.next(), parts.next());
        let (Some(key), Some(owners), Some(rest)) = (key, owners, rest) else {
            return Err(serde_json::Error::custom("a packed child has three parts"));
        };
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        let metadata = ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            owner_references: if owners.is_empty() { None } else { Some(serde_json::from_str(owners)?) },
            ..ObjectMeta::default()
        };
        Ok(Cached { metadata, rest: rest.into(), kind: PhantomData })
    }

    /// The child rebuilt as its typed self (see [`Cached::object`]).
    pub fn object(&self) -> Result<K, serde_json::Error> {
        self.unpack()?.object()
    }
}

impl<K> Clone for Packed<K> {
    fn clone(&self) -> Self {
        Self { text: self.text.clone(), kind: PhantomData }
    }
}

impl<K> fmt::Debug for Packed<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

// A set of packed children is looked up by key: equality and hash are the key's, and a packed
// child borrows as its key, so that `HashSet<Packed<K>>::get("ns/name")` finds it.
impl<K> PartialEq for Packed<K> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl<K> Eq for Packed<K> {}

impl<K> std::hash::Hash for Packed<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl<K> std::borrow::Borrow<str> for Packed<K> {
    fn borrow(&self) -> &str {
        self.key()
    }
}

impl<'de, K: Shape> Deserialize<'de> for Cached<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_json(Value::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl<K: Shape> Resource for Cached<K> {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn api_version(dt: &()) -> Cow<'_, str> {
        K::api_version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
impl<K> Cached<K> {
    /// The compact JSON kept.
    pub(crate) fn rest(&self) -> &str {
        &self.rest
    }
}

/// A MyApp's key in the controller's queue and the caches.
pub type AppRef = kube::runtime::reflector::ObjectRef<Cached<MyApp>>;

/// The MyApp a child's event triggers: its controller owner reference of kind MyApp.
pub fn owner(meta: &ObjectMeta) -> Option<AppRef> {
    let owner = meta.owner_references.as_ref()?.iter().find(|o| o.controller == Some(true) && o.kind == "MyApp")?;
    let mut r = kube::runtime::reflector::ObjectRef::new(&owner.name);
    if let Some(ns) = &meta.namespace {
        r = r.within(ns);
    }
    Some(r)
}
