//! A minimal HTTP/1.1 client of the dashboard, one request per connection, in the clear
//! or over HTTPS trusting one CA: `unfedctl up`'s readiness probe and conformance check,
//! and tests that need to send exactly the headers they choose (Host, Origin, Upgrade).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A whole exchange may take this long (a dashboard that stalls is not ready).
const TIMEOUT: Duration = Duration::from_secs(10);
/// Larger answers are cut (the probe reads small JSON documents).
const MAX_RESPONSE: usize = 16 << 20;

/// How to reach a dashboard.
#[derive(Clone)]
pub struct Probe {
    tls: Option<TlsConnector>,
}

/// A response: status, the header lines, the body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Probe {
    /// Plain HTTP.
    pub fn plain() -> Self {
        Self { tls: None }
    }

    /// HTTPS to a dashboard whose certificate the CA file `ca` issued.
    pub fn https(ca: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            tls: Some(TlsConnector::from(crate::net::https_client_config(ca)?)),
        })
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `GET path` on `addr` (host:port).
    pub async fn get(&self, addr: &str, path: &str) -> io::Result<Reply> {
        self.send(addr, "GET", path, &[], "").await
    }

    /// `method path` on `addr` with `headers` (Host defaults to `addr`; a body is sent
    /// as JSON unless Content-Type says otherwise).
    pub async fn send(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> io::Result<Reply> {
        let addr = &dialable(addr);
        let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        let mut request = format!("{method} {path} HTTP/1.1\r\n");
        if !has("host") {
            request += &format!("Host: {addr}\r\n");
        }
        if !has("connection") {
            request += "Connection: close\r\n";
        }
        if !body.is_empty() && !has("content-type") {
            request += "Content-Type: application/json\r\n";
        }
        if !body.is_empty() || method == "POST" {
            request += &format!("Content-Length: {}\r\n", body.len());
        }
        for (k, v) in headers {
            request += &format!("{k}: {v}\r\n");
        }
        request += "\r\n";
        request += body;
        tokio::time::timeout(TIMEOUT, self.exchange(addr, request.as_bytes()))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{addr} did not answer within {TIMEOUT:?}"),
                )
            })?
    }

    async fn exchange(&self, addr: &str, request: &[u8]) -> io::Result<Reply> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return round_trip(tcp, request).await;
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let name = ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|_| invalid(format!("`{host}` is not a valid server name")))?;
        round_trip(tls.connect(name, tcp).await?, request).await
    }
}

/// `addr` with an every-interface IP (a server's "listening 0.0.0.0:PORT") replaced by
/// loopback, which the server's certificate names.
fn dialable(addr: &str) -> String {
    match addr.parse::<SocketAddr>() {
        Ok(sa) if sa.ip().is_unspecified() => {
            let lo: IpAddr = if sa.is_ipv4() {
                Ipv4Addr::LOCALHOST.into()
            } else {
                Ipv6Addr::LOCALHOST.into()
            };
            SocketAddr::new(lo, sa.port()).to_string()
        }
        _ => addr.to_string(),
    }
}

/// Writes `request`, reads the head, then the body (by Content-Length, else to the end;
/// not after a `101 Switching Protocols`, whose connection stays open).
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> io::Result<Reply> {
    s.write_all(request).await?;
    s.flush().await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before an HTTP response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(invalid("the response head is too large".into()));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("not an HTTP response: {head:?}")))?;
    let mut reply = Reply {
        status,
        head,
        body: String::new(),
    };
    if status == 101 {
        return Ok(reply);
    }
    let mut body = buf.split_off(head_end + 4);
    let length = reply
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    while length.is_none_or(|len| body.len() < len) && body.len() <= MAX_RESPONSE {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            // A server may close without TLS close_notify once the body is complete.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    if let Some(len) = length {
        body.truncate(len);
    }
    reply.body = String::from_utf8_lossy(&body).into_owned();
    Ok(reply)
}
