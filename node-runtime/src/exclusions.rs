//! The registry's fraud exclusions on disk (SQLite), so a node found guilty stays
//! excluded — from discovery and from payment — across registry restarts.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

pub struct ExclusionStore {
    conn: Mutex<Connection>,
}

impl ExclusionStore {
    /// Opens (or creates) the state db at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "cannot create the directory of --state-db {}",
                    path.display()
                )
            })?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the registry state db {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS excluded (
                 node_id TEXT PRIMARY KEY,
                 reason TEXT NOT NULL,
                 at_ms INTEGER NOT NULL
             );",
        )
        .with_context(|| format!("{} is not a registry state db", path.display()))?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub fn excluded(&self) -> Result<BTreeSet<String>> {
        let conn = self.conn.lock().expect("state db poisoned");
        let mut st = conn.prepare("SELECT node_id FROM excluded")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records `node` as excluded for `reason`; committed before this returns.
    pub fn exclude(&self, node: &str, reason: &str, at_ms: u64) -> Result<()> {
        self.conn.lock().expect("state db poisoned").execute(
            "INSERT OR IGNORE INTO excluded(node_id, reason, at_ms) VALUES (?1, ?2, ?3)",
            params![node, reason, at_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/registry.db");
        let s = ExclusionStore::open(&path).unwrap();
        s.exclude("0xabc", "skipped layers", 1).unwrap();
        s.exclude("0xabc", "again", 2).unwrap();
        drop(s);
        let s = ExclusionStore::open(&path).unwrap();
        assert_eq!(s.excluded().unwrap(), BTreeSet::from(["0xabc".to_string()]));
    }
}
