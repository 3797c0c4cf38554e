//! Status conditions with the kstatus meaning, computed by pure functions.
//!
//! - `Ready`: the summary. True when the Deployment runs the current spec at the desired replicas
//!   and its rollout is complete.
//! - `Reconciling`: True while the operator is still working towards the spec (rollout in
//!   progress, children being created, deletion in progress).
//! - `Stalled`: True when progress is impossible without a change from the user (an invalid spec,
//!   a name that cannot name the children, more replicas than the operator's policy allows, a
//!   Deployment past its progress deadline, a child's name held by an object the `MyApp` does
//!   not control).
//!
//! Every condition carries `observedGeneration`, and `lastTransitionTime` changes only when the
//! condition's `status` changes, so an unchanged world yields an identical status and no write.

use super::types::MyAppStatus;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The summary condition.
pub const READY: &str = "Ready";
/// True while work towards the spec is in progress.
pub const RECONCILING: &str = "Reconciling";
/// True when progress is impossible.
pub const STALLED: &str = "Stalled";
/// The reason of the conditions (and of the Warning Event) when a child's name is taken by an
/// object the `MyApp` does not control.
pub const NAME_CONFLICT: &str = "NameConflict";

/// What the Deployment reports, reduced to the facts the conditions depend on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutFacts {
    /// `metadata.generation` of the Deployment.
    pub generation: i64,
    /// `status.observedGeneration` of the Deployment.
    pub observed_generation: i64,
    /// `spec.replicas` of the Deployment.
    pub desired: i32,
    /// All pods, old and new.
    pub replicas: i32,
    /// Pods of the current template.
    pub updated: i32,
    /// Ready pods.
    pub ready: i32,
    /// Available pods.
    pub available: i32,
    /// The `Progressing` condition says `ProgressDeadlineExceeded`.
    pub deadline_exceeded: bool,
}

impl RolloutFacts {
    /// Reads the facts off a Deployment.
    pub fn from_deployment(d: &Deployment) -> Self {
        let status = d.status.clone().unwrap_or_default();
        Self {
            generation: d.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: d.spec.replicas.unwrap_or(1),
            replicas: status.replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
            deadline_exceeded: status.conditions.unwrap_or_default().iter().any(|c| {
                c.type_.as_deref() == Some("Progressing") && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            }),
        }
    }

    /// The rollout is complete, with the rules of `kubectl rollout status`.
    pub fn complete(&self) -> bool {
        self.observed_generation >= self.generation
            && self.updated == self.desired
            && self.replicas == self.desired
            && self.available == self.desired
    }
}

/// What a reconcile found or did, reduced to what the status reports: the input of
/// [`desired_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Writing a child failed (the reconcile retries with backoff); the message says why.
    ApplyFailed(String),
    /// The Deployment exists and reports these facts.
    Rollout(RolloutFacts),
    /// The `MyApp` is being deleted; its children are going.
    Deleting,
    /// An object that the `MyApp` does not control holds a child's name; the message names it.
    /// Nothing was written to any child.
    NameConflict(String),
    /// The `MyApp` breaks a rule (of its spec, its name or the operator's policy), so nothing was
    /// rolled out: no child was written. `reason` names the rule; the message, the field.
    Refused {
        /// The CamelCase reason of the conditions, e.g. [`INVALID_SPEC`].
        reason: &'static str,
        /// What is wrong, starting with the field path.
        message: String,
    },
}

/// The reason of the conditions when the spec breaks a rule of the API.
pub const INVALID_SPEC: &str = "InvalidSpec";
/// The reason of the conditions when the `MyApp`'s name cannot name its children.
pub const INVALID_NAME: &str = "InvalidName";
/// The reason of the conditions when `spec.replicas` is more than the operator's policy allows.
pub const REPLICAS_OVER_POLICY: &str = "ReplicasOverPolicy";
/// The reason of the conditions when `spec.image` comes from a registry the policy does not allow.
pub const IMAGE_REGISTRY_NOT_ALLOWED: &str = "ImageRegistryNotAllowed";
/// The reason of the conditions when `spec.env` sets a name the policy forbids.
pub const ENV_FORBIDDEN: &str = "EnvForbidden";

