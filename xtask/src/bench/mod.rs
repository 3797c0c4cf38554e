//! `cargo xtask bench`: what the operator costs, on the local control plane (or a given cluster).
//!
//! One run measures, in order:
//! 0. **failover** (not with `--quick`): graceful and crash, through the chaos suite's machinery,
//!    before anything else loads the cluster;
//! 1. **fresh**: N MyApps created (16 at a time) until all are Ready, with the Ready count over time;
//!    the leader's CPU seconds per 1000 reconciles; RSS of every replica idle and loaded (the large
//!    profile also pauses the creates at N/2 until those are Ready, for a settled sample there);
//!    Then **relist** (local control plane): etcd compacted and the API server restarted, so every
//!    watch of every replica gets 410 Gone and lists everything again; RSS before, peak, after;
//! 2. **spec change**: every MyApp's image changed until all are Ready at the new generation;
//! 3. **webhooks**: latency in process and over TLS from this (separate) process, and throughput;
//! 4. **warm handover**: SIGTERM to the leader; acquire → first reconcile on the new leader (warm
//!    caches), and the writes of its pass over all N unchanged MyApps (an unchanged resync: 0);
//!    Then **priority**: SIGTERM to that leader too; right as the last replica takes over (and
//!    starts its pass over all N), 20 MyApps change; change → the operator's apply of that MyApp's
//!    Deployment (audit log), beside how long the pass took;
//! 5. **cold start**: all replicas stopped, one started: process start → first reconcile;
//! 6. **traces on** (not with `--quick`): the fresh phase again with traces exported, for the ratio;
//! 7. **ceiling**: the same writes (create, Deployment, Service, status) from a plain client, on the
//!    same machine in the same run, through the same admission webhooks (served by replicas that
//!    reconcile nothing).
//!
//! Memory: RSS of every replica idle and loaded, its peak (`VmHWM`), and the heap bytes per cached
//! object of each kind ([`crate::bench::cache_cost`]).
//!
//! Above [`LARGE`] MyApps (`--count 10000`), the run fits a 2-CPU machine: the MyApps have 0
//! replicas (no pods for the scheduler and kwok), and the spec-change, traces and ceiling phases are
//! skipped (the control plane, not the operator, is what they would measure).
//!
//! `--webhook-abuse` runs only the webhook server under abuse, with no cluster (see
//! [`webhook::abuse`]), and writes `<out>/webhook-abuse.json`.
//!
//! API economy (writes and reads per MyApp) comes from the audit log, by the operator's
//! ServiceAccount user, so it is measured on the local control plane only. Prints a table, writes
//! `<out>/<N>.json` and `<out>/<N>-convergence.svg`.

pub mod cache_cost;
mod plot;
mod report;
mod soak;
pub mod webhook;

use crate::operator::{self, Replica, TargetArgs};
use crate::sh::{cpu_seconds, metric, peak_mib, reset_peak, rss_mib};
use crate::{cluster, paths, sh};
use anyhow::{Context, Result, bail};
use chaos::audit::now;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use myapp_operator::api::MyApp;
use plot::{Series, line_chart};
use report::{
    Ceiling, Economy, Failover, FirstReconcile, Fresh, InProcess, Latency, Machine, Memory, Priority, Relist, Report,
    Resync, Rss, RssAt, SpecChange, TracesOn, Webhooks,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The CI profile: 100 MyApps, no traces comparison, no failover rounds.
    #[arg(long)]
    quick: bool,
    /// Number of MyApps (default 1000, or 100 with --quick).
    #[arg(long)]
    count: Option<usize>,
    /// Build the operator with the release profile.
    #[arg(long)]
    release: bool,
    /// Run the binary the image ships (static musl, release) as the replicas: the figures to
    /// publish, memory above all, since musl's allocator is the pod's.
    #[arg(long, conflicts_with = "release")]
    musl: bool,
    /// Failover rounds of each kind, graceful and crash, with 15s/10s/2s leases (default 10; 0
    /// with --quick).
    #[arg(long)]
    failover_rounds: Option<u32>,
    /// Where to write the JSON report and the SVG plot (relative to the repository).
    #[arg(long, default_value = ".run/bench")]
    out: PathBuf,
    /// Only the webhook server, alone in a child process with no cluster: legitimate admissions
    /// and its RSS while slow connections and oversized bodies hit it.
    #[arg(long)]
    webhook_abuse: bool,
    /// The soak instead (see [`crate::bench::soak`]): steady churn over `--count` MyApps (default 2000)
    /// for `--minutes`.
    #[arg(long)]
    soak: bool,
    /// How long the soak churns.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Slow connections held during `--webhook-abuse`.
    #[arg(long, default_value_t = 500)]
    slow_connections: usize,
}

impl BenchArgs {
    /// The `--quick` profile against `target`.
    pub fn quick(target: TargetArgs) -> Self {
        Self {
            target,
            quick: true,
            count: None,
            release: false,
            musl: false,
            failover_rounds: None,
            out: ".run/bench".into(),
            webhook_abuse: false,
            soak: false,
            minutes: 30,
            slow_connections: 500,
        }
    }
}

