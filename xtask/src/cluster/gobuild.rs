//! Builds the upstream control-plane components from their Go modules.
//!
//! Each component has a wrapper module in `cluster/components/<name>/` that commits only its
//! `go.mod` (with `tool` lines naming the commands) and `go.sum`. `go build tool` builds every
//! command of the module. The binaries go into the cache under `bin/<name>-<version>-<hash>/`,
//! where the hash covers `go.mod` and `go.sum`, so a changed pin rebuilds and an unchanged one
//! never does.
//!
//! The OpenTelemetry Collector has no command to build: a distribution is generated. Its wrapper
//! module pins the collector builder instead, and a manifest beside it names the components
//! ([`Kind::CollectorBuilder`]). The builder is built like any tool, generates the distribution's
//! sources and go.mod in a scratch folder, and those are compiled with the same flags; the hash
//! covers the manifest too.

use crate::paths;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// How a component's binaries come out of its wrapper module.
pub enum Kind {
    /// `go build tool`: every command the `tool` lines name.
    Tools,
    /// The wrapper's one tool is the OpenTelemetry Collector builder. It generates a distribution
    /// from `manifest` (a file beside go.mod), whose `dist.name` is the one binary, and `go build`
    /// compiles it.
    CollectorBuilder { manifest: &'static str },
}

/// One component to build.
pub struct Component {
    /// Folder name under `cluster/components/`.
    pub name: &'static str,
    /// The module whose version names the build.
    pub module: &'static str,
    /// Commands the build must produce.
    pub binaries: &'static [&'static str],
    /// Extra `-ldflags` (version stamping); `{version}` is replaced.
    pub ldflags: &'static str,
    /// Binaries that `go build` names after their package path, renamed: (built, wanted).
    pub renames: &'static [(&'static str, &'static str)],
    /// Build tags (`-tags`), comma-separated; empty for none.
    pub tags: &'static str,
    /// How the binaries are built.
    pub kind: Kind,
}

const K8S_LDFLAGS: &str = "-X k8s.io/component-base/version.gitVersion={version} \
    -X k8s.io/component-base/version.gitMajor={major} -X k8s.io/component-base/version.gitMinor={minor} \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/client-go/pkg/version.gitVersion={version} \
    -X k8s.io/client-go/pkg/version.gitMajor={major} -X k8s.io/client-go/pkg/version.gitMinor={minor}";

/// Every component of the local control plane.
pub const COMPONENTS: &[Component] = &[
    Component {
        name: "etcd",
        module: "go.etcd.io/etcd/server/v3",
        binaries: &["etcd"],
        ldflags: "",
        renames: &[("server", "etcd")],
        tags: "",
        kind: Kind::Tools,
    },
    Component {
        name: "kubernetes",
        module: "k8s.io/kubernetes",
        binaries: &["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy"],
        ldflags: K8S_LDFLAGS,
        renames: &[],
        tags: "",
        kind: Kind::Tools,
    },
    Component {
        name: "kwok",
        module: "sigs.k8s.io/kwok",
        binaries: &["kwok"],
        ldflags: "",
        renames: &[],
        tags: "",
        kind: Kind::Tools,
    },
    // The cluster DNS of the real node's pods: Service names resolve as in every cluster.
    Component {
        name: "coredns",
        module: "github.com/coredns/coredns",
        binaries: &["coredns"],
        ldflags: "",
        renames: &[],
        tags: "",
        kind: Kind::Tools,
    },
    Component {
        name: "jaeger",
        module: "github.com/jaegertracing/jaeger",
        binaries: &["jaeger"],
        ldflags: "",
        renames: &[],
        tags: "",
        kind: Kind::Tools,
    },
    // The real node's container runtime. CGO off: no btrfs snapshotter (it needs cgo headers).
    Component {
        name: "containerd",
        module: "github.com/containerd/containerd/v2",
        binaries: &["containerd", "containerd-shim-runc-v2", "ctr"],
        ldflags: "-X github.com/containerd/containerd/v2/version.Version={version}",
        renames: &[],
        tags: "no_btrfs",
        kind: Kind::Tools,
    },
    // Prometheus v3 (module versions v0.3xx.y are Prometheus 3.xx.y) and promtool, which runs the
    // rule tests of `deploy/monitoring`. Only the Kubernetes service discovery is compiled in, the
    // one the local control plane scrapes with; without `builtinassets` there is no web UI, and the
    // HTTP API is whole.
    Component {
        name: "prometheus",
        module: "github.com/prometheus/prometheus",
        binaries: &["prometheus", "promtool"],
        ldflags: "-X github.com/prometheus/common/version.Version={version}",
        renames: &[],
        tags: "remove_all_sd,enable_kubernetes_sd",
        kind: Kind::Tools,
    },
];

