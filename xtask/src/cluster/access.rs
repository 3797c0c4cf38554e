//! What the task runner needs of the local control plane once it runs: its ports, clients from
//! its kubeconfigs, the readiness waits, and whether it is up. Below `cluster up`, the node and
//! Prometheus, which all use it.

use crate::{paths, sh};
use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

/// Ports of the local control plane, all on 127.0.0.1.
pub mod ports {
    /// etcd clients.
    pub const ETCD: u16 = 2379;
    /// etcd peers.
    pub const ETCD_PEER: u16 = 2380;
    /// kube-apiserver.
    pub const APISERVER: u16 = 6443;
    /// kube-controller-manager health.
    pub const CONTROLLER_MANAGER: u16 = 10257;
    /// kube-scheduler health.
    pub const SCHEDULER: u16 = 10259;
    /// kwok health.
    pub const KWOK: u16 = 10247;
    /// Jaeger OTLP gRPC.
    pub const JAEGER_OTLP: u16 = 4317;
    /// Jaeger OTLP HTTP.
    pub const JAEGER_OTLP_HTTP: u16 = 4318;
    /// Jaeger query API and UI.
    pub const JAEGER_QUERY: u16 = 16686;
    /// Jaeger health.
    pub const JAEGER_HEALTH: u16 = 13133;
    /// Prometheus's HTTP API.
    pub const PROMETHEUS: u16 = 19090;
}

/// The components that must run for the control plane to count as up (the node's are optional).
pub(crate) const CONTROL_PLANE: &[&str] =
    &["jaeger", "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"];

/// The admin client of a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    Ok(Client::try_from(config_from(kubeconfig).await?)?)
}

/// The client configuration of a kubeconfig file, for a client that needs more (e.g. its own
/// User-Agent) than [`client_from`] gives.
pub async fn config_from(kubeconfig: &Path) -> Result<Config> {
    let kc = Kubeconfig::read_from(kubeconfig).with_context(|| format!("read {}", kubeconfig.display()))?;
    Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes. While waiting, fails
/// early if one of `procs` exits. The error names the component and shows the log tails.
pub async fn wait_for<F, Fut>(
    run: &Path,
    procs: &[&sh::Proc],
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            println!("    {what} ready ({:.1} s)", started.elapsed().as_secs_f64());
            return Ok(());
        }
        for p in procs {
            sh::check_alive(run, p)?;
        }
        if started.elapsed() > timeout {
            let tails: Vec<String> =
                procs.iter().map(|p| format!("{}:\n{}", p.name, sh::tail(run, &p.name, 30))).collect();
            bail!("{what} did not become ready within {} s; last log lines:\n{}", timeout.as_secs(), tails.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn arg(k: &str, v: impl std::fmt::Display) -> String {
    format!("--{k}={v}")
}

/// True when every recorded component runs and the API server answers.
pub async fn is_up() -> bool {
    let run = paths::run_dir();
    if !CONTROL_PLANE.iter().all(|name| sh::running(&run, name)) {
        return false;
    }
    match client_from(&paths::kubeconfig()).await {
        Ok(c) => readyz(&c).await,
        Err(_) => false,
    }
}

pub(crate) async fn readyz(client: &Client) -> bool {
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(client.request_text(req).await, Ok(b) if b.trim() == "ok")
}
