//! Running the operator for the demo and the tests: the target cluster, the CRD, and replicas as
//! local processes with their own identity, probe port and log file.

use crate::{cluster, paths, sh};
use anyhow::{Context, Result, bail};
use chaos::report::LeaseTimings;
use chaos::{audit, invariants};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where to run: the local control plane, or a cluster the user points at.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TargetArgs {
    /// Use the cluster of this kubeconfig instead of starting the local control plane.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Use the cluster of `$KUBECONFIG` (or ~/.kube/config) instead of the local control plane.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub external: bool,
}

/// The cluster to work against.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// True for the local control plane (audit log and Jaeger available).
    pub local: bool,
    /// True when this command started the local control plane (and should stop it).
    pub started_here: bool,
}

impl Target {
    /// Arguments that resolve to this same target again (without restarting anything).
    pub fn args(&self) -> TargetArgs {
        if self.local {
            TargetArgs::default()
        } else {
            TargetArgs { kubeconfig: Some(self.kubeconfig.clone()), external: false }
        }
    }
}

impl TargetArgs {
    /// Resolves the target, starting the local control plane when that is the target.
    pub async fn resolve(&self) -> Result<Target> {
        let external = match (&self.kubeconfig, self.external) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => Some(match std::env::var_os("KUBECONFIG") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(std::env::var("HOME").context("HOME")?).join(".kube/config"),
            }),
            (None, false) => None,
        };
        if let Some(kubeconfig) = external {
            if !kubeconfig.is_file() {
                bail!("kubeconfig {} does not exist", kubeconfig.display());
            }
            println!("==> using the cluster of {}", kubeconfig.display());
            return Ok(Target { kubeconfig, local: false, started_here: false });
        }
        let was_up = cluster::is_up().await;
        cluster::up().await?;
        Ok(Target { kubeconfig: paths::kubeconfig(), local: true, started_here: !was_up })
    }
}

/// Builds the operator binary for the host, in the release profile or the debug one.
pub fn build_profile(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    println!("==> building the operator ({profile})");
    let mut cmd = sh::cargo();
    cmd.args(["build", "--bin", "myapp-operator"]);
    if release {
        cmd.arg("--release");
    }
    sh::run(cmd, "cargo build --bin myapp-operator")?;
    Ok(paths::target_dir().join(profile).join("myapp-operator"))
}

/// The namespace of the operator (its Lease, and in-cluster its pods).
pub const NAMESPACE: &str = "myapp-system";

/// Installs what the replicas need on the target (the CRD, the namespace, the RBAC from
/// `deploy/rbac`, and on the local control plane the webhook configurations) and returns the
/// kubeconfig the replicas run with: a token of the operator's ServiceAccount, so that every call
/// they make is authorized by the real RBAC, not by the admin's `system:masters`.
pub async fn prepare(client: &Client, target: &Target) -> Result<PathBuf> {
    install_crd(client).await?;
    ensure_namespace(client).await?;
    install_rbac(client, target).await?;
    if target.local {
        install_local_webhooks(client).await?;
    }
    service_account_kubeconfig(client, &target.kubeconfig).await
}

/// What a command that runs its own replicas starts from: see [`setup`].
pub struct Setup {
    /// The operator binary.
    pub bin: PathBuf,
    /// A client of the target, as its admin.
    pub client: Client,
    /// The kubeconfig the replicas run with (see [`prepare`]).
    pub kubeconfig: PathBuf,
}

/// The opening of every command that runs replicas as processes (`demo --processes`, `test`,
/// `chaos`, and `bench` through [`setup_with`]): builds the operator (`release` or debug), connects to
/// the target, [`prepare`]s it, and stops the replicas an earlier run left behind.
pub async fn setup(target: &Target, release: bool) -> Result<Setup> {
    setup_with(target, build_profile(release)?).await
}

/// [`setup`] with a binary already built.
pub async fn setup_with(target: &Target, bin: PathBuf) -> Result<Setup> {
    let client = cluster::client_from(&target.kubeconfig).await?;
    let kubeconfig = prepare(&client, target).await?;
    stop_replicas();
    Ok(Setup { bin, client, kubeconfig })
}

