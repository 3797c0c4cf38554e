//! The `myapp-operator` command: `run` the operator, print the `crd`, or the `version`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use myapp_operator::api::MyApp;
use myapp_operator::controller::{self, Context, cache::Caches};
use myapp_operator::leader::{self, Elector, Fence, Timings};
use myapp_operator::probes::{self, Probes};
use myapp_operator::telemetry::propagation::TraceParentLayer;
use myapp_operator::telemetry::{logging, metrics::Metrics};
use myapp_operator::webhook::{self, CertSource, Webhooks, policy::Policy};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
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
    Run(Box<RunArgs>),
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
    /// Name of this replica; a random suffix is added to form its identity (default: POD_NAME,
    /// else the host name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Run for leadership on a Lease (true), or reconcile unconditionally as a single replica.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "myapp-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: POD_NAMESPACE, else myapp-system).
    #[arg(long, env = "POD_NAMESPACE", default_value = "myapp-system")]
    lease_namespace: String,
    /// How long a standby waits from the last change it saw before taking over.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long a leader tries to renew before stepping down.
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    /// How often the leader renews and standbys poll.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    /// Serve the admission webhooks (every replica does).
    #[arg(long, env = "WEBHOOKS", default_value_t = true, action = clap::ArgAction::Set)]
    webhooks: bool,
    /// Address of the webhook HTTPS server (bound with SO_REUSEPORT).
    #[arg(long, env = "WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// Read `tls.crt`, `tls.key` and `ca.crt` from this folder (e.g. a cert-manager Secret)
    /// instead of managing the certificate in a Secret.
    #[arg(long, env = "WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<std::path::PathBuf>,
    /// Secret holding the self-managed CA and serving certificate.
    #[arg(long, env = "WEBHOOK_SECRET", default_value = "myapp-operator-webhook-cert")]
    webhook_secret: String,
    /// Service in front of the webhooks; its DNS names go into the certificate.
    #[arg(long, env = "WEBHOOK_SERVICE", default_value = "myapp-operator-webhook")]
    webhook_service: String,
    /// More SANs for the certificate, comma-separated (e.g. 127.0.0.1 for a local run).
    #[arg(long, env = "WEBHOOK_EXTRA_SANS", value_delimiter = ',')]
    webhook_extra_sans: Vec<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, env = "WEBHOOK_CONFIG", default_value = "myapp-operator")]
    webhook_config: String,
    /// How long the webhooks keep serving after SIGTERM (while not ready), so that callers move
    /// to the other replicas first.
    #[arg(long, env = "WEBHOOK_DRAIN", default_value = "2s", value_parser = humantime::parse_duration)]
    webhook_drain: Duration,
    /// Registries images may come from, comma-separated (empty: all).
    #[arg(long, env = "ALLOWED_REGISTRIES", value_delimiter = ',')]
    allowed_registries: Vec<String>,
    /// Environment variable names a MyApp may not set, comma-separated.
    #[arg(long, env = "FORBIDDEN_ENV", value_delimiter = ',')]
    forbidden_env: Vec<String>,
    /// The most replicas a MyApp may ask for.
    #[arg(long, env = "MAX_REPLICAS")]
    max_replicas: Option<i32>,
    /// How often an unchanged MyApp is reconciled again.
    #[arg(long, env = "RESYNC_PERIOD", default_value = "5m", value_parser = humantime::parse_duration)]
    resync_period: Duration,
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
            rt.block_on(run(*args))
        }
    }
}

