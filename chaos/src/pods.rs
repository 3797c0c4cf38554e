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

/// The state of each of `pods` and the last 30 lines of its log, and of its previous container's
/// after a restart (read through `api`).
pub async fn logs(api: &Api<Pod>, pods: &[Pod]) -> String {
    let mut out = String::new();
    for p in pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        out += &format!("--- pod {name}: {phase}, ready {}, {} restarts\n", is_ready(p), restarts(p));
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