/// Components built on first use rather than by `cluster up`, which does not run them.
pub const ON_DEMAND: &[Component] = &[
    // The OpenTelemetry Collector of `otel/` (its image, `crate::image::otel`): exactly the
    // components its config uses, named in `manifest.yaml`. The builder's version is the release.
    Component {
        name: "otelcol",
        module: "go.opentelemetry.io/collector/cmd/builder",
        binaries: &["otelcol"],
        ldflags: "",
        renames: &[],
        tags: "",
        kind: Kind::CollectorBuilder { manifest: "manifest.yaml" },
    },
];

/// FNV-1a, 64 bits: a stable content hash for cache keys.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

impl Component {
    fn dir(&self) -> PathBuf {
        paths::components().join(self.name)
    }

    /// The version of `module` pinned in the wrapper's go.mod.
    pub fn version(&self) -> Result<String> {
        let gomod = std::fs::read_to_string(self.dir().join("go.mod"))
            .with_context(|| format!("read {}/go.mod", self.dir().display()))?;
        gomod
            .lines()
            .map(|l| l.trim().trim_start_matches("require").trim())
            .find_map(|l| {
                let mut parts = l.split_whitespace();
                (parts.next() == Some(self.module)).then(|| parts.next().map(str::to_string)).flatten()
            })
            .with_context(|| format!("{} is not required in {}/go.mod", self.module, self.name))
    }

    fn key(&self) -> Result<String> {
        let mut content = std::fs::read(self.dir().join("go.mod"))?;
        content.extend(std::fs::read(self.dir().join("go.sum")).unwrap_or_default());
        if let Kind::CollectorBuilder { manifest } = self.kind {
            let path = self.dir().join(manifest);
            content.extend(std::fs::read(&path).with_context(|| format!("read {}", path.display()))?);
        }
        Ok(format!("{}-{}-{:08x}", self.name, self.version()?, fnv1a(&content) as u32))
    }

