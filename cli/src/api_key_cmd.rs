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
pub fn create_key(
    run_dir: &Path,
    wallet: Address,
    label: &str,
    ttl: Option<Duration>,
) -> anyhow::Result<String> {
    let keys = ApiKeys::open(&run_dir.join("web.db"))?;
    keys.create(wallet, label, ttl, now_ms())
}

/// The OpenAI base URL of a dashboard.
pub fn base_url(dashboard: &str) -> String {
    format!("{}/v1", dashboard.trim_end_matches('/'))
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Create {
        spec,
        wallet,
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
    let key = create_key(&plan.run_dir, wallet, &label, ttl)?;
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
