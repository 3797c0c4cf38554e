//! Leadership intervals from the Lease history, and the writes that fall outside them.
//!
//! Both come from the audit log, so they are the API server's view on one clock:
//! - a replica's interval starts with its first successful Lease write that names it holder
//!   after someone else (or nobody) held it; if that write *created* the Lease (201: a POST, or a
//!   PUT after the Lease was deleted), it starts a lease duration later, since the elector leads
//!   a new Lease object only then;
//! - it ends at the earliest of: the start of the next interval, a release, its last successful
//!   Lease write plus `renew_deadline` (it must step down by then), or the end of the run.
//!
//! A write by a replica is legal only inside one of its own intervals. Intervals never overlap
//! by construction, so "every write inside its writer's interval" also proves that no two
//! replicas ever wrote in overlapping intervals.
//!
//! Receipt is not enough: a write received inside its writer's term but committed after another
//! replica's term began (its first Lease write) could overwrite the successor's work. So a write
//! must also be *committed* (the API server's `stageTimestamp` at `ResponseComplete`) before the
//! next term of another replica starts. A write that failed is judged the same way: the API
//! server still held it then, and nothing but the outcome kept it from landing.

use crate::audit::Request;
use serde::{Deserialize, Serialize};

/// A span of time in which one replica held the lease (server clock, seconds since the epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The holder.
    pub replica: String,
    /// First successful Lease write naming it holder.
    pub start: f64,
    /// When its leadership ended (see the module documentation).
    pub end: f64,
}

/// A write made outside the writer's leadership.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Violation {
    /// The writer.
    pub replica: String,
    /// When the API server received it.
    pub at: f64,
    /// When the API server finished it (its receipt, in reports from before this was judged).
    #[serde(default)]
    pub committed: f64,
    /// Which rule it broke.
    #[serde(default = "Breach::outside")]
    pub breach: Breach,
    /// What it was, e.g. `patch deployments ns/web`.
    pub what: String,
}

/// The rule a [`Violation`] broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Breach {
    /// Received outside every term of its writer.
    Outside,
    /// Received inside its writer's term, finished after another replica's term began.
    CommittedInNewTerm,
}

impl Breach {
    fn outside() -> Self {
        Breach::Outside
    }
}

fn is_the_lease(r: &Request, lease_namespace: &str, lease_name: &str) -> bool {
    r.resource == "leases" && r.namespace == lease_namespace && r.name == lease_name
}

/// Leadership intervals of `lease_namespace/lease_name`, in time order.
pub fn leadership(
    requests: &[Request],
    lease_namespace: &str,
    lease_name: &str,
    lease_duration: f64,
    renew_deadline: f64,
    horizon: f64,
) -> Vec<Interval> {
    let mut writes: Vec<(&Request, String)> = requests
        .iter()
        .filter(|r| is_the_lease(r, lease_namespace, lease_name) && r.is_write() && r.succeeded())
        .filter_map(|r| r.lease_holder.clone().map(|h| (r, h)))
        .collect();
    writes.sort_by(|a, b| a.0.at.total_cmp(&b.0.at));
    let mut out = Vec::new();
    let mut current: Option<(String, f64, f64)> = None;
    for (w, holder) in writes {
        let created = w.code == 201;
        match &mut current {
            Some((h, _, last)) if *h == holder && !created => *last = w.at,
            _ => {
                let start = if created { w.at + lease_duration } else { w.at };
                if let Some((h, from, last)) = current.take() {
                    out.push(Interval { replica: h, start: from, end: (last + renew_deadline).min(start) });
                }
                if !holder.is_empty() {
                    current = Some((holder, start, w.at));
                }
            }
        }
    }
    if let Some((h, start, last)) = current {
        out.push(Interval { replica: h, start, end: (last + renew_deadline).min(horizon) });
    }
    out
}

/// Resources only the controller writes. Every replica, leader or not, may write its Lease (that
/// is the election) and its webhook certificate Secret and caBundle (that is serving); those are
/// not controller writes.
pub const CONTROLLER_RESOURCES: &[&str] = &["myapps", "deployments", "services", "events"];

/// True for a write the controller makes.
pub fn is_controller_write(r: &Request) -> bool {
    r.is_write() && r.replica.is_some() && CONTROLLER_RESOURCES.contains(&r.resource.as_str())
}

