//! Logs and metrics. Logs are structured (JSON in production, human-readable locally); metrics use
//! prometheus-client and are served by [`crate::http`].

pub mod logging;
pub mod metrics;
