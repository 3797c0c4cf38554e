//! myapp-operator: a high-availability Kubernetes operator for `MyApp` resources.
//!
//! One binary, every replica identical. The modules follow the runtime architecture in
//! `ARCHITECTURE.md` ("Runtime", and "Module map" for every file):
//!
//! - [`manager`]: the process: starts the parts, wires them together, and stops them in order;
//! - [`api`]: the `MyApp` types the CRD is generated from, its status conditions, and the
//!   validation rules shared by the reconciler and the webhook;
//! - [`cache`]: the warm caches (on every replica): watches, the compact forms of MyApps and
//!   children, their stores;
//! - [`leader`]: leader election on a Lease, with a renew deadline and fencing, and the
//!   supervisor that runs the controller exactly while this replica leads;
//! - [`controller`]: reconcile and cleanup, the children,
//!   ownership, and the fenced single door for writes (leader only);
//! - [`webhook`]: the admission webhooks (`/mutate`, `/validate`), their certificates and their
//!   bounded HTTPS server (every replica);
//! - [`telemetry`]: logs, traces with W3C propagation, metrics, and the reconcile trigger;
//! - [`probes`]: the probe and metrics server (`/livez`, `/readyz`, `/metrics`);
//! - [`client`]: the timeout on every API call;
//! - `backoff`: the one backoff curve every retry uses;
//! - `fake_api` (tests only): an in-memory API server with watches, for tests without a cluster.

pub mod api;
mod backoff;
pub mod cache;
pub mod client;
pub mod controller;
pub mod leader;
pub mod manager;
pub mod probes;
pub mod telemetry;
pub mod webhook;

#[cfg(test)]
pub(crate) mod fake_api;
