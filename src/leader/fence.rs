//! The fence: permission to write, bounded by the leadership's `valid_until`.

use super::Leadership;
use crate::{Error, Result};
use tokio::sync::watch;
use tokio::time::Instant;

/// Permission to write, bounded in time. The leader elector publishes the instant until which
/// this replica's leadership is certain (`valid_until`); every write checks it first. Without an
/// elector (a single replica, `--leader-elect=false`) the fence is open.
#[derive(Clone, Debug)]
pub struct Fence(Option<watch::Receiver<Leadership>>);

impl Fence {
    /// A fence that always allows writes.
    pub fn open() -> Self {
        Self(None)
    }

    /// A fence that follows the elector's `valid_until`; `None` means "not the leader".
    pub fn new(valid_until: watch::Receiver<Leadership>) -> Self {
        Self(Some(valid_until))
    }

    /// `Ok` while writes are allowed at this instant.
    pub fn check(&self) -> Result<()> {
        match &self.0 {
            None => Ok(()),
            Some(rx) => match *rx.borrow() {
                Some(until) if Instant::now() < until => Ok(()),
                _ => Err(Error::Fenced),
            },
        }
    }
}
