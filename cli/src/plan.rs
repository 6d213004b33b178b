//! The launch plan: a checked spec turned into the concrete graph `up` walks — every
//! process and step with its dependencies, port, wallet and layer range, in waves of
//! steps that can run in parallel.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;

use serde::Serialize;

use crate::spec::{
    BUILTIN_TINY, ChainMode, LoadedSpec, MpcOutput, NodeRole, SpecErrors, TokenAmount, mode_name,
    output_name,
};

/// What kind of thing a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Anvil,
    Contracts,
    FundStake,
    Split,
    Registry,
    Daemon,
    MpcB,
    MpcA,
    Compute,
    Vision,
    Web,
}

impl StepKind {
    /// A long-running process (vs. a task that runs to completion).
    pub fn is_process(self) -> bool {
        !matches!(
            self,
            StepKind::Contracts | StepKind::FundStake | StepKind::Split
        )
    }

    fn role(self) -> Option<NodeRole> {
        match self {
            StepKind::Compute => Some(NodeRole::Compute),
            StepKind::Vision => Some(NodeRole::Vision),
            StepKind::MpcA => Some(NodeRole::MpcA),
            StepKind::MpcB => Some(NodeRole::MpcB),
            StepKind::Daemon => Some(NodeRole::Daemon),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Unique name: the process name in logs and state.
    pub name: String,
    pub kind: StepKind,
    /// Names of the steps that must be ready first.
    pub after: Vec<String>,
    /// Steps with the same wave have no dependency on each other and start together.
    pub wave: usize,
    /// None: a free port is picked at launch (base_port = 0), or the step has no port.
    pub port: Option<u16>,
    pub shard: Option<usize>,
    pub replica: Option<usize>,
    /// Global layer range served (compute, vision, MPC).
    pub layers: Option<Range<usize>>,
    /// Index of the node's dev wallet when it stakes.
    pub wallet: Option<usize>,
    pub stake: Option<TokenAmount>,
    /// A key file from the spec instead of a dev key.
    pub eth_key: Option<PathBuf>,
    /// Test/demo cheating mode (`[[node]] cheat`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cheat: Option<String>,
    /// The `[[node]]` entry that configured this step, for messages.
    #[serde(skip)]
    pub override_index: Option<usize>,
    /// The `[[host]]` that runs it; `None`: the control host (or the only machine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// How `up` knows the step is ready.
    pub ready_when: &'static str,
    pub detail: String,
}

/// What the plan knows about the model; None fields when the model is not on disk yet.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFacts {
    pub source: String,
    pub architecture: Option<String>,
    pub text_layers: Option<usize>,
    pub vision_layers: Option<usize>,
    /// Why the facts are missing, when they are.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LaunchPlan {
    pub name: String,
    pub spec: String,
    pub run_dir: PathBuf,
    pub shards_dir: PathBuf,
    pub chain_mode: &'static str,
    pub mpc_output: &'static str,
    pub model: ModelFacts,
    /// Dev wallet 0 deploys and operates the contracts; 1 is the dev client.
    pub operator_wallet: Option<usize>,
    pub client_wallet: Option<usize>,
    pub steps: Vec<Step>,
    /// What each role can see of a chat, for this spec.
    pub privacy: Vec<String>,
    /// Which links are encrypted and how peers are authenticated.
    pub links: &'static str,
    /// The faults `unfedctl test` injects, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chaos: Vec<crate::chaos_plan::ChaosEvent>,
    /// The machines of a testnet that spans hosts (empty: one machine).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<crate::spec::HostEntry>,
}

/// Which links are encrypted, for `plan` and `status`.
pub fn links_statement(tls: bool) -> &'static str {
    if tls {
        "every gRPC link is mutual TLS 1.3 (testnet CA in run_dir/keys/tls; each node's certificate key pinned in its signed registration); an observer sees only sizes and timing"
    } else {
        "PLAINTEXT on loopback (testnet.tls = false): anyone on this machine who can read loopback traffic reads prompts, activations and tokens"
    }
}

/// What each role sees of a request, given the spec's MPC settings.
fn privacy_statement(
    spec: &crate::spec::TestnetSpec,
    mpc_layers: Option<&Range<usize>>,
) -> Vec<String> {
    use unfed_node::privacy::{Mode, Mpc};
    let mpc = match (spec.mpc.pairs, spec.mpc.output) {
        (0, _) => Mpc::None,
        (_, MpcOutput::FullOutput2pc) => Mpc::FullOutput,
        _ => Mpc::HandOff {
            layer: mpc_layers.map(|r| r.end),
        },
    };
    Mode {
        mpc,
        client_samples: spec.mpc.output == MpcOutput::DecodeClientSample,
        vision: spec.model.vision_shards > 0,
    }
    .sees()
}

