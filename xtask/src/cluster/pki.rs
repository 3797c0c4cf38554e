//! A throwaway PKI for the local control plane: one CA, the API server's serving certificate,
//! client certificates for the admin and each component, and the service-account signing key.
//! All ECDSA P-256, valid for 30 days; `cluster up` makes a new one whenever the run directory
//! has none.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// A client identity: common name (user) and organizations (groups).
pub struct ClientId<'a> {
    /// File stem under `pki/`.
    pub file: &'a str,
    /// User name.
    pub user: &'a str,
    /// Groups.
    pub groups: &'a [&'a str],
}

/// Identities the control plane uses.
pub const CLIENTS: &[ClientId<'static>] = &[
    ClientId { file: "admin", user: "kubernetes-admin", groups: &["system:masters"] },
    ClientId { file: "controller-manager", user: "system:kube-controller-manager", groups: &[] },
    ClientId { file: "scheduler", user: "system:kube-scheduler", groups: &[] },
    ClientId { file: "kwok", user: "kwok-controller", groups: &["system:masters"] },
    // The real node: the Node authorizer knows kubelets by this name and group.
    ClientId { file: "kubelet", user: "system:node:myapp-node", groups: &["system:nodes"] },
    // Bound to system:node-proxier by the API server's bootstrap RBAC.
    ClientId { file: "kube-proxy", user: "system:kube-proxy", groups: &[] },
    // The API server's identity towards kubelets (logs, exec).
    ClientId { file: "apiserver-kubelet-client", user: "kube-apiserver-kubelet-client", groups: &["system:masters"] },
];

/// Bumped whenever what [`ensure`] writes changes, so that an older run directory is rewritten.
const LAYOUT: &str = "2: node client certificates, node address in the serving certificate";

fn params(cn: &str, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(days);
    p
}

fn write(dir: &Path, name: &str, cert_pem: &str, key: &KeyPair) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.crt")), cert_pem)?;
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    Ok(())
}

/// Writes the PKI into `dir` unless a CA is already there; `node_ip` is the real node's address,
/// which the API server advertises to pods, in its serving certificate.
pub fn ensure(dir: &Path, node_ip: Ipv4Addr) -> Result<()> {
    let layout = dir.join("layout");
    if dir.join("ca.crt").is_file()
        && dir.join("sa.key").is_file()
        && std::fs::read_to_string(&layout).is_ok_and(|l| l == LAYOUT)
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;

    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca_params = params("myapp-local-ca", 30);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
    write(dir, "ca", &ca_cert.pem(), &ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = params("kube-apiserver", 30);
    serving.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
        SanType::IpAddress(IpAddr::V4(node_ip)),
        SanType::DnsName("localhost".try_into()?),
        SanType::DnsName("kubernetes".try_into()?),
        SanType::DnsName("kubernetes.default".try_into()?),
        SanType::DnsName("kubernetes.default.svc".try_into()?),
        SanType::DnsName("kubernetes.default.svc.cluster.local".try_into()?),
    ];
    serving.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    write(dir, "apiserver", &serving.signed_by(&serving_key, &issuer)?.pem(), &serving_key)?;

    for c in CLIENTS {
        let key = KeyPair::generate()?;
        let mut p = params(c.user, 30);
        for g in c.groups {
            p.distinguished_name.push(DnType::OrganizationName, *g);
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write(dir, c.file, &p.signed_by(&key, &issuer)?.pem(), &key)?;
    }

    let sa = KeyPair::generate()?;
    std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    std::fs::write(layout, LAYOUT)?;
    Ok(())
}

/// A kubeconfig for `client` against `server`, with the certificates inlined.
pub fn kubeconfig(dir: &Path, server: &str, client: &str) -> Result<String> {
    use base64::Engine;
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let ca = std::fs::read(dir.join("ca.crt"))?;
    let crt = std::fs::read(dir.join(format!("{client}.crt")))?;
    let key = std::fs::read(dir.join(format!("{client}.key")))?;
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: myapp-local\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {client}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: myapp-local\n  context:\n    cluster: myapp-local\n    user: {client}\n    namespace: default\ncurrent-context: myapp-local\n",
        b64(&ca),
        b64(&crt),
        b64(&key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_is_complete_and_not_regenerated() {
        let dir = std::env::temp_dir().join(format!("myapp-pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ensure(&dir, Ipv4Addr::new(10, 255, 0, 1)).expect("pki");
        for f in ["ca.crt", "apiserver.crt", "admin.key", "scheduler.crt", "sa.key", "sa.pub"] {
            assert!(dir.join(f).is_file(), "{f}");
        }
        let before = std::fs::read(dir.join("ca.crt")).expect("ca");
        ensure(&dir, Ipv4Addr::new(10, 255, 0, 1)).expect("pki again");
        assert_eq!(before, std::fs::read(dir.join("ca.crt")).expect("ca"));
        let kc = kubeconfig(&dir, "https://127.0.0.1:6443", "admin").expect("kubeconfig");
        assert!(kc.contains("client-certificate-data: LS0t"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
