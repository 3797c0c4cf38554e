//! The admission policy: the one judgment of what a `MyApp` may be, which the validating webhook
//! and the reconciler both call ([`Policy::breaches`]). Beyond what the CRD's schema and CEL
//! rules say, it is configurable ([`PolicyArgs`]), and so checked in code. Every denial names
//! the field.

use super::conditions::{ENV_FORBIDDEN, IMAGE_REGISTRY_NOT_ALLOWED, INVALID_NAME, INVALID_SPEC, REPLICAS_OVER_POLICY};
use super::types::{MyApp, MyAppSpec};
use super::validation::{FieldError, join, validate_name, validate_replicas, validate_spec};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Annotation that allows `spec.port` to change on update.
pub const ALLOW_PORT_CHANGE: &str = "myapp.dev/allow-port-change";

/// The policy's flags. Flattened into the binary's `run` flags; each flag also reads an
/// environment variable.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Registries images may come from, comma-separated (empty: all).
    #[arg(long, env = "ALLOWED_REGISTRIES", value_delimiter = ',')]
    pub allowed_registries: Vec<String>,
    /// Environment variable names a MyApp may not set, comma-separated.
    #[arg(long, env = "FORBIDDEN_ENV", value_delimiter = ',')]
    pub forbidden_env: Vec<String>,
    /// The most replicas a MyApp may ask for.
    #[arg(long, env = "MAX_REPLICAS")]
    pub max_replicas: Option<i32>,
}

impl PolicyArgs {
    /// The policy these flags set (empty list entries ignored).
    pub fn policy(&self) -> Policy {
        let listed = |v: &[String]| v.iter().filter(|s| !s.is_empty()).cloned().collect();
        Policy {
            allowed_registries: listed(&self.allowed_registries),
            forbidden_env: listed(&self.forbidden_env),
            max_replicas: self.max_replicas,
        }
    }
}

/// What the validating webhook admits and the reconciler rolls out: the API's rules, and the
/// configurable ones below.
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

/// A rule of the [`Policy`]: the API's own, and the configurable ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `metadata.name` can name a Service and be a label value ([`validate_name`]).
    Name,
    /// The spec meets the API's rules ([`validate_spec`]).
    Spec,
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
            Rule::Name => INVALID_NAME,
            Rule::Spec => INVALID_SPEC,
            Rule::Registry => IMAGE_REGISTRY_NOT_ALLOWED,
            Rule::ForbiddenEnv => ENV_FORBIDDEN,
            Rule::MaxReplicas => REPLICAS_OVER_POLICY,
        }
    }

    /// Which kind of rule: the name's, the spec's, or the configurable policy's.
    fn tier(self) -> u8 {
        match self {
            Rule::Name => 0,
            Rule::Spec => 1,
            Rule::Registry | Rule::ForbiddenEnv | Rule::MaxReplicas => 2,
        }
    }
}