/// The operator's Lease, in [`NAMESPACE`] (the replicas' default `--lease-name`).
pub const LEASE: &str = "myapp-operator";

/// The current holder of the operator's Lease (None when nobody holds it or it cannot be read),
/// with the Lease's resourceVersion.
pub async fn lease_holder(client: &Client) -> Option<(String, String)> {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::ResourceExt;
    let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE).get_opt(LEASE).await.ok()??;
    let rv = lease.resource_version().unwrap_or_default();
    lease.spec?.holder_identity.filter(|h| !h.is_empty()).map(|h| (h, rv))
}

/// The operator's ServiceAccount in `deploy/rbac`.
pub const SERVICE_ACCOUNT: &str = "myapp-operator";

/// The user name the API server (and its audit log) gives the operator's ServiceAccount.
pub fn service_account_user() -> String {
    format!("system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}")
}

/// Server-side applies one manifest (any kind whose plural is its lowercased kind plus `s`).
async fn apply_manifest(client: &Client, manifest: serde_json::Value) -> Result<()> {
    use kube::api::DynamicObject;
    use kube::core::{ApiResource, GroupVersionKind};
    let field = |k: &str| manifest[k].as_str().map(str::to_string);
    let (Some(api_version), Some(kind)) = (field("apiVersion"), field("kind")) else {
        bail!("manifest without apiVersion or kind: {manifest}");
    };
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, &kind),
        &format!("{}s", kind.to_lowercase()),
    );
    let obj: DynamicObject = serde_json::from_value(manifest)?;
    let name = obj.metadata.name.clone().context("manifest without a name")?;
    let api: Api<DynamicObject> = match obj.metadata.namespace.as_deref() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.patch(&name, &PatchParams::apply("myapp-xtask").force(), &Patch::Apply(&obj))
        .await
        .with_context(|| format!("apply {kind} {name}"))?;
    Ok(())
}

/// Applies the files `deploy/rbac/kustomization.yaml` lists. On the local control plane it adds
/// one grant: local replicas watch and patch the caBundle of the URL-based webhook configurations
/// named [`LOCAL_WEBHOOKS`], which `deploy/rbac` (rightly) does not name.
pub async fn install_rbac(client: &Client, target: &Target) -> Result<()> {
    let dir = paths::repo().join("deploy/rbac");
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
    let files =
        kustomization["resources"].as_sequence().context("deploy/rbac/kustomization.yaml lists no resources")?;
    for file in files.iter().filter_map(|f| f.as_str()) {
        let text = std::fs::read_to_string(dir.join(file)).with_context(|| format!("read deploy/rbac/{file}"))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            apply_manifest(client, serde::Deserialize::deserialize(doc)?).await?;
        }
    }
    if target.local {
        let labels = serde_json::json!({"app.kubernetes.io/name": "myapp-operator"});
        apply_manifest(
            client,
            serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": LOCAL_WEBHOOKS, "labels": labels},
                "rules": [{
                    "apiGroups": ["admissionregistration.k8s.io"],
                    "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
                    "resourceNames": [LOCAL_WEBHOOKS],
                    "verbs": ["get", "list", "watch", "patch"],
                }],
            }),
        )
        .await?;
        apply_manifest(
            client,
            serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": LOCAL_WEBHOOKS, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": LOCAL_WEBHOOKS},
                "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
            }),
        )
        .await?;
    }
    println!("    RBAC from deploy/rbac applied; replicas run as {}", service_account_user());
    Ok(())
}

