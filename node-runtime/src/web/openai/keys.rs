//! API keys of the OpenAI-compatible API, kept in the dashboard's SQLite database
//! (web.db): `unfedctl api-key create` writes a key there and prints it once, the
//! dashboard looks keys up per request. Only sha256(key) is stored, with the wallet the
//! key bills, its label, its creation and expiry times, and a slot for a delegation (a
//! payer's signed grant to the key, for client-signed billing).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use unfed_chain::Address;

/// Every key starts with this, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "unfed-sk-";

/// Why a presented key was refused (all 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error(
        "no API key: send `Authorization: Bearer {KEY_PREFIX}...` (create one with `unfedctl api-key create`)"
    )]
    Missing,
    #[error("unknown API key; create one with `unfedctl api-key create`")]
    Unknown,
    #[error("the API key `{label}` expired; create a new one with `unfedctl api-key create`")]
    Expired { label: String },
    #[error("the API key store cannot be read: {0}")]
    Store(String),
}

/// What the store knows of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The wallet whose deposit pays for the key's requests.
    pub wallet: Address,
    pub label: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    /// The payer's signed delegation to this key, once billing uses one.
    pub delegation: Option<Vec<u8>>,
}

pub struct ApiKeys {
    db: Mutex<Connection>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn key_hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

impl ApiKeys {
    /// Opens (or creates, mode 0600) the store at `db`.
    pub fn open(db: &Path) -> anyhow::Result<Self> {
        // Created private: the rows name wallets and key hashes.
        if !db.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(db)
                .with_context(|| format!("creating {}", db.display()))?;
        }
        let conn = Connection::open(db)
            .with_context(|| format!("opening the API key store {}", db.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS api_keys (
                 key_sha256 BLOB PRIMARY KEY,
                 wallet TEXT NOT NULL,
                 label TEXT NOT NULL,
                 created_ms INTEGER NOT NULL,
                 expires_ms INTEGER,
                 delegation BLOB
             );",
        )
        .context("creating the api_keys table")?;
        Ok(Self {
            db: Mutex::new(conn),
        })
    }

    /// A new key billing `wallet`, valid for `ttl` (None = until removed). The key is
    /// returned once and never stored. `delegate` makes the wallet's signed delegation
    /// to the key (see `crate::voucher::key_delegate`), stored beside its hash.
    pub fn create(
        &self,
        wallet: Address,
        label: &str,
        ttl: Option<Duration>,
        now_ms: u64,
        delegate: impl FnOnce(&str) -> anyhow::Result<Option<Vec<u8>>>,
    ) -> anyhow::Result<String> {
        let key = format!("{KEY_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        let expires = ttl.map(|t| (now_ms + t.as_millis() as u64) as i64);
        let delegation = delegate(&key)?;
        self.db
            .lock()
            .expect("api key db poisoned")
            .execute(
                "INSERT INTO api_keys(key_sha256, wallet, label, created_ms, expires_ms, delegation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    key_hash(&key),
                    wallet.to_string(),
                    label,
                    now_ms as i64,
                    expires,
                    delegation
                ],
            )
            .context("storing the API key")?;
        Ok(key)
    }

    /// The record of a presented key, if it is known and not expired at `now_ms`.
    pub fn lookup(&self, key: Option<&str>, now_ms: u64) -> Result<KeyRecord, KeyRefusal> {
        let key = key.filter(|k| !k.is_empty()).ok_or(KeyRefusal::Missing)?;
        let row = self
            .db
            .lock()
            .expect("api key db poisoned")
            .query_row(
                "SELECT wallet, label, created_ms, expires_ms, delegation
                 FROM api_keys WHERE key_sha256 = ?1",
                params![key_hash(key)],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, Option<Vec<u8>>>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| KeyRefusal::Store(e.to_string()))?;
        let (wallet, label, created, expires, delegation) = row.ok_or(KeyRefusal::Unknown)?;
        if expires.is_some_and(|e| e as u64 <= now_ms) {
            return Err(KeyRefusal::Expired { label });
        }
        Ok(KeyRecord {
            wallet: wallet.parse().map_err(|_| {
                KeyRefusal::Store(format!("a key's wallet {wallet:?} is not an address"))
            })?,
            label,
            created_ms: created as u64,
            expires_ms: expires.map(|e| e as u64),
            delegation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_stored_hashed_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("web.db");
        let keys = ApiKeys::open(&db).unwrap();
        assert_eq!(
            std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let wallet = unfed_chain::dev_signer(1).unwrap().address();
        let key = keys
            .create(wallet, "ci", None, 1_000, |_| Ok(None))
            .unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() > 60, "{key}");
        let rec = keys.lookup(Some(&key), 2_000).unwrap();
        assert_eq!((rec.wallet, rec.label.as_str()), (wallet, "ci"));
        assert_eq!(rec.delegation, None);
        // The key itself is nowhere in the database file.
        drop(keys);
        let bytes = std::fs::read(&db).unwrap();
        let wal = std::fs::read(dir.path().join("web.db-wal")).unwrap_or_default();
        for b in [bytes, wal] {
            assert!(!b.windows(key.len()).any(|w| w == key.as_bytes()));
        }
        // A second open (the dashboard) sees the key; a changed key is unknown.
        let keys = ApiKeys::open(&db).unwrap();
        assert!(keys.lookup(Some(&key), 2_000).is_ok());
        let mut other = key.clone();
        other.pop();
        other.push('x');
        assert_eq!(keys.lookup(Some(&other), 2_000), Err(KeyRefusal::Unknown));
        assert_eq!(keys.lookup(None, 2_000), Err(KeyRefusal::Missing));
        let short = keys
            .create(wallet, "short", Some(Duration::from_secs(1)), 1_000, |_| {
                Ok(None)
            })
            .unwrap();
        assert!(keys.lookup(Some(&short), 1_999).is_ok());
        assert!(matches!(
            keys.lookup(Some(&short), 2_000),
            Err(KeyRefusal::Expired { .. })
        ));
    }
}
