//! The install in `deploy/`: least privilege, and `kubectl apply -k deploy/` on a real API server.

mod common;

use common::{client, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

fn rbac_docs() -> Vec<serde_yaml::Value> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rbac");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(dir).expect("deploy/rbac") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push(serde::Deserialize::deserialize(doc).expect("yaml"));
        }
    }
    docs
}

#[test]
fn roles_have_no_wildcards() {
    let mut rules = 0;
    for doc in rbac_docs() {
        if !matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role")) {
            continue;
        }
        for rule in doc["rules"].as_sequence().expect("rules") {
            rules += 1;
            for key in ["verbs", "resources", "apiGroups"] {
                for v in rule[key].as_sequence().expect(key) {
                    assert_ne!(v.as_str(), Some("*"), "wildcard in {key} of {:?}", doc["metadata"]["name"]);
                }
            }
        }
    }
    assert!(rules >= 5, "the roles grant what the operator uses ({rules} rules)");
}

/// What the roles may grant on one resource: exactly the verbs the operator's code uses there.
struct Allowed {
    /// `ClusterRole` or `Role` (the operator's namespace only).
    kind: &'static str,
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    /// Every verb but `create` (which cannot be) is granted for named objects only.
    by_name: bool,
}

/// The verbs the code uses, per resource, with the code that needs each. A verb the code stops
/// using comes out of this list and out of `deploy/rbac`; a new call goes into both.
const ALLOWED: &[Allowed] = &[
    // list, watch: the warm cache (src/cache/mod.rs, `Caches::start`); get: a MyApp too large to
    // cache, read whole at each reconcile (src/controller/mod.rs, `whole`); patch: the finalizer
    // (src/controller/writer.rs, `Writer::set_finalizers`).
    Allowed {
        kind: "ClusterRole",
        group: "myapp.dev",
        resource: "myapps",
        verbs: &["get", "list", "watch", "patch"],
        by_name: false,
    },
    // patch: src/controller/writer.rs, `Writer::patch_status`.
    Allowed { kind: "ClusterRole", group: "myapp.dev", resource: "myapps/status", verbs: &["patch"], by_name: false },
    // update: the children's owner references set blockOwnerDeletion (src/controller/children.rs,
    // `metadata`), which the OwnerReferencesPermissionEnforcement admission plugin allows only to
    // whoever may update the owner's finalizers.
    Allowed {
        kind: "ClusterRole",
        group: "myapp.dev",
        resource: "myapps/finalizers",
        verbs: &["update"],
        by_name: false,
    },
    // list, watch: the warm caches (src/cache/mod.rs); get: a child the cache lacks
    // (src/controller/reconcile.rs, `live_child`); patch: server-side apply, which needs create
    // too when it makes the object (src/controller/writer.rs, `Writer::apply`); delete: cleanup
    // (`Writer::delete`).
    Allowed {
        kind: "ClusterRole",
        group: "apps",
        resource: "deployments",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        by_name: false,
    },
    // As for Deployments.
    Allowed {
        kind: "ClusterRole",
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        by_name: false,
    },
    // create, then patch for the next of a series: src/controller/events.rs, `Publisher::publish`
    // (events.k8s.io/v1 only; nothing writes core v1 Events).
    Allowed {
        kind: "ClusterRole",
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        by_name: false,
    },
    // get, patch (a JSON patch testing the resourceVersion): src/webhook/certs/ca_bundle.rs,
    // `ensure_one`; list, watch by name: src/webhook/certs/upkeep.rs, `changes`.
    Allowed {
        kind: "ClusterRole",
        group: "admissionregistration.k8s.io",
        resource: "mutatingwebhookconfigurations",
        verbs: &["get", "list", "watch", "patch"],
        by_name: true,
    },
    // As for the mutating configuration.
    Allowed {
        kind: "ClusterRole",
        group: "admissionregistration.k8s.io",
        resource: "validatingwebhookconfigurations",
        verbs: &["get", "list", "watch", "patch"],
        by_name: true,
    },
    // get: `Elector::refresh`; create, update (replace with the resourceVersion read):
    // `Elector::write`; list, watch by name: `Elector::run` (src/leader/elector.rs).
    Allowed {
        kind: "Role",
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "list", "watch", "create", "update"],
        by_name: true,
    },
    // list, watch by name (fieldSelector): the Lease holder's pod, for the kubelet's report that
    // its container exited (src/leader/pods.rs, `HolderPod::follow`). Nothing gets or writes pods.
    Allowed { kind: "Role", group: "", resource: "pods", verbs: &["list", "watch"], by_name: false },
    // get, create, update (replace under compare-and-swap): src/webhook/certs/secret.rs, `ensure`;
    // list, watch by name: src/webhook/certs/upkeep.rs, `changes`.
    Allowed {
        kind: "Role",
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch", "create", "update"],
        by_name: true,
    },
];

