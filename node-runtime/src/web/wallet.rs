//! Wallet endpoints: sign-in (challenge, verify, demo, session, logout) and the faucet.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::SignedIn;
use super::server::{ApiError, ApiResult, WebState};
use super::views::amount;

#[derive(Deserialize)]
pub struct AddressBody {
    pub address: String,
}

#[derive(Deserialize)]
pub struct VerifyBody {
    pub nonce: String,
    /// 0x-prefixed 65-byte signature of the challenge message (EIP-191 personal_sign).
    #[serde(default)]
    pub signature: String,
}

fn signed_in(s: SignedIn) -> Json<Value> {
    Json(json!({
        "token": s.token,
        "address": s.address.to_string(),
        "expires_in_secs": s.expires_in.as_secs(),
    }))
}

/// What one signed-in session may spend: the cap of the delegation signed at sign-in.
const SESSION_SPEND_CAP: u64 = 100;

pub async fn challenge(
    State(s): State<Arc<WebState>>,
    Json(body): Json<AddressBody>,
) -> ApiResult<Value> {
    // With a chain, signing in delegates voucher signing to the dashboard for the session.
    let spend = match &s.chain {
        Some(c) => {
            let chain_id = c.reader.chain_id().await.map_err(ApiError::upstream)?;
            let cap = unfed_chain::U256::from(SESSION_SPEND_CAP)
                * unfed_chain::U256::from(10u64).pow(unfed_chain::U256::from(18));
            Some((chain_id, c.deployment.escrow, cap))
        }
        None => None,
    };
    let (nonce, message) = s.auth.challenge(&body.address, &s.site, spend)?;
    Ok(Json(json!({ "nonce": nonce, "message": message })))
}

pub async fn verify(
    State(s): State<Arc<WebState>>,
    Json(body): Json<VerifyBody>,
) -> ApiResult<Value> {
    let signature = (!s.switches.dev_bypass).then_some(body.signature.as_str());
    Ok(signed_in(s.auth.verify_as(&body.nonce, signature)?))
}

/// One-click sign-in as the demo wallet; only with UNFED_DEMO_AUTH=1.
pub async fn demo(State(s): State<Arc<WebState>>) -> ApiResult<Value> {
    if !s.switches.demo {
        return Err(ApiError::new(
            403,
            "demo sign-in is off (UNFED_DEMO_AUTH); sign in with a wallet",
        ));
    }
    let wallet = s.switches.demo_wallet.ok_or_else(|| {
        ApiError::new(
            503,
            "demo sign-in has no wallet: start the dashboard with --demo-wallet",
        )
    })?;
    Ok(signed_in(
        s.auth.open_session(wallet, s.switches.demo_payer.clone()),
    ))
}

/// One-click sign-in as the testnet's dev client wallet: only on loopback against a
/// local Anvil (see `dev_wallet`).
pub async fn dev_wallet(State(s): State<Arc<WebState>>) -> ApiResult<Value> {
    let wallet = s.dev_wallet.as_ref().map_err(|why| {
        ApiError::new(
            403,
            format!("dev-wallet sign-in is off ({why}); sign in with a wallet"),
        )
    })?;
    // The dev client signs its own vouchers: its key is public on a local Anvil anyway.
    let key = super::dev_wallet::dev_client().map_err(|e| ApiError::new(500, format!("{e:#}")))?;
    Ok(signed_in(s.auth.open_session(
        *wallet,
        Some(crate::voucher::Payer::wallet(key)),
    )))
}

pub async fn session(State(s): State<Arc<WebState>>, headers: HeaderMap) -> ApiResult<Value> {
    let address = s.session(&headers)?;
    Ok(Json(json!({ "address": address.to_string() })))
}

pub async fn logout(State(s): State<Arc<WebState>>, headers: HeaderMap) -> ApiResult<Value> {
    if let Some(token) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        s.auth.end(token);
    }
    Ok(Json(json!({ "signed_out": true })))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Credits the faucet amount to the signed-in wallet's chat deposit in the escrow
/// (`depositFor`, paid by the operator), so it can chat without a transaction of its own.
pub async fn faucet(
    State(s): State<Arc<WebState>>,
    headers: HeaderMap,
    Json(body): Json<AddressBody>,
) -> ApiResult<Value> {
    let payer = match &s.chain {
        None => Err("the dashboard has no chain (--chain-rpc, --escrow)".to_string()),
        Some(c) if c.payer.is_none() => {
            Err("no paying wallet (--operator-key-file or UNFED_OPERATOR_KEY_FILE)".to_string())
        }
        Some(c) if c.deployment.token == unfed_chain::Address::ZERO => {
            Err("the token's address is unknown (--token)".to_string())
        }
        Some(_) => Ok(()),
    };
    let session = s.session(&headers).ok();
    // One grant at a time: two requests for one address cannot both pass the cooldown,
    // and the payer's transactions do not race for nonces.
    let _one_at_a_time = s.faucet_lock.lock().await;
    let now = now_ms();
    let who = s.faucet.admit(&body.address, payer, session, now)?;
    let c = s.chain.as_ref().expect("admitted only with a chain");
    let pay = c.payer.as_ref().expect("admitted only with a payer");
    pay.deposit_for(&c.deployment, who, s.faucet_amount)
        .await
        .map_err(|e| ApiError::new(503, format!("the faucet's payment failed: {e}")))?;
    s.faucet
        .record(who, now)
        .map_err(|e| ApiError::new(500, format!("{e:#}")))?;
    tracing::info!(to = %who, amount = %unfed_chain::format_amount(s.faucet_amount), "faucet grant");
    Ok(Json(json!({
        "address": who.to_string(),
        "deposited": amount(s.faucet_amount),
        "next_in_secs": s.faucet.policy().cooldown.as_secs(),
    })))
}
