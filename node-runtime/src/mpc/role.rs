//! `unfed-node mpc --role A|B`: one party of the MPC pair as a process — loads the MPC
//! layers of a split, serves `Mpc.Link`, and stays registered (role mpc_a / mpc_b).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use unfed_proto::Stack;
use unfed_proto::mpc_server::MpcServer;

use super::handoff::Signer;
use super::net::PartyService;
use super::public::Packed;
use super::weights::PartyModel;
use crate::engine::weights::WeightFiles;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PartyRole {
    #[value(name = "A", alias = "a")]
    A,
    #[value(name = "B", alias = "b")]
    B,
}

#[derive(clap::Args)]
pub struct MpcArgs {
    #[arg(long, value_enum)]
    role: PartyRole,
    #[arg(long, default_value_t = 50060)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Party B's host:port (party A only; start B first).
    #[arg(long)]
    peer: Option<String>,
    /// The split directory (the parties read shard 0's layers, or every layer with
    /// --full-output).
    #[arg(long)]
    shards_dir: PathBuf,
    /// How many of shard 0's layers run in MPC (default: all of shard 0).
    #[arg(long)]
    layers: Option<usize>,
    /// full_output_2pc: every layer and the LM head in MPC; the client gets logit shares.
    #[arg(long)]
    full_output: bool,
    /// Registry host:port; without it the party serves unregistered.
    #[arg(long)]
    registry: Option<String>,
    /// The party's staked EVM wallet (its node id).
    #[arg(long)]
    eth_address: Option<String>,
    /// Node id when no --eth-address is given.
    #[arg(long)]
    node_id: Option<String>,
    /// host:port other processes dial (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// How long a party waits for a message within a step before failing the session.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Directory that keeps undelivered compute shares and the key signing them.
    #[arg(long)]
    share_spool: Option<PathBuf>,
    #[command(flatten)]
    billing: crate::cli::BillingArgs,
    #[command(flatten)]
    tls: crate::net::TlsArgs,
    #[command(flatten)]
    health: crate::health::HealthArgs,
}

