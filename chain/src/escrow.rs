//! Operations on the deployed token and escrow, each a real transaction (or call) sent
//! by one wallet: deploy, fund, stake, unstake, deposit, settlements, slashing.
//! Reverts come back as [`ChainError::Reverted`] carrying the contract's reason.

use std::str::FromStr;

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::contracts::{UnfedEscrow, UnfedToken};

/// Where slashed stake goes (the escrow's SLASH_TO_* constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlashDestination {
    Burn = 0,
    /// To the escrow's admin.
    Admin = 1,
    Pool = 2,
}

impl FromStr for SlashDestination {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "burn" => Ok(Self::Burn),
            "admin" => Ok(Self::Admin),
            "pool" => Ok(Self::Pool),
            _ => bail!("unknown slash destination {s:?}: expected burn, admin or pool"),
        }
    }
}

/// Constructor arguments of the token and escrow.
#[derive(Debug, Clone)]
pub struct EscrowParams {
    /// Minted to the deployer.
    pub initial_supply: U256,
    pub min_stake: U256,
    pub cooldown_secs: u64,
    pub challenge_window_secs: u64,
    /// Delay between a client's withdrawal request and the withdrawal; at least the
    /// challenge window (the escrow refuses less), and a deployment adds one settlement
    /// interval so work done before a request is settled before the money leaves.
    pub withdraw_delay_secs: u64,
    pub slash_destination: SlashDestination,
    /// Fraction of a node's stake taken by one slash, in basis points (5000 = 50 %).
    pub slash_bps: u16,
}

impl Default for EscrowParams {
    /// The original's local deployment: min stake 100, cooldown 300 s, window 60 s,
    /// withdraw delay 120 s, slash 50 % to the pool; a billion tokens minted.
    fn default() -> Self {
        let unit = U256::from(10).pow(U256::from(18));
        Self {
            initial_supply: U256::from(1_000_000_000u64) * unit,
            min_stake: U256::from(100) * unit,
            cooldown_secs: 300,
            challenge_window_secs: 60,
            withdraw_delay_secs: 120,
            slash_destination: SlashDestination::Pool,
            slash_bps: 5000,
        }
    }
}

/// Addresses of a deployed token + escrow pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub token: Address,
    pub escrow: Address,
}

/// A wallet's position in the escrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StakeInfo {
    pub active: U256,
    pub cooling: U256,
    /// Unix seconds when cooling stake can be withdrawn (0 when nothing cools).
    pub unlock_time: U256,
    pub eligible: bool,
}

/// Who holds each duty in the escrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub admin: Address,
    pub settler: Address,
    pub slasher: Address,
}

/// A client's pending withdrawal (zero amount when none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WithdrawalRequest {
    pub amount: U256,
    /// Unix seconds from which `clientWithdraw` executes it.
    pub unlock_time: U256,
}

/// A settlement as stored by the escrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementInfo {
    pub client: Address,
    pub posted_at: u64,
    pub finalized: bool,
    pub challenged: bool,
    pub total: U256,
    pub nodes: Vec<Address>,
    pub amounts: Vec<U256>,
}

/// Errors callers match on.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The contract refused the call; `reason` is its revert string.
    #[error("{call} reverted: {reason}")]
    Reverted { call: String, reason: String },
    #[error("{call} failed: {source:#}")]
    Failed {
        call: String,
        #[source]
        source: anyhow::Error,
    },
}

impl ChainError {
    /// The revert reason, if the contract reverted.
    pub fn revert_reason(&self) -> Option<&str> {
        match self {
            ChainError::Reverted { reason, .. } => Some(reason),
            ChainError::Failed { .. } => None,
        }
    }
}

/// One wallet connected to one chain.
#[derive(Clone)]
pub struct Chain {
    provider: DynProvider,
    signer: PrivateKeySigner,
    rpc_url: String,
}

impl Chain {
    /// Connects `signer` to the chain at `rpc_url` (no request is made yet).
    pub fn connect(rpc_url: &str, signer: PrivateKeySigner) -> anyhow::Result<Self> {
        let url = rpc_url
            .parse()
            .with_context(|| format!("chain RPC URL {rpc_url:?} is not a valid URL"))?;
        // Nonces are read from the chain for every transaction: alloy's cached nonce
        // manager consumes a nonce even when gas estimation fails (a revert), leaving a
        // gap that stalls every later transaction of the wallet.
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(EthereumWallet::from(signer.clone()))
            .connect_http(url)
            .erased();
        Ok(Self {
            provider,
            signer,
            rpc_url: rpc_url.to_string(),
        })
    }

