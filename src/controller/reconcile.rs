//! Reconcile and cleanup, as methods on `MyApp`.
//!
//! A reconcile compares what should exist with what the caches hold and writes only the
//! difference: an unchanged `MyApp` whose children are as applied makes no write at all, and a
//! changed one, even by a removed field, is applied (see [`children::up_to_date`]). It never
//! writes to, nor deletes, an object that the `MyApp` does not control (see [`ownership`]).

use super::Context;
use super::children::{self, selector_string};
use super::error::{Error, Result};
use super::ownership::{self, Claim, Conflict};
use crate::api::conditions::{self, NAME_CONFLICT, Outcome, READY, RolloutFacts};
use crate::api::{FINALIZER, MyApp, MyAppStatus};
use crate::backoff::Backoff;
use crate::cache::{Cached, Children, Shape};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::time::Duration;

impl MyApp {
    fn has_finalizer(&self) -> bool {
        self.finalizers().iter().any(|f| f == FINALIZER)
    }

    fn current_status(&self) -> MyAppStatus {
        self.status.clone().unwrap_or_default()
    }

    /// Writes the status computed from `outcome` unless it is what the object already has.
    /// Returns whether `Ready` became true with this write.
    async fn update_status(&self, ctx: &Context, outcome: &Outcome) -> Result<bool> {
        let generation = self.metadata.generation.ok_or(Error::MissingField("metadata.generation"))?;
        let old = self.current_status();
        let mut new = conditions::desired_status(generation, &selector_string(&self.name_any()), outcome);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        conditions::carry_transition_times(&old.conditions, &mut new.conditions, &now);
        if new == old {
            return Ok(false);
        }
        let became_ready = conditions::is_true(&new.conditions, READY) && !conditions::is_true(&old.conditions, READY);
        ctx.writer.patch_status(self, &new).await?;
        Ok(became_ready)
    }

    /// Brings the children and the status in line with the spec.
    /// Returns when to look again (`None`: only when something changes).
    pub(crate) async fn reconcile(&self, ctx: &Context) -> Result<Option<Duration>> {
        if self.meta().deletion_timestamp.is_some() {
            return self.cleanup(ctx).await;
        }
        let ns = self.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let name = self.name_any();

        // The finalizer first, so that a delete can never race the creation of the children.
        let owned;
        let app = if self.has_finalizer() {
            self
        } else {
            let mut f = self.finalizers().to_vec();
            f.push(FINALIZER.into());
            owned = ctx.writer.set_finalizers(self, f).await?;
            &owned
        };

        if let Some((reason, message)) = ctx.policy.refusal(app) {
            // Touch no child, so that nothing against the rules is rolled out.
            app.report_stall(ctx, reason, "Validate", message).await?;
            return Ok(None);
        }

        let deployment = match app.apply_children(ctx, &name, &ns).await {
            Ok(d) => d,
            Err(Error::NameConflict(conflicts)) => {
                // Touch nothing but our own status; retry with backoff until the name is free.
                app.report_stall(ctx, NAME_CONFLICT, "Apply", ownership::describe(&conflicts)).await?;
                return Err(Error::NameConflict(conflicts));
            }
            Err(e) => {
                // Say so in the status (written only if it changed), then retry with backoff.
                if let Err(status_error) = app.update_status(ctx, &Outcome::ApplyFailed(e.to_string())).await {
                    tracing::debug!(error = %status_error, "could not report the apply failure");
                }
                return Err(e);
            }
        };

        let outcome = Outcome::Rollout(RolloutFacts::from_deployment(&deployment));
        if app.update_status(ctx, &outcome).await? {
            let note = format!("{}/{} pods ready with image {}", app.spec.replicas, app.spec.replicas, app.spec.image);
            ctx.writer.event(app, EventType::Normal, "RolloutComplete", "Rollout", note).await;
        }
        Ok(Some(ctx.next_resync()))
    }

