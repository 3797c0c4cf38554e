//! Memory that input of any shape or size can make a replica hold, measured with a counting
//! allocator: one admission review, parse included, for the worst body shapes at the largest body
//! the server reads; and one cached MyApp with its children, up to the largest MyApp etcd stores. Run with `--nocapture` for the
//! figures.

use myapp_operator::api::policy::Policy;
use myapp_operator::webhook::limits::{JsonShape, MAX_BODY, MAX_ITEMS, MAX_REQUEST_COST};
use myapp_operator::webhook::review::{self, Endpoint};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;
static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let n = NOW.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(n, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        NOW.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new > l.size() {
                let n = NOW.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(n, Relaxed);
            } else {
                NOW.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The counters are the process's: its tests measure one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn body(junk_in_object: &str, junk_in_meta: &str) -> Vec<u8> {
    let obj = |j: &str, m: &str| {
        format!(
            r#"{{"apiVersion":"myapp.dev/v1","kind":"MyApp","metadata":{{"name":"web","namespace":"ns"{m}}},"spec":{{"image":"nginx:1.27"}}{j}}}"#
        )
    };
    format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u-1","kind":{{"group":"myapp.dev","version":"v1","kind":"MyApp"}},"resource":{{"group":"myapp.dev","version":"v1","resource":"myapps"}},"name":"web","namespace":"ns","operation":"UPDATE","userInfo":{{"username":"a"}},"object":{},"oldObject":{}}}}}"#,
        obj(junk_in_object, junk_in_meta),
        obj("", "")
    )
    .into_bytes()
}

/// `unit` repeated (with `{i}` numbered) between `open` and `close`, separated by commas, while
/// the text stays under `budget` bytes and holds at most `items` units.
fn fill(unit: &str, open: &str, close: &str, budget: usize, items: usize) -> String {
    let mut s = String::from(open);
    let mut i = 0usize;
    while s.len() + unit.len() + 40 < budget && i < items {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&unit.replace("{i}", &i.to_string()));
        i += 1;
    }
    s.push_str(close);
    s
}

