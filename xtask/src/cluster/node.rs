//! The real node of the local control plane: one machine that runs containers, next to the kwok
//! nodes, so that `kubectl apply -k deploy/` runs the operator image as real pods.
//!
//! - containerd v2 (built from its Go module, [`crate::cluster::gobuild`]) with Debian's `runc` and CNI
//!   plugins (a `bridge` with `host-local` addresses in [`POD_CIDR`]);
//! - a pause image built from kubernetes' `build/pause/linux/pause.c` and the operator image from
//!   `cargo xtask image`, both imported into containerd, so nothing is ever pulled;
//! - kubelet and kube-proxy (iptables mode) from the same kubernetes module as the API server;
//! - the node address [`NODE_IP`], a /32 that the harness puts on `lo`: pods reach the API server
//!   (which advertises it) and Jaeger there, through the `kubernetes` Service or directly;
//! - the taint [`TAINT`], so that only pods that tolerate it (the operator's, through
//!   `deploy/overlays/local`, and test pods) land here; MyApp workloads stay on kwok.
//!
//! Everything lives under [`dir`] (short, for unix sockets). `cluster down` removes the pods first
//! (so the CNI plugin tears down each sandbox), stops the processes, then removes what is left of
//! ours only: mounts under [`dir`], the bridge [`BRIDGE`], the iptables rules of our CNI network,
//! of kubelet and of kube-proxy, and the node address.

use super::access::wait_for;
use super::{gobuild, pki};
use crate::{paths, sh};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The node's name (and kubelet's hostname override).
pub const NAME: &str = "myapp-node";
/// The node's address: a /32 on `lo` that the harness adds, reachable from the pods.
pub const NODE_IP: &str = "10.255.0.1";
/// Addresses of the real node's pods (kwok's fake pods use 10.244.0.0/16).
pub const POD_CIDR: &str = "10.88.0.0/16";
/// The CNI bridge.
pub const BRIDGE: &str = "myapp0";
/// Name of the CNI network (it tags the iptables rules the bridge plugin writes).
pub const CNI_NETWORK: &str = "myapp-node";
/// The node's taint key; its value is `real` and its effect `NoSchedule`.
pub const TAINT: &str = "myapp.dev/node";
/// The node's label `myapp.dev/node=real`, for node selectors.
pub const LABEL: (&str, &str) = ("myapp.dev/node", "real");
/// The sandbox image containerd 2.4 expects, built here from `pause.c`.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.2";
/// The operator image as imported (what `cargo xtask image` tags `myapp-operator:dev`).
pub const OPERATOR_IMAGE: &str = "docker.io/library/myapp-operator:dev";

/// Ports of the node's components.
pub mod ports {
    /// kubelet's API (on the node address).
    pub const KUBELET: u16 = 10250;
    /// kubelet's healthz (127.0.0.1).
    pub const KUBELET_HEALTHZ: u16 = 10248;
    /// kube-proxy's healthz (127.0.0.1).
    pub const PROXY_HEALTHZ: u16 = 10256;
    /// kube-proxy's metrics (127.0.0.1).
    pub const PROXY_METRICS: u16 = 10249;
    /// CoreDNS readiness (its `ready` plugin).
    pub const COREDNS_READY: u16 = 18181;
}

/// Debian packages the node needs, by the file that shows each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/sbin/conntrack", "conntrack"),
    ("/usr/sbin/iptables", "iptables"),
];

/// Folder of everything the node keeps: `$MYAPP_NODE_DIR`, else
/// `/var/lib/myapp-node/<hash of the run directory>`. Not under the checkout: kubelet and
/// containerd put unix sockets in it, whose paths may not exceed 107 bytes, and a checkout can
/// live anywhere.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MYAPP_NODE_DIR") {
        return PathBuf::from(d);
    }
    let run = paths::run_dir();
    let hash = gobuild::fnv1a(run.display().to_string().as_bytes()) as u32;
    PathBuf::from(format!("/var/lib/myapp-node/{hash:08x}"))
}

fn containerd_socket() -> PathBuf {
    dir().join("containerd/containerd.sock")
}

/// Where the note "the node could not start, and why" is kept for the tests.
fn unavailable_file() -> PathBuf {
    dir().join("unavailable")
}

/// Why the node is not running: None when the host passed the checks and `up` set it up.
pub fn why_not() -> Option<String> {
    if enabled() {
        return None;
    }
    Some(
        std::fs::read_to_string(unavailable_file())
            .unwrap_or_else(|_| "it did not start (cargo xtask cluster up starts it)".into()),
    )
}

fn enabled_file() -> PathBuf {
    dir().join("enabled")
}

