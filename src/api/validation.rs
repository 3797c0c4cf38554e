//! Validation of a `MyAppSpec` in plain Rust: the same rules as the CRD's schema and CEL rules, so
//! the reconciler can refuse (and report as `Stalled`) a spec that got past admission, and so the
//! webhook can name the offending field. Every error names its field path.

pub use super::name::{MAX_NAME_LENGTH, NAME_PATTERN, NAME_RULE};
use super::quantity;
use super::types::{MyAppSpec, ResourceAmounts};
use std::collections::HashSet;
use std::fmt;

/// One problem with a spec, naming the field it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.image`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A new error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Joins errors into one message, as the API server does: `a: x; b: y`.
pub fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// True when the final path segment of `image` carries a tag (`name:tag`).
pub fn has_tag(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or(image);
    let last = name.rsplit('/').next().unwrap_or(name);
    match last.rsplit_once(':') {
        Some((repo, tag)) => {
            !repo.is_empty()
                && !tag.is_empty()
                && tag.len() <= 128
                && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        None => false,
    }
}

/// True when `image` is pinned by a digest (`name@sha256:<hex>`).
pub fn has_digest(image: &str) -> bool {
    match image.rsplit_once('@') {
        Some((name, digest)) => match digest.split_once(':') {
            Some((algo, hex)) => {
                !name.is_empty() && !algo.is_empty() && hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
            }
            None => false,
        },
        None => false,
    }
}

/// Checks the image reference: a tag or a digest is required, and `latest` is refused.
pub fn validate_image(image: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if image.trim().is_empty() {
        errors.push(FieldError::new("spec.image", "must not be empty"));
        return errors;
    }
    if image.chars().any(char::is_whitespace) {
        errors.push(FieldError::new("spec.image", "must not contain white space"));
    }
    if !has_tag(image) && !has_digest(image) {
        errors.push(FieldError::new("spec.image", "must carry a tag or a digest, e.g. nginx:1.27"));
    }
    if image.ends_with(":latest") {
        errors.push(FieldError::new("spec.image", "the tag \"latest\" is not allowed: pin a version or a digest"));
    }
    errors
}

/// True when `name` is a valid environment variable name for this API.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || matches!(c, '_' | '-' | '.') => {}
        _ => return false,
    }
    name.len() <= 253 && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn validate_amounts(path: &str, amounts: &ResourceAmounts, errors: &mut Vec<FieldError>) {
    for (name, value) in [("cpu", &amounts.cpu), ("memory", &amounts.memory)] {
        if let Some(v) = value
            && quantity::parse(v).is_none_or(|q| q < 0.0)
        {
            errors.push(FieldError::new(format!("{path}.{name}"), format!("{v:?} is not a quantity")));
        }
    }
}

/// The rule a `MyApp`'s name follows so that its children can carry it: it names the Service (a
/// DNS-1035 label) and the Deployment, and it is the value of the pods' labels (at most 63
/// characters). A DNS-1035 label is valid for all three, while the API server lets a `MyApp` have
/// any DNS subdomain (dots, 253 characters, a leading digit). The CRD holds the same rule in CEL.
pub fn validate_name(name: &str) -> Option<FieldError> {
    let bytes = name.as_bytes();
    let valid = bytes.len() <= MAX_NAME_LENGTH
        && bytes.first().is_some_and(u8::is_ascii_lowercase)
        && bytes.last().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    (!valid).then(|| FieldError::new("metadata.name", format!("{name:?} {NAME_RULE}")))
}

/// Checks the replica count against the API's range.
pub fn validate_replicas(replicas: i32) -> Option<FieldError> {
    (!(0..=1000).contains(&replicas)).then(|| FieldError::new("spec.replicas", "must be between 0 and 1000"))
}