/// Wallet indices: 0 operator, 1 client, then staked nodes in start order.
const OPERATOR_WALLET: usize = 0;
const CLIENT_WALLET: usize = unfed_chain::keys::DEV_CLIENT_INDEX as usize;
const FIRST_NODE_WALLET: usize = 2;

const READY_PROCESS: &str = "process alive and health call answers";
const READY_NODE: &str = "health call answers and the registry lists it admitted";
const READY_TASK: &str = "completes successfully";

impl LaunchPlan {
    /// Build the plan, checking what needs the whole picture: the model's layer count,
    /// ports, and which planned node each `[[node]]` override refers to.
    pub fn build(loaded: &LoadedSpec, facts: ModelFacts) -> Result<Self, SpecErrors> {
        let mut report = loaded.reporter();
        let spec = &loaded.spec;
        let spans = &loaded.spans;
        let text_shards = spec.model.text_shards;
        let vision_shards = spec.model.vision_shards;

        let text_ranges = facts.text_layers.and_then(|layers| {
            let ranges = unfed_model::layout::layer_ranges(layers, text_shards);
            if ranges.is_none() {
                report.at(
                    spans.key_or_section("model", "text_shards"),
                    format!(
                        "model.text_shards = {text_shards} but the model has {layers} layers; use at most {layers} shards"
                    ),
                );
            }
            ranges
        });
        let vision_ranges = match (facts.vision_layers, vision_shards) {
            (_, 0) => None,
            (None, _) if facts.architecture.is_some() => {
                report.at(
                    spans.key_or_section("model", "vision_shards"),
                    format!(
                        "model.vision_shards = {vision_shards} but {} has no vision tower; set vision_shards = 0",
                        facts.architecture.as_deref().unwrap_or("the model")
                    ),
                );
                None
            }
            (None, _) => None,
            (Some(layers), n) => {
                let ranges = unfed_model::layout::layer_ranges(layers, n);
                if ranges.is_none() {
                    report.at(
                        spans.key_or_section("model", "vision_shards"),
                        format!(
                            "model.vision_shards = {n} but the vision tower has {layers} layers"
                        ),
                    );
                }
                ranges
            }
        };
        if let (Some(mpc_layers), Some(ranges)) = (spec.mpc.layers, &text_ranges) {
            let shard0 = ranges[0].len();
            if mpc_layers > shard0 {
                report.at(
                    spans.get("mpc.layers"),
                    format!("mpc.layers = {mpc_layers} but shard 0 has {shard0} layers; use at most {shard0}"),
                );
            }
        }

        let mut steps = Vec::new();
        let mut push = |step: Step| -> String {
            let name = step.name.clone();
            steps.push(step);
            name
        };
        let blank = |name: &str, kind: StepKind, after: Vec<String>, detail: String| Step {
            name: name.to_string(),
            kind,
            after,
            wave: 0,
            port: None,
            shard: None,
            replica: None,
            layers: None,
            wallet: None,
            stake: None,
            eth_key: None,
            cheat: None,
            override_index: None,
            host: None,
            ready_when: if kind.is_process() {
                READY_PROCESS
            } else {
                READY_TASK
            },
            detail,
        };

        let staked = spec.chain.mode != ChainMode::None;
        let mut registry_after = Vec::new();
        if staked {
            let mut contracts_after = Vec::new();
            if spec.chain.mode == ChainMode::Anvil {
                let detail = match spec.chain.block_time {
                    0 => format!(
                        "local chain {}, a block per transaction",
                        spec.chain.chain_id
                    ),
                    t => format!("local chain {}, block time {t}s", spec.chain.chain_id),
                };
                contracts_after.push(push(blank("anvil", StepKind::Anvil, vec![], detail)));
            }
            let contracts = push(blank(
                "contracts",
                StepKind::Contracts,
                contracts_after,
                format!(
                    "deploy UnfedToken + UnfedEscrow (min stake {}, cooldown {}s, challenge window {}s, slash {} bps)",
                    spec.economics.min_stake,
                    spec.economics.cooldown_seconds,
                    spec.economics.challenge_window_seconds,
                    spec.economics.slash_bps()
                ),
            ));
            registry_after.push(push(blank(
                "fund-stake",
                StepKind::FundStake,
                vec![contracts],
                format!(
                    "fund and stake every node wallet; client deposits {}",
                    spec.economics.client_deposit
                ),
            )));
        }
        let split_detail = match (&text_ranges, vision_shards) {
            (_, 0) => format!("{} → {text_shards} text shard(s)", facts.source),
            _ => format!(
                "{} → {text_shards} text + {vision_shards} vision shard(s)",
                facts.source
            ),
        };
        registry_after.push(push(blank("split", StepKind::Split, vec![], split_detail)));

        let registry = push(blank(
            "registry",
            StepKind::Registry,
            registry_after,
            "admission, discovery, manifest".into(),
        ));
        let mut gate = registry.clone();
        if spec.daemon.enabled {
            gate = push(blank(
                "daemon",
                StepKind::Daemon,
                vec![gate],
                format!(
                    "share chain: a block every {}s, settlement every {} blocks",
                    spec.daemon.block_interval_seconds, spec.daemon.settlement_blocks
                ),
            ));
        }
        let mpc_layers = text_ranges.as_ref().map(|r| {
            let shard0 = r[0].clone();
            match spec.mpc.layers {
                Some(n) if spec.mpc.output != MpcOutput::FullOutput2pc => {
                    shard0.start..(shard0.start + n).min(shard0.end)
                }
                _ => shard0,
            }
        });
        let privacy = privacy_statement(spec, mpc_layers.as_ref());
        let mut mpc_a_names = Vec::new();
        for pair in 0..spec.mpc.pairs {
            let b = push(Step {
                shard: Some(pair),
                layers: mpc_layers.clone(),
                ..blank(
                    &format!("mpc-b-{pair}"),
                    StepKind::MpcB,
                    vec![gate.clone()],
                    "MPC peer (starts first)".into(),
                )
            });
            mpc_a_names.push(push(Step {
                shard: Some(pair),
                layers: mpc_layers.clone(),
                ..blank(
                    &format!("mpc-a-{pair}"),
                    StepKind::MpcA,
                    vec![b],
                    "MPC entry for shard 0".into(),
                )
            }));
        }
        let compute_after = if mpc_a_names.is_empty() {
            vec![gate]
        } else {
            mpc_a_names
        };
        let mut compute_names = Vec::new();
        for shard in 0..text_shards {
            for replica in 0..spec.nodes.replicas {
                let name = if replica == 0 {
                    format!("compute-{shard}")
                } else {
                    format!("compute-{shard}-r{replica}")
                };
                let layers = text_ranges.as_ref().map(|r| r[shard].clone());
                let mut detail = match &layers {
                    Some(l) => format!("text shard {shard}, layers {}..{}", l.start, l.end),
                    None => format!("text shard {shard}"),
                };
                if shard == 0 {
                    detail.push_str(", embedding");
                }
                if shard + 1 == text_shards {
                    detail.push_str(", norm + LM head");
                }
                compute_names.push(push(Step {
                    shard: Some(shard),
                    replica: Some(replica),
                    layers,
                    ..blank(&name, StepKind::Compute, compute_after.clone(), detail)
                }));
            }
        }
        let mut last = compute_names;
        if vision_shards > 0 {
            let mut vision_names = Vec::new();
            for shard in 0..vision_shards {
                let layers = vision_ranges.as_ref().map(|r| r[shard].clone());
                let detail = match &layers {
                    Some(l) => format!(
                        "vision shard {shard}, encoder layers {}..{}",
                        l.start, l.end
                    ),
                    None => format!("vision shard {shard}"),
                };
                vision_names.push(push(Step {
                    shard: Some(shard),
                    layers,
                    ..blank(
                        &format!("vision-{shard}"),
                        StepKind::Vision,
                        last.clone(),
                        detail,
                    )
                }));
            }
            last = vision_names;
        }
        if spec.web.enabled {
            push(blank(
                "web",
                StepKind::Web,
                last,
                format!(
                    "dashboard on {}{}",
                    spec.web.host,
                    if spec.web.tls { " (HTTPS)" } else { "" }
                ),
            ));
        }

        apply_overrides(loaded, &mut steps, &mut report);
        assign_wallets(loaded, &mut steps, &mut report);
        assign_ports(loaded, &mut steps, &mut report);
        assign_waves(&mut steps);
        for step in &mut steps {
            if step.kind.role().is_some() {
                step.ready_when = READY_NODE;
            }
        }
        let chaos = crate::chaos_plan::check(loaded, &steps, &mut report);
        report.finish()?;

        let run_dir = match spec.testnet.run_dir.as_str() {
            "" => loaded.resolve(&format!(".unfed/{}", spec.testnet.name)),
            dir => loaded.resolve(dir),
        };
        Ok(Self {
            name: spec.testnet.name.clone(),
            spec: loaded.display_path.clone(),
            shards_dir: run_dir.join("shards"),
            run_dir,
            chain_mode: mode_name(spec.chain.mode),
            mpc_output: output_name(spec.mpc.output),
            model: facts,
            operator_wallet: staked.then_some(OPERATOR_WALLET),
            client_wallet: staked.then_some(CLIENT_WALLET),
            steps,
            privacy,
            links: links_statement(spec.testnet.tls),
            chaos,
            hosts: spec.hosts.clone(),
        })
    }