/// True when the host passed the checks and the control plane is set up for the node (the API
/// server advertises [`NODE_IP`]).
pub fn enabled() -> bool {
    enabled_file().is_file()
}

/// A host requirement of the node that is not met, with how to meet it.
#[derive(Debug, PartialEq, Eq)]
pub struct Missing {
    /// What is missing.
    pub what: String,
    /// How to fix it.
    pub fix: String,
}

/// What the host offers, read once; [`missing`] decides on it without touching the host.
#[derive(Debug, Default)]
pub struct Host {
    /// Effective user id.
    pub uid: u32,
    /// `/proc/filesystems`.
    pub filesystems: String,
    /// `/proc/cgroups` (v1 controllers and whether each is enabled).
    pub cgroups: String,
    /// The controllers of the unified hierarchy (`/sys/fs/cgroup/cgroup.controllers`), if it is
    /// mounted as cgroup2 at the top.
    pub cgroup2_controllers: Option<String>,
    /// `/proc/sys/net/bridge` exists (br_netfilter is loaded or built in).
    pub br_netfilter: bool,
}

impl Host {
    /// Reads this machine.
    pub fn read() -> Host {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let unified = read("/proc/self/mountinfo").lines().any(|l| {
            l.split(" - ").nth(1).is_some_and(|t| t.starts_with("cgroup2 "))
                && l.split(' ').nth(4) == Some("/sys/fs/cgroup")
        });
        Host {
            uid: nix_uid(),
            filesystems: read("/proc/filesystems"),
            cgroups: read("/proc/cgroups"),
            cgroup2_controllers: unified.then(|| read("/sys/fs/cgroup/cgroup.controllers")),
            br_netfilter: Path::new("/proc/sys/net/bridge").is_dir(),
        }
    }
}

fn nix_uid() -> u32 {
    // The owner of /proc/self is the effective user.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// cgroup controllers kubelet and runc need.
const CONTROLLERS: &[&str] = &["cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer"];

/// The requirements `host` does not meet (empty: the node can run here).
pub fn missing(host: &Host) -> Vec<Missing> {
    let mut out = Vec::new();
    if host.uid != 0 {
        out.push(Missing {
            what: "root (containerd, kubelet and the CNI plugins manage mounts, namespaces and iptables)".into(),
            fix: "run as root".into(),
        });
    }
    if !host.filesystems.lines().any(|l| l.split_whitespace().last() == Some("overlay")) {
        out.push(Missing {
            what: "the overlay filesystem (containerd's snapshotter)".into(),
            fix: "modprobe overlay".into(),
        });
    }
    let enabled = |c: &str| match &host.cgroup2_controllers {
        // cgroup v2: cpuacct and devices are not controllers there; cpu and memory cover them.
        Some(v2) => matches!(c, "cpuacct" | "devices" | "freezer") || v2.split_whitespace().any(|x| x == c),
        None => host.cgroups.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 4 && f[0] == c && f[3] == "1"
        }),
    };
    for c in CONTROLLERS.iter().filter(|c| !enabled(c)) {
        out.push(Missing {
            what: format!("the cgroup controller {c}"),
            fix: format!("enable it on the kernel command line (cgroup_enable={c}) and mount it"),
        });
    }
    if !host.br_netfilter {
        out.push(Missing {
            what: "br_netfilter (bridged pod traffic must pass iptables for Services)".into(),
            fix: "modprobe br_netfilter".into(),
        });
    }
    out
}

/// The containerd configuration (version 3, containerd 2.x).
/// containerd finds `containerd-shim-runc-v2` on its PATH, which [`up`] sets.
pub fn containerd_config(node: &Path) -> String {
    let d = |p: &str| node.join(p).display().to_string();
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  # root here lacks CAP_SYS_RESOURCE: nothing may lower oom_score_adj below containerd's own,
  # or runc fails every sandbox with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false

"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        sock = containerd_socket().display(),
        pause = PAUSE_IMAGE,
        cni_conf = d("cni/net.d"),
    )
}

/// The CNI network: a bridge with host-local addresses, masquerading outbound traffic, and
/// hairpin mode so that a pod reaches itself through a Service.
pub fn cni_config(node: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_CIDR }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": node.join("cni/ipam").display().to_string(),
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    })
    .to_string()
}