    /// The same chain, sending as another wallet.
    pub fn as_wallet(&self, signer: PrivateKeySigner) -> anyhow::Result<Self> {
        Self::connect(&self.rpc_url, signer)
    }

    pub fn address(&self) -> Address {
        self.signer.address()
    }

    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    pub fn token(&self, d: &Deployment) -> UnfedToken::UnfedTokenInstance<DynProvider> {
        UnfedToken::new(d.token, self.provider.clone())
    }

    pub fn escrow(&self, d: &Deployment) -> UnfedEscrow::UnfedEscrowInstance<DynProvider> {
        UnfedEscrow::new(d.escrow, self.provider.clone())
    }

    pub async fn chain_id(&self) -> anyhow::Result<u64> {
        self.provider
            .get_chain_id()
            .await
            .with_context(|| format!("cannot reach the chain at {}", self.rpc_url))
    }

    /// Deploys the token (supply minted to this wallet) and the escrow (this wallet holds
    /// every role until [`Chain::assign_roles`] hands them out).
    pub async fn deploy(&self, p: &EscrowParams) -> Result<Deployment, ChainError> {
        let token = UnfedToken::deploy(self.provider.clone(), p.initial_supply)
            .await
            .map_err(|e| contract_error("deploy UnfedToken", e))?;
        let escrow = UnfedEscrow::deploy(
            self.provider.clone(),
            *token.address(),
            p.min_stake,
            U256::from(p.cooldown_secs),
            U256::from(p.challenge_window_secs),
            U256::from(p.withdraw_delay_secs),
            p.slash_destination as u8,
            p.slash_bps,
        )
        .await
        .map_err(|e| contract_error("deploy UnfedEscrow", e))?;
        Ok(Deployment {
            token: *token.address(),
            escrow: *escrow.address(),
        })
    }

    /// Sends `tokens` UNFED and `eth` wei of gas money from this wallet to `to`.
    pub async fn fund(
        &self,
        d: &Deployment,
        to: Address,
        tokens: U256,
        eth: U256,
    ) -> Result<(), ChainError> {
        if !eth.is_zero() {
            self.send_eth(to, eth).await?;
        }
        if !tokens.is_zero() {
            send("UnfedToken.transfer", self.token(d).transfer(to, tokens)).await?;
        }
        Ok(())
    }

    /// Sends `who` enough ETH to hold at least `min_wei` (nothing if it already does);
    /// returns what was sent.
    pub async fn top_up_gas(&self, who: Address, min_wei: U256) -> Result<U256, ChainError> {
        let have = self.eth_balance(who).await?;
        if have >= min_wei {
            return Ok(U256::ZERO);
        }
        let missing = min_wei - have;
        self.send_eth(who, missing).await?;
        Ok(missing)
    }

    /// Stakes whatever this wallet lacks to reach `target` active stake (idempotent);
    /// returns the amount staked now.
    pub async fn stake_up_to(&self, d: &Deployment, target: U256) -> Result<U256, ChainError> {
        let active = self.stake_info(d, self.address()).await?.active;
        if active >= target {
            return Ok(U256::ZERO);
        }
        let missing = target - active;
        self.stake(d, missing).await?;
        Ok(missing)
    }

    async fn send_eth(&self, to: Address, wei: U256) -> Result<(), ChainError> {
        let call = "send ETH";
        let tx = TransactionRequest::default().with_to(to).with_value(wei);
        let pending = self
            .provider
            .send_transaction(tx)
            .await
            .map_err(|e| failed(call, e))?;
        let receipt = pending.get_receipt().await.map_err(|e| failed(call, e))?;
        check_status(call, &receipt)
    }

    /// Approves the escrow for `amount` and stakes it.
    pub async fn stake(&self, d: &Deployment, amount: U256) -> Result<(), ChainError> {
        send(
            "UnfedToken.approve",
            self.token(d).approve(d.escrow, amount),
        )
        .await?;
        send("UnfedEscrow.stake", self.escrow(d).stake(amount)).await?;
        Ok(())
    }

    pub async fn request_unstake(&self, d: &Deployment, amount: U256) -> Result<(), ChainError> {
        send(
            "UnfedEscrow.requestUnstake",
            self.escrow(d).requestUnstake(amount),
        )
        .await?;
        Ok(())
    }

    pub async fn withdraw(&self, d: &Deployment) -> Result<(), ChainError> {
        send("UnfedEscrow.withdraw", self.escrow(d).withdraw()).await?;
        Ok(())
    }

