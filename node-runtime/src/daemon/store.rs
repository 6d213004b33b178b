//! The share chain on disk: SQLite in WAL mode with four tables (meta, shares, blocks,
//! settlements). Every accepted share is committed before the daemon answers, so a
//! crash at any point loses nothing that was acknowledged and a restart resumes from
//! exactly what is on disk.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use sha2::{Digest, Sha256};
use unfed_proto::ComputeShare;

use crate::shares::GENESIS;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shares (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hash BLOB NOT NULL UNIQUE,
    node_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    shard_index INTEGER NOT NULL,
    shards_total INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    client TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    block_height INTEGER,
    body BLOB NOT NULL,
    -- The session's spending voucher, this hop's place on its route, and what the hop
    -- earns (token units, decimal): fixed at acceptance from the voucher and the prices.
    voucher BLOB NOT NULL,
    route_index INTEGER NOT NULL,
    route_len INTEGER NOT NULL,
    amount TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS shares_by_voucher ON shares(voucher, node_id);
CREATE INDEX IF NOT EXISTS shares_by_client ON shares(client, block_height);
CREATE INDEX IF NOT EXISTS shares_by_session ON shares(node_id, session_id, seq);
CREATE INDEX IF NOT EXISTS shares_by_node_time ON shares(node_id, received_ms);
CREATE INDEX IF NOT EXISTS shares_by_block ON shares(block_height);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    prev_hash BLOB NOT NULL,
    shares_root BLOB NOT NULL,
    share_count INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settlements (
    hash BLOB PRIMARY KEY,
    from_height INTEGER NOT NULL,
    to_height INTEGER NOT NULL,
    client TEXT NOT NULL,
    total TEXT NOT NULL,
    nodes TEXT NOT NULL,
    amounts TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    posted_at INTEGER NOT NULL DEFAULT 0
);
";

/// A block as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub height: u64,
    pub hash: [u8; 32],
    pub prev_hash: [u8; 32],
    pub shares_root: [u8; 32],
    pub share_count: u64,
    pub timestamp_ms: u64,
}

impl Block {
    /// The block's hash commits to its height, parent, shares and time.
    pub fn compute_hash(
        height: u64,
        prev: &[u8; 32],
        root: &[u8; 32],
        count: u64,
        ts: u64,
    ) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"unfed.v1.block\0");
        h.update(height.to_be_bytes());
        h.update(prev);
        h.update(root);
        h.update(count.to_be_bytes());
        h.update(ts.to_be_bytes());
        h.finalize().into()
    }
}

/// The newest (hash, height) of the chain; genesis is (zeros, 0).
pub type Tip = ([u8; 32], u64);

/// What the validator needs to know about a node's previous share in a session.
pub struct LastShare {
    pub hash: [u8; 32],
    pub step: u32,
    pub count: u64,
}

/// One settlement row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub hash: [u8; 32],
    pub from_height: u64,
    pub to_height: u64,
    pub client: String,
    /// Wei, decimal.
    pub total: String,
    pub nodes: Vec<String>,
    pub amounts: Vec<String>,
    pub status: String,
    pub attempts: u32,
    pub last_error: String,
    pub next_attempt_ms: u64,
    pub posted_at: u64,
}

/// Accepted shares and tokens of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTotals {
    pub node_id: String,
    pub shares: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A share counted by a settlement.
pub struct SettledShare {
    pub node_id: String,
    pub client: String,
    /// What the hop earns, token units.
    pub amount: unfed_chain::U256,
}

/// Where a voucher puts an accepted share: its route position and its earnings.
pub struct Placement {
    pub voucher: [u8; 32],
    pub route_index: u32,
    pub route_len: u32,
    pub amount: unfed_chain::U256,
}

pub struct Store {
    pub(super) conn: Connection,
}

fn to32(v: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    <[u8; 32]>::try_from(v.as_slice()).map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob)
    })
}

