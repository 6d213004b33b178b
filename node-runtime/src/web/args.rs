//! `unfed-node web`: flags and environment switches, checked and turned into the
//! server's state.

use crate::client::private::{PublicParams, PublicSource};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use unfed_chain::{Address, Chain, Deployment};

use super::auth::Auth;
use super::faucet::{Faucet, FaucetPolicy};
use super::origin::{PublicHost, SameOrigin};
use super::server::{ChainAccess, Switches, WebState};
use crate::daemon::args::{OPERATOR_KEY_FILE_ENV, PriceArgs};

/// The dashboard's switches (`unfedctl preflight web` reads the same variables).
pub const DEV_AUTH_BYPASS_ENV: &str = "UNFED_DEV_AUTH_BYPASS";
pub const DEMO_AUTH_ENV: &str = "UNFED_DEMO_AUTH";
pub const FAUCET_ENABLED_ENV: &str = "UNFED_FAUCET_ENABLED";
pub const FAUCET_REQUIRE_AUTH_ENV: &str = "UNFED_FAUCET_REQUIRE_AUTH";
pub const HTTPS_CERT_ENV: &str = "UNFED_WEB_TLS_CERT";
pub const HTTPS_KEY_ENV: &str = "UNFED_WEB_TLS_KEY";

#[derive(clap::Args)]
pub struct WebArgs {
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Bind address. A non-loopback address is refused while an auth bypass is on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Serve HTTPS with this certificate (PEM); needs --https-key. (--tls-* are the
    /// dashboard's links to the network, not its own HTTPS.)
    #[arg(long, env = HTTPS_CERT_ENV, value_name = "PATH")]
    https_cert: Option<PathBuf>,
    /// The HTTPS certificate's private key (PEM, mode 0600).
    #[arg(long, env = HTTPS_KEY_ENV, value_name = "PATH")]
    https_key: Option<PathBuf>,
    /// Another name browsers reach the dashboard at (NAME, or NAME:PORT), e.g. behind a
    /// proxy; requests naming any other host are refused (DNS rebinding). Repeatable.
    #[arg(long, value_name = "NAME", value_parser = PublicHost::parse)]
    public_host: Vec<PublicHost>,
    /// Registry host:port.
    #[arg(long)]
    registry: String,
    /// The dashboard dials the network: --tls-ca alone is enough.
    #[command(flatten)]
    tls: crate::net::TlsArgs,
    /// Share-chain daemon host:port (default: the daemon the registry lists).
    #[arg(long)]
    daemon: Option<String>,
    /// Chain RPC URL, for balances, stakes and the faucet.
    #[arg(long)]
    chain_rpc: Option<String>,
    #[arg(long)]
    escrow: Option<String>,
    /// Token contract (the faucet pays in it).
    #[arg(long)]
    token: Option<String>,
    /// The faucet's paying wallet: its own token wallet's key file (0600), no escrow role.
    #[arg(long, env = OPERATOR_KEY_FILE_ENV)]
    operator_key_file: Option<PathBuf>,
    #[command(flatten)]
    prices: PriceArgs,
    /// SQLite database of the faucet's grants (created if missing).
    #[arg(long, default_value = "web.db")]
    db: PathBuf,
    /// Tokens one faucet grant deposits.
    #[arg(long, default_value = "10")]
    faucet_amount: String,
    #[arg(long, default_value_t = 86_400)]
    faucet_cooldown_secs: u64,
    /// The wallet demo sign-in uses (only with UNFED_DEMO_AUTH=1).
    #[arg(long)]
    demo_wallet: Option<String>,
    /// The demo wallet's key file (mode 0600): demo sessions then sign spending vouchers
    /// with it, so their chats are paid (a testnet's dev client). Implies --demo-wallet.
    #[arg(long)]
    demo_wallet_key_file: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    challenge_ttl_secs: u64,
    #[arg(long, default_value_t = 3600)]
    session_ttl_secs: u64,
    /// Where the public parameters (embedding, norms) of MPC pairs' layers are cached once
    /// fetched (default: $UNFED_CACHE_DIR, else ~/.cache/unfed).
    #[arg(long)]
    public_cache: Option<PathBuf>,
    /// Chats ask the last shard for the logits sealed to this server, which samples
    /// (the spec's mpc.output = "decode_client_sample").
    #[arg(long)]
    decode_client_sample: bool,
    /// Generations the OpenAI-compatible API (/v1/) runs at once; beyond, 429.
    #[arg(long, default_value_t = 16)]
    api_max_concurrent: usize,
}

/// How the switches read an environment variable (unset = `default`).
pub fn truthy(env: &HashMap<String, String>, key: &str, default: bool) -> bool {
    env.get(key).map_or(default, |v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn address(flag: &str, v: &str) -> Result<Address> {
    v.parse().with_context(|| {
        format!("{flag} {v:?} is not an EVM address (0x followed by 40 hex digits)")
    })
}

/// Whether `host` only accepts connections from this machine (the transport's rule).
pub use crate::net::is_loopback;

impl WebArgs {
    fn chain(&self) -> Result<Option<ChainAccess>> {
        let (rpc, escrow) = match (&self.chain_rpc, &self.escrow) {
            (Some(r), Some(e)) => (r, e),
            (None, None) => {
                if self.operator_key_file.is_some() || self.token.is_some() {
                    bail!("--token and --operator-key-file need --chain-rpc and --escrow too");
                }
                return Ok(None);
            }
            _ => bail!("the chain needs both --chain-rpc and --escrow"),
        };
        let deployment = Deployment {
            token: match &self.token {
                Some(t) => address("--token", t)?,
                None => Address::ZERO,
            },
            escrow: address("--escrow", escrow)?,
        };
        // Reads need no funds: any key signs nothing.
        let reader = Chain::connect(rpc, unfed_chain::dev_signer(0)?)?;
        let payer = match &self.operator_key_file {
            Some(f) => {
                let signer = unfed_chain::read_key_file(f)
                    .with_context(|| format!("--operator-key-file {}", f.display()))?;
                Some(Chain::connect(rpc, signer)?)
            }
            None => None,
        };
        Ok(Some(ChainAccess {
            rpc_url: rpc.clone(),
            deployment,
            reader,
            payer,
        }))
    }

    /// The auth switches in `env`, refused on a public host.
    fn switches(&self, env: &HashMap<String, String>) -> Result<Switches> {
        let demo_payer = self
            .demo_wallet_key_file
            .as_ref()
            .map(|f| {
                unfed_chain::read_key_file(f)
                    .with_context(|| format!("--demo-wallet-key-file {}", f.display()))
                    .map(crate::voucher::Payer::wallet)
            })
            .transpose()?;
        let switches = Switches {
            dev_bypass: truthy(env, DEV_AUTH_BYPASS_ENV, false),
            demo: truthy(env, DEMO_AUTH_ENV, false),
            demo_wallet: match (&demo_payer, self.demo_wallet.as_deref()) {
                (Some(p), _) => Some(p.client()),
                (None, w) => w.map(|w| address("--demo-wallet", w)).transpose()?,
            },
            demo_payer,
        };
        if (switches.dev_bypass || switches.demo) && !is_loopback(&self.host) {
            bail!(
                "--host {} is not loopback while {} is on: anyone who can reach it could sign in as any wallet; bind 127.0.0.1 or unset the bypass",
                self.host,
                if switches.dev_bypass {
                    DEV_AUTH_BYPASS_ENV
                } else {
                    DEMO_AUTH_ENV
                }
            );
        }
        Ok(switches)
    }

    /// The HTTPS server's TLS, when --https-cert and --https-key are given.
    fn https(&self) -> Result<Option<Arc<rustls::ServerConfig>>> {
        match (&self.https_cert, &self.https_key) {
            (Some(cert), Some(key)) => Ok(Some(super::https::server_config(cert, key)?)),
            (None, None) => Ok(None),
            (Some(_), None) => bail!(
                "--https-cert needs --https-key (the certificate's private key, mode 0600; or {HTTPS_KEY_ENV}); give both, or neither to serve plain HTTP"
            ),
            (None, Some(_)) => bail!(
                "--https-key needs --https-cert (the certificate it belongs to; or {HTTPS_CERT_ENV}); give both, or neither to serve plain HTTP"
            ),
        }
    }

    /// Checks the flags against `env` and builds the server's state.
    pub fn state(&self, env: &HashMap<String, String>, site: String) -> Result<WebState> {
        let switches = self.switches(env)?;
        let policy = FaucetPolicy {
            enabled: truthy(env, FAUCET_ENABLED_ENV, false),
            require_auth: truthy(env, FAUCET_REQUIRE_AUTH_ENV, true),
            cooldown: Duration::from_secs(self.faucet_cooldown_secs),
        };
        if policy.enabled && !policy.require_auth && !is_loopback(&self.host) {
            bail!(
                "the faucet without wallet auth ({FAUCET_REQUIRE_AUTH_ENV}=0) on the public host {} would pay anyone; require auth or bind 127.0.0.1",
                self.host
            );
        }
        let prices = self.prices.prices()?;
        if self.api_max_concurrent == 0 {
            bail!("--api-max-concurrent 0 would refuse every API request; use at least 1");
        }
        // First: it creates the database private (0600) when it is new.
        let keys = super::openai::keys::ApiKeys::open(&self.db)?;
        Ok(WebState {
            registry: self.registry.clone(),
            net: self.tls.client_net()?,
            daemon: self.daemon.clone(),
            chain: self.chain()?,
            prices,
            auth: Auth::new(
                Duration::from_secs(self.challenge_ttl_secs),
                Duration::from_secs(self.session_ttl_secs),
            ),
            faucet: Faucet::open(&self.db, policy)?,
            faucet_amount: unfed_chain::parse_amount(&self.faucet_amount)
                .context("--faucet-amount")?,
            faucet_lock: Default::default(),
            switches,
            site,
            codecs: Mutex::new(HashMap::new()),
            private: PublicParams::new(PublicSource::Fetch(match &self.public_cache {
                Some(dir) => dir.clone(),
                None => unfed_chain::anvil::cache_dir()?,
            })),
            decode_client_sample: self.decode_client_sample,
            dev_wallet: Err("not checked yet".into()),
            api: super::openai::ApiState::new(keys, self.api_max_concurrent),
        })
    }

    pub async fn run(self) -> Result<()> {
        let env: HashMap<String, String> = std::env::vars().collect();
        // Refuse bad flags before listening.
        self.switches(&env)?;
        let https = self.https()?;
        let scheme = if https.is_some() { "https" } else { "http" };
        let listener = crate::cli::bind(&self.host, self.port).await?;
        let bound = listener.local_addr()?;
        let site = format!("{scheme}://{bound}");
        let same_origin = SameOrigin::new(scheme, bound, self.public_host.clone());
        if let Some(chain) = self.chain()? {
            // Faucet cooldowns and the rest of web.db belong to one chain.
            let stamp = crate::stamp::ChainStamp::of(&chain.reader, chain.deployment.escrow)
                .await
                .context("identifying the chain web.db belongs to")?;
            crate::stamp::claim(&self.db, &stamp)?;
        }
        let mut state = self.state(&env, site.clone())?;
        state.dev_wallet = super::dev_wallet::offer(&self.host, self.chain_rpc.as_deref()).await;
        match &state.dev_wallet {
            Ok(a) => {
                tracing::warn!(wallet = %a, "one-click sign-in as the testnet's dev client wallet is on (loopback, local Anvil: its key is public)")
            }
            Err(why) => tracing::info!(%why, "dev-wallet sign-in is off"),
        }
        let state = Arc::new(state);
        if state.switches.dev_bypass || state.switches.demo {
            tracing::warn!("an auth bypass is on (dev/demo); for local use only");
        }
        if https.is_none() && !is_loopback(&self.host) {
            tracing::warn!(
                host = %self.host,
                "serving plain HTTP on a non-loopback address: sign-in tokens and chats cross the network in the clear; pass --https-cert and --https-key"
            );
        }
        tracing::info!(%site, registry = %self.registry, "dashboard up");
        super::server::run(
            state,
            same_origin,
            listener,
            https,
            crate::shutdown_signal(),
        )
        .await
    }
}