/// The three conditions of a `MyApp` that cannot progress without a change from its owner.
fn stalled(reason: &str, message: &str, generation: i64) -> Vec<Condition> {
    vec![
        condition(READY, false, reason, message.to_string(), generation),
        condition(RECONCILING, false, reason, String::new(), generation),
        condition(STALLED, true, reason, message.to_string(), generation),
    ]
}

fn condition(type_: &str, status: bool, reason: &str, message: String, generation: i64) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: Some(generation),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// Computes the status for `generation` from the outcome of a reconcile. Transition times are placeholders:
/// pass the result through [`carry_transition_times`].
pub fn desired_status(generation: i64, selector: &str, outcome: &Outcome) -> MyAppStatus {
    let (replicas, ready_replicas) = match outcome {
        Outcome::Rollout(f) => (f.replicas, f.ready),
        _ => (0, 0),
    };
    let g = generation;
    let conditions = match outcome {
        Outcome::Refused { reason, message } => stalled(reason, message, g),
        Outcome::ApplyFailed(msg) => vec![
            condition(READY, false, "ApplyFailed", msg.clone(), g),
            condition(RECONCILING, true, "ApplyFailed", msg.clone(), g),
            condition(STALLED, false, "ApplyFailed", String::new(), g),
        ],
        Outcome::NameConflict(msg) => stalled(NAME_CONFLICT, msg, g),
        Outcome::Deleting => vec![
            condition(READY, false, "Deleting", "waiting for the Deployment and Service to be deleted".into(), g),
            condition(RECONCILING, true, "Deleting", "waiting for the Deployment and Service to be deleted".into(), g),
            condition(STALLED, false, "Deleting", String::new(), g),
        ],
        Outcome::Rollout(f) if f.deadline_exceeded && !f.complete() => {
            let msg =
                format!("the rollout exceeded its progress deadline: {}/{} pods available", f.available, f.desired);
            vec![
                condition(READY, false, "ProgressDeadlineExceeded", msg.clone(), g),
                condition(RECONCILING, false, "ProgressDeadlineExceeded", String::new(), g),
                condition(STALLED, true, "ProgressDeadlineExceeded", msg, g),
            ]
        }
        Outcome::Rollout(f) if f.complete() => {
            let msg = format!("{}/{} pods available", f.available, f.desired);
            vec![
                condition(READY, true, "RolloutComplete", msg, g),
                condition(RECONCILING, false, "RolloutComplete", String::new(), g),
                condition(STALLED, false, "RolloutComplete", String::new(), g),
            ]
        }
        Outcome::Rollout(f) => {
            let msg = format!(
                "rolling out: {} updated, {} available, {} desired, {} total",
                f.updated, f.available, f.desired, f.replicas
            );
            vec![
                condition(READY, false, "RollingOut", msg.clone(), g),
                condition(RECONCILING, true, "RollingOut", msg, g),
                condition(STALLED, false, "RollingOut", String::new(), g),
            ]
        }
    };
    MyAppStatus {
        observed_generation: Some(generation),
        replicas,
        ready_replicas,
        selector: selector.into(),
        conditions,
    }
}

/// Keeps each condition's `lastTransitionTime` from `old` when its status did not change, and sets
/// it to `now` when it did (or when the condition is new).
pub fn carry_transition_times(old: &[Condition], new: &mut [Condition], now: &Time) {
    for c in new.iter_mut() {
        c.last_transition_time = match old.iter().find(|o| o.type_ == c.type_) {
            Some(o) if o.status == c.status => o.last_transition_time.clone(),
            _ => now.clone(),
        };
    }
}

impl super::types::MyApp {
    /// True when the status says Ready for the object's current generation: what
    /// `kubectl wait --for=condition=Ready` and kstatus mean by it.
    pub fn ready_at_generation(&self) -> bool {
        let Some(generation) = self.metadata.generation else { return false };
        self.status.as_ref().is_some_and(|s| {
            s.observed_generation == Some(generation)
                && find(&s.conditions, READY)
                    .is_some_and(|c| c.status == "True" && c.observed_generation == Some(generation))
        })
    }

