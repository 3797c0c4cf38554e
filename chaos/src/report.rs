//! The chaos report: JSON, a readable table, and an SVG timeline of who held the lease when, with
//! every operator write as a tick.

use crate::invariants::{Breach, Interval, Violation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One injected fault and what followed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fault {
    /// `kill`, `term`, `pause`, `partition` or `apiserver-restart`.
    pub scenario: String,
    /// Repetition number, from 1.
    pub round: u32,
    /// When the fault was injected (seconds since the epoch, local clock).
    pub at: f64,
    /// The leader hit by the fault.
    pub old_leader: Option<String>,
    /// The leader afterwards.
    pub new_leader: Option<String>,
    /// Fault → a leader (other than a faulted one, where that applies) holds the lease, seconds.
    pub acquired_after: Option<f64>,
    /// Fault → the new leader's first finished reconcile, seconds.
    pub first_reconcile_after: Option<f64>,
    /// Fault → every MyApp Ready at its generation with matching children, seconds.
    pub converged_after: Option<f64>,
    /// The longest time within the fault's window with no leader reconciling (a lease held by
    /// nobody, or held but not yet reconciling), seconds; measured where a fault hands over
    /// several times (a rollout).
    pub longest_gap: Option<f64>,
    /// What else the scenario observed (e.g. evictions the PodDisruptionBudget refused).
    pub detail: Option<String>,
}

impl Fault {
    /// A fault of `scenario`, round `round`, injected at `at` on the leader `old_leader`, before
    /// anything that follows is observed.
    pub fn new(scenario: impl Into<String>, round: u32, at: f64, old_leader: String) -> Self {
        Fault {
            scenario: scenario.into(),
            round,
            at,
            old_leader: Some(old_leader),
            new_leader: None,
            acquired_after: None,
            first_reconcile_after: None,
            converged_after: None,
            longest_gap: None,
            detail: None,
        }
    }
}

/// The replicas' lease timings, in seconds; written as `[duration, renew deadline, retry period]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(into = "[f64; 3]", from = "[f64; 3]")]
pub struct LeaseTimings {
    /// The lease duration.
    pub duration: f64,
    /// The renew deadline.
    pub renew_deadline: f64,
    /// The retry period.
    pub retry_period: f64,
}

impl From<[f64; 3]> for LeaseTimings {
    fn from([duration, renew_deadline, retry_period]: [f64; 3]) -> Self {
        LeaseTimings { duration, renew_deadline, retry_period }
    }
}

impl From<LeaseTimings> for [f64; 3] {
    fn from(t: LeaseTimings) -> Self {
        [t.duration, t.renew_deadline, t.retry_period]
    }
}

/// Distribution of one measurement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// Nearest-rank statistics; `None` without samples.
pub fn stats(samples: &[f64]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Stats { n: v.len(), p50: rank(0.5), p99: rank(0.99), max: v[v.len() - 1] })
}

/// Per-scenario figures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Fault → new leader acquired.
    pub acquired: Option<Stats>,
    /// Fault → first reconcile by the new leader.
    pub first_reconcile: Option<Stats>,
    /// Fault → converged.
    pub converged: Option<Stats>,
    /// Writes outside leadership during this scenario's rounds (either breach).
    pub writes_outside_leadership: usize,
    /// Of those, writes received in their writer's term and committed after a successor led
    /// (`None` in reports from before this was judged).
    #[serde(default)]
    pub committed_in_new_term: Option<usize>,
    /// Admission requests that failed because no webhook answered, during this scenario's rounds.
    pub failed_admissions: usize,
}

/// The whole report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// `smoke` or `full`.
    pub profile: String,
    /// The replicas' lease timings.
    pub timings: LeaseTimings,
    /// Operator replicas.
    pub replicas: usize,
    /// Per scenario.
    pub summary: Vec<Summary>,
    /// Every fault.
    pub faults: Vec<Fault>,
    /// Leadership intervals from the audit log.
    pub intervals: Vec<Interval>,
    /// Writes outside leadership (must be empty).
    pub violations: Vec<Violation>,
    /// Children left behind by deleted MyApps.
    pub orphans: Vec<String>,
    /// Operator writes seen in the audit log during the run.
    pub operator_writes: usize,
    /// Admission failures, when webhooks are installed.
    pub failed_admissions: Option<usize>,
}

