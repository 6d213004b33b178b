//! Hosts joining a testnet that spans machines. The control host's `up` writes a join
//! bundle per `[[host]]` (what a host needs to find and trust the testnet, and a
//! one-time token; no one's private key) and serves the join: it issues certificates
//! for keys the joining host made, funds its new wallets and submits the stakes they
//! signed. The joining host's `up --host NAME --join BUNDLE` then starts its nodes,
//! which register with the control host's registry.

pub mod host;
pub mod serve;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pki::TestnetPki;
use super::state::ChainRecord;

/// What the control host hands a joining host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    pub testnet: String,
    /// The `[[host]]` this bundle admits.
    pub host: String,
    /// The control host's join service (host:port).
    pub join: String,
    /// One-time secret: admits one join of `host`.
    pub token: String,
    /// The testnet CA's certificate (empty on a plaintext loopback testnet).
    pub ca_pem: String,
    pub registry: String,
    pub model_id: String,
    /// `model_digest` of the control host's split.
    pub model_digest: String,
    /// The contracts, when the testnet stakes (the joining host never dials the chain).
    pub chain: Option<BundleChain>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleChain {
    pub chain_id: u64,
    pub token: String,
    pub escrow: String,
    /// An external chain's RPC: the joining host stakes there from its own funded keys
    /// (`[[node]] eth_key`). `None` on the control host's Anvil, which it never dials.
    #[serde(default)]
    pub rpc_url: Option<String>,
}

impl Bundle {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the join bundle {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a join bundle (the control host's `up` writes them to <run_dir>/join/<host>.json)",
                path.display()
            )
        })
    }

    /// Written 0600: the token admits a host.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        super::pki::replace_file(path, &text, true)
    }
}

/// Where the control host keeps the bundle of `host`.
pub fn bundle_path(run_dir: &Path, host: &str) -> PathBuf {
    run_dir.join("join").join(format!("{host}.json"))
}

/// Where the control host records the hosts that joined.
pub fn joined_path(run_dir: &Path) -> PathBuf {
    run_dir.join("join").join("joined.json")
}

/// A host that joined, as the control host records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinedHost {
    pub name: String,
    pub address: String,
    /// Unix seconds.
    pub joined_at: u64,
    /// Node name and stake wallet.
    pub nodes: Vec<(String, String)>,
}

pub fn read_joined(run_dir: &Path) -> Vec<JoinedHost> {
    std::fs::read(joined_path(run_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The digest of a split: SHA-256 over its manifest, which lists every shard's SHA-256,
/// so two hosts agree on it only if they serve the same weights cut the same way.
pub fn model_digest(shards_dir: &Path) -> anyhow::Result<String> {
    let path = shards_dir.join(unfed_model::manifest::MANIFEST_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: unfed_model::Manifest = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a split manifest", path.display()))?;
    Ok(hex::encode(Sha256::digest(serde_json::to_vec(&manifest)?)))
}

/// What a joined host's launch starts from.
pub struct Joined {
    pub host: String,
    /// The CA's certificate and the certificates issued at the join (`None`: plaintext).
    pub pki: Option<TestnetPki>,
    pub registry: String,
    /// The contracts and this host's staked wallets.
    pub chain: Option<ChainRecord>,
}

/// Unix seconds now.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
