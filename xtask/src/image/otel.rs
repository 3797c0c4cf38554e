//! The images of `otel/`, built here so that `kubectl apply -k otel/` pulls nothing: the
//! OpenTelemetry Collector (the `otelcol` component, exactly the components its config uses) and
//! Jaeger (the `jaeger` component the control plane runs). Each binary, built from its Go module
//! ([`crate::cluster::gobuild`]), goes into a `FROM scratch` image laid out as upstream's, built with buildah,
//! tagged as the manifest names it, and kept as a docker archive in the build cache. The archive's
//! name carries a hash of the Containerfile and of the binary it holds (its build key, size and
//! modification time), so a rebuilt binary makes a new archive; stale ones are removed.

use crate::{cluster::gobuild, cluster::node, paths};
use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, UNIX_EPOCH};

/// One image of `otel/`.
pub struct Image {
    /// The reference the manifest's container names (its pull policy is `IfNotPresent`).
    pub reference: &'static str,
    /// The manifest in `otel/`: its Deployment runs the image, its ConfigMap's `config.yaml` is
    /// the configuration, which the binary must accept before it is put in an image.
    manifest: &'static str,
    /// The [`gobuild`] component whose binary it ships.
    component: &'static str,
    /// That binary, in the component's build folder.
    binary: &'static str,
    /// Where the image has it: upstream's path, also the entrypoint.
    path: &'static str,
    /// Upstream's user.
    user: &'static str,
    /// Upstream's environment.
    env: &'static [(&'static str, &'static str)],
    /// Files of the component's module source that upstream ships beside the binary:
    /// (path in the module, path in the image).
    files: &'static [(&'static str, &'static str)],
}

/// `otel/collector.yaml`'s image. Upstream's (the core distribution) is `FROM scratch` with
/// `/otelcol`, user 10001:10001, and CA certificates, which this one leaves out: the collector
/// exports to Jaeger in plain gRPC inside the cluster. The tag is the manifest's `dist.version`.
pub const COLLECTOR: Image = Image {
    reference: "otel/opentelemetry-collector:0.165.0",
    manifest: "collector.yaml",
    component: "otelcol",
    binary: "otelcol",
    path: "/otelcol",
    user: "10001:10001",
    env: &[],
    files: &[],
};

/// `otel/jaeger.yaml`'s image: Jaeger release v2.13.0 is Go module version v1.76.0 (the CHANGELOG's
/// "v1.76.0 / v2.13.0"), which the `jaeger` component pins. Laid out as upstream's
/// `cmd/jaeger/Dockerfile` (on scratch instead of its base image, and without its `/tmp` volume:
/// the manifest mounts one).
pub const JAEGER: Image = Image {
    reference: "jaegertracing/jaeger:2.13.0",
    manifest: "jaeger.yaml",
    component: "jaeger",
    binary: "jaeger",
    path: "/cmd/jaeger/jaeger-linux",
    user: "10001",
    env: &[("JAEGER_LISTEN_HOST", "0.0.0.0")],
    files: &[("cmd/jaeger/sampling-strategies.json", "/cmd/jaeger/sampling-strategies.json")],
};

/// Every image of `otel/`.
pub const IMAGES: [&Image; 2] = [&COLLECTOR, &JAEGER];

/// The first document of kind `kind` in `otel/<file>`.
fn manifest_doc(file: &str, kind: &str) -> Result<Value> {
    let path = paths::repo().join("otel").join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let doc = Value::deserialize(doc).with_context(|| format!("parse {}", path.display()))?;
        if doc["kind"].as_str() == Some(kind) {
            return Ok(doc);
        }
    }
    bail!("{} has no {kind}", path.display())
}

