//! `cargo xtask chaos --target pods --profile hostile [--seconds N]`: every input that once took
//! all replicas down at once, together, against the install's three pods on the real node, while
//! a legitimate workload creates, changes and deletes MyApps through the API server. The run is
//! judged by the figures below and exits non-zero when one misses its target:
//!
//! | figure | target |
//! |---|---|
//! | operator container restarts (restartCount delta, every pod; a replaced pod counts too) | 0 |
//! | replicas Ready, sampled every second | 3 of 3 at every sample |
//! | legitimate admissions through the API server (the workload's create, patch, delete) | p99 < 100 ms, 0 failed |
//! | RSS of each replica, max (the manager's `VmHWM`, reset at the start) | < 75 % of the limit in `deploy/` |
//! | operator writes to MyApps made before the attack and never changed, and to their children | 0 |
//! | writes of the webhook serving-cert Secret during the run | ≤ 2 |
//!
//! The attacks, all at once, each bounded in count and stopped by the deadline:
//!
//! 1. **parse cost**: [`PARSE_CLIENTS`] clients per pod POST AdmissionReviews of 3.2 MiB to
//!    `https://<pod IP>:9443/validate` (TLS, trusting the CA of the webhook Secret): most carry
//!    `"junk":[0,0,0,...]` (1.7 million items), one in four the same size in just under 20,000
//!    items of padding (the most the server parses). Answers are counted by status.
//! 2. **connection flood**: [`FLOOD_WEBHOOK`] idle TCP connections per pod to 9443 and
//!    [`FLOOD_PROBES`] to 8081, each opened again a second after the server closes it.
//! 3. **foreign labelled objects**: [`FOREIGN`] headless Services and as many Deployments of 0
//!    replicas, each with an 8 KiB annotation, carrying the operator's child labels (the
//!    `managed-by` its watches select, and a `myapp.dev/name` naming a MyApp that exists) and no
//!    owner reference; created at the start, deleted with the namespace at the end.
//! 4. **large MyApps**: [`LARGE`] MyApps of about 1 MiB each (30 env values of 32,000
//!    characters), one of them changed every 20 s.
//!
//! # Source addresses
//!
//! The webhook server shares connections, requests and memory out per remote address, so an
//! attacker that used the API server's address would be throttled together with the API server;
//! the threat is another pod, with an address of its own. The API server (a host process) reaches
//! the pods from the address the kernel picks for the pod network (`ip route get <pod IP>`: the
//! bridge's). The attackers' sockets are bound to [`ATTACKERS`] instead: the parse-cost clients to
//! the first, the flood to the second, as two attacking pods would (from one address, the flood
//! would hold every connection place of that address, and the parse-cost clients would be closed
//! at accept). Each is a /32 this run adds to `lo` (and removes at the end, unless it was there
//! before), which the pods reach back through their default route, as they reach the node's
//! address. The report prints the addresses.
//!
//! The attackers run on a runtime of their own (two threads), so the workload's requests do not
//! queue behind their tasks in this process; the two CPUs of the machine are still shared with
//! the pods and the control plane, which an attacker on another node would not take.

use super::args::{ChaosArgs, On};
use crate::operator::{self, NAMESPACE, TargetArgs};
use crate::{cluster, cluster::node, install, paths};
use anyhow::{Context, Result, bail};
use chaos::audit;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use myapp_operator::api::{INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL, MyApp};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the attacks run unless `--seconds` says otherwise.
pub const DEFAULT_SECONDS: u64 = 120;
/// Parse-cost clients per pod.
pub const PARSE_CLIENTS: usize = 4;
/// Idle connections per pod to the webhook port.
pub const FLOOD_WEBHOOK: usize = 1100;
/// Idle connections per pod to the probe port.
pub const FLOOD_PROBES: usize = 200;
/// Foreign labelled Services, and as many Deployments.
pub const FOREIGN: usize = 150;
/// Large MyApps.
pub const LARGE: usize = 3;
/// MyApps made before the attack and never changed: their writes must stay 0.
pub const STILL: usize = 5;
/// The host addresses the attackers' sockets are bound to: the parse-cost clients', the flood's.
pub const ATTACKERS: [&str; 2] = ["10.255.0.66", "10.255.0.67"];
/// The size of a parse-cost body: 3.2 MiB, under the server's 3.25 MiB body limit.
pub const PARSE_BODY: usize = 3_355_443;
/// Items of a padded parse-cost body: just under the 20,000 the server parses.
pub const PADDED_ITEMS: usize = 19_900;
/// The webhook's serving-cert Secret in the operator's namespace.
const CERT_SECRET: &str = "myapp-operator-webhook-cert";
/// The name the serving certificate carries (the webhook Service's DNS name).
const CERT_NAME: &str = "myapp-operator-webhook.myapp-system.svc";
pub(crate) const WEBHOOK_PORT: u16 = 9443;
pub(crate) const PROBE_PORT: u16 = 8081;

/// Which attacks a run makes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Attacks {
    /// Parse-cost reviews to every pod's `/validate`.
    pub parse: bool,
    /// Idle connections to every pod's webhook and probe ports.
    pub flood: bool,
    /// Foreign objects with the operator's child labels.
    pub foreign: bool,
    /// MyApps of about 1 MiB.
    pub large: bool,
}

/// A hostile run: its attacks, for how long, and the name of its report.
#[derive(Clone, Copy, Debug)]
pub struct Hostile {
    /// The attacks.
    pub attacks: Attacks,
    /// How long they run.
    pub seconds: u64,
    /// Names the report, `.run/chaos/<name>.json`.
    pub name: &'static str,
    /// Whether a legitimate admission p99 over its target fails the run. CI's short form reports
    /// it without failing: on CI's machine the attackers share two cores with the API server,
    /// the node and the pods, which an attacking pod on another node would not.
    pub gate_latency: bool,
}

