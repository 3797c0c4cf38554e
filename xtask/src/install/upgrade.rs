//! `cargo xtask upgrade`: the operator upgraded in place and rolled back, on the real node.
//!
//! "Previous" is [`PREVIOUS`], a pinned commit of this repository: the last state that landed
//! before the current line of work. Its tree is taken with `git archive` and its image built from
//! it (the same Dockerfile and release build, in the shared target directory), both cached by
//! commit. Bump the pin when a version is released. Its install gets the current default webhook
//! drain (its own, 2 s, could fail an admission as its pods stop; see `overlay_text`).
//!
//! The steps: the previous `deploy/overlays/local` with the previous image; MyApps created and
//! Ready; then `kubectl apply -k deploy/overlays/local` of this checkout with its image (the
//! upgrade); then the previous again (the rollback); then the current again, which leaves the
//! install as the other tests expect it. During each step, sampled every 250 ms:
//! - every MyApp stays Ready;
//! - admissions keep answering (a server-side dry-run create through both webhooks);
//! - who holds the Lease, and the version of its pod.
//!
//! After each step: no child was re-created (the Deployments' and Services' UIDs), leadership
//! passed to a pod of the new version, and the audit log shows 0 writes outside leadership.
//! The figures go to `.run/upgrade.json`.

use super::apply::{self as install, DEPLOYMENT, TIMINGS};
use crate::cluster::node;
use crate::operator::{NAMESPACE, TargetArgs};
use crate::{cluster, image, paths};
use ::chaos::audit;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use myapp_operator::api::MyApp;
use myapp_operator::webhook::DEFAULT_DRAIN;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The previous version: the commit the test upgrades from and rolls back to.
pub const PREVIOUS: &str = "0c82a8e307a40b732edcc15e36f4fad3682c34a6";
/// The previous image, as the node's containerd knows it.
const PREVIOUS_IMAGE: &str = "docker.io/library/myapp-operator:previous";
/// The namespace of the MyApps that live through the steps.
const WORKLOAD: &str = "upgrade";
/// How many MyApps.
const MYAPPS: usize = 5;

