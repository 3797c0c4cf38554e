//! Leader election on a `coordination.k8s.io/v1` Lease, with fencing.
//!
//! Several replicas run [`Elector`]s on the same Lease; the one holding it runs the controller.
//! Written here rather than taken from a crate because none fits kube 5 with optimistic
//! concurrency, a renew deadline and fencing (see `ARCHITECTURE.md`, "Runtime"; "Invariants"
//! says which item keeps each guarantee below).
//!
//! # What is guaranteed
//! - **At most one holder per Lease version.** Every write of the Lease carries the
//!   resourceVersion this replica last saw; the API server refuses it with 409 if anyone wrote in
//!   between. Two candidates can never both succeed in taking the same version.
//! - **Expiry on the local monotonic clock.** A standby takes over only after it has seen the same
//!   election record (`Record`: holder, lease duration, acquire and renew times, transitions)
//!   unchanged for the holder's `leaseDurationSeconds`, counted from when the read that showed
//!   the change returned. A write that changes nothing in the record (a label, an annotation)
//!   does not restart the count. The remote times are compared for change only, never with the
//!   local clock, so clock offsets between machines do not matter; only clock *rates* do.
//! - **A new Lease object waits.** A write that made a new Lease object (a create, or a renewal
//!   that re-created a deleted Lease) leads only a full lease duration later (`leads_from`): a
//!   leader of the deleted Lease that did not see the delete stops by its renew deadline, before
//!   that.
//! - **A bounded leadership.** A leader's leadership is valid until the instant its last
//!   successful renewal *started* plus `renewDeadline` (`valid_until`). If it cannot renew by then
//!   it steps down by itself. Since `renewDeadline < leaseDuration`, a leader's window closes at
//!   least `leaseDuration − renewDeadline` (5 s by default) before any standby can see the lease
//!   expire: that margin absorbs the latency of a write sent just before `valid_until` and any
//!   difference in clock rates.
//! - **Fencing.** The leadership is published as a `watch` channel of `valid_until`. Every write
//!   the controller makes checks it first ([`Fence`]), and again at
//!   the socket before every byte ([`crate::controller::fenced`]). The controller future is
//!   dropped the moment it passes or the lease is lost (`supervise`), so no new write leaves
//!   this replica after that point.
//! - **Writes end before a successor may lead.** Every controller write has a deadline
//!   (`writeTimeout`, 400 ms by default) on the client and on the API server (`?timeout=`), so
//!   nothing a replica sent can commit later than [`Timings::in_flight`] after it left: 100 ms
//!   to reach the server ([`DELIVERY_TIMEOUT`], the connections' `TCP_USER_TIMEOUT`, so that the
//!   kernel does not deliver it after a partition heals), the deadline, and 100 ms
//!   ([`COMMIT_SLACK`]). [`Timings::validate`] requires the margin above to exceed that.
//! - **Takeover before expiry only on proof of death** (`proof`). A holder writes which
//!   container incarnation it is; a standby takes over early only when the kubelet reports that
//!   very container exited, or when it is that container's restart. It then writes nothing, the
//!   Lease included, until [`Timings::in_flight`] after the proof: by then nothing the dead
//!   process sent can still commit. Nothing else (a missed renewal, a NotReady pod or node, a
//!   partition, a pod object gone) shortens the wait for expiry.
//! - **Fast handover.** Standbys watch the Lease as well as poll it: a released lease is taken
//!   as soon as the release is seen, not at the next poll.
//! - **Release on shutdown.** On SIGTERM the controller stops first, then the holder is cleared
//!   (transitions kept) so a standby takes over without waiting for expiry. If the controller had
//!   to be cancelled, a write it sent may still be in flight, so the release waits
//!   `leaseDuration − renewDeadline` first ([`Stop::ReleaseAfterMargin`]).
//!
//! # What is not guaranteed
//! - A write's deadline on the API server counts from when the server *received* it. The kernel
//!   gives up on bytes the server's host has not acknowledged within [`DELIVERY_TIMEOUT`]; but
//!   a packet held longer than that inside the network (not dropped, delayed), an API server that
//!   leaves a received request unread in its socket for longer than [`COMMIT_SLACK`], or an etcd
//!   transaction that takes longer than that to commit after the server's deadline can still
//!   let a write commit late. Kubernetes
//!   offers no server-side fence token for arbitrary objects; the deadline and the margin are
//!   the defence.
//! - A paused process (SIGSTOP) cannot check anything while paused. When it resumes, its fence
//!   has already expired, so it writes nothing before it has renewed (which fails with 409 if
//!   another replica took over).
//! - Losing the lease does not stop the process: the replica drops back to standby and keeps
//!   serving webhooks, probes and metrics, and its caches stay warm for the next term.

mod args;
mod election;
mod elector;
mod fence;
mod pods;
mod proof;
mod state;
mod supervise;
mod timings;

pub(crate) use args::LeaseArgs;
pub(crate) use election::{Election, Leading};
pub use elector::{Elector, Leadership, Stop};
#[cfg(test)]
pub(crate) use fence::Mandate;
pub use fence::{Fence, Fenced};
#[cfg(test)]
pub(crate) use supervise::SHUTDOWN_GRACE;
pub use timings::{COMMIT_SLACK, DELIVERY_TIMEOUT, Timings, TimingsError};
