//! The elector's I/O loop around the pure [`super::state`] machine.

use super::pods::HolderPod;
use super::proof::{self, Incarnation};
use super::state::{Decision, Record, Seen, Tracker, decide, holding_spec, leads_from, released_spec};
use super::timings::Timings;
use crate::telemetry::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::time::Instant;

/// Leadership as published: `Some(valid_until)` while this replica leads.
pub type Leadership = Option<Instant>;

/// What the elector is asked to do about stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Stop {
    /// Keep contending.
    #[default]
    No,
    /// Stop and release the lease at once: the controller has stopped, and every write it sent
    /// has been answered.
    Release,
    /// Stop and close the fence at once, but release the lease only a safety margin later
    /// (`leaseDuration − renewDeadline`, and never after the lease would expire anyway): the
    /// controller was cancelled, so a write it sent may still be in flight, and it must not land
    /// inside the next leader's term.
    ReleaseAfterMargin,
}

/// Contends for one Lease. See the [module documentation](super) for the guarantees.
pub struct Elector {
    api: Api<Lease>,
    client: Client,
    name: String,
    identity: String,
    timings: Timings,
    tracker: Tracker,
    last_spec: Option<LeaseSpec>,
    /// The Lease object (uid) of our current hold, and the instant from which it may be led.
    hold: Option<(String, Instant)>,
    tx: watch::Sender<Leadership>,
    metrics: Option<Arc<Metrics>>,
    /// This process's container incarnation, if it knows it ([`proof`]): written beside the
    /// holder, and the condition of any takeover before expiry.
    me: Option<Incarnation>,
    /// When this process started: a proof that it is its holder's restart dates from here.
    born: Instant,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("conflict: someone else wrote the Lease first")]
    Conflict,
    #[error("the Lease API call failed: {0}")]
    Api(#[from] kube::Error),
    #[error("the Lease API call timed out")]
    Timeout,
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
            api: Api::namespaced(client.clone(), namespace),
            client,
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
            tracker: Tracker::default(),
            last_spec: None,
            hold: None,
            tx,
            metrics: None,
            me: None,
            born: Instant::now(),
        };
        (elector, rx)
    }

    /// Takes over before expiry on proof of the holder's death (`proof`), as the container
    /// incarnation `me`, which started at `born`. Without this, the elector writes no
    /// incarnation, reads no pods, and takes over only on expiry.
    pub(crate) fn with_incarnation(mut self, me: Incarnation, born: Instant) -> Self {
        self.me = Some(me);
        self.born = born;
        self
    }

    /// Records leader status, transitions and renew latency in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
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

    /// Records a Lease read that returned at `at`. A stale one changes nothing. A Lease held by
    /// a previous instance of this very container is proof of its death, dated from this
    /// process's start ([`proof::succeeds`]).
    fn observe(&mut self, lease: &Lease, at: Instant) -> Seen {
        let record = Record::from_spec(lease.spec.as_ref());
        let incarnation = Incarnation::of_holder(lease.metadata.annotations.as_ref(), record.holder.as_deref());
        let seen = self.tracker.observe(
            record,
            incarnation,
            lease.resource_version().unwrap_or_default(),
            lease.uid().unwrap_or_default(),
            at,
        );
        if seen != Seen::Stale {
            self.last_spec = lease.spec.clone();
        }
        let restarted = self.tracker.last().and_then(|o| {
            let holder = o.incarnation.as_ref()?;
            let other = o.record.holder.as_deref() != Some(self.identity.as_str());
            (other && proof::succeeds(holder, self.me.as_ref()?)).then(|| holder.clone())
        });
        if let Some(dead) = restarted
            && self.tracker.prove(&dead, self.born)
        {
            tracing::info!(
                holder = ?self.tracker.last().and_then(|o| o.record.holder.clone()), container = %dead.container_id,
                "the Lease is held by this container's previous instance, which has exited: taking over"
            );
        }
        seen
    }

    /// Judges a report of the holder's pod ([`proof::reported_exited`]). True when it is new
    /// proof of the holder's death.
    fn judge(&mut self, pod: &Pod) -> bool {
        let Some(o) = self.tracker.last() else { return false };
        let Some(holder) = o.incarnation.clone() else { return false };
        let name = o.record.holder.clone();
        if name.as_deref() == Some(self.identity.as_str())
            || !proof::reported_exited(&holder, o.record.renew_time.as_ref(), pod)
        {
            return false;
        }
        let proven = self.tracker.prove(&holder, Instant::now());
        if proven {
            tracing::info!(
                holder = ?name, pod = %holder.pod, container = %holder.container_id, wait = ?self.timings.in_flight(),
                "the kubelet reports the holder's container exited: taking over once its writes can no longer land"
            );
        }
        proven
    }

    /// The annotations of a Lease this replica holds: its incarnation, if it knows it.
    fn holding_annotations(&self) -> Option<BTreeMap<String, String>> {
        self.me.as_ref().map(|me| BTreeMap::from([me.annotation(&self.identity)]))
    }

    fn forget(&mut self, uid: Option<&str>) {
        self.tracker.forget(uid);
        if self.tracker.last().is_none() {
            self.last_spec = None;
        }
    }

    async fn refresh(&mut self) -> Result<(), WriteError> {
        let read = tokio::time::timeout(self.timings.call_timeout(), self.api.get_opt(&self.name)).await;
        // Stamped when the answer is in: the version it carries may be younger than the request.
        let at = Instant::now();
        match read {
            Ok(Ok(Some(lease))) => {
                self.observe(&lease, at);
                Ok(())
            }
            Ok(Ok(None)) => {
                self.forget(None);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(WriteError::Timeout),
        }
    }

    /// Writes the Lease, conditional on the version we saw, within the call timeout or, while
    /// leading, within what is left of the term (so a hung renewal ends with the term).
    async fn write(&self, spec: LeaseSpec, annotations: Option<BTreeMap<String, String>>) -> Result<Lease, WriteError> {
        let budget = match self.leading() {
            Some(until) => until.saturating_duration_since(Instant::now()).min(self.timings.call_timeout()),
            None => self.timings.call_timeout(),
        };
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: self.tracker.last().map(|o| o.resource_version.clone()),
                annotations,
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
        match tokio::time::timeout(budget, call).await {
            Ok(Ok(l)) => Ok(l),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Err(WriteError::Conflict),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(WriteError::Timeout),
        }
    }

    /// One attempt to take or renew the lease, following `decision`.
    async fn attempt(&mut self, decision: Decision) {
        let started = Instant::now();
        let spec = holding_spec(&self.identity, self.last_spec.as_ref(), now_micro(), &self.timings);
        let span = tracing::info_span!("lease", op = ?decision, lease = %self.name, identity = %self.identity);
        let proven = self.tracker.last().is_some_and(|o| o.proven_dead_at.is_some());
        let result = tracing::Instrument::instrument(self.write(spec, self.holding_annotations()), span).await;
        match result {
            Ok(lease) => {
                let uid = lease.uid().unwrap_or_default();
                if self.hold.as_ref().is_none_or(|(held, _)| *held != uid) {
                    let from = leads_from(self.tracker.last(), &uid, started, &self.timings);
                    if from > started {
                        tracing::info!(
                            identity = %self.identity, lease = %self.name, wait = ?(from - started),
                            "holding a new Lease object: leading only once a full lease duration has passed"
                        );
                        // A new object: whatever we led before was another Lease.
                        self.publish(None);
                    }
                    self.hold = Some((uid, from));
                }
                self.observe(&lease, Instant::now());
                let may_lead = self.hold.as_ref().is_some_and(|(_, from)| started >= *from);
                if !may_lead {
                    return;
                }
                if self.leading().is_none() {
                    tracing::info!(identity = %self.identity, lease = %self.name, on_proof_of_death = proven, "acquired the lease");
                }
                if let Some(m) = &self.metrics
                    && decision == Decision::Renew
                {
                    m.lease_renew_seconds.observe(started.elapsed().as_secs_f64());
                }
                self.publish(Some(started + self.timings.renew_deadline));
            }
            Err(WriteError::Conflict) => {
                // Someone wrote first. Re-read before deciding anything else.
                tracing::debug!(identity = %self.identity, "lease write conflicted");
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "reading the lease failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, ?decision, "lease write failed"),
        }
    }

    /// Steps down if the renew deadline passed, or the Lease we hold is seen held by someone
    /// else, deleted, or replaced by a new object.
    fn check_leadership(&mut self) {
        let held = self.tracker.last().is_some_and(|o| {
            o.record.holder.as_deref() == Some(self.identity.as_str())
                && self.hold.as_ref().is_some_and(|(uid, _)| *uid == o.uid)
        });
        if !held {
            self.hold = None;
        }
        if let Some(until) = self.leading()
            && (Instant::now() >= until || !held)
        {
            tracing::warn!(identity = %self.identity, held, "leadership lost: stepping down");
            self.publish(None);
        }
    }

    /// True when the latest observation calls for a write now (not a wait, not a renewal).
    fn must_act(&self) -> bool {
        self.leading().is_none()
            && self.hold.is_none()
            && matches!(
                decide(&self.identity, self.tracker.last(), Instant::now(), &self.timings),
                Decision::Create | Decision::Acquire
            )
    }

    /// Contends until `stop` asks it to stop (or its sender goes away), then releases the lease
    /// if held, as `stop` says. The caller stops the controller first: `supervise`
    /// tells how it went.
    pub async fn run(mut self, mut stop: watch::Receiver<Stop>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = std::pin::pin!(watcher(self.api.clone(), config).backoff(crate::client::watch_backoff()));
        // The holder's pod, read only by a replica that can itself be proven dead (in a pod).
        let mut pod = self.me.as_ref().map(|_| HolderPod::new(self.client.clone()));
        let mut fresh = false;
        // Whether the Lease appeared in the watcher's current (re)list.
        let mut listed = false;
        let mut how = *stop.borrow();
        while how == Stop::No {
            if !fresh
                && self.leading().is_none()
                && let Err(e) = self.refresh().await
            {
                tracing::warn!(error = %e, "reading the lease failed; retrying");
            }
            let started = Instant::now();
            let next = match decide(&self.identity, self.tracker.last(), started, &self.timings) {
                Decision::Wait(d) => started + d,
                d => {
                    self.attempt(d).await;
                    started + self.timings.retry_period
                }
            };
            self.check_leadership();
            let wake = self.wake_at(next, started);
            fresh = self.sleep_or_watch(wake, &mut events, pod.as_mut(), &mut stop, &mut listed, &mut how).await;
        }
        self.stop_as(how).await;
    }

    /// When to wake after a turn that started at `started` and planned its next at `next`: a
    /// leader wakes to renew (or at its deadline); a holder of a new Lease when it may lead; a
    /// standby at the next poll, when the lease would expire, or as soon as the watch shows
    /// something to act on ([`Self::sleep_or_watch`]).
    fn wake_at(&self, next: Instant, started: Instant) -> Instant {
        let mut wake = next;
        if let Some(until) = self.leading() {
            wake = wake.min(until);
        }
        if let Some((_, from)) = self.hold
            && from > started
        {
            wake = wake.min(from);
        }
        wake
    }

    /// The holder incarnation whose pod to follow: another replica's, while we do not lead.
    fn followed(&self) -> Option<&Incarnation> {
        let o = self.tracker.last()?;
        let other = o.record.holder.as_deref().is_some_and(|h| h != self.identity);
        (other && self.leading().is_none()).then_some(o.incarnation.as_ref()).flatten()
    }

    /// Follows the Lease's watch (and the holder's pod, if given) until `wake`. True when what it
    /// saw calls for a write now, which is then fresh enough to act on without a read. Returns
    /// early on new proof of the holder's death, so that the turn is planned again, and, with
    /// `how` set, when `stop` asks to stop (or its sender goes away).
    async fn sleep_or_watch<S>(
        &mut self,
        wake: Instant,
        events: &mut std::pin::Pin<&mut S>,
        mut pod: Option<&mut HolderPod>,
        stop: &mut watch::Receiver<Stop>,
        listed: &mut bool,
        how: &mut Stop,
    ) -> bool
    where
        S: futures::Stream<Item = watcher::Result<Event<Lease>>>,
    {
        loop {
            if let Some(p) = pod.as_deref_mut() {
                p.follow(self.followed());
            }
            let report = async {
                match pod.as_deref_mut() {
                    Some(p) => p.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => return false,
                report = report => if self.judge(&report) {
                    return false;
                },
                ev = events.next() => {
                    let now = Instant::now();
                    match ev {
                        Some(Ok(Event::Apply(lease) | Event::InitApply(lease))) => {
                            *listed = true;
                            self.observe(&lease, now);
                        }
                        Some(Ok(Event::Delete(lease))) => {
                            tracing::info!(lease = %self.name, "the Lease was deleted");
                            self.forget(lease.uid().as_deref());
                        }
                        Some(Ok(Event::Init)) => *listed = false,
                        Some(Ok(Event::InitDone)) => if !*listed {
                            // Deleted while the watch was down.
                            self.forget(None);
                        },
                        Some(Err(_)) => continue,
                        None => return false,
                    }
                    self.check_leadership();
                    if self.must_act() {
                        return true;
                    }
                }
                changed = stop.changed() => {
                    *how = if changed.is_err() { Stop::Release } else { *stop.borrow() };
                    if *how != Stop::No {
                        return false;
                    }
                }
            }
        }
    }

    /// Gives the lease up as `how` says: at once, or, when the controller had to be cancelled, a
    /// safety margin after the fence closed, so that a write still in flight cannot land in the
    /// next term.
    async fn stop_as(&mut self, how: Stop) {
        if how == Stop::ReleaseAfterMargin
            && let Some(until) = self.leading()
        {
            self.publish(None);
            let now = Instant::now();
            let margin = self.timings.lease_duration.saturating_sub(self.timings.renew_deadline);
            // valid_until − renewDeadline is when the last successful renewal started.
            let expires = until - self.timings.renew_deadline + self.timings.written_lease_duration();
            let at = (now + margin).min(expires);
            tracing::info!(wait = ?at.saturating_duration_since(now), "controller was cancelled: releasing the lease after the safety margin");
            tokio::time::sleep_until(at).await;
            self.release_held().await;
        } else {
            self.release().await;
        }
    }

    /// Clears the holder if we lead (or hold a new Lease we may not lead yet): the fence closes
    /// first, then the write.
    pub(crate) async fn release(&mut self) {
        if self.leading().is_none() && self.hold.is_none() {
            return;
        }
        self.publish(None);
        self.release_held().await;
    }

    async fn release_held(&mut self) {
        let spec = released_spec(self.last_spec.as_ref(), now_micro());
        match self.write(spec, None).await {
            Ok(_) => tracing::info!(identity = %self.identity, lease = %self.name, "released the lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the lease failed; it will expire instead"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api::FakeApi;
    use crate::leader::proof::Incarnation;
    use std::time::Duration;

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

    fn timings() -> Timings {
        Timings::default()
    }

    fn lease(holder: &str, renew_second: i64) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "namespace": "ns"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": format!("2026-01-01T00:00:{:02}.000000Z", renew_second % 60)},
        })
    }

    fn elector(fake: &FakeApi, id: &str) -> (Elector, watch::Receiver<Leadership>) {
        Elector::new(fake.client(), "ns", "l", id, timings())
    }

    fn start(
        fake: &FakeApi,
        id: &str,
    ) -> (watch::Receiver<Leadership>, watch::Sender<Stop>, tokio::task::JoinHandle<()>) {
        let (e, rx) = elector(fake, id);
        let (stop, stop_rx) = watch::channel(Stop::No);
        (rx, stop, tokio::spawn(e.run(stop_rx)))
    }

    async fn until_leading(rx: &mut watch::Receiver<Leadership>) -> Instant {
        let _ = rx.wait_for(Option::is_some).await;
        Instant::now()
    }

    fn holder(fake: &FakeApi) -> Option<String> {
        fake.get(LEASES, "l")?.pointer("/spec/holderIdentity")?.as_str().map(str::to_string)
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_read_stamps_the_version_when_it_returns() {
        let fake = FakeApi::default();
        fake.put(LEASES, lease("b", 0));
        let (mut e, _rx) = elector(&fake, "a");
        // The read takes 3 s to reach the server, and b renews meanwhile: the answer carries a
        // version written 3 s after the request left.
        fake.set_delay(Duration::from_secs(3));
        let sent = Instant::now();
        let renew = {
            let fake = fake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                fake.put(LEASES, lease("b", 2));
            })
        };
        e.refresh().await.expect("read");
        renew.await.expect("renew");
        let seen = e.tracker.last().map(|o| o.seen_at).expect("observed");
        assert!(seen >= sent + Duration::from_secs(3), "stamped at the answer, {:?} after sending", seen - sent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_at_its_deadline() {
        let fake = FakeApi::default();
        let (mut rx, _stop, _task) = start(&fake, "a");
        until_leading(&mut rx).await;
        tokio::time::sleep(timings().lease_duration).await;
        let until = rx.borrow().expect("leading after the first term's wait");
        // Every call now hangs: renewals time out, and the leadership ends at valid_until.
        fake.set_blackhole(true);
        let _ = rx.wait_for(Option::is_none).await;
        let late = Instant::now().saturating_duration_since(until);
        assert!(Instant::now() >= until - Duration::from_millis(1), "not before the deadline");
        assert!(late < Duration::from_millis(10), "at the deadline, not {late:?} after it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_lease_stops_its_leader_at_once_and_the_next_term_waits_a_lease_duration() {
        let fake = FakeApi::default();
        let (mut a_rx, _a_stop, _a) = start(&fake, "a");
        let created = Instant::now();
        let led = until_leading(&mut a_rx).await;
        assert!(led >= created + timings().lease_duration, "a Lease we created is led a lease duration later");
        let (mut b_rx, _b_stop, _b) = start(&fake, "b");
        tokio::time::sleep(Duration::from_millis(500)).await;

        fake.delete(LEASES, "l");
        let deleted = Instant::now();
        let _ = a_rx.wait_for(Option::is_none).await;
        assert!(deleted.elapsed() < Duration::from_millis(50), "the leader steps down on the delete event");
        // Someone re-creates it at once, but no one leads before a full lease duration.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(holder(&fake).is_some(), "re-created");
        let first = tokio::select! {
            t = until_leading(&mut a_rx) => t,
            t = until_leading(&mut b_rx) => t,
        };
        assert!(first >= deleted + timings().lease_duration, "led {:?} after the delete", first - deleted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_recreates_an_unseen_deleted_lease_does_not_lead() {
        let fake = FakeApi::default();
        let (mut e, rx) = elector(&fake, "a");
        e.refresh().await.expect("read");
        e.attempt(Decision::Create).await;
        tokio::time::sleep(timings().lease_duration).await;
        e.attempt(Decision::Renew).await;
        assert!(rx.borrow().is_some(), "leading");
        // Deleted while our watch was down: our renewal's PUT re-creates it (201).
        fake.delete_unwatched(LEASES, "l");
        e.attempt(Decision::Renew).await;
        assert_eq!(holder(&fake).as_deref(), Some("a"), "the PUT created a new Lease");
        assert!(rx.borrow().is_none(), "a new Lease object is not led at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_controller_delays_the_release_by_the_margin() {
        let fake = FakeApi::default();
        let (mut rx, stop, task) = start(&fake, "a");
        until_leading(&mut rx).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asked = Instant::now();
        stop.send_replace(Stop::ReleaseAfterMargin);
        let _ = rx.wait_for(Option::is_none).await;
        assert!(asked.elapsed() < Duration::from_millis(10), "the fence closes at once");
        task.await.expect("elector");
        let released = fake
            .requests()
            .into_iter()
            .rfind(|r| r.method == http::Method::PUT)
            .filter(|r| r.body.as_ref().and_then(|b| b.pointer("/spec/holderIdentity")).is_none())
            .expect("a release");
        let margin = timings().lease_duration - timings().renew_deadline;
        assert!(released.at >= asked + margin, "released {:?} after the stop", released.at - asked);
        assert_eq!(holder(&fake), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clean_stop_releases_at_once() {
        let fake = FakeApi::default();
        let (mut rx, stop, task) = start(&fake, "a");
        until_leading(&mut rx).await;
        let asked = Instant::now();
        stop.send_replace(Stop::Release);
        task.await.expect("elector");
        assert!(asked.elapsed() < Duration::from_millis(10));
        assert_eq!(holder(&fake), None);
    }

    // Takeover on proof of death, and only on it.

    const PODS: &str = "/api/v1/namespaces/ns/pods";
    const DEAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const MINE: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    /// The holder's pod `op-b`, its container `DEAD` in `state`; returns its uid.
    fn holder_pod(fake: &FakeApi, state: serde_json::Value) -> String {
        let pod = fake.put(
            PODS,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "op-b", "namespace": "ns"},
                "status": {"containerStatuses": [{"name": "manager", "image": "i", "imageID": "", "ready": true,
                    "restartCount": 0, "containerID": format!("containerd://{DEAD}"), "state": state}]},
            }),
        );
        pod.pointer("/metadata/uid").and_then(|u| u.as_str()).unwrap_or_default().to_string()
    }

    fn running() -> serde_json::Value {
        serde_json::json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}})
    }

    /// b holds the Lease as the container `DEAD` of pod `op-b` (uid `uid`); `None` writes it as
    /// a previous version did, without the annotation.
    fn held_by_b(fake: &FakeApi, uid: Option<&str>) {
        let mut l = lease("b", 0);
        if let Some(uid) = uid {
            let inc = Incarnation {
                namespace: "ns".into(),
                pod: "op-b".into(),
                pod_uid: uid.into(),
                container_id: DEAD.into(),
            };
            let (k, v) = inc.annotation("b");
            l["metadata"]["annotations"] = serde_json::json!({ k: v });
        }
        fake.put(LEASES, l);
    }

    /// A fake where b holds the Lease and its pod's container runs; `annotated: false` writes
    /// the Lease as a previous version did.
    fn b_holds(annotated: bool) -> FakeApi {
        let fake = FakeApi::default();
        let uid = holder_pod(&fake, running());
        held_by_b(&fake, annotated.then_some(uid.as_str()));
        fake
    }

    /// A standby "a" in its own pod, started now, on `fake`.
    fn standby(fake: &FakeApi) -> (watch::Receiver<Leadership>, watch::Sender<Stop>, tokio::task::JoinHandle<()>) {
        let me = Incarnation {
            namespace: "ns".into(),
            pod: "op-a".into(),
            pod_uid: "uid-a".into(),
            container_id: MINE.into(),
        };
        let (e, rx) = elector(fake, "a");
        let (stop, stop_rx) = watch::channel(Stop::No);
        (rx, stop, tokio::spawn(e.with_incarnation(me, Instant::now()).run(stop_rx)))
    }

    /// When "a" first wrote the Lease.
    fn first_write_of_a(fake: &FakeApi) -> Option<Instant> {
        fake.requests().into_iter().find(|r| r.method == http::Method::PUT && r.uri.contains("/leases/l")).map(|r| r.at)
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_takes_over_once_the_holders_container_is_reported_terminated() {
        let fake = b_holds(true);
        let seen = Instant::now();
        let (mut rx, _stop, _task) = standby(&fake);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(rx.borrow().is_none(), "b's container runs: no takeover");

        let terminated = serde_json::json!({"terminated": {"exitCode": 134, "reason": "Error",
            "containerID": format!("containerd://{DEAD}")}});
        holder_pod(&fake, terminated);
        let reported = Instant::now();
        let led = until_leading(&mut rx).await;
        let in_flight = timings().in_flight();
        assert!(led >= reported + in_flight, "not before the dead leader's writes have expired");
        assert!(led < reported + in_flight + Duration::from_millis(50), "led {:?} after the report", led - reported);
        assert!(led < seen + timings().lease_duration, "long before expiry");
        assert!(first_write_of_a(&fake).is_some_and(|w| w >= reported + in_flight), "a's first write waited too");
        // What a now holds names its own incarnation.
        let annotation = fake.get(LEASES, "l").and_then(|l| l.pointer("/metadata/annotations").cloned());
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(annotation.unwrap_or_default()).expect("annotations");
        assert_eq!(
            Incarnation::of_holder(Some(&annotations), Some("a")).map(|i| i.container_id),
            Some(MINE.to_string())
        );
    }

    /// Starts a standby against b's Lease, does `fault` to b's pod (or nothing), and returns
    /// how long after its first read the standby took over.
    async fn takeover_after(fake: &FakeApi, fault: impl FnOnce(&FakeApi)) -> Duration {
        let seen = Instant::now();
        let (mut rx, _stop, _task) = standby(fake);
        tokio::time::sleep(Duration::from_secs(1)).await;
        fault(fake);
        until_leading(&mut rx).await - seen
    }

    #[tokio::test(start_paused = true)]
    async fn without_proof_a_standby_waits_for_expiry() {
        let lease = timings().lease_duration;
        let at_expiry = |d: Duration| d >= lease && d < lease + timings().retry_period;
        let terminated = serde_json::json!({"terminated": {"exitCode": 137, "reason": "Error",
            "containerID": format!("containerd://{DEAD}")}});

        // b stops renewing, its pod still says running (a hung process, a partition).
        let fake = b_holds(true);
        let d = takeover_after(&fake, |_| {}).await;
        assert!(at_expiry(d), "silent holder: {d:?}");

        // The pod object is deleted (a force delete): its absence proves nothing.
        let fake = b_holds(true);
        let d = takeover_after(&fake, |f| {
            f.delete(PODS, "op-b");
        })
        .await;
        assert!(at_expiry(d), "deleted pod: {d:?}");

        // ... and re-created under the same name, as another pod, whose container then exits.
        let fake = b_holds(true);
        let d = takeover_after(&fake, |f| {
            f.delete(PODS, "op-b");
            holder_pod(f, terminated.clone());
        })
        .await;
        assert!(at_expiry(d), "a new pod of the same name: {d:?}");

        // The pod NotReady, its container still running.
        let fake = b_holds(true);
        let d = takeover_after(&fake, |f| {
            let mut pod = f.get(PODS, "op-b").unwrap_or_default();
            pod["status"]["conditions"] = serde_json::json!([{"type": "Ready", "status": "False"}]);
            pod["status"]["containerStatuses"][0]["ready"] = serde_json::json!(false);
            f.put(PODS, pod);
        })
        .await;
        assert!(at_expiry(d), "NotReady pod: {d:?}");

        // A holder of the previous version (no incarnation written): even its container's
        // termination is matched to nothing.
        let fake = b_holds(false);
        let d = takeover_after(&fake, |f| {
            holder_pod(f, terminated.clone());
        })
        .await;
        assert!(at_expiry(d), "old-format holder: {d:?}");

        // Pods cannot be read (RBAC without them): expiry.
        let fake = b_holds(true);
        fake.forbid(PODS);
        let d = takeover_after(&fake, |f| {
            holder_pod(f, terminated.clone());
        })
        .await;
        assert!(at_expiry(d), "pods forbidden: {d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_restarted_container_takes_the_lease_from_its_previous_instance() {
        let fake = FakeApi::default();
        // The previous instance of a's own container (pod op-a, uid-a) held it, as "a-old".
        let old = Incarnation {
            namespace: "ns".into(),
            pod: "op-a".into(),
            pod_uid: "uid-a".into(),
            container_id: DEAD.into(),
        };
        let mut l = lease("a-old", 0);
        let (k, v) = old.annotation("a-old");
        l["metadata"]["annotations"] = serde_json::json!({ k: v });
        fake.put(LEASES, l);
        // Pods cannot even be read: the restart is proof enough.
        fake.forbid(PODS);
        let born = Instant::now();
        let (mut rx, _stop, _task) = standby(&fake);
        let led = until_leading(&mut rx).await;
        assert_eq!(led, born + timings().in_flight(), "at once, but not before the dead one's writes expired");
        assert_eq!(holder(&fake).as_deref(), Some("a"));
    }
}
