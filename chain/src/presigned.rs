//! Staking transactions a fresh wallet signs offline for another party to submit: a
//! host joining a testnet never dials the chain's RPC (a local Anvil serves plain HTTP);
//! the control host funds the wallet and submits them over the join link.

use alloy::consensus::{SignableTransaction, Transaction, TxEip1559, TxEnvelope};
use alloy::eips::{Decodable2718, Encodable2718};
use alloy::network::TxSignerSync;
use alloy::primitives::{Address, Bytes, TxKind, U256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use anyhow::{Context, bail};

use crate::contracts::{UnfedEscrow, UnfedToken};
use crate::escrow::{Chain, Deployment};

/// Fee cap of each transaction; the wallet is funded for both at this cap.
const MAX_FEE_WEI: u128 = 100_000_000_000;
const PRIORITY_FEE_WEI: u128 = 1_000_000_000;
const APPROVE_GAS: u64 = 100_000;
const STAKE_GAS: u64 = 400_000;

/// ETH a wallet needs to pay for its signed approve and stake at the fee cap.
pub fn stake_gas_wei() -> U256 {
    U256::from(u128::from(APPROVE_GAS + STAKE_GAS) * MAX_FEE_WEI)
}

/// `signer`'s approve and stake of `amount`, signed with nonces 0 and 1: the wallet
/// must be new (it has sent nothing yet).
pub fn signed_stake(
    signer: &PrivateKeySigner,
    d: &Deployment,
    chain_id: u64,
    amount: U256,
) -> anyhow::Result<Vec<Bytes>> {
    let approve = UnfedToken::approveCall {
        spender: d.escrow,
        value: amount,
    }
    .abi_encode();
    let stake = UnfedEscrow::stakeCall { amount }.abi_encode();
    [
        (d.token, approve, APPROVE_GAS),
        (d.escrow, stake, STAKE_GAS),
    ]
    .into_iter()
    .enumerate()
    .map(|(nonce, (to, input, gas_limit))| {
        let mut tx = TxEip1559 {
            chain_id,
            nonce: nonce as u64,
            gas_limit,
            max_fee_per_gas: MAX_FEE_WEI,
            max_priority_fee_per_gas: PRIORITY_FEE_WEI,
            to: TxKind::Call(to),
            value: U256::ZERO,
            access_list: Default::default(),
            input: input.into(),
        };
        let signature = signer
            .sign_transaction_sync(&mut tx)
            .context("signing a stake transaction")?;
        Ok(TxEnvelope::from(tx.into_signed(signature))
            .encoded_2718()
            .into())
    })
    .collect()
}

/// Checks that `raw` is a transaction of `wallet` to the token or the escrow of `d`
/// carrying no ETH: the control host submits nothing else on a joining host's behalf.
pub fn check_stake_transaction(raw: &[u8], wallet: Address, d: &Deployment) -> anyhow::Result<()> {
    let envelope = TxEnvelope::decode_2718(&mut &raw[..]).context("not a signed transaction")?;
    let TxEnvelope::Eip1559(tx) = envelope else {
        bail!("not an EIP-1559 transaction");
    };
    let from = tx
        .signature()
        .recover_address_from_prehash(&tx.signature_hash())
        .context("the transaction's signature does not recover")?;
    let tx = tx.tx();
    if from != wallet {
        bail!("the transaction is signed by {from}, not by the node's wallet {wallet}");
    }
    match tx.to() {
        Some(to) if to == d.token || to == d.escrow => {}
        other => bail!(
            "the transaction goes to {other:?}, not to the testnet's token or escrow contract"
        ),
    }
    if !tx.value().is_zero() {
        bail!("the transaction sends ETH");
    }
    Ok(())
}

impl Chain {
    /// Submits signed transactions in order, each once the one before is mined.
    pub async fn submit_signed(&self, raw: &[Bytes]) -> anyhow::Result<()> {
        for tx in raw {
            let pending = self
                .provider()
                .send_raw_transaction(tx)
                .await
                .context("submitting a signed transaction")?;
            let receipt = pending
                .get_receipt()
                .await
                .context("waiting for a signed transaction")?;
            if !receipt.status() {
                bail!("signed transaction {} reverted", receipt.transaction_hash);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment {
            token: Address::repeat_byte(1),
            escrow: Address::repeat_byte(2),
        }
    }

    #[test]
    fn signed_stake_passes_its_own_check_and_fails_anothers() {
        let d = deployment();
        let signer = PrivateKeySigner::random();
        let txs = signed_stake(&signer, &d, 31337, U256::from(5)).unwrap();
        assert_eq!(txs.len(), 2);
        for tx in &txs {
            check_stake_transaction(tx, signer.address(), &d).unwrap();
            let other = PrivateKeySigner::random().address();
            let err = check_stake_transaction(tx, other, &d)
                .unwrap_err()
                .to_string();
            assert!(err.contains("not by the node's wallet"), "{err}");
        }
        let elsewhere = Deployment {
            token: Address::repeat_byte(3),
            escrow: Address::repeat_byte(4),
        };
        let err = check_stake_transaction(&txs[0], signer.address(), &elsewhere)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not to the testnet's"), "{err}");
        assert!(check_stake_transaction(b"junk", signer.address(), &d).is_err());
    }
}
