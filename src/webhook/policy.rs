//! Admission policy beyond what the CRD's schema and CEL rules say: configurable, and so checked
//! in code. Every denial names the field.

use crate::api::MyAppSpec;
use crate::api::conditions::{ENV_FORBIDDEN, IMAGE_REGISTRY_NOT_ALLOWED, REPLICAS_OVER_POLICY};
use crate::api::validation::{FieldError, validate_replicas, validate_spec};
use std::collections::BTreeMap;

/// Annotation that allows `spec.port` to change on update.
pub const ALLOW_PORT_CHANGE: &str = "myapp.dev/allow-port-change";

/// What the validating webhook enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Registries images may come from (`docker.io`, `ghcr.io`, `registry.local:5000`); empty
    /// allows all.
    pub allowed_registries: Vec<String>,
    /// Environment variable names that may not be set.
    pub forbidden_env: Vec<String>,
    /// The most replicas a MyApp may ask for (the CRD allows up to 1000).
    pub max_replicas: Option<i32>,
}

/// The registry of an image reference, as a container runtime resolves it: the first path
/// segment when it looks like a host (has a `.` or `:`, or is `localhost`), else `docker.io`.
pub fn registry(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// A rule of the [`Policy`] (the configurable part, beyond the API's own rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `spec.image` from a registry in [`Policy::allowed_registries`].
    Registry,
    /// No `spec.env` name in [`Policy::forbidden_env`].
    ForbiddenEnv,
    /// `spec.replicas` at most [`Policy::max_replicas`].
    MaxReplicas,
}

impl Rule {
    /// The CamelCase reason a `MyApp` refused by this rule reports in its conditions.
    pub fn reason(self) -> &'static str {
        match self {
            Rule::Registry => IMAGE_REGISTRY_NOT_ALLOWED,
            Rule::ForbiddenEnv => ENV_FORBIDDEN,
            Rule::MaxReplicas => REPLICAS_OVER_POLICY,
        }
    }
}

impl Policy {
    /// Every rule of the policy that `spec` breaks, each with its error naming the field, in the
    /// order registries, env, replicas; no old spec, no ratcheting. The one judgment of the
    /// policy: [`Policy::check`] (the webhook) ratchets what it returns on update, and the
    /// reconciler refuses a `MyApp` for which it returns anything
    /// ([`crate::controller::reconcile::refusal`]).
    pub fn breaches(&self, spec: &MyAppSpec) -> Vec<(Rule, FieldError)> {
        let mut out = Vec::new();
        if !self.allowed_registries.is_empty() {
            let reg = registry(&spec.image);
            if !self.allowed_registries.iter().any(|a| a == reg) {
                let message =
                    format!("registry {reg:?} is not allowed; allowed: {}", self.allowed_registries.join(", "));
                out.push((Rule::Registry, FieldError::new("spec.image", message)));
            }
        }
        for (i, env) in spec.env.iter().enumerate() {
            if self.forbidden_env.iter().any(|f| f == &env.name) {
                let error = FieldError::new(format!("spec.env[{i}].name"), format!("{:?} may not be set", env.name));
                out.push((Rule::ForbiddenEnv, error));
            }
        }
        out.extend(self.replicas_over_max(spec.replicas).map(|e| (Rule::MaxReplicas, e)));
        out
    }

