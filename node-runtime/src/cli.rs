//! The `unfed-node` command line: one subcommand per role.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::{compute, registry, shutdown_signal};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;

/// UNFED node: run one role of the network (registry, compute, ...).
#[derive(Parser)]
#[command(name = "unfed-node", version, about)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    role: Role,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Role {
    /// Cluster coordinator: admission, heartbeats, discovery, readiness, manifests.
    Registry(RegistryArgs),
    /// Serve one text shard of a model.
    Compute(ComputeArgs),
    /// Share-chain daemon: validates compute shares, produces blocks, settles on-chain.
    Daemon(crate::daemon::args::DaemonArgs),
    /// Web dashboard: chat, network and chain views, wallet sign-in, faucet.
    Web(crate::web::args::WebArgs),
    /// One party (A or B) of the MPC pair that keeps shard 0's inputs private.
    Mpc(crate::mpc::role::MpcArgs),
}

#[derive(clap::Args)]
struct RegistryArgs {
    #[arg(long, default_value_t = 50050)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// cluster_config.json: chain_rpc_url, escrow_contract_address, daemon_required_count, ...
    #[arg(long)]
    cluster_config: Option<PathBuf>,
    /// Split output whose manifest (and tokenizer) the registry serves.
    #[arg(long)]
    shards_dir: Option<PathBuf>,
    /// Expected heartbeat interval; nodes silent for 3 intervals are dropped.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Chain RPC for stake-gated admission (overrides the cluster config).
    #[arg(long)]
    chain_rpc: Option<String>,
    /// Escrow contract address (overrides the cluster config).
    #[arg(long)]
    escrow: Option<String>,
    #[arg(long, default_value_t = 30)]
    stake_recheck_secs: u64,
    /// Healthy daemons a model needs to be READY (overrides the cluster config).
    #[arg(long)]
    daemon_required_count: Option<u32>,
    /// A model is READY only with an MPC node serving shard 0.
    #[arg(long, env = "UNFED_REQUIRE_MPC", value_parser = clap::builder::BoolishValueParser::new())]
    require_mpc: Option<bool>,
    /// he_dispute_rollout_stage: what a guilty fraud verdict does — shadow (record),
    /// soft (also exclude the node), enforced (also slash its stake on-chain).
    #[arg(long, value_enum, default_value = "enforced")]
    dispute_stage: crate::verify::adjudicate::Stage,
    /// The escrow slasher's key file (0600), for slashing in the enforced stage.
    #[arg(long, env = crate::daemon::args::OPERATOR_KEY_FILE_ENV)]
    operator_key_file: Option<PathBuf>,
    /// SQLite file keeping fraud exclusions across restarts (created if missing);
    /// without it they live in memory only.
    #[arg(long)]
    state_db: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::net::TlsArgs,
    #[command(flatten)]
    health: crate::health::HealthArgs,
}

#[derive(clap::Args)]
struct ComputeArgs {
    #[arg(long)]
    shard_index: u32,
    #[arg(long, default_value_t = 50051)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    shards_dir: PathBuf,
    /// Registry host:port; without it the node serves unregistered.
    #[arg(long)]
    registry: Option<String>,
    /// The node's staked EVM wallet (its node id); must match the stake key when one is set.
    #[arg(long)]
    eth_address: Option<String>,
    /// Node id when no --eth-address is given.
    #[arg(long)]
    node_id: Option<String>,
    /// host:port other processes dial (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// `smolvlm_vision` serves vision shard --shard-index of a vision-language model;
    /// other values (`smolvlm`, `qwen2`, ...) are accepted for compatibility with the
    /// original and the manifest decides the architecture.
    #[arg(long)]
    model_type: Option<String>,
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Timeout of a call to the next hop.
    #[arg(long, default_value_t = 30)]
    hop_timeout_secs: u64,
    /// Idle sessions are dropped after this long.
    #[arg(long, default_value_t = 300)]
    session_idle_secs: u64,
    /// Memory cap of all sessions' KV caches; the least recently used are evicted.
    #[arg(long, default_value_t = 2048)]
    kv_cache_mb: usize,
    /// Longest wait (microseconds) for other sessions' steps to join a batch; only
    /// while more sessions are active than have arrived (0: never wait).
    #[arg(long, default_value_t = 1000, env = "UNFED_BATCH_WAIT_US", value_parser = clap::value_parser!(u64).range(0..=1000))]
    batch_wait_us: u64,
    /// Most sessions' steps in one batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    batch_max: u64,
    /// Daemon host:port for compute shares (default: the daemon the registry lists).
    #[arg(long)]
    daemon: Option<String>,
    /// Directory that keeps undelivered compute shares and the key signing them, so
    /// paid work survives a daemon outage and a restart of this node.
    #[arg(long)]
    share_spool: Option<PathBuf>,
    /// Fraction of the neighbouring hops this node spot-checks by re-execution on an
    /// independent replica (0 disables; needs --registry).
    #[arg(long, env = "UNFED_SPOT_CHECK", default_value_t = 0.05, value_parser = fraction)]
    spot_check: f64,
    /// Test/demo only: cheat in this way. Refused unless --chain-rpc is a local Anvil.
    #[arg(long, value_enum)]
    cheat: Option<crate::verify::cheat::Cheat>,
    /// Chain RPC URL (checked to be a local Anvil before --cheat is allowed).
    #[arg(long)]
    chain_rpc: Option<String>,
    #[command(flatten)]
    billing: BillingArgs,
    #[command(flatten)]
    tls: crate::net::TlsArgs,
    #[command(flatten)]
    health: crate::health::HealthArgs,
}

