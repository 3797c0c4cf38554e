//! `cargo xtask cluster up | down | status`: the local control plane.
//!
//! Real components built from their Go modules ([`crate::cluster::gobuild`]), run as processes on
//! 127.0.0.1: Jaeger, etcd, kube-apiserver (RBAC, admission webhooks, tracing to Jaeger at
//! 1,000,000 per million, an audit log of every write), kube-controller-manager, kube-scheduler
//! and kwok with three fake nodes whose pods really become Running and Ready; one real node
//! that runs containers ([`crate::cluster::node`]), when the host can; and Prometheus
//! ([`crate::cluster::prometheus`]), which scrapes the operator's pods and evaluates its alerts.

pub mod access;
pub mod gobuild;
pub mod node;
pub mod pki;
pub mod prometheus;

use crate::{paths, sh};
use access::{arg, readyz, wait_for};
pub use access::{client_from, config_from, is_up, ports};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, Config};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Every port of the local control plane and its node, for the free-port check.
const PORTS: &[u16] = &[
    ports::ETCD,
    ports::ETCD_PEER,
    ports::APISERVER,
    ports::CONTROLLER_MANAGER,
    ports::SCHEDULER,
    ports::KWOK,
    ports::JAEGER_OTLP,
    ports::JAEGER_OTLP_HTTP,
    ports::JAEGER_QUERY,
    ports::JAEGER_HEALTH,
    ports::PROMETHEUS,
    node::ports::KUBELET_HEALTHZ,
    node::ports::PROXY_HEALTHZ,
    node::ports::PROXY_METRICS,
    node::ports::COREDNS_READY,
];

/// Start order; `down` stops in reverse.
const ORDER: &[&str] = &[
    "jaeger",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "containerd",
    "coredns",
    "kube-proxy",
    "kubelet",
    "prometheus",
];

/// Number of fake nodes.
pub const NODES: usize = 3;

async fn https_healthy(port: u16, path: &str) -> bool {
    let Ok(url) = format!("https://127.0.0.1:{port}").parse() else {
        return false;
    };
    let mut config = Config::new(url);
    config.accept_invalid_certs = true;
    let Ok(client) = Client::try_from(config) else {
        return false;
    };
    let Ok(req) = http::Request::get(path).body(Vec::new()) else {
        return false;
    };
    matches!(client.request_text(req).await, Ok(body) if body.trim() == "ok")
}

fn http_healthy(port: u16, path: &str) -> bool {
    matches!(chaos::plain_http::get(port, path), Ok((200, _)))
}

/// Assembles kwok's configuration from the Stage manifests that ship in the pinned kwok module:
/// fast node initialisation, node heartbeat with lease, and pod ready / complete / delete.
fn kwok_config(kwok_module_dir: &Path) -> Result<String> {
    let stages = [
        "kustomize/stage/node/fast/node-initialize.yaml",
        "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
        "kustomize/stage/pod/fast/pod-ready.yaml",
        "kustomize/stage/pod/fast/pod-complete.yaml",
        "kustomize/stage/pod/fast/pod-delete.yaml",
    ];
    let mut out = String::from(
        "apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions:\n  podPlayStageParallelism: 16\n  nodePlayStageParallelism: 4\n  nodeLeaseParallelism: 4\n  nodeLeaseDurationSeconds: 40\n  podsOnNodeSyncParallelism: 2\n",
    );
    for s in stages {
        let path = kwok_module_dir.join(s);
        out.push_str("---\n");
        out.push_str(&std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?);
        out.push('\n');
    }
    Ok(out)
}

