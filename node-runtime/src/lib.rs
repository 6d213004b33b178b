//! The node runtime: one module per role over shared engine, wire and identity modules.

pub mod engine;