    /// The source of `module` as the wrapper pins it, in the module cache (downloaded if needed).
    pub fn source_dir(&self) -> Result<PathBuf> {
        let out = Command::new("go")
            .current_dir(self.dir())
            .args(["mod", "download", "-json"])
            .arg(format!("{}@{}", self.module, self.version()?))
            .output()
            .context("go mod download")?;
        if !out.status.success() {
            bail!("go mod download {}: {}", self.module, String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(PathBuf::from(v["Dir"].as_str().context("module has no Dir")?))
    }

    /// Folder holding the built binaries.
    pub fn bin_dir(&self) -> Result<PathBuf> {
        Ok(paths::cache().join("bin").join(self.key()?))
    }

    fn built(&self) -> Result<bool> {
        let dir = self.bin_dir()?;
        Ok(self.binaries.iter().all(|b| dir.join(b).is_file()))
    }

    fn ldflags(&self) -> Result<String> {
        let version = self.version()?;
        let mut nums = version.trim_start_matches('v').split('.');
        let major = nums.next().unwrap_or("0").to_string();
        let minor = nums.next().unwrap_or("0").to_string();
        Ok(format!(
            "-s -w {}",
            self.ldflags.replace("{version}", &version).replace("{major}", &major).replace("{minor}", &minor)
        ))
    }

    /// Builds the component unless the cache has it.
    pub fn ensure(&self) -> Result<PathBuf> {
        let dir = self.bin_dir()?;
        if self.built()? {
            return Ok(dir);
        }
        let started = Instant::now();
        println!("==> building {} {} from its Go module (cold builds take minutes)…", self.name, self.version()?);
        let tmp = paths::cache().join("bin").join(format!("{}.partial", self.key()?));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        match self.kind {
            Kind::Tools => self.go_build(&self.dir(), "tool", &tmp)?,
            Kind::CollectorBuilder { manifest } => self.build_distribution(manifest, &tmp)?,
        }
        for (built, wanted) in self.renames {
            std::fs::rename(tmp.join(built), tmp.join(wanted))?;
        }
        for b in self.binaries {
            if !tmp.join(b).is_file() {
                bail!("building {} did not produce {b}", self.name);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)?;
        println!("    built {} in {:.1} s", self.name, started.elapsed().as_secs_f64());
        Ok(dir)
    }

    /// `go build` of `target` (a package pattern) in `dir` into `out` (an existing folder, or else
    /// the file of a single package): static, trimmed, stripped.
    fn go_build(&self, dir: &Path, target: &str, out: &Path) -> Result<()> {
        let mut cmd = Command::new("go");
        cmd.current_dir(dir)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=mod")
            .args(["build", "-trimpath", "-tags", self.tags, "-ldflags", &self.ldflags()?, "-o"])
            .arg(out)
            .arg(target);
        self.run_with_progress(cmd, "go build")
    }

    /// Runs `cmd`, saying every 30 s that it still runs.
    fn run_with_progress(&self, mut cmd: Command, what: &str) -> Result<()> {
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("run `{what}` (is Go installed?)"))?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            let secs = started.elapsed().as_secs();
            if secs > 0 && secs.is_multiple_of(30) {
                println!("    … {} still building ({what}, {secs} s)", self.name);
            }
        };
        if !status.success() {
            bail!("building {} failed: {what} ({status})", self.name);
        }
        Ok(())
    }

    /// Builds the collector builder into `out/builder/`, has it generate the distribution of
    /// `manifest` into `out/src/` (sources, go.mod and go.sum, every module checked to resolve
    /// at the release the manifest names), compiles that into `out/<dist.name>`, and removes both.
    fn build_distribution(&self, manifest: &str, out: &Path) -> Result<()> {
        let step = Instant::now();
        let builder_dir = out.join("builder");
        std::fs::create_dir_all(&builder_dir)?;
        self.go_build(&self.dir(), "tool", &builder_dir)?;
        let builder = builder_dir.join("builder");
        println!("    collector builder built in {:.1} s", step.elapsed().as_secs_f64());

        let step = Instant::now();
        let src = out.join("src");
        let log_path = out.join("builder.log");
        let mut generate = Command::new(&builder);
        generate
            .arg("--config")
            .arg(self.dir().join(manifest))
            .args(["--skip-compilation", "--skip-strict-versioning=false", "--output-path"])
            .arg(&src)
            .env("GOFLAGS", "-mod=mod")
            .stderr(std::fs::File::create(&log_path)?);
        if let Err(e) = self.run_with_progress(generate, "generate the distribution") {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("{e:#}; the builder said:\n{}", log.trim_end());
        }
        println!("    distribution generated and its modules resolved in {:.1} s", step.elapsed().as_secs_f64());

        let step = Instant::now();
        let binary = self.binaries.first().context("a distribution has one binary")?;
        self.go_build(&src, ".", &out.join(binary))?;
        println!("    {binary} compiled in {:.1} s", step.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&builder_dir)?;
        std::fs::remove_dir_all(&src)?;
        std::fs::remove_file(&log_path)?;
        Ok(())
    }
}

/// The component called `name`.
pub fn component(name: &str) -> Result<&'static Component> {
    COMPONENTS.iter().chain(ON_DEMAND).find(|c| c.name == name).with_context(|| format!("no component {name}"))
}

/// The kubectl built with the control plane, if it is in the cache.
pub fn kubectl() -> Option<PathBuf> {
    let c = COMPONENTS.iter().find(|c| c.name == "kubernetes")?;
    let path = c.bin_dir().ok()?.join("kubectl");
    path.is_file().then_some(path)
}

/// Builds (or finds) every component; returns the folder of each binary by name.
pub fn ensure_all() -> Result<std::collections::HashMap<&'static str, PathBuf>> {
    let mut out = std::collections::HashMap::new();
    for c in COMPONENTS {
        let dir = c.ensure()?;
        for b in c.binaries {
            out.insert(*b, dir.join(b));
        }
    }
    Ok(out)
}

