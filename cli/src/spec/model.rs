//! The typed testnet spec with its defaults. Keys and their documentation live in
//! `schema.rs`; a test keeps the two in step.

use serde::{Deserialize, Serialize};

use super::amount::TokenAmount;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TestnetSpec {
    pub testnet: TestnetSection,
    pub chain: ChainSection,
    pub economics: EconomicsSection,
    pub model: ModelSection,
    pub mpc: MpcSection,
    pub nodes: NodesSection,
    pub daemon: DaemonSection,
    pub web: WebSection,
    #[serde(rename = "node")]
    pub node_overrides: Vec<NodeOverride>,
    /// Machines of a testnet that spans hosts (`[[host]]`); empty: everything on this one.
    #[serde(rename = "host", skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostEntry>,
    /// Faults `unfedctl test` injects (`[[chaos]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chaos: Vec<ChaosEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TestnetSection {
    /// Empty means "the spec file's stem"; filled in by `load`.
    pub name: String,
    /// Empty means ".unfed/<name>"; resolved against the spec file by the plan.
    pub run_dir: String,
    pub base_port: u16,
    pub log_format: String,
    /// Mutual TLS on every link (plaintext only on loopback, opted out).
    pub tls: bool,
}

impl Default for TestnetSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            run_dir: String::new(),
            base_port: 50050,
            log_format: "text".into(),
            tls: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainMode {
    Anvil,
    External,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChainSection {
    pub mode: ChainMode,
    pub rpc_url: Option<String>,
    /// The escrow admin (deploys, configures, assigns roles).
    pub operator_key_file: Option<String>,
    /// Posts and challenges settlements (given to the daemon only).
    pub settler_key_file: Option<String>,
    /// Slashes proven cheaters (given to the registry only).
    pub slasher_key_file: Option<String>,
    /// The faucet's token wallet (given to the dashboard only, when the faucet is on).
    pub faucet_key_file: Option<String>,
    /// The dev client's wallet (deposits and pays for chats).
    pub client_key_file: Option<String>,
    /// None: 8545, or a free port when base_port = 0.
    pub port: Option<u16>,
    pub block_time: u64,
    pub chain_id: u64,
}

/// The `[chain]` keys naming a key file, one per duty plus the client's.
pub const CHAIN_KEY_FILES: [&str; 5] = [
    "operator_key_file",
    "settler_key_file",
    "slasher_key_file",
    "faucet_key_file",
    "client_key_file",
];

impl ChainSection {
    /// The key file the spec sets under `chain.<key>`.
    pub fn key_file(&self, key: &str) -> Option<&str> {
        match key {
            "operator_key_file" => self.operator_key_file.as_deref(),
            "settler_key_file" => self.settler_key_file.as_deref(),
            "slasher_key_file" => self.slasher_key_file.as_deref(),
            "faucet_key_file" => self.faucet_key_file.as_deref(),
            "client_key_file" => self.client_key_file.as_deref(),
            _ => None,
        }
    }
}

impl Default for ChainSection {
    fn default() -> Self {
        Self {
            mode: ChainMode::Anvil,
            rpc_url: None,
            operator_key_file: None,
            settler_key_file: None,
            slasher_key_file: None,
            faucet_key_file: None,
            client_key_file: None,
            port: None,
            block_time: 0,
            chain_id: 31337,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EconomicsSection {
    pub min_stake: TokenAmount,
    pub slash_fraction: f64,
    pub cooldown_seconds: u64,
    pub challenge_window_seconds: u64,
    pub price_per_input_token: TokenAmount,
    pub price_per_output_token: TokenAmount,
    pub client_deposit: TokenAmount,
    /// shadow | soft | enforced (see the schema).
    pub he_dispute_rollout_stage: String,
}

impl Default for EconomicsSection {
    fn default() -> Self {
        Self {
            min_stake: TokenAmount::whole(100),
            slash_fraction: 0.5,
            cooldown_seconds: 300,
            challenge_window_seconds: 60,
            price_per_input_token: TokenAmount::from_wei(100_000_000_000_000),
            price_per_output_token: TokenAmount::from_wei(1_000_000_000_000_000),
            client_deposit: TokenAmount::whole(1000),
            he_dispute_rollout_stage: "enforced".into(),
        }
    }
}

impl EconomicsSection {
    /// The slash fraction in basis points, as the escrow contract takes it.
    pub fn slash_bps(&self) -> u16 {
        (self.slash_fraction * 10_000.0).round() as u16
    }
}

pub const BUILTIN_TINY: &str = "builtin:tiny";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSection {
    pub source: Option<String>,
    pub path: Option<String>,
    pub text_shards: usize,
    pub vision_shards: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            source: None,
            path: None,
            text_shards: 2,
            vision_shards: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MpcOutput {
    Off,
    DecodeClientSample,
    #[serde(rename = "full_output_2pc")]
    FullOutput2pc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MpcSection {
    pub pairs: usize,
    pub output: MpcOutput,
    /// None: all of shard 0.
    pub layers: Option<usize>,
}

impl Default for MpcSection {
    fn default() -> Self {
        Self {
            pairs: 0,
            output: MpcOutput::Off,
            layers: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodesSection {
    pub stake: TokenAmount,
    pub replicas: usize,
    pub heartbeat_seconds: u64,
    pub spot_check: f64,
    pub restart: RestartPolicy,
    pub max_restarts_per_minute: u32,
}

impl Default for NodesSection {
    fn default() -> Self {
        Self {
            stake: TokenAmount::whole(200),
            replicas: 1,
            heartbeat_seconds: 10,
            spot_check: 0.05,
            restart: RestartPolicy::OnFailure,
            max_restarts_per_minute: 5,
        }
    }
}

/// What `up` does when a process it started exits after the launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after a crash (non-zero exit or a signal), not after a clean exit.
    OnFailure,
    Always,
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonSection {
    pub enabled: bool,
    pub block_interval_seconds: u64,
    pub settlement_blocks: u64,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            enabled: true,
            block_interval_seconds: 10,
            settlement_blocks: 6,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebSection {
    pub enabled: bool,
    pub host: String,
    /// None: 8080, or a free port when base_port = 0.
    pub port: Option<u16>,
    /// HTTPS with a certificate from the testnet CA.
    pub tls: bool,
}

impl Default for WebSection {
    fn default() -> Self {
        Self {
            enabled: true,
            host: "127.0.0.1".into(),
            port: None,
            tls: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Compute,
    Vision,
    MpcA,
    MpcB,
    Daemon,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Compute => "compute",
            NodeRole::Vision => "vision",
            NodeRole::MpcA => "mpc_a",
            NodeRole::MpcB => "mpc_b",
            NodeRole::Daemon => "daemon",
        }
    }
}

/// One `[[chaos]]` fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChaosEntry {
    pub target: String,
    pub action: ChaosAction,
    pub at: Option<f64>,
    pub after_tokens: Option<u32>,
    pub duration: Option<f64>,
    pub delay_ms: Option<u64>,
    pub ready_within: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChaosAction {
    Kill,
    Stop,
    Slow,
    Partition,
}

impl ChaosAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ChaosAction::Kill => "kill",
            ChaosAction::Stop => "stop",
            ChaosAction::Slow => "slow",
            ChaosAction::Partition => "partition",
        }
    }

    /// Faults that go through a relay in front of the target.
    pub fn needs_relay(self) -> bool {
        matches!(self, ChaosAction::Slow | ChaosAction::Partition)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeOverride {
    pub role: NodeRole,
    #[serde(default)]
    pub shard: usize,
    #[serde(default)]
    pub replica: usize,
    pub name: Option<String>,
    pub port: Option<u16>,
    pub stake: Option<TokenAmount>,
    pub eth_key: Option<String>,
    /// Test/demo cheating mode of a compute node (local Anvil only).
    pub cheat: Option<String>,
    /// The `[[host]]` that runs this node; default: the control host.
    pub host: Option<String>,
}

/// One `[[host]]`: a machine of the testnet, by the address the others dial it at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEntry {
    pub name: String,
    pub address: String,
    /// The host with the chain, the registry and every node not placed elsewhere.
    #[serde(default)]
    pub control: bool,
    /// Emulated network latency (ms, each way) in front of this host's nodes.
    pub delay_ms: Option<u64>,
}
