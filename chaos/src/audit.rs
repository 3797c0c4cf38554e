//! Reading the API server's audit log (JSON lines, `audit.k8s.io/v1` Events).

use serde_json::Value;

/// One completed request, as much of it as the invariants need.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// When the API server received it, in seconds since the Unix epoch (server clock).
    pub at: f64,
    /// When the API server finished it (`stageTimestamp` of the `ResponseComplete` stage): a write
    /// that succeeded was committed by then. Same clock as [`Self::at`].
    pub committed: f64,
    /// `create`, `update`, `patch`, `delete`, …
    pub verb: String,
    /// Resource, e.g. `deployments`.
    pub resource: String,
    /// Subresource, e.g. `status`.
    pub subresource: String,
    /// Namespace, if any.
    pub namespace: String,
    /// Object name, if any.
    pub name: String,
    /// HTTP status code.
    pub code: u16,
    /// The authenticated user name, e.g. `system:serviceaccount:myapp-system:myapp-operator`.
    pub user: String,
    /// The authorizer's decision (`allow` or `forbid`; empty when it never ran). A 403 with
    /// `allow` came from admission, e.g. a write into a namespace being deleted.
    pub decision: String,
    /// The operator replica's identity, from a user agent `myapp-operator/<version> (<identity>)`.
    pub replica: Option<String>,
    /// For Lease writes recorded with their request body: the holder written (`Some("")` when
    /// released).
    pub lease_holder: Option<String>,
}

impl Request {
    /// True for a mutating verb.
    pub fn is_write(&self) -> bool {
        is_write_verb(&self.verb)
    }

    /// True when the request succeeded.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// True for an audit verb that mutates: `create`, `update`, `patch`, `delete`, `deletecollection`.
pub fn is_write_verb(verb: &str) -> bool {
    matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
}

/// Now, in seconds since the Unix epoch: the clock of [`Request::at`] (the API server's, on this
/// machine).
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The replica identity in an operator user agent.
pub fn replica_of(user_agent: &str) -> Option<String> {
    myapp_operator::client::identity_in_user_agent(user_agent).map(str::to_string)
}

/// Parses an RFC 3339 timestamp into seconds since the epoch.
pub fn seconds(ts: &str) -> Option<f64> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    Some(t.as_nanosecond() as f64 / 1e9)
}

/// Parses one audit line; `None` for lines that are not completed requests.
pub fn parse_line(line: &str) -> Option<Request> {
    let e: Value = serde_json::from_str(line).ok()?;
    if e["stage"] != "ResponseComplete" {
        return None;
    }
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let obj = &e["objectRef"];
    let lease_holder = (obj["resource"] == "leases")
        .then(|| {
            e["requestObject"]["spec"]
                .as_object()
                .map(|spec| s(&spec.get("holderIdentity").cloned().unwrap_or(Value::Null)))
        })
        .flatten();
    let at = seconds(e["requestReceivedTimestamp"].as_str()?)?;
    Some(Request {
        at,
        committed: e["stageTimestamp"].as_str().and_then(seconds).unwrap_or(at),
        verb: s(&e["verb"]),
        resource: s(&obj["resource"]),
        subresource: s(&obj["subresource"]),
        namespace: s(&obj["namespace"]),
        name: s(&obj["name"]),
        code: e["responseStatus"]["code"].as_u64().and_then(|c| u16::try_from(c).ok()).unwrap_or(0),
        user: s(&e["user"]["username"]),
        decision: s(&e["annotations"]["authorization.k8s.io/decision"]),
        replica: e["userAgent"].as_str().and_then(replica_of),
        lease_holder,
    })
}

/// What one user did, for the RBAC proof: its requests, and those refused with 403 Forbidden,
/// split by who refused them.
#[derive(Debug, Default, PartialEq)]
pub struct Authorization<'a> {
    /// Every request by the user.
    pub requests: usize,
    /// Refused by the authorizer (RBAC), and never authorized afterwards: a missing grant.
    pub denied: Vec<&'a Request>,
    /// Refused by the authorizer, then authorized when the same request (verb, resource,
    /// subresource, namespace, name) came again: not a missing grant but an authorizer whose
    /// caches were not yet synced, as right after an API server restart.
    pub denied_then_allowed: Vec<&'a Request>,
    /// Allowed by the authorizer, then refused with 403 by admission (e.g. NamespaceLifecycle,
    /// for a write into a namespace being deleted).
    pub refused_by_admission: Vec<&'a Request>,
}

