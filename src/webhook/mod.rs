//! Admission webhooks for MyApp, served by every replica, leader or not.
//!
//! - [`review`]: AdmissionReview in, AdmissionReview out (pure);
//! - `mutate`: defaulting as a JSON Patch; `/validate` enforces [`crate::api::policy`];
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
mod shared;

pub use args::DEFAULT_DRAIN;
pub(crate) use args::WebhookArgs;
pub use certs::CertSource;
pub use lifecycle::{Options, StartError, Webhooks};
pub use shared::Shared;
