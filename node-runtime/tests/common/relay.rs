//! A byte-recording TCP relay: it stands at the address a node advertises and forwards
//! every connection to the node, keeping a copy of every byte in both directions, so a
//! test can probe exactly what left the processes.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub address: String,
    target: Arc<OnceLock<String>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    /// Listens on a free loopback port; connections wait until `forward_to` names the
    /// node (which can only start once it knows the relay's address to advertise).
    pub async fn start() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let target: Arc<OnceLock<String>> = Arc::default();
        let bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (t, b) = (target.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (t, b) = (t.clone(), b.clone());
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
                    let to = loop {
                        if let Some(to) = t.get() {
                            break to.clone();
                        }
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "relay never got a target"
                        );
                        tokio::task::yield_now().await;
                    };
                    let Ok(outbound) = TcpStream::connect(&to).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pump(ri, wo, b.clone()), pump(ro, wi, b));
                });
            }
        });
        Relay {
            address,
            target,
            bytes,
        }
    }

    pub fn forward_to(&self, address: &str) {
        self.target.set(address.to_string()).unwrap();
    }

    /// Every byte relayed so far, both directions.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                record.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// How a prompt could appear in captured bytes: windows of 4 token ids (protobuf
/// varints, u32 and u64 little-endian), the first elements of a token's embedding row
/// (f32, f16, bf16, and fixed point at `frac_bits` as u64), and 12-byte runs of the text.
pub struct Probe {
    patterns: Vec<(String, Vec<u8>)>,
}

impl Probe {
    pub fn new(ids: &[u32], rows: &[Vec<f32>], text: &str, frac_bits: u32) -> Self {
        let mut patterns = Vec::new();
        for w in ids.windows(4) {
            let mut varint = Vec::new();
            for id in w {
                let mut v = *id as u64;
                while v >= 0x80 {
                    varint.push((v as u8) | 0x80);
                    v >>= 7;
                }
                varint.push(v as u8);
            }
            patterns.push((format!("ids {w:?} as varints"), varint));
            patterns.push((
                format!("ids {w:?} as u32"),
                w.iter().flat_map(|i| i.to_le_bytes()).collect(),
            ));
            patterns.push((
                format!("ids {w:?} as u64"),
                w.iter().flat_map(|i| (*i as u64).to_le_bytes()).collect(),
            ));
        }
        for (r, row) in rows.iter().enumerate() {
            let head = &row[..4];
            let scale = (1u64 << frac_bits) as f64;
            let encodings: [(&str, Vec<u8>); 4] = [
                ("f32", head.iter().flat_map(|v| v.to_le_bytes()).collect()),
                (
                    "f16",
                    head.iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                ),
                (
                    "bf16",
                    head.iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                ),
                (
                    "fixed point",
                    head.iter()
                        .flat_map(|v| (((*v as f64) * scale).round() as i64 as u64).to_le_bytes())
                        .collect(),
                ),
            ];
            for (name, bytes) in encodings {
                patterns.push((format!("embedding row {r} as {name}"), bytes));
            }
        }
        for w in text.as_bytes().windows(12) {
            patterns.push((
                format!("prompt text {:?}", String::from_utf8_lossy(w)),
                w.to_vec(),
            ));
        }
        Self { patterns }
    }

    /// The patterns found in `bytes` (one pass, patterns indexed by their first 4 bytes:
    /// a private chat moves megabytes).
    pub fn find(&self, bytes: &[u8]) -> Vec<String> {
        let mut by_prefix: std::collections::HashMap<[u8; 4], Vec<usize>> = Default::default();
        for (i, (_, p)) in self.patterns.iter().enumerate() {
            by_prefix
                .entry(p[..4].try_into().unwrap())
                .or_default()
                .push(i);
        }
        let mut found = std::collections::BTreeSet::new();
        for at in 0..bytes.len().saturating_sub(3) {
            let Some(candidates) = by_prefix.get(&bytes[at..at + 4]) else {
                continue;
            };
            for &i in candidates {
                if bytes[at..].starts_with(&self.patterns[i].1) {
                    found.insert(i);
                }
            }
        }
        found
            .into_iter()
            .map(|i| self.patterns[i].0.clone())
            .collect()
    }
}