/// The previous commit's tree, extracted once into the cache.
fn previous_tree() -> Result<PathBuf> {
    let dir = paths::cache().join("previous").join(PREVIOUS);
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    println!("==> extracting the previous version's tree ({PREVIOUS}) into {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let archive = Command::new("git")
        .arg("-C")
        .arg(paths::repo())
        .args(["archive", "--format=tar", PREVIOUS])
        .output()
        .context("git archive")?;
    if !archive.status.success() {
        bail!(
            "git archive {PREVIOUS}: {} (the upgrade test needs the repository's history: a full clone)",
            String::from_utf8_lossy(&archive.stderr)
        );
    }
    let tar = dir.join(".previous.tar");
    std::fs::write(&tar, &archive.stdout)?;
    let mut untar = Command::new("tar");
    untar.arg("-xf").arg(&tar).arg("-C").arg(&dir);
    crate::sh::run(untar, "tar -x")?;
    std::fs::remove_file(&tar)?;
    std::fs::write(dir.join(".complete"), PREVIOUS)?;
    Ok(dir)
}

/// The previous image as a docker archive in the cache, built from the previous tree when missing.
fn previous_archive(tree: &Path) -> Result<PathBuf> {
    let archive = paths::cache().join("images").join(format!("myapp-operator-{}.tar", &PREVIOUS[..12]));
    if archive.is_file() {
        return Ok(archive);
    }
    println!("==> building the previous image {PREVIOUS_IMAGE} from {}", &PREVIOUS[..12]);
    image::ensure_image_tools()?;
    // Its own target directory: see `build_binary_in`.
    let binary = image::build_binary_in(tree, &paths::cache().join("target-previous"))?;
    image::build_image_in(tree, &binary, PREVIOUS_IMAGE, PREVIOUS)?;
    std::fs::create_dir_all(archive.parent().context("archive dir")?)?;
    let partial = archive.with_extension("tar.partial");
    image::push_archive(PREVIOUS_IMAGE, &partial)?;
    std::fs::rename(&partial, &archive)?;
    Ok(archive)
}

/// A kustomization of the previous tree's local overlay with the previous image, inside the
/// tree (kustomize takes no absolute path to a base).
fn previous_overlay(tree: &Path) -> Result<PathBuf> {
    let dir = tree.join("upgrade-overlay");
    std::fs::create_dir_all(&dir)?;
    let (name, tag) = PREVIOUS_IMAGE.rsplit_once(':').context("image tag")?;
    let text = overlay_text(&format!("../{}", install::OVERLAY), name, tag, DEFAULT_DRAIN);
    std::fs::write(dir.join("kustomization.yaml"), text)?;
    Ok(dir)
}

/// The text of a kustomization over `base` that swaps the image `name`'s tag and sets the
/// webhooks' drain to `drain`. The previous version's default drain (2 s) is shorter than
/// kube-proxy can take to drop a terminating pod, so its pods could fail an admission as they
/// stop (README, "Shutdown"); given the current default, the steps measure the upgrade itself.
fn overlay_text(base: &str, name: &str, tag: &str, drain: &str) -> String {
    format!(
        "# Written by cargo xtask upgrade: the previous version's local overlay, with its image.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - {base}\nimages:\n  - name: {name}\n    newTag: {tag}\n\
         patches:\n  - target:\n      kind: Deployment\n      name: {DEPLOYMENT}\n    patch: |-\n      \
         - op: add\n        path: /spec/template/spec/containers/0/env/-\n        \
         value: {{name: WEBHOOK_DRAIN, value: \"{drain}\"}}\n"
    )
}

/// What the samplers saw during one step.
#[derive(Default)]
struct Seen {
    samples: usize,
    not_ready: usize,
    admissions: usize,
    refused: Vec<String>,
    /// (time, holder identity, image of the holder's pod).
    holders: Vec<(f64, String, String)>,
}

/// Samples readiness, admissions and the Lease holder every 250 ms until `stop`.
async fn sample(client: Client, stop: Arc<AtomicBool>) -> Seen {
    let apps: Api<MyApp> = Api::namespaced(client.clone(), WORKLOAD);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut images: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = Seen::default();
    let dry = PostParams { dry_run: true, ..Default::default() };
    while !stop.load(Ordering::Relaxed) {
        seen.samples += 1;
        match apps.list(&ListParams::default()).await {
            Ok(l) if l.items.len() == MYAPPS && l.items.iter().all(MyApp::ready_at_generation) => {}
            _ => seen.not_ready += 1,
        }
        let probe = chaos::fixtures::nginx(&format!("probe-{}", seen.samples), 1);
        seen.admissions += 1;
        match probe {
            Ok(p) => {
                if let Err(e) = apps.create(&dry, &p).await {
                    seen.refused.push(format!("{:.1}: {e}", audit::now()));
                }
            }
            Err(e) => seen.refused.push(format!("probe: {e}")),
        }
        if let Ok(list) = pods.list(&ListParams::default().labels(install::SELECTOR)).await {
            for p in list.items {
                let image = p.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone());
                images.insert(p.name_any(), image.unwrap_or_default());
            }
        }
        if let Some((holder, _)) = crate::operator::lease_holder(&client).await
            && seen.holders.last().is_none_or(|(_, h, _)| *h != holder)
        {
            let image = install::pod_of(&holder).and_then(|p| images.get(p)).cloned().unwrap_or_default();
            seen.holders.push((audit::now(), holder, image));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen
}

/// The UIDs of the workload's Deployments and Services, by kind and name.
async fn children(client: &Client) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for d in Api::<Deployment>::namespaced(client.clone(), WORKLOAD).list(&ListParams::default()).await? {
        out.insert(format!("deployment/{}", d.name_any()), d.uid().unwrap_or_default());
    }
    for s in Api::<Service>::namespaced(client.clone(), WORKLOAD).list(&ListParams::default()).await? {
        out.insert(format!("service/{}", s.name_any()), s.uid().unwrap_or_default());
    }
    Ok(out)
}

/// `.run/upgrade.json`: what [`run`] measured.
#[derive(Serialize)]
pub struct Figures {
    previous: &'static str,
    crd_changed: bool,
    myapps: usize,
    steps: Vec<Step>,
}

/// One step: upgrade, rollback or upgrade again.
#[derive(Serialize)]
struct Step {
    step: &'static str,
    /// The image the step rolls out.
    image: &'static str,
    rolled_out_s: f64,
    new_version_leads_after_s: f64,
    /// Each Lease holder seen, from the step's start.
    holders: Vec<Holder>,
    samples: usize,
    not_ready_samples: usize,
    admissions: usize,
    admissions_failed: usize,
    children_recreated: Vec<String>,
    writes_outside_leadership: usize,
}

/// A Lease holder seen during a step.
#[derive(Serialize)]
struct Holder {
    at_s: f64,
    holder: String,
    /// The image of the holder's pod.
    image: String,
}

impl Step {
    /// Whatever the step must not have: a MyApp not Ready, a failed admission, a child
    /// re-created, a write outside leadership.
    fn breaches(&self) -> bool {
        self.not_ready_samples > 0
            || self.admissions_failed > 0
            || !self.children_recreated.is_empty()
            || self.writes_outside_leadership > 0
    }

    fn print(&self, refused: &[String]) {
        println!(
            "    {}: rolled out in {:.1} s, a {} pod led after {:.1} s; {} holders seen; {} of {} samples with a MyApp \
             not Ready; {} of {} admissions failed; {} children re-created; {} writes outside leadership",
            self.step,
            self.rolled_out_s,
            self.image,
            self.new_version_leads_after_s,
            self.holders.len(),
            self.not_ready_samples,
            self.samples,
            self.admissions_failed,
            self.admissions,
            self.children_recreated.len(),
            self.writes_outside_leadership,
        );
        for r in refused.iter().take(5) {
            println!("      refused: {r}");
        }
    }
}

/// One step: applies `dir`, waits for the rollout and for a leader running `image`, and judges.
async fn step(client: &Client, kubeconfig: &Path, name: &'static str, dir: &Path, image: &'static str) -> Result<Step> {
    let before = children(client).await?;
    let since = audit::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(client.clone(), stop.clone()));
    let t = Instant::now();
    let applied = install::apply_kustomization(client, kubeconfig, dir).await;
    let led = chaos::wait::poll(
        "a pod of the new version leads",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let (_, pod) = install::leader(client).await?;
            let p = Api::<Pod>::namespaced(client.clone(), NAMESPACE).get(&pod).await.ok()?;
            let runs = p.spec?.containers.first()?.image.clone()?;
            (runs == image).then(|| t.elapsed().as_secs_f64())
        },
    )
    .await;
    // The samplers run on for 5 s after a pod of the new version leads: a late failure shows too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.await?;
    let rolled_out = applied?.as_secs_f64();
    let led = led?;
    let after = children(client).await?;
    let recreated = before.iter().filter(|(k, uid)| after.get(*k) != Some(uid)).map(|(k, _)| k.clone()).collect();
    let holders = seen.holders.into_iter().map(|(at, holder, image)| Holder { at_s: at - since, holder, image });
    let step = Step {
        step: name,
        image,
        rolled_out_s: rolled_out,
        new_version_leads_after_s: led,
        holders: holders.collect(),
        samples: seen.samples,
        not_ready_samples: seen.not_ready,
        admissions: seen.admissions,
        admissions_failed: seen.refused.len(),
        children_recreated: recreated,
        writes_outside_leadership: crate::operator::judged_since(since, TIMINGS)?.2.len(),
    };
    step.print(&seen.refused);
    if step.breaches() {
        bail!("{name}: {}", serde_json::to_string(&step)?);
    }
    Ok(step)
}

