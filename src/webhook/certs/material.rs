//! Serving certificates of the webhooks: what the self-managed Secret holds, and what it must
//! hold next ([`next_state`], a pure function of the Secret, this replica's SANs and the time).
//!
//! Self-managed (the default): all replicas share one CA and serving certificate, kept in a
//! Secret of type `kubernetes.io/tls`:
//!
//! | key | what |
//! |---|---|
//! | `ca.crt` | the trust bundle: every CA a client must trust now (one, two during a CA rotation); the caBundle of the webhook configurations |
//! | `ca.key` | the key of the CA that signs, which is one of `ca.crt` |
//! | `ca-next.key` | during a CA rotation only: the key of the next CA, already in `ca.crt`, not signing yet |
//! | `tls.crt`, `tls.key` | the serving certificate (signed by the `ca.key` CA) and its key |
//!
//! Annotations record the serving certificate's expiry (`myapp.dev/not-after`; an earlier time
//! written there by hand forces a renewal) and its SANs (`myapp.dev/sans`, informational).
//!
//! From files (`--webhook-cert-dir`, e.g. mounted from a cert-manager Secret): `tls.crt`,
//! `tls.key` and `ca.crt` are read and re-read when they change.
//!
//! # Guarantees of [`next_state`]
//!
//! - **Heals**: nothing unusable is kept. A missing or unreadable key, a CA that is expired or
//!   is no CA, a key that does not match its certificate, a serving certificate that a client
//!   trusting the signing CA would refuse at `now` (expired, not yet valid, signed by another CA)
//!   or that a server could not load: each is replaced. A CA that is still valid but lost its key
//!   stays trusted until it is retired, so replicas still serving a certificate it signed keep
//!   being accepted meanwhile.
//! - **Fixpoint**: the state it returns, read back at the same or a slightly later time with the
//!   same SANs, needs no change. In particular a fresh serving certificate is never "due", even
//!   when its CA caps its lifetime below [`RENEW_BEFORE`]. So no replica rewrites in a loop.
//! - **SANs converge**: a serving certificate is re-issued for missing SANs with the *union* of
//!   its SANs and this replica's, so replicas that disagree (mid-rollout, e.g. a different
//!   `--webhook-extra-sans`) stop after one write each. The union is pruned to the issuer's own
//!   SANs at each renewal for expiry, when a rollout is long over.
//! - **CA rotation with an overlap**: see [`CA_ROTATE_BEFORE`] for the schedule. A CA is in the
//!   trust bundle for [`CA_PUBLISH_LEAD`] before it signs anything, and the CA it replaces stays
//!   there for [`CA_RETIRE_AFTER`] after the serving certificate moved away from it.
//!
//! # Caveats
//!
//! The schedule is judged on the certificates' own validity times against the `now` it is given.
//! Replicas whose `now` disagree by more than [`BACKDATE`] judge the same Secret differently: the
//! caller gives the API server's clock, which every replica shares (see `webhook::certs::secret` for
//! that rule and for the bound on rewrites when it is not available).
//! "Published" means written into the Secret: the caBundle follows within seconds (every replica
//! watches the Secret and both webhook configurations), but the promotion does not wait for the
//! caBundle to be observed; [`CA_PUBLISH_LEAD`] is the margin for that.

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::collections::{BTreeMap, BTreeSet};
use time::{Duration, OffsetDateTime};

/// The trust bundle (PEM, one or more CA certificates).
pub const CA_CRT: &str = "ca.crt";
/// The signing CA's private key (self-managed mode only).
pub const CA_KEY: &str = "ca.key";
/// The next CA's private key, during a CA rotation only.
pub const NEXT_CA_KEY: &str = "ca-next.key";
/// Serving certificate.
pub const TLS_CRT: &str = "tls.crt";
/// Serving key.
pub const TLS_KEY: &str = "tls.key";
/// Annotation with the serving certificate's expiry (RFC 3339).
pub const NOT_AFTER: &str = "myapp.dev/not-after";
/// Annotation with the serving certificate's SANs, comma-separated.
pub const SANS: &str = "myapp.dev/sans";

