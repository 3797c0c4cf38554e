//! [`next_state`] against each way the Secret can be broken, two replicas with different SANs,
//! and the CA rotation schedule, at chosen times.

use super::*;

fn sans() -> Vec<String> {
    vec!["myapp-operator-webhook.myapp-system.svc".into(), "127.0.0.1".into()]
}

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("time")
}

fn data(s: &Secret, key: &str) -> String {
    s.data.as_ref().and_then(|d| d.get(key)).map(|v| String::from_utf8_lossy(&v.0).into_owned()).unwrap_or_default()
}

/// What a replica with `sans` writes at `now`, if anything: the new Secret and why.
fn step(secret: Option<&Secret>, sans: &[String], now: OffsetDateTime) -> Option<(Secret, Vec<Change>)> {
    let next = next_state(secret, sans, now).expect("next state");
    next.map(|(b, why)| (to_secret(&b, "s", "ns", None), why))
}

/// The Secret a replica with [`sans`] creates at `now`; it is a fixpoint.
fn fresh(now: OffsetDateTime) -> Secret {
    let (s, why) = step(None, &sans(), now).expect("a Secret is created");
    assert_eq!(why, [Change::Created]);
    assert!(step(Some(&s), &sans(), now).is_none(), "a fresh Secret needs nothing");
    s
}

/// The Secret after `secret` is fixed at `now`: asserts that exactly one write fixes it.
fn settle(secret: &Secret, now: OffsetDateTime) -> (Secret, Vec<Change>) {
    let (fixed, why) = step(Some(secret), &sans(), now).expect("a write");
    assert!(step(Some(&fixed), &sans(), now).is_none(), "one write settles it ({why:?})");
    assert!(step(Some(&fixed), &sans(), now + Duration::hours(1)).is_none(), "and it stays settled");
    assert!(trusts(&data(&fixed, CA_CRT), &data(&fixed, TLS_CRT), now), "the bundle trusts the served certificate");
    (fixed, why)
}

