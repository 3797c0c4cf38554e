//! The life of an election, as the operator runs it: start, the fence it gives the controller's
//! writes, the supervisor that runs the controller while this replica leads, and the release
//! on shutdown, in that order.

use super::args::LeaseArgs;
use super::elector::{Elector, Stop};
use super::fence::{Fence, Mandate};
use super::proof::Incarnation;
use super::supervise::supervise;
use super::timings::Timings;
use crate::telemetry::metrics::Metrics;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// This replica's part in the election: contending for the Lease, or, with
/// `--leader-elect=false`, the only writer ([`Mandate::Unelected`]).
pub(crate) struct Election {
    mandate: Mandate,
    elector: Option<Contender>,
}

/// The elector's task, and how to tell it to stop.
struct Contender {
    task: JoinHandle<()>,
    release: watch::Sender<Stop>,
}

impl Election {
    /// Starts contending for the Lease that `lease` names, with `timings` (validated, from
    /// [`LeaseArgs::timings`]), as `identity`. `born` is when this process started: a proof of
    /// death that rests on this container's restart dates from it (see [`super::proof`]).
    pub(crate) fn start(
        lease: &LeaseArgs,
        timings: Timings,
        client: kube::Client,
        identity: &str,
        metrics: Arc<Metrics>,
        born: Instant,
    ) -> Self {
        if !lease.leader_elect {
            return Self { mandate: Mandate::Unelected, elector: None };
        }
        let (elector, leadership) = Elector::new(client, &lease.lease_namespace, &lease.lease_name, identity, timings);
        let mut elector = elector.with_metrics(metrics);
        // Said once, here: whether this replica can take over before expiry on proof of death.
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match Incarnation::discover(|v| std::env::var(v).ok(), &cgroup) {
            Ok(me) => {
                tracing::info!(pod = %me.pod, container = %me.container_id, "failover on proof of death: on");
                elector = elector.with_incarnation(me, born);
            }
            Err(why) => tracing::info!(%why, "failover on proof of death: off; a successor waits for lease expiry"),
        }
        let (release, stop) = watch::channel(Stop::No);
        let task = tokio::spawn(elector.run(stop));
        Self { mandate: Mandate::Elected(leadership), elector: Some(Contender { task, release }) }
    }

    /// The fence of this replica's writes, for the controller's client.
    pub(crate) fn fence(&self) -> Fence {
        Fence::of(self.mandate.clone())
    }

    /// Runs `start(fence, acquired)` for each term this replica leads (see [`supervise`]), until
    /// `shutdown` turns true.
    pub(crate) fn supervise<F, Fut>(self, shutdown: watch::Receiver<bool>, start: F) -> Leading
    where
        F: FnMut(Fence, Instant) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let supervisor = tokio::spawn(supervise(self.mandate, shutdown, start));
        Leading { supervisor, elector: self.elector }
    }
}

/// The supervisor and the elector, running.
pub(crate) struct Leading {
    supervisor: JoinHandle<Stop>,
    elector: Option<Contender>,
}

impl Leading {
    /// Once shutdown has been asked: waits for the controller to stop, then for the elector to
    /// release the Lease as the controller's stop allows (at once, or after the margin if the
    /// controller had to be cancelled).
    pub(crate) async fn stopped(self) {
        let how = self.supervisor.await.unwrap_or(Stop::ReleaseAfterMargin);
        if let Some(elector) = self.elector {
            let _ = elector.release.send(how);
            let _ = elector.task.await;
        }
    }
}
