//! Lease timings, validated.

use std::time::Duration;

/// Why a set of lease timings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    /// The retry period is zero.
    #[error("retry period must be positive")]
    ZeroRetryPeriod,
    /// The lease does not outlast the renew deadline.
    #[error("lease duration ({lease:?}) must be greater than the renew deadline ({renew:?})")]
    LeaseNotAboveRenewDeadline {
        /// The lease duration (as written, for [`TimingsError::LeaseNotAboveRenewDeadline`] after rounding).
        lease: Duration,
        /// The renew deadline.
        renew: Duration,
    },
    /// The renew deadline leaves no room for a retry.
    #[error("renew deadline ({renew:?}) must be greater than 1.2 × the retry period ({retry:?})")]
    RenewDeadlineTooShort {
        /// The renew deadline.
        renew: Duration,
        /// The retry period.
        retry: Duration,
    },
    /// The lease duration does not fit the Lease API's 32-bit seconds.
    #[error("lease duration ({0:?}) does not fit the Lease API")]
    TooLong(Duration),
    /// A write could still be committed after a standby may take over: the margin between the
    /// fence closing and the lease expiring must exceed a write's whole life ([`Timings::in_flight`]).
    #[error(
        "lease duration − renew deadline ({margin:?}) must be greater than the write timeout plus {DELIVERY_TIMEOUT:?} and {COMMIT_SLACK:?} ({in_flight:?})"
    )]
    MarginBelowWriteLife {
        /// The written lease duration minus the renew deadline.
        margin: Duration,
        /// [`Timings::in_flight`].
        in_flight: Duration,
    },
    /// The write timeout is zero.
    #[error("write timeout must be positive")]
    ZeroWriteTimeout,
}

/// What a write may still take after its deadline, beyond [`Timings::write_timeout`]: an etcd
/// transaction the API server had already sent when its request deadline passed commits within
/// etcd's own commit latency, and the API server reads a request its kernel received without
/// delay. Both are milliseconds on a healthy control plane; this bounds them.
pub const COMMIT_SLACK: Duration = Duration::from_millis(100);

