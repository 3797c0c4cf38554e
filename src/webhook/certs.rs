//! Serving certificates of the webhooks.
//!
//! Self-managed (the default): all replicas share one CA and serving certificate, kept in a
//! Secret. Whoever comes first creates it (create-if-absent: a 409 means another replica won,
//! and we read theirs); whoever sees it near expiry renews the serving certificate with the same
//! CA, with an update conditional on the resourceVersion it read. Every replica watches the
//! Secret and hot-reloads its TLS configuration, and patches the CA into the webhook
//! configurations when it differs there (so an unchanged state writes nothing).
//!
//! From files (`--webhook-cert-dir`, e.g. mounted from a cert-manager Secret): `tls.crt`,
//! `tls.key` and `ca.crt` are read and re-read when they change.

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::collections::BTreeMap;
use time::{Duration, OffsetDateTime};

/// Secret keys.
pub const CA_CRT: &str = "ca.crt";
/// CA private key (self-managed mode only).
pub const CA_KEY: &str = "ca.key";
/// Serving certificate.
pub const TLS_CRT: &str = "tls.crt";
/// Serving key.
pub const TLS_KEY: &str = "tls.key";
/// Annotation with the serving certificate's expiry (RFC 3339).
pub const NOT_AFTER: &str = "myapp.dev/not-after";
/// Annotation with the serving certificate's SANs, comma-separated.
pub const SANS: &str = "myapp.dev/sans";

/// Lifetime of the CA.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Lifetime of a serving certificate.
pub const SERVING_VALIDITY: Duration = Duration::days(90);
/// A serving certificate with less than this left is renewed.
pub const RENEW_BEFORE: Duration = Duration::days(30);

/// PEM material of one serving setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// CA certificate.
    pub ca_crt: String,
    /// CA key (empty when the CA is not ours).
    pub ca_key: String,
    /// Serving certificate.
    pub tls_crt: String,
    /// Serving key.
    pub tls_key: String,
    /// Serving certificate's expiry.
    pub not_after: OffsetDateTime,
    /// Serving certificate's SANs.
    pub sans: Vec<String>,
}

fn san(s: &str) -> Result<SanType> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        bail!("invalid DNS name {s:?}");
    }
    Ok(SanType::DnsName(s.try_into().with_context(|| format!("invalid DNS name {s:?}"))?))
}

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "myapp-operator-webhook-ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + CA_VALIDITY;
    p
}

/// A new serving certificate for `sans`, signed by the given CA, or by a new CA.
pub fn issue(sans: &[String], ca: Option<(&str, &str)>, now: OffsetDateTime) -> Result<Bundle> {
    let (ca_crt, ca_key) = match ca {
        Some((crt, key)) => (crt.to_string(), key.to_string()),
        None => {
            let key = KeyPair::generate()?;
            let crt = ca_params(now).self_signed(&key)?;
            (crt.pem(), key.serialize_pem())
        }
    };
    let ca_keypair = KeyPair::from_pem(&ca_key).context("read the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_crt, &ca_keypair).context("read the CA certificate")?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, sans.first().map(String::as_str).unwrap_or("myapp-operator-webhook"));
    p.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_>>()?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + SERVING_VALIDITY;
    let not_after = p.not_after;
    let crt = p.signed_by(&key, &issuer)?;
    Ok(Bundle { ca_crt, ca_key, tls_crt: crt.pem(), tls_key: key.serialize_pem(), not_after, sans: sans.to_vec() })
}

/// What to do with the Secret as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Use it as it is.
    Keep,
    /// Issue a new serving certificate with the same CA (expiring, or SANs changed).
    Renew,
    /// Start over with a new CA (no usable CA in it).
    Recreate,
}

