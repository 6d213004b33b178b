//! Generated gRPC types and services (package `unfed.v1`).

pub mod v1 {
    tonic::include_proto!("unfed.v1");
}

pub use v1::*;
