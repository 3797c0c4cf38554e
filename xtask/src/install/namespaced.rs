//! `cargo xtask namespaced`: the namespace-scoped install, `deploy/overlays/namespaced`, on the
//! real node (with the local overlay's image, placement and trace endpoint on top, nothing else).
//!
//! The default install's pods go first, so that no replica with cluster-wide grants is left;
//! then the overlay is applied and proven:
//! - the ServiceAccount may not list MyApps, Deployments or Services cluster-wide (a
//!   SubjectAccessReview), only in the managed namespaces;
//! - a MyApp in each managed namespace becomes Ready;
//! - a MyApp in another namespace is neither given a finalizer nor reconciled (no status, no
//!   child), and can be deleted;
//! - the audit log shows no request of the operator's that RBAC denied.
//!
//! Then the default install comes back, for the steps after this one.

use super::apply as install;
use crate::operator::{NAMESPACE, TargetArgs};
use crate::{cluster, paths};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use myapp_operator::api::MyApp;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The overlay, relative to the repository.
pub const OVERLAY: &str = "deploy/overlays/namespaced";
/// The namespaces the overlay manages.
pub const MANAGED: [&str; 2] = ["team-a", "team-b"];
/// A namespace it does not manage.
const ELSEWHERE: &str = "team-c";

/// `.run/namespaced/kustomization.yaml`: the namespaced overlay with the images and patches of
/// the local overlay (read from it, so that the two cannot drift).
fn local_variant() -> Result<PathBuf> {
    let local: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        paths::repo().join(install::OVERLAY).join("kustomization.yaml"),
    )?)?;
    let dir = paths::run_dir().join("namespaced");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("kustomization.yaml"), variant_text(&local)?)?;
    Ok(dir)
}

/// The text of [`local_variant`], from the local overlay's kustomization.
fn variant_text(local: &serde_yaml::Value) -> Result<String> {
    let mut k = serde_yaml::Mapping::new();
    k.insert("apiVersion".into(), "kustomize.config.k8s.io/v1beta1".into());
    k.insert("kind".into(), "Kustomization".into());
    k.insert("resources".into(), vec![serde_yaml::Value::from(format!("../../{OVERLAY}"))].into());
    for key in ["images", "patches"] {
        k.insert(key.into(), local.get(key).with_context(|| format!("{}: no {key}", install::OVERLAY))?.clone());
    }
    Ok(format!(
        "# Written by cargo xtask namespaced: {OVERLAY} with the image, placement and trace endpoint of {}.\n{}",
        install::OVERLAY,
        serde_yaml::to_string(&k)?
    ))
}

/// Whether the operator's ServiceAccount may `verb` `resource` (of `group`) in `namespace`
/// (`None`: cluster-wide), as the API server's authorizer answers.
async fn may(client: &Client, verb: &str, group: &str, resource: &str, namespace: Option<&str>) -> Result<bool> {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": crate::operator::service_account_user(),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NAMESPACE}"), "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace.unwrap_or("")},
        }
    }))?;
    let out = Api::<SubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(out.status.is_some_and(|s| s.allowed))
}

/// The grants the overlay must give and withhold.
async fn check_grants(client: &Client) -> Result<()> {
    for (group, resource) in [("myapp.dev", "myapps"), ("apps", "deployments"), ("", "services")] {
        if may(client, "list", group, resource, None).await? {
            bail!("the operator may list {resource} cluster-wide: the namespaced install must not grant it");
        }
        for ns in MANAGED {
            if !may(client, "watch", group, resource, Some(ns)).await? {
                bail!("the operator may not watch {resource} in {ns}");
            }
        }
        if may(client, "watch", group, resource, Some(ELSEWHERE)).await? {
            bail!("the operator may watch {resource} in {ELSEWHERE}, which it does not manage");
        }
    }
    println!(
        "    grants: MyApps, Deployments, Services in {MANAGED:?} only; nothing cluster-wide, nothing in {ELSEWHERE}"
    );
    Ok(())
}

