//! `--health-port`: a second, plaintext port that serves only the standard
//! `grpc.health.v1.Health` service, for probes that cannot speak our mutual TLS (the
//! kubelet's gRPC probes are plaintext). It reports the overall status ("") and nothing
//! else: NOT_SERVING until the node is ready to serve (a node with a registry: once
//! admitted), SERVING after, NOT_SERVING again when the registry forgets it.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The overall status: the empty service name, per the gRPC health checking protocol.
const OVERALL: &str = "";

/// Flags of the roles that can serve a health port.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct HealthArgs {
    /// Also serve grpc.health.v1.Health, and only that, in PLAINTEXT on this port (same
    /// --host), for kubelet gRPC readiness probes: NOT_SERVING until the node is ready
    /// (registered, for nodes with a --registry), then SERVING.
    #[arg(long, value_name = "PORT")]
    pub health_port: Option<u16>,
}

impl HealthArgs {
    /// Binds and serves the health port when one is asked for; a node without one gets a
    /// `Health` that reports nowhere.
    pub async fn start(&self, host: &str) -> Result<Health> {
        let Some(port) = self.health_port else {
            return Ok(Health::none());
        };
        let addr: SocketAddr = format!("{host}:{port}")
            .parse()
            .with_context(|| format!("--host {host} is not an IP address"))?;
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen on {addr} for --health-port: is another process using port {port}?"
            )
        })?;
        let (health, _task) = serve(listener).await;
        Ok(health)
    }
}

/// Where a node reports whether it is ready; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health(Option<HealthReporter>);

impl Health {
    /// Reports nowhere (no --health-port).
    pub fn none() -> Self {
        Self(None)
    }

    pub async fn set_serving(&self, serving: bool) {
        if let Some(reporter) = &self.0 {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(OVERALL, status).await;
        }
    }
}

/// Serves the health service on `listener` (plaintext) until the task is dropped with
/// the runtime, starting NOT_SERVING. Nothing but `grpc.health.v1.Health` is routed:
/// any other call is answered UNIMPLEMENTED.
pub async fn serve(listener: TcpListener) -> (Health, tokio::task::JoinHandle<()>) {
    let reporter = HealthReporter::new();
    // tonic-health starts the overall status at SERVING; the node is not ready yet.
    reporter
        .set_service_status(OVERALL, ServingStatus::NotServing)
        .await;
    let service = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
    let task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let result = tonic::transport::Server::builder()
            .add_service(tonic_health::pb::health_server::HealthServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = result {
            tracing::error!("health port failed: {e}");
        }
    });
    (Health(Some(reporter)), task)
}
