//! The local control plane does what the operator relies on. Run by `cargo xtask test`.
//! Tests named `local_only_*` read the audit log or Jaeger of the local control plane and are
//! skipped against a user's cluster.

mod common;

use common::{TestNamespace, client, eventually};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use std::time::Duration;

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn three_nodes_are_ready() {
    let nodes: Api<Node> = Api::all(client().await);
    let ready = eventually("3 Ready nodes", Duration::from_secs(30), || async {
        let list = nodes.list(&ListParams::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        (ready >= 3).then_some(ready)
    })
    .await;
    assert!(ready >= 3);
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn deployment_becomes_available_and_is_garbage_collected() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "deploy").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let replicasets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
            }
        }
    }))
    .expect("deployment");
    deployments.create(&PostParams::default(), &d).await.expect("create deployment");

    eventually("Deployment web available 2/2", Duration::from_secs(60), || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.available_replicas? == 2).then_some(())
    })
    .await;
    let running = pods.list(&ListParams::default().labels("app=web")).await.expect("pods");
    assert_eq!(running.items.len(), 2);
    for p in &running.items {
        let status = p.status.as_ref().expect("pod status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(), "pod is scheduled");
    }
    assert_eq!(replicasets.list(&ListParams::default()).await.expect("rs").items.len(), 1);

    deployments.delete("web", &DeleteParams::default()).await.expect("delete deployment");
    eventually("ReplicaSet and Pods garbage-collected", Duration::from_secs(60), || async {
        let rs = replicasets.list(&ListParams::default()).await.ok()?;
        let ps = pods.list(&ListParams::default()).await.ok()?;
        (rs.items.is_empty() && ps.items.is_empty()).then_some(())
    })
    .await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn lease_update_with_stale_resource_version_is_refused() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "lease").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}
    }))
    .expect("lease");
    let created = leases.create(&PostParams::default(), &lease).await.expect("create lease");

    let mut first = created.clone();
    first.spec.as_mut().expect("spec").holder_identity = Some("b".into());
    leases.replace("probe", &PostParams::default(), &first).await.expect("first update");

    // `created` still carries the old resourceVersion.
    let mut stale = created;
    stale.spec.as_mut().expect("spec").holder_identity = Some("c".into());
    match leases.replace("probe", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409, "{s:?}"),
        other => panic!("a stale update must be refused with 409, got {other:?}"),
    }
    let holder = leases.get("probe").await.expect("get").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("b"));
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_audit_log_records_writes_with_user_agent() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "audit").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let lease: Lease =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "audited"}, "spec": {}})).expect("lease");
    leases.create(&PostParams::default(), &lease).await.expect("create lease");
    leases.delete("audited", &DeleteParams::default()).await.expect("delete lease");
    let writes = eventually("the lease writes in the audit log", Duration::from_secs(10), || async {
        let w = common::audit_writes(&ns.name, common::USER_AGENT);
        (w.len() >= 2).then_some(w)
    })
    .await;
    let verbs: Vec<&str> = writes.iter().filter_map(|e| e["verb"].as_str()).collect();
    assert!(verbs.contains(&"create") && verbs.contains(&"delete"), "{verbs:?}");
    assert!(writes.iter().all(|e| { e["user"]["username"].as_str().is_some_and(|u| !u.is_empty()) }));
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn local_only_jaeger_has_api_server_spans() {
    let jaeger = common::jaeger();
    // Make a few requests, so that there is something to trace.
    let nodes: Api<Node> = Api::all(client().await);
    for _ in 0..3 {
        let _ = nodes.list(&ListParams::default()).await;
    }
    eventually("service apiserver with spans in Jaeger", Duration::from_secs(30), || async {
        let (_, services) = common::http_get(&format!("{jaeger}/api/services"))?;
        if !services.contains("\"apiserver\"") {
            return None;
        }
        let traces = common::jaeger_traces("apiserver", None, None, 5)?;
        (common::spans_of(&traces).count() > 0).then_some(())
    })
    .await;
}
