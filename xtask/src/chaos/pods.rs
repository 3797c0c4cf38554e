//! `cargo xtask chaos --target pods`: the chaos suite against the operator as installed
//! (`kubectl apply -k deploy/overlays/local`, three pods on the real node, the shipped 15 s / 10 s /
//! 2 s lease timings), under the same workload and judged by the same invariants as the
//! host-process suite ([`crate::chaos::run::finish`]). Scenarios aimed at the leader pod:
//!
//! - `delete`: `kubectl delete pod` (graceful: the kubelet's SIGTERM, the Lease released);
//! - `kill`: SIGKILL of the leader container's process; the kubelet restarts the container
//!   (Chaos Mesh: `chaos-mesh/podchaos-kill-leader.yaml`, `container-kill`);
//! - `crash`: the leader's process crashes by itself, on a real fault ([`crash`]); the kubelet
//!   reports the exit and restarts the container. Like `kill`, a successor may take over at once,
//!   on that proof of death;
//! - `oom`: the kernel's OOM killer ends the leader's process: its container's memory cgroup is
//!   squeezed to what it uses, then fed admission reviews ([`oom`]); the kubelet must report
//!   `OOMKilled`. The figures count from the death;
//! - `liveness`: the probe port is blocked in the pod's network namespace, so the liveness probe
//!   fails and the kubelet restarts the container ([`liveness`]). The figures count from when the
//!   old process stopped leading (its release as the kubelet's SIGTERM arrives);
//! - `force-delete`: `kubectl delete pod --grace-period=0 --force` of the leader pod. The object
//!   goes before the kubelet stops the process, so nothing proves it dead: the successor must
//!   wait for the lease to expire (or for the old process to release it as it is stopped); the
//!   round fails on a takeover sooner than that ([`force_delete`]);
//! - `pause` (or `stop`): SIGSTOP of the leader's process for the lease and 3 s. It is alive, so
//!   the same rule holds: no takeover before expiry ([`pause`]);
//! - `partition`: iptables DROP in the pod's network namespace, both directions, to the
//!   `kubernetes` Service's address, for the duration that `chaos-mesh/networkchaos-partition-leader.yaml`
//!   gives; the scenario reads that manifest, so the two cannot drift apart;
//! - `slow-commit`: a validating webhook holds the operator's Deployment writes for longer than
//!   the fence margin, and the leader is partitioned while one is held ([`slow_commit`]); none of
//!   its writes may be committed after the successor's first Lease write;
//! - `rollout`: `kubectl rollout restart deployment/myapp-operator`: total time and the longest
//!   gap with no leader reconciling;
//! - `pdb`: every pod evicted through the Eviction API, one after another; a second eviction
//!   while a replacement is not ready must be refused by the PodDisruptionBudget.

use super::args::{ChaosArgs, Profile, Scenario, names};
use super::hostile;
use super::pod_faults::{self, Holder, follow_takeover, iptables_in, manager_pid};
use super::run::{self, Run, Workload};
use crate::install::TIMINGS;
use crate::operator::{self, NAMESPACE};
use crate::{cluster, install, paths, sh};
use ::chaos::audit::now;
use ::chaos::report::{Fault, Report};
use ::chaos::wait;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, EvictParams, LogParams, Patch, PatchParams};
use std::process::Command;
use std::time::{Duration, Instant};

/// Scenarios against pods, in the order they run.
pub const ALL: &[Scenario] = &[
    Scenario::Delete,
    Scenario::Kill,
    Scenario::Crash,
    Scenario::Oom,
    Scenario::Liveness,
    Scenario::ForceDelete,
    Scenario::Pause,
    Scenario::Partition,
    Scenario::SlowCommit,
    Scenario::Rollout,
    Scenario::Pdb,
];
/// The smoke profile's (CI's) scenarios: all but the last, the PodDisruptionBudget's.
pub const SMOKE: &[Scenario] = match ALL.split_last() {
    Some((_, all_but_pdb)) => all_but_pdb,
    None => ALL,
};

/// The partition that `chaos/chaos-mesh/networkchaos-partition-leader.yaml` describes.
#[derive(Debug, PartialEq)]
pub struct Partition {
    /// Addresses cut off (the manifest's externalTargets, placeholders filled).
    pub targets: Vec<String>,
    /// `both`, `to` or `from`.
    pub direction: String,
    /// How long.
    pub duration: Duration,
}

