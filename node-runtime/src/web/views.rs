//! Read-only views for the page and for scripts: configuration, models, the network
//! (nodes, shards, stakes, verdicts) and the chains (share chain and on-chain state).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};
use unfed_chain::{Address, U256, format_amount};
use unfed_proto::*;

use super::server::{ApiError, ApiResult, WebState};
use crate::client::{Client, readiness_text};

/// A token amount both exact (wei, decimal) and readable.
pub fn amount(units: U256) -> Value {
    json!({ "wei": units.to_string(), "text": format_amount(units) })
}

pub async fn config(State(s): State<Arc<WebState>>) -> Json<Value> {
    let faucet = s.faucet.policy();
    Json(json!({
        "registry": s.registry,
        "prices": {
            "input_token": amount(s.prices.input),
            "output_token": amount(s.prices.output),
        },
        "auth": {
            "dev_bypass": s.switches.dev_bypass,
            "demo": s.switches.demo,
            "demo_wallet": s.switches.demo_wallet.map(|a| a.to_string()),
            "dev_wallet": s.dev_wallet.as_ref().ok().map(|a| a.to_string()),
            "dev_wallet_off": s.dev_wallet.as_ref().err(),
        },
        "faucet": {
            "enabled": faucet.enabled,
            "require_auth": faucet.require_auth,
            "cooldown_secs": faucet.cooldown.as_secs(),
            "amount": amount(s.faucet_amount),
        },
        "chain": s.chain.as_ref().map(|c| json!({
            "rpc_url": c.rpc_url,
            "token": c.deployment.token.to_string(),
            "escrow": c.deployment.escrow.to_string(),
        })),
    }))
}

async fn registry(s: &WebState) -> Result<Client, ApiError> {
    Client::connect(&s.net, &s.registry)
        .await
        .map_err(|e| ApiError::new(503, format!("{e:#}")))
}

/// Every model with its state, and whether it takes images (from its manifest).
async fn models_json(client: &mut Client, models: &[ModelStatus]) -> Vec<Value> {
    let mut out = Vec::new();
    for m in models {
        let vision = match client.manifest(&m.model).await {
            Ok((manifest, _)) => manifest.config.vision.is_some(),
            Err(_) => false,
        };
        let mut v = model_json(m);
        v["vision"] = Value::from(vision);
        out.push(v);
    }
    out
}

fn model_json(m: &ModelStatus) -> Value {
    json!({
        "model": m.model,
        "ready": m.state == ModelState::Ready as i32,
        "status": readiness_text(m),
        "reason": m.reason,
        "message": m.message,
        "nodes": m.nodes,
        "text_shards_covered": m.text_shards_covered,
        "text_shards_total": m.text_shards_total,
    })
}

pub async fn models(State(s): State<Arc<WebState>>) -> ApiResult<Value> {
    let mut client = registry(&s).await?;
    let models = client.list_models().await.map_err(ApiError::upstream)?;
    Ok(Json(
        json!({ "models": models_json(&mut client, &models).await }),
    ))
}

/// Stake (active + cooling) and earnings of a node whose id is an EVM address.
async fn node_chain_state(s: &WebState, node_id: &str) -> Option<Value> {
    let c = s.chain.as_ref()?;
    let who: Address = node_id.parse().ok()?;
    let stake = c.reader.stake_info(&c.deployment, who).await.ok()?;
    let earnings = c.reader.earnings(&c.deployment, who).await.ok();
    Some(json!({
        "stake": amount(stake.active + stake.cooling),
        "eligible": stake.eligible,
        "earnings": earnings.map(amount),
    }))
}

pub async fn network(State(s): State<Arc<WebState>>) -> ApiResult<Value> {
    let mut client = registry(&s).await?;
    let models = client.list_models().await.map_err(ApiError::upstream)?;
    let mut pools = serde_json::Map::new();
    for m in &models {
        let shards = client
            .pool_health(&m.model)
            .await
            .map_err(ApiError::upstream)?;
        let shards: Vec<Value> = shards
            .iter()
            .map(|h| {
                json!({
                    "stack": if h.stack == Stack::Vision as i32 { "vision" } else { "text" },
                    "shard_index": h.shard_index,
                    "nodes": h.nodes,
                    "state": ShardState::try_from(h.state)
                        .map(|st| st.as_str_name().trim_start_matches("SHARD_STATE_").to_ascii_lowercase())
                        .unwrap_or_default(),
                })
            })
            .collect();
        pools.insert(m.model.clone(), Value::from(shards));
    }
    let registry = client.registry_mut();
    let nodes = registry
        .discover(DiscoverRequest::default())
        .await
        .map_err(|e| ApiError::upstream(anyhow::anyhow!("Discover failed: {}", e.message())))?
        .into_inner()
        .nodes;
    let verdicts = registry
        .list_verdicts(ListVerdictsRequest {})
        .await
        .map(|r| r.into_inner())
        .unwrap_or_default();
    let mut out_nodes = Vec::new();
    for n in &nodes {
        out_nodes.push(json!({
            "node_id": n.node_id,
            "role": n.role,
            "address": n.address,
            "model": n.model,
            "stack": if n.stack == Stack::Vision as i32 { "vision" } else { "text" },
            "shard_index": n.shard_index,
            "layers": [n.layer_start, n.layer_end],
            "last_heartbeat_ms_ago": n.last_seen_ms_ago,
            "excluded": verdicts.excluded.contains(&n.node_id),
            "chain": node_chain_state(&s, &n.node_id).await,
        }));
    }
    Ok(Json(json!({
        "models": models_json(&mut client, &models).await,
        "shards": pools,
        "nodes": out_nodes,
        "excluded": verdicts.excluded,
        "verdicts": verdicts.verdicts.iter().map(|v| json!({
            "accused": v.accused,
            "reporter": v.reporter,
            "shard_index": v.shard_index,
            "guilty": v.guilty,
            "stage": v.stage,
            "detail": v.detail,
            "slashed": v.slashed.parse::<U256>().ok().map(amount),
        })).collect::<Vec<_>>(),
    })))
}

