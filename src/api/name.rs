//! The rule a `MyApp`'s name follows, stated once for the CRD's CEL rule ([`super::types`]) and for
//! the code's ([`super::validation::validate_name`]).

/// The most a MyApp name may have: it is the name of its Service, a DNS-1035 label.
pub const MAX_NAME_LENGTH: usize = 63;

/// The characters of a DNS-1035 label, as a regular expression (for the CRD's CEL rule).
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// What [`super::validation::validate_name`] demands, as the message of its error (and of the CRD's CEL rule).
pub const NAME_RULE: &str = "must be a DNS-1035 label, because it names the MyApp's Service and is a label value: \
     at most 63 characters, lowercase letters, digits and '-', starting with a letter and ending with a letter or digit";
