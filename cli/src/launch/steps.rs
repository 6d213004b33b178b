//! What each kind of step does when `up` reaches it.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use unfed_chain::{Address, Chain, EscrowParams, PrivateKeySigner, SlashDestination, U256};

use unfed_node::web::probe::Probe;
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::{DiscoverRequest, ListModelsRequest};

use super::node_cmd::NodeCommand;
use super::process;
use super::state::{ChainRecord, ProcessRecord, WalletRecord};
use crate::plan::{LaunchPlan, Step, StepKind};
use crate::spec::{LoadedSpec, TokenAmount};

/// Gas money each dev wallet gets on a chain where it has none.
const GAS_ETH_WEI: u128 = 1_000_000_000_000_000_000;

/// Everything steps share while `up` runs.
pub struct Context {
    pub loaded: LoadedSpec,
    pub plan: LaunchPlan,
    pub node: NodeCommand,
    /// How the launcher dials the nodes (TLS under the testnet CA, or plaintext).
    pub net: unfed_node::net::Net,
    /// The testnet CA issuing node certificates; `None` with `[testnet] tls = false`.
    pub pki: Option<super::pki::TestnetPki>,
    pub ready_timeout: Duration,
    /// Every process started so far, recorded the moment it is spawned (before it is
    /// ready), so an interrupted or failed launch can stop it too.
    pub running: std::sync::Mutex<Running>,
    /// Children die with this process (`up`, `test`); false for `chain up`, whose Anvil
    /// outlives the command.
    pub tied: bool,
    /// Relays in front of the nodes chaos slows or cuts (`unfedctl test`), or that a
    /// host's `delay_ms` slows.
    pub relays: super::relay::Relays,
    /// The `[[host]]` this launch runs as when it joined a testnet; `None`: the control
    /// host (or the only machine).
    pub host: Option<String>,
    /// The address this host's nodes listen on and are dialled at.
    pub bind: String,
}

/// Started processes in start order, with the child handles we can reap.
#[derive(Default)]
pub struct Running {
    pub processes: Vec<ProcessRecord>,
    pub children: Vec<Option<Child>>,
}

impl Running {
    fn add(&mut self, record: ProcessRecord, child: Option<Child>) -> usize {
        self.processes.push(record);
        self.children.push(child);
        self.processes.len() - 1
    }
}

impl Context {
    /// Whether this launch runs `step`: a joined host runs its own nodes and its own
    /// split, the control host everything else.
    pub fn runs_here(&self, step: &Step) -> bool {
        match &self.host {
            Some(host) => step.kind == StepKind::Split || self.plan.runs_on(step, Some(host)),
            None => self.plan.runs_on(step, None),
        }
    }

    /// The control host of a testnet whose other hosts run part of the plan.
    pub fn others_join_later(&self) -> bool {
        self.host.is_none() && self.plan.steps.iter().any(|s| !self.runs_here(s))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.plan.run_dir.join("logs").join(format!("{name}.log"))
    }
    pub fn key_path(&self, name: &str) -> PathBuf {
        self.plan.run_dir.join("keys").join(format!("{name}.key"))
    }
    /// Where a node keeps its undelivered shares: in the run, so a restart (by the
    /// supervisor) delivers what the dead process had signed.
    pub fn share_spool(&self, name: &str) -> PathBuf {
        self.plan.run_dir.join("spool").join(name)
    }
}

/// What a finished step leaves behind (its process, if any, is already in `Context::running`).
#[derive(Default)]
pub struct Outcome {
    pub port: Option<u16>,
    pub chain: Option<ChainRecord>,
    pub registry: Option<String>,
    pub model_id: Option<String>,
    /// The dashboard's URL (http or https).
    pub dashboard: Option<String>,
}

/// What earlier steps produced that later ones need.
#[derive(Clone, Default)]
pub struct Inputs {
    pub chain: Option<ChainRecord>,
    pub registry: Option<String>,
}