/// Fills the placeholders of a Chaos Mesh manifest as `chaos-mesh/leader-pod.sh` and its
/// comments do.
pub fn fill(manifest: &str, leader_pod: &str, api_ip: &str) -> String {
    manifest.replace("LEADER_POD", leader_pod).replace("KUBERNETES_API_IP", api_ip)
}

/// Parses a Chaos Mesh duration such as `30s`, `2m` or `500ms`.
fn chaos_duration(s: &str) -> Option<Duration> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(sec) = s.strip_suffix('s') {
        return sec.parse().ok().map(Duration::from_secs_f64);
    }
    s.strip_suffix('m').and_then(|m| m.parse::<f64>().ok()).map(|m| Duration::from_secs_f64(m * 60.0))
}

/// The partition of the filled NetworkChaos manifest.
pub fn partition_of(filled: &str) -> Result<Partition> {
    let v: serde_yaml::Value = serde_yaml::from_str(filled)?;
    let spec = &v["spec"];
    if spec["action"].as_str() != Some("partition") {
        bail!("the NetworkChaos manifest is not a partition");
    }
    let targets: Vec<String> = spec["externalTargets"]
        .as_sequence()
        .context("externalTargets")?
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    Ok(Partition {
        targets,
        direction: spec["direction"].as_str().unwrap_or("to").to_string(),
        duration: spec["duration"].as_str().and_then(chaos_duration).context("duration")?,
    })
}

/// iptables arguments that make (or, with `-D`, remove) `p` inside a pod's network namespace.
pub fn partition_rules(p: &Partition, op: &str) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    for t in &p.targets {
        if matches!(p.direction.as_str(), "to" | "both") {
            rules.push(vec![op.into(), "OUTPUT".into(), "-d".into(), t.clone(), "-j".into(), "DROP".into()]);
        }
        if matches!(p.direction.as_str(), "from" | "both") {
            rules.push(vec![op.into(), "INPUT".into(), "-s".into(), t.clone(), "-j".into(), "DROP".into()]);
        }
    }
    rules
}

fn manifest(name: &str) -> Result<String> {
    let path = paths::repo().join("chaos/chaos-mesh").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

/// Every "first reconcile of the term" a pod logged (epoch seconds).
async fn first_reconciles(client: &Client, pod: &str) -> Vec<f64> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let text = api.logs(pod, &LogParams { container: Some("manager".into()), ..Default::default() }).await;
    operator::first_reconciles_in(&text.unwrap_or_default()).into_iter().map(|(t, _)| t).collect()
}

/// The leader, waiting up to `timeout` for one.
async fn leader(client: &Client, timeout: Duration) -> Result<(String, String)> {
    wait::poll("a leader pod", timeout, Duration::from_millis(20), || install::leader(client)).await
}

