//! The images the install runs: the operator's (`cargo xtask image`, [`operator`]) and those of
//! the in-cluster trace pipeline, the OpenTelemetry Collector and Jaeger (`cargo xtask
//! otel-images`, [`otel`]), all built offline with buildah.

mod operator;
pub mod otel;

pub use operator::*;