/// Requests a token of the operator's ServiceAccount (TokenRequest, valid 24 h) and writes a
/// kubeconfig with it next to `admin`'s cluster. Returns its path.
pub async fn service_account_kubeconfig(client: &Client, admin: &Path) -> Result<PathBuf> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::config::{AuthInfo, Context as KubeContext, Kubeconfig, NamedAuthInfo, NamedContext};
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(86_400), ..Default::default() }),
        ..Default::default()
    };
    let token = sa
        .create_token_request(SERVICE_ACCOUNT, &Default::default(), &request)
        .await
        .context("TokenRequest for the operator's ServiceAccount")?
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")?;

    let kc = Kubeconfig::read_from(admin).with_context(|| format!("read {}", admin.display()))?;
    let current = kc.current_context.clone().unwrap_or_default();
    let cluster_name = kc
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .context("the kubeconfig has no current context")?;
    let cluster = kc.clusters.into_iter().find(|c| c.name == cluster_name).context("current cluster not found")?;
    let out = Kubeconfig {
        clusters: vec![cluster],
        auth_infos: vec![NamedAuthInfo {
            name: SERVICE_ACCOUNT.into(),
            auth_info: Some(AuthInfo { token: Some(token.into()), ..Default::default() }),
            ..Default::default()
        }],
        contexts: vec![NamedContext {
            name: SERVICE_ACCOUNT.into(),
            context: Some(KubeContext {
                cluster: cluster_name,
                user: Some(SERVICE_ACCOUNT.into()),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        current_context: Some(SERVICE_ACCOUNT.into()),
        ..Default::default()
    };
    let path = paths::run_dir().join("operator.kubeconfig");
    std::fs::create_dir_all(paths::run_dir())?;
    std::fs::write(&path, serde_yaml::to_string(&out)?)?;
    Ok(path)
}

/// Creates the operator's namespace if it is missing.
pub async fn ensure_namespace(client: &Client) -> Result<()> {
    apply_namespace(client, NAMESPACE).await
}

/// The namespace `name`, as an object to send.
fn namespace_named(name: &str) -> Result<k8s_openapi::api::core::v1::Namespace> {
    Ok(serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?)
}

/// Creates the namespace `name` if it is missing (a server-side apply: it is there afterwards,
/// whoever made it).
pub async fn apply_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    api.patch(name, &PatchParams::apply("myapp-xtask"), &Patch::Apply(&namespace_named(name)?)).await?;
    Ok(())
}

/// Creates the fresh namespace `name` of one run; fails if it exists already (a leftover, which
/// may still be terminating, is not the empty namespace a run counts on).
pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    api.create(&kube::api::PostParams::default(), &namespace_named(name)?).await?;
    Ok(())
}

/// Name of the webhook configurations of a local run (URL-based, pointing at 127.0.0.1), distinct
/// from the in-cluster ones in `deploy/webhook/` (Service-based).
pub const LOCAL_WEBHOOKS: &str = "myapp-operator-local";
/// Where local replicas serve the webhooks; they share the port with SO_REUSEPORT.
pub const LOCAL_WEBHOOK_ADDR: &str = "127.0.0.1:9443";

/// Applies `deploy/webhook/webhooks.yaml` adapted to local replicas: a URL on 127.0.0.1 instead
/// of the Service, under the name [`LOCAL_WEBHOOKS`]. The replicas patch in the caBundle.
pub async fn install_local_webhooks(client: &Client) -> Result<()> {
    let text = std::fs::read_to_string(paths::repo().join("deploy/webhook/webhooks.yaml"))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        v["metadata"]["name"] = serde_json::json!(LOCAL_WEBHOOKS);
        for w in v["webhooks"].as_array_mut().into_iter().flatten() {
            let path = w["clientConfig"]["service"]["path"].as_str().unwrap_or("/").to_string();
            let ca = w["clientConfig"]["caBundle"].take();
            w["clientConfig"] = serde_json::json!({ "url": format!("https://{LOCAL_WEBHOOK_ADDR}{path}") });
            if !ca.is_null() {
                w["clientConfig"]["caBundle"] = ca;
            }
        }
        // Keep a caBundle the replicas already patched in: apply only what we own.
        apply_manifest(client, v).await?;
    }
    println!("    webhook configurations {LOCAL_WEBHOOKS} point at https://{LOCAL_WEBHOOK_ADDR}");
    Ok(())
}

/// Deletes the local webhook configurations (for measurements with no operator running; the
/// validating webhook fails closed). [`install_local_webhooks`] puts them back.
pub async fn remove_local_webhooks(client: &Client) -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
    let dp = kube::api::DeleteParams::default();
    let gone = |r: kube::Result<()>| match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other,
    };
    gone(Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(LOCAL_WEBHOOKS, &dp).await.map(|_| ()))?;
    gone(Api::<ValidatingWebhookConfiguration>::all(client.clone()).delete(LOCAL_WEBHOOKS, &dp).await.map(|_| ()))?;
    Ok(())
}