/// Runs the test; see the module doc.
pub async fn run(args: TargetArgs) -> Result<Figures> {
    let target = args.resolve().await?;
    if !target.local {
        bail!("cargo xtask upgrade needs the local control plane's real node (it loads images into it)");
    }
    let client = cluster::client_from(&target.kubeconfig).await?;
    let tree = previous_tree()?;
    let archive = previous_archive(&tree)?;
    install::prepare(&client).await?;
    node::import(&crate::cluster::gobuild::component("containerd")?.bin_dir()?, &archive)?;
    println!("    imported {PREVIOUS_IMAGE} into the node's containerd");
    let previous = previous_overlay(&tree)?;
    let current = paths::repo().join(install::OVERLAY);
    let crd_changed = std::fs::read(tree.join("deploy/crd/myapps.myapp.dev.yaml")).ok()
        != std::fs::read(paths::repo().join("deploy/crd/myapps.myapp.dev.yaml")).ok();

    println!("==> the previous version ({}) installed, and {MYAPPS} MyApps Ready", &PREVIOUS[..12]);
    let t = Instant::now();
    install::apply_kustomization(&client, &target.kubeconfig, &previous).await?;
    crate::operator::apply_namespace(&client, WORKLOAD).await?;
    let apps: Api<MyApp> = Api::namespaced(client.clone(), WORKLOAD);
    for i in 0..MYAPPS {
        let name = format!("app-{i}");
        if apps.get_opt(&name).await?.is_none() {
            apps.create(&PostParams::default(), &chaos::fixtures::nginx(&name, 1)?).await?;
        }
    }
    chaos::wait::poll("the MyApps Ready", Duration::from_secs(120), Duration::from_millis(250), || async {
        let l = apps.list(&ListParams::default()).await.ok()?;
        (l.items.len() == MYAPPS && l.items.iter().all(MyApp::ready_at_generation)).then_some(())
    })
    .await?;
    println!("    installed and Ready in {:.1} s", t.elapsed().as_secs_f64());

    let mut steps = Vec::new();
    println!("==> upgrade: kubectl apply -k {}", install::OVERLAY);
    steps.push(step(&client, &target.kubeconfig, "upgrade", &current, node::OPERATOR_IMAGE).await?);
    println!("==> rollback: the previous version's overlay");
    steps.push(step(&client, &target.kubeconfig, "rollback", &previous, PREVIOUS_IMAGE).await?);
    println!("==> upgrade again");
    steps.push(step(&client, &target.kubeconfig, "upgrade-again", &current, node::OPERATOR_IMAGE).await?);
    let figures = Figures { previous: PREVIOUS, crd_changed, myapps: MYAPPS, steps };
    let out = paths::run_dir().join("upgrade.json");
    std::fs::write(&out, serde_json::to_string_pretty(&figures)?)?;
    println!(
        "    the CRD {} between the two versions; figures: {}",
        if crd_changed { "changed" } else { "did not change" },
        out.display()
    );
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_version_is_a_full_commit_hash() {
        assert_eq!(PREVIOUS.len(), 40);
        assert!(PREVIOUS.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_previous_overlay_swaps_the_image_tag_and_sets_the_drain() {
        let text = overlay_text("../deploy/overlays/local", "docker.io/library/myapp-operator", "previous", "10s");
        let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(v["resources"][0], "../deploy/overlays/local");
        assert_eq!(v["images"][0]["name"], "docker.io/library/myapp-operator");
        assert_eq!(v["images"][0]["newTag"], "previous");
        assert_eq!(v["patches"][0]["target"]["name"], DEPLOYMENT);
        let ops: serde_yaml::Value =
            serde_yaml::from_str(v["patches"][0]["patch"].as_str().expect("patch")).expect("the patch's yaml");
        assert_eq!(ops[0]["path"], "/spec/template/spec/containers/0/env/-");
        assert_eq!(ops[0]["value"]["name"], "WEBHOOK_DRAIN");
        assert_eq!(ops[0]["value"]["value"], "10s");
        assert_eq!(v.as_mapping().map(|m| m.len()), Some(5));
        assert_eq!(format!("{}:{}", "docker.io/library/myapp-operator", "previous"), PREVIOUS_IMAGE);
        assert!(node::OPERATOR_IMAGE.starts_with("docker.io/library/myapp-operator:"));
    }
}
