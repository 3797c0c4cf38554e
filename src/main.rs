//! The `myapp-operator` command: `run` the operator, print the `crd`, or the `version`.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use myapp_operator::api::MyApp;
use myapp_operator::controller::{self, Context, cache::Caches};
use myapp_operator::leader::{self, Elector, Fence};
use myapp_operator::probes::{self, Probes};
use myapp_operator::telemetry::propagation::TraceParentLayer;
use myapp_operator::telemetry::{logging, metrics::Metrics, myapps};
use myapp_operator::webhook::{self, Webhooks};
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

/// The flags of `run`: each module owns its group (`--help` lists them all, flattened).
#[derive(clap::Args)]
struct RunArgs {
    /// Address of the probe and metrics server.
    #[arg(long, env = "PROBE_ADDR", default_value = "0.0.0.0:8081")]
    probe_addr: SocketAddr,
    /// Name of this replica; a random suffix is added to form its identity (default: POD_NAME,
    /// else the host name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    #[command(flatten)]
    log: logging::LogArgs,
    #[command(flatten)]
    controller: controller::ControllerArgs,
    #[command(flatten)]
    lease: leader::LeaseArgs,
    #[command(flatten)]
    webhook: webhook::WebhookArgs,
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
    // Any instance of this container that ran before has exited by now: a proof of death that
    // rests on that is dated from here (see leader::proof).
    let born = tokio::time::Instant::now();
    let pod =
        args.pod_name.clone().or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "myapp-operator".into());
    let identity = format!("{pod}-{}", random_suffix());
    let telemetry = logging::init(args.log.log_format, &identity);
    let timings = args.lease.timings();
    timings.validate().map_err(|e| anyhow::anyhow!("invalid lease timings: {e}"))?;

    // The probe server comes first, before anything that talks to the API server: `/livez` is
    // served from the first moment and never depends on the API server; `/readyz` stays false
    // until the caches are synced and the webhook server answers TLS with its certificate.
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let webhooks_ready = args.webhook.webhooks.then(|| Arc::new(AtomicBool::new(false)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let probes = Probes { metrics: metrics.clone(), ready: ready.clone(), webhooks_ready: webhooks_ready.clone() };
    let probe_task = tokio::spawn(probes::serve(args.probe_addr, probes, stopped(stop_rx.clone())));

    let (config, client) = api_client(&identity).await?;
    // One policy for the webhooks (admission) and the controller (what is rolled out).
    let policy = args.webhook.policy();
    let webhooks = match webhooks_ready {
        Some(flag) => Some(start_webhooks(&args, client.clone(), policy.clone(), metrics.clone(), flag)?),
        None => None,
    };

    tracing::info!(%identity, leader_elect = args.lease.leader_elect, traces = telemetry.exporting(), "starting");
    let caches = Caches::start(client.clone(), args.controller.namespace.as_deref());
    // One waiter at a time: the store's readiness signal wakes a single task.
    caches.wait_ready().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced; ready (readiness never depends on leadership)");
    // MyApps counted by condition, from the cache (every replica, leader or not).
    tokio::spawn(myapps::keep_counting(caches.myapps.clone(), metrics.clone()));

    // The elector stops only after the controller has: a separate signal, sent in order below.
    let (release_tx, release_rx) = watch::channel(leader::Stop::No);
    let election = Election::start(&args, client.clone(), &identity, metrics.clone(), release_rx, born);

    // The controller writes through its own client, whose sockets check the fence before every
    // write (see controller::fenced): a request delayed past the end of the term never leaves.
    let writes = controller::fenced::client(&config, Fence::new(election.leadership.clone()), timings.write_timeout)
        .context("build the fenced Kubernetes client")?;
    let resync: Duration = args.controller.resync_period.into();
    let supervisor = {
        let (caches, metrics, identity, stop_rx) = (caches.clone(), metrics.clone(), identity.clone(), stop_rx.clone());
        tokio::spawn(leader::supervise(election.leadership.clone(), stop_rx.clone(), move |fence, acquired| {
            let ctx = Context::new(
                client.clone(),
                writes.clone(),
                caches.clone(),
                metrics.clone(),
                &identity,
                fence,
                acquired,
            );
            controller::run(Arc::new(ctx.with_resync(resync).with_policy(policy.clone())), stopped(stop_rx.clone()))
        }))
    };

    shutdown_signal().await;
    let running = Running { ready, webhooks, stop_tx, supervisor, release_tx, election, probe_task };
    running.shut_down(args.webhook.webhook_drain).await;
    telemetry.shutdown();
    Ok(())
}

/// What [`run`] started, to stop in order.
struct Running {
    ready: Arc<AtomicBool>,
    webhooks: Option<Webhooks>,
    /// Tells the supervisor (and the probe server) to stop.
    stop_tx: watch::Sender<bool>,
    /// Answers how the controller stopped.
    supervisor: tokio::task::JoinHandle<leader::Stop>,
    /// Tells the elector how to release the lease.
    release_tx: watch::Sender<leader::Stop>,
    election: Election,
    probe_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The shutdown on SIGTERM: not ready, the webhooks draining, the controller stopped, the
    /// lease released as the controller's stop allows; the webhooks, given `drain` since the
    /// signal, stop; then the probe server.
    async fn shut_down(self, drain: Duration) {
        tracing::info!("shutdown requested: stopping the controller, then releasing the lease");
        self.ready.store(false, Ordering::Relaxed);
        if let Some(w) = &self.webhooks {
            w.begin_drain();
        }
        let _ = self.stop_tx.send(true);
        let drain = tokio::time::sleep(drain);
        // How the controller stopped decides how soon the lease may be released.
        let how = self.supervisor.await.unwrap_or(leader::Stop::ReleaseAfterMargin);
        let _ = self.release_tx.send(how);
        self.election.stopped().await;
        if let Some(w) = self.webhooks {
            // Keep answering admissions while callers move to the other replicas, then stop
            // accepting and wait (bounded) for the admissions in flight.
            drain.await;
            if let Err(e) = w.shutdown(Duration::from_secs(5)).await {
                tracing::warn!(error = %e, "webhook drain");
            }
        }
        match self.probe_task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "probe server"),
            Err(e) => tracing::warn!(error = %e, "probe server task"),
            Ok(Ok(())) => {}
        }
        tracing::info!("stopped");
    }
}

