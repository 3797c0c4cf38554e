//! The elector against a real API server, with several contenders in one process.

mod common;

use common::{TestNamespace, client, config, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use myapp_operator::controller::fenced;
use myapp_operator::leader::{Elector, Fence, Leadership, Stop, Timings};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

fn fast() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
        write_timeout: Timings::DEFAULT.write_timeout,
    }
}

struct Contender {
    id: String,
    leadership: watch::Receiver<Leadership>,
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
}

impl Contender {
    fn leads(&self) -> bool {
        self.leadership.borrow().is_some_and(|until| until > Instant::now())
    }
}

async fn contenders(ns: &str, n: usize) -> Vec<Contender> {
    let client = client().await;
    (0..n)
        .map(|i| {
            let id = format!("contender-{i}");
            let (elector, leadership) = Elector::new(client.clone(), ns, "election", &id, fast());
            let (stop, stop_rx) = watch::channel(Stop::No);
            let task = tokio::spawn(elector.run(stop_rx));
            Contender { id, leadership, stop, task }
        })
        .collect()
}

async fn holder(api: &Api<Lease>) -> Option<String> {
    api.get_opt("election").await.ok().flatten().and_then(|l| l.spec).and_then(|s| s.holder_identity)
}

fn leaders(cs: &[Contender]) -> Vec<usize> {
    cs.iter().enumerate().filter(|(_, c)| c.leads()).map(|(i, _)| i).collect()
}

/// The one contender leading, waiting up to `timeout` for exactly one.
async fn sole_leader(cs: &[Contender], what: &str, timeout: Duration) -> usize {
    eventually(what, timeout, || async {
        let l = leaders(cs);
        (l.len() == 1).then(|| l[0])
    })
    .await
}

/// Stops every contender (releasing the lease) and waits for each, at most 5 s.
async fn stop_all(cs: Vec<Contender>) {
    for c in cs {
        c.stop.send_replace(Stop::Release);
        let _ = tokio::time::timeout(Duration::from_secs(5), c.task).await;
    }
}

/// A leadership term as a contender published it: from when it was published to when it was
/// withdrawn or its `valid_until` passed, whichever came first.
type Term = (usize, Instant, Instant);

/// Closed terms, and each contender's open one (start, valid_until).
type Ledger = (Vec<Term>, Vec<Option<(Instant, Instant)>>);

