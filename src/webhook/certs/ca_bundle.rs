//! The caBundle of the two webhook configurations, kept equal to the trust bundle of the
//! certificate Secret.
//!
//! # Guarantees
//!
//! - **Compare-and-swap**: the patch is a JSON patch whose first operation tests
//!   `metadata.resourceVersion` against the version read. The API server applies a patch to the
//!   current object atomically, so a patch computed from a stale read fails (422, a failed test)
//!   instead of overwriting a newer configuration; the configuration is then read again and
//!   judged afresh, at most [`MAX_ATTEMPTS`] times.
//! - **No needless writes**: a configuration whose every webhook already carries the bundle is
//!   not written. With several replicas racing to repair the same drift, one write lands and the
//!   others' tests fail, after which they find nothing to do.
//! - A configuration that does not exist is no error (not installed yet, or webhooks are
//!   configured elsewhere); it is patched once it appears, since the caller watches both.
//!
//! The caller runs [`ensure`] on every event of either configuration (see [`super::upkeep`]), so a
//! re-apply that wipes the caBundle is repaired within a round trip of its watch event.

use super::source::UpkeepError;
use json_patch::{AddOperation, PatchOperation, TestOperation};
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

/// Rounds of read, judge, patch per configuration before giving up for this pass.
pub(crate) const MAX_ATTEMPTS: u32 = 5;

/// Makes every webhook of the Mutating- and ValidatingWebhookConfiguration named `config` carry
/// exactly `ca` (PEM) as its caBundle. Returns how many configurations were written.
pub(super) async fn ensure(client: &Client, config: &str, ca: &str) -> Result<usize, UpkeepError> {
    let ca = ca.as_bytes();
    let mutating = ensure_one(Api::<MutatingWebhookConfiguration>::all(client.clone()), config, ca, |m| {
        m.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone())).collect()
    })
    .await?;
    let validating = ensure_one(Api::<ValidatingWebhookConfiguration>::all(client.clone()), config, ca, |v| {
        v.webhooks.iter().flatten().map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone())).collect()
    })
    .await?;
    Ok(usize::from(mutating) + usize::from(validating))
}

/// The patch that sets `ca` on every webhook of a configuration at `resource_version` whose
/// caBundles are `current`, or `None` when all carry it already.
fn patch(resource_version: &str, current: &[Option<Vec<u8>>], ca: &[u8]) -> Option<json_patch::Patch> {
    use base64::Engine;
    let value = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(ca));
    let sets: Vec<PatchOperation> = current
        .iter()
        .enumerate()
        .filter(|(_, bundle)| bundle.as_deref() != Some(ca))
        .map(|(i, _)| {
            let path = jsonptr::PointerBuf::from_tokens(["webhooks", &i.to_string(), "clientConfig", "caBundle"]);
            PatchOperation::Add(AddOperation { path, value: value.clone() })
        })
        .collect();
    if sets.is_empty() {
        return None;
    }
    let test = PatchOperation::Test(TestOperation {
        path: jsonptr::PointerBuf::from_tokens(["metadata", "resourceVersion"]),
        value: serde_json::Value::String(resource_version.to_string()),
    });
    Some(json_patch::Patch(std::iter::once(test).chain(sets).collect()))
}

/// True when it wrote.
async fn ensure_one<K>(
    api: Api<K>,
    name: &str,
    ca: &[u8],
    bundles: impl Fn(&K) -> Vec<Option<Vec<u8>>>,
) -> Result<bool, UpkeepError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..MAX_ATTEMPTS {
        let Some(obj) = api.get_opt(name).await? else { return Ok(false) };
        let rv = obj.resource_version().ok_or(UpkeepError::NoResourceVersion)?;
        let Some(p) = patch(&rv, &bundles(&obj), ca) else { return Ok(false) };
        match api.patch(name, &PatchParams::default(), &Patch::<()>::Json(p)).await {
            Ok(_) => {
                tracing::info!(config = name, kind = %K::kind(&()), "caBundle patched");
                return Ok(true);
            }
            // The test failed (422) or the write raced (409): someone wrote since the read.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(UpkeepError::Contended { what: "a webhook configuration's caBundle", attempts: MAX_ATTEMPTS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_tests_the_version_and_sets_only_what_differs() {
        let p = patch("42", &[Some(b"ca".to_vec()), None, Some(b"old".to_vec())], b"ca").expect("a patch");
        let json = serde_json::to_value(&p).expect("json");
        assert_eq!(json[0], serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": "42"}));
        let paths: Vec<&str> =
            json.as_array().into_iter().flatten().skip(1).filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(paths, ["/webhooks/1/clientConfig/caBundle", "/webhooks/2/clientConfig/caBundle"]);
        assert!(patch("42", &[Some(b"ca".to_vec())], b"ca").is_none(), "nothing to do, no write");
    }
}
