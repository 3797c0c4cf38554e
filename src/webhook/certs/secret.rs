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
//! - **One clock for every replica: the API server's.** The Secret is judged, and certificates
//!   are issued, at the time of the `Date` header of the GET that read it, not at this replica's
//!   clock. The API server is the client that verifies the serving certificate, so its clock is
//!   the one whose judgment matters, and every replica reads the same one. A replica whose own
//!   clock is wrong (a year ahead or behind, or any amount) therefore judges exactly as its
//!   peers do: it never takes a certificate that a peer issued a moment ago for expired or not
//!   yet valid, and the replicas never rewrite the Secret back and forth. Such a replica logs a
//!   warning ([`SKEW_WARNING`]) and serves what the Secret holds. Only an answer without a
//!   `Date` header falls back to the replica's clock.
//! - **A bounded number of rewrites, under any clock**: a replica rewrites a Secret that is
//!   usable as it stands ([`certs::usable`]) at most [`MAX_REWRITES`] times in any
//!   [`REWRITE_WINDOW`] of its monotonic clock; past that it serves the Secret as it is until
//!   the window allows again. Such rewrites are the ones a clock or a peer's opinion asks for
//!   (renewal, the CA schedule, SANs), so even with no shared clock, or an API server whose clock
//!   jumps, `n` replicas write a usable Secret at most `n × MAX_REWRITES` times an hour, and the
//!   caBundle changes at most as often. A Secret that is absent or broken (not usable at any
//!   time) is written at once, so healing is never delayed.
//! - **Bounded**: at most [`MAX_ATTEMPTS`] rounds, then [`UpkeepError::Contended`]; the caller
//!   retries with backoff. Time is bounded by the caller (see [`super::upkeep`]).

use super::material as certs;
use super::source::{Clock, Pem, UpkeepError};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use std::collections::VecDeque;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;

/// Rounds of read, judge, write before giving up for this pass.
pub(crate) const MAX_ATTEMPTS: u32 = 5;
/// The most rewrites of a usable Secret one replica makes in any [`REWRITE_WINDOW`]. A CA
/// rotation takes three (publish, promote, retire), days apart.
pub(crate) const MAX_REWRITES: usize = 3;
/// The window [`MAX_REWRITES`] counts in, on the replica's monotonic clock.
pub(crate) const REWRITE_WINDOW: Duration = Duration::from_secs(3600);
/// How far this replica's clock may differ from the API server's before it warns. Below it,
/// the certificates' back-dating ([`certs::BACKDATE`]) absorbs the difference anyway.
pub(crate) const SKEW_WARNING: Duration = Duration::from_secs(5 * 60);

/// The times one replica rewrote a usable Secret, within the last [`REWRITE_WINDOW`].
#[derive(Debug, Default)]
pub(super) struct Rewrites {
    at: VecDeque<Instant>,
    /// Whether the last judgment found this replica's clock off by more than [`SKEW_WARNING`].
    skewed: bool,
}

impl Rewrites {
    /// True when one more rewrite at `now` stays within [`MAX_REWRITES`] per window.
    fn allowed(&mut self, now: Instant) -> bool {
        while self.at.front().is_some_and(|t| now.saturating_duration_since(*t) >= REWRITE_WINDOW) {
            self.at.pop_front();
        }
        self.at.len() < MAX_REWRITES
    }

    /// Warns when this replica's clock starts to differ from the API server's by more than
    /// [`SKEW_WARNING`], and says so when it stops.
    fn note_skew(&mut self, local: OffsetDateTime, server: OffsetDateTime) {
        let skew = local - server;
        let skewed = skew.unsigned_abs() > SKEW_WARNING;
        if skewed && !self.skewed {
            tracing::warn!(
                skew_seconds = skew.whole_seconds(),
                "this replica's clock differs from the API server's; certificates are judged by the API server's"
            );
        } else if !skewed && self.skewed {
            tracing::info!("this replica's clock agrees with the API server's again");
        }
        self.skewed = skewed;
    }
}