    /// Applies the Deployment and the Service where they differ from what the API server holds;
    /// returns the Deployment as it now is.
    ///
    /// # Errors
    ///
    /// [`Error::NameConflict`], before any write, when an object of either name exists that this
    /// `MyApp` does not control ([`ownership::claim`]): then neither child is written.
    async fn apply_children(&self, ctx: &Context, name: &str, ns: &str) -> Result<Deployment> {
        let uid = self.meta().uid.clone().ok_or(Error::MissingField("metadata.uid"))?;
        let live_d = live_child(ctx, &ctx.caches.deployments, ns, name).await?;
        let live_s = live_child(ctx, &ctx.caches.services, ns, name).await?;
        let conflicts: Vec<Conflict> = [
            ownership::claim("Deployment", name, live_d.as_ref().map(Live::meta), &uid),
            ownership::claim("Service", name, live_s.as_ref().map(Live::meta), &uid),
        ]
        .into_iter()
        .filter_map(Claim::conflict)
        .collect();
        if !conflicts.is_empty() {
            return Err(Error::NameConflict(conflicts));
        }
        let desired_d = children::stamp(children::deployment(self))?;
        let deployment = self.apply_child(ctx, desired_d, live_d, "deployment").await?;
        self.apply_child(ctx, children::stamp(children::service(self))?, live_s, "service").await?;
        deployment.object()
    }

    /// Reports that the `MyApp` cannot progress until its owner acts: the status says `reason`
    /// (written only if it changed), with a Warning Event when that is news. Writes nothing else.
    async fn report_stall(&self, ctx: &Context, reason: &'static str, action: &str, message: String) -> Result<()> {
        let known = conditions::find(&self.current_status().conditions, READY)
            .is_some_and(|c| c.reason == reason && c.message == message);
        let outcome = match reason {
            NAME_CONFLICT => Outcome::NameConflict(message.clone()),
            _ => Outcome::Refused { reason, message: message.clone() },
        };
        self.update_status(ctx, &outcome).await?;
        if !known {
            ctx.writer.event(self, EventType::Warning, reason, action, message).await;
        }
        Ok(())
    }

    /// Server-side applies `desired` (a [`children::stamp`]ed document) unless `live`, the object
    /// the API server holds (one this `MyApp` controls), already carries all of it. No Event: the
    /// children and the status show it, and an Event per apply was a third of a fresh `MyApp`'s
    /// writes (Events are kept for failures, the first Ready and a deletion). Returns the child as it now is. The apply is
    /// forced under one field manager, so fields the last applied document had and `desired`
    /// lacks are removed from the child. The comparison reads the child as the cache keeps it
    /// ([`Live::document`]), with no typed object in between.
    async fn apply_child<K>(&self, ctx: &Context, desired: K, live: Option<Live<K>>, label: &str) -> Result<Live<K>>
    where
        K: Shape + serde::Serialize + Clone + std::fmt::Debug,
    {
        if let Some(actual) = live
            && children::up_to_date(&serde_json::to_value(&desired)?, &actual.document()?)
        {
            return Ok(actual);
        }
        Ok(Live::Read(ctx.writer.apply(&desired, label).await?))
    }

    /// Deletes the children and releases the finalizer once both are gone.
    pub(crate) async fn cleanup(&self, ctx: &Context) -> Result<Option<Duration>> {
        if !self.has_finalizer() {
            return Ok(None);
        }
        let ns = self.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
        let name = self.name_any();
        let first_time =
            conditions::find(&self.current_status().conditions, READY).is_none_or(|c| c.reason != "Deleting");
        self.update_status(ctx, &Outcome::Deleting).await?;
        if first_time {
            let note = format!("deleting Deployment and Service {name}");
            ctx.writer.event(self, EventType::Normal, "Deleting", "Delete", note).await;
        }

        // What still stands under the children's names: the caches answer when they hold it (the
        // conservative side: a cache behind our delete only makes us wait), the API server when
        // they do not (an unlabelled child, or a cache behind a create): the finalizer must not go
        // before the children do.
        let d = live_child(ctx, &ctx.caches.deployments, &ns, &name).await?;
        let s = live_child(ctx, &ctx.caches.services, &ns, &name).await?;
        // Only what this MyApp controls: an object that merely has the name (a name conflict) stays.
        let uid = self.meta().uid.as_deref();
        let d = d.filter(|d| ownership::controlled_by(d.meta(), uid));
        let s = s.filter(|s| ownership::controlled_by(s.meta(), uid));
        if d.as_ref().map(Live::deleting).transpose()? == Some(false) {
            ctx.writer.delete::<Deployment>(&ns, &name, "deployment").await?;
        }
        if s.as_ref().map(Live::deleting).transpose()? == Some(false) {
            ctx.writer.delete::<Service>(&ns, &name, "service").await?;
        }
        if d.is_some() || s.is_some() {
            // The children's delete events wake us (the controller watches them); this is the
            // safety net, backing off as the wait grows.
            let waited = self.meta().deletion_timestamp.as_ref().map_or(Duration::ZERO, |t| {
                let since = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                Duration::try_from(since).unwrap_or(Duration::ZERO)
            });
            return Ok(Some(cleanup_recheck(waited)));
        }
        let finalizers = self.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
        ctx.writer.set_finalizers(self, finalizers).await?;
        Ok(None)
    }
}

