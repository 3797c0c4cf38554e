//! The operator as users install it: `kubectl apply -k deploy/overlays/local` on the local
//! control plane's real node (`deploy/` as shipped, with only the image, the placement and the
//! trace endpoint changed), for the demo, the tests and the pod chaos.

use crate::operator::{self, NAMESPACE};
use crate::{cluster::gobuild, cluster::node, paths};
use ::chaos::report::LeaseTimings;
use anyhow::{Result, bail};
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};
use std::process::Command;
use std::time::{Duration, Instant};

/// The lease timings the install ships (the operator's defaults; `deploy/` sets none).
pub const TIMINGS: LeaseTimings = LeaseTimings { duration: 15.0, renew_deadline: 10.0, retry_period: 2.0 };

/// The overlay, relative to the repository.
pub const OVERLAY: &str = "deploy/overlays/local";
/// The operator's Deployment in `deploy/manager`.
pub const DEPLOYMENT: &str = "myapp-operator";
/// The label selector of its pods.
pub const SELECTOR: &str = "app.kubernetes.io/name=myapp-operator,app.kubernetes.io/component=controller";

/// kubectl from the control plane's build (or `kubectl` on PATH).
pub fn kubectl() -> Command {
    Command::new(gobuild::kubectl().unwrap_or_else(|| "kubectl".into()))
}

/// Makes the node ready for the install: the image `cargo xtask image` built (building it when
/// missing) imported into its containerd, no operator process on the host, and no URL-based
/// webhook configurations of local processes (nobody would answer them).
pub async fn prepare(client: &Client) -> Result<()> {
    if let Some(why) = node::why_not() {
        bail!("the real node is not running: {why}");
    }
    if !paths::run_dir().join("image/myapp-operator.tar").is_file() {
        crate::image::image(crate::image::ImageArgs { tag: "myapp-operator:dev".into() })?;
    }
    node::import_operator_image()?;
    operator::stop_replicas();
    operator::remove_local_webhooks(client).await?;
    Ok(())
}

/// `kubectl apply -k deploy/overlays/local`, then waits until the Deployment has rolled out three
/// ready pods. Returns how long that took.
pub async fn apply(client: &Client, kubeconfig: &std::path::Path) -> Result<Duration> {
    apply_kustomization(client, kubeconfig, &paths::repo().join(OVERLAY)).await
}

/// `kubectl apply -k dir` (an overlay of the install), then as [`apply`].
pub async fn apply_kustomization(
    client: &Client,
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
) -> Result<Duration> {
    let started = Instant::now();
    kubectl_k("apply", dir, kubeconfig)?;
    rolled_out(client, Duration::from_secs(180)).await?;
    webhooks_answer(client).await?;
    Ok(started.elapsed())
}

/// `kubectl <verb> -k dir` (`apply`, `delete`), failing with what kubectl said.
pub fn kubectl_k(verb: &str, dir: &std::path::Path, kubeconfig: &std::path::Path) -> Result<()> {
    let mut kubectl = kubectl();
    kubectl.env("KUBECONFIG", kubeconfig).args([verb, "-k"]).arg(dir);
    crate::sh::output(&mut kubectl, &format!("kubectl {verb} -k {}", dir.display())).map(|_| ())
}

/// Installs the operator as [`prepare`] and [`apply`] do, unless it is already rolled out: what
/// every command that works on the install's pods does first.
pub async fn ensure(client: &Client, kubeconfig: &std::path::Path) -> Result<()> {
    if !is_rolled_out(client).await {
        prepare(client).await?;
        apply(client, kubeconfig).await?;
    }
    Ok(())
}

/// Waits until the webhooks answer through their Service (ready pods become endpoints, and
/// kube-proxy programs them, a moment after the rollout): a server-side dry run of a MyApp
/// create goes through both webhooks without writing anything.
pub async fn webhooks_answer(client: &Client) -> Result<()> {
    webhooks_answer_in(client, "default").await
}

/// [`webhooks_answer`] for a MyApp in `namespace` (one the webhooks select).
pub async fn webhooks_answer_in(client: &Client, namespace: &str) -> Result<()> {
    use kube::api::PostParams;
    use myapp_operator::api::MyApp;
    let probe = chaos::fixtures::myapp("webhook-probe", serde_json::json!({"image": "nginx:1.27"}))?;
    let api: Api<MyApp> = Api::namespaced(client.clone(), namespace);
    let dry = PostParams { dry_run: true, ..Default::default() };
    chaos::wait::poll(
        "the webhooks answering through their Service",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            match api.create(&dry, &probe).await {
                Err(kube::Error::Api(e)) if e.message.contains("failed calling webhook") => None,
                _ => Some(()),
            }
        },
    )
    .await
}

/// The operator's pods, oldest first.
pub async fn pods(client: &Client) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut list = api.list(&ListParams::default().labels(SELECTOR)).await?.items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    Ok(list)
}

pub use chaos::pods::{is_ready, restarts};

/// True when the Deployment exists and its rollout is complete, with every replica ready (one GET).
pub async fn is_rolled_out(client: &Client) -> bool {
    let Ok(d) = Api::<Deployment>::namespaced(client.clone(), NAMESPACE).get(DEPLOYMENT).await else {
        return false;
    };
    chaos::pods::rolled_out(&d, d.spec.replicas.unwrap_or(1))
}

