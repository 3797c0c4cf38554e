//! `cargo xtask chaos [--profile smoke|full]`: kill, stop, partition the leader (and restart the
//! API server) under a steady workload, then check the invariants from the audit log.
//! The ground-truth logic (audit parsing, invariants, report, fault proxy) is in the `chaos` crate.

use crate::operator::{self, Replica, Setup, Target, TargetArgs};
use crate::{cluster, paths, procs};
use anyhow::{Context, Result, bail};
use chaos::report::{Fault, LeaseTimings, Report};
use chaos::{audit, invariants, proxy::Proxy, report, wait};
use clap::ValueEnum;
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
    /// `smoke`: each scenario once with 4s/3s/0.5s leases; `full`: each 10 times with 15s/10s/2s;
    /// `hostile` (with `--target pods`): every attack on the replicas at once, see `hostile.rs`.
    #[arg(long, value_enum, default_value_t = Profile::Smoke)]
    pub profile: Profile,
    /// How long the hostile profile's attacks run, in seconds (default 120).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Repetitions of each scenario (overrides the profile).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Scenarios to run (default: all that the target allows).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Option<Vec<Scenario>>,
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
        ChaosArgs { target, profile: Profile::Smoke, rounds: None, scenarios: None, replicas: 3, on, seconds: None }
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

/// How hard a run pushes: its lease timings (on processes) and its rounds.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Each scenario once, with 4s/3s/0.5s leases (CI).
    Smoke,
    /// Each scenario 10 times (5 against pods), with 15s/10s/2s leases.
    Full,
    /// Against pods: parse-cost reviews, a connection flood, foreign labelled objects and large
    /// MyApps at once, under a legitimate workload (`crate::hostile`).
    Hostile,
}

impl Profile {
    /// The replicas' lease timings on processes (the pods run the install's, [`crate::chaos_pods::TIMINGS`]).
    pub fn timings(self) -> LeaseTimings {
        match self {
            Profile::Smoke => LeaseTimings { duration: 4.0, renew_deadline: 3.0, retry_period: 0.5 },
            Profile::Full | Profile::Hostile => {
                LeaseTimings { duration: 15.0, renew_deadline: 10.0, retry_period: 2.0 }
            }
        }
    }

    /// Rounds of each scenario, unless `--rounds` says otherwise.
    pub fn rounds(self, on: On) -> u32 {
        match (self, on) {
            (Profile::Smoke | Profile::Hostile, _) => 1,
            (Profile::Full, On::Processes) => 10,
            (Profile::Full, On::Pods) => 10,
        }
    }
}

/// What a chaos round does to the leader (or to the API server under it).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// SIGKILL the leader (processes) or its container (pods); it is restarted.
    Kill,
    /// SIGTERM the leader: a graceful handover.
    Term,
    /// SIGSTOP the leader for a lease duration and 1 s (processes), or 3 s (pods).
    #[value(alias = "stop")]
    Pause,
    /// Cut the leader off the API server: its proxy black-holes (processes), iptables (pods).
    Partition,
    /// Delete the Lease.
    DeleteLease,
    /// Restart the API server (local control plane only).
    ApiserverRestart,
    /// Delay every replica's requests for two lease durations.
    SlowApiserver,
    /// Few requests in flight and a burst of LISTs (local control plane only).
    Throttle,
    /// Compact etcd under the replicas' Deployment watches (local control plane only).
    WatchExpiry,
    /// Delete the leader pod (graceful).
    Delete,
    /// `kubectl rollout restart` the operator's Deployment.
    Rollout,
    /// Evict every pod through the PodDisruptionBudget.
    Pdb,
    /// The leader's process crashes (a real fault, SIGSEGV); the kubelet restarts the container.
    Crash,
    /// Delete the leader pod with `--grace-period=0 --force`: its process runs on until the
    /// kubelet stops it, and no early takeover may happen meanwhile.
    ForceDelete,
    /// The kernel OOM-kills the leader's container (its memory cgroup squeezed).
    Oom,
    /// The leader's liveness probe fails; the kubelet restarts its container.
    Liveness,
    /// A webhook holds the leader's Deployment writes past the fence margin while it is cut off.
    SlowCommit,
}