/// The worst shapes, each in two sizes: as many units as the largest body holds (far over
/// `MAX_ITEMS`), and as many as `MAX_ITEMS` lets through, padded with a long string to the
/// largest body.
fn shapes() -> Vec<(String, Vec<u8>)> {
    let deep = format!("{}0{}", "[".repeat(100), "]".repeat(100));
    let kinds: [(&str, &str, &str, &str, usize, bool); 5] = [
        ("array of small values", "0", "[", "]", 1, false),
        ("many small keys", r#""{i}":0"#, "{", "}", 2, false),
        ("deep nesting", &deep, "[", "]", 101, false),
        ("many labels", r#""{i}":"""#, "{", "}", 2, true),
        ("empty objects", "{}", "[", "]", 2, false),
    ];
    let mut out = vec![("long string".to_string(), body(&format!(r#","junk":"{}""#, "x".repeat(MAX_BODY - 2048)), ""))];
    for (name, unit, open, close, per_unit, in_meta) in kinds {
        let at_cap = (MAX_ITEMS - 200) / per_unit;
        for (label, items, padded) in [
            ("full", usize::MAX, true),
            ("at the item cap", at_cap, true),
            ("at the item cap, unpadded", at_cap, false),
        ] {
            let junk = fill(unit, open, close, MAX_BODY - 2048, items);
            let (o, m) = if in_meta {
                (String::new(), format!(r#","labels":{junk}"#))
            } else {
                (format!(r#","junk":{junk}"#), String::new())
            };
            let mut b = body(&o, &m);
            if padded && b.len() < MAX_BODY - 4096 {
                let pad = format!(r#","pad":"{}""#, "p".repeat(MAX_BODY - 4096 - b.len()));
                let (o, m) = if in_meta {
                    (pad, format!(r#","labels":{junk}"#))
                } else {
                    (format!(r#","junk":{junk}{pad}"#), String::new())
                };
                b = body(&o, &m);
            }
            out.push((format!("{name}, {label}"), b));
        }
    }
    out
}

/// The heap `f` holds at its peak beyond what was held before.
fn peak_of<T>(f: impl FnOnce() -> T) -> usize {
    let before = NOW.load(Relaxed);
    PEAK.store(before, Relaxed);
    drop(f());
    PEAK.load(Relaxed).saturating_sub(before)
}

/// Every shape at the largest body costs at most what the server reserves for it before parsing,
/// and at most `MAX_REQUEST_COST` in all: the review is answered when its items are within the
/// cap, and denied unparsed (for little more than the body) when they are not.
#[test]
fn every_shape_costs_at_most_what_is_reserved_for_it() {
    let _alone = alone();
    let mut rows = Vec::new();
    for (name, b) in shapes() {
        assert!(b.len() <= MAX_BODY, "{name}: {} bytes", b.len());
        let shape = JsonShape::of(&b);
        for ep in [Endpoint::Validate, Endpoint::Mutate] {
            let (peak, reserved) = if shape.items > MAX_ITEMS {
                (peak_of(|| review::refuse_unparsed(&b, "too many", 413)), 0)
            } else {
                (peak_of(|| review::answer_review(&b, ep, &Policy::default(), None)), shape.parse_cost())
            };
            rows.push(format!(
                "{name:50} {ep:9?} {:>7} KiB items {:>9} depth {:>3} peak {:>6.1} MiB reserved {:>6.1} MiB ({:.0} B/item)",
                b.len() / 1024,
                shape.items,
                shape.depth,
                peak as f64 / MIB,
                reserved as f64 / MIB,
                peak as f64 / shape.items as f64,
            ));
            if shape.items > MAX_ITEMS {
                assert!(peak < 64 * 1024, "{name} {ep:?}: the unparsed denial held {peak} B");
            } else {
                assert!(peak <= reserved, "{name} {ep:?}: held {peak} B, {reserved} B reserved");
            }
            assert!(b.len() + peak <= MAX_REQUEST_COST, "{name} {ep:?}");
        }
    }
    println!("{}", rows.join("\n"));
}

const MIB: f64 = 1024.0 * 1024.0;

/// A MyApp as the API server sends it, with `env` entries of `value_len` characters each.
fn myapp(env: usize, value_len: usize) -> serde_json::Value {
    let env: Vec<_> =
        (0..env).map(|i| serde_json::json!({"name": format!("VAR_{i}"), "value": "v".repeat(value_len)})).collect();
    serde_json::json!({
        "apiVersion": "myapp.dev/v1", "kind": "MyApp",
        "metadata": {"name": "web", "namespace": "ns", "uid": "6f1c1f4e-4a51-4d2f-9d5a-0d6f1f0b7c11",
                     "resourceVersion": "12345", "generation": 1, "finalizers": ["myapp.dev/cleanup"],
                     "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"image": "nginx:1.27", "replicas": 2, "port": 8080, "env": env}
    })
}

/// What the caches hold for one MyApp and its two children, however large the MyApp: bounded by
/// `MAX_KEPT` per object plus its metadata, and for the largest MyApp etcd stores (1.5 MiB) no
/// more than for a small one.
#[test]
fn a_cached_myapp_costs_at_most_its_bound_whatever_its_size() {
    let _alone = alone();
    use myapp_operator::api::MyApp;
    use myapp_operator::cache::{Cached, MAX_KEPT};
    use myapp_operator::controller::children;
    let held = |doc: serde_json::Value| {
        let app: MyApp = serde_json::from_value(doc.clone()).expect("a MyApp");
        // Everything made from here on is consumed, so what is held at the end is the cache's.
        let before = NOW.load(Relaxed);
        let mut dep = serde_json::to_value(children::deployment(&app)).expect("json");
        let mut svc = serde_json::to_value(children::service(&app)).expect("json");
        for c in [&mut dep, &mut svc] {
            c["metadata"]["resourceVersion"] = "1".into();
        }
        let cached = (
            Cached::<MyApp>::from_json(doc.clone()).expect("cached"),
            Cached::from_json(dep)
                .and_then(|d: Cached<k8s_openapi::api::apps::v1::Deployment>| d.pack())
                .expect("packed"),
            Cached::from_json(svc).and_then(|s: Cached<k8s_openapi::api::core::v1::Service>| s.pack()).expect("packed"),
        );
        let n = NOW.load(Relaxed).saturating_sub(before);
        (n, cached.0.kept(), cached.1.len())
    };
    // The first use builds the shapes, which live as long as the process.
    let _warm = held(myapp(1, 1));
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    for (name, env, len) in [
        ("typical (2 env)", 2, 20),
        ("just under the bound", 9, 300),
        ("just over the bound", 12, 300),
        ("largest etcd stores (1.5 MiB)", 45, 32 * 1024),
    ] {
        let doc = myapp(env, len);
        let size = serde_json::to_vec(&doc).map(|b| b.len()).unwrap_or(0);
        let (n, kept, _) = held(doc);
        rows.push(format!("{name:32} object {size:>8} B  cached with children {n:>6} B  spec kept: {kept}"));
        costs.push(n);
        assert!(n <= 3 * (MAX_KEPT + 2048), "{name}: {n} B");
    }
    println!("{}", rows.join("\n"));
    assert!(costs[3] <= costs[0] + 2048, "the largest MyApp costs about what a small one does");
}