#[test]
fn issue_and_renew_with_the_same_ca() {
    let now = t0();
    let first = issue(&sans(), None, now).expect("issue");
    assert!(first.ca_crt.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(first.tls_key.contains("PRIVATE KEY"));
    let second = issue(&sans(), Some((&first.ca_crt, &first.ca_key)), now).expect("renew");
    assert_eq!(first.ca_crt, second.ca_crt, "renewal keeps the CA, so caBundle stays valid");
    assert_ne!(first.tls_crt, second.tls_crt);
    assert!(issue(&sans(), Some((&first.ca_crt, &second.tls_key)), now).is_err(), "a key that is not the CA's");
}

#[test]
fn not_after_is_read_from_the_serving_certificate_not_the_ca() {
    let bundle = issue(&sans(), None, t0()).expect("issue");
    assert_eq!(not_after(&bundle.tls_crt), Some(bundle.not_after.unix_timestamp()));
    assert_eq!(bundle.not_after, t0() + SERVING_VALIDITY, "the serving certificate's whole validity");
    assert_ne!(not_after(&bundle.ca_crt), not_after(&bundle.tls_crt), "the CA lives longer");
    assert_eq!(not_after("not a certificate"), None);
    assert_eq!(not_after(&bundle.tls_key), None, "a key is no certificate");
}

#[test]
fn the_serving_certificate_is_renewed_30_days_before_expiry_with_the_same_ca() {
    let s = fresh(t0());
    assert!(step(Some(&s), &sans(), t0() + Duration::days(59)).is_none());
    let (renewed, why) = settle(&s, t0() + Duration::days(61));
    assert_eq!(why, [Change::ServingRenewed]);
    assert_eq!(data(&renewed, CA_CRT), data(&s, CA_CRT));
    assert_ne!(data(&renewed, TLS_CRT), data(&s, TLS_CRT));
}

#[test]
fn an_earlier_expiry_annotation_forces_a_renewal() {
    let mut s = fresh(t0());
    let soon = (t0() + Duration::days(1)).format(&time::format_description::well_known::Rfc3339).expect("format");
    s.metadata.annotations.get_or_insert_default().insert(NOT_AFTER.into(), soon);
    let (_, why) = settle(&s, t0());
    assert_eq!(why, [Change::ServingRenewed]);
}

#[test]
fn garbage_in_each_key_is_replaced() {
    let now = t0();
    let s = fresh(now);
    let other = issue(&sans(), None, now).expect("another CA");
    let cases: [(&str, &str, bool); 8] = [
        (TLS_CRT, "garbage", false),
        (TLS_KEY, "garbage", false),
        (CA_CRT, "garbage", true),
        (CA_KEY, "garbage", true),
        // Well-formed, and wrong: the key of another certificate, a certificate of another CA,
        // a CA certificate as the serving certificate, a serving certificate as the CA.
        (TLS_KEY, &other.tls_key, false),
        (TLS_CRT, &other.tls_crt, false),
        (TLS_CRT, &other.ca_crt, false),
        (CA_CRT, &other.tls_crt, true),
    ];
    for (key, junk, new_ca) in cases {
        let mut broken = s.clone();
        broken.data.get_or_insert_default().insert(key.into(), ByteString(junk.as_bytes().to_vec()));
        let (fixed, why) = settle(&broken, now);
        let ca_kept = data(&fixed, CA_CRT) == data(&s, CA_CRT);
        assert_eq!(!ca_kept, new_ca, "{key} = {junk:.20}: {why:?}");
        assert!(why.contains(&Change::ServingReplaced), "{key}: {why:?}");
        assert!(trusts(&data(&fixed, CA_CRT), &data(&fixed, TLS_CRT), now));
        if key == CA_KEY {
            // The old CA is still valid: it stays trusted for the overlap, then leaves.
            assert_eq!(why, [Change::NewCa, Change::ServingReplaced]);
            assert_eq!(ca_count(&data(&fixed, CA_CRT), now), 2, "the old CA stays trusted meanwhile");
            let (retired, why) = settle(&fixed, now + CA_RETIRE_AFTER + Duration::minutes(1));
            assert_eq!(why, [Change::CaRetired]);
            assert_eq!(ca_count(&data(&retired, CA_CRT), now), 1);
        }
    }
    let mut empty = s.clone();
    empty.data = None;
    settle(&empty, now);
}

#[test]
fn an_expired_ca_is_replaced() {
    let s = fresh(t0());
    let later = t0() + CA_VALIDITY + Duration::days(1);
    let (fixed, why) = settle(&s, later);
    assert_eq!(why, [Change::NewCa, Change::ServingReplaced]);
    assert_eq!(ca_count(&data(&fixed, CA_CRT), later), 1, "an expired CA is not kept");
}

#[test]
fn a_ca_bundle_with_extra_blocks_is_cleaned() {
    let s = fresh(t0());
    let mut messy = s.clone();
    let text = format!("{0}{0}junk\n", data(&s, CA_CRT));
    messy.data.get_or_insert_default().insert(CA_CRT.into(), ByteString(text.into_bytes()));
    let (fixed, why) = settle(&messy, t0());
    assert_eq!(why, [Change::BundleCleaned]);
    assert_eq!(data(&fixed, CA_CRT), data(&s, CA_CRT));
    assert_eq!(data(&fixed, TLS_CRT), data(&s, TLS_CRT), "the serving certificate is kept");
}

/// Two replicas with different SANs, each writing whenever it sees a Secret it would change:
/// they stop after one write each, and the certificate carries both sets.
#[test]
fn replicas_with_different_sans_converge() {
    let a: Vec<String> = vec!["svc.ns.svc".into(), "a.example".into()];
    let b: Vec<String> = vec!["svc.ns.svc".into(), "b.example".into()];
    let now = t0();
    let (mut secret, _) = step(None, &a, now).expect("create");
    let mut writes = 1;
    let mut quiet = 0;
    for turn in 0..20 {
        let sans = if turn % 2 == 0 { &b } else { &a };
        match step(Some(&secret), sans, now) {
            Some((s, why)) => {
                assert_eq!(why, [Change::SansAdded]);
                secret = s;
                writes += 1;
                quiet = 0;
            }
            None => quiet += 1,
        }
        if quiet == 2 {
            break;
        }
    }
    assert_eq!(quiet, 2, "both replicas are satisfied");
    assert_eq!(writes, 2, "one create and one merge");
    let sans = secret.metadata.annotations.as_ref().and_then(|a| a.get(SANS)).cloned().unwrap_or_default();
    assert_eq!(sans, "a.example,b.example,svc.ns.svc");
    // A renewal for expiry prunes the union to the renewing replica's SANs; the other adds its
    // own back once.
    let later = now + Duration::days(61);
    let (renewed, why) = step(Some(&secret), &a, later).expect("renewal");
    assert_eq!(why, [Change::ServingRenewed]);
    let (merged, why) = step(Some(&renewed), &b, later).expect("merge");
    assert_eq!(why, [Change::SansAdded]);
    assert!(step(Some(&merged), &a, later).is_none() && step(Some(&merged), &b, later).is_none());
}

#[test]
fn the_ca_rotates_with_an_overlap() {
    let ca_end = t0() + CA_VALIDITY;
    // Kept current until ten days before the rotation starts.
    let (s, _) = settle(&fresh(t0()), ca_end - CA_ROTATE_BEFORE - Duration::days(10));
    let old_ca = data(&s, CA_CRT);
    // Nothing happens until the CA has less than CA_ROTATE_BEFORE left.
    assert!(step(Some(&s), &sans(), ca_end - CA_ROTATE_BEFORE - Duration::hours(1)).is_none());

    // 1. A next CA is published; the old one still signs.
    let t1 = ca_end - CA_ROTATE_BEFORE + Duration::hours(1);
    let (published, why) = settle(&s, t1);
    assert_eq!(why, [Change::CaPublished]);
    assert_eq!(ca_count(&data(&published, CA_CRT), t1), 2);
    assert!(data(&published, CA_CRT).starts_with(&old_ca), "the old CA stays first");
    assert_eq!(data(&published, TLS_CRT), data(&s, TLS_CRT), "the serving certificate is kept");
    assert!(!data(&published, NEXT_CA_KEY).is_empty());
    let new_ca = data(&published, CA_CRT)[old_ca.len()..].to_string();
    assert!(step(Some(&published), &sans(), t1 + CA_PUBLISH_LEAD - Duration::minutes(10)).is_none(), "lead time");

    // 2. After the lead time, the new CA signs; both are trusted.
    let t2 = t1 + CA_PUBLISH_LEAD;
    let (promoted, why) = settle(&published, t2);
    assert_eq!(why, [Change::CaPromoted, Change::ServingReplaced]);
    assert_eq!(data(&promoted, CA_CRT), data(&published, CA_CRT), "both CAs trusted");
    assert!(trusts(&new_ca, &data(&promoted, TLS_CRT), t2), "signed by the new CA");
    assert!(!trusts(&old_ca, &data(&promoted, TLS_CRT), t2), "not by the old one");
    assert!(trusts(&old_ca, &data(&published, TLS_CRT), t2), "the previous certificate is still trusted");
    assert!(data(&promoted, NEXT_CA_KEY).is_empty());
    assert!(step(Some(&promoted), &sans(), t2 + CA_RETIRE_AFTER - Duration::minutes(10)).is_none(), "overlap");

    // 3. After the overlap, the old CA leaves the bundle.
    let t3 = t2 + CA_RETIRE_AFTER + Duration::minutes(1);
    let (retired, why) = settle(&promoted, t3);
    assert_eq!(why, [Change::CaRetired]);
    assert_eq!(data(&retired, CA_CRT), new_ca);
    assert_eq!(data(&retired, TLS_CRT), data(&promoted, TLS_CRT));
    assert!(step(Some(&retired), &sans(), t3 + Duration::days(30)).is_none());
}

#[test]
fn a_serving_certificate_capped_by_its_ca_is_a_fixpoint() {
    // A cluster switched off until 20 days before its CA's end: the serving certificate has long
    // expired, the rotation only starts, so the old CA must sign one more certificate, which it
    // caps at its own end (< RENEW_BEFORE away). That must not be "due" again.
    let s = fresh(t0());
    let late = t0() + CA_VALIDITY - Duration::days(20);
    let (fixed, why) = settle(&s, late);
    assert_eq!(why, [Change::CaPublished, Change::ServingReplaced]);
    assert!(step(Some(&fixed), &sans(), late + Duration::hours(12)).is_none());
}

#[test]
fn bad_san_is_an_error() {
    assert!(matches!(issue(&["not a name!".to_string()], None, t0()), Err(CertError::InvalidSan(_))));
    assert!(matches!(next_state(None, &[], t0()), Err(CertError::NoSans)));
}

#[test]
fn secret_round_trip() {
    let b = issue(&sans(), None, t0()).expect("issue");
    let s = to_secret(&b, "s", "ns", Some("7".into()));
    assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
    assert_eq!(from_secret(&s), Some((b.ca_crt.clone(), b.tls_crt.clone(), b.tls_key.clone())));
}

#[test]
fn pem_is_written_as_rcgen_writes_it() {
    // Secrets written by earlier versions (rcgen's PEM) must not look unclean, or every replica
    // would rewrite the bundle once on upgrade.
    let key = KeyPair::generate().expect("key");
    let crt = ca_params(t0()).self_signed(&key).expect("CA");
    assert_eq!(pem("CERTIFICATE", crt.der()), crt.pem());
}

#[test]
fn a_secret_is_usable_whatever_the_clock_unless_it_is_broken() {
    let s = fresh(t0());
    assert!(usable(&s), "fresh");
    assert!(step(Some(&s), &sans(), t0() + Duration::days(365)).is_some(), "a clock a year ahead wants a rewrite");
    assert!(usable(&s), "yet it is usable as it stands: that rewrite is rate-bounded, not urgent");
    for key in [TLS_CRT, TLS_KEY, CA_CRT, CA_KEY] {
        let mut broken = s.clone();
        broken.data.get_or_insert_default().insert(key.into(), ByteString(b"garbage".to_vec()));
        assert!(!usable(&broken), "garbage in {key}");
    }
    let other = to_secret(&issue(&sans(), None, t0()).expect("another CA"), "s", "ns", None);
    let mut mixed = s.clone();
    mixed.data.get_or_insert_default().insert(TLS_CRT.into(), ByteString(data(&other, TLS_CRT).into_bytes()));
    assert!(!usable(&mixed), "a certificate that is not the key's, nor signed by the CA");
}
