//! Proof that the Lease holder's process has exited: the only ground for taking the Lease before
//! it expires. Pure: the I/O (reading the holder's pod) is in `leader/pods.rs`.
//!
//! # What counts
//!
//! In a pod, a crash is not silent. The kubelet starts a container's replacement only after the
//! old process has exited, and it reports the exit in the pod's status. So the holder is proven
//! dead when, matched exactly to the container incarnation that holds the Lease
//! ([`Incarnation`], written beside the holder in the annotation [`ANNOTATION`]):
//!
//! - **this process is its restart** ([`succeeds`]): the Lease names this very pod (namespace,
//!   name and UID) and a container id other than this process's own. The pod has one operator
//!   container (as `deploy/` ships it), and the kubelet runs one instance of it at a time, so the
//!   holder is a previous instance of this container, which has exited;
//! - **the kubelet reports it exited** ([`reported_exited`]): the holder's pod, with the UID the
//!   Lease names, reports the holder's container id as terminated, or as the last state of a
//!   container that has since been restarted.
//!
//! # What does not count
//!
//! Everything else waits for the lease to expire, as before: a missed renewal, a NotReady or
//! unreachable pod, a node that is NotReady, a partition, and a pod object that is gone (`kubectl
//! delete --grace-period=0 --force` removes the object before the kubelet has stopped its
//! containers; a pod of the same name with another UID is another pod). So does anything that
//! cannot be matched exactly: a Lease without the annotation (written by a previous version, or
//! by a replica that does not know its incarnation), an annotation naming another holder than
//! `holderIdentity`, a container status without a container id, a termination the kubelet could
//! not observe (`ContainerStatusUnknown`), and a restarted container whose `startedAt` is not
//! after the holder's last renewal (see [`reported_exited`]).
//!
//! # Knowing one's own incarnation
//!
//! A replica learns its pod from the downward API (`POD_NAMESPACE`, `POD_NAME`, `POD_UID`) and its
//! container id from its own cgroup path (`/proc/self/cgroup`), which the container runtime names
//! after the container and which is in the process from its first instruction. The pod's status
//! is *not* used for this: just after a restart it may still show the previous instance as
//! running, and a replica that took that id for its own would let a standby "prove" it dead. Where
//! the cgroup path hides the id (a private cgroup namespace, usual on cgroup v2 nodes) or the
//! downward API variables are missing (host processes), the replica has no incarnation: it writes
//! none, takes over only on expiry, and says so once in its log.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The Lease annotation that says which container incarnation holds it, as JSON:
/// `{"identity": …, "namespace": …, "pod": …, "podUID": …, "containerID": …}`. It counts only
/// while its `identity` is the Lease's `holderIdentity`.
pub(crate) const ANNOTATION: &str = "myapp.dev/holder-incarnation";

/// One run of one container: the pod (by UID, so that a pod re-created under the same name is
/// another pod) and the container id the runtime gave it (without the runtime's `scheme://`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Incarnation {
    /// The pod's namespace.
    pub(crate) namespace: String,
    /// The pod's name.
    pub(crate) pod: String,
    /// The pod's UID.
    #[serde(rename = "podUID")]
    pub(crate) pod_uid: String,
    /// The container id, lowercase hex, without the runtime's scheme.
    #[serde(rename = "containerID")]
    pub(crate) container_id: String,
}

/// The annotation's JSON: an incarnation and whom it describes.
#[derive(Serialize, Deserialize)]
struct Stamp {
    identity: String,
    #[serde(flatten)]
    incarnation: Incarnation,
}

/// Why a replica has no incarnation (and so takes over only on expiry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unknown {
    /// `POD_NAMESPACE`, `POD_NAME` or `POD_UID` is not set: not a pod, or an install without them.
    #[error("POD_NAMESPACE, POD_NAME and POD_UID are not all set (not running in a pod?)")]
    NoPod,
    /// The cgroup path does not name this pod's container.
    #[error("no container id of this pod in /proc/self/cgroup (a private cgroup namespace?)")]
    NoContainerId,
}