    /// The `Ready` condition's reason (`Pending` before there is one).
    pub fn ready_reason(&self) -> &str {
        self.status.as_ref().and_then(|s| find(&s.conditions, READY)).map_or("Pending", |c| c.reason.as_str())
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of `type_` has status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(desired: i32, updated: i32, available: i32) -> RolloutFacts {
        RolloutFacts {
            generation: 2,
            observed_generation: 2,
            desired,
            replicas: desired.max(updated),
            updated,
            ready: available,
            available,
            deadline_exceeded: false,
        }
    }

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn complete_rollout_is_ready() {
        let s = desired_status(3, "sel", &Outcome::Rollout(facts(2, 2, 2)));
        assert!(is_true(&s.conditions, READY));
        assert!(!is_true(&s.conditions, RECONCILING));
        assert!(!is_true(&s.conditions, STALLED));
        assert_eq!(s.observed_generation, Some(3));
        assert!(s.conditions.iter().all(|c| c.observed_generation == Some(3)));
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
    }

    #[test]
    fn partial_rollout_is_reconciling() {
        let s = desired_status(1, "sel", &Outcome::Rollout(facts(3, 1, 1)));
        assert!(!is_true(&s.conditions, READY));
        assert!(is_true(&s.conditions, RECONCILING));
        assert_eq!(find(&s.conditions, READY).map(|c| c.reason.as_str()), Some("RollingOut"));
    }

    #[test]
    fn stale_deployment_generation_is_not_complete() {
        let mut f = facts(1, 1, 1);
        f.observed_generation = 1;
        assert!(!f.complete());
        let s = desired_status(1, "sel", &Outcome::Rollout(f));
        assert!(is_true(&s.conditions, RECONCILING));
    }

    #[test]
    fn old_pods_still_running_is_not_complete() {
        let mut f = facts(2, 2, 2);
        f.replicas = 3;
        assert!(!f.complete());
    }

    #[test]
    fn deadline_exceeded_is_stalled() {
        let mut f = facts(2, 1, 0);
        f.deadline_exceeded = true;
        let s = desired_status(1, "sel", &Outcome::Rollout(f));
        assert!(is_true(&s.conditions, STALLED));
        assert!(!is_true(&s.conditions, RECONCILING));
        assert_eq!(find(&s.conditions, STALLED).map(|c| c.reason.as_str()), Some("ProgressDeadlineExceeded"));
    }

    #[test]
    fn invalid_and_deleting() {
        let s = desired_status(1, "sel", &Outcome::Refused { reason: INVALID_SPEC, message: "spec.image: bad".into() });
        assert!(is_true(&s.conditions, STALLED));
        assert_eq!(find(&s.conditions, READY).map(|c| c.message.as_str()), Some("spec.image: bad"));
        let s = desired_status(1, "sel", &Outcome::Deleting);
        assert_eq!(find(&s.conditions, READY).map(|c| c.reason.as_str()), Some("Deleting"));
    }

    #[test]
    fn apply_failures_are_reported_as_retrying() {
        let s = desired_status(2, "sel", &Outcome::ApplyFailed("services \"web\": range is full".into()));
        assert_eq!(find(&s.conditions, READY).map(|c| c.reason.as_str()), Some("ApplyFailed"));
        assert!(find(&s.conditions, READY).is_some_and(|c| c.message.contains("range is full")));
        assert!(is_true(&s.conditions, RECONCILING), "the operator keeps retrying");
        assert!(!is_true(&s.conditions, STALLED));
    }

    #[test]
    fn a_name_conflict_is_stalled_and_names_the_object() {
        let msg = "Service \"web\" already exists and is not controlled by this MyApp (it has no controller)";
        let s = desired_status(3, "sel", &Outcome::NameConflict(msg.into()));
        let ready = find(&s.conditions, READY).expect("Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", NAME_CONFLICT));
        assert_eq!(ready.message, msg);
        assert!(is_true(&s.conditions, STALLED), "the operator cannot resolve it by itself");
        assert!(!is_true(&s.conditions, RECONCILING), "kstatus: not in progress while stalled");
        assert_eq!(find(&s.conditions, STALLED).map(|c| c.reason.as_str()), Some(NAME_CONFLICT));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!((s.replicas, s.ready_replicas), (0, 0));
        let mut app = crate::api::MyApp::new("web", crate::api::MyAppSpec::test("nginx:1.27"));
        app.metadata.generation = Some(3);
        app.status = Some(s);
        assert!(!app.ready_at_generation());
        assert_eq!(app.ready_reason(), NAME_CONFLICT);
    }