/// Runs the pod scenarios; see the module doc.
pub async fn chaos(args: &ChaosArgs, rounds: u32) -> Result<Report> {
    let target = args.target.resolve().await?;
    if !target.local {
        bail!("--target pods needs the local control plane's real node (the image is imported there)");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    let default = if args.profile == Profile::Smoke { SMOKE } else { ALL };
    let scenarios: Vec<Scenario> = args.scenarios.clone().unwrap_or_else(|| default.to_vec());
    if let Some(s) = scenarios.iter().find(|s| !ALL.contains(s)) {
        bail!("unknown pod scenario {:?}; known: {:?}", s.to_string(), names(ALL));
    }
    install::ensure(&client, &target.kubeconfig).await?;
    let started_at = now();
    println!(
        "==> chaos against pods ({}): the install of {}, lease {}s/{}s/{}s, scenarios {:?} × {rounds}",
        args.profile,
        install::OVERLAY,
        TIMINGS.duration,
        TIMINGS.renew_deadline,
        TIMINGS.retry_period,
        names(&scenarios)
    );
    let (ns, load) = run::start_workload(&client, "chaos-pods").await?;
    let (faults, result) =
        run::run_rounds(&scenarios, rounds, async |scenario, round| inject(&client, scenario, round, &load, &ns).await)
            .await;
    // What a terminating replica's webhook drain has to outlast (README, "Shutdown").
    if let Some(p) = cluster::node::programming() {
        println!("    {p}");
    }
    let run = Run { profile: format!("pods-{}", args.profile), timings: TIMINGS, replicas: 3, started_at, local: true };
    run::finish(&client, &run, &ns, load, faults, result, || {}).await
}

/// Follows the Lease (every 20 ms) until `until` is true, and returns, for every handover, the
/// time with no leader reconciling: from when the previous holder was last seen holding to its
/// successor's first reconcile of the term (from the successor's log, read at once, since a
/// rollout may delete that pod later). The old leader stops reconciling a little before it
/// releases, so this is a lower bound by those milliseconds.
/// Also returns how many handovers there were (a successor that is itself deleted before its log
/// shows its first reconcile has no gap measured) and when the first was seen (epoch seconds).
async fn reconcile_gaps(
    client: &Client,
    deadline: Instant,
    mut until: impl AsyncFnMut() -> bool,
) -> (Vec<f64>, usize, Option<f64>) {
    let mut gaps = Vec::new();
    let mut handovers = 0;
    let mut first_change = None;
    let mut current = operator::lease_holder(client).await.map(|(h, _)| h).unwrap_or_default();
    let mut last_held = now();
    while Instant::now() < deadline && !until().await {
        let h = operator::lease_holder(client).await.map(|(h, _)| h).unwrap_or_default();
        let seen = now();
        if h == current {
            if !h.is_empty() {
                last_held = seen;
            }
        } else {
            first_change = first_change.or(Some(seen));
            if let Some(pod) = install::pod_of(&h).filter(|_| !h.is_empty()) {
                handovers += 1;
                let gap = wait::within(Duration::from_secs(10), Duration::from_millis(50), || async {
                    first_reconciles(client, pod)
                        .await
                        .into_iter()
                        .find(|t| *t >= last_held - 0.5)
                        .map(|t| t - last_held)
                })
                .await;
                gaps.extend(gap);
                last_held = now();
            }
            current = h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (gaps, handovers, first_change)
}

/// What breaking the leader pod left to follow up.
#[derive(Default)]
struct Broken {
    /// What the scenario observed.
    detail: Option<String>,
    /// The longest time with no leader reconciling (a rollout).
    longest_gap: Option<f64>,
    /// A partition to remove once it has lasted its duration: the pid whose network namespace
    /// has the rules, the rules, and the duration.
    heal: Option<(u32, Vec<Vec<String>>, Duration)>,
    /// When the scenario saw the Lease change hands itself (epoch seconds).
    handed_over: Option<f64>,
    /// When the fault took hold, for one that does so some time after the injection (the
    /// kubelet's kill after failed probes, the kernel's after a squeeze, a partition once a write
    /// is held): the figures count from there.
    died_at: Option<f64>,
    /// A webhook holding the writes, to remove once the successor reconciled.
    holder: Option<Holder>,
}

async fn inject(client: &Client, scenario: Scenario, round: u32, load: &Workload, ns: &str) -> Result<Fault> {
    install::rolled_out(client, Duration::from_secs(120)).await?;
    let (old, pod) = leader(client, Duration::from_secs(60)).await?;
    let t0 = Instant::now();
    let at = now();
    let mut broken = break_leader(client, scenario, &old, &pod, ns, (t0, at)).await?;
    // The figures count from the death where it came later than the injection.
    let origin = broken.died_at.unwrap_or(at);
    // Fault -> another holder.
    let lease = Duration::from_secs_f64(TIMINGS.duration);
    let moved = || async {
        let (holder, _) = operator::lease_holder(client).await?;
        (holder != old).then(|| (t0.elapsed().as_secs_f64(), holder))
    };
    let taken = wait::until(t0 + lease * 3 + Duration::from_secs(30), Duration::from_millis(10), moved).await;
    let (seen_after, new_leader) = taken.unzip();
    let acquired = broken.handed_over.or(seen_after.map(|s| at + s)).map(|t| t - origin);
    // The holding webhook has done its part once a successor leads: left in place, it would fail
    // the successor's writes too, and their backoff would delay convergence by minutes.
    if let Some(holder) = broken.holder.take() {
        let held = release_holder(client, holder, &old).await;
        broken.detail = Some(format!("{}; {held}", broken.detail.unwrap_or_default()));
    }
    if let Some((pid, rules, duration)) = &broken.heal {
        tokio::time::sleep_until((t0 + *duration).into()).await;
        for rule in rules {
            iptables_in(*pid, rule)?;
        }
    }
    let first_reconcile = match new_leader.as_deref().and_then(install::pod_of) {
        Some(p) => {
            wait::within(Duration::from_secs(15), Duration::from_millis(100), || async {
                first_reconciles(client, p).await.into_iter().find(|t| *t >= at).map(|t| t - origin)
            })
            .await
        }
        None => None,
    };
    install::rolled_out(client, Duration::from_secs(180)).await?;
    let converged_after = run::convergence(client, ns, load, t0).await;
    Ok(Fault {
        new_leader,
        acquired_after: acquired,
        first_reconcile_after: first_reconcile,
        converged_after,
        longest_gap: broken.longest_gap,
        detail: broken.detail,
        ..Fault::new(scenario.to_string(), round, at, old)
    })
}

/// Injects `scenario` into `pod`, the leader `old`'s, at `t0` (`at` in epoch seconds), with the
/// workload in `ns`.
async fn break_leader(
    client: &Client,
    scenario: Scenario,
    old: &str,
    pod: &str,
    ns: &str,
    (t0, at): (Instant, f64),
) -> Result<Broken> {
    let mut broken = Broken::default();
    match scenario {
        Scenario::Delete => {
            Api::<Pod>::namespaced(client.clone(), NAMESPACE).delete(pod, &DeleteParams::default()).await?;
        }
        Scenario::Kill => sh::signal(manager_pid(client, pod).await?, "KILL"),
        Scenario::Crash => crash(manager_pid(client, pod).await?)?,
        Scenario::ForceDelete => broken = force_delete(client, old, pod, at).await?,
        Scenario::Pause => broken = pause(client, old, pod, at).await?,
        Scenario::Liveness => broken = liveness(client, old, pod).await?,
        Scenario::Oom => broken = oom(client, old, pod).await?,
        Scenario::SlowCommit => broken = slow_commit(client, pod, ns).await?,
        Scenario::Partition => {
            let (detail, heal) = partition(client, pod).await?;
            (broken.detail, broken.heal) = (Some(detail), Some(heal));
        }
        Scenario::Rollout => broken = rollout(client, old, t0, at).await?,
        Scenario::Pdb => broken.detail = Some(evict_all(client).await?),
        other => bail!("unknown pod scenario {other}"),
    }
    Ok(broken)
}

/// Crashes the process `pid` for real. A `kill -ABRT` (or any signal but SIGKILL and SIGSTOP) is
/// ignored by the first process of a PID namespace unless it handles that signal, and the
/// operator is that process in its container. A fault is not: gdb sets the main thread's
/// program counter to 0 and detaches, the next instruction faults, and the kernel's SIGSEGV
/// ends the process (exit code 139) as any crash would. Needs gdb on the node.
fn crash(pid: u32) -> Result<()> {
    let out = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "set $pc = 0", "-ex", "detach"])
        .output()
        .context("run gdb, which the crash scenario needs (apt-get install gdb)")?;
    if !out.status.success() {
        bail!("gdb could not crash pid {pid}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Force-deletes `pod`, the leader `old`'s, at `at` (epoch seconds), and follows the Lease until
/// someone else holds it. Nothing proves the old process dead, so the successor may take it only
/// once the old leader released it (the kubelet's SIGTERM) or its lease expired, counted from its
/// last renewal; a takeover sooner fails the round.
async fn force_delete(client: &Client, old: &str, pod: &str, at: f64) -> Result<Broken> {
    let lease = TIMINGS.duration;
    let delete = async || {
        let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
        Api::<Pod>::namespaced(client.clone(), NAMESPACE).delete(pod, &params).await.map(|_| ()).map_err(Into::into)
    };
    let t = follow_takeover(client, old, Duration::from_secs_f64(lease * 3.0), delete).await.context("force-delete")?;
    let detail = t.describe(at, lease);
    if t.early(lease) {
        bail!("force-delete: EARLY TAKEOVER while the old process may still run: {detail}");
    }
    Ok(Broken { detail: Some(format!("no early takeover: {detail}")), handed_over: Some(t.taken), ..Broken::default() })
}

/// SIGSTOP of the leader's process for the lease and 3 s, then SIGCONT. The process is alive, so
/// nothing proves it dead: the successor must wait for the lease to expire, and a takeover sooner
/// fails the round. (The liveness probe fails meanwhile; the kubelet's SIGTERM waits for the
/// SIGCONT, and the resumed process, its fence long closed, shuts down.)
async fn pause(client: &Client, old: &str, pod: &str, at: f64) -> Result<Broken> {
    let pid = manager_pid(client, pod).await?;
    let lease = TIMINGS.duration;
    let stopped_for = Duration::from_secs_f64(lease + 3.0);
    let t0 = Instant::now();
    let stop = async || {
        sh::signal(pid, "STOP");
        Ok(())
    };
    let taken = follow_takeover(client, old, Duration::from_secs_f64(lease * 3.0), stop).await;
    tokio::time::sleep_until((t0 + stopped_for).into()).await;
    sh::signal(pid, "CONT");
    let t = taken.context("stop")?;
    let detail = t.describe(at, lease);
    if t.early(lease) {
        bail!("stop: EARLY TAKEOVER of a leader that was only stopped: {detail}");
    }
    Ok(Broken {
        detail: Some(format!("no early takeover: {detail}; resumed after {:.0} s", stopped_for.as_secs_f64())),
        handed_over: Some(t.taken),
        ..Broken::default()
    })
}

/// The liveness probe fails: iptables in the pod's network namespace drops what comes to the
/// probe port, and the kubelet restarts the container after `failureThreshold` failures. The rule
/// belongs to the pod's network namespace, which outlives the container, so it is removed (through
/// the sandbox's process) as soon as the old process stopped leading.
async fn liveness(client: &Client, old: &str, pod: &str) -> Result<Broken> {
    let pid = manager_pid(client, pod).await?;
    let netns = pod_faults::netns_of(pid)?;
    let restarts = pod_faults::restarts(client, pod).await?;
    let rule = |op: &str| -> Vec<String> {
        [op, "INPUT", "-p", "tcp", "--dport", &hostile::PROBE_PORT.to_string(), "-j", "DROP"].map(String::from).to_vec()
    };
    iptables_in(pid, &rule("-I"))?;
    let blocked = now();
    let died = pod_faults::death(client, old, pid, Duration::from_secs(90)).await;
    let sandbox = pod_faults::pid_in_netns(&netns).context("no process left in the pod's network namespace")?;
    iptables_in(sandbox, &rule("-D"))?;
    let (died, how) = died?;
    let taken = pod_faults::taken_from(client, old, Duration::from_secs(60)).await?;
    let reason = pod_faults::last_termination(client, pod, restarts, Duration::from_secs(90)).await?;
    Ok(Broken {
        detail: Some(format!(
            "the kubelet stopped it {:.1} s after its probe port was blocked ({how}); last termination: {reason}",
            died - blocked
        )),
        died_at: Some(died),
        handed_over: Some(taken),
        ..Broken::default()
    })
}

/// The leader's container is OOM-killed by its memory cgroup ([`pod_faults::oom_kill`]); the
/// kubelet must report `OOMKilled`, or the round fails as not having happened.
async fn oom(client: &Client, old: &str, pod: &str) -> Result<Broken> {
    let pid = manager_pid(client, pod).await?;
    let restarts = pod_faults::restarts(client, pod).await?;
    let started = now();
    let wait = Duration::from_secs(90);
    let (lowered, died) =
        tokio::join!(pod_faults::oom_kill(client, pod, pid, wait), pod_faults::death(client, old, pid, wait));
    let (lowered, (died, how)) = (lowered?, died?);
    let taken = pod_faults::taken_from(client, old, Duration::from_secs(60)).await?;
    let reason = pod_faults::last_termination(client, pod, restarts, Duration::from_secs(90)).await?;
    if !reason.starts_with("OOMKilled") {
        bail!("oom: the container ended with {reason}, not OOMKilled");
    }
    Ok(Broken {
        detail: Some(format!(
            "killed {:.1} s after its memory limit went down to {:.1} MiB ({how}); last termination: {reason}",
            died - started,
            lowered as f64 / f64::from(1 << 20)
        )),
        died_at: Some(died),
        handed_over: Some(taken),
        ..Broken::default()
    })
}

/// The operator's Deployment writes in the workload's namespace are held by a validating webhook
/// for longer than the fence margin (the lease and 5 s). While one is held, the leader is cut off
/// the API server as in `partition`. None of its held writes may be committed after the
/// successor's first Lease write: the run's verdict judges that from the audit log
/// (`CommittedInNewTerm`). The webhook goes as soon as a successor leads.
async fn slow_commit(client: &Client, pod: &str, ns: &str) -> Result<Broken> {
    let hold = Duration::from_secs_f64(TIMINGS.duration + 5.0);
    let holder = Holder::install(client, ns, hold).await?;
    let cut = match holder.holds_one(Duration::from_secs(60)).await {
        Ok(()) => partition(client, pod).await,
        Err(e) => Err(e),
    };
    let cut_at = now();
    let (detail, heal) = match cut {
        Ok(cut) => cut,
        Err(e) => {
            holder.remove(client).await;
            return Err(e);
        }
    };
    Ok(Broken {
        detail: Some(format!("{detail}, while a write was held {:.0} s by a webhook", hold.as_secs_f64())),
        heal: Some(heal),
        holder: Some(holder),
        died_at: Some(cut_at),
        ..Broken::default()
    })
}

/// Removes the holding webhook, and says what it held: the reviews it received, and how long
/// the old leader `old`'s Deployment writes took from receipt to their end in the audit log.
async fn release_holder(client: &Client, holder: Holder, old: &str) -> String {
    let since = holder.since;
    let received = holder.remove(client).await;
    let writes: Vec<_> = run::audit_since(since)
        .into_iter()
        .filter(|r| r.resource == "deployments" && r.is_write() && r.replica.as_deref() == Some(old))
        .collect();
    let longest = writes.iter().map(|r| r.committed - r.at).fold(0.0, f64::max);
    let failed = writes.iter().filter(|r| !r.succeeded()).count();
    format!(
        "the webhook held {received} writes; the old leader's {} Deployment writes since ({failed} failed) each ended at most {longest:.2} s after receipt",
        writes.len()
    )
}

/// Cuts `pod` off the API server as the NetworkChaos manifest says; what was cut, and how to heal
/// it.
async fn partition(client: &Client, pod: &str) -> Result<(String, (u32, Vec<Vec<String>>, Duration))> {
    let api_ip = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("Service default/kubernetes has no ClusterIP")?;
    let p = partition_of(&fill(&manifest("networkchaos-partition-leader.yaml")?, pod, &api_ip))?;
    let pid = manager_pid(client, pod).await?;
    for rule in partition_rules(&p, "-I") {
        iptables_in(pid, &rule)?;
    }
    let detail = format!("{} cut off ({}) for {:?}", p.targets.join(","), p.direction, p.duration);
    Ok((detail, (pid, partition_rules(&p, "-D"), p.duration)))
}

/// `kubectl rollout restart` of the operator's Deployment at `t0` (`at` in epoch seconds), followed
/// until it finished and the old leader `old` handed over.
async fn rollout(client: &Client, old: &str, t0: Instant, at: f64) -> Result<Broken> {
    let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": format!("{at:.3}")
    }}}}});
    Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .patch(install::DEPLOYMENT, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    // Wait for the Deployment controller to start it, then for it to finish, and for the
    // old leader (whose pod may be the last one replaced, after the Deployment already
    // counts as rolled out) to have handed over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rollout_done = async || {
        install::is_rolled_out(client).await && operator::lease_holder(client).await.is_some_and(|(h, _)| h != old)
    };
    let (gaps, handovers, first_change) = reconcile_gaps(client, t0 + Duration::from_secs(300), rollout_done).await;
    let total = t0.elapsed().as_secs_f64();
    Ok(Broken {
        detail: Some(format!(
            "rollout of 3 pods took {total:.1} s, {handovers} handovers ({} with the gap measured)",
            gaps.len()
        )),
        longest_gap: gaps.iter().copied().reduce(f64::max),
        handed_over: first_change,
        ..Broken::default()
    })
}