impl Scenario {
    /// The scenarios against processes, in the order they run.
    pub const PROCESSES: &[Scenario] = &[
        Scenario::Kill,
        Scenario::Term,
        Scenario::Pause,
        Scenario::Partition,
        Scenario::DeleteLease,
        Scenario::ApiserverRestart,
        Scenario::SlowApiserver,
        Scenario::Throttle,
        Scenario::WatchExpiry,
    ];

    /// The scenario of a name (`kill`, `delete-lease`, …), as the command line and the report write it.
    pub fn named(name: &str) -> Option<Self> {
        <Self as ValueEnum>::from_str(name, false).ok()
    }

    /// Needs the local control plane (restarts or reconfigures it).
    fn local_only(self) -> bool {
        matches!(self, Scenario::ApiserverRestart | Scenario::Throttle | Scenario::WatchExpiry)
    }

    /// Degrades the API server for a while instead of removing the leader; see [`degrade`].
    fn degrades(self) -> bool {
        matches!(self, Scenario::SlowApiserver | Scenario::Throttle | Scenario::WatchExpiry)
    }

    /// Hands over gracefully: no admission may fail during it.
    fn graceful(self) -> bool {
        matches!(self, Scenario::Term | Scenario::Delete | Scenario::Rollout | Scenario::Pdb)
    }
}

/// The command line's name of a profile or scenario.
fn value_name(v: &impl ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

/// The names of `scenarios`, for the progress lines and errors.
pub fn names(scenarios: &[Scenario]) -> Vec<String> {
    scenarios.iter().map(Scenario::to_string).collect()
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
    timings: LeaseTimings,
    /// The replicas' own credentials, straight to the API server (no proxy): `throttle`'s burst
    /// comes from the same flow as the operator's requests.
    operator_kubeconfig: PathBuf,
}

impl Harness {
    /// Starts `replicas` replicas with `timings`, each behind a proxy of its own, and waits until
    /// they are ready.
    async fn start(setup: Setup, target: &Target, timings: LeaseTimings, replicas: usize) -> Result<Self> {
        let run = paths::run_dir().join("chaos");
        std::fs::create_dir_all(&run)?;
        let up = upstream(&target.kubeconfig)?;
        let flags = lease_flags(timings);
        let env = operator::replica_env(target);
        let mut members = Vec::new();
        for i in 0..replicas {
            let proxy = Proxy::start(up).await?;
            let kubeconfig = run.join(format!("operator-{i}.kubeconfig"));
            kubeconfig_via(&setup.kubeconfig, proxy.listen, &kubeconfig)?;
            let _ = std::fs::remove_file(procs::log_file(&paths::run_dir(), &format!("operator-{i}")));
            let replica = operator::start_replica(i, &setup.bin, &kubeconfig, &flags, &env)?;
            members.push(Member { replica, proxy, kubeconfig });
        }
        let Setup { bin, client, kubeconfig: operator_kubeconfig } = setup;
        let h = Harness { bin, client, members, flags, env, timings, operator_kubeconfig };
        operator::wait_ready(&h.members.iter().map(|m| m.replica.clone()).collect::<Vec<_>>()).await?;
        Ok(h)
    }

    fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.timings.duration)
    }

    async fn holder(&self) -> Option<(String, String)> {
        operator::lease_holder(&self.client).await
    }

    fn member_of(&self, identity: &str) -> Option<usize> {
        self.members.iter().position(|m| m.replica.holds(identity))
    }

    async fn leader(&self) -> Result<(String, usize)> {
        let running_leader = || async {
            let (h, _) = self.holder().await?;
            let i = self.member_of(&h)?;
            procs::runs(self.members[i].replica.pid, None).then_some((h, i))
        };
        wait::within(Duration::from_secs(60), Duration::from_millis(20), running_leader)
            .await
            .context("no leader among the replicas after 60 s")
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        m.replica = operator::start_replica(i, &self.bin, &m.kubeconfig, &self.flags, &self.env)?;
        Ok(())
    }

    /// Lets every replica run and reach the API server again, then stops them.
    fn heal(&self) {
        for m in &self.members {
            procs::signal(m.replica.pid, "CONT");
            m.proxy.set_partitioned(false);
        }
        operator::stop_replicas();
    }
}

