//! What a chaos run shares on either target: the steady workload, the rounds, and the verdict and
//! report judged from the audit log.

use super::args::Scenario;
use crate::{operator, paths};
use anyhow::{Context, Result, bail};
use chaos::report::{Fault, LeaseTimings, Report};
use chaos::{audit, invariants, report, wait};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use myapp_operator::api::MyApp;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The steady workload: creates, updates, scales and deletes MyApps in `ns` every 250 ms.
pub struct Workload {
    /// Requests refused because no webhook answered: when (epoch s), and the API server's message.
    admission_failures: Arc<Mutex<Vec<(f64, String)>>>,
    /// Set while the harness waits for convergence: the workload holds its changes.
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    deleted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    /// Stops the workload: the MyApps it deleted, and its failed admissions (when, and why).
    async fn end(self) -> (Vec<String>, Vec<(f64, String)>) {
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
                let at = audit::now();
                println!("    admission failed at {at:.3}: {}", e.message);
                af.lock().await.push((at, e.message.clone()));
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
    let (deleted, failed) = load.end().await;
    let admission_failures: Vec<f64> = failed.iter().map(|(at, _)| *at).collect();
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
    verdict(&report).map_err(|e| {
        if failed.is_empty() { e } else { e.context(format!("the failed admissions (epoch s: message): {failed:?}")) }
    })?;
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

/// Who led when, and the writes outside leadership, from the local audit log; with the
/// controller's writes (replica, time) for the timeline.
#[allow(clippy::type_complexity)] // three lists, each named where it is used
fn leadership(
    r: &Run,
    faults: &[Fault],
) -> Result<(Vec<invariants::Interval>, Vec<invariants::Violation>, Vec<(String, f64)>)> {
    let (intervals, reqs, violations) = operator::judged_since(r.started_at, r.timings)?;
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
    operator::create_namespace(client, &ns).await?;
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

/// The local API server's audit log from `since` (epoch seconds); empty if it cannot be read.
pub fn audit_since(since: f64) -> Vec<audit::Request> {
    let log = std::fs::read_to_string(paths::audit_log()).unwrap_or_default();
    audit::parse(&log, since)
}