/// Waits until [`is_rolled_out`]; on timeout, fails with every pod's last log lines (a crash loop
/// shows there).
pub async fn rolled_out(client: &Client, timeout: Duration) -> Result<()> {
    let done = || async { is_rolled_out(client).await.then_some(()) };
    if chaos::wait::within(timeout, Duration::from_millis(200), done).await.is_none() {
        bail!("the operator's pods did not roll out within {timeout:?}:\n{}", logs(client).await);
    }
    Ok(())
}

/// The last lines of every operator pod's log, and of its previous container after a restart.
pub async fn logs(client: &Client) -> String {
    let api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let Ok(list) = pods(client).await else {
        return "cannot list the operator pods".into();
    };
    chaos::pods::logs(&api, &list).await
}

/// The pod of a Lease holder identity (`<pod name>-<suffix>`).
pub fn pod_of(identity: &str) -> Option<&str> {
    identity.rsplit_once('-').map(|(pod, _)| pod)
}

/// The leader pod: (identity, pod name), when a pod of the install holds the Lease.
pub async fn leader(client: &Client) -> Option<(String, String)> {
    let (holder, _) = operator::lease_holder(client).await?;
    let pod = pod_of(&holder)?.to_string();
    let exists = pods(client).await.ok()?.iter().any(|p| p.metadata.name.as_deref() == Some(pod.as_str()));
    exists.then_some((holder, pod))
}

/// Takes the install's pods down, saying so, if they run on `target`'s local cluster: a command
/// that runs the replicas as processes (`demo --processes`, `test`, `chaos`, `bench`) would
/// otherwise compete with them for the Lease, and wait for it in vain.
pub async fn make_way_for_processes(client: &Client, local: bool) -> Result<()> {
    let installed = Api::<Deployment>::namespaced(client.clone(), NAMESPACE).get_opt(DEPLOYMENT).await?.is_some();
    if local && installed {
        println!(
            "==> taking the install's pods down: this command runs the replicas as processes, which would compete with them for the Lease"
        );
        uninstall(client).await?;
    }
    Ok(())
}

/// Removes the install's pods and its Service-based webhook configurations, keeping the CRD,
/// the RBAC and the MyApps (the host-process replicas use them too). Waits until the pods are gone.
pub async fn uninstall(client: &Client) -> Result<()> {
    let dp = DeleteParams::default();
    let gone = |r: kube::Result<()>| match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    };
    gone(Api::<Deployment>::namespaced(client.clone(), NAMESPACE).delete(DEPLOYMENT, &dp).await.map(|_| ()))?;
    gone(Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(DEPLOYMENT, &dp).await.map(|_| ()))?;
    gone(Api::<ValidatingWebhookConfiguration>::all(client.clone()).delete(DEPLOYMENT, &dp).await.map(|_| ()))?;
    chaos::wait::poll("the operator's pods gone", Duration::from_secs(60), Duration::from_millis(200), || async {
        pods(client).await.ok().filter(|p| p.is_empty()).map(|_| ())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_of_an_identity_drops_the_suffix_only() {
        assert_eq!(pod_of("myapp-operator-7d9f8b6c5-abcde-x2k4m"), Some("myapp-operator-7d9f8b6c5-abcde"));
        assert_eq!(pod_of("nosuffix"), None);
    }

    #[test]
    fn the_overlay_changes_only_image_placement_and_traces() {
        let text = std::fs::read_to_string(paths::repo().join(OVERLAY).join("kustomization.yaml")).expect("overlay");
        let k: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let base: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(paths::repo().join("deploy/kustomization.yaml")).expect("deploy/"),
        )
        .expect("yaml");
        let parts: Vec<String> = base["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .filter_map(|r| r.as_str().map(|r| format!("../../{r}")))
            .collect();
        let ours: Vec<String> = k["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect();
        assert_eq!(ours, parts, "every part of deploy/, and nothing else");
        assert_eq!(k["namespace"], base["namespace"]);
        assert_eq!(k["labels"], base["labels"]);
        assert_eq!(k["images"][0]["name"], base["images"][0]["name"]);
        assert_eq!(k["images"][0]["newName"].as_str(), Some("docker.io/library/myapp-operator"));
        let patches = k["patches"].as_sequence().expect("patches");
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0]["target"]["kind"].as_str(), Some("Deployment"));
        let ops: Vec<serde_yaml::Value> =
            serde_yaml::from_str(patches[0]["patch"].as_str().expect("a JSON patch")).expect("ops");
        let paths: Vec<&str> = ops.iter().filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/spec/template/spec/tolerations",
                "/spec/template/spec/nodeSelector",
                "/spec/template/spec/containers/0/env/-"
            ]
        );
        assert_eq!(ops[0]["value"][0]["key"].as_str(), Some(node::TAINT));
        assert_eq!(ops[1]["value"][node::LABEL.0].as_str(), Some(node::LABEL.1));
        assert_eq!(ops[2]["value"]["name"].as_str(), Some("OTEL_EXPORTER_OTLP_ENDPOINT"));
        assert!(ops[2]["value"]["value"].as_str().is_some_and(|v| v.contains(node::NODE_IP)));
        assert!(node::OPERATOR_IMAGE.starts_with("docker.io/library/myapp-operator:"));
    }
}