/// Every controller write by an operator replica received outside its own leadership intervals,
/// or received inside one but finished after the next term of another replica began. Failed
/// writes count too: the fence must stop them before they leave, and the deadline must end them
/// before a successor may lead.
pub fn writes_outside(
    requests: &[Request],
    intervals: &[Interval],
    lease_namespace: &str,
    lease_name: &str,
) -> Vec<Violation> {
    requests
        .iter()
        .filter(|r| is_controller_write(r) && !is_the_lease(r, lease_namespace, lease_name))
        .filter_map(|r| {
            let replica = r.replica.as_ref()?;
            let term = intervals.iter().position(|i| &i.replica == replica && i.start <= r.at && r.at <= i.end);
            let breach = match term {
                None => Breach::Outside,
                Some(k) => {
                    let successor = intervals[k + 1..].iter().find(|i| &i.replica != replica)?;
                    if r.committed <= successor.start {
                        return None;
                    }
                    Breach::CommittedInNewTerm
                }
            };
            Some(Violation { replica: replica.clone(), at: r.at, committed: r.committed, breach, what: describe(r) })
        })
        .collect()
}

/// `verb resource[/subresource] namespace/name`.
fn describe(r: &Request) -> String {
    let sub = if r.subresource.is_empty() { String::new() } else { format!("/{}", r.subresource) };
    format!("{} {}{sub} {}/{}", r.verb, r.resource, r.namespace, r.name)
}

