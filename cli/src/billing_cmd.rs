//! Billing verbs of a running testnet: `earnings` (what each node earned on-chain, the
//! client's remaining deposit, and the daemon's share chain and settlements) and
//! `claim` (a node moves its earnings to its wallet).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use unfed_chain::{Address, Chain, Deployment, PrivateKeySigner, format_amount};
use unfed_proto::GetChainStatusRequest;

use crate::launch::state::{ChainRecord, RunState};
use crate::plan::LaunchPlan;
use crate::spec;

#[derive(Subcommand)]
pub enum Commands {
    /// Node earnings, the client's deposit, and the daemon's blocks, shares and settlements.
    Earnings {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
    },
    /// Claim a node's finalized earnings to its wallet.
    Claim {
        /// Testnet spec (TOML). Default: the embedded specs/tiny.toml.
        spec: Option<PathBuf>,
        /// Node name as in `unfedctl status` (e.g. compute-0).
        #[arg(long)]
        node: String,
    },
}

/// What a running testnet recorded: its chain and where its daemon listens.
struct Testnet {
    display: String,
    chain: ChainRecord,
    deployment: Deployment,
    daemon: Option<String>,
    net: unfed_node::net::Net,
}

fn parse_addr(what: &str, v: &str, state: &Path) -> anyhow::Result<Address> {
    v.parse().with_context(|| {
        format!(
            "{} records {what} {v:?}, which is not an EVM address",
            state.display()
        )
    })
}

fn testnet(spec_path: Option<&Path>) -> anyhow::Result<Testnet> {
    let loaded = spec::load(spec_path)?;
    let plan = LaunchPlan::build(&loaded, crate::plan::model_facts(&loaded))?;
    let state_file = RunState::path(&plan.run_dir);
    let Some(state) = RunState::load(&plan.run_dir)? else {
        bail!(
            "testnet `{}` is not running (no {}); start it with `unfedctl up {}`",
            plan.name,
            state_file.display(),
            loaded.display_path
        );
    };
    let Some(chain) = state.chain.clone() else {
        bail!(
            "testnet `{}` runs without a chain (chain.mode = \"none\"): there is nothing to earn or claim",
            plan.name
        );
    };
    let (Some(token), Some(escrow)) = (&chain.token, &chain.escrow) else {
        bail!(
            "testnet `{}` has no deployed contracts in {}; did `unfedctl up` finish?",
            plan.name,
            state_file.display()
        );
    };
    let deployment = Deployment {
        token: parse_addr("the token", token, &state_file)?,
        escrow: parse_addr("the escrow", escrow, &state_file)?,
    };
    let daemon = state
        .processes
        .iter()
        .find(|p| p.kind == "daemon")
        .and_then(|p| p.port)
        .map(|port| format!("127.0.0.1:{port}"));
    Ok(Testnet {
        net: state.net()?,
        display: loaded.display_path,
        chain,
        deployment,
        daemon,
    })
}

