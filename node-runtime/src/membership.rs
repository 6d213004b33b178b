//! Staying listed in the registry: register (signed afresh each time), heartbeat, and
//! register again when the registry forgot us. Shared by every role that registers.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::{HeartbeatRequest, RegisterRequest, UnregisterRequest, UnresponsiveReport};

use crate::net::Net;
use crate::net::auth::CallProof;

/// Retry pause while the registry is unreachable or has not admitted us yet.
const RETRY: Duration = Duration::from_millis(500);

/// A lazily connecting client for the registry at `addr` (host:port).
pub fn registry_client(net: &Net, addr: &str) -> Result<RegistryClient<Channel>> {
    Ok(registry_client_on(registry_channel(net, addr)?))
}

/// A lazily connecting channel to the registry at `addr`.
pub fn registry_channel(net: &Net, addr: &str) -> Result<Channel> {
    net.channel(addr)
        .with_context(|| format!("--registry {addr}"))
}

/// A registry client on a channel the caller keeps, with the registry's message limits.
pub fn registry_client_on(ch: Channel) -> RegistryClient<Channel> {
    RegistryClient::new(ch)
        .max_decoding_message_size(crate::net::limits::REGISTRY)
        .max_encoding_message_size(crate::net::limits::REGISTRY)
}

/// A registry's address with the transport to reach it.
#[derive(Clone, Debug)]
pub struct RegistryAddr {
    pub net: Net,
    pub addr: String,
}

impl RegistryAddr {
    pub fn new(net: &Net, addr: &str) -> Self {
        Self {
            net: net.clone(),
            addr: addr.to_string(),
        }
    }

    pub fn client(&self) -> Result<RegistryClient<Channel>> {
        registry_client(&self.net, &self.addr)
    }
}

impl std::fmt::Display for RegistryAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Best-effort unregistration on the way out (the registry drops silent nodes anyway),
/// signed with the node's share key.
pub async fn unregister(net: &Net, registry: &str, node_id: &str, key: &ed25519_dalek::SigningKey) {
    let Ok(mut c) = registry_client(net, registry) else {
        return;
    };
    let proof = CallProof::sign(key, crate::registry::UNREGISTER, node_id);
    let req = UnregisterRequest {
        node_id: node_id.to_string(),
        timestamp: proof.timestamp,
        nonce: proof.nonce,
        signature: proof.signature,
    };
    match c.unregister(req).await {
        Ok(_) => tracing::info!("unregistered"),
        Err(e) => tracing::warn!("could not unregister: {}", e.message()),
    }
}

/// Best-effort report that `node` failed a forward this node (`me`: its id and share
/// key, which signs the report) made to it; the registry probes it.
pub async fn report_unresponsive(
    net: &Net,
    registry: &str,
    (me, key): (&str, &ed25519_dalek::SigningKey),
    node: &str,
    why: &str,
) {
    let Ok(mut c) = registry_client(net, registry) else {
        return;
    };
    let proof = CallProof::sign(key, crate::registry::REPORT_UNRESPONSIVE, me);
    let req = UnresponsiveReport {
        reporter_id: me.to_string(),
        node_id: node.to_string(),
        reason: why.to_string(),
        timestamp: proof.timestamp,
        nonce: proof.nonce,
        signature: proof.signature,
    };
    match c.report_unresponsive(req).await {
        Ok(v) if v.get_ref().delisted => tracing::warn!(node, "reported unresponsive: delisted"),
        Ok(_) => tracing::info!(node, "reported unresponsive: it answers the registry"),
        Err(e) => tracing::warn!(node, "could not report it unresponsive: {}", e.message()),
    }
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
    /// The pin of the node's TLS certificate (hex; empty in plaintext).
    pub tls_pin: String,
}

impl Listing {
    /// A fresh registration request, signed by `stake_key` when the node is staked.
    pub fn request(
        &self,
        stake_key: Option<&unfed_chain::PrivateKeySigner>,
    ) -> Result<RegisterRequest> {
        let mut p = unfed_chain::RegistrationPayload::new_now(
            &self.node_id,
            self.role,
            &self.address,
            &self.model,
            self.shard_index,
            &self.share_key,
        );
        p.tls_pin = self.tls_pin.clone();
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
            tls_pin: p.tls_pin,
        })
    }
}

/// Who registers and how often it heartbeats.
pub struct Member {
    pub net: Net,
    pub registry: String,
    /// The registered share key: heartbeats are signed with it.
    pub key: ed25519_dalek::SigningKey,
    pub node_id: String,
    /// "node", "daemon", ...: how log lines and errors name us.
    pub what: &'static str,
    pub heartbeat: Duration,
    /// Reports SERVING while admitted (the --health-port, when there is one).
    pub health: crate::health::Health,
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
    let mut client = match registry_client(&member.net, &member.registry) {
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
                    member.health.set_serving(true).await;
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
            let proof = CallProof::sign(&member.key, crate::registry::HEARTBEAT, &member.node_id);
            let beat = HeartbeatRequest {
                node_id: member.node_id.clone(),
                timestamp: proof.timestamp,
                nonce: proof.nonce,
                signature: proof.signature,
            };
            match client.heartbeat(beat).await {
                Ok(r) if !r.get_ref().known => {
                    tracing::warn!(
                        "the registry forgot this {}; registering again",
                        member.what
                    );
                    registered = false;
                    member.health.set_serving(false).await;
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(registry = %registry, "heartbeat failed: {}", e.message()),
            }
        }
        tokio::time::sleep(if registered { member.heartbeat } else { RETRY }).await;
    }
}
