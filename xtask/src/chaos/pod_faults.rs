//! The faults the pod scenarios put into the leader's pod that need more than one call, and what
//! each lets them observe: the Lease followed on a watch until it changes hands
//! ([`follow_takeover`]), a process's death seen from the host ([`death`]), the container's
//! memory cgroup squeezed until the kernel OOM-kills it ([`oom_kill`]), and a validating webhook
//! that holds the operator's Deployment writes ([`Holder`]).

use crate::operator::{self, NAMESPACE};
use crate::{chaos::hostile, cluster::node};
use ::chaos::audit::now;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The host pid of the pod's `manager` container.
pub async fn manager_pid(client: &Client, pod: &str) -> Result<u32> {
    let id = manager_status(client, pod)
        .await?
        .and_then(|c| c.container_id)
        .with_context(|| format!("pod {pod} has no running manager container"))?;
    node::container_pid(&id)
}

/// The status of the pod's `manager` container.
async fn manager_status(client: &Client, pod: &str) -> Result<Option<k8s_openapi::api::core::v1::ContainerStatus>> {
    let p = Api::<Pod>::namespaced(client.clone(), NAMESPACE).get(pod).await?;
    Ok(p.status.and_then(|s| s.container_statuses).and_then(|cs| cs.into_iter().find(|c| c.name == "manager")))
}

/// Runs iptables in the network namespace of `pid`.
pub fn iptables_in(pid: u32, args: &[String]) -> Result<()> {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "iptables"])
        .args(args)
        .output()
        .context("nsenter")?;
    if !out.status.success() {
        bail!("iptables {args:?} in the pod's network namespace: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The network namespace of `pid`, as `/proc/<pid>/ns/net` names it (`net:[4026532…]`).
pub fn netns_of(pid: u32) -> Result<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).with_context(|| format!("netns of {pid}"))?;
    Ok(link.to_string_lossy().into_owned())
}

/// A live process in the network namespace `ns`: the pod's sandbox keeps it while its
/// containers come and go.
pub fn pid_in_netns(ns: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (netns_of(pid).ok()? == ns && alive(pid)).then_some(pid)
    })
}

/// True while `pid` runs: it exists and is not a zombie waiting to be reaped.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// How the Lease left `old`, as a watch saw it.
#[derive(Debug)]
pub struct Takeover {
    /// When another holder was first seen (epoch seconds).
    pub taken: f64,
    /// From the old holder's last renewal (as it wrote it) to then.
    pub since_renewal: Option<f64>,
    /// The old holder released the Lease before someone else took it.
    pub released: bool,
}

impl Takeover {
    /// A takeover before the lease expired, of a holder that did not release it: only a proof of
    /// death allows that.
    pub fn early(&self, lease: f64) -> bool {
        !self.released && self.since_renewal.is_some_and(|s| s < lease - 0.1)
    }

    /// The takeover, as the scenario's detail says it.
    pub fn describe(&self, at: f64, lease: f64) -> String {
        format!(
            "acquired {:.2} s after the fault, {} after the old leader's last renewal (lease {lease} s); {}",
            self.taken - at,
            self.since_renewal.map_or("?".into(), |s| format!("{s:.2} s")),
            if self.released { "the old process released it" } else { "taken on expiry" },
        )
    }
}

/// The Lease's holder and its last renewal (epoch seconds, as the holder wrote it; the holder's
/// node is this machine, so its clock is ours).
fn holder_and_renewal(lease: &Lease) -> (String, Option<f64>) {
    let spec = lease.spec.clone().unwrap_or_default();
    let renewed = spec.renew_time.map(|t| t.0.as_millisecond() as f64 / 1000.0);
    (spec.holder_identity.unwrap_or_default(), renewed)
}

/// Runs `act`, then follows every version of the Lease (a watch from the version read before
/// `act`, so that a release followed at once by a takeover is not missed between two reads)
/// until someone other than `old` holds it, for at most `wait`.
pub async fn follow_takeover(
    client: &Client,
    old: &str,
    wait: Duration,
    act: impl AsyncFnOnce() -> Result<()>,
) -> Result<Takeover> {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};
    let api = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
    let first = api.get(operator::LEASE).await?;
    let rv = first.metadata.resource_version.clone().unwrap_or_default();
    let before = Some(holder_and_renewal(&first)).and_then(|(h, r)| r.filter(|_| h == old));
    act().await?;
    let deadline = Instant::now() + wait;
    let watch =
        WatchParams::default().fields(&format!("metadata.name={}", operator::LEASE)).timeout(wait.as_secs() as u32 + 5);
    let mut versions = api.watch(&watch, &rv).await?.boxed();
    let (mut renewed, mut released) = (before, false);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, versions.try_next()).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) | Err(_) => bail!("nobody took the Lease from {old} within {wait:?}"),
            Ok(Err(e)) => bail!("the Lease watch failed: {e}"),
        };
        let (WatchEvent::Added(l) | WatchEvent::Modified(l)) = event else { continue };
        let seen = now();
        let (holder, r) = holder_and_renewal(&l);
        match holder.as_str() {
            h if h == old => renewed = r.or(renewed),
            "" => released = true,
            _ => return Ok(Takeover { taken: seen, since_renewal: renewed.map(|r| seen - r), released }),
        }
    }
}