impl Incarnation {
    /// This process's incarnation, from the environment (`env` reads a variable) and the text
    /// of `/proc/self/cgroup`.
    pub(crate) fn discover(env: impl Fn(&str) -> Option<String>, cgroup: &str) -> Result<Self, Unknown> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        let (Some(namespace), Some(pod), Some(pod_uid)) = (var("POD_NAMESPACE"), var("POD_NAME"), var("POD_UID"))
        else {
            return Err(Unknown::NoPod);
        };
        let container_id = container_id_in_cgroup(cgroup, &pod_uid).ok_or(Unknown::NoContainerId)?;
        Ok(Self { namespace, pod, pod_uid, container_id })
    }

    /// The annotation that says `identity` holds the Lease as this incarnation.
    pub(crate) fn annotation(&self, identity: &str) -> (String, String) {
        let stamp = Stamp { identity: identity.to_string(), incarnation: self.clone() };
        (ANNOTATION.to_string(), serde_json::to_string(&stamp).unwrap_or_default())
    }

    /// The incarnation of `holder` that a Lease's annotations name, if they name one for exactly
    /// that holder, completely.
    pub(crate) fn of_holder(annotations: Option<&BTreeMap<String, String>>, holder: Option<&str>) -> Option<Self> {
        let holder = holder.filter(|h| !h.is_empty())?;
        let stamp: Stamp = serde_json::from_str(annotations?.get(ANNOTATION)?).ok()?;
        let i = stamp.incarnation;
        let complete = [&i.namespace, &i.pod, &i.pod_uid, &i.container_id].iter().all(|f| !f.is_empty());
        (stamp.identity == holder && complete).then_some(i)
    }
}

/// The container id in a `/proc/self/cgroup` text: the last segment of a path through this pod's
/// cgroup (`pod<uid>`, or with `_` for `-` under the systemd driver), with a runtime's prefix
/// (`cri-containerd-`, `crio-`, `docker-`) and `.scope` taken off, if it is 64 hex digits.
pub(crate) fn container_id_in_cgroup(cgroup: &str, pod_uid: &str) -> Option<String> {
    let marks = [format!("pod{pod_uid}"), format!("pod{}", pod_uid.replace('-', "_"))];
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        if !marks.iter().any(|m| path.contains(m.as_str())) {
            return None;
        }
        let last = path.rsplit('/').next()?.trim_end_matches(".scope");
        let id = last.rsplit('-').next()?;
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())).then(|| id.to_string())
    })
}

