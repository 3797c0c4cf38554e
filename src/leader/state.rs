//! The election as a pure state machine: what this replica saw of the Lease, when it saw it
//! change (on the local monotonic clock), and what it should do next. No I/O, no wall clock.

use super::proof::Incarnation;
use super::timings::Timings;
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use std::time::Duration;
use tokio::time::Instant;

/// The election record: the parts of a Lease the election depends on. Expiry follows this
/// record, never the resourceVersion, so that a write by a third party that changes nothing here
/// (a label, an annotation) does not keep a dead leader alive.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct Record {
    /// Who holds it; `None` (or empty) when released.
    pub(crate) holder: Option<String>,
    /// The holder's lease duration, in seconds.
    pub(crate) lease_duration_secs: i32,
    /// When the holder acquired it (remote clock: compared for change only, never with ours).
    pub(crate) acquire_time: Option<MicroTime>,
    /// When the holder last renewed it (remote clock: compared for change only).
    pub(crate) renew_time: Option<MicroTime>,
    /// How many times the holder changed.
    pub(crate) transitions: i32,
}

impl Record {
    /// Reads a Lease's spec.
    pub(crate) fn from_spec(spec: Option<&LeaseSpec>) -> Self {
        let spec = spec.cloned().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration_secs: spec.lease_duration_seconds.unwrap_or(0),
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// The last version of the Lease this replica saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Observation {
    /// The record.
    pub(crate) record: Record,
    /// Its resourceVersion: the precondition of our next write.
    pub(crate) resource_version: String,
    /// The Lease object's uid: a new uid is a new Lease (the old one was deleted).
    pub(crate) uid: String,
    /// When this replica first saw this record, stamped when the read *returned*. Expiry counts
    /// from here, never from the remote `renewTime`, so clock offsets between machines do not
    /// matter, and a slow read cannot make a new record look older than it is.
    pub(crate) seen_at: Instant,
    /// The container incarnation the Lease says holds it, if it says so for this holder
    /// ([`Incarnation::of_holder`]). Metadata, not part of the record: a change alone does not
    /// restart the expiry clock, but it voids a proof.
    pub(crate) incarnation: Option<Incarnation>,
    /// When this replica saw proof that this holder's process has exited
    /// ([`super::proof`]): it may take the Lease [`Timings::in_flight`] after this instant,
    /// before expiry. Void when the record or the incarnation changes.
    pub(crate) proven_dead_at: Option<Instant>,
}

/// What an observation did to the tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A new record (or a new Lease object): the expiry clock restarted.
    Changed,
    /// The same record, perhaps at a newer resourceVersion: the expiry clock runs on.
    Unchanged,
    /// Older than what we already saw (a late watch event): ignored.
    Stale,
}

/// True when `a` is an older resourceVersion than `b`. resourceVersions are opaque to clients
/// in general; the API server's (etcd's revision) are integers, and only when both parse does
/// this compare them. Anything else is taken as not older.
fn older(a: &str, b: &str) -> bool {
    matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a < b)
}

/// Keeps the latest observation.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tracker {
    last: Option<Observation>,
}

impl Tracker {
    /// Records a read made (returned) at `now`. The expiry clock (`seen_at`) restarts only when
    /// the election record changed or the Lease is a new object; a late event of an older
    /// version of the same object is ignored, so it can neither roll the precondition back nor
    /// make a leader look replaced.
    pub(crate) fn observe(
        &mut self,
        record: Record,
        incarnation: Option<Incarnation>,
        resource_version: String,
        uid: String,
        now: Instant,
    ) -> Seen {
        match &mut self.last {
            Some(o) if o.uid == uid && older(&resource_version, &o.resource_version) => Seen::Stale,
            Some(o) if o.uid == uid && o.record == record => {
                o.resource_version = resource_version;
                if o.incarnation != incarnation {
                    o.incarnation = incarnation;
                    o.proven_dead_at = None;
                }
                Seen::Unchanged
            }
            _ => {
                let seen_at = now;
                self.last =
                    Some(Observation { record, resource_version, uid, seen_at, incarnation, proven_dead_at: None });
                Seen::Changed
            }
        }
    }