/// Starts the local control plane (building what is missing) and waits until it is all ready.
pub async fn up() -> Result<()> {
    let total = Instant::now();
    let bins = Bins(gobuild::ensure_all()?);
    let run = paths::run_dir();
    if is_up().await {
        println!("==> the local control plane is already up");
        ensure_prometheus(&run, &bins).await?;
        print_usage();
        return Ok(());
    }
    // Leftovers of a previous run that died: stop them before checking ports.
    down_quiet(&run);
    if let Some(p) = PORTS.iter().find(|p| sh::port_in_use(**p)) {
        bail!("port 127.0.0.1:{p} is in use by another process; the local control plane needs it");
    }
    let started = Instant::now();
    println!("==> starting the local control plane in {}", run.display());
    let dirs = Dirs { pki: run.join("pki"), run };
    write_configuration(&dirs)?;
    let run = &dirs.run;
    start_jaeger_and_etcd(run, &bins).await?;

    let apiserver = sh::spawn(run, "kube-apiserver", &bins.get("kube-apiserver")?, &apiserver_args(run), &[])?;
    let admin = client_from(&paths::kubeconfig()).await?;
    wait_for(run, &[&apiserver], "kube-apiserver", Duration::from_secs(60), || readyz(&admin)).await?;
    let (cm, kwok) = start_controllers(&dirs, &bins).await?;

    register_nodes(&admin).await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    wait_for(run, &[&kwok], &format!("{NODES} nodes Ready"), Duration::from_secs(60), || async {
        ready_nodes(&nodes).await == NODES
    })
    .await?;
    if node::enabled() {
        let containerd = gobuild::component("containerd")?.bin_dir()?;
        let bins = node::Bins {
            containerd: &containerd,
            kubelet: &bins.get("kubelet")?,
            kube_proxy: &bins.get("kube-proxy")?,
            coredns: &bins.get("coredns")?,
            kubernetes_module: || gobuild::component("kubernetes")?.source_dir(),
        };
        node::up(run, &bins, &admin).await?;
    }
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    wait_for(run, &[&cm], "default service account", Duration::from_secs(60), || async {
        matches!(sas.get_opt("default").await, Ok(Some(_)))
    })
    .await?;
    ensure_prometheus(run, &bins).await?;
    println!(
        "==> local control plane ready: start-up {:.1} s (total including builds {:.1} s)",
        started.elapsed().as_secs_f64(),
        total.elapsed().as_secs_f64()
    );
    print_usage();
    Ok(())
}

/// The control plane's binaries, by component name.
struct Bins(HashMap<&'static str, PathBuf>);

impl Bins {
    fn get(&self, name: &str) -> Result<PathBuf> {
        self.0.get(name).cloned().with_context(|| format!("no binary {name}"))
    }
}

/// The run directory and its PKI.
struct Dirs {
    run: PathBuf,
    pki: PathBuf,
}

impl Dirs {
    /// A file of the run directory, as a flag value.
    fn run_file(&self, f: &str) -> String {
        self.run.join(f).display().to_string()
    }

    /// A file of the PKI, as a flag value.
    fn pki_file(&self, f: &str) -> String {
        self.pki.join(f).display().to_string()
    }
}

/// A fresh run directory: the PKI and kubeconfigs, the audit policy, the tracing, kwok and Jaeger
/// configurations; checks what the real node needs and says what is missing.
fn write_configuration(dirs: &Dirs) -> Result<()> {
    let run = &dirs.run;
    for d in ["etcd", "logs", "pids"] {
        let _ = std::fs::remove_dir_all(run.join(d));
    }
    std::fs::create_dir_all(run.join("logs"))?;
    pki::ensure(&dirs.pki, node::NODE_IP.parse()?)?;
    let server = format!("https://127.0.0.1:{}", ports::APISERVER);
    for c in pki::CLIENTS {
        let file = if c.file == "admin" { paths::kubeconfig() } else { run.join(format!("{}.kubeconfig", c.file)) };
        std::fs::write(file, pki::kubeconfig(&dirs.pki, &server, c.file)?)?;
    }
    std::fs::copy(paths::repo().join("cluster/audit-policy.yaml"), run.join("audit-policy.yaml"))?;
    std::fs::write(
        run.join("tracing.yaml"),
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: TracingConfiguration\nendpoint: 127.0.0.1:{}\nsamplingRatePerMillion: 1000000\n",
            ports::JAEGER_OTLP
        ),
    )?;
    std::fs::write(run.join("kwok.yaml"), kwok_config(&gobuild::component("kwok")?.source_dir()?)?)?;
    let missing = node::prepare_host()?;
    for m in &missing {
        println!("    the real node cannot run here: missing {} (fix: {})", m.what, m.fix);
    }
    std::fs::write(
        run.join("jaeger.yaml"),
        jaeger_config(&std::fs::read_to_string(paths::repo().join("cluster/jaeger.yaml"))?, node::enabled())?,
    )?;
    Ok(())
}