/// Whether a node works only for paying sessions.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct BillingArgs {
    /// Refuse sessions without a spending voucher naming this node. Without it the node
    /// also serves unpaid sessions (the daemon pays only work done under a voucher).
    #[arg(long, env = "UNFED_REQUIRE_VOUCHER")]
    pub require_voucher: bool,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a fraction between 0 and 1")),
    }
}

/// Cheating is for tests and demos against a throwaway chain: the RPC must be on this
/// machine and answer with Anvil's chain id.
async fn ensure_local_anvil(cheat: crate::verify::cheat::Cheat, rpc: Option<&str>) -> Result<()> {
    let hint = "cheating modes only run against a local Anvil chain; start the testnet with [chain] mode = \"anvil\" and pass --chain-rpc http://127.0.0.1:PORT";
    let Some(rpc) = rpc else {
        let name = cheat
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        bail!("--cheat {name} needs --chain-rpc: {hint}");
    };
    unfed_chain::anvil::ensure_local(rpc)
        .await
        .map_err(|e| anyhow::anyhow!("--chain-rpc {e:#}: {hint}"))
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

pub(crate) async fn bind(host: &str, port: u16) -> Result<TcpListener> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .with_context(|| format!("--host {host} is not an IP address"))?;
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr}: is another process using port {port}? pick another --port"
        )
    })?;
    // One machine-readable line, so a launcher that passed --port 0 learns the port.
    println!("listening {}", listener.local_addr()?);
    Ok(listener)
}

async fn run_registry(a: RegistryArgs) -> Result<()> {
    let cluster = match &a.cluster_config {
        Some(p) => registry::ClusterConfig::load(p)?,
        None => registry::ClusterConfig::default(),
    };
    let rpc = a
        .chain_rpc
        .or(cluster.chain_rpc_url.clone())
        .filter(|s| !s.is_empty());
    let escrow = a
        .escrow
        .or(cluster.escrow_contract_address.clone())
        .filter(|s| !s.is_empty());
    let slasher = match (&rpc, &escrow, &a.operator_key_file) {
        (Some(rpc), Some(escrow), Some(key)) => {
            let signer = unfed_chain::read_key_file(key)
                .with_context(|| format!("--operator-key-file {}", key.display()))?;
            Some(crate::verify::adjudicate::Slasher {
                chain: unfed_chain::Chain::connect(rpc, signer)?,
                deployment: unfed_chain::Deployment {
                    token: unfed_chain::Address::ZERO,
                    escrow: escrow.parse().with_context(|| {
                        format!("escrow address {escrow:?} is not an EVM address")
                    })?,
                },
            })
        }
        (_, _, Some(_)) => bail!(
            "--operator-key-file is for slashing on-chain and needs the chain RPC URL and the escrow address too"
        ),
        _ => None,
    };
    if a.dispute_stage == crate::verify::adjudicate::Stage::Enforced && slasher.is_none() {
        tracing::info!("no operator key: guilty nodes are excluded but not slashed");
    }
    let admission = match (rpc, escrow) {
        (Some(rpc), Some(escrow)) => {
            let addr = escrow
                .parse()
                .with_context(|| format!("escrow address {escrow:?} is not an EVM address"))?;
            tracing::info!(rpc = %rpc, escrow = %escrow, "stake-gated admission on");
            Some(Arc::new(unfed_chain::AdmissionVerifier::new(
                &rpc,
                addr,
                Duration::from_secs(120),
            )?))
        }
        (None, None) => {
            tracing::info!("no chain configured: open admission");
            None
        }
        _ => bail!(
            "stake-gated admission needs both the chain RPC URL and the escrow address (--chain-rpc and --escrow, or chain_rpc_url and escrow_contract_address in the cluster config)"
        ),
    };
    let net = a.tls.net(&a.host)?;
    let config = registry::RegistryConfig {
        net,
        heartbeat: Duration::from_secs(a.heartbeat_secs.max(1)),
        shards_dir: a.shards_dir,
        require_mpc: a.require_mpc.or(cluster.require_mpc).unwrap_or(false),
        daemon_required_count: a
            .daemon_required_count
            .or(cluster.daemon_required_count)
            .unwrap_or(0),
        admission,
        stake_recheck: Duration::from_secs(a.stake_recheck_secs.max(1)),
        adjudicator: Arc::new(crate::verify::adjudicate::Adjudicator::new(
            a.dispute_stage,
            slasher,
        )),
        state: a
            .state_db
            .as_deref()
            .map(crate::exclusions::ExclusionStore::open)
            .transpose()?
            .map(Arc::new),
    };
    let listener = bind(&a.host, a.port).await?;
    // The registry is ready once it listens: it serves from its first accepted call.
    a.health.start(&a.host).await?.set_serving(true).await;
    registry::run(config, listener, shutdown_signal()).await
}

