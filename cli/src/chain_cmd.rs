//! `unfedctl chain up|deploy|fund|stake|status|down [SPEC]`: the chain part of `up`, one
//! step at a time so each can be run and debugged on its own. Everything is recorded in
//! the run directory's state.json (the same record `up`, `status` and `down` use), keys
//! in `<run_dir>/keys/<node>.key` (0600). Every verb is safe to re-run: fund and stake
//! top up to the spec's amounts instead of adding them again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use unfed_chain::{
    Address, Chain, Deployment, PrivateKeySigner, U256, dev_signer, format_amount, read_key_file,
    write_key_file,
};

use crate::launch::node_cmd::NodeCommand;
use crate::launch::pid::{Now, left_alone};
use crate::launch::state::{ChainRecord, RunState, WalletRecord};
use crate::launch::steps::{self, Context, Inputs, wei};
use crate::plan::{LaunchPlan, Step, StepKind};
use crate::spec::{self, ChainMode, LoadedSpec};

/// ETH each wallet holds for gas after `fund` (Anvil's dev wallets already have plenty).
const GAS_WEI: u128 = 1_000_000_000_000_000_000;

#[derive(Subcommand)]
pub enum Commands {
    /// The testnet's chain, step by step: Anvil, contracts, funding and stakes.
    #[command(subcommand)]
    Chain(ChainCommand),
}