    /// Records proof, seen at `at`, that the process of the holder incarnation `dead` has exited.
    /// It counts only if `dead` is the incarnation of the holder we last saw; the earliest proof
    /// is kept. True when it counted and is new.
    pub(crate) fn prove(&mut self, dead: &Incarnation, at: Instant) -> bool {
        match &mut self.last {
            Some(o) if o.record.holder.is_some() && o.incarnation.as_ref() == Some(dead) => {
                let new = o.proven_dead_at.is_none_or(|p| at < p);
                if new {
                    o.proven_dead_at = Some(at);
                }
                new
            }
            _ => false,
        }
    }

    /// Records that the Lease with `uid` was deleted (or, with `None`, that no Lease exists).
    /// A late delete of an older object than the one we track is ignored.
    pub(crate) fn forget(&mut self, uid: Option<&str>) {
        if uid.is_none_or(|u| self.last.as_ref().is_some_and(|o| o.uid == u)) {
            self.last = None;
        }
    }

    /// The latest observation.
    pub(crate) fn last(&self) -> Option<&Observation> {
        self.last.as_ref()
    }
}

/// When a successful write of ours (started at `started`, answered with the Lease object
/// `written_uid`) may start a leadership. A write to the Lease we had observed leads at once. A
/// write that made a *new* Lease object (we created it, or the one we saw was deleted and our
/// write re-created it) leads only a full lease duration later: a leader of the deleted Lease may
/// not have seen the delete and may still be writing, until its own renew deadline, which is
/// shorter than the lease duration.
pub(crate) fn leads_from(
    before: Option<&Observation>,
    written_uid: &str,
    started: Instant,
    timings: &Timings,
) -> Instant {
    match before {
        Some(o) if o.uid == written_uid => started,
        _ => started + timings.written_lease_duration(),
    }
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// The Lease is free or expired: take it (a write conditional on the version we saw).
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it and it has not expired: check again after at most this long.
    Wait(Duration),
}

/// Decides from the latest observation: take a free Lease at once, another holder's once it
/// expired, or, on proof that the holder's process exited ([`Tracker::prove`]),
/// [`Timings::in_flight`] after the proof. Nothing else shortens the wait.
pub(crate) fn decide(me: &str, observed: Option<&Observation>, now: Instant, timings: &Timings) -> Decision {
    let Some(o) = observed else { return Decision::Create };
    match o.record.holder.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None => Decision::Acquire,
        Some(_) => {
            let duration = Duration::from_secs(u64::try_from(o.record.lease_duration_secs.max(1)).unwrap_or(1));
            let expiry = o.seen_at + duration;
            // On proof of death, once whatever the dead process sent can no longer commit.
            let early = o.proven_dead_at.map(|p| p + timings.in_flight());
            let at = early.map_or(expiry, |e| e.min(expiry));
            if now >= at { Decision::Acquire } else { Decision::Wait((at - now).min(timings.retry_period)) }
        }
    }
}

/// The spec to write when `me` takes or renews the lease; `old` is what we saw (if anything).
pub(crate) fn holding_spec(me: &str, old: Option<&LeaseSpec>, now: MicroTime, timings: &Timings) -> LeaseSpec {
    let old_holder = old.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    let changed = old_holder.as_deref() != Some(me);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(timings.lease_duration_secs()),
        acquire_time: if changed { Some(now.clone()) } else { old.and_then(|s| s.acquire_time.clone()) },
        renew_time: Some(now),
        // As client-go: every change of holder counts, including taking a released lease.
        // Saturating: the API server refuses a negative count, so a wrap would wedge the Lease.
        lease_transitions: Some(if changed && old.is_some() { transitions.saturating_add(1) } else { transitions }),
        ..LeaseSpec::default()
    }
}

