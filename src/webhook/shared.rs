//! What the admission handlers share: the policy, the metrics, the bounds, the drain flag and
//! the scope.

use super::limits;
use crate::api::policy::Policy;
use crate::telemetry::metrics::Metrics;
use std::sync::Arc;

/// What the handlers share.
pub struct Shared {
    /// The validating policy.
    pub policy: Policy,
    /// Metrics of this replica.
    pub metrics: Arc<Metrics>,
    /// Set by [`super::server::begin_drain`] on shutdown: each connection that carries a request is
    /// then closed gracefully after it (GOAWAY on HTTP/2), so callers stop reusing connections
    /// to this replica before it stops listening.
    pub draining: std::sync::atomic::AtomicBool,
    /// The in-flight cap and the memory budget.
    pub gate: limits::Gate,
    /// The namespaces the operator manages (`WATCH_NAMESPACE`): a MyApp elsewhere is left alone
    /// (see [`super::review::answer_in`]).
    pub scope: crate::api::scope::Scope,
}

impl Shared {
    /// Handler state for `policy` under `limits`.
    pub fn new(policy: Policy, metrics: Arc<Metrics>, limits: limits::Limits) -> Self {
        Self {
            policy,
            metrics,
            draining: std::sync::atomic::AtomicBool::new(false),
            gate: limits::Gate::new(limits),
            scope: crate::api::scope::Scope::All,
        }
    }

    /// Manages the MyApps of `scope` only.
    #[must_use]
    pub fn with_scope(mut self, scope: crate::api::scope::Scope) -> Self {
        self.scope = scope;
        self
    }
}