impl BenchArgs {
    /// The operator binary the replicas run, built.
    fn binary(&self) -> Result<PathBuf> {
        if self.musl { crate::image::shipped_binary() } else { operator::build_profile(self.release) }
    }

    /// What the report calls the build.
    fn build_name(&self) -> &'static str {
        match (self.musl, self.release) {
            (true, _) => "release, static musl (as the image ships it)",
            (false, true) => "release",
            (false, false) => "debug",
        }
    }
}

/// Above this many MyApps, the large profile (see the module docs).
const LARGE: usize = 2000;

/// How many MyApps change during the priority phase.
const CHANGES: usize = 20;

/// How many creates or patches are in flight at once.
const CONCURRENCY: usize = 16;

fn reconciles(port: u16) -> f64 {
    metric(port, "myapp_operator_reconcile_duration_seconds_count").unwrap_or(0.0)
}

/// One phase that drives N MyApps to Ready.
struct Convergence {
    /// Epoch seconds at the first request.
    started: f64,
    /// Seconds until every request was answered.
    requested_s: f64,
    /// Seconds until every MyApp was Ready at its generation.
    ready_s: f64,
    /// (seconds, MyApps Ready) samples.
    curve: Vec<(f64, f64)>,
}

/// Runs `f(0..n)`, [`CONCURRENCY`] at a time; fails with the first error.
async fn all<F, Fut>(n: usize, what: &str, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let results: Vec<Result<()>> = futures::stream::iter(0..n).map(f).buffer_unordered(CONCURRENCY).collect().await;
    match results.into_iter().find_map(Result::err) {
        Some(e) => bail!("{what} failed: {e:#}"),
        None => Ok(()),
    }
}

fn myapp(i: usize, replicas: i32) -> Result<MyApp> {
    Ok(chaos::fixtures::nginx(&format!("app-{i:05}"), replicas)?)
}

/// Where creates wait: from MyApp `at` on, until `open` turns true (the large profile's settled
/// sample at half the count, taken by [`sample_rss`]).
#[derive(Clone)]
struct Hold {
    at: usize,
    open: tokio::sync::watch::Receiver<bool>,
}