/// When the leader `old`, process `pid`, stopped leading, polled every 10 ms for at most `wait`:
/// the first of its process exiting and the Lease leaving it (a release as it shuts down). Also
/// says which it was.
pub async fn death(client: &Client, old: &str, pid: u32, wait: Duration) -> Result<(f64, &'static str)> {
    ::chaos::wait::poll(
        "the leader's process to exit or release the Lease",
        wait,
        Duration::from_millis(10),
        || async {
            if !alive(pid) {
                return Some((now(), "its process exited"));
            }
            let holder = operator::lease_holder(client).await.map(|(h, _)| h);
            holder.filter(|h| h != old).map(|_| (now(), "it released the Lease as it was stopped"))
        },
    )
    .await
}

/// When someone other than `old` was first seen holding the Lease, polled every 10 ms for at most
/// `wait`.
pub async fn taken_from(client: &Client, old: &str, wait: Duration) -> Result<f64> {
    ::chaos::wait::poll("another replica holding the Lease", wait, Duration::from_millis(10), || async {
        let (holder, _) = operator::lease_holder(client).await?;
        (!holder.is_empty() && holder != old).then(now)
    })
    .await
}

/// The reason the kubelet gave for the manager container's last termination, once the container
/// runs again (its restart count above `restarts`), waiting up to `wait`.
pub async fn last_termination(client: &Client, pod: &str, restarts: i32, wait: Duration) -> Result<String> {
    ::chaos::wait::poll("the restarted container's status", wait, Duration::from_millis(100), || async {
        let c = manager_status(client, pod).await.ok()??;
        let t = c.last_state.and_then(|s| s.terminated).filter(|_| c.restart_count > restarts)?;
        Some(format!("{} (exit {})", t.reason.unwrap_or_default(), t.exit_code))
    })
    .await
}

/// The restart count of the pod's manager container.
pub async fn restarts(client: &Client, pod: &str) -> Result<i32> {
    Ok(manager_status(client, pod).await?.map_or(0, |c| c.restart_count))
}

/// The memory cgroup of `pid` and the names of its usage and limit files: cgroup v1
/// (`memory.usage_in_bytes`, `memory.limit_in_bytes`) or v2 (`memory.current`, `memory.max`).
fn memory_cgroup(pid: u32) -> Result<(PathBuf, &'static str, &'static str)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
        .map(|(controllers, path)| (controllers, path.trim_start_matches('/')))
        .collect();
    if let Some((_, rel)) = entries.iter().find(|(c, _)| c.split(',').any(|c| c == "memory")) {
        return Ok((Path::new("/sys/fs/cgroup/memory").join(rel), "memory.usage_in_bytes", "memory.limit_in_bytes"));
    }
    match entries.iter().find(|(c, _)| c.is_empty()) {
        Some((_, rel)) if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => {
            Ok((Path::new("/sys/fs/cgroup").join(rel), "memory.current", "memory.max"))
        }
        _ => bail!("no memory cgroup for pid {pid} in /proc/{pid}/cgroup"),
    }
}

/// OOM-kills the process `pid` of `pod` through its container's memory cgroup: lowers the limit
/// to what the container uses and 1 MiB, then sends the process admission reviews of 2 MiB (a
/// body the webhook server accepts and reads whole) until the kernel's OOM killer ends it, for
/// at most `wait`. The limit is the container's own: its replacement gets a new cgroup with the
/// limit of the pod spec. Returns how far the limit was lowered (bytes).
pub async fn oom_kill(client: &Client, pod: &str, pid: u32, wait: Duration) -> Result<u64> {
    let (dir, usage_file, limit_file) = memory_cgroup(pid)?;
    let read = |f: &str| -> Result<u64> {
        let path = dir.join(f);
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        text.trim().parse().with_context(|| format!("{}: {text:?}", path.display()))
    };
    let ip: std::net::IpAddr = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .get(pod)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("the leader pod has no IP")?
        .parse()?;
    let dst = SocketAddr::new(ip, hostile::WEBHOOK_PORT);
    let src = hostile::source_toward(ip)?;
    let tls = hostile::webhook_tls(client).await?;
    let body = Arc::new(format!(r#"{{"pad":"{}"}}"#, "x".repeat(2 << 20)).into_bytes());
    let deadline = Instant::now() + wait;
    let mut lowest = u64::MAX;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("the kernel did not OOM-kill pid {pid} within {wait:?} (limit lowered to {lowest} B)");
        }
        let limit = read(usage_file)? + (1 << 20);
        // Fails (EBUSY on v1) when the kernel cannot reclaim down to it; the next round tries again.
        if std::fs::write(dir.join(limit_file), limit.to_string()).is_ok() {
            lowest = lowest.min(limit);
        }
        let posts: Vec<_> = (0..4)
            .map(|_| {
                let (tls, body) = (tls.clone(), body.clone());
                tokio::spawn(async move { hostile::post(src, dst, &tls, &body).await })
            })
            .collect();
        for p in posts {
            let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
        }
    }
    Ok(lowest)
}

