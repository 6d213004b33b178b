//! One-click sign-in as the testnet's dev client wallet. On a local Anvil every key is
//! the public dev mnemonic's, so signing in as its client wallet proves nothing and costs
//! nothing to allow; it is offered only when the dashboard is bound to loopback and the
//! chain is a local Anvil. Everywhere else a person signs in with their own wallet.

use unfed_chain::{Address, PrivateKeySigner};

use super::args::is_loopback;

/// The wallet dev sign-in opens a session for, and whose deposit pays its chats.
pub fn dev_client() -> anyhow::Result<PrivateKeySigner> {
    unfed_chain::keys::dev_client_signer()
}

/// Whether dev sign-in is offered for a dashboard bound to `host` reading `chain_rpc`:
/// the dev client's address, or why not.
pub async fn offer(host: &str, chain_rpc: Option<&str>) -> Result<Address, String> {
    if !is_loopback(host) {
        return Err(format!(
            "the dashboard binds {host}, not loopback: anyone who reaches it could use the testnet's client wallet"
        ));
    }
    let rpc = chain_rpc.ok_or("the dashboard has no chain (--chain-rpc)")?;
    unfed_chain::anvil::ensure_local(rpc)
        .await
        .map_err(|e| format!("{e:#}; dev keys are public only on a local Anvil"))?;
    dev_client()
        .map(|s| s.address())
        .map_err(|e| format!("{e:#}"))
}