fn crd_yaml() -> anyhow::Result<String> {
    serde_yaml::to_string(&MyApp::crd()).context("serialize CRD")
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

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let pod =
        args.pod_name.clone().or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "myapp-operator".into());
    let identity = format!("{pod}-{}", random_suffix());
    let telemetry = logging::init(args.log_format, &identity);
    let timings = Timings {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    timings.validate().map_err(|e| anyhow::anyhow!("invalid lease timings: {e}"))?;

    // The probe server comes first, before anything that talks to the API server: `/livez` is
    // served from the first moment and never depends on the API server; `/readyz` stays false
    // until the caches are synced and the webhook server answers TLS with its certificate.
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let webhooks_ready = args.webhooks.then(|| Arc::new(AtomicBool::new(false)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let probes = Probes { metrics: metrics.clone(), ready: ready.clone(), webhooks_ready: webhooks_ready.clone() };
    let probe_task = tokio::spawn(probes::serve(args.probe_addr, probes, stopped(stop_rx.clone())));

    let mut config = kube::Config::infer().await.context("find Kubernetes credentials")?;
    let agent = myapp_operator::client::user_agent(&identity);
    config.headers.push((::http::header::USER_AGENT, ::http::HeaderValue::from_str(&agent)?));
    // Every API call becomes a client span whose context reaches the API server in `traceparent`.
    let client = kube::client::ClientBuilder::try_from(config.clone())
        .context("build the Kubernetes client")?
        .with_layer(&myapp_operator::client::CallTimeoutLayer::default())
        .with_layer(&TraceParentLayer)
        .build();

    // One policy for the webhooks (admission) and the controller (what is rolled out).
    let policy = Policy {
        allowed_registries: args.allowed_registries.iter().filter(|s| !s.is_empty()).cloned().collect(),
        forbidden_env: args.forbidden_env.iter().filter(|s| !s.is_empty()).cloned().collect(),
        max_replicas: args.max_replicas,
    };
    let webhooks = if let Some(webhooks_ready) = webhooks_ready {
        let (svc, ns) = (&args.webhook_service, &args.lease_namespace);
        let source = match &args.webhook_cert_dir {
            Some(dir) => CertSource::Dir {
                dir: dir.clone(),
                server_name: args.webhook_extra_sans.first().cloned().unwrap_or_else(|| format!("{svc}.{ns}.svc")),
            },
            None => {
                let mut sans = vec![
                    format!("{svc}.{ns}.svc"),
                    format!("{svc}.{ns}.svc.cluster.local"),
                    format!("{svc}.{ns}"),
                    svc.clone(),
                ];
                sans.extend(args.webhook_extra_sans.iter().filter(|s| !s.is_empty()).cloned());
                CertSource::SelfManaged {
                    namespace: ns.clone(),
                    secret: args.webhook_secret.clone(),
                    sans,
                    config: args.webhook_config.clone(),
                }
            }
        };
        let shared =
            Arc::new(webhook::Shared::new(policy.clone(), metrics.clone(), webhook::limits::Limits::default()));
        // Returns at once: the certificate is obtained in the background, with retries, so a
        // replica that cannot reach the API server stays alive (and not ready) instead of exiting.
        let options = webhook::Options::with_ready(webhooks_ready);
        let w = Webhooks::start_with(client.clone(), args.webhook_addr, source, shared, options)
            .context("start the webhooks")?;
        Some(w)
    } else {
        None
    };

    tracing::info!(%identity, leader_elect = args.leader_elect, traces = telemetry.exporting(), "starting");
    let caches = Caches::start(client.clone(), args.namespace.as_deref());
    // One waiter at a time: the store's readiness signal wakes a single task.
    caches.wait_ready().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced; ready (readiness never depends on leadership)");

    // The elector stops only after the controller has: a separate signal, sent in order below.
    let (release_tx, release_rx) = watch::channel(leader::Stop::No);
    let mut _open_fence = None;
    let (leadership, elector_task) = if args.leader_elect {
        let (elector, leadership) =
            Elector::new(client.clone(), &args.lease_namespace, &args.lease_name, &identity, timings);
        let elector = elector.with_metrics(metrics.clone());
        (leadership, Some(tokio::spawn(elector.run(release_rx))))
    } else {
        // Without election the fence stays open for the life of the process.
        let (tx, rx) = watch::channel(Some(tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400)));
        _open_fence = Some(tx);
        (rx, None)
    };

    // The controller writes through its own client, whose sockets check the fence before every
    // write (see controller::fenced): a request delayed past the end of the term never leaves.
    let writes = controller::fenced::client(&config, Fence::new(leadership.clone()))
        .context("build the fenced Kubernetes client")?;
    let resync = args.resync_period;
    let supervisor = {
        let (client, caches, metrics, identity, stop_rx) =
            (client.clone(), caches.clone(), metrics.clone(), identity.clone(), stop_rx.clone());
        tokio::spawn(leader::supervise(leadership, stop_rx.clone(), move |fence, acquired| {
            let ctx = Arc::new(
                Context::new(
                    client.clone(),
                    writes.clone(),
                    caches.clone(),
                    metrics.clone(),
                    &identity,
                    fence,
                    acquired,
                )
                .with_resync(resync)
                .with_policy(policy.clone()),
            );
            controller::run(ctx, stopped(stop_rx.clone()))
        }))
    };

    shutdown_signal().await;
    tracing::info!("shutdown requested: stopping the controller, then releasing the lease");
    ready.store(false, Ordering::Relaxed);
    if let Some(w) = &webhooks {
        w.begin_drain();
    }
    let _ = stop_tx.send(true);
    let drain = tokio::time::sleep(args.webhook_drain);
    // How the controller stopped decides how soon the lease may be released.
    let how = supervisor.await.unwrap_or(leader::Stop::ReleaseAfterMargin);
    let _ = release_tx.send(how);
    if let Some(task) = elector_task {
        let _ = task.await;
    }
    if let Some(w) = webhooks {
        // Keep answering admissions while callers move to the other replicas, then stop
        // accepting and wait (bounded) for the admissions in flight.
        drain.await;
        if let Err(e) = w.shutdown(Duration::from_secs(5)).await {
            tracing::warn!(error = %e, "webhook drain");
        }
    }
    match probe_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "probe server"),
        Err(e) => tracing::warn!(error = %e, "probe server task"),
        Ok(Ok(())) => {}
    }
    tracing::info!("stopped");
    telemetry.shutdown();
    Ok(())
}
