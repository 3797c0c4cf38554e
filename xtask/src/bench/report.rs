//! The report of `cargo xtask bench`: one typed part per phase, written as `<out>/<N>.json` (the
//! field names are the JSON's, as earlier reports under `bench/` have them) and printed as a table.

use super::cache_cost::CacheBytes;
use chaos::report::{LeaseTimings, Stats, Summary};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// The whole report, in the order of the phases.
#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub operator_build: &'static str,
    pub myapps: usize,
    /// Phase 0 (not with `--quick`).
    pub failover: Option<Failover>,
    /// Phase 1.
    pub fresh: Fresh,
    pub rss_mib: Rss,
    pub cache_bytes_per_object: CacheBytes,
    /// The leader's CPU seconds per 1000 reconciles during the fresh phase.
    pub cpu_seconds_per_1000_reconciles: Option<f64>,
    /// Phase 1b (local control plane).
    pub relist: Option<Relist>,
    /// Phase 2 (not in the large profile).
    pub spec_change: Option<SpecChange>,
    /// Phase 3.
    #[serde(flatten)]
    pub webhooks: Webhooks,
    /// Phase 4: the new leader's pass over every unchanged MyApp.
    pub unchanged_resync: Resync,
    /// Phase 4b (local control plane).
    pub priority: Option<Priority>,
    /// Phases 4 and 5.
    pub acquire_to_first_reconcile_ms: FirstReconcile,
    /// Phase 5.
    pub cold_start_memory: Memory,
    /// Phase 6 (not with `--quick`, nor in the large profile).
    pub traces_on: Option<TracesOn>,
    /// Phase 7 (not in the large profile).
    pub ceiling: Option<Ceiling>,
}

/// `<out>/webhook-abuse.json`: the webhook server alone under abuse, and where it ran.
#[derive(Serialize)]
pub struct AbuseFile {
    pub machine: Machine,
    pub webhook_abuse: super::webhook::AbuseReport,
}

/// The machine the figures come from.
#[derive(Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub memory_gib: Option<f64>,
    pub kernel: String,
}

impl Machine {
    /// This machine, from `/proc`.
    pub fn here() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model,
            memory_gib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        }
    }
}

/// Failover through the chaos suite: the replicas' lease timings and each scenario's figures.
#[derive(Serialize)]
pub struct Failover {
    pub timings_s: LeaseTimings,
    pub summary: Vec<Summary>,
}

/// N fresh MyApps to Ready.
#[derive(Serialize)]
pub struct Fresh {
    /// Until every create was answered.
    pub requests_s: f64,
    pub all_ready_s: f64,
    /// How long the creates waited for the large profile's settled sample.
    pub settled_sample_pause_s: f64,
    pub myapps_per_s: f64,
    pub api: Option<Economy>,
    /// All Ready against the ceiling's time for the same writes.
    pub ratio_to_ceiling: Option<f64>,
}

/// Writes and reads by the operator's ServiceAccount in a phase (local control plane).
#[derive(Serialize)]
pub struct Economy {
    pub writes: usize,
    pub reads: usize,
    pub writes_per_myapp: f64,
    pub reads_per_myapp: f64,
    /// `verb resource[/subresource]` → writes.
    pub writes_by_kind: BTreeMap<String, usize>,
}

/// Every replica's resident memory in the fresh phase, MiB, in the order of `replicas`.
#[derive(Serialize)]
pub struct Rss {
    pub idle: Vec<f64>,
    pub loaded: Vec<f64>,
    pub peak: Vec<f64>,
    /// A row per 1000 MyApps created.
    pub by_myapps_created: Vec<RssAt>,
    /// Once every MyApp created so far was Ready: at half the count (large profile) and at the end.
    pub settled: Vec<RssAt>,
    pub replicas: Vec<String>,
    pub leader: String,
}

/// Every replica's RSS (MiB) at a number of MyApps; `None` for a replica that was gone.
#[derive(Serialize)]
pub struct RssAt {
    pub myapps: usize,
    pub rss_mib: Vec<Option<f64>>,
}