    /// Approves and deposits `amount` to this wallet's client balance.
    pub async fn deposit(&self, d: &Deployment, amount: U256) -> Result<(), ChainError> {
        send(
            "UnfedToken.approve",
            self.token(d).approve(d.escrow, amount),
        )
        .await?;
        send("UnfedEscrow.deposit", self.escrow(d).deposit(amount)).await?;
        Ok(())
    }

    /// Approves and deposits `amount` to `client`'s balance, paid by this wallet.
    pub async fn deposit_for(
        &self,
        d: &Deployment,
        client: Address,
        amount: U256,
    ) -> Result<(), ChainError> {
        send(
            "UnfedToken.approve",
            self.token(d).approve(d.escrow, amount),
        )
        .await?;
        send(
            "UnfedEscrow.depositFor",
            self.escrow(d).depositFor(client, amount),
        )
        .await?;
        Ok(())
    }

    /// Starts the withdrawal delay for `amount` of this wallet's client balance.
    pub async fn request_client_withdraw(
        &self,
        d: &Deployment,
        amount: U256,
    ) -> Result<(), ChainError> {
        send(
            "UnfedEscrow.requestClientWithdraw",
            self.escrow(d).requestClientWithdraw(amount),
        )
        .await?;
        Ok(())
    }

    /// Executes this wallet's pending withdrawal once its delay has passed.
    pub async fn client_withdraw(&self, d: &Deployment) -> Result<(), ChainError> {
        send(
            "UnfedEscrow.clientWithdraw",
            self.escrow(d).clientWithdraw(),
        )
        .await?;
        Ok(())
    }

    pub async fn withdrawal_request(
        &self,
        d: &Deployment,
        client: Address,
    ) -> Result<WithdrawalRequest, ChainError> {
        let e = self.escrow(d);
        Ok(WithdrawalRequest {
            amount: read("withdrawRequested", e.withdrawRequested(client)).await?,
            unlock_time: read("withdrawUnlockTime", e.withdrawUnlockTime(client)).await?,
        })
    }

    /// Admin: hands the settler and slasher duties to their own keys.
    pub async fn assign_roles(
        &self,
        d: &Deployment,
        settler: Address,
        slasher: Address,
    ) -> Result<(), ChainError> {
        let e = self.escrow(d);
        send("UnfedEscrow.setSettler", e.setSettler(settler)).await?;
        send("UnfedEscrow.setSlasher", e.setSlasher(slasher)).await?;
        Ok(())
    }

    pub async fn roles(&self, d: &Deployment) -> Result<Roles, ChainError> {
        let e = self.escrow(d);
        Ok(Roles {
            admin: read("admin", e.admin()).await?,
            settler: read("settler", e.settler()).await?,
            slasher: read("slasher", e.slasher()).await?,
        })
    }

    /// Settler: posts a settlement paying `nodes` out of `client`'s balance.
    pub async fn post_settlement(
        &self,
        d: &Deployment,
        hash: B256,
        client: Address,
        nodes: Vec<Address>,
        amounts: Vec<U256>,
    ) -> Result<TransactionReceipt, ChainError> {
        send(
            "UnfedEscrow.postSettlement",
            self.escrow(d).postSettlement(hash, client, nodes, amounts),
        )
        .await
    }

    pub async fn finalize_settlement(&self, d: &Deployment, hash: B256) -> Result<(), ChainError> {
        send(
            "UnfedEscrow.finalizeSettlement",
            self.escrow(d).finalizeSettlement(hash),
        )
        .await?;
        Ok(())
    }

    pub async fn challenge_settlement(&self, d: &Deployment, hash: B256) -> Result<(), ChainError> {
        send(
            "UnfedEscrow.challengeSettlement",
            self.escrow(d).challengeSettlement(hash),
        )
        .await?;
        Ok(())
    }

    pub async fn claim_earnings(&self, d: &Deployment) -> Result<(), ChainError> {
        send("UnfedEscrow.claimEarnings", self.escrow(d).claimEarnings()).await?;
        Ok(())
    }

    /// Slasher: slashes `node` (active stake first, then cooling).
    pub async fn slash(
        &self,
        d: &Deployment,
        node: Address,
        reason: &str,
    ) -> Result<(), ChainError> {
        send(
            "UnfedEscrow.slashNode",
            self.escrow(d).slashNode(node, reason.to_string()),
        )
        .await?;
        Ok(())
    }

    pub async fn stake_info(&self, d: &Deployment, node: Address) -> Result<StakeInfo, ChainError> {
        let e = self.escrow(d);
        Ok(StakeInfo {
            active: read("stakedBalance", e.stakedBalance(node)).await?,
            cooling: read("coolingBalance", e.coolingBalance(node)).await?,
            unlock_time: read("unlockTime", e.unlockTime(node)).await?,
            eligible: read("isEligible", e.isEligible(node)).await?,
        })
    }