/// Verbs that hand out more than the operator's own rights: never granted.
const NEVER: &[&str] = &["*", "escalate", "bind", "impersonate"];

fn strings(v: &serde_yaml::Value) -> Vec<&str> {
    v.as_sequence().into_iter().flatten().filter_map(serde_yaml::Value::as_str).collect()
}

/// Every (kind, group, resource, verb, named) the roles of `docs` grant.
fn grants(docs: &[serde_yaml::Value]) -> Vec<(String, String, String, String, bool)> {
    let mut grants = Vec::new();
    for doc in docs {
        let Some(kind @ ("ClusterRole" | "Role")) = doc["kind"].as_str() else { continue };
        for rule in doc["rules"].as_sequence().expect("rules") {
            let named = !strings(&rule["resourceNames"]).is_empty();
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push((kind.into(), group.into(), resource.into(), verb.into(), named));
                    }
                }
            }
        }
    }
    grants
}

/// The verbs of the roles, checked against [`ALLOWED`]: `Ok` when they grant exactly those, else
/// what is wrong.
fn least_privilege(docs: &[serde_yaml::Value]) -> Result<(), String> {
    let granted = grants(docs);
    for (kind, group, resource, verb, named) in &granted {
        let what = format!("{kind} grants {verb:?} on {group:?}/{resource}");
        if NEVER.contains(&verb.as_str()) {
            return Err(format!("{what}: never granted"));
        }
        let allowed = ALLOWED.iter().find(|a| a.kind == kind && a.group == group && a.resource == resource);
        let Some(allowed) = allowed else { return Err(format!("{what}: no code uses that resource")) };
        if !allowed.verbs.contains(&verb.as_str()) {
            return Err(format!("{what}: the code does not use it (allowed: {:?})", allowed.verbs));
        }
        if allowed.by_name && verb != "create" && !named {
            return Err(format!("{what} on every object, not by name"));
        }
    }
    for a in ALLOWED {
        for verb in a.verbs {
            let has = granted.iter().any(|(k, g, r, v, _)| k == a.kind && g == a.group && r == a.resource && v == verb);
            if !has {
                return Err(format!("{} lacks {verb:?} on {:?}/{}, which the code uses", a.kind, a.group, a.resource));
            }
        }
    }
    Ok(())
}

#[test]
fn roles_grant_exactly_the_verbs_the_code_uses() {
    let docs = rbac_docs();
    assert!(grants(&docs).len() >= 30, "the roles were read");
    if let Err(e) = least_privilege(&docs) {
        panic!("deploy/rbac: {e}");
    }
}

