//! Where the served certificate comes from ([`CertSource`]), what is served ([`Pem`]), and why
//! a pass of its upkeep fails ([`UpkeepError`]): what the Secret, the caBundle and the upkeep
//! share.

use super::material::{self, CertError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// The bound on each step of an upkeep pass (the Secret, then the caBundle), on top of the
/// client's own per-call timeout.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// A Secret shared by every replica, created and renewed by them; the CA is patched into the
    /// webhook configurations named `config`.
    SelfManaged {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        secret: String,
        /// SANs of the serving certificate.
        sans: Vec<String>,
        /// Name of the Mutating- and ValidatingWebhookConfiguration.
        config: String,
    },
    /// `tls.crt`, `tls.key` and `ca.crt` in a folder (e.g. a mounted cert-manager Secret).
    Dir {
        /// The folder.
        dir: PathBuf,
        /// A name the certificate is valid for, used by the readiness self-check.
        server_name: String,
    },
}

/// Why a pass of the certificate upkeep failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum UpkeepError {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A certificate could not be made.
    #[error("certificate: {0}")]
    Cert(#[from] CertError),
    /// Other writers kept winning.
    #[error("{what} did not settle after {attempts} conflicting writes")]
    Contended {
        /// What was written.
        what: &'static str,
        /// How many rounds were tried.
        attempts: u32,
    },
    /// A step of the pass took longer than [`PASS_TIMEOUT`].
    #[error("{0} did not finish within {PASS_TIMEOUT:?}")]
    Timeout(&'static str),
    /// A certificate file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate and key do not load into the TLS server.
    #[error("load the certificate into the server: {0}")]
    Load(#[source] std::io::Error),
    /// A Secret judged usable lacks a key (cannot happen with [`material::next_state`]).
    #[error("the certificate Secret is incomplete")]
    Incomplete,
    /// An object from the API server has no resourceVersion.
    #[error("an object has no resourceVersion")]
    NoResourceVersion,
}

/// The PEM material served: the trust bundle, the certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Pem {
    pub(crate) ca: String,
    pub(crate) crt: String,
    pub(crate) key: String,
}

/// This replica's wall clock (a test sets its own). Certificates are judged by the API server's
/// clock; this one only when an answer carries no `Date` (see [`super::secret`]).
pub(crate) type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The PEM files in `dir`.
pub(crate) fn read_dir(dir: &Path) -> Result<Pem, UpkeepError> {
    let r = |f: &str| {
        let path = dir.join(f);
        std::fs::read_to_string(&path).map_err(|source| UpkeepError::Read { path, source })
    };
    Ok(Pem { ca: r(material::CA_CRT)?, crt: r(material::TLS_CRT)?, key: r(material::TLS_KEY)? })
}
