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
//! - For every document the builders make, [`super::children::up_to_date`] judges the rebuilt
//!   object as it would the object the API server sent: the shape keeps every field path a
//!   document of the builders can set (tests check this over random specs), and
//!   [`super::children::is_subset`] reads no other. In a list merged by key it also reads the key
//!   fields of entries that other managers added; every entry of a list is projected by the shape
//!   of the builders' entry, which carries those keys.
//! - `managedFields` are never deserialized into structs: an object arrives as JSON, is projected,
//!   and the rest is dropped at once, so a relist costs one object's worth of transient memory per
//!   object being read, not a page of full objects.

use super::children;
use crate::api::{MyApp, MyAppSpec, ResourceAmounts, Resources, ServiceType};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
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

/// Every field path a document of the builders can carry, from a `MyApp` that sets every
/// optional field, merged with what reconcile reads beyond them.
fn union(applied: Value, read: Value) -> Value {
    let mut shape = applied;
    merge(&mut shape, read);
    untyped(&mut shape);
    shape
}

/// Removes from `doc` what a [`Cached`] keeps outside its JSON: the typed metadata, and the
/// object's kind, which is in its type.
fn untyped(doc: &mut Value) {
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

/// A `MyApp` with every optional field set, so its children carry every field the builders can
/// write.
fn maximal() -> MyApp {
    let amounts = || Some(ResourceAmounts { cpu: Some("1".into()), memory: Some("1Mi".into()) });
    let mut app = MyApp::new(
        "shape",
        MyAppSpec {
            image: "shape:1".into(),
            replicas: 1,
            port: 1,
            env: vec![crate::api::EnvVar { name: "A".into(), value: "a".into() }],
            resources: Some(Resources { requests: amounts(), limits: amounts() }),
            service_type: Some(ServiceType::NodePort),
        },
    );
    app.metadata.namespace = Some("shape".into());
    app.metadata.uid = Some("shape".into());
    app
}

fn applied<K: serde::Serialize + Resource + Clone>(doc: K) -> Value {
    let doc = children::stamp(doc.clone()).unwrap_or(doc);
    serde_json::to_value(doc).unwrap_or_default()
}

/// The deletion mark, which cleanup reads.
fn deletion() -> Value {
    json!({"metadata": {"deletionTimestamp": true}})
}

impl Shape for Deployment {
    fn shape() -> &'static Value {
        static SHAPE: LazyLock<Value> = LazyLock::new(|| {
            let mut read = deletion();
            // What `RolloutFacts::from_deployment` reads.
            merge(
                &mut read,
                json!({
                    "metadata": {"generation": true},
                    "status": {
                        "observedGeneration": true, "replicas": true, "updatedReplicas": true,
                        "readyReplicas": true, "availableReplicas": true,
                        "conditions": [{"type": true, "reason": true}],
                    },
                }),
            );
            union(applied(children::deployment(&maximal())), read)
        });
        &SHAPE
    }
}

impl Shape for Service {
    fn shape() -> &'static Value {
        static SHAPE: LazyLock<Value> = LazyLock::new(|| union(applied(children::service(&maximal())), deletion()));
        &SHAPE
    }
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

/// A cached child packed into one string, as [`super::store::Children`] keeps it:
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
mod tests {
    use super::*;
    use crate::api::EnvVar;
    use proptest::prelude::*;

