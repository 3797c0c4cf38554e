//! Webhook latency: the handler in process, and over TLS on loopback against a running replica
//! from this separate process (sequential for latency, 16 at a time for throughput).

use anyhow::{Context, Result};
use myapp_operator::webhook::policy::Policy;
use myapp_operator::webhook::review::{self, Kind};
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

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v.get(((p * v.len() as f64).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    (at(0.5), at(0.99))
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
    for (i, kind) in [Kind::Validate, Kind::Mutate].into_iter().enumerate() {
        let mut samples = Vec::with_capacity(20_000);
        for _ in 0..20_000 {
            let t = Instant::now();
            let r = review::answer(&body, kind, &policy);
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(r);
        }
        in_process[i] = percentiles(samples);
    }
    let (mut tls_lat, mut tls_rps) = (None, None);
    if let Some((url, ca)) = tls {
        let mut config = kube::Config::new(url.parse().context("webhook URL")?);
        config.root_cert = Some(pem_certs(ca).context("CA")?);
        config.tls_server_name = Some("127.0.0.1".into());
        let client = kube::Client::try_from(config)?;
        let call = |client: kube::Client, body: Vec<u8>| async move {
            let req = http::Request::post("/validate").header("content-type", "application/json").body(body)?;
            client.request_text(req).await.map_err(anyhow::Error::from)
        };
        for _ in 0..200 {
            call(client.clone(), body.clone()).await?;
        }
        let mut samples = Vec::with_capacity(2000);
        for _ in 0..2000 {
            let t = Instant::now();
            call(client.clone(), body.clone()).await?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        tls_lat = Some(percentiles(samples));
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

fn pem_certs(pem: &str) -> Result<Vec<Vec<u8>>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| Ok(c?.to_vec())).collect()
}
