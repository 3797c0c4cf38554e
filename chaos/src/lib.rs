//! The chaos suite's ground truth and tools, independent of how the faults are driven
//! (`cargo xtask chaos` drives them):
//! - [`audit`]: the API server's audit log, read into writes and Lease history;
//! - [`invariants`]: leadership intervals from the Lease history, and the writes that fall
//!   outside them;
//! - [`proxy`]: a TCP proxy per replica that can black-hole its traffic (a network partition);
//! - [`report`]: JSON, a readable table and an SVG timeline.
//!
//! And the pieces that the task runner and the integration tests (`tests/`) share, each with one
//! home here:
//! - [`wait`]: polling until a condition holds;
//! - [`plain_http`]: plain HTTP to local servers (probes, metrics, etcd, Jaeger);
//! - [`fixtures`]: MyApps as the tests, the workload and the benchmark create them;
//! - [`pods`]: the operator's pods and Deployment: readiness, restarts, rollout, logs.

pub mod audit;
pub mod fixtures;
pub mod invariants;
pub mod plain_http;
pub mod pods;
pub mod proxy;
pub mod report;
pub mod wait;