/// CI's short form: parse cost and connection flood for 30 s.
pub const SHORT: Hostile = Hostile {
    attacks: Attacks { parse: true, flood: true, foreign: false, large: false },
    seconds: 30,
    name: "hostile-short",
    gate_latency: false,
};

/// `cargo xtask chaos --profile hostile`: every attack, for `--seconds` (default 120).
pub async fn chaos(args: &ChaosArgs) -> Result<()> {
    if args.on != On::Pods {
        bail!("--profile hostile runs against the install's pods: add --target pods");
    }
    let all = Attacks { parse: true, flood: true, foreign: true, large: true };
    let run =
        Hostile { attacks: all, seconds: args.seconds.unwrap_or(DEFAULT_SECONDS), name: "hostile", gate_latency: true };
    hostile(&args.target, run).await
}

/// Runs `run` against the install's pods (installing it first if it is not rolled out), prints
/// and writes the report, and fails when a figure misses its target.
pub async fn hostile(args: &TargetArgs, run: Hostile) -> Result<()> {
    let target = args.resolve().await?;
    if !target.local {
        bail!("the hostile profile needs the local control plane's real node (pod IPs reached from the host)");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    install::ensure(&client, &target.kubeconfig).await?;
    install::rolled_out(&client, Duration::from_secs(120)).await?;
    let replicas = replicas(&client).await?;
    let first = replicas.first().context("no operator pod")?;
    let sources = Sources::set_up(first.ip)?;
    for (r, src) in replicas.iter().flat_map(|r| sources.attackers.iter().map(move |a| (r, *a))) {
        reachable(src, SocketAddr::new(r.ip, PROBE_PORT)).await?;
    }
    let ns = format!("hostile-{:06}", (audit::now() * 1000.0) as u64 % 1_000_000);
    operator::create_namespace(&client, &ns).await?;
    let result = attack(&client, &target.kubeconfig, &replicas, &sources, &ns, run).await;
    println!("==> cleanup: namespace {ns} (the foreign objects, the large and still MyApps), addresses {ATTACKERS:?}");
    let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &DeleteParams::default()).await;
    let gone = chaos::wait::within(Duration::from_secs(120), Duration::from_millis(500), || async {
        matches!(Api::<Namespace>::all(client.clone()).get_opt(&ns).await, Ok(None)).then_some(())
    })
    .await;
    if gone.is_none() {
        println!("    namespace {ns} still terminating after 120 s");
    }
    drop(sources);
    let report = result?;
    verdict(&report)
}

/// An operator pod: its name and address.
#[derive(Clone, Debug)]
struct Replica {
    name: String,
    ip: IpAddr,
}

async fn replicas(client: &Client) -> Result<Vec<Replica>> {
    let pods = install::pods(client).await?;
    let mut out = Vec::new();
    for p in pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        let name = p.metadata.name.clone().unwrap_or_default();
        let ip =
            p.status.as_ref().and_then(|s| s.pod_ip.as_deref()).with_context(|| format!("pod {name} has no IP"))?;
        out.push(Replica { ip: ip.parse().with_context(|| format!("pod {name}'s IP {ip}"))?, name });
    }
    Ok(out)
}

/// The manager container's id of `p`.
fn manager_container(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "manager")
        .and_then(|c| c.container_id.clone())
}

/// The host's source addresses: the API server's toward the pods, and the attackers'
/// ([`ATTACKERS`]).
struct Sources {
    api: IpAddr,
    attackers: [IpAddr; 2],
    /// The addresses this run added to `lo` (and removes when dropped).
    added: Vec<String>,
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `src` of an `ip route get` answer.
fn route_source(route: &str) -> Option<IpAddr> {
    let words: Vec<&str> = route.split_whitespace().collect();
    words.windows(2).find(|w| w[0] == "src").and_then(|w| w[1].parse().ok())
}

/// The address this host (and so the API server, a process on it) reaches `pod` from.
pub(crate) fn source_toward(pod: IpAddr) -> Result<IpAddr> {
    let route = ip(&["route", "get", &pod.to_string()])?;
    route_source(&route).with_context(|| format!("no src in `ip route get {pod}`: {route}"))
}

impl Sources {
    /// Finds the API server's source toward `pod`, and puts [`ATTACKERS`] on `lo`.
    fn set_up(pod: IpAddr) -> Result<Self> {
        let api = source_toward(pod)?;
        let attackers = [ATTACKERS[0].parse()?, ATTACKERS[1].parse()?];
        if attackers.contains(&api) {
            bail!("the kernel reaches the pods from {api}, an attacker's address");
        }
        let mut sources = Sources { api, attackers, added: Vec::new() };
        let lo = ip(&["-o", "addr", "show", "dev", "lo"])?;
        for a in ATTACKERS {
            if !lo.contains(&format!(" {a}/32 ")) {
                ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
                sources.added.push(a.to_string());
            }
        }
        let after = ip(&["route", "get", &pod.to_string()])?;
        if route_source(&after) != Some(api) {
            bail!("adding {ATTACKERS:?} changed the source toward the pods: {after}");
        }
        Ok(sources)
    }
}

impl Drop for Sources {
    fn drop(&mut self) {
        for a in &self.added {
            let _ = ip(&["addr", "del", &format!("{a}/32"), "dev", "lo"]);
        }
    }
}

/// A TCP connection to `dst` from `src`.
async fn connect_from(src: IpAddr, dst: SocketAddr) -> Option<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(src, 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(dst)).await.ok()?.ok()
}