/// The configuration in `otel/<file>`'s ConfigMap (`data.config.yaml`).
fn manifest_config(file: &str) -> Result<String> {
    let configmap = manifest_doc(file, "ConfigMap")?;
    Ok(configmap["data"]["config.yaml"].as_str().with_context(|| format!("{file}: no config.yaml"))?.to_string())
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl Image {
    /// The tag of [`Image::reference`].
    pub fn tag(&self) -> &'static str {
        self.reference.rsplit_once(':').map_or("latest", |(_, tag)| tag)
    }

    /// The Containerfile; the build context holds the binary and the files by their file names.
    pub fn containerfile(&self) -> String {
        let mut out = String::from("FROM scratch\n");
        for (k, v) in self.env {
            out.push_str(&format!("ENV {k}={v}\n"));
        }
        out.push_str(&format!("COPY {} {}\n", self.binary, self.path));
        for (_, to) in self.files {
            out.push_str(&format!("COPY {} {to}\n", file_name(to)));
        }
        out.push_str(&format!("USER {}\nENTRYPOINT [\"{}\"]\n", self.user, self.path));
        out
    }

    /// The archive's file name for a binary known by `binary_id` (its build key, size and time).
    pub fn archive_name(&self, binary_id: &str) -> String {
        let mut content = self.containerfile().into_bytes();
        content.extend(binary_id.as_bytes());
        format!("{}{:08x}.tar", self.archive_prefix(), gobuild::fnv1a(&content) as u32)
    }

    fn archive_prefix(&self) -> String {
        format!("otel-{}-{}-", self.component, self.tag())
    }

    /// Builds the binary unless cached, then the archive unless cached; returns the archive.
    pub fn ensure_archive(&self) -> Result<PathBuf> {
        let component = gobuild::component(self.component)?;
        let binary = component.ensure()?.join(self.binary);
        let meta = std::fs::metadata(&binary).with_context(|| format!("{}", binary.display()))?;
        let mtime = meta.modified()?.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let key = component.bin_dir()?.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let cache = paths::cache().join("images");
        let archive = cache.join(self.archive_name(&format!("{key}/{} {} {mtime}", self.binary, meta.len())));
        if archive.is_file() {
            return Ok(archive);
        }
        let started = Instant::now();
        println!("    building the image {} from {}", self.reference, binary.display());
        crate::sh::ensure_tools(&[crate::sh::BUILDAH])?;
        let mut head = vec![0; 4096];
        let n = std::io::Read::read(&mut std::fs::File::open(&binary)?, &mut head)?;
        ensure!(super::operator::is_static_elf(&head[..n])?, "{} is dynamically linked", binary.display());
        let ctx = cache.join(format!("otel-{}-context", self.component));
        let _ = std::fs::remove_dir_all(&ctx);
        std::fs::create_dir_all(&ctx)?;
        self.validate(&binary, &ctx)?;
        std::fs::copy(&binary, ctx.join(self.binary))?;
        if !self.files.is_empty() {
            let source = component.source_dir()?;
            for (from, to) in self.files {
                std::fs::copy(source.join(from), ctx.join(file_name(to))).with_context(|| format!("copy {from}"))?;
            }
        }
        node::scratch_archive(&ctx, &self.containerfile(), self.reference, &archive)?;
        std::fs::remove_dir_all(&ctx)?;
        remove_stale(&cache, &self.archive_prefix(), &archive);
        println!(
            "    {} built in {:.1} s: {} ({:.1} MiB)",
            self.reference,
            started.elapsed().as_secs_f64(),
            archive.display(),
            std::fs::metadata(&archive)?.len() as f64 / (1024.0 * 1024.0)
        );
        Ok(archive)
    }
}

