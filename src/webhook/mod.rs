//! Admission webhooks for MyApp, served by every replica, leader or not.
//!
//! - [`review`]: AdmissionReview in, AdmissionReview out (pure);
//! - [`mutate`]: defaulting as a JSON Patch; [`policy`]: what `/validate` enforces;
//! - [`certs`]: serving certificates, self-managed in a Secret or read from files;
//! - [`server`]: axum over rustls.
//!
//! Readiness includes the webhooks: a replica is ready only once it has a certificate loaded and
//! a real TLS handshake with its own webhook port succeeds.

pub mod certs;
pub mod mutate;
pub mod policy;
pub mod review;
pub mod server;
mod tls;

pub use tls::{CertSource, Webhooks};

use crate::telemetry::metrics::Metrics;
use policy::Policy;
use std::sync::Arc;

/// What the handlers share.
pub struct Shared {
    /// The validating policy.
    pub policy: Policy,
    /// Metrics of this replica.
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: answers carry `Connection: close`, so callers stop reusing connections to
    /// this replica before it stops listening.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// What handlers of `policy` share, not draining.
    pub fn new(policy: Policy, metrics: Arc<Metrics>) -> Self {
        Self { policy, metrics, draining: std::sync::atomic::AtomicBool::new(false) }
    }
}
