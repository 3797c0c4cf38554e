//! The `MyApp` API (`myapps.myapp.dev/v1`): the Rust types the CRD is generated from, the status
//! conditions and their maths, and the validation rules shared by the reconciler and the webhook.

pub mod conditions;
pub mod quantity;
pub mod types;
pub mod validation;

pub use types::*;

/// The finalizer that holds a `MyApp` until its children are gone.
pub const FINALIZER: &str = "myapp.dev/cleanup";
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "myapp-operator";