/// A validating webhook on the host that holds the operator's Deployment writes in one namespace
/// for `hold` before allowing them: the API server's part of a slow write. Removed with
/// [`Holder::remove`].
pub struct Holder {
    /// Reviews received.
    received: Arc<AtomicUsize>,
    /// Reviews held now.
    holding: Arc<AtomicUsize>,
    server: axum_server::Handle<SocketAddr>,
    /// When it was installed (epoch seconds).
    pub since: f64,
}

/// The name of the holding webhook's configuration.
const HOLDER: &str = "myapp-chaos-slow-commit";

impl Holder {
    /// Serves on 127.0.0.1 (the API server is a process on this host) and registers the webhook
    /// for Deployments in `ns`, matched only for the operator's service account.
    pub async fn install(client: &Client, ns: &str, hold: Duration) -> Result<Self> {
        use axum::{Json, Router, routing::post};
        use myapp_operator::webhook::certs;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let bundle = certs::issue(&["127.0.0.1".into()], None, time::OffsetDateTime::now_utc())?;
        let tls =
            axum_server::tls_rustls::RustlsConfig::from_pem(bundle.tls_crt.into_bytes(), bundle.tls_key.into_bytes())
                .await?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (received, holding) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, h) = (received.clone(), holding.clone());
        let app = Router::new().route(
            "/",
            post(move |Json(review): Json<serde_json::Value>| {
                let (r, h) = (r.clone(), h.clone());
                async move {
                    r.fetch_add(1, Ordering::Relaxed);
                    h.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(hold).await;
                    h.fetch_sub(1, Ordering::Relaxed);
                    let uid = review["request"]["uid"].clone();
                    Json(serde_json::json!({
                        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                        "response": {"uid": uid, "allowed": true}
                    }))
                }
            }),
        );
        let server = axum_server::Handle::new();
        let serving = axum_server::from_tcp_rustls(listener, tls)?.handle(server.clone());
        tokio::spawn(async move { serving.serve(app.into_make_service()).await });
        let sa = format!("system:serviceaccount:{NAMESPACE}:myapp-operator");
        let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": HOLDER},
            "webhooks": [{
                "name": "slow-commit.chaos.myapp.dev",
                "clientConfig": {"url": format!("https://{addr}/"), "caBundle": base64_of(&bundle.ca_crt)},
                "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                           "resources": ["deployments"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "matchConditions": [{"name": "the-operator", "expression": format!("request.userInfo.username == '{sa}'")}],
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 30
            }]
        }))?;
        let api = Api::<ValidatingWebhookConfiguration>::all(client.clone());
        let _ = api.delete(HOLDER, &DeleteParams::default()).await;
        api.create(&PostParams::default(), &config).await?;
        Ok(Holder { received, holding, server, since: now() })
    }

    /// Waits up to `wait` for a write to be held.
    pub async fn holds_one(&self, wait: Duration) -> Result<()> {
        ::chaos::wait::poll("a Deployment write held by the webhook", wait, Duration::from_millis(10), || async {
            (self.holding.load(Ordering::Relaxed) > 0).then_some(())
        })
        .await
    }

    /// Removes the webhook's configuration and stops its server; how many reviews it received.
    pub async fn remove(self, client: &Client) -> usize {
        let _ =
            Api::<ValidatingWebhookConfiguration>::all(client.clone()).delete(HOLDER, &DeleteParams::default()).await;
        self.server.shutdown();
        self.received.load(Ordering::Relaxed)
    }
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_in_its_own_netns() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!alive(u32::MAX));
        let ns = netns_of(me).expect("netns");
        assert!(ns.starts_with("net:["), "{ns}");
        assert!(pid_in_netns(&ns).is_some());
        assert_eq!(pid_in_netns("net:[0]"), None);
    }

    #[test]
    fn takeovers_are_early_only_without_release_before_expiry() {
        let t = |since: f64, released: bool| Takeover { taken: 100.0, since_renewal: Some(since), released };
        assert!(t(3.0, false).early(15.0));
        assert!(!t(15.0, false).early(15.0));
        assert!(!t(3.0, true).early(15.0), "a release hands over at once");
        assert!(!Takeover { taken: 1.0, since_renewal: None, released: false }.early(15.0));
        assert!(t(15.2, false).describe(90.0, 15.0).contains("15.20 s after the old leader's last renewal"));
    }
}