pub async fn run(ctx: &Context, step: &Step, inputs: Inputs) -> anyhow::Result<Outcome> {
    match step.kind {
        StepKind::Anvil => start_anvil(ctx, step).await,
        StepKind::Contracts => deploy(ctx, inputs).await,
        StepKind::FundStake => fund_and_stake(ctx, inputs).await,
        StepKind::Split => {
            let (dir, source) = (
                ctx.plan.shards_dir.clone(),
                model_source_dir(&ctx.loaded, &ctx.plan),
            );
            let loaded = ctx.loaded.clone();
            let model_id =
                tokio::task::spawn_blocking(move || split_cached(&loaded, &source, &dir)).await??;
            Ok(Outcome {
                model_id: Some(model_id),
                ..Outcome::default()
            })
        }
        StepKind::Registry => start_registry(ctx, step, inputs).await,
        StepKind::Compute => start_shard(ctx, step, inputs, false).await,
        StepKind::Vision => start_shard(ctx, step, inputs, true).await,
        StepKind::Daemon => start_daemon(ctx, step, inputs).await,
        StepKind::Web => start_web(ctx, step, inputs).await,
        StepKind::MpcB => start_mpc(ctx, step, inputs, None).await,
        StepKind::MpcA => {
            // Party A dials its B for every session: B of the same pair started first.
            let b_name = format!("mpc-b-{}", step.shard.unwrap_or(0));
            let b_port = ctx
                .running
                .lock()
                .unwrap()
                .processes
                .iter()
                .find(|p| p.kind == "mpc_b" && p.shard == step.shard)
                .and_then(|p| p.port)
                .with_context(|| format!("{b_name} is not running"))?;
            start_mpc(ctx, step, inputs, Some(format!("{}:{b_port}", ctx.bind))).await
        }
    }
}

async fn start_anvil(ctx: &Context, step: &Step) -> anyhow::Result<Outcome> {
    let chain = &ctx.loaded.spec.chain;
    let wallets = ctx.plan.steps.iter().filter(|s| s.wallet.is_some()).count() as u32 + 2;
    let log = ctx.log_path(&step.name);
    let anvil = unfed_chain::Anvil::start(&unfed_chain::AnvilOptions {
        port: step.port,
        block_time: (chain.block_time > 0).then_some(chain.block_time),
        chain_id: Some(chain.chain_id),
        accounts: Some(wallets.max(10)),
        log_file: Some(log.clone()),
        spawn: ctx
            .tied
            .then_some(process::spawn_tied as fn(_) -> std::io::Result<_>),
    })
    .await?;
    let record = ChainRecord {
        chain_id: anvil.chain_id(),
        ..ChainRecord::at(anvil.endpoint())
    };
    let port = anvil.port();
    let pid = anvil.detach();
    let process = ProcessRecord {
        name: step.name.clone(),
        kind: "anvil".into(),
        pid,
        port: Some(port),
        log,
        shard: None,
        eth_address: None,
        identity: super::pid::identity(pid),
        address: None,
    };
    ctx.running.lock().unwrap().add(process, None);
    Ok(Outcome {
        port: Some(port),
        chain: Some(record),
        ..Outcome::default()
    })
}

/// One key per duty, so that a process holding one can do nothing else: the admin
/// deploys and assigns roles (kept by `up`), the settler posts settlements (daemon),
/// the slasher slashes (registry), the faucet pays grants (dashboard, faucet on only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duty {
    Admin,
    Settler,
    Slasher,
    Faucet,
}

/// Dev wallets of the settler, slasher and faucet on Anvil: far past the node wallets,
/// not prefunded (`deploy` sends them gas).
pub(crate) const DEV_DUTY_WALLET: u32 = 1000;

impl Duty {
    fn name(self) -> &'static str {
        match self {
            Duty::Admin => "operator",
            Duty::Settler => "settler",
            Duty::Slasher => "slasher",
            Duty::Faucet => "faucet",
        }
    }

    fn spec_key(self) -> String {
        format!("{}_key_file", self.name())
    }
}

/// The key of `duty` and its file: the spec's, or (on Anvil) a dev key written 0600 to
/// keys/ (the admin's is never written: no process is given it).
fn duty_key(ctx: &Context, duty: Duty) -> anyhow::Result<(PrivateKeySigner, PathBuf)> {
    if let Some(file) = ctx.loaded.spec.chain.key_file(&duty.spec_key()) {
        let path = ctx.loaded.resolve(file);
        return Ok((unfed_chain::read_key_file(&path)?, path));
    }
    let path = ctx.key_path(duty.name());
    if duty == Duty::Admin {
        // The admin key stays with `up`: no process gets it, so it is not written out.
        let index = ctx.plan.operator_wallet.unwrap_or(0) as u32;
        return Ok((unfed_chain::dev_signer(index)?, path));
    }
    let signer = unfed_chain::dev_signer(DEV_DUTY_WALLET + duty as u32)?;
    unfed_chain::write_key_file(&path, &signer)?;
    Ok((signer, path))
}

pub(crate) fn operator(ctx: &Context) -> anyhow::Result<PrivateKeySigner> {
    Ok(duty_key(ctx, Duty::Admin)?.0)
}