/// Evicts every operator pod, one after another, each right after the previous one was
/// accepted: while the previous pod's replacement is not ready, the PodDisruptionBudget
/// (`maxUnavailable: 1`) must refuse it. kube's client retries a 429 by itself with backoff, so
/// a refusal shows here only as a slower success; the verdict comes from the audit log: every
/// eviction after the first must have been refused at least once before it was accepted.
async fn evict_all(client: &Client) -> Result<String> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let since = now() - 1.0;
    // Pods already terminating (the rollout's, say) are evicted without asking the budget.
    let names: Vec<String> = install::pods(client)
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect();
    for name in &names {
        wait::poll(
            &format!("eviction of {name} accepted"),
            Duration::from_secs(120),
            Duration::from_millis(100),
            || async {
                match api.evict(name, &EvictParams::default()).await {
                    Ok(_) => Some(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Some(()),
                    Err(_) => None,
                }
            },
        )
        .await?;
    }
    install::rolled_out(client, Duration::from_secs(120)).await?;
    let log = std::fs::read_to_string(paths::audit_log()).context("read the audit log")?;
    let evictions: Vec<_> = ::chaos::audit::parse(&log, since)
        .into_iter()
        .filter(|r| r.resource == "pods" && r.subresource == "eviction" && r.verb == "create")
        .collect();
    let mut refused_total = 0;
    for (i, name) in names.iter().enumerate() {
        let mine: Vec<_> = evictions.iter().filter(|r| r.name == *name).collect();
        let accepted = mine.iter().find(|r| r.code == 201).map(|r| r.at);
        let refused = mine.iter().filter(|r| r.code == 429 && accepted.is_none_or(|a| r.at < a)).count();
        refused_total += refused;
        if i > 0 && refused == 0 {
            bail!(
                "the PodDisruptionBudget let {name} go at once, while {}'s replacement could not be ready",
                names[i - 1]
            );
        }
    }
    Ok(format!(
        "{} pods evicted one after another; {refused_total} evictions refused by the PodDisruptionBudget (429) until the previous replacement was ready",
        names.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_scenario_is_the_chaos_mesh_manifest() {
        let filled =
            fill(&manifest("networkchaos-partition-leader.yaml").expect("manifest"), "myapp-operator-x-y", "10.96.0.1");
        assert!(!filled.contains("LEADER_POD") && !filled.contains("KUBERNETES_API_IP"));
        let p = partition_of(&filled).expect("partition");
        assert_eq!(p.targets, ["10.96.0.1"]);
        assert_eq!(p.direction, "both");
        assert_eq!(p.duration, Duration::from_secs(30));
        let rules = partition_rules(&p, "-I");
        assert_eq!(rules.len(), 2, "both directions");
        assert!(rules.iter().all(|r| r.last().map(String::as_str) == Some("DROP")), "dropped, not refused");
        let v: serde_yaml::Value = serde_yaml::from_str(&filled).expect("yaml");
        assert_eq!(v["spec"]["selector"]["pods"]["myapp-system"][0].as_str(), Some("myapp-operator-x-y"));
    }

    #[test]
    fn every_chaos_mesh_manifest_fills_and_targets_the_operator() {
        let deployment: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(paths::repo().join("deploy/manager/deployment.yaml")).expect("deployment"),
        )
        .expect("yaml");
        let container = deployment["spec"]["template"]["spec"]["containers"][0]["name"].as_str().expect("name");
        let dir = paths::repo().join("chaos/chaos-mesh");
        let mut checked = 0;
        for e in std::fs::read_dir(&dir).expect("chaos-mesh").flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "yaml") {
                continue;
            }
            let filled = fill(&std::fs::read_to_string(&path).expect("read"), "myapp-operator-x-y", "10.96.0.1");
            let v: serde_yaml::Value = serde_yaml::from_str(&filled).expect("yaml");
            assert_eq!(v["apiVersion"].as_str(), Some("chaos-mesh.org/v1alpha1"), "{}", path.display());
            assert_eq!(v["metadata"]["namespace"].as_str(), Some(NAMESPACE));
            if let Some(names) = v["spec"]["containerNames"].as_sequence() {
                assert!(names.iter().all(|n| n.as_str() == Some(container)), "container {container}");
            }
            checked += 1;
        }
        assert!(checked >= 3);
        let kill: serde_yaml::Value =
            serde_yaml::from_str(&fill(&manifest("podchaos-kill-leader.yaml").expect("manifest"), "p", "10.96.0.1"))
                .expect("yaml");
        assert_eq!(
            kill["spec"]["action"].as_str(),
            Some("container-kill"),
            "the `kill` scenario: SIGKILL, the kubelet restarts"
        );
    }

    #[test]
    fn the_smoke_runs_every_death_and_a_force_delete() {
        assert_eq!(ALL.last(), Some(&Scenario::Pdb));
        assert!(!SMOKE.contains(&Scenario::Pdb));
        for name in ["kill", "crash", "oom", "liveness", "force-delete", "pause", "slow-commit"] {
            let s = Scenario::named(name).expect(name);
            assert!(SMOKE.contains(&s) && ALL.contains(&s), "{name}");
            assert_eq!(s.to_string(), name);
        }
        assert!(SMOKE.iter().all(|s| ALL.contains(s)));
    }

    #[test]
    fn durations_as_chaos_mesh_writes_them() {
        assert_eq!(chaos_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(chaos_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(chaos_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(chaos_duration("soon"), None);
    }
}