/// Records every contender's terms from the moment it starts, for the whole test: "never two
/// leaders" is then checked over every term, handovers and crashes included, not sampled.
struct Terms {
    state: Arc<Mutex<Ledger>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Terms {
    fn record(cs: &[Contender]) -> Self {
        let state = Arc::new(Mutex::new((Vec::new(), vec![None; cs.len()])));
        let tasks = cs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (mut rx, state) = (c.leadership.clone(), state.clone());
                tokio::spawn(async move {
                    loop {
                        let now = Instant::now();
                        let value = *rx.borrow_and_update();
                        {
                            let mut st = state.lock().expect("terms");
                            st.1[i] = match (st.1[i], value) {
                                (Some((start, until)), Some(next)) if now < until => Some((start, next)),
                                (Some((start, until)), v) => {
                                    st.0.push((i, start, until.min(now)));
                                    v.map(|next| (now, next))
                                }
                                (None, v) => v.map(|next| (now, next)),
                            };
                        }
                        if rx.changed().await.is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Self { state, tasks }
    }

    /// Every term so far (an open one ends now, or at its valid_until if that passed), after
    /// checking that no two contenders' terms overlap.
    fn check(&self) -> Vec<Term> {
        let now = Instant::now();
        let st = self.state.lock().expect("terms");
        let mut all = st.0.clone();
        all.extend(st.1.iter().enumerate().filter_map(|(i, o)| o.map(|(start, until)| (i, start, until.min(now)))));
        for a in &all {
            for b in &all {
                assert!(
                    a.0 == b.0 || a.2 <= b.1 || b.2 <= a.1,
                    "two leaders at once: contender {} {:?}..{:?} and contender {} {:?}..{:?}",
                    a.0,
                    a.1,
                    a.2,
                    b.0,
                    b.1,
                    b.2
                );
            }
        }
        all
    }

    /// Stops recording.
    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn exactly_one_leader_then_release_and_crash_takeover() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "leader").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let cs = contenders(&ns.name, 4).await;
    let terms = Terms::record(&cs);

    let first = sole_leader(&cs, "a leader", Duration::from_secs(10)).await;
    assert_eq!(holder(&leases).await.as_deref(), Some(cs[first].id.as_str()));

    // The leader keeps renewing over a few renewal periods.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaders(&cs), vec![first], "the leader keeps renewing");

    // Graceful release: another contender takes over well before the lease would expire.
    let released = Instant::now();
    cs[first].stop.send_replace(Stop::Release);
    let second = eventually("a takeover after release", Duration::from_secs(10), || async {
        let l = leaders(&cs);
        (l.len() == 1 && l[0] != first).then(|| l[0])
    })
    .await;
    let handover = released.elapsed();
    println!("graceful handover: {} ms", handover.as_millis());
    assert!(handover < fast().lease_duration, "a released lease is taken without waiting for expiry ({handover:?})");
    let lease = leases.get("election").await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some(cs[second].id.as_str()));
    assert!(spec.lease_transitions.unwrap_or(0) >= 1, "transitions are counted");

    // Crash: the leader vanishes without releasing. Takeover waits for the lease to expire.
    let crashed = Instant::now();
    cs[second].task.abort();
    let third = eventually("a takeover after a crash", Duration::from_secs(15), || async {
        let l: Vec<usize> = leaders(&cs).into_iter().filter(|i| *i != second).collect();
        (l.len() == 1).then(|| l[0])
    })
    .await;
    let failover = crashed.elapsed();
    println!("crash failover: {} ms (lease duration {:?})", failover.as_millis(), fast().lease_duration);
    assert!(failover >= Duration::from_secs(2), "expiry is respected ({failover:?})");
    assert_eq!(holder(&leases).await.as_deref(), Some(cs[third].id.as_str()));

    // Never two leaders, over every term of the whole test: election, release and crash.
    let all = terms.check();
    assert!(all.len() >= 3, "three terms at least: {all:?}");
    terms.stop();
    stop_all(cs).await;
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn a_leader_steps_down_as_soon_as_the_watch_shows_another_holder() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "stepdown").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let cs = contenders(&ns.name, 1).await;
    eventually("leadership", Duration::from_secs(10), || async { cs[0].leads().then_some(()) }).await;

    // Someone else takes the lease by force (an operator with a different identity, or a
    // human): the watch shows it, and the contender steps down at once, not at its next renewal
    // (which would conflict) nor at its renew deadline. (Stepping down by the renew deadline when
    // renewals fail is tested without a cluster, in `leader::elector`.)
    let mut lease = leases.get("election").await.expect("lease");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
    }
    leases.replace("election", &Default::default(), &lease).await.expect("take the lease");
    let lost = Instant::now();
    eventually("stepping down", Duration::from_secs(5), || async { (!cs[0].leads()).then_some(()) }).await;
    let took = lost.elapsed();
    assert!(took < fast().retry_period, "stepped down on the watch event, before any renewal ({took:?})");
    stop_all(cs).await;
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn a_deleted_lease_stops_its_leader_at_once_and_the_next_term_waits_a_lease_duration() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "deleted").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let cs = contenders(&ns.name, 3).await;
    let terms = Terms::record(&cs);
    let first = sole_leader(&cs, "a leader", Duration::from_secs(10)).await;

    leases.delete("election", &Default::default()).await.expect("delete the lease");
    let deleted = Instant::now();
    eventually("the leader stepping down", Duration::from_secs(5), || async { (!cs[first].leads()).then_some(()) })
        .await;
    let stepped = deleted.elapsed();
    println!("leader stepped down {} ms after the delete", stepped.as_millis());
    assert!(stepped < fast().retry_period, "on the watch event, not at the next renewal ({stepped:?})");

    // Someone re-creates the Lease at once, but nobody leads it before a full lease duration.
    eventually("a new lease", Duration::from_secs(5), || async { holder(&leases).await }).await;
    let next = sole_leader(&cs, "a new leader", Duration::from_secs(15)).await;
    let waited = deleted.elapsed();
    println!("new leader {} ms after the delete", waited.as_millis());
    assert!(waited >= fast().lease_duration, "a new Lease is led only after a lease duration ({waited:?})");
    assert_eq!(holder(&leases).await.as_deref(), Some(cs[next].id.as_str()));
    terms.check();
    terms.stop();
    stop_all(cs).await;
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn the_fenced_client_sends_nothing_once_the_term_has_ended() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "fenced").await;
    let (valid_until, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(30)));
    let fenced = fenced::client(&config().await, Fence::new(rx), fast().write_timeout).expect("fenced client");
    let ours: Api<ConfigMap> = fenced.api(&ns.name);
    let theirs: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("configmap")
    };

    ours.create(&Default::default(), &cm("inside")).await.expect("a write inside the term goes through");
    assert!(theirs.get_opt("inside").await.expect("get").is_some());

    // The term ends without a renewal. The pooled connection from the first write is still open;
    // the next write must not reach the API server through it, nor through a new one.
    valid_until.send_replace(Some(Instant::now()));
    for name in ["after-expiry", "after-expiry-2"] {
        let err = ours.create(&Default::default(), &cm(name)).await.expect_err("fenced");
        assert!(format!("{err:?}").contains("fenced"), "the error says why: {err:?}");
        assert!(theirs.get_opt(name).await.expect("get").is_none(), "{name} must not exist");
    }
    // Reads through the normal client are unaffected, and a new term opens the fence again.
    valid_until.send_replace(Some(Instant::now() + Duration::from_secs(30)));
    ours.create(&Default::default(), &cm("next-term")).await.expect("a write in a new term");
    valid_until.send_replace(None);
    assert!(ours.create(&Default::default(), &cm("standby")).await.is_err(), "a standby writes nothing");
    assert!(theirs.get_opt("standby").await.expect("get").is_none());
    ns.cleanup().await;
}