    /// Problems with a new or updated spec. `old` is the previous spec on update, and
    /// `annotations` are the new object's.
    ///
    /// # Ratcheting
    ///
    /// On update, a field unchanged from `old` is not checked again, as the API server does for
    /// the CRD's own rules (validation ratcheting): a policy tightened after an object was
    /// admitted must not stop it from being updated (its finalizer removed, another field fixed).
    /// The unit is a top-level field of the spec: `spec.image`, `spec.replicas`, `spec.port`,
    /// `spec.env` (a list without keys, so any change to it checks every entry, as for an atomic
    /// list) and `spec.resources`; an error about anything else is always reported.
    ///
    /// The reconciler does not ratchet: it has no old spec, and holds what it rolls out to the
    /// whole policy as it is now (see [`crate::controller::reconcile::refusal`]). So after a
    /// tightening, an update that keeps a field now forbidden is admitted but not rolled out,
    /// and the children already running are left as they are.
    ///
    /// `spec.port` may change only with [`ALLOW_PORT_CHANGE`] set to `"true"` on the new object,
    /// because the Service's clients know the old port. (A rule that looks at whether the Service
    /// exists would need an API call inside admission; this one is pure, and an owner who means
    /// it says so in one annotation.)
    pub fn check(
        &self,
        spec: &MyAppSpec,
        annotations: &BTreeMap<String, String>,
        old: Option<&MyAppSpec>,
    ) -> Vec<FieldError> {
        let mut errors = validate_spec(spec);
        errors.extend(self.breaches(spec).into_iter().map(|(_, e)| e));
        if let Some(old) = old {
            errors.retain(|e| changed(&e.field, old, spec));
            if old.port != spec.port && annotations.get(ALLOW_PORT_CHANGE).map(String::as_str) != Some("true") {
                errors.push(FieldError::new(
                    "spec.port",
                    format!(
                        "cannot change from {} to {} on update; set the annotation {ALLOW_PORT_CHANGE}: \"true\" to allow it",
                        old.port, spec.port
                    ),
                ));
            }
        }
        errors
    }

    /// The error when `replicas` is more than [`Policy::max_replicas`] allows.
    pub fn replicas_over_max(&self, replicas: i32) -> Option<FieldError> {
        self.max_replicas
            .filter(|max| replicas > *max)
            .map(|max| FieldError::new("spec.replicas", format!("{replicas} is more than the allowed {max}")))
    }

    /// Problems with a write to the scale subresource (`kubectl scale`), which sets
    /// `spec.replicas` alone: the API's range and [`Policy::max_replicas`]. `old` is the replica
    /// count before; an unchanged count is not checked again (see [`Policy::check`]).
    pub fn check_scale(&self, replicas: i32, old: Option<i32>) -> Vec<FieldError> {
        if old == Some(replicas) {
            return Vec::new();
        }
        validate_replicas(replicas).into_iter().chain(self.replicas_over_max(replicas)).collect()
    }
}

#[cfg(test)]
impl Policy {
    /// A policy for tests, as an admin tightens one: images from `ghcr.io` only, no `LD_PRELOAD`,
    /// at most 2 replicas.
    pub fn tightened() -> Self {
        Self {
            allowed_registries: vec!["ghcr.io".into()],
            forbidden_env: vec!["LD_PRELOAD".into()],
            max_replicas: Some(2),
        }
    }
}

