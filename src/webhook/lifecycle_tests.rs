//! The webhook server's life against the fake API server: a deleted or broken Secret, replicas
//! with different SANs, a CA rotation, a wiped caBundle, and an API server that does not answer.
//!
//! Tests that check the server with a real TLS handshake run in real time (a paused clock would
//! fire the handshake's timeouts while the socket is busy); the others run with paused time.

use super::*;
use crate::api::policy::Policy;
use crate::fake_api::FakeApi;
use crate::telemetry::metrics::Metrics;
use crate::webhook::certs::{CHECK_PERIOD, PASS_TIMEOUT, RETRY_MAX};
use crate::webhook::limits::Limits;
use base64::Engine;
use serde_json::{Value, json};
use std::future::Future;
use tokio::time::Instant;

const NS: &str = "myapp-system";
const SECRET: &str = "webhook-cert";
const CONFIG: &str = "myapp-operator";
const SECRETS: &str = "/api/v1/namespaces/myapp-system/secrets";
const MUTATING: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
const VALIDATING: &str = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str()?).ok()?;
    String::from_utf8(bytes).ok()
}

/// A fake with both webhook configurations installed as `webhooks.yaml` has them: two webhooks
/// each, no caBundle.
fn fake() -> FakeApi {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeApi::default();
    for (collection, kind) in
        [(MUTATING, "MutatingWebhookConfiguration"), (VALIDATING, "ValidatingWebhookConfiguration")]
    {
        fake.put(collection, configuration(kind));
    }
    fake
}