/// kubelet's configuration.
pub fn kubelet_config(node: &Path, pki: &Path) -> String {
    let cfg = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": ports::KUBELET,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports::KUBELET_HEALTHZ,
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": pki.join("ca.crt").display().to_string() },
        },
        "authorization": { "mode": "Webhook" },
        "containerRuntimeEndpoint": format!("unix://{}", containerd_socket().display()),
        // The host mounts cgroup v1 (hybrid); kubelet 1.37 refuses it unless told.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": false,
        // The pod chaos restarts the leader's container dozens of times in a row; the default
        // back-off (up to 300 s) would leave a replica down for minutes between rounds. The
        // successor's takeover does not depend on it.
        "crashLoopBackOff": { "maxContainerRestartPeriod": "2s" },
        // Imported images can never be pulled again: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        // The node shares the host's disk with the builds; a percentage of a large shared disk
        // (1 % of 252 GB here) tainted the node with disk-pressure while 1.1 GB was free, and
        // left CI's pods Pending. An absolute floor still keeps a truly full disk from wedging it.
        "evictionHard": { "memory.available": "100Mi", "nodefs.available": "512Mi", "imagefs.available": "512Mi" },
        "podLogsDirectory": node.join("pod-logs").display().to_string(),
        "registerWithTaints": [{ "key": TAINT, "value": LABEL.1, "effect": "NoSchedule" }],
        "serializeImagePulls": false,
        "maxPods": 50,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "fileCheckFrequency": "10s",
        "protectKernelDefaults": false,
        "resolvConf": "/etc/resolv.conf",
        // CoreDNS on the node address ([`corefile`]): Service names resolve in the pods.
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
    });
    serde_yaml::to_string(&cfg).unwrap_or_default()
}

/// The pods' DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// CoreDNS's configuration: the cluster's Services and pods, from the API server (as the admin
/// `kubeconfig`), on the node address; nothing else (there is no upstream to forward to).
pub fn corefile(kubeconfig: &Path) -> String {
    format!(
        ".:53 {{\n    bind {NODE_IP}\n    errors\n    ready 127.0.0.1:{ready}\n    \
         kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n        kubeconfig {}\n        pods insecure\n        \
         fallthrough in-addr.arpa ip6.arpa\n    }}\n    cache 5\n}}\n",
        kubeconfig.display(),
        ready = ports::COREDNS_READY,
    )
}

/// kube-proxy's configuration (iptables mode).
pub fn kube_proxy_config(run: &Path) -> String {
    let cfg = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": { "kubeconfig": run.join("kube-proxy.kubeconfig").display().to_string(), "qps": 50, "burst": 100 },
        "hostnameOverride": NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": format!("127.0.0.1:{}", ports::PROXY_HEALTHZ),
        "metricsBindAddress": format!("127.0.0.1:{}", ports::PROXY_METRICS),
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        // Leave the host's conntrack table size alone.
        "conntrack": { "maxPerCore": 0 },
        "iptables": { "minSyncPeriod": "1s", "syncPeriod": "30s", "masqueradeAll": false },
    });
    serde_yaml::to_string(&cfg).unwrap_or_default()
}

/// `ctr` against our containerd, in the CRI namespace.
fn ctr(bin_dir: &Path) -> Command {
    let mut c = Command::new(bin_dir.join("ctr"));
    c.arg("--address").arg(containerd_socket()).args(["--namespace", "k8s.io"]);
    c
}