/// Runs the test; see the module doc.
pub async fn run(args: TargetArgs) -> Result<Figures> {
    let target = args.resolve().await?;
    if !target.local {
        bail!("cargo xtask namespaced needs the local control plane's real node");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    install::prepare(&client).await?;
    println!("==> the default install's pods removed (no replica with cluster-wide grants is left)");
    install::uninstall(&client).await?;
    for ns in MANAGED.iter().chain([&ELSEWHERE]) {
        crate::operator::apply_namespace(&client, ns).await?;
    }
    let namespaces = Api::<Namespace>::all(client.clone());
    let since = chaos::audit::now();
    println!("==> kubectl apply -k {OVERLAY} (with the local image and placement)");
    let result = proofs(&client, &target.kubeconfig).await;
    let rbac = crate::operator::rbac_proof(since);
    println!("==> the default install back: kubectl apply -k {}", install::OVERLAY);
    install::uninstall(&client).await?;
    install::apply(&client, &target.kubeconfig).await?;
    for ns in MANAGED.iter().chain([&ELSEWHERE]) {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    let figures = result?;
    rbac?;
    std::fs::write(paths::run_dir().join("namespaced.json"), serde_json::to_string_pretty(&figures)?)?;
    Ok(figures)
}

/// `.run/namespaced.json`: what [`run`] measured.
#[derive(Serialize)]
pub struct Figures {
    /// From `kubectl apply -k` to 3 ready pods.
    rolled_out_s: f64,
    managed: [&'static str; 2],
    /// From their creation to every MyApp in the managed namespaces Ready.
    managed_ready_after_s: f64,
    elsewhere: &'static str,
    /// The MyApp elsewhere, which carries no finalizer: from its delete to its going.
    elsewhere_deleted_after_s: f64,
}

/// Applies the overlay and checks what the module doc lists, but the audit.
async fn proofs(client: &Client, kubeconfig: &std::path::Path) -> Result<Figures> {
    let rolled_out = install::apply_kustomization(client, kubeconfig, &local_variant()?).await?.as_secs_f64();
    println!("    3 pods ready {rolled_out:.1} s after kubectl apply");
    // The webhooks select the managed namespaces only: the install's probe (in `default`) does
    // not reach them, so ask in each.
    for ns in MANAGED {
        install::webhooks_answer_in(client, ns).await?;
    }
    check_grants(client).await?;
    let t = Instant::now();
    for ns in MANAGED.iter().chain([&ELSEWHERE]) {
        Api::<MyApp>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &chaos::fixtures::nginx("web", 1)?)
            .await?;
    }
    for ns in MANAGED {
        let api = Api::<MyApp>::namespaced(client.clone(), ns);
        chaos::wait::poll(
            &format!("myapp {ns}/web Ready"),
            Duration::from_secs(120),
            Duration::from_millis(200),
            || async { api.get("web").await.ok().filter(MyApp::ready_at_generation).map(|_| ()) },
        )
        .await?;
    }
    let ready = t.elapsed().as_secs_f64();
    println!("    MyApps in {MANAGED:?} Ready {ready:.1} s after their creation");
    // A reconcile of the other namespace's MyApp, had there been one, would have run by now
    // (the managed ones were reconciled to Ready); give it two more seconds all the same.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other = Api::<MyApp>::namespaced(client.clone(), ELSEWHERE);
    let app = other.get("web").await?;
    let finalizers = app.metadata.finalizers.clone().unwrap_or_default();
    let children =
        Api::<Deployment>::namespaced(client.clone(), ELSEWHERE).list(&ListParams::default()).await?.items.len();
    if !finalizers.is_empty() || app.status.is_some() || children > 0 {
        bail!(
            "myapp {ELSEWHERE}/web was managed: finalizers {finalizers:?}, status {:?}, {children} Deployments",
            app.status
        );
    }
    let t = Instant::now();
    other.delete("web", &DeleteParams::default()).await?;
    chaos::wait::poll(
        &format!("myapp {ELSEWHERE}/web deleted"),
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { matches!(other.get_opt("web").await, Ok(None)).then_some(()) },
    )
    .await?;
    let deleted = t.elapsed().as_secs_f64();
    println!("    myapp {ELSEWHERE}/web: no finalizer, no status, no child; deleted in {deleted:.2} s");
    Ok(Figures {
        rolled_out_s: rolled_out,
        managed: MANAGED,
        managed_ready_after_s: ready,
        elsewhere: ELSEWHERE,
        elsewhere_deleted_after_s: deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn the_overlay_names_the_same_namespaces_in_its_roles_its_env_and_its_webhooks() {
        let dir = paths::repo().join(OVERLAY);
        let k: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization"))
                .expect("yaml");
        let mut env = Vec::new();
        let mut selected = Vec::new();
        for p in k["patches"].as_sequence().expect("patches") {
            let ops: serde_yaml::Value = serde_yaml::from_str(p["patch"].as_str().expect("inline patch")).expect("ops");
            for op in ops.as_sequence().expect("ops") {
                if op["value"]["name"] == "WATCH_NAMESPACE" {
                    env.push(op["value"]["value"].as_str().expect("value").to_string());
                }
                for e in op["value"]["matchExpressions"].as_sequence().into_iter().flatten() {
                    let values: Vec<String> = e["values"]
                        .as_sequence()
                        .expect("values")
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect();
                    assert_eq!(e["operator"], "In");
                    selected.push(values);
                }
            }
        }
        assert_eq!(env, [MANAGED.join(",")]);
        assert_eq!(selected, [MANAGED.map(String::from).to_vec(), MANAGED.map(String::from).to_vec()], "both webhooks");
        let roles = std::fs::read_to_string(dir.join("roles.yaml")).expect("roles");
        let mut in_roles: Vec<String> = serde_yaml::Deserializer::from_str(&roles)
            .map(|d| serde_yaml::Value::deserialize(d).expect("doc"))
            .filter_map(|d| d["metadata"]["namespace"].as_str().map(str::to_string))
            .collect();
        in_roles.dedup();
        assert_eq!(in_roles, MANAGED, "a Role and a RoleBinding per managed namespace");
    }

    #[test]
    fn the_local_variant_adds_the_local_overlays_images_and_patches_and_nothing_else() {
        let text =
            std::fs::read_to_string(paths::repo().join(install::OVERLAY).join("kustomization.yaml")).expect("local");
        let local: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let v: serde_yaml::Value = serde_yaml::from_str(&variant_text(&local).expect("variant")).expect("yaml");
        assert_eq!(v["resources"][0], "../../deploy/overlays/namespaced");
        assert_eq!(v["images"], local["images"]);
        assert_eq!(v["patches"], local["patches"]);
        assert_eq!(v.as_mapping().map(|m| m.len()), Some(5));
    }
}
