//! Sockets under tonic: accepted connections (TCP_NODELAY, the TLS handshake off the
//! accept loop) and outgoing ones (the same, as a connector for channels).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin as StdPin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;

use super::pki::Pin;

/// A handshake that takes longer is dropped (a peer that connects and stalls must not
/// hold a slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted and handshaken, waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 64;

/// What a server knows of the caller of a request (a request extension).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    /// The key of the client certificate the caller proved it holds (mutual TLS).
    pub pin: Option<Pin>,
    /// The link is encrypted.
    pub tls: bool,
}

impl Peer {
    /// The caller of `req`, as the transport saw it.
    pub fn of<T>(req: &tonic::Request<T>) -> Peer {
        req.extensions().get::<Peer>().cloned().unwrap_or_default()
    }
}

/// A socket, in the clear or under TLS (server or client side).
pub enum Stream {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::Server($s) => $e,
            Stream::Client($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => StdPin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => StdPin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => StdPin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => StdPin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => StdPin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Server(s) => s.is_write_vectored(),
            Stream::Client(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Stream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            Stream::Plain(s) => Peer {
                remote: s.peer_addr().ok(),
                pin: None,
                tls: false,
            },
            Stream::Server(s) => {
                let (tcp, conn) = s.get_ref();
                Peer {
                    remote: tcp.peer_addr().ok(),
                    pin: conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| Pin::of_cert(c).ok()),
                    tls: true,
                }
            }
            Stream::Client(s) => Peer {
                remote: s.get_ref().0.peer_addr().ok(),
                pin: None,
                tls: true,
            },
        }
    }
}

/// Accepts on `listener` until the returned stream is dropped. A failed handshake is
/// logged and dropped without disturbing other connections.
pub(super) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> ReceiverStream<io::Result<Stream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_BACKLOG);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: back off, do not spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(acceptor) = acceptor.clone() else {
                if tx.send(Ok(Stream::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(Stream::Server(Box::new(s)))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake refused: {e}"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Dials host:port for a channel: TCP_NODELAY, then TLS when configured.
#[derive(Clone)]
pub(super) struct Connector {
    tls: Option<TlsConnector>,
}

impl Connector {
    pub(super) fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            tls: tls.map(TlsConnector::from),
        }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = StdPin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
                })?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = tls else {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            };
            let name = ServerName::try_from(host.clone()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{host}` is not a valid server name"),
                )
            })?;
            let s = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(Stream::Client(Box::new(s))))
        })
    }
}
