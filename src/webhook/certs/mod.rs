//! The webhooks' certificates: where they come from, the Secret the replicas share, the caBundle
//! of the webhook configurations, and the upkeep that keeps all three right.
//!
//! - [`material`]: the CA and the serving certificate, issued and judged (pure): what the Secret
//!   holds and what it must hold next ([`next_state`]); re-exported here;
//! - `source`: [`CertSource`] (a Secret, or files), `Pem` (what is served), [`UpkeepError`];
//! - `secret`: the Secret read at the API server's time, judged and written under
//!   compare-and-swap, with a bound on rewrites;
//! - `ca_bundle`: the caBundle of both webhook configurations, patched under compare-and-swap;
//! - `upkeep`: one pass of all that, and what makes the next pass due.
//!
//! # Guarantees of the upkeep
//!
//! - **Bounded passes.** Each step of a pass (the Secret, then the caBundle) is bounded by
//!   [`PASS_TIMEOUT`]; a failed pass is retried with backoff (from `RETRY_MIN`, doubling, at
//!   most `RETRY_MAX`: 500 ms and 30 s), for as long as it takes.
//! - **Heals.** Each pass re-judges the certificate Secret and the caBundle of both webhook
//!   configurations. A pass runs on every watch event of the Secret (its deletion included) and
//!   of either configuration, so drift is repaired within seconds; after a failure, with
//!   backoff; and at least every `CHECK_PERIOD` (60 s; for time-based steps: renewal, the CA
//!   rotation schedule), or every `DIR_CHECK_PERIOD` (10 s) for files.
//! - **A replica's clock cannot make the replicas fight**: the Secret is judged at the API
//!   server's time, and a replica rewrites a usable Secret at most `MAX_REWRITES` (3) times an
//!   hour whatever any clock says (see `secret`).
//!
//! # Caveats
//!
//! The caBundle is patched only in self-managed mode; with certificates from files, whoever
//! provides them (e.g. cert-manager's cainjector) owns the caBundle.
//!
//! The server that serves the certificate, and reloads it, is [`crate::webhook::Webhooks`].

mod ca_bundle;
pub mod material;
mod secret;
mod source;
mod upkeep;

pub use material::*;
#[cfg(test)]
pub(crate) use secret::{MAX_REWRITES, REWRITE_WINDOW};
pub use source::{CertSource, PASS_TIMEOUT, UpkeepError};
pub(crate) use source::{Clock, Pem};
#[cfg(test)]
pub(crate) use upkeep::{CHECK_PERIOD, RETRY_MAX};
pub(crate) use upkeep::{Upkeep, retry_delay};
