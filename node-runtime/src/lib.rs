//! The node runtime: one module per role over shared engine, wire and client modules.

pub mod cli;
pub mod client;
pub mod compute;
pub mod daemon;
pub mod engine;
pub mod exclusions;
pub mod health;
pub mod membership;
pub mod mpc;
pub mod net;
pub mod privacy;
pub mod registry;
pub mod seal;
pub mod share_spool;
pub mod shares;
pub mod stamp;
pub mod step_link;
pub mod verify;
pub mod vision;
pub mod voucher;
pub mod web;
pub mod wire;

/// The gRPC types, for users of the client library.
pub use unfed_proto as proto;

/// Completes on SIGINT or SIGTERM: the shutdown signal every role serves until.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
