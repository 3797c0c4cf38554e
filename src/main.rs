//! The `myapp-operator` command: `run` the operator, print the `crd`, or the `version`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use myapp_operator::api::MyApp;
use myapp_operator::controller::{self, Context, cache::Caches};
use myapp_operator::http::{self, Probes};
use myapp_operator::telemetry::{logging, metrics::Metrics};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "myapp-operator", version, about = "A high-availability Kubernetes operator for MyApp")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Print the CustomResourceDefinition as YAML.
    Crd,
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the probe and metrics server.
    #[arg(long, env = "PROBE_ADDR", default_value = "0.0.0.0:8081")]
    probe_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    log_format: logging::LogFormat,
    /// Watch one namespace only (default: all).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Identity of this replica in Events and the lease (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn main() -> anyhow::Result<()> {
    // rustls must have exactly one crypto provider, installed before any TLS config is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd_yaml()?);
            Ok(())
        }
        Command::Version => {
            println!("myapp-operator {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run(args))
        }
    }
}

fn crd_yaml() -> anyhow::Result<String> {
    Ok(serde_yaml::to_string(&MyApp::crd()).context("serialize CRD")?)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    logging::init(args.log_format);
    let identity = args.identity.or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "myapp-operator".into());
    let mut config = kube::Config::infer().await.context("find Kubernetes credentials")?;
    let agent = format!("myapp-operator/{} ({identity})", env!("CARGO_PKG_VERSION"));
    config.headers.push((::http::header::USER_AGENT, ::http::HeaderValue::from_str(&agent)?));
    let client = kube::Client::try_from(config).context("build the Kubernetes client")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let probes = Probes { metrics: metrics.clone(), ready: ready.clone() };
    let probe_task = tokio::spawn(http::serve(args.probe_addr, probes, stopped(stop_rx.clone())));

    let caches = Caches::start(client.clone(), args.namespace.as_deref());
    let ctx = Arc::new(Context::new(client, caches.clone(), metrics, &identity));
    tracing::info!(%identity, "starting");
    // One waiter at a time: the store's readiness signal wakes a single task.
    caches.wait_ready().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced; ready");
    let controller_task = tokio::spawn(controller::run(ctx, stopped(stop_rx.clone())));

    shutdown_signal().await;
    tracing::info!("shutdown requested");
    let _ = stop_tx.send(true);
    let _ = controller_task.await;
    match probe_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "probe server"),
        Err(e) => tracing::warn!(error = %e, "probe server task"),
        Ok(Ok(())) => {}
    }
    tracing::info!("stopped");
    Ok(())
}