/// The pause image as a docker archive in the build cache, built from kubernetes' `pause.c`
/// (static, with gcc) into a `FROM scratch` image with buildah.
fn pause_archive(kubernetes_module: impl FnOnce() -> Result<PathBuf>) -> Result<PathBuf> {
    let cache = paths::cache().join("images");
    let tag = PAUSE_IMAGE.rsplit(':').next().unwrap_or("latest");
    let archive = cache.join(format!("pause-{tag}.tar"));
    if archive.is_file() {
        return Ok(archive);
    }
    println!("    building the pause image {PAUSE_IMAGE} from build/pause/linux/pause.c");
    sh::ensure_tools(&[sh::BUILDAH])?;
    let ctx = cache.join("pause-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(&ctx)?;
    sh::output(
        Command::new("gcc")
            .args(["-Os", "-Wall", "-Werror", "-static", &format!("-DVERSION=v{tag}"), "-o"])
            .arg(ctx.join("pause"))
            .arg(kubernetes_module()?.join("build/pause/linux/pause.c")),
        "gcc -static pause.c",
    )?;
    scratch_archive(
        &ctx,
        "FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT [\"/pause\"]\n",
        PAUSE_IMAGE,
        &archive,
    )?;
    Ok(archive)
}

/// Builds the image `containerfile` describes from the context `ctx` with buildah, pulling
/// nothing, tags it `reference`, and writes it as a docker archive to `archive` (complete or not
/// at all).
pub fn scratch_archive(ctx: &Path, containerfile: &str, reference: &str, archive: &Path) -> Result<()> {
    std::fs::write(ctx.join("Containerfile"), containerfile)?;
    sh::output(
        Command::new("buildah")
            .args(["bud", "--quiet", "--pull-never", "-f"])
            .arg(ctx.join("Containerfile"))
            .args(["-t", reference])
            .arg(ctx),
        &format!("buildah bud ({reference})"),
    )?;
    let partial = archive.with_extension("tar.partial");
    let _ = std::fs::remove_file(&partial);
    sh::output(
        Command::new("buildah")
            .args(["push", "--quiet", reference])
            .arg(format!("docker-archive:{}:{reference}", partial.display())),
        &format!("buildah push ({reference})"),
    )?;
    std::fs::rename(&partial, archive)?;
    Ok(())
}

/// Imports a docker archive into the node's containerd (unpacked for the CRI).
pub fn import(bin_dir: &Path, archive: &Path) -> Result<()> {
    sh::output(
        ctr(bin_dir).args(["images", "import"]).arg(archive),
        &format!("ctr images import {}", archive.display()),
    )?;
    Ok(())
}

/// Imports the operator image built by `cargo xtask image` (`.run/image/myapp-operator.tar`).
pub fn import_operator_image() -> Result<()> {
    let archive = paths::run_dir().join("image/myapp-operator.tar");
    if !archive.is_file() {
        bail!("{} is missing: run `cargo xtask image` first", archive.display());
    }
    let bin_dir = gobuild::component("containerd")?.bin_dir()?;
    import(&bin_dir, &archive)?;
    println!("    imported {OPERATOR_IMAGE} into the node's containerd");
    Ok(())
}

fn set_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("sysctl {key}={value}"))
}

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

/// Installs what the node needs from Debian when it is missing.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(f, _)| !Path::new(f).exists()).map(|(_, p)| *p).collect();
    crate::sh::apt_install(&missing)
}

/// What `up` needs from the rest of the control plane.
pub struct Bins<'a> {
    /// containerd, containerd-shim-runc-v2, ctr.
    pub containerd: &'a Path,
    /// kubelet.
    pub kubelet: &'a Path,
    /// kube-proxy.
    pub kube_proxy: &'a Path,
    /// CoreDNS, the pods' cluster DNS.
    pub coredns: &'a Path,
    /// Finds the kubernetes module's source (for pause.c), asked only when the pause image is
    /// not in the cache.
    pub kubernetes_module: fn() -> Result<PathBuf>,
}

