//! Compute shares: the record of one served hop, its canonical bytes, its hash and its
//! Ed25519 signature. Compute nodes sign them; the daemon verifies them.

use anyhow::{Context, Result, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use unfed_proto::ComputeShare;

/// Domain separator: a share signature can never be replayed as another message.
const DOMAIN: &[u8] = b"unfed.v1.compute-share\0";

/// The hash nodes anchor to before the first block exists.
pub const GENESIS: [u8; 32] = [0; 32];

/// Canonical bytes of every signed field: fixed-width big-endian integers and
/// length-prefixed strings/bytes, in field order. Independent of protobuf encoding.
pub fn canonical_bytes(s: &ComputeShare) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(DOMAIN);
    let mut put = |field: &[u8]| {
        b.extend_from_slice(&(field.len() as u32).to_be_bytes());
        b.extend_from_slice(field);
    };
    put(s.node_id.as_bytes());
    put(s.model.as_bytes());
    put(&s.shard_index.to_be_bytes());
    put(&s.shards_total.to_be_bytes());
    put(s.session_id.as_bytes());
    put(&s.step.to_be_bytes());
    put(&s.input_tokens.to_be_bytes());
    put(&s.output_tokens.to_be_bytes());
    put(&s.activation_hash);
    put(&s.timestamp_ms.to_be_bytes());
    put(&s.nonce.to_be_bytes());
    put(&s.prev_share_hash);
    put(&s.chain_tip);
    put(s.client.as_bytes());
    put(&s.voucher);
    b
}

/// The share's identity: sha256 of its canonical bytes (the signature is excluded, so
/// a re-signed copy is the same share).
pub fn share_hash(s: &ComputeShare) -> [u8; 32] {
    Sha256::digest(canonical_bytes(s)).into()
}

/// Signs `share` in place.
pub fn sign(key: &SigningKey, share: &mut ComputeShare) {
    share.signature = key.sign(&canonical_bytes(share)).to_bytes().to_vec();
}

/// Checks the share's signature against `key`.
pub fn verify(key: &VerifyingKey, share: &ComputeShare) -> Result<()> {
    let sig = Signature::from_slice(&share.signature).context("the signature is not 64 bytes")?;
    key.verify(&canonical_bytes(share), &sig)
        .context("the Ed25519 signature does not match the share")
}

/// Parses a hex Ed25519 public key as the registry stores it.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey> {
    let bytes = hex::decode(hex_key.trim_start_matches("0x"))
        .with_context(|| format!("share key {hex_key:?} is not hex"))?;
    let Ok(arr) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        bail!(
            "share key {hex_key:?} is {} bytes, an Ed25519 public key is 32",
            bytes.len()
        );
    };
    VerifyingKey::from_bytes(&arr)
        .with_context(|| format!("share key {hex_key:?} is not a valid Ed25519 point"))
}

/// A fresh share-signing key from the OS random generator.
pub fn generate_key() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

/// Hex of the public half, as registered with the registry.
pub fn public_key_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

/// One served hop, as the compute node reports it (the sink adds identity, links,
/// anchor, time and signature).
#[derive(Debug, Clone)]
pub struct Hop {
    pub session_id: String,
    pub step: u32,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Keyed with the session's billing salt (`voucher::commit`).
    pub activation_hash: [u8; 32],
    /// The session's spending voucher: who pays, and the route the price is split over.
    pub billing: std::sync::Arc<crate::voucher::Billing>,
}

/// Where the sink finds the daemon.
#[derive(Debug, Clone)]
pub enum DaemonSource {
    /// A fixed host:port (`--daemon`).
    Address(String),
    /// The first node of role "daemon" the registry at host:port lists.
    Registry(String),
}