/// The spec that releases the lease: no holder, transitions kept, a 1 s duration so that
/// anyone still polling takes it at once.
pub(crate) fn released_spec(old: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: old.and_then(|s| s.acquire_time.clone()),
        renew_time: Some(now),
        lease_transitions: old.and_then(|s| s.lease_transitions),
        ..LeaseSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, secs: i32) -> Record {
        Record { holder: holder.map(str::to_string), lease_duration_secs: secs, ..Record::default() }
    }

    /// Observes `rec` at `rv` of the Lease object "u1".
    fn see(tr: &mut Tracker, rec: Record, rv: &str, at: Instant) -> Seen {
        tr.observe(rec, None, rv.into(), "u1".into(), at)
    }

    fn micro(s: i64) -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::from_second(s).expect("timestamp"))
    }

    #[test]
    fn no_lease_means_create() {
        assert_eq!(decide("a", None, Instant::now(), &Timings::default()), Decision::Create);
    }

    #[test]
    fn own_lease_is_renewed_and_free_lease_acquired() {
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        see(&mut tr, record(Some("a"), 15), "1", t0);
        assert_eq!(decide("a", tr.last(), t0, &Timings::default()), Decision::Renew);
        see(&mut tr, record(None, 1), "2", t0);
        assert_eq!(decide("a", tr.last(), t0, &Timings::default()), Decision::Acquire);
    }

    #[test]
    fn expiry_counts_from_when_the_record_last_changed() {
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        see(&mut tr, record(Some("b"), 15), "7", t0);
        // Re-reading the same version later does not refresh it.
        assert_eq!(see(&mut tr, record(Some("b"), 15), "7", t0 + Duration::from_secs(10)), Seen::Unchanged);
        assert_eq!(tr.last().map(|o| o.seen_at), Some(t0));
        assert_eq!(
            decide("a", tr.last(), t0 + Duration::from_secs(14), &timings),
            Decision::Wait(Duration::from_secs(1))
        );
        assert_eq!(decide("a", tr.last(), t0 + Duration::from_secs(15), &timings), Decision::Acquire);
        // A renewal by b (a new renewTime) restarts the clock.
        let mut renewed = record(Some("b"), 15);
        renewed.renew_time = Some(micro(1));
        assert_eq!(see(&mut tr, renewed, "8", t0 + Duration::from_secs(14)), Seen::Changed);
        assert_eq!(
            decide("a", tr.last(), t0 + Duration::from_secs(15), &timings),
            Decision::Wait(timings.retry_period)
        );
        assert_eq!(decide("a", tr.last(), t0 + Duration::from_secs(29), &timings), Decision::Acquire);
    }

    #[test]
    fn waits_are_bounded_by_the_retry_period() {
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        see(&mut tr, record(Some("b"), 3600), "1", t0);
        assert_eq!(decide("a", tr.last(), t0, &timings), Decision::Wait(timings.retry_period));
    }

    #[test]
    fn remote_clock_is_irrelevant() {
        // Two holders whose renewTimes are an hour in the past and an hour in the future of our
        // wall clock, seen at the same local instant, expire at the same local instant: a
        // comparison of renewTime with our clock anywhere would tell them apart.
        let timings = Timings::default();
        let t0 = Instant::now();
        let wall = k8s_openapi::jiff::Timestamp::now().as_second();
        let decisions = |renew: i64| {
            let mut tr = Tracker::default();
            let mut rec = record(Some("b"), 15);
            rec.renew_time = Some(micro(wall + renew));
            rec.acquire_time = Some(micro(wall + renew));
            see(&mut tr, rec, "1", t0);
            [0, 5, 14, 15, 16].map(|s| decide("a", tr.last(), t0 + Duration::from_secs(s), &timings))
        };
        let past = decisions(-3600);
        assert_eq!(past, decisions(3600));
        assert_eq!(past[2], Decision::Wait(Duration::from_secs(1)));
        assert_eq!(past[3], Decision::Acquire);
    }

    #[test]
    fn a_metadata_only_write_does_not_keep_a_dead_leader_alive() {
        // A third party labels the Lease: new resourceVersion, same election record.
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        see(&mut tr, record(Some("b"), 15), "7", t0);
        assert_eq!(see(&mut tr, record(Some("b"), 15), "9", t0 + Duration::from_secs(10)), Seen::Unchanged);
        assert_eq!(tr.last().map(|o| (o.seen_at, o.resource_version.as_str())), Some((t0, "9")));
        assert_eq!(decide("a", tr.last(), t0 + Duration::from_secs(15), &timings), Decision::Acquire);
    }

    #[test]
    fn a_late_event_neither_rolls_back_nor_replaces_the_leader() {
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        // We took the lease at version 12; the watch then delivers b's older version 11.
        see(&mut tr, record(Some("a"), 15), "12", t0);
        assert_eq!(see(&mut tr, record(Some("b"), 15), "11", t0), Seen::Stale);
        assert_eq!(tr.last().map(|o| o.resource_version.as_str()), Some("12"));
        assert_eq!(decide("a", tr.last(), t0, &Timings::default()), Decision::Renew);
        // Versions that are not integers are never taken as older.
        assert_eq!(see(&mut tr, record(Some("b"), 15), "x", t0), Seen::Changed);
    }

    #[test]
    fn a_new_lease_object_restarts_the_clock_and_late_deletes_are_ignored() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3);
        let mut tr = Tracker::default();
        see(&mut tr, record(Some("b"), 15), "5", t0);
        // Deleted and re-created with the same record: a new object, a new clock.
        assert_eq!(tr.observe(record(Some("b"), 15), None, "8".into(), "u2".into(), later), Seen::Changed);
        assert_eq!(tr.last().map(|o| o.seen_at), Some(later));
        tr.forget(Some("u1"));
        assert!(tr.last().is_some(), "the delete of the old object does not forget the new one");
        tr.forget(Some("u2"));
        assert!(tr.last().is_none());
    }

    #[test]
    fn a_new_lease_object_is_led_only_after_a_full_lease_duration() {
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        assert_eq!(leads_from(None, "u1", t0, &timings), t0 + Duration::from_secs(15), "we created it");
        see(&mut tr, record(None, 1), "5", t0);
        assert_eq!(leads_from(tr.last(), "u1", t0, &timings), t0, "the Lease we saw, taken");
        assert_eq!(leads_from(tr.last(), "u2", t0, &timings), t0 + Duration::from_secs(15), "re-created under us");
    }

    #[test]
    fn transitions_saturate_instead_of_overflowing() {
        let timings = Timings::default();
        let old =
            LeaseSpec { holder_identity: Some("b".into()), lease_transitions: Some(i32::MAX), ..LeaseSpec::default() };
        let taken = holding_spec("a", Some(&old), micro(1), &timings);
        assert_eq!(taken.lease_transitions, Some(i32::MAX));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
    }

    #[test]
    fn a_sub_second_lease_duration_is_written_rounded_up() {
        let timings = Timings {
            lease_duration: Duration::from_millis(10_500),
            renew_deadline: Duration::from_millis(10_200),
            retry_period: Duration::from_secs(2),
            write_timeout: Duration::from_millis(400),
        };
        assert_eq!(timings.validate(), Ok(()));
        // Truncated to 10 s, standbys would take over before the leader's deadline of 10.2 s.
        assert_eq!(holding_spec("a", None, micro(1), &timings).lease_duration_seconds, Some(11));
    }

    #[test]
    fn holding_spec_counts_transitions_only_on_holder_change() {
        let timings = Timings::default();
        let first = holding_spec("a", None, micro(100), &timings);
        assert_eq!(first.lease_transitions, Some(0));
        assert_eq!(first.acquire_time, Some(micro(100)));
        assert_eq!(first.lease_duration_seconds, Some(15));

        let renewed = holding_spec("a", Some(&first), micro(102), &timings);
        assert_eq!(renewed.lease_transitions, Some(0));
        assert_eq!(renewed.acquire_time, Some(micro(100)));
        assert_eq!(renewed.renew_time, Some(micro(102)));

        let taken = holding_spec("b", Some(&renewed), micro(120), &timings);
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(micro(120)));

        let released = released_spec(Some(&taken), micro(130));
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_transitions, Some(1));
        // Taking a released lease is a transition too, as in client-go.
        let after = holding_spec("c", Some(&released), micro(131), &timings);
        assert_eq!(after.lease_transitions, Some(2));
    }

    #[test]
    fn record_treats_empty_holder_as_released() {
        let spec = LeaseSpec { holder_identity: Some(String::new()), ..LeaseSpec::default() };
        assert_eq!(Record::from_spec(Some(&spec)).holder, None);
    }

    fn incarnation(container: &str) -> Incarnation {
        Incarnation { namespace: "ns".into(), pod: "p".into(), pod_uid: "u".into(), container_id: container.into() }
    }

    /// A tracker that saw b hold the Lease as incarnation `c1` at `t0`.
    fn held_by_b(t0: Instant) -> Tracker {
        let mut tr = Tracker::default();
        tr.observe(record(Some("b"), 15), Some(incarnation("c1")), "1".into(), "u1".into(), t0);
        tr
    }

    #[test]
    fn proof_of_death_takes_over_once_nothing_of_the_dead_can_commit() {
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = held_by_b(t0);
        let proof = t0 + Duration::from_secs(3);
        assert!(tr.prove(&incarnation("c1"), proof));
        assert_eq!(decide("a", tr.last(), proof, &timings), Decision::Wait(timings.in_flight()));
        let just_before = proof + timings.in_flight() - Duration::from_millis(1);
        assert_eq!(decide("a", tr.last(), just_before, &timings), Decision::Wait(Duration::from_millis(1)));
        assert_eq!(decide("a", tr.last(), proof + timings.in_flight(), &timings), Decision::Acquire);
        // A proof seen earlier (a restart counts from its own start) may already be old enough.
        let mut restarted = held_by_b(t0);
        assert!(restarted.prove(&incarnation("c1"), t0 - timings.in_flight()));
        assert_eq!(decide("a", restarted.last(), t0, &timings), Decision::Acquire);
        // Expiry still comes first if it is sooner.
        let mut late = held_by_b(t0);
        late.prove(&incarnation("c1"), t0 + Duration::from_secs(15) - Duration::from_millis(100));
        assert_eq!(decide("a", late.last(), t0 + Duration::from_secs(15), &timings), Decision::Acquire);
    }

    #[test]
    fn without_proof_nothing_shortens_the_wait() {
        // A missed renewal, a NotReady pod, a pod gone, a partition: the state machine hears of
        // none of them as proof, and waits out the lease.
        let timings = Timings::default();
        let t0 = Instant::now();
        let tr = held_by_b(t0);
        for s in [1, 5, 10, 14] {
            let now = t0 + Duration::from_secs(s);
            assert!(matches!(decide("a", tr.last(), now, &timings), Decision::Wait(_)), "at {s} s");
        }
        assert_eq!(decide("a", tr.last(), t0 + Duration::from_secs(15), &timings), Decision::Acquire);
    }

    #[test]
    fn a_proof_counts_only_for_the_incarnation_that_holds() {
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = held_by_b(t0);
        assert!(!tr.prove(&incarnation("c0"), t0), "another container of the pod");
        assert_eq!(tr.last().and_then(|o| o.proven_dead_at), None);
        // An old-format holder (no incarnation) cannot be proven dead at all.
        let mut old = Tracker::default();
        old.observe(record(Some("b"), 15), None, "1".into(), "u1".into(), t0);
        assert!(!old.prove(&incarnation("c1"), t0));
        assert!(matches!(decide("a", old.last(), t0 + Duration::from_secs(1), &timings), Decision::Wait(_)));
        // Nor a released Lease (it is free anyway).
        let mut free = Tracker::default();
        free.observe(record(None, 1), Some(incarnation("c1")), "1".into(), "u1".into(), t0);
        assert!(!free.prove(&incarnation("c1"), t0));
    }

    #[test]
    fn a_new_holder_or_incarnation_voids_the_proof() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        // A new record (here: c took over first) voids it.
        let mut tr = held_by_b(t0);
        tr.prove(&incarnation("c1"), t0);
        tr.observe(record(Some("c"), 15), Some(incarnation("c9")), "2".into(), "u1".into(), later);
        assert_eq!(tr.last().and_then(|o| o.proven_dead_at), None);
        // The same record, but the annotation now names another incarnation: void too, and the
        // expiry clock runs on.
        let mut tr = held_by_b(t0);
        tr.prove(&incarnation("c1"), t0);
        assert_eq!(
            tr.observe(record(Some("b"), 15), Some(incarnation("c2")), "3".into(), "u1".into(), later),
            Seen::Unchanged
        );
        let o = tr.last().expect("observed");
        assert_eq!((o.proven_dead_at, o.seen_at), (None, t0));
        // The same record and incarnation at a newer version (a label): the proof stands.
        let mut tr = held_by_b(t0);
        tr.prove(&incarnation("c1"), t0);
        tr.observe(record(Some("b"), 15), Some(incarnation("c1")), "4".into(), "u1".into(), later);
        assert_eq!(tr.last().and_then(|o| o.proven_dead_at), Some(t0));
        // The earliest proof is kept.
        assert!(!tr.prove(&incarnation("c1"), later));
        assert!(tr.prove(&incarnation("c1"), t0 - Duration::from_secs(1)));
    }
}
