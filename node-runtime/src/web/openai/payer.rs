//! Who pays for an API request: the one place that turns the request's API key into
//! the payer. Today a key maps to a wallet, which the daemon bills (as the dashboard's
//! signed-in wallet); with client-signed billing this becomes "the key's delegation
//! signs the request's spending", and nothing else in the API changes.

use axum::http::{HeaderMap, header};
use unfed_chain::Address;

use super::error::OpenAiError;
use super::keys::{ApiKeys, KeyRefusal, now_ms};

/// The wallet billed for a request carrying `Authorization: Bearer KEY`.
pub fn payer_of(keys: &ApiKeys, headers: &HeaderMap) -> Result<Address, OpenAiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match keys.lookup(key, now_ms()) {
        Ok(record) => Ok(record.wallet),
        Err(e @ KeyRefusal::Store(_)) => Err(OpenAiError::new(500, e.to_string())),
        Err(e) => Err(OpenAiError::new(401, e.to_string())),
    }
}