pub struct SinkConfig {
    pub node_id: String,
    pub model: String,
    pub shard_index: u32,
    pub shards_total: u32,
    pub key: SigningKey,
    pub daemon: DaemonSource,
    pub net: crate::net::Net,
    /// Shares per SubmitShares call.
    pub batch: usize,
    /// A partial batch is sent after this long.
    pub flush_every: std::time::Duration,
    /// Keeps undelivered shares on disk here (`share_spool`); `key` must then be the
    /// spool's key so shares from an earlier run still verify.
    pub spool: Option<std::path::PathBuf>,
}

/// What the sink has done, for Health.
#[derive(Debug, Default)]
pub struct SinkCounters {
    /// Shares signed since the node started.
    pub recorded: std::sync::atomic::AtomicU64,
    /// Signed shares the daemon has not acknowledged yet.
    pub pending: std::sync::atomic::AtomicU64,
}

/// Hops waiting in the channel before the sink falls behind; beyond it hops are
/// counted as dropped rather than slowing inference down.
const QUEUE: usize = 65_536;
/// Signed shares kept while the daemon is unreachable.
const BACKLOG: usize = 1_000_000;

/// The compute node's handle: `record` never blocks; a background task signs, batches
/// and submits the shares, retrying until the daemon answers.
#[derive(Clone)]
pub struct ShareSink {
    tx: tokio::sync::mpsc::Sender<Hop>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    counters: std::sync::Arc<SinkCounters>,
}

impl ShareSink {
    /// Starts the submission task (on the current tokio runtime).
    pub fn spawn(cfg: SinkConfig) -> (ShareSink, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let counters = std::sync::Arc::new(SinkCounters::default());
        let task = tokio::spawn(Submitter::new(cfg, counters.clone()).run(rx));
        (
            ShareSink {
                tx,
                dropped: Default::default(),
                counters,
            },
            task,
        )
    }

    /// (shares signed since start, shares not yet acknowledged by a daemon).
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counters.recorded.load(Relaxed),
            self.counters.pending.load(Relaxed),
        )
    }

    pub fn record(&self, hop: Hop) {
        if self.tx.try_send(hop).is_err() {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::error!(
                    dropped = n,
                    "share queue full or closed: hops are not being recorded"
                );
            }
        }
    }
}

struct Submitter {
    cfg: SinkConfig,
    /// Last share hash per session (the next share's prev link).
    links: std::collections::HashMap<String, ([u8; 32], std::time::Instant)>,
    tip: Vec<u8>,
    nonce: u64,
    /// Signed shares and the voucher each one names.
    backlog: std::collections::VecDeque<crate::share_spool::Pending>,
    /// The backlog on disk (its records are the backlog's, in order).
    spool: Option<crate::share_spool::Spool>,
    counters: std::sync::Arc<SinkCounters>,
    daemon: Option<unfed_proto::daemon_client::DaemonClient<tonic::transport::Channel>>,
}

/// Sessions idle this long lose their link state (the KV cache is gone too).
const LINK_IDLE: std::time::Duration = std::time::Duration::from_secs(1800);

impl Submitter {
    fn new(cfg: SinkConfig, counters: std::sync::Arc<SinkCounters>) -> Self {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let (spool, backlog) = match cfg.spool.as_deref().map(crate::share_spool::Spool::open) {
            None => (None, Default::default()),
            Some(Ok((spool, left))) => {
                if !left.is_empty() {
                    tracing::info!(
                        shares = left.len(),
                        "delivering shares an earlier run left in the spool"
                    );
                }
                (Some(spool), left.into())
            }
            Some(Err(e)) => {
                tracing::error!(
                    "the share spool cannot be used, shares are kept in memory only: {e:#}"
                );
                (None, Default::default())
            }
        };
        let sub = Self {
            cfg,
            links: Default::default(),
            tip: GENESIS.to_vec(),
            nonce,
            backlog,
            spool,
            counters,
            daemon: None,
        };
        sub.count_pending();
        sub
    }

