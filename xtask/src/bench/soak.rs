//! `cargo xtask bench --soak`: steady churn over many MyApps for a long time, to show that memory
//! does not creep and that every change converges. Not part of CI (it takes half an hour).
//!
//! Three replicas run as the operator's ServiceAccount. `--count` MyApps (default 2,000, 0
//! replicas) are created first, and the churn starts once all are Ready; then, every second, one of each: a create, a delete, a scale and an
//! image change, on MyApps chosen in turn. Every 30 s each replica's RSS, the leader's queue depth
//! and the reconcile error rate since the last sample are recorded. After the churn, every MyApp
//! must be Ready at its generation and the deleted ones gone.
//!
//! It passes when, for every replica, the mean RSS of the last 5 minutes is at most 5 % above that
//! of the first 5 minutes, and everything converged. Writes `<out>/soak.json` and
//! `<out>/soak-rss.svg`.

use crate::bench::plot::{Series, line_chart};
use crate::operator::{self, Replica};
use crate::sh::{metric, rss_mib};
use crate::{cluster, paths, sh};
use anyhow::{Result, bail};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use myapp_operator::api::MyApp;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How often the soak samples.
const SAMPLE: Duration = Duration::from_secs(30);

/// The window compared at the start and at the end.
const WINDOW_S: f64 = 300.0;

/// The largest RSS growth between the first and the last window that passes.
const MAX_GROWTH: f64 = 0.05;

fn myapp(i: usize, replicas: i32) -> Result<MyApp> {
    Ok(chaos::fixtures::nginx(&format!("soak-{i:05}"), replicas)?)
}

/// The reconcile error count and total, from a replica's metrics.
fn reconcile_counts(port: u16) -> (f64, f64) {
    let ok = metric(port, "myapp_operator_reconciles_total{result=\"ok\"}").unwrap_or(0.0);
    let all = metric(port, "myapp_operator_reconcile_duration_seconds_count").unwrap_or(0.0);
    ((all - ok).max(0.0), all)
}

/// One churn step, `step` of the run: a create, a delete, a scale and an image change.
async fn churn(api: &Api<MyApp>, live: &mut BTreeSet<usize>, next: &mut usize, step: usize) -> Result<()> {
    api.create(&PostParams::default(), &myapp(*next, 0)?).await?;
    live.insert(*next);
    *next += 1;
    if let Some(&victim) = live.iter().next() {
        api.delete(&format!("soak-{victim:05}"), &DeleteParams::default()).await?;
        live.remove(&victim);
    }
    let pick = |k: usize| live.iter().nth((step * 7919 + k) % live.len().max(1)).copied();
    if let Some(i) = pick(1) {
        let replicas = (step % 3) as i32;
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        api.patch(&format!("soak-{i:05}"), &PatchParams::default(), &patch).await?;
    }
    if let Some(i) = pick(2) {
        let patch = Patch::Merge(json!({"spec": {"image": format!("nginx:1.{}", 20 + step % 9)}}));
        api.patch(&format!("soak-{i:05}"), &PatchParams::default(), &patch).await?;
    }
    Ok(())
}

/// Some when the MyApps are exactly those of `live`, each Ready at its generation.
async fn settled(api: &Api<MyApp>, live: &BTreeSet<usize>) -> Option<()> {
    let list = api.list(&ListParams::default()).await.ok()?;
    let names: BTreeSet<String> = list.items.iter().filter_map(|a| a.metadata.name.clone()).collect();
    let expected: BTreeSet<String> = live.iter().map(|i| format!("soak-{i:05}")).collect();
    (names == expected && list.items.iter().all(MyApp::ready_at_generation)).then_some(())
}