/// Lifetime of a CA.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// Lifetime of a serving certificate (shorter when its CA expires sooner).
pub const SERVING_VALIDITY: Duration = Duration::days(90);
/// A serving certificate with less than this left is renewed.
pub const RENEW_BEFORE: Duration = Duration::days(30);
/// A renewal for expiry happens only when the new certificate would last at least this much
/// longer than the current one: the guard that makes a certificate capped by its CA's expiry a
/// fixpoint instead of a rewrite loop.
pub const RENEW_GAIN: Duration = Duration::hours(1);
/// How far certificates are back-dated, for replicas and API servers whose clocks run a little
/// behind; a certificate's issue time is its `notBefore` plus this.
pub const BACKDATE: Duration = Duration::minutes(5);

/// The CA rotation starts when the signing CA has less than this left. The schedule, from that
/// moment `t0` (all judged on the certificates' own times):
///
/// 1. `t0`: a next CA is generated and appended to `ca.crt`, its key kept in `ca-next.key`. The
///    old CA still signs. Every replica patches the two-CA bundle into the caBundle within
///    seconds (a watch on the Secret), and the API server trusts both.
/// 2. `t0 + CA_PUBLISH_LEAD`: the next CA becomes the signing CA (`ca.key`), and the serving
///    certificate is re-issued by it. Clients have trusted the new CA for a day by then, so the
///    switch drops nothing; replicas still serving the old certificate are still trusted too.
/// 3. `t0 + CA_PUBLISH_LEAD + CA_RETIRE_AFTER`: the old CA leaves `ca.crt` and the caBundle. By
///    then every replica reloaded the new serving certificate (within seconds on the watch, or at
///    the next 60 s check).
///
/// 180 days is far more than the two days the overlap takes, so a cluster that is switched off
/// for months still finds a valid CA and rotates with the full overlap; and a serving certificate
/// (90 days, 30 left at renewal) never has its lifetime cut by the CA it is issued under except
/// in the last days before a promotion.
pub const CA_ROTATE_BEFORE: Duration = Duration::days(180);
/// How long a new CA is trusted (in `ca.crt`, so in the caBundle) before it signs. The caBundle
/// follows the Secret within seconds; a day covers a replica or an API server that is down for
/// hours, and is nothing against a CA's ten years.
pub const CA_PUBLISH_LEAD: Duration = Duration::days(1);
/// How long a CA stays trusted after the serving certificate moved to another CA (or after it
/// lost its key): for replicas that have not yet reloaded, and caBundles not yet patched.
pub const CA_RETIRE_AFTER: Duration = Duration::days(1);

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A SAN is neither an IP address nor a DNS name.
    #[error("invalid SAN {0:?}: neither an IP address nor a DNS name")]
    InvalidSan(String),
    /// There is no SAN to issue a serving certificate for.
    #[error("no SANs to issue a serving certificate for")]
    NoSans,
    /// The CA given to [`issue`] is not a usable CA certificate with its key.
    #[error("the CA certificate and key given do not form a usable CA")]
    UnusableCa,
    /// rcgen failed to generate a key or to sign.
    #[error("generate or sign a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// PEM material of one serving setup: what the Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The trust bundle: every CA certificate clients must trust (the caBundle).
    pub ca_crt: String,
    /// The signing CA's key (empty when the CA is not ours).
    pub ca_key: String,
    /// The next CA's key, during a CA rotation.
    pub next_ca_key: Option<String>,
    /// Serving certificate.
    pub tls_crt: String,
    /// Serving key.
    pub tls_key: String,
    /// Serving certificate's expiry.
    pub not_after: OffsetDateTime,
    /// Serving certificate's SANs.
    pub sans: Vec<String>,
}

/// Why [`next_state`] asks for a write; several may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// There was no Secret.
    Created,
    /// There was no usable signing CA (nor a next one to promote): a new CA signs from now on.
    NewCa,
    /// The signing CA nears its expiry: a next CA is published in the trust bundle.
    CaPublished,
    /// The next CA has been published long enough (or the signing CA became unusable): it signs
    /// from now on.
    CaPromoted,
    /// CAs that no served certificate needs any more left the trust bundle.
    CaRetired,
    /// `ca.crt` held more than the usable CAs (garbage, duplicates, expired or non-CA certificates).
    BundleCleaned,
    /// The serving certificate or key was missing or unusable, or signed by another CA.
    ServingReplaced,
    /// The serving certificate nears its expiry.
    ServingRenewed,
    /// The serving certificate lacked SANs of this replica.
    SansAdded,
}