async fn reachable(src: IpAddr, dst: SocketAddr) -> Result<()> {
    match connect_from(src, dst).await {
        Some(_) => Ok(()),
        None => bail!("the host cannot reach {dst} from {src}"),
    }
}

/// What the attackers saw, counted as it happens. Flood counters are per port: `[webhook, probes]`.
#[derive(Default)]
struct Seen {
    /// Parse-cost answers by status (`none`: no answer, reset or timeout).
    parse: Mutex<BTreeMap<String, usize>>,
    open: [AtomicUsize; 2],
    open_max: [AtomicUsize; 2],
    opened: [AtomicUsize; 2],
    closed_by_server: [AtomicUsize; 2],
    refused: [AtomicUsize; 2],
}

impl Seen {
    fn answer(&self, status: Option<u16>) {
        let key = status.map_or("none".to_string(), |s| s.to_string());
        if let Ok(mut m) = self.parse.lock() {
            *m.entry(key).or_default() += 1;
        }
    }

    fn flood(&self) -> Flood {
        let n = |a: &[AtomicUsize; 2], i: usize| a[i].load(Ordering::Relaxed);
        let port = |i: usize| PortFlood {
            open_at_end: n(&self.open, i),
            open_max: n(&self.open_max, i),
            opened: n(&self.opened, i),
            closed_by_server: n(&self.closed_by_server, i),
            connect_failed: n(&self.refused, i),
        };
        Flood { webhook_9443: port(0), probes_8081: port(1) }
    }
}

/// The connection flood, per port.
#[derive(Serialize)]
struct Flood {
    webhook_9443: PortFlood,
    probes_8081: PortFlood,
}

/// What the flood's connections to one port saw.
#[derive(Serialize)]
struct PortFlood {
    open_at_end: usize,
    open_max: usize,
    opened: usize,
    closed_by_server: usize,
    connect_failed: usize,
}

/// An AdmissionReview of a MyApp whose object carries `"junk":[<items>]`.
fn review_with_junk(items: &[u8]) -> Vec<u8> {
    let prefix = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"hostile","operation":"CREATE","name":"x","namespace":"default","kind":{"group":"myapp.dev","version":"v1","kind":"MyApp"},"resource":{"group":"myapp.dev","version":"v1","resource":"myapps"},"userInfo":{"username":"hostile"},"object":{"apiVersion":"myapp.dev/v1","kind":"MyApp","metadata":{"name":"x","namespace":"default"},"spec":{"image":"nginx:1.27"},"junk":["#;
    [prefix.as_bytes(), items, b"]}}}"].concat()
}

/// The parse-cost bodies, [`PARSE_BODY`] bytes each: `[0,0,0,...]`, and [`PADDED_ITEMS`] strings.
fn parse_bodies() -> (Vec<u8>, Vec<u8>) {
    let room = PARSE_BODY - review_with_junk(b"").len();
    let mut zeros = b"0,".repeat(room.div_ceil(2));
    zeros.truncate(room);
    if zeros.last() == Some(&b',') {
        zeros.pop();
    }
    // Each string is 3 bytes beside its characters (quotes and a comma), but the last has no comma.
    let chars = room + 1 - 3 * PADDED_ITEMS;
    let mut strings = Vec::with_capacity(room);
    for i in 0..PADDED_ITEMS {
        if i > 0 {
            strings.push(b',');
        }
        strings.push(b'"');
        let n = chars / PADDED_ITEMS + usize::from(i < chars % PADDED_ITEMS);
        strings.resize(strings.len() + n, b'x');
        strings.push(b'"');
    }
    (review_with_junk(&zeros), review_with_junk(&strings))
}

type Tls = tokio_rustls::TlsConnector;

/// One parse-cost POST from `src` to `dst`: the status of the answer, if any.
pub(crate) async fn post(src: IpAddr, dst: SocketAddr, tls: &Tls, body: &[u8]) -> Option<u16> {
    let tcp = connect_from(src, dst).await?;
    let name = rustls::pki_types::ServerName::try_from(CERT_NAME).ok()?;
    let conn = tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp)).await.ok()?.ok()?;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let head = format!(
        "POST /validate HTTP/1.1\r\nHost: {CERT_NAME}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let writer = async {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(body).await;
        let _ = wr.flush().await;
    };
    let reader = async {
        let mut status = [0u8; 12];
        rd.read_exact(&mut status).await.ok()?;
        std::str::from_utf8(&status[9..12]).ok()?.parse::<u16>().ok()
    };
    let limit = Duration::from_secs(30);
    let (_, status) = tokio::join!(tokio::time::timeout(limit, writer), tokio::time::timeout(limit, reader));
    status.ok().flatten()
}