/// Tallies `user`'s requests and the ones refused with 403.
pub fn authorization<'a>(requests: &'a [Request], user: &str) -> Authorization<'a> {
    let mut mine: Vec<&Request> = requests.iter().filter(|r| r.user == user).collect();
    mine.sort_by(|a, b| a.at.total_cmp(&b.at));
    let same = |a: &Request, b: &Request| {
        (&a.verb, &a.resource, &a.subresource, &a.namespace, &a.name)
            == (&b.verb, &b.resource, &b.subresource, &b.namespace, &b.name)
    };
    let mut out = Authorization { requests: mine.len(), ..Authorization::default() };
    for (i, r) in mine.iter().enumerate().filter(|(_, r)| r.code == 403) {
        if r.decision == "allow" {
            out.refused_by_admission.push(r);
        } else if mine[i + 1..].iter().any(|later| later.decision == "allow" && same(later, r)) {
            out.denied_then_allowed.push(r);
        } else {
            out.denied.push(r);
        }
    }
    out
}

/// Parses a whole log, keeping requests received at or after `since`.
pub fn parse(log: &str, since: f64) -> Vec<Request> {
    log.lines().filter_map(parse_line).filter(|r| r.at >= since).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: &str = r#"{"kind":"Event","stage":"ResponseComplete","verb":"update","userAgent":"myapp-operator/0.1.0 (operator-1-ab2cd)","objectRef":{"resource":"leases","namespace":"myapp-system","name":"myapp-operator"},"responseStatus":{"code":200},"requestObject":{"spec":{"holderIdentity":"operator-1-ab2cd"}},"requestReceivedTimestamp":"2026-11-25T17:52:53.163462Z","stageTimestamp":"2026-11-25T17:52:53.571000Z"}"#;

    #[test]
    fn reads_a_lease_write() {
        let r = parse_line(LEASE).expect("parsed");
        assert_eq!(r.replica.as_deref(), Some("operator-1-ab2cd"));
        assert_eq!(r.lease_holder.as_deref(), Some("operator-1-ab2cd"));
        assert!(r.is_write() && r.succeeded());
        assert!((r.at - 1_795_629_173.163_462).abs() < 1e-3, "{}", r.at);
        assert!((r.committed - r.at - 0.4075).abs() < 1e-3, "committed {} after", r.committed - r.at);
        let no_stage = parse_line(&LEASE.replace(r#","stageTimestamp":"2026-11-25T17:52:53.571000Z""#, ""));
        assert_eq!(no_stage.map(|r| r.committed), Some(r.at), "without a stage time, the receipt");
    }

    #[test]
    fn release_has_an_empty_holder() {
        let line = LEASE.replace(r#""holderIdentity":"operator-1-ab2cd""#, r#""acquireTime":null"#);
        assert_eq!(parse_line(&line).and_then(|r| r.lease_holder).as_deref(), Some(""));
    }

    #[test]
    fn forbidden_requests_of_one_user_are_found() {
        let sa = "system:serviceaccount:myapp-system:myapp-operator";
        let with = |user: &str, code: u16, decision: &str| {
            LEASE
                .replace(r#""stage""#, &format!(r#""user":{{"username":"{user}"}},"stage""#))
                .replace(r#""code":200"#, &format!(r#""code":{code}"#))
                .replace(
                    r#""kind""#,
                    &format!(r#""annotations":{{"authorization.k8s.io/decision":"{decision}"}},"kind""#),
                )
        };
        let log = [
            with(sa, 200, "allow"),
            with(sa, 403, "forbid"),
            with(sa, 403, "allow"),
            with("admin", 403, "forbid"),
            with(sa, 409, "allow"),
        ]
        .join("\n");
        let reqs = parse(&log, 0.0);
        assert_eq!(reqs[0].user, sa);
        assert_eq!(reqs[1].decision, "forbid");
        let a = authorization(&reqs, sa);
        assert_eq!(a.requests, 4);
        // Equal timestamps keep the log's order: the 403 at position 2 is followed by an allowed
        // request of the same kind (the 409), so it was transient.
        assert_eq!(a.denied_then_allowed.len(), 1);
        assert!(a.denied.is_empty());
        assert_eq!(a.refused_by_admission.len(), 1);
        // The last request of its kind is denied: a missing grant.
        let mut log_denied = reqs.clone();
        log_denied.push(Request { code: 403, decision: "forbid".into(), at: reqs[0].at + 1.0, ..reqs[0].clone() });
        let b = authorization(&log_denied, sa);
        assert_eq!(b.denied.len(), 1);
        assert_eq!(b.denied[0].decision, "forbid");
        assert_eq!(authorization(&reqs, "nobody"), Authorization::default());
    }

    #[test]
    fn user_agents() {
        assert_eq!(replica_of("myapp-operator/0.1.0 (op-0-x)").as_deref(), Some("op-0-x"));
        assert_eq!(replica_of("kube-controller-manager/v1.37.2"), None);
        assert_eq!(replica_of("myapp-operator/0.1.0"), None);
    }

    #[test]
    fn skips_other_stages_and_garbage() {
        assert!(parse_line("not json").is_none());
        assert!(parse_line(&LEASE.replace("ResponseComplete", "RequestReceived")).is_none());
        assert_eq!(parse(&format!("{LEASE}\ngarbage\n{LEASE}"), 0.0).len(), 2);
        assert!(parse(LEASE, 2e9).is_empty());
    }
}