/// Every watch relisting at once: etcd compacted, the API server restarted.
#[derive(Serialize)]
pub struct Relist {
    pub etcd_compacted_at: u64,
    pub apiserver_restart_s: f64,
    pub rss_before_mib: Vec<Option<f64>>,
    pub peak_mib: Vec<Option<f64>>,
    pub rss_after_mib: Vec<Option<f64>>,
    pub settled_after_s: f64,
    pub replicas_relisted: BTreeSet<String>,
}

/// Every MyApp's image changed, until all are Ready at the new generation.
#[derive(Serialize)]
pub struct SpecChange {
    pub all_ready_s: f64,
    pub api: Option<Economy>,
}

/// The webhooks, in process and over TLS from this process.
#[derive(Serialize)]
pub struct Webhooks {
    pub webhook_in_process_us: InProcess,
    /// Local control plane only.
    pub webhook_tls_us: Option<Latency>,
    pub webhook_tls_rps_16_clients: Option<f64>,
}

/// `/validate` and `/mutate` answered in process, µs.
#[derive(Serialize)]
pub struct InProcess {
    pub validate_p50: f64,
    pub validate_p99: f64,
    pub mutate_p50: f64,
    pub mutate_p99: f64,
}

/// A latency's median and 99th percentile.
#[derive(Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// The writes of the new leader's pass over every unchanged MyApp.
#[derive(Serialize)]
pub struct Resync {
    pub api: Option<Economy>,
}

/// MyApps changed as a new leader starts its pass over all of them.
#[derive(Serialize)]
pub struct Priority {
    pub changes: usize,
    /// The changes whose Deployment apply was found in the audit log.
    pub applied: usize,
    pub pass_s: f64,
    /// Change → the operator's apply of that MyApp's Deployment.
    pub change_to_apply_ms: Option<Stats>,
}

/// A new leader's acquire (or start) → its first reconcile, ms.
#[derive(Serialize)]
pub struct FirstReconcile {
    pub warm_handover: f64,
    pub cold_process: f64,
    pub cold_start_to_first_reconcile: f64,
}

/// One process's resident memory and its peak, MiB.
#[derive(Serialize)]
pub struct Memory {
    pub rss_mib: Option<f64>,
    pub peak_mib: Option<f64>,
}

/// The fresh phase again with traces exported.
#[derive(Serialize)]
pub struct TracesOn {
    pub all_ready_s: f64,
    pub ratio_on_off: f64,
}

/// The same writes from a plain client.
#[derive(Serialize)]
pub struct Ceiling {
    pub writes: usize,
    pub seconds: f64,
}

/// A figure with one decimal, or `-`.
fn f(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.1}"))
}

/// Figures joined with ` / `.
fn each(v: &[Option<f64>]) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(" / ")
}

