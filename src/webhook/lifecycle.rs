//! The webhook server's life: it binds at once, serves the certificate the upkeep
//! ([`super::certs`]) obtains, hot-reloads it, and keeps the readiness self-check.
//!
//! # Guarantees
//!
//! - **Starting never waits for the API server, and never fails because of it.**
//!   [`Webhooks::start`] binds the port and returns; a task then obtains the certificate, pass
//!   after pass of the upkeep, bounded and retried with backoff (see [`super::certs`]) for as
//!   long as it takes. While it backs off, watch events do not cut the wait short. Until a
//!   certificate is loaded the port completes no TLS handshake and `ready` stays false; the
//!   process lives on (`/livez` does not depend on any of this).
//! - **Reloads without a restart.** A changed certificate is swapped into the running server
//!   (connections in flight are untouched). One that does not load is an error of the pass,
//!   retried; the server keeps the last good one.
//! - **Readiness** (`ready`) is true only while a TLS handshake with our own port, verified
//!   against the current trust bundle, succeeds.

use super::certs::{self, CertSource, Clock, Pem, Upkeep, UpkeepError};
use super::server;
use super::shared::Shared;
use axum_server::tls_rustls::RustlsConfig;
use futures::{FutureExt, StreamExt};
use kube::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

/// Why [`Webhooks::start`] failed: only local causes, never the API server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The port could not be bound.
    #[error("bind the webhook server on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// How [`Webhooks::start_with`] runs; the default is production's.
#[derive(Clone)]
pub struct Options {
    /// The readiness flag to keep (the probe server may hold it before the webhooks start).
    pub ready: Arc<AtomicBool>,
    pub(crate) clock: Clock,
    pub(crate) self_check: bool,
}

impl Options {
    /// The defaults, keeping `ready` as the readiness flag.
    pub fn with_ready(ready: Arc<AtomicBool>) -> Self {
        Self { ready, ..Self::default() }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self { ready: Arc::default(), clock: Arc::new(OffsetDateTime::now_utc), self_check: true }
    }
}

/// A running webhook server.
pub struct Webhooks {
    /// True while a certificate is loaded and a TLS handshake with the server succeeds.
    pub ready: Arc<AtomicBool>,
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: oneshot::Sender<Duration>,
    life: tokio::task::JoinHandle<Result<(), server::DrainTimeout>>,
    check: Option<tokio::task::JoinHandle<()>>,
    #[cfg(test)]
    loaded: watch::Receiver<Option<Pem>>,
}

/// Why the self-check's handshake failed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    /// The trust bundle does not parse.
    #[error("the trust bundle: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// A CA in the bundle is not usable as a root.
    #[error("a CA in the trust bundle: {0}")]
    Root(#[from] rustls::Error),
    /// The server name is not a valid DNS name or address.
    #[error("the server name: {0}")]
    Name(#[from] rustls::pki_types::InvalidDnsNameError),
    /// Connecting or the handshake failed.
    #[error("connect or handshake: {0}")]
    Io(#[from] std::io::Error),
    /// Connecting or the handshake took over 2 s.
    #[error("timed out")]
    Timeout(#[from] tokio::time::error::Elapsed),
}

/// One TLS handshake with our own server, verifying its certificate against `ca`.
async fn handshake(port: u16, ca: &str, server_name: &str) -> Result<(), HandshakeError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string())?;
    let tcp =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(("127.0.0.1", port))).await??;
    tokio::time::timeout(Duration::from_secs(2), connector.connect(name, tcp)).await??;
    Ok(())
}

/// Keeps `ready` equal to "a handshake against the loaded trust bundle succeeds": every 5 s
/// while it does, every second while it does not, and at once when the certificate changes.
async fn self_check(port: u16, name: String, ready: Arc<AtomicBool>, mut loaded: watch::Receiver<Option<Pem>>) {
    loop {
        let current = loaded.borrow_and_update().clone();
        let ok = match current {
            Some(pem) => match handshake(port, &pem.ca, &name).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "webhook self-check failed");
                    false
                }
            },
            None => false,
        };
        ready.store(ok, Ordering::Relaxed);
        let wait = Duration::from_secs(if ok { 5 } else { 1 });
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = loaded.changed() => if changed.is_err() { return },
        }
    }
}

/// The state of the life task: the server once a certificate is loaded.
struct Life {
    upkeep: Upkeep,
    shared: Arc<Shared>,
    /// The bound listener, until the server takes it.
    listener: Option<std::net::TcpListener>,
    server: Option<(server::Server, RustlsConfig)>,
    loaded: watch::Sender<Option<Pem>>,
}