/// The replicas' flags for `timings`.
fn lease_flags(timings: LeaseTimings) -> Vec<String> {
    vec![
        format!("--lease-duration={}ms", (timings.duration * 1000.0) as u64),
        format!("--renew-deadline={}ms", (timings.renew_deadline * 1000.0) as u64),
        format!("--retry-period={}ms", (timings.retry_period * 1000.0) as u64),
    ]
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

impl Workload {
    /// Stops the workload: the MyApps it deleted, and the times of its failed admissions.
    async fn end(self) -> (Vec<String>, Vec<f64>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let deleted = self.deleted.lock().await.clone();
        let admission_failures = self.admission_failures.lock().await.clone();
        (deleted, admission_failures)
    }
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
                    let Ok(app) = chaos::fixtures::nginx(&name, 1) else { continue };
                    let r = api.create(&PostParams::default(), &app).await.map(|_| ());
                    if r.is_ok() {
                        live.push(name);
                    }
                    r
                }
                (1 | 2, Some(name)) => {
                    // An image change, or a scale.
                    let spec = if n % 4 == 1 {
                        serde_json::json!({"image": if n % 8 == 1 { "nginx:1.28" } else { "nginx:1.27" }})
                    } else {
                        serde_json::json!({"replicas": 1 + (n % 3) as i32})
                    };
                    let patch = Patch::Merge(serde_json::json!({ "spec": spec }));
                    api.patch(&name, &PatchParams::default(), &patch).await.map(|_| ())
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
                af.lock().await.push(audit::now());
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
    let converged_after = wait::within(Duration::from_secs(90), Duration::from_millis(100), || async {
        converged(client, ns).await.then(|| t0.elapsed().as_secs_f64())
    })
    .await;
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
    if args.profile == Profile::Hostile {
        bail!("the hostile profile has a report of its own: run it through crate::hostile::chaos");
    }
    if args.on == On::Pods {
        return crate::chaos_pods::chaos(&args, args.rounds.unwrap_or(args.profile.rounds(On::Pods))).await;
    }
    let rounds = args.rounds.unwrap_or(args.profile.rounds(On::Processes));
    let timings = args.profile.timings();
    let target = args.target.resolve().await?;
    let scenarios = process_scenarios(args.scenarios.as_deref(), target.local)?;
    let setup = operator::setup(&target, false).await?;
    crate::install::make_way_for_processes(&setup.client, target.local).await?;
    let client = setup.client.clone();
    let started_at = audit::now();
    let mut h = Harness::start(setup, &target, timings, args.replicas).await?;
    println!(
        "==> chaos profile {}: {} replicas, lease {}s/{}s/{}s, scenarios {:?} × {rounds}",
        args.profile,
        args.replicas,
        timings.duration,
        timings.renew_deadline,
        timings.retry_period,
        names(&scenarios)
    );

    let (ns, load) = start_workload(&client, "chaos").await?;
    let (faults, result) =
        run_rounds(&scenarios, rounds, async |scenario, round| inject(&mut h, scenario, round, &load, &ns).await).await;
    let run =
        Run { profile: args.profile.to_string(), timings, replicas: args.replicas, started_at, local: target.local };
    finish(&client, &run, &ns, load, faults, result, || h.heal()).await
}

/// The scenarios to run against processes: those asked for (default: all), less those that need
/// the local control plane when the target is another cluster.
fn process_scenarios(asked: Option<&[Scenario]>, local: bool) -> Result<Vec<Scenario>> {
    let scenarios: Vec<Scenario> =
        asked.unwrap_or(Scenario::PROCESSES).iter().copied().filter(|s| local || !s.local_only()).collect();
    if let Some(s) = scenarios.iter().find(|s| !Scenario::PROCESSES.contains(s)) {
        bail!("unknown scenario {:?}; known: {:?}", s.to_string(), names(Scenario::PROCESSES));
    }
    Ok(scenarios)
}

/// Runs each scenario `rounds` times through `inject`, printing each fault's progress line. Stops
/// at the first error, returned beside the faults observed until then.
pub async fn run_rounds(
    scenarios: &[Scenario],
    rounds: u32,
    mut inject: impl AsyncFnMut(Scenario, u32) -> Result<Fault>,
) -> (Vec<Fault>, Result<()>) {
    let mut faults = Vec::new();
    for &scenario in scenarios {
        for round in 1..=rounds {
            match inject(scenario, round).await {
                Ok(f) => {
                    println!("    {}", progress(&f));
                    faults.push(f);
                }
                Err(e) => return (faults, Err(e)),
            }
        }
    }
    (faults, Ok(()))
}

/// What one chaos run was: for the verdict and the report.
pub struct Run {
    /// The profile, which also names the report files.
    pub profile: String,
    /// The replicas' lease timings.
    pub timings: LeaseTimings,
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
    let (deleted, admission_failures) = load.end().await;
    let orphans = orphans(client, ns, &deleted).await;
    heal();
    let _ = Api::<Namespace>::all(client.clone()).delete(ns, &DeleteParams::default()).await;
    result?;

    let (intervals, violations, writes) = if r.local {
        leadership(r, &faults)?
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
    write_report(&report, &writes)?;
    verdict(&report)?;
    Ok(report)
}

/// Deleted MyApps must leave nothing behind once they are gone: waits up to 60 s for them to go,
/// then names what is left (the MyApp itself, or its children).
async fn orphans(client: &Client, ns: &str, deleted: &[String]) -> Vec<String> {
    let apps: Api<MyApp> = Api::namespaced(client.clone(), ns);
    let all_gone = || async {
        for n in deleted {
            if matches!(apps.get_opt(n).await, Ok(Some(_))) {
                return None;
            }
        }
        Some(())
    };
    let _ = wait::within(Duration::from_secs(60), Duration::from_millis(200), all_gone).await;
    let mut orphans = Vec::new();
    for n in deleted {
        if !matches!(apps.get_opt(n).await, Ok(None)) {
            orphans.push(format!("myapp {ns}/{n} still exists after its deletion"));
            continue;
        }
        if matches!(Api::<Deployment>::namespaced(client.clone(), ns).get_opt(n).await, Ok(Some(_))) {
            orphans.push(format!("deployment {ns}/{n}"));
        }
        if matches!(Api::<Service>::namespaced(client.clone(), ns).get_opt(n).await, Ok(Some(_))) {
            orphans.push(format!("service {ns}/{n}"));
        }
    }
    orphans
}

/// From the local audit log: the operator Lease's terms around a run that began at `since`, the
/// requests since then, and the writes among them outside leadership. A leader already in office
/// at the start (the install's pods) shows its term through the renewals before it: the Lease's
/// history is read from two lease durations before, and only the run's writes are judged.
#[allow(clippy::type_complexity)] // three lists, each named where it is used
pub fn judged_since(
    since: f64,
    t: LeaseTimings,
) -> Result<(Vec<invariants::Interval>, Vec<audit::Request>, Vec<invariants::Violation>)> {
    let log = std::fs::read_to_string(paths::audit_log()).context("read the audit log")?;
    let history = audit::parse(&log, since - 2.0 * t.duration);
    let intervals = invariants::leadership(
        &history,
        operator::NAMESPACE,
        operator::LEASE,
        t.duration,
        t.renew_deadline,
        audit::now(),
    );
    let reqs: Vec<audit::Request> = history.into_iter().filter(|q| q.at >= since).collect();
    let violations = invariants::writes_outside(&reqs, &intervals, operator::NAMESPACE, operator::LEASE);
    Ok((intervals, reqs, violations))
}

/// Who led when, and the writes outside leadership, from the local audit log; with the
/// controller's writes (replica, time) for the timeline.
#[allow(clippy::type_complexity)] // three lists, each named where it is used
fn leadership(
    r: &Run,
    faults: &[Fault],
) -> Result<(Vec<invariants::Interval>, Vec<invariants::Violation>, Vec<(String, f64)>)> {
    let (intervals, reqs, violations) = judged_since(r.started_at, r.timings)?;
    let gone = invariants::writes_without_lease(&reqs, operator::NAMESPACE, operator::LEASE);
    if faults.iter().any(|f| Scenario::named(&f.scenario) == Some(Scenario::DeleteLease)) {
        println!("    controller writes received while the Lease did not exist: {}", gone.len());
    }
    let writes: Vec<(String, f64)> = reqs
        .iter()
        .filter(|r| invariants::is_controller_write(r))
        .filter_map(|r| r.replica.clone().map(|id| (id, r.at)))
        .collect();
    Ok((intervals, violations, writes))
}

/// Writes the report's JSON and SVG timeline, and prints its table and first violations.
/// The table and the violations come first, so that a failure to write the files cannot hide
/// them; the directory is made if missing (a fresh clone has no `.run/chaos/` when the pods are
/// the target, which starts no host replicas).
fn write_report(report: &Report, writes: &[(String, f64)]) -> Result<()> {
    println!("\n{}", report::table(report));
    for v in report.violations.iter().take(10) {
        let when = match v.breach {
            invariants::Breach::Outside => format!("outside its leadership at {:.3}", v.at),
            invariants::Breach::CommittedInNewTerm => {
                format!("at {:.3}, committed at {:.3}, after a successor led", v.at, v.committed)
            }
        };
        println!("    VIOLATION: {} wrote {when}: {}", v.replica, v.what);
    }
    let run = paths::run_dir().join("chaos");
    std::fs::create_dir_all(&run).with_context(|| format!("create {}", run.display()))?;
    let json = run.join(format!("{}.json", report.profile));
    let svg = run.join(format!("{}.svg", report.profile));
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("write {}", json.display()))?;
    std::fs::write(&svg, report::svg(report, writes)).with_context(|| format!("write {}", svg.display()))?;
    println!("    report: {}\n    timeline: {}", json.display(), svg.display());
    Ok(())
}

/// Fails the run on a write outside leadership, an orphan, an admission failed during a graceful
/// handover, or a fault that did not converge.
fn verdict(report: &Report) -> Result<()> {
    if !report.violations.is_empty() {
        let late = report.violations.iter().filter(|v| v.breach == invariants::Breach::CommittedInNewTerm).count();
        bail!("{} writes outside leadership ({late} of them committed after a successor led)", report.violations.len());
    }
    if !report.orphans.is_empty() {
        bail!("orphaned children: {:?}", report.orphans);
    }
    // While a replica is up, a graceful handover must not fail a single admission.
    let term_failures: usize = report
        .summary
        .iter()
        .filter(|s| Scenario::named(&s.scenario).is_some_and(Scenario::graceful))
        .map(|s| s.failed_admissions)
        .sum();
    if term_failures > 0 {
        bail!("{term_failures} admissions failed during graceful handovers");
    }
    if report.faults.iter().any(|f| f.converged_after.is_none()) {
        bail!("some faults did not converge");
    }
    Ok(())
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
    format!("{:06}", (audit::now() * 1000.0) as u64 % 1_000_000)
}

async fn inject(h: &mut Harness, scenario: Scenario, round: u32, load: &Workload, ns: &str) -> Result<Fault> {
    if scenario.degrades() {
        return degrade(h, scenario, round, load, ns).await;
    }
    let (old, i) = h.leader().await?;
    let (_, old_rv) = h.holder().await.unwrap_or_default();
    let lease = h.lease();
    let t0 = Instant::now();
    let at = audit::now();
    let pid = h.members[i].replica.pid;
    h.break_leader(scenario, i).await?;
    // Fault → a leader holds the lease (another one, unless the API server restarted).
    let hr: &Harness = h;
    let moved = || async {
        let (holder, rv) = hr.holder().await?;
        // A restarted API server, or a deleted Lease, may leave the same holder: a new
        // version (of a new Lease) is the sign.
        let moved = if matches!(scenario, Scenario::ApiserverRestart | Scenario::DeleteLease) {
            rv != old_rv
        } else {
            holder != old
        };
        moved.then(|| (t0.elapsed().as_secs_f64(), holder))
    };
    let (acquired, new_leader) =
        wait::until(t0 + lease * 4 + Duration::from_secs(20), Duration::from_millis(10), moved).await.unzip();
    h.recover(scenario, i, pid, t0).await?;
    // The new leader's first reconcile of its term, from its log (waiting up to a lease duration
    // and 10 s for it: a re-created Lease is led only a lease duration after its creation).
    let first_reconcile = match new_leader.as_deref().and_then(|nl| h.member_of(nl)) {
        Some(j) => {
            let replica = &h.members[j].replica;
            wait::within(lease + Duration::from_secs(10), Duration::from_millis(20), || async {
                replica.first_reconciles().into_iter().find(|(t, _)| *t >= at).map(|(t, _)| t - at)
            })
            .await
        }
        None => None,
    };
    let converged_after = convergence(&h.client, ns, load, t0).await;
    Ok(Fault {
        new_leader,
        acquired_after: acquired,
        first_reconcile_after: first_reconcile,
        converged_after,
        ..Fault::new(scenario.to_string(), round, at, old)
    })
}

impl Harness {
    /// Injects `scenario` into member `i`, the leader.
    async fn break_leader(&mut self, scenario: Scenario, i: usize) -> Result<()> {
        let pid = self.members[i].replica.pid;
        match scenario {
            Scenario::Kill => procs::signal(pid, "KILL"),
            Scenario::Term => procs::signal(pid, "TERM"),
            Scenario::Pause => procs::signal(pid, "STOP"),
            Scenario::Partition => self.members[i].proxy.set_partitioned(true),
            Scenario::DeleteLease => {
                let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
                    self.client.clone(),
                    operator::NAMESPACE,
                );
                leases.delete(operator::LEASE, &DeleteParams::default()).await?;
            }
            Scenario::ApiserverRestart => {
                cluster::restart_apiserver().await?;
            }
            other => bail!("unknown scenario {other}"),
        }
        Ok(())
    }

    /// Heals `scenario` in member `i` (process `pid`), injected at `t0`, and brings a crashed or
    /// stopped replica back.
    async fn recover(&mut self, scenario: Scenario, i: usize, pid: u32, t0: Instant) -> Result<()> {
        let healed_at = t0 + self.lease() + Duration::from_secs(1);
        match scenario {
            Scenario::Pause => {
                tokio::time::sleep_until(healed_at.into()).await;
                procs::signal(pid, "CONT");
            }
            Scenario::Partition => {
                tokio::time::sleep_until(healed_at.into()).await;
                self.members[i].proxy.set_partitioned(false);
            }
            Scenario::Kill | Scenario::Term => {
                let exited = || async { (!procs::runs(pid, None)).then_some(()) };
                let _ = wait::within(Duration::from_secs(15), Duration::from_millis(20), exited).await;
                self.restart(i)?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The local API server's audit log from `since` (epoch seconds); empty if it cannot be read.
pub fn audit_since(since: f64) -> Vec<audit::Request> {
    let log = std::fs::read_to_string(paths::audit_log()).unwrap_or_default();
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
async fn degrade(h: &mut Harness, scenario: Scenario, round: u32, load: &Workload, ns: &str) -> Result<Fault> {
    let lease = h.lease();
    let reconfigured = apiserver_setup(scenario);
    if !reconfigured.is_empty() {
        cluster::restart_apiserver_with(&reconfigured).await?;
        convergence(&h.client, ns, load, Instant::now()).await;
    }
    let (old, _) = h.leader().await?;
    let t0 = Instant::now();
    let at = audit::now();
    let burst = h.degrade_start(scenario).await?;
    let window = if scenario == Scenario::WatchExpiry { lease / 2 } else { lease * 2 };
    let holders = h.holders_until(t0 + window, &old).await;
    let mut detail = vec![format!("{} holder changes during the fault", holders.len() - 1)];
    detail.extend(h.degrade_heal(scenario, burst)?);
    let healed = audit::now();
    // `throttle`'s flags are its fault: the usual ones are part of the heal, and convergence is
    // judged after them. `watch-expiry`'s are only its setup (the fault is the compaction), so it
    // is judged before they are restored; the restore, one more API server restart, then gets
    // time to settle before the next scenario.
    if scenario == Scenario::Throttle {
        cluster::restart_apiserver().await?;
    }
    let (new, _) = h.leader().await?;
    let converged_after = convergence(&h.client, ns, load, t0).await;
    match scenario {
        Scenario::WatchExpiry => detail.extend(h.relisted_then_restored(healed, ns, load).await?),
        Scenario::Throttle => detail.push(throttled(at, healed)),
        _ => {}
    }
    Ok(Fault {
        new_leader: Some(new),
        converged_after,
        detail: Some(detail.join(", ")),
        ..Fault::new(scenario.to_string(), round, at, old)
    })
}

/// The API server flags a degrading scenario runs under (none: the usual ones).
fn apiserver_setup(scenario: Scenario) -> Vec<String> {
    match scenario {
        Scenario::Throttle => {
            vec!["--max-requests-inflight=4".to_string(), "--max-mutating-requests-inflight=2".to_string()]
        }
        Scenario::WatchExpiry => vec!["--watch-cache-sizes=deployments.apps#0".to_string()],
        _ => vec![],
    }
}

/// The share of the API server's 429s in the throttle window that went to the replicas.
fn throttled(at: f64, healed: f64) -> String {
    let refused: Vec<audit::Request> =
        audit_since(at).into_iter().filter(|r| r.code == 429 && r.at <= healed).collect();
    let ours = refused.iter().filter(|r| r.replica.is_some()).count();
    format!("{} requests refused with 429 ({ours} of them the replicas')", refused.len())
}

impl Harness {
    /// Starts a degrading scenario's fault; for `throttle`, returns the burst's tasks.
    async fn degrade_start(&self, scenario: Scenario) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let lease = self.lease();
        let mut burst = Vec::new();
        match scenario {
            Scenario::SlowApiserver => {
                self.members.iter().for_each(|m| m.proxy.set_latency(Some((lease / 30, lease / 5))))
            }
            Scenario::Throttle => {
                let mut config = cluster::config_from(&self.operator_kubeconfig).await?;
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
            Scenario::WatchExpiry => self.members.iter().for_each(|m| m.proxy.set_partitioned(true)),
            other => bail!("unknown scenario {other}"),
        }
        Ok(burst)
    }

    /// The Lease's holders, every 50 ms until `until`, starting with `first`, each change once.
    async fn holders_until(&self, until: Instant, first: &str) -> Vec<String> {
        let mut holders = vec![first.to_string()];
        while Instant::now() < until {
            if let Some((holder, _)) = self.holder().await
                && holders.last() != Some(&holder)
            {
                holders.push(holder);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        holders
    }

    /// Heals a degrading scenario's fault (`watch-expiry`: compacts etcd first); what it did, for
    /// the detail.
    fn degrade_heal(&self, scenario: Scenario, burst: Vec<tokio::task::JoinHandle<()>>) -> Result<Vec<String>> {
        match scenario {
            Scenario::SlowApiserver => self.members.iter().for_each(|m| m.proxy.set_latency(None)),
            Scenario::Throttle => burst.iter().for_each(|b| b.abort()),
            _ => {
                let rev = cluster::compact_etcd()?;
                self.members.iter().for_each(|m| m.proxy.set_partitioned(false));
                return Ok(vec![format!("etcd compacted at revision {rev}")]);
            }
        }
        Ok(vec![])
    }

    /// `watch-expiry` after its heal: every replica's Deployment watch resumes (and relists) after
    /// its own backoff, so waits for all of them, up to 20 s; none means the scenario did not
    /// happen, an error. Relists are counted before the API server gets its usual flags back,
    /// which makes every watch relist anyway; then it gets time to settle.
    async fn relisted_then_restored(&self, healed: f64, ns: &str, load: &Workload) -> Result<Vec<String>> {
        let all = self.members.len();
        let relists = wait::within(Duration::from_secs(20), Duration::from_millis(200), || async {
            let relists = deployment_relists(healed);
            (distinct_replicas(&relists) >= all).then_some(relists)
        })
        .await
        .unwrap_or_else(|| deployment_relists(healed));
        let mut detail = vec![format!("{} Deployment relists by the replicas after the heal", relists.len())];
        if relists.is_empty() {
            bail!("watch-expiry: no replica relisted Deployments after the compaction (no 410 Gone was seen)");
        }
        cluster::restart_apiserver().await?;
        let restored = Instant::now();
        match convergence(&self.client, ns, load, restored).await {
            Some(s) => detail.push(format!("settled {:.1} s after the usual flags were restored", s)),
            None => detail.push("not settled 90 s after the usual flags were restored".into()),
        }
        Ok(detail)
    }
}