/// The client's wallet: the spec's `chain.client_key_file`, else (Anvil) dev wallet
/// `index`; either way written 0600 to keys/client.key for `unfedctl client`.
pub(crate) fn client_signer(ctx: &Context, index: usize) -> anyhow::Result<PrivateKeySigner> {
    let signer = match &ctx.loaded.spec.chain.client_key_file {
        Some(file) => unfed_chain::read_key_file(&ctx.loaded.resolve(file))?,
        None => unfed_chain::dev_signer(index as u32)?,
    };
    unfed_chain::write_key_file(&ctx.key_path("client"), &signer)?;
    Ok(signer)
}

/// Whether the dashboard's faucet is switched on for this `up` (its environment).
fn faucet_on() -> bool {
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    unfed_node::web::args::truthy(&env, unfed_node::web::args::FAUCET_ENABLED_ENV, false)
}

/// Tokens the dev faucet wallet starts with (a grant is 10 by default).
const FAUCET_FLOAT_TOKENS: u64 = 100_000;

/// A spec amount in the token's smallest units.
pub(crate) fn wei(amount: TokenAmount) -> U256 {
    U256::from(amount.wei())
}

fn chain_input(inputs: &Inputs, ctx: &Context) -> anyhow::Result<ChainRecord> {
    if let Some(chain) = &inputs.chain {
        return Ok(chain.clone());
    }
    let spec = &ctx.loaded.spec.chain;
    let rpc_url = spec
        .rpc_url
        .clone()
        .context("no chain: chain.rpc_url is not set")?;
    Ok(ChainRecord::at(rpc_url))
}

async fn deploy(ctx: &Context, inputs: Inputs) -> anyhow::Result<Outcome> {
    let mut record = chain_input(&inputs, ctx)?;
    let econ = &ctx.loaded.spec.economics;
    let operator = operator(ctx)?;
    let chain = Chain::connect(&record.rpc_url, operator)?;
    if record.chain_id == 0 {
        record.chain_id = chain.chain_id().await?;
    }
    let daemon = &ctx.loaded.spec.daemon;
    // Work done just before a withdrawal request is settled within one settlement
    // interval and can be challenged within the window: the money waits for both.
    let settle_interval = daemon.block_interval_seconds * daemon.settlement_blocks.max(1);
    let deployment = chain
        .deploy(&EscrowParams {
            min_stake: wei(econ.min_stake),
            cooldown_secs: econ.cooldown_seconds,
            challenge_window_secs: econ.challenge_window_seconds,
            withdraw_delay_secs: econ.challenge_window_seconds + settle_interval,
            slash_destination: SlashDestination::Pool,
            slash_bps: econ.slash_bps(),
            ..EscrowParams::default()
        })
        .await
        .context("deploying UnfedToken + UnfedEscrow")?;
    let (settler, _) = duty_key(ctx, Duty::Settler)?;
    let (slasher, _) = duty_key(ctx, Duty::Slasher)?;
    chain
        .assign_roles(&deployment, settler.address(), slasher.address())
        .await
        .context("handing the settler and slasher roles to their keys")?;
    for who in [settler.address(), slasher.address()] {
        let eth = gas_needed(&chain, who).await?;
        chain
            .fund(&deployment, who, U256::ZERO, eth)
            .await
            .with_context(|| format!("sending gas money to {who}"))?;
    }
    if faucet_on() {
        let (faucet, _) = duty_key(ctx, Duty::Faucet)?;
        let who = faucet.address();
        let float = U256::from(FAUCET_FLOAT_TOKENS) * U256::from(10).pow(U256::from(18));
        let have = chain.token_balance(&deployment, who).await?;
        let eth = gas_needed(&chain, who).await?;
        chain
            .fund(&deployment, who, float.saturating_sub(have), eth)
            .await
            .context("funding the faucet wallet")?;
    }
    record.token = Some(deployment.token.to_string());
    record.escrow = Some(deployment.escrow.to_string());
    record.operator = Some(chain.address().to_string());
    Ok(Outcome {
        chain: Some(record),
        ..Outcome::default()
    })
}

/// The signer of a node's stake wallet; dev keys are written to keys/<name>.key (0600).
fn node_signer(ctx: &Context, step: &Step) -> anyhow::Result<(PrivateKeySigner, PathBuf)> {
    if let Some(file) = &step.eth_key {
        return Ok((unfed_chain::read_key_file(file)?, file.clone()));
    }
    let index = step.wallet.context("node without a wallet")? as u32;
    let signer = unfed_chain::dev_signer(index)?;
    let path = ctx.key_path(&step.name);
    unfed_chain::write_key_file(&path, &signer)?;
    Ok((signer, path))
}

