//! The election as a pure state machine: what this replica saw of the Lease, when it saw it
//! change (on the local monotonic clock), and what it should do next. No I/O, no wall clock.

use super::Timings;
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use std::time::Duration;
use tokio::time::Instant;

/// The parts of a Lease the election depends on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Record {
    /// Who holds it; `None` (or empty) when released.
    pub holder: Option<String>,
    /// The holder's lease duration, in seconds.
    pub lease_duration_secs: i32,
    /// How many times the holder changed.
    pub transitions: i32,
}

impl Record {
    /// Reads a Lease's spec.
    pub fn from_spec(spec: Option<&LeaseSpec>) -> Self {
        let spec = spec.cloned().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration_secs: spec.lease_duration_seconds.unwrap_or(0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// The last version of the Lease this replica saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The record.
    pub record: Record,
    /// Its resourceVersion: the precondition of our next write.
    pub resource_version: String,
    /// When this replica first saw this version. Expiry counts from here, never from the
    /// remote `renewTime`, so clock offsets between machines do not matter.
    pub seen_at: Instant,
}

/// Keeps the latest observation.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    last: Option<Observation>,
}

impl Tracker {
    /// Records a read. `seen_at` moves only when the resourceVersion changed: re-reading an
    /// unchanged lease does not make it look fresh.
    pub fn observe(&mut self, record: Record, resource_version: String, now: Instant) {
        match &mut self.last {
            Some(o) if o.resource_version == resource_version => o.record = record,
            _ => self.last = Some(Observation { record, resource_version, seen_at: now }),
        }
    }

    /// Records that the Lease does not exist.
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// The latest observation.
    pub fn last(&self) -> Option<&Observation> {
        self.last.as_ref()
    }
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// The Lease is free or expired: take it (a write conditional on the version we saw).
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it and it has not expired: check again after at most this long.
    Wait(Duration),
}

/// Decides from the latest observation.
pub fn decide(me: &str, observed: Option<&Observation>, now: Instant, timings: &Timings) -> Decision {
    let Some(o) = observed else { return Decision::Create };
    match o.record.holder.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None => Decision::Acquire,
        Some(_) => {
            let duration = Duration::from_secs(u64::try_from(o.record.lease_duration_secs.max(1)).unwrap_or(1));
            let expiry = o.seen_at + duration;
            if now >= expiry { Decision::Acquire } else { Decision::Wait((expiry - now).min(timings.retry_period)) }
        }
    }
}

/// The spec to write when `me` takes or renews the lease; `old` is what we saw (if anything).
pub fn holding_spec(me: &str, old: Option<&LeaseSpec>, now: MicroTime, timings: &Timings) -> LeaseSpec {
    let old_holder = old.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty());
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    let changed = old_holder.as_deref() != Some(me);
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(i32::try_from(timings.lease_duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if changed { Some(now.clone()) } else { old.and_then(|s| s.acquire_time.clone()) },
        renew_time: Some(now),
        // As client-go: every change of holder counts, including taking a released lease.
        lease_transitions: Some(if changed && old.is_some() { transitions + 1 } else { transitions }),
        ..LeaseSpec::default()
    }
}

/// The spec that releases the lease: no holder, transitions kept, a 1 s duration so that
/// anyone still polling takes it at once.
pub fn released_spec(old: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
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
        Record { holder: holder.map(str::to_string), lease_duration_secs: secs, transitions: 0 }
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
        tr.observe(record(Some("a"), 15), "1".into(), t0);
        assert_eq!(decide("a", tr.last(), t0, &Timings::default()), Decision::Renew);
        tr.observe(record(None, 1), "2".into(), t0);
        assert_eq!(decide("a", tr.last(), t0, &Timings::default()), Decision::Acquire);
    }

    #[test]
    fn expiry_counts_from_when_the_record_last_changed() {
        let timings = Timings::default();
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        tr.observe(record(Some("b"), 15), "7".into(), t0);
        // Re-reading the same version later does not refresh it.
        tr.observe(record(Some("b"), 15), "7".into(), t0 + Duration::from_secs(10));
        assert_eq!(tr.last().map(|o| o.seen_at), Some(t0));
        assert_eq!(
            decide("a", tr.last(), t0 + Duration::from_secs(14), &timings),
            Decision::Wait(Duration::from_secs(1))
        );
        assert_eq!(decide("a", tr.last(), t0 + Duration::from_secs(15), &timings), Decision::Acquire);
        // A renewal by b (new version) restarts the clock.
        tr.observe(record(Some("b"), 15), "8".into(), t0 + Duration::from_secs(14));
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
        tr.observe(record(Some("b"), 3600), "1".into(), t0);
        assert_eq!(decide("a", tr.last(), t0, &timings), Decision::Wait(timings.retry_period));
    }

    #[test]
    fn remote_clock_is_irrelevant() {
        // The spec's renewTime is never read: two observations with absurd remote times decide
        // the same way, because only versions and local instants count.
        let t0 = Instant::now();
        let mut tr = Tracker::default();
        tr.observe(record(Some("b"), 15), "1".into(), t0);
        let d1 = decide("a", tr.last(), t0 + Duration::from_secs(5), &Timings::default());
        assert_eq!(d1, Decision::Wait(Duration::from_secs(2)));
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
}
