//! Webhook latency: the handler in process, and over TLS on loopback against a running replica
//! from this separate process (sequential for latency, 16 at a time for throughput).
//!
//! [`abuse`] needs no cluster: it starts the webhook server alone in a child process (the hidden
//! `cargo xtask webhook-server`, with the operator's default limits and a throwaway certificate),
//! and measures legitimate admissions and the server's RSS while this process holds hundreds of
//! slow connections and sends oversized bodies in a loop.

use anyhow::{Context, Result};
use myapp_operator::api::policy::Policy;
use myapp_operator::webhook::review::{self, Endpoint};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

fn body() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "bench", "operation": "CREATE", "name": "web", "namespace": "default",
            "kind": {"group": "myapp.dev", "version": "v1", "kind": "MyApp"},
            "resource": {"group": "myapp.dev", "version": "v1", "resource": "myapps"},
            "userInfo": {"username": "bench"},
            "object": {"apiVersion": "myapp.dev/v1", "kind": "MyApp", "metadata": {"name": "web", "namespace": "default"},
                       "spec": {"image": "nginx:1.27", "replicas": 2, "env": [{"name": "A", "value": "1"}],
                                "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}}}
        }
    }))
    .unwrap_or_default()
}

/// Latency figures in microseconds and throughput in requests per second.
pub struct Figures {
    /// In process: (p50, p99) µs per `/validate` answer, and per `/mutate`.
    pub in_process: [(f64, f64); 2],
    /// Over TLS, sequential: (p50, p99) µs.
    pub tls: Option<(f64, f64)>,
    /// Over TLS, 16 concurrent clients: requests per second.
    pub tls_rps: Option<f64>,
}

/// Runs the benchmark; `tls` is the running server and the CA to trust, if any.
pub async fn run(tls: Option<(&str, &str)>) -> Result<Figures> {
    let body = body();
    let policy = Policy::default();
    let mut in_process = [(0.0, 0.0); 2];
    for (i, endpoint) in [Endpoint::Validate, Endpoint::Mutate].into_iter().enumerate() {
        let mut samples = Vec::with_capacity(20_000);
        for _ in 0..20_000 {
            let t = Instant::now();
            let r = review::answer(&body, endpoint, &policy);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(r);
        }
        in_process[i] = crate::sh::percentiles(&samples);
    }
    let (mut tls_lat, mut tls_rps) = (None, None);
    if let Some((url, ca)) = tls {
        let client = crate::tls::client(url, ca)?;
        for _ in 0..200 {
            call(client.clone(), body.clone()).await?;
        }
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            call(client.clone(), body.clone()).await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        tls_lat = Some(crate::sh::percentiles(&samples));
        let until = Instant::now() + Duration::from_secs(3);
        let workers: Vec<_> = (0..16)
            .map(|_| {
                let (client, body) = (client.clone(), body.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < until {
                        if call(client.clone(), body.clone()).await.is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w.await.unwrap_or(0);
        }
        tls_rps = Some(total as f64 / 3.0);
    }
    Ok(Figures { in_process, tls: tls_lat, tls_rps })
}

/// A client of the webhook server at `url` that trusts `ca` (HTTP/1.1, connections reused).
/// One `/validate` admission.
async fn call(client: kube::Client, body: Vec<u8>) -> Result<String> {
    let req = http::Request::post("/validate").header("content-type", "application/json").body(body)?;
    client.request_text(req).await.map_err(anyhow::Error::from)
}

/// The hidden `cargo xtask webhook-server`: the operator's webhook server with its default
/// limits, on 127.0.0.1:0 with a throwaway certificate, until stdin closes. Prints one JSON line,
/// `{"addr": …, "ca": …}`.
pub async fn serve() -> Result<()> {
    use myapp_operator::telemetry::metrics::Metrics;
    use myapp_operator::webhook::{Shared, certs, limits::Limits, server};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bundle = certs::issue(&["127.0.0.1".into()], None, time::OffsetDateTime::now_utc())?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(bundle.tls_crt.into_bytes(), bundle.tls_key.into_bytes())
        .await?;
    let listener = server::bind("127.0.0.1:0".parse()?)?;
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared::new(Policy::default(), Arc::new(Metrics::default()), Limits::default()));
    let running = server::Server::spawn(listener, tls, shared)?;
    println!("{}", serde_json::json!({"addr": running.addr.to_string(), "ca": bundle.ca_crt}));
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
    running.shutdown(Duration::from_secs(1)).await?;
    Ok(())
}

/// What the attackers saw, counted as it happens.
#[derive(Default)]
struct Attack {
    /// Slow connections open now.
    slow_open: AtomicUsize,
    /// Slow connections the server cut off.
    slow_cut: AtomicUsize,
    /// Oversized bodies sent, and those answered 413.
    oversized_sent: AtomicUsize,
    oversized_413: AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(addr: std::net::SocketAddr, tls: &tokio_rustls::TlsConnector) -> Option<Tls> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
    tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp)).await.ok()?.ok()
}