impl Report {
    /// The rows of the table: (measure, value), in the report's order.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            ("operator build".to_string(), self.operator_build.to_string()),
            ("MyApps".into(), self.myapps.to_string()),
            ("fresh: all Ready (s)".into(), f(Some(self.fresh.all_ready_s))),
            ("fresh: MyApps Ready per second".into(), f(Some(self.fresh.myapps_per_s))),
            ("ceiling: same writes from a plain client (s)".into(), f(self.ceiling.as_ref().map(|c| c.seconds))),
            ("fresh all Ready / ceiling".into(), f(self.fresh.ratio_to_ceiling)),
            ("spec change: all Ready (s)".into(), f(self.spec_change.as_ref().map(|s| s.all_ready_s))),
        ];
        let phases = [
            ("fresh", self.fresh.api.as_ref()),
            ("spec change", self.spec_change.as_ref().and_then(|s| s.api.as_ref())),
            ("unchanged resync", self.unchanged_resync.api.as_ref()),
        ];
        for (label, api) in phases {
            if let Some(a) = api {
                let v = format!("{:.2} / {:.2}", a.writes_per_myapp, a.reads_per_myapp);
                rows.push((format!("{label}: writes / reads per MyApp"), v));
            }
        }
        rows.extend(self.memory_rows());
        if let Some(p) = &self.priority {
            let ms = p.change_to_apply_ms.as_ref();
            let (p50, p99, max) = (ms.map(|s| s.p50), ms.map(|s| s.p99), ms.map(|s| s.max));
            rows.push(("priority: change -> apply p50 / p99 / max (ms)".into(), each(&[p50, p99, max])));
            rows.push(("priority: the new leader's pass over all (s)".into(), f(Some(p.pass_s))));
        }
        rows.extend(self.timing_rows());
        rows
    }

    /// RSS of each replica, the relist, and the heap bytes per cached object.
    fn memory_rows(&self) -> Vec<(String, String)> {
        let rss = &self.rss_mib;
        let mut rows = Vec::new();
        for (i, name) in rss.replicas.iter().enumerate() {
            let role = if *name == rss.leader { "leader" } else { "standby" };
            let at = |v: &[f64]| f(v.get(i).copied());
            let v = format!("{} -> {}, {}", at(&rss.idle), at(&rss.loaded), at(&rss.peak));
            rows.push((format!("RSS {name} ({role}) idle -> loaded, peak (MiB)"), v));
        }
        for at in &rss.settled {
            rows.push((format!("RSS of each replica, {} MyApps all Ready (MiB)", at.myapps), each(&at.rss_mib)));
        }
        if let Some(r) = &self.relist {
            let v = format!("{} -> {} -> {}", each(&r.rss_before_mib), each(&r.peak_mib), each(&r.rss_after_mib));
            rows.push(("relist at once: RSS before -> peak -> after (MiB)".into(), v));
        }
        for at in &rss.by_myapps_created {
            rows.push((format!("RSS of each replica at {} MyApps created (MiB)", at.myapps), each(&at.rss_mib)));
        }
        rows.extend(self.cache_bytes_per_object.rows());
        rows
    }

    /// CPU, first reconciles, the cold replica, traces and the webhooks, and the failover rounds.
    fn timing_rows(&self) -> Vec<(String, String)> {
        let a = &self.acquire_to_first_reconcile_ms;
        let cold = &self.cold_start_memory;
        let w = &self.webhooks.webhook_in_process_us;
        let mut rows = vec![
            ("leader CPU seconds per 1000 reconciles".to_string(), f(self.cpu_seconds_per_1000_reconciles)),
            ("acquire -> first reconcile, warm handover (ms)".into(), f(Some(a.warm_handover))),
            ("acquire -> first reconcile, fresh process (ms)".into(), f(Some(a.cold_process))),
            ("process start -> first reconcile, cold (ms)".into(), f(Some(a.cold_start_to_first_reconcile))),
            (
                "cold replica after its pass: RSS, peak (MiB)".into(),
                format!("{}, {}", f(cold.rss_mib), f(cold.peak_mib)),
            ),
        ];
        if let Some(t) = &self.traces_on {
            rows.push(("traces exported: all Ready (s)".into(), f(Some(t.all_ready_s))));
            rows.push(("traces on / off (all Ready time)".into(), format!("{:.2}", t.ratio_on_off)));
        }
        rows.push((
            "webhook /validate in process p50 / p99 (µs)".into(),
            each(&[Some(w.validate_p50), Some(w.validate_p99)]),
        ));
        rows.push((
            "webhook /mutate in process p50 / p99 (µs)".into(),
            each(&[Some(w.mutate_p50), Some(w.mutate_p99)]),
        ));
        if let Some(tls) = &self.webhooks.webhook_tls_us {
            rows.push(("webhook over TLS p50 / p99 (µs)".into(), each(&[Some(tls.p50), Some(tls.p99)])));
            rows.push(("webhook over TLS, 16 clients (req/s)".into(), f(self.webhooks.webhook_tls_rps_16_clients)));
        }
        for s in self.failover.iter().flat_map(|f| &f.summary) {
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.0}", s * 1000.0));
            let st = s.acquired.as_ref();
            let v = [st.map(|s| s.p50), st.map(|s| s.p99), st.map(|s| s.max)].map(ms).join(" / ");
            rows.push((format!("failover {}: fault -> acquired p50/p99/max (ms)", s.scenario), v));
        }
        rows
    }
}

