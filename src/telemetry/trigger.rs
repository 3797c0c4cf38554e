//! What triggered a reconcile.
//!
//! kube's controller opens a `reconciling object` span around each reconcile, whose `object.reason`
//! field says why it runs (the object changed, one of its children changed, a requeue, an error
//! retry, a reconcile of everything), but it hands the reconciler only the object. `TriggerLayer`
//! keeps that field on the span, and `current` reads it back from inside the reconcile, which
//! records it on its own span as `trigger`.
//!
//! The span's name and field are kube's internals, not its API: a test runs a real `Controller`
//! and fails if kube renames either.

use std::fmt::Debug;
use tracing::Level;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Registry;
use tracing_subscriber::filter::{Filtered, Targets};
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
pub(crate) struct TriggerLayer;

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

/// The [`TriggerLayer`] as the operator installs it: it looks only at kube's runtime spans.
pub(crate) fn layer<S>() -> Filtered<TriggerLayer, Targets, S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    TriggerLayer.with_filter(Targets::new().with_target("kube_runtime", Level::INFO))
}

/// The trigger of the reconcile the current span belongs to, if the layer saw one.
pub(crate) fn current() -> Option<String> {
    let id = tracing::Span::current().id()?;
    tracing::dispatcher::get_default(|d| {
        let registry = d.downcast_ref::<Registry>()?;
        let span = registry.span(&id)?;
        span.scope().find_map(|s| s.extensions().get::<Trigger>().map(|t| t.0.clone()))
    })
    .map(|reason| if reason == UNKNOWN { BULK_PASS.to_string() } else { reason })
}

/// kube's reason for a reconcile requested through `Controller::reconcile_on`.
const UNKNOWN: &str = "unknown";

/// What [`current`] says instead: the controller's only `reconcile_on` stream is the bulk pass
/// ([`crate::controller::queue::bulk_pass`]).
pub(crate) const BULK_PASS: &str = "bulk pass";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MyApp, MyAppSpec};
    use crate::fake_api::FakeApi;
    use futures::StreamExt;
    use kube::Api;
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::watcher;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
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

    /// A span as it was opened.
    #[derive(Clone, Debug)]
    struct NewSpan {
        name: &'static str,
        target: &'static str,
        level: Level,
        has_reason: bool,
    }

    /// Records every new span.
    #[derive(Clone, Default)]
    struct SpanLog(Arc<Mutex<Vec<NewSpan>>>);

    impl<S: Subscriber> Layer<S> for SpanLog {
        fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            let m = attrs.metadata();
            let span = NewSpan {
                name: m.name(),
                target: m.target(),
                level: *m.level(),
                has_reason: m.fields().field("object.reason").is_some(),
            };
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(span);
        }
    }

    /// A real `kube::runtime::Controller` over one MyApp in the fake API server: the span it opens
    /// around the reconcile must be the one [`layer`] looks for, under the target the trace
    /// exporter keeps (`kube_runtime::controller`), and the reconcile must read its trigger.
    #[tokio::test(start_paused = true)]
    async fn the_real_controller_opens_the_span_this_layer_reads() {
        let spans = SpanLog::default();
        let _default =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(layer()).with(spans.clone()));

        let fake = FakeApi::default();
        let mut app = serde_json::to_value(MyApp::new("web", MyAppSpec::test("nginx:1.27"))).expect("json");
        app["metadata"]["namespace"] = "ns".into();
        fake.put("/apis/myapp.dev/v1/namespaces/ns/myapps", app);

        let triggers: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let reconcile = |_: Arc<MyApp>, triggers: Arc<Mutex<Vec<Option<String>>>>| async move {
            triggers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(current());
            Ok::<_, kube::Error>(Action::await_change())
        };
        let error_policy = |_: Arc<MyApp>, _: &kube::Error, _| Action::await_change();
        let api: Api<MyApp> = Api::namespaced(fake.client(), "ns");
        let mut results =
            Controller::new(api, watcher::Config::default()).run(reconcile, error_policy, triggers.clone()).boxed();
        let first = tokio::time::timeout(Duration::from_secs(60), results.next()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "the controller reconciled the MyApp: {first:?}");

        let spans = spans.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let with_reason: Vec<&NewSpan> = spans.iter().filter(|s| s.has_reason).collect();
        assert_eq!(
            with_reason.iter().map(|s| s.name).collect::<Vec<_>>(),
            vec![RECONCILING],
            "kube's span around a reconcile changed its name or its object.reason field; spans seen: {spans:?}"
        );
        let span = with_reason[0];
        assert!(
            span.target.starts_with("kube_runtime::controller"),
            "traces export kube_runtime::controller: {span:?}"
        );
        assert!(span.level <= Level::INFO, "the layer and the traces keep INFO and above: {span:?}");
        let triggers = triggers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        assert_eq!(triggers, vec![Some("object updated".to_string())], "the reconcile reads why it runs");
    }
}
