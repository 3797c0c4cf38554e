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
}

/// How long a lease lasts, how long a leader keeps trying to renew, and how often anyone acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a standby waits, from when it last saw the record change, before taking over.
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down by itself.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby re-checks the lease.
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Timings {
    /// client-go's defaults: 15 s / 10 s / 2 s.
    pub const DEFAULT: Timings = Timings {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    /// Checks `lease_duration > renew_deadline > retry_period × 1.2`, as client-go requires.
    pub fn validate(&self) -> Result<(), TimingsError> {
        if self.retry_period.is_zero() {
            return Err(TimingsError::ZeroRetryPeriod);
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
        Ok(())
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
        assert!(t(900, 800, 100).validate().is_ok());
        assert_eq!(t(900, 800, 100).lease_duration_secs(), 1);
        assert_eq!(t(2_000, 1_500, 500).lease_duration_secs(), 2);
        assert_eq!(t(2_001, 1_500, 500).lease_duration_secs(), 3);
        assert!(matches!(t(u64::MAX / 2, 10_000, 2_000).validate(), Err(TimingsError::TooLong(_))));
    }
}