/// The daemon's address and certificate pin: the flag (unpinned), or the daemon the
/// registry lists.
async fn daemon_address(s: &WebState) -> Result<(String, String), ApiError> {
    if let Some(d) = &s.daemon {
        return Ok((d.clone(), String::new()));
    }
    let nodes = registry(s)
        .await?
        .registry_mut()
        .discover(DiscoverRequest::default())
        .await
        .map_err(|e| ApiError::upstream(anyhow::anyhow!("Discover failed: {}", e.message())))?
        .into_inner()
        .nodes;
    nodes
        .into_iter()
        .find(|n| n.role == "daemon")
        .map(|n| (n.address, n.tls_pin))
        .ok_or_else(|| {
            ApiError::new(
                503,
                "no share-chain daemon is registered; start `unfed-node daemon` or pass --daemon",
            )
        })
}

pub async fn chain(State(s): State<Arc<WebState>>) -> ApiResult<Value> {
    let daemon = match daemon_address(&s).await {
        Ok((addr, pin)) => match async {
            crate::daemon::client(&s.net, &addr, crate::net::Pin::parse(&pin)?).await
        }
        .await
        {
            Ok(mut d) => match d.get_chain_status(GetChainStatusRequest {}).await {
                Ok(r) => share_chain_json(&addr, r.into_inner()),
                Err(e) => json!({ "address": addr, "error": e.message() }),
            },
            Err(e) => {
                json!({ "address": addr, "error": format!("cannot reach the daemon: {e:#}") })
            }
        },
        Err(e) => json!({ "error": e.message }),
    };
    let onchain = match &s.chain {
        None => Value::Null,
        Some(c) => {
            let block = c.reader.block_number().await.ok();
            json!({
                "rpc_url": c.rpc_url,
                "block": block,
                "token": c.deployment.token.to_string(),
                "escrow": c.deployment.escrow.to_string(),
            })
        }
    };
    Ok(Json(json!({ "share_chain": daemon, "onchain": onchain })))
}

fn share_chain_json(addr: &str, st: GetChainStatusResponse) -> Value {
    let amount_of = |v: &str| v.parse::<U256>().ok().map(amount);
    json!({
        "address": addr,
        "height": st.height,
        "tip": hex::encode(&st.tip_hash),
        "shares": st.shares,
        "pending_shares": st.pending_shares,
        "blocks": st.recent_blocks.iter().map(|b| json!({
            "height": b.height,
            "hash": hex::encode(&b.hash),
            "prev_hash": hex::encode(&b.prev_hash),
            "shares": b.share_count,
            "timestamp_ms": b.timestamp_ms,
        })).collect::<Vec<_>>(),
        "nodes": st.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "shares": n.shares,
            "input_tokens": n.input_tokens,
            "output_tokens": n.output_tokens,
        })).collect::<Vec<_>>(),
        "settlements": st.settlements.iter().rev().map(|x| json!({
            "hash": hex::encode(&x.hash),
            "blocks": [x.from_height, x.to_height],
            "client": x.client,
            "total": amount_of(&x.total),
            "status": x.status,
            "last_error": x.last_error,
            "payouts": x.nodes.iter().zip(&x.amounts).map(|(n, a)| json!({
                "node": n, "amount": amount_of(a),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A wallet's escrow deposit (what chats are billed from), token and gas balances.
pub async fn balance(
    State(s): State<Arc<WebState>>,
    Path(address): Path<String>,
) -> ApiResult<Value> {
    let who: Address = address.trim().parse().map_err(|_| {
        ApiError::new(
            400,
            format!("`{address}` is not an EVM address (0x followed by 40 hex digits)"),
        )
    })?;
    let c = s.chain.as_ref().ok_or_else(|| {
        ApiError::new(
            503,
            "the dashboard has no chain (start it with --chain-rpc and --escrow)",
        )
    })?;
    let upstream = |e: unfed_chain::ChainError| ApiError::upstream(e.into());
    let deposit = c
        .reader
        .client_balance(&c.deployment, who)
        .await
        .map_err(upstream)?;
    // Without the token's address (--token) only the deposit and gas are known.
    let tokens = if c.deployment.token == Address::ZERO {
        None
    } else {
        Some(
            c.reader
                .token_balance(&c.deployment, who)
                .await
                .map_err(upstream)?,
        )
    };
    let eth = c.reader.eth_balance(who).await.map_err(upstream)?;
    Ok(Json(json!({
        "address": who.to_string(),
        "deposit": amount(deposit),
        "tokens": tokens.map(amount),
        "eth": amount(eth),
    })))
}
