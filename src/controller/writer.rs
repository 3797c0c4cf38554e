//! The single door for writes. Every write the controller makes — server-side applies of the
//! children, status patches, finalizer changes, deletes and Events — goes through [`Writer`], which
//! checks the [`Fence`] first and counts the write in the metrics.

use super::error::{Error, Result};
use super::events::Publisher;
use super::fenced::FencedClient;
use crate::api::{FIELD_MANAGER, MyApp, MyAppStatus};
use crate::leader::Fence;
use crate::telemetry::metrics::Metrics;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::fmt::Debug;
use std::sync::Arc;

/// Writes on behalf of the controller.
pub(crate) struct Writer {
    client: FencedClient,
    events: Publisher,
    metrics: Arc<Metrics>,
    fence: Fence,
}

impl Writer {
    /// A writer through `client`, checking `fence` before every write.
    pub(crate) fn new(client: FencedClient, fence: Fence, events: Publisher, metrics: Arc<Metrics>) -> Self {
        Self { client, events, metrics, fence }
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        self.client.api(namespace)
    }

    /// Server-side applies `obj` with force under the operator's field manager.
    pub(crate) async fn apply<K>(&self, obj: &K, label: &str) -> Result<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
    {
        let ns = obj.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let name = obj.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
        self.fence.check()?;
        self.metrics.write(label, "apply");
        let params = PatchParams::apply(FIELD_MANAGER).force();
        Ok(self.api::<K>(&ns).patch(&name, &params, &Patch::Apply(obj)).await?)
    }

    /// Deletes a child in the foreground: the call returns at once, and the child disappears only
    /// after its own dependents (ReplicaSets, Pods) are gone.
    pub(crate) async fn delete<K>(&self, namespace: &str, name: &str, label: &str) -> Result<()>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
    {
        self.fence.check()?;
        self.metrics.write(label, "delete");
        let params =
            DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..DeleteParams::default() };
        match self.api::<K>(namespace).delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `status` through the status subresource.
    pub(crate) async fn patch_status(&self, app: &MyApp, status: &MyAppStatus) -> Result<MyApp> {
        let ns = app.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        self.fence.check()?;
        self.metrics.write("myapp_status", "patch");
        let patch = Patch::Merge(json!({ "status": status }));
        Ok(self.api::<MyApp>(&ns).patch_status(&app.name_any(), &PatchParams::default(), &patch).await?)
    }

    /// Sets the finalizer list, on the condition that the object is still at the
    /// resourceVersion we read (a 409 otherwise, and the reconcile retries).
    pub(crate) async fn set_finalizers(&self, app: &MyApp, finalizers: Vec<String>) -> Result<MyApp> {
        let ns = app.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let rv = app.resource_version().ok_or(Error::MissingField("metadata.resourceVersion"))?;
        self.fence.check()?;
        self.metrics.write("myapp", "patch");
        let patch = Patch::Merge(json!({ "metadata": { "finalizers": finalizers, "resourceVersion": rv } }));
        Ok(self.api::<MyApp>(&ns).patch(&app.name_any(), &PatchParams::default(), &patch).await?)
    }

    /// Publishes an Event about `app`. A failure to publish is logged, never fatal.
    pub(crate) async fn event(&self, app: &MyApp, type_: EventType, reason: &str, action: &str, note: String) {
        if self.fence.check().is_err() {
            return;
        }
        self.metrics.write("event", "create");
        if let Err(e) = self.events.publish(&app.object_ref(&()), type_, reason, action, note).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}
