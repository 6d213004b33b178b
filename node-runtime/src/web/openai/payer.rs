//! Who pays for an API request: the one place that turns the request's API key into
//! the payer. A key bills the wallet that created it, through the delegation the wallet
//! signed to the key's delegate (`voucher::key_delegate`): the dashboard signs each
//! request's spending voucher with the delegate derived from the presented key.

use axum::http::{HeaderMap, header};
use unfed_chain::Address;

use super::error::OpenAiError;
use super::keys::{ApiKeys, KeyRefusal, now_ms};
use crate::voucher::Payer;

/// The wallet billed for a request carrying `Authorization: Bearer KEY`, and who signs
/// its vouchers (`None` for a key made without a delegation: its chats are unpaid).
pub fn payer_of(
    keys: &ApiKeys,
    headers: &HeaderMap,
) -> Result<(Address, Option<Payer>), OpenAiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let record = match keys.lookup(key, now_ms()) {
        Ok(record) => record,
        Err(e @ KeyRefusal::Store(_)) => return Err(OpenAiError::new(500, e.to_string())),
        Err(e) => return Err(OpenAiError::new(401, e.to_string())),
    };
    let payer = match (&record.delegation, key) {
        (Some(bytes), Some(secret)) => {
            let delegation = crate::voucher::delegation_from_bytes(record.wallet, bytes)
                .map_err(|e| OpenAiError::new(500, format!("{e:#}")))?;
            Some(Payer {
                signer: crate::voucher::key_delegate(secret),
                delegation: Some(delegation),
            })
        }
        _ => None,
    };
    Ok((record.wallet, payer))
}