/// Checks every rule of the API. An empty result means the spec is valid.
pub fn validate_spec(spec: &MyAppSpec) -> Vec<FieldError> {
    let mut errors = validate_image(&spec.image);
    errors.extend(validate_replicas(spec.replicas));
    if !(1..=65535).contains(&spec.port) {
        errors.push(FieldError::new("spec.port", "must be between 1 and 65535"));
    }
    let mut seen = HashSet::new();
    for (i, env) in spec.env.iter().enumerate() {
        if !valid_env_name(&env.name) {
            errors.push(FieldError::new(
                format!("spec.env[{i}].name"),
                format!("{:?} is not a valid variable name", env.name),
            ));
        }
        if !seen.insert(env.name.as_str()) {
            errors.push(FieldError::new(
                format!("spec.env[{i}].name"),
                format!("duplicate name {:?}: env names must be unique", env.name),
            ));
        }
    }
    if let Some(resources) = &spec.resources {
        if let Some(r) = &resources.requests {
            validate_amounts("spec.resources.requests", r, &mut errors);
        }
        if let Some(l) = &resources.limits {
            validate_amounts("spec.resources.limits", l, &mut errors);
        }
        if let (Some(req), Some(lim)) = (&resources.requests, &resources.limits) {
            for (name, r, l) in [("cpu", &req.cpu, &lim.cpu), ("memory", &req.memory, &lim.memory)] {
                if let (Some(r), Some(l)) = (r, l)
                    && let (Some(rq), Some(lq)) = (quantity::parse(r), quantity::parse(l))
                    && lq < rq
                {
                    errors.push(FieldError::new(
                        format!("spec.resources.limits.{name}"),
                        format!("limit {l} must be at least the request {r}"),
                    ));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EnvVar, Resources};

    #[test]
    fn tags_and_digests() {
        assert!(has_tag("nginx:1.27"));
        assert!(has_tag("registry.local:5000/team/app:v1"));
        assert!(!has_tag("registry.local:5000/team/app"));
        assert!(!has_tag("nginx"));
        assert!(!has_tag("nginx:"));
        assert!(has_digest(&format!("nginx@sha256:{}", "a".repeat(64))));
        assert!(!has_digest("nginx@sha256:xyz"));
    }

    #[test]
    fn image_rules_name_the_field() {
        assert!(validate_spec(&MyAppSpec::test("nginx:1.27")).is_empty());
        let e = validate_spec(&MyAppSpec::test("nginx"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "spec.image");
        let e = validate_spec(&MyAppSpec::test("nginx:latest"));
        assert_eq!(e[0].to_string(), "spec.image: the tag \"latest\" is not allowed: pin a version or a digest");
        assert!(!validate_spec(&MyAppSpec::test("")).is_empty());
        assert!(!validate_spec(&MyAppSpec::test("ngi nx:1")).is_empty());
    }

    #[test]
    fn env_names_unique_and_valid() {
        let mut s = MyAppSpec::test("nginx:1.27");
        s.env = vec![
            EnvVar { name: "A".into(), value: "1".into() },
            EnvVar { name: "A".into(), value: "2".into() },
            EnvVar { name: "1BAD".into(), value: String::new() },
        ];
        let fields: Vec<_> = validate_spec(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.env[1].name", "spec.env[2].name"]);
    }

    #[test]
    fn limits_at_least_requests() {
        let mut s = MyAppSpec::test("nginx:1.27");
        s.resources = Some(Resources {
            requests: Some(ResourceAmounts { cpu: Some("500m".into()), memory: Some("1Gi".into()) }),
            limits: Some(ResourceAmounts { cpu: Some("250m".into()), memory: Some("1024Mi".into()) }),
        });
        let e = validate_spec(&s);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "spec.resources.limits.cpu");
        if let Some(l) = s.resources.as_mut().and_then(|r| r.limits.as_mut()) {
            l.cpu = Some("1".into());
        }
        assert!(validate_spec(&s).is_empty());
        if let Some(r) = s.resources.as_mut().and_then(|r| r.requests.as_mut()) {
            r.memory = Some("lots".into());
        }
        assert_eq!(validate_spec(&s)[0].field, "spec.resources.requests.memory");
    }

    #[test]
    fn names_must_suit_a_service_and_a_label() {
        for ok in ["web", "a", "web-1", "a1", &format!("a{}", "b".repeat(62))] {
            assert_eq!(validate_name(ok), None, "{ok:?}");
        }
        let too_long = format!("a{}", "b".repeat(63));
        for bad in ["", "a.b", "1web", "-web", "web-", "Web", "web_1", "wéb", too_long.as_str()] {
            let e = validate_name(bad).unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert_eq!(e.field, "metadata.name");
            assert!(e.message.contains("DNS-1035"), "the rule is named: {}", e.message);
        }
    }

    proptest::proptest! {
        /// The Rust rule and the CRD's CEL rule (its length bound and regular expression) agree.
        #[test]
        fn the_name_rule_is_the_cel_rule(name in "[a-z0-9.A-Z_-]{0,70}|[a-z][-a-z0-9]{0,70}") {
            let pattern = regex::Regex::new(NAME_PATTERN).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let cel = name.len() <= MAX_NAME_LENGTH && pattern.is_match(&name);
            proptest::prop_assert_eq!(validate_name(&name).is_none(), cel, "{:?}", name);
        }
    }

    #[test]
    fn ranges() {
        let mut s = MyAppSpec::test("nginx:1.27");
        s.replicas = 1001;
        s.port = 0;
        let fields: Vec<_> = validate_spec(&s).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.replicas", "spec.port"]);
    }
}
