//! Which objects a `MyApp` may write: the pure decision made before any apply.
//!
//! A child is named like its `MyApp`, so a Deployment or Service of that name may already exist
//! that the operator never created: made by hand, by another tool, or left by another owner.
//! Server-side apply with force would take it over (rewrite its selector, add the `MyApp` as its
//! controller, and so let a later delete of the `MyApp` delete it).
//!
//! # Guarantees
//!
//! - [`claim`] lets the operator write an existing object only when the object's controller
//!   `ownerReference` carries this `MyApp`'s UID. Everything else (no controller, another
//!   controller, another `MyApp` of the same name with another UID) is a [`Conflict`], and the
//!   reconcile writes nothing to any child: it reports `Ready=False`, reason
//!   [`NAME_CONFLICT`](crate::api::conditions::NAME_CONFLICT) (`Stalled=True`) and a Warning
//!   Event, and retries with backoff, so the `MyApp` takes the name once the user deletes or
//!   renames the object.
//! - [`controlled_by`] is the same rule for deletes: cleanup deletes only what it controls.
//!
//! # Assumptions
//!
//! The decision needs the object that holds the name. The caches hold only objects labelled as
//! managed by the operator, so when a cache has nothing under the name, the reconcile asks the
//! API server (one GET, only then); an object in the cache is decided on as cached.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use std::fmt;

/// What the operator may do under a child's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Nothing holds the name: create the child.
    Free,
    /// The object is controlled by this `MyApp`: keep it up to date.
    Ours,
    /// The object belongs to someone else: leave it alone.
    Conflict(Conflict),
}

impl Claim {
    /// The conflict, if this is one.
    pub(crate) fn conflict(self) -> Option<Conflict> {
        match self {
            Claim::Conflict(c) => Some(c),
            _ => None,
        }
    }
}

/// An object that holds a child's name and is not controlled by the `MyApp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Conflict {
    /// Its kind: `Deployment` or `Service`.
    pub(crate) kind: String,
    /// Its name.
    pub(crate) name: String,
    /// Its controller, as `Kind "name"`, when it has one.
    pub(crate) controller: Option<String>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} \"{}\" already exists and is not controlled by this MyApp", self.kind, self.name)?;
        match &self.controller {
            Some(c) => write!(f, " (its controller is {c})"),
            None => write!(f, " (it has no controller)"),
        }
    }
}

/// One message for all the conflicts of a `MyApp`, naming each object, and saying what to do.
pub(crate) fn describe(conflicts: &[Conflict]) -> String {
    let each: Vec<String> = conflicts.iter().map(Conflict::to_string).collect();
    format!("{}; the operator will not take it over: delete or rename it, or rename the MyApp", each.join("; "))
}

fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.iter().flatten().find(|o| o.controller == Some(true))
}

/// True when `meta`'s controller `ownerReference` has the UID `owner_uid`.
pub(crate) fn controlled_by(meta: &ObjectMeta, owner_uid: Option<&str>) -> bool {
    controller_of(meta).is_some_and(|o| Some(o.uid.as_str()) == owner_uid)
}

/// Decides about the object named like a child of kind `kind` (`existing`, `None` when there is
/// none), for the `MyApp` whose UID is `owner_uid`.
pub(crate) fn claim(kind: &str, name: &str, existing: Option<&ObjectMeta>, owner_uid: &str) -> Claim {
    match existing {
        None => Claim::Free,
        Some(meta) if controlled_by(meta, Some(owner_uid)) => Claim::Ours,
        Some(meta) => Claim::Conflict(Conflict {
            kind: kind.into(),
            name: meta.name.clone().unwrap_or_else(|| name.into()),
            controller: controller_of(meta).map(|o| format!("{} \"{}\" (uid {})", o.kind, o.name, o.uid)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn owner(kind: &str, name: &str, uid: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "myapp.dev/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: Some(true),
        }
    }

    fn object(owners: Vec<OwnerReference>) -> ObjectMeta {
        ObjectMeta {
            name: Some("web".into()),
            namespace: Some("ns".into()),
            labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_free_name_is_taken() {
        assert_eq!(claim("Service", "web", None, "uid-1"), Claim::Free);
    }

    #[test]
    fn our_own_child_is_kept_up_to_date() {
        let ours = object(vec![owner("MyApp", "web", "uid-1", Some(true))]);
        assert_eq!(claim("Deployment", "web", Some(&ours), "uid-1"), Claim::Ours);
        // Other, non-controller owners do not matter.
        let shared = object(vec![owner("Thing", "x", "uid-9", None), owner("MyApp", "web", "uid-1", Some(true))]);
        assert_eq!(claim("Deployment", "web", Some(&shared), "uid-1"), Claim::Ours);
    }

    #[test]
    fn an_object_made_by_hand_is_refused() {
        let c = claim("Service", "web", Some(&object(vec![])), "uid-1").conflict().expect("a conflict");
        assert_eq!(c, Conflict { kind: "Service".into(), name: "web".into(), controller: None });
        assert_eq!(
            c.to_string(),
            "Service \"web\" already exists and is not controlled by this MyApp (it has no controller)"
        );
    }

    #[test]
    fn an_object_of_another_controller_is_refused() {
        let theirs = object(vec![owner("Rollout", "web", "uid-7", Some(true))]);
        let c = claim("Deployment", "web", Some(&theirs), "uid-1").conflict().expect("a conflict");
        assert_eq!(c.controller.as_deref(), Some("Rollout \"web\" (uid uid-7)"));
        assert!(c.to_string().starts_with("Deployment \"web\" already exists"), "{c}");
    }

    #[test]
    fn a_previous_myapp_of_the_same_name_is_another_owner() {
        let old = object(vec![owner("MyApp", "web", "uid-0", Some(true))]);
        assert!(claim("Service", "web", Some(&old), "uid-1").conflict().is_some());
    }

    #[test]
    fn an_owner_that_is_not_the_controller_gives_no_right() {
        let mentioned = object(vec![owner("MyApp", "web", "uid-1", Some(false))]);
        assert!(claim("Service", "web", Some(&mentioned), "uid-1").conflict().is_some());
        let mentioned = object(vec![owner("MyApp", "web", "uid-1", None)]);
        assert!(claim("Service", "web", Some(&mentioned), "uid-1").conflict().is_some());
        assert!(!controlled_by(&mentioned, Some("uid-1")));
    }

    #[test]
    fn without_a_uid_nothing_is_ours() {
        let ours = object(vec![owner("MyApp", "web", "uid-1", Some(true))]);
        assert!(controlled_by(&ours, Some("uid-1")));
        assert!(!controlled_by(&ours, None));
    }

    #[test]
    fn the_message_names_every_object() {
        let conflicts = [
            Conflict { kind: "Deployment".into(), name: "web".into(), controller: None },
            Conflict { kind: "Service".into(), name: "web".into(), controller: Some("X \"y\" (uid u)".into()) },
        ];
        let m = describe(&conflicts);
        assert!(m.contains("Deployment \"web\""), "{m}");
        assert!(m.contains("Service \"web\""), "{m}");
        assert!(m.contains("delete or rename it"), "{m}");
    }
}
