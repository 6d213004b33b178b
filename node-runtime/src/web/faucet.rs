//! The faucet's admission rules, in the original's order: off unless enabled (403),
//! able to pay (503), a valid address (400), a session for that same address when auth
//! is required (401), and one grant per address per cooldown (429), kept in SQLite so a
//! restart does not reset it.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use unfed_chain::Address;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaucetRefusal {
    #[error("the faucet is off (set UNFED_FAUCET_ENABLED=1 to turn it on)")]
    Disabled,
    #[error("the faucet cannot pay: {0}")]
    Unavailable(String),
    #[error("`{0}` is not an EVM address (0x followed by 40 hex digits)")]
    BadAddress(String),
    #[error("sign in with {0} first: the faucet pays only the signed-in wallet")]
    NotSignedIn(Address),
    #[error("{address} was paid {ago_secs} s ago; try again in {retry_secs} s")]
    Cooldown {
        address: Address,
        ago_secs: u64,
        retry_secs: u64,
    },
}

impl FaucetRefusal {
    pub fn http_status(&self) -> u16 {
        match self {
            FaucetRefusal::Disabled => 403,
            FaucetRefusal::Unavailable(_) => 503,
            FaucetRefusal::BadAddress(_) => 400,
            FaucetRefusal::NotSignedIn(_) => 401,
            FaucetRefusal::Cooldown { .. } => 429,
        }
    }
}

pub struct FaucetPolicy {
    pub enabled: bool,
    pub require_auth: bool,
    pub cooldown: Duration,
}

pub struct Faucet {
    policy: FaucetPolicy,
    db: Mutex<Connection>,
}

impl Faucet {
    /// Opens (or creates) the grant log at `db`.
    pub fn open(db: &Path, policy: FaucetPolicy) -> anyhow::Result<Self> {
        let conn = Connection::open(db)
            .with_context(|| format!("opening the faucet database {}", db.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS faucet_grants (
                 address TEXT PRIMARY KEY,
                 last_grant_ms INTEGER NOT NULL
             );",
        )
        .context("creating the faucet table")?;
        Ok(Self {
            policy,
            db: Mutex::new(conn),
        })
    }

    pub fn policy(&self) -> &FaucetPolicy {
        &self.policy
    }

    /// Whether `address` may be paid now. `can_pay` is why the faucet cannot pay, if it
    /// cannot (no chain, no operator key); `session` is the signed-in wallet, if any.
    pub fn admit(
        &self,
        address: &str,
        can_pay: Result<(), String>,
        session: Option<Address>,
        now_ms: u64,
    ) -> Result<Address, FaucetRefusal> {
        if !self.policy.enabled {
            return Err(FaucetRefusal::Disabled);
        }
        can_pay.map_err(FaucetRefusal::Unavailable)?;
        let addr: Address = address
            .trim()
            .parse()
            .map_err(|_| FaucetRefusal::BadAddress(address.to_string()))?;
        if self.policy.require_auth && session != Some(addr) {
            return Err(FaucetRefusal::NotSignedIn(addr));
        }
        let last: Option<i64> = self
            .db
            .lock()
            .expect("faucet db poisoned")
            .query_row(
                "SELECT last_grant_ms FROM faucet_grants WHERE address = ?1",
                params![addr.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| FaucetRefusal::Unavailable(format!("faucet database: {e}")))?;
        if let Some(last) = last {
            let ago = now_ms.saturating_sub(last as u64);
            let cooldown = self.policy.cooldown.as_millis() as u64;
            if ago < cooldown {
                return Err(FaucetRefusal::Cooldown {
                    address: addr,
                    ago_secs: ago / 1000,
                    retry_secs: (cooldown - ago).div_ceil(1000),
                });
            }
        }
        Ok(addr)
    }

    /// Records a grant once it was paid, starting the address's cooldown.
    pub fn record(&self, address: Address, now_ms: u64) -> anyhow::Result<()> {
        self.db
            .lock()
            .expect("faucet db poisoned")
            .execute(
                "INSERT INTO faucet_grants(address, last_grant_ms) VALUES (?1, ?2)
                 ON CONFLICT(address) DO UPDATE SET last_grant_ms = excluded.last_grant_ms",
                params![address.to_string(), now_ms as i64],
            )
            .context("recording the faucet grant")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(enabled: bool, require_auth: bool) -> FaucetPolicy {
        FaucetPolicy {
            enabled,
            require_auth,
            cooldown: Duration::from_secs(3600),
        }
    }

    #[test]
    fn every_refusal_in_order_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("web.db");
        let me: Address = unfed_chain::dev_signer(1).unwrap().address();
        let other: Address = unfed_chain::dev_signer(2).unwrap().address();
        let a = me.to_string();
        let status = |r: Result<Address, FaucetRefusal>| r.unwrap_err().http_status();

        let off = Faucet::open(&db, policy(false, true)).unwrap();
        assert_eq!(status(off.admit(&a, Ok(()), Some(me), 0)), 403);
        drop(off);
        let on = Faucet::open(&db, policy(true, true)).unwrap();
        assert_eq!(
            status(on.admit(&a, Err("no chain".into()), Some(me), 0)),
            503
        );
        assert_eq!(status(on.admit("0xnope", Ok(()), Some(me), 0)), 400);
        assert_eq!(status(on.admit(&a, Ok(()), None, 0)), 401);
        assert_eq!(status(on.admit(&a, Ok(()), Some(other), 0)), 401);
        assert_eq!(on.admit(&a, Ok(()), Some(me), 1_000).unwrap(), me);
        on.record(me, 1_000).unwrap();
        let err = on.admit(&a, Ok(()), Some(me), 61_000).unwrap_err();
        assert_eq!(err.http_status(), 429);
        assert!(err.to_string().contains("try again in 3540 s"), "{err}");
        // The cooldown survives a restart, and ends.
        drop(on);
        let again = Faucet::open(&db, policy(true, true)).unwrap();
        assert_eq!(status(again.admit(&a, Ok(()), Some(me), 2_000)), 429);
        assert!(again.admit(&a, Ok(()), Some(me), 1_000 + 3_600_000).is_ok());
        // Without required auth, any valid address may ask.
        let open = Faucet::open(&dir.path().join("open.db"), policy(true, false)).unwrap();
        assert!(open.admit(&other.to_string(), Ok(()), None, 0).is_ok());
    }
}