/// Creates N MyApps (`image` None) or sets every MyApp's image, then waits until all are Ready.
/// `created` counts the creates answered; creates wait at `hold`, if any.
async fn converge(
    api: &Api<MyApp>,
    n: usize,
    image: Option<&str>,
    created: Option<&std::sync::atomic::AtomicUsize>,
    hold: Option<Hold>,
) -> Result<Convergence> {
    let replicas = if n > LARGE { 0 } else { 1 };
    let counter = ReadyCounter::start(api.clone(), image.map(str::to_string));
    let started = now();
    let clock = Instant::now();
    all(n, "driving MyApps", |i| {
        let (api, hold) = (api.clone(), hold.clone());
        async move {
            if let Some(Hold { at, mut open }) = hold
                && i >= at
            {
                open.wait_for(|o| *o).await.context("the settled sample ended")?;
            }
            match image {
                None => {
                    let answered = api.create(&PostParams::default(), &myapp(i, replicas)?).await;
                    // Answered, even with an error: a settled sample waiting for this count
                    // must not wait for ever (it fails on its Ready deadline instead).
                    if let Some(c) = created {
                        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    answered.map(|_| ()).context("create")
                }
                Some(image) => {
                    let patch = Patch::Merge(json!({"spec": {"image": image}}));
                    api.patch(&format!("app-{i:05}"), &PatchParams::default(), &patch)
                        .await
                        .map(|_| ())
                        .context("patch")
                }
            }
        }
    })
    .await?;
    let requested_s = clock.elapsed().as_secs_f64();
    let mut curve = vec![(0.0, 0.0)];
    // 15 minutes, or 4 per 1000 MyApps when there are more (the control plane makes about 10
    // MyApps Ready a second on 2 CPUs).
    let limit = Duration::from_secs(900.max(n as u64 * 240 / 1000));
    let deadline = Instant::now() + limit;
    loop {
        let ready = *counter.ready.borrow();
        curve.push((clock.elapsed().as_secs_f64(), ready as f64));
        if ready == n {
            println!("    all {n} Ready in {:.1} s", clock.elapsed().as_secs_f64());
            return Ok(Convergence { started, requested_s, ready_s: clock.elapsed().as_secs_f64(), curve });
        }
        if Instant::now() > deadline {
            bail!("{ready} of {n} MyApps Ready after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Counts the MyApps Ready at their generation (with `image`, if given) from a watch. The fresh
/// and change phases read it every 250 ms: listing every MyApp as often would load the API server
/// they measure (at 1,000 MyApps, about 8 MB of JSON a list), which the ceiling does not bear.
struct ReadyCounter {
    ready: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyCounter {
    fn start(api: Api<MyApp>, image: Option<String>) -> Self {
        use kube::runtime::{WatchStreamExt, watcher, watcher::Event};
        let (tx, ready) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(async move {
            let is_ready = |a: &MyApp| a.ready_at_generation() && image.as_ref().is_none_or(|i| &a.spec.image == i);
            let (mut names, mut listing) = (std::collections::HashSet::new(), None);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::Init) => listing = Some(std::collections::HashSet::new()),
                    Ok(Event::InitApply(a)) => {
                        if let Some(l) = listing.as_mut().filter(|_| is_ready(&a)) {
                            l.insert(a.name_any());
                        }
                    }
                    Ok(Event::InitDone) => names = listing.take().unwrap_or_default(),
                    Ok(Event::Apply(a)) if is_ready(&a) => drop(names.insert(a.name_any())),
                    Ok(Event::Apply(a) | Event::Delete(a)) => drop(names.remove(&a.name_any())),
                    Err(e) => println!("    (the Ready count's watch: {e}; retrying)"),
                }
                tx.send_replace(names.len());
            }
        });
        Self { ready, task }
    }
}

impl Drop for ReadyCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// MyApps Ready at their generation (with `image`, if given).
async fn ready_count(api: &Api<MyApp>, image: Option<&str>) -> Result<usize> {
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.iter().filter(|a| a.ready_at_generation() && image.is_none_or(|img| a.spec.image == img)).count())
}

/// What [`sample_rss`] found: a row per 1000 created, the settled sample, and how long the
/// creates waited for it (seconds).
struct RssSamples {
    by_created: Vec<RssAt>,
    settled: Option<RssAt>,
    paused_s: f64,
}

/// RSS of every replica (`pids`) as the fresh phase creates MyApps: a row per 1000 created. With a
/// `settle` count, once that many are created (the creates after it wait, see [`Hold`]), it waits
/// until they are all Ready, samples RSS settled, and opens `open`.
fn sample_rss(
    api: Api<MyApp>,
    pids: Vec<u32>,
    created: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    n: usize,
    settle: Option<usize>,
    open: tokio::sync::watch::Sender<bool>,
) -> tokio::task::JoinHandle<Result<RssSamples>> {
    let rss = move || pids.iter().map(|p| rss_mib(*p)).collect::<Vec<_>>();
    tokio::spawn(async move {
        let count = || created.load(std::sync::atomic::Ordering::Relaxed);
        let (mut rows, mut settled, mut paused_s) = (Vec::new(), None, 0.0);
        let mut next = 1000;
        while next <= n {
            if let Some(at) = settle.filter(|at| settled.is_none() && count() >= *at) {
                let paused = Instant::now();
                sh::poll(
                    &format!("{at} MyApps Ready before the settled sample"),
                    Duration::from_secs(900.max(at as u64 * 240 / 1000)),
                    Duration::from_secs(1),
                    || async { (ready_count(&api, None).await.ok()? >= at).then_some(()) },
                )
                .await?;
                // Let the last statuses and the children's updates reach every cache.
                tokio::time::sleep(Duration::from_secs(5)).await;
                let sample = rss();
                println!("    settled at {at} MyApps: RSS {sample:?} MiB");
                settled = Some(RssAt { myapps: at, rss_mib: sample });
                let _ = open.send(true);
                paused_s = paused.elapsed().as_secs_f64();
            }
            if count() >= next {
                // Let the watches deliver the last creates.
                tokio::time::sleep(Duration::from_secs(2)).await;
                rows.push(RssAt { myapps: next, rss_mib: rss() });
                next += 1000;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(RssSamples { by_created: rows, settled, paused_s })
    })
}

/// Phase 1b (local control plane): every watch relists at once. etcd is compacted and the API
/// server restarted, so each replica's watches resume from a revision that is gone, get 410 Gone,
/// and list everything again beside the store they hold. Returns each replica's RSS before, its
/// peak from the restart until no peak has grown for 15 s, and its RSS then; and which replicas
/// listed MyApps again (audit log).
async fn relist(replicas: &[Replica]) -> Result<Relist> {
    let rss = || replicas.iter().map(|r| rss_mib(r.pid)).collect::<Vec<_>>();
    let peaks = || replicas.iter().map(|r| peak_mib(r.pid)).collect::<Vec<_>>();
    let before = rss();
    replicas.iter().for_each(|r| reset_peak(r.pid));
    let t0 = now();
    let revision = cluster::compact_etcd()?;
    let restart = cluster::restart_apiserver().await?;
    let (deadline, mut still, mut peak) = (Instant::now() + Duration::from_secs(180), Instant::now(), peaks());
    while still.elapsed() < Duration::from_secs(15) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now_peak = peaks();
        if now_peak != peak {
            (peak, still) = (now_peak, Instant::now());
        }
    }
    let relisted: std::collections::BTreeSet<String> = audited_since(t0)?
        .into_iter()
        .filter(|r| r.verb == "list" && r.resource == "myapps")
        .filter_map(|r| r.replica)
        .collect();
    println!("    relist: RSS {before:?} -> peak {peak:?} MiB; replicas that listed MyApps again: {relisted:?}");
    Ok(Relist {
        etcd_compacted_at: revision,
        apiserver_restart_s: restart.as_secs_f64(),
        rss_before_mib: before,
        peak_mib: peak,
        rss_after_mib: rss(),
        settled_after_s: now() - t0,
        replicas_relisted: relisted,
    })
}

/// The local control plane's audited requests since `from` (epoch seconds).
fn audited_since(from: f64) -> Result<Vec<chaos::audit::Request>> {
    Ok(chaos::audit::parse(&std::fs::read_to_string(paths::audit_log())?, from))
}

/// Writes and reads by the operator's ServiceAccount in `namespace` between two instants.
fn economy(namespace: &str, from: f64, to: f64, per: usize) -> Result<Economy> {
    let user = operator::service_account_user();
    let mine: Vec<_> =
        audited_since(from)?.into_iter().filter(|r| r.user == user && r.namespace == namespace && r.at <= to).collect();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for r in mine.iter().filter(|r| r.is_write()) {
        let sub = if r.subresource.is_empty() { String::new() } else { format!("/{}", r.subresource) };
        *by_kind.entry(format!("{} {}{sub}", r.verb, r.resource)).or_default() += 1;
    }
    let writes = mine.iter().filter(|r| r.is_write()).count();
    let reads = mine.iter().filter(|r| matches!(r.verb.as_str(), "get" | "list")).count();
    let per = per.max(1) as f64;
    Ok(Economy {
        writes,
        reads,
        writes_per_myapp: writes as f64 / per,
        reads_per_myapp: reads as f64 / per,
        writes_by_kind: by_kind,
    })
}

/// A fresh namespace `name`, and its MyApps.
async fn namespace(client: &Client, name: &str) -> Result<Api<MyApp>> {
    operator::create_namespace(client, name).await?;
    Ok(Api::namespaced(client.clone(), name))
}

async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone()).delete(name, &DeleteParams::default()).await;
}

async fn leader(client: &Client, replicas: &[Replica]) -> Result<Replica> {
    sh::poll("a replica holding the lease", Duration::from_secs(60), Duration::from_millis(100), || async {
        let (holder, _) = operator::lease_holder(client).await?;
        replicas.iter().find(|r| r.holds(&holder)).cloned()
    })
    .await
}

/// Waits until `replica` has reconciled at least `n` times more than `before`.
async fn reconciled(replica: &Replica, before: f64, n: usize, timeout: Duration) -> Result<()> {
    let what = format!("{} reconciling {n} MyApps", replica.name);
    sh::poll(&what, timeout, Duration::from_millis(100), || async {
        (reconciles(replica.probe_port) >= before + n as f64).then_some(())
    })
    .await
}

/// Waits for `replica`'s first reconcile of a term after `since` (epoch): (when, acquire → it ms).
async fn first_reconcile(replica: &Replica, since: f64) -> Result<(f64, f64)> {
    let what = format!("{}'s first reconcile of the term", replica.name);
    sh::poll(&what, Duration::from_secs(120), Duration::from_millis(50), || async {
        replica.first_reconciles().into_iter().find(|(at, _)| *at >= since)
    })
    .await
}

/// Phase 4b: SIGTERM to `leader`; right as one of `standbys` holds the Lease (its pass over all
/// `n` MyApps begins), [`CHANGES`] MyApps change. Returns change → the operator's apply of that
/// MyApp's Deployment (both from the audit log), and how long the pass took.
async fn priority(
    client: &Client,
    api: &Api<MyApp>,
    n: usize,
    leader: &Replica,
    standbys: &[Replica],
) -> Result<Priority> {
    println!("==> priority: {CHANGES} changes as a new leader starts its pass over {n}");
    let before: Vec<f64> = standbys.iter().map(|r| reconciles(r.probe_port)).collect();
    sh::signal(leader.pid, "TERM");
    let next = sh::poll("a new leader", Duration::from_secs(60), Duration::from_millis(5), || async {
        let (holder, _) = operator::lease_holder(client).await?;
        standbys.iter().position(|r| r.holds(&holder))
    })
    .await?;
    let acquired = now();
    let names: Vec<String> = (0..CHANGES).map(|k| format!("app-{:05}", k * n / CHANGES)).collect();
    let patch = Patch::Merge(json!({"spec": {"env": [{"name": "CHANGED", "value": "1"}]}}));
    let params = PatchParams::default();
    futures::future::try_join_all(names.iter().map(|name| api.patch(name, &params, &patch))).await?;
    let new = &standbys[next];
    reconciled(new, before.get(next).copied().unwrap_or(0.0), n, Duration::from_secs(900)).await?;
    let pass_s = now() - acquired;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = audited_since(acquired - 1.0)?;
    let user = operator::service_account_user();
    let ms: Vec<f64> = names
        .iter()
        .filter_map(|name| {
            let changed = requests
                .iter()
                .find(|r| r.resource == "myapps" && r.verb == "patch" && &r.name == name && r.user != user)?
                .at;
            let applied = requests
                .iter()
                .find(|r| {
                    r.resource == "deployments" && r.is_write() && &r.name == name && r.user == user && r.at >= changed
                })?
                .at;
            Some((applied - changed) * 1000.0)
        })
        .collect();
    let spread = chaos::report::stats(&ms);
    let (p50, p99) = (spread.as_ref().map(|s| s.p50), spread.as_ref().map(|s| s.p99));
    println!("    change -> apply p50 {p50:?} ms, p99 {p99:?} ms; the pass took {pass_s:.1} s");
    Ok(Priority { changes: CHANGES, applied: ms.len(), pass_s, change_to_apply_ms: spread })
}

/// The API server's ceiling: the same writes as a fresh MyApp costs the operator at minimum (create
/// it, apply its Deployment and Service, write its status), from a plain client, no operator.
async fn ceiling(client: &Client, ns: &str, n: usize) -> Result<(f64, Vec<(f64, f64)>)> {
    use myapp_operator::api::FIELD_MANAGER;
    use myapp_operator::controller::children;
    let api = namespace(client, ns).await?;
    let clock = Instant::now();
    let done = std::sync::Mutex::new(Vec::with_capacity(n));
    all(n, "ceiling writes", |i| {
        let (api, client, done, clock) = (api.clone(), client.clone(), &done, &clock);
        async move {
            let app = api.create(&PostParams::default(), &myapp(i, 1)?).await?;
            let apply = PatchParams::apply(FIELD_MANAGER).force();
            let d = children::deployment(&app);
            Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), ns)
                .patch(&app.name_any(), &apply, &Patch::Apply(&d))
                .await?;
            let s = children::service(&app);
            Api::<k8s_openapi::api::core::v1::Service>::namespaced(client, ns)
                .patch(&app.name_any(), &apply, &Patch::Apply(&s))
                .await?;
            let status = Patch::Merge(json!({"status": {"observedGeneration": 1, "replicas": 1}}));
            api.patch_status(&app.name_any(), &PatchParams::default(), &status).await?;
            if let Ok(mut d) = done.lock() {
                d.push(clock.elapsed().as_secs_f64());
            }
            Ok(())
        }
    })
    .await?;
    let total = clock.elapsed().as_secs_f64();
    let mut times = done.into_inner().unwrap_or_default();
    times.sort_by(f64::total_cmp);
    let curve =
        std::iter::once((0.0, 0.0)).chain(times.iter().enumerate().map(|(i, t)| (*t, (i + 1) as f64))).collect();
    Ok((total, curve))
}