    pub async fn min_stake(&self, d: &Deployment) -> Result<U256, ChainError> {
        read("minStake", self.escrow(d).minStake()).await
    }

    pub async fn client_balance(
        &self,
        d: &Deployment,
        client: Address,
    ) -> Result<U256, ChainError> {
        read("clientBalance", self.escrow(d).clientBalance(client)).await
    }

    pub async fn earnings(&self, d: &Deployment, node: Address) -> Result<U256, ChainError> {
        read("earnings", self.escrow(d).earnings(node)).await
    }

    pub async fn token_balance(&self, d: &Deployment, who: Address) -> Result<U256, ChainError> {
        read("balanceOf", self.token(d).balanceOf(who)).await
    }

    pub async fn eth_balance(&self, who: Address) -> Result<U256, ChainError> {
        self.provider
            .get_balance(who)
            .await
            .map_err(|e| failed("eth_getBalance", e))
    }

    pub async fn settlement(
        &self,
        d: &Deployment,
        hash: B256,
    ) -> Result<SettlementInfo, ChainError> {
        let r = read("getSettlement", self.escrow(d).getSettlement(hash)).await?;
        Ok(SettlementInfo {
            client: r.client,
            posted_at: r.postedAt,
            finalized: r.finalized,
            challenged: r.challenged,
            total: r.total,
            nodes: r.nodes,
            amounts: r.amounts,
        })
    }

    /// Whether `addr` holds contract code (a recorded deployment still exists).
    pub async fn has_code(&self, addr: Address) -> anyhow::Result<bool> {
        let code = self
            .provider
            .get_code_at(addr)
            .await
            .with_context(|| format!("cannot reach the chain at {}", self.rpc_url))?;
        Ok(!code.is_empty())
    }

    /// Number of the latest block.
    pub async fn block_number(&self) -> anyhow::Result<u64> {
        self.provider
            .get_block_number()
            .await
            .with_context(|| format!("cannot reach the chain at {}", self.rpc_url))
    }

    /// Hash of block 0: tells two chains with the same id (a restarted Anvil) apart.
    pub async fn genesis_hash(&self) -> anyhow::Result<B256> {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Number(0))
            .await
            .with_context(|| format!("cannot reach the chain at {}", self.rpc_url))?
            .context("the chain has no block 0")?;
        Ok(block.header.hash)
    }

    /// Timestamp of the latest block (the chain's clock).
    pub async fn block_timestamp(&self) -> anyhow::Result<u64> {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await?
            .context("the chain has no latest block")?;
        Ok(block.header.timestamp)
    }
}

/// Sends a contract call as a transaction and waits for its receipt. Gas estimation
/// runs the call first, so a revert surfaces here with the contract's reason.
pub async fn send<D: CallDecoder>(
    call: &str,
    builder: CallBuilder<&DynProvider, D>,
) -> Result<TransactionReceipt, ChainError> {
    let pending = builder.send().await.map_err(|e| contract_error(call, e))?;
    let receipt = pending.get_receipt().await.map_err(|e| failed(call, e))?;
    check_status(call, &receipt)?;
    Ok(receipt)
}

async fn read<D: CallDecoder>(
    call: &str,
    builder: CallBuilder<&DynProvider, D>,
) -> Result<D::CallOutput, ChainError> {
    builder.call().await.map_err(|e| contract_error(call, e))
}

fn check_status(call: &str, receipt: &TransactionReceipt) -> Result<(), ChainError> {
    if receipt.status() {
        Ok(())
    } else {
        Err(ChainError::Reverted {
            call: call.to_string(),
            reason: format!(
                "transaction {} reverted when mined",
                receipt.transaction_hash
            ),
        })
    }
}

/// Turns a contract call's error into a [`ChainError`], decoding the revert reason.
pub fn contract_error(call: &str, e: alloy::contract::Error) -> ChainError {
    if let Some(data) = e.as_revert_data() {
        let reason = alloy::sol_types::decode_revert_reason(&data)
            .map(|r| r.strip_prefix("revert: ").map(str::to_string).unwrap_or(r))
            .unwrap_or_else(|| format!("revert data 0x{}", hex::encode(&data)));
        return ChainError::Reverted {
            call: call.to_string(),
            reason,
        };
    }
    failed(call, e)
}

fn failed(call: &str, e: impl Into<anyhow::Error>) -> ChainError {
    ChainError::Failed {
        call: call.to_string(),
        source: e.into(),
    }
}
