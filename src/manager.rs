//! The operator's process: it starts the parts in order, wires them together, and shuts them
//! down in order on SIGTERM (`ARCHITECTURE.md`, "Runtime").

use crate::api::{self, policy::Policy};
use crate::cache::Caches;
use crate::controller::{self, Context, fenced::FencedClient};
use crate::leader::{self, Election, Fence, Leading};
use crate::probes::{self, Probes};
use crate::telemetry::propagation::TraceParentLayer;
use crate::telemetry::{logging, metrics::Metrics, myapps};
use crate::webhook::{self, Webhooks};
use anyhow::Context as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// How long the webhook server, once it stops accepting, waits for the admissions in flight.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(5);

/// The flags of `run`: each module owns its group (`--help` lists them all, flattened).
#[derive(clap::Args)]
pub struct RunArgs {
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
    #[command(flatten)]
    policy: api::policy::PolicyArgs,
}

/// Runs the operator until SIGTERM (or Ctrl-C), then stops it in order.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Any instance of this container that ran before has exited by now: a proof of death that
    // rests on that is dated from here (see leader::proof).
    let born = tokio::time::Instant::now();
    let pod =
        args.pod_name.clone().or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "myapp-operator".into());
    let identity = format!("{pod}-{}", random_suffix());
    let telemetry = logging::init(args.log.log_format, &identity);
    let timings = args.lease.timings().map_err(|e| anyhow::anyhow!("invalid lease timings: {e}"))?;

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
    let policy = args.policy.policy();
    let webhooks = match webhooks_ready {
        Some(flag) => Some(start_webhooks(&args, client.clone(), policy.clone(), metrics.clone(), flag)?),
        None => None,
    };

    tracing::info!(%identity, leader_elect = args.lease.leader_elect, traces = telemetry.exporting(), "starting");
    let caches = warm_caches(client.clone(), &args.controller, &ready, &metrics).await;

    let election = Election::start(&args.lease, timings, client.clone(), &identity, metrics.clone(), born);
    // The controller writes through its own client, whose sockets check the fence before every
    // write (see controller::fenced): a request delayed past the end of the term never leaves.
    let writes = controller::fenced::client(&config, election.fence(), timings.write_timeout)
        .context("build the fenced Kubernetes client")?;
    let resync = args.controller.resync_period.into();
    let term = Term { client, writes, caches, metrics, identity, resync, policy };
    let stop = stop_rx.clone();
    let leading = election.supervise(stop_rx, move |fence, acquired| term.start(fence, acquired, stop.clone()));

    shutdown_signal().await;
    let running = Running { ready, webhooks, stop_tx, leading, probe_task };
    running.shut_down(args.webhook.webhook_drain).await;
    telemetry.shutdown();
    Ok(())
}

/// Starts the warm caches and waits until they have synced: the replica is ready from then on,
/// leader or not.
async fn warm_caches(
    client: kube::Client,
    args: &controller::ControllerArgs,
    ready: &AtomicBool,
    metrics: &Arc<Metrics>,
) -> Caches {
    let caches = Caches::start(client, &args.namespace);
    // One waiter at a time: the store's readiness signal wakes a single task.
    caches.wait_ready().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced; ready (readiness never depends on leadership)");
    // MyApps counted by condition, from the cache (every replica, leader or not).
    tokio::spawn(myapps::keep_counting(caches.myapps.clone(), metrics.clone()));
    caches
}

/// What the controller is built from at the start of each term.
struct Term {
    /// Reads.
    client: kube::Client,
    /// Writes, fenced.
    writes: FencedClient,
    caches: Caches,
    metrics: Arc<Metrics>,
    identity: String,
    resync: Duration,
    policy: Policy,
}

impl Term {
    /// The controller of a term that began at `acquired`, writing under `fence`, until `stop`
    /// turns true.
    fn start(
        &self,
        fence: Fence,
        acquired: tokio::time::Instant,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + use<> {
        let ctx = Context::new(
            self.client.clone(),
            self.writes.clone(),
            self.caches.clone(),
            self.metrics.clone(),
            &self.identity,
            fence,
            acquired,
        );
        controller::run(Arc::new(ctx.with_resync(self.resync).with_policy(self.policy.clone())), stopped(stop))
    }
}

/// What [`run`] started, to stop in order.
struct Running {
    ready: Arc<AtomicBool>,
    webhooks: Option<Webhooks>,
    /// Tells the supervisor (and the probe server) to stop.
    stop_tx: watch::Sender<bool>,
    /// The supervisor and the elector.
    leading: Leading,
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
        self.leading.stopped().await;
        if let Some(w) = self.webhooks {
            // Keep answering admissions while callers move to the other replicas, then stop
            // accepting and wait (bounded) for the admissions in flight.
            drain.await;
            if let Err(e) = w.shutdown(IN_FLIGHT_GRACE).await {
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

/// Resolves on SIGTERM or Ctrl-C.
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

/// Five characters that tell this replica's instance apart from the pod's earlier ones.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
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
    let agent = crate::client::user_agent(identity);
    config.headers.push((::http::header::USER_AGENT, ::http::HeaderValue::from_str(&agent)?));
    let client = kube::client::ClientBuilder::try_from(config.clone())
        .context("build the Kubernetes client")?
        .with_layer(&crate::client::CallTimeoutLayer::default())
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
    policy: Policy,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kubelet kills the container `terminationGracePeriodSeconds` after SIGTERM: the longest
    /// shutdown (the controller cancelled and the release held back, or the webhooks' drain, then
    /// the admissions in flight) must end before, with room for the spans' flush.
    #[test]
    fn the_pods_grace_period_covers_the_longest_shutdown() {
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../deploy/manager/deployment.yaml")).expect("the Deployment");
        let grace = yaml["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .map(Duration::from_secs)
            .expect("terminationGracePeriodSeconds");
        let drain = humantime::parse_duration(webhook::DEFAULT_DRAIN).expect("the default drain");
        let t = leader::Timings::DEFAULT;
        let release = leader::SHUTDOWN_GRACE + (t.lease_duration - t.renew_deadline);
        let longest = drain.max(release) + IN_FLIGHT_GRACE;
        assert!(longest + Duration::from_secs(5) <= grace, "shutdown takes up to {longest:?}, the pod gets {grace:?}");
    }
}