/// The check refuses what it should: each verb that is not needed, or that hands out rights.
#[test]
fn least_privilege_refuses_extra_and_dangerous_verbs() {
    let with_rule = |kind: &str, rule: serde_yaml::Value| {
        let mut docs = rbac_docs();
        let role = docs.iter_mut().find(|d| d["kind"].as_str() == Some(kind)).expect("the role");
        role["rules"].as_sequence_mut().expect("rules").push(rule);
        docs
    };
    let rule = |group: &str, resource: &str, verb: &str| {
        serde_yaml::from_str::<serde_yaml::Value>(&format!(
            "{{apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [\"{verb}\"]}}"
        ))
        .expect("a rule")
    };
    let cases = [
        ("ClusterRole", rule("apps", "deployments", "update")),
        ("ClusterRole", rule("myapp.dev", "myapps", "update")),
        ("ClusterRole", rule("", "events", "create")),
        ("ClusterRole", rule("rbac.authorization.k8s.io", "clusterroles", "escalate")),
        ("ClusterRole", rule("rbac.authorization.k8s.io", "clusterroles", "bind")),
        ("ClusterRole", rule("", "serviceaccounts", "impersonate")),
        ("ClusterRole", rule("", "secrets", "get")),
        ("Role", rule("", "secrets", "get")),
        ("Role", rule("", "secrets", "delete")),
        ("Role", rule("", "pods", "get")),
        ("Role", rule("", "pods", "delete")),
        ("ClusterRole", rule("", "pods", "list")),
    ];
    for (kind, extra) in cases {
        let docs = with_rule(kind, extra.clone());
        assert!(least_privilege(&docs).is_err(), "{kind} with {extra:?} passed");
    }
}

/// The rules of the webhook configuration of `kind` in deploy/webhook/webhooks.yaml: the resources
/// its rules match.
fn webhook_resources(kind: &str) -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/webhook/webhooks.yaml");
    let text = std::fs::read_to_string(path).expect("read webhooks.yaml");
    let mut resources = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if doc["kind"].as_str() != Some(kind) {
            continue;
        }
        for webhook in doc["webhooks"].as_sequence().expect("webhooks") {
            for rule in webhook["rules"].as_sequence().expect("rules") {
                let listed = rule["resources"].as_sequence().expect("resources");
                resources.extend(listed.iter().filter_map(|r| r.as_str().map(str::to_string)));
            }
        }
    }
    resources
}

#[test]
fn kubectl_scale_goes_through_the_validating_webhook_only() {
    let validated = webhook_resources("ValidatingWebhookConfiguration");
    assert!(validated.iter().any(|r| r == "myapps"), "{validated:?}");
    assert!(validated.iter().any(|r| r == "myapps/scale"), "the scale subresource bypasses the policy: {validated:?}");
    let mutated = webhook_resources("MutatingWebhookConfiguration");
    assert_eq!(mutated, ["myapps"], "a Scale has nothing to default");
}

/// The operator container of deploy/manager/deployment.yaml.
fn manager_container() -> serde_yaml::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/manager/deployment.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).expect("read")).expect("yaml");
    let containers = doc["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers").clone();
    containers.into_iter().find(|c| c["name"] == "manager").expect("the manager container")
}

#[test]
fn probes_never_depend_on_the_api_server_except_readiness() {
    let c = manager_container();
    let path = |probe: &str| c[probe]["httpGet"]["path"].as_str().map(str::to_string);
    assert_eq!(path("livenessProbe").as_deref(), Some("/livez"));
    assert_eq!(path("readinessProbe").as_deref(), Some("/readyz"));
    // A startup probe on /readyz would restart a replica that cannot reach the API server.
    assert_eq!(path("startupProbe").as_deref(), Some("/livez"));
    let int = |probe: &str, key: &str| c[probe][key].as_i64().unwrap_or(0);
    let budget = int("startupProbe", "periodSeconds") * int("startupProbe", "failureThreshold");
    assert!(budget >= 20, "room for a slow start: {budget} s");
    assert!(int("startupProbe", "periodSeconds") <= 2, "probing begins soon after a normal start");
}

