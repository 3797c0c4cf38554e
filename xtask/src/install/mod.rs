//! The operator installed as users install it (`kubectl apply -k`, [`mod@apply`]), and the install
//! paths beyond the default one, each a command: the upgrade from the previous version and its
//! rollback ([`upgrade`]), and the namespace-scoped install ([`namespaced`]).

mod apply;
pub mod namespaced;
pub mod upgrade;

pub use apply::*;