/// Checks the host; on success adds the node address to `lo`. Returns what is missing (the node
/// is then skipped, and the note kept for the tests).
pub fn prepare_host() -> Result<Vec<Missing>> {
    std::fs::create_dir_all(dir())?;
    let _ = std::fs::remove_file(unavailable_file());
    let _ = std::fs::remove_file(enabled_file());
    if std::env::var("MYAPP_NODE").is_ok_and(|v| v == "off") {
        std::fs::write(unavailable_file(), "turned off with MYAPP_NODE=off")?;
        return Ok(vec![Missing { what: "the node (MYAPP_NODE=off)".into(), fix: "unset MYAPP_NODE".into() }]);
    }
    let host = Host::read();
    let missing = missing(&host);
    if !missing.is_empty() {
        let text = missing.iter().map(|m| format!("{} (fix: {})", m.what, m.fix)).collect::<Vec<_>>().join("; ");
        std::fs::write(unavailable_file(), &text)?;
        return Ok(missing);
    }
    ensure_packages()?;
    set_sysctl("net.ipv4.ip_forward", "1")?;
    set_sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
    let out = ip(&["addr", "replace", &format!("{NODE_IP}/32"), "dev", "lo"]).context("ip addr")?;
    if !out.status.success() {
        bail!("ip addr add {NODE_IP}/32 dev lo: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::write(enabled_file(), NODE_IP)?;
    Ok(missing)
}

/// Writes the node's configuration: the kubeconfigs of kubelet and kube-proxy under `run`, and
/// under `node` the configuration of containerd, the CNI network, kubelet, kube-proxy and CoreDNS.
fn write_configuration(run: &Path, node: &Path) -> Result<()> {
    for d in ["containerd", "cni/net.d", "cni/ipam", "kubelet", "pod-logs"] {
        std::fs::create_dir_all(node.join(d))?;
    }
    let pki_dir = run.join("pki");
    let server = format!("https://127.0.0.1:{}", super::access::ports::APISERVER);
    for c in ["kubelet", "kube-proxy"] {
        std::fs::write(run.join(format!("{c}.kubeconfig")), pki::kubeconfig(&pki_dir, &server, c)?)?;
    }
    std::fs::write(node.join("containerd.toml"), containerd_config(node))?;
    std::fs::write(node.join("cni/net.d/10-myapp.conflist"), cni_config(node))?;
    std::fs::write(node.join("kubelet.yaml"), kubelet_config(node, &pki_dir))?;
    std::fs::write(node.join("kube-proxy.yaml"), kube_proxy_config(run))?;
    std::fs::write(node.join("Corefile"), corefile(&run.join("kubeconfig")))?;
    Ok(())
}

/// Starts containerd, imports the pause image, then kubelet and kube-proxy; waits until the node
/// is Ready and kube-proxy healthy. The operator image is imported by whoever installs it
/// ([`import_operator_image`]), after building it.
pub async fn up(run: &Path, bins: &Bins<'_>, admin: &Client) -> Result<()> {
    let node = dir();
    write_configuration(run, &node)?;

    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bins.containerd.display());
    let containerd = sh::spawn(
        run,
        "containerd",
        &bins.containerd.join("containerd"),
        &[format!("--config={}", node.join("containerd.toml").display()), "--log-level=warn".into()],
        &[("PATH", path.clone())],
    )?;
    let version = || async {
        containerd_socket().exists() && ctr(bins.containerd).arg("version").output().is_ok_and(|o| o.status.success())
    };
    wait_for(run, &[&containerd], "containerd", Duration::from_secs(30), version).await?;
    import(bins.containerd, &pause_archive(bins.kubernetes_module)?)?;

    let coredns =
        sh::spawn(run, "coredns", bins.coredns, &["-conf".into(), node.join("Corefile").display().to_string()], &[])?;
    wait_for(run, &[&coredns], "coredns", Duration::from_secs(30), || async {
        matches!(chaos::plain_http::get(ports::COREDNS_READY, "/ready"), Ok((200, _)))
    })
    .await?;
    let kube_proxy = sh::spawn(
        run,
        "kube-proxy",
        bins.kube_proxy,
        &[format!("--config={}", node.join("kube-proxy.yaml").display())],
        &[("PATH", path.clone())],
    )?;
    let kubelet = sh::spawn(
        run,
        "kubelet",
        bins.kubelet,
        &[
            format!("--config={}", node.join("kubelet.yaml").display()),
            format!("--kubeconfig={}", run.join("kubelet.kubeconfig").display()),
            format!("--root-dir={}", node.join("kubelet").display()),
            format!("--cert-dir={}", node.join("kubelet/pki").display()),
            format!("--hostname-override={NAME}"),
            format!("--node-ip={NODE_IP}"),
            format!("--node-labels={}={},type=real", LABEL.0, LABEL.1),
            "--v=1".into(),
        ],
        &[("PATH", path)],
    )?;
    let nodes: Api<Node> = Api::all(admin.clone());
    let ready = || async {
        let ready = nodes.get_opt(NAME).await.ok().flatten().is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        ready && matches!(chaos::plain_http::get(ports::PROXY_HEALTHZ, "/healthz"), Ok((200, _)))
    };
    let what = format!("node {NAME} (Ready, kube-proxy healthy)");
    wait_for(run, &[&kubelet, &kube_proxy], &what, Duration::from_secs(90), ready).await
}

/// Removes the pods of the node through the API (so that kubelet stops their sandboxes and the
/// CNI plugin releases their addresses and rules), after cordoning it so nothing new lands.
pub async fn drain(admin: &Client) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let cordon = serde_json::json!({"spec": {"unschedulable": true}});
    if nodes.patch(NAME, &PatchParams::default(), &Patch::Merge(&cordon)).await.is_err() {
        return;
    }
    let pods: Api<Pod> = Api::all(admin.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={NAME}"));
    let dp = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
    if let Ok(list) = pods.list(&on_node).await {
        for p in list.items {
            let (Some(ns), Some(name)) = (p.metadata.namespace, p.metadata.name) else { continue };
            let _ = Api::<Pod>::namespaced(admin.clone(), &ns).delete(&name, &dp).await;
        }
    }
}

/// Waits (up to `timeout`) until containerd runs no container of the CRI, then kills whatever is
/// left. Needs containerd running.
fn stop_containers(bin_dir: &Path, timeout: Duration) {
    let running = || -> Vec<String> {
        ctr(bin_dir)
            .args(["tasks", "ls", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + timeout;
    while !running().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    for id in running() {
        let _ = ctr(bin_dir).args(["tasks", "kill", "-a", "-s", "SIGKILL", &id]).output();
    }
    std::thread::sleep(Duration::from_millis(300));
    for id in running() {
        let _ = ctr(bin_dir).args(["tasks", "delete", "-f", &id]).output();
    }
}

/// Mount points under `under`, deepest first.
fn mounts_under(mountinfo: &str, under: &str) -> Vec<String> {
    let mut out: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| m == under || m.starts_with(&format!("{under}/")))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.len()));
    out.dedup();
    out
}

/// Chains kubelet makes on start (its canaries, its localnet firewall and the hint of its
/// iptables mode, the last two in mangle), removed with the node.
const KUBELET_CHAINS: &[&str] = &["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];

/// What of an `iptables -S` listing (one table) belongs to the node: the rules of our CNI network
/// and of the bridge, and the jumps to kubelet's chains (as `-D` commands); and the chains to
/// flush and delete: the per-sandbox chains our rules jump to, and kubelet's.
fn our_rules(save: &str) -> (Vec<String>, Vec<String>) {
    let network = format!("\\\"{CNI_NETWORK}\\\"");
    let jumps_to_kubelet = |l: &str| l.split(" -j ").nth(1).is_some_and(|t| KUBELET_CHAINS.contains(&t.trim()));
    let ours: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A ") && (l.contains(&network) || l.contains(BRIDGE) || jumps_to_kubelet(l)))
        .collect();
    let mut chains: Vec<String> = ours
        .iter()
        .filter_map(|l| l.split(" -j ").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter(|c| c.starts_with("CNI-"))
        .map(str::to_string)
        .collect();
    chains.extend(
        save.lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| KUBELET_CHAINS.contains(&c.trim()))
            .map(|c| c.trim().to_string()),
    );
    chains.dedup();
    (ours.iter().map(|l| l.replacen("-A ", "-D ", 1)).collect(), chains)
}

/// Kills the containers still running in the node's containerd, after giving kubelet 20 s to stop
/// them (see [`drain`]). Runs before the processes stop: it needs containerd.
pub fn cleanup_containers(bin_dir: Option<&Path>) {
    if let Some(bin_dir) = bin_dir
        && containerd_socket().exists()
    {
        stop_containers(bin_dir, Duration::from_secs(20));
    }
}

/// Removes mounts, network devices, iptables rules and the node address left by the node.
pub fn cleanup_host(kube_proxy: Option<&Path>) {
    let node = dir();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for m in mounts_under(&info, &node.display().to_string()) {
        let _ = Command::new("umount").args(["-l", &m]).output();
    }
    // Sandboxes' network namespaces that containerd pinned under its state dir are covered above;
    // the bridge goes with its rules.
    let _ = ip(&["link", "del", BRIDGE]);
    for table in ["nat", "filter", "mangle"] {
        let save = Command::new("iptables")
            .args(["-t", table, "-S"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let (rules, chains) = our_rules(&save);
        for rule in rules {
            let _ = Command::new("iptables").args(["-t", table]).args(shell_words(&rule)).output();
        }
        for chain in chains {
            let _ = Command::new("iptables").args(["-t", table, "-F", &chain]).output();
            let _ = Command::new("iptables").args(["-t", table, "-X", &chain]).output();
        }
    }
    if let Some(kp) = kube_proxy {
        let _ = Command::new(kp).arg("--cleanup").output();
    }
    let _ = ip(&["addr", "del", &format!("{NODE_IP}/32"), "dev", "lo"]);
    let _ = std::fs::remove_file(enabled_file());
}

/// Splits an `iptables -S` rule into arguments (double quotes group words).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if quoted => cur.extend(chars.next()),
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The host pid of the main process of a pod's container, from its status's `containerID`.
pub fn container_pid(container_id: &str) -> Result<u32> {
    let id = container_id.rsplit("://").next().unwrap_or(container_id);
    let bin_dir = gobuild::component("containerd")?.bin_dir()?;
    let out = sh::output(ctr(&bin_dir).args(["tasks", "ls"]), "ctr tasks ls")?;
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(1).and_then(|p| p.parse().ok())).flatten()
        })
        .with_context(|| format!("container {id} has no running task"))
}

/// How long kube-proxy took to program a pod's change into the node's rules (from its histogram
/// `kubeproxy_network_programming_duration_seconds`): a terminating replica keeps getting new
/// webhook connections that long, so its drain must outlast it. The histogram has no Service
/// label: it covers every Service (the MyApps' too), counted from the change that triggered the
/// EndpointSlice update, which for a Service whose pods never start can be long ago.
#[derive(Debug, PartialEq)]
pub struct Programming {
    /// Changes programmed since kube-proxy started.
    pub count: u64,
    /// Upper bounds (s) of the buckets holding the median, the 99th percentile and the slowest.
    pub p50_within: f64,
    pub p99_within: f64,
    pub max_within: f64,
}

impl std::fmt::Display for Programming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kube-proxy programmed {} endpoint changes (every Service, since it started): p50 within {} s, \
             p99 within {} s, all within {} s",
            self.count, self.p50_within, self.p99_within, self.max_within
        )
    }
}