/// A CA certificate of the trust bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ca {
    der: Vec<u8>,
    spki: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn unix(t: x509_parser::time::ASN1Time) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).ok()
}

/// PEM text of one DER block, 64 characters a line, as rcgen writes it.
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}

impl Ca {
    /// A CA certificate (basic constraints CA) that is valid at `now`.
    fn parse(der: &[u8], now: OffsetDateTime) -> Option<Ca> {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        let ca = Ca {
            der: der.to_vec(),
            spki: c.public_key().raw.to_vec(),
            not_before: unix(c.validity().not_before)?,
            not_after: unix(c.validity().not_after)?,
        };
        (c.is_ca() && ca.not_before <= now + BACKDATE && now < ca.not_after).then_some(ca)
    }

    /// Every usable CA of a PEM bundle, in order, without duplicates; the rest is dropped.
    fn bundle(text: &str, now: OffsetDateTime) -> Vec<Ca> {
        let mut out: Vec<Ca> = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()).map_while(Result::ok) {
            if block.label == "CERTIFICATE"
                && let Some(ca) = Ca::parse(&block.contents, now)
                && !out.contains(&ca)
            {
                out.push(ca);
            }
        }
        out
    }

    fn pem(&self) -> String {
        pem("CERTIFICATE", &self.der)
    }

    fn issued(&self) -> OffsetDateTime {
        self.not_before + BACKDATE
    }
}

/// A CA with its key.
#[derive(Clone, Debug)]
struct Signer {
    ca: Ca,
    key: String,
}

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "myapp-operator-webhook-ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = now - BACKDATE;
    p.not_after = now + CA_VALIDITY;
    p
}

impl Signer {
    /// A new CA.
    fn generate(now: OffsetDateTime) -> Result<Signer, CertError> {
        let key = KeyPair::generate()?;
        let crt = ca_params(now).self_signed(&key)?;
        let ca = Ca::parse(crt.der(), now).ok_or(CertError::UnusableCa)?;
        Ok(Signer { ca, key: key.serialize_pem() })
    }

    /// The CA of `cas` whose key `key` is.
    fn find(cas: &[Ca], key: &str) -> Option<Signer> {
        let spki = KeyPair::from_pem(key).ok()?.subject_public_key_info();
        cas.iter().find(|c| c.spki == spki).map(|ca| Signer { ca: ca.clone(), key: key.to_string() })
    }

    /// A serving certificate for `sans`, valid for [`SERVING_VALIDITY`] or until the CA expires.
    fn sign(&self, sans: &BTreeSet<String>, now: OffsetDateTime) -> Result<Serving, CertError> {
        let first = sans.iter().next().ok_or(CertError::NoSans)?;
        let ca_key = KeyPair::from_pem(&self.key)?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(self.ca.der.as_slice()), ca_key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, first.as_str());
        p.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = now - BACKDATE;
        p.not_after = (now + SERVING_VALIDITY).min(self.ca.not_after);
        let crt = p.signed_by(&key, &issuer)?;
        // Read back what was written, so that the bundle and the annotation carry the certificate's
        // own (whole-second) times.
        Serving::check(&crt.pem(), &key.serialize_pem(), &self.ca, now).ok_or(CertError::UnusableCa)
    }
}

/// A serving certificate and key that a server can load and a client trusting their CA accepts.
#[derive(Clone, Debug)]
struct Serving {
    crt: String,
    key: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    sans: BTreeSet<String>,
}