fn mean_between(points: &[(f64, f64)], from: f64, to: f64) -> Option<f64> {
    let xs: Vec<f64> = points.iter().filter(|(t, _)| *t >= from && *t <= to).map(|(_, v)| *v).collect();
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Runs the soak with `n` MyApps for `minutes`, writing its report under `out`.
pub async fn soak(target: &operator::Target, bin: &std::path::Path, n: usize, minutes: u64, out: &str) -> Result<()> {
    let client = cluster::client_from(&target.kubeconfig).await?;
    let replicas = start(&client, target, bin).await?;
    let ns = format!("soak-{}", std::process::id());
    operator::create_namespace(&client, &ns).await?;
    let api: Api<MyApp> = Api::namespaced(client.clone(), &ns);

    println!("==> soak: {n} MyApps in {ns}");
    create_all(&api, n).await?;
    let mut live: BTreeSet<usize> = (0..n).collect();
    let mut next = n;
    // The soak measures steady churn: the first window must not hold the initial settling (every
    // MyApp's first status, the children entering the caches), which grew RSS by a fifth.
    println!("==> waiting for all {n} to be Ready before the churn starts");
    sh::poll("every MyApp Ready", Duration::from_secs(900), Duration::from_secs(1), || settled(&api, &live)).await?;

    let clock = Instant::now();
    let churned = churn_for(&api, &replicas, &mut live, &mut next, minutes).await;
    let (churn_s, step, failed_steps, rss) = (churned.seconds, churned.steps, churned.failed, churned.rss);

    println!("==> waiting for every change to converge");
    let converged = sh::poll("every MyApp Ready, the deleted ones gone", Duration::from_secs(600), SAMPLE / 30, || {
        settled(&api, &live)
    })
    .await;
    let converged_s = clock.elapsed().as_secs_f64() - churn_s;

    let growth = growth(&rss, churn_s);
    let flat = growth.iter().all(|g| g.is_some_and(|g| g <= MAX_GROWTH));
    let passed = flat && converged.is_ok() && failed_steps == 0;
    let report = SoakReport {
        myapps: n,
        minutes,
        churn_steps: step,
        failed_steps,
        replicas: replicas.iter().map(|r| r.name.clone()).collect(),
        rss_growth_first_to_last_5_min: growth.clone(),
        max_growth: MAX_GROWTH,
        converged: converged.is_ok(),
        converged_after_churn_s: converged_s,
        samples: churned.samples,
        passed,
    };
    let dir = paths::repo().join(out);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&report)?)?;
    plot(&dir, &replicas, &rss)?;

    report.print();
    println!("    report: {}", dir.join("soak.json").display());
    clean_up(&client, &ns).await;
    if !passed {
        bail!(
            "the soak failed: RSS growth {growth:?} (at most {MAX_GROWTH}), converged {}, failed steps {failed_steps}",
            converged.is_ok()
        );
    }
    Ok(())
}

/// Three replicas of `bin` under the operator's ServiceAccount on `target`, ready.
async fn start(client: &kube::Client, target: &operator::Target, bin: &std::path::Path) -> Result<Vec<Replica>> {
    let sa_kubeconfig = operator::prepare(client, target).await?;
    operator::stop_replicas();
    let env = vec![("RUST_LOG", "info".to_string())];
    let replicas = operator::start_replicas(bin, &sa_kubeconfig, 3, &[], &env)?;
    operator::wait_ready(&replicas).await?;
    Ok(replicas)
}

/// Each replica's mean RSS over the last [`WINDOW_S`] of the churn against the first, less 1.
fn growth(rss: &[Vec<(f64, f64)>], churn_s: f64) -> Vec<Option<f64>> {
    let of = |points: &[(f64, f64)]| {
        let first = mean_between(points, 0.0, WINDOW_S)?;
        let last = mean_between(points, churn_s - WINDOW_S, churn_s)?;
        Some(last / first - 1.0)
    };
    rss.iter().map(|points| of(points)).collect()
}

impl SoakReport {
    fn print(&self) {
        for (name, g) in self.replicas.iter().zip(&self.rss_growth_first_to_last_5_min) {
            let g = g.map_or("-".into(), |g| format!("{:+.1} %", g * 100.0));
            println!("    {name}: RSS first 5 min -> last 5 min: {g}");
        }
        println!("    converged {:.0} s after the churn: {}", self.converged_after_churn_s, self.converged);
    }
}

/// Deletes the soak's namespace, waits up to 5 minutes for it to go, and stops the replicas.
async fn clean_up(client: &kube::Client, ns: &str) {
    println!("==> cleaning up");
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    let gone = || async { matches!(namespaces.get_opt(ns).await, Ok(None)).then_some(()) };
    let _ = sh::poll("the soak namespace gone", Duration::from_secs(300), Duration::from_secs(1), gone).await;
    operator::stop_replicas();
}

/// Creates MyApps `0..n`, 16 at a time.
async fn create_all(api: &Api<MyApp>, n: usize) -> Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        futures::future::try_join_all(chunk.iter().map(|&i| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &myapp(i, 0)?).await.map_err(anyhow::Error::from) }
        }))
        .await?;
    }
    Ok(())
}

/// `<out>/soak.json`.
#[derive(Serialize)]
struct SoakReport {
    myapps: usize,
    minutes: u64,
    churn_steps: usize,
    failed_steps: usize,
    replicas: Vec<String>,
    /// Each replica's mean RSS over the last 5 minutes against the first 5, less 1.
    rss_growth_first_to_last_5_min: Vec<Option<f64>>,
    max_growth: f64,
    converged: bool,
    converged_after_churn_s: f64,
    samples: Vec<Sample>,
    passed: bool,
}

/// One sample of the churn.
#[derive(Serialize)]
struct Sample {
    t_s: f64,
    /// Each replica's RSS, MiB.
    rss_mib: Vec<Option<f64>>,
    /// The replicas' queue depths, summed.
    queue_depth: f64,
    /// Reconciles since the last sample, all replicas.
    reconciles: f64,
    /// Of those, the share that failed.
    error_rate: f64,
}

/// What [`churn_for`] saw.
struct Churned {
    /// A sample every [`SAMPLE`].
    samples: Vec<Sample>,
    /// Each replica's (seconds, RSS MiB).
    rss: Vec<Vec<(f64, f64)>>,
    steps: usize,
    failed: usize,
    /// How long the churn ran.
    seconds: f64,
}

