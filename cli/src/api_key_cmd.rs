//! `unfedctl api-key create`: a key for the dashboard's OpenAI-compatible API (/v1/),
//! written hashed into the testnet's web.db (the store the dashboard reads) and printed
//! once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use unfed_chain::Address;
use unfed_node::web::openai::keys::{ApiKeys, now_ms};

use crate::launch::state::RunState;

#[derive(Subcommand)]
pub enum Command {
    /// Create a key that bills a wallet's deposit; the key is printed once (only its
    /// hash is stored).
    Create {
        /// Testnet spec (TOML) whose dashboard serves the API. Default: the embedded
        /// specs/tiny.toml.
        spec: Option<PathBuf>,
        /// The wallet whose deposit pays for the key's requests. Default: the testnet's
        /// client wallet.
        #[arg(long)]
        wallet: Option<String>,
        /// Key file (mode 0600) of the paying wallet, which signs the key's spending
        /// delegation; default: the testnet's client. Without it the key's chats are unpaid.
        #[arg(long)]
        wallet_key_file: Option<PathBuf>,
        /// A name to recognise the key by.
        #[arg(long, default_value = "default")]
        label: String,
        /// Days until the key stops working. Default: never.
        #[arg(long)]
        expires_days: Option<u64>,
        /// Print `{"key", "wallet", "label", "base_url"}` as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Creates a key billing `wallet` in the run directory's web.db (what `up` does for its
/// dev key too).
/// What a key may spend in total through its delegation, in tokens.
const KEY_SPEND_CAP: u64 = 1000;

/// A new API key billing `wallet`; with the wallet's key and the testnet's chain
/// (`signer`), the wallet signs a delegation to the key's delegate, so the dashboard can
/// sign the key's spending vouchers (capped, expiring with the key, or after a year).
pub fn create_key(
    run_dir: &Path,
    wallet: Address,
    label: &str,
    ttl: Option<Duration>,
    signer: Option<(
        &unfed_chain::PrivateKeySigner,
        &crate::launch::state::ChainRecord,
    )>,
) -> anyhow::Result<String> {
    let keys = ApiKeys::open(&run_dir.join("web.db"))?;
    let now = now_ms();
    keys.create(wallet, label, ttl, now, |secret| {
        let Some((key, chain)) = signer else {
            return Ok(None);
        };
        let escrow: Address = chain
            .escrow
            .as_deref()
            .context("the testnet recorded no escrow")?
            .parse()
            .context("the recorded escrow is not an EVM address")?;
        let expiry = now / 1000 + ttl.unwrap_or(Duration::from_secs(365 * 86_400)).as_secs();
        let cap = unfed_chain::U256::from(KEY_SPEND_CAP)
            * unfed_chain::U256::from(10u64).pow(unfed_chain::U256::from(18));
        let delegate = unfed_node::voucher::key_delegate(secret).address();
        let d = unfed_chain::Delegation::sign(
            key,
            delegate,
            (cap, expiry, format!("API key `{label}`")),
            (chain.chain_id, escrow),
        )?;
        Ok(Some(unfed_node::voucher::delegation_bytes(&d)))
    })
}

/// The OpenAI base URL of a dashboard.
pub fn base_url(dashboard: &str) -> String {
    format!("{}/v1", dashboard.trim_end_matches('/'))
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Create {
        spec,
        wallet,
        wallet_key_file,
        label,
        expires_days,
        json,
    } = cmd;
    let plan = crate::plan::load_plan(spec.as_deref())?;
    let state = RunState::load(&plan.run_dir)?;
    let wallet: Address = match (wallet, state.as_ref().and_then(|s| s.chain.as_ref())) {
        (Some(w), _) => w.parse().with_context(|| {
            format!("--wallet {w:?} is not an EVM address (0x followed by 40 hex digits)")
        })?,
        (None, Some(chain)) => chain
            .client
            .as_deref()
            .context("the testnet recorded no client wallet; pass --wallet")?
            .parse()
            .context("the recorded client wallet is not an EVM address")?,
        (None, None) => bail!(
            "testnet `{}` is not running with a chain, so there is no client wallet to bill; start it with `unfedctl up` or pass --wallet",
            plan.name
        ),
    };
    let ttl = expires_days.map(|d| Duration::from_secs(d * 86_400));
    let chain = state.as_ref().and_then(|s| s.chain.as_ref());
    let key_file = wallet_key_file.or_else(|| {
        let f = plan.run_dir.join("keys").join("client.key");
        (chain.and_then(|c| c.client.as_deref()) == Some(wallet.to_string().as_str())).then_some(f)
    });
    let signer = key_file
        .map(|f| {
            unfed_chain::read_key_file(&f)
                .with_context(|| format!("the paying wallet's key file {}", f.display()))
        })
        .transpose()?;
    if let Some(k) = &signer
        && k.address() != wallet
    {
        bail!(
            "the wallet key file holds {}, not the wallet {wallet} the key is to bill",
            k.address()
        );
    }
    let key = create_key(
        &plan.run_dir,
        wallet,
        &label,
        ttl,
        signer.as_ref().zip(chain),
    )?;
    let base = state
        .as_ref()
        .and_then(|s| s.dashboard.as_deref())
        .map(base_url);
    if json {
        let v = serde_json::json!({ "key": key, "wallet": wallet.to_string(), "label": label, "base_url": base });
        println!("{v}");
    } else {
        println!("{key}");
        eprintln!(
            "API key `{label}` bills {wallet}; it is shown only now. Use it as OPENAI_API_KEY{}",
            match &base {
                Some(b) => format!(" with OPENAI_BASE_URL={b}"),
                None => String::new(),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
