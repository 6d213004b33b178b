//! `unfed-node daemon`: command-line flags, turned into a [`DaemonConfig`] and run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use unfed_chain::{Address, Chain, Deployment};

use super::{DaemonConfig, Limits, Prices, Settler};

/// Environment variable naming the key file of the role's escrow duty (the daemon's
/// settler, the registry's slasher, the dashboard's faucet wallet).
pub const OPERATOR_KEY_FILE_ENV: &str = "UNFED_OPERATOR_KEY_FILE";

/// The cluster's per-token prices, as the daemon bills them and the dashboard quotes them.
#[derive(clap::Args)]
pub struct PriceArgs {
    /// Price per input (prompt) token, in token units.
    #[arg(long, default_value = "0.0001")]
    price_per_input_token: String,
    /// Price per output (generated) token, in token units.
    #[arg(long, default_value = "0.001")]
    price_per_output_token: String,
}

impl PriceArgs {
    pub fn prices(&self) -> Result<Prices> {
        Ok(Prices {
            input: unfed_chain::parse_amount(&self.price_per_input_token)
                .context("--price-per-input-token")?,
            output: unfed_chain::parse_amount(&self.price_per_output_token)
                .context("--price-per-output-token")?,
        })
    }
}

#[derive(clap::Args)]
pub struct DaemonArgs {
    #[arg(long, default_value_t = 50070)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Registry host:port (the daemon registers there and reads nodes' share keys).
    #[arg(long)]
    registry: String,
    /// The daemon's staked wallet (its node id); must match the stake key when one is set.
    #[arg(long)]
    eth_address: Option<String>,
    /// Node id when no --eth-address is given.
    #[arg(long)]
    node_id: Option<String>,
    /// The share chain's SQLite database (created if missing).
    #[arg(long, default_value = "chain.db")]
    db: PathBuf,
    /// host:port other processes dial (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    #[command(flatten)]
    tls: crate::net::TlsArgs,
    #[command(flatten)]
    health: crate::health::HealthArgs,
    /// A block is cut this often when shares are pending.
    #[arg(long, default_value_t = 10.0)]
    block_interval_secs: f64,
    /// A settlement summary covers this many blocks, or fewer once no block has been cut
    /// for this many intervals (so the last requests before a quiet spell are paid too).
    #[arg(long, default_value_t = 6)]
    settlement_blocks: u64,
    /// Shares stamped further ahead of the daemon's clock than this are refused.
    #[arg(long, default_value_t = 120)]
    max_skew_secs: u64,
    /// Shares older than this are refused; younger ones are accepted late (nodes keep
    /// them while the daemon is away).
    #[arg(long, default_value_t = 6 * 3600)]
    max_late_secs: u64,
    #[arg(long, default_value_t = 100_000)]
    max_shares_per_session: u64,
    /// Shares one node may submit per --window-secs.
    #[arg(long, default_value_t = 100_000)]
    max_shares_per_window: u64,
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    #[command(flatten)]
    prices: PriceArgs,
    /// The chain id spending vouchers must name, when no --chain-rpc tells it (the
    /// daemon then only records settlements).
    #[arg(long)]
    chain_id: Option<u64>,
    /// Chain RPC URL; with --escrow and the settler key, settlements are posted on-chain.
    #[arg(long)]
    chain_rpc: Option<String>,
    #[arg(long)]
    escrow: Option<String>,
    /// Token contract (informational; the escrow knows its token).
    #[arg(long)]
    token: Option<String>,
    /// File holding the escrow settler's private key (mode 0600): the key allowed to post
    /// and challenge settlements, nothing else.
    #[arg(long, env = OPERATOR_KEY_FILE_ENV)]
    operator_key_file: Option<PathBuf>,
    /// How often unfinished settlements are advanced.
    #[arg(long, default_value_t = 1.0)]
    settle_poll_secs: f64,
}

fn addr(flag: &str, v: &str) -> Result<Address> {
    v.parse().with_context(|| {
        format!("{flag} {v:?} is not an EVM address (0x followed by 40 hex digits)")
    })
}

fn secs(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{flag} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl DaemonArgs {
    fn settler(&self) -> Result<Option<Settler>> {
        match (&self.chain_rpc, &self.escrow, &self.operator_key_file) {
            (None, _, None) => Ok(None),
            (Some(rpc), Some(escrow), Some(key)) => {
                let signer = unfed_chain::read_key_file(key)
                    .with_context(|| format!("--operator-key-file {}", key.display()))?;
                let token = match &self.token {
                    Some(t) => addr("--token", t)?,
                    None => Address::ZERO,
                };
                let deployment = Deployment {
                    token,
                    escrow: addr("--escrow", escrow)?,
                };
                Ok(Some(Settler {
                    chain: Chain::connect(rpc, signer)?,
                    deployment,
                }))
            }
            _ => bail!(
                "on-chain settlement needs --chain-rpc, --escrow and the settler key (--operator-key-file or {OPERATOR_KEY_FILE_ENV}); pass all three, or none to only record settlements"
            ),
        }
    }

    /// Binds the port (printing `listening HOST:PORT`) and serves until SIGINT/SIGTERM.
    pub async fn run(self) -> Result<()> {
        let stake_key = unfed_chain::load_stake_key_from_env()?;
        if let (Some(key), Some(a)) = (&stake_key, &self.eth_address) {
            unfed_chain::keys::ensure_key_matches(key, a)?;
        }
        if stake_key.is_some() && self.eth_address.is_none() {
            bail!(
                "a stake key is configured but --eth-address is missing; pass the staked wallet's address"
            );
        }
        let prices = self.prices.prices()?;
        let escrow = self
            .escrow
            .as_deref()
            .map(|e| addr("--escrow", e))
            .transpose()?;
        let settler = self.settler()?;
        let limits = Limits {
            max_skew: Duration::from_secs(self.max_skew_secs),
            max_late: Duration::from_secs(self.max_late_secs),
            max_shares_per_session: self.max_shares_per_session,
            max_shares_per_window: self.max_shares_per_window,
            window: Duration::from_secs(self.window_secs.max(1)),
            ..Limits::default()
        };
        let net = self
            .tls
            .net(self.advertise.as_deref().unwrap_or(&self.host))?;
        let listener = crate::cli::bind(&self.host, self.port).await?;
        let health = self.health.start(&self.host).await?;
        let bound = listener.local_addr()?;
        let advertise = self.advertise.unwrap_or_else(|| bound.to_string());
        let node_id = self
            .eth_address
            .or(self.node_id)
            .unwrap_or_else(|| format!("daemon@{advertise}"));
        let cfg = DaemonConfig {
            db: self.db,
            node_id,
            advertise,
            registry: self.registry,
            heartbeat: Duration::from_secs(self.heartbeat_secs.max(1)),
            block_interval: secs("--block-interval-secs", self.block_interval_secs)?,
            settlement_blocks: self.settlement_blocks.max(1),
            limits,
            prices,
            chain_id: self.chain_id,
            escrow,
            settler,
            settle_poll: secs("--settle-poll-secs", self.settle_poll_secs)?,
            stake_key,
            share_key: crate::shares::generate_key(),
            net,
            health,
        };
        super::run(cfg, listener, crate::shutdown_signal()).await
    }
}
