//! The daemon role: validates compute shares, chains them into blocks in SQLite, and
//! settles the work on-chain. Submodules: `store` (SQLite), `validate` (the checks),
//! `settle` (pricing and the escrow lifecycle), `service` (gRPC, key lookup).

pub mod args;
pub mod service;
pub mod settle;
pub mod store;
pub mod validate;
pub mod vouchers;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::net::TcpListener;

use unfed_chain::Address;
use unfed_proto::daemon_server::DaemonServer;
use unfed_proto::*;

pub use settle::{Prices, Settler};
pub use store::Store;
pub use validate::{Limits, Reject};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct DaemonConfig {
    pub db: PathBuf,
    /// Node id (the daemon's staked wallet address, or a free name with open admission).
    pub node_id: String,
    /// host:port other processes dial.
    pub advertise: String,
    pub registry: String,
    pub heartbeat: Duration,
    pub block_interval: Duration,
    /// A settlement summary every this many blocks.
    pub settlement_blocks: u64,
    pub limits: Limits,
    pub prices: Prices,
    /// The chain id vouchers must name when no settler can tell it (no --chain-rpc).
    pub chain_id: Option<u64>,
    /// The escrow vouchers must name when no settler can tell it.
    pub escrow: Option<Address>,
    /// Operator connection to the escrow; `None` records settlements without posting.
    pub settler: Option<Settler>,
    pub settle_poll: Duration,
    /// EVM stake key: the registration is signed with it when set.
    pub stake_key: Option<unfed_chain::PrivateKeySigner>,
    /// Signs heartbeats and the unregistration (registered as the share key).
    pub share_key: ed25519_dalek::SigningKey,
    pub net: crate::net::Net,
    /// Where readiness is reported (--health-port): SERVING once admitted.
    pub health: crate::health::Health,
}

/// A connected client of the daemon at `addr` (pinned to `pin` when known).
/// A daemon connection.
pub type DaemonClient = unfed_proto::daemon_client::DaemonClient<tonic::transport::Channel>;

pub async fn client(
    net: &crate::net::Net,
    addr: &str,
    pin: Option<crate::net::Pin>,
) -> Result<DaemonClient> {
    let ch = net.connect(addr, crate::net::REQUEST_TIMEOUT, pin).await?;
    Ok(unfed_proto::daemon_client::DaemonClient::new(ch)
        .max_decoding_message_size(crate::net::limits::DAEMON)
        .max_encoding_message_size(crate::net::limits::DAEMON))
}

/// Cuts a block when shares are pending, then a settlement summary once the window
/// since the last one is due (`window_due`).
fn produce(store: &Mutex<Store>, cfg_blocks: u64, interval: Duration) -> Result<()> {
    let mut st = store.lock().expect("store poisoned");
    let now = now_ms();
    if let Some(b) = st.produce_block(now)? {
        tracing::info!(height = b.height, shares = b.share_count, hash = %hex::encode(b.hash), "block produced");
    }
    let settled = st.settled_height()?;
    let Some(tip) = st.recent_blocks(1)?.pop() else {
        return Ok(());
    };
    let quiet = Duration::from_millis(now.saturating_sub(tip.timestamp_ms));
    if window_due(tip.height - settled, cfg_blocks, quiet, interval) {
        let height = tip.height;
        let shares = st.shares_in_blocks(settled + 1, height)?;
        let rows = settle::summarize(&st.chain_id()?, settled + 1, height, &shares);
        for r in &rows {
            tracing::info!(from = settled + 1, to = height, client = %r.client, total = %r.total, nodes = r.nodes.len(), "settlement summary");
        }
        st.record_settlements(height, &rows)?;
    }
    Ok(())
}

/// Whether the `open` blocks since the last summary are settled now: when they are
/// `blocks` many, or when no block has been cut for `blocks` intervals. Blocks are cut
/// only for new shares, so without the second rule the usage of a network's last
/// requests would wait, unpaid, for traffic that may never come.
fn window_due(open: u64, blocks: u64, quiet: Duration, interval: Duration) -> bool {
    let blocks = blocks.max(1);
    open >= blocks
        || (open > 0 && quiet >= interval.saturating_mul(u32::try_from(blocks).unwrap_or(u32::MAX)))
}

fn registration(cfg: &DaemonConfig) -> Result<RegisterRequest> {
    crate::membership::Listing {
        node_id: cfg.node_id.clone(),
        role: "daemon",
        address: cfg.advertise.clone(),
        model: String::new(),
        shard_index: -1,
        share_key: crate::shares::public_key_hex(&cfg.share_key),
        stack: unfed_proto::Stack::Text,
        layers: (0, 0),
        shards_total: 0,
        tls_pin: cfg.net.own_pin().map(|p| p.hex()).unwrap_or_default(),
    }
    .request(cfg.stake_key.as_ref())
}

/// Registers as role "daemon", then heartbeats (re-registering when forgotten). The
/// first outcome is reported on `ready`; a refusal then is fatal.
async fn membership(cfg: Arc<DaemonConfig>, ready: tokio::sync::oneshot::Sender<Result<()>>) {
    let member = crate::membership::Member {
        net: cfg.net.clone(),
        key: cfg.share_key.clone(),
        registry: cfg.registry.clone(),
        node_id: cfg.node_id.clone(),
        what: "daemon",
        heartbeat: cfg.heartbeat,
        health: cfg.health.clone(),
    };
    crate::membership::keep_registered(member, || registration(&cfg), ready).await
}