/// True when the top-level spec field that `field` (a path such as `spec.env[2].name`) lies in
/// differs between `old` and `new`, or is not one this function knows.
fn changed(field: &str, old: &MyAppSpec, new: &MyAppSpec) -> bool {
    let top = field.strip_prefix("spec.").unwrap_or_default();
    let top = top.split(['.', '[']).next().unwrap_or_default();
    match top {
        "image" => old.image != new.image,
        "replicas" => old.replicas != new.replicas,
        "port" => old.port != new.port,
        "env" => old.env != new.env,
        "resources" => old.resources != new.resources,
        "serviceType" => old.service_type != new.service_type,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::EnvVar;

    #[test]
    fn registries() {
        assert_eq!(registry("nginx:1.27"), "docker.io");
        assert_eq!(registry("library/nginx:1"), "docker.io");
        assert_eq!(registry("ghcr.io/org/app:1"), "ghcr.io");
        assert_eq!(registry("registry.local:5000/app:1"), "registry.local:5000");
        assert_eq!(registry("localhost/app:1"), "localhost");
    }

    #[test]
    fn allowlist_env_and_replicas() {
        let p = Policy { max_replicas: Some(10), ..Policy::tightened() };
        let none = BTreeMap::new();
        assert!(p.check(&MyAppSpec::test("ghcr.io/org/app:1"), &none, None).is_empty());
        let e = p.check(&MyAppSpec::test("nginx:1.27"), &none, None);
        assert_eq!(e[0].field, "spec.image");
        let mut s = MyAppSpec::test("ghcr.io/org/app:1");
        s.env = vec![EnvVar { name: "LD_PRELOAD".into(), value: "x".into() }];
        s.replicas = 11;
        let fields: Vec<_> = p.check(&s, &none, None).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.env[0].name", "spec.replicas"]);
        assert!(Policy::default().check(&MyAppSpec::test("anything.example/app:1"), &none, None).is_empty());
    }

    #[test]
    fn port_change_needs_the_annotation() {
        let old = MyAppSpec::test("nginx:1.27");
        let mut new = old.clone();
        new.port = 9090;
        let p = Policy::default();
        let e = p.check(&new, &BTreeMap::new(), Some(&old));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "spec.port");
        let ok = BTreeMap::from([(ALLOW_PORT_CHANGE.to_string(), "true".to_string())]);
        assert!(p.check(&new, &ok, Some(&old)).is_empty());
        assert!(p.check(&new, &BTreeMap::new(), None).is_empty(), "creation may pick any port");
    }

    /// A spec admitted under no policy that breaks every rule of [`Policy::tightened`].
    fn admitted_before() -> MyAppSpec {
        let mut s = MyAppSpec::test("nginx:1.27");
        s.replicas = 5;
        s.env = vec![EnvVar { name: "LD_PRELOAD".into(), value: "x".into() }];
        s
    }

    fn fields(errors: Vec<FieldError>) -> Vec<String> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_tightened_policy_checks_only_the_fields_an_update_changes() {
        let (p, none, old) = (Policy::tightened(), BTreeMap::new(), admitted_before());
        assert_eq!(fields(p.check(&old, &none, None)), ["spec.image", "spec.env[0].name", "spec.replicas"]);
        assert!(p.check(&old, &none, Some(&old)).is_empty(), "nothing changed, nothing is checked");

        let mut new = old.clone();
        new.resources = Some(Default::default());
        assert!(p.check(&new, &none, Some(&old)).is_empty(), "another field changed");

        new.replicas = 6;
        assert_eq!(fields(p.check(&new, &none, Some(&old))), ["spec.replicas"]);
        new.replicas = 2;
        assert!(p.check(&new, &none, Some(&old)).is_empty(), "back within the cap");

        new.image = "nginx:1.28".into();
        assert_eq!(fields(p.check(&new, &none, Some(&old))), ["spec.image"], "a new image meets the registries");

        let mut env = old.clone();
        env.env.push(EnvVar { name: "MODE".into(), value: "a".into() });
        assert_eq!(fields(p.check(&env, &none, Some(&old))), ["spec.env[0].name"], "a changed list is checked whole");
    }

    #[test]
    fn spec_rules_ratchet_too_but_port_changes_never_do() {
        let p = Policy::default();
        let mut old = MyAppSpec::test("nginx:latest");
        old.replicas = 1001;
        let none = BTreeMap::new();
        assert!(p.check(&old, &none, Some(&old)).is_empty());
        let mut new = old.clone();
        new.port = 9090;
        assert_eq!(fields(p.check(&new, &none, Some(&old))), ["spec.port"]);
        new.port = 0;
        assert_eq!(fields(p.check(&new, &none, Some(&old))), ["spec.port", "spec.port"], "range and change");
    }

    #[test]
    fn scale_is_held_to_the_range_and_the_cap() {
        let p = Policy::tightened();
        assert!(p.check_scale(2, Some(1)).is_empty());
        assert!(p.check_scale(0, None).is_empty());
        let e = p.check_scale(3, Some(1));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].to_string(), "spec.replicas: 3 is more than the allowed 2");
        assert_eq!(fields(p.check_scale(-1, Some(1))), ["spec.replicas"]);
        assert_eq!(fields(Policy::default().check_scale(1001, Some(1))), ["spec.replicas"]);
        assert!(p.check_scale(5, Some(5)).is_empty(), "an unchanged count is not checked again");
        assert_eq!(p.replicas_over_max(2), None);
        assert_eq!(Policy::default().replicas_over_max(1000), None);
    }
}
