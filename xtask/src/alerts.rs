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

use crate::operator::{NAMESPACE, TargetArgs};
use crate::{cluster, install, paths, procs};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// Prometheus's HTTP port on loopback (not one of the control plane's).
pub const PORT: u16 = 19090;
/// From the scale to 0 to the alert firing, at most: the pods' shutdown and their removal from
/// discovery (their series go stale then), a scrape and an evaluation interval to see no leader,
/// the rule's `for` (30 s), and the evaluation that fires it (measured: 59 and 73 s).
const NO_LEADER_WITHIN: Duration = Duration::from_secs(120);
/// How long after a rollout finished an alert could still fire: `for` (30 s) and an evaluation.
const QUIET_AFTER_ROLLOUT: Duration = Duration::from_secs(50);

/// The scrape configuration the install ships, pointed at this cluster: service discovery
/// through `kubeconfig`, the rules of `deploy/monitoring/rules.yaml`.
pub fn config(shipped: &str, rules: &Path, kubeconfig: &Path) -> Result<String> {
    let mut v: serde_yaml::Value = serde_yaml::from_str(shipped)?;
    v["rule_files"] = serde_yaml::Value::Sequence(vec![rules.display().to_string().into()]);
    let jobs = v["scrape_configs"].as_sequence_mut().context("scrape_configs")?;
    for job in jobs {
        for sd in job["kubernetes_sd_configs"].as_sequence_mut().context("kubernetes_sd_configs")? {
            sd["kubeconfig_file"] = kubeconfig.display().to_string().into();
        }
    }
    Ok(serde_yaml::to_string(&v)?)
}

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GETs `path` from Prometheus, as JSON.
fn api(path: &str) -> Result<Value> {
    let (code, body) = chaos::plain_http::get(PORT, path)?;
    if code != 200 {
        bail!("prometheus {path}: {code} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// The value of an instant query with a single scalar-like result, if any.
fn query(q: &str) -> Option<f64> {
    let v = api(&format!("/api/v1/query?query={}", encode(q))).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// The operator's alerts in a state (`firing` or `pending`), by name.
fn alerts(state: &str) -> Result<Vec<String>> {
    let v = api("/api/v1/alerts")?;
    Ok(v["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["state"] == state)
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                .filter(|n| n.starts_with("MyAppOperator"))
                .collect()
        })
        .unwrap_or_default())
}

/// Runs the checks; see the module doc.
pub async fn run(args: TargetArgs) -> Result<Value> {
    let target = args.resolve().await?;
    if !target.local {
        bail!("cargo xtask alerts needs the local control plane: Prometheus scrapes the pods from this host");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    install::ensure(&client, &target.kubeconfig).await?;
    let dir = paths::run_dir().join("prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let monitoring = paths::repo().join("deploy/monitoring");
    let shipped = std::fs::read_to_string(monitoring.join("prometheus.yaml"))?;
    let file = dir.join("prometheus.yaml");
    std::fs::write(&file, config(&shipped, &monitoring.join("rules.yaml"), &target.kubeconfig)?)?;
    let bin = crate::gobuild::component("prometheus")?.ensure()?.join("prometheus");
    if procs::port_in_use(PORT) {
        bail!("port {PORT} is in use: is another Prometheus running?");
    }
    let run_dir = paths::run_dir();
    let prom = procs::spawn(
        &run_dir,
        "prometheus",
        &bin,
        &[
            format!("--config.file={}", file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{PORT}"),
            "--enable-feature=exemplar-storage".into(),
        ],
        &[],
    )?;
    println!(
        "==> Prometheus {} on http://127.0.0.1:{PORT}/ (log {})",
        bin.display(),
        procs::log_file(&run_dir, "prometheus").display()
    );
    let result = checks(&client).await;
    procs::stop(&run_dir, "prometheus", prom.pid, &bin.display().to_string(), Duration::from_secs(5));
    if result.is_err() {
        println!("{}", procs::tail(&run_dir, "prometheus", 20));
    }
    let figures = result?;
    let out = run_dir.join("alerts.json");
    std::fs::write(&out, serde_json::to_string_pretty(&figures)?)?;
    println!("    figures: {}", out.display());
    Ok(figures)
}

async fn checks(client: &Client) -> Result<Value> {
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

    // A rollout: a handover per old leader; nothing may fire, during it or for `for` after it.
    let t = Instant::now();
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

    // No replica: the no-leader alert must fire, then resolve once the replicas are back.
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
    install::rolled_out(client, Duration::from_secs(180)).await?;
    Ok(serde_json::json!({
        "scrape_interval_s": 15, "evaluation_interval_s": 15,
        "targets_up_after_s": scraping,
        "exemplar": exemplar,
        "rollout_restart": {"took_s": rollout, "quiet_after_s": QUIET_AFTER_ROLLOUT.as_secs(), "fired": fired},
        "no_leader": {"fired_after_s": fire, "bound_s": NO_LEADER_WITHIN.as_secs(), "resolved_after_s": resolve},
    }))
}

/// Creates a MyApp, reads the trace id of a reconcile back from the exemplars Prometheus scraped
/// (OpenMetrics), and finds that trace in Jaeger. Deletes the MyApp's namespace afterwards.
async fn exemplar_in_jaeger(client: &Client) -> Result<Value> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{DeleteParams, PostParams};
    let t = Instant::now();
    let since = chaos::audit::now() - 1.0;
    let ns = "alerts-exemplar";
    let nsobj: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
    let namespaces = Api::<Namespace>::all(client.clone());
    let _ = namespaces.create(&PostParams::default(), &nsobj).await;
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
    Ok(serde_json::json!({"trace_id": trace, "spans_in_jaeger": spans, "after_s": took}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_is_pointed_at_this_cluster_and_nothing_else_changes() {
        let shipped =
            std::fs::read_to_string(paths::repo().join("deploy/monitoring/prometheus.yaml")).expect("prometheus.yaml");
        let out = config(&shipped, Path::new("/r/rules.yaml"), Path::new("/k/kubeconfig")).expect("config");
        let v: serde_yaml::Value = serde_yaml::from_str(&out).expect("yaml");
        let before: serde_yaml::Value = serde_yaml::from_str(&shipped).expect("yaml");
        assert_eq!(v["rule_files"][0].as_str(), Some("/r/rules.yaml"));
        let sd = &v["scrape_configs"][0]["kubernetes_sd_configs"][0];
        assert_eq!(sd["kubeconfig_file"].as_str(), Some("/k/kubeconfig"));
        assert_eq!(sd["namespaces"], before["scrape_configs"][0]["kubernetes_sd_configs"][0]["namespaces"]);
        assert_eq!(v["scrape_configs"][0]["relabel_configs"], before["scrape_configs"][0]["relabel_configs"]);
        assert_eq!(v["global"], before["global"]);
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(encode(r#"up{job="x"} == 1"#), "up%7Bjob%3D%22x%22%7D%20%3D%3D%201");
        assert_eq!(encode("sum(a_b)"), "sum%28a_b%29");
    }
}
