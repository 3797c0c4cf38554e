//! `cargo xtask alerts`: the shipped alert rules on a real Prometheus, scraping the install's
//! pods on the real node through Kubernetes service discovery, as `deploy/monitoring/prometheus.yaml`
//! configures it (only the credentials differ: the local control plane's kubeconfig instead of
//! in-cluster ones). Three checks, each timed:
//!
//! 1. every replica is a target that is up, and exactly one reports itself leader;
//! 2. a `kubectl rollout restart` (a handover per old leader) fires no alert;
//! 3. the operator scaled to 0 fires `MyAppOperatorNoLeader` in Prometheus's own rule
//!    evaluation, within its `for` plus an evaluation and a scrape interval; scaled back, the
//!    alert resolves;
//! 4. (before 2 and 3) a MyApp's reconcile shows up as an exemplar of the reconcile-duration
//!    histogram, read back through Prometheus's exemplar API, and the trace it names is in
//!    Jaeger.
//!
//! The figures go to `.run/alerts.json`.

use crate::cluster::prometheus::{self, alerts, api, encode, query};
use crate::operator::{NAMESPACE, TargetArgs};
use crate::{cluster, install, paths, sh};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde_json::Value;
use std::time::{Duration, Instant};

/// From the scale to 0 to the alert firing, at most: the pods' shutdown and their removal from
/// discovery (their series go stale then), a scrape and an evaluation interval to see no leader,
/// the rule's `for` (30 s), and the evaluation that fires it (measured: 59 and 73 s).
const NO_LEADER_WITHIN: Duration = Duration::from_secs(120);
/// How long after a rollout finished an alert could still fire: `for` (30 s) and an evaluation.
const QUIET_AFTER_ROLLOUT: Duration = Duration::from_secs(50);

/// Runs the checks; see the module doc.
pub async fn run(args: TargetArgs) -> Result<Figures> {
    let target = args.resolve().await?;
    if !target.local {
        bail!("cargo xtask alerts needs the local control plane: Prometheus scrapes the pods from this host");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    install::ensure(&client, &target.kubeconfig).await?;
    let bin = crate::cluster::gobuild::component("prometheus")?.ensure()?.join("prometheus");
    let prom = prometheus::restart_fresh(&bin).await?;
    let run_dir = paths::run_dir();
    let result = checks(&client).await;
    if result.is_err() {
        println!("{}", sh::tail(&run_dir, prometheus::NAME, 20));
    }
    sh::check_alive(&run_dir, &prom)?;
    let figures = result?;
    let out = run_dir.join("alerts.json");
    std::fs::write(&out, serde_json::to_string_pretty(&figures)?)?;
    println!("    figures: {}", out.display());
    Ok(figures)
}

/// `.run/alerts.json`: what [`run`] measured.
#[derive(Serialize)]
pub struct Figures {
    scrape_interval_s: u64,
    evaluation_interval_s: u64,
    /// Until Prometheus scraped the 3 replicas, one of them leader.
    targets_up_after_s: f64,
    exemplar: Exemplar,
    dashboard: Dashboard,
    rollout_restart: Rollout,
    no_leader: NoLeader,
}

/// A reconcile's exemplar, read from Prometheus and found in Jaeger.
#[derive(Serialize)]
struct Exemplar {
    trace_id: String,
    spans_in_jaeger: usize,
    after_s: f64,
}

/// The dashboard's panel queries against the live Prometheus.
#[derive(Serialize)]
struct Dashboard {
    queries: usize,
    panels_with_data: usize,
    after_s: f64,
}

/// A rollout restart, and the alerts that fired during it and [`QUIET_AFTER_ROLLOUT`] after it.
#[derive(Serialize)]
struct Rollout {
    took_s: f64,
    quiet_after_s: u64,
    fired: Vec<String>,
}

/// The operator scaled to 0 and back: when the no-leader alert fired and resolved.
#[derive(Serialize)]
struct NoLeader {
    fired_after_s: f64,
    bound_s: u64,
    resolved_after_s: f64,
}

async fn checks(client: &Client) -> Result<Figures> {
    let t = Instant::now();
    let every = Duration::from_secs(1);
    ::chaos::wait::poll(
        "Prometheus scraping 3 replicas, one of them leader",
        Duration::from_secs(120),
        every,
        || async {
            let up = query(r#"count(up{job="myapp-operator"} == 1)"#)?;
            let leaders = query("sum(myapp_operator_leader)")?;
            (up == 3.0 && leaders == 1.0).then_some(())
        },
    )
    .await?;
    let scraping = t.elapsed().as_secs_f64();
    println!("    3 targets up, 1 leader, after {scraping:.0} s");
    let exemplar = exemplar_in_jaeger(client).await?;
    let dashboard = dashboard_panels().await?;
    let rollout_restart = rollout_fires_nothing(client).await?;
    let no_leader = no_leader_fires_and_resolves(client).await?;
    install::rolled_out(client, Duration::from_secs(180)).await?;
    Ok(Figures {
        scrape_interval_s: 15,
        evaluation_interval_s: 15,
        targets_up_after_s: scraping,
        exemplar,
        dashboard,
        rollout_restart,
        no_leader,
    })
}

/// A rollout: a handover per old leader; nothing may fire, during it or for `for` after it.
async fn rollout_fires_nothing(client: &Client) -> Result<Rollout> {
    let (t, every) = (Instant::now(), Duration::from_secs(1));
    let api = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    let restart = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": format!("{:.0}", chaos::audit::now())
    }}}}});
    api.patch(install::DEPLOYMENT, &PatchParams::default(), &Patch::Merge(&restart)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut fired = Vec::new();
    let mut quiet_until: Option<Instant> = None;
    while quiet_until.is_none_or(|q| Instant::now() < q) {
        fired.extend(alerts("firing")?);
        if quiet_until.is_none() && install::is_rolled_out(client).await {
            quiet_until = Some(Instant::now() + QUIET_AFTER_ROLLOUT);
        }
        if t.elapsed() > Duration::from_secs(400) {
            bail!("the rollout did not finish within 400 s");
        }
        tokio::time::sleep(every).await;
    }
    fired.sort();
    fired.dedup();
    let rollout = t.elapsed().as_secs_f64();
    println!("    rollout restart and {} s after it: alerts fired {fired:?}", QUIET_AFTER_ROLLOUT.as_secs());
    if !fired.is_empty() {
        bail!("a rollout restart fired {fired:?}");
    }
    Ok(Rollout { took_s: rollout, quiet_after_s: QUIET_AFTER_ROLLOUT.as_secs(), fired })
}

