//! The fence: permission to write, bounded by the leadership's `valid_until`.

use super::elector::Leadership;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where a replica's right to write comes from.
#[derive(Clone, Debug)]
pub(crate) enum Mandate {
    /// Won in an election: valid while the elector's `valid_until` lies ahead (`None`: not the
    /// leader).
    Elected(watch::Receiver<Leadership>),
    /// No election (`--leader-elect=false`): this replica is the only writer, for the life of the
    /// process.
    Unelected,
}

/// A write refused by the [`Fence`]: this replica is not, or no longer, the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("write refused: this replica does not hold the lease")]
pub struct Fenced;

/// Permission to write, bounded in time. The leader elector publishes the instant until which
/// this replica's leadership is certain (`valid_until`); every write checks it first. Without an
/// election (`Mandate::Unelected`) the fence never closes.
#[derive(Clone, Debug)]
pub struct Fence(Mandate);

impl Fence {
    /// A fence that follows the elector's `valid_until`; `None` means "not the leader".
    pub fn new(valid_until: watch::Receiver<Leadership>) -> Self {
        Self(Mandate::Elected(valid_until))
    }

    /// The fence of `mandate`.
    pub(crate) fn of(mandate: Mandate) -> Self {
        Self(mandate)
    }

    /// `Ok` while writes are allowed at this instant.
    pub fn check(&self) -> Result<(), Fenced> {
        match &self.0 {
            Mandate::Unelected => Ok(()),
            Mandate::Elected(rx) => match *rx.borrow() {
                Some(until) if Instant::now() < until => Ok(()),
                _ => Err(Fenced),
            },
        }
    }
}