async fn fund_and_stake(ctx: &Context, inputs: Inputs) -> anyhow::Result<Outcome> {
    let mut record = inputs.chain.clone().context("no chain to stake on")?;
    let deployment = record.deployment()?;
    let operator = Chain::connect(&record.rpc_url, operator(ctx)?)?;
    let mut wallets = Vec::new();
    // Nodes of joined hosts bring their own wallets (see `join`).
    let here = ctx.plan.steps.iter().filter(|s| ctx.runs_here(s));
    for step in here.filter(|s| s.wallet.is_some()) {
        let (signer, key_file) = node_signer(ctx, step)?;
        let stake = step.stake.unwrap_or(ctx.loaded.spec.nodes.stake);
        let who = signer.address();
        let eth = gas_needed(&operator, who).await?;
        operator
            .fund(&deployment, who, wei(stake), eth)
            .await
            .with_context(|| format!("funding {} ({who})", step.name))?;
        let node = operator.as_wallet(signer)?;
        node.stake(&deployment, wei(stake))
            .await
            .with_context(|| format!("staking for {} ({who})", step.name))?;
        wallets.push(WalletRecord {
            node: step.name.clone(),
            address: who.to_string(),
            stake: stake.to_string(),
            key_file,
        });
    }
    if let Some(index) = ctx.plan.client_wallet {
        let client = client_signer(ctx, index)?;
        let who = client.address();
        let deposit = wei(ctx.loaded.spec.economics.client_deposit);
        let eth = gas_needed(&operator, who).await?;
        operator
            .fund(&deployment, who, deposit, eth)
            .await
            .context("funding the dev client")?;
        operator
            .as_wallet(client)?
            .deposit(&deployment, deposit)
            .await
            .context("the dev client's deposit")?;
        record.client = Some(who.to_string());
    }
    record.wallets = wallets;
    Ok(Outcome {
        chain: Some(record),
        ..Outcome::default()
    })
}

/// ETH to send `who` so it can pay for its own transactions (Anvil's dev wallets have plenty).
async fn gas_needed(chain: &Chain, who: Address) -> anyhow::Result<U256> {
    let gas = U256::from(GAS_ETH_WEI);
    Ok(if chain.eth_balance(who).await? >= gas {
        U256::ZERO
    } else {
        gas
    })
}

/// Where the unsplit model is: the spec's HF directory, or where the built-in one is written.
pub fn model_source_dir(loaded: &LoadedSpec, plan: &LaunchPlan) -> PathBuf {
    match &loaded.spec.model.path {
        Some(path) => loaded.resolve(path),
        None => plan.shards_dir.with_file_name("builtin-tiny"),
    }
}

/// Split the spec's model into `dir`, unless `dir` already holds a split of the same source.
pub(crate) fn split_cached(
    loaded: &LoadedSpec,
    source_dir: &Path,
    dir: &Path,
) -> anyhow::Result<String> {
    let spec = &loaded.spec;
    let shape = format!(
        "text={} vision={}\n",
        spec.model.text_shards, spec.model.vision_shards
    );
    let stamp = match &spec.model.path {
        Some(_) => shape + &source_stamp(source_dir)?,
        // Deterministic for a given unfedctl version, so the version is its identity.
        None => format!("{shape}builtin:tiny {}\n", env!("CARGO_PKG_VERSION")),
    };
    let stamp_file = dir.join(".source-stamp");
    let cached = std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str());
    // A split made by a build with another manifest format is made again.
    if cached && let Ok(manifest) = unfed_model::Manifest::load_current(dir) {
        return Ok(manifest.model_id);
    }
    for stale in [Some(dir), spec.model.path.is_none().then_some(source_dir)]
        .into_iter()
        .flatten()
    {
        if stale.exists() {
            std::fs::remove_dir_all(stale)
                .with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    if spec.model.path.is_none() {
        unfed_model::builtin::write_tiny(source_dir).context("writing the built-in model")?;
    }
    let options = unfed_model::split::SplitOptions {
        text_shards: spec.model.text_shards,
        vision_shards: Some(spec.model.vision_shards),
        model_id: None,
        progress: false,
    };
    let manifest = unfed_model::split::split(source_dir, dir, &options)?;
    std::fs::write(&stamp_file, stamp)?;
    Ok(manifest.model_id)
}

/// Identifies a checkpoint directory by its files' names, sizes and mtimes.
fn source_stamp(dir: &Path) -> anyhow::Result<String> {
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the model directory {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let mtime = meta
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            let name = e.file_name();
            Some(format!(
                "{}:{}:{}",
                name.to_string_lossy(),
                meta.len(),
                mtime.as_nanos()
            ))
        })
        .collect();
    entries.sort();
    Ok(entries.join("\n") + "\n")
}

