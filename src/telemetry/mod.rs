//! Logs, traces and metrics. Logs are structured (JSON in production, human-readable locally);
//! traces go over OTLP with W3C propagation into the API server; metrics use prometheus-client and
//! are served by [`crate::probes`].

pub mod logging;
pub mod metrics;
pub mod myapps;
pub mod process;
pub mod propagation;
pub mod trigger;
