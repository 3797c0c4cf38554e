//! Events about MyApps (`events.k8s.io/v1`), with repeats aggregated into a series, in bounded
//! memory.
//!
//! kube's `Recorder` aggregates repeats the same way, but it remembers every event it published
//! for six minutes, and forgets only when it publishes the next one: after a burst (10,000 fresh
//! MyApps, each with its first-Ready Event) a leader kept 10,000 Events in memory, about 2 KiB
//! each, for as long as no further Event came. Here at most [`CAPACITY`] recent events are
//! remembered, each as a key and a count, for at most [`TTL`].
//!
//! # Guarantees
//!
//! - The same event (regarding object by UID, type, reason, action) published again within
//!   [`TTL`] patches the first one's `series` (count and last observed time) instead of creating
//!   another, as long as it is among the [`CAPACITY`] most recent.
//! - A failure to publish is returned; the caller decides (the [`super::writer::Writer`] logs it).

use super::fenced::FencedClient;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many recent events are remembered for aggregation.
pub(crate) const CAPACITY: usize = 1024;

/// How long an event is remembered (kube's `Recorder` uses the same).
pub(crate) const TTL: Duration = Duration::from_secs(6 * 60);

/// What makes two events the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    type_: &'static str,
    reason: String,
    action: String,
    /// An Event's `note` cannot change (the API server refuses it as immutable), so only the
    /// same note continues a series; another note starts a new Event.
    note: String,
}

/// A remembered event: its name (to patch) and its series so far.
#[derive(Clone, Debug)]
struct Seen {
    name: String,
    count: i32,
    at: Instant,
}

/// Publishes Events as `controller` (instance `instance`).
pub(crate) struct Publisher {
    client: FencedClient,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

/// The remembered events, oldest first.
#[derive(Default)]
struct Recent {
    order: VecDeque<(Key, Instant)>,
    seen: HashMap<Key, Seen>,
}

impl Recent {
    /// Forgets what is older than [`TTL`] or beyond [`CAPACITY`], as of `now`.
    fn trim(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            let stale = now.duration_since(*at) >= TTL || self.order.len() > CAPACITY;
            if !stale {
                break;
            }
            // Only the entry this position stands for: a later repeat moved the key to the back.
            if self.seen.get(key).is_some_and(|s| s.at == *at) {
                self.seen.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// Remembers `seen` under `key`, as of `seen.at`.
    fn remember(&mut self, key: Key, seen: Seen) {
        self.order.push_back((key.clone(), seen.at));
        self.seen.insert(key, seen);
        self.trim(self.order.back().map_or_else(Instant::now, |(_, at)| *at));
    }
}

impl Publisher {
    /// A publisher writing through `client`.
    pub(crate) fn new(client: FencedClient, controller: &str, instance: &str) -> Self {
        Self { client, controller: controller.into(), instance: instance.into(), recent: Mutex::new(Recent::default()) }
    }

    /// Publishes an event about `regarding`: a new Event, or the next of a series.
    pub(crate) async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let type_ = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let key = Key {
            uid: regarding.uid.clone().unwrap_or_default(),
            type_,
            reason: reason.into(),
            action: action.into(),
            note: note.clone(),
        };
        let now = Instant::now();
        let earlier = self.recent.lock().ok().and_then(|mut r| {
            r.trim(now);
            r.seen.get(&key).cloned()
        });
        let api: Api<Event> = self.client.api(&namespace);
        let seen = match earlier {
            Some(first) => {
                let count = first.count.saturating_add(1);
                let series = EventSeries { count, last_observed_time: MicroTime(Timestamp::now()) };
                let patch = Patch::Merge(serde_json::json!({ "series": series }));
                api.patch(&first.name, &PatchParams::default(), &patch).await?;
                Seen { count, at: now, ..first }
            }
            None => {
                let event = self.event(regarding, &namespace, type_, reason, action, note);
                let created = api.create(&PostParams::default(), &event).await?;
                Seen { name: created.metadata.name.unwrap_or_default(), count: 1, at: now }
            }
        };
        if let Ok(mut r) = self.recent.lock() {
            r.remember(key, seen);
        }
        Ok(())
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        namespace: &str,
        type_: &str,
        reason: &str,
        action: &str,
        note: String,
    ) -> Event {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        Event {
            metadata: ObjectMeta {
                // Unique per object and moment, as kube's Recorder names them.
                name: Some(format!("{object}.{:x}", Timestamp::now().as_nanosecond())),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(Timestamp::now())),
            regarding: Some(regarding.clone()),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(note),
            type_: Some(type_.into()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Key {
        Key {
            uid: format!("uid-{i}"),
            type_: "Normal",
            reason: "RolloutComplete".into(),
            action: "Rollout".into(),
            note: "1/1 pods ready".into(),
        }
    }

    fn seen(at: Instant) -> Seen {
        Seen { name: "web.1".into(), count: 1, at }
    }

    #[test]
    fn memory_is_bounded_by_capacity_and_age() {
        let start = Instant::now();
        let mut r = Recent::default();
        for i in 0..10 * CAPACITY {
            r.remember(key(i), seen(start));
        }
        assert_eq!(r.seen.len(), CAPACITY, "a burst keeps the newest {CAPACITY}");
        assert!(r.seen.contains_key(&key(10 * CAPACITY - 1)) && !r.seen.contains_key(&key(0)));
        r.trim(start + TTL);
        assert_eq!(r.seen.len(), 0, "nothing outlives the TTL");
        assert!(r.order.is_empty());
    }

    #[test]
    fn a_repeat_is_remembered_from_its_last_time() {
        let start = Instant::now();
        let mut r = Recent::default();
        r.remember(key(1), seen(start));
        let later = start + TTL / 2;
        r.remember(key(1), Seen { count: 2, ..seen(later) });
        // The first position expires, but the key stays: it was seen again since.
        r.trim(start + TTL);
        assert_eq!(r.seen.get(&key(1)).map(|s| s.count), Some(2));
        r.trim(later + TTL);
        assert_eq!(r.seen.len(), 0);
    }
}
