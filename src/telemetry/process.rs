//! The process metrics, read at scrape time from `/proc` and the cgroup filesystem: resident
//! memory, CPU time, start time, and the memory limit of the container when there is one.
//!
//! # Cost
//!
//! A scrape reads three small files (`/proc/self/stat`, `/proc/self/status` and the cgroup's
//! memory limit), a few microseconds; nothing runs between scrapes. The probe server bounds how
//! many scrapes can run at once (`crate::probes::MAX_CONNECTIONS`).
//!
//! # Caveats
//!
//! Linux only: elsewhere the files are missing and only `process_start_time_seconds` is
//! exported. CPU time is counted in the kernel's `USER_HZ` ticks, which Linux fixes at 100 for
//! user space on every architecture the operator is built for (as the Go client assumes too).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::time::{SystemTime, UNIX_EPOCH};

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat` (`USER_HZ`).
pub const USER_HZ: f64 = 100.0;

/// The name of the memory-limit gauge, exported only when the cgroup has a limit.
pub const MEMORY_LIMIT: &str = "myapp_operator_memory_limit_bytes";

/// The cgroup v2 memory limit of this process's cgroup (as a container sees it).
pub const CGROUP_V2_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";
/// The cgroup v1 memory limit.
pub const CGROUP_V1_MEMORY_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";

/// A cgroup v1 limit at or above this is "no limit" (the kernel reports `PAGE_COUNTER_MAX` pages
/// in bytes, about 2^63 rounded down to a page).
const V1_UNLIMITED: u64 = 1 << 62;

/// The user and system CPU time of a process, in seconds, from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may hold spaces and parentheses itself, so
/// the fields are counted from the last `)`.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state (3), ppid (4), ... utime (14), stime (15).
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The resident set size in bytes, from the text of `/proc/<pid>/status` (`VmRSS`, in kB).
pub fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let kb: u64 = parts.next()?.parse().ok()?;
    (parts.next() == Some("kB")).then_some(kb * 1024)
}

/// The memory limit in bytes from the text of a cgroup v2 `memory.max` (`max` is none).
pub fn v2_limit(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => None,
        n => n.parse().ok(),
    }
}

/// The memory limit in bytes from the text of a cgroup v1 `memory.limit_in_bytes`: a value near
/// 2^63 means none.
pub fn v1_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|n| *n < V1_UNLIMITED)
}

/// The memory limit of this process's container, if its cgroup has one.
pub fn memory_limit() -> Option<u64> {
    match std::fs::read_to_string(CGROUP_V2_MEMORY_MAX) {
        Ok(text) => v2_limit(&text),
        Err(_) => std::fs::read_to_string(CGROUP_V1_MEMORY_LIMIT).ok().as_deref().and_then(v1_limit),
    }
}

/// Encodes the process metrics on every scrape (see the [module documentation](self)).
#[derive(Debug)]
pub struct ProcessCollector {
    /// When this collector was made, at the start of the process: unix seconds.
    start: f64,
}

impl ProcessCollector {
    /// A collector whose `process_start_time_seconds` is now.
    pub fn new() -> Self {
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
        Self { start }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since the unix epoch",
            self.start,
        )?;
        if let Some(cpu) = std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(cpu_seconds) {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        if let Some(rss) = std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(resident_bytes) {
            gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory size in bytes", rss as f64)?;
        }
        if let Some(limit) = memory_limit() {
            gauge(
                &mut encoder,
                MEMORY_LIMIT,
                "The memory limit of the operator's container (its cgroup), in bytes",
                limit as f64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_counted_from_after_the_command_name() {
        // A command name with a space and a parenthesis, which would shift a naive split.
        let stat = "4242 (my (app) x) S 1 4242 4242 0 -1 4194560 1539 0 0 0 250 75 0 0 20 0 9 0 1234 5 6";
        assert_eq!(cpu_seconds(stat), Some(3.25));
        assert_eq!(cpu_seconds("4242 (cut short) S 1 2"), None);
        assert_eq!(cpu_seconds("no name at all"), None);
    }

    #[test]
    fn resident_memory_is_read_in_kilobytes() {
        let status = "Name:\tmyapp-operator\nVmPeak:\t  99999 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        assert_eq!(resident_bytes(status), Some(10 * 1024 * 1024));
        assert_eq!(resident_bytes("VmRSS:\t10240 MB\n"), None);
        assert_eq!(resident_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn an_unlimited_cgroup_has_no_limit() {
        assert_eq!(v2_limit("134217728\n"), Some(128 * 1024 * 1024));
        assert_eq!(v2_limit("max\n"), None);
        assert_eq!(v1_limit("134217728\n"), Some(128 * 1024 * 1024));
        assert_eq!(v1_limit("9223372036854771712\n"), None);
        assert_eq!(v1_limit("garbage"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_its_own_memory_and_cpu() {
        let read = || cpu_seconds(&std::fs::read_to_string("/proc/self/stat").expect("stat")).expect("cpu");
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        // Spin until the count grows by a tick (10 ms), within a bound a loaded machine meets.
        let (before, spun) = (read(), std::time::Instant::now());
        let mut x = 0u64;
        while read() <= before && spun.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        assert!(read() > before, "CPU time did not grow over 10 s of spinning (from {before})");
        let rss = resident_bytes(&status).expect("rss");
        assert!(rss > 1024 * 1024, "a test process holds more than 1 MiB: {rss}");
    }
}