    /// The plan as joined host `host` runs it: its own run directory (and split) under
    /// the spec's, so hosts sharing a file system do not collide.
    pub fn joined_as(mut self, host: &str) -> anyhow::Result<Self> {
        crate::launch::join::host::check_host(&self, host)?;
        self.run_dir = self.run_dir.join("hosts").join(host);
        self.shards_dir = self.run_dir.join("shards");
        Ok(self)
    }

    /// The control host, when the testnet spans hosts.
    pub fn control_host(&self) -> Option<&crate::spec::HostEntry> {
        self.hosts.iter().find(|h| h.control)
    }

    /// The host a step runs on (`None` on a one-machine testnet).
    pub fn host_of(&self, step: &Step) -> Option<&crate::spec::HostEntry> {
        self.host_entry(step.host.as_deref())
    }

    /// The `[[host]]` named `host`, or (`None`) the control host.
    pub fn host_entry(&self, host: Option<&str>) -> Option<&crate::spec::HostEntry> {
        match host {
            Some(name) => self.hosts.iter().find(|h| h.name == name),
            None => self.control_host(),
        }
    }

    /// The address the nodes of `host` (`None`: the control host) listen on.
    pub fn bind_address(&self, host: Option<&str>) -> String {
        self.host_entry(host)
            .map_or_else(|| "127.0.0.1".to_string(), |h| h.address.clone())
    }

