//! Where things live: the repository, the build cache (outside the work tree, shared by every
//! checkout on the machine), and the run directory of the local control plane.

use std::path::PathBuf;

/// The repository root (the parent of `xtask/`).
pub fn repo() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The build cache: `$MYAPP_CACHE_DIR`, else `$XDG_CACHE_HOME/myapp-operator`, else
/// `~/.cache/myapp-operator`. Built control-plane binaries live here, keyed by component, version
/// and a hash of the wrapper module, so every clone on the machine reuses them.
pub fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("MYAPP_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("myapp-operator");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("myapp-operator"),
        None => repo().join(".cache"),
    }
}

/// The run directory of the local control plane (gitignored): PKI, configs, data, logs, pids.
pub fn run_dir() -> PathBuf {
    match std::env::var_os("MYAPP_RUN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => repo().join(".run"),
    }
}

/// The local control plane's audit log (every request, as `cluster.rs` configures it).
pub fn audit_log() -> PathBuf {
    run_dir().join("logs/audit.log")
}

/// The admin kubeconfig of the local control plane, at a stable path.
pub fn kubeconfig() -> PathBuf {
    run_dir().join("kubeconfig")
}

/// Wrapper Go modules of the control-plane components.
pub fn components() -> PathBuf {
    repo().join("cluster").join("components")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else `target/` in the repository.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"))
}
