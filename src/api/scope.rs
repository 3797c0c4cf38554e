//! Which namespaces' MyApps this operator manages: every namespace, or a list
//! (`WATCH_NAMESPACE=team-a,team-b`). The caches watch each namespace of the list (a Role in each
//! is enough), and the webhooks leave a MyApp elsewhere alone.

use std::fmt;

/// The namespaces whose MyApps the operator manages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (cluster-wide grants needed).
    #[default]
    All,
    /// These namespaces only, sorted, without repeats, never empty.
    Namespaces(Vec<String>),
}

impl Scope {
    /// Parses `WATCH_NAMESPACE`: empty for every namespace, else namespace names separated by
    /// commas (spaces around them allowed). A name that is not a DNS-1123 label is refused, named.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(Self::All);
        }
        let mut names = Vec::new();
        for name in s.split(',').map(str::trim) {
            if !is_namespace_name(name) {
                return Err(format!(
                    "WATCH_NAMESPACE: {name:?} is not a namespace name (a DNS-1123 label: at most 63 lowercase \
                     letters, digits and '-', starting and ending with a letter or digit)"
                ));
            }
            names.push(name.to_string());
        }
        names.sort();
        names.dedup();
        Ok(Self::Namespaces(names))
    }

    /// Whether the operator manages the MyApps of `namespace`.
    pub fn contains(&self, namespace: Option<&str>) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(list) => namespace.is_some_and(|ns| list.iter().any(|n| n == ns)),
        }
    }

    /// The namespaces to watch, one watch each: `[None]` for one watch of every namespace.
    pub fn watches(&self) -> Vec<Option<String>> {
        match self {
            Self::All => vec![None],
            Self::Namespaces(list) => list.iter().cloned().map(Some).collect(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => Ok(()),
            Self::Namespaces(list) => f.write_str(&list.join(",")),
        }
    }
}

/// A DNS-1123 label, as Kubernetes requires of a namespace's name.
fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_every_namespace_and_a_list_is_sorted_without_repeats() {
        assert_eq!(Scope::parse(""), Ok(Scope::All));
        assert_eq!(Scope::parse("  "), Ok(Scope::All));
        assert_eq!(Scope::parse("b, a,b"), Ok(Scope::Namespaces(vec!["a".into(), "b".into()])));
        assert_eq!(Scope::parse("team-a").map(|s| s.to_string()), Ok("team-a".into()));
    }

    #[test]
    fn a_bad_name_is_refused_and_named() {
        for bad in ["a,,b", "A", "-a", "a-", "a_b", &"x".repeat(64)] {
            let e = Scope::parse(bad).expect_err(bad);
            assert!(e.contains("WATCH_NAMESPACE"), "{e}");
        }
    }

    #[test]
    fn contains_and_watches() {
        let s = Scope::parse("a,b").expect("scope");
        assert!(s.contains(Some("a")) && s.contains(Some("b")));
        assert!(!s.contains(Some("c")) && !s.contains(None));
        assert!(Scope::All.contains(Some("c")) && Scope::All.contains(None));
        assert_eq!(s.watches(), [Some("a".to_string()), Some("b".to_string())]);
        assert_eq!(Scope::All.watches(), [None]);
    }
}