/// Regenerates the `replace` block of the kubernetes wrapper from k8s.io/kubernetes's own go.mod:
/// every staging module (`k8s.io/x => ./staging/src/k8s.io/x`) is pinned to `v0.<minor>.<patch>`.
pub fn regenerate_kubernetes_replaces() -> Result<()> {
    let comp = COMPONENTS.iter().find(|c| c.name == "kubernetes").context("no kubernetes component")?;
    let version = comp.version()?;
    let out = Command::new("go")
        .current_dir(comp.dir())
        .args(["mod", "download", "-json"])
        .arg(format!("k8s.io/kubernetes@{version}"))
        .output()
        .context("go mod download")?;
    if !out.status.success() {
        bail!("go mod download failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let upstream_mod = info["GoMod"].as_str().context("no GoMod in go mod download output")?;
    let upstream = std::fs::read_to_string(upstream_mod)?;
    let staging_version = format!("v0.{}", version.trim_start_matches("v1."));
    let replaces = staging_replaces(&upstream, &staging_version);
    let path = comp.dir().join("go.mod");
    let current = std::fs::read_to_string(&path)?;
    std::fs::write(&path, with_replace_block(&current, &replaces))?;
    let status = Command::new("go").current_dir(comp.dir()).args(["mod", "tidy"]).status()?;
    if !status.success() {
        bail!("go mod tidy failed");
    }
    println!("{}: {} staging replaces at {staging_version}", path.display(), replaces.len());
    Ok(())
}

/// The staging modules of an upstream go.mod, as `replace` lines pinned to `staging_version`.
pub fn staging_replaces(upstream_gomod: &str, staging_version: &str) -> Vec<String> {
    upstream_gomod
        .lines()
        .filter_map(|l| {
            let (module, target) = l.trim().trim_start_matches("replace").trim().split_once("=>")?;
            let module = module.trim();
            target.trim().starts_with("./staging/").then(|| format!("{module} => {module} {staging_version}"))
        })
        .collect()
}

fn with_replace_block(gomod: &str, replaces: &[String]) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in gomod.lines() {
        if line.trim_start().starts_with("replace (") {
            skipping = true;
            continue;
        }
        if skipping {
            if line.trim() == ")" {
                skipping = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("\nreplace (\n");
    for r in replaces {
        out.push_str(&format!("\t{r}\n"));
    }
    out.push_str(")\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_staging_modules_only() {
        let upstream = "module k8s.io/kubernetes\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        assert_eq!(
            staging_replaces(upstream, "v0.37.2"),
            vec!["k8s.io/api => k8s.io/api v0.37.2", "k8s.io/client-go => k8s.io/client-go v0.37.2"]
        );
    }

    #[test]
    fn replace_block_is_rewritten_not_duplicated() {
        let gomod = "module m\n\nrequire k8s.io/kubernetes v1.37.2\n\nreplace (\n\told => old v0.1.0\n)\n\ntool k8s.io/kubernetes/cmd/kubectl\n";
        let out = with_replace_block(gomod, &["a => a v0.37.2".to_string()]);
        assert_eq!(out.matches("replace (").count(), 1);
        assert!(out.contains("\ta => a v0.37.2\n"));
        assert!(!out.contains("old => old"));
        assert!(out.contains("tool k8s.io/kubernetes/cmd/kubectl"));
    }

    #[test]
    fn every_component_pins_its_module_and_names_its_tools() {
        for c in COMPONENTS.iter().chain(ON_DEMAND) {
            let version = c.version().expect("pinned");
            assert!(version.starts_with('v'), "{}: {version}", c.name);
            let gomod = std::fs::read_to_string(c.dir().join("go.mod")).expect("go.mod");
            assert!(gomod.contains("\ntool "), "{}: go.mod has no `tool` line", c.name);
            assert!(c.dir().join("go.sum").is_file(), "{}: no go.sum", c.name);
        }
        let prometheus = component("prometheus").expect("prometheus");
        assert_eq!(prometheus.binaries, ["prometheus", "promtool"]);
        assert!(COMPONENTS.iter().any(|c| c.name == "prometheus"), "`cluster up` builds and runs Prometheus");
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
