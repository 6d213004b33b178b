//! Shared set-up for the chain tests: a fresh Anvil on a free port per test, the
//! contracts deployed by dev wallet #0 (the operator), and chain-clock controls.

#![allow(dead_code)]

use alloy::primitives::U256;
use alloy::providers::Provider;
use unfed_chain::{Anvil, AnvilOptions, Chain, Deployment, EscrowParams, dev_signer, parse_amount};

pub struct Net {
    pub anvil: Anvil,
    pub operator: Chain,
    pub d: Deployment,
    pub params: EscrowParams,
}

pub fn tokens(s: &str) -> U256 {
    parse_amount(s).unwrap()
}

pub async fn net() -> Net {
    net_with(EscrowParams::default()).await
}

pub async fn net_with(params: EscrowParams) -> Net {
    let anvil = Anvil::start(&AnvilOptions::default())
        .await
        .expect("start anvil");
    let operator = Chain::connect(&anvil.endpoint(), dev_signer(0).unwrap()).unwrap();
    let d = operator.deploy(&params).await.expect("deploy");
    Net {
        anvil,
        operator,
        d,
        params,
    }
}

impl Net {
    /// Dev wallet `i` connected to this chain, holding `amount` tokens from the operator.
    pub async fn wallet(&self, i: u32, amount: &str) -> Chain {
        let w = self.operator.as_wallet(dev_signer(i).unwrap()).unwrap();
        self.operator
            .fund(&self.d, w.address(), tokens(amount), U256::ZERO)
            .await
            .unwrap();
        w
    }

    /// Makes the next mined block carry timestamp `ts` (and calls see it as well).
    pub async fn set_next_timestamp(&self, ts: u64) {
        let _: serde_json::Value = self
            .operator
            .provider()
            .raw_request("evm_setNextBlockTimestamp".into(), (ts,))
            .await
            .unwrap();
    }

    pub async fn increase_time(&self, secs: u64) {
        let _: serde_json::Value = self
            .operator
            .provider()
            .raw_request("evm_increaseTime".into(), (secs,))
            .await
            .unwrap();
        let _: serde_json::Value = self
            .operator
            .provider()
            .raw_request("evm_mine".into(), ())
            .await
            .unwrap();
    }
}

/// Asserts that `r` is a revert whose reason contains `reason`.
#[track_caller]
pub fn assert_reverts<T: std::fmt::Debug>(r: Result<T, unfed_chain::ChainError>, reason: &str) {
    match r {
        Err(e) => {
            let got = e
                .revert_reason()
                .unwrap_or_else(|| panic!("expected a revert, got: {e}"));
            assert!(
                got.contains(reason),
                "expected revert {reason:?}, got {got:?}"
            );
        }
        Ok(v) => panic!("expected revert {reason:?}, call succeeded: {v:?}"),
    }
}