/// kube-proxy's network programming latency so far, read from its metrics on the node.
pub fn programming() -> Option<Programming> {
    let (_, body) = sh::http_get(ports::PROXY_METRICS, "/metrics").ok()?;
    programming_from(&body)
}

/// [`Programming`] from a metrics exposition (the IPv4 family's cumulative buckets).
fn programming_from(metrics: &str) -> Option<Programming> {
    let prefix = "kubeproxy_network_programming_duration_seconds_bucket{";
    let mut buckets: Vec<(f64, u64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter(|l| !l.contains("ip_family=\"IPv6\""))
        .filter_map(|l| {
            let (labels, count) = l.split_once("} ")?;
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last()?.1;
    if count == 0 {
        return None;
    }
    let within = |rank: u64| buckets.iter().find(|(_, n)| *n >= rank).map(|(le, _)| *le);
    Some(Programming {
        count,
        p50_within: within(count.div_ceil(2))?,
        p99_within: within((count * 99).div_ceil(100))?,
        max_within: within(count)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            uid: 0,
            filesystems: "nodev\tsysfs\nnodev\toverlay\n\text4\n".into(),
            cgroups: "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t3\t1\t1\ncpu\t1\t1\t1\ncpuacct\t2\t1\t1\nmemory\t4\t1\t1\ndevices\t5\t1\t1\nfreezer\t6\t1\t1\npids\t8\t1\t1\n".into(),
            cgroup2_controllers: None,
            br_netfilter: true,
        }
    }

    #[test]
    fn kube_proxys_programming_latency_is_read_from_its_cumulative_buckets() {
        let metrics = "\
# TYPE kubeproxy_network_programming_duration_seconds histogram
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.5\"} 28
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 129
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"2\"} 355
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"3\"} 362
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"4\"} 362
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 362
kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv6\",le=\"+Inf\"} 900
kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 362
";
        let p = programming_from(metrics).expect("buckets");
        assert_eq!(p, Programming { count: 362, p50_within: 2.0, p99_within: 3.0, max_within: 3.0 });
        let unseen =
            metrics.replace("} 362", "} 0").replace("} 355", "} 0").replace("} 129", "} 0").replace("} 28", "} 0");
        assert_eq!(programming_from(&unseen.replace("} 900", "} 0")), None, "no change programmed yet");
        assert_eq!(programming_from("up 1\n"), None);
    }

    #[test]
    fn a_complete_host_misses_nothing() {
        assert_eq!(missing(&host()), vec![]);
    }

    #[test]
    fn each_missing_requirement_is_named_with_its_fix() {
        let mut h = host();
        h.filesystems = "nodev\tsysfs\n".into();
        h.cgroups = h.cgroups.replace("memory\t4\t1\t1", "memory\t4\t1\t0");
        h.br_netfilter = false;
        h.uid = 1000;
        let m = missing(&h);
        let what: Vec<&str> = m.iter().map(|m| m.what.as_str()).collect();
        assert_eq!(m.len(), 4, "{what:?}");
        assert!(what.iter().any(|w| w.contains("overlay")));
        assert!(what.iter().any(|w| w.contains("cgroup controller memory")));
        assert!(what.iter().any(|w| w.contains("br_netfilter")));
        assert!(m.iter().any(|m| m.fix == "modprobe overlay"));
    }

    #[test]
    fn cgroup2_hosts_are_judged_by_their_controllers() {
        let mut h = host();
        h.cgroups.clear();
        h.cgroup2_controllers = Some("cpuset cpu io memory pids".into());
        assert_eq!(missing(&h), vec![]);
        h.cgroup2_controllers = Some("cpuset cpu io pids".into());
        assert_eq!(missing(&h).len(), 1);
    }

    #[test]
    fn containerd_uses_our_pause_image_and_keeps_oom_score_adj() {
        let c = containerd_config(Path::new("/r/node"));
        let v: toml_edit::DocumentMut = c.parse().expect("valid TOML");
        let images = &v["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(images["pinned_images"]["sandbox"].as_str(), Some(PAUSE_IMAGE));
        let runtime = &v["plugins"]["io.containerd.cri.v1.runtime"];
        assert_eq!(runtime["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(runtime["cni"]["conf_dir"].as_str(), Some("/r/node/cni/net.d"));
        assert_eq!(v["version"].as_integer(), Some(3));
    }

    #[test]
    fn kubelet_tolerates_this_host_and_registers_tainted() {
        let v: serde_yaml::Value =
            serde_yaml::from_str(&kubelet_config(Path::new("/r/node"), Path::new("/r/pki"))).expect("yaml");
        assert_eq!(v["failCgroupV1"].as_bool(), Some(false));
        assert_eq!(v["cgroupDriver"].as_str(), Some("cgroupfs"));
        assert_eq!(v["registerWithTaints"][0]["key"].as_str(), Some(TAINT));
        assert_eq!(v["registerWithTaints"][0]["effect"].as_str(), Some("NoSchedule"));
        assert_eq!(v["imageGCHighThresholdPercent"].as_u64(), Some(100));
        assert_eq!(v["evictionHard"]["nodefs.available"].as_str(), Some("512Mi"));
        assert_eq!(v["address"].as_str(), Some(NODE_IP));
    }

    #[test]
    fn cni_pods_do_not_overlap_kwok() {
        let v: serde_json::Value = serde_json::from_str(&cni_config(Path::new("/r/node"))).expect("json");
        assert_eq!(v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"].as_str(), Some(POD_CIDR));
        assert!(!POD_CIDR.starts_with("10.244."), "kwok's fake pods use 10.244.0.0/16");
    }

    #[test]
    fn the_node_folder_leaves_room_for_unix_sockets() {
        if std::env::var_os("MYAPP_NODE_DIR").is_some() {
            return;
        }
        let longest = dir().join("kubelet/plugins_registry/kubelet.sock.tmp.something");
        assert!(longest.display().to_string().len() < 100, "{}", longest.display());
        assert!(containerd_socket().display().to_string().len() + ".ttrpc".len() < 100);
    }

    #[test]
    fn mounts_are_found_under_our_folder_deepest_first() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
            40 30 0:50 / /w/.run/node/kubelet/pods/x/volumes/token rw - tmpfs tmpfs rw\n\
            41 30 0:51 / /w/.run/node/containerd/state/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay overlay rw\n\
            42 30 0:52 / /w/.run/node/kubelet rw - tmpfs tmpfs rw\n\
            43 30 0:53 / /w/.run/node2/other rw - tmpfs tmpfs rw\n";
        let m = mounts_under(info, "/w/.run/node");
        assert_eq!(m.len(), 3);
        assert_eq!(m.last().map(String::as_str), Some("/w/.run/node/kubelet"));
        assert!(!m.iter().any(|x| x == "/proc"));
    }

    #[test]
    fn only_our_iptables_rules_are_removed() {
        let save = r#"-P POSTROUTING ACCEPT
-A POSTROUTING -s 10.88.0.5/32 -m comment --comment "name: \"myapp-node\" id: \"abc\"" -j CNI-1
-A POSTROUTING -s 10.0.0.0/8 -m comment --comment "name: \"other\" id: \"x\"" -j CNI-2
-A FORWARD -o myapp0 -j ACCEPT
-N KUBE-FIREWALL
-A INPUT -j KUBE-FIREWALL
-A INPUT -j SOMEONE-ELSES
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -j DROP
"#;
        let (rules, chains) = our_rules(save);
        assert_eq!(rules.len(), 3, "{rules:?}");
        assert!(rules.iter().all(|r| r.starts_with("-D ")));
        assert!(!rules.iter().any(|r| r.contains("SOMEONE-ELSES") || r.contains("10.0.0.0/8")));
        assert_eq!(chains, ["CNI-1", "KUBE-FIREWALL"]);
        // kubelet's empty chains in mangle go too, and nobody else's.
        let mangle = "-P PREROUTING ACCEPT\n-N KUBE-IPTABLES-HINT\n-N KUBE-KUBELET-CANARY\n-N SOMEONE-ELSES\n";
        assert_eq!(our_rules(mangle), (vec![], vec!["KUBE-IPTABLES-HINT".into(), "KUBE-KUBELET-CANARY".into()]));
    }

    #[test]
    fn rule_words_keep_quoted_comments_together() {
        assert_eq!(
            shell_words("-D X -m comment --comment \"a b\" -j Y"),
            ["-D", "X", "-m", "comment", "--comment", "a b", "-j", "Y"]
        );
        assert_eq!(shell_words(r#"--comment "name: \"n\" id: \"i\"""#), ["--comment", r#"name: "n" id: "i""#]);
    }
}
