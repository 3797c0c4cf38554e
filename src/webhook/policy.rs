//! Admission policy beyond what the CRD's schema and CEL rules say: configurable, and so checked
//! in code. Every denial names the field.

use crate::api::MyAppSpec;
use crate::api::validation::{FieldError, validate_spec};
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

impl Policy {
    /// Problems with a new or updated spec. `old` is the previous object on update, with its
    /// annotations: `spec.port` may change only with [`ALLOW_PORT_CHANGE`] set to `"true"` on the
    /// new object, because the Service's clients know the old port. (A rule that looks at whether
    /// the Service exists would need an API call inside admission; this one is pure, and an owner
    /// who means it says so in one annotation.)
    pub fn check(
        &self,
        spec: &MyAppSpec,
        annotations: &BTreeMap<String, String>,
        old: Option<&MyAppSpec>,
    ) -> Vec<FieldError> {
        let mut errors = validate_spec(spec);
        if !self.allowed_registries.is_empty() {
            let reg = registry(&spec.image);
            if !self.allowed_registries.iter().any(|a| a == reg) {
                errors.push(FieldError::new(
                    "spec.image",
                    format!("registry {reg:?} is not allowed; allowed: {}", self.allowed_registries.join(", ")),
                ));
            }
        }
        for (i, env) in spec.env.iter().enumerate() {
            if self.forbidden_env.iter().any(|f| f == &env.name) {
                errors.push(FieldError::new(format!("spec.env[{i}].name"), format!("{:?} may not be set", env.name)));
            }
        }
        if let Some(max) = self.max_replicas
            && spec.replicas > max
        {
            errors.push(FieldError::new("spec.replicas", format!("{} is more than the allowed {max}", spec.replicas)));
        }
        if let Some(old) = old
            && old.port != spec.port
            && annotations.get(ALLOW_PORT_CHANGE).map(String::as_str) != Some("true")
        {
            errors.push(FieldError::new(
                "spec.port",
                format!(
                    "cannot change from {} to {} on update; set the annotation {ALLOW_PORT_CHANGE}: \"true\" to allow it",
                    old.port, spec.port
                ),
            ));
        }
        errors
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
        let p = Policy {
            allowed_registries: vec!["ghcr.io".into()],
            forbidden_env: vec!["LD_PRELOAD".into()],
            max_replicas: Some(10),
        };
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
}