/// Controller writes received while the Lease did not exist: after a successful delete of it and
/// before the next write that created it. Not a violation by itself (the elector leads a new
/// Lease only a lease duration after creating it, so no one else writes then), but the figure
/// says how fast a leader saw the delete.
pub fn writes_without_lease<'a>(requests: &'a [Request], lease_namespace: &str, lease_name: &str) -> Vec<&'a Request> {
    let mut changes: Vec<(f64, bool)> = requests
        .iter()
        .filter(|r| is_the_lease(r, lease_namespace, lease_name) && r.succeeded())
        .filter_map(|r| match (r.verb.as_str(), r.code) {
            ("delete", _) => Some((r.at, false)),
            (_, 201) => Some((r.at, true)),
            _ => None,
        })
        .collect();
    changes.sort_by(|a, b| a.0.total_cmp(&b.0));
    requests
        .iter()
        .filter(|r| is_controller_write(r))
        .filter(|r| changes.iter().rfind(|(at, _)| *at <= r.at).is_some_and(|(_, exists)| !exists))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(at: f64, by: &str, holder: &str) -> Request {
        Request {
            at,
            committed: at,
            verb: "update".into(),
            resource: "leases".into(),
            subresource: String::new(),
            namespace: "sys".into(),
            name: "op".into(),
            code: 200,
            user: String::new(),
            decision: String::new(),
            replica: Some(by.into()),
            lease_holder: Some(holder.into()),
        }
    }

    fn write(at: f64, by: &str) -> Request {
        Request {
            at,
            committed: at,
            verb: "patch".into(),
            resource: "deployments".into(),
            subresource: String::new(),
            namespace: "ns".into(),
            name: "web".into(),
            code: 200,
            user: String::new(),
            decision: String::new(),
            replica: Some(by.into()),
            lease_holder: None,
        }
    }

    #[test]
    fn intervals_follow_holder_changes_and_deadlines() {
        let reqs = vec![
            lease(10.0, "a", "a"),
            lease(12.0, "a", "a"),
            lease(14.0, "a", "a"),
            // a stops renewing (crash); b takes over after expiry.
            lease(30.0, "b", "b"),
            lease(32.0, "b", "b"),
            // b releases; c takes it.
            lease(33.0, "b", ""),
            lease(33.1, "c", "c"),
        ];
        let iv = leadership(&reqs, "sys", "op", 4.0, 3.0, 100.0);
        assert_eq!(
            iv,
            vec![
                Interval { replica: "a".into(), start: 10.0, end: 17.0 },
                Interval { replica: "b".into(), start: 30.0, end: 33.0 },
                Interval { replica: "c".into(), start: 33.1, end: 36.1 },
            ]
        );
    }

    #[test]
    fn a_created_lease_is_led_a_lease_duration_later() {
        let mut created = lease(20.0, "b", "b");
        created.code = 201;
        let mut recreated = lease(30.0, "b", "b");
        recreated.code = 201;
        // a leads; the Lease is deleted at 19 (not a holder write); b creates a new one at 20,
        // and b's own renewal re-creates it at 30 after another delete.
        let reqs = vec![lease(10.0, "a", "a"), lease(18.0, "a", "a"), created, lease(22.0, "b", "b"), recreated];
        let iv = leadership(&reqs, "sys", "op", 4.0, 3.0, 100.0);
        assert_eq!(
            iv,
            vec![
                Interval { replica: "a".into(), start: 10.0, end: 21.0 },
                Interval { replica: "b".into(), start: 24.0, end: 25.0 },
                Interval { replica: "b".into(), start: 34.0, end: 33.0 },
            ]
        );
        let v =
            writes_outside(&[write(20.5, "a"), write(23.0, "b"), write(24.5, "b"), write(31.0, "b")], &iv, "sys", "op");
        assert_eq!(v.iter().map(|v| v.at).collect::<Vec<_>>(), vec![23.0, 31.0]);
    }

    #[test]
    fn writes_while_the_lease_is_gone_are_counted() {
        let mut delete = lease(20.0, "x", "");
        delete.verb = "delete".into();
        delete.lease_holder = None;
        let mut created = lease(20.5, "b", "b");
        created.code = 201;
        let reqs = vec![lease(10.0, "a", "a"), delete, created, write(19.9, "a"), write(20.1, "a"), write(21.0, "b")];
        let gone: Vec<f64> = writes_without_lease(&reqs, "sys", "op").iter().map(|r| r.at).collect();
        assert_eq!(gone, vec![20.1]);
    }

    #[test]
    fn failed_lease_writes_do_not_count() {
        let mut conflict = lease(11.0, "b", "b");
        conflict.code = 409;
        let iv = leadership(&[lease(10.0, "a", "a"), conflict], "sys", "op", 4.0, 3.0, 100.0);
        assert_eq!(iv.len(), 1);
        assert_eq!(iv[0].replica, "a");
    }

    #[test]
    fn writes_outside_are_found() {
        let reqs = vec![
            lease(10.0, "a", "a"),
            lease(20.0, "b", "b"),
            write(11.0, "a"),
            write(19.0, "a"),
            write(21.0, "b"),
            write(21.5, "a"),
        ];
        let iv = leadership(&reqs, "sys", "op", 4.0, 3.0, 100.0);
        let v = writes_outside(&reqs, &iv, "sys", "op");
        let at: Vec<f64> = v.iter().map(|v| v.at).collect();
        // a's interval is [10, 13]: its writes at 19 and 21.5 are violations.
        assert_eq!(at, vec![19.0, 21.5]);
        assert!(v[0].what.contains("patch deployments ns/web"));
    }

    #[test]
    fn a_write_committed_after_the_successor_led_is_found() {
        // a leads from 10 (renewed at 12, so its term ends at 15); b takes over at 20.
        let slow = |at: f64, committed: f64| Request { committed, ..write(at, "a") };
        let reqs = vec![
            lease(10.0, "a", "a"),
            lease(12.0, "a", "a"),
            lease(20.0, "b", "b"),
            // received at 14.9 (inside a's term), finished before b's first Lease write: legal.
            slow(14.9, 19.99),
            // received inside a's term, finished after b led: the old term landed in the new one.
            slow(14.8, 20.4),
            // b's own slow write, with no later term of anyone else: legal.
            Request { committed: 40.0, ..write(21.0, "b") },
        ];
        let iv = leadership(&reqs, "sys", "op", 4.0, 3.0, 100.0);
        let v = writes_outside(&reqs, &iv, "sys", "op");
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].at, v[0].committed, v[0].breach), (14.8, 20.4, Breach::CommittedInNewTerm));
        assert_eq!(v[0].replica, "a");
        // The same write received after its writer's term is an outside write, whatever its commit.
        let late = writes_outside(&[slow(15.5, 15.6)], &iv, "sys", "op");
        assert_eq!(late.iter().map(|v| v.breach).collect::<Vec<_>>(), vec![Breach::Outside]);
        // When a leads again from 30, b's write committed at 40 landed in a's new term; a's own
        // late write is still judged against b, the first other holder after it.
        let mut again = reqs.clone();
        again.push(lease(30.0, "a", "a"));
        let v = writes_outside(&again, &leadership(&again, "sys", "op", 4.0, 3.0, 100.0), "sys", "op");
        let found: Vec<(&str, f64)> = v.iter().map(|v| (v.replica.as_str(), v.at)).collect();
        assert_eq!(found, vec![("a", 14.8), ("b", 21.0)]);
    }

    #[test]
    fn certificate_and_other_lease_writes_are_not_controller_writes() {
        let mut secret = write(50.0, "x");
        secret.resource = "secrets".into();
        let mut other_lease = lease(51.0, "x", "x");
        other_lease.namespace = "elsewhere".into();
        let reqs = vec![lease(10.0, "a", "a"), secret, other_lease];
        let iv = leadership(&reqs, "sys", "op", 4.0, 3.0, 100.0);
        assert!(writes_outside(&reqs, &iv, "sys", "op").is_empty());
    }

    #[test]
    fn lease_writes_and_other_users_are_not_violations() {
        let mut human = write(50.0, "x");
        human.replica = None;
        let reqs = vec![lease(10.0, "a", "a"), lease(40.0, "b", "b"), human];
        let iv = leadership(&reqs, "sys", "op", 4.0, 3.0, 100.0);
        assert!(writes_outside(&reqs, &iv, "sys", "op").is_empty());
    }
}
