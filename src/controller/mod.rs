//! The reconciler: it turns each `MyApp` into a Deployment and a Service and reports status.
//!
//! It reads from the warm caches ([`crate::cache`]), which run on every replica, leader or not,
//! so a new leader starts from warm caches.
//!
//! - `reconcile`: the reconcile and cleanup logic, as methods on `MyApp`.
//! - `events`: Events about MyApps, repeats aggregated, in bounded memory.
//! - [`children`]: pure builders of the Deployment and Service, and their shapes in the caches.
//! - `ownership`: the pure decision of which existing objects a `MyApp` may write.
//! - [`fenced`]: the client those writes use ([`fenced::FencedClient`]), whose sockets check the
//!   fence before every write.
//! - `error`: the reconcile's `Error`, and the per-object backoff after a failure.
//! - `observe`: the span, metrics and exemplar of one reconcile.
//! - `queue`: the queue-depth metric, counted around kube's private scheduler.
//! - `writer`: every write the controller makes goes through here, so that it can be fenced and
//!   counted in one place.

pub mod children;
mod error;
pub(crate) mod events;
pub mod fenced;
#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod io_tests;
mod observe;
pub(crate) mod ownership;
pub(crate) mod queue;
pub(crate) mod reconcile;
pub(crate) mod writer;

use crate::api::MyApp;
use crate::api::policy::Policy;
use crate::cache::{AppRef, Cached, Caches};
use crate::leader::Fence;
use crate::telemetry::metrics::Metrics;
use error::backoff_delay;
pub(crate) use error::{Error, Result};
use fenced::FencedClient;
use futures::StreamExt;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use writer::Writer;

/// How often an unchanged `MyApp` is reconciled again (a resync that must write nothing).
pub(crate) const RESYNC: Duration = Duration::from_secs(300);

/// What the controller watches and how often it resyncs. Flattened into the binary's `run`
/// flags; each flag also reads an environment variable.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ControllerArgs {
    /// Watch these namespaces only, comma-separated (default: all).
    #[arg(long, env = "WATCH_NAMESPACE", value_parser = crate::api::scope::Scope::parse, default_value = "")]
    pub(crate) namespace: crate::api::scope::Scope,
    /// How often an unchanged MyApp is reconciled again (with ±10 % jitter).
    #[arg(long, env = "RESYNC_PERIOD", default_value_t = RESYNC.into())]
    pub(crate) resync_period: humantime::Duration,
}

/// What every reconcile shares.
pub(crate) struct Context {
    client: Client,
    /// This replica's identity, recorded on every reconcile span.
    pub(crate) identity: String,
    /// The warm caches.
    pub(crate) caches: Caches,
    /// The only way to write.
    pub(crate) writer: Writer,
    /// Metrics of this replica.
    pub(crate) metrics: Arc<Metrics>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<AppRef, u32>>,
    /// How often an unchanged object is reconciled again.
    resync: Duration,
    /// When this leadership term began, until its first reconcile is recorded.
    term_started: Mutex<Option<tokio::time::Instant>>,
    /// MyApps waiting for a reconcile in this term.
    pending: Arc<queue::Pending>,
    /// The policy the webhooks enforce; the reconciler holds every MyApp to all of it as well.
    pub(crate) policy: Policy,
}

impl Context {
    /// A context for one controller run (one leadership term). Reads use `client`; writes use
    /// `writes` after checking `fence`, and the time from `acquired` to the first reconcile is measured.
    pub(crate) fn new(
        client: Client,
        writes: FencedClient,
        caches: Caches,
        metrics: Arc<Metrics>,
        identity: &str,
        fence: Fence,
        acquired: tokio::time::Instant,
    ) -> Self {
        let events = events::Publisher::new(writes.clone(), "myapp-operator", identity);
        Self {
            identity: identity.to_string(),
            client: client.clone(),
            caches,
            pending: Arc::new(queue::Pending::new(metrics.queue_depth.clone())),
            writer: Writer::new(writes, fence, events, metrics.clone()),
            metrics,
            failures: Mutex::new(HashMap::new()),
            term_started: Mutex::new(Some(acquired)),

            resync: RESYNC,
            policy: Policy::default(),
        }
    }

    /// Sets the policy (see [`Context::policy`]).
    pub(crate) fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the resync period.
    pub(crate) fn with_resync(mut self, resync: Duration) -> Self {
        self.resync = resync;
        self
    }

    /// When to resync an object next: the period with ±10 % jitter, so that the objects a new
    /// leader reconciled in its first second do not all resync in the same second again.
    pub(crate) fn next_resync(&self) -> Duration {
        jittered(self.resync, rand::random::<f64>())
    }

    /// The client, for reads that must not come from the caches.
    pub(crate) fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Forgets the failures of `obj`, and records the first success of the term.
    fn record_success(&self, obj: &AppRef) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(obj);
        }
        let term_started = self.term_started.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = term_started {
            let secs = t.elapsed().as_secs_f64();
            self.metrics.acquire_to_first_reconcile_seconds.observe(secs);
            tracing::info!(ms = secs * 1000.0, "first reconcile of the term finished");
        }
    }

    fn record_failure(&self, obj: AppRef) -> u32 {
        match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(obj).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        }
    }
}