    /// A Deployment as the API server sends it: the applied document plus defaults, status,
    /// managedFields and fields of other managers.
    fn served(app: &MyApp) -> Value {
        let mut d = applied(children::deployment(app));
        merge(
            &mut d,
            json!({
                "metadata": {
                    "resourceVersion": "42", "uid": "d-uid", "generation": 3,
                    "creationTimestamp": "2026-12-01T00:00:00Z",
                    "annotations": {"deployment.kubernetes.io/revision": "2"},
                    "managedFields": [{"manager": "myapp-operator", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
                },
                "spec": {"progressDeadlineSeconds": 600, "revisionHistoryLimit": 10,
                         "strategy": {"type": "RollingUpdate"},
                         "template": {"spec": {"restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}}},
                "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                           "availableReplicas": 2,
                           "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                                           "message": "long text", "lastUpdateTime": "2026-12-01T00:00:00Z"}]},
            }),
        );
        if let Some(c) = d.pointer_mut("/spec/template/spec/containers/0").and_then(Value::as_object_mut) {
            c.insert("imagePullPolicy".into(), "IfNotPresent".into());
            c.insert("terminationMessagePath".into(), "/dev/termination-log".into());
        }
        d
    }

    #[test]
    fn a_cached_deployment_keeps_what_reconcile_reads_and_drops_the_rest() {
        let app = children::tests::app();
        let cached = Cached::<Deployment>::from_json(served(&app)).expect("cached");
        assert_eq!(cached.metadata.name.as_deref(), Some("web"));
        assert_eq!(cached.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(cached.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        for dropped in ["managedFields", "progressDeadlineSeconds", "imagePullPolicy", "lastUpdateTime", "long text"] {
            assert!(!cached.rest.contains(dropped), "{dropped} is dropped: {}", cached.rest);
        }
        let d = cached.object().expect("rebuilt");
        let desired = children::stamp(children::deployment(&app)).expect("stamped");
        assert!(children::up_to_date(&desired, &d), "an unchanged child is up to date");
        let facts = crate::api::conditions::RolloutFacts::from_deployment(&d);
        assert!(facts.complete() && facts.generation == 3 && facts.ready == 2, "{facts:?}");
        assert!(d.meta().annotations.as_ref().is_some_and(|a| a.contains_key(crate::api::APPLIED_HASH)));
    }

    #[test]
    fn what_is_not_an_object_is_an_error_not_a_panic() {
        for bad in [json!([]), json!("x"), json!(null), json!({"metadata": "x"})] {
            assert!(Cached::<Deployment>::from_json(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cached_child_shows_drift_and_deletion() {
        let app = children::tests::app();
        let desired = children::stamp(children::deployment(&app)).expect("stamped");
        let mut changed = served(&app);
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1".into();
        changed["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z".into();
        let d = Cached::<Deployment>::from_json(changed).expect("cached").object().expect("rebuilt");
        assert!(!children::up_to_date(&desired, &d), "a hand-changed image is drift");
        assert!(d.metadata.deletion_timestamp.is_some());
        let mut s = applied(children::service(&app));
        s["spec"]["clusterIP"] = "10.0.0.1".into();
        s["spec"]["ports"][0]["nodePort"] = 30001.into();
        let cached = Cached::<Service>::from_json(s).expect("cached");
        assert!(!cached.rest.contains("clusterIP") && !cached.rest.contains("30001"));
        let desired = children::stamp(children::service(&app)).expect("stamped");
        assert!(children::up_to_date(&desired, &cached.object().expect("rebuilt")));
    }

    /// What other managers add to a child survives the cache's projection as far as
    /// `up_to_date` reads it: entries of lists merged by key are kept with their keys, so the
    /// rebuilt child is judged as the API server's own (see `children::KEYED_LISTS`).
    #[test]
    fn a_cached_child_with_additions_by_others_is_still_up_to_date() {
        let app = children::tests::app();
        let desired = children::stamp(children::deployment(&app)).expect("stamped");
        let mut shared = served(&app);
        let containers = shared.pointer_mut("/spec/template/spec/containers").and_then(Value::as_array_mut);
        let containers = containers.expect("containers");
        if let Some(env) = containers[0].get_mut("env").and_then(Value::as_array_mut) {
            env.insert(0, json!({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}));
            env.push(json!({"name": "X", "value": "1"}));
        }
        containers.insert(0, json!({"name": "proxy", "image": "envoy:1", "args": ["--long", "--list"]}));
        merge(&mut shared, json!({"metadata": {"labels": {"team": "a"}}}));
        let cached = Cached::<Deployment>::from_json(shared.clone()).expect("cached");
        assert!(!cached.rest.contains("secretKeyRef") && !cached.rest.contains("--long"), "{}", cached.rest);
        let rebuilt = cached.object().expect("rebuilt");
        assert!(children::up_to_date(&desired, &rebuilt), "additions by others are no drift: {}", cached.rest);

        shared["spec"]["template"]["spec"]["containers"][1]["env"][1]["value"] = "debug".into();
        let rebuilt = Cached::<Deployment>::from_json(shared).expect("cached").object().expect("rebuilt");
        assert!(!children::up_to_date(&desired, &rebuilt), "our env entry changed is drift");
    }

    #[test]
    fn a_cached_myapp_keeps_what_reconcile_reads_and_drops_the_rest() {
        let mut app = children::tests::app();
        app.metadata.generation = Some(4);
        app.metadata.resource_version = Some("77".into());
        app.metadata.finalizers = Some(vec![crate::api::FINALIZER.into()]);
        app.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-01T00:00:00Z".parse().expect("a timestamp"),
        ));
        app.status = Some(crate::api::MyAppStatus {
            observed_generation: Some(3),
            replicas: 2,
            ready_replicas: 1,
            selector: "app=web".into(),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Progressing".into(),
                message: "1 of 2 ready".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-12-01T00:00:00Z".parse().expect("a timestamp"),
                ),
                observed_generation: Some(3),
            }],
        });
        let mut served = serde_json::to_value(&app).expect("a MyApp serializes");
        merge(
            &mut served,
            json!({"metadata": {
                "labels": {"team": "a"},
                "creationTimestamp": "2026-12-01T00:00:00Z",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}",
                    "myapp.dev/traceparent": "00-1-2-01",
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsV1": {"f:spec": {}}}],
            }}),
        );
        let cached = Cached::<MyApp>::from_json(served).expect("cached");
        for dropped in ["managedFields", "last-applied", "team", "creationTimestamp"] {
            assert!(!cached.rest.contains(dropped), "{dropped} is dropped: {}", cached.rest);
        }
        let rebuilt = cached.object().expect("rebuilt");
        assert_eq!(rebuilt.spec, app.spec);
        assert_eq!(rebuilt.status, app.status);
        let kept: Vec<&String> = rebuilt.metadata.annotations.iter().flatten().map(|(k, _)| k).collect();
        assert_eq!(kept, ["myapp.dev/traceparent"]);
        let (m, want) = (&rebuilt.metadata, &app.metadata);
        assert_eq!((&m.name, &m.namespace, &m.uid, m.generation), (&want.name, &want.namespace, &want.uid, Some(4)));
        assert_eq!((&m.resource_version, &m.finalizers), (&want.resource_version, &want.finalizers));
        assert_eq!(m.deletion_timestamp, want.deletion_timestamp);
        assert_eq!(m.labels, None);
    }

    fn spec() -> impl Strategy<Value = MyAppSpec> {
        let amounts = (proptest::option::of("[1-9]00m"), proptest::option::of("[1-9]Mi"))
            .prop_map(|(cpu, memory)| ResourceAmounts { cpu, memory });
        (
            "[a-z]{1,8}:[0-9]",
            0..5i32,
            1..65535i32,
            proptest::collection::vec(("[A-Z]{1,4}", "[a-z]{0,3}"), 0..3),
            proptest::option::of((proptest::option::of(amounts.clone()), proptest::option::of(amounts))),
            proptest::option::of(prop_oneof![Just(ServiceType::ClusterIP), Just(ServiceType::NodePort)]),
        )
            .prop_map(|(image, replicas, port, env, resources, service_type)| MyAppSpec {
                image,
                replicas,
                port,
                env: env.into_iter().map(|(name, value)| EnvVar { name, value }).collect(),
                resources: resources.map(|(requests, limits)| Resources { requests, limits }),
                service_type,
            })
    }

    proptest! {
        /// The shape keeps every field a document of the builders has: so `is_subset` of a
        /// document against a cached child reads exactly what it reads against the whole child.
        #[test]
        fn the_shapes_keep_every_field_the_builders_write(spec in spec()) {
            let mut app = children::tests::app();
            app.spec = spec;
            for (doc, shape) in [
                (applied(children::deployment(&app)), Deployment::shape()),
                (applied(children::service(&app)), Service::shape()),
            ] {
                let mut expected = doc.clone();
                untyped(&mut expected);
                prop_assert_eq!(project(&doc, shape), expected);
            }
        }
    }
}
