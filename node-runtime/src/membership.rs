//! Staying listed in the registry: register (signed afresh each time), heartbeat, and
//! register again when the registry forgot us. Shared by every role that registers.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::{HeartbeatRequest, RegisterRequest};

/// Retry pause while the registry is unreachable or has not admitted us yet.
const RETRY: Duration = Duration::from_millis(500);

/// A lazily connecting client for the registry at `addr` (host:port).
pub fn registry_client(addr: &str) -> Result<RegistryClient<Channel>> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("--registry {addr} is not a host:port"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    Ok(RegistryClient::new(ep.connect_lazy()))
}

/// What a node registers as: the signed admission payload (new timestamp and nonce each
/// time) and, for a node serving part of a model, its shard and layers.
pub struct Listing {
    pub node_id: String,
    pub role: &'static str,
    pub address: String,
    pub model: String,
    /// -1 for roles without a shard.
    pub shard_index: i64,
    pub share_key: String,
    pub stack: unfed_proto::Stack,
    pub layers: (u32, u32),
    pub shards_total: u32,
}

impl Listing {
    /// A fresh registration request, signed by `stake_key` when the node is staked.
    pub fn request(
        &self,
        stake_key: Option<&unfed_chain::PrivateKeySigner>,
    ) -> Result<RegisterRequest> {
        let p = unfed_chain::RegistrationPayload::new_now(
            &self.node_id,
            self.role,
            &self.address,
            &self.model,
            self.shard_index,
            &self.share_key,
        );
        let signature = match stake_key {
            Some(k) => unfed_chain::sign_registration(k, &p)?,
            None => Vec::new(),
        };
        Ok(RegisterRequest {
            node_id: p.node_id,
            role: p.role,
            address: p.address,
            model: p.model,
            shard_index: p.shard_index,
            share_key: p.share_key,
            timestamp: p.timestamp,
            nonce: p.nonce,
            signature,
            stack: self.stack as i32,
            layer_start: self.layers.0,
            layer_end: self.layers.1,
            shards_total: self.shards_total,
        })
    }
}

/// Who registers and how often it heartbeats.
pub struct Member {
    pub registry: String,
    pub node_id: String,
    /// "node", "daemon", ...: how log lines and errors name us.
    pub what: &'static str,
    pub heartbeat: Duration,
}

/// Runs until the task is dropped. The first outcome (admitted, or refused) is sent on
/// `ready`; a refusal at start is fatal, a later one is logged and retried.
/// `registration` builds a fresh request (new timestamp and nonce) for every attempt.
pub async fn keep_registered(
    member: Member,
    mut registration: impl FnMut() -> Result<RegisterRequest>,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let fail =
        |ready: &mut Option<oneshot::Sender<Result<()>>>, err: anyhow::Error| match ready.take() {
            Some(tx) => {
                let _ = tx.send(Err(err));
                true
            }
            None => {
                tracing::error!("{err:#}");
                false
            }
        };
    let mut client = match registry_client(&member.registry) {
        Ok(c) => c,
        Err(e) => {
            fail(&mut ready, e);
            return;
        }
    };
    let registry = &member.registry;
    let mut registered = false;
    loop {
        if !registered {
            let req = match registration() {
                Ok(r) => r,
                Err(e) => {
                    fail(&mut ready, e);
                    return;
                }
            };
            match client.register(req).await.map(|r| r.into_inner()) {
                Ok(r) if r.accepted => {
                    tracing::info!(registry = %registry, "registered as {}", member.what);
                    registered = true;
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(r) => {
                    let err = anyhow::anyhow!(
                        "the registry at {registry} refused this {} ({}): {}",
                        member.what,
                        r.reason,
                        r.message
                    );
                    if fail(&mut ready, err) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(registry = %registry, "registry unreachable, retrying: {}", e.message())
                }
            }
        } else {
            let beat = HeartbeatRequest {
                node_id: member.node_id.clone(),
            };
            match client.heartbeat(beat).await {
                Ok(r) if !r.get_ref().known => {
                    tracing::warn!(
                        "the registry forgot this {}; registering again",
                        member.what
                    );
                    registered = false;
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(registry = %registry, "heartbeat failed: {}", e.message()),
            }
        }
        tokio::time::sleep(if registered { member.heartbeat } else { RETRY }).await;
    }
}
