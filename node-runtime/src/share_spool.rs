//! Unsent compute shares on disk, so paid work survives a daemon that is away (killed,
//! restarting, delisted) and a restart of the node itself. The spool directory holds
//! the node's share-signing key, kept across restarts so spooled shares still verify
//! against the key the node registers, and the signed shares not yet delivered, each
//! with the voucher it names.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use prost::Message;
use unfed_proto::{ComputeShare, SpendingVoucher, SubmitSharesRequest};

const KEY_FILE: &str = "share.key";
const PENDING_FILE: &str = "pending.bin";

/// A signed share waiting for the daemon, and the voucher it names.
pub type Pending = (ComputeShare, Arc<SpendingVoucher>);

/// The node's share-signing key: the spool's when it has one (`--share-spool DIR`),
/// else a fresh one.
pub fn share_key(spool: Option<&Path>) -> Result<SigningKey> {
    match spool {
        Some(dir) => {
            load_or_create_key(dir).with_context(|| format!("--share-spool {}", dir.display()))
        }
        None => Ok(crate::shares::generate_key()),
    }
}

/// The share-signing key kept in `dir`, created (0600, in a 0700 directory) on first use.
pub fn load_or_create_key(dir: &Path) -> Result<SigningKey> {
    let path = dir.join(KEY_FILE);
    if !path.exists() {
        let key = crate::shares::generate_key();
        unfed_chain::keys::create_private_file(&path, hex::encode(key.to_bytes()).as_bytes())
            .with_context(|| format!("creating the share key {}", path.display()))?;
        return Ok(key);
    }
    let text = unfed_chain::keys::read_private_file(&path)?;
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!(
                "{} does not hold a hex Ed25519 key (64 hex digits); remove it to make a new \
                 key, which also drops the shares spooled beside it",
                path.display()
            )
        })?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// The pending-shares file: length-prefixed records, appended as shares are signed and
/// rewritten once some are delivered.
pub struct Spool {
    path: PathBuf,
    file: File,
}

impl Spool {
    /// Opens `dir`'s spool and returns the shares an earlier run left in it. A record
    /// cut short (the node died mid-write) is dropped with a warning.
    pub fn open(dir: &Path) -> Result<(Spool, Vec<Pending>)> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the share spool {}", dir.display()))?;
        let path = dir.join(PENDING_FILE);
        let pending = read_pending(&path)?;
        // Rewritten at once: drops a torn tail before new records follow it.
        let file = rewrite(&path, pending.iter())?;
        Ok((Spool { path, file }, pending))
    }

    /// Appends one signed share (one write, so a killed node loses none it signed).
    pub fn append(&mut self, item: &Pending) -> Result<()> {
        self.file
            .write_all(&record(item))
            .with_context(|| format!("appending to {}", self.path.display()))
    }

    /// Replaces the spool's content with `items` (those still undelivered).
    pub fn replace<'a>(&mut self, items: impl Iterator<Item = &'a Pending>) -> Result<()> {
        self.file = rewrite(&self.path, items)?;
        Ok(())
    }
}

/// Writes `items` to `path` through a renamed temp file; returns it open for appends.
fn rewrite<'a>(path: &Path, items: impl Iterator<Item = &'a Pending>) -> Result<File> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&record(item));
    }
    if out.is_empty() {
        // Everything delivered, the common case on every flush: truncate, no sync (a
        // lost truncation only resends shares the daemon counts once).
        File::create(path).with_context(|| format!("emptying {}", path.display()))?;
        return Ok(OpenOptions::new().append(true).open(path)?);
    }
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(&out)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(OpenOptions::new().append(true).open(path)?)
}

fn record((share, voucher): &Pending) -> Vec<u8> {
    let body = SubmitSharesRequest {
        submitter: String::new(),
        shares: vec![share.clone()],
        vouchers: vec![(**voucher).clone()],
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The shares spooled at `path` (none when it does not exist).
pub fn read_pending(path: &Path) -> Result<Vec<Pending>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut items = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let Some(item) = next_record(&mut rest)? else {
            tracing::warn!(
                spool = %path.display(),
                "the last spooled share was cut short (the node stopped mid-write): dropped"
            );
            break;
        };
        items.push(item);
    }
    Ok(items)
}

/// The spooled shares of the spool directory `dir`.
pub fn pending_in(dir: &Path) -> Result<Vec<Pending>> {
    read_pending(&dir.join(PENDING_FILE))
}

/// The next record of `rest`; `None` for a truncated tail.
fn next_record(rest: &mut &[u8]) -> Result<Option<Pending>> {
    let Some((len, body)) = rest.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*len) as usize;
    if body.len() < len {
        return Ok(None);
    }
    let (body, tail) = body.split_at(len);
    *rest = tail;
    let mut req =
        SubmitSharesRequest::decode(body).context("a spooled share record does not decode")?;
    match (req.shares.pop(), req.vouchers.pop()) {
        (Some(share), Some(voucher)) => Ok(Some((share, Arc::new(voucher)))),
        _ => bail!("a spooled share record lacks its share or voucher"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(step: u32) -> Pending {
        let share = ComputeShare {
            session_id: "s".into(),
            step,
            ..Default::default()
        };
        (share, Arc::new(SpendingVoucher::default()))
    }

    #[test]
    fn survives_reopen_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut spool, left) = Spool::open(&spool_dir).unwrap();
        assert!(left.is_empty());
        for step in 0..3 {
            spool.append(&item(step)).unwrap();
        }
        drop(spool);
        // A write cut short by a kill.
        let path = spool_dir.join(PENDING_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&record(&item(9))[..7]).unwrap();
        drop(f);
        let (mut spool, left) = Spool::open(&spool_dir).unwrap();
        let steps: Vec<u32> = left.iter().map(|(s, _)| s.step).collect();
        assert_eq!(steps, [0, 1, 2]);
        spool.replace(left[2..].iter()).unwrap();
        spool.append(&item(3)).unwrap();
        let steps: Vec<u32> = pending_in(&spool_dir)
            .unwrap()
            .iter()
            .map(|(s, _)| s.step)
            .collect();
        assert_eq!(steps, [2, 3]);
    }

    #[test]
    fn key_is_private_reused_and_refused_when_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let key = load_or_create_key(&spool_dir).unwrap();
        let path = spool_dir.join(KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_or_create_key(&spool_dir).unwrap().to_bytes(),
            key.to_bytes()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_key(&spool_dir).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not hex").unwrap();
        let err = format!("{:#}", load_or_create_key(&spool_dir).unwrap_err());
        assert!(err.contains("does not hold a hex Ed25519 key"), "{err}");
    }
}