impl Life {
    /// Serves `pem`: starts the server with it, or swaps it in.
    async fn load(&mut self, pem: Pem) -> Result<(), UpkeepError> {
        let same_key = self.loaded.borrow().as_ref().is_some_and(|l| l.crt == pem.crt && l.key == pem.key);
        if !same_key {
            let (crt, key) = (pem.crt.clone().into_bytes(), pem.key.clone().into_bytes());
            match &self.server {
                Some((_, tls)) => tls.reload_from_pem(crt, key).await.map_err(UpkeepError::Load)?,
                None => {
                    let tls = RustlsConfig::from_pem(crt, key).await.map_err(UpkeepError::Load)?;
                    let listener = match &self.listener {
                        Some(l) => l.try_clone().map_err(UpkeepError::Load)?,
                        None => return Err(UpkeepError::Load(std::io::Error::other("the listener is gone"))),
                    };
                    let server =
                        server::Server::spawn(listener, tls.clone(), self.shared.clone()).map_err(UpkeepError::Load)?;
                    tracing::info!(addr = %server.addr, "webhook server serving");
                    self.listener = None;
                    self.server = Some((server, tls));
                }
            }
            match certs::not_after(&pem.crt) {
                Some(t) => self.shared.metrics.certificate_loaded(t),
                None => tracing::warn!("the loaded webhook certificate has no readable notAfter"),
            }
            tracing::info!("webhook certificate loaded");
        }
        self.loaded.send_if_modified(|l| {
            let changed = l.as_ref() != Some(&pem);
            *l = Some(pem);
            changed
        });
        Ok(())
    }

    async fn stop(self, grace: Duration) -> Result<(), server::DrainTimeout> {
        match self.server {
            Some((s, _)) => s.shutdown(grace).await,
            None => Ok(()),
        }
    }

    /// Passes until told to stop: at once, then on events, on failure with backoff, and at
    /// least every period.
    async fn run(mut self, mut stop: oneshot::Receiver<Duration>) -> Result<(), server::DrainTimeout> {
        let mut triggers = self.upkeep.triggers();
        let (mut wait, mut failures) = (Duration::ZERO, 0u32);
        loop {
            let woke = tokio::select! {
                grace = &mut stop => Err(grace.unwrap_or_default()),
                () = tokio::time::sleep(wait) => Ok(()),
                Some(()) = triggers.next(), if failures == 0 => {
                    // One pass for a burst of events.
                    while let Some(Some(())) = triggers.next().now_or_never() {}
                    Ok(())
                }
            };
            if let Err(grace) = woke {
                return self.stop(grace).await;
            }
            let passed = tokio::select! {
                grace = &mut stop => Err(grace.unwrap_or_default()),
                p = self.upkeep.pass() => Ok(p),
            };
            let (pem, mut result) = match passed {
                Ok(p) => p,
                Err(grace) => return self.stop(grace).await,
            };
            if let Some(pem) = pem {
                result = self.load(pem).await.and(result);
            }
            match result {
                Ok(()) => (wait, failures) = (self.upkeep.period(), 0),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    wait = certs::retry_delay(failures);
                    tracing::warn!(error = %e, retry_in = ?wait, "webhook certificate upkeep failed");
                }
            }
        }
    }
}

impl Webhooks {
    /// Binds `addr` and returns at once; in the background, obtains a certificate (retrying
    /// until it has one), serves, and keeps the certificate, the caBundle and the readiness up to
    /// date. The guarantees are in the documentation of `webhook::lifecycle`.
    pub async fn start(
        client: Client,
        addr: SocketAddr,
        source: CertSource,
        shared: Arc<Shared>,
    ) -> Result<Self, StartError> {
        Self::start_with(client, addr, source, shared, Options::default())
    }

    /// [`Webhooks::start`] with options.
    pub fn start_with(
        client: Client,
        addr: SocketAddr,
        source: CertSource,
        shared: Arc<Shared>,
        options: Options,
    ) -> Result<Self, StartError> {
        let bind = |e| StartError::Bind(addr, e);
        let listener = server::bind(addr).map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let local = listener.local_addr().map_err(bind)?;
        let server_name = match &source {
            CertSource::SelfManaged { sans, .. } => sans.first().cloned().unwrap_or_else(|| "localhost".into()),
            CertSource::Dir { server_name, .. } => server_name.clone(),
        };
        let (loaded_tx, loaded) = watch::channel(None);
        let ready = options.ready.clone();
        ready.store(false, Ordering::Relaxed);
        let check = options
            .self_check
            .then(|| tokio::spawn(self_check(local.port(), server_name, ready.clone(), loaded.clone())));
        let life = Life {
            upkeep: Upkeep::new(client, source, options.clock),
            shared: shared.clone(),
            listener: Some(listener),
            server: None,
            loaded: loaded_tx,
        };
        let (stop, stop_rx) = oneshot::channel();
        let life = tokio::spawn(life.run(stop_rx));
        tracing::info!(addr = %local, "webhook port bound; obtaining a certificate");
        Ok(Self {
            ready,
            addr: local,
            shared,
            stop,
            life,
            check,
            #[cfg(test)]
            loaded,
        })
    }

    /// The PEM being served, once there is one.
    #[cfg(test)]
    pub(crate) fn loaded(&self) -> watch::Receiver<Option<Pem>> {
        self.loaded.clone()
    }

    /// True while the background task runs (it ends only on shutdown).
    #[cfg(test)]
    pub(crate) fn is_running(&self) -> bool {
        !self.life.is_finished()
    }

    /// Starts the drain: each connection is closed after its next request (GOAWAY on HTTP/2),
    /// while the server still accepts, for callers that have not yet seen this replica leave.
    pub fn begin_drain(&self) {
        server::begin_drain(&self.shared);
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then stops; returns
    /// once the server has stopped (see [`server::Server::shutdown`]).
    pub async fn shutdown(self, grace: Duration) -> Result<(), server::DrainTimeout> {
        if let Some(c) = &self.check {
            c.abort();
        }
        self.ready.store(false, Ordering::Relaxed);
        let _ = self.stop.send(grace);
        self.life.await.unwrap_or(Ok(()))
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
