//! `cargo xtask demo`: the main job on the embedded default. Starts the local control plane (or
//! uses the cluster given), installs the operator as users do (`kubectl apply -k`, three pods on
//! the real node), applies the example MyApps, and shows them Ready, who leads, and where the
//! traces are. `--processes` runs the replicas as host processes instead (a faster loop while
//! developing; also what runs against a user's cluster, which cannot load the local image).

use crate::operator::{self, Target, TargetArgs};
use crate::{cluster, cluster::prometheus, install, paths};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use myapp_operator::api::MyApp;
use std::time::{Duration, Instant};

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Number of operator replicas (host processes only; the install runs the 3 of `deploy/`).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Run the replicas as processes on this machine instead of installing them as pods.
    #[arg(long)]
    processes: bool,
}

fn myapp_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("myapp.dev", "v1", "MyApp"), "myapps")
}

/// Applies every document of `examples/*.yaml` into `default`; returns the names.
async fn apply_examples(client: &kube::Client) -> Result<Vec<String>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &myapp_resource());
    let mut names = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(paths::repo().join("examples"))?.flatten().map(|e| e.path()).collect();
    files.sort();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj: DynamicObject = serde::Deserialize::deserialize(doc)?;
            let name = obj.metadata.name.clone().context("example without a name")?;
            api.patch(&name, &PatchParams::apply("myapp-demo").force(), &Patch::Apply(&obj))
                .await
                .with_context(|| format!("apply {}", file.display()))?;
            println!("    applied myapp/{name} from {}", file.strip_prefix(paths::repo()).unwrap_or(file).display());
            names.push(name);
        }
    }
    Ok(names)
}