    #[test]
    fn reasons_are_camel_case() {
        for outcome in [
            Outcome::Refused { reason: INVALID_SPEC, message: "x".into() },
            Outcome::NameConflict("x".into()),
            Outcome::Refused { reason: INVALID_NAME, message: "x".into() },
            Outcome::Refused { reason: REPLICAS_OVER_POLICY, message: "x".into() },
            Outcome::Refused { reason: IMAGE_REGISTRY_NOT_ALLOWED, message: "x".into() },
            Outcome::Refused { reason: ENV_FORBIDDEN, message: "x".into() },
            Outcome::ApplyFailed("x".into()),
            Outcome::Deleting,
            Outcome::Rollout(facts(1, 1, 1)),
            Outcome::Rollout(facts(2, 1, 1)),
        ] {
            for c in desired_status(1, "s", &outcome).conditions {
                assert!(c.reason.chars().next().is_some_and(|ch| ch.is_ascii_uppercase()), "{}", c.reason);
                assert!(c.reason.chars().all(|ch| ch.is_ascii_alphanumeric()), "{}", c.reason);
            }
        }
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut first = desired_status(1, "s", &Outcome::Rollout(facts(2, 1, 1))).conditions;
        carry_transition_times(&[], &mut first, &t(100));
        assert!(first.iter().all(|c| c.last_transition_time == t(100)));

        // Same statuses, new message: times kept.
        let mut second = desired_status(1, "s", &Outcome::Rollout(facts(2, 2, 1))).conditions;
        carry_transition_times(&first, &mut second, &t(200));
        assert!(second.iter().all(|c| c.last_transition_time == t(100)));

        // Ready and Reconciling flip; Stalled stays False.
        let mut third = desired_status(1, "s", &Outcome::Rollout(facts(2, 2, 2))).conditions;
        carry_transition_times(&second, &mut third, &t(300));
        assert_eq!(find(&third, READY).map(|c| c.last_transition_time.clone()), Some(t(300)));
        assert_eq!(find(&third, RECONCILING).map(|c| c.last_transition_time.clone()), Some(t(300)));
        assert_eq!(find(&third, STALLED).map(|c| c.last_transition_time.clone()), Some(t(100)));
    }

    #[test]
    fn ready_means_ready_for_the_current_generation() {
        let mut app = crate::api::MyApp::new("web", crate::api::MyAppSpec::test("nginx:1.27"));
        assert!(!app.ready_at_generation(), "no generation, no status");
        assert_eq!(app.ready_reason(), "Pending");
        app.metadata.generation = Some(3);
        app.status = Some(desired_status(3, "s", &Outcome::Rollout(facts(2, 2, 2))));
        assert!(app.ready_at_generation());
        assert_eq!(app.ready_reason(), "RolloutComplete");
        app.metadata.generation = Some(4);
        assert!(!app.ready_at_generation(), "a newer spec is not Ready yet");
        app.status = Some(desired_status(4, "s", &Outcome::Rollout(facts(2, 1, 1))));
        assert!(!app.ready_at_generation());
    }

    #[test]
    fn unchanged_world_gives_identical_status() {
        let outcome = Outcome::Rollout(facts(2, 2, 2));
        let mut a = desired_status(4, "s", &outcome);
        carry_transition_times(&[], &mut a.conditions, &t(1));
        let mut b = desired_status(4, "s", &outcome);
        carry_transition_times(&a.conditions, &mut b.conditions, &t(99));
        assert_eq!(a, b);
    }
}
