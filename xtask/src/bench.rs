//! `cargo xtask bench [--quick] [--count N]`: what the operator costs at scale, on the local
//! control plane (or a given cluster): time for N fresh MyApps to become Ready, the replicas'
//! memory, and — with N MyApps present — how long a new leader takes from acquiring the lease to
//! its first reconcile (warm caches). Prints a table and writes `.run/bench/<N>.json`.

use crate::operator::{self, TargetArgs};
use crate::{cluster, paths};
use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use myapp_operator::api::MyApp;
use serde_json::json;
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// 100 MyApps instead of 1000.
    #[arg(long)]
    quick: bool,
    /// Number of MyApps (overrides --quick).
    #[arg(long)]
    count: Option<usize>,
    /// Export traces to the local Jaeger while measuring (to compare with and without).
    #[arg(long)]
    traces: bool,
}

/// Mean reconcile duration (ms) and reconcile count from a replica's metrics.
fn reconcile_stats(port: u16) -> Option<(f64, f64)> {
    let (_, body) = crate::procs::http_get(port, "/metrics").ok()?;
    let value = |name: &str| -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let sum = value("myapp_operator_reconcile_duration_seconds_sum")?;
    let count = value("myapp_operator_reconcile_duration_seconds_count")?;
    (count > 0.0).then(|| (sum / count * 1000.0, count))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Runs the benchmark.
pub async fn bench(args: BenchArgs) -> Result<()> {
    let n = args.count.unwrap_or(if args.quick { 100 } else { 1000 });
    let target = args.target.resolve().await?;
    let bin = operator::build()?;
    let client = cluster::client_from(&target.kubeconfig).await?;
    let operator_kubeconfig = operator::prepare(&client, &target).await?;
    operator::stop_replicas();
    let mut env = vec![("RUST_LOG", "info".into())];
    if args.traces {
        env.extend(operator::replica_env(&target));
    }
    let replicas = operator::start_replicas(&bin, &operator_kubeconfig, 3, &[], &env)?;
    operator::wait_ready(&replicas).await?;
    let idle: Vec<u64> = replicas.iter().filter_map(|r| rss_kib(r.pid)).collect();

    let ns = format!("bench-{n}-{}", std::process::id());
    let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &nsobj).await?;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns);
    println!("==> creating {n} MyApps in {ns}");
    let started = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let app: MyApp = serde_json::from_value(json!({
                    "apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": format!("app-{i:05}")},
                    "spec": {"image": "nginx:1.27", "replicas": 1}
                }))?;
                api.create(&PostParams::default(), &app).await.map(|_| ()).context("create")
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        bail!("creating MyApps failed: {e:#}");
    }
    let created = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(900);
    let converged = loop {
        let list = api.list(&ListParams::default()).await?;
        if list.items.iter().filter(|a| a.ready_at_generation()).count() == n {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            bail!("{n} MyApps not Ready within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let loaded: Vec<u64> = replicas.iter().filter_map(|r| rss_kib(r.pid)).collect();
    let reconciles = replicas.iter().filter_map(|r| reconcile_stats(r.probe_port)).max_by(|a, b| a.1.total_cmp(&b.1));

    // Webhook latency, in process and over TLS against the replicas (local control plane only).
    let ca = if target.local {
        let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), operator::NAMESPACE);
        secrets
            .get("myapp-operator-webhook-cert")
            .await
            .ok()
            .and_then(|s| s.data?.get("ca.crt").and_then(|c| String::from_utf8(c.0.clone()).ok()))
    } else {
        None
    };
    let url = format!("https://{}", operator::LOCAL_WEBHOOK_ADDR);
    let wh = crate::webhook_bench::run(ca.as_deref().map(|c| (url.as_str(), c))).await?;

    // A graceful handover with N MyApps: time from acquiring to the first reconcile of the term.
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), operator::NAMESPACE);
    let holder = lease.get("myapp-operator").await?.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    let leader = replicas.iter().find(|r| r.holds(&holder)).context("leader not found")?;
    let others: Vec<_> = replicas.iter().filter(|r| r.name != leader.name).collect();
    crate::procs::signal(leader.pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let first_reconcile_ms = loop {
        let found = others.iter().find_map(|r| r.first_reconciles().last().map(|(_, ms)| *ms));
        if let Some(ms) = found {
            break ms;
        }
        if Instant::now() > deadline {
            bail!("no new leader reconciled within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let report = json!({
        "myapps": n,
        "create_seconds": created.as_secs_f64(),
        "all_ready_seconds": converged.as_secs_f64(),
        "myapps_per_second": n as f64 / converged.as_secs_f64(),
        "rss_kib_idle": idle,
        "rss_kib_loaded": loaded,
        "leader_at_load": leader.name,
        "acquire_to_first_reconcile_ms": first_reconcile_ms,
        "traces": args.traces,
        "leader_reconciles": reconciles.map(|r| r.1),
        "mean_reconcile_ms": reconciles.map(|r| r.0),
        "webhook_in_process_us": {"validate_p50": wh.in_process[0].0, "validate_p99": wh.in_process[0].1,
                                  "mutate_p50": wh.in_process[1].0, "mutate_p99": wh.in_process[1].1},
        "webhook_tls_us": wh.tls.map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
        "webhook_tls_rps_16_clients": wh.tls_rps,
    });
    let dir = paths::run_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{n}{}.json", if args.traces { "-traces" } else { "" }));
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    println!("\n{:<40} {:>12}", "measure", "value");
    println!("{:<40} {:>12}", "MyApps", n);
    println!("{:<40} {:>12.1}", "create (s)", created.as_secs_f64());
    println!("{:<40} {:>12.1}", "all Ready (s, from the first create)", converged.as_secs_f64());
    println!("{:<40} {:>12.1}", "MyApps Ready per second", n as f64 / converged.as_secs_f64());
    for (r, (i, l)) in replicas.iter().zip(idle.iter().zip(&loaded)) {
        let role = if r.name == leader.name { "leader" } else { "standby" };
        println!(
            "{:<40} {:>12}",
            format!("RSS {} ({role}) idle -> loaded (MiB)", r.name),
            format!("{:.1} -> {:.1}", *i as f64 / 1024.0, *l as f64 / 1024.0)
        );
    }
    println!("{:<40} {:>12.1}", "acquire -> first reconcile (ms, warm)", first_reconcile_ms);
    if let Some((mean, count)) = reconciles {
        println!(
            "{:<40} {:>12}",
            format!("mean reconcile (ms), traces {}", if args.traces { "on" } else { "off" }),
            format!("{mean:.2} ({count:.0})")
        );
    }
    println!(
        "{:<40} {:>12}",
        "webhook /validate in process p50/p99 (µs)",
        format!("{:.0} / {:.0}", wh.in_process[0].0, wh.in_process[0].1)
    );
    println!(
        "{:<40} {:>12}",
        "webhook /mutate in process p50/p99 (µs)",
        format!("{:.0} / {:.0}", wh.in_process[1].0, wh.in_process[1].1)
    );
    if let (Some((p50, p99)), Some(rps)) = (wh.tls, wh.tls_rps) {
        println!("{:<40} {:>12}", "webhook over TLS p50/p99 (µs)", format!("{p50:.0} / {p99:.0}"));
        println!("{:<40} {:>12.0}", "webhook over TLS, 16 clients (req/s)", rps);
    }
    println!("    report: {}", file.display());

    operator::stop_replicas();
    let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &DeleteParams::default()).await;
    Ok(())
}
