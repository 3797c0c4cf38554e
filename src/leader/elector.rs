//! The elector's I/O loop around the pure [`super::state`] machine.

use super::Timings;
use super::state::{Decision, Record, Tracker, decide, holding_spec, released_spec};
use crate::telemetry::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;

/// Leadership as published: `Some(valid_until)` while this replica leads.
pub type Leadership = Option<Instant>;

/// Contends for one Lease. See the [module documentation](super) for the guarantees.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
    tracker: Tracker,
    last_spec: Option<k8s_openapi::api::coordination::v1::LeaseSpec>,
    tx: watch::Sender<Leadership>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug)]
enum WriteError {
    Conflict,
    Other(String),
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Elector {
    /// An elector for Lease `namespace/name` as `identity`. Returns the leadership channel.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> (Self, watch::Receiver<Leadership>) {
        let (tx, rx) = watch::channel(None);
        let elector = Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            tracker: Tracker::default(),
            last_spec: None,
            tx,
            metrics: None,
        };
        (elector, rx)
    }

    /// Records leader status, transitions and renew latency in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn leading(&self) -> Option<Instant> {
        *self.tx.borrow()
    }

    fn publish(&self, l: Leadership) {
        let was = self.leading().is_some();
        self.tx.send_replace(l);
        if let Some(m) = &self.metrics {
            m.is_leader.set(i64::from(l.is_some()));
            if l.is_some() && !was {
                m.leader_transitions.inc();
            }
        }
    }

    fn observe(&mut self, lease: &Lease, at: Instant) {
        self.tracker.observe(Record::from_spec(lease.spec.as_ref()), lease.resource_version().unwrap_or_default(), at);
        self.last_spec = lease.spec.clone();
    }

    async fn refresh(&mut self) -> Result<(), String> {
        let at = Instant::now();
        match tokio::time::timeout(self.timings.call_timeout(), self.api.get_opt(&self.name)).await {
            Ok(Ok(Some(lease))) => {
                self.observe(&lease, at);
                Ok(())
            }
            Ok(Ok(None)) => {
                self.tracker.forget();
                self.last_spec = None;
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn write(&self, spec: k8s_openapi::api::coordination::v1::LeaseSpec) -> Result<Lease, WriteError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: self.tracker.last().map(|o| o.resource_version.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        let pp = PostParams::default();
        let call = async {
            if self.tracker.last().is_some() {
                self.api.replace(&self.name, &pp, &lease).await
            } else {
                self.api.create(&pp, &lease).await
            }
        };
        match tokio::time::timeout(self.timings.call_timeout(), call).await {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Err(WriteError::Conflict),
            Ok(Err(e)) => Err(WriteError::Other(e.to_string())),
            Err(_) => Err(WriteError::Other("timed out".into())),
        }
    }

    /// One attempt to take or renew the lease, following `decision`.
    async fn attempt(&mut self, decision: Decision) {
        let started = Instant::now();
        let spec = holding_spec(&self.identity, self.last_spec.as_ref(), now_micro(), &self.timings);
        let span = tracing::info_span!("lease", op = ?decision, lease = %self.name, identity = %self.identity);
        let result = tracing::Instrument::instrument(self.write(spec), span).await;
        match result {
            Ok(lease) => {
                self.observe(&lease, started);
                let valid_until = started + self.timings.renew_deadline;
                if self.leading().is_none() {
                    tracing::info!(identity = %self.identity, lease = %self.name, "acquired the lease");
                }
                if let Some(m) = &self.metrics
                    && decision == Decision::Renew
                {
                    m.lease_renew_seconds.observe(started.elapsed().as_secs_f64());
                }
                self.publish(Some(valid_until));
            }
            Err(WriteError::Conflict) => {
                // Someone wrote first. Re-read before deciding anything else.
                tracing::debug!(identity = %self.identity, "lease write conflicted");
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "reading the lease failed");
                }
            }
            Err(WriteError::Other(e)) => tracing::warn!(error = %e, ?decision, "lease write failed"),
        }
    }

    /// Steps down if the renew deadline passed or the lease is seen held by someone else.
    fn check_leadership(&self) {
        if let Some(until) = self.leading() {
            let other_holder =
                self.tracker.last().is_some_and(|o| o.record.holder.as_deref() != Some(self.identity.as_str()));
            if Instant::now() >= until || other_holder {
                tracing::warn!(identity = %self.identity, other_holder, "leadership lost: stepping down");
                self.publish(None);
            }
        }
    }

    /// Contends until `stop` turns true (or its sender goes away), then releases the lease if
    /// held. The caller stops the controller first: [`super::supervise`] does.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = std::pin::pin!(
            watcher(self.api.clone(), config).backoff(crate::controller::cache::watch_backoff()).applied_objects()
        );
        let mut fresh = false;
        let mut stopping = false;
        while !stopping && !*stop.borrow() {
            if !fresh
                && self.leading().is_none()
                && let Err(e) = self.refresh().await
            {
                tracing::warn!(error = %e, "reading the lease failed; retrying");
            }
            fresh = false;
            let started = Instant::now();
            let next = match decide(&self.identity, self.tracker.last(), started, &self.timings) {
                Decision::Wait(d) => started + d,
                d => {
                    self.attempt(d).await;
                    started + self.timings.retry_period
                }
            };
            self.check_leadership();
            // A leader wakes to renew (or at its deadline); a standby at the next poll, when the
            // lease would expire, or as soon as the watch shows a change.
            let wake = match self.leading() {
                Some(until) => next.min(until),
                None => next,
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    ev = events.next() => match ev {
                        Some(Ok(lease)) => {
                            self.observe(&lease, Instant::now());
                            self.check_leadership();
                            if self.leading().is_none() {
                                fresh = true;
                                break;
                            }
                        }
                        Some(Err(_)) => {}
                        None => break,
                    },
                    changed = stop.changed() => {
                        stopping = changed.is_err() || *stop.borrow();
                        break;
                    }
                }
            }
        }
        self.release().await;
    }

    /// Clears the holder if we hold the lease: the fence closes first, then the write.
    pub async fn release(&mut self) {
        if self.leading().is_none() {
            return;
        }
        self.publish(None);
        let spec = released_spec(self.last_spec.as_ref(), now_micro());
        match self.write(spec).await {
            Ok(_) => tracing::info!(identity = %self.identity, lease = %self.name, "released the lease"),
            Err(e) => tracing::warn!(error = ?e, "releasing the lease failed; it will expire instead"),
        }
    }
}
