//! Settlement: summaries of K blocks priced per token, then the on-chain lifecycle
//! (post → wait for the challenge window → finalize). Failures are recorded on the row
//! and retried with backoff; nothing is dropped. Fraud handling fails closed: nodes the
//! registry excluded are never paid (their entries are cut out and the honest rest is
//! settled), and without any exclusion list from the registry nothing is posted.

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

/// The settler key's connection to the escrow.
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
    /// challenged (posted) or withheld (not yet posted) and re-formed without them.
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
            let result = if s.nodes.iter().any(|n| cheaters.contains(n)) {
                self.refuse_payment(store, &s, cheaters, window_secs).await
            } else {
                self.advance(store, &s, window_secs).await
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
            // A post the deposit cannot cover would revert: park it instead of sending
            // it, and look again (a read, no transaction) after the backoff.
            let total: U256 = s.total.parse().context("settlement total")?;
            let balance = self.chain.client_balance(&self.deployment, client).await?;
            if balance < total {
                let msg = format!(
                    "client {client} holds {balance} in the escrow, the settlement needs {total}; posted once the deposit covers it"
                );
                if s.status != UNDERFUNDED {
                    tracing::warn!(settlement = %hex::encode(s.hash), "{msg}");
                }
                store.lock().expect("store poisoned").settlement_parked(
                    &s.hash,
                    UNDERFUNDED,
                    &msg,
                    now_ms() + backoff(s.attempts),
                )?;
                return Ok(());
            }
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
    /// was posted (the client is refunded), withheld if it was not; either way the
    /// honest nodes' entries are re-formed into a new settlement so they are still paid.
    async fn refuse_payment(
        &self,
        store: &Arc<Mutex<Store>>,
        s: &Settlement,
        cheaters: &BTreeSet<String>,
        window_secs: u64,
    ) -> Result<()> {
        let hash = s.hash.into();
        let on_chain = self.chain.settlement(&self.deployment, hash).await?;
        let window_closed = on_chain.posted_at > 0
            && !on_chain.challenged
            && self.chain.block_timestamp().await? >= on_chain.posted_at + window_secs;
        if window_closed && !on_chain.finalized {
            // Too late to challenge: anyone may finalize it now, so record it as paid.
            tracing::error!(settlement = %hex::encode(s.hash), "a node of this settlement was found guilty after its challenge window closed: it is paid");
            return self.advance(store, s, window_secs).await;
        }
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
        let honest = (status != "finalized")
            .then(|| honest_part(s, cheaters))
            .flatten();
        store.lock().expect("store poisoned").settlement_reformed(
            &s.hash,
            status,
            on_chain.posted_at,
            honest.as_ref(),
        )?;
        let excluded: Vec<&String> = s.nodes.iter().filter(|n| cheaters.contains(*n)).collect();
        tracing::warn!(settlement = %hex::encode(s.hash), nodes = ?excluded, status, honest = ?honest.as_ref().map(|h| hex::encode(h.hash)), "settlement pays a node found guilty of fraud: its honest part is settled anew");
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

/// A settlement the client's deposit cannot cover yet (not sent, re-checked later).
pub const UNDERFUNDED: &str = "underfunded";

/// `s` without the entries of `cheaters`, as a new pending settlement (`None` when
/// nobody honest is left). Its hash commits to the original, so re-forming the same
/// settlement twice yields the same row.
pub fn honest_part(s: &Settlement, cheaters: &BTreeSet<String>) -> Option<Settlement> {
    let (nodes, amounts): (Vec<String>, Vec<String>) = s
        .nodes
        .iter()
        .zip(&s.amounts)
        .filter(|(n, _)| !cheaters.contains(*n))
        .map(|(n, a)| (n.clone(), a.clone()))
        .unzip();
    if nodes.is_empty() {
        return None;
    }
    let total: U256 = amounts.iter().filter_map(|a| a.parse::<U256>().ok()).sum();
    let mut h = Sha256::new();
    h.update(b"unfed.v1.settlement.honest\0");
    h.update(s.hash);
    for n in &nodes {
        h.update(n.as_bytes());
    }
    Some(Settlement {
        hash: h.finalize().into(),
        total: total.to_string(),
        nodes,
        amounts,
        status: "pending".into(),
        attempts: 0,
        last_error: String::new(),
        next_attempt_ms: 0,
        posted_at: 0,
        ..s.clone()
    })
}

/// Nodes the registry excluded after a guilty verdict; an error when it cannot be asked.
async fn cheaters(registry: &crate::membership::RegistryAddr) -> Result<BTreeSet<String>> {
    let mut c = registry.client()?;
    let r = c
        .list_verdicts(unfed_proto::ListVerdictsRequest {})
        .await
        .map_err(|e| anyhow::anyhow!("cannot list verdicts: {}", e.message()))?;
    Ok(r.into_inner().excluded.into_iter().collect())
}

/// The exclusion list to settle against: the registry's, or the last one it gave when
/// it cannot be reached. `None` until the registry answered once.
#[derive(Default)]
struct Exclusions {
    last: Option<BTreeSet<String>>,
    /// Whether the previous refresh failed (to log the change of state once).
    unreachable: bool,
}

impl Exclusions {
    async fn refresh(
        &mut self,
        registry: &crate::membership::RegistryAddr,
    ) -> Option<&BTreeSet<String>> {
        match cheaters(registry).await {
            Ok(list) => {
                if self.unreachable {
                    tracing::info!(
                        excluded = list.len(),
                        "the registry answers again: settling against its exclusion list"
                    );
                }
                self.unreachable = false;
                self.last = Some(list);
            }
            Err(e) => {
                if !self.unreachable {
                    match &self.last {
                        Some(last) => tracing::warn!(
                            excluded = last.len(),
                            "registry unreachable ({e:#}): withholding payment to the nodes it last excluded"
                        ),
                        None => tracing::warn!(
                            "registry unreachable ({e:#}) and no exclusion list known yet: posting no settlement until it answers"
                        ),
                    }
                }
                self.unreachable = true;
            }
        }
        self.last.as_ref()
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
    let mut exclusions = Exclusions::default();
    loop {
        tick.tick().await;
        // Fail closed: without any list of cheaters, paying anyone could pay one.
        let Some(cheaters) = exclusions.refresh(&registry).await else {
            continue;
        };
        if let Err(e) = settler.tick(&store, window, cheaters).await {
            tracing::error!("settlement loop: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cut off from the registry, the settler keeps withholding from the nodes it last
    /// heard were excluded, and settles nothing at all before it ever heard.
    #[tokio::test]
    async fn an_unreachable_registry_fails_closed() {
        // Nothing listens on port 1: every call is refused.
        let registry =
            crate::membership::RegistryAddr::new(&crate::net::Net::plaintext(), "127.0.0.1:1");
        let mut exclusions = Exclusions::default();
        assert_eq!(exclusions.refresh(&registry).await, None);
        let last = BTreeSet::from(["0x00000000000000000000000000000000000000c4".to_string()]);
        exclusions.last = Some(last.clone());
        assert_eq!(exclusions.refresh(&registry).await, Some(&last));
    }

    #[test]
    fn the_honest_part_drops_only_the_cheaters_entries() {
        let s = Settlement {
            hash: [1; 32],
            from_height: 1,
            to_height: 2,
            client: "0xc".into(),
            total: "42".into(),
            nodes: vec!["a".into(), "b".into(), "c".into()],
            amounts: vec!["30".into(), "5".into(), "7".into()],
            status: "posted".into(),
            attempts: 3,
            last_error: "x".into(),
            next_attempt_ms: 9,
            posted_at: 100,
        };
        let h = honest_part(&s, &BTreeSet::from(["a".to_string()])).unwrap();
        assert_eq!(
            (h.nodes.clone(), h.amounts.clone(), h.total.as_str()),
            (
                vec!["b".to_string(), "c".into()],
                vec!["5".to_string(), "7".into()],
                "12"
            )
        );
        assert_eq!(
            (h.status.as_str(), h.attempts, h.posted_at),
            ("pending", 0, 0)
        );
        assert_ne!(h.hash, s.hash);
        assert_eq!(
            honest_part(&s, &BTreeSet::from(["a".to_string()]))
                .unwrap()
                .hash,
            h.hash
        );
        let everyone = ["a", "b", "c"].map(String::from).into_iter().collect();
        assert!(honest_part(&s, &everyone).is_none());
    }
}
