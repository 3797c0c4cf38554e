//! The self-managed certificate Secret, read, judged and written under compare-and-swap.
//!
//! # Guarantees
//!
//! - **Compare-and-swap**: every write is conditional. A create when the Secret is absent (409 if
//!   another replica created it first); a replace carrying the resourceVersion read (409 if
//!   anyone wrote since). After a 409 the Secret is read again and judged afresh, so a replica
//!   never overwrites a state it has not seen.
//! - **Writes only what is needed**: [`certs::next_state`] decides, so a Secret that is fine
//!   costs one GET and no write, and replicas with different SANs converge (see [`certs`]).
//! - **Bounded**: at most [`MAX_ATTEMPTS`] rounds, then [`UpkeepError::Contended`]; the caller
//!   retries with backoff. Time is bounded by the caller (see [`super::tls`]).

use super::certs;
use super::lifecycle::{Pem, UpkeepError};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use time::OffsetDateTime;

/// Rounds of read, judge, write before giving up for this pass.
pub const MAX_ATTEMPTS: u32 = 5;

/// Makes the Secret `namespace/name` hold a usable state for `sans` at `now`, and returns the
/// PEM to serve.
pub(super) async fn ensure(
    api: &Api<Secret>,
    name: &str,
    namespace: &str,
    sans: &[String],
    now: OffsetDateTime,
) -> Result<Pem, UpkeepError> {
    for _ in 0..MAX_ATTEMPTS {
        let found = api.get_opt(name).await?;
        let Some((bundle, changes)) = certs::next_state(found.as_ref(), sans, now)? else {
            // Judged usable, so every part is there.
            let (ca, crt, key) = found.as_ref().and_then(certs::from_secret).ok_or(UpkeepError::Incomplete)?;
            return Ok(Pem { ca, crt, key });
        };
        let rv = found.as_ref().and_then(|s| s.resource_version());
        let secret = certs::to_secret(&bundle, name, namespace, rv.clone());
        let written = match rv {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = name, ?changes, "webhook certificate Secret written");
                return Ok(Pem { ca: bundle.ca_crt, crt: bundle.tls_crt, key: bundle.tls_key });
            }
            // Another replica wrote first: judge what it wrote.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(UpkeepError::Contended { what: "the certificate Secret", attempts: MAX_ATTEMPTS })
}