/// The Jaeger query API's path of the newest `limit` reconcile traces of `myapp`
/// (namespace/name), from the last hour.
pub fn reconcile_traces(myapp: &str, limit: usize) -> String {
    let tags = chaos::plain_http::query_escape(&format!(r#"{{"myapp":"{myapp}"}}"#));
    format!("/api/traces?service=myapp-operator&operation=reconcile&tags={tags}&limit={limit}&lookback=1h")
}

/// The newest reconcile trace of `myapp` (namespace/name) in Jaeger, waiting up to 15 s for the
/// exporters' next batch.
async fn latest_trace(port: u16, myapp: &str) -> Option<String> {
    let path = reconcile_traces(myapp, 1);
    chaos::wait::within(Duration::from_secs(15), Duration::from_millis(500), || async {
        let (200, body) = chaos::plain_http::get(port, &path).ok()? else { return None };
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"][0]["traceID"].as_str().map(str::to_string)
    })
    .await
}

/// Runs the demo.
pub async fn demo(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let target = args.target.resolve().await?;
    let client = cluster::client_from(&target.kubeconfig).await?;
    let as_pods = !args.processes && target.local && crate::cluster::node::enabled();
    if as_pods {
        install_pods(&client, &target).await?;
    } else {
        start_processes(&args, &target).await?;
    }

    println!("==> applying the example MyApps");
    let names = apply_examples(&client).await?;
    let api: Api<MyApp> = Api::namespaced(client.clone(), "default");
    let all_ready = || async {
        for n in &names {
            if !api.get(n).await.is_ok_and(|a| a.ready_at_generation()) {
                return None;
            }
        }
        Some(())
    };
    if chaos::wait::within(Duration::from_secs(120), Duration::from_millis(200), all_ready).await.is_none() {
        bail!(
            "the example MyApps were not Ready within 120 s; see the logs in {}",
            paths::run_dir().join("logs").display()
        );
    }

    show_myapps(&api, &names).await?;
    show_leader(&client, as_pods).await?;
    if target.local {
        show_traces().await;
        show_alerts(as_pods).await;
    }
    let kubectl = crate::cluster::gobuild::kubectl().map_or_else(|| "kubectl".into(), |p| p.display().to_string());
    println!("\n==> explore");
    println!("    export KUBECONFIG={}", target.kubeconfig.display());
    println!("    {kubectl} get myapps,deployments,services,lease -A");
    println!("    cargo xtask cluster down    # stops the replicas and the local control plane");
    println!("\n==> demo ready in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The operator as users install it: `kubectl apply -k` of the local overlay, three pods.
async fn install_pods(client: &kube::Client, target: &Target) -> Result<()> {
    println!(
        "==> installing the operator: kubectl apply -k {} (deploy/ as shipped, on the real node)",
        install::OVERLAY
    );
    install::prepare(client).await?;
    let took = install::apply(client, &target.kubeconfig).await?;
    println!("    3 operator pods ready {:.1} s after kubectl apply", took.as_secs_f64());
    Ok(())
}

/// The replicas as processes on this machine, once the install's pods are gone.
async fn start_processes(args: &DemoArgs, target: &Target) -> Result<()> {
    if !args.processes {
        match crate::cluster::node::why_not() {
            Some(why) if target.local => println!("==> no real node ({why}): running the replicas as processes"),
            _ => println!("==> a user's cluster cannot run the local image: running the replicas as processes"),
        }
    }
    let setup = operator::setup(target, false).await?;
    install::make_way_for_processes(&setup.client, target.local).await?;
    println!(
        "==> starting {} operator replicas (leader election on Lease {}/myapp-operator)",
        args.replicas,
        operator::NAMESPACE
    );
    let replicas =
        operator::start_replicas(&setup.bin, &setup.kubeconfig, args.replicas, &[], &operator::replica_env(target))?;
    operator::wait_ready(&replicas).await
}

/// The example MyApps, as `kubectl get myapps` shows them.
async fn show_myapps(api: &Api<MyApp>, names: &[String]) -> Result<()> {
    println!("\n==> MyApps (kubectl get myapps)");
    println!("{:<10} {:<28} {:>8} {:>6}  STATUS", "NAME", "IMAGE", "REPLICAS", "READY");
    for n in names {
        let a = api.get(n).await?;
        let ready = a.status.as_ref().map_or(0, |s| s.ready_replicas);
        println!("{:<10} {:<28} {:>8} {:>6}  {}", n, a.spec.image, a.spec.replicas, ready, a.ready_reason());
    }
    Ok(())
}

/// Who leads, the operator's pods (`as_pods`), and where the logs are.
async fn show_leader(client: &kube::Client, as_pods: bool) -> Result<()> {
    let lease = Api::<Lease>::namespaced(client.clone(), operator::NAMESPACE).get(operator::LEASE).await?;
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if as_pods {
        println!("\n==> operator pods (kubectl -n {} get pods)", operator::NAMESPACE);
        println!("    {:<40} {:<6} {:>8}  NODE", "NAME", "READY", "RESTARTS");
        for p in install::pods(client).await? {
            let name = p.metadata.name.clone().unwrap_or_default();
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            let mark = if install::pod_of(&holder) == Some(name.as_str()) { "  <- leader" } else { "" };
            println!("    {name:<40} {:<6} {:>8}  {node}{mark}", install::is_ready(&p), install::restarts(&p));
        }
    }
    println!("\n==> leader");
    println!(
        "    {holder} holds Lease {}/myapp-operator (transitions: {}); the other replicas are warm standbys",
        operator::NAMESPACE,
        spec.lease_transitions.unwrap_or(0)
    );
    if as_pods {
        println!("    leader pod: {}", install::pod_of(&holder).unwrap_or("-"));
        println!("    logs: kubectl -n {} logs {}", operator::NAMESPACE, install::pod_of(&holder).unwrap_or("POD"));
    } else {
        println!("    replica logs: {}", paths::run_dir().join("logs").join("operator-*.log").display());
    }
    Ok(())
}

/// Where the local Jaeger shows the reconciles.
async fn show_traces() {
    let port = cluster::ports::JAEGER_QUERY;
    println!("\n==> traces (Jaeger)");
    match latest_trace(port, "default/web").await {
        Some(id) => println!(
            "    a reconcile of myapp/web, with its API calls (the API server's own traces link to them):\n    http://127.0.0.1:{port}/trace/{id}"
        ),
        None => println!("    no reconcile trace of myapp/web reached Jaeger yet"),
    }
    println!("    every reconcile: http://127.0.0.1:{port}/search?service=myapp-operator&operation=reconcile");
}

/// Where the local Prometheus is, and the state of each of the operator's alerts once it has
/// scraped the pods (`as_pods`: it discovers pods, not the replicas run as processes).
async fn show_alerts(as_pods: bool) {
    let port = cluster::ports::PROMETHEUS;
    println!("\n==> monitoring (Prometheus, with the rules of deploy/monitoring)");
    println!("    http://127.0.0.1:{port}/ (API: /api/v1/alerts, /api/v1/targets)");
    if !as_pods {
        println!("    it scrapes the operator's pods; the replicas run as processes here, so it sees none");
        return;
    }
    let up = r#"count(up{job="myapp-operator"} == 1)"#;
    let scraped = chaos::wait::within(Duration::from_secs(60), Duration::from_secs(1), || async {
        (prometheus::query(up)? >= 3.0).then_some(())
    })
    .await;
    if scraped.is_none() {
        println!("    the 3 operator pods were not all scraped within 60 s; see {port}/api/v1/targets");
    }
    match prometheus::rule_states() {
        Ok(rules) => {
            println!("    {:<44} STATE", "ALERT");
            for (name, state) in rules {
                println!("    {name:<44} {state}");
            }
        }
        Err(e) => println!("    could not read the alerts: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_trace_search_names_the_myapp_tag_percent_encoded() {
        assert_eq!(
            super::reconcile_traces("default/web", 1),
            "/api/traces?service=myapp-operator&operation=reconcile&tags=%7B%22myapp%22%3A%22default%2Fweb%22%7D&limit=1&lookback=1h"
        );
    }
}
