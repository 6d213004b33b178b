//! Generated gRPC types and services (package `unfed.v1`).
