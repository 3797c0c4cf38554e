//! Processes of the local control plane: started in their own process group with their output in
//! a log file, recorded by pid, and stopped by that pid (after checking that the pid still runs
//! the binary we started), so `down` stops exactly what `up` started.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A started (or recorded) process.
pub struct Proc {
    /// Component name, also the stem of its log and pid files.
    pub name: String,
    /// Process id.
    pub pid: u32,
}

fn pid_file(run: &Path, name: &str) -> PathBuf {
    run.join("pids").join(format!("{name}.pid"))
}

/// The log file of a component.
pub fn log_file(run: &Path, name: &str) -> PathBuf {
    run.join("logs").join(format!("{name}.log"))
}

/// Starts `bin args` as component `name`, detached from our terminal, logging to its log file.
pub fn spawn(run: &Path, name: &str, bin: &Path, args: &[String], envs: &[(&str, String)]) -> Result<Proc> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(run.join("logs"))?;
    std::fs::create_dir_all(run.join("pids"))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_file(run, name))?;
    let child = Command::new(bin)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {name} ({})", bin.display()))?;
    let pid = child.id();
    std::fs::write(pid_file(run, name), format!("{pid}\n{}\n", bin.display()))?;
    // Not waited on here: `down` and the liveness checks go through /proc and the pid file.
    drop(child);
    Ok(Proc { name: name.to_string(), pid })
}

/// True when `pid` is alive and runs `bin` (guards against pid reuse). Zombies count as dead.
pub fn runs(pid: u32, bin: Option<&str>) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if stat.is_empty() || state == Some("Z") || state == Some("X") {
        return false;
    }
    match bin {
        None => true,
        Some(bin) => std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|exe| exe.to_string_lossy().trim_end_matches(" (deleted)") == bin)
            .unwrap_or(false),
    }
}

/// Processes recorded in the run directory: (name, pid, binary).
pub fn recorded(run: &Path) -> Vec<(String, u32, String)> {
    let Ok(entries) = std::fs::read_dir(run.join("pids")) else {
        return vec![];
    };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.path().file_stem()?.to_string_lossy().to_string();
            let content = std::fs::read_to_string(e.path()).ok()?;
            let mut lines = content.lines();
            let pid = lines.next()?.trim().parse().ok()?;
            let bin = lines.next().unwrap_or_default().to_string();
            Some((name, pid, bin))
        })
        .collect();
    out.sort();
    out
}

/// Whether the process recorded as `name` in `run` is alive.
pub fn running(run: &Path, name: &str) -> bool {
    recorded(run).iter().any(|(n, pid, bin)| n == name && runs(*pid, Some(bin)))
}

/// Sends `sig` (e.g. `TERM`, `KILL`, `STOP`, `CONT`) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).stderr(Stdio::null()).status();
}

/// Stops a recorded process: SIGTERM, then SIGKILL after `grace`. Removes its pid file.
pub fn stop(run: &Path, name: &str, pid: u32, bin: &str, grace: Duration) {
    if runs(pid, Some(bin)) {
        signal(pid, "TERM");
        let deadline = Instant::now() + grace;
        while runs(pid, Some(bin)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if runs(pid, Some(bin)) {
            signal(pid, "KILL");
            let deadline = Instant::now() + Duration::from_secs(5);
            while runs(pid, Some(bin)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = std::fs::remove_file(pid_file(run, name));
}

/// The last `n` lines of a component's log.
pub fn tail(run: &Path, name: &str, n: usize) -> String {
    let content = std::fs::read_to_string(log_file(run, name)).unwrap_or_default();
    let lines: Vec<&str> = content.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails with the log tail if `proc` has exited.
pub fn check_alive(run: &Path, proc: &Proc) -> Result<()> {
    if !runs(proc.pid, None) {
        bail!(
            "{} exited during start-up; last lines of {}:\n{}",
            proc.name,
            log_file(run, &proc.name).display(),
            tail(run, &proc.name, 30)
        );
    }
    Ok(())
}

/// True when something listens on 127.0.0.1:`port`.
pub fn port_in_use(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

// Plain HTTP on loopback and the poll loop live in the `chaos` crate, shared with `tests/`; the
// names here are kept for `bench.rs` and `soak.rs`, which still call them through `procs`.
pub use chaos::plain_http::get as http_get;
pub use chaos::wait::poll;

/// Installs Debian packages with apt-get (as root); nothing when `packages` is empty.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let packages = packages.join(" ");
    println!("    installing {packages} (apt-get)");
    let status = Command::new("sh")
        .args([
            "-c",
            &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {packages}"),
        ])
        .status()
        .context("run apt-get")?;
    if !status.success() {
        bail!("apt-get install {packages} failed ({status}); install them yourself (as root)");
    }
    Ok(())
}
