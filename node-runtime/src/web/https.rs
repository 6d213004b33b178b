//! The dashboard over HTTPS: the certificate and key of `--https-cert`/`--https-key`,
//! and a listener for `axum::serve` whose connections arrive already TLS-handshaken by
//! the transport's acceptor (off the accept loop, within a timeout).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::net::Stream;

/// The server's TLS from its certificate file and its private key file (refused when
/// group or others can read it).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let cert_pem = std::fs::read_to_string(cert).with_context(|| {
        format!(
            "--https-cert {}: cannot read the certificate",
            cert.display()
        )
    })?;
    let key_pem = unfed_chain::keys::read_private_file(key)
        .with_context(|| format!("--https-key {}", key.display()))?;
    crate::net::https_server_config(&cert_pem, &key_pem).with_context(|| {
        format!(
            "--https-cert {} and --https-key {}",
            cert.display(),
            key.display()
        )
    })
}

/// Accepted, handshaken HTTPS connections.
pub struct HttpsListener {
    incoming: ReceiverStream<io::Result<Stream>>,
    local: SocketAddr,
}

impl HttpsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            incoming: crate::net::accept_tls(listener, config),
            local,
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let remote = stream.connect_info().remote.unwrap_or(self.local);
                    return (stream, remote);
                }
                // The acceptor logs and drops its failures; none reach here.
                Some(Err(_)) => continue,
                // The acceptor stopped: no connection will come again.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