async fn run_compute(a: ComputeArgs) -> Result<()> {
    // `smolvlm_vision` selects the vision role; other values are informational.
    let vision = a.model_type.as_deref() == Some("smolvlm_vision");
    if let Some(t) = a.model_type.as_ref().filter(|_| !vision) {
        tracing::info!(model_type = %t, "--model-type is informational; the manifest decides the architecture");
    }
    let stake_key = unfed_chain::load_stake_key_from_env()?;
    if let (Some(key), Some(addr)) = (&stake_key, &a.eth_address) {
        unfed_chain::keys::ensure_key_matches(key, addr)?;
    }
    if stake_key.is_some() && a.eth_address.is_none() {
        bail!(
            "a stake key is configured but --eth-address is missing; pass the staked wallet's address"
        );
    }
    if let Some(cheat) = a.cheat {
        ensure_local_anvil(cheat, a.chain_rpc.as_deref()).await?;
        tracing::warn!(?cheat, "this node CHEATS (test/demo mode)");
    }
    let net = a.tls.net(a.advertise.as_deref().unwrap_or(&a.host))?;
    let listener = bind(&a.host, a.port).await?;
    let health = a.health.start(&a.host).await?;
    let bound = listener.local_addr()?;
    let advertise = a.advertise.unwrap_or_else(|| bound.to_string());
    let node_id = a
        .eth_address
        .or(a.node_id)
        .unwrap_or_else(|| format!("compute-{}@{advertise}", a.shard_index));
    let dir = a.shards_dir.clone();
    let index = a.shard_index;
    let cfg = compute::ComputeConfig {
        shards_dir: a.shards_dir,
        shard_index: a.shard_index,
        node_id,
        advertise,
        registry: a.registry,
        heartbeat: Duration::from_secs(a.heartbeat_secs.max(1)),
        hop_timeout: Duration::from_secs(a.hop_timeout_secs.max(1)),
        session_idle: Duration::from_secs(a.session_idle_secs.max(1)),
        kv_cap_bytes: a.kv_cache_mb << 20,
        stake_key,
        share_key: crate::share_spool::share_key(a.share_spool.as_deref())?,
        daemon: a.daemon,
        share_spool: a.share_spool,
        spot_check: a.spot_check,
        cheat: a.cheat,
        net,
        require_voucher: a.billing.require_voucher,
        health,
        batch: crate::engine::batcher::BatchConfig {
            wait: Duration::from_micros(a.batch_wait_us),
            max_steps: a.batch_max as usize,
            align: false,
        },
    };
    if vision {
        let shard = tokio::task::spawn_blocking(move || {
            crate::vision::service::load_vision_shard(&dir, index as usize)
        })
        .await??;
        tracing::info!(
            model = %shard.manifest.model_id,
            shard = index,
            layers = format!("[{}, {})", shard.entry.layer_start, shard.entry.layer_end),
            "vision shard loaded"
        );
        return crate::vision::service::run(cfg, shard, listener, shutdown_signal()).await;
    }
    let shard = tokio::task::spawn_blocking(move || compute::load_shard(&dir, index)).await??;
    tracing::info!(
        model = %shard.manifest.model_id,
        shard = index,
        layers = format!("[{}, {})", shard.entry.layer_start, shard.entry.layer_end),
        weight_mb = shard.model.weight_bytes() >> 20,
        "shard loaded"
    );
    compute::run(cfg, shard, listener, shutdown_signal()).await
}

/// Run `unfed-node` with these arguments (the first is the program name). Shared by the
/// `unfed-node` binary and `unfedctl node`, so one binary can run every role.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.role {
            Role::Registry(a) => run_registry(a).await,
            Role::Compute(a) => run_compute(a).await,
            Role::Daemon(a) => a.run().await,
            Role::Web(a) => a.run().await,
            Role::Mpc(a) => a.run().await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