fn configuration(kind: &str) -> Value {
    let webhook = |name: &str| {
        json!({
            "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "myapp-operator-webhook", "namespace": NS, "path": "/x"}},
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind, "metadata": {"name": CONFIG},
        "webhooks": [webhook("a.myapp.dev"), webhook("b.myapp.dev")],
    })
}

fn source(sans: &[&str]) -> CertSource {
    CertSource::SelfManaged {
        namespace: NS.into(),
        secret: SECRET.into(),
        sans: sans.iter().map(|s| s.to_string()).collect(),
        config: CONFIG.into(),
    }
}

fn start(client: kube::Client, sans: &[&str], options: Options) -> Webhooks {
    let shared = Arc::new(Shared::new(Policy::default(), Arc::new(Metrics::default()), Limits::default()));
    let addr = "127.0.0.1:0".parse().expect("address");
    Webhooks::start_with(client, addr, source(sans), shared, options).expect("start needs no API server")
}

/// Options for tests with a paused clock: no self-check (it does real I/O with timeouts).
fn paused(clock: Option<Clock>) -> Options {
    let mut o = Options { self_check: false, ..Options::default() };
    if let Some(c) = clock {
        o.clock = c;
    }
    o
}

fn secret(fake: &FakeApi) -> Option<k8s_openapi::api::core::v1::Secret> {
    serde_json::from_value(fake.get(SECRETS, SECRET)?).ok()
}

/// (ca.crt, tls.crt) of the Secret.
fn secret_pem(fake: &FakeApi) -> Option<(String, String)> {
    let (ca, crt, _) = certs::from_secret(&secret(fake)?)?;
    Some((ca, crt))
}

/// The caBundle of every webhook of both configurations (None where there is none).
fn ca_bundles(fake: &FakeApi) -> Vec<Option<String>> {
    [MUTATING, VALIDATING]
        .iter()
        .filter_map(|c| fake.get(c, CONFIG))
        .flat_map(|c| c["webhooks"].as_array().cloned().unwrap_or_default())
        .map(|w| unb64(&w["clientConfig"]["caBundle"]))
        .collect()
}

/// True when all four webhooks carry exactly `ca`.
fn bundles_are(fake: &FakeApi, ca: &str) -> bool {
    let all = ca_bundles(fake);
    all.len() == 4 && all.iter().all(|b| b.as_deref() == Some(ca))
}

/// Successful writes (POST, PUT, PATCH) to `collection` among `requests`.
fn writes(requests: &[crate::fake_api::Seen], collection: &str) -> usize {
    requests
        .iter()
        .filter(|r| matches!(r.method.as_str(), "POST" | "PUT" | "PATCH"))
        .filter(|r| r.uri.starts_with(collection) && (200..300).contains(&r.status))
        .count()
}

/// Polls `f` every 10 ms until it gives a value, failing after `deadline` (tokio time).
async fn until<T, Fut: Future<Output = Option<T>>>(what: &str, deadline: Duration, mut f: impl FnMut() -> Fut) -> T {
    let poll = async {
        loop {
            match f().await {
                Some(v) => break v,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(deadline, poll).await.unwrap_or_else(|_| panic!("not within {deadline:?}: {what}"))
}

/// The Secret's (ca.crt, tls.crt), once the Secret needs no change, the server serves its
/// certificate verified by its CA, and both caBundles carry it (real time).
async fn healthy(fake: &FakeApi, w: &Webhooks, sans: &[&str], what: &str) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    until(what, Duration::from_secs(20), || async {
        let s = secret(fake)?;
        let settled = certs::next_state(Some(&s), &sans, OffsetDateTime::now_utc()).ok()?.is_none();
        let (ca, crt) = secret_pem(fake)?;
        let served = handshake(w.addr.port(), &ca, "127.0.0.1").await.is_ok();
        (settled && served && bundles_are(fake, &ca)).then_some((ca, crt))
    })
    .await
}

#[tokio::test]
async fn a_deleted_secret_is_recreated_and_served() {
    let fake = fake();
    let w = start(fake.client(), &["127.0.0.1"], Options::default());
    let (first_ca, _) = healthy(&fake, &w, &["127.0.0.1"], "the first certificate served").await;
    fake.delete(SECRETS, SECRET).expect("the Secret exists");
    let (ca, _) = healthy(&fake, &w, &["127.0.0.1"], "a new Secret, served, in both caBundles").await;
    assert_ne!(ca, first_ca, "a new CA");
    until("ready again", Duration::from_secs(5), || std::future::ready(w.ready.load(Ordering::Relaxed).then_some(())))
        .await;
}

#[tokio::test]
async fn the_served_certificates_expiry_is_exported_and_follows_a_new_certificate() {
    let fake = fake();
    let w = start(fake.client(), &["127.0.0.1"], Options::default());
    let series = "myapp_operator_webhook_certificate_expiration_timestamp_seconds ";
    let exported =
        |w: &Webhooks| w.shared.metrics.encode().lines().find_map(|l| l.strip_prefix(series)?.parse::<i64>().ok());
    let (_, crt) = healthy(&fake, &w, &["127.0.0.1"], "the first certificate served").await;
    let first = certs::not_after(&crt).expect("notAfter");
    assert!(first > OffsetDateTime::now_utc().unix_timestamp(), "a fresh certificate expires in the future");
    until("the first notAfter exported", Duration::from_secs(5), || {
        std::future::ready((exported(&w) == Some(first)).then_some(()))
    })
    .await;
    // A new certificate one second later or more: a different notAfter, exported once served.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.delete(SECRETS, SECRET).expect("the Secret exists");
    let (_, crt) = healthy(&fake, &w, &["127.0.0.1"], "a new certificate served").await;
    let second = certs::not_after(&crt).expect("notAfter");
    assert!(second > first, "the new certificate was issued later");
    until("the new notAfter exported", Duration::from_secs(5), || {
        std::future::ready((exported(&w) == Some(second)).then_some(()))
    })
    .await;
}

#[tokio::test]
async fn garbage_in_each_key_is_replaced_and_served_without_a_restart() {
    let fake = fake();
    // Broken before the replica starts: it must not fail to start.
    let bundle = certs::issue(&["127.0.0.1".into()], None, OffsetDateTime::now_utc()).expect("issue");
    let mut broken = serde_json::to_value(certs::to_secret(&bundle, SECRET, NS, None)).expect("json");
    broken["data"][certs::TLS_KEY] = json!(b64("garbage"));
    fake.put(SECRETS, broken);
    let w = start(fake.client(), &["127.0.0.1"], Options::default());
    healthy(&fake, &w, &["127.0.0.1"], "a broken Secret at start healed").await;

    for key in [certs::TLS_CRT, certs::TLS_KEY, certs::CA_CRT, certs::CA_KEY] {
        let (ca, crt) = secret_pem(&fake).expect("a Secret");
        let mut s = fake.get(SECRETS, SECRET).expect("a Secret");
        s["data"][key] = json!(b64("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"));
        fake.put(SECRETS, s);
        let (new_ca, new_crt) = healthy(&fake, &w, &["127.0.0.1"], &format!("garbage in {key} replaced")).await;
        assert_ne!(new_crt, crt, "{key}: a new serving certificate");
        let ca_replaced = key == certs::CA_CRT || key == certs::CA_KEY;
        assert_eq!(new_ca != ca, ca_replaced, "{key}: the CA is replaced only when it is broken");
        assert!(w.is_running(), "no restart");
    }
}

#[tokio::test(start_paused = true)]
async fn replicas_with_different_sans_converge_in_a_bounded_number_of_writes() {
    let fake = fake();
    let a = start(fake.client(), &["svc.ns.svc", "a.example"], paused(None));
    let b = start(fake.client(), &["svc.ns.svc", "b.example"], paused(None));
    let converged = || {
        let s = secret(&fake)?;
        let sans = s.metadata.annotations.as_ref()?.get(certs::SANS)?.clone();
        let crt = certs::from_secret(&s)?.1;
        let served = |w: &Webhooks| w.loaded().borrow().as_ref().is_some_and(|p| p.crt == crt);
        (sans == "a.example,b.example,svc.ns.svc" && served(&a) && served(&b)).then_some(())
    };
    // Yield rather than sleep: replicas that rewrite in a loop never let a paused clock advance,
    // so a sleep would hang; the write count fails the test instead.
    for turn in 0.. {
        if converged().is_some() {
            break;
        }
        let so_far = writes(&fake.requests(), SECRETS);
        assert!(so_far <= 3 && turn < 100_000, "not converged after {so_far} writes of the Secret");
        tokio::task::yield_now().await;
    }
    let settled = fake.requests().len();
    // Ten periodic checks each, and the watch events of every write.
    tokio::time::sleep(CHECK_PERIOD * 10).await;
    let log = fake.requests();
    let total = writes(&log, SECRETS);
    assert!(total <= 3, "{total} writes of the Secret (a create and a merge, maybe a raced create)");
    assert_eq!(writes(&log[settled..], SECRETS), 0, "no write once settled");
}

#[tokio::test(start_paused = true)]
async fn a_ca_near_expiry_rotates_with_both_cas_in_the_ca_bundle() {
    let fake = fake();
    let t0 = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("time");
    let now = Arc::new(std::sync::Mutex::new(t0));
    let clock: Clock = {
        let now = now.clone();
        Arc::new(move || *now.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    };
    // The replica's clock and the API server's agree here; certificates follow the server's.
    fake.set_time(Some(t0));
    let set = |t: OffsetDateTime| {
        *now.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = t;
        fake.set_time(Some(t));
    };
    let w = start(fake.client(), &["127.0.0.1"], paused(Some(clock)));
    // What `pem` says, once served, in the Secret and in both caBundles alike.
    let settled = |what: &'static str, want: Box<dyn Fn(&Pem) -> bool>| {
        let (fake, loaded) = (fake.clone(), w.loaded());
        until(what, CHECK_PERIOD * 2, move || {
            let pem = loaded.borrow().clone().filter(|p| want(p));
            let found = secret_pem(&fake);
            let ok = pem.zip(found).filter(|(p, (ca, crt))| &p.ca == ca && &p.crt == crt && bundles_are(&fake, ca));
            std::future::ready(ok.map(|(p, _)| p))
        })
    };
    let first = settled("the first certificate", Box::new(|_| true)).await;
    assert_eq!(certs::ca_count(&first.ca, t0), 1);

    // 1. The CA nears its end: a next CA joins the bundle; the old one still signs.
    let t1 = t0 + certs::CA_VALIDITY - certs::CA_ROTATE_BEFORE + time::Duration::hours(1);
    set(t1);
    let published = settled("a second CA in the bundle", Box::new(move |p| certs::ca_count(&p.ca, t1) == 2)).await;
    let new_ca = published.ca.strip_prefix(&first.ca).expect("the old CA stays first").to_string();
    assert!(certs::trusts(&first.ca, &published.crt, t1), "still signed by the old CA");
    assert!(!certs::trusts(&new_ca, &published.crt, t1), "not yet by the new one");

    // 2. After the lead time, the new CA signs; both are still trusted.
    let t2 = t1 + certs::CA_PUBLISH_LEAD + time::Duration::minutes(1);
    set(t2);
    let signed_by_new = new_ca.clone();
    let want = move |p: &Pem| certs::trusts(&signed_by_new, &p.crt, t2);
    let promoted = settled("a certificate of the new CA", Box::new(want)).await;
    assert_eq!(promoted.ca, published.ca, "both CAs still trusted");

    // 3. After the overlap, the old CA leaves the bundle.
    let t3 = t2 + certs::CA_RETIRE_AFTER + time::Duration::minutes(1);
    set(t3);
    let alone = new_ca.clone();
    let last = settled("the new CA alone, everywhere", Box::new(move |p| p.ca == alone)).await;
    assert_eq!(last.crt, promoted.crt, "the serving certificate stays");
}

/// A clock `offset` from `t0`, running with tokio's (paused) clock from now on.
fn skewed(t0: OffsetDateTime, offset: time::Duration) -> Clock {
    let start = Instant::now();
    Arc::new(move || t0 + offset + Instant::now().duration_since(start))
}

/// What three replicas whose clocks are right, a year ahead and a year behind do to one Secret
/// over `period` (paused time, moved on by hand so that replicas rewriting in a loop cannot
/// stall the test): fails as soon as the Secret has been written more than `max_writes` times.
/// Returns the Secret's writes, the distinct caBundles seen, and the replicas.
async fn three_clocks(
    fake: &FakeApi,
    t0: OffsetDateTime,
    period: Duration,
    max_writes: usize,
) -> (usize, Vec<String>, Vec<Webhooks>) {
    let year = time::Duration::days(365);
    let replicas: Vec<Webhooks> = [time::Duration::ZERO, year, -year]
        .into_iter()
        .map(|offset| start(fake.client(), &["127.0.0.1"], paused(Some(skewed(t0, offset)))))
        .collect();
    let mut bundles: Vec<String> = Vec::new();
    let end = Instant::now() + period;
    while Instant::now() < end {
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let written = writes(&fake.requests(), SECRETS);
        assert!(written <= max_writes, "{written} writes of the Secret by {:?}", Instant::now() - (end - period));
        let set: Vec<String> = ca_bundles(fake).into_iter().flatten().collect();
        if let Some(ca) = set.first().filter(|_| set.len() == 4 && set.iter().all(|b| b == &set[0]))
            && bundles.last() != Some(ca)
        {
            bundles.push(ca.clone());
        }
    }
    (writes(&fake.requests(), SECRETS), bundles, replicas)
}

#[tokio::test(start_paused = true)]
async fn replicas_a_year_ahead_and_behind_agree_with_the_api_servers_clock() {
    let fake = fake();
    let t0 = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("time");
    fake.set_time(Some(t0));
    let (written, bundles, replicas) = three_clocks(&fake, t0, Duration::from_secs(2 * 3600), 1).await;
    assert_eq!(written, 1, "one create, then no rewrite in two hours");
    assert_eq!(bundles.len(), 1, "the caBundle was set once and never changed");
    let (ca, crt) = secret_pem(&fake).expect("a Secret");
    let server_now = t0 + Duration::from_secs(2 * 3600);
    assert!(certs::trusts(&ca, &crt, server_now), "valid at the API server's time, which verifies it");
    for (i, w) in replicas.iter().enumerate() {
        assert_eq!(w.loaded().borrow().as_ref().map(|p| p.crt.as_str()), Some(crt.as_str()), "replica {i} serves it");
    }
}

#[tokio::test(start_paused = true)]
async fn without_the_api_servers_clock_skewed_replicas_rewrite_within_the_bound() {
    let fake = fake();
    fake.set_time(None);
    let t0 = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("time");
    let hours = 2;
    // A create, then at most the bound per replica and window: the skewed replicas do disagree.
    let bound = 1 + 3 * certs::MAX_REWRITES * hours;
    let period = certs::REWRITE_WINDOW * u32::try_from(hours).expect("hours") - Duration::from_secs(60);
    let (written, bundles, _replicas) = three_clocks(&fake, t0, period, bound).await;
    assert!(written <= bound, "{written} writes");
    assert!(written > 1, "the replicas do disagree without a shared clock, so the bound is what holds");
    assert!(bundles.len() <= bound, "the caBundle changed {} times", bundles.len());
    // The last hour alone: within one window's bound for three replicas.
    let before = fake.requests().len();
    let (mut last_hour, mut flips) = (0, 0);
    let mut ca = ca_bundles(&fake);
    let end = Instant::now() + certs::REWRITE_WINDOW - Duration::from_secs(60);
    while Instant::now() < end {
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        last_hour = writes(&fake.requests()[before..], SECRETS);
        assert!(last_hour <= 3 * certs::MAX_REWRITES, "{last_hour} writes in an hour");
        let now = ca_bundles(&fake);
        flips += usize::from(now != ca);
        ca = now;
    }
    assert!(flips <= 3 * certs::MAX_REWRITES, "{flips} caBundle changes in an hour ({last_hour} writes)");
}

#[tokio::test(start_paused = true)]
async fn a_wiped_ca_bundle_is_restored_by_one_write_on_the_watch() {
    let fake = fake();
    let replicas =
        [start(fake.client(), &["127.0.0.1"], paused(None)), start(fake.client(), &["127.0.0.1"], paused(None))];
    let ca = until("both replicas serving, the caBundles set", Duration::from_secs(30), || {
        let ca = secret_pem(&fake).map(|(ca, _)| ca);
        let served = |w: &Webhooks| w.loaded().borrow().as_ref().map(|p| p.ca.clone()) == ca;
        std::future::ready(ca.clone().filter(|ca| replicas.iter().all(served) && bundles_are(&fake, ca)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = fake.requests().len();
    assert_eq!(writes(&fake.requests(), MUTATING) + writes(&fake.requests(), VALIDATING), 2, "one write each at start");

    // A re-apply of webhooks.yaml: the validating configuration loses its caBundle.
    fake.put(VALIDATING, configuration("ValidatingWebhookConfiguration"));
    let started = Instant::now();
    until("the caBundle restored", Duration::from_secs(3), || {
        std::future::ready(bundles_are(&fake, &ca).then_some(()))
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(1), "on the watch, not on the {CHECK_PERIOD:?} check");
    tokio::time::sleep(CHECK_PERIOD * 5).await;
    let log = fake.requests();
    assert_eq!(writes(&log[before..], VALIDATING), 1, "one write repairs it, whoever races");
    assert_eq!(writes(&log[before..], MUTATING), 0, "no write where nothing drifted");
    let patches = log[before..].iter().filter(|r| r.method == http::Method::PATCH).count();
    assert!(patches <= replicas.len(), "at most one attempt per replica ({patches})");
}

#[tokio::test(start_paused = true)]
async fn with_the_api_server_blackholed_the_start_stays_alive_and_recovers() {
    let fake = fake();
    fake.set_blackhole(true);
    // As in production: every call bounded by the client's timeout layer.
    let service =
        tower::ServiceBuilder::new().layer(crate::client::CallTimeoutLayer::default()).service(fake.service());
    let w = start(kube::Client::new(service, "default"), &["127.0.0.1"], paused(None));
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    assert!(w.is_running(), "the upkeep keeps trying");
    assert!(w.loaded().borrow().is_none());

    fake.set_blackhole(false);
    let started = Instant::now();
    let pem = until("a certificate once the API server answers", RETRY_MAX * 3, || {
        std::future::ready(w.loaded().borrow().clone())
    })
    .await;
    // A pass that was waiting on the blackhole times out, then one backoff step.
    assert!(started.elapsed() <= PASS_TIMEOUT + RETRY_MAX, "{:?}", started.elapsed());
    assert_eq!(secret_pem(&fake).map(|(_, crt)| crt).as_deref(), Some(pem.crt.as_str()));
    // And it serves: a real handshake, in real time.
    tokio::time::resume();
    handshake(w.addr.port(), &pem.ca, "127.0.0.1").await.expect("the server answers TLS with the new certificate");
}