    /// Whether `step` runs on host `host` (`None`: the control host).
    pub fn runs_on(&self, step: &Step, host: Option<&str>) -> bool {
        let control = self.control_host().map(|h| h.name.as_str());
        let of = step.host.as_deref().filter(|h| Some(*h) != control);
        of == host.filter(|h| Some(*h) != control)
    }

    /// Text shards the compute nodes serve: the hops of one step.
    pub fn text_shards(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.kind == StepKind::Compute)
            .filter_map(|s| s.shard)
            .max()
            .map_or(0, |m| m + 1)
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Steps grouped by wave, in start order.
    pub fn waves(&self) -> BTreeMap<usize, Vec<&Step>> {
        let mut waves: BTreeMap<usize, Vec<&Step>> = BTreeMap::new();
        for step in &self.steps {
            waves.entry(step.wave).or_default().push(step);
        }
        waves
    }

    /// The plan as a person reads it: one block per wave; steps in a wave start together.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Launch plan for testnet '{}' ({})",
            self.name, self.spec
        );
        let _ = writeln!(out, "  run dir:  {}", self.run_dir.display());
        let model = match (&self.model.architecture, self.model.text_layers) {
            (Some(arch), Some(layers)) => {
                format!("{} ({arch}, {layers} layers)", self.model.source)
            }
            _ => self.model.source.clone(),
        };
        let _ = writeln!(out, "  model:    {model}");
        if let Some(note) = &self.model.note {
            let _ = writeln!(out, "  note:     {note}");
        }
        let _ = writeln!(
            out,
            "  chain:    {}   mpc output: {}",
            self.chain_mode, self.mpc_output
        );
        let _ = writeln!(out, "  links:    {}", self.links);
        for (i, line) in self.privacy.iter().enumerate() {
            let label = if i == 0 { "sees:" } else { "" };
            let _ = writeln!(out, "  {label:<9} {line}");
        }
        let _ = writeln!(out);
        let width = self.steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for (wave, steps) in self.waves() {
            let parallel = if steps.len() > 1 {
                "  (in parallel)"
            } else {
                ""
            };
            let _ = writeln!(out, "wave {wave}{parallel}");
            for step in steps {
                let port = step.port.map_or_else(
                    || {
                        if step.kind.is_process() {
                            ":auto".into()
                        } else {
                            String::new()
                        }
                    },
                    |p| format!(":{p}"),
                );
                let after = if step.after.is_empty() {
                    String::new()
                } else {
                    format!("  after {}", step.after.join(", "))
                };
                let stake = step
                    .stake
                    .map(|s| format!("  stake {s}"))
                    .unwrap_or_default();
                let host = match self.host_of(step) {
                    Some(h) => format!("  @{} ({})", h.name, h.address),
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {:<width$}  {:<7} {}{stake}{after}{host}",
                    step.name, port, step.detail
                );
            }
        }
        crate::chaos_plan::render(&self.chaos, &mut out);
        out
    }
}

