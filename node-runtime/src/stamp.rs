//! Ties a local SQLite file (the daemon's chain.db, the dashboard's web.db) to the chain
//! it was made for: chain id, escrow address and genesis block hash. A file from another
//! chain — e.g. the previous run's, now that `up` started a fresh Anvil with the escrow
//! at the same address — is moved aside (kept, named in the log) and a fresh one begun,
//! so nothing recorded for one chain is ever acted on against another.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use unfed_chain::{Address, Chain};

/// The identity of a chain + escrow, as stored in a stamped file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainStamp(String);

impl ChainStamp {
    /// Reads the chain id and block 0's hash from the chain.
    pub async fn of(chain: &Chain, escrow: Address) -> Result<Self> {
        let id = chain.chain_id().await?;
        let genesis = chain.genesis_hash().await?;
        Ok(Self(format!(
            "chain {id} escrow {escrow} genesis {genesis}"
        )))
    }
}

/// Makes `path` belong to `stamp`: a file stamped for another chain (or not stamped at
/// all) is renamed to `<path>.<unix ms>.stale`, with its WAL files; then the stamp is
/// written. Returns where a foreign file was moved.
pub fn claim(path: &Path, stamp: &ChainStamp) -> Result<Option<PathBuf>> {
    let mut moved = None;
    if path.exists() {
        let found = read(path)?;
        if found.as_ref() != Some(&stamp.0) {
            let aside = set_aside(path)?;
            tracing::warn!(
                db = %path.display(),
                kept_as = %aside.display(),
                was = found.as_deref().unwrap_or("unstamped"),
                now = %stamp.0,
                "the database belongs to another chain: kept aside, starting a fresh one"
            );
            moved = Some(aside);
        }
    } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory of {}", path.display()))?;
    }
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open {} to stamp it", path.display()))?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS chain_stamp (value TEXT NOT NULL);")?;
    conn.execute("DELETE FROM chain_stamp", [])?;
    conn.execute("INSERT INTO chain_stamp(value) VALUES (?1)", [&stamp.0])?;
    Ok(moved)
}

fn read(path: &Path) -> Result<Option<String>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let has_table = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chain_stamp'",
            [],
            |_| Ok(()),
        )
        .optional()
        .with_context(|| format!("{} is not an SQLite database", path.display()))?
        .is_some();
    if !has_table {
        return Ok(None);
    }
    Ok(conn
        .query_row("SELECT value FROM chain_stamp", [], |r| r.get(0))
        .optional()?)
}

/// Renames `path` (and its -wal/-shm companions) to a fresh `.stale` name beside it.
fn set_aside(path: &Path) -> Result<PathBuf> {
    let ms = crate::daemon::now_ms();
    let aside = PathBuf::from(format!("{}.{ms}.stale", path.display()));
    for suffix in ["-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            std::fs::rename(&from, format!("{}{suffix}", aside.display()))
                .with_context(|| format!("cannot move {} aside", from.display()))?;
        }
    }
    std::fs::rename(path, &aside).with_context(|| {
        format!(
            "cannot move {} aside to {}",
            path.display(),
            aside.display()
        )
    })?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_another_chain_is_kept_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("chain.db");
        let first = ChainStamp("chain 1 escrow 0xe genesis 0x01".into());
        let second = ChainStamp("chain 1 escrow 0xe genesis 0x02".into());
        assert_eq!(claim(&db, &first).unwrap(), None);
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE work (x INTEGER); INSERT INTO work VALUES (7);")
            .unwrap();
        // Same chain: the file and its contents stay.
        assert_eq!(claim(&db, &first).unwrap(), None);
        let kept = claim(&db, &second).unwrap().expect("moved aside");
        let old: i64 = Connection::open(&kept)
            .unwrap()
            .query_row("SELECT x FROM work", [], |r| r.get(0))
            .unwrap();
        assert_eq!(old, 7);
        assert_eq!(read(&db).unwrap().as_deref(), Some(second.0.as_str()));
        let fresh: Option<String> = Connection::open(&db)
            .unwrap()
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'work'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert_eq!(fresh, None, "the fresh file starts empty");
    }
}
