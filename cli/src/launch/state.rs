//! `<run_dir>/state.json`: what a testnet runs — processes, ports, chain addresses,
//! wallets — so `down`, `status` and `logs` work from any terminal.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::pid::{self, Identity};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub name: String,
    pub spec: String,
    /// Processes in start order; `down` stops them in reverse.
    pub processes: Vec<ProcessRecord>,
    pub chain: Option<ChainRecord>,
    pub registry: Option<String>,
    pub model_id: Option<String>,
    /// The testnet CA's certificate; `None`: the testnet runs plaintext (tls = false).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// The dashboard's URL (https with `[web] tls`).
    #[serde(default)]
    pub dashboard: Option<String>,
    /// The `unfedctl up` that owns the processes while it starts them or runs in the
    /// foreground; `down` asks it to stop them, so it does not report them as crashed.
    #[serde(default)]
    pub up_pid: Option<u32>,
    /// What `up_pid` was, so a PID reused since is never signalled.
    #[serde(default)]
    pub up_identity: Option<Identity>,
    /// The model went READY under `up_pid` (`up --detach` waits for it).
    #[serde(default)]
    pub ready: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub kind: String,
    pub pid: u32,
    pub port: Option<u16>,
    pub log: PathBuf,
    pub shard: Option<usize>,
    pub eth_address: Option<String>,
    /// Start time and command line at spawn: `down` and `status` act on `pid` only
    /// while both still match.
    #[serde(default)]
    pub identity: Option<Identity>,
    /// The address peers dial (the host's, or a relay's in front of the node).
    #[serde(default)]
    pub address: Option<String>,
}

impl ProcessRecord {
    /// Where the node is dialled: its advertised address, else its port on loopback.
    pub fn dial_address(&self) -> Option<String> {
        self.address
            .clone()
            .or_else(|| self.port.map(|port| format!("127.0.0.1:{port}")))
    }

    /// What runs under the recorded PID now.
    pub fn now(&self) -> pid::Now {
        pid::check(self.pid, self.identity.as_ref())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainRecord {
    pub rpc_url: String,
    pub chain_id: u64,
    pub token: Option<String>,
    pub escrow: Option<String>,
    pub operator: Option<String>,
    pub client: Option<String>,
    /// Staked node wallets: name, address, stake (token units).
    pub wallets: Vec<WalletRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WalletRecord {
    pub node: String,
    pub address: String,
    pub stake: String,
    pub key_file: PathBuf,
}

impl ChainRecord {
    /// A chain at `rpc_url` with nothing known of it yet.
    pub fn at(rpc_url: String) -> Self {
        Self {
            rpc_url,
            chain_id: 0,
            token: None,
            escrow: None,
            operator: None,
            client: None,
            wallets: Vec::new(),
        }
    }

    /// The token and escrow this chain record points at.
    pub fn deployment(&self) -> anyhow::Result<unfed_chain::Deployment> {
        let parse = |a: &Option<String>, what: &str| -> anyhow::Result<unfed_chain::Address> {
            a.as_deref()
                .with_context(|| format!("the {what} is not deployed yet"))?
                .parse()
                .with_context(|| format!("the recorded {what} address is not an EVM address"))
        };
        Ok(unfed_chain::Deployment {
            token: parse(&self.token, "token")?,
            escrow: parse(&self.escrow, "escrow")?,
        })
    }
}

impl RunState {
    /// How a client reaches this testnet's nodes: TLS under its CA, or plaintext.
    pub fn net(&self) -> anyhow::Result<unfed_node::net::Net> {
        match &self.tls_ca {
            Some(ca) => unfed_node::net::Net::client_from_ca(ca),
            None => Ok(unfed_node::net::Net::plaintext()),
        }
    }

    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(STATE_FILE)
    }

    /// None when the testnet has never run (or was cleaned up).
    pub fn load(run_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = Self::path(run_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).with_context(|| {
                format!(
                    "{} is not a valid state file; remove it if no testnet runs",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Written to a temporary file and renamed, so a crash never leaves half a state file.
    pub fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(run_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The recorded processes that still run (a PID another process took does not count).
    pub fn alive(&self) -> Vec<&ProcessRecord> {
        self.processes
            .iter()
            .filter(|p| p.now() == pid::Now::Ours)
            .collect()
    }
}
