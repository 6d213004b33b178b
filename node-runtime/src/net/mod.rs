//! The transport: the only place that makes a gRPC server or channel.
//!
//! Every link gets TCP_NODELAY on both ends (a decode step is one small message each way:
//! with Nagle and delayed ACK it waits ~40 ms), HTTP/2 keepalive, connect and request
//! timeouts, and — unless the testnet opted out on loopback — TLS 1.3 with rustls:
//! servers present their certificate and accept an optional client certificate (mutual
//! TLS between nodes; end-user clients stay anonymous), and channels verify the server
//! under the testnet CA and, where the caller knows it, against the key the node
//! registered (its pin). What the server learns of its caller is `Peer`.

pub mod auth;
mod conn;
pub mod pki;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

pub use conn::{Peer, Stream};
pub use pki::Pin;

/// Largest message each service accepts (both directions).
pub mod limits {
    /// Hidden states of a long prompt, spot-check inputs of a whole session.
    pub const COMPUTE: usize = 256 << 20;
    /// Registrations, listings, manifests and fraud reports (which carry inputs).
    pub const REGISTRY: usize = 256 << 20;
    /// Compute shares and status.
    pub const DAEMON: usize = 16 << 20;
    /// Preprocessed image tiles in, features out.
    pub const VISION: usize = 128 << 20;
    /// Shares of a layer's activations (a prefill's are the largest).
    pub const MPC: usize = 256 << 20;
}

/// How long a connection attempt may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default limit of one call (roles pass their own, e.g. the hop timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings keep idle links open through NATs and find dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open HTTP/2 streams one connection may carry: each live session holds one step
/// stream per hop, and a node's sessions to its next hop share one connection (hyper's
/// default of 200 would stall the 201st session's first step).
const MAX_STREAMS_PER_CONNECTION: u32 = 4096;

/// Where a node's TLS material lives (PEM files); the key file must be 0600.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files `unfedctl up` writes for `name` under `dir` (run_dir/keys).
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.crt"),
        }
    }
}

/// The TLS flags every role takes (the original's names; env vars for service managers).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This node's certificate (PEM), issued by the testnet CA for its advertise host.
    #[arg(long, env = "UNFED_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(long, env = "UNFED_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The testnet CA certificate (PEM): peers must present certificates it signed.
    #[arg(long, env = "UNFED_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The node's transport; plaintext only when no flag is given and `advertise` is
    /// a loopback address.
    pub fn net(&self, advertise: &str) -> Result<Net> {
        let net = Net::for_node(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
            advertise,
        )?;
        if !net.is_tls() {
            tracing::warn!(
                "serving plaintext on loopback: links are not encrypted and peers are identified only by signatures"
            );
        }
        Ok(net)
    }

    /// The transport of a process that only dials (the dashboard): the CA alone is
    /// enough; a certificate, when given, is presented as a client certificate.
    pub fn client_net(&self) -> Result<Net> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, Some(ca)) => Net::client_from_ca(ca),
            (None, None, None) => Ok(Net::plaintext()),
            _ => self.net("127.0.0.1"),
        }
    }
}

/// One process's transport settings: plaintext, or TLS with the testnet's CA and, for a
/// node, its own certificate. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    tls: Option<Arc<tls::Tls>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls.is_some() {
            "Net(tls)"
        } else {
            "Net(plaintext)"
        })
    }
}

impl Net {
    /// No encryption: only for loopback testnets that opted out (`[testnet] tls = false`).
    pub fn plaintext() -> Self {
        Self { tls: None }
    }

