//! The webhooks' command-line flags.

use super::certs::CertSource;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The default of `--webhook-drain` (see [`WebhookArgs::webhook_drain`]).
pub const DEFAULT_DRAIN: &str = "10s";

/// How this replica serves the admission webhooks (the policy they enforce has its own flags,
/// [`crate::api::policy::PolicyArgs`]). Flattened into the binary's `run` flags; each flag also reads an
/// environment variable.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct WebhookArgs {
    /// Serve the admission webhooks (every replica does).
    #[arg(long, env = "WEBHOOKS", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) webhooks: bool,
    /// Address of the webhook HTTPS server (bound with SO_REUSEPORT).
    #[arg(long, env = "WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub(crate) webhook_addr: SocketAddr,
    /// Read `tls.crt`, `tls.key` and `ca.crt` from this folder (e.g. a cert-manager Secret)
    /// instead of managing the certificate in a Secret.
    #[arg(long, env = "WEBHOOK_CERT_DIR")]
    pub(crate) webhook_cert_dir: Option<PathBuf>,
    /// Secret holding the self-managed CA and serving certificate.
    #[arg(long, env = "WEBHOOK_SECRET", default_value = "myapp-operator-webhook-cert")]
    pub(crate) webhook_secret: String,
    /// Service in front of the webhooks; its DNS names go into the certificate.
    #[arg(long, env = "WEBHOOK_SERVICE", default_value = "myapp-operator-webhook")]
    pub(crate) webhook_service: String,
    /// More SANs for the certificate, comma-separated (e.g. 127.0.0.1 for a local run).
    #[arg(long, env = "WEBHOOK_EXTRA_SANS", value_delimiter = ',')]
    pub(crate) webhook_extra_sans: Vec<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, env = "WEBHOOK_CONFIG", default_value = "myapp-operator")]
    pub(crate) webhook_config: String,
    /// How long the webhooks keep serving after SIGTERM (while not ready), so that callers move
    /// to the other replicas first. The API server reaches the webhooks through the Service, so a
    /// terminating pod stops getting new connections only once every node's kube-proxy has
    /// dropped it: the EndpointSlice update, then a sync (at least `minSyncPeriod` apart, 1 s by
    /// default). That took up to 3 s on the local node at rest (kube-proxy's
    /// `network_programming_duration`), and more than 2 s under load; a connection that meets a
    /// replica which stopped listening fails the admission (the API server does not retry a
    /// refused or unanswered connection). The default leaves three times the measured worst.
    #[arg(long, env = "WEBHOOK_DRAIN", default_value = DEFAULT_DRAIN, value_parser = humantime::parse_duration)]
    pub(crate) webhook_drain: Duration,
}

impl WebhookArgs {
    /// Where the serving certificate comes from: the folder, or a Secret in `namespace` (the
    /// operator's) with the Service's DNS names and the extra SANs.
    pub(crate) fn cert_source(&self, namespace: &str) -> CertSource {
        let svc = &self.webhook_service;
        match &self.webhook_cert_dir {
            Some(dir) => CertSource::Dir {
                dir: dir.clone(),
                server_name: self
                    .webhook_extra_sans
                    .first()
                    .cloned()
                    .unwrap_or_else(|| format!("{svc}.{namespace}.svc")),
            },
            None => {
                let mut sans = vec![
                    format!("{svc}.{namespace}.svc"),
                    format!("{svc}.{namespace}.svc.cluster.local"),
                    format!("{svc}.{namespace}"),
                    svc.clone(),
                ];
                sans.extend(self.webhook_extra_sans.iter().filter(|s| !s.is_empty()).cloned());
                CertSource::SelfManaged {
                    namespace: namespace.to_string(),
                    secret: self.webhook_secret.clone(),
                    sans,
                    config: self.webhook_config.clone(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        webhook: WebhookArgs,
    }

    #[test]
    fn the_certificate_source_follows_the_flags() {
        let cli = Cli::parse_from(["x", "--webhook-extra-sans=127.0.0.1"]);
        match cli.webhook.cert_source("sys") {
            CertSource::SelfManaged { sans, secret, .. } => {
                assert_eq!(sans.first().map(String::as_str), Some("myapp-operator-webhook.sys.svc"));
                assert_eq!(sans.last().map(String::as_str), Some("127.0.0.1"));
                assert_eq!(secret, "myapp-operator-webhook-cert");
            }
            other => panic!("a Secret by default, not {other:?}"),
        }
    }
}