/// Apply `[[node]]` entries to the node they name; an entry that names no planned node is an error.
fn apply_overrides(
    loaded: &LoadedSpec,
    steps: &mut [Step],
    report: &mut crate::spec::diagnostics::Reporter,
) {
    for (i, node) in loaded.spec.node_overrides.iter().enumerate() {
        let replica = (node.role == NodeRole::Compute).then_some(node.replica);
        let target = steps.iter_mut().find(|s| {
            s.kind.role() == Some(node.role)
                && (node.role == NodeRole::Daemon || s.shard == Some(node.shard))
                && s.replica == replica
        });
        let Some(step) = target else {
            report.at(
                loaded.spans.get(&format!("node[{i}]")),
                format!(
                    "[[node]] #{} (role \"{}\", shard {}, replica {}) matches no node of this plan; check model.text_shards, model.vision_shards, mpc.pairs, nodes.replicas and daemon.enabled",
                    i + 1,
                    node.role.as_str(),
                    node.shard,
                    node.replica
                ),
            );
            continue;
        };
        if let Some(name) = &node.name {
            step.name = name.clone();
        }
        step.override_index = Some(i);
        step.port = node.port;
        step.stake = node.stake;
        step.eth_key = node.eth_key.as_ref().map(|k| loaded.resolve(k));
        step.cheat = node.cheat.clone();
        step.host = node.host.clone();
    }
    // Renames must be followed by the steps that depend on the renamed ones.
    let renames: HashMap<String, String> = default_names(steps);
    for step in steps.iter_mut() {
        for dep in &mut step.after {
            if let Some(new) = renames.get(dep) {
                *dep = new.clone();
            }
        }
    }
}

/// Old-name → new-name for steps renamed by overrides (the name is derived from kind/shard/replica).
fn default_names(steps: &[Step]) -> HashMap<String, String> {
    steps
        .iter()
        .filter_map(|s| {
            let default = match (s.kind, s.shard, s.replica) {
                (StepKind::Compute, Some(shard), Some(0)) => format!("compute-{shard}"),
                (StepKind::Compute, Some(shard), Some(r)) => format!("compute-{shard}-r{r}"),
                (StepKind::Vision, Some(shard), _) => format!("vision-{shard}"),
                (StepKind::MpcA, Some(p), _) => format!("mpc-a-{p}"),
                (StepKind::MpcB, Some(p), _) => format!("mpc-b-{p}"),
                (StepKind::Daemon, _, _) => "daemon".into(),
                _ => return None,
            };
            (default != s.name).then(|| (default, s.name.clone()))
        })
        .collect()
}

fn assign_wallets(
    loaded: &LoadedSpec,
    steps: &mut [Step],
    report: &mut crate::spec::diagnostics::Reporter,
) {
    if loaded.spec.chain.mode == ChainMode::None {
        for step in steps.iter_mut() {
            step.stake = None;
        }
        return;
    }
    let external = loaded.spec.chain.mode == ChainMode::External;
    let nodes = steps.iter_mut().filter(|s| s.kind.role().is_some());
    for (wallet, step) in (FIRST_NODE_WALLET..).zip(nodes) {
        // Dev wallets come from the public mnemonic: anyone could sweep their stake.
        if external && step.eth_key.is_none() {
            report.at(
                loaded.spans.key_or_section("chain", "mode"),
                format!(
                    "node {} has no eth_key: with chain.mode = \"external\" every node needs its own key ([[node]] role = \"{}\", shard = {}, eth_key = \"path/to/0600-key\"); the public dev keys are refused off Anvil",
                    step.name,
                    step.kind.role().map(|r| r.as_str()).unwrap_or_default(),
                    step.shard.unwrap_or(0)
                ),
            );
        }
        step.wallet = Some(wallet);
        step.stake.get_or_insert(loaded.spec.nodes.stake);
    }
}

