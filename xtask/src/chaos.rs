//! `cargo xtask chaos [--profile smoke|full]`: kill, stop, partition the leader (and restart the
//! API server) under a steady workload, then check the invariants from the audit log.
//! The ground-truth logic (audit parsing, invariants, report, fault proxy) is in the `chaos` crate.

use crate::operator::{self, Replica, TargetArgs};
use crate::{cluster, paths, procs};
use anyhow::{Context, Result, bail};
use chaos::report::{Fault, Report};
use chaos::{audit, invariants, proxy::Proxy, report};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use myapp_operator::api::MyApp;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Options of `cargo xtask chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// `smoke`: each scenario once with 4s/3s/0.5s leases; `full`: each 10 times with 15s/10s/2s.
    #[arg(long, default_value = "smoke")]
    pub profile: String,
    /// Repetitions of each scenario (overrides the profile).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Scenarios to run (default: all that the target allows).
    #[arg(long, value_delimiter = ',')]
    pub scenarios: Option<Vec<String>>,
    /// Operator replicas (host processes; the pods are the install's three).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// What to break: operator `processes` on this machine behind fault proxies, or the `pods`
    /// of the install on the real node (`kubectl apply -k deploy/overlays/local`).
    #[arg(long = "target", value_enum, default_value_t = On::Processes)]
    pub on: On,
}

impl ChaosArgs {
    /// The smoke profile against `target`, on processes or pods.
    pub fn smoke(target: TargetArgs, on: On) -> Self {
        ChaosArgs { target, profile: "smoke".into(), rounds: None, scenarios: None, replicas: 3, on }
    }
}

/// Where the replicas under test run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum On {
    /// Processes on this machine.
    Processes,
    /// The install's pods on the real node.
    Pods,
}

const ALL: &[&str] = &[
    "kill",
    "term",
    "pause",
    "partition",
    "delete-lease",
    "apiserver-restart",
    "slow-apiserver",
    "throttle",
    "watch-expiry",
];

/// Scenarios that need the local control plane (they restart or reconfigure it).
const LOCAL_ONLY: &[&str] = &["apiserver-restart", "throttle", "watch-expiry"];

/// Scenarios that degrade the API server for a while instead of removing the leader; see
/// [`degrade`].
const DEGRADED: &[&str] = &["slow-apiserver", "throttle", "watch-expiry"];

/// Scenarios that hand over gracefully: no admission may fail during them.
const GRACEFUL: &[&str] = &["term", "delete", "rollout", "pdb"];

/// Now, in seconds since the epoch.
pub fn epoch() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A replica process and the proxy between it and the API server.
struct Member {
    replica: Replica,
    proxy: Proxy,
    kubeconfig: PathBuf,
}

struct Harness {
    bin: PathBuf,
    client: Client,
    members: Vec<Member>,
    flags: Vec<String>,
    env: Vec<(&'static str, String)>,
    timings: [f64; 3],
    /// The replicas' own credentials, straight to the API server (no proxy): `throttle`'s burst
    /// comes from the same flow as the operator's requests.
    operator_kubeconfig: PathBuf,
}

impl Harness {
    async fn holder(&self) -> Option<(String, String)> {
        operator::lease_holder(&self.client).await
    }

    fn member_of(&self, identity: &str) -> Option<usize> {
        self.members.iter().position(|m| m.replica.holds(identity))
    }

    async fn leader(&self) -> Result<(String, usize)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((h, _)) = self.holder().await
                && let Some(i) = self.member_of(&h)
                && procs::runs(self.members[i].replica.pid, None)
            {
                return Ok((h, i));
            }
            if Instant::now() > deadline {
                bail!("no leader among the replicas after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        m.replica = operator::start_replica(i, &self.bin, &m.kubeconfig, &self.flags, &self.env)?;
        Ok(())
    }
}

/// The steady workload: creates, updates, scales and deletes MyApps in `ns` every 250 ms.
pub struct Workload {
    /// Times (epoch s) of requests refused because no webhook answered.
    admission_failures: Arc<Mutex<Vec<f64>>>,
    /// Set while the harness waits for convergence: the workload holds its changes.
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    deleted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the workload in `ns`.
fn workload(client: Client, ns: String) -> Workload {
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let admission_failures = Arc::new(Mutex::new(Vec::new()));
    let (p, s, d, af) = (paused.clone(), stop.clone(), deleted.clone(), admission_failures.clone());
    let task = tokio::spawn(async move {
        let api: Api<MyApp> = Api::namespaced(client, &ns);
        let mut live: Vec<String> = Vec::new();
        let mut n = 0u32;
        while !s.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if p.load(Ordering::Relaxed) {
                continue;
            }
            n += 1;
            let pick = live.get((n as usize * 7) % live.len().max(1)).cloned();
            let result = match (n % 4, pick) {
                (0, _) | (_, None) if live.len() < 8 => {
                    let name = format!("app-{n}");
                    let app: MyApp = match serde_json::from_value(serde_json::json!({
                        "apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": name},
                        "spec": {"image": "nginx:1.27", "replicas": 1}
                    })) {
                        Ok(a) => a,
                        Err(_) => continue,
                    };
                    let r = api.create(&PostParams::default(), &app).await.map(|_| ());
                    if r.is_ok() {
                        live.push(name);
                    }
                    r
                }
                (1, Some(name)) => {
                    let image = if n % 8 == 1 { "nginx:1.28" } else { "nginx:1.27" };
                    api.patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"spec": {"image": image}})),
                    )
                    .await
                    .map(|_| ())
                }
                (2, Some(name)) => {
                    let replicas = 1 + (n % 3) as i32;
                    api.patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
                    )
                    .await
                    .map(|_| ())
                }
                (_, Some(name)) if live.len() > 5 => {
                    let r = api.delete(&name, &DeleteParams::default()).await.map(|_| ());
                    // Only a delete the API server accepted counts (it may be down).
                    if r.is_ok() {
                        live.retain(|l| *l != name);
                        d.lock().await.push(name);
                    }
                    r
                }
                _ => Ok(()),
            };
            // The API server may be down (apiserver-restart): the workload just carries on. A
            // request refused because no webhook answered is an admission failure.
            if let Err(kube::Error::Api(e)) = &result
                && e.message.contains("failed calling webhook")
            {
                af.lock().await.push(epoch());
            }
        }
    });
    Workload { admission_failures, paused, stop, deleted, task }
}

/// Every MyApp in `ns` Ready at its generation, with a Deployment matching its spec.
async fn converged(client: &Client, ns: &str) -> bool {
    let apps: Api<MyApp> = Api::namespaced(client.clone(), ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let (Ok(apps), Ok(deps)) = (apps.list(&ListParams::default()).await, deps.list(&ListParams::default()).await)
    else {
        return false;
    };
    apps.items.iter().filter(|a| a.metadata.deletion_timestamp.is_none()).all(|a| {
        let child = deps.items.iter().find(|d| d.metadata.name == a.metadata.name);
        let matches = child.is_some_and(|d| {
            d.spec.replicas == Some(a.spec.replicas)
                && d.spec.template.spec.as_ref().and_then(|p| p.containers.first()).and_then(|c| c.image.as_deref())
                    == Some(a.spec.image.as_str())
        });
        a.ready_at_generation() && matches
    })
}

/// Holds the workload and waits (up to 90 s) until everything converged: seconds since `t0`, or
/// None. Lets the workload go on afterwards.
pub async fn convergence(client: &Client, ns: &str, load: &Workload, t0: Instant) -> Option<f64> {
    load.paused.store(true, Ordering::Relaxed);
    let mut converged_after = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if converged(client, ns).await {
            converged_after = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.paused.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    converged_after
}

/// The `server:` URL of a kubeconfig's text.
fn server_of(kubeconfig: &str) -> Result<&str> {
    kubeconfig.lines().find_map(|l| l.trim().strip_prefix("server: ")).context("no server in kubeconfig")
}

/// Writes a copy of the `base` kubeconfig that reaches the API server through `proxy`.
fn kubeconfig_via(base: &Path, proxy: std::net::SocketAddr, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(base)?;
    std::fs::write(out, text.replace(server_of(&text)?, &format!("https://{proxy}")))?;
    Ok(())
}

/// The API server's address in the `admin` kubeconfig.
fn upstream(admin: &Path) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let text = std::fs::read_to_string(admin)?;
    let hostport = server_of(&text)?.trim_start_matches("https://").trim_end_matches('/');
    hostport.to_socket_addrs()?.next().context("cannot resolve the API server address")
}

/// Runs the chaos suite; fails when an invariant is broken.
pub async fn chaos(args: ChaosArgs) -> Result<Report> {
    let (timings, default_rounds) = match args.profile.as_str() {
        "smoke" => ([4.0, 3.0, 0.5], 1),
        "full" => ([15.0, 10.0, 2.0], 10),
        other => bail!("unknown profile {other:?} (smoke or full)"),
    };
    let rounds = args.rounds.unwrap_or(default_rounds);
    if args.on == On::Pods {
        return crate::chaos_pods::chaos(&args, args.rounds.unwrap_or(if args.profile == "smoke" { 1 } else { 5 }))
            .await;
    }
    let target = args.target.resolve().await?;
    let scenarios: Vec<String> = args
        .scenarios
        .clone()
        .unwrap_or_else(|| ALL.iter().map(|s| s.to_string()).collect())
        .into_iter()
        .filter(|s| target.local || !LOCAL_ONLY.contains(&s.as_str()))
        .collect();
    for s in &scenarios {
        if !ALL.contains(&s.as_str()) {
            bail!("unknown scenario {s:?}; known: {ALL:?}");
        }
    }
    let bin = operator::build()?;
    let client = cluster::client_from(&target.kubeconfig).await?;
    let operator_kubeconfig = operator::prepare(&client, &target).await?;
    operator::stop_replicas();

    let run = paths::run_dir().join("chaos");
    std::fs::create_dir_all(&run)?;
    let up = upstream(&target.kubeconfig)?;
    let flags: Vec<String> = vec![
        format!("--lease-duration={}ms", (timings[0] * 1000.0) as u64),
        format!("--renew-deadline={}ms", (timings[1] * 1000.0) as u64),
        format!("--retry-period={}ms", (timings[2] * 1000.0) as u64),
    ];
    let env = operator::replica_env(&target);
    let started_at = epoch();
    let mut members = Vec::new();
    for i in 0..args.replicas {
        let proxy = Proxy::start(up).await?;
        let kubeconfig = run.join(format!("operator-{i}.kubeconfig"));
        kubeconfig_via(&operator_kubeconfig, proxy.listen, &kubeconfig)?;
        let _ = std::fs::remove_file(procs::log_file(&paths::run_dir(), &format!("operator-{i}")));
        let replica = operator::start_replica(i, &bin, &kubeconfig, &flags, &env)?;
        members.push(Member { replica, proxy, kubeconfig });
    }
    let mut h = Harness { bin, client: client.clone(), members, flags, env, timings, operator_kubeconfig };
    operator::wait_ready(&h.members.iter().map(|m| m.replica.clone()).collect::<Vec<_>>()).await?;
    println!(
        "==> chaos profile {}: {} replicas, lease {}s/{}s/{}s, scenarios {scenarios:?} × {rounds}",
        args.profile, args.replicas, timings[0], timings[1], timings[2]
    );

    let (ns, load) = start_workload(&client, "chaos").await?;

    let mut faults = Vec::new();
    let result = async {
        for scenario in &scenarios {
            for round in 1..=rounds {
                let f = inject(&mut h, scenario, round, &load, &ns).await?;
                println!("    {}", progress(&f));
                faults.push(f);
            }
        }
        anyhow::Ok(())
    }
    .await;

    let run = Run {
        profile: args.profile.clone(),
        timings: h.timings,
        replicas: args.replicas,
        started_at,
        local: target.local,
    };
    let heal = || {
        for m in &h.members {
            procs::signal(m.replica.pid, "CONT");
            m.proxy.set_partitioned(false);
        }
        operator::stop_replicas();
    };
    finish(&client, &run, &ns, load, faults, result, heal).await
}

/// What one chaos run was: for the verdict and the report.
pub struct Run {
    /// The profile, which also names the report files.
    pub profile: String,
    /// The replicas' lease timings: duration, renew deadline, retry period (seconds).
    pub timings: [f64; 3],
    /// Operator replicas.
    pub replicas: usize,
    /// When the run started (epoch seconds): the audit log is read from there.
    pub started_at: f64,
    /// The local control plane (its audit log is there to read).
    pub local: bool,
}

/// Stops the workload, waits for deleted MyApps to go, then judges the run from the audit log:
/// writes outside leadership, orphaned children, admissions that failed during graceful
/// handovers, faults that did not converge. Writes the report (JSON and SVG timeline). `heal`
/// runs once the deleted MyApps had their chance to go (the replicas must still be running until
/// then), before the namespace is deleted.
pub async fn finish(
    client: &Client,
    r: &Run,
    ns: &str,
    load: Workload,
    faults: Vec<Fault>,
    result: Result<()>,
    heal: impl FnOnce(),
) -> Result<Report> {
    let ns = ns.to_string();
    let client = client.clone();
    load.stop.store(true, Ordering::Relaxed);
    let _ = load.task.await;
    // Deleted MyApps must leave nothing behind once they are gone.
    let deleted = load.deleted.lock().await.clone();
    let admission_failures = load.admission_failures.lock().await.clone();
    let apps: Api<MyApp> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut pending = 0;
        for n in &deleted {
            if matches!(apps.get_opt(n).await, Ok(Some(_))) {
                pending += 1;
            }
        }
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut orphans = Vec::new();
    for n in &deleted {
        if !matches!(apps.get_opt(n).await, Ok(None)) {
            orphans.push(format!("myapp {ns}/{n} still exists after its deletion"));
            continue;
        }
        if matches!(Api::<Deployment>::namespaced(client.clone(), &ns).get_opt(n).await, Ok(Some(_))) {
            orphans.push(format!("deployment {ns}/{n}"));
        }
        if matches!(Api::<Service>::namespaced(client.clone(), &ns).get_opt(n).await, Ok(Some(_))) {
            orphans.push(format!("service {ns}/{n}"));
        }
    }

    heal();
    let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &DeleteParams::default()).await;
    result?;

    let (intervals, violations, writes) = if r.local {
        let log = std::fs::read_to_string(paths::run_dir().join("logs/audit.log")).context("read the audit log")?;
        // A leader already in office when the run starts (the install's pods) shows its term
        // through the renewals before the start: read the Lease's history from a lease
        // duration and more before, and judge only the writes of the run.
        let history = audit::parse(&log, r.started_at - 2.0 * r.timings[0]);
        let intervals =
            invariants::leadership(&history, operator::NAMESPACE, operator::LEASE, r.timings[0], r.timings[1], epoch());
        let reqs: Vec<audit::Request> = history.into_iter().filter(|q| q.at >= r.started_at).collect();
        let violations = invariants::writes_outside(&reqs, &intervals, operator::NAMESPACE, operator::LEASE);
        let gone = invariants::writes_without_lease(&reqs, operator::NAMESPACE, operator::LEASE);
        if faults.iter().any(|f| f.scenario == "delete-lease") {
            println!("    controller writes received while the Lease did not exist: {}", gone.len());
        }
        let writes: Vec<(String, f64)> = reqs
            .iter()
            .filter(|r| invariants::is_controller_write(r))
            .filter_map(|r| r.replica.clone().map(|id| (id, r.at)))
            .collect();
        (intervals, violations, writes)
    } else {
        println!("    (no audit log on an external cluster: the leadership invariants are not checked)");
        (vec![], vec![], vec![])
    };
    let report = Report {
        profile: r.profile.clone(),
        timings: r.timings,
        replicas: r.replicas,
        summary: report::summarize(&faults, &violations, &admission_failures),
        faults,
        operator_writes: writes.len(),
        intervals,
        violations,
        orphans,
        failed_admissions: r.local.then_some(admission_failures.len()),
    };
    let run = paths::run_dir().join("chaos");
    let json = run.join(format!("{}.json", r.profile));
    let svg = run.join(format!("{}.svg", r.profile));
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(&svg, report::svg(&report, &writes))?;
    println!("\n{}", report::table(&report));
    println!("    report: {}\n    timeline: {}", json.display(), svg.display());
    for v in report.violations.iter().take(10) {
        println!("    VIOLATION: {} wrote outside its leadership at {:.3}: {}", v.replica, v.at, v.what);
    }
    if !report.violations.is_empty() {
        bail!("{} writes outside leadership", report.violations.len());
    }
    if !report.orphans.is_empty() {
        bail!("orphaned children: {:?}", report.orphans);
    }
    // While a replica is up, a graceful handover must not fail a single admission.
    let term_failures: usize =
        report.summary.iter().filter(|s| GRACEFUL.contains(&s.scenario.as_str())).map(|s| s.failed_admissions).sum();
    if term_failures > 0 {
        bail!("{term_failures} admissions failed during graceful handovers");
    }
    if report.faults.iter().any(|f| f.converged_after.is_none()) {
        bail!("some faults did not converge");
    }
    Ok(report)
}

/// Creates a namespace `<prefix>-<suffix>` and starts the workload in it (giving it 2 s to get
/// going).
pub async fn start_workload(client: &Client, prefix: &str) -> Result<(String, Workload)> {
    let ns = format!("{prefix}-{}", clock_suffix());
    let nsobj: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &nsobj).await?;
    let load = workload(client.clone(), ns.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((ns, load))
}

/// The progress line of a fault.
pub fn progress(f: &Fault) -> String {
    format!(
        "{:<18} #{}: leader {} -> {}: acquired {}, first reconcile {}, converged {}{}{}",
        f.scenario,
        f.round,
        f.old_leader.as_deref().unwrap_or("-"),
        f.new_leader.as_deref().unwrap_or("-"),
        ms(f.acquired_after),
        ms(f.first_reconcile_after),
        ms(f.converged_after),
        f.longest_gap.map_or(String::new(), |g| format!(", longest reconcile gap {:.0} ms", g * 1000.0)),
        f.detail.as_deref().map_or(String::new(), |d| format!("; {d}")),
    )
}

/// Seconds as milliseconds for the progress lines, or `-`.
fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{:.0} ms", s * 1000.0))
}

/// A suffix for the workload's namespace: the wall clock's milliseconds modulo 10⁶, so it repeats
/// only every 1000 s.
fn clock_suffix() -> String {
    format!("{:06}", (epoch() * 1000.0) as u64 % 1_000_000)
}

async fn inject(h: &mut Harness, scenario: &str, round: u32, load: &Workload, ns: &str) -> Result<Fault> {
    if DEGRADED.contains(&scenario) {
        return degrade(h, scenario, round, load, ns).await;
    }
    let (old, i) = h.leader().await?;
    let (_, old_rv) = h.holder().await.unwrap_or_default();
    let lease = Duration::from_secs_f64(h.timings[0]);
    let t0 = Instant::now();
    let at = epoch();
    let pid = h.members[i].replica.pid;
    match scenario {
        "kill" => procs::signal(pid, "KILL"),
        "term" => procs::signal(pid, "TERM"),
        "pause" => procs::signal(pid, "STOP"),
        "partition" => h.members[i].proxy.set_partitioned(true),
        "delete-lease" => {
            let leases =
                Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(h.client.clone(), operator::NAMESPACE);
            leases.delete(operator::LEASE, &DeleteParams::default()).await?;
        }
        "apiserver-restart" => {
            cluster::restart_apiserver().await?;
        }
        _ => bail!("unknown scenario {scenario}"),
    }
    // Fault → a leader holds the lease (another one, unless the API server restarted).
    let mut acquired = None;
    let mut new_leader = None;
    let deadline = t0 + lease * 4 + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some((hld, rv)) = h.holder().await {
            // A restarted API server, or a deleted Lease, may leave the same holder: a new
            // version (of a new Lease) is the sign.
            let moved =
                if matches!(scenario, "apiserver-restart" | "delete-lease") { rv != old_rv } else { hld != old };
            if moved {
                acquired = Some(t0.elapsed().as_secs_f64());
                new_leader = Some(hld);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Heal, and bring crashed or stopped replicas back.
    match scenario {
        "pause" => {
            let until = t0 + lease + Duration::from_secs(1);
            tokio::time::sleep_until(until.into()).await;
            procs::signal(pid, "CONT");
        }
        "partition" => {
            let until = t0 + lease + Duration::from_secs(1);
            tokio::time::sleep_until(until.into()).await;
            h.members[i].proxy.set_partitioned(false);
        }
        "kill" | "term" => {
            let deadline = Instant::now() + Duration::from_secs(15);
            while procs::runs(pid, None) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            h.restart(i)?;
        }
        _ => {}
    }
    // The new leader's first reconcile of its term, from its log (waiting up to a lease duration
    // and 10 s for it: a re-created Lease is led only a lease duration after its creation).
    let mut first_reconcile = None;
    if let Some(j) = new_leader.as_deref().and_then(|nl| h.member_of(nl)) {
        let deadline = Instant::now() + lease + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some((t, _)) = h.members[j].replica.first_reconciles().into_iter().find(|(t, _)| *t >= at) {
                first_reconcile = Some(t - at);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let converged_after = convergence(&h.client, ns, load, t0).await;
    Ok(Fault {
        scenario: scenario.to_string(),
        round,
        at,
        old_leader: Some(old),
        new_leader,
        acquired_after: acquired,
        first_reconcile_after: first_reconcile,
        converged_after,
        longest_gap: None,
        detail: None,
    })
}

/// The local API server's audit log from `since` (epoch seconds); empty if it cannot be read.
fn audit_since(since: f64) -> Vec<audit::Request> {
    let log = std::fs::read_to_string(paths::run_dir().join("logs/audit.log")).unwrap_or_default();
    audit::parse(&log, since)
}

/// The replicas' LISTs of Deployments since `since`: relists, after a watch was refused (410).
fn deployment_relists(since: f64) -> Vec<audit::Request> {
    audit_since(since)
        .into_iter()
        .filter(|r| r.verb == "list" && r.resource == "deployments" && r.replica.is_some())
        .collect()
}

/// How many distinct replicas made `requests`.
fn distinct_replicas(requests: &[audit::Request]) -> usize {
    requests.iter().filter_map(|r| r.replica.as_deref()).collect::<std::collections::BTreeSet<_>>().len()
}

/// The degraded API server scenarios. Each holds its fault for a while, counts the holder changes
/// during it (a leader that cannot renew steps down; the election must not flap), heals, and
/// waits for convergence:
/// - `slow-apiserver`: every replica's requests are delayed by a random lease/30 to lease/5
///   (0.5 to 3 s at 15 s leases), for two lease durations;
/// - `throttle`: the API server restarts with 4 + 2 requests in flight, and a burst of 200
///   concurrent LISTs under the operator's own identity (its APF flow) runs for two lease
///   durations; the 429s are counted from the audit log;
/// - `watch-expiry`: the API server restarts with no watch cache for Deployments, every replica
///   is cut off for half a lease duration while the workload writes, etcd is compacted, and the
///   cut heals: each replica's Deployment watch resumes from a compacted revision, gets 410 Gone
///   and relists (counted from the audit log; none means the scenario did not happen, an error).
///
/// The API server gets its usual flags back: for `throttle` as part of the heal, before
/// convergence is judged; for `watch-expiry` after it (those flags were only the setup), with time
/// to settle.
async fn degrade(h: &mut Harness, scenario: &str, round: u32, load: &Workload, ns: &str) -> Result<Fault> {
    let lease = Duration::from_secs_f64(h.timings[0]);
    let reconfigured = match scenario {
        "throttle" => vec!["--max-requests-inflight=4".to_string(), "--max-mutating-requests-inflight=2".to_string()],
        "watch-expiry" => vec!["--watch-cache-sizes=deployments.apps#0".to_string()],
        _ => vec![],
    };
    if !reconfigured.is_empty() {
        cluster::restart_apiserver_with(&reconfigured).await?;
        convergence(&h.client, ns, load, Instant::now()).await;
    }
    let (old, _) = h.leader().await?;
    let t0 = Instant::now();
    let at = epoch();
    let mut burst = Vec::new();
    match scenario {
        "slow-apiserver" => h.members.iter().for_each(|m| m.proxy.set_latency(Some((lease / 30, lease / 5)))),
        "throttle" => {
            let mut config = cluster::config_from(&h.operator_kubeconfig).await?;
            config.headers.push((http::header::USER_AGENT, http::HeaderValue::from_static("myapp-chaos-burst")));
            let client = Client::try_from(config)?;
            for _ in 0..200 {
                let api: Api<MyApp> = Api::all(client.clone());
                burst.push(tokio::spawn(async move {
                    loop {
                        let _ = api.list(&ListParams::default().limit(50)).await;
                    }
                }));
            }
        }
        "watch-expiry" => h.members.iter().for_each(|m| m.proxy.set_partitioned(true)),
        _ => bail!("unknown scenario {scenario}"),
    }
    let window = if scenario == "watch-expiry" { lease / 2 } else { lease * 2 };
    let mut holders = vec![old.clone()];
    while t0.elapsed() < window {
        if let Some((holder, _)) = h.holder().await
            && holders.last() != Some(&holder)
        {
            holders.push(holder);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut detail = vec![format!("{} holder changes during the fault", holders.len() - 1)];
    match scenario {
        "slow-apiserver" => h.members.iter().for_each(|m| m.proxy.set_latency(None)),
        "throttle" => burst.iter().for_each(|b| b.abort()),
        _ => {
            let rev = cluster::compact_etcd()?;
            h.members.iter().for_each(|m| m.proxy.set_partitioned(false));
            detail.push(format!("etcd compacted at revision {rev}"));
        }
    }
    let healed = epoch();
    // `throttle`'s flags are its fault: the usual ones are part of the heal, and convergence is
    // judged after them. `watch-expiry`'s are only its setup (the fault is the compaction), so it
    // is judged before they are restored; the restore, one more API server restart, then gets
    // time to settle before the next scenario.
    if scenario == "throttle" {
        cluster::restart_apiserver().await?;
    }
    let (new, _) = h.leader().await?;
    let converged_after = convergence(&h.client, ns, load, t0).await;
    if scenario == "watch-expiry" {
        // Every replica's Deployment watch resumes (and relists) after its own backoff: wait for
        // all of them, up to 20 s. Relists are counted before the restore below, which makes
        // every watch relist anyway.
        let until = Instant::now() + Duration::from_secs(20);
        let mut relists = deployment_relists(healed);
        while Instant::now() < until && distinct_replicas(&relists) < h.members.len() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            relists = deployment_relists(healed);
        }
        detail.push(format!("{} Deployment relists by the replicas after the heal", relists.len()));
        if relists.is_empty() {
            bail!("watch-expiry: no replica relisted Deployments after the compaction (no 410 Gone was seen)");
        }
        cluster::restart_apiserver().await?;
        let restored = Instant::now();
        match convergence(&h.client, ns, load, restored).await {
            Some(s) => detail.push(format!("settled {:.1} s after the usual flags were restored", s)),
            None => detail.push("not settled 90 s after the usual flags were restored".into()),
        }
    }
    if scenario == "throttle" {
        let refused: Vec<audit::Request> =
            audit_since(at).into_iter().filter(|r| r.code == 429 && r.at <= healed).collect();
        let ours = refused.iter().filter(|r| r.replica.is_some()).count();
        detail.push(format!("{} requests refused with 429 ({ours} of them the replicas')", refused.len()));
    }
    Ok(Fault {
        scenario: scenario.to_string(),
        round,
        at,
        old_leader: Some(old),
        new_leader: Some(new),
        acquired_after: None,
        first_reconcile_after: None,
        converged_after,
        longest_gap: None,
        detail: Some(detail.join(", ")),
    })
}
