//! The `MyApp` API (`myapps.myapp.dev/v1`): the Rust types the CRD is generated from, the status
//! conditions and their maths, the validation rules, and the one admission [`policy`] that the
//! webhook and the reconciler both enforce.

pub mod conditions;
mod name;
pub mod policy;
pub mod quantity;
pub mod scope;
pub mod types;
pub mod validation;

pub use types::*;

/// The finalizer that holds a `MyApp` until its children are gone.
pub const FINALIZER: &str = "myapp.dev/cleanup";
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "myapp-operator";

// The labels and annotations the operator puts on objects: one home, read by the controller, the
// webhooks and the tests.

/// Label that selects the pods of one `MyApp`.
pub const INSTANCE_LABEL: &str = "myapp.dev/name";
/// Label on everything the operator manages; its watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "myapp-operator";
/// Annotation on every child: the digest of the document the operator last applied to it (see
/// [`crate::controller::children::stamp`]).
pub const APPLIED_HASH: &str = "myapp.dev/applied-hash";
/// The annotation that carries the trace context of the request that last changed a MyApp's
/// spec. The reconcile of that generation links to it. It is metadata: it bumps no generation and
/// no drift check looks at it.
pub const TRACE_ANNOTATION: &str = "myapp.dev/traceparent";
