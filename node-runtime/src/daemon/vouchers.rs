//! Spending vouchers at the daemon: which voucher a share is billed under, whether it
//! stays within the voucher's caps, what the hop earns (the step's price split over the
//! voucher's route), and what a client already owes.

use std::collections::HashMap;

use anyhow::{Context, Result};
use rusqlite::{OptionalExtension, params};
use unfed_chain::voucher::{SignedVoucher, session_hash};
use unfed_chain::{Address, U256};
use unfed_proto::ComputeShare;

use super::store::{Placement, Store};
use super::validate::Reject;
use crate::voucher::Terms;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vouchers (
    digest BLOB PRIMARY KEY,
    client TEXT NOT NULL,
    nonce TEXT NOT NULL,
    -- keccak of the delegation's text; NULL when the client signed the voucher itself.
    delegation BLOB,
    body BLOB NOT NULL,
    UNIQUE (client, nonce)
);
CREATE INDEX IF NOT EXISTS vouchers_by_delegation ON vouchers(delegation);
";

/// What one hop at `index` of `len` earns for a step costing `price`: an even split,
/// the division remainder to the last hop, so a step's hops sum to its price.
pub fn hop_amount(price: U256, index: u32, len: u32) -> U256 {
    let n = U256::from(len.max(1));
    let base = price / n;
    if index + 1 == len {
        base + price % n
    } else {
        base
    }
}

fn sum(mut amounts: impl Iterator<Item = rusqlite::Result<String>>) -> Result<U256> {
    amounts.try_fold(U256::ZERO, |acc, a| {
        Ok(acc + a?.parse::<U256>().context("a stored share amount")?)
    })
}

impl Store {
    pub fn voucher(&self, digest: &[u8]) -> Result<Option<unfed_proto::SpendingVoucher>> {
        let body: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT body FROM vouchers WHERE digest = ?1",
                [digest],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| {
            <unfed_proto::SpendingVoucher as prost::Message>::decode(b.as_slice())
                .context("a stored voucher")
        })
        .transpose()
    }

    /// The digest of the voucher `client` signed with `nonce`, if one is stored.
    fn voucher_with_nonce(&self, client: &str, nonce: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row(
                "SELECT digest FROM vouchers WHERE client = ?1 AND nonce = ?2",
                params![client, nonce.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn insert_voucher(
        &self,
        digest: &[u8; 32],
        v: &SignedVoucher,
        body: &unfed_proto::SpendingVoucher,
    ) -> Result<()> {
        let delegation = v
            .delegation
            .as_ref()
            .map(|d| d.id(v.chain_id, v.escrow).to_vec());
        self.conn.execute(
            "INSERT OR IGNORE INTO vouchers(digest, client, nonce, delegation, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &digest[..],
                v.voucher.client.to_string(),
                v.voucher.nonce.to_string(),
                delegation,
                prost::Message::encode_to_vec(body)
            ],
        )?;
        Ok(())
    }

    /// Prompt rows and tokens `node` billed under a voucher.
    fn usage(&self, digest: &[u8], node: &str) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0) FROM shares WHERE voucher = ?1 AND node_id = ?2",
            params![digest, node],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// What every hop billed under a voucher.
    fn spent(&self, digest: &[u8]) -> Result<U256> {
        let mut st = self
            .conn
            .prepare_cached("SELECT amount FROM shares WHERE voucher = ?1")?;
        sum(st.query_map([digest], |r| r.get(0))?)
    }

    /// What every voucher under a delegation billed.
    fn spent_under_delegation(&self, id: &[u8]) -> Result<U256> {
        let mut st = self.conn.prepare_cached(
            "SELECT s.amount FROM shares s JOIN vouchers v ON s.voucher = v.digest WHERE v.delegation = ?1",
        )?;
        sum(st.query_map([id], |r| r.get(0))?)
    }

    /// What `client` owes for accepted work not yet posted on-chain: shares not yet
    /// summarised, and summaries still pending.
    pub fn owed(&self, client: &str) -> Result<U256> {
        let settled = self.settled_height()?;
        let mut st = self.conn.prepare_cached(
            "SELECT amount FROM shares WHERE client = ?1 AND (block_height IS NULL OR block_height > ?2)",
        )?;
        let unsummarised = sum(st.query_map(params![client, settled], |r| r.get(0))?)?;
        let mut st = self.conn.prepare_cached(
            "SELECT total FROM settlements WHERE client = ?1 AND status = 'pending'",
        )?;
        Ok(unsummarised + sum(st.query_map([client], |r| r.get(0))?)?)
    }

    /// Whether a voucher has billed anything yet.
    pub fn voucher_used(&self, digest: &[u8]) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM shares WHERE voucher = ?1 LIMIT 1",
                [digest],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}