/// Ports: explicit ones first (duplicates are errors), then the user guide's layout from
/// base_port for the rest, moving past any port already taken.
fn assign_ports(
    loaded: &LoadedSpec,
    steps: &mut [Step],
    report: &mut crate::spec::diagnostics::Reporter,
) {
    let spec = &loaded.spec;
    let base = spec.testnet.base_port;
    let explicit = |step: &Step| match step.kind {
        StepKind::Anvil => spec.chain.port.map(|p| (p, "chain.port".to_string())),
        StepKind::Web => spec.web.port.map(|p| (p, "web.port".to_string())),
        _ => step
            .port
            .zip(step.override_index)
            .map(|(p, i)| (p, format!("node[{i}].port"))),
    };
    let mut taken: HashMap<u16, String> = HashMap::new();
    for step in steps.iter_mut() {
        let Some((port, key)) = explicit(step) else {
            continue;
        };
        step.port = Some(port);
        if port == 0 {
            step.port = None;
            continue;
        }
        if let Some(other) = taken.get(&port) {
            report.at(
                loaded.spans.get(&key),
                format!(
                    "port {port} is used by both {other} and {}; give each its own port",
                    step.name
                ),
            );
        } else {
            taken.insert(port, step.name.clone());
        }
    }
    if base == 0 {
        return;
    }
    let mut compute_seen = 0u16;
    for step in steps.iter_mut() {
        if step.port.is_some() || explicit(step).is_some() || !step.kind.is_process() {
            continue;
        }
        let offset = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        let preferred = match step.kind {
            StepKind::Anvil => 8545,
            StepKind::Web => 8080,
            StepKind::Registry => base,
            StepKind::Compute => {
                compute_seen += 1;
                base.saturating_add(compute_seen)
            }
            StepKind::Vision => base
                .saturating_add(10)
                .saturating_add(offset(step.shard.unwrap_or(0))),
            StepKind::MpcA => base
                .saturating_add(11)
                .saturating_add(offset(4 * step.shard.unwrap_or(0))),
            StepKind::MpcB => base
                .saturating_add(13)
                .saturating_add(offset(4 * step.shard.unwrap_or(0))),
            StepKind::Daemon => base.saturating_add(20),
            StepKind::Contracts | StepKind::FundStake | StepKind::Split => continue,
        };
        let mut port = preferred;
        while taken.contains_key(&port) && port < u16::MAX {
            port += 1;
        }
        taken.insert(port, step.name.clone());
        step.port = Some(port);
    }
}

/// Wave = 1 + the deepest dependency's wave. Steps are pushed after their dependencies.
fn assign_waves(steps: &mut [Step]) {
    let mut waves: HashMap<String, usize> = HashMap::new();
    for step in steps.iter_mut() {
        step.wave = 1 + step
            .after
            .iter()
            .filter_map(|d| waves.get(d))
            .max()
            .copied()
            .unwrap_or(0);
        waves.insert(step.name.clone(), step.wave);
    }
}

/// What is known about the spec's model without splitting it.
pub fn model_facts(loaded: &LoadedSpec) -> ModelFacts {
    let spec = &loaded.spec;
    match &spec.model.path {
        None => {
            let source = spec
                .model
                .source
                .clone()
                .unwrap_or_else(|| BUILTIN_TINY.into());
            ModelFacts {
                source,
                architecture: Some("qwen2".into()),
                text_layers: Some(unfed_model::builtin::TINY_LAYERS),
                vision_layers: None,
                note: None,
            }
        }
        Some(path) => {
            let dir = loaded.resolve(path);
            match unfed_model::ModelConfig::from_dir(&dir) {
                Ok(config) => ModelFacts {
                    source: path.clone(),
                    architecture: Some(format!("{:?}", config.architecture).to_lowercase()),
                    text_layers: Some(config.text.num_hidden_layers),
                    vision_layers: config.vision.as_ref().map(|v| v.num_hidden_layers),
                    note: None,
                },
                Err(e) => ModelFacts {
                    source: path.clone(),
                    architecture: None,
                    text_layers: None,
                    vision_layers: None,
                    note: Some(format!(
                        "model not inspected ({e:#}); layer ranges are decided at split time"
                    )),
                },
            }
        }
    }
}

/// Load the spec at `path` (or the embedded default) and build its plan.
pub fn load_plan(path: Option<&std::path::Path>) -> Result<LaunchPlan, SpecErrors> {
    let loaded = crate::spec::load_lenient(path)?;
    let facts = model_facts(&loaded);
    LaunchPlan::build(&loaded, facts)
}