/// The time of an HTTP `Date` header (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(value: &http::HeaderValue) -> Option<OffsetDateTime> {
    let text = value.to_str().ok()?.trim().replace(" GMT", " +0000");
    OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc2822).ok()
}

/// GETs the Secret, with the API server's time from the answer's `Date` header (if it has one).
async fn read(
    client: &Client,
    api: &Api<Secret>,
    name: &str,
) -> Result<(Option<Secret>, Option<OffsetDateTime>), kube::Error> {
    let request = http::Request::get(format!("{}/{name}", api.resource_url()))
        .body(kube::client::Body::from(Vec::new()))
        .map_err(kube::Error::HttpError)?;
    let response = client.send(request).await?;
    let (status, date) = (response.status(), response.headers().get(http::header::DATE).and_then(http_date));
    let body = response.into_body().collect_bytes().await?;
    if status == http::StatusCode::NOT_FOUND {
        return Ok((None, date));
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let answer = serde_json::from_slice::<kube::core::Status>(&body)
            .unwrap_or_else(|_| kube::core::Status::failure(&text, "").with_code(status.as_u16()));
        return Err(kube::Error::Api(Box::new(answer)));
    }
    Ok((Some(serde_json::from_slice(&body).map_err(kube::Error::SerdeError)?), date))
}

/// The PEM a Secret judged usable holds.
fn served(secret: Option<&Secret>) -> Result<Pem, UpkeepError> {
    let (ca, crt, key) = secret.and_then(certs::from_secret).ok_or(UpkeepError::Incomplete)?;
    Ok(Pem { ca, crt, key })
}

/// Makes the Secret `namespace/name` hold a usable state for `sans`, judged at the API server's
/// time (`clock` only when the server gives none), and returns the PEM to serve. `rewrites` is
/// this replica's record for the bound on rewrites (see the [module documentation](self)).
pub(super) async fn ensure(
    client: &Client,
    name: &str,
    namespace: &str,
    sans: &[String],
    clock: &Clock,
    rewrites: &mut Rewrites,
) -> Result<Pem, UpkeepError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..MAX_ATTEMPTS {
        let (found, server_time) = read(client, &api, name).await?;
        let local = clock();
        if let Some(server) = server_time {
            rewrites.note_skew(local, server);
        }
        let now = server_time.unwrap_or(local);
        let Some((bundle, changes)) = certs::next_state(found.as_ref(), sans, now)? else {
            // Judged usable, so every part is there.
            return served(found.as_ref());
        };
        let rewrite = found.as_ref().is_some_and(certs::usable);
        if rewrite && !rewrites.allowed(Instant::now()) {
            tracing::warn!(
                secret = name,
                ?changes,
                max = MAX_REWRITES,
                window = ?REWRITE_WINDOW,
                "the certificate Secret is usable and this replica already rewrote it the most times a window allows; serving it as it is"
            );
            return served(found.as_ref());
        }
        let rv = found.as_ref().and_then(|s| s.resource_version());
        let secret = certs::to_secret(&bundle, name, namespace, rv.clone());
        let written = match rv {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => {
                if rewrite {
                    rewrites.at.push_back(Instant::now());
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_date_is_read() {
        let date = http_date(&http::HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(date.map(OffsetDateTime::unix_timestamp), Some(784_111_777));
        assert_eq!(http_date(&http::HeaderValue::from_static("yesterday")), None);
    }

    #[test]
    fn rewrites_are_bounded_per_window() {
        let mut r = Rewrites::default();
        let t0 = Instant::now();
        for i in 0..MAX_REWRITES {
            assert!(r.allowed(t0), "rewrite {i}");
            r.at.push_back(t0);
        }
        assert!(!r.allowed(t0 + REWRITE_WINDOW - Duration::from_secs(1)), "the window is full");
        assert!(r.allowed(t0 + REWRITE_WINDOW), "the window has passed");
    }
}