/// Prints rows as the two-column table every bench report uses.
pub fn print_table(rows: &[(String, String)]) {
    println!("\n{:<52} {:>22}", "measure", "value");
    for (k, v) in rows {
        println!("{k:<52} {v:>22}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::cache_cost::{KindBytes, PerMyApp};

    fn report() -> Report {
        let kind =
            |n| KindBytes { objects: 10, as_sent: n, as_cached: n / 2.0, in_kube_store: None, in_store: n / 4.0 };
        let at = |myapps| RssAt { myapps, rss_mib: vec![Some(40.0), None] };
        Report {
            machine: Machine { cpus: 2, cpu_model: None, memory_gib: Some(24.0), kernel: "6".into() },
            operator_build: "debug",
            myapps: 10,
            failover: None,
            fresh: Fresh {
                requests_s: 1.0,
                all_ready_s: 2.0,
                settled_sample_pause_s: 0.0,
                myapps_per_s: 5.0,
                api: None,
                ratio_to_ceiling: Some(1.5),
            },
            rss_mib: Rss {
                idle: vec![20.0, 21.0],
                loaded: vec![30.0, 31.0],
                peak: vec![35.0],
                by_myapps_created: vec![at(1000)],
                settled: vec![at(10)],
                replicas: vec!["operator-0".into(), "operator-1".into()],
                leader: "operator-1".into(),
            },
            cache_bytes_per_object: CacheBytes {
                myapp: kind(800.0),
                deployment: kind(400.0),
                service: kind(200.0),
                per_myapp: PerMyApp { as_sent: 1400.0, as_cached: 700.0, in_kube_stores: 500.0, in_stores: 350.0 },
            },
            cpu_seconds_per_1000_reconciles: None,
            relist: None,
            spec_change: None,
            webhooks: Webhooks {
                webhook_in_process_us: InProcess {
                    validate_p50: 80.0,
                    validate_p99: 90.0,
                    mutate_p50: 70.0,
                    mutate_p99: 75.0,
                },
                webhook_tls_us: None,
                webhook_tls_rps_16_clients: None,
            },
            unchanged_resync: Resync { api: None },
            priority: None,
            acquire_to_first_reconcile_ms: FirstReconcile {
                warm_handover: 12.0,
                cold_process: 300.0,
                cold_start_to_first_reconcile: 900.0,
            },
            cold_start_memory: Memory { rss_mib: Some(25.0), peak_mib: None },
            traces_on: None,
            ceiling: None,
        }
    }

    #[test]
    fn the_json_keeps_the_field_names_of_the_earlier_reports() {
        let v = serde_json::to_value(report()).expect("json");
        // The webhook figures sit at the top level, as in the reports under bench/.
        assert_eq!(v["webhook_in_process_us"]["validate_p99"], 90.0);
        assert!(v.get("webhooks").is_none());
        assert_eq!(v["fresh"]["ratio_to_ceiling"], 1.5);
        assert_eq!(v["rss_mib"]["by_myapps_created"][0]["rss_mib"][1], serde_json::Value::Null);
        assert_eq!(v["cache_bytes_per_object"]["per_myapp"]["in_stores"], 350.0);
        assert_eq!(v["acquire_to_first_reconcile_ms"]["cold_process"], 300.0);
        assert!(v["ceiling"].is_null() && v["priority"].is_null());
    }

    #[test]
    fn the_table_names_each_replica_by_role_and_marks_missing_figures() {
        let rows = report().rows();
        let get = |k: &str| rows.iter().find(|(m, _)| m == k).map(|(_, v)| v.clone());
        assert_eq!(get("RSS operator-1 (leader) idle -> loaded, peak (MiB)").as_deref(), Some("21.0 -> 31.0, -"));
        assert_eq!(get("RSS operator-0 (standby) idle -> loaded, peak (MiB)").as_deref(), Some("20.0 -> 30.0, 35.0"));
        assert_eq!(get("ceiling: same writes from a plain client (s)").as_deref(), Some("-"));
        assert_eq!(get("RSS of each replica at 1000 MyApps created (MiB)").as_deref(), Some("40.0 / -"));
        assert_eq!(get("leader CPU seconds per 1000 reconciles").as_deref(), Some("-"));
        assert!(get("webhook over TLS p50 / p99 (µs)").is_none(), "no TLS figures, no row");
    }
}