impl Serving {
    /// `crt` and `key` if `crt` is exactly one certificate, `key` is its key in a form rustls
    /// loads, and a client that trusts `ca` accepts `crt` at `now` (signature, validity, usage).
    fn check(crt: &str, key: &str, ca: &Ca, now: OffsetDateTime) -> Option<Serving> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(crt.as_bytes()).collect::<Result<_, _>>().ok()?;
        let [cert] = chain.as_slice() else { return None };
        let private = PrivateKeyDer::from_pem_slice(key.as_bytes()).ok()?;
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), private, &provider).ok()?;
        if !signed_by(cert, ca, now) {
            return None;
        }
        let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let mut sans = BTreeSet::new();
        for name in x.subject_alternative_name().ok()??.value.general_names.iter() {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.insert(d.to_ascii_lowercase()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => sans.insert(ip_text(ip)?),
                _ => false,
            };
        }
        Some(Serving {
            crt: crt.to_string(),
            key: key.to_string(),
            not_before: unix(x.validity().not_before)?,
            not_after: unix(x.validity().not_after)?,
            sans,
        })
    }

    fn issued(&self) -> OffsetDateTime {
        self.not_before + BACKDATE
    }
}

/// True when a client that trusts `ca` only accepts `cert` as a server certificate at `now`
/// (signature, validity period, key usage), as the API server will judge it.
fn signed_by(cert: &CertificateDer<'_>, ca: &Ca, now: OffsetDateTime) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    let Ok(secs) = u64::try_from(now.unix_timestamp()) else { return false };
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    roots.add(CertificateDer::from(ca.der.clone())).is_ok()
        && rustls::server::ParsedCertificate::try_from(cert)
            .is_ok_and(|p| rustls::client::verify_server_cert_signed_by_trust_anchor(&p, &roots, &[], at, algs).is_ok())
}

fn ip_text(octets: &[u8]) -> Option<String> {
    let ip: std::net::IpAddr = match octets.len() {
        4 => <[u8; 4]>::try_from(octets).ok()?.into(),
        16 => <[u8; 16]>::try_from(octets).ok()?.into(),
        _ => return None,
    };
    Some(ip.to_string())
}

/// One SAN in the form certificates are compared in: an IP address in its canonical text, a
/// DNS name in lower case; anything else is an error.
fn canonical_san(s: &str) -> Result<String, CertError> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        return Err(CertError::InvalidSan(s.to_string()));
    }
    Ok(s.to_ascii_lowercase())
}

fn san(s: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let name = canonical_san(s)?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| CertError::InvalidSan(s.to_string()))?))
}

/// The `notAfter` of the first certificate of a PEM chain (the serving certificate), in unix
/// seconds; `None` when there is no readable certificate.
pub fn not_after(crt_pem: &str) -> Option<i64> {
    let block = x509_parser::pem::Pem::iter_from_buffer(crt_pem.as_bytes())
        .map_while(Result::ok)
        .find(|b| b.label == "CERTIFICATE")?;
    let (_, c) = x509_parser::parse_x509_certificate(&block.contents).ok()?;
    Some(c.validity().not_after.timestamp())
}

/// A new CA (or the given one: `(ca.crt, ca.key)` PEM) and a serving certificate for `sans`.
pub fn issue(sans: &[String], ca: Option<(&str, &str)>, now: OffsetDateTime) -> Result<Bundle, CertError> {
    let sans = sans.iter().map(|s| canonical_san(s)).collect::<Result<BTreeSet<_>, _>>()?;
    let signer = match ca {
        Some((crt, key)) => Signer::find(&Ca::bundle(crt, now), key).ok_or(CertError::UnusableCa)?,
        None => Signer::generate(now)?,
    };
    let serving = signer.sign(&sans, now)?;
    Ok(bundle(std::slice::from_ref(&signer.ca), &signer, None, &serving))
}

fn bundle(cas: &[Ca], signer: &Signer, next: Option<&Signer>, serving: &Serving) -> Bundle {
    Bundle {
        ca_crt: cas.iter().map(Ca::pem).collect(),
        ca_key: signer.key.clone(),
        next_ca_key: next.map(|n| n.key.clone()),
        tls_crt: serving.crt.clone(),
        tls_key: serving.key.clone(),
        not_after: serving.not_after,
        sans: serving.sans.iter().cloned().collect(),
    }
}

/// The Secret's content, as far as it is usable at a given time.
struct Found {
    cas: Vec<Ca>,
    raw_ca_crt: String,
    signer: Option<Signer>,
    next: Option<Signer>,
    tls: Option<(String, String)>,
    hint: Option<OffsetDateTime>,
}