/// No replica: the no-leader alert must fire, then resolve once the replicas are back.
async fn no_leader_fires_and_resolves(client: &Client) -> Result<NoLeader> {
    let (every, api) = (Duration::from_secs(1), Api::<Deployment>::namespaced(client.clone(), NAMESPACE));
    let scale = |n: i32| serde_json::json!({"spec": {"replicas": n}});
    api.patch(install::DEPLOYMENT, &PatchParams::default(), &Patch::Merge(&scale(0))).await?;
    let t = Instant::now();
    let fire = ::chaos::wait::poll("MyAppOperatorNoLeader firing", NO_LEADER_WITHIN, every, || async {
        alerts("firing").ok()?.iter().any(|a| a == "MyAppOperatorNoLeader").then(|| t.elapsed().as_secs_f64())
    })
    .await;
    api.patch(install::DEPLOYMENT, &PatchParams::default(), &Patch::Merge(&scale(3))).await?;
    let fire = fire?;
    println!("    scaled to 0: MyAppOperatorNoLeader fired after {fire:.0} s (bound {} s)", NO_LEADER_WITHIN.as_secs());
    let t = Instant::now();
    let resolve = ::chaos::wait::poll("MyAppOperatorNoLeader resolved", Duration::from_secs(180), every, || async {
        let now = alerts("firing").ok()?;
        (!now.iter().any(|a| a == "MyAppOperatorNoLeader")).then(|| t.elapsed().as_secs_f64())
    })
    .await?;
    println!("    scaled back to 3: resolved after {resolve:.0} s");
    Ok(NoLeader { fired_after_s: fire, bound_s: NO_LEADER_WITHIN.as_secs(), resolved_after_s: resolve })
}

/// The panels of `deploy/monitoring/dashboard.json` that must show data on a running install
/// that has reconciled and admitted a MyApp. The others may rightly be empty (no HTTP errors, no
/// MyApp that is not Ready).
const PANELS_WITH_DATA: &[&str] = &[
    "Leader",
    "Replicas reporting leader",
    "Leader by replica",
    "Lease acquisitions",
    "Reconciles by result",
    "Reconcile duration",
    "Queue depth",
    "API writes",
    "Controller running",
    "MyApps by Ready status",
    "Admissions",
    "Admission latency",
    "Serving certificate expires in",
    "Resident memory",
    "CPU",
    "Restarts (1 h)",
    "Scrape up",
    "Versions",
];