/// When a node counts as ready, beyond listening on its port.
enum Readiness {
    /// The registry answers ListModels.
    Answers,
    /// The registry at this address lists the node (admitted, stake checked).
    ListedBy(String),
    /// The dashboard answers `GET /api/config` with 200 (over HTTPS with `[web] tls`).
    Http(Probe),
}

impl Readiness {
    async fn reached(&self, net: &unfed_node::net::Net, addr: &str) -> bool {
        let registry = match self {
            Readiness::Answers => addr,
            Readiness::ListedBy(registry) => registry,
            Readiness::Http(probe) => {
                return probe
                    .get(addr, "/api/config")
                    .await
                    .is_ok_and(|r| r.status == 200);
            }
        };
        let Ok(ch) = net
            .connect(registry, unfed_node::net::REQUEST_TIMEOUT, None)
            .await
        else {
            return false;
        };
        let mut client = RegistryClient::new(ch);
        match self {
            Readiness::Answers => client.list_models(ListModelsRequest {}).await.is_ok(),
            Readiness::Http(_) => false,
            Readiness::ListedBy(_) => client
                .discover(DiscoverRequest {
                    model: String::new(),
                })
                .await
                .map(|r| r.into_inner().nodes.iter().any(|n| n.address == addr))
                .unwrap_or(false),
        }
    }
}

/// Start a node process and wait until it listens and `readiness` holds; the process is
/// recorded in `ctx.running` as soon as it exists.
async fn spawn_node(
    ctx: &Context,
    step: &Step,
    kind: &str,
    mut cmd: std::process::Command,
    eth_address: Option<String>,
    readiness: Readiness,
) -> anyhow::Result<(u16, String)> {
    let log = ctx.log_path(&step.name);
    let relay = ctx.relays.front(&step.name).await?;
    if let Some(relay) = &relay {
        cmd.arg("--advertise").arg(relay.addr.to_string());
    }
    if kind != "web" {
        // The dashboard binds the spec's web.host instead.
        cmd.arg("--host").arg(&ctx.bind);
    }
    if let Some(pki) = &ctx.pki {
        // Every node serves TLS with its own certificate; the dashboard only dials.
        if kind != "web" {
            let mut names = vec!["127.0.0.1", "localhost"];
            if !names.contains(&ctx.bind.as_str()) {
                names.push(&ctx.bind);
            }
            let files = pki.issue(&step.name, &names)?;
            cmd.arg("--tls-cert").arg(&files.cert);
            cmd.arg("--tls-key").arg(&files.key);
        }
        cmd.arg("--tls-ca").arg(pki.ca_path());
    }
    cmd.arg("--port").arg(step.port.unwrap_or(0).to_string());
    cmd.arg("--log-format")
        .arg(&ctx.loaded.spec.testnet.log_format);
    let mut child = process::spawn(cmd, &log)?;
    let record = ProcessRecord {
        name: step.name.clone(),
        kind: kind.into(),
        pid: child.id(),
        port: step.port,
        log: log.clone(),
        shard: step.shard,
        eth_address,
        identity: super::pid::identity(child.id()),
        address: None,
    };
    let slot = ctx.running.lock().unwrap().add(record, None);
    let deadline = Instant::now() + ctx.ready_timeout;
    let result = loop {
        if let Some(status) = child.try_wait()? {
            let message = format!("{} exited ({status}) before it was ready", step.name);
            break Err(StepFailed { log, message });
        }
        if let Some(addr) = listening_address(&log) {
            // Peers dial the relay when there is one: that is the address to check.
            let advertised = match &relay {
                Some(relay) => {
                    relay.set_upstream(addr.parse().context("the node's listening address")?);
                    relay.addr.to_string()
                }
                None => addr,
            };
            if readiness.reached(&ctx.net, &advertised).await {
                break Ok(advertised);
            }
        }
        if Instant::now() > deadline {
            let message = match (listening_address(&log), &readiness) {
                (None, _) => format!(
                    "{} did not start listening within {:?}",
                    step.name, ctx.ready_timeout
                ),
                (Some(_), Readiness::Answers | Readiness::Http(_)) => {
                    format!(
                        "{} did not answer within {:?}",
                        step.name, ctx.ready_timeout
                    )
                }
                (Some(_), Readiness::ListedBy(r)) => format!(
                    "{} was not admitted by the registry at {r} within {:?} (see the registry's log too)",
                    step.name, ctx.ready_timeout
                ),
            };
            break Err(StepFailed { log, message });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let mut running = ctx.running.lock().unwrap();
    running.children[slot] = Some(child);
    let addr = result?;
    // The node's own port (restarts reuse it), whatever address peers dial.
    let port = listening_address(&running.processes[slot].log)
        .and_then(|a| a.rsplit(':').next().and_then(|p| p.parse().ok()))
        .unwrap_or_default();
    running.processes[slot].port = Some(port);
    running.processes[slot].address = Some(addr.clone());
    Ok((port, addr))
}

/// `[web] tls = true` without the testnet CA (the spec check refuses it first).
const WEB_TLS_NEEDS_CA: &str =
    "web.tls = true needs testnet.tls = true: the testnet CA issues the dashboard's certificate";

/// How `up` reaches the dashboard: HTTPS trusting the testnet CA with `[web] tls`.
pub fn dashboard_probe(ctx: &Context) -> anyhow::Result<Probe> {
    if !ctx.loaded.spec.web.tls {
        return Ok(Probe::plain());
    }
    Probe::https(&ctx.pki.as_ref().context(WEB_TLS_NEEDS_CA)?.ca_path())
}

/// With `[web] tls`, the dashboard's HTTPS certificate from the testnet CA, for loopback
/// and the address it binds.
fn issue_web_https(ctx: &Context) -> anyhow::Result<Option<unfed_node::net::TlsFiles>> {
    let web = &ctx.loaded.spec.web;
    if !web.tls {
        return Ok(None);
    }
    let pki = ctx.pki.as_ref().context(WEB_TLS_NEEDS_CA)?;
    let mut hosts = vec!["127.0.0.1", "localhost"];
    let every_interface = web
        .host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    if !hosts.contains(&web.host.as_str()) && !every_interface {
        hosts.push(&web.host);
    }
    pki.issue("web-https", &hosts).map(Some)
}

/// The URL a person opens: the bind host, or loopback when it binds every interface.
fn dashboard_url(scheme: &str, host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => format!("{scheme}://127.0.0.1:{port}/"),
        Ok(ip) => format!("{scheme}://{}/", std::net::SocketAddr::new(ip, port)),
        Err(_) => format!("{scheme}://{host}:{port}/"),
    }
}

/// Nodes print `listening HOST:PORT` once bound (the port is real even for --port 0).
fn listening_address(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("listening ").map(|a| a.trim().to_string()))
}

