//! What can go wrong in a reconcile, and how soon a failed one is retried.

use super::ownership;
use crate::backoff::{Backoff, lengthened};
use crate::leader::Fenced;
use std::time::Duration;

/// Everything that can go wrong in a reconcile.
#[derive(thiserror::Error, Debug)]
pub(crate) enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// A document could not be (de)serialized.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    /// This replica may not write (it is not, or no longer, the leader): the [`Fence`] said so.
    ///
    /// [`Fence`]: crate::leader::Fence
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// A child's name is held by objects the `MyApp` does not control; nothing was written to
    /// them. Retried with backoff, so the `MyApp` recovers once they are gone.
    #[error("name conflict: {}", ownership::describe(.0))]
    NameConflict(Vec<ownership::Conflict>),
}

/// Result with the controller's [`Error`].
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable label for metrics and span attributes.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 => "invalid",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::MissingField(_) => "missing_field",
            Error::Serialization(_) => "serialization",
            Error::Fenced(_) => "fenced",
            Error::NameConflict(_) => "name_conflict",
        }
    }
}

/// The per-object retry policy after a failed reconcile: exponential from 500 ms, doubling with
/// each consecutive failure, capped at 5 minutes, with `jitter` (in `[0, 1)`) adding up to 20 %
/// so that objects failing together do not retry in lockstep. Conflicts retry fast: they mean
/// someone else wrote first, not that something is broken.
pub(crate) fn backoff_delay(failures: u32, error: &Error, jitter: f64) -> Duration {
    let conflict = matches!(error, Error::Kube(kube::Error::Api(s)) if s.code == 409);
    let curve = if conflict { CONFLICT_BACKOFF } else { BACKOFF };
    lengthened(curve.after(failures), 0.2, jitter)
}

/// After a failed reconcile: from 500 ms, at most 5 minutes.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(300));
/// After a conflict: from 100 ms, at most 5 minutes.
const CONFLICT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(300));

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status::failure("x", "y").with_code(code))))
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff_delay(1, &api(500), 0.0), Duration::from_millis(500));
        assert_eq!(backoff_delay(2, &api(500), 0.0), Duration::from_millis(1000));
        assert_eq!(backoff_delay(4, &api(500), 0.0), Duration::from_millis(4000));
        assert_eq!(backoff_delay(30, &api(500), 0.0), Duration::from_secs(300));
        assert_eq!(backoff_delay(u32::MAX, &api(500), 0.0), Duration::from_secs(300));
    }

    #[test]
    fn backoff_jitter_is_bounded() {
        assert_eq!(backoff_delay(1, &api(500), 0.999_999), Duration::from_millis(599));
        assert_eq!(backoff_delay(1, &api(500), 7.0), Duration::from_millis(600));
        assert!(backoff_delay(3, &api(500), 0.5) > backoff_delay(3, &api(500), 0.0));
    }

    #[test]
    fn conflicts_retry_fast() {
        assert_eq!(backoff_delay(1, &api(409), 0.0), Duration::from_millis(100));
        assert!(backoff_delay(1, &api(409), 0.0) < backoff_delay(1, &api(500), 0.0));
    }

    #[test]
    fn a_fenced_write_says_why_and_is_labelled_fenced() {
        let e = Error::from(Fenced);
        assert_eq!(e.to_string(), "write refused: this replica does not hold the lease");
        assert_eq!(e.kind(), "fenced");
    }
}
