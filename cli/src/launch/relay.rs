//! A TCP relay in front of a node, so chaos can slow or cut its links: the node
//! advertises the relay's address, every peer dials it, and the relay forwards bytes to
//! the node as they are (TLS included) — late by a set delay, or not at all.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does to the traffic it forwards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Every chunk, each way, arrives this much later (latency, not a rate limit).
    Delay(Duration),
    /// Open connections are dropped and new ones closed at once.
    Cut,
}

pub struct Relay {
    pub addr: SocketAddr,
    upstream: watch::Sender<Option<SocketAddr>>,
    fault: watch::Sender<Fault>,
}

impl Relay {
    /// Listens on a free port of `ip`; forwards once `set_upstream` names the node.
    async fn bind(ip: IpAddr, fault: Fault) -> anyhow::Result<Arc<Relay>> {
        let listener = TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("binding a relay on {ip}"))?;
        let relay = Arc::new(Relay {
            addr: listener.local_addr()?,
            upstream: watch::channel(None).0,
            fault: watch::channel(fault).0,
        });
        tokio::spawn(accept(listener, relay.clone()));
        Ok(relay)
    }

    pub fn set_upstream(&self, addr: SocketAddr) {
        self.upstream.send_replace(Some(addr));
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

async fn accept(listener: TcpListener, relay: Arc<Relay>) {
    while let Ok((inbound, _)) = listener.accept().await {
        if *relay.fault.borrow() == Fault::Cut {
            continue;
        }
        let (mut upstream, fault) = (relay.upstream.subscribe(), relay.fault.subscribe());
        tokio::spawn(async move {
            let Ok(Some(to)) = upstream.wait_for(Option::is_some).await.map(|a| *a) else {
                return;
            };
            if let Ok(outbound) = TcpStream::connect(to).await {
                forward(inbound, outbound, fault).await;
            }
        });
    }
}

/// Pumps both ways until either side closes or the link is cut.
async fn forward(inbound: TcpStream, outbound: TcpStream, mut fault: watch::Receiver<Fault>) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let pumps = {
        let (a, b) = (fault.clone(), fault.clone());
        async move { tokio::join!(pump(in_read, out_write, a), pump(out_read, in_write, b)) }
    };
    tokio::select! {
        _ = pumps => {}
        _ = fault.wait_for(|f| *f == Fault::Cut) => {}
    }
}

/// One direction: a reader stamps each chunk with when it may leave, a writer sends it
/// then, so a delay adds latency without throttling.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: watch::Receiver<Fault>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let delay = match *fault.borrow() {
                Fault::Delay(d) => d,
                _ => Duration::ZERO,
            };
            if tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// The relays of a launch: which nodes get one (those a chaos fault slows or cuts, or
/// a host's `delay_ms` slows), and each relay once made, kept across restarts of its node.
pub struct Relays {
    wanted: HashSet<String>,
    made: Mutex<HashMap<String, Arc<Relay>>>,
    /// Where the relays listen (the host's address).
    ip: IpAddr,
    /// What a new relay does until told otherwise.
    initial: Fault,
}

impl Default for Relays {
    fn default() -> Self {
        Self {
            wanted: HashSet::new(),
            made: Default::default(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            initial: Fault::None,
        }
    }
}

impl Relays {
    /// Relays on `ip` delaying every connection to `nodes` by `delay` each way: a
    /// host's emulated wide-area link.
    pub fn delaying(nodes: impl IntoIterator<Item = String>, ip: IpAddr, delay: Duration) -> Self {
        Self {
            wanted: nodes.into_iter().collect(),
            made: Default::default(),
            ip,
            initial: Fault::Delay(delay),
        }
    }

    /// Relays for the targets of `plan`'s slow and partition faults.
    pub fn for_chaos(plan: &crate::plan::LaunchPlan) -> Self {
        Self {
            wanted: plan
                .chaos
                .iter()
                .filter(|e| e.action.needs_relay())
                .map(|e| e.target.clone())
                .collect(),
            ..Self::default()
        }
    }

    /// The relay in front of `node`, made on first use; `None` if it gets none.
    pub async fn front(&self, node: &str) -> anyhow::Result<Option<Arc<Relay>>> {
        if !self.wanted.contains(node) {
            return Ok(None);
        }
        if let Some(r) = self.get(node) {
            return Ok(Some(r));
        }
        let relay = Relay::bind(self.ip, self.initial).await?;
        self.made
            .lock()
            .unwrap()
            .insert(node.to_string(), relay.clone());
        Ok(Some(relay))
    }

    pub fn get(&self, node: &str) -> Option<Arc<Relay>> {
        self.made.lock().unwrap().get(node).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server behind a relay: bytes pass, a delay delays them, a cut closes.
    #[tokio::test]
    async fn passes_delays_and_cuts() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let relay = Relay::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), Fault::None)
            .await
            .unwrap();
        relay.set_upstream(echo_addr);
        let roundtrip = |relay: SocketAddr| async move {
            let mut s = TcpStream::connect(relay).await.unwrap();
            let t = std::time::Instant::now();
            s.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            let read = s.read_exact(&mut got).await.map(|_| got);
            (read.ok(), t.elapsed())
        };
        let (got, _) = roundtrip(relay.addr).await;
        assert_eq!(got, Some(*b"ping"));
        relay.set(Fault::Delay(Duration::from_millis(50)));
        let (got, took) = roundtrip(relay.addr).await;
        assert_eq!(got, Some(*b"ping"));
        assert!(took >= Duration::from_millis(100), "{took:?}");
        relay.set(Fault::Cut);
        let (got, _) = roundtrip(relay.addr).await;
        assert_eq!(got, None);
        relay.set(Fault::None);
        assert_eq!(roundtrip(relay.addr).await.0, Some(*b"ping"));
    }
}