/// Starts Jaeger and etcd, and waits until both are healthy.
async fn start_jaeger_and_etcd(run: &Path, bins: &Bins) -> Result<()> {
    let jaeger = sh::spawn(
        run,
        "jaeger",
        &bins.get("jaeger")?,
        &[format!("--config={}", run.join("jaeger.yaml").display())],
        &[],
    )?;
    let etcd = sh::spawn(
        run,
        "etcd",
        &bins.get("etcd")?,
        &[
            arg("name", "local"),
            arg("data-dir", run.join("etcd").display()),
            arg("listen-client-urls", format!("http://127.0.0.1:{}", ports::ETCD)),
            arg("advertise-client-urls", format!("http://127.0.0.1:{}", ports::ETCD)),
            arg("listen-peer-urls", format!("http://127.0.0.1:{}", ports::ETCD_PEER)),
            arg("initial-advertise-peer-urls", format!("http://127.0.0.1:{}", ports::ETCD_PEER)),
            arg("initial-cluster", format!("local=http://127.0.0.1:{}", ports::ETCD_PEER)),
            arg("unsafe-no-fsync", true),
            arg("log-level", "warn"),
        ],
        &[],
    )?;
    wait_for(run, &[&jaeger], "jaeger", Duration::from_secs(30), || async {
        http_healthy(ports::JAEGER_HEALTH, "/status")
    })
    .await?;
    wait_for(run, &[&etcd], "etcd", Duration::from_secs(30), || async {
        matches!(chaos::plain_http::get(ports::ETCD, "/health"), Ok((200, b)) if b.contains("\"true\""))
    })
    .await
}

/// Starts kube-controller-manager, kube-scheduler and kwok, and waits until they are healthy;
/// returns the controller manager and kwok.
async fn start_controllers(dirs: &Dirs, bins: &Bins) -> Result<(sh::Proc, sh::Proc)> {
    let run = &dirs.run;
    let cm = sh::spawn(run, "kube-controller-manager", &bins.get("kube-controller-manager")?, &cm_args(dirs), &[])?;
    let scheduler = sh::spawn(
        run,
        "kube-scheduler",
        &bins.get("kube-scheduler")?,
        &[served(dirs, "scheduler.kubeconfig", ports::SCHEDULER), vec![arg("leader-elect", false)]].concat(),
        &[],
    )?;
    let kwok = sh::spawn(
        run,
        "kwok",
        &bins.get("kwok")?,
        &[
            arg("kubeconfig", dirs.run_file("kwok.kubeconfig")),
            arg("config", dirs.run_file("kwok.yaml")),
            arg("manage-all-nodes", false),
            arg("manage-nodes-with-annotation-selector", "kwok.x-k8s.io/node=fake"),
            arg("server-address", format!("127.0.0.1:{}", ports::KWOK)),
            arg("node-ip", "127.0.0.1"),
            arg("cidr", "10.244.0.0/16"),
        ],
        &[],
    )?;
    wait_for(run, &[&cm], "kube-controller-manager", Duration::from_secs(60), || {
        https_healthy(ports::CONTROLLER_MANAGER, "/healthz")
    })
    .await?;
    wait_for(run, &[&scheduler], "kube-scheduler", Duration::from_secs(60), || {
        https_healthy(ports::SCHEDULER, "/healthz")
    })
    .await?;
    wait_for(run, &[&kwok], "kwok", Duration::from_secs(60), || async { http_healthy(ports::KWOK, "/healthz") })
        .await?;
    Ok((cm, kwok))
}

