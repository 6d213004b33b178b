//! Settlement: summaries of K blocks priced per token, then the on-chain lifecycle
//! (post → wait for the challenge window → finalize). Failures are recorded on the row
//! and retried with backoff; nothing is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use unfed_chain::{Address, Chain, Deployment, U256};

use super::store::{SettledShare, Settlement, Store};

/// Per-token prices in token units (wei).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: U256,
    pub output: U256,
}

impl Default for Prices {
    /// The original's cluster defaults: 0.0001 per input token, 0.001 per output token.
    fn default() -> Self {
        Self {
            input: U256::from(100_000_000_000_000u64),
            output: U256::from(1_000_000_000_000_000u64),
        }
    }
}

impl Prices {
    /// What `input` prompt tokens and `output` generated tokens cost.
    pub fn cost(&self, input: u64, output: u64) -> U256 {
        U256::from(input) * self.input + U256::from(output) * self.output
    }
}

/// Groups the shares of blocks `from..=to` into one settlement per client, each hop
/// paid what it earned under its voucher. Shares of nodes whose id is not an EVM
/// address cannot be paid and are left out (logged).
pub fn summarize(chain_id: &str, from: u64, to: u64, shares: &[SettledShare]) -> Vec<Settlement> {
    let mut per_client: BTreeMap<Address, BTreeMap<Address, U256>> = BTreeMap::new();
    let mut unpaid = 0usize;
    for s in shares {
        let (Ok(client), Ok(node)) = (s.client.parse::<Address>(), s.node_id.parse::<Address>())
        else {
            unpaid += 1;
            continue;
        };
        *per_client
            .entry(client)
            .or_default()
            .entry(node)
            .or_default() += s.amount;
    }
    if unpaid > 0 {
        tracing::warn!(
            shares = unpaid,
            from,
            to,
            "shares without a payable node address or client are not settled"
        );
    }
    per_client
        .into_iter()
        .filter_map(|(client, nodes)| {
            let nodes: Vec<(Address, U256)> =
                nodes.into_iter().filter(|(_, a)| !a.is_zero()).collect();
            if nodes.is_empty() {
                return None;
            }
            let total: U256 = nodes.iter().map(|(_, a)| *a).sum();
            let mut h = Sha256::new();
            h.update(b"unfed.v1.settlement\0");
            h.update(chain_id.as_bytes());
            h.update(from.to_be_bytes());
            h.update(to.to_be_bytes());
            h.update(client.as_slice());
            for (n, a) in &nodes {
                h.update(n.as_slice());
                h.update(a.to_be_bytes::<32>());
            }
            Some(Settlement {
                hash: h.finalize().into(),
                from_height: from,
                to_height: to,
                client: client.to_string(),
                total: total.to_string(),
                nodes: nodes.iter().map(|(n, _)| n.to_string()).collect(),
                amounts: nodes.iter().map(|(_, a)| a.to_string()).collect(),
                status: "pending".into(),
                attempts: 0,
                last_error: String::new(),
                next_attempt_ms: 0,
                posted_at: 0,
            })
        })
        .collect()
}

/// The operator's connection to the escrow.
pub struct Settler {
    pub chain: Chain,
    pub deployment: Deployment,
}

fn now_ms() -> u64 {
    super::now_ms()
}

/// Retry delay after `attempts` failures: 1 s doubling to 60 s.
fn backoff(attempts: u32) -> u64 {
    1000u64.saturating_mul(1 << attempts.min(6)).min(60_000)
}

impl Settler {
    /// Advances every unfinished settlement by one step. Errors are recorded on the
    /// row (and logged as errors) and retried later.
    /// `cheaters`: nodes the registry found guilty; a settlement paying one is
    /// challenged (posted) or withheld (not yet posted) instead of paid.
    pub async fn tick(
        &self,
        store: &Arc<Mutex<Store>>,
        window_secs: u64,
        cheaters: &BTreeSet<String>,
    ) -> Result<()> {
        let rows = store.lock().expect("store poisoned").settlements()?;
        for s in rows
            .into_iter()
            .filter(|s| !DONE.contains(&s.status.as_str()) && s.next_attempt_ms <= now_ms())
        {
            let result = match s.nodes.iter().find(|n| cheaters.contains(*n)) {
                Some(cheater) => self.refuse_payment(store, &s, cheater).await,
                None => self.advance(store, &s, window_secs).await,
            };
            if let Err(e) = result {
                let msg = format!("{e:#}");
                tracing::error!(settlement = %hex::encode(s.hash), attempts = s.attempts + 1, "settlement step failed, will retry: {msg}");
                store.lock().expect("store poisoned").settlement_failed(
                    &s.hash,
                    &msg,
                    now_ms() + backoff(s.attempts),
                )?;
            }
        }
        Ok(())
    }