/// How long bytes of a fenced write may stay unacknowledged by the API server's host before the
/// connection is aborted: `TCP_USER_TIMEOUT` on every connection of the controller's client
/// ([`crate::controller::fenced::client`]). The kernel retransmits only within this time and
/// then drops the connection with whatever it still held, even for a process that has died
/// meanwhile. Without it, a request written just before a partition is retransmitted when the
/// network heals, possibly tens of seconds later, and the API server's deadline counts from
/// that late receipt. With it, a request reaches the API server within this of leaving the
/// process, or never. It is shorter than the kernel's minimum retransmission timeout (200 ms),
/// so a segment lost once fails its request (which is retried with backoff) instead of being
/// sent again.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a lease lasts, how long a leader keeps trying to renew, and how often anyone acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a standby waits, from when it last saw the record change, before taking over.
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down by itself.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby re-checks the lease.
    pub retry_period: Duration,
    /// The deadline of every fenced write (the controller's): the client gives up after it, and
    /// the API server is told the same (`?timeout=`), so that it abandons the request too. A
    /// write that takes longer fails and is retried with backoff.
    pub write_timeout: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Timings {
    /// client-go's defaults: 15 s / 10 s / 2 s; writes bounded by 400 ms (see
    /// [`Self::in_flight`] for what that costs a failover).
    pub const DEFAULT: Timings = Timings {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
        write_timeout: Duration::from_millis(400),
    };

    /// Checks `lease_duration > renew_deadline > retry_period × 1.2`, as client-go requires, and
    /// that a write's whole life fits the margin after the fence closes:
    /// `lease_duration − renew_deadline > DELIVERY_TIMEOUT + write_timeout + COMMIT_SLACK`.
    pub fn validate(&self) -> Result<(), TimingsError> {
        if self.retry_period.is_zero() {
            return Err(TimingsError::ZeroRetryPeriod);
        }
        if self.write_timeout.is_zero() {
            return Err(TimingsError::ZeroWriteTimeout);
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(TimingsError::LeaseNotAboveRenewDeadline {
                lease: self.lease_duration,
                renew: self.renew_deadline,
            });
        }
        if self.renew_deadline.as_secs_f64() <= self.retry_period.as_secs_f64() * 1.2 {
            return Err(TimingsError::RenewDeadlineTooShort { renew: self.renew_deadline, retry: self.retry_period });
        }
        // What standbys wait is what is written: whole seconds, rounded up.
        if self.lease_duration.as_secs_f64().ceil() > f64::from(i32::MAX) {
            return Err(TimingsError::TooLong(self.lease_duration));
        }
        if self.written_lease_duration() <= self.renew_deadline {
            return Err(TimingsError::LeaseNotAboveRenewDeadline {
                lease: self.written_lease_duration(),
                renew: self.renew_deadline,
            });
        }
        if self.margin() <= self.in_flight() {
            return Err(TimingsError::MarginBelowWriteLife { margin: self.margin(), in_flight: self.in_flight() });
        }
        Ok(())
    }

    /// The margin between a leader's fence closing (`valid_until`) and the earliest instant a
    /// standby may see its lease expire: the written lease duration minus the renew deadline.
    pub fn margin(&self) -> Duration {
        self.written_lease_duration().saturating_sub(self.renew_deadline)
    }

    /// The longest a fenced write can live after it left the process: [`DELIVERY_TIMEOUT`] to
    /// reach the API server, its deadline, which the API server applies from then, plus
    /// [`COMMIT_SLACK`]. Nothing a process sent can be committed later than this after it sent
    /// it; so a successor that takes over on proof of its predecessor's death writes nothing (the
    /// Lease included) until this has passed since the proof, and the margin after the fence
    /// closes must exceed it ([`Self::validate`]).
    pub fn in_flight(&self) -> Duration {
        DELIVERY_TIMEOUT + self.write_timeout + COMMIT_SLACK
    }

    /// `leaseDurationSeconds` as written: the Lease API counts whole seconds, so the duration is
    /// rounded *up* (a truncation could let standbys take over before the leader's deadline).
    pub fn lease_duration_secs(&self) -> i32 {
        let secs = self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }

    /// The lease duration standbys act on: [`Self::lease_duration_secs`] as a duration.
    pub fn written_lease_duration(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.lease_duration_secs()).unwrap_or(0))
    }

    /// The timeout of every Lease API call: half the renew deadline, so a leader always gets at
    /// least two attempts before it must step down.
    pub fn call_timeout(&self) -> Duration {
        self.renew_deadline / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(l: u64, r: u64, p: u64) -> Timings {
        Timings {
            lease_duration: Duration::from_millis(l),
            renew_deadline: Duration::from_millis(r),
            retry_period: Duration::from_millis(p),
            write_timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Timings::default().validate(), Ok(()));
        assert_eq!(Timings::default().call_timeout(), Duration::from_secs(5));
    }

    #[test]
    fn ordering_is_enforced() {
        assert!(matches!(t(10_000, 10_000, 2_000).validate(), Err(TimingsError::LeaseNotAboveRenewDeadline { .. })));
        assert!(matches!(t(15_000, 2_400, 2_000).validate(), Err(TimingsError::RenewDeadlineTooShort { .. })));
        assert!(t(15_000, 2_401, 2_000).validate().is_ok());
        assert_eq!(t(15_000, 10_000, 0).validate(), Err(TimingsError::ZeroRetryPeriod));
        // Sub-second durations are written rounded up, and that is what is validated.
        assert!(t(900, 600, 100).validate().is_ok());
        assert_eq!(t(900, 600, 100).lease_duration_secs(), 1);
        assert_eq!(t(2_000, 1_500, 500).lease_duration_secs(), 2);
        assert_eq!(t(2_001, 1_500, 500).lease_duration_secs(), 3);
        assert!(matches!(t(u64::MAX / 2, 10_000, 2_000).validate(), Err(TimingsError::TooLong(_))));
    }

    #[test]
    fn a_write_lives_shorter_than_the_margin_after_the_fence() {
        // The shipped timings: a write outlives its fence by at most 0.6 s, the margin is 5 s.
        let d = Timings::DEFAULT;
        assert_eq!(d.in_flight(), DELIVERY_TIMEOUT + d.write_timeout + COMMIT_SLACK);
        assert!(d.in_flight() < d.margin(), "{:?} must be below {:?}", d.in_flight(), d.margin());
        // A failover on proof of death waits the same in_flight: keep it small, or the
        // death → first reconcile target (p50 < 1 s) is lost to it.
        assert!(d.in_flight() <= Duration::from_millis(600), "{:?}", d.in_flight());
        // Write timeouts as long as the margin (or longer) are refused.
        for write in [4_800, 5_000, 30_000] {
            let long = Timings { write_timeout: Duration::from_millis(write), ..d };
            assert!(matches!(long.validate(), Err(TimingsError::MarginBelowWriteLife { .. })), "{write} ms passed");
        }
        assert!(Timings { write_timeout: Duration::from_millis(4_799), ..d }.validate().is_ok());
        assert_eq!(Timings { write_timeout: Duration::ZERO, ..d }.validate(), Err(TimingsError::ZeroWriteTimeout));
        // The margin is counted on the lease as written (whole seconds): 1 s − 0.8 s leaves
        // 200 ms, which a 100 ms write and the slack (200 ms) do not fit.
        let tight = t(900, 800, 100);
        assert_eq!(tight.margin(), Duration::from_millis(200));
        assert!(matches!(tight.validate(), Err(TimingsError::MarginBelowWriteLife { .. })));
    }
}