#[derive(Subcommand)]
pub enum ChainCommand {
    /// Start Anvil (chain.mode = "anvil"), deploy the contracts, fund and stake every
    /// node wallet, fund and deposit for the dev client: deploy + fund + stake in one go.
    Up {
        /// Testnet spec (TOML); the embedded tiny spec when omitted.
        spec: Option<PathBuf>,
    },
    /// Deploy UnfedToken and UnfedEscrow with the spec's economics.
    Deploy {
        spec: Option<PathBuf>,
        /// The chain's RPC URL when its Anvil was started elsewhere (e.g. the Anvil
        /// Deployment `unfedctl render --target kubernetes` writes); recorded in state.json.
        #[arg(long)]
        rpc_url: Option<String>,
    },
    /// Write each node's key to keys/<node>.key (0600) and send it gas money and the
    /// tokens it is to stake; fund the dev client with its deposit.
    Fund { spec: Option<PathBuf> },
    /// Approve and stake each node's stake (up to nodes.stake); deposit for the client.
    Stake { spec: Option<PathBuf> },
    /// Contract addresses and, per wallet, stake, cooling stake, balance and eligibility.
    Status {
        spec: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Move AMOUNT of NODE's stake into cooldown (requestUnstake): below min_stake the
    /// registry drops the node at its next stake re-check; `chain stake` restores it.
    Unstake {
        spec: Option<PathBuf>,
        /// Node name as in the plan (e.g. compute-0).
        #[arg(long)]
        node: String,
        /// Token amount, e.g. "150" or "0.5".
        #[arg(long)]
        amount: String,
    },
    /// Stop the Anvil started by `chain up` and forget the chain (keys stay).
    Down { spec: Option<PathBuf> },
}

pub fn run(cmd: Commands) -> anyhow::Result<ExitCode> {
    let Commands::Chain(cmd) = cmd;
    let spec_path = match &cmd {
        ChainCommand::Up { spec }
        | ChainCommand::Deploy { spec, .. }
        | ChainCommand::Fund { spec }
        | ChainCommand::Stake { spec }
        | ChainCommand::Status { spec, .. }
        | ChainCommand::Unstake { spec, .. }
        | ChainCommand::Down { spec } => spec.clone(),
    };
    let loaded = spec::load(spec_path.as_deref())?;
    let plan = LaunchPlan::build(&loaded, crate::plan::model_facts(&loaded))?;
    if loaded.spec.chain.mode == ChainMode::None {
        println!(
            "{}: chain.mode = \"none\": no chain, nodes run unstaked; nothing to do",
            loaded.display_path
        );
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let verbs = Verbs::new(loaded, plan)?;
    runtime.block_on(async {
        match cmd {
            ChainCommand::Up { .. } => verbs.up().await,
            ChainCommand::Deploy { rpc_url, .. } => verbs.deploy(rpc_url).await,
            ChainCommand::Fund { .. } => verbs.fund().await,
            ChainCommand::Stake { .. } => verbs.stake().await,
            ChainCommand::Status { json, .. } => verbs.status(json).await,
            ChainCommand::Unstake { node, amount, .. } => verbs.unstake(&node, &amount).await,
            ChainCommand::Down { .. } => verbs.down(),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

struct Verbs {
    ctx: Context,
}

impl Verbs {
    fn new(loaded: LoadedSpec, plan: LaunchPlan) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&plan.run_dir)
            .with_context(|| format!("creating run directory {}", plan.run_dir.display()))?;
        Ok(Self {
            ctx: Context {
                loaded,
                plan,
                node: NodeCommand::locate()?,
                // The chain verbs start no node.
                net: unfed_node::net::Net::plaintext(),
                pki: None,
                ready_timeout: Duration::from_secs(60),
                running: Default::default(),
                tied: false,
                relays: Default::default(),
                host: None,
                bind: "127.0.0.1".into(),
            },
        })
    }

    fn run_dir(&self) -> &Path {
        &self.ctx.plan.run_dir
    }

    fn state(&self) -> anyhow::Result<RunState> {
        Ok(RunState::load(self.run_dir())?.unwrap_or_else(|| RunState {
            name: self.ctx.plan.name.clone(),
            spec: self.ctx.plan.spec.clone(),
            ..RunState::default()
        }))
    }

    /// Runs one of `up`'s own chain steps and records what it produced.
    async fn run_step(&self, kind: StepKind, state: &mut RunState) -> anyhow::Result<()> {
        let step = self
            .ctx
            .plan
            .steps
            .iter()
            .find(|s| s.kind == kind)
            .with_context(|| format!("the launch plan has no {kind:?} step"))?;
        let outcome = steps::run(
            &self.ctx,
            step,
            Inputs {
                chain: state.chain.clone(),
                registry: state.registry.clone(),
            },
        )
        .await
        .with_context(|| format!("step {}", step.name))?;
        if let Some(chain) = outcome.chain {
            state.chain = Some(chain);
        }
        let started = std::mem::take(&mut self.ctx.running.lock().unwrap().processes);
        state.processes.extend(started);
        state.save(self.run_dir())
    }

    fn anvil_alive(state: &RunState) -> Option<u32> {
        state
            .processes
            .iter()
            .find(|p| p.kind == "anvil" && p.now() == Now::Ours)
            .map(|p| p.pid)
    }

    async fn up(&self) -> anyhow::Result<()> {
        let mut state = self.state()?;
        if self.ctx.loaded.spec.chain.mode == ChainMode::Anvil {
            match Self::anvil_alive(&state) {
                Some(pid) => println!("anvil already running (pid {pid})"),
                None => {
                    state.processes.retain(|p| p.kind != "anvil");
                    state.chain = None;
                    self.run_step(StepKind::Anvil, &mut state).await?;
                    let c = state.chain.as_ref().expect("anvil step records the chain");
                    println!("anvil listening on {} (chain id {})", c.rpc_url, c.chain_id);
                }
            }
        }
        self.deploy_into(&mut state).await?;
        self.fund_into(&mut state).await?;
        self.stake_into(&mut state).await?;
        println!(
            "chain ready: state in {}",
            RunState::path(self.run_dir()).display()
        );
        Ok(())
    }

    async fn deploy(&self, rpc_url: Option<String>) -> anyhow::Result<()> {
        let mut state = self.state()?;
        if let Some(url) = rpc_url
            && state.chain.as_ref().map(|c| &c.rpc_url) != Some(&url)
        {
            // Another chain than the one recorded: nothing recorded for it holds.
            state.chain = Some(ChainRecord::at(url));
        }
        self.deploy_into(&mut state).await
    }

    /// Deploys unless the recorded escrow already has code on this chain.
    async fn deploy_into(&self, state: &mut RunState) -> anyhow::Result<()> {
        if state.chain.is_none() && self.ctx.loaded.spec.chain.mode == ChainMode::Anvil {
            bail!(
                "no chain recorded in {}: start one with `unfedctl chain up {}`",
                RunState::path(self.run_dir()).display(),
                self.spec_arg()
            );
        }
        if let Some(record) = &state.chain
            && let Ok(d) = record.deployment()
        {
            let chain = self.operator_chain(record)?;
            if chain.has_code(d.escrow).await? {
                println!(
                    "contracts already deployed: token {} escrow {}",
                    d.token, d.escrow
                );
                return Ok(());
            }
        }
        self.run_step(StepKind::Contracts, state).await?;
        let c = state.chain.as_ref().expect("deploy records the chain");
        println!(
            "deployed UnfedToken {} and UnfedEscrow {} (operator {})",
            c.token.as_deref().unwrap_or("?"),
            c.escrow.as_deref().unwrap_or("?"),
            c.operator.as_deref().unwrap_or("?")
        );
        Ok(())
    }

    async fn fund(&self) -> anyhow::Result<()> {
        let mut state = self.state()?;
        self.fund_into(&mut state).await
    }

    /// Tops each wallet up to its stake in tokens (counting what it already staked)
    /// and to 1 ETH of gas money; the client to its deposit.
    async fn fund_into(&self, state: &mut RunState) -> anyhow::Result<()> {
        let (record, d, operator) = self.deployed(state)?;
        let mut wallets = Vec::new();
        for step in self.wallet_steps() {
            let (signer, key_file) = self.node_signer(step)?;
            let who = signer.address();
            let stake = wei(step.stake.unwrap_or(self.ctx.loaded.spec.nodes.stake));
            let have =
                operator.token_balance(&d, who).await? + operator.stake_info(&d, who).await?.active;
            let tokens = stake.saturating_sub(have);
            operator.top_up_gas(who, U256::from(GAS_WEI)).await?;
            operator
                .fund(&d, who, tokens, U256::ZERO)
                .await
                .with_context(|| format!("funding {} ({who})", step.name))?;
            println!(
                "funded {:<12} {who} +{} UNFED",
                step.name,
                format_amount(tokens)
            );
            wallets.push(WalletRecord {
                node: step.name.clone(),
                address: who.to_string(),
                stake: format_amount(stake),
                key_file,
            });
        }
        let mut client = None;
        if let Some(index) = self.ctx.plan.client_wallet {
            let signer = crate::launch::steps::client_signer(&self.ctx, index)?;
            let who = signer.address();
            let deposit = wei(self.ctx.loaded.spec.economics.client_deposit);
            let have =
                operator.token_balance(&d, who).await? + operator.client_balance(&d, who).await?;
            operator.top_up_gas(who, U256::from(GAS_WEI)).await?;
            operator
                .fund(&d, who, deposit.saturating_sub(have), U256::ZERO)
                .await
                .context("funding the dev client")?;
            println!(
                "funded {:<12} {who} +{} UNFED",
                "client",
                format_amount(deposit.saturating_sub(have))
            );
            client = Some(who.to_string());
        }
        let mut record = record;
        record.wallets = wallets;
        record.client = client.or(record.client);
        state.chain = Some(record);
        state.save(self.run_dir())
    }

    async fn stake(&self) -> anyhow::Result<()> {
        let mut state = self.state()?;
        self.stake_into(&mut state).await
    }

    async fn stake_into(&self, state: &mut RunState) -> anyhow::Result<()> {
        let (_, d, operator) = self.deployed(state)?;
        for step in self.wallet_steps() {
            let (signer, _) = self.node_signer(step)?;
            let who = signer.address();
            let target = wei(step.stake.unwrap_or(self.ctx.loaded.spec.nodes.stake));
            let node = operator.as_wallet(signer)?;
            let staked = node.stake_up_to(&d, target).await.with_context(|| {
                format!(
                    "staking {} for {} ({who}); if the wallet lacks tokens run `unfedctl chain fund {}`",
                    format_amount(target),
                    step.name,
                    self.spec_arg()
                )
            })?;
            let info = node.stake_info(&d, who).await?;
            println!(
                "staked {:<12} {who} +{} (stake {}, {})",
                step.name,
                format_amount(staked),
                format_amount(info.active),
                if info.eligible {
                    "eligible"
                } else {
                    "NOT eligible"
                }
            );
        }
        if let Some(index) = self.ctx.plan.client_wallet {
            let client =
                operator.as_wallet(crate::launch::steps::client_signer(&self.ctx, index)?)?;
            let target = wei(self.ctx.loaded.spec.economics.client_deposit);
            let have = client.client_balance(&d, client.address()).await?;
            if have < target {
                client
                    .deposit(&d, target - have)
                    .await
                    .context("the dev client's deposit")?;
            }
            println!("client deposit {} UNFED", format_amount(target.max(have)));
        }
        Ok(())
    }

    async fn status(&self, json: bool) -> anyhow::Result<()> {
        let state = self.state()?;
        let Some(record) = &state.chain else {
            bail!(
                "no chain recorded in {}: run `unfedctl chain up {}`",
                RunState::path(self.run_dir()).display(),
                self.spec_arg()
            );
        };
        let anvil = Self::anvil_alive(&state);
        let chain = self.operator_chain(record)?;
        let reachable = chain.chain_id().await.is_ok();
        let d = record.deployment().ok();
        let mut rows = Vec::new();
        if let (true, Some(d)) = (reachable, d) {
            let min = chain.min_stake(&d).await?;
            for w in &record.wallets {
                let who: Address = w.address.parse().context("bad wallet address in state")?;
                let info = chain.stake_info(&d, who).await?;
                let balance = chain.token_balance(&d, who).await?;
                rows.push(serde_json::json!({
                    "node": w.node, "address": w.address,
                    "stake": format_amount(info.active), "cooling": format_amount(info.cooling),
                    "balance": format_amount(balance), "eligible": info.eligible,
                    "min_stake": format_amount(min),
                }));
            }
            if let Some(c) = &record.client {
                let who: Address = c.parse().context("bad client address in state")?;
                rows.push(serde_json::json!({
                    "node": "client", "address": c,
                    "deposit": format_amount(chain.client_balance(&d, who).await?),
                    "balance": format_amount(chain.token_balance(&d, who).await?),
                }));
            }
        }
        if json {
            let out = serde_json::json!({
                "rpc_url": record.rpc_url, "chain_id": record.chain_id, "reachable": reachable,
                "anvil_pid": anvil, "token": record.token, "escrow": record.escrow,
                "operator": record.operator, "wallets": rows,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        println!(
            "chain    {} (chain id {}) {}",
            record.rpc_url,
            record.chain_id,
            match (reachable, anvil) {
                (true, Some(pid)) => format!("up, anvil pid {pid}"),
                (true, None) => "up".to_string(),
                (false, _) => "UNREACHABLE".to_string(),
            }
        );
        println!(
            "token    {}",
            record.token.as_deref().unwrap_or("(not deployed)")
        );
        println!(
            "escrow   {}",
            record.escrow.as_deref().unwrap_or("(not deployed)")
        );
        for r in rows {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            if r.get("deposit").is_some() {
                println!(
                    "  {:<12} {} deposit {} balance {}",
                    s("node"),
                    s("address"),
                    s("deposit"),
                    s("balance")
                );
            } else {
                println!(
                    "  {:<12} {} stake {} cooling {} balance {} {}",
                    s("node"),
                    s("address"),
                    s("stake"),
                    s("cooling"),
                    s("balance"),
                    if r["eligible"].as_bool() == Some(true) {
                        "eligible".to_string()
                    } else {
                        format!("NOT eligible (min stake {})", s("min_stake"))
                    }
                );
            }
        }
        Ok(())
    }

    async fn unstake(&self, node: &str, amount: &str) -> anyhow::Result<()> {
        let amount = unfed_chain::parse_amount(amount).context("--amount")?;
        let state = self.state()?;
        let (_, d, operator) = self.deployed(&state)?;
        let Some(step) = self.wallet_steps().find(|s| s.name == node) else {
            let names: Vec<&str> = self.wallet_steps().map(|s| s.name.as_str()).collect();
            bail!(
                "no staked node named {node:?} in {}; staked nodes: {}",
                self.spec_arg(),
                names.join(", ")
            );
        };
        let (signer, _) = self.node_signer(step)?;
        let wallet = operator.as_wallet(signer)?;
        wallet
            .request_unstake(&d, amount)
            .await
            .with_context(|| format!("requestUnstake for {node} ({})", wallet.address()))?;
        let info = wallet.stake_info(&d, wallet.address()).await?;
        println!(
            "{node} {}: stake {}, cooling {}, {}",
            wallet.address(),
            format_amount(info.active),
            format_amount(info.cooling),
            if info.eligible {
                "eligible"
            } else {
                "NOT eligible"
            }
        );
        Ok(())
    }

    fn down(&self) -> anyhow::Result<()> {
        let Some(mut state) = RunState::load(self.run_dir())? else {
            println!("no chain recorded for testnet '{}'", self.ctx.plan.name);
            return Ok(());
        };
        for p in state.processes.iter().filter(|p| p.kind == "anvil") {
            match p.now() {
                Now::Ours => {
                    unfed_chain::anvil::stop_pid(p.pid)?;
                    println!("stopped anvil (pid {})", p.pid);
                }
                Now::Gone => {}
                Now::Other(why) => println!("{}", left_alone(&p.name, p.pid, &why)),
            }
        }
        state.processes.retain(|p| p.kind != "anvil");
        if self.ctx.loaded.spec.chain.mode == ChainMode::Anvil {
            // The contracts lived in that Anvil; an external chain keeps them.
            state.chain = None;
        }
        state.save(self.run_dir())
    }

    fn deployed(&self, state: &RunState) -> anyhow::Result<(ChainRecord, Deployment, Chain)> {
        let record = state.chain.clone().with_context(|| {
            format!(
                "no chain recorded in {}: run `unfedctl chain up {}`",
                RunState::path(self.run_dir()).display(),
                self.spec_arg()
            )
        })?;
        let d = record
            .deployment()
            .with_context(|| format!("run `unfedctl chain deploy {}` first", self.spec_arg()))?;
        let chain = self.operator_chain(&record)?;
        Ok((record, d, chain))
    }

    fn operator_chain(&self, record: &ChainRecord) -> anyhow::Result<Chain> {
        Chain::connect(&record.rpc_url, crate::launch::steps::operator(&self.ctx)?)
    }

    fn wallet_steps(&self) -> impl Iterator<Item = &Step> {
        self.ctx.plan.steps.iter().filter(|s| s.wallet.is_some())
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.ctx.key_path(name)
    }

    /// The node's stake wallet: its configured key file, else a dev key written (0600)
    /// to keys/<node>.key.
    fn node_signer(&self, step: &Step) -> anyhow::Result<(PrivateKeySigner, PathBuf)> {
        if let Some(file) = &step.eth_key {
            return Ok((read_key_file(file)?, file.clone()));
        }
        let index = step
            .wallet
            .with_context(|| format!("{} has no wallet", step.name))?;
        let signer = dev_signer(index as u32)?;
        let path = self.key_path(&step.name);
        write_key_file(&path, &signer)?;
        Ok((signer, path))
    }

    fn spec_arg(&self) -> &str {
        &self.ctx.loaded.display_path
    }
}
