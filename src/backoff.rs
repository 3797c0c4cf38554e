//! The one backoff curve of the operator: exponential from a first wait, doubling, capped, with
//! jitter. Every retry uses it: a failed reconcile ([`crate::controller`]), a deletion waiting for
//! its children, a failed pass of the certificate upkeep, and every watch ([`Backoff::watcher`],
//! through the `backon` crate that kube's watcher takes).

use std::time::Duration;

/// Waits from `min`, doubling with each consecutive failure, at most `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    /// The first wait.
    pub(crate) min: Duration,
    /// The longest wait.
    pub(crate) max: Duration,
}

impl Backoff {
    /// From `min`, doubling, at most `max`.
    pub(crate) const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max }
    }

    /// The wait after `failures` consecutive failures (the first is 1): `min × 2^(failures − 1)`,
    /// at most `max`.
    pub(crate) fn after(self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.min.saturating_mul(1 << doublings).min(self.max)
    }

    /// The wait when the last wait was `waited`: as long again (so the total doubles each time),
    /// within `min` and `max`.
    pub(crate) fn again_after(self, waited: Duration) -> Duration {
        waited.clamp(self.min, self.max)
    }

    /// kube's watcher backoff on this curve: with jitter, never giving up, reset by any event.
    pub(crate) fn watcher(self) -> kube::runtime::watcher::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .into()
    }
}

/// `wait` lengthened by up to `fraction` of itself, as `r` (in `[0, 1)`, clamped) says, to whole
/// milliseconds: so that objects failing together do not retry in lockstep.
pub(crate) fn lengthened(wait: Duration, fraction: f64, r: f64) -> Duration {
    let ms = wait.as_millis() as f64;
    wait + Duration::from_millis((ms * fraction * r.clamp(0.0, 1.0)) as u64)
}

/// `wait` shortened by up to `fraction` of itself, as `r` (in `[0, 1)`) says: so that replicas
/// retrying the same thing drift apart.
pub(crate) fn shortened(wait: Duration, fraction: f64, r: f64) -> Duration {
    wait.mul_f64(1.0 - fraction * r.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURVE: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(300));

    #[test]
    fn doubles_from_the_first_wait_up_to_the_cap() {
        assert_eq!(CURVE.after(0), Duration::from_millis(500));
        assert_eq!(CURVE.after(1), Duration::from_millis(500));
        assert_eq!(CURVE.after(3), Duration::from_secs(2));
        assert_eq!(CURVE.after(30), Duration::from_secs(300));
        assert_eq!(CURVE.after(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn waits_again_as_long_as_it_waited_within_the_bounds() {
        let c = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let secs = |s: u64| c.again_after(Duration::from_secs(s)).as_secs();
        assert_eq!((secs(0), secs(3), secs(3600)), (1, 3, 60));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let s = Duration::from_secs(10);
        assert_eq!(lengthened(s, 0.2, 0.0), s);
        assert_eq!(lengthened(s, 0.2, 7.0), Duration::from_secs(12), "r is clamped");
        assert_eq!(shortened(s, 0.2, 0.0), s);
        assert_eq!(shortened(s, 0.2, 1.0), Duration::from_secs(8));
    }
}