/// What vouchers must name: the settler's chain and escrow, or the ones given.
async fn terms(
    cfg: &DaemonConfig,
    settler: Option<&Settler>,
) -> Result<Option<crate::voucher::Terms>> {
    let (chain_id, escrow) = match settler {
        Some(s) => {
            let id = s
                .chain
                .chain_id()
                .await
                .context("asking the chain for its id")?;
            if let Some(given) = cfg.chain_id.filter(|g| *g != id) {
                anyhow::bail!("--chain-id {given} does not match the chain's id {id}");
            }
            (Some(id), Some(s.deployment.escrow))
        }
        None => (cfg.chain_id, cfg.escrow),
    };
    Ok(match (chain_id, escrow) {
        (Some(chain_id), Some(escrow)) => Some(crate::voucher::Terms {
            chain_id,
            escrow,
            prices: cfg.prices,
        }),
        _ => {
            tracing::warn!(
                "no chain id and escrow: this daemon accepts no spending voucher, so it records no work"
            );
            None
        }
    })
}

/// Serves the daemon on `listener` until `shutdown`: gRPC, block production,
/// settlement and registry membership. A final block is cut on shutdown.
pub async fn run(
    mut cfg: DaemonConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if let Some(s) = &cfg.settler {
        let stamp = crate::stamp::ChainStamp::of(&s.chain, s.deployment.escrow)
            .await
            .context("identifying the chain the share db belongs to")?;
        crate::stamp::claim(&cfg.db, &stamp)?;
    }
    let store = Arc::new(Mutex::new(Store::open(&cfg.db)?));
    {
        let st = store.lock().expect("store poisoned");
        let (tip, height) = st.tip()?;
        let (shares, pending) = st.share_counts()?;
        tracing::info!(db = %cfg.db.display(), height, tip = %hex::encode(tip), shares, pending, "share chain opened");
    }
    let registry = crate::membership::RegistryAddr::new(&cfg.net, &cfg.registry);
    let settler = cfg.settler.take();
    let terms = terms(&cfg, settler.as_ref()).await?;
    let service = service::DaemonService::new(
        store.clone(),
        cfg.limits.clone(),
        registry.clone(),
        terms,
        settler.as_ref().map(|s| (s.chain.clone(), s.deployment)),
    );
    let cfg = Arc::new(cfg);
    let net = cfg.net.clone();
    let router = net.server().add_service(
        DaemonServer::new(service)
            .max_decoding_message_size(crate::net::limits::DAEMON)
            .max_encoding_message_size(crate::net::limits::DAEMON),
    );
    let server = tokio::spawn(async move { net.serve(router, listener, shutdown).await });
    let producer = {
        let (store, cfg) = (store.clone(), cfg.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cfg.block_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (store, k, every) = (store.clone(), cfg.settlement_blocks, cfg.block_interval);
                match tokio::task::spawn_blocking(move || produce(&store, k, every)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("block production failed: {e:#}"),
                    Err(e) => tracing::error!("block production task panicked: {e}"),
                }
            }
        })
    };
    let settling = settler.map(|s| {
        tokio::spawn(settle::run(
            s,
            store.clone(),
            cfg.settle_poll,
            registry.clone(),
        ))
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let member = tokio::spawn(membership(cfg.clone(), tx));
    if let Ok(Err(e)) = rx.await {
        server.abort();
        producer.abort();
        return Err(e);
    }
    tracing::info!(node = %cfg.node_id, address = %cfg.advertise, "daemon serving");
    let result = server.await.context("daemon server task failed")?;
    producer.abort();
    member.abort();
    if let Some(s) = settling {
        s.abort();
    }
    // Shares accepted since the last tick go into a block now rather than at restart.
    if let Err(e) = produce(&store, cfg.settlement_blocks, cfg.block_interval) {
        tracing::error!("final block failed: {e:#}");
    }
    crate::membership::unregister(&cfg.net, &cfg.registry, &cfg.node_id, &cfg.share_key).await;
    result.context("daemon gRPC server failed")
}

#[cfg(test)]
mod tests {
    use super::window_due;
    use std::time::Duration;

    #[test]
    fn a_window_settles_when_full_or_when_the_chain_has_gone_quiet() {
        let tick = Duration::from_secs(10);
        // Full: K blocks since the last summary, however recent.
        assert!(window_due(6, 6, Duration::ZERO, tick));
        assert!(window_due(7, 6, Duration::ZERO, tick));
        // Part-full and traffic still arriving: wait for the window to fill.
        assert!(!window_due(5, 6, Duration::from_secs(59), tick));
        // Part-full but no block for K intervals: the last usage is settled anyway.
        assert!(window_due(1, 6, Duration::from_secs(60), tick));
        // Nothing unsettled: no empty summary, however long the quiet.
        assert!(!window_due(0, 6, Duration::from_secs(3600), tick));
        // K = 0 is read as 1.
        assert!(window_due(1, 0, Duration::ZERO, tick));
    }
}
