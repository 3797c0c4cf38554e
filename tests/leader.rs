//! The elector against a real API server, with several contenders in one process.

mod common;

use common::{TestNamespace, client, config, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use myapp_operator::controller::{fenced, writer::Fence};
use myapp_operator::leader::{Elector, Leadership, Timings};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

fn fast() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    }
}

struct Contender {
    id: String,
    leadership: watch::Receiver<Leadership>,
    stop: watch::Sender<bool>,
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
            let (stop, stop_rx) = watch::channel(false);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn exactly_one_leader_then_release_and_crash_takeover() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "leader").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let mut cs = contenders(&ns.name, 4).await;

    let first = eventually("a leader", Duration::from_secs(10), || async {
        let l = leaders(&cs);
        (l.len() == 1).then(|| l[0])
    })
    .await;
    assert_eq!(holder(&leases).await.as_deref(), Some(cs[first].id.as_str()));

    // Never two leaders: sample for a few renewal periods.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let l = leaders(&cs);
        assert!(l.len() <= 1, "two leaders at once: {l:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(leaders(&cs), vec![first], "the leader keeps renewing");

    // Graceful release: another contender takes over well before the lease would expire.
    let released = Instant::now();
    cs[first].stop.send_replace(true);
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

    for c in cs.drain(..) {
        c.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), c.task).await;
    }
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn a_leader_that_cannot_renew_steps_down_by_its_deadline() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "stepdown").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let cs = contenders(&ns.name, 1).await;
    eventually("leadership", Duration::from_secs(10), || async { cs[0].leads().then_some(()) }).await;

    // Someone else takes the lease by force (an operator with a different identity, or a
    // human): the next renewal conflicts and the contender must step down at once.
    let mut lease = leases.get("election").await.expect("lease");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
    }
    leases.replace("election", &Default::default(), &lease).await.expect("take the lease");
    let lost = Instant::now();
    eventually("stepping down", Duration::from_secs(5), || async { (!cs[0].leads()).then_some(()) }).await;
    assert!(lost.elapsed() <= fast().renew_deadline + Duration::from_millis(200), "stepped down by the deadline");
    for c in cs {
        c.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), c.task).await;
    }
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a cluster: run `cargo xtask test`"]
async fn the_fenced_client_sends_nothing_once_the_term_has_ended() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "fenced").await;
    let (valid_until, rx) = watch::channel(Some(Instant::now() + Duration::from_secs(30)));
    let fenced = fenced::client(&config().await, Fence::new(rx)).expect("fenced client");
    let ours: Api<ConfigMap> = Api::namespaced(fenced, &ns.name);
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
