//! MyApps counted by condition, from the warm cache every replica keeps: counts, never one series
//! per object, so the number of series is fixed (three conditions times three statuses, and one
//! timestamp) however many MyApps there are.
//!
//! # Guarantees
//!
//! - Every replica exports the same nine counts once its cache is synced, each set at every pass
//!   (a count that falls to zero reads 0, it does not vanish). A replica's counts lag its cache by
//!   at most [`PERIOD`].
//! - The cost is one pass over the cache every [`PERIOD`], off the async workers (a blocking
//!   task), one object rebuilt at a time: a scrape itself costs nothing.
//!
//! # Caveats
//!
//! A MyApp whose status has no such condition (not yet reconciled), or whose cached form is not
//! kept (over [`crate::cache::MAX_KEPT`]), counts as `Unknown`, and has no part in
//! the not-Ready timestamp.

use crate::api::MyApp;
use crate::api::conditions::{READY, RECONCILING, STALLED};
use crate::cache::Cached;
use crate::telemetry::metrics::{ConditionLabels, Metrics, NoLabels};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::reflector::Store;
use std::sync::Arc;
use std::time::Duration;

/// The conditions counted.
pub const CONDITIONS: [&str; 3] = [READY, RECONCILING, STALLED];
/// The statuses a condition is counted under.
pub const STATUSES: [&str; 3] = ["True", "False", "Unknown"];
/// How often the counts are taken.
pub const PERIOD: Duration = Duration::from_secs(15);

/// The counts of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// MyApps by condition (index in [`CONDITIONS`]) and status (index in [`STATUSES`]).
    pub by_condition: [[i64; 3]; 3],
    /// The earliest `lastTransitionTime` (unix seconds) of a `Ready` condition that is not
    /// `True`, if any.
    pub not_ready_since: Option<i64>,
}

impl Counts {
    /// Counts one MyApp with these status conditions.
    pub fn add(&mut self, conditions: &[Condition]) {
        for (i, type_) in CONDITIONS.iter().enumerate() {
            let found = conditions.iter().find(|c| c.type_ == *type_);
            let status = found.map_or("Unknown", |c| c.status.as_str());
            let s = STATUSES.iter().position(|s| *s == status).unwrap_or(2);
            self.by_condition[i][s] += 1;
            if *type_ == READY
                && let Some(c) = found.filter(|c| c.status != "True")
            {
                let at = c.last_transition_time.0.as_second();
                self.not_ready_since = Some(self.not_ready_since.map_or(at, |t| t.min(at)));
            }
        }
    }

    /// Sets the gauges of `metrics` to these counts.
    pub fn record(&self, metrics: &Metrics) {
        for (i, condition) in CONDITIONS.iter().enumerate() {
            for (s, status) in STATUSES.iter().enumerate() {
                let labels = ConditionLabels { condition: condition.to_string(), status: status.to_string() };
                metrics.myapps.get_or_create(&labels).set(self.by_condition[i][s]);
            }
        }
        match self.not_ready_since {
            Some(t) => {
                metrics.not_ready_since.get_or_create(&NoLabels::new()).set(t);
            }
            None => {
                metrics.not_ready_since.remove(&NoLabels::new());
            }
        }
    }
}

/// The counts of every MyApp of `apps`, rebuilt one at a time.
pub fn count_cached(apps: &[Arc<Cached<MyApp>>]) -> Counts {
    let mut counts = Counts::default();
    for app in apps {
        let conditions = app.object().ok().and_then(|a| a.status).map(|s| s.conditions).unwrap_or_default();
        counts.add(&conditions);
    }
    counts
}

/// Counts the MyApps of `store` into `metrics` every [`PERIOD`], for the life of the process.
pub async fn keep_counting(store: Store<Cached<MyApp>>, metrics: Arc<Metrics>) {
    loop {
        let apps = store.state();
        match tokio::task::spawn_blocking(move || count_cached(&apps)).await {
            Ok(counts) => counts.record(&metrics),
            Err(e) => tracing::warn!(error = %e, "counting the MyApps failed"),
        }
        tokio::time::sleep(PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn condition(type_: &str, status: &str, at: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::from_second(at).expect("time")),
            message: String::new(),
            observed_generation: Some(1),
            reason: "Test".into(),
        }
    }

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_string))
    }

    #[test]
    fn myapps_are_counted_by_condition_and_the_oldest_not_ready_is_kept() {
        let mut counts = Counts::default();
        counts.add(&[
            condition(READY, "True", 50),
            condition(RECONCILING, "False", 50),
            condition(STALLED, "False", 50),
        ]);
        counts.add(&[condition(READY, "False", 300), condition(RECONCILING, "True", 300)]);
        counts.add(&[condition(READY, "False", 200), condition(STALLED, "True", 200)]);
        counts.add(&[]);
        assert_eq!(counts.by_condition[0], [1, 2, 1], "Ready: True, False, Unknown");
        assert_eq!(counts.by_condition[1], [1, 1, 2], "Reconciling");
        assert_eq!(counts.by_condition[2], [1, 1, 2], "Stalled");
        assert_eq!(counts.not_ready_since, Some(200), "the earliest transition of a Ready that is not True");

        let m = Metrics::default();
        counts.record(&m);
        let text = m.encode();
        let ready_false = "myapp_operator_myapps{condition=\"Ready\",status=\"False\"}";
        assert_eq!(value(&text, ready_false).as_deref(), Some("2"), "{text}");
        let stalled_true = "myapp_operator_myapps{condition=\"Stalled\",status=\"True\"}";
        assert_eq!(value(&text, stalled_true).as_deref(), Some("1"), "{text}");
        let since = "myapp_operator_myapps_not_ready_since_timestamp_seconds";
        assert_eq!(value(&text, since).as_deref(), Some("200"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("myapp_operator_myapps{")).count(), 9);

        // Everything Ready: the counts fall to zero and stay; the timestamp goes.
        let mut ready = Counts::default();
        ready.add(&[condition(READY, "True", 400)]);
        ready.record(&m);
        let text = m.encode();
        assert_eq!(value(&text, ready_false).as_deref(), Some("0"), "{text}");
        assert_eq!(value(&text, since), None, "{text}");
        assert!(!text.contains(since), "{text}");
    }

    #[test]
    fn cached_myapps_are_counted_from_their_kept_status() {
        let mut app = MyApp::test();
        app.status = Some(crate::api::MyAppStatus {
            conditions: vec![condition(READY, "False", 1_000), condition(STALLED, "True", 1_000)],
            ..Default::default()
        });
        let json = serde_json::to_value(&app).expect("json");
        let cached = Arc::new(Cached::<MyApp>::from_json(json).expect("cached"));
        let fresh =
            Arc::new(Cached::<MyApp>::from_json(serde_json::to_value(MyApp::test()).expect("json")).expect("cached"));
        let counts = count_cached(&[cached, fresh]);
        assert_eq!(counts.by_condition[0], [0, 1, 1]);
        assert_eq!(counts.by_condition[2], [1, 0, 1]);
        assert_eq!(counts.not_ready_since, Some(1_000));
    }
}