/// One node's work under one voucher, by settlement outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Earned {
    pub voucher: Vec<u8>,
    pub client: String,
    pub node_id: String,
    pub shares: u64,
    pub paid: U256,
    pub pending: U256,
    pub withheld: U256,
}

impl Store {
    /// What each node earned under each of the newest `limit` vouchers.
    pub fn voucher_earnings(&self, limit: u32) -> Result<Vec<Earned>> {
        let settlements = self.settlements()?;
        let mut st = self.conn.prepare(
            "SELECT voucher, node_id, client, block_height, amount FROM shares
             WHERE voucher IN (SELECT voucher FROM shares GROUP BY voucher ORDER BY MAX(seq) DESC LIMIT ?1)
             ORDER BY voucher, node_id, seq",
        )?;
        let rows = st.query_map([limit], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<u64>>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out: Vec<Earned> = Vec::new();
        for row in rows {
            let (voucher, node, client, height, amount) = row?;
            let amount: U256 = amount.parse().context("a stored share amount")?;
            // The settlements of the share's blocks for its client; a re-formed honest
            // part sits beside the original, so the live one naming the node decides.
            let covering: Vec<_> = settlements
                .iter()
                .filter(|s| {
                    height.is_some_and(|h| (s.from_height..=s.to_height).contains(&h))
                        && s.client.eq_ignore_ascii_case(&client)
                })
                .collect();
            let naming = covering.iter().rev().find(|s| {
                s.nodes.iter().any(|n| n.eq_ignore_ascii_case(&node))
                    && !matches!(s.status.as_str(), "challenged" | "withheld")
            });
            if out
                .last()
                .is_none_or(|e| e.voucher != voucher || e.node_id != node)
            {
                out.push(Earned {
                    voucher: voucher.clone(),
                    client: client.clone(),
                    node_id: node.clone(),
                    ..Default::default()
                });
            }
            let e = out.last_mut().expect("pushed above");
            e.shares += 1;
            match naming {
                Some(s) if s.status == "finalized" => e.paid += amount,
                Some(_) => e.pending += amount,
                // Summarised, but no live settlement pays this node: withheld.
                None if !covering.is_empty() => e.withheld += amount,
                None => e.pending += amount,
            }
        }
        Ok(out)
    }
}

fn fail(
    r: Reject,
    msg: impl Into<String>,
) -> Result<std::result::Result<Placement, (Reject, String)>> {
    Ok(Err((r, msg.into())))
}

/// A voucher's own validity for this daemon: signatures and domain.
pub fn check_terms(v: &SignedVoucher, terms: &Terms) -> std::result::Result<(), String> {
    v.verify().map_err(|e| format!("{e:#}"))?;
    if (v.chain_id, v.escrow) != (terms.chain_id, terms.escrow) {
        return Err(format!(
            "the voucher is for escrow {} on chain {}; this daemon settles on escrow {} on chain {}",
            v.escrow, v.chain_id, terms.escrow, terms.chain_id
        ));
    }
    Ok(())
}

/// The voucher checks of one share, in order: named, submitted, valid here, for this
/// share's session and node, unexpired, not a replayed nonce, within its caps. On
/// success the voucher is stored and the share's placement returned.
pub fn check(
    store: &Store,
    s: &ComputeShare,
    submitted: &HashMap<[u8; 32], unfed_proto::SpendingVoucher>,
    terms: Option<&Terms>,
) -> Result<std::result::Result<Placement, (Reject, String)>> {
    let Ok(digest) = <[u8; 32]>::try_from(s.voucher.as_slice()) else {
        return fail(
            Reject::NoVoucher,
            "the share names no spending voucher: work is paid only under one",
        );
    };
    let Some(terms) = terms else {
        return fail(
            Reject::BadVoucher,
            "this daemon settles on no chain, so it can accept no voucher (start it with --chain-rpc and --escrow)",
        );
    };
    let body = match submitted.get(&digest) {
        Some(b) => b.clone(),
        None => match store.voucher(&digest)? {
            Some(b) => b,
            None => {
                return fail(
                    Reject::NoVoucher,
                    format!(
                        "voucher {} was never submitted with a share",
                        hex::encode(digest)
                    ),
                );
            }
        },
    };
    let v = match crate::voucher::from_proto(&body) {
        Ok(v) if v.digest().0 == digest => v,
        Ok(_) => {
            return fail(
                Reject::BadVoucher,
                "the submitted voucher is not the one the share names",
            );
        }
        Err(e) => return fail(Reject::BadVoucher, format!("{e:#}")),
    };
    if let Err(e) = check_terms(&v, terms) {
        return fail(Reject::BadVoucher, e);
    }
    let t = &v.voucher;
    if t.session != session_hash(&s.session_id) || t.model != s.model {
        return fail(
            Reject::VoucherMismatch,
            "the voucher is for another session or model",
        );
    }
    if s.client.parse::<Address>().ok() != Some(t.client) {
        return fail(
            Reject::VoucherMismatch,
            format!(
                "the share bills {:?}, the voucher's client is {}",
                s.client, t.client
            ),
        );
    }
    let Some(index) = t.route.iter().position(|n| *n == s.node_id) else {
        return fail(
            Reject::VoucherMismatch,
            format!("the voucher's route does not name node {}", s.node_id),
        );
    };
    if s.timestamp_ms / 1000 > t.expiry {
        return fail(
            Reject::VoucherExpired,
            "the share is dated after the voucher's expiry",
        );
    }
    if let Some(other) = store.voucher_with_nonce(&t.client.to_string(), t.nonce)?
        && other != digest
    {
        return fail(
            Reject::VoucherReplay,
            format!(
                "client {} already used nonce {} for another voucher",
                t.client, t.nonce
            ),
        );
    }
    let (used_in, used_out) = store.usage(&digest, &s.node_id)?;
    if used_in + u64::from(s.input_tokens) > u64::from(t.maxInputTokens)
        || used_out + u64::from(s.output_tokens) > u64::from(t.maxOutputTokens)
    {
        return fail(
            Reject::VoucherCap,
            format!(
                "the voucher covers {} prompt rows and {} tokens per hop; node {} already billed {used_in} and {used_out}",
                t.maxInputTokens, t.maxOutputTokens, s.node_id
            ),
        );
    }
    let len = t.route.len() as u32;
    let price = terms.cost(s.input_tokens.into(), s.output_tokens.into());
    let amount = hop_amount(price, index as u32, len);
    // The voucher's own cap, then its delegation's (spent over all its vouchers).
    let mut caps = vec![("voucher", t.maxSpend, store.spent(&digest)?)];
    if let Some(d) = &v.delegation {
        let id = d.id(v.chain_id, v.escrow);
        caps.push((
            "delegation",
            d.max_spend,
            store.spent_under_delegation(id.as_slice())?,
        ));
    }
    if let Some((what, cap, spent)) = caps
        .into_iter()
        .find(|(_, cap, spent)| *spent + amount > *cap)
    {
        return fail(
            Reject::VoucherCap,
            format!("the {what}'s spend cap {cap} would be exceeded ({spent} billed)"),
        );
    }
    store.insert_voucher(&digest, &v, &body)?;
    Ok(Ok(Placement {
        voucher: digest,
        route_index: index as u32,
        route_len: len,
        amount,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_of_a_step_sum_to_its_price() {
        let price = U256::from(47);
        let total: U256 = (0..3).map(|i| hop_amount(price, i, 3)).sum();
        assert_eq!(total, price);
        assert_eq!(hop_amount(price, 0, 3), U256::from(15));
        assert_eq!(hop_amount(price, 2, 3), U256::from(17));
    }
}