impl Store {
    /// Opens (or creates) the chain db at `path` in WAL mode.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the directory of --db {}", path.display())
            })?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the chain db {}", path.display()))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "{} cannot use WAL journaling (got {mode}); put --db on a local disk",
            path.display()
        );
        // FULL: a commit is on disk before the daemon acknowledges the shares in it.
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        conn.execute_batch(SCHEMA)
            .and_then(|()| conn.execute_batch(super::vouchers::SCHEMA))
            .with_context(|| {
                format!(
                    "{} is not a chain db this daemon can use (schema creation failed; a db of a version before spending vouchers: move it aside)",
                    path.display()
                )
            })?;
        let store = Self { conn };
        if store.meta("chain_id")?.is_none() {
            store.set_meta("chain_id", &hex::encode(rand::random::<[u8; 16]>()))?;
        }
        Ok(store)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])?;
        Ok(())
    }

    /// Random id of this share chain, mixed into settlement hashes so that two chains
    /// settling on one escrow never collide.
    pub fn chain_id(&self) -> Result<String> {
        self.meta("chain_id")?.context("chain db has no chain_id")
    }

    pub fn tip(&self) -> Result<Tip> {
        let row = self
            .conn
            .query_row(
                "SELECT hash, height FROM blocks ORDER BY height DESC LIMIT 1",
                [],
                |r| Ok((to32(r.get(0)?)?, r.get::<_, u64>(1)?)),
            )
            .optional()?;
        Ok(row.unwrap_or((GENESIS, 0)))
    }

    pub fn block_exists(&self, hash: &[u8]) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM blocks WHERE hash = ?1", [hash], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub fn share_exists(&self, hash: &[u8; 32]) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM shares WHERE hash = ?1", [&hash[..]], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    pub fn last_share(&self, node: &str, session: &str) -> Result<Option<LastShare>> {
        let last = self
            .conn
            .query_row(
                "SELECT hash, step FROM shares WHERE node_id = ?1 AND session_id = ?2 ORDER BY seq DESC LIMIT 1",
                [node, session],
                |r| Ok((to32(r.get(0)?)?, r.get::<_, u32>(1)?)),
            )
            .optional()?;
        let Some((hash, step)) = last else {
            return Ok(None);
        };
        let count = self.conn.query_row(
            "SELECT COUNT(*) FROM shares WHERE node_id = ?1 AND session_id = ?2",
            [node, session],
            |r| r.get(0),
        )?;
        Ok(Some(LastShare { hash, step, count }))
    }

    pub fn shares_since(&self, node: &str, since_ms: u64) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM shares WHERE node_id = ?1 AND received_ms >= ?2",
            params![node, since_ms],
            |r| r.get(0),
        )?)
    }

    /// Runs `f` in one transaction (a batch of shares is validated and stored atomically).
    pub fn transaction<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let tx = self.conn.unchecked_transaction()?;
        let out = f(self)?;
        tx.commit().context("committing to the chain db")?;
        Ok(out)
    }

    pub fn insert_share(
        &self,
        hash: &[u8; 32],
        s: &ComputeShare,
        received_ms: u64,
        at: &Placement,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO shares(hash, node_id, session_id, step, shard_index, shards_total, input_tokens, output_tokens, client, received_ms, body, voucher, route_index, route_len, amount)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                &hash[..],
                s.node_id,
                s.session_id,
                s.step,
                s.shard_index,
                s.shards_total,
                s.input_tokens,
                s.output_tokens,
                s.client,
                received_ms,
                prost::Message::encode_to_vec(s),
                &at.voucher[..],
                at.route_index,
                at.route_len,
                at.amount.to_string()
            ],
        )?;
        Ok(())
    }

    /// Packs every pending share into a new block on top of the tip; `None` when
    /// nothing is pending (no empty blocks).
    pub fn produce_block(&mut self, now_ms: u64) -> Result<Option<Block>> {
        let tx = self.conn.transaction()?;
        let pending: Vec<(i64, [u8; 32])> = {
            let mut st =
                tx.prepare("SELECT seq, hash FROM shares WHERE block_height IS NULL ORDER BY seq")?;
            st.query_map([], |r| Ok((r.get(0)?, to32(r.get(1)?)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        if pending.is_empty() {
            return Ok(None);
        }
        let (prev, height) = tip_in(&tx)?;
        let mut root = Sha256::new();
        for (_, h) in &pending {
            root.update(h);
        }
        let root: [u8; 32] = root.finalize().into();
        let height = height + 1;
        let count = pending.len() as u64;
        let hash = Block::compute_hash(height, &prev, &root, count, now_ms);
        tx.execute(
            "INSERT INTO blocks(height, hash, prev_hash, shares_root, share_count, timestamp_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![height, &hash[..], &prev[..], &root[..], count, now_ms],
        )?;
        let last_seq = pending.last().map(|p| p.0).unwrap_or(0);
        tx.execute(
            "UPDATE shares SET block_height = ?1 WHERE block_height IS NULL AND seq <= ?2",
            params![height, last_seq],
        )?;
        tx.commit()?;
        Ok(Some(Block {
            height,
            hash,
            prev_hash: prev,
            shares_root: root,
            share_count: count,
            timestamp_ms: now_ms,
        }))
    }

    pub fn blocks(&self) -> Result<Vec<Block>> {
        self.query_blocks("ORDER BY height")
    }

    /// The newest `limit` blocks, newest first.
    pub fn recent_blocks(&self, limit: u32) -> Result<Vec<Block>> {
        self.query_blocks(&format!("ORDER BY height DESC LIMIT {limit}"))
    }

    fn query_blocks(&self, order: &str) -> Result<Vec<Block>> {
        let mut st = self.conn.prepare(&format!("SELECT height, hash, prev_hash, shares_root, share_count, timestamp_ms FROM blocks {order}"))?;
        let rows = st.query_map([], |r| {
            Ok(Block {
                height: r.get(0)?,
                hash: to32(r.get(1)?)?,
                prev_hash: to32(r.get(2)?)?,
                shares_root: to32(r.get(3)?)?,
                share_count: r.get(4)?,
                timestamp_ms: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Hashes of the shares of block `height`, in order.
    pub fn block_share_hashes(&self, height: u64) -> Result<Vec<[u8; 32]>> {
        let mut st = self
            .conn
            .prepare("SELECT hash FROM shares WHERE block_height = ?1 ORDER BY seq")?;
        let rows = st.query_map([height], |r| to32(r.get(0)?))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn share_counts(&self) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COUNT(*) - COUNT(block_height) FROM shares",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    pub fn node_totals(&self) -> Result<Vec<NodeTotals>> {
        let mut st = self
            .conn
            .prepare("SELECT node_id, COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM shares GROUP BY node_id ORDER BY node_id")?;
        let rows = st.query_map([], |r| {
            Ok(NodeTotals {
                node_id: r.get(0)?,
                shares: r.get(1)?,
                input_tokens: r.get(2)?,
                output_tokens: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Height up to which blocks have been summarised into settlements.
    pub fn settled_height(&self) -> Result<u64> {
        Ok(self
            .meta("settled_height")?
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(0))
    }

    pub fn shares_in_blocks(&self, from: u64, to: u64) -> Result<Vec<SettledShare>> {
        let mut st = self.conn.prepare(
            "SELECT node_id, client, amount FROM shares
             WHERE block_height BETWEEN ?1 AND ?2 ORDER BY seq",
        )?;
        let rows = st.query_map([from, to], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|r| {
            let (node_id, client, amount) = r?;
            Ok(SettledShare {
                node_id,
                client,
                amount: amount.parse().context("a stored share amount")?,
            })
        })
        .collect()
    }

    /// Records the summaries of blocks `..=to` and advances the settled height, atomically.
    pub fn record_settlements(&mut self, to: u64, rows: &[Settlement]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for s in rows {
            insert_settlement(&tx, s)?;
        }
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('settled_height', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [to.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn settlements(&self) -> Result<Vec<Settlement>> {
        let mut st = self.conn.prepare(
            "SELECT hash, from_height, to_height, client, total, nodes, amounts, status, attempts, last_error, next_attempt_ms, posted_at
             FROM settlements ORDER BY to_height, client",
        )?;
        let rows = st.query_map([], |r| {
            let nodes: String = r.get(5)?;
            let amounts: String = r.get(6)?;
            Ok(Settlement {
                hash: to32(r.get(0)?)?,
                from_height: r.get(1)?,
                to_height: r.get(2)?,
                client: r.get(3)?,
                total: r.get(4)?,
                nodes: serde_json::from_str(&nodes).unwrap_or_default(),
                amounts: serde_json::from_str(&amounts).unwrap_or_default(),
                status: r.get(7)?,
                attempts: r.get(8)?,
                last_error: r.get(9)?,
                next_attempt_ms: r.get(10)?,
                posted_at: r.get(11)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Moves a settlement to `status` (clearing its error) after a successful chain step.
    pub fn settlement_advanced(&self, hash: &[u8; 32], status: &str, posted_at: u64) -> Result<()> {
        advance_in(&self.conn, hash, status, posted_at)
    }

    /// Parks a settlement in `status` (e.g. underfunded) with `why`, to be looked at
    /// again at `retry_at_ms`; not a failure, so attempts do not grow.
    pub fn settlement_parked(
        &self,
        hash: &[u8; 32],
        status: &str,
        why: &str,
        retry_at_ms: u64,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE settlements SET status = ?2, last_error = ?3, next_attempt_ms = ?4 WHERE hash = ?1",
            params![&hash[..], status, why, retry_at_ms],
        )?;
        Ok(())
    }

    /// Closes a settlement that paid a cheater in `status` and, atomically, records its
    /// honest part (if any) as a new pending settlement.
    pub fn settlement_reformed(
        &mut self,
        hash: &[u8; 32],
        status: &str,
        posted_at: u64,
        honest: Option<&Settlement>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        advance_in(&tx, hash, status, posted_at)?;
        if let Some(h) = honest {
            insert_settlement(&tx, h)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a failed attempt; the settlement stays in its status and is retried at `retry_at_ms`.
    pub fn settlement_failed(&self, hash: &[u8; 32], error: &str, retry_at_ms: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE settlements SET attempts = attempts + 1, last_error = ?2, next_attempt_ms = ?3 WHERE hash = ?1",
            params![&hash[..], error, retry_at_ms],
        )?;
        Ok(())
    }
}

fn tip_in(tx: &Transaction) -> Result<Tip> {
    let row = tx
        .query_row(
            "SELECT hash, height FROM blocks ORDER BY height DESC LIMIT 1",
            [],
            |r| Ok((to32(r.get(0)?)?, r.get::<_, u64>(1)?)),
        )
        .optional()?;
    Ok(row.unwrap_or((GENESIS, 0)))
}

fn advance_in(conn: &Connection, hash: &[u8; 32], status: &str, posted_at: u64) -> Result<()> {
    conn.execute(
        "UPDATE settlements SET status = ?2, last_error = '', next_attempt_ms = 0,
         posted_at = CASE WHEN ?3 > 0 THEN ?3 ELSE posted_at END WHERE hash = ?1",
        params![&hash[..], status, posted_at],
    )?;
    Ok(())
}

fn insert_settlement(tx: &Transaction, s: &Settlement) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO settlements(hash, from_height, to_height, client, total, nodes, amounts, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            &s.hash[..],
            s.from_height,
            s.to_height,
            s.client,
            s.total,
            serde_json::to_string(&s.nodes)?,
            serde_json::to_string(&s.amounts)?,
            s.status
        ],
    )?;
    Ok(())
}
