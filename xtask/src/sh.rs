//! Processes, for every command: those of the local control plane, started in their own process
//! group with their output in a log file, recorded by pid, and stopped by that pid (after checking
//! that the pid still runs the binary we started), so `down` stops exactly what `up` started;
//! commands run to completion (`cargo`, `run`, `apt_install`); and what a running process shows
//! (its metrics endpoint, its memory and CPU from `/proc`), with the percentiles the reports give.

use crate::paths;
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
// task runner calls them through here.
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

/// Runs a command to completion and returns what it printed (trimmed); fails with its
/// description, its exit status and everything it printed when it fails.
pub fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("start {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let said = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        bail!("{what} failed ({}): {}", out.status, said.trim());
    }
    Ok(stdout.trim().to_string())
}

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Installs (apt-get) the Debian package of each (tool, package) whose tool is not on PATH.
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools.iter().filter(|(tool, _)| !have(tool)).map(|(_, package)| *package).collect();
    apt_install(&missing)
}

/// buildah and its Debian package: the operator's image, the node's pause image and the trace
/// pipeline's images are built with it.
pub const BUILDAH: (&str, &str) = ("buildah", "buildah");

/// The cargo of this invocation.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(paths::repo());
    c
}

/// Runs a command, failing with its description when it fails.
pub fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// A counter or sum of a replica's metrics.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").ok()?;
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident memory of a process, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS:")
}

/// Peak resident memory of a process (`VmHWM`), MiB.
pub fn peak_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmHWM:")
}

/// A field of `/proc/<pid>/status` given in kB, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(kib / 1024.0)
}

/// User plus system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: field 3 (state) is index 0, so utime (14) and stime (15) are 11, 12.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    Some(ticks / hz)
}

/// Resets the peak resident memory (`VmHWM`) of a process to its current RSS.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The 50th and 99th percentiles of `v` (nearest rank), 0 when it is empty.
pub fn percentiles(v: &[f64]) -> (f64, f64) {
    chaos::report::stats(v).map_or((0.0, 0.0), |s| (s.p50, s.p99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_trimmed_and_a_failure_says_what_the_command_printed() {
        let ok = output(Command::new("sh").args(["-c", "echo ' id '"]), "echo").expect("runs");
        assert_eq!(ok, "id");
        let err = output(Command::new("sh").args(["-c", "echo partial; echo broken >&2; exit 3"]), "the step")
            .expect_err("fails")
            .to_string();
        assert!(err.starts_with("the step failed (exit status: 3)"), "{err}");
        assert!(err.contains("partial") && err.contains("broken"), "{err}");
    }

    #[test]
    fn percentiles_are_nearest_rank_and_zero_without_samples() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentiles(&v), (50.0, 99.0));
        assert_eq!(percentiles(&[]), (0.0, 0.0));
    }
}