/// The MyApp `cached` stands for: rebuilt from the cache, or, for one too large to keep there
/// (see [`crate::cache::MAX_KEPT`]), read from the API server (`None` if it is gone).
async fn whole(cached: &Cached<MyApp>, ctx: &Context) -> Result<Option<MyApp>, Error> {
    if cached.kept() {
        return Ok(Some(cached.object()?));
    }
    let api =
        kube::Api::<MyApp>::namespaced(ctx.client.clone(), cached.meta().namespace.as_deref().unwrap_or_default());
    Ok(api.get_opt(&cached.name_any()).await?)
}

/// One reconcile as kube's controller calls it: the MyApp rebuilt from the cache, reconciled in
/// its span ([`observe`]), and the failures counted for the backoff.
async fn reconcile(cached: Arc<Cached<MyApp>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    ctx.pending.remove(cached.meta().namespace.as_deref(), &cached.name_any());
    let app = match whole(&cached, &ctx).await {
        Ok(Some(app)) => app,
        // Deleted since: its deletion event follows.
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => {
            // The read of a MyApp too large to cache failed (or, never expected, the JSON the
            // cache made from the object the API server sent does not decode).
            ctx.metrics.reconciled(e.kind());
            return Err(e);
        }
    };
    let observed = observe::Observed::start(&app, &ctx.identity, started);
    let result = {
        use tracing::Instrument;
        app.reconcile(&ctx).instrument(observed.span().clone()).await
    };
    observed.finish(&result, &ctx.metrics);
    if result.is_ok() {
        ctx.record_success(&ObjectRef::from_obj(cached.as_ref()));
    }
    result.map(|requeue| requeue.map_or_else(Action::await_change, Action::requeue))
}

/// `period` scaled by a factor in [0.9, 1.1), chosen by `r` in [0, 1).
pub(crate) fn jittered(period: Duration, r: f64) -> Duration {
    period.mul_f64(0.9 + 0.2 * r.clamp(0.0, 1.0))
}

fn error_policy(app: Arc<Cached<MyApp>>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(ObjectRef::from_obj(app.as_ref()));
    let delay = backoff_delay(failures, error, rand::random::<f64>());
    tracing::warn!(
        myapp = %ObjectRef::from_obj(app.as_ref()),
        error = %error,
        failures,
        retry_in_ms = delay.as_millis() as u64,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Runs the controller until `stop` resolves. It reconciles every object in the caches once at
/// start (a new leader takes over everything), then whatever the watches trigger.
pub(crate) async fn run(ctx: Arc<Context>, stop: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    ctx.caches.wait_ready().await;
    ctx.metrics.controller_running.set(1);
    let caches = &ctx.caches;
    // Each stream below counts what it triggers in the queue-depth metric, through its own
    // handle on the context.
    let (on_myapp, on_deployment, on_service) = (ctx.clone(), ctx.clone(), ctx.clone());
    // Everything is reconciled at the start of the term, and again whenever a subscriber lagged
    // behind its channel (it missed triggers), at low priority (see [`queue::bulk_pass`]).
    let (lagged, lags) = tokio::sync::mpsc::unbounded_channel();
    let passes = futures::stream::once(async {}).chain(tokio_stream::wrappers::UnboundedReceiverStream::new(lags));
    let store = caches.myapps.clone();
    let bulk = queue::bulk_pass(passes, ctx.pending.clone(), move || {
        store.state().iter().map(|app| ObjectRef::from_obj(app.as_ref())).collect()
    });
    let myapps = caches.myapp_events(&lagged).inspect(move |a| on_myapp.pending.add(ObjectRef::from_obj(a.as_ref())));
    let deployments = caches.deployment_events(&lagged).inspect(move |d| on_deployment.pending.add_owner_of(d.meta()));
    let services = caches.service_events(&lagged).inspect(move |s| on_service.pending.add_owner_of(s.meta()));
    let controller = Controller::for_shared_stream(myapps, caches.myapps.clone())
        .owns_shared_stream(deployments)
        .owns_shared_stream(services)
        .reconcile_on(bulk)
        .with_config(Config::default().concurrency(16).debounce(Duration::from_millis(50)))
        .graceful_shutdown_on(stop);
    controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| {
            let ctx = ctx.clone();
            async move {
                match res {
                    Ok((obj, _)) => {
                        let myapp = format!("{}/{}", obj.namespace.as_deref().unwrap_or_default(), obj.name);
                        tracing::debug!(%myapp, "reconciled");
                    }
                    Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                        // Triggered, but gone from the cache: it will not be reconciled.
                        ctx.pending.remove(obj.namespace.as_deref(), &obj.name);
                    }
                    Err(e) => tracing::debug!(error = %e, "controller event"),
                }
            }
        })
        .await;
    ctx.metrics.controller_running.set(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_spread_over_a_fifth_of_the_period() {
        let period = Duration::from_secs(300);
        assert_eq!(jittered(period, 0.0), Duration::from_secs(270));
        assert_eq!(jittered(period, 0.5), period);
        assert!(jittered(period, 0.999_999) < Duration::from_secs(330));
        assert_eq!(jittered(period, 7.0), Duration::from_secs(330), "r is clamped");
        // 1,000 objects reconciled at once resync over a minute, not in one second.
        let seconds: std::collections::BTreeSet<u64> =
            (0..1000).map(|_| jittered(period, rand::random::<f64>()).as_secs()).collect();
        assert!(seconds.len() > 50, "spread over {} distinct seconds", seconds.len());
    }
}