impl Found {
    fn read(secret: &Secret, now: OffsetDateTime) -> Found {
        let data = secret.data.clone().unwrap_or_default();
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|v| !v.is_empty());
        let raw_ca_crt = text(CA_CRT).unwrap_or_default();
        let cas = Ca::bundle(&raw_ca_crt, now);
        let signer = text(CA_KEY).and_then(|k| Signer::find(&cas, &k));
        let next = text(NEXT_CA_KEY).and_then(|k| Signer::find(&cas, &k));
        let tls = text(TLS_CRT).zip(text(TLS_KEY));
        let ann = secret.metadata.annotations.clone().unwrap_or_default();
        let hint = ann
            .get(NOT_AFTER)
            .and_then(|s| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok());
        Found { cas, raw_ca_crt, signer, next, tls, hint }
    }
}

/// What the Secret must hold next, given what it holds (`None`: there is none), this replica's
/// SANs and the time: `None` when it is fine as it is, else the new content and why. Keys are
/// generated here when needed; otherwise this is a pure function. See the
/// [module documentation](self) for its guarantees.
pub fn next_state(
    secret: Option<&Secret>,
    sans: &[String],
    now: OffsetDateTime,
) -> Result<Option<(Bundle, Vec<Change>)>, CertError> {
    let own = sans.iter().map(|s| canonical_san(s)).collect::<Result<BTreeSet<_>, _>>()?;
    let empty = Found { cas: Vec::new(), raw_ca_crt: String::new(), signer: None, next: None, tls: None, hint: None };
    let found = secret.map_or(empty, |s| Found::read(s, now));
    let mut changes = Vec::new();
    if secret.is_none() {
        changes.push(Change::Created);
    }
    let mut cas = found.cas.clone();
    let (signer, next) = signers(&found, secret.is_some(), now, &mut cas, &mut changes)?;
    let serving = serving(&found, &signer, &own, secret.is_some(), now, &mut changes)?;

    // Every CA but the signing and the next one is kept only for the overlap.
    let overlap_over = now - serving.issued() >= CA_RETIRE_AFTER;
    let needed = |c: &Ca| c == &signer.ca || next.as_ref().is_some_and(|n| &n.ca == c);
    let before = cas.len();
    cas.retain(|c| needed(c) || !overlap_over);
    if cas.len() < before {
        changes.push(Change::CaRetired);
    }
    let out = bundle(&cas, &signer, next.as_ref(), &serving);
    if changes.is_empty() && out.ca_crt != found.raw_ca_crt {
        changes.push(Change::BundleCleaned);
    }
    Ok((!changes.is_empty()).then_some((out, changes)))
}

/// The CA that signs, and the next CA if one is published, after the steps of the rotation
/// schedule that are due at `now` (see [`CA_ROTATE_BEFORE`]): a CA generated when there is
/// none, the next one promoted once published for [`CA_PUBLISH_LEAD`], a next one published when
/// the signing one nears its end. New CAs are added to `cas`, and each step to `changes`.
fn signers(
    found: &Found,
    existed: bool,
    now: OffsetDateTime,
    cas: &mut Vec<Ca>,
    changes: &mut Vec<Change>,
) -> Result<(Signer, Option<Signer>), CertError> {
    let mut next = found.next.clone();
    let mut signer = match (found.signer.clone(), next.take()) {
        (Some(s), n) => {
            next = n;
            s
        }
        (None, Some(n)) => {
            changes.push(Change::CaPromoted);
            n
        }
        (None, None) => {
            let s = Signer::generate(now)?;
            cas.push(s.ca.clone());
            if existed {
                changes.push(Change::NewCa);
            }
            s
        }
    };
    if let Some(n) = next.take_if(|n| now >= n.ca.issued() + CA_PUBLISH_LEAD) {
        changes.push(Change::CaPromoted);
        signer = n;
    }
    if next.is_none() && signer.ca.not_after - now < CA_ROTATE_BEFORE {
        let n = Signer::generate(now)?;
        cas.push(n.ca.clone());
        next = Some(n);
        changes.push(Change::CaPublished);
    }
    Ok((signer, next))
}