/// What the phases of one run share.
struct Run {
    /// How many MyApps.
    n: usize,
    /// The large profile (see the module docs).
    large: bool,
    /// On the local control plane (audit log, relist, priority).
    local: bool,
    /// Names this run's namespaces.
    id: u32,
    client: Client,
    bin: PathBuf,
    /// The kubeconfig the replicas run with (the operator's ServiceAccount).
    kubeconfig: PathBuf,
    /// The replicas' environment with traces exported, and without.
    on_env: Vec<(&'static str, String)>,
    off_env: Vec<(&'static str, String)>,
}

impl Run {
    /// Starts `count` replicas with `env` and waits until they are ready.
    async fn replicas(&self, count: usize, env: &[(&'static str, String)]) -> Result<Vec<Replica>> {
        let replicas = operator::start_replicas(&self.bin, &self.kubeconfig, count, &[], env)?;
        operator::wait_ready(&replicas).await?;
        Ok(replicas)
    }

    /// The operator's writes and reads in `namespace` since `from`, on the local control plane.
    fn economy(&self, namespace: &str, from: f64) -> Result<Option<Economy>> {
        if self.local { Ok(Some(economy(namespace, from, now(), self.n)?)) } else { Ok(None) }
    }
}

/// Runs the benchmark.
pub async fn bench(args: BenchArgs) -> Result<()> {
    if args.webhook_abuse {
        return webhook_abuse(&args).await;
    }
    let target = args.target.resolve().await?;
    if args.soak {
        let out = args.out.display().to_string();
        return soak::soak(&target, &args.binary()?, args.count.unwrap_or(2000), args.minutes, &out).await;
    }
    let setup = operator::setup_with(&target, args.binary()?).await?;
    crate::install::make_way_for_processes(&setup.client, target.local).await?;
    let result = measure(&args, &target, setup).await;
    if result.is_err() {
        // Stop what it started: replicas left running would hold the Lease.
        operator::stop_replicas();
    }
    result
}

/// What the phases of one run share, for `n` MyApps on `setup`'s replicas.
fn run_of(n: usize, target: &operator::Target, setup: operator::Setup) -> Run {
    let mut on_env = operator::replica_env(target);
    on_env.push(("RUST_LOG", "info".to_string()));
    Run {
        n,
        large: n > LARGE,
        local: target.local,
        id: std::process::id(),
        client: setup.client,
        bin: setup.bin,
        kubeconfig: setup.kubeconfig,
        // Webhooks stay on (or off, remotely) in both; only the trace export differs.
        off_env: on_env.iter().filter(|(k, _)| !k.starts_with("OTEL_")).cloned().collect(),
        on_env,
    }
}

/// The phases of [`bench()`], on replicas it starts.
async fn measure(args: &BenchArgs, target: &operator::Target, setup: operator::Setup) -> Result<()> {
    let n = args.count.unwrap_or(if args.quick { 100 } else { 1000 });
    let failover_rounds = args.failover_rounds.unwrap_or(if args.quick { 0 } else { 10 });
    let run = run_of(n, target, setup);
    let failover = failover(target, failover_rounds).await?;
    operator::stop_replicas();
    let replicas = run.replicas(3, &run.off_env).await?;
    let ns_a = format!("bench-{n}-{}", run.id);
    let api = namespace(&run.client, &ns_a).await?;
    let (convergence, fresh) = fresh(&run, &replicas, &api, &ns_a).await?;
    let relist = if run.local {
        println!("==> relist: etcd compacted and the API server restarted, with {n} MyApps");
        Some(relist(&replicas).await?)
    } else {
        None
    };
    let spec_change = spec_change(&run, &api, &ns_a).await?;
    let webhooks = webhooks(&run).await?;
    let (unchanged_resync, priority, warm_handover) = handover(&run, &replicas, &api, &ns_a).await?;
    let (cold_start_memory, cold_process, cold_start_to_first_reconcile) = cold_start(&run).await?;
    let traced = if !args.quick && !run.large { Some(traces(&run).await?) } else { None };
    let ceiling = if run.large { None } else { Some(ceiling_phase(&run).await?) };
    let all_ready = convergence.ready_s;
    let report = Report {
        machine: Machine::here(),
        operator_build: args.build_name(),
        myapps: n,
        failover,
        fresh: Fresh {
            ratio_to_ceiling: ceiling.as_ref().map(|(_, c)| all_ready / c.ready_s.max(f64::EPSILON)),
            ..fresh.fresh
        },
        rss_mib: fresh.rss,
        cache_bytes_per_object: fresh.cache_bytes,
        cpu_seconds_per_1000_reconciles: fresh.cpu_per_1000,
        relist,
        spec_change,
        webhooks,
        unchanged_resync,
        priority,
        acquire_to_first_reconcile_ms: FirstReconcile { warm_handover, cold_process, cold_start_to_first_reconcile },
        cold_start_memory,
        traces_on: traced
            .as_ref()
            .map(|(_, c)| TracesOn { all_ready_s: c.ready_s, ratio_on_off: c.ready_s / all_ready }),
        ceiling: ceiling.as_ref().map(|(_, c)| Ceiling { writes: 4 * n, seconds: c.ready_s }),
    };

    let curves = [Some(&convergence), traced.as_ref().map(|t| &t.1), ceiling.as_ref().map(|c| &c.1)];
    write(&report, &args.out, curves)?;
    let namespaces: Vec<String> =
        [Some(ns_a), traced.map(|t| t.0), ceiling.map(|c| c.0)].into_iter().flatten().collect();
    clean_up(&run, &namespaces).await
}

/// Writes the report (`<out>/<N>.json`) and the plot of the fresh phase's `curves` (without and
/// with traces, and the ceiling's; `<out>/<N>-convergence.svg`), and prints the table.
fn write(report: &Report, out: &std::path::Path, [fresh, traced, ceiling]: [Option<&Convergence>; 3]) -> Result<()> {
    let (out, n) = (paths::repo().join(out), report.myapps);
    std::fs::create_dir_all(&out)?;
    let file = out.join(format!("{n}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(report)?)?;
    let names = [
        ("operator: MyApps Ready", "#1f77b4"),
        ("operator, traces exported", "#ff7f0e"),
        ("ceiling: plain client, same writes", "#2ca02c"),
    ];
    let series: Vec<Series<'_>> = [fresh, traced, ceiling]
        .into_iter()
        .zip(names)
        .filter_map(|(c, (name, colour))| Some(Series { name, colour, points: &c?.curve }))
        .collect();
    let svg = out.join(format!("{n}-convergence.svg"));
    std::fs::write(&svg, line_chart(&format!("{n} fresh MyApps"), "seconds", "MyApps", &series))?;
    report::print_table(&report.rows());
    println!("    report: {}\n    plot:   {}", file.display(), svg.display());
    Ok(())
}

/// Phase 0: failover through the chaos suite, first, on a cluster with nothing else to do.
async fn failover(target: &operator::Target, rounds: u32) -> Result<Option<Failover>> {
    if rounds == 0 {
        return Ok(None);
    }
    println!("==> failover: {rounds} graceful and {rounds} crash handovers (chaos suite)");
    let report = crate::chaos::scenarios(crate::chaos::ChaosArgs {
        target: target.args(),
        profile: crate::chaos::Profile::Full,
        rounds: Some(rounds),
        scenarios: Some(vec![crate::chaos::Scenario::Term, crate::chaos::Scenario::Kill]),
        replicas: 3,
        on: crate::chaos::On::Processes,
        seconds: None,
    })
    .await?;
    Ok(Some(Failover { timings_s: report.timings, summary: report.summary }))
}

/// Phase 1: N fresh MyApps in `ns`, with the memory of every replica (see [`sample_rss`]), the
/// heap per cached object, the leader's CPU and the API economy.
async fn fresh(run: &Run, replicas: &[Replica], api: &Api<MyApp>, ns: &str) -> Result<(Convergence, FreshPart)> {
    let n = run.n;
    let idle: Vec<f64> = replicas.iter().filter_map(|r| rss_mib(r.pid)).collect();
    let lead = leader(&run.client, replicas).await?;
    let (cpu0, rec0) = (cpu_seconds(lead.pid).unwrap_or(0.0), reconciles(lead.probe_port));
    println!("==> fresh: {n} MyApps in {ns}");
    // RSS of every replica as the MyApps are created, and settled at half the count (large
    // profile) and at the end: the sizing table's rows.
    let created = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let settle = run.large.then_some(n / 2);
    let (open, opened) = tokio::sync::watch::channel(settle.is_none());
    let pids = replicas.iter().map(|r| r.pid).collect();
    let sampler = sample_rss(api.clone(), pids, created.clone(), n, settle, open);
    let hold = settle.map(|at| Hold { at, open: opened });
    let fresh = converge(api, n, None, Some(&created), hold).await?;
    let RssSamples { by_created, settled, paused_s } = sampler.await??;
    let lead = leader(&run.client, replicas).await?;
    let (cpu1, rec1) = (cpu_seconds(lead.pid).unwrap_or(0.0), reconciles(lead.probe_port));
    let loaded: Vec<f64> = replicas.iter().filter_map(|r| rss_mib(r.pid)).collect();
    let peak: Vec<f64> = replicas.iter().filter_map(|r| peak_mib(r.pid)).collect();
    let cache_bytes = cache_cost::measure(&run.client, ns).await?;
    println!("    heap bytes per cached object: {}", serde_json::to_string(&cache_bytes)?);
    let cpu_per_1000 = (rec1 > rec0).then(|| (cpu1 - cpu0) / (rec1 - rec0) * 1000.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = settled.into_iter().chain([RssAt { myapps: n, rss_mib: loaded.iter().copied().map(Some).collect() }]);
    let part = FreshPart {
        fresh: Fresh {
            requests_s: fresh.requested_s,
            all_ready_s: fresh.ready_s,
            settled_sample_pause_s: paused_s,
            myapps_per_s: n as f64 / (fresh.ready_s - paused_s).max(f64::EPSILON),
            api: run.economy(ns, fresh.started)?,
            ratio_to_ceiling: None,
        },
        rss: Rss {
            idle,
            loaded,
            peak,
            by_myapps_created: by_created,
            settled: settled.collect(),
            replicas: replicas.iter().map(|r| r.name.clone()).collect(),
            leader: lead.name,
        },
        cache_bytes,
        cpu_per_1000,
    };
    Ok((fresh, part))
}

/// What the fresh phase adds to the report.
struct FreshPart {
    fresh: Fresh,
    rss: Rss,
    cache_bytes: cache_cost::CacheBytes,
    cpu_per_1000: Option<f64>,
}

/// Phase 2: every image changed (not in the large profile).
async fn spec_change(run: &Run, api: &Api<MyApp>, ns: &str) -> Result<Option<SpecChange>> {
    if run.large {
        return Ok(None);
    }
    println!("==> spec change: every image to nginx:1.28");
    let change = converge(api, run.n, Some("nginx:1.28"), None, None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(Some(SpecChange { all_ready_s: change.ready_s, api: run.economy(ns, change.started)? }))
}

/// Phase 3: the webhooks, from this process against a replica over TLS (local control plane
/// only), and in process.
async fn webhooks(run: &Run) -> Result<Webhooks> {
    println!("==> webhooks");
    let ca = if run.local {
        let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(run.client.clone(), operator::NAMESPACE);
        secrets
            .get("myapp-operator-webhook-cert")
            .await
            .ok()
            .and_then(|s| s.data?.get("ca.crt").and_then(|c| String::from_utf8(c.0.clone()).ok()))
    } else {
        None
    };
    let url = format!("https://{}", operator::LOCAL_WEBHOOK_ADDR);
    let wh = webhook::run(ca.as_deref().map(|c| (url.as_str(), c))).await?;
    let [(validate_p50, validate_p99), (mutate_p50, mutate_p99)] = wh.in_process;
    Ok(Webhooks {
        webhook_in_process_us: InProcess { validate_p50, validate_p99, mutate_p50, mutate_p99 },
        webhook_tls_us: wh.tls.map(|(p50, p99)| Latency { p50, p99 }),
        webhook_tls_rps_16_clients: wh.tls_rps,
    })
}

/// Phase 4: SIGTERM to the leader; the new leader's first reconcile and the writes of its pass
/// over N unchanged MyApps. Then the priority phase ([`priority`]) on the last replica. Returns
/// those writes, the priority figures and acquire → first reconcile (ms).
async fn handover(
    run: &Run,
    replicas: &[Replica],
    api: &Api<MyApp>,
    ns: &str,
) -> Result<(Resync, Option<Priority>, f64)> {
    let n = run.n;
    println!("==> warm handover with {n} MyApps");
    let old = leader(&run.client, replicas).await?;
    let others: Vec<Replica> = replicas.iter().filter(|r| r.name != old.name).cloned().collect();
    let before: Vec<f64> = others.iter().map(|r| reconciles(r.probe_port)).collect();
    let handover_at = now();
    sh::signal(old.pid, "TERM");
    let new = leader(&run.client, &others).await?;
    let (_, warm_ms) = first_reconcile(&new, handover_at).await?;
    let idx = others.iter().position(|r| r.name == new.name).unwrap_or(0);
    reconciled(&new, before.get(idx).copied().unwrap_or(0.0), n, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resync = run.economy(ns, handover_at)?;
    let last: Vec<Replica> = others.iter().filter(|r| r.name != new.name).cloned().collect();
    let priority = if run.local { Some(priority(&run.client, api, n, &new, &last).await?) } else { None };
    Ok((Resync { api: resync }, priority, warm_ms))
}

/// Phase 5: all replicas stopped, one started from nothing: process start → first reconcile, and
/// its memory once it has passed over everything (a full list of N at its peak, and settled).
/// Returns that memory, acquire → first reconcile and process start → first reconcile (ms).
async fn cold_start(run: &Run) -> Result<(Memory, f64, f64)> {
    println!("==> cold start with {} MyApps", run.n);
    operator::stop_replicas();
    let spawned = now();
    let cold = operator::start_replica(0, &run.bin, &run.kubeconfig, &[], &run.off_env)?;
    let (cold_at, acquire_ms) = first_reconcile(&cold, spawned).await?;
    reconciled(&cold, 0.0, run.n, Duration::from_secs(900)).await?;
    let memory = Memory { rss_mib: rss_mib(cold.pid), peak_mib: peak_mib(cold.pid) };
    operator::stop_replicas();
    Ok((memory, acquire_ms, (cold_at - spawned) * 1000.0))
}

/// Phase 6: the fresh phase again, with traces exported, in a namespace of its own (returned).
async fn traces(run: &Run) -> Result<(String, Convergence)> {
    println!("==> fresh again, traces exported");
    run.replicas(3, &run.on_env).await?;
    let ns = format!("bench-{}-traces-{}", run.n, run.id);
    let api = namespace(&run.client, &ns).await?;
    let c = converge(&api, run.n, None, None, None).await?;
    operator::stop_replicas();
    Ok((ns, c))
}

/// Phase 7: the API server's ceiling, in a namespace of its own (returned): no reconciles, the
/// same webhooks, served by replicas that watch a namespace with nothing in it.
async fn ceiling_phase(run: &Run) -> Result<(String, Convergence)> {
    println!("==> ceiling: the same writes from a plain client, through the same webhooks");
    let mut env = run.off_env.clone();
    env.push(("WATCH_NAMESPACE", format!("bench-nothing-{}", run.id)));
    run.replicas(3, &env).await?;
    let ns = format!("bench-{}-ceiling-{}", run.n, run.id);
    let started = now();
    let (seconds, curve) = ceiling(&run.client, &ns, run.n).await?;
    operator::stop_replicas();
    Ok((ns, Convergence { started, requested_s: seconds, ready_s: seconds, curve }))
}

/// Deletes the benchmark's `namespaces` with a replica running (the MyApps' finalizers need the
/// operator), and waits up to 10 minutes for them to go. After the report, so that a large run's
/// figures do not wait on its cleanup.
async fn clean_up(run: &Run, namespaces: &[String]) -> Result<()> {
    println!("==> cleaning up");
    run.replicas(1, &run.off_env).await?;
    for ns in namespaces {
        delete_namespace(&run.client, ns).await;
    }
    let all_ns = Api::<Namespace>::all(run.client.clone());
    let gone = sh::poll(
        "the benchmark's namespaces deleted",
        Duration::from_secs(600),
        Duration::from_millis(500),
        || async {
            for ns in namespaces {
                if !matches!(all_ns.get_opt(ns).await, Ok(None)) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    if let Err(e) = gone {
        println!("    warning: {e:#}");
    }
    operator::stop_replicas();
    Ok(())
}

/// The pod's memory limit in MiB, read from the operator's Deployment.
fn pod_memory_limit_mib() -> Result<f64> {
    let path = paths::repo().join("deploy/manager/deployment.yaml");
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let limit = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        .as_str()
        .with_context(|| format!("no memory limit in {}", path.display()))?;
    let mib = limit.strip_suffix("Mi").and_then(|n| n.parse::<f64>().ok());
    mib.with_context(|| format!("memory limit {limit:?} is not in Mi"))
}

async fn webhook_abuse(args: &BenchArgs) -> Result<()> {
    let report = webhook::abuse(webhook::AbuseArgs {
        slow: args.slow_connections,
        oversized: 4,
        workers: 4,
        period: Duration::from_secs(if args.quick { 10 } else { 20 }),
        limit_mib: pod_memory_limit_mib()?,
    })
    .await?;
    let out = paths::repo().join(&args.out);
    std::fs::create_dir_all(&out)?;
    let file = out.join("webhook-abuse.json");
    let rows = report.rows();
    let json = serde_json::to_string_pretty(&report::AbuseFile { machine: Machine::here(), webhook_abuse: report })?;
    std::fs::write(&file, &json)?;
    println!("{json}");
    report::print_table(&rows);
    println!("    report: {}", file.display());
    Ok(())
}