    async fn advance(
        &self,
        store: &Arc<Mutex<Store>>,
        s: &Settlement,
        window_secs: u64,
    ) -> Result<()> {
        let hash = s.hash.into();
        // The chain is the truth: a post or finalize whose receipt we never recorded
        // (crash, timeout) is picked up here instead of being sent twice.
        let on_chain = self.chain.settlement(&self.deployment, hash).await?;
        if on_chain.finalized {
            store.lock().expect("store poisoned").settlement_advanced(
                &s.hash,
                "finalized",
                on_chain.posted_at,
            )?;
            tracing::info!(settlement = %hex::encode(s.hash), total = %s.total, "settlement finalized");
            return Ok(());
        }
        if on_chain.challenged {
            // Final: the client was refunded and nobody is paid; stop retrying.
            store.lock().expect("store poisoned").settlement_advanced(
                &s.hash,
                "challenged",
                on_chain.posted_at,
            )?;
            tracing::warn!(settlement = %hex::encode(s.hash), "settlement was challenged on-chain: the client is refunded, nobody is paid");
            return Ok(());
        }
        if on_chain.posted_at == 0 {
            let client: Address = s.client.parse().context("settlement client")?;
            let nodes = s
                .nodes
                .iter()
                .map(|n| n.parse::<Address>())
                .collect::<Result<Vec<_>, _>>()
                .context("settlement node")?;
            let amounts = s
                .amounts
                .iter()
                .map(|a| a.parse::<U256>())
                .collect::<Result<Vec<_>, _>>()
                .context("settlement amount")?;
            self.chain
                .post_settlement(&self.deployment, hash, client, nodes, amounts)
                .await?;
            let posted = self.chain.settlement(&self.deployment, hash).await?;
            store.lock().expect("store poisoned").settlement_advanced(
                &s.hash,
                "posted",
                posted.posted_at,
            )?;
            tracing::info!(settlement = %hex::encode(s.hash), client = %s.client, total = %s.total, "settlement posted");
            return Ok(());
        }
        if s.status != "posted" {
            store.lock().expect("store poisoned").settlement_advanced(
                &s.hash,
                "posted",
                on_chain.posted_at,
            )?;
        }
        let chain_now = self
            .chain
            .block_timestamp()
            .await?
            .max(super::now_ms() / 1000);
        if chain_now >= on_chain.posted_at + window_secs {
            self.chain
                .finalize_settlement(&self.deployment, hash)
                .await?;
            store.lock().expect("store poisoned").settlement_advanced(
                &s.hash,
                "finalized",
                on_chain.posted_at,
            )?;
            tracing::info!(settlement = %hex::encode(s.hash), total = %s.total, "settlement finalized");
        }
        Ok(())
    }

    /// A settlement that pays a node found guilty of fraud: challenged on-chain if it
    /// was posted (the client is refunded), withheld if it was not.
    async fn refuse_payment(
        &self,
        store: &Arc<Mutex<Store>>,
        s: &Settlement,
        cheater: &str,
    ) -> Result<()> {
        let hash = s.hash.into();
        let on_chain = self.chain.settlement(&self.deployment, hash).await?;
        let status = if on_chain.finalized {
            // Too late to stop: record it as paid.
            "finalized"
        } else if on_chain.posted_at == 0 {
            "withheld"
        } else {
            if !on_chain.challenged {
                self.chain
                    .challenge_settlement(&self.deployment, hash)
                    .await?;
            }
            "challenged"
        };
        store.lock().expect("store poisoned").settlement_advanced(
            &s.hash,
            status,
            on_chain.posted_at,
        )?;
        tracing::warn!(settlement = %hex::encode(s.hash), node = cheater, status, "settlement pays a node found guilty of fraud");
        Ok(())
    }

    /// The escrow's challenge window in seconds.
    pub async fn challenge_window(&self) -> Result<u64> {
        let w = self
            .chain
            .escrow(&self.deployment)
            .challengeWindow()
            .call()
            .await
            .context("reading the escrow's challengeWindow")?;
        Ok(w.to::<u64>())
    }
}

/// Settlement statuses that need no further chain step.
const DONE: [&str; 3] = ["finalized", "challenged", "withheld"];

/// Nodes the registry excluded after a guilty verdict (empty if it cannot be asked).
async fn cheaters(registry: &crate::membership::RegistryAddr) -> BTreeSet<String> {
    let Ok(mut c) = registry.client() else {
        return BTreeSet::new();
    };
    match c.list_verdicts(unfed_proto::ListVerdictsRequest {}).await {
        Ok(r) => r.into_inner().excluded.into_iter().collect(),
        Err(e) => {
            tracing::debug!("cannot list verdicts: {}", e.message());
            BTreeSet::new()
        }
    }
}

/// Runs the settler until the process stops, every `poll`.
pub async fn run(
    settler: Settler,
    store: Arc<Mutex<Store>>,
    poll: Duration,
    registry: crate::membership::RegistryAddr,
) {
    let window = loop {
        match settler.challenge_window().await {
            Ok(w) => break w,
            Err(e) => {
                tracing::error!("cannot read the escrow's challenge window, retrying: {e:#}");
                tokio::time::sleep(poll).await;
            }
        }
    };
    let mut tick = tokio::time::interval(poll);
    loop {
        tick.tick().await;
        let cheaters = cheaters(&registry).await;
        if let Err(e) = settler.tick(&store, window, &cheaters).await {
            tracing::error!("settlement loop: {e:#}");
        }
    }
}