/// Every query of the dashboard's panels, by panel title, with Grafana's interval variables
/// replaced by what Grafana would use at a 15 s scrape interval.
fn dashboard_queries(dashboard: &str) -> Result<Vec<(String, String)>> {
    let v: Value = serde_json::from_str(dashboard)?;
    let panels = v["panels"].as_array().context("dashboard.json: no panels")?;
    let mut out = Vec::new();
    for p in panels.iter().flat_map(|p| std::iter::once(p).chain(p["panels"].as_array().into_iter().flatten())) {
        let title = p["title"].as_str().unwrap_or("(untitled)");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().with_context(|| format!("panel {title}: a target without expr"))?;
            out.push((title.to_string(), expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")));
        }
    }
    Ok(out)
}

/// The panel queries that fail, or return nothing where [`PANELS_WITH_DATA`] wants data.
fn missing_panels(queries: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (title, expr) in queries {
        match prometheus::instant(expr) {
            Ok(v) if v["status"] != "success" => out.push(format!("{title}: {expr}: {v}")),
            Ok(v) => {
                let series = v["data"]["result"].as_array().map_or(0, Vec::len);
                if series == 0 && PANELS_WITH_DATA.contains(&title.as_str()) {
                    out.push(format!("{title}: no data: {expr}"));
                }
            }
            Err(e) => out.push(format!("{title}: {expr}: {e}")),
        }
    }
    out
}

/// Runs every panel query of the dashboard against the live Prometheus: none may fail, and those
/// of [`PANELS_WITH_DATA`] must return series (polled: a counter needs two scrapes for a rate).
async fn dashboard_panels() -> Result<Dashboard> {
    let t = Instant::now();
    let text = std::fs::read_to_string(paths::repo().join("deploy/monitoring/dashboard.json"))?;
    let queries = dashboard_queries(&text)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing = missing_panels(&queries);
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("dashboard panels empty or failing after 90 s: {missing:#?}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let took = t.elapsed().as_secs_f64();
    println!(
        "    dashboard: {} panel queries ran without error, the {} panels that must have data have it, after {took:.0} s",
        queries.len(),
        PANELS_WITH_DATA.len()
    );
    Ok(Dashboard { queries: queries.len(), panels_with_data: PANELS_WITH_DATA.len(), after_s: took })
}

/// Creates a MyApp, reads the trace id of a reconcile back from the exemplars Prometheus scraped
/// (OpenMetrics), and finds that trace in Jaeger. Deletes the MyApp's namespace afterwards.
async fn exemplar_in_jaeger(client: &Client) -> Result<Exemplar> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{DeleteParams, PostParams};
    let t = Instant::now();
    let since = chaos::audit::now() - 1.0;
    let ns = "alerts-exemplar";
    crate::operator::apply_namespace(client, ns).await?;
    let namespaces = Api::<Namespace>::all(client.clone());
    let apps = Api::<myapp_operator::api::MyApp>::namespaced(client.clone(), ns);
    apps.create(&PostParams::default(), &chaos::fixtures::nginx("traced", 1)?).await?;
    let every = Duration::from_secs(1);
    let found =
        ::chaos::wait::poll("an exemplar of the reconcile duration", Duration::from_secs(120), every, || async {
            let path = format!(
                "/api/v1/query_exemplars?query={}&start={since:.3}&end={:.3}",
                encode("myapp_operator_reconcile_duration_seconds_bucket"),
                chaos::audit::now()
            );
            let v = api(&path).ok()?;
            v["data"]
                .as_array()?
                .iter()
                .flat_map(|series| series["exemplars"].as_array().into_iter().flatten())
                .find_map(|e| {
                    let id = e["labels"]["trace_id"].as_str()?;
                    let at = e["timestamp"].as_f64()?;
                    (at >= since).then(|| id.to_string())
                })
        })
        .await;
    let trace = match found {
        Ok(trace) => {
            let path = format!("/api/traces/{trace}");
            ::chaos::wait::poll("the exemplar's trace in Jaeger", Duration::from_secs(60), every, || async {
                let (code, body) = chaos::plain_http::get(cluster::ports::JAEGER_QUERY, &path).ok()?;
                let v: Value = serde_json::from_str(&body).ok()?;
                let spans = v["data"][0]["spans"].as_array().map_or(0, Vec::len);
                (code == 200 && spans > 0).then_some((trace.clone(), spans))
            })
            .await
        }
        Err(e) => Err(e),
    };
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    let (trace, spans) = trace?;
    let took = t.elapsed().as_secs_f64();
    println!(
        "    exemplar: trace {trace} of a reconcile, read from Prometheus and found in Jaeger ({spans} spans), after {took:.0} s"
    );
    Ok(Exemplar { trace_id: trace, spans_in_jaeger: spans, after_s: took })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_panel_that_must_have_data_is_in_the_dashboard() {
        let text = std::fs::read_to_string(paths::repo().join("deploy/monitoring/dashboard.json")).expect("dashboard");
        let queries = dashboard_queries(&text).expect("queries");
        for want in PANELS_WITH_DATA {
            assert!(queries.iter().any(|(t, _)| t == want), "no panel {want} with a query");
        }
        assert!(queries.iter().all(|(_, q)| !q.contains('$')), "a Grafana variable left in {queries:#?}");
    }
}