async fn parse_client(
    i: usize,
    src: IpAddr,
    dst: SocketAddr,
    tls: Tls,
    bodies: Arc<(Vec<u8>, Vec<u8>)>,
    seen: Arc<Seen>,
) {
    for n in i.. {
        let body = if n % 4 == 3 { &bodies.1 } else { &bodies.0 };
        let status = post(src, dst, &tls, body).await;
        seen.answer(status);
        if status.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// An idle connection held until the server closes it, then opened again a second later.
async fn flood_client(i: usize, src: IpAddr, dst: SocketAddr, port: usize, seen: Arc<Seen>) {
    tokio::time::sleep(Duration::from_millis(2 * i as u64)).await;
    loop {
        match connect_from(src, dst).await {
            Some(mut conn) => {
                seen.opened[port].fetch_add(1, Ordering::Relaxed);
                let now = seen.open[port].fetch_add(1, Ordering::Relaxed) + 1;
                seen.open_max[port].fetch_max(now, Ordering::Relaxed);
                let mut buf = [0u8; 512];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                seen.open[port].fetch_sub(1, Ordering::Relaxed);
                seen.closed_by_server[port].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                seen.refused[port].fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the network attacks on a runtime of their own until `deadline`: parse cost from `src[0]`,
/// the flood from `src[1]`.
fn network_attacks(
    attacks: Attacks,
    src: [IpAddr; 2],
    pods: Vec<IpAddr>,
    tls: Tls,
    seen: Arc<Seen>,
    deadline: Instant,
) -> Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let bodies = Arc::new(if attacks.parse { parse_bodies() } else { (vec![], vec![]) });
    Ok(std::thread::spawn(move || {
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for pod in pods {
                let (webhook, probes) = (SocketAddr::new(pod, WEBHOOK_PORT), SocketAddr::new(pod, PROBE_PORT));
                if attacks.flood {
                    for i in 0..FLOOD_WEBHOOK {
                        tasks.push(tokio::spawn(flood_client(i, src[1], webhook, 0, seen.clone())));
                    }
                    for i in 0..FLOOD_PROBES {
                        tasks.push(tokio::spawn(flood_client(i, src[1], probes, 1, seen.clone())));
                    }
                }
                if attacks.parse {
                    for i in 0..PARSE_CLIENTS {
                        let (tls, bodies, seen) = (tls.clone(), bodies.clone(), seen.clone());
                        tasks.push(tokio::spawn(parse_client(i, src[0], webhook, tls, bodies, seen)));
                    }
                }
            }
            tokio::time::sleep_until(deadline.into()).await;
            tasks.iter().for_each(|t| t.abort());
        });
        rt.shutdown_background();
    }))
}

/// A TLS connector that trusts the CA of the webhook Secret.
pub(crate) async fn webhook_tls(client: &Client) -> Result<Tls> {
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE).get(CERT_SECRET).await?;
    let ca = secret.data.and_then(|d| d.get("ca.crt").cloned()).context("the webhook Secret has no ca.crt")?;
    crate::tls::connector(std::str::from_utf8(&ca.0).context("the webhook Secret's ca.crt is not PEM text")?)
}

/// The labels a child of the MyApp `owner` carries.
fn child_labels(owner: &str) -> Value {
    json!({ MANAGED_BY_LABEL: MANAGED_BY, INSTANCE_LABEL: owner, "hostile.myapp.dev/foreign": "true" })
}

/// A headless Service with the operator's child labels, no owner and 8 KiB of annotation.
fn foreign_service(name: &str, owner: &str) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": child_labels(owner), "annotations": {"hostile.myapp.dev/pad": "p".repeat(8192)}},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
    }))?)
}

/// A Deployment of 0 replicas with the operator's child labels, no owner and 8 KiB of annotation.
fn foreign_deployment(name: &str, owner: &str) -> Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": child_labels(owner), "annotations": {"hostile.myapp.dev/pad": "p".repeat(8192)}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"hostile.myapp.dev/foreign": name}},
                 "template": {"metadata": {"labels": {"hostile.myapp.dev/foreign": name}},
                              "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}}}
    }))?)
}

/// A MyApp of about 1 MiB: 30 env values of 32,000 characters; `round` changes the first.
fn large_myapp(name: &str, round: usize) -> Result<MyApp> {
    let env: Vec<Value> = (0..30)
        .map(|i| {
            let fill = if i == 0 { char::from(b'a' + (round % 26) as u8) } else { 'v' };
            json!({"name": format!("LARGE_{i}"), "value": fill.to_string().repeat(32_000)})
        })
        .collect();
    Ok(chaos::fixtures::myapp(name, json!({"image": "nginx:1.27", "replicas": 1, "env": env}))?)
}

/// What the API-side attacks made.
#[derive(Default, Debug)]
struct Made {
    foreign: Vec<String>,
    large: usize,
    large_changes: usize,
    errors: Vec<String>,
}