pub fn run(cmd: Commands) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cmd {
        Commands::Earnings { spec } => runtime.block_on(earnings(&testnet(spec.as_deref())?))?,
        Commands::Claim { spec, node } => {
            runtime.block_on(claim(&testnet(spec.as_deref())?, &node))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A connection for reads only: any key will do, so a throwaway one is used.
fn reader(t: &Testnet) -> anyhow::Result<Chain> {
    Chain::connect(&t.chain.rpc_url, PrivateKeySigner::random())
}

async fn earnings(t: &Testnet) -> anyhow::Result<()> {
    let chain = reader(t)?;
    let d = &t.deployment;
    println!(
        "testnet {} (chain {} at {})",
        t.display, t.chain.chain_id, t.chain.rpc_url
    );
    println!(
        "{:<14} {:<44} {:>24} {:>24}",
        "NODE", "ADDRESS", "EARNINGS (unclaimed)", "WALLET"
    );
    for w in &t.chain.wallets {
        let addr: Address = w
            .address
            .parse()
            .with_context(|| format!("wallet of {} is not an address", w.node))?;
        let earned = chain.earnings(d, addr).await?;
        let held = chain.token_balance(d, addr).await?;
        println!(
            "{:<14} {:<44} {:>24} {:>24}",
            w.node,
            w.address,
            format_amount(earned),
            format_amount(held)
        );
    }
    if let Some(client) = &t.chain.client {
        let addr: Address = client.parse().context("the client address in state.json")?;
        println!(
            "client {client}: deposit left {}",
            format_amount(chain.client_balance(d, addr).await?)
        );
    }
    let Some(daemon) = &t.daemon else {
        println!("no daemon runs in this testnet: no shares are recorded");
        return Ok(());
    };
    let st = match unfed_node::daemon::client(&t.net, daemon, None).await {
        Ok(mut c) => c
            .get_chain_status(GetChainStatusRequest {})
            .await
            .map(|r| r.into_inner()),
        Err(e) => {
            println!(
                "daemon at {daemon} is unreachable ({e}); is the testnet up? (`unfedctl status`)"
            );
            return Ok(());
        }
    };
    let st = st.with_context(|| format!("asking the daemon at {daemon} for the share chain"))?;
    println!(
        "share chain: {} block(s), tip {}, {} share(s) ({} pending)",
        st.height,
        hex_short(&st.tip_hash),
        st.shares,
        st.pending_shares
    );
    for n in &st.nodes {
        println!(
            "  {:<44} {:>8} shares {:>10} input {:>10} output tokens",
            n.node_id, n.shares, n.input_tokens, n.output_tokens
        );
    }
    for s in &st.settlements {
        let total = s
            .total
            .parse()
            .map(format_amount)
            .unwrap_or_else(|_| s.total.clone());
        let error = if s.last_error.is_empty() {
            String::new()
        } else {
            format!(" (attempt {}: {})", s.attempts, s.last_error)
        };
        println!(
            "  settlement {} blocks {}..={} client {} total {} {}{error}",
            hex_short(&s.hash),
            s.from_height,
            s.to_height,
            s.client,
            total,
            s.status
        );
    }
    if !st.vouchers.is_empty() {
        println!(
            "  {:<14} {:<44} {:>20} {:>20} {:>20}",
            "VOUCHER", "NODE", "PAID", "PENDING", "WITHHELD"
        );
    }
    let amount = |v: &str| {
        v.parse()
            .map(format_amount)
            .unwrap_or_else(|_| v.to_string())
    };
    for v in &st.vouchers {
        println!(
            "  {:<14} {:<44} {:>20} {:>20} {:>20}",
            hex_short(&v.voucher),
            v.node_id,
            amount(&v.paid),
            amount(&v.pending),
            amount(&v.withheld)
        );
    }
    Ok(())
}

fn hex_short(b: &[u8]) -> String {
    let h: String = b.iter().take(6).map(|x| format!("{x:02x}")).collect();
    format!("0x{h}…")
}

async fn claim(t: &Testnet, node: &str) -> anyhow::Result<()> {
    let Some(w) = t.chain.wallets.iter().find(|w| w.node == node) else {
        let known: Vec<&str> = t.chain.wallets.iter().map(|w| w.node.as_str()).collect();
        bail!(
            "testnet {} has no node named `{node}`; its staked nodes are: {}",
            t.display,
            known.join(", ")
        );
    };
    let signer = unfed_chain::read_key_file(&w.key_file)
        .with_context(|| format!("the wallet key of {node}"))?;
    let chain = Chain::connect(&t.chain.rpc_url, signer)?;
    let d = &t.deployment;
    let due = chain.earnings(d, chain.address()).await?;
    if due.is_zero() {
        bail!(
            "{node} ({}) has no finalized earnings to claim; settlements pay out after the challenge window (see `unfedctl earnings {}`)",
            w.address,
            t.display
        );
    }
    chain
        .claim_earnings(d)
        .await
        .with_context(|| format!("claiming the earnings of {node}"))?;
    let held = chain.token_balance(d, chain.address()).await?;
    println!(
        "{node} ({}) claimed {}; wallet now holds {}",
        w.address,
        format_amount(due),
        format_amount(held)
    );
    Ok(())
}
