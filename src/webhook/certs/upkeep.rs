//! The certificate upkeep: one pass obtains the PEM to serve from its source (for a Secret:
//! the Secret judged and written, then the caBundle patched), and says what makes the next pass
//! due. The webhook server's life ([`crate::webhook::Webhooks`]) runs the passes and loads what
//! they return.

use super::source::{CertSource, Clock, PASS_TIMEOUT, Pem, UpkeepError, read_dir};
use super::{ca_bundle, secret};
use crate::backoff::{Backoff, shortened};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::time::Duration;

/// The first retry after a failed pass.
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait between retries.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(30);
/// The longest time between two passes in self-managed mode (events trigger them sooner).
pub(crate) const CHECK_PERIOD: Duration = Duration::from_secs(60);
/// How often the files are read again.
pub(crate) const DIR_CHECK_PERIOD: Duration = Duration::from_secs(10);

/// Unit events (an object named `name` changed, was deleted, or was relisted) of a watch.
fn changes<K>(api: Api<K>, name: &str) -> BoxStream<'static, ()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config)
        .backoff(crate::client::watch_backoff())
        .filter_map(|event| {
            futures::future::ready(match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => Some(()),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "certificate upkeep watch failed; retrying");
                    None
                }
            })
        })
        .boxed()
}

/// The wait after `failures` consecutive failed passes: [`RETRY_MIN`], doubling with each, at
/// most [`RETRY_MAX`], shortened by up to a fifth at random so that replicas drift apart.
pub(crate) fn retry_delay(failures: u32) -> Duration {
    shortened(Backoff::new(RETRY_MIN, RETRY_MAX).after(failures), 0.2, rand::random::<f64>())
}

/// Obtains and checks the PEM to serve, from `source`.
pub(crate) struct Upkeep {
    client: Client,
    source: CertSource,
    /// This replica's clock, used only when the API server's answer has no `Date`.
    clock: Clock,
    /// This replica's rewrites of a usable Secret, for their bound.
    rewrites: secret::Rewrites,
}

impl Upkeep {
    /// The upkeep of the certificate from `source`, judged at the API server's time, or `clock`'s
    /// when an answer has none.
    pub(crate) fn new(client: Client, source: CertSource, clock: Clock) -> Self {
        Self { client, source, clock, rewrites: secret::Rewrites::default() }
    }

    /// One pass: the PEM to serve, if it got that far, and whether everything succeeded.
    pub(crate) async fn pass(&mut self) -> (Option<Pem>, Result<(), UpkeepError>) {
        match &self.source {
            CertSource::SelfManaged { namespace, secret, sans, config } => {
                let ensure = secret::ensure(&self.client, secret, namespace, sans, &self.clock, &mut self.rewrites);
                let ensured = tokio::time::timeout(PASS_TIMEOUT, ensure)
                    .await
                    .unwrap_or(Err(UpkeepError::Timeout("the certificate Secret")));
                let pem = match ensured {
                    Ok(p) => p,
                    Err(e) => return (None, Err(e)),
                };
                let patched = tokio::time::timeout(PASS_TIMEOUT, ca_bundle::ensure(&self.client, config, &pem.ca))
                    .await
                    .unwrap_or(Err(UpkeepError::Timeout("the caBundle")));
                (Some(pem), patched.map(|_| ()))
            }
            CertSource::Dir { dir, .. } => match read_dir(dir) {
                Ok(p) => (Some(p), Ok(())),
                Err(e) => (None, Err(e)),
            },
        }
    }

    /// What makes a pass due before the period is over.
    pub(crate) fn triggers(&self) -> BoxStream<'static, ()> {
        match &self.source {
            CertSource::SelfManaged { namespace, secret, config, .. } => futures::stream::select_all([
                changes(Api::<Secret>::namespaced(self.client.clone(), namespace), secret),
                changes(Api::<MutatingWebhookConfiguration>::all(self.client.clone()), config),
                changes(Api::<ValidatingWebhookConfiguration>::all(self.client.clone()), config),
            ])
            .boxed(),
            CertSource::Dir { .. } => futures::stream::pending().boxed(),
        }
    }

    pub(crate) fn period(&self) -> Duration {
        match self.source {
            CertSource::SelfManaged { .. } => CHECK_PERIOD,
            CertSource::Dir { .. } => DIR_CHECK_PERIOD,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_cap() {
        let within = |failures: u32, low_ms: u64, high_ms: u64| {
            let d = retry_delay(failures);
            assert!(d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms), "{failures}: {d:?}");
        };
        for _ in 0..50 {
            within(1, 400, 500);
            within(2, 800, 1000);
            within(6, 12_800, 16_000);
            within(7, 24_000, 30_000);
            within(u32::MAX, 24_000, 30_000);
        }
    }
}
