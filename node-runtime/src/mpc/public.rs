//! The public parameters a client needs for its side of the MPC layers (the embedding and
//! the norms): a party packs them once from its split and serves them; a client fetches
//! them from party A, checks them against the digest both parties state, and caches them
//! on disk by that digest, so later sessions start without a download.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use unfed_model::TextConfig;
use unfed_proto::PublicParamsChunk;

use super::weights::{ClientModel, public_tensor_names};
use crate::engine::weights::WeightFiles;

/// Bytes per streamed chunk (under gRPC's default 4 MiB message limit).
const CHUNK: usize = 1 << 20;

/// The packed safetensors file and its digest.
pub struct Packed {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
}

impl Packed {
    /// Packs the tensors a client needs for layers `[0, layer_end)` (and the head's norm).
    pub fn new(
        files: &WeightFiles,
        cfg: &TextConfig,
        prefix: &str,
        layer_end: usize,
        head: bool,
    ) -> Result<Self> {
        let bytes = files.subset(&public_tensor_names(cfg, prefix, layer_end, head))?;
        Ok(Self {
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: Arc::new(bytes),
        })
    }

    /// The file as a stream of chunks.
    pub fn chunks(&self) -> impl Iterator<Item = PublicParamsChunk> + Send + 'static {
        let bytes = self.bytes.clone();
        (0..bytes.len().div_ceil(CHUNK)).map(move |i| PublicParamsChunk {
            data: bytes[i * CHUNK..((i + 1) * CHUNK).min(bytes.len())].to_vec(),
        })
    }
}

/// Where a file with digest `sha256` is cached.
pub fn cache_path(cache: &Path, sha256: &str) -> PathBuf {
    cache
        .join("mpc-public")
        .join(format!("{sha256}.safetensors"))
}

fn sha_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Stores fetched `bytes` under their digest, which must be `sha256`; written to a
/// temporary file first so a crash never leaves a truncated cache entry.
pub fn store(cache: &Path, sha256: &str, bytes: &[u8]) -> Result<PathBuf> {
    let got = hex::encode(Sha256::digest(bytes));
    if got != sha256 {
        bail!(
            "the public parameters received have sha256 {got}, but the MPC pair states {sha256}; the party or the link corrupted them"
        );
    }
    let path = cache_path(cache, sha256);
    let dir = path.parent().expect("cache_path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.persist(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The cached file of digest `sha256`, if present and intact (a damaged one is removed).
pub fn cached(cache: &Path, sha256: &str) -> Option<PathBuf> {
    let path = cache_path(cache, sha256);
    match sha_of(&path) {
        Ok(s) if s == sha256 => Some(path),
        Ok(_) => {
            let _ = std::fs::remove_file(&path);
            None
        }
        Err(_) => None,
    }
}

/// The client's model from a packed file.
pub fn load(
    path: &Path,
    cfg: &TextConfig,
    prefix: &str,
    layer_end: usize,
    head: bool,
) -> Result<ClientModel> {
    let files = WeightFiles::open(&[path.to_path_buf()])?;
    ClientModel::load(cfg, prefix, 0..layer_end, head, &files).with_context(|| {
        format!(
            "the cached public parameters {} do not load",
            path.display()
        )
    })
}