/// Resolves once `rx` says stop.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The API client: this replica's User-Agent, a timeout on every call but watches, and a client
/// span per call whose context reaches the API server in `traceparent`. Also returns the
/// configuration, for the fenced write client.
async fn api_client(identity: &str) -> anyhow::Result<(kube::Config, kube::Client)> {
    let mut config = kube::Config::infer().await.context("find Kubernetes credentials")?;
    let agent = myapp_operator::client::user_agent(identity);
    config.headers.push((::http::header::USER_AGENT, ::http::HeaderValue::from_str(&agent)?));
    let client = kube::client::ClientBuilder::try_from(config.clone())
        .context("build the Kubernetes client")?
        .with_layer(&myapp_operator::client::CallTimeoutLayer::default())
        .with_layer(&TraceParentLayer)
        .build();
    Ok((config, client))
}

/// Starts the webhook server. Returns at once: the certificate is obtained in the background,
/// with retries, so a replica that cannot reach the API server stays alive (and not ready)
/// instead of exiting.
fn start_webhooks(
    args: &RunArgs,
    client: kube::Client,
    policy: webhook::policy::Policy,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<Webhooks> {
    let source = args.webhook.cert_source(&args.lease.lease_namespace);
    let shared = Arc::new(
        webhook::Shared::new(policy, metrics, webhook::limits::Limits::default())
            .with_scope(args.controller.namespace.clone()),
    );
    Webhooks::start_with(client, args.webhook.webhook_addr, source, shared, webhook::Options::with_ready(ready))
        .context("start the webhooks")
}

/// Leadership: the elector's, or, without election, a fence open for the life of the process.
struct Election {
    leadership: watch::Receiver<Option<tokio::time::Instant>>,
    elector: Option<tokio::task::JoinHandle<()>>,
    _open_fence: Option<watch::Sender<Option<tokio::time::Instant>>>,
}

impl Election {
    fn start(
        args: &RunArgs,
        client: kube::Client,
        identity: &str,
        metrics: Arc<Metrics>,
        release: watch::Receiver<leader::Stop>,
        born: tokio::time::Instant,
    ) -> Self {
        let lease = &args.lease;
        if lease.leader_elect {
            let (elector, leadership) =
                Elector::new(client, &lease.lease_namespace, &lease.lease_name, identity, lease.timings());
            let mut elector = elector.with_metrics(metrics);
            // Said once, here: whether this replica can take over before expiry on proof of death.
            let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            match leader::Incarnation::discover(|v| std::env::var(v).ok(), &cgroup) {
                Ok(me) => {
                    tracing::info!(pod = %me.pod, container = %me.container_id, "failover on proof of death: on");
                    elector = elector.with_incarnation(me, born);
                }
                Err(why) => tracing::info!(%why, "failover on proof of death: off; a successor waits for lease expiry"),
            }
            let elector = tokio::spawn(elector.run(release));
            Self { leadership, elector: Some(elector), _open_fence: None }
        } else {
            let forever = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400);
            let (tx, leadership) = watch::channel(Some(forever));
            Self { leadership, elector: None, _open_fence: Some(tx) }
        }
    }

    /// Waits for the elector to finish (it releases the Lease as told).
    async fn stopped(self) {
        if let Some(task) = self.elector {
            let _ = task.await;
        }
    }
}
