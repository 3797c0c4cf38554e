//! Admission webhooks for MyApp, served by every replica, leader or not.
//!
//! - [`review`]: AdmissionReview in, AdmissionReview out (pure);
//! - [`mutate`]: defaulting as a JSON Patch; `/validate` enforces [`crate::api::policy`];
//! - [`certs`]: the certificate upkeep: serving certificates, self-managed in a Secret or read
//!   from files, what the Secret must hold next (healing, SAN merging, CA rotation), the Secret
//!   and the caBundles written under compare-and-swap, and the passes that keep them right;
//! - `lifecycle`: the server's life (start without the API server, hot reload, readiness);
//! - [`server`]: axum over rustls; [`limits`]: what one caller can make it hold.
//!
//! Readiness includes the webhooks: a replica is ready only once it has a certificate loaded and
//! a real TLS handshake with its own webhook port succeeds.

mod args;
pub mod certs;
mod lifecycle;
pub mod limits;
pub(crate) mod mutate;
pub mod review;
pub mod server;

pub(crate) use args::WebhookArgs;
pub use certs::CertSource;
pub use lifecycle::{Options, StartError, Webhooks};

use crate::api::policy::Policy;
use crate::telemetry::metrics::Metrics;
use std::sync::Arc;

/// What the handlers share.
pub struct Shared {
    /// The validating policy.
    pub policy: Policy,
    /// Metrics of this replica.
    pub metrics: Arc<Metrics>,
    /// Set by [`server::begin_drain`] on shutdown: each connection that carries a request is
    /// then closed gracefully after it (GOAWAY on HTTP/2), so callers stop reusing connections
    /// to this replica before it stops listening.
    pub draining: std::sync::atomic::AtomicBool,
    /// The in-flight cap and the memory budget.
    pub gate: limits::Gate,
    /// The one namespace the operator manages (`WATCH_NAMESPACE`), if it does not manage all: a
    /// MyApp elsewhere is left alone (see [`review::answer_in`]).
    pub scope: Option<String>,
}

impl Shared {
    /// Handler state for `policy` under `limits`.
    pub fn new(policy: Policy, metrics: Arc<Metrics>, limits: limits::Limits) -> Self {
        Self {
            policy,
            metrics,
            draining: std::sync::atomic::AtomicBool::new(false),
            gate: limits::Gate::new(limits),
            scope: None,
        }
    }

    /// Manages `scope` only, or every namespace for `None`.
    #[must_use]
    pub fn with_scope(mut self, scope: Option<String>) -> Self {
        self.scope = scope;
        self
    }
}