/// Builds the per-scenario summary; `violations` and admission failures (their times) are
/// attributed to the fault they follow.
pub fn summarize(faults: &[Fault], violations: &[Violation], admission_failures: &[f64]) -> Vec<Summary> {
    let mut by: BTreeMap<&str, Vec<&Fault>> = BTreeMap::new();
    for f in faults {
        by.entry(f.scenario.as_str()).or_default().push(f);
    }
    by.into_iter()
        .map(|(scenario, fs)| {
            let pick = |g: fn(&Fault) -> Option<f64>| stats(&fs.iter().filter_map(|f| g(f)).collect::<Vec<_>>());
            let windows: Vec<(f64, f64)> = fs
                .iter()
                .map(|f| {
                    let next = faults.iter().map(|o| o.at).filter(|t| *t > f.at).fold(f64::INFINITY, f64::min);
                    (f.at, next)
                })
                .collect();
            let during = |v: &&Violation| windows.iter().any(|(a, b)| v.at >= *a && v.at < *b);
            Summary {
                scenario: scenario.to_string(),
                acquired: pick(|f| f.acquired_after),
                first_reconcile: pick(|f| f.first_reconcile_after),
                converged: pick(|f| f.converged_after),
                writes_outside_leadership: violations.iter().filter(during).count(),
                committed_in_new_term: Some(
                    violations.iter().filter(during).filter(|v| v.breach == Breach::CommittedInNewTerm).count(),
                ),
                failed_admissions: admission_failures
                    .iter()
                    .filter(|t| windows.iter().any(|(a, b)| **t >= *a && **t < *b))
                    .count(),
            }
        })
        .collect()
}

/// Writes committed after a successor led, or `not judged` in an older report.
fn late(s: &Summary) -> String {
    s.committed_in_new_term.map_or("not judged".into(), |n| n.to_string())
}

fn fmt_stats(s: &Option<Stats>) -> String {
    match s {
        Some(s) => format!("{:>6.0} {:>6.0} {:>6.0}", s.p50 * 1000.0, s.p99 * 1000.0, s.max * 1000.0),
        None => format!("{:>6} {:>6} {:>6}", "-", "-", "-"),
    }
}

/// A readable table (milliseconds).
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "chaos profile {} — {} replicas, lease {}s / renew {}s / retry {}s",
        r.profile, r.replicas, r.timings.duration, r.timings.renew_deadline, r.timings.retry_period
    );
    let _ = writeln!(
        out,
        "{:<18} {:>20}  {:>20}  {:>20}  {:>8} {:>6} {:>10}",
        "scenario", "acquired p50/p99/max", "1st reconcile (ms)", "converged (ms)", "outside", "late", "admission"
    );
    for s in &r.summary {
        let _ = writeln!(
            out,
            "{:<18} {:>20}  {:>20}  {:>20}  {:>8} {:>6} {:>10}",
            s.scenario,
            fmt_stats(&s.acquired),
            fmt_stats(&s.first_reconcile),
            fmt_stats(&s.converged),
            s.writes_outside_leadership,
            late(s),
            s.failed_admissions
        );
    }
    let _ = writeln!(
        out,
        "writes outside leadership: {} (of {} operator writes); orphaned children: {}; failed admissions: {}",
        r.violations.len(),
        r.operator_writes,
        r.orphans.len(),
        r.failed_admissions.map_or("n/a (no webhooks on this target)".to_string(), |n| n.to_string())
    );
    for f in &r.faults {
        if f.longest_gap.is_some() || f.detail.is_some() {
            let gap = f.longest_gap.map_or(String::new(), |g| format!("longest reconcile gap {:.0} ms; ", g * 1000.0));
            let _ = writeln!(out, "{} #{}: {gap}{}", f.scenario, f.round, f.detail.as_deref().unwrap_or(""));
        }
    }
    out
}