/// The flags of a component that talks to the API server with `kubeconfig` (for its calls, and
/// to authenticate and authorize its own callers) and serves HTTPS on 127.0.0.1:`port`.
fn served(dirs: &Dirs, kubeconfig: &str, port: u16) -> Vec<String> {
    vec![
        arg("kubeconfig", dirs.run_file(kubeconfig)),
        arg("authentication-kubeconfig", dirs.run_file(kubeconfig)),
        arg("authorization-kubeconfig", dirs.run_file(kubeconfig)),
        arg("bind-address", "127.0.0.1"),
        arg("secure-port", port),
    ]
}

/// kube-controller-manager's flags: only the controllers the operator and the tests need.
fn cm_args(dirs: &Dirs) -> Vec<String> {
    let mut args = served(dirs, "controller-manager.kubeconfig", ports::CONTROLLER_MANAGER);
    args.extend([
        arg(
            "controllers",
            "garbage-collector-controller,deployment-controller,replicaset-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,node-lifecycle-controller,root-ca-certificate-publisher-controller,endpointslice-controller,taint-eviction-controller,disruption-controller",
        ),
        arg("use-service-account-credentials", true),
        arg("service-account-private-key-file", dirs.pki_file("sa.key")),
        arg("root-ca-file", dirs.pki_file("ca.crt")),
        arg("cluster-name", "myapp-local"),
        arg("leader-elect", false),
        arg("kube-api-qps", 200),
        arg("kube-api-burst", 400),
        arg("concurrent-deployment-syncs", 20),
        arg("concurrent-replicaset-syncs", 20),
        arg("concurrent-gc-syncs", 40),
    ]);
    args
}

/// Jaeger's configuration: `cluster/jaeger.yaml`, plus, with the real node, a second OTLP gRPC
/// receiver on the node address for the pods.
fn jaeger_config(base: &str, with_node: bool) -> Result<String> {
    if !with_node {
        return Ok(base.to_string());
    }
    let mut v: serde_yaml::Value = serde_yaml::from_str(base)?;
    v["receivers"]["otlp/node"] = serde_yaml::from_str(&format!(
        "protocols: {{grpc: {{endpoint: \"{}:{}\"}}}}",
        node::NODE_IP,
        ports::JAEGER_OTLP
    ))?;
    let receivers = v["service"]["pipelines"]["traces"]["receivers"]
        .as_sequence_mut()
        .context("cluster/jaeger.yaml: no service.pipelines.traces.receivers")?;
    receivers.push("otlp/node".into());
    Ok(serde_yaml::to_string(&v)?)
}

/// The API server's command line. With the real node it serves on every address and advertises
/// the node's, which backs the `kubernetes` Service that pods use; without it, loopback only.
fn apiserver_args(run: &Path) -> Vec<String> {
    let p = |f: &str| run.join(f).display().to_string();
    let pk = |f: &str| run.join("pki").join(f).display().to_string();
    let addresses = if node::enabled() {
        vec![arg("bind-address", "0.0.0.0"), arg("advertise-address", node::NODE_IP)]
    } else {
        // A loopback address cannot back the `kubernetes` Service endpoints; nothing needs them then.
        vec![
            arg("bind-address", "127.0.0.1"),
            arg("advertise-address", "127.0.0.1"),
            arg("endpoint-reconciler-type", "none"),
        ]
    };
    addresses
        .into_iter()
        .chain([
        arg("etcd-servers", format!("http://127.0.0.1:{}", ports::ETCD)),
        arg("secure-port", ports::APISERVER),
        arg("kubelet-client-certificate", pk("apiserver-kubelet-client.crt")),
        arg("kubelet-client-key", pk("apiserver-kubelet-client.key")),
        arg("kubelet-preferred-address-types", "InternalIP"),
        arg("tls-cert-file", pk("apiserver.crt")),
        arg("tls-private-key-file", pk("apiserver.key")),
        arg("client-ca-file", pk("ca.crt")),
        arg("service-account-key-file", pk("sa.pub")),
        arg("service-account-signing-key-file", pk("sa.key")),
        arg("service-account-issuer", "https://kubernetes.default.svc.cluster.local"),
        arg("service-cluster-ip-range", "10.96.0.0/16"),
        arg("authorization-mode", "Node,RBAC"),
        arg(
            "enable-admission-plugins",
            "NamespaceLifecycle,ServiceAccount,NodeRestriction,TaintNodesByCondition,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota",
        ),
        arg("audit-policy-file", p("audit-policy.yaml")),
        arg("audit-log-path", p("logs/audit.log")),
        arg("audit-log-format", "json"),
        arg("audit-log-mode", "blocking"),
        arg("audit-log-maxsize", 1024),
        arg("tracing-config-file", p("tracing.yaml")),
        arg("allow-privileged", true),
        arg("profiling", false),
        arg("max-requests-inflight", 1000),
        arg("max-mutating-requests-inflight", 500),
    ])
    .collect()
}