/// Churns for `minutes`: a step ([`churn`]) every second, a [`sample`] every [`SAMPLE`].
async fn churn_for(
    api: &Api<MyApp>,
    replicas: &[Replica],
    live: &mut BTreeSet<usize>,
    next: &mut usize,
    minutes: u64,
) -> Churned {
    println!("==> churn for {minutes} minutes: a create, a delete, a scale and an image change every second");
    let clock = Instant::now();
    let end = Duration::from_secs(minutes * 60);
    let mut c =
        Churned { samples: Vec::new(), rss: vec![Vec::new(); replicas.len()], steps: 0, failed: 0, seconds: 0.0 };
    let mut last_counts: Vec<(f64, f64)> = replicas.iter().map(|r| reconcile_counts(r.probe_port)).collect();
    let mut next_sample = Duration::ZERO;
    while clock.elapsed() < end {
        if clock.elapsed() >= next_sample {
            let t = clock.elapsed().as_secs_f64();
            let sample = sample(replicas, &mut last_counts, t);
            for (points, v) in c.rss.iter_mut().zip(&sample.rss_mib) {
                if let Some(v) = v {
                    points.push((t, *v));
                }
            }
            println!("    {t:>6.0} s  {}", serde_json::to_string(&sample).unwrap_or_default());
            c.samples.push(sample);
            next_sample += SAMPLE;
        }
        if let Err(e) = churn(api, live, next, c.steps).await {
            c.failed += 1;
            println!("    churn step {} failed: {e:#}", c.steps);
        }
        c.steps += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    c.seconds = clock.elapsed().as_secs_f64();
    c
}

/// `soak-rss.svg` in `dir`: each replica's RSS over the churn.
fn plot(dir: &std::path::Path, replicas: &[Replica], rss: &[Vec<(f64, f64)>]) -> Result<()> {
    let colours = ["#1f77b4", "#ff7f0e", "#2ca02c"];
    let series: Vec<Series<'_>> = replicas
        .iter()
        .zip(rss)
        .zip(colours)
        .map(|((r, points), colour)| Series { name: &r.name, colour, points })
        .collect();
    std::fs::write(dir.join("soak-rss.svg"), line_chart("RSS during the soak", "seconds", "MiB", &series))?;
    Ok(())
}

/// One sample: every replica's RSS, and the leader's queue depth and error rate since the last.
fn sample(replicas: &[Replica], last: &mut [(f64, f64)], t: f64) -> Sample {
    let mut errors = 0.0;
    let mut reconciles = 0.0;
    let mut depth = 0.0;
    for (i, r) in replicas.iter().enumerate() {
        let (e, all) = reconcile_counts(r.probe_port);
        errors += e - last[i].0;
        reconciles += all - last[i].1;
        last[i] = (e, all);
        depth += metric(r.probe_port, "myapp_operator_queue_depth").unwrap_or(0.0);
    }
    let rss: Vec<Option<f64>> = replicas.iter().map(|r| rss_mib(r.pid)).collect();
    let error_rate = if reconciles > 0.0 { errors / reconciles } else { 0.0 };
    Sample { t_s: t, rss_mib: rss, queue_depth: depth, reconciles, error_rate }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_compares_the_last_window_with_the_first_and_needs_both() {
        // 30 s samples over 20 minutes: 100 MiB in the first 5 minutes, 104 in the last 5.
        let points: Vec<(f64, f64)> =
            (0..=40).map(|i| i as f64 * 30.0).map(|t| (t, if t >= 900.0 { 104.0 } else { 100.0 })).collect();
        let g = growth(&[points.clone(), vec![]], 1200.0);
        assert!(g[0].is_some_and(|g| (g - 0.04).abs() < 1e-9), "{g:?}");
        assert_eq!(g[1], None, "a replica without samples has no growth");
        // A churn shorter than a window: both windows hold the same samples, and no growth shows.
        assert!(growth(&[points], 240.0)[0].is_some_and(|g| g.abs() < 1e-9));
    }

    #[test]
    fn the_report_names_its_fields_as_earlier_soak_reports() {
        let sample =
            Sample { t_s: 30.0, rss_mib: vec![Some(40.0), None], queue_depth: 0.0, reconciles: 12.0, error_rate: 0.0 };
        let report = SoakReport {
            myapps: 2000,
            minutes: 30,
            churn_steps: 1800,
            failed_steps: 0,
            replicas: vec!["operator-0".into()],
            rss_growth_first_to_last_5_min: vec![Some(0.01)],
            max_growth: MAX_GROWTH,
            converged: true,
            converged_after_churn_s: 3.0,
            samples: vec![sample],
            passed: true,
        };
        let v = serde_json::to_value(&report).expect("json");
        assert_eq!(v["rss_growth_first_to_last_5_min"][0], 0.01);
        assert_eq!(v["samples"][0]["rss_mib"][1], serde_json::Value::Null);
        assert_eq!(v["samples"][0]["t_s"], 30.0);
        assert_eq!(v["max_growth"], MAX_GROWTH);
    }
}