/// Server-side applies the committed CRD and waits until it is Established.
pub async fn install_crd(client: &Client) -> Result<()> {
    let path = paths::repo().join("deploy/crd/myapps.myapp.dev.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().context("CRD has no name")?;
    api.patch(&name, &PatchParams::apply("myapp-xtask").force(), &Patch::Apply(&crd)).await?;
    let started = Instant::now();
    loop {
        let c = api.get(&name).await?;
        let established = c
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        if established {
            println!("    CRD {name} established");
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("CRD {name} not Established after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running operator replica.
#[derive(Clone, Debug)]
pub struct Replica {
    /// Its name (and identity prefix).
    pub name: String,
    /// Probe and metrics port on 127.0.0.1.
    pub probe_port: u16,
    /// Its log file.
    pub log: PathBuf,
    /// Its process id.
    pub pid: u32,
}

impl Replica {
    /// True when `identity` (a Lease holder) is this replica's: `<name>-<random suffix>`.
    pub fn holds(&self, identity: &str) -> bool {
        identity.strip_prefix(&self.name).is_some_and(|rest| rest.starts_with('-'))
    }

    /// Every "first reconcile of the term" this replica logged: (when, epoch seconds; how long
    /// after acquiring the lease, ms).
    pub fn first_reconciles(&self) -> Vec<(f64, f64)> {
        first_reconciles_in(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

/// Every "first reconcile of the term" in a replica's JSON log: (when, epoch seconds; how long
/// after acquiring the lease, ms).
pub fn first_reconciles_in(log: &str) -> Vec<(f64, f64)> {
    log.lines()
        .filter(|l| l.contains("first reconcile of the term finished"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((chaos::audit::seconds(v["timestamp"].as_str()?)?, v["ms"].as_f64()?)))
        .collect()
}

/// First probe port of the replicas; replica `i` uses `BASE_PROBE_PORT + i`.
pub const BASE_PROBE_PORT: u16 = 18081;

/// Environment of the replicas for a target: on the local control plane, traces go to its Jaeger
/// (exported every 500 ms so that they show up quickly); elsewhere webhooks are off, since a
/// remote API server cannot call this machine's loopback.
pub fn replica_env(target: &Target) -> Vec<(&'static str, String)> {
    if target.local {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", cluster::ports::JAEGER_OTLP)),
            ("OTEL_BSP_SCHEDULE_DELAY", "500".into()),
        ]
    } else {
        // A remote API server cannot call webhooks on this machine's loopback.
        vec![("WEBHOOKS", "false".into())]
    }
}

/// Starts replica `i` of `bin` against `kubeconfig`, with `extra` arguments and `env` added.
pub fn start_replica(
    i: usize,
    bin: &Path,
    kubeconfig: &Path,
    extra: &[String],
    env: &[(&'static str, String)],
) -> Result<Replica> {
    let run = paths::run_dir();
    let name = format!("operator-{i}");
    let probe_port = BASE_PROBE_PORT + i as u16;
    let mut args = vec!["run".to_string()];
    args.extend(extra.iter().cloned());
    let mut envs = vec![
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("POD_NAME", name.clone()),
        ("POD_NAMESPACE", NAMESPACE.to_string()),
        ("PROBE_ADDR", format!("127.0.0.1:{probe_port}")),
        ("LOG_FORMAT", "json".into()),
        ("RUST_LOG", "info,myapp_operator=debug".into()),
        ("WEBHOOK_ADDR", LOCAL_WEBHOOK_ADDR.into()),
        ("WEBHOOK_EXTRA_SANS", "127.0.0.1".into()),
        ("WEBHOOK_CONFIG", LOCAL_WEBHOOKS.into()),
        // The API server calls local replicas on 127.0.0.1, with no Service and no kube-proxy
        // to catch up with: the drain waits for nothing here, so it is kept short.
        ("WEBHOOK_DRAIN", "2s".into()),
    ];
    envs.extend(env.iter().cloned());
    let pid = sh::spawn(&run, &name, bin, &args, &envs)?.pid;
    Ok(Replica { name: name.clone(), probe_port, log: sh::log_file(&run, &name), pid })
}

/// Starts `n` replicas of `bin` against `kubeconfig` (fresh logs), with `env` added.
pub fn start_replicas(
    bin: &Path,
    kubeconfig: &Path,
    n: usize,
    extra: &[String],
    env: &[(&'static str, String)],
) -> Result<Vec<Replica>> {
    let run = paths::run_dir();
    (0..n)
        .map(|i| {
            let _ = std::fs::remove_file(sh::log_file(&run, &format!("operator-{i}")));
            start_replica(i, bin, kubeconfig, extra, env)
        })
        .collect()
}

/// Waits until every replica answers `/readyz` with 200.
pub async fn wait_ready(replicas: &[Replica]) -> Result<()> {
    let run = paths::run_dir();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    for r in replicas {
        let ready = || async { matches!(chaos::plain_http::get(r.probe_port, "/readyz"), Ok((200, _))).then_some(()) };
        if chaos::wait::until(deadline, Duration::from_millis(100), ready).await.is_none() {
            bail!("{} not ready after 60 s; last log lines:\n{}", r.name, sh::tail(&run, &r.name, 30));
        }
    }
    println!("    {} operator replica(s) ready ({:.1} s)", replicas.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Stops every recorded operator replica.
pub fn stop_replicas() {
    let run = paths::run_dir();
    for (name, pid, bin) in sh::recorded(&run) {
        if name.starts_with("operator-") {
            sh::stop(&run, &name, pid, &bin, Duration::from_secs(15));
        }
    }
}

/// From the local audit log: the operator Lease's terms around a run that began at `since`, the
/// requests since then, and the writes among them outside leadership. A leader already in office
/// at the start (the install's pods) shows its term through the renewals before it: the Lease's
/// history is read from two lease durations before, and only the run's writes are judged.
#[allow(clippy::type_complexity)] // three lists, each named where it is used
pub fn judged_since(
    since: f64,
    t: LeaseTimings,
) -> Result<(Vec<invariants::Interval>, Vec<audit::Request>, Vec<invariants::Violation>)> {
    let log = std::fs::read_to_string(paths::audit_log()).context("read the audit log")?;
    let history = audit::parse(&log, since - 2.0 * t.duration);
    let intervals = invariants::leadership(&history, NAMESPACE, LEASE, t.duration, t.renew_deadline, audit::now());
    let reqs: Vec<audit::Request> = history.into_iter().filter(|q| q.at >= since).collect();
    let violations = invariants::writes_outside(&reqs, &intervals, NAMESPACE, LEASE);
    Ok((intervals, reqs, violations))
}

/// Every request the replicas made since `since` (end-to-end tests and chaos) ran under the
/// ServiceAccount from `deploy/rbac`; none may have been refused.
pub fn rbac_proof(since: f64) -> Result<()> {
    let log = std::fs::read_to_string(paths::audit_log())?;
    let requests = chaos::audit::parse(&log, since);
    let user = service_account_user();
    let a = chaos::audit::authorization(&requests, &user);
    println!(
        "    {} requests by {user}: {} denied by RBAC; {} denied, then allowed when repeated (the authorizer \
         syncing after an API server restart); {} refused by admission (writes into namespaces being deleted)",
        a.requests,
        a.denied.len(),
        a.denied_then_allowed.len(),
        a.refused_by_admission.len()
    );
    for r in a.denied.iter().take(20) {
        println!("      denied: {} {} {}/{} {}", r.verb, r.resource, r.namespace, r.name, r.subresource);
    }
    if a.requests == 0 {
        anyhow::bail!("no request by {user} in the audit log: the replicas did not run as the ServiceAccount");
    }
    if !a.denied.is_empty() {
        anyhow::bail!("{} requests by {user} were denied by RBAC: deploy/rbac misses a grant", a.denied.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str) -> Replica {
        Replica { name: name.into(), probe_port: 0, log: PathBuf::from("/nonexistent"), pid: 0 }
    }

    #[test]
    fn holder_identity_matches_its_replica_only() {
        assert!(replica("operator-1").holds("operator-1-x2k4m"));
        assert!(!replica("operator-1").holds("operator-10-x2k4m"), "operator-10 is another replica");
        assert!(!replica("operator-1").holds("operator-1"));
        assert!(!replica("operator-1").holds(""));
    }
}