/// Restarts kube-apiserver with the same command line (the chaos suite's `apiserver-restart`)
/// and waits until it is ready again. Returns how long it was unavailable.
pub async fn restart_apiserver() -> Result<Duration> {
    restart_apiserver_with(&[]).await
}

/// Restarts kube-apiserver with `extra` flags after its usual ones (a later flag wins), e.g. lower
/// in-flight limits for the chaos suite's `throttle`; [`restart_apiserver`] puts the usual ones
/// back.
pub async fn restart_apiserver_with(extra: &[String]) -> Result<Duration> {
    let run = paths::run_dir();
    let (_, pid, bin) = sh::recorded(&run)
        .into_iter()
        .find(|(n, _, _)| n == "kube-apiserver")
        .context("kube-apiserver is not running")?;
    let started = Instant::now();
    // A hard restart: its graceful shutdown waits for long-running watches.
    sh::stop(&run, "kube-apiserver", pid, &bin, Duration::from_secs(1));
    let mut args = apiserver_args(&run);
    args.extend(extra.iter().cloned());
    let proc = sh::spawn(&run, "kube-apiserver", Path::new(&bin), &args, &[])?;
    let admin = client_from(&paths::kubeconfig()).await?;
    wait_for(&run, &[&proc], "kube-apiserver (restarted)", Duration::from_secs(60), || readyz(&admin)).await?;
    Ok(started.elapsed())
}

/// Compacts etcd's history up to its current revision (physically), so that a watch resuming
/// from an older revision gets 410 Gone; returns that revision.
pub fn compact_etcd() -> Result<u64> {
    // The gRPC gateway: any range read answers with the current revision in its header.
    let (code, body) = chaos::plain_http::post(ports::ETCD, "/v3/kv/range", r#"{"key":"AA==","limit":1}"#)?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("etcd range: {code} {body}"))?;
    let rev: u64 = v["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no revision in etcd's answer: {body}"))?;
    let (code, body) = chaos::plain_http::post(
        ports::ETCD,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{rev}","physical":true}}"#),
    )?;
    if code != 200 {
        bail!("etcd compaction at {rev}: {code} {body}");
    }
    Ok(rev)
}

/// Nodes that are Ready and carry no not-ready taint.
pub async fn ready_nodes(nodes: &Api<Node>) -> usize {
    let Ok(list) = nodes.list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key.starts_with("node.kubernetes.io/not-ready")));
            ready && !tainted
        })
        .count()
}

async fn register_nodes(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..NODES {
        let name = format!("kwok-node-{i}");
        let zone = ["zone-a", "zone-b", "zone-c"][i % 3];
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": { "kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0" },
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "topology.kubernetes.io/zone": zone,
                    "type": "kwok"
                }
            },
            "status": {
                "allocatable": { "cpu": "1000", "memory": "4Ti", "pods": "5000" },
                "capacity": { "cpu": "1000", "memory": "4Ti", "pods": "5000" }
            }
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("register node {name}")),
        }
    }
    Ok(())
}

