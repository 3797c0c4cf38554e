//! The webhook server's life: certificate source, hot reload, caBundle, readiness self-check.

use super::certs::{self, Plan};
use super::{Shared, server};
use anyhow::{Context, Result, bail};
use axum_server::tls_rustls::RustlsConfig;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// A Secret shared by every replica, created and renewed by them; the CA is patched into the
    /// webhook configurations named `config`.
    SelfManaged {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        secret: String,
        /// SANs of the serving certificate.
        sans: Vec<String>,
        /// Name of the Mutating- and ValidatingWebhookConfiguration.
        config: String,
    },
    /// `tls.crt`, `tls.key` and `ca.crt` in a folder (e.g. a mounted cert-manager Secret).
    Dir {
        /// The folder.
        dir: PathBuf,
        /// A name the certificate is valid for, used by the readiness self-check.
        server_name: String,
    },
}

/// A running webhook server.
pub struct Webhooks {
    /// True while a certificate is loaded and a TLS handshake with the server succeeds.
    pub ready: Arc<AtomicBool>,
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: server::Server,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Pem {
    ca: String,
    crt: String,
    key: String,
}

async fn ensure_secret(api: &Api<Secret>, name: &str, namespace: &str, sans: &[String]) -> Result<Pem> {
    for _ in 0..10 {
        let now = OffsetDateTime::now_utc();
        let found = api.get_opt(name).await?;
        let (bundle, rv) = match &found {
            None => (certs::issue(sans, None, now)?, None),
            Some(s) => match certs::plan(s, sans, now) {
                Plan::Keep => {
                    let (ca, crt, key) = certs::from_secret(s).context("certificate Secret is incomplete")?;
                    return Ok(Pem { ca, crt, key });
                }
                Plan::Renew => {
                    let data = s.data.clone().unwrap_or_default();
                    let text =
                        |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).unwrap_or_default();
                    let (ca, ca_key) = (text(certs::CA_CRT), text(certs::CA_KEY));
                    (certs::issue(sans, Some((&ca, &ca_key)), now)?, s.resource_version())
                }
                Plan::Recreate => (certs::issue(sans, None, now)?, s.resource_version()),
            },
        };
        let secret = certs::to_secret(&bundle, name, namespace, rv.clone());
        let result = match rv {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match result {
            Ok(_) => {
                tracing::info!(secret = name, "webhook certificate issued");
                return Ok(Pem { ca: bundle.ca_crt, crt: bundle.tls_crt, key: bundle.tls_key });
            }
            // Another replica created or renewed it first: use theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("could not settle the webhook certificate Secret after 10 attempts")
}

/// Adds `ca` as the caBundle of every webhook of `api`'s object `name` that does not carry it.
/// A missing object, or one that carries it everywhere, costs no write.
async fn patch_ca_bundles<K>(
    api: Api<K>,
    name: &str,
    ca: &[u8],
    bundles: impl Fn(&K) -> Vec<Option<Vec<u8>>>,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use base64::Engine;
    use json_patch::{AddOperation, PatchOperation};
    let Some(obj) = api.get_opt(name).await? else { return Ok(()) };
    let value = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(ca));
    let ops: Vec<PatchOperation> = bundles(&obj)
        .iter()
        .enumerate()
        .filter(|(_, current)| current.as_deref() != Some(ca))
        .map(|(i, _)| {
            let path = jsonptr::PointerBuf::from_tokens(["webhooks", &i.to_string(), "clientConfig", "caBundle"]);
            PatchOperation::Add(AddOperation { path, value: value.clone() })
        })
        .collect();
    if ops.is_empty() {
        return Ok(());
    }
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(json_patch::Patch(ops))).await?;
    tracing::info!(config = name, kind = %K::kind(&()), "caBundle patched");
    Ok(())
}

/// Patches the CA into every webhook of the configurations named `config`, where it differs.
async fn ensure_ca_bundle(client: &Client, config: &str, ca: &str) -> Result<()> {
    let ca = ca.as_bytes();
    patch_ca_bundles(Api::<MutatingWebhookConfiguration>::all(client.clone()), config, ca, |m| {
        m.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone())).collect()
    })
    .await?;
    patch_ca_bundles(Api::<ValidatingWebhookConfiguration>::all(client.clone()), config, ca, |v| {
        v.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone())).collect()
    })
    .await
}

fn read_dir(dir: &std::path::Path) -> Result<Pem> {
    let r = |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("read {}/{f}", dir.display()));
    Ok(Pem { ca: r(certs::CA_CRT)?, crt: r(certs::TLS_CRT)?, key: r(certs::TLS_KEY)? })
}

/// One TLS handshake with our own server, verifying its certificate against `ca`.
async fn handshake(port: u16, ca: &str, server_name: &str) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.context("CA PEM")?)?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string())?;
    let tcp =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(("127.0.0.1", port))).await??;
    tokio::time::timeout(Duration::from_secs(2), connector.connect(name, tcp)).await??;
    Ok(())
}