/// A status's container id without its `scheme://`.
fn bare(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

/// True when `t` is the kubelet's report that `container_id` exited.
fn is_exit_of(t: Option<&ContainerStateTerminated>, container_id: &str) -> bool {
    t.is_some_and(|t| {
        t.reason.as_deref() != Some("ContainerStatusUnknown")
            && t.container_id.as_deref().is_some_and(|id| !id.is_empty() && bare(id) == container_id)
    })
}

/// Proof (a): this process, `me`, is a later instance of the container that holds the Lease as
/// `holder`. See the [module documentation](self).
pub(crate) fn succeeds(holder: &Incarnation, me: &Incarnation) -> bool {
    holder.namespace == me.namespace
        && holder.pod == me.pod
        && holder.pod_uid == me.pod_uid
        && holder.container_id != me.container_id
}

/// Proof (b): `pod` (as read from the API server) reports the exit of `holder`, whose last
/// renewal the Lease dates `renewed`. See the [module documentation](self).
///
/// The container id must be reported terminated: either as the container's current state, or
/// as its last state while it has been restarted. In the second case the instance running now
/// must have started (`startedAt`, whole seconds, by the kubelet) after `renewed` (written by the
/// holder). Both come from the clock of the one node the pod runs on, so no clock offset enters;
/// with exact container ids this cannot fail, and it is a second, independent check that the
/// running instance is not the holder: the holder renewed after it started. A `startedAt`
/// skewed into the past (or missing) refuses the proof; the replica waits for expiry.
pub(crate) fn reported_exited(holder: &Incarnation, renewed: Option<&MicroTime>, pod: &Pod) -> bool {
    let meta = &pod.metadata;
    if meta.uid.as_deref() != Some(holder.pod_uid.as_str())
        || meta.name.as_deref() != Some(holder.pod.as_str())
        || meta.namespace.as_deref().is_some_and(|ns| ns != holder.namespace)
    {
        return false;
    }
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
    statuses.iter().any(|cs| {
        let now = cs.state.as_ref();
        if is_exit_of(now.and_then(|s| s.terminated.as_ref()), &holder.container_id) {
            return true;
        }
        let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref());
        if !is_exit_of(last, &holder.container_id) {
            return false;
        }
        match now.and_then(|s| s.running.as_ref()) {
            None => true,
            Some(running) => match (running.started_at.as_ref(), renewed) {
                (Some(started), Some(renewed)) => started.0 > renewed.0,
                _ => false,
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const NEXT: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const UID: &str = "6f0a1b2c-3d4e-5f60-7182-93a4b5c6d7e8";

    fn holder() -> Incarnation {
        Incarnation { namespace: "ns".into(), pod: "op-1".into(), pod_uid: UID.into(), container_id: ID.into() }
    }

    fn at(second: i64) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(second).expect("timestamp")
    }

    /// The renewal the holder last wrote, at second 100 and a half.
    fn renewed() -> MicroTime {
        MicroTime(at(100) + k8s_openapi::jiff::SignedDuration::from_millis(500))
    }

    /// The holder's pod with `statuses` as its container statuses (JSON).
    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "op-1", "namespace": "ns", "uid": UID},
            "status": {"containerStatuses": statuses},
        }))
        .expect("pod")
    }

    fn terminated(id: Option<&str>) -> serde_json::Value {
        let mut t = serde_json::json!({"exitCode": 137, "reason": "Error",
            "startedAt": "1970-01-01T00:01:00Z", "finishedAt": "1970-01-01T00:01:41Z"});
        if let Some(id) = id {
            t["containerID"] = serde_json::json!(format!("containerd://{id}"));
        }
        t
    }

    fn running_since(second: i64) -> serde_json::Value {
        serde_json::json!({"running": {"startedAt": Time(at(second))}})
    }

    fn status(state: serde_json::Value, last: serde_json::Value) -> serde_json::Value {
        serde_json::json!([{"name": "manager", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
            "containerID": format!("containerd://{NEXT}"), "state": state, "lastState": last}])
    }

    fn exited(p: &Pod) -> bool {
        reported_exited(&holder(), Some(&renewed()), p)
    }

    #[test]
    fn a_container_reported_terminated_is_proof() {
        let p = pod(status(serde_json::json!({"terminated": terminated(Some(ID))}), serde_json::json!({})));
        assert!(exited(&p));
    }

    #[test]
    fn a_container_waiting_to_restart_after_it_exited_is_proof() {
        let waiting = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
        let p = pod(status(waiting, serde_json::json!({"terminated": terminated(Some(ID))})));
        assert!(exited(&p));
    }

    #[test]
    fn a_restart_that_started_after_the_last_renewal_is_proof() {
        let p = pod(status(running_since(101), serde_json::json!({"terminated": terminated(Some(ID))})));
        assert!(exited(&p));
    }

    #[test]
    fn a_restart_not_after_the_last_renewal_proves_nothing() {
        // startedAt has whole seconds: 100 may be before the renewal at 100.5. And a startedAt
        // skewed into the past reads the same way. Either way: no proof, wait for expiry.
        for started in [100, 99, 0] {
            let p = pod(status(running_since(started), serde_json::json!({"terminated": terminated(Some(ID))})));
            assert!(!exited(&p), "started at {started}");
        }
        let no_start = serde_json::json!({"running": {}});
        assert!(!exited(&pod(status(no_start, serde_json::json!({"terminated": terminated(Some(ID))})))));
        let p = pod(status(running_since(101), serde_json::json!({"terminated": terminated(Some(ID))})));
        assert!(!reported_exited(&holder(), None, &p), "no renewal time to compare with");
    }

    #[test]
    fn another_incarnation_reported_terminated_proves_nothing() {
        let other = pod(status(serde_json::json!({"terminated": terminated(Some(NEXT))}), serde_json::json!({})));
        assert!(!exited(&other), "another container id");
        let before = pod(status(running_since(101), serde_json::json!({"terminated": terminated(Some(NEXT))})));
        assert!(!exited(&before), "the restart of an earlier instance");
        // The same id with another runtime's scheme is the same container.
        let mut crio = terminated(None);
        crio["containerID"] = serde_json::json!(format!("cri-o://{ID}"));
        assert!(exited(&pod(status(serde_json::json!({"terminated": crio}), serde_json::json!({})))));
    }

    #[test]
    fn a_status_without_a_container_id_proves_nothing() {
        let p = pod(status(serde_json::json!({"terminated": terminated(None)}), serde_json::json!({})));
        assert!(!exited(&p));
        let mut empty = terminated(None);
        empty["containerID"] = serde_json::json!("");
        assert!(!exited(&pod(status(serde_json::json!({"waiting": {}}), serde_json::json!({"terminated": empty})))));
    }

    #[test]
    fn a_termination_the_kubelet_could_not_observe_proves_nothing() {
        let mut unknown = terminated(Some(ID));
        unknown["reason"] = serde_json::json!("ContainerStatusUnknown");
        assert!(!exited(&pod(status(serde_json::json!({"terminated": unknown}), serde_json::json!({})))));
    }

    #[test]
    fn nothing_else_proves_death() {
        // The holder running, however its pod looks (NotReady, a node NotReady, unreachable):
        // only container states count, and the holder's is running.
        let mut p = pod(status(running_since(50), serde_json::json!({})));
        p.status.as_mut().expect("status").conditions = Some(vec![
            serde_json::from_value(serde_json::json!({"type": "Ready", "status": "False"})).expect("condition"),
        ]);
        p.status.as_mut().expect("status").phase = Some("Unknown".into());
        let mut holding = holder();
        holding.container_id = NEXT.into();
        assert!(!reported_exited(&holding, Some(&renewed()), &p), "a NotReady pod");
        // A pod of the same name re-created (a force delete and a new pod): another UID.
        let mut recreated = pod(status(serde_json::json!({"terminated": terminated(Some(ID))}), serde_json::json!({})));
        recreated.metadata.uid = Some("another".into());
        assert!(!exited(&recreated));
        // A pod with no status at all (just scheduled, or its node never reported).
        let mut bare = pod(serde_json::json!([]));
        bare.status = None;
        assert!(!exited(&bare));
        // Another pod.
        let mut other = pod(status(serde_json::json!({"terminated": terminated(Some(ID))}), serde_json::json!({})));
        other.metadata.name = Some("op-2".into());
        assert!(!exited(&other));
    }

    #[test]
    fn the_restarted_container_of_the_same_pod_succeeds_its_predecessor() {
        let me = Incarnation { container_id: NEXT.into(), ..holder() };
        assert!(succeeds(&holder(), &me));
        assert!(!succeeds(&holder(), &holder()), "the same container is not its own successor");
        let other_pod = Incarnation { pod: "op-2".into(), pod_uid: "u2".into(), ..me.clone() };
        assert!(!succeeds(&holder(), &other_pod), "a standby in another pod");
        let recreated = Incarnation { pod_uid: "u2".into(), ..me.clone() };
        assert!(!succeeds(&holder(), &recreated), "a pod re-created under the same name");
        let elsewhere = Incarnation { namespace: "other".into(), ..me };
        assert!(!succeeds(&holder(), &elsewhere));
    }

    #[test]
    fn the_annotation_counts_only_for_the_holder_it_names() {
        let (key, value) = holder().annotation("op-1-abcde");
        assert_eq!(key, ANNOTATION);
        let annotations = BTreeMap::from([(key, value)]);
        assert_eq!(Incarnation::of_holder(Some(&annotations), Some("op-1-abcde")), Some(holder()));
        // A holder in the old format (a previous version) wrote no annotation; a stale one
        // names another holder.
        assert_eq!(Incarnation::of_holder(None, Some("op-1-abcde")), None);
        assert_eq!(Incarnation::of_holder(Some(&annotations), Some("op-2-fghij")), None);
        assert_eq!(Incarnation::of_holder(Some(&annotations), None), None, "released");
        for broken in ["", "{}", "not json", r#"{"identity":"op-1-abcde","namespace":"ns","pod":"op-1","podUID":"u"}"#]
        {
            let a = BTreeMap::from([(ANNOTATION.to_string(), broken.to_string())]);
            assert_eq!(Incarnation::of_holder(Some(&a), Some("op-1-abcde")), None, "{broken}");
        }
        let empty_id = Incarnation { container_id: String::new(), ..holder() }.annotation("op-1-abcde");
        assert_eq!(Incarnation::of_holder(Some(&BTreeMap::from([empty_id])), Some("op-1-abcde")), None);
    }

    #[test]
    fn the_container_id_comes_from_this_pods_cgroup() {
        let cgroupfs = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n0::/\n"
        );
        assert_eq!(container_id_in_cgroup(&cgroupfs, UID).as_deref(), Some(ID));
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(container_id_in_cgroup(&systemd, UID).as_deref(), Some(ID));
        // A private cgroup namespace, another pod's path, the pod's own cgroup, no hex id.
        assert_eq!(container_id_in_cgroup("0::/\n", UID), None);
        assert_eq!(container_id_in_cgroup(&format!("4:memory:/kubepods/podother/{ID}\n"), UID), None);
        assert_eq!(container_id_in_cgroup(&format!("4:memory:/kubepods/pod{UID}\n"), UID), None);
        assert_eq!(container_id_in_cgroup(&format!("4:memory:/kubepods/pod{UID}/{}\n", &ID[..12]), UID), None);
        assert_eq!(container_id_in_cgroup(&format!("4:memory:/kubepods/pod{UID}/{}\n", ID.to_uppercase()), UID), None);
    }

    #[test]
    fn an_incarnation_needs_the_pod_and_the_container() {
        let env = |name: &str| match name {
            "POD_NAMESPACE" => Some("ns".to_string()),
            "POD_NAME" => Some("op-1".to_string()),
            "POD_UID" => Some(UID.to_string()),
            _ => None,
        };
        let cgroup = format!("4:memory:/kubepods/pod{UID}/{ID}\n");
        assert_eq!(Incarnation::discover(env, &cgroup), Ok(holder()));
        assert_eq!(Incarnation::discover(env, "0::/\n"), Err(Unknown::NoContainerId));
        let host = |name: &str| (name == "POD_NAME").then(|| "op-1".to_string());
        assert_eq!(Incarnation::discover(host, &cgroup), Err(Unknown::NoPod));
        let empty = |name: &str| if name == "POD_UID" { Some(String::new()) } else { env(name) };
        assert_eq!(Incarnation::discover(empty, &cgroup), Err(Unknown::NoPod));
    }
}