/// Starts Prometheus unless it runs (a control plane started before it was part of it).
async fn ensure_prometheus(run: &Path, bins: &Bins) -> Result<()> {
    if !sh::running(run, crate::cluster::prometheus::NAME) {
        crate::cluster::prometheus::start(run, &bins.get("prometheus")?, false).await?;
    }
    Ok(())
}

fn print_usage() {
    let kc = paths::kubeconfig();
    let kubectl = gobuild::kubectl().map_or_else(|| "kubectl".into(), |p| p.display().to_string());
    println!("    kubeconfig:  {}", kc.display());
    println!("    use it:      export KUBECONFIG={}", kc.display());
    println!("    kubectl:     {kubectl} (v1.37, built with the control plane)");
    println!("    Jaeger UI:   http://127.0.0.1:{}/", ports::JAEGER_QUERY);
    println!("    Prometheus:  http://127.0.0.1:{}/ (API; alerts: /api/v1/alerts)", ports::PROMETHEUS);
    println!("    logs:        {}", paths::run_dir().join("logs").display());
    println!("    stop it:     cargo xtask cluster down");
}

fn down_quiet(run: &Path) -> usize {
    let recorded = sh::recorded(run);
    let mut order: HashMap<&str, usize> = ORDER.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    order.insert("", usize::MAX);
    let mut list = recorded;
    // Operator replicas and anything else first, then the control plane in reverse start order.
    list.sort_by_key(|(n, _, _)| std::cmp::Reverse(order.get(n.as_str()).copied().unwrap_or(usize::MAX)));
    let mut stopped = 0;
    for (name, pid, bin) in &list {
        if sh::runs(*pid, Some(bin)) {
            stopped += 1;
        }
        sh::stop(run, name, *pid, bin, Duration::from_secs(10));
    }
    stopped
}

/// Stops every process `up` (or the harness) recorded. The real node's pods go first, through the
/// API, so that kubelet tears their sandboxes down; then whatever containers remain; then the
/// processes; then the node's mounts, bridge, iptables rules and address.
pub async fn down() -> Result<()> {
    let run = paths::run_dir();
    let node_ran = sh::running(&run, "kubelet");
    if node_ran && let Ok(admin) = client_from(&paths::kubeconfig()).await {
        node::drain(&admin).await;
    }
    let containerd = gobuild::component("containerd").and_then(|c| c.bin_dir()).ok();
    node::cleanup_containers(containerd.as_deref());
    let n = down_quiet(&run);
    if node::enabled() {
        let kube_proxy = gobuild::component("kubernetes").and_then(|c| c.bin_dir()).ok().map(|d| d.join("kube-proxy"));
        node::cleanup_host(kube_proxy.as_deref());
    }
    let busy: Vec<u16> = PORTS.iter().copied().filter(|p| sh::port_in_use(*p)).collect();
    println!("==> stopped {n} processes; logs kept in {}", run.join("logs").display());
    if !busy.is_empty() {
        bail!("ports still in use after down: {busy:?}");
    }
    Ok(())
}

/// Prints what runs.
pub async fn status() -> Result<()> {
    let run = paths::run_dir();
    let recorded = sh::recorded(&run);
    if recorded.is_empty() {
        println!("the local control plane is not running (nothing recorded in {})", run.display());
        return Ok(());
    }
    for (name, pid, bin) in &recorded {
        let state = if sh::runs(*pid, Some(bin)) { "running" } else { "dead" };
        println!("{name:<26} pid {pid:<8} {state}");
    }
    if is_up().await {
        let client = client_from(&paths::kubeconfig()).await?;
        let nodes: Api<Node> = Api::all(client);
        println!("kube-apiserver ready; {} nodes Ready", ready_nodes(&nodes).await);
        if let Some(why) = node::why_not() {
            println!("the real node is not running: {why}");
        }
        print_usage();
    } else {
        println!("kube-apiserver is not answering");
    }
    Ok(())
}
