//! Every key a testnet spec may contain: its section, type, allowed values and meaning.
//! This table is the single list of known keys; `model.rs` holds the defaults, and a
//! test keeps the two in step.

/// What a key's value must look like.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Str,
    Bool,
    /// An integer within `[min, max]`.
    Int {
        min: i64,
        max: i64,
    },
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// A token amount in whole units with up to 18 decimals: "200", "0.5" (or an integer).
    Amount,
    /// A decimal fraction in `[0, 1]`: 0.5 or "0.5".
    Fraction,
    /// A number of seconds in `[0, 3600]`, fractions allowed: 2 or 0.5.
    Seconds,
}

impl Kind {
    pub fn describe(&self) -> String {
        match self {
            Kind::Str => "a string".into(),
            Kind::Bool => "a boolean (true or false)".into(),
            Kind::Int { .. } => "an integer".into(),
            Kind::Enum(values) => format!("one of {}", quoted_list(values)),
            Kind::Amount => "a token amount such as \"200\" or \"0.5\"".into(),
            Kind::Fraction => "a fraction between 0 and 1, such as 0.5".into(),
            Kind::Seconds => "a number of seconds, such as 2 or 0.5".into(),
        }
    }
}

pub fn quoted_list(values: &[&str]) -> String {
    values
        .iter()
        .map(|v| format!("\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub doc: &'static str,
}

pub struct Section {
    pub name: &'static str,
    /// `[[node]]` is an array of tables; every other section is a single table.
    pub array: bool,
    pub doc: &'static str,
    pub keys: &'static [Key],
}

impl Section {
    pub fn key(&self, name: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.name == name)
    }
    pub fn key_names(&self) -> String {
        self.keys
            .iter()
            .map(|k| k.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
    pub fn header(&self) -> String {
        if self.array {
            format!("[[{}]]", self.name)
        } else {
            format!("[{}]", self.name)
        }
    }
}

const PORT: Kind = Kind::Int { min: 0, max: 65535 };
const COUNT: Kind = Kind::Int { min: 0, max: 1024 };
const SECONDS: Kind = Kind::Int {
    min: 0,
    max: 86_400 * 365,
};

pub const CHAIN_MODES: &[&str] = &["anvil", "external", "none"];
pub const RESTART_POLICIES: &[&str] = &["on-failure", "always", "never"];
pub const MPC_OUTPUTS: &[&str] = &["off", "decode_client_sample", "full_output_2pc"];
pub const NODE_ROLES: &[&str] = &["compute", "vision", "mpc_a", "mpc_b", "daemon"];
pub const DISPUTE_STAGES: &[&str] = &["shadow", "soft", "enforced"];
pub const CHEATS: &[&str] = &["skip-layers", "perturb", "wrong-token", "forge-attestation"];
pub const LOG_FORMATS: &[&str] = &["text", "json"];
pub const CHAOS_ACTIONS: &[&str] = &["kill", "stop", "slow", "partition"];

macro_rules! key {
    ($name:literal, $kind:expr, $doc:literal) => {
        Key {
            name: $name,
            kind: $kind,
            doc: $doc,
        }
    };
}

pub static SECTIONS: &[Section] = &[
    Section {
        name: "testnet",
        array: false,
        doc: "What this testnet is called and where it keeps its state.",
        keys: &[
            key!(
                "name",
                Kind::Str,
                "Name of the testnet (letters, digits, '-', '_'); default: the spec file's stem."
            ),
            key!(
                "run_dir",
                Kind::Str,
                "Run directory (state.json, logs/, keys/, chain db), relative to the spec file; default \".unfed/<name>\"."
            ),
            key!(
                "base_port",
                PORT,
                "First port of the node port block (registry = base, compute = base+1.., vision = base+10.., MPC = base+11.., daemon = base+20); 0 = pick free ports at launch. Default 50050."
            ),
            key!(
                "log_format",
                Kind::Enum(LOG_FORMATS),
                "Node log format: \"text\" or \"json\". Default \"text\"."
            ),
            key!(
                "tls",
                Kind::Bool,
                "Mutual TLS on every gRPC link, with a testnet CA and a certificate per node under run_dir/keys. false = plaintext, allowed on loopback only. Default true."
            ),
        ],
    },
    Section {
        name: "chain",
        array: false,
        doc: "The EVM chain that holds stakes and settlements.",
        keys: &[
            key!(
                "mode",
                Kind::Enum(CHAIN_MODES),
                "\"anvil\" starts a local Anvil; \"external\" uses rpc_url with an operator key; \"none\" runs unstaked. Default \"anvil\"."
            ),
            key!(
                "rpc_url",
                Kind::Str,
                "JSON-RPC URL of an external chain (mode = \"external\" only)."
            ),
            key!(
                "operator_key_file",
                Kind::Str,
                "Admin private key file (mode 0600) for an external chain: deploys and assigns the roles."
            ),
            key!(
                "settler_key_file",
                Kind::Str,
                "Settler private key file (0600), external chain: the daemon posts settlements with it."
            ),
            key!(
                "slasher_key_file",
                Kind::Str,
                "Slasher private key file (0600), external chain: the registry slashes cheaters with it."
            ),
            key!(
                "faucet_key_file",
                Kind::Str,
                "Faucet wallet key file (0600), external chain: the dashboard's faucet pays from it. Without it the faucet cannot pay."
            ),
            key!(
                "client_key_file",
                Kind::Str,
                "Client wallet key file (0600), external chain: the client that deposits and pays for chats."
            ),
            key!(
                "port",
                PORT,
                "Anvil's port; default 8545, or a free port when testnet.base_port = 0."
            ),
            key!(
                "block_time",
                SECONDS,
                "Anvil block time in seconds; 0 mines a block per transaction. Default 0."
            ),
            key!(
                "chain_id",
                Kind::Int {
                    min: 1,
                    max: i64::MAX
                },
                "Chain id for Anvil. Default 31337."
            ),
        ],
    },
    Section {
        name: "economics",
        array: false,
        doc: "Staking, slashing and prices, in token units (18 decimals).",
        keys: &[
            key!(
                "min_stake",
                Kind::Amount,
                "Stake a node needs to be admitted. Default \"100\"."
            ),
            key!(
                "slash_fraction",
                Kind::Fraction,
                "Fraction of stake slashed for proven cheating. Default 0.5."
            ),
            key!(
                "cooldown_seconds",
                SECONDS,
                "Unstake cooldown before withdrawal. Default 300."
            ),
            key!(
                "challenge_window_seconds",
                SECONDS,
                "Window in which a posted settlement can be challenged. Default 60."
            ),
            key!(
                "price_per_input_token",
                Kind::Amount,
                "Price of one prompt token. Default \"0.0001\"."
            ),
            key!(
                "price_per_output_token",
                Kind::Amount,
                "Price of one generated token. Default \"0.001\"."
            ),
            key!(
                "client_deposit",
                Kind::Amount,
                "Deposit made for the dev client wallet. Default \"1000\"."
            ),
            key!(
                "he_dispute_rollout_stage",
                Kind::Enum(DISPUTE_STAGES),
                "What a proven fraud does: \"shadow\" (record the verdict), \"soft\" (also exclude the node), \"enforced\" (also slash its stake on-chain). Default \"enforced\"."
            ),
        ],
    },
    Section {
        name: "model",
        array: false,
        doc: "The model to serve and how to cut it.",
        keys: &[
            key!(
                "source",
                Kind::Str,
                "A built-in model: \"builtin:tiny\". Default when path is not set."
            ),
            key!(
                "path",
                Kind::Str,
                "A HuggingFace model directory (config.json, *.safetensors, tokenizer.json), relative to the spec file."
            ),
            key!(
                "text_shards",
                Kind::Int { min: 1, max: 1024 },
                "Number of text shards (contiguous layer ranges). Default 2."
            ),
            key!(
                "vision_shards",
                COUNT,
                "Number of vision shards (vision-language models only). Default 0."
            ),
        ],
    },
    Section {
        name: "mpc",
        array: false,
        doc: "Prompt privacy: the MPC pair serving shard 0.",
        keys: &[
            key!(
                "pairs",
                Kind::Int { min: 0, max: 64 },
                "MPC pairs (node A + node B) serving shard 0; 0 = no input MPC. Default 0."
            ),
            key!(
                "output",
                Kind::Enum(MPC_OUTPUTS),
                "Output privacy: \"off\", \"decode_client_sample\" or \"full_output_2pc\". Default \"off\"."
            ),
            key!(
                "layers",
                Kind::Int { min: 1, max: 1024 },
                "How many of shard 0's layers run in MPC. Default: all of shard 0."
            ),
        ],
    },
    Section {
        name: "nodes",
        array: false,
        doc: "Defaults for every node.",
        keys: &[
            key!(
                "stake",
                Kind::Amount,
                "Tokens each node wallet stakes. Default \"200\"."
            ),
            key!(
                "replicas",
                Kind::Int { min: 1, max: 64 },
                "Compute nodes per text shard index. Default 1."
            ),
            key!(
                "heartbeat_seconds",
                Kind::Int { min: 1, max: 3600 },
                "Heartbeat interval; a node silent for 3 intervals is dropped. Default 10."
            ),
            key!(
                "spot_check",
                Kind::Fraction,
                "Fraction of its neighbours' hops a compute node has re-executed by an independent replica. Default 0.05."
            ),
            key!(
                "restart",
                Kind::Enum(RESTART_POLICIES),
                "What `up` does when a node exits: \"on-failure\" (restart after a crash), \"always\" or \"never\". Restarts back off exponentially. Anvil is never restarted (its chain would be gone). Default \"on-failure\"."
            ),
            key!(
                "max_restarts_per_minute",
                Kind::Int { min: 1, max: 1000 },
                "Restarts of one node within a minute after which it is left stopped, with a message. Default 5."
            ),
        ],
    },
    Section {
        name: "daemon",
        array: false,
        doc: "The share-chain daemon.",
        keys: &[
            key!(
                "enabled",
                Kind::Bool,
                "Run a daemon (records compute shares, settles payment). Default true."
            ),
            key!(
                "block_interval_seconds",
                Kind::Int { min: 1, max: 3600 },
                "Share-chain block interval. Default 10."
            ),
            key!(
                "settlement_blocks",
                Kind::Int {
                    min: 1,
                    max: 10_000
                },
                "Blocks per settlement summary. Default 6."
            ),
        ],
    },
    Section {
        name: "web",
        array: false,
        doc: "The web dashboard.",
        keys: &[
            key!("enabled", Kind::Bool, "Start the dashboard. Default true."),
            key!("host", Kind::Str, "Bind address. Default \"127.0.0.1\"."),
            key!(
                "port",
                PORT,
                "Port; default 8080, or a free port when testnet.base_port = 0."
            ),
            key!(
                "tls",
                Kind::Bool,
                "Serve the dashboard over HTTPS with a certificate from the testnet CA (needs testnet.tls = true). Default false."
            ),
        ],
    },
    Section {
        name: "node",
        array: true,
        doc: "Overrides for one planned node, matched by role, shard and replica.",
        keys: &[
            key!(
                "role",
                Kind::Enum(NODE_ROLES),
                "Which node: \"compute\", \"vision\", \"mpc_a\", \"mpc_b\" or \"daemon\" (required)."
            ),
            key!(
                "shard",
                COUNT,
                "Shard index (compute, vision) or pair index (mpc_a, mpc_b). Default 0."
            ),
            key!(
                "replica",
                COUNT,
                "Replica of that shard (compute). Default 0."
            ),
            key!(
                "name",
                Kind::Str,
                "Process name in logs and state. Default e.g. \"compute-1\" or \"compute-1-r2\"."
            ),
            key!("port", PORT, "Port for this node."),
            key!("stake", Kind::Amount, "Stake for this node's wallet."),
            key!(
                "eth_key",
                Kind::Str,
                "Private key file (mode 0600) of this node's stake wallet, relative to the spec file; default: a dev key in <run_dir>/keys/."
            ),
            key!(
                "cheat",
                Kind::Enum(CHEATS),
                "Test/demo only, compute nodes on a local Anvil chain: \"skip-layers\", \"perturb\", \"wrong-token\" or \"forge-attestation\"."
            ),
            key!(
                "host",
                Kind::Str,
                "The [[host]] that runs this node (compute or vision); default: the control host."
            ),
        ],
    },
    Section {
        name: "host",
        array: true,
        doc: "A machine of a testnet that spans hosts. The control host runs the chain, the registry and every node not placed elsewhere; the others join it with `unfedctl up SPEC --host NAME --join BUNDLE`.",
        keys: &[
            key!(
                "name",
                Kind::Str,
                "The host's name (letters, digits, '-', '_') (required)."
            ),
            key!(
                "address",
                Kind::Str,
                "The IP address the other hosts dial this one at; its nodes listen there (required)."
            ),
            key!(
                "control",
                Kind::Bool,
                "The control host: exactly one host has control = true. Default false."
            ),
            key!(
                "delay_ms",
                Kind::Int {
                    min: 1,
                    max: 10_000
                },
                "Testing only: latency added each way to every connection to this host's nodes, through a relay on the host (emulates a wide-area link)."
            ),
        ],
    },
    Section {
        name: "chaos",
        array: true,
        doc: "A fault `unfedctl test` injects while its chats run (`up` ignores these).",
        keys: &[
            key!(
                "target",
                Kind::Str,
                "The node, by its plan name: a compute node or the daemon (required)."
            ),
            key!(
                "action",
                Kind::Enum(CHAOS_ACTIONS),
                "\"kill\" (SIGKILL; the restart policy brings it back), \"stop\" (SIGSTOP for duration), \"slow\" (delay_ms added to every message, through a relay) or \"partition\" (its links cut for duration) (required)."
            ),
            key!(
                "at",
                Kind::Seconds,
                "When, in seconds after the chats start. Give at or after_tokens."
            ),
            key!(
                "after_tokens",
                Kind::Int {
                    min: 1,
                    max: 100_000
                },
                "When: once the chats have produced this many tokens."
            ),
            key!(
                "duration",
                Kind::Seconds,
                "How long stop, slow and partition last (required for them)."
            ),
            key!(
                "delay_ms",
                Kind::Int {
                    min: 1,
                    max: 10_000
                },
                "Latency slow adds to every message, each way (required for slow)."
            ),
            key!(
                "ready_within",
                Kind::Seconds,
                "The model must be READY with every node again within this many seconds after the fault ends. Default 10."
            ),
        ],
    },
];

pub fn section(name: &str) -> Option<&'static Section> {
    SECTIONS.iter().find(|s| s.name == name)
}

pub fn section_names() -> String {
    SECTIONS
        .iter()
        .map(|s| s.header())
        .collect::<Vec<_>>()
        .join(", ")
}