/// When to look again at a deletion that waits for its children, `waited` after it began: 1 s at
/// first, then as long as it has waited so far (so each wait doubles), at most a minute.
pub(crate) fn cleanup_recheck(waited: Duration) -> Duration {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).again_after(waited)
}

/// A child as the API server holds it: as the cache keeps it, or as a GET returned it.
enum Live<K> {
    /// From the cache, in compact form.
    Kept(Box<Cached<K>>),
    /// Read from the API server (or just written).
    Read(K),
}

impl<K: Shape + serde::Serialize> Live<K> {
    /// Its name, namespace and owner references (all that ownership reads).
    fn meta(&self) -> &ObjectMeta {
        match self {
            Live::Kept(c) => c.meta(),
            Live::Read(k) => k.meta(),
        }
    }

    /// Its JSON: of a cached child, what the cache keeps, read from the compact text.
    fn document(&self) -> Result<serde_json::Value> {
        Ok(match self {
            Live::Kept(c) => c.document()?,
            Live::Read(k) => serde_json::to_value(k)?,
        })
    }

    /// Whether it is being deleted.
    fn deleting(&self) -> Result<bool> {
        Ok(match self {
            Live::Kept(_) => self.document()?.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null()),
            Live::Read(k) => k.meta().deletion_timestamp.is_some(),
        })
    }

    /// The typed object (the Deployment, whose status reconcile reads).
    fn object(self) -> Result<K> {
        Ok(match self {
            Live::Kept(c) => c.object()?,
            Live::Read(k) => k,
        })
    }
}

/// The object the API server holds under a child's name: the cached one, or, when the cache has
/// none, the answer of a GET. The caches hold only objects labelled as managed by the operator, so
/// this is how an unlabelled object of the same name (one made by hand) is seen. The GET is made
/// only when the cache has nothing: for a new `MyApp`, a child deleted or unlabelled by someone, a
/// cache behind our own write, or a conflict. A child in the cache costs no call.
async fn live_child<K>(ctx: &Context, cache: &Children<K>, ns: &str, name: &str) -> Result<Option<Live<K>>>
where
    K: Shape + Clone + std::fmt::Debug,
{
    if let Some(packed) = cache.get(ns, name) {
        return Ok(Some(Live::Kept(Box::new(packed.unpack()?))));
    }
    let api: Api<K> = Api::namespaced(ctx.client(), ns);
    Ok(api.get_opt(name).await?.map(Live::Read))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_rechecks_back_off() {
        let secs = |s: u64| cleanup_recheck(Duration::from_secs(s)).as_secs();
        assert_eq!((secs(0), secs(1), secs(3), secs(40), secs(3600)), (1, 1, 3, 40, 60));
        // Rechecking after each delay doubles the time waited: 1, 2, 4, … then every minute.
        let mut waited = Duration::ZERO;
        let delays: Vec<u64> = (0..9)
            .map(|_| {
                let d = cleanup_recheck(waited);
                waited += d;
                d.as_secs()
            })
            .collect();
        assert_eq!(delays, vec![1, 1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