/// The foreign objects: Services and Deployments with the operator's child labels, owned by no
/// MyApp, made 8 at a time; into `made`.
async fn foreign_objects(client: &Client, ns: &str, made: &mut Made) {
    let pp = PostParams::default();
    let (svc, dep) =
        (Api::<Service>::namespaced(client.clone(), ns), Api::<Deployment>::namespaced(client.clone(), ns));
    let results: Vec<(String, Result<()>)> = futures::stream::iter(0..2 * FOREIGN)
        .map(|i| {
            let (svc, dep, pp) = (svc.clone(), dep.clone(), pp.clone());
            async move {
                let owner = format!("still-{}", i % STILL);
                let name = format!("foreign-{i}");
                let r = if i % 2 == 0 {
                    match foreign_service(&name, &owner) {
                        Ok(s) => svc.create(&pp, &s).await.map(|_| ()).map_err(anyhow::Error::from),
                        Err(e) => Err(e),
                    }
                } else {
                    match foreign_deployment(&name, &owner) {
                        Ok(d) => dep.create(&pp, &d).await.map(|_| ()).map_err(anyhow::Error::from),
                        Err(e) => Err(e),
                    }
                };
                (name, r)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (name, r) in results {
        match r {
            Ok(()) => made.foreign.push(name),
            Err(e) => made.errors.push(format!("foreign {name}: {e}")),
        }
    }
}

/// The foreign objects and large MyApps, made through `client` (connections of their own), the
/// large ones changed every 20 s until `deadline`.
async fn api_attacks(client: Client, ns: String, attacks: Attacks, deadline: Instant) -> Made {
    let mut made = Made::default();
    let pp = PostParams::default();
    if attacks.foreign {
        foreign_objects(&client, &ns, &mut made).await;
    }
    if !attacks.large {
        return made;
    }
    let apps: Api<MyApp> = Api::namespaced(client, &ns);
    for i in 0..LARGE {
        match large_myapp(&format!("large-{i}"), 0) {
            Ok(app) => match apps.create(&pp, &app).await {
                Ok(_) => made.large += 1,
                Err(e) => made.errors.push(format!("large-{i}: {e}")),
            },
            Err(e) => made.errors.push(format!("large-{i}: {e}")),
        }
    }
    for round in 1.. {
        let next = Instant::now() + Duration::from_secs(20);
        if next >= deadline {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        let name = format!("large-{}", round % LARGE);
        let Ok(app) = large_myapp(&name, round) else { continue };
        let patch = Patch::Merge(json!({"spec": {"env": app.spec.env}}));
        match apps.patch(&name, &PatchParams::default(), &patch).await {
            Ok(_) => made.large_changes += 1,
            Err(e) => made.errors.push(format!("change of {name}: {e}")),
        }
    }
    made
}

/// The legitimate workload's calls: latencies (ms) and failures.
#[derive(Default)]
struct Legit {
    latencies: Vec<f64>,
    failures: Vec<String>,
    calls: BTreeMap<&'static str, usize>,
}

/// Creates, changes and deletes MyApps `load-<n>` in `ns` every 250 ms until `deadline`, timing
/// each call.
async fn legitimate(client: Client, ns: String, deadline: Instant) -> Legit {
    let api: Api<MyApp> = Api::namespaced(client, &ns);
    let mut legit = Legit::default();
    let mut live: Vec<String> = Vec::new();
    for n in 0usize.. {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if Instant::now() >= deadline {
            break;
        }
        let pick = live.get(n * 7 % live.len().max(1)).cloned();
        let t = Instant::now();
        let (call, result) = match pick {
            Some(name) if live.len() > 6 && n % 4 == 3 => {
                live.retain(|l| *l != name);
                ("delete", api.delete(&name, &DeleteParams::default()).await.map(|_| ()))
            }
            Some(name) if live.len() >= 4 && n % 4 != 0 => {
                let spec = if n % 2 == 0 {
                    json!({"image": if n % 8 < 4 { "nginx:1.28" } else { "nginx:1.27" }})
                } else {
                    json!({"replicas": 1 + (n % 3) as i32})
                };
                let patch = Patch::Merge(json!({ "spec": spec }));
                ("patch", api.patch(&name, &PatchParams::default(), &patch).await.map(|_| ()))
            }
            _ => {
                let name = format!("load-{n}");
                let Ok(app) = chaos::fixtures::nginx(&name, 1) else { continue };
                let r = api.create(&PostParams::default(), &app).await.map(|_| ());
                if r.is_ok() {
                    live.push(name);
                }
                ("create", r)
            }
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        *legit.calls.entry(call).or_default() += 1;
        match result {
            Ok(()) => legit.latencies.push(ms),
            Err(e) => legit.failures.push(format!("{call} after {ms:.0} ms: {e}")),
        }
    }
    legit
}

/// Creates the still MyApps in `ns` and waits until each is Ready at its generation.
async fn still_apps(client: &Client, ns: &str) -> Result<Vec<String>> {
    let api: Api<MyApp> = Api::namespaced(client.clone(), ns);
    let names: Vec<String> = (0..STILL).map(|i| format!("still-{i}")).collect();
    for n in &names {
        api.create(&PostParams::default(), &chaos::fixtures::nginx(n, 1)?).await?;
    }
    chaos::wait::poll("the still MyApps Ready", Duration::from_secs(90), Duration::from_millis(250), || async {
        let mut ready = 0;
        for n in &names {
            if api.get(n).await.is_ok_and(|a| a.ready_at_generation()) {
                ready += 1;
            }
        }
        (ready == names.len()).then_some(())
    })
    .await?;
    // Status settles (the Deployment's status, then the MyApp's) a moment after Ready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(names)
}

/// The pods, sampled every second.
#[derive(Default)]
struct Samples {
    ready: Vec<usize>,
    /// Restarts of each pod seen: (first sample, last sample).
    restarts: BTreeMap<String, (i32, i32)>,
    /// The largest RSS sampled, MiB, per pod.
    rss: BTreeMap<String, f64>,
    /// Host pid of each manager container seen, by container id.
    pids: HashMap<String, (String, u32)>,
    /// The pods at the first sample.
    initial: Vec<String>,
}

impl Samples {
    /// The host pid of `pod`'s manager container (`ctr` is asked once per container).
    fn pid(&mut self, pod: &Pod) -> Option<u32> {
        let id = manager_container(pod)?;
        if let Some((_, pid)) = self.pids.get(&id) {
            return Some(*pid);
        }
        let pid = node::container_pid(&id).ok()?;
        self.pids.insert(id, (pod.metadata.name.clone().unwrap_or_default(), pid));
        Some(pid)
    }

    async fn take(&mut self, client: &Client) {
        let Ok(pods) = install::pods(client).await else {
            self.ready.push(0);
            return;
        };
        let live: Vec<&Pod> = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        self.ready.push(live.iter().filter(|p| install::is_ready(p)).count());
        if self.initial.is_empty() {
            self.initial = live.iter().filter_map(|p| p.metadata.name.clone()).collect();
        }
        for p in live {
            let name = p.metadata.name.clone().unwrap_or_default();
            let r = install::restarts(p);
            self.restarts.entry(name.clone()).and_modify(|e| e.1 = r).or_insert((r, r));
            if let Some(mib) = self.pid(p).and_then(crate::sh::rss_mib) {
                let max = self.rss.entry(name).or_default();
                *max = max.max(mib);
            }
        }
    }
}

/// Resets every running manager's peak RSS, and takes a first sample.
async fn first_sample(client: &Client) -> Samples {
    let mut s = Samples::default();
    if let Ok(pods) = install::pods(client).await {
        for p in &pods {
            if let Some(pid) = s.pid(p) {
                crate::sh::reset_peak(pid);
            }
        }
    }
    s.take(client).await;
    s
}

/// The memory limit of the manager container in `deploy/manager/deployment.yaml`, MiB.
fn memory_limit_mib() -> Result<f64> {
    let path = paths::repo().join("deploy/manager/deployment.yaml");
    let d: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let q = d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        .as_str()
        .context("no memory limit on the manager container")?;
    mib(q).with_context(|| format!("memory limit {q}"))
}

/// A Kubernetes memory quantity in MiB (`128Mi`, `1Gi`, `134217728`, `500M`).
fn mib(q: &str) -> Option<f64> {
    let units = [("Ki", 1024.0), ("Mi", 1048576.0), ("Gi", 1073741824.0), ("k", 1e3), ("M", 1e6), ("G", 1e9)];
    let (n, factor) = units.iter().find_map(|(u, f)| q.strip_suffix(u).map(|n| (n, *f))).unwrap_or((q, 1.0));
    n.parse::<f64>().ok().map(|n| n * factor / 1048576.0)
}

/// Writes in the audit log during the run: by the operator to the still MyApps and their
/// children, to the foreign objects, and to the webhook Secret (by anyone; successful ones).
#[derive(Debug, Default)]
struct Audited {
    still: Vec<String>,
    foreign: Vec<String>,
    secret: usize,
    secret_attempts: usize,
}

fn audited(from: f64, to: f64, ns: &str, still: &[String], foreign: &[String]) -> Result<Audited> {
    let log = std::fs::read_to_string(paths::audit_log()).context("read the audit log")?;
    let user = operator::service_account_user();
    let mut a = Audited::default();
    for r in audit::parse(&log, from).into_iter().filter(|r| r.at <= to && r.is_write()) {
        let what = || format!("{} {}/{} {} ({})", r.verb, r.resource, r.name, r.subresource, r.code);
        let child = matches!(r.resource.as_str(), "myapps" | "deployments" | "services");
        if r.user == user && r.namespace == ns && child {
            if still.contains(&r.name) {
                a.still.push(what());
            } else if foreign.contains(&r.name) {
                a.foreign.push(what());
            }
        }
        if r.resource == "secrets" && r.namespace == NAMESPACE && r.name == CERT_SECRET {
            a.secret_attempts += 1;
            a.secret += usize::from(r.succeeded());
        }
    }
    Ok(a)
}

/// One figure of the report.
#[derive(Serialize)]
struct Row {
    figure: String,
    value: String,
    target: String,
    met: bool,
    /// Whether a miss fails the run (else it is reported only).
    gated: bool,
}

/// The run and its figures.
#[derive(Serialize)]
struct Report {
    name: String,
    seconds: u64,
    rows: Vec<Row>,
    detail: Detail,
}

/// What the run did and saw, beyond the judged figures.
#[derive(Serialize)]
struct Detail {
    source_addresses: SourceAddresses,
    attacks: Attacks,
    parse_cost_answers_by_status: BTreeMap<String, usize>,
    flood: Flood,
    foreign_objects_created: usize,
    operator_writes_to_foreign_objects: Vec<String>,
    large_myapps: LargeMyApps,
    attack_api_errors: Vec<String>,
    ready_samples: Vec<usize>,
    /// Each pod's restart count: (first sample, last sample).
    restarts_by_pod: BTreeMap<String, (i32, i32)>,
    rss_max_mib_by_pod: BTreeMap<String, f64>,
    memory_limit_mib: f64,
    legitimate_calls: BTreeMap<&'static str, usize>,
    legitimate_latency_ms: Stats,
    legitimate_failures: Vec<String>,
    still_writes: Vec<String>,
    load_average_at_end: String,
}

/// Where the API server's calls and the attacks came from.
#[derive(Serialize)]
struct SourceAddresses {
    api_server_to_pods: String,
    parse_cost_attacker: String,
    flood_attacker: String,
}

/// The large MyApps: created, and changes made to them.
#[derive(Debug, Serialize)]
struct LargeMyApps {
    created: usize,
    changed: usize,
}

/// The legitimate admissions' latency, ms.
#[derive(Serialize)]
struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

/// Everything a run observed, for its report.
struct Observed<'a> {
    run: Hostile,
    limit: f64,
    sources: &'a Sources,
    samples: &'a Samples,
    /// Each pod's largest RSS, MiB: sampled, or its peak (VmHWM) at the end if larger.
    rss: BTreeMap<String, f64>,
    legit: &'a Legit,
    /// The legitimate admissions' latency, ms: (p50, p99).
    latency: (f64, f64),
    made: &'a Made,
    audit: &'a Audited,
    seen: &'a Seen,
}

/// The run's first line: what attacks whom, from where.
fn announce(run: Hostile, replicas: &[Replica], sources: &Sources) {
    let a = run.attacks;
    println!(
        "==> hostile ({}): {} s against {} pods ({}); attackers {} (parse cost) and {} (flood); the API server \
         reaches the pods from {}; parse cost {}, flood {}, foreign objects {}, large MyApps {}",
        run.name,
        run.seconds,
        replicas.len(),
        replicas.iter().map(|r| format!("{} {}", r.name, r.ip)).collect::<Vec<_>>().join(", "),
        sources.attackers[0],
        sources.attackers[1],
        sources.api,
        a.parse,
        a.flood,
        a.foreign,
        a.large
    );
}

/// Runs the attacks and the workload for `run.seconds`, and judges them.
async fn attack(
    client: &Client,
    kubeconfig: &std::path::Path,
    replicas: &[Replica],
    sources: &Sources,
    ns: &str,
    run: Hostile,
) -> Result<Report> {
    let limit = memory_limit_mib()?;
    let still = still_apps(client, ns).await?;
    let tls = webhook_tls(client).await?;
    let side = cluster::client_from(kubeconfig).await?;
    let mut samples = first_sample(client).await;
    let a = run.attacks;
    announce(run, replicas, sources);
    let from = audit::now();
    let deadline = Instant::now() + Duration::from_secs(run.seconds);
    let seen = Arc::new(Seen::default());
    let pods: Vec<IpAddr> = replicas.iter().map(|r| r.ip).collect();
    let net = network_attacks(a, sources.attackers, pods, tls, seen.clone(), deadline)?;
    let objects = tokio::spawn(api_attacks(side, ns.to_string(), a, deadline));
    let load = tokio::spawn(legitimate(client.clone(), ns.to_string(), deadline));
    while Instant::now() < deadline {
        let next = Instant::now() + Duration::from_secs(1);
        samples.take(client).await;
        tokio::time::sleep_until(next.into()).await;
    }
    let to = audit::now();
    let legit = load.await?;
    let made = objects.await?;
    let _ = tokio::task::spawn_blocking(move || net.join()).await;
    samples.take(client).await;
    let peaks: BTreeMap<String, f64> =
        samples.pids.values().filter_map(|(pod, pid)| Some((pod.clone(), crate::sh::peak_mib(*pid)?))).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let audit = audited(from, to, ns, &still, &made.foreign)?;
    let observed = Observed {
        run,
        limit,
        sources,
        samples: &samples,
        rss: rss_max_by_pod(&samples, &peaks),
        legit: &legit,
        latency: crate::sh::percentiles(&legit.latencies),
        made: &made,
        audit: &audit,
        seen: &seen,
    };
    Ok(Report { name: run.name.into(), seconds: run.seconds, rows: rows(&observed), detail: detail(&observed) })
}

/// Each pod's largest RSS: the largest sampled, or its peak (VmHWM) at the end if larger.
fn rss_max_by_pod(samples: &Samples, peaks: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut rss = samples.rss.clone();
    for (pod, peak) in peaks {
        let m = rss.entry(pod.clone()).or_default();
        *m = m.max(*peak);
    }
    rss
}

/// The judged figures, each against its target.
fn rows(o: &Observed) -> Vec<Row> {
    let (s, legit, audit, run, limit) = (o.samples, o.legit, o.audit, o.run, o.limit);
    let restarts: i32 = s.restarts.values().map(|(first, last)| last - first).sum();
    let replaced = s.restarts.keys().filter(|p| !s.initial.contains(p)).count();
    let min_ready = s.ready.iter().copied().min().unwrap_or(0);
    let below = s.ready.iter().filter(|r| **r < 3).count();
    let (p50, p99) = o.latency;
    let rss_max = o.rss.values().copied().fold(0.0, f64::max);
    vec![
        Row {
            figure: "operator container restarts (restartCount delta, all pods)".into(),
            value: format!("{restarts} ({replaced} pods replaced)"),
            target: "0".into(),
            met: restarts == 0 && replaced == 0,
            gated: true,
        },
        Row {
            figure: "replicas Ready, sampled every second".into(),
            value: format!("min {min_ready} of 3; {below} of {} samples below 3", s.ready.len()),
            target: "3 of 3 at every sample".into(),
            met: below == 0 && !s.ready.is_empty(),
            gated: true,
        },
        Row {
            figure: "legitimate admissions through the API server: failures".into(),
            value: format!("{} failed of {}", legit.failures.len(), legit.failures.len() + legit.latencies.len()),
            target: "0 failed".into(),
            met: legit.failures.is_empty() && !legit.latencies.is_empty(),
            gated: true,
        },
        Row {
            figure: "legitimate admissions through the API server: latency".into(),
            value: format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
            target: "p99 < 100 ms".into(),
            met: p99 < 100.0 && !legit.latencies.is_empty(),
            gated: run.gate_latency,
        },
        Row {
            figure: "RSS of each replica, max (VmHWM)".into(),
            value: format!("{rss_max:.1} MiB ({:.0} % of {limit:.0} MiB)", 100.0 * rss_max / limit),
            target: format!("< 75 % ({:.0} MiB)", 0.75 * limit),
            met: rss_max > 0.0 && rss_max < 0.75 * limit,
            gated: true,
        },
        Row {
            figure: "operator writes to unchanged MyApps and their children".into(),
            value: audit.still.len().to_string(),
            target: "0".into(),
            met: audit.still.is_empty(),
            gated: true,
        },
        Row {
            figure: "writes of the webhook serving-cert Secret".into(),
            value: format!("{} ({} attempted)", audit.secret, audit.secret_attempts),
            target: "≤ 2".into(),
            met: audit.secret <= 2,
            gated: true,
        },
    ]
}

/// What the run did and saw, beyond the judged figures.
fn detail(o: &Observed) -> Detail {
    let (s, legit, made, audit, sources) = (o.samples, o.legit, o.made, o.audit, o.sources);
    let (p50, p99) = o.latency;
    Detail {
        source_addresses: SourceAddresses {
            api_server_to_pods: sources.api.to_string(),
            parse_cost_attacker: sources.attackers[0].to_string(),
            flood_attacker: sources.attackers[1].to_string(),
        },
        attacks: o.run.attacks,
        parse_cost_answers_by_status: o.seen.parse.lock().map(|m| m.clone()).unwrap_or_default(),
        flood: o.seen.flood(),
        foreign_objects_created: made.foreign.len(),
        operator_writes_to_foreign_objects: audit.foreign.clone(),
        large_myapps: LargeMyApps { created: made.large, changed: made.large_changes },
        attack_api_errors: made.errors.iter().take(20).cloned().collect(),
        ready_samples: s.ready.clone(),
        restarts_by_pod: s.restarts.clone(),
        rss_max_mib_by_pod: o.rss.clone(),
        memory_limit_mib: o.limit,
        legitimate_calls: legit.calls.clone(),
        legitimate_latency_ms: Stats { p50, p99, max: legit.latencies.iter().copied().fold(0.0, f64::max) },
        legitimate_failures: legit.failures.iter().take(20).cloned().collect(),
        still_writes: audit.still.clone(),
        load_average_at_end: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
    }
}

/// Prints the report, writes it to `.run/chaos/<name>.json`, and fails when a target is missed.
fn verdict(report: &Report) -> Result<()> {
    let dir = paths::run_dir().join("chaos");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", report.name));
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    println!("\n| figure | value | target | |\n|---|---|---|---|");
    for r in &report.rows {
        let verdict = match (r.met, r.gated) {
            (true, _) => "met",
            (false, true) => "MISSED",
            (false, false) => "missed (reported, not gated in this form)",
        };
        println!("| {} | {} | {} | {verdict} |", r.figure, r.value, r.target);
    }
    let d = &report.detail;
    fn json(v: &impl Serialize) -> String {
        serde_json::to_string(v).unwrap_or_default()
    }
    println!("\n    source addresses: {}", json(&d.source_addresses));
    println!("    parse-cost answers by status: {}", json(&d.parse_cost_answers_by_status));
    println!("    flood: {}", json(&d.flood));
    println!(
        "    foreign objects: {} created, operator writes to them {}; large MyApps: {:?}",
        d.foreign_objects_created,
        d.operator_writes_to_foreign_objects.len(),
        d.large_myapps
    );
    for f in d.legitimate_failures.iter().take(5) {
        println!("    failed admission: {f}");
    }
    for w in d.still_writes.iter().take(5) {
        println!("    write to an unchanged MyApp or child: {w}");
    }
    println!("    report: {}", path.display());
    let missed: Vec<&str> = report.rows.iter().filter(|r| !r.met && r.gated).map(|r| r.figure.as_str()).collect();
    if !missed.is_empty() {
        bail!("hostile profile: {} targets missed: {}", missed.len(), missed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use myapp_operator::webhook::limits::{JsonShape, MAX_BODY, MAX_ITEMS};

    #[test]
    fn the_parse_cost_bodies_are_3_2_mib_of_the_two_shapes() {
        let (junk, padded) = parse_bodies();
        for body in [&junk, &padded] {
            assert!(body.len() <= MAX_BODY && body.len() + 1 >= PARSE_BODY, "{} bytes", body.len());
            assert!(serde_json::from_slice::<Value>(body).is_ok(), "valid JSON");
        }
        assert!(JsonShape::of(&junk).items > 1_500_000, "millions of items");
        let items = JsonShape::of(&padded).items;
        assert!(items < MAX_ITEMS && items > MAX_ITEMS - 200, "{items} items: just under the limit");
    }

    /// The parse-cost clients against the operator's webhook server (its default limits, on
    /// loopback, with a certificate for the name the clients check): both bodies are answered,
    /// the junk one denied unparsed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_parse_cost_clients_get_the_servers_answers() {
        use myapp_operator::api::policy::Policy;
        use myapp_operator::telemetry::metrics::Metrics;
        use myapp_operator::webhook::{Shared, certs, limits::Limits, server};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bundle = certs::issue(&[CERT_NAME.into()], None, time::OffsetDateTime::now_utc()).expect("a certificate");
        let tls =
            axum_server::tls_rustls::RustlsConfig::from_pem(bundle.tls_crt.into_bytes(), bundle.tls_key.into_bytes())
                .await
                .expect("tls");
        let listener = server::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared::new(Policy::default(), Arc::new(Metrics::default()), Limits::default()));
        let running = server::Server::spawn(listener, tls, shared).expect("server");
        let connector = crate::tls::connector(&bundle.ca_crt).expect("connector");
        let (junk, padded) = parse_bodies();
        let src: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(post(src, running.addr, &connector, &junk).await, Some(200));
        assert_eq!(post(src, running.addr, &connector, &padded).await, Some(200));
        running.shutdown(Duration::from_secs(1)).await.expect("shutdown");
    }

    #[test]
    fn route_sources_and_memory_quantities() {
        let route = "10.88.0.7 dev myapp0 src 10.88.0.1 uid 0 \n    cache ";
        assert_eq!(route_source(route), Some("10.88.0.1".parse().expect("ip")));
        assert_eq!(route_source("10.88.0.7 dev myapp0"), None);
        assert_eq!(mib("128Mi"), Some(128.0));
        assert_eq!(mib("1Gi"), Some(1024.0));
        assert_eq!(mib("134217728"), Some(128.0));
        assert_eq!(mib("lots"), None);
        assert!(memory_limit_mib().is_ok_and(|m| m > 0.0));
    }

    #[test]
    fn foreign_objects_carry_the_child_labels_and_no_owner() {
        let s = foreign_service("foreign-0", "still-0").expect("service");
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(MANAGED_BY_LABEL).map(String::as_str), Some(MANAGED_BY));
        assert_eq!(labels.get(INSTANCE_LABEL).map(String::as_str), Some("still-0"));
        assert!(s.metadata.owner_references.is_none());
        let d = foreign_deployment("foreign-1", "still-1").expect("deployment");
        assert_eq!(d.spec.replicas, Some(0));
        let big = serde_json::to_vec(&large_myapp("large-0", 1).expect("myapp")).expect("json");
        assert!(big.len() > 900_000 && big.len() < 1_200_000, "{} bytes", big.len());
    }
}