impl Image {
    /// `<binary> validate` on the manifest's configuration (written into `scratch`): every
    /// component it names is compiled in, and every setting is known.
    fn validate(&self, binary: &Path, scratch: &Path) -> Result<()> {
        let config = scratch.join(format!("{}.config.yaml", self.component));
        std::fs::write(&config, manifest_config(self.manifest)?)?;
        let out = Command::new(binary).arg("validate").arg(format!("--config={}", config.display())).output()?;
        if !out.status.success() {
            bail!(
                "{} does not accept the configuration of otel/{}: {}",
                binary.display(),
                self.manifest,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::remove_file(&config)?;
        Ok(())
    }
}

/// Removes the archives of earlier builds of the same image.
fn remove_stale(cache: &Path, prefix: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with(prefix) && name.ends_with(".tar") && path != keep {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The archives of both images, built when missing: (image reference, archive).
pub fn ensure_archives() -> Result<Vec<(&'static str, PathBuf)>> {
    IMAGES.iter().map(|image| Ok((image.reference, image.ensure_archive()?))).collect()
}

/// Builds both images when missing and imports them into the node's containerd, so that
/// `kubectl apply -k otel/` finds them there.
pub fn import() -> Result<()> {
    let bin_dir = gobuild::component("containerd")?.bin_dir()?;
    for (reference, archive) in ensure_archives()? {
        node::import(&bin_dir, &archive)?;
        println!("    imported {reference} into the node's containerd");
    }
    Ok(())
}

/// `cargo xtask otel-images`.
pub fn run(args: OtelImagesArgs) -> Result<()> {
    println!("==> the images of otel/");
    if args.import {
        return import();
    }
    for (reference, archive) in ensure_archives()? {
        println!("    {reference}: {}", archive.display());
    }
    Ok(())
}

#[derive(clap::Args, Clone, Debug)]
pub struct OtelImagesArgs {
    /// Also import them into the node's containerd (the local cluster must be up).
    #[arg(long)]
    pub import: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The collector release: core modules at v0.165.x, their stable modules at v1.71.x.
    const BETA: &str = "v0.165.";
    const STABLE: &str = "v1.71.";
    const CORE: &str = "go.opentelemetry.io/collector/";
    const CONTRIB: &str = "github.com/open-telemetry/opentelemetry-collector-contrib/";
    const KINDS: [(&str, &str); 4] = [
        ("receivers", "receiver"),
        ("processors", "processor"),
        ("exporters", "exporter"),
        ("extensions", "extension"),
    ];

    fn manifest() -> Value {
        let path = paths::components().join("otelcol/manifest.yaml");
        serde_yaml::from_str(&std::fs::read_to_string(path).expect("read")).expect("yaml")
    }

    fn doc(file: &str, kind: &str) -> Value {
        manifest_doc(file, kind).expect("manifest")
    }

    /// Every `gomod` line of the manifest: (module, version).
    fn modules(manifest: &Value) -> Vec<(String, String)> {
        let mut lines: Vec<&Value> = Vec::new();
        for section in ["receivers", "processors", "exporters", "extensions", "connectors", "providers", "converters"] {
            lines.extend(manifest[section].as_sequence().into_iter().flatten().map(|m| &m["gomod"]));
        }
        lines.push(&manifest["telemetry"]["gomod"]);
        lines
            .iter()
            .map(|v| {
                let (m, v) = v.as_str().expect("gomod").split_once(' ').expect("module version");
                (m.to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn every_collector_module_is_of_one_release() {
        let manifest = manifest();
        let modules = modules(&manifest);
        assert!(modules.len() >= 5, "{modules:?}");
        for (module, version) in &modules {
            let ok = if module.starts_with(CORE) {
                version.starts_with(BETA) || version.starts_with(STABLE)
            } else {
                module.starts_with(CONTRIB) && version.starts_with(BETA)
            };
            assert!(ok, "{module} {version} is not of the release {BETA}x / {STABLE}x");
        }
        let builder = gobuild::component("otelcol").expect("otelcol");
        assert!(builder.version().expect("pinned").starts_with(BETA), "the builder is of another release");
        assert!(matches!(builder.kind, gobuild::Kind::CollectorBuilder { .. }));
        assert_eq!(
            format!("v{}", manifest["dist"]["version"].as_str().expect("dist.version")),
            builder.version().unwrap()
        );
        assert_eq!(manifest["dist"]["name"].as_str(), Some(COLLECTOR.binary), "the binary is dist.name");
        assert_eq!(builder.binaries, [COLLECTOR.binary]);
    }

    #[test]
    fn the_collector_has_exactly_the_components_its_config_uses() {
        let config: Value =
            serde_yaml::from_str(&manifest_config(COLLECTOR.manifest).expect("config")).expect("config yaml");
        let mut used = BTreeSet::new();
        for (section, kind) in KINDS {
            for key in config[section].as_mapping().expect(section).keys() {
                // `type/name`; a type's module is named `<type without _><kind>` (memory_limiter:
                // memorylimiterprocessor, health_check: healthcheckextension), except otlp_grpc's.
                let ty = key.as_str().expect("key").split('/').next().unwrap_or_default();
                let module = match ty {
                    "otlp_grpc" => "otlp".to_string(),
                    ty => ty.replace('_', ""),
                };
                used.insert((section, format!("{module}{kind}")));
            }
        }
        let manifest = manifest();
        let mut built = BTreeSet::new();
        for (section, _) in KINDS {
            for m in manifest[section].as_sequence().into_iter().flatten() {
                let (module, _) = m["gomod"].as_str().expect("gomod").split_once(' ').expect("version");
                built.insert((section, module.rsplit('/').next().unwrap_or_default().to_string()));
            }
        }
        assert_eq!(used, built);
        assert!(manifest["connectors"].is_null(), "the config uses no connector");
        assert!(used.contains(&("extensions", "healthcheckextension".to_string())));
    }

    fn container_image(file: &str) -> String {
        let deployment = doc(file, "Deployment");
        deployment["spec"]["template"]["spec"]["containers"][0]["image"].as_str().expect("image").to_string()
    }

    #[test]
    fn the_manifests_name_the_images_built_here() {
        assert_eq!(container_image("collector.yaml"), COLLECTOR.reference);
        assert_eq!(container_image("jaeger.yaml"), JAEGER.reference);
        let version = manifest()["dist"]["version"].as_str().expect("dist.version").to_string();
        assert_eq!(COLLECTOR.tag(), version);
        // Jaeger v2.x.y is published as module version v1.(x+63).y.
        let module = gobuild::component("jaeger").expect("jaeger").version().expect("pinned");
        let mut v2 = JAEGER.tag().split('.').map(|n| n.parse::<u32>().expect("number"));
        let (major, minor, patch) = (v2.next(), v2.next().expect("minor"), v2.next().expect("patch"));
        assert_eq!(major, Some(2));
        assert_eq!(module, format!("v1.{}.{patch}", minor + 63), "jaeger.yaml's tag is not the release built");
    }

    #[test]
    fn images_are_laid_out_as_upstream() {
        assert_eq!(
            COLLECTOR.containerfile(),
            "FROM scratch\nCOPY otelcol /otelcol\nUSER 10001:10001\nENTRYPOINT [\"/otelcol\"]\n"
        );
        assert_eq!(
            JAEGER.containerfile(),
            "FROM scratch\nENV JAEGER_LISTEN_HOST=0.0.0.0\nCOPY jaeger /cmd/jaeger/jaeger-linux\n\
             COPY sampling-strategies.json /cmd/jaeger/sampling-strategies.json\nUSER 10001\n\
             ENTRYPOINT [\"/cmd/jaeger/jaeger-linux\"]\n"
        );
        // The manifests run them as the image's user, with the arguments after the entrypoint.
        for file in ["collector.yaml", "jaeger.yaml"] {
            let spec = &doc(file, "Deployment")["spec"]["template"]["spec"];
            assert_eq!(spec["securityContext"]["runAsUser"].as_u64(), Some(10001), "{file}");
            assert!(spec["containers"][0]["command"].is_null(), "{file} keeps the entrypoint");
        }
    }

    #[test]
    fn a_rebuilt_binary_or_a_new_layout_makes_a_new_archive() {
        let a = COLLECTOR.archive_name("otelcol-v0.165.0-0123abcd/otelcol 100 1");
        assert!(a.starts_with("otel-otelcol-0.165.0-") && a.ends_with(".tar"), "{a}");
        assert_eq!(a, COLLECTOR.archive_name("otelcol-v0.165.0-0123abcd/otelcol 100 1"), "stable");
        assert_ne!(a, COLLECTOR.archive_name("otelcol-v0.165.0-0123abcd/otelcol 100 2"), "rebuilt");
        assert_ne!(a, COLLECTOR.archive_name("otelcol-v0.165.0-4567cdef/otelcol 100 1"), "new pins");
        let jaeger = JAEGER.archive_name("otelcol-v0.165.0-0123abcd/otelcol 100 1");
        assert!(jaeger.starts_with("otel-jaeger-2.13.0-"), "{jaeger}");
    }
}
