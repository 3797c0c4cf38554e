//! TLS from this process to the operator's webhook server, trusting the CA of its certificate
//! (a PEM bundle): a kube client for admissions as the API server sends them, and a raw
//! connector for clients that misbehave on purpose.

use anyhow::{Context, Result};
use std::sync::Arc;

/// A client of the webhook server at `url` (an IP address, as the certificate names it) that
/// trusts `ca`.
pub fn client(url: &str, ca: &str) -> Result<kube::Client> {
    let mut config = kube::Config::new(url.parse().context("webhook URL")?);
    config.root_cert = Some(pem_certs(ca).context("CA")?);
    config.tls_server_name = Some("127.0.0.1".into());
    Ok(kube::Client::try_from(config)?)
}

/// A raw TLS connector that trusts `ca`, for clients that speak raw TLS (the
/// attackers of the abuse bench and of the hostile chaos).
pub fn connector(ca: &str) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca)? {
        roots.add(c.into())?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

fn pem_certs(pem: &str) -> Result<Vec<Vec<u8>>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).map(|c| Ok(c?.to_vec())).collect()
}