/// Decides from the Secret's data and annotations.
pub fn plan(secret: &Secret, sans: &[String], now: OffsetDateTime) -> Plan {
    let data = secret.data.clone().unwrap_or_default();
    let has = |k: &str| data.get(k).is_some_and(|v| !v.0.is_empty());
    if !has(CA_CRT) || !has(CA_KEY) {
        return Plan::Recreate;
    }
    if !has(TLS_CRT) || !has(TLS_KEY) {
        return Plan::Renew;
    }
    let ann = secret.metadata.annotations.clone().unwrap_or_default();
    let not_after =
        ann.get(NOT_AFTER).and_then(|s| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok());
    let same_sans = ann.get(SANS).is_some_and(|s| s.split(',').map(str::to_string).collect::<Vec<_>>() == sans);
    match not_after {
        Some(t) if t - now > RENEW_BEFORE && same_sans => Plan::Keep,
        _ => Plan::Renew,
    }
}

/// The bundle as Secret data and annotations.
pub fn to_secret(bundle: &Bundle, name: &str, namespace: &str, resource_version: Option<String>) -> Secret {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version,
            annotations: Some(BTreeMap::from([
                (
                    NOT_AFTER.to_string(),
                    bundle.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                ),
                (SANS.to_string(), bundle.sans.join(",")),
            ])),
            labels: Some(BTreeMap::from([("app.kubernetes.io/name".to_string(), "myapp-operator".to_string())])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (CA_CRT.to_string(), b(&bundle.ca_crt)),
            (CA_KEY.to_string(), b(&bundle.ca_key)),
            (TLS_CRT.to_string(), b(&bundle.tls_crt)),
            (TLS_KEY.to_string(), b(&bundle.tls_key)),
        ])),
        ..Default::default()
    }
}

/// Reads the PEM strings out of a Secret: (ca.crt, tls.crt, tls.key).
pub fn from_secret(secret: &Secret) -> Option<(String, String, String)> {
    let data = secret.data.as_ref()?;
    let s = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|v| !v.is_empty());
    Some((s(CA_CRT)?, s(TLS_CRT)?, s(TLS_KEY)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sans() -> Vec<String> {
        vec!["myapp-operator-webhook.myapp-system.svc".into(), "127.0.0.1".into()]
    }

    #[test]
    fn issue_and_renew_with_the_same_ca() {
        let now = OffsetDateTime::now_utc();
        let first = issue(&sans(), None, now).expect("issue");
        assert!(first.ca_crt.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(first.tls_key.contains("PRIVATE KEY"));
        let second = issue(&sans(), Some((&first.ca_crt, &first.ca_key)), now).expect("renew");
        assert_eq!(first.ca_crt, second.ca_crt, "renewal keeps the CA, so caBundle stays valid");
        assert_ne!(first.tls_crt, second.tls_crt);
    }

    #[test]
    fn plan_follows_expiry_sans_and_completeness() {
        let now = OffsetDateTime::now_utc();
        let bundle = issue(&sans(), None, now).expect("issue");
        let secret = to_secret(&bundle, "s", "ns", None);
        assert_eq!(plan(&secret, &sans(), now), Plan::Keep);
        assert_eq!(plan(&secret, &sans(), now + Duration::days(61)), Plan::Renew, "30 days before expiry");
        assert_eq!(plan(&secret, &["other.svc".to_string()], now), Plan::Renew, "SANs changed");
        let mut no_tls = secret.clone();
        no_tls.data.as_mut().map(|d| d.remove(TLS_CRT));
        assert_eq!(plan(&no_tls, &sans(), now), Plan::Renew);
        let mut no_ca = secret;
        no_ca.data.as_mut().map(|d| d.remove(CA_KEY));
        assert_eq!(plan(&no_ca, &sans(), now), Plan::Recreate);
    }

    #[test]
    fn secret_round_trip() {
        let b = issue(&sans(), None, OffsetDateTime::now_utc()).expect("issue");
        let s = to_secret(&b, "s", "ns", Some("7".into()));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(from_secret(&s), Some((b.ca_crt.clone(), b.tls_crt.clone(), b.tls_key.clone())));
    }

    #[test]
    fn bad_san_is_an_error() {
        assert!(issue(&["not a name!".to_string()], None, OffsetDateTime::now_utc()).is_err());
    }
}