/// A slowloris: sends half a request head (even `i`) or a whole head and then a body (odd `i`),
/// one line or byte a second, until the server cuts it off; then again.
async fn slow_client(i: usize, addr: std::net::SocketAddr, tls: tokio_rustls::TlsConnector, attack: Arc<Attack>) {
    use tokio::io::AsyncWriteExt;
    while !attack.stop.load(Ordering::Relaxed) {
        let Some(mut conn) = connect(addr, &tls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        attack.slow_open.fetch_add(1, Ordering::Relaxed);
        let headers_only = i.is_multiple_of(2);
        let head: &[u8] = if headers_only {
            b"POST /validate HTTP/1.1\r\nHost: x\r\n"
        } else {
            b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3000000\r\n\r\n{"
        };
        let mut ok = conn.write_all(head).await.is_ok() && conn.flush().await.is_ok();
        while ok && !attack.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let more: &[u8] = if headers_only { b"X-Slow: 1\r\n" } else { b" " };
            ok = conn.write_all(more).await.is_ok() && conn.flush().await.is_ok();
        }
        attack.slow_open.fetch_sub(1, Ordering::Relaxed);
        if !ok {
            attack.slow_cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends oversized bodies in a loop, announced (`Content-Length` over the limit) and not
/// (chunked, 4 MiB as fast as the server reads), and counts the 413s.
async fn oversized_client(i: usize, addr: std::net::SocketAddr, tls: tokio_rustls::TlsConnector, attack: Arc<Attack>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chunk = vec![b' '; 64 * 1024];
    let mut n = i;
    while !attack.stop.load(Ordering::Relaxed) {
        n += 1;
        let Some(conn) = connect(addr, &tls).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (mut rd, mut wr) = tokio::io::split(conn);
        let writer = async {
            if n.is_multiple_of(2) {
                let head = "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8388608\r\n\r\n";
                let _ = wr.write_all(head.as_bytes()).await;
                for _ in 0..128 {
                    if wr.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            } else {
                let head = "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                let _ = wr.write_all(head.as_bytes()).await;
                for _ in 0..64 {
                    let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                    if wr.write_all(&framed).await.is_err() {
                        break;
                    }
                }
                let _ = wr.write_all(b"0\r\n\r\n").await;
            }
            let _ = wr.flush().await;
        };
        let reader = async {
            let mut status = [0u8; 12];
            let got = rd.read_exact(&mut status).await.is_ok();
            got && &status[9..12] == b"413"
        };
        attack.oversized_sent.fetch_add(1, Ordering::Relaxed);
        let (_, refused) = tokio::join!(tokio::time::timeout(Duration::from_secs(15), writer), reader);
        if refused {
            attack.oversized_413.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Legitimate `/validate` admissions from `workers` clients, sequential each, for `period`:
/// latencies in milliseconds and the number that failed.
async fn legitimate(client: &kube::Client, workers: usize, period: Duration) -> (Vec<f64>, usize) {
    let until = Instant::now() + period;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let (mut lat, mut failed) = (Vec::new(), 0);
                while Instant::now() < until {
                    let t = Instant::now();
                    match call(client.clone(), body()).await {
                        Ok(answer) if answer.contains("\"uid\":\"bench\"") => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        _ => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((lat, f)) = t.await {
            all.extend(lat);
            failed += f;
        }
    }
    (all, failed)
}

/// Legitimate admissions in one period: how many were answered and failed, and their latency.
#[derive(Serialize)]
pub struct Admissions {
    pub n: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Admissions {
    fn of(lat: &[f64], failed: usize) -> Self {
        let (p50_ms, p99_ms) = crate::sh::percentiles(lat);
        let max_ms = lat.iter().copied().fold(0.0, f64::max);
        Admissions { n: lat.len(), failed, p50_ms, p99_ms, max_ms }
    }
}

/// The slow connections of the attack.
#[derive(Serialize)]
pub struct Slow {
    pub target: usize,
    pub open_min: usize,
    pub open_max: usize,
    pub cut_off_total: usize,
}

/// The oversized bodies of the attack.
#[derive(Serialize)]
pub struct Oversized {
    pub senders: usize,
    pub sent: usize,
    pub answered_413: usize,
}

/// The server's resident memory, MiB.
#[derive(Serialize)]
pub struct ServerRss {
    pub idle: f64,
    pub max_under_abuse: f64,
    pub pod_limit: f64,
}

/// What [`abuse`] measured.
#[derive(Serialize)]
pub struct AbuseReport {
    pub load_average_at_end: String,
    pub server_build: &'static str,
    pub legitimate_clients: usize,
    pub period_s: f64,
    pub alone: Admissions,
    pub under_abuse: Admissions,
    pub slow_connections: Slow,
    pub oversized: Oversized,
    pub rss_mib: ServerRss,
}

/// Options of the abuse run.
pub struct AbuseArgs {
    /// Slow connections held at once.
    pub slow: usize,
    /// Clients sending oversized bodies in a loop.
    pub oversized: usize,
    /// Legitimate clients (sequential each).
    pub workers: usize,
    /// How long legitimate admissions are measured, before and under the abuse.
    pub period: Duration,
    /// The pod's memory limit, MiB (deploy/manager/deployment.yaml).
    pub limit_mib: f64,
}

/// Starts `cargo xtask webhook-server` as a child process: the child, its address and its CA.
fn start_server() -> Result<(std::process::Child, std::net::SocketAddr, String)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("webhook-server")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the webhook server")?;
    let line = {
        let out = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line)?;
        line
    };
    let info: serde_json::Value = serde_json::from_str(&line).context("the server's address line")?;
    let (addr, ca) = (info["addr"].as_str().unwrap_or_default(), info["ca"].as_str().unwrap_or_default());
    let addr: std::net::SocketAddr = addr.parse().context("server address")?;
    Ok((child, addr, ca.to_string()))
}

/// Starts `slow` slow clients and `oversized` senders against `addr`, until `attack.stop`. They
/// run on a runtime of their own, as if from another pod: the legitimate client's tasks do not
/// queue behind theirs in this process (the CPU is still shared).
fn spawn_attackers(
    attack: Arc<Attack>,
    tls: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    slow: usize,
    oversized: usize,
) -> Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    Ok(std::thread::spawn(move || {
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for i in 0..slow {
                tasks.push(tokio::spawn(slow_client(i, addr, tls.clone(), attack.clone())));
            }
            for i in 0..oversized {
                tasks.push(tokio::spawn(oversized_client(i, addr, tls.clone(), attack.clone())));
            }
            while !attack.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for t in tasks {
                t.abort();
            }
        });
        rt.shutdown_background();
    }))
}

/// Samples the server's RSS (max, MiB) and the slow connections open (min, max) every 50 ms until
/// `attack.stop`.
fn sample(attack: Arc<Attack>, pid: u32) -> tokio::task::JoinHandle<(f64, usize, usize)> {
    tokio::spawn(async move {
        let (mut rss_max, mut open_min, mut open_max) = (0.0f64, usize::MAX, 0);
        while !attack.stop.load(Ordering::Relaxed) {
            rss_max = rss_max.max(crate::sh::rss_mib(pid).unwrap_or(0.0));
            let open = attack.slow_open.load(Ordering::Relaxed);
            (open_min, open_max) = (open_min.min(open), open_max.max(open));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (rss_max, open_min, open_max)
    })
}

/// Runs the webhook server alone in a child process and measures it before and under abuse.
pub async fn abuse(args: AbuseArgs) -> Result<AbuseReport> {
    let (mut child, addr, ca) = start_server()?;
    let pid = child.id();
    let client = crate::tls::client(&format!("https://{addr}"), &ca)?;
    let tls = crate::tls::connector(&ca)?;
    for _ in 0..200 {
        call(client.clone(), body()).await?;
    }
    let idle = crate::sh::rss_mib(pid).unwrap_or(0.0);
    println!("==> webhook abuse: {} legitimate clients alone for {:?}", args.workers, args.period);
    let (base, base_failed) = legitimate(&client, args.workers, args.period).await;

    let attack = Arc::new(Attack::default());
    let attackers = spawn_attackers(attack.clone(), tls, addr, args.slow, args.oversized)?;
    let held =
        chaos::wait::poll("the slow connections open", Duration::from_secs(60), Duration::from_millis(100), || {
            let n = attack.slow_open.load(Ordering::Relaxed);
            async move { (n * 10 >= args.slow * 9).then_some(n) }
        })
        .await
        .unwrap_or(0);
    println!("==> under abuse: {held} slow connections, {} oversized senders, for {:?}", args.oversized, args.period);
    let sampler = sample(attack.clone(), pid);
    let (under, under_failed) = legitimate(&client, args.workers, args.period).await;
    attack.stop.store(true, Ordering::Relaxed);
    let (rss_max, open_min, open_max) = sampler.await.unwrap_or((0.0, 0, 0));
    let _ = tokio::task::spawn_blocking(move || attackers.join()).await;
    let (sent, refused) = (attack.oversized_sent.load(Ordering::Relaxed), attack.oversized_413.load(Ordering::Relaxed));
    drop(child.stdin.take());
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok(AbuseReport {
        load_average_at_end: load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        server_build: if cfg!(debug_assertions) { "debug" } else { "release" },
        legitimate_clients: args.workers,
        period_s: args.period.as_secs_f64(),
        alone: Admissions::of(&base, base_failed),
        under_abuse: Admissions::of(&under, under_failed),
        slow_connections: Slow {
            target: args.slow,
            open_min,
            open_max,
            cut_off_total: attack.slow_cut.load(Ordering::Relaxed),
        },
        oversized: Oversized { senders: args.oversized, sent, answered_413: refused },
        rss_mib: ServerRss { idle, max_under_abuse: rss_max, pod_limit: args.limit_mib },
    })
}

impl AbuseReport {
    /// The table's rows.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            ("server build".to_string(), self.server_build.to_string()),
            ("load average (1, 5, 15 min) at the end".into(), self.load_average_at_end.clone()),
        ];
        for (label, s) in [("alone", &self.alone), ("under abuse", &self.under_abuse)] {
            let latency = format!("{:.2} / {:.2} / {:.2}", s.p50_ms, s.p99_ms, s.max_ms);
            rows.push((format!("legitimate /validate {label}: p50 / p99 / max (ms)"), latency));
            rows.push((format!("legitimate /validate {label}: answered / failed"), format!("{} / {}", s.n, s.failed)));
        }
        let (slow, big, rss) = (&self.slow_connections, &self.oversized, &self.rss_mib);
        rows.extend([
            (
                "slow connections held (min..max of target)".to_string(),
                format!("{}..{} of {}", slow.open_min, slow.open_max, slow.target),
            ),
            ("slow connections cut off by the server".into(), slow.cut_off_total.to_string()),
            (
                "oversized bodies sent / answered 413 (whole attack)".into(),
                format!("{} / {}", big.sent, big.answered_413),
            ),
            (
                "server RSS idle -> max under abuse (MiB)".into(),
                format!("{:.2} -> {:.2}", rss.idle, rss.max_under_abuse),
            ),
            ("pod memory limit (MiB)".into(), format!("{:.2}", rss.pod_limit)),
        ]);
        rows
    }
}