fn kubectl(args: &[&str]) -> (bool, String) {
    let bin = std::env::var("MYAPP_E2E_KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(bin).args(args).output().expect("run kubectl");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn apply_k_deploy_installs_three_available_replicas() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let (ok, out) = kubectl(&["apply", "-k", dir, "--dry-run=server"]);
    assert!(ok, "server-side dry run failed:\n{out}");
    let (ok, out) = kubectl(&["apply", "-k", dir]);
    assert!(ok, "apply failed:\n{out}");

    let client = client().await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "myapp-system");
    eventually("myapp-operator 3/3 available", Duration::from_secs(90), || async {
        let d = deployments.get("myapp-operator").await.ok()?;
        (d.status?.available_replicas? == 3).then_some(())
    })
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), "myapp-system")
        .list(&ListParams::default().labels("app.kubernetes.io/name=myapp-operator"))
        .await
        .expect("pods");
    let nodes: BTreeSet<String> =
        pods.items.iter().filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone())).collect();
    assert!(nodes.len() >= 2, "anti-affinity spreads the replicas: {nodes:?}");
    let pod = &pods.items[0];
    let sc = pod.spec.as_ref().and_then(|s| s.containers[0].security_context.clone()).expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    // The pods are simulated by kwok: remove the Deployment, and the webhook configurations that
    // point at its Service, so that only the harness's replicas run and answer admissions.
    deployments.delete("myapp-operator", &DeleteParams::default()).await.expect("delete");
    let (ok, out) =
        kubectl(&["delete", "mutatingwebhookconfiguration,validatingwebhookconfiguration", "myapp-operator"]);
    assert!(ok, "{out}");
}

#[test]
#[ignore = "needs the kubectl built by `cargo xtask cluster up`: run `cargo xtask test`"]
fn cert_manager_overlay_renders_with_ca_injection() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/overlays/cert-manager");
    let (ok, out) = kubectl(&["kustomize", dir]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("cert-manager.io/inject-ca-from: myapp-system/myapp-operator-webhook-cert").count(), 2);
    assert!(out.contains("name: WEBHOOK_CERT_DIR"), "the operator reads the mounted certificate");
    assert!(out.contains("kind: Certificate"));
}

/// The component that narrows the webhook port to the API server's addresses applies to the
/// shipped install and touches the webhook rule only: the probe port stays open to the kubelet.
#[test]
#[ignore = "needs the kubectl built by `cargo xtask cluster up`: run `cargo xtask test`"]
fn the_api_server_component_narrows_only_the_webhook_port() {
    let repo = env!("CARGO_MANIFEST_DIR");
    // kustomize reads bases by relative paths only: the overlay lives in the repo's scratch folder.
    let dir = std::path::Path::new(repo).join(".run").join(format!("netpol-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../deploy\n\
         components:\n  - ../../deploy/components/webhook-from-api-server\n",
    )
    .expect("write");
    let (ok, out) = kubectl(&["kustomize", &dir.to_string_lossy()]);
    drop(std::fs::remove_dir_all(&dir));
    assert!(ok, "{out}");
    let policy = out
        .split("\n---\n")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .find(|d| d["kind"] == "NetworkPolicy")
        .expect("the NetworkPolicy");
    let rules = policy["spec"]["ingress"].as_sequence().expect("ingress rules");
    let rule = |port: u64| rules.iter().find(|r| r["ports"][0]["port"].as_u64() == Some(port)).expect("a rule");
    assert_eq!(rule(9443)["from"][0]["ipBlock"]["cidr"], "192.0.2.10/32");
    assert!(rule(8081).get("from").is_none(), "the probe port is left open: {policy:?}");
}

/// The README's sizing paragraph states the memory request and limit `deploy/` ships.
#[test]
fn the_readme_sizing_matches_the_shipped_memory() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let deployment: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo.join("deploy/manager/deployment.yaml")).expect("the operator's Deployment"),
    )
    .expect("YAML");
    let resources = &deployment["spec"]["template"]["spec"]["containers"][0]["resources"];
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    for (what, value) in [("requests", &resources["requests"]["memory"]), ("limits", &resources["limits"]["memory"])] {
        let value = value.as_str().expect("a memory quantity");
        let stated = format!("`{what}.memory: {value}`");
        assert!(readme.contains(&stated), "README.md's sizing must state {stated}, as deploy/ ships it");
    }
}