/// Why a `MyApp` must get no children: the `(reason, message)` of its conditions.
pub type Refusal = (&'static str, String);

impl Policy {
    /// Every rule that `spec` (and `name`, when given) breaks as it stands, each with its error
    /// naming the field, in the order name, the API's spec rules, registries, env, replicas; no
    /// old spec, no ratcheting. The one judgment of a `MyApp`: [`Policy::check`] (the webhook)
    /// ratchets what it returns on update, and [`Policy::refusal`] (the reconciler) refuses a
    /// `MyApp` for which it returns anything.
    pub fn breaches(&self, name: Option<&str>, spec: &MyAppSpec) -> Vec<(Rule, FieldError)> {
        let mut out: Vec<(Rule, FieldError)> =
            name.and_then(validate_name).map(|e| (Rule::Name, e)).into_iter().collect();
        out.extend(validate_spec(spec).into_iter().map(|e| (Rule::Spec, e)));
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

    /// Why `app` must get no children, if it must not: as the `(reason, message)` of its
    /// conditions, the message naming the field. The first kind of rule `app` breaks, in order:
    /// a name that cannot name a Service or be a label value (reason [`INVALID_NAME`]), a spec
    /// against the API's rules ([`INVALID_SPEC`]), and the configurable rules: reason the first
    /// rule broken ([`Rule::reason`]: `ImageRegistryNotAllowed`, `EnvForbidden`,
    /// `ReplicasOverPolicy`); message every breach of that kind. Judged by
    /// [`Policy::breaches`], the function the webhook's [`Policy::check`] calls too.
    ///
    /// # Guarantees
    ///
    /// - **One policy, everywhere**: what `/validate` refuses on creation, this refuses too, so a
    ///   `MyApp` the webhook never saw (written in the operator's own namespace, which the webhooks
    ///   skip, or while their configuration was absent) rolls out no forbidden registry, env or
    ///   replica count.
    /// - **No ratcheting here, and no teardown**: admission lets an update keep a field that a
    ///   tightened policy now forbids (see [`Policy::check`]), so that the object can always be
    ///   updated and deleted. The reconciler judges the spec as it is against the policy as it is:
    ///   such a `MyApp` gets no child write (nothing against the policy is rolled out, nor any
    ///   other change of its spec) and reports `Stalled`. Its children are left as they were,
    ///   never deleted or scaled down, so tightening a policy does not take running workloads
    ///   away; they follow the spec again once it meets the policy.
    pub fn refusal(&self, app: &MyApp) -> Option<Refusal> {
        let breaches = self.breaches(Some(&app.name_any()), &app.spec);
        let (first, _) = breaches.first()?;
        let (reason, tier) = (first.reason(), first.tier());
        let errors: Vec<FieldError> = breaches.into_iter().filter(|(r, _)| r.tier() == tier).map(|(_, e)| e).collect();
        Some((reason, join(&errors)))
    }

    /// Problems with a new or updated `MyApp`: its `name` (given on creation only: a name never
    /// changes), its `spec`; `old` is the previous spec on update, and `annotations` are the new
    /// object's.
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
    /// whole policy as it is now (see [`Policy::refusal`]). So after a
    /// tightening, an update that keeps a field now forbidden is admitted but not rolled out,
    /// and the children already running are left as they are.
    ///
    /// `spec.port` may change only with [`ALLOW_PORT_CHANGE`] set to `"true"` on the new object,
    /// because the Service's clients know the old port. (A rule that looks at whether the Service
    /// exists would need an API call inside admission; this one is pure, and an owner who means
    /// it says so in one annotation.)
    pub fn check(
        &self,
        name: Option<&str>,
        spec: &MyAppSpec,
        annotations: &BTreeMap<String, String>,
        old: Option<&MyAppSpec>,
    ) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = self.breaches(name, spec).into_iter().map(|(_, e)| e).collect();
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
    use crate::api::conditions::{self, Outcome, READY, REPLICAS_OVER_POLICY};

    #[test]
    fn the_policy_follows_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            policy: PolicyArgs,
        }
        let cli = Cli::parse_from(["x", "--max-replicas=3", "--allowed-registries=a.io,,b.io", "--forbidden-env=A,B"]);
        let policy = cli.policy.policy();
        assert_eq!(policy.allowed_registries, ["a.io", "b.io"]);
        assert_eq!(policy.forbidden_env, ["A", "B"]);
        assert_eq!(policy.max_replicas, Some(3));
        assert_eq!(Cli::parse_from(["x"]).policy.policy(), Policy::default());
    }

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
        assert!(p.check(None, &MyAppSpec::test("ghcr.io/org/app:1"), &none, None).is_empty());
        let e = p.check(None, &MyAppSpec::test("nginx:1.27"), &none, None);
        assert_eq!(e[0].field, "spec.image");
        let mut s = MyAppSpec::test("ghcr.io/org/app:1");
        s.env = vec![EnvVar { name: "LD_PRELOAD".into(), value: "x".into() }];
        s.replicas = 11;
        let fields: Vec<_> = p.check(None, &s, &none, None).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.env[0].name", "spec.replicas"]);
        assert!(Policy::default().check(None, &MyAppSpec::test("anything.example/app:1"), &none, None).is_empty());
    }

    #[test]
    fn port_change_needs_the_annotation() {
        let old = MyAppSpec::test("nginx:1.27");
        let mut new = old.clone();
        new.port = 9090;
        let p = Policy::default();
        let e = p.check(None, &new, &BTreeMap::new(), Some(&old));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "spec.port");
        let ok = BTreeMap::from([(ALLOW_PORT_CHANGE.to_string(), "true".to_string())]);
        assert!(p.check(None, &new, &ok, Some(&old)).is_empty());
        assert!(p.check(None, &new, &BTreeMap::new(), None).is_empty(), "creation may pick any port");
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
        assert_eq!(fields(p.check(None, &old, &none, None)), ["spec.image", "spec.env[0].name", "spec.replicas"]);
        assert!(p.check(None, &old, &none, Some(&old)).is_empty(), "nothing changed, nothing is checked");

        let mut new = old.clone();
        new.resources = Some(Default::default());
        assert!(p.check(None, &new, &none, Some(&old)).is_empty(), "another field changed");

        new.replicas = 6;
        assert_eq!(fields(p.check(None, &new, &none, Some(&old))), ["spec.replicas"]);
        new.replicas = 2;
        assert!(p.check(None, &new, &none, Some(&old)).is_empty(), "back within the cap");

        new.image = "nginx:1.28".into();
        assert_eq!(fields(p.check(None, &new, &none, Some(&old))), ["spec.image"], "a new image meets the registries");

        let mut env = old.clone();
        env.env.push(EnvVar { name: "MODE".into(), value: "a".into() });
        assert_eq!(
            fields(p.check(None, &env, &none, Some(&old))),
            ["spec.env[0].name"],
            "a changed list is checked whole"
        );
    }

    #[test]
    fn spec_rules_ratchet_too_but_port_changes_never_do() {
        let p = Policy::default();
        let mut old = MyAppSpec::test("nginx:latest");
        old.replicas = 1001;
        let none = BTreeMap::new();
        assert!(p.check(None, &old, &none, Some(&old)).is_empty());
        let mut new = old.clone();
        new.port = 9090;
        assert_eq!(fields(p.check(None, &new, &none, Some(&old))), ["spec.port"]);
        new.port = 0;
        assert_eq!(fields(p.check(None, &new, &none, Some(&old))), ["spec.port", "spec.port"], "range and change");
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

    fn app(name: &str, replicas: i32) -> MyApp {
        let mut spec = MyAppSpec::test("nginx:1.27");
        spec.replicas = replicas;
        MyApp::new(name, spec)
    }

    fn capped(max: i32) -> Policy {
        Policy { max_replicas: Some(max), ..Policy::default() }
    }

    #[test]
    fn more_replicas_than_the_policy_allows_get_no_children() {
        assert_eq!(capped(3).refusal(&app("web", 3)), None);
        assert_eq!(Policy::default().refusal(&app("web", 4)), None, "no cap, no refusal");
        let (reason, message) = capped(3).refusal(&app("web", 4)).expect("refused");
        assert_eq!(reason, REPLICAS_OVER_POLICY);
        assert_eq!(message, "spec.replicas: 4 is more than the allowed 3");
        let status = conditions::desired_status(1, "s", &Outcome::Refused { reason, message: message.clone() });
        let ready = conditions::find(&status.conditions, READY).expect("Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ReplicasOverPolicy"));
        assert!(ready.reason.contains("Replicas") && ready.message.starts_with("spec.replicas: "));
        assert!(conditions::is_true(&status.conditions, conditions::STALLED));
    }

    #[test]
    fn a_name_that_cannot_name_a_service_gets_no_children() {
        for name in ["a.b", "1web", &"a".repeat(64)] {
            let (reason, message) = Policy::default().refusal(&app(name, 1)).expect("refused");
            assert_eq!(reason, INVALID_NAME, "{name}");
            assert!(message.starts_with("metadata.name: ") && message.contains("DNS-1035"), "{message}");
        }
        assert_eq!(Policy::default().refusal(&app(&"a".repeat(63), 1)), None);
    }

    fn tightened(image: &str, env: &[&str]) -> MyApp {
        let mut app = app("web", 1);
        app.spec.image = image.into();
        app.spec.env = env.iter().map(|n| EnvVar { name: (*n).into(), value: "x".into() }).collect();
        app
    }

    #[test]
    fn the_whole_policy_is_enforced_and_each_rule_named() {
        let p = Policy::tightened();
        assert_eq!(p.refusal(&tightened("ghcr.io/org/app:1", &["MODE"])), None);
        let (reason, message) = p.refusal(&tightened("nginx:1.27", &[])).expect("refused");
        assert_eq!(reason, "ImageRegistryNotAllowed");
        assert_eq!(message, "spec.image: registry \"docker.io\" is not allowed; allowed: ghcr.io");
        let (reason, message) = p.refusal(&tightened("ghcr.io/org/app:1", &["MODE", "LD_PRELOAD"])).expect("refused");
        assert_eq!((reason, message.as_str()), ("EnvForbidden", "spec.env[1].name: \"LD_PRELOAD\" may not be set"));
        let (reason, message) = p.refusal(&tightened("nginx:1.27", &["LD_PRELOAD"])).expect("refused");
        assert_eq!(reason, "ImageRegistryNotAllowed", "the first rule broken names the reason");
        assert!(
            message.starts_with("spec.image: ") && message.contains("; spec.env[0].name: "),
            "every breach: {message}"
        );
        // The same judgment as the webhook's on creation.
        let admitted = p.check(None, &tightened("nginx:1.27", &["LD_PRELOAD"]).spec, &Default::default(), None);
        assert_eq!(join(&admitted), message);
    }

    #[test]
    fn the_first_broken_rule_is_reported() {
        let (reason, message) = capped(3).refusal(&app("a.b", 2000)).expect("refused");
        assert_eq!((reason, message.starts_with("metadata.name")), (INVALID_NAME, true));
        let (reason, message) = capped(3).refusal(&app("web", 2000)).expect("refused");
        assert_eq!((reason, message.as_str()), (INVALID_SPEC, "spec.replicas: must be between 0 and 1000"));
    }
}
