//! Pods and Deployments as the install tests and the task runner read them: readiness,
//! restarts, a finished rollout, and the logs that explain a failure.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};

/// True when the pod's Ready condition is True.
pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Restarts of the pod's containers.
pub fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// True when the Deployment's rollout of its current generation is complete, with `want`
/// replicas, every one updated, ready and available.
pub fn rolled_out(d: &Deployment, want: i32) -> bool {
    let s = d.status.clone().unwrap_or_default();
    s.observed_generation == d.metadata.generation
        && s.updated_replicas == Some(want)
        && s.ready_replicas == Some(want)
        && s.available_replicas == Some(want)
        && s.replicas == Some(want)
}

/// Why the pod is not running ready, as the kubelet and the scheduler said it: each condition that
/// is not True, with its reason and message (a Pending pod's `PodScheduled` names the taint or
/// the missing resource), and each container waiting or terminated, with its reason.
pub fn not_ready_because(p: &Pod) -> Vec<String> {
    let Some(s) = p.status.as_ref() else { return vec!["no status yet".into()] };
    let conditions = s.conditions.iter().flatten().filter(|c| c.status != "True").map(|c| {
        let reason = c.reason.as_deref().unwrap_or("");
        format!("condition {} {}: {reason} {}", c.type_, c.status, c.message.as_deref().unwrap_or(""))
            .trim_end()
            .to_string()
    });
    let containers = s.container_statuses.iter().flatten().filter_map(|c| {
        let state = c.state.as_ref()?;
        if let Some(w) = &state.waiting {
            let (reason, message) = (w.reason.as_deref().unwrap_or(""), w.message.as_deref().unwrap_or(""));
            Some(format!("container {} waiting: {reason} {message}", c.name).trim_end().to_string())
        } else {
            let t = state.terminated.as_ref()?;
            Some(format!("container {} terminated: {} exit {}", c.name, t.reason.as_deref().unwrap_or(""), t.exit_code))
        }
    });
    conditions.chain(containers).collect()
}

/// The state of each of `pods` and the last 30 lines of its log, and of its previous container's
/// after a restart (read through `api`).
pub async fn logs(api: &Api<Pod>, pods: &[Pod]) -> String {
    let mut out = String::new();
    for p in pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        out += &format!("--- pod {name}: {phase}, ready {}, {} restarts\n", is_ready(p), restarts(p));
        for why in not_ready_because(p) {
            out += &format!("  {why}\n");
        }
        for previous in [true, false] {
            let lp = LogParams { tail_lines: Some(30), previous, ..Default::default() };
            if let Ok(text) = api.logs(&name, &lp).await {
                out += &format!("  [{}]\n{text}\n", if previous { "previous container" } else { "current container" });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pending_pod_says_which_taint_keeps_it_off_the_node() {
        let pod: Pod = serde_json::from_value(json!({"status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/disk-pressure: }"}],
            "containerStatuses": [
                {"name": "a", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ErrImageNeverPull"}}},
                {"name": "b", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
                 "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            ]
        }}))
        .expect("pod");
        let why = not_ready_because(&pod);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].contains("PodScheduled False: Unschedulable") && why[0].contains("disk-pressure"), "{why:?}");
        assert_eq!(why[1], "container a waiting: ErrImageNeverPull");
        assert_eq!(why[2], "container b terminated: OOMKilled exit 137");
        assert_eq!(not_ready_because(&Pod::default()), vec!["no status yet".to_string()]);
    }

    #[test]
    fn readiness_restarts_and_rollout() {
        let pod: Pod = serde_json::from_value(json!({"status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {"name": "a", "image": "i", "imageID": "", "ready": true, "restartCount": 2},
                {"name": "b", "image": "i", "imageID": "", "ready": true, "restartCount": 1}
            ]
        }}))
        .expect("pod");
        assert!(is_ready(&pod) && restarts(&pod) == 3);
        assert!(!is_ready(&Pod::default()) && restarts(&Pod::default()) == 0);
        assert!(not_ready_because(&pod).is_empty(), "{:?}", not_ready_because(&pod));
        let mut d = Deployment::default();
        d.metadata.generation = Some(2);
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            observed_generation: Some(2),
            replicas: Some(3),
            updated_replicas: Some(3),
            ready_replicas: Some(3),
            available_replicas: Some(3),
            ..Default::default()
        });
        assert!(rolled_out(&d, 3) && !rolled_out(&d, 2));
        let mut old = d.clone();
        old.metadata.generation = Some(3);
        assert!(!rolled_out(&old, 3), "a new generation is not rolled out yet");
    }
}