impl MpcArgs {
    pub async fn run(self) -> Result<()> {
        let is_a = self.role == PartyRole::A;
        if is_a != self.peer.is_some() {
            bail!(
                "{}",
                if is_a {
                    "party A needs --peer, party B's host:port (start B first)"
                } else {
                    "party B takes no --peer: party A dials it"
                }
            );
        }
        let stake_key = unfed_chain::load_stake_key_from_env()?;
        if let (Some(key), Some(addr)) = (&stake_key, &self.eth_address) {
            unfed_chain::keys::ensure_key_matches(key, addr)?;
        }
        let manifest = unfed_model::Manifest::load_current(&self.shards_dir)
            .context("split the model first")?;
        let shard0 = manifest
            .text_shards()
            .next()
            .context("the split has no text shard")?
            .clone();
        let total = manifest.config.text.num_hidden_layers;
        let layers = if self.full_output {
            0..total
        } else {
            let n = self.layers.unwrap_or(shard0.layer_end);
            if n == 0 || n > shard0.layer_end {
                bail!(
                    "--layers {n}: shard 0 has layers [0, {}); run 1..={} of them in MPC",
                    shard0.layer_end,
                    shard0.layer_end
                );
            }
            0..n
        };
        let files: Vec<PathBuf> = manifest
            .text_shards()
            .filter(|s| self.full_output || s.layer_start < layers.end)
            .map(|s| self.shards_dir.join(&s.file))
            .collect();
        let (cfg, prefix) = (
            manifest.config.text.clone(),
            manifest.config.text_prefix.clone(),
        );
        let range = layers.clone();
        let full = self.full_output;
        let (model, public) = tokio::task::spawn_blocking(move || -> Result<_> {
            let weights = WeightFiles::open(&files)?;
            let public = Packed::new(&weights, &cfg, &prefix, range.end, full)?;
            Ok((
                PartyModel::load(&cfg, &prefix, range, full, &weights)?,
                public,
            ))
        })
        .await??;
        let net = self
            .tls
            .net(self.advertise.as_deref().unwrap_or(&self.host))?;
        let listener = crate::cli::bind(&self.host, self.port).await?;
        let health = self.health.start(&self.host).await?;
        let advertise = self.advertise.clone().unwrap_or_else(|| {
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        });
        let role = if is_a { "mpc_a" } else { "mpc_b" };
        let node_id = self
            .eth_address
            .clone()
            .or(self.node_id.clone())
            .unwrap_or_else(|| format!("{role}@{advertise}"));
        tracing::info!(model = %manifest.model_id, layers = ?layers, full_output = full, role, "MPC party loaded");
        let timeout = Duration::from_secs(self.timeout_secs.max(1));
        // Signs the output shares this party hands to the next shard (registered below).
        let share_key = crate::share_spool::share_key(self.share_spool.as_deref())?;
        let signer = Signer {
            node_id: node_id.clone(),
            model_id: manifest.model_id.clone(),
            key: share_key.clone(),
        };
        // The parties record compute shares like any hop, A as hop 0 and B as hop 1 of
        // the route the client's hello counts (just the two with full output).
        let shares = match &self.registry {
            Some(registry) => Some(
                crate::shares::ShareSink::spawn(crate::shares::SinkConfig {
                    node_id: node_id.clone(),
                    model: manifest.model_id.clone(),
                    shard_index: if is_a { 0 } else { 1 },
                    shards_total: 2,
                    key: share_key.clone(),
                    daemon: crate::shares::DaemonSource::Registry(registry.clone()),
                    net: net.clone(),
                    batch: 64,
                    flush_every: Duration::from_millis(200),
                    spool: self.share_spool.clone(),
                })
                .0,
            ),
            None => None,
        };
        let service = PartyService::new(
            Arc::new(model),
            is_a,
            signer,
            public,
            shares,
            super::net::PartyLinks {
                peer: self.peer.clone(),
                timeout,
                net: net.clone(),
                peers: self.registry.clone().map(|r| {
                    Arc::new(crate::verify::spot::Peers::new(
                        net.clone(),
                        r,
                        manifest.model_id.clone(),
                    ))
                }),
                require_voucher: self.billing.require_voucher,
            },
        )?;
        let membership = self.registry.clone().map(|registry| {
            let listing = crate::membership::Listing {
                node_id: node_id.clone(),
                role,
                address: advertise.clone(),
                model: manifest.model_id.clone(),
                shard_index: 0,
                share_key: crate::shares::public_key_hex(&share_key),
                stack: Stack::Text,
                layers: (layers.start as u32, layers.end as u32),
                shards_total: manifest.text_shards().count() as u32,
                tls_pin: net.own_pin().map(|p| p.hex()).unwrap_or_default(),
            };
            let member = crate::membership::Member {
                net: net.clone(),
                key: share_key.clone(),
                registry,
                node_id: node_id.clone(),
                what: role,
                heartbeat: Duration::from_secs(self.heartbeat_secs.max(1)),
                health: health.clone(),
            };
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let key = stake_key.clone();
            let task = tokio::spawn(crate::membership::keep_registered(
                member,
                move || listing.request(key.as_ref()),
                ready_tx,
            ));
            (task, ready_rx)
        });
        let router = net.server().add_service(
            MpcServer::new(service)
                .max_decoding_message_size(crate::net::limits::MPC)
                .max_encoding_message_size(crate::net::limits::MPC),
        );
        let server = {
            let net = net.clone();
            tokio::spawn(async move { net.serve(router, listener, crate::shutdown_signal()).await })
        };
        if let Some((task, ready)) = membership {
            ready.await.context("registration task ended")??;
            let result = server.await;
            task.abort();
            result??;
        } else {
            health.set_serving(true).await;
            server.await??;
        }
        Ok(())
    }
}