/// A step failure whose log the user should read.
#[derive(Debug)]
pub struct StepFailed {
    pub log: PathBuf,
    pub message: String,
}

impl std::fmt::Display for StepFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepFailed {}

async fn start_registry(ctx: &Context, step: &Step, inputs: Inputs) -> anyhow::Result<Outcome> {
    let mut cmd = ctx.node.role("registry");
    cmd.arg("--shards-dir").arg(&ctx.plan.shards_dir);
    cmd.arg("--heartbeat-secs")
        .arg(ctx.loaded.spec.nodes.heartbeat_seconds.to_string());
    let daemons = ctx
        .plan
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Daemon)
        .count();
    cmd.arg("--daemon-required-count").arg(daemons.to_string());
    cmd.arg("--dispute-stage")
        .arg(&ctx.loaded.spec.economics.he_dispute_rollout_stage);
    if ctx.plan.steps.iter().any(|s| s.kind == StepKind::MpcA) {
        // READY then needs the pair (reason missing_mpc until both parties are live).
        cmd.args(["--require-mpc", "true"]);
    }
    if let Some(chain) = &inputs.chain {
        cmd.arg("--chain-rpc").arg(&chain.rpc_url);
        cmd.arg("--escrow")
            .arg(chain.escrow.as_deref().context("escrow not deployed")?);
        // The registry slashes proven cheaters with the slasher key, nothing else.
        cmd.arg("--operator-key-file")
            .arg(duty_key(ctx, Duty::Slasher)?.1);
        // Exclusions outlive a registry restart.
        cmd.arg("--state-db")
            .arg(ctx.plan.run_dir.join("registry-state.db"));
    }
    let (port, addr) = spawn_node(ctx, step, "registry", cmd, None, Readiness::Answers).await?;
    Ok(Outcome {
        port: Some(port),
        registry: Some(addr),
        ..Outcome::default()
    })
}