/// The per-scenario figures as a Markdown table, in seconds: what the README quotes from a
/// committed report, below a `<!-- chaos-report: results/<name>.json -->` line.
pub fn markdown(r: &Report) -> String {
    let s2 = |s: &Option<Stats>| match s {
        Some(s) => format!("{:.2} / {:.2} / {:.2}", s.p50, s.p99, s.max),
        None => "-".into(),
    };
    let mut out = String::from(
        "| scenario | rounds | fault → acquired, p50 / p99 / max (s) | fault → first reconcile (s) | writes outside leadership (committed late) | failed admissions |\n|---|---|---|---|---|---|\n",
    );
    for s in &r.summary {
        let rounds = r.faults.iter().filter(|f| f.scenario == s.scenario).count();
        let _ = writeln!(
            out,
            "| {} | {rounds} | {} | {} | {} ({}) | {} |",
            s.scenario,
            s2(&s.acquired),
            s2(&s.first_reconcile),
            s.writes_outside_leadership,
            late(s),
            s.failed_admissions
        );
    }
    out
}

/// Every report table in `readme`: the report it names (`results/<name>.json`, under `chaos/`) and
/// the table's lines as written.
pub fn quoted_reports(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = readme.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("<!-- chaos-report: ").and_then(|l| l.strip_suffix(" -->")) else {
            continue;
        };
        let mut table = String::new();
        while let Some(row) = lines.next_if(|l| l.starts_with('|')) {
            table.push_str(row);
            table.push('\n');
        }
        out.push((name.to_string(), table));
    }
    out
}

/// One replica's lane of the [`svg`] timeline at height `y`: its name, its leadership bars and
/// its writes (red when outside leadership); `x` maps a time to the horizontal axis.
fn lane_of(s: &mut String, r: &Report, writes: &[(String, f64)], rep: &str, y: f64, x: &dyn Fn(f64) -> f64) {
    let _ = writeln!(s, r#"<text x="10" y="{}">{rep}</text>"#, y + 16.0);
    for iv in r.intervals.iter().filter(|iv| iv.replica == rep) {
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{y}" width="{:.1}" height="20" fill="#9ecae1"/>"##,
            x(iv.start),
            (x(iv.end) - x(iv.start)).max(1.0)
        );
    }
    for (_, at) in writes.iter().filter(|(w, _)| w == rep) {
        let outside = r.violations.iter().any(|v| v.replica == rep && (v.at - at).abs() < 1e-6);
        let color = if outside { "#d62728" } else { "#08306b" };
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="{color}"/>"#,
            x(*at),
            y + 2.0,
            y + 18.0
        );
    }
}

