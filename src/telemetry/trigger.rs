//! What triggered a reconcile.
//!
//! kube's controller opens a `reconciling object` span around each reconcile, whose `object.reason`
//! field says why it runs (the object changed, one of its children changed, a requeue, an error
//! retry, a reconcile of everything), but it hands the reconciler only the object. [`TriggerLayer`]
//! keeps that field on the span, and [`current`] reads it back from inside the reconcile, which
//! records it on its own span as `trigger`.

use std::fmt::Debug;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The name of kube's span around a reconcile.
const RECONCILING: &str = "reconciling object";

/// Stored in the extensions of a `reconciling object` span.
struct Trigger(String);

#[derive(Default)]
struct Reason(Option<String>);

impl Visit for Reason {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "object.reason" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Keeps `object.reason` of kube's `reconciling object` spans.
pub struct TriggerLayer;

impl<S> Layer<S> for TriggerLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != RECONCILING {
            return;
        }
        let mut reason = Reason::default();
        attrs.record(&mut reason);
        if let (Some(reason), Some(span)) = (reason.0, ctx.span(id)) {
            span.extensions_mut().insert(Trigger(reason));
        }
    }
}

/// The trigger of the reconcile the current span belongs to, if the layer saw one.
pub fn current() -> Option<String> {
    let id = tracing::Span::current().id()?;
    tracing::dispatcher::get_default(|d| {
        let registry = d.downcast_ref::<Registry>()?;
        let span = registry.span(&id)?;
        span.scope().find_map(|s| s.extensions().get::<Trigger>().map(|t| t.0.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_reason_reaches_spans_below_it() {
        let subscriber = tracing_subscriber::registry().with(TriggerLayer);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current(), None, "no span");
            let outer = tracing::info_span!("reconciling object", object.reason = %"object updated");
            let _o = outer.enter();
            let inner = tracing::info_span!("reconcile");
            let _i = inner.enter();
            assert_eq!(current().as_deref(), Some("object updated"));
        });
        tracing::subscriber::with_default(tracing_subscriber::registry().with(TriggerLayer), || {
            let other = tracing::info_span!("something else", object.reason = %"ignored");
            let _o = other.enter();
            assert_eq!(current(), None, "only kube's reconcile span counts");
        });
    }
}