impl Webhooks {
    /// Obtains a certificate (blocking until there is one), starts serving on `addr`, and keeps
    /// the certificate, the caBundle and the readiness up to date in the background.
    pub async fn start(client: Client, addr: SocketAddr, source: CertSource, shared: Arc<Shared>) -> Result<Self> {
        let pem = match &source {
            CertSource::SelfManaged { namespace, secret, sans, config } => {
                let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                let pem = ensure_secret(&api, secret, namespace, sans).await?;
                if let Err(e) = ensure_ca_bundle(&client, config, &pem.ca).await {
                    tracing::warn!(error = %e, "could not patch the caBundle; retrying later");
                }
                pem
            }
            CertSource::Dir { dir, .. } => read_dir(dir)?,
        };
        let tls = RustlsConfig::from_pem(pem.crt.clone().into_bytes(), pem.key.clone().into_bytes()).await?;
        let listener = server::bind(addr).with_context(|| format!("bind the webhook server on {addr}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let ready = Arc::new(AtomicBool::new(false));
        let server_name = match &source {
            CertSource::SelfManaged { sans, .. } => sans.first().cloned().unwrap_or_else(|| "localhost".into()),
            CertSource::Dir { server_name, .. } => server_name.clone(),
        };
        let ca = Arc::new(std::sync::Mutex::new(pem.ca.clone()));
        let mut tasks = Vec::new();
        let server = server::Server::spawn(listener, tls.clone(), shared.clone())?;
        tracing::info!(addr = %local, "webhook server listening");
        {
            let (ready, ca, name) = (ready.clone(), ca.clone(), server_name.clone());
            let port = local.port();
            tasks.push(tokio::spawn(async move {
                loop {
                    let current = ca.lock().map(|c| c.clone()).unwrap_or_default();
                    let ok = handshake(port, &current, &name).await;
                    if let Err(e) = &ok {
                        tracing::debug!(error = %e, "webhook self-check failed");
                    }
                    ready.store(ok.is_ok(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(if ok.is_ok() { 5 } else { 1 })).await;
                }
            }));
        }
        tasks.push(tokio::spawn(maintain(client, source, tls, pem.crt, ca)));
        Ok(Self { ready, addr: local, shared, server, tasks })
    }

    /// Starts the drain: each connection is closed after its next request (GOAWAY on HTTP/2),
    /// while the server still accepts, for callers that have not yet seen this replica leave.
    pub fn begin_drain(&self) {
        server::begin_drain(&self.shared);
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then stops; returns
    /// once the server has stopped (see [`server::Server::shutdown`]).
    pub async fn shutdown(self, grace: Duration) -> Result<(), server::DrainTimeout> {
        for t in &self.tasks {
            t.abort();
        }
        self.server.shutdown(grace).await
    }
}

/// Keeps the certificate current: on every change of the Secret (or the files) and at least
/// once a minute, renew if due, reload if changed, and fix the caBundle if it drifted.
async fn maintain(
    client: Client,
    source: CertSource,
    tls: RustlsConfig,
    mut loaded: String,
    ca: Arc<std::sync::Mutex<String>>,
) {
    let mut changes = match &source {
        CertSource::SelfManaged { namespace, secret, .. } => {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let config = watcher::Config::default().fields(&format!("metadata.name={secret}"));
            watcher(api, config)
                .backoff(crate::controller::cache::watch_backoff())
                .applied_objects()
                .map(|_| ())
                .boxed()
        }
        CertSource::Dir { .. } => futures::stream::pending().boxed(),
    };
    loop {
        let period = match source {
            CertSource::SelfManaged { .. } => Duration::from_secs(60),
            CertSource::Dir { .. } => Duration::from_secs(10),
        };
        tokio::select! {
            _ = changes.next() => {}
            _ = tokio::time::sleep(period) => {}
        }
        let pem = match &source {
            CertSource::SelfManaged { namespace, secret, sans, config } => {
                let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                match ensure_secret(&api, secret, namespace, sans).await {
                    Ok(p) => {
                        if let Err(e) = ensure_ca_bundle(&client, config, &p.ca).await {
                            tracing::warn!(error = %e, "could not patch the caBundle");
                        }
                        p
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook certificate check failed");
                        continue;
                    }
                }
            }
            CertSource::Dir { dir, .. } => match read_dir(dir) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the webhook certificate failed");
                    continue;
                }
            },
        };
        if pem.crt != loaded {
            match tls.reload_from_pem(pem.crt.clone().into_bytes(), pem.key.into_bytes()).await {
                Ok(()) => {
                    tracing::info!("webhook certificate reloaded");
                    loaded = pem.crt;
                    if let Ok(mut c) = ca.lock() {
                        *c = pem.ca;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reloading the webhook certificate failed"),
            }
        }
    }
}
