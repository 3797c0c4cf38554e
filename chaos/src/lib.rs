//! The chaos suite's ground truth and tools, independent of how the faults are driven
//! (`cargo xtask chaos` drives them):
//! - [`audit`]: the API server's audit log, read into writes and Lease history;
//! - [`invariants`]: leadership intervals from the Lease history, and the writes that fall
//!   outside them;
//! - [`proxy`]: a TCP proxy per replica that can black-hole its traffic (a network partition);
//! - [`report`]: JSON, a readable table and an SVG timeline.

pub mod audit;
pub mod invariants;
pub mod proxy;
pub mod report;