/// A compute node for one text shard, or (`vision`) for one vision shard: the user
/// guide's `--model-type smolvlm_vision`.
async fn start_shard(
    ctx: &Context,
    step: &Step,
    inputs: Inputs,
    vision: bool,
) -> anyhow::Result<Outcome> {
    let registry = inputs
        .registry
        .clone()
        .context("the registry is not running")?;
    let mut cmd = ctx.node.role("compute");
    cmd.arg("--shard-index")
        .arg(step.shard.unwrap_or(0).to_string());
    if vision {
        cmd.args(["--model-type", "smolvlm_vision"]);
    }
    cmd.arg("--shards-dir").arg(&ctx.plan.shards_dir);
    cmd.arg("--registry").arg(&registry);
    cmd.arg("--heartbeat-secs")
        .arg(ctx.loaded.spec.nodes.heartbeat_seconds.to_string());
    if !vision {
        cmd.arg("--spot-check")
            .arg(ctx.loaded.spec.nodes.spot_check.to_string());
        cmd.arg("--share-spool").arg(ctx.share_spool(&step.name));
    }
    if let Some(cheat) = &step.cheat {
        cmd.arg("--cheat").arg(cheat);
        if let Some(chain) = &inputs.chain {
            cmd.arg("--chain-rpc").arg(&chain.rpc_url);
        }
    }
    require_voucher(ctx, &mut cmd, &inputs);
    let eth_address = stake_identity(&mut cmd, step, &inputs);
    let readiness = Readiness::ListedBy(registry);
    let kind = if vision { "vision" } else { "compute" };
    let (port, _) = spawn_node(ctx, step, kind, cmd, eth_address, readiness).await?;
    Ok(Outcome {
        port: Some(port),
        ..Outcome::default()
    })
}

/// A staked node runs as its wallet (--eth-address + the key file in the environment);
/// without a chain it is known by its step name.
fn stake_identity(cmd: &mut std::process::Command, step: &Step, inputs: &Inputs) -> Option<String> {
    cmd.env_remove(unfed_chain::STAKE_KEY_ENV);
    let wallet = inputs
        .chain
        .as_ref()
        .and_then(|c| c.wallets.iter().find(|w| w.node == step.name));
    match wallet {
        Some(w) => {
            cmd.arg("--eth-address").arg(&w.address);
            cmd.env(unfed_chain::STAKE_KEY_FILE_ENV, &w.key_file);
            Some(w.address.clone())
        }
        None => {
            cmd.arg("--node-id").arg(&step.name);
            None
        }
    }
}

/// The spec's per-token prices, for the roles that bill or quote them.
fn price_args(cmd: &mut std::process::Command, spec: &crate::spec::TestnetSpec) {
    cmd.arg("--price-per-input-token")
        .arg(spec.economics.price_per_input_token.to_string());
    cmd.arg("--price-per-output-token")
        .arg(spec.economics.price_per_output_token.to_string());
}

/// The chain and the deployed contracts, for the roles that read or pay on them.
fn contract_args(cmd: &mut std::process::Command, chain: &ChainRecord) -> anyhow::Result<()> {
    cmd.arg("--chain-rpc").arg(&chain.rpc_url);
    cmd.arg("--escrow")
        .arg(chain.escrow.as_deref().context("escrow not deployed")?);
    if let Some(token) = &chain.token {
        cmd.arg("--token").arg(token);
    }
    Ok(())
}

/// The share-chain daemon: records every hop's share, cuts blocks, and (with a chain)
/// settles usage at the spec's prices from the dev client's deposit.
async fn start_daemon(ctx: &Context, step: &Step, inputs: Inputs) -> anyhow::Result<Outcome> {
    let registry = inputs
        .registry
        .clone()
        .context("the registry is not running")?;
    let spec = &ctx.loaded.spec;
    let mut cmd = ctx.node.role("daemon");
    cmd.arg("--registry").arg(&registry);
    cmd.arg("--db").arg(ctx.plan.run_dir.join("chain.db"));
    cmd.arg("--heartbeat-secs")
        .arg(spec.nodes.heartbeat_seconds.to_string());
    cmd.arg("--block-interval-secs")
        .arg(spec.daemon.block_interval_seconds.to_string());
    cmd.arg("--settlement-blocks")
        .arg(spec.daemon.settlement_blocks.to_string());
    price_args(&mut cmd, spec);
    if let Some(chain) = &inputs.chain {
        contract_args(&mut cmd, chain)?;
        // The daemon posts and challenges settlements with the settler key only.
        cmd.arg("--operator-key-file")
            .arg(duty_key(ctx, Duty::Settler)?.1);
    }
    let eth_address = stake_identity(&mut cmd, step, &inputs);
    let readiness = Readiness::ListedBy(registry);
    let (port, _) = spawn_node(ctx, step, "daemon", cmd, eth_address, readiness).await?;
    Ok(Outcome {
        port: Some(port),
        ..Outcome::default()
    })
}