/// The serving certificate to hold: the one found if `signer` signed it and it needs nothing,
/// else one re-issued (replaced, renewed, or with the union of the SANs), the step added to
/// `changes`.
fn serving(
    found: &Found,
    signer: &Signer,
    own: &BTreeSet<String>,
    existed: bool,
    now: OffsetDateTime,
    changes: &mut Vec<Change>,
) -> Result<Serving, CertError> {
    let current = found.tls.as_ref().and_then(|(crt, key)| Serving::check(crt, key, &signer.ca, now));
    Ok(match current {
        None => {
            if existed {
                changes.push(Change::ServingReplaced);
            }
            signer.sign(own, now)?
        }
        Some(s) => {
            let effective = found.hint.map_or(s.not_after, |h| h.min(s.not_after));
            let cap = (now + SERVING_VALIDITY).min(signer.ca.not_after);
            if effective - now < RENEW_BEFORE && cap - effective > RENEW_GAIN {
                changes.push(Change::ServingRenewed);
                signer.sign(own, now)?
            } else if !own.is_subset(&s.sans) {
                changes.push(Change::SansAdded);
                signer.sign(&own.union(&s.sans).cloned().collect(), now)?
            } else {
                s
            }
        }
    })
}

/// True when `secret` can be served as it stands: a signing CA with its key, and a serving
/// certificate and key that this CA signed and a server can load, all judged at the serving
/// certificate's own issue time, so whatever any clock says now. A Secret that is not usable is
/// broken at every time (absent keys, garbage, a key that is not its certificate's); what a
/// usable one lacks at another time (a renewal, a step of the CA schedule, a SAN) is an opinion
/// of the judging clock, and `webhook::certs::secret` bounds how often a replica acts on it.
pub fn usable(secret: &Secret) -> bool {
    let Some(at) = from_secret(secret).and_then(|(_, crt, _)| issue_time(&crt)) else { return false };
    let found = Found::read(secret, at);
    let Some((crt, key)) = found.tls.as_ref() else { return false };
    found.signer.iter().chain(found.next.iter()).any(|s| Serving::check(crt, key, &s.ca, at).is_some())
}

/// When the first certificate of `crt` (PEM) was issued: its `notBefore` plus [`BACKDATE`].
fn issue_time(crt: &str) -> Option<OffsetDateTime> {
    let der = CertificateDer::pem_slice_iter(crt.as_bytes()).next()?.ok()?;
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(unix(x.validity().not_before)? + BACKDATE)
}

/// The bundle as Secret data and annotations.
pub fn to_secret(bundle: &Bundle, name: &str, namespace: &str, resource_version: Option<String>) -> Secret {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    let mut data = BTreeMap::from([
        (CA_CRT.to_string(), b(&bundle.ca_crt)),
        (CA_KEY.to_string(), b(&bundle.ca_key)),
        (TLS_CRT.to_string(), b(&bundle.tls_crt)),
        (TLS_KEY.to_string(), b(&bundle.tls_key)),
    ]);
    if let Some(next) = &bundle.next_ca_key {
        data.insert(NEXT_CA_KEY.to_string(), b(next));
    }
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
        data: Some(data),
        ..Default::default()
    }
}

/// Reads the PEM strings out of a Secret: (ca.crt, tls.crt, tls.key).
pub fn from_secret(secret: &Secret) -> Option<(String, String, String)> {
    let data = secret.data.as_ref()?;
    let s = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|v| !v.is_empty());
    Some((s(CA_CRT)?, s(TLS_CRT)?, s(TLS_KEY)?))
}

/// True when a client trusting `bundle` (PEM) accepts `crt` (PEM) at `now` (test helper).
#[cfg(test)]
pub(crate) fn trusts(bundle: &str, crt: &str, now: OffsetDateTime) -> bool {
    let cert = CertificateDer::pem_slice_iter(crt.as_bytes()).next().and_then(Result::ok);
    cert.is_some_and(|c| Ca::bundle(bundle, now).iter().any(|ca| signed_by(&c, ca, now)))
}

/// How many CA certificates a PEM bundle holds that are valid at `now` (test helper).
#[cfg(test)]
pub(crate) fn ca_count(bundle: &str, now: OffsetDateTime) -> usize {
    Ca::bundle(bundle, now).len()
}

#[cfg(test)]
#[path = "material_tests.rs"]
mod tests;