    /// TLS trusting the CA in `ca_pem`, presenting `identity` (certificate chain and key
    /// PEM) as server and as client when given.
    pub fn tls(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Self> {
        Ok(Self {
            tls: Some(Arc::new(tls::Tls::new(ca_pem, identity)?)),
        })
    }

    /// A node's transport from its files (the key file must be private).
    pub fn from_files(files: &TlsFiles) -> Result<Self> {
        let ca = read_pem(&files.ca, "--tls-ca")?;
        let cert = read_pem(&files.cert, "--tls-cert")?;
        let key = unfed_chain::keys::read_private_file(&files.key)
            .with_context(|| format!("--tls-key {}", files.key.display()))?;
        Self::tls(&ca, Some((&cert, &key)))
    }

    /// A client's transport: trusts the CA, presents no certificate.
    pub fn client_from_ca(ca: &Path) -> Result<Self> {
        Self::tls(&read_pem(ca, "--tls-ca")?, None)
    }

    /// The transport the flags describe, enforcing the rule that a node reachable from
    /// other machines uses TLS: all three files, or none and a loopback advertise address.
    pub fn for_node(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        advertise: &str,
    ) -> Result<Self> {
        match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => Self::from_files(&TlsFiles {
                cert: cert.into(),
                key: key.into(),
                ca: ca.into(),
            }),
            (None, None, None) if is_loopback(advertise) => Ok(Self::plaintext()),
            (None, None, None) => bail!(
                "this node advertises {advertise}, which other machines can reach, but has no TLS: \
                 pass --tls-cert, --tls-key and --tls-ca (unfedctl up issues them under run_dir/keys), \
                 or advertise a loopback address"
            ),
            _ => bail!(
                "TLS needs all of --tls-cert, --tls-key and --tls-ca (or UNFED_TLS_CERT, UNFED_TLS_KEY, UNFED_TLS_CA); some are missing"
            ),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The pin (SHA-256 of the public key) of this process's own certificate.
    pub fn own_pin(&self) -> Option<Pin> {
        self.tls.as_ref().and_then(|t| t.own_pin)
    }

    /// "tls" or "plaintext", for logs, status and plan.
    pub fn describe(&self) -> &'static str {
        if self.is_tls() { "tls" } else { "plaintext" }
    }

    /// A lazily connecting channel to `addr` (host:port) with the default request timeout.
    pub fn channel(&self, addr: &str) -> Result<Channel> {
        self.channel_with(addr, REQUEST_TIMEOUT, None)
    }

    /// A lazily connecting channel to `addr`: each call times out after `timeout`; with
    /// `pin`, a server whose certificate key is not that pin is refused at the handshake.
    pub fn channel_with(&self, addr: &str, timeout: Duration, pin: Option<Pin>) -> Result<Channel> {
        let (endpoint, connector) = self.dialer(addr, timeout, pin)?;
        Ok(endpoint.connect_with_connector_lazy(connector))
    }

    /// Like `channel_with`, but connects now so that an unreachable peer is an error here.
    pub async fn connect(
        &self,
        addr: &str,
        timeout: Duration,
        pin: Option<Pin>,
    ) -> Result<Channel> {
        let (endpoint, connector) = self.dialer(addr, timeout, pin)?;
        endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))
            .with_context(|| format!("cannot connect to {addr} ({})", self.describe()))
    }

    /// The endpoint settings and the TCP/TLS connector for dialling `addr`.
    fn dialer(
        &self,
        addr: &str,
        timeout: Duration,
        pin: Option<Pin>,
    ) -> Result<(Endpoint, conn::Connector)> {
        let tls = self.tls.as_ref().map(|t| t.client(pin)).transpose()?;
        Ok((self.endpoint(addr, timeout)?, conn::Connector::new(tls)))
    }

    fn endpoint(&self, addr: &str, timeout: Duration) -> Result<Endpoint> {
        let addr = addr.trim();
        if addr.contains("://") {
            bail!("`{addr}` should be host:port, without a scheme");
        }
        // The scheme is only for hyper's bookkeeping: the connector does TCP and TLS.
        Ok(Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("`{addr}` is not a host:port address"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true))
    }

    /// A server builder with this transport's keepalive and timeouts; add the role's
    /// services (with their `limits`) and hand the router to `serve`.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
    }

    /// Serves `router` on `listener` until `shutdown`: every accepted socket gets
    /// TCP_NODELAY and, with TLS, a handshake (off the accept loop, bounded in time).
    pub async fn serve(
        &self,
        router: tonic::transport::server::Router,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let incoming = conn::incoming(listener, self.tls.as_ref().and_then(|t| t.server()));
        router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("gRPC server failed")
    }
}

/// The web dashboard's HTTPS server (HTTP/1.1 over TLS 1.3) from its certificate and
/// key (PEM); the dashboard reads the key file with `read_private_file`.
pub fn https_server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    tls::https_server(cert_pem, key_pem)
}

/// A client of a dashboard whose certificate the CA file `ca` issued (`unfedctl up`'s
/// readiness probe, tests).
pub fn https_client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    tls::https_client(&read_pem(ca, "CA")?)
}

/// Connections accepted on `listener`, each TLS-handshaken with `config` off the accept
/// loop and within a timeout (a client that connects and stalls holds no slot); a
/// failed handshake is dropped. Ends when the stream is dropped.
pub fn accept_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Stream>> {
    conn::incoming(listener, Some(config))
}

fn read_pem(path: &Path, flag: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "{flag} {}: cannot read the certificate file",
            path.display()
        )
    })
}

/// Whether `addr` (a host, or host:port) names this machine only.
pub fn is_loopback(addr: &str) -> bool {
    let ip_loopback = |h: &str| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    };
    if addr == "localhost" || ip_loopback(addr) {
        return true;
    }
    match addr.parse::<SocketAddr>() {
        Ok(sa) => sa.ip().is_loopback(),
        Err(_) => addr
            .rsplit_once(':')
            .is_some_and(|(h, _)| h == "localhost" || ip_loopback(h)),
    }
}

/// An error and its causes on one line (tonic's transport errors hide the TLS reason).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses() {
        assert!(is_loopback("127.0.0.1:50051"));
        assert!(is_loopback("localhost:1"));
        assert!(is_loopback("[::1]:80"));
        assert!(is_loopback("127.3.4.5:9"));
        assert!(!is_loopback("10.0.0.2:50051"));
        assert!(!is_loopback("node.example:50051"));
        assert!(!is_loopback("0.0.0.0:50051"));
        assert!(is_loopback("::1") && is_loopback("localhost") && is_loopback("127.0.0.1"));
        assert!(!is_loopback("0.0.0.0") && !is_loopback("::"));
    }
}
