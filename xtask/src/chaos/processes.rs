//! The chaos suite against operator processes on this machine, each behind a fault proxy of its
//! own: kill, stop, partition the leader (and restart or degrade the API server) under the steady
//! workload.

use super::args::{ChaosArgs, On, Scenario, names};
use super::run::{Run, Workload, audit_since, convergence, finish, run_rounds, start_workload};
use crate::operator::{self, Replica, Setup, Target};
use crate::{cluster, paths, sh};
use anyhow::{Context, Result, bail};
use chaos::report::{Fault, LeaseTimings, Report};
use chaos::{audit, proxy::Proxy, wait};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};
use myapp_operator::api::MyApp;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
            let _ = std::fs::remove_file(sh::log_file(&paths::run_dir(), &format!("operator-{i}")));
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
            sh::runs(self.members[i].replica.pid, None).then_some((h, i))
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
            sh::signal(m.replica.pid, "CONT");
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

/// The scenarios against operator processes behind fault proxies; fails when an invariant is broken.
pub(super) async fn chaos(args: ChaosArgs) -> Result<Report> {
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
            Scenario::Kill => sh::signal(pid, "KILL"),
            Scenario::Term => sh::signal(pid, "TERM"),
            Scenario::Pause => sh::signal(pid, "STOP"),
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
                sh::signal(pid, "CONT");
            }
            Scenario::Partition => {
                tokio::time::sleep_until(healed_at.into()).await;
                self.members[i].proxy.set_partitioned(false);
            }
            Scenario::Kill | Scenario::Term => {
                let exited = || async { (!sh::runs(pid, None)).then_some(()) };
                let _ = wait::within(Duration::from_secs(15), Duration::from_millis(20), exited).await;
                self.restart(i)?;
            }
            _ => {}
        }
        Ok(())
    }
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