/// An SVG timeline: a lane per replica, a bar per leadership interval, a tick per write (red when
/// outside leadership), a dashed line per fault.
pub fn svg(r: &Report, writes: &[(String, f64)]) -> String {
    let mut replicas: Vec<&str> = r.intervals.iter().map(|i| i.replica.as_str()).collect();
    replicas.extend(writes.iter().map(|(w, _)| w.as_str()));
    replicas.sort();
    replicas.dedup();
    let times: Vec<f64> = r
        .intervals
        .iter()
        .flat_map(|i| [i.start, i.end])
        .chain(writes.iter().map(|w| w.1))
        .chain(r.faults.iter().map(|f| f.at))
        .collect();
    let (t0, t1) =
        (times.iter().copied().fold(f64::INFINITY, f64::min), times.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    let (left, width, lane) = (200.0, 1000.0, 28.0);
    let span = if t1 > t0 { t1 - t0 } else { 1.0 };
    let x = |t: f64| left + (t - t0) / span * width;
    let height = 40.0 + lane * replicas.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="monospace" font-size="11">"#,
        left + width + 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="16">who held the lease ({}s run; bars: leadership, ticks: writes, red: outside leadership, dashed: faults)</text>"#,
        span.round()
    );
    for (i, rep) in replicas.iter().enumerate() {
        lane_of(&mut s, r, writes, rep, 30.0 + lane * i as f64, &x);
    }
    let bottom = 30.0 + lane * replicas.len() as f64;
    for f in &r.faults {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="24" y2="{bottom}" stroke="#ff7f0e" stroke-dasharray="4,3"/>"##,
            x(f.at)
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{}" fill="#ff7f0e">{}</text>"##,
            x(f.at) + 2.0,
            bottom + 14.0,
            f.scenario
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(scenario: &str, at: f64, acquired: f64) -> Fault {
        Fault {
            new_leader: Some("b".into()),
            acquired_after: Some(acquired),
            converged_after: Some(1.0),
            ..Fault::new(scenario, 1, at, "a".into())
        }
    }

    #[test]
    fn nearest_rank_stats() {
        assert_eq!(stats(&[]), None);
        let s = stats(&[3.0, 1.0, 2.0, 4.0]).expect("stats");
        assert_eq!((s.n, s.p50, s.p99, s.max), (4, 2.0, 4.0, 4.0));
    }

    #[test]
    fn violations_are_attributed_to_the_fault_they_follow() {
        let faults = vec![fault("kill", 10.0, 4.0), fault("term", 20.0, 0.1)];
        let v = |at: f64, breach| Violation { replica: "a".into(), at, committed: at + 1.0, breach, what: "x".into() };
        let v =
            vec![v(25.0, Breach::Outside), v(26.0, Breach::CommittedInNewTerm), v(12.0, Breach::CommittedInNewTerm)];
        let s = summarize(&faults, &v, &[21.0, 22.0, 5.0]);
        let by: BTreeMap<_, _> = s.iter().map(|s| (s.scenario.as_str(), s.writes_outside_leadership)).collect();
        assert_eq!(by["kill"], 1);
        assert_eq!(by["term"], 2);
        let late: BTreeMap<_, _> = s.iter().map(|s| (s.scenario.as_str(), s.committed_in_new_term)).collect();
        assert_eq!((late["kill"], late["term"]), (Some(1), Some(1)));
        let adm: BTreeMap<_, _> = s.iter().map(|s| (s.scenario.as_str(), s.failed_admissions)).collect();
        assert_eq!((adm["kill"], adm["term"]), (0, 2), "before the first fault counts for none");
    }

    #[test]
    fn the_readme_quotes_the_committed_reports_as_they_are() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(dir.join("../README.md")).expect("README.md");
        let quoted = quoted_reports(&readme);
        assert!(!quoted.is_empty(), "the README's chaos section quotes no report");
        for (name, table) in quoted {
            let json = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let report: Report = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(table, markdown(&report), "the README's table of {name} is not what the run measured");
        }
    }

    #[test]
    fn quoted_tables_are_found_and_a_changed_figure_shows() {
        let faults = vec![fault("kill", 10.0, 4.0), fault("kill", 20.0, 3.0)];
        let r = Report {
            profile: "x".into(),
            timings: LeaseTimings { duration: 4.0, renew_deadline: 3.0, retry_period: 0.5 },
            replicas: 3,
            summary: summarize(&faults, &[], &[]),
            faults,
            intervals: vec![],
            violations: vec![],
            orphans: vec![],
            operator_writes: 0,
            failed_admissions: Some(0),
        };
        let table = markdown(&r);
        assert!(table.contains("| kill | 2 | 3.00 / 4.00 / 4.00 |"), "{table}");
        let readme = format!("text\n<!-- chaos-report: results/x.json -->\n{table}\nmore | text\n");
        assert_eq!(quoted_reports(&readme), vec![("results/x.json".to_string(), table.clone())]);
        let edited = readme.replace("3.00 / 4.00", "2.00 / 4.00");
        assert_ne!(quoted_reports(&edited)[0].1, table);
        let back: Report = serde_json::from_value(serde_json::to_value(&r).expect("json")).expect("read back");
        assert_eq!(markdown(&back), table);
    }

    #[test]
    fn renders_table_and_svg() {
        let faults = vec![fault("kill", 10.0, 4.0)];
        let r = Report {
            profile: "smoke".into(),
            timings: LeaseTimings { duration: 4.0, renew_deadline: 3.0, retry_period: 0.5 },
            replicas: 3,
            summary: summarize(&faults, &[], &[]),
            faults,
            intervals: vec![Interval { replica: "a".into(), start: 0.0, end: 10.0 }],
            violations: vec![],
            orphans: vec![],
            operator_writes: 1,
            failed_admissions: None,
        };
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["timings"], serde_json::json!([4.0, 3.0, 0.5]), "the report's JSON keeps its shape");
        let t = table(&r);
        assert!(t.contains("kill") && t.contains("4000"), "{t}");
        let svg = svg(&r, &[("a".into(), 5.0)]);
        assert!(svg.starts_with("<svg") && svg.contains("<rect") && svg.contains("kill"));
    }
}