/// On a testnet that pays for work (a chain and a daemon), nodes work only under a
/// client's spending voucher.
fn require_voucher(ctx: &Context, cmd: &mut std::process::Command, inputs: &Inputs) {
    let pays = inputs.chain.is_some()
        && ctx
            .plan
            .steps
            .iter()
            .any(|s| s.kind == crate::plan::StepKind::Daemon);
    if pays {
        cmd.arg("--require-voucher");
    }
}

/// The dashboard, started last: it reads the registry, the daemon (through the
/// registry), the chain, and bills chats at the spec's prices.
async fn start_web(ctx: &Context, step: &Step, inputs: Inputs) -> anyhow::Result<Outcome> {
    let registry = inputs
        .registry
        .clone()
        .context("the registry is not running")?;
    let spec = &ctx.loaded.spec;
    let mut cmd = ctx.node.role("web");
    cmd.arg("--host").arg(&spec.web.host);
    cmd.arg("--registry").arg(&registry);
    cmd.arg("--db").arg(ctx.plan.run_dir.join("web.db"));
    // Public parameters of the MPC pair's layers, fetched once per testnet.
    cmd.arg("--public-cache")
        .arg(ctx.plan.run_dir.join("public-cache"));
    if spec.mpc.output == crate::spec::MpcOutput::DecodeClientSample {
        cmd.arg("--decode-client-sample");
    }
    price_args(&mut cmd, spec);
    if let Some(files) = issue_web_https(ctx)? {
        cmd.arg("--https-cert").arg(&files.cert);
        cmd.arg("--https-key").arg(&files.key);
    }
    if let Some(chain) = &inputs.chain {
        contract_args(&mut cmd, chain)?;
        // Only a switched-on faucet gets a key: its own token wallet, no escrow role.
        cmd.env_remove(unfed_node::daemon::args::OPERATOR_KEY_FILE_ENV);
        if faucet_on() {
            cmd.arg("--operator-key-file")
                .arg(duty_key(ctx, Duty::Faucet)?.1);
        }
        if chain.client.is_some() {
            // Demo sessions pay as the dev client, signing its vouchers.
            cmd.arg("--demo-wallet-key-file")
                .arg(ctx.key_path("client"));
        }
    }
    let probe = dashboard_probe(ctx)?;
    let scheme = probe.scheme();
    let (port, _) = spawn_node(ctx, step, "web", cmd, None, Readiness::Http(probe)).await?;
    Ok(Outcome {
        port: Some(port),
        dashboard: Some(dashboard_url(scheme, &spec.web.host, port)),
        ..Outcome::default()
    })
}

/// One party of an MPC pair: B (no `peer`) or A (dialing B at `peer`).
async fn start_mpc(
    ctx: &Context,
    step: &Step,
    inputs: Inputs,
    peer: Option<String>,
) -> anyhow::Result<Outcome> {
    let registry = inputs
        .registry
        .clone()
        .context("the registry is not running")?;
    let spec = &ctx.loaded.spec;
    let mut cmd = ctx.node.role("mpc");
    cmd.args(["--role", if peer.is_some() { "A" } else { "B" }]);
    if let Some(peer) = &peer {
        cmd.arg("--peer").arg(peer);
    }
    cmd.arg("--shards-dir").arg(&ctx.plan.shards_dir);
    cmd.arg("--registry").arg(&registry);
    cmd.arg("--heartbeat-secs")
        .arg(spec.nodes.heartbeat_seconds.to_string());
    cmd.arg("--share-spool").arg(ctx.share_spool(&step.name));
    if spec.mpc.output == crate::spec::MpcOutput::FullOutput2pc {
        cmd.arg("--full-output");
    } else if let Some(layers) = &step.layers {
        cmd.arg("--layers").arg(layers.len().to_string());
    }
    require_voucher(ctx, &mut cmd, &inputs);
    let eth_address = stake_identity(&mut cmd, step, &inputs);
    let kind = if peer.is_some() { "mpc_a" } else { "mpc_b" };
    let readiness = Readiness::ListedBy(registry);
    let (port, _) = spawn_node(ctx, step, kind, cmd, eth_address, readiness).await?;
    Ok(Outcome {
        port: Some(port),
        ..Outcome::default()
    })
}