    fn count_pending(&self) {
        self.counters.pending.store(
            self.backlog.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Writes the spool again after deliveries (or a dropped share) changed the backlog.
    fn respool(&mut self) {
        if let Some(spool) = &mut self.spool
            && let Err(e) = spool.replace(self.backlog.iter())
        {
            tracing::error!("rewriting the share spool: {e:#}");
        }
        self.count_pending();
    }

    fn sign_hop(&mut self, hop: Hop) {
        let prev = self
            .links
            .get(&hop.session_id)
            .map(|l| l.0.to_vec())
            .unwrap_or_default();
        self.nonce += 1;
        let mut share = ComputeShare {
            node_id: self.cfg.node_id.clone(),
            model: self.cfg.model.clone(),
            shard_index: self.cfg.shard_index,
            shards_total: self.cfg.shards_total,
            session_id: hop.session_id.clone(),
            step: hop.step,
            input_tokens: hop.input_tokens,
            output_tokens: hop.output_tokens,
            activation_hash: hop.activation_hash.to_vec(),
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            nonce: self.nonce,
            prev_share_hash: prev,
            chain_tip: self.tip.clone(),
            client: hop.billing.client.clone(),
            signature: Vec::new(),
            voucher: hop.billing.digest.to_vec(),
        };
        sign(&self.cfg.key, &mut share);
        self.links.insert(
            hop.session_id,
            (share_hash(&share), std::time::Instant::now()),
        );
        if self.backlog.len() >= BACKLOG {
            self.backlog.pop_front();
            tracing::error!(
                "share backlog full (daemon unreachable for long): the oldest share is dropped"
            );
            self.respool();
        }
        let item = (share, hop.billing.voucher.clone());
        if let Some(spool) = &mut self.spool
            && let Err(e) = spool.append(&item)
        {
            tracing::error!("spooling a share: {e:#}");
        }
        self.backlog.push_back(item);
        self.counters
            .recorded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.count_pending();
    }

    /// Connects to the daemon; `Ok(false)` when the registry lists none (a network
    /// without a daemon records no work).
    async fn connect(&mut self) -> Result<bool> {
        if self.daemon.is_some() {
            return Ok(true);
        }
        let (addr, pin) = match &self.cfg.daemon {
            // Given by hand: verified under the CA, not pinned.
            DaemonSource::Address(a) => (a.clone(), None),
            DaemonSource::Registry(r) => {
                let mut c = crate::membership::registry_client(&self.cfg.net, r)?;
                let nodes = c
                    .discover(unfed_proto::DiscoverRequest {
                        model: String::new(),
                    })
                    .await?
                    .into_inner()
                    .nodes;
                match nodes.into_iter().find(|n| n.role == "daemon") {
                    Some(d) => (d.address, crate::net::Pin::parse(&d.tls_pin)?),
                    None => return Ok(false),
                }
            }
        };
        let ch = self
            .cfg
            .net
            .channel_with(&addr, crate::net::REQUEST_TIMEOUT, pin)?;
        self.daemon = Some(
            unfed_proto::daemon_client::DaemonClient::new(ch)
                .max_encoding_message_size(crate::net::limits::DAEMON),
        );
        tracing::info!(daemon = %addr, "submitting compute shares");
        Ok(true)
    }

    /// Sends the backlog, oldest first, and rewrites the spool for what is left.
    async fn flush(&mut self) -> Result<()> {
        let before = self.backlog.len();
        let sent = self.send_backlog().await;
        if self.backlog.len() != before {
            self.respool();
        }
        sent
    }

    /// Sends the oldest batches of the backlog; one leaves the backlog only once
    /// answered. Paid shares wait for a daemon to be listed (again): the session's
    /// voucher was checked by one.
    async fn send_backlog(&mut self) -> Result<()> {
        while !self.backlog.is_empty() {
            if !self.connect().await? {
                bail!(
                    "the registry lists no daemon; {} share(s) wait for one",
                    self.backlog.len()
                );
            }
            let n = self.backlog.len().min(self.cfg.batch.max(1));
            let mut vouchers: Vec<unfed_proto::SpendingVoucher> = Vec::new();
            let mut named = std::collections::HashSet::new();
            let mut shares = Vec::with_capacity(n);
            for (share, voucher) in self.backlog.iter().take(n) {
                if named.insert(share.voucher.clone()) {
                    vouchers.push((**voucher).clone());
                }
                shares.push(share.clone());
            }
            let req = unfed_proto::SubmitSharesRequest {
                submitter: self.cfg.node_id.clone(),
                shares,
                vouchers,
            };
            let resp = match self
                .daemon
                .as_mut()
                .expect("connected")
                .submit_shares(req)
                .await
            {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    // Re-resolve next time: the daemon may have moved.
                    self.daemon = None;
                    bail!("submitting {n} share(s): {}", e.message());
                }
            };
            for r in &resp.results {
                // A replay means an earlier attempt was stored: delivered.
                if !r.accepted && r.reason != "replay" {
                    tracing::warn!(reason = %r.reason, "daemon rejected a share: {}", r.message);
                }
            }
            self.backlog.drain(..n);
            if resp.tip_hash.len() == 32 {
                self.tip = resp.tip_hash;
            }
        }
        Ok(())
    }

    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Hop>) {
        let mut tick = tokio::time::interval(self.cfg.flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        let mut retry_at = tokio::time::Instant::now();
        loop {
            // (channel closed, timer fired)
            let (closed, ticked) = tokio::select! {
                hop = rx.recv() => match hop {
                    Some(h) => { self.sign_hop(h); (false, false) }
                    None => (true, false),
                },
                _ = tick.tick() => (false, true),
            };
            if ticked {
                self.links.retain(|_, (_, used)| used.elapsed() < LINK_IDLE);
            }
            let due = closed || ticked || self.backlog.len() >= self.cfg.batch;
            if due && !self.backlog.is_empty() && tokio::time::Instant::now() >= retry_at {
                match self.flush().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        retry_at = tokio::time::Instant::now()
                            + std::time::Duration::from_millis(200 << failures.min(5));
                        if failures.is_power_of_two() {
                            tracing::warn!(
                                pending = self.backlog.len(),
                                "daemon unreachable, retrying: {e:#}"
                            );
                        }
                    }
                }
            }
            if closed {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ComputeShare {
        ComputeShare {
            node_id: "0xabc".into(),
            model: "m".into(),
            shard_index: 1,
            shards_total: 2,
            session_id: "s".into(),
            step: 3,
            input_tokens: 0,
            output_tokens: 1,
            activation_hash: vec![7; 32],
            timestamp_ms: 1,
            nonce: 9,
            prev_share_hash: vec![1; 32],
            chain_tip: GENESIS.to_vec(),
            client: String::new(),
            signature: Vec::new(),
            voucher: vec![2; 32],
        }
    }

    #[test]
    fn signature_covers_every_field() {
        let key = generate_key();
        let mut s = sample();
        sign(&key, &mut s);
        verify(&key.verifying_key(), &s).unwrap();
        let h = share_hash(&s);
        let mut t = s.clone();
        t.step += 1;
        assert!(verify(&key.verifying_key(), &t).is_err());
        assert_ne!(share_hash(&t), h);
        let mut t = s.clone();
        t.client = "0xdef".into();
        assert!(verify(&key.verifying_key(), &t).is_err());
        let mut t = s.clone();
        t.voucher = vec![3; 32];
        assert!(verify(&key.verifying_key(), &t).is_err());
        // Length prefixes: moving bytes between adjacent fields changes the bytes.
        let (mut a, mut b) = (sample(), sample());
        a.node_id = "ab".into();
        a.model = "c".into();
        b.node_id = "a".into();
        b.model = "bc".into();
        assert_ne!(canonical_bytes(&a), canonical_bytes(&b));
        let other = generate_key();
        assert!(verify(&other.verifying_key(), &s).is_err());
        assert_eq!(
            parse_public_key(&public_key_hex(&key)).unwrap(),
            key.verifying_key()
        );
    }
}
