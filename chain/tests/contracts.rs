//! Contract behaviour against a real Anvil: every function's success path and every
//! revert (by reason), the challenge-window edges and the slashing order.
//! Each test owns its Anvil (free port) and deployment, so tests run in parallel.

mod common;

use alloy::primitives::{Address, B256, U256};
use common::*;
use unfed_chain::{EscrowParams, SlashDestination, dev_signer};

#[tokio::test]
async fn token_metadata_supply_and_transfer_reverts() {
    let n = net().await;
    let t = n.operator.token(&n.d);
    assert_eq!(t.name().call().await.unwrap(), "Unfed Token");
    assert_eq!(t.symbol().call().await.unwrap(), "UNFED");
    assert_eq!(t.decimals().call().await.unwrap(), 18);
    let supply = t.totalSupply().call().await.unwrap();
    assert_eq!(supply, n.params.initial_supply);
    assert_eq!(
        n.operator
            .token_balance(&n.d, n.operator.address())
            .await
            .unwrap(),
        supply
    );

    let a = n.wallet(1, "10").await;
    let b = dev_signer(2).unwrap().address();
    assert_reverts(
        unfed_chain::escrow::send("transfer", a.token(&n.d).transfer(b, tokens("11"))).await,
        "UnfedToken: transfer amount exceeds balance",
    );
    assert_reverts(
        unfed_chain::escrow::send(
            "transfer",
            a.token(&n.d).transfer(Address::ZERO, tokens("1")),
        )
        .await,
        "UnfedToken: transfer to the zero address",
    );
    assert_reverts(
        unfed_chain::escrow::send(
            "transferFrom",
            a.token(&n.d)
                .transferFrom(n.operator.address(), b, tokens("1")),
        )
        .await,
        "UnfedToken: insufficient allowance",
    );
    assert_reverts(
        unfed_chain::escrow::send("approve", a.token(&n.d).approve(Address::ZERO, tokens("1")))
            .await,
        "UnfedToken: approve to the zero address",
    );
    assert_reverts(
        unfed_chain::escrow::send("burn", a.token(&n.d).burn(tokens("11"))).await,
        "UnfedToken: burn amount exceeds balance",
    );
    unfed_chain::escrow::send("burn", a.token(&n.d).burn(tokens("4")))
        .await
        .unwrap();
    assert_eq!(
        a.token_balance(&n.d, a.address()).await.unwrap(),
        tokens("6")
    );
    assert_eq!(t.totalSupply().call().await.unwrap(), supply - tokens("4"));
}

#[tokio::test]
async fn fund_sends_tokens_and_gas_money() {
    let n = net().await;
    let fresh = Address::repeat_byte(0x42);
    n.operator
        .fund(&n.d, fresh, tokens("200"), tokens("0.5"))
        .await
        .unwrap();
    assert_eq!(
        n.operator.token_balance(&n.d, fresh).await.unwrap(),
        tokens("200")
    );
    assert_eq!(n.operator.eth_balance(fresh).await.unwrap(), tokens("0.5"));
}

#[tokio::test]
async fn stake_makes_eligible_and_unstake_cools_down_before_withdraw() {
    let n = net().await;
    let node = n.wallet(1, "300").await;
    let me = node.address();
    assert_reverts(
        node.stake(&n.d, U256::ZERO).await,
        "UnfedEscrow: stake amount is zero",
    );
    // Staking more than the wallet holds fails inside the token.
    assert_reverts(
        node.stake(&n.d, tokens("301")).await,
        "UnfedToken: transfer amount exceeds balance",
    );

    node.stake(&n.d, tokens("200")).await.unwrap();
    let s = node.stake_info(&n.d, me).await.unwrap();
    assert_eq!(
        (s.active, s.cooling, s.eligible),
        (tokens("200"), U256::ZERO, true)
    );
    assert_eq!(node.token_balance(&n.d, me).await.unwrap(), tokens("100"));

    assert_reverts(
        node.request_unstake(&n.d, U256::ZERO).await,
        "UnfedEscrow: unstake amount is zero",
    );
    assert_reverts(
        node.request_unstake(&n.d, tokens("201")).await,
        "UnfedEscrow: unstake amount exceeds stake",
    );
    assert_reverts(
        node.withdraw(&n.d).await,
        "UnfedEscrow: nothing to withdraw",
    );

    node.request_unstake(&n.d, tokens("150")).await.unwrap();
    let s = node.stake_info(&n.d, me).await.unwrap();
    assert_eq!(
        (s.active, s.cooling, s.eligible),
        (tokens("50"), tokens("150"), false)
    );
    let requested_at = node.block_timestamp().await.unwrap();
    assert_eq!(
        s.unlock_time,
        U256::from(requested_at + n.params.cooldown_secs)
    );

    n.set_next_timestamp(requested_at + n.params.cooldown_secs - 1)
        .await;
    assert_reverts(
        node.withdraw(&n.d).await,
        "UnfedEscrow: cooldown not elapsed",
    );
    n.set_next_timestamp(requested_at + n.params.cooldown_secs)
        .await;
    node.withdraw(&n.d).await.unwrap();
    let s = node.stake_info(&n.d, me).await.unwrap();
    assert_eq!((s.active, s.cooling), (tokens("50"), U256::ZERO));
    assert_eq!(node.token_balance(&n.d, me).await.unwrap(), tokens("250"));
}

#[tokio::test]
async fn client_deposits_and_withdrawals() {
    let n = net().await;
    let client = n.wallet(2, "1000").await;
    let other = dev_signer(3).unwrap().address();
    assert_reverts(
        client.deposit(&n.d, U256::ZERO).await,
        "UnfedEscrow: deposit amount is zero",
    );
    client.deposit(&n.d, tokens("400")).await.unwrap();
    client
        .deposit_for(&n.d, other, tokens("100"))
        .await
        .unwrap();
    assert_reverts(
        client.deposit_for(&n.d, Address::ZERO, tokens("1")).await,
        "UnfedEscrow: client is the zero address",
    );
    assert_eq!(
        client.client_balance(&n.d, client.address()).await.unwrap(),
        tokens("400")
    );
    assert_eq!(
        client.client_balance(&n.d, other).await.unwrap(),
        tokens("100")
    );
    assert_eq!(
        client.token_balance(&n.d, client.address()).await.unwrap(),
        tokens("500")
    );

    assert_reverts(
        client.request_client_withdraw(&n.d, U256::ZERO).await,
        "UnfedEscrow: withdraw amount is zero",
    );
    assert_reverts(
        client.request_client_withdraw(&n.d, tokens("401")).await,
        "UnfedEscrow: withdraw amount exceeds balance",
    );
    assert_reverts(
        client.client_withdraw(&n.d).await,
        "UnfedEscrow: no withdrawal requested",
    );
    client
        .request_client_withdraw(&n.d, tokens("150"))
        .await
        .unwrap();
    n.increase_time(n.params.withdraw_delay_secs).await;
    client.client_withdraw(&n.d).await.unwrap();
    assert_eq!(
        client.client_balance(&n.d, client.address()).await.unwrap(),
        tokens("250")
    );
    assert_eq!(
        client.token_balance(&n.d, client.address()).await.unwrap(),
        tokens("650")
    );
}

#[tokio::test]
async fn settlement_debits_the_client_and_pays_nodes_after_the_window() {
    let n = net().await;
    let client = n.wallet(2, "1000").await;
    client.deposit(&n.d, tokens("100")).await.unwrap();
    let a = n.wallet(4, "0").await;
    let b = n.wallet(5, "0").await;
    let h = B256::repeat_byte(7);
    let nodes = vec![a.address(), b.address()];
    let amounts = vec![tokens("30"), tokens("12.5")];

    // Only the settler posts; the inputs are validated.
    assert_reverts(
        client
            .post_settlement(&n.d, h, client.address(), nodes.clone(), amounts.clone())
            .await,
        "UnfedEscrow: caller is not the settler",
    );
    let op = &n.operator;
    assert_reverts(
        op.post_settlement(&n.d, h, client.address(), nodes.clone(), vec![tokens("1")])
            .await,
        "UnfedEscrow: nodes and amounts length mismatch",
    );
    assert_reverts(
        op.post_settlement(&n.d, h, client.address(), vec![], vec![])
            .await,
        "UnfedEscrow: settlement has no nodes",
    );
    assert_reverts(
        op.post_settlement(
            &n.d,
            h,
            client.address(),
            vec![Address::ZERO],
            vec![tokens("1")],
        )
        .await,
        "UnfedEscrow: node is the zero address",
    );
    assert_reverts(
        op.post_settlement(
            &n.d,
            h,
            client.address(),
            nodes.clone(),
            vec![tokens("90"), tokens("11")],
        )
        .await,
        "UnfedEscrow: insufficient client balance",
    );

    let receipt = op
        .post_settlement(&n.d, h, client.address(), nodes.clone(), amounts.clone())
        .await
        .unwrap();
    let posted = receipt
        .decoded_log::<unfed_chain::contracts::UnfedEscrow::SettlementPosted>()
        .expect("SettlementPosted event");
    assert_eq!(posted.settlementHash, h);
    assert_eq!(posted.client, client.address());
    assert_eq!(posted.total, tokens("42.5"));
    // The fix of the original's defect: the paying client's balance is debited.
    assert_eq!(
        op.client_balance(&n.d, client.address()).await.unwrap(),
        tokens("57.5")
    );
    assert_reverts(
        op.post_settlement(&n.d, h, client.address(), nodes.clone(), amounts.clone())
            .await,
        "UnfedEscrow: settlement already posted",
    );
    assert_reverts(
        client.request_client_withdraw(&n.d, tokens("60")).await,
        "UnfedEscrow: withdraw amount exceeds balance",
    );
    let s = op.settlement(&n.d, h).await.unwrap();
    assert_eq!(
        (s.client, s.total, s.nodes, s.amounts),
        (client.address(), tokens("42.5"), nodes, amounts)
    );

    // Challenge-window edges: one second short reverts, exactly at the window succeeds.
    assert_reverts(
        a.claim_earnings(&n.d).await,
        "UnfedEscrow: no earnings to claim",
    );
    let window = n.params.challenge_window_secs;
    n.set_next_timestamp(s.posted_at + window - 1).await;
    assert_reverts(
        a.finalize_settlement(&n.d, h).await,
        "UnfedEscrow: challenge window still open",
    );
    n.set_next_timestamp(s.posted_at + window).await;
    a.finalize_settlement(&n.d, h).await.unwrap(); // anyone may finalize
    assert!(op.settlement(&n.d, h).await.unwrap().finalized);
    assert_reverts(
        op.finalize_settlement(&n.d, h).await,
        "UnfedEscrow: settlement already finalized",
    );
    assert_reverts(
        op.challenge_settlement(&n.d, h).await,
        "UnfedEscrow: settlement already finalized",
    );
    assert_reverts(
        op.finalize_settlement(&n.d, B256::repeat_byte(9)).await,
        "UnfedEscrow: unknown settlement",
    );

    assert_eq!(op.earnings(&n.d, a.address()).await.unwrap(), tokens("30"));
    a.claim_earnings(&n.d).await.unwrap();
    b.claim_earnings(&n.d).await.unwrap();
    assert_eq!(
        a.token_balance(&n.d, a.address()).await.unwrap(),
        tokens("30")
    );
    assert_eq!(
        b.token_balance(&n.d, b.address()).await.unwrap(),
        tokens("12.5")
    );
    assert_eq!(op.earnings(&n.d, a.address()).await.unwrap(), U256::ZERO);
    assert_reverts(
        a.claim_earnings(&n.d).await,
        "UnfedEscrow: no earnings to claim",
    );
}

#[tokio::test]
async fn challenge_refunds_the_client_only_inside_the_window() {
    let n = net().await;
    let client = n.wallet(2, "1000").await;
    client.deposit(&n.d, tokens("100")).await.unwrap();
    let node = dev_signer(4).unwrap().address();
    let op = &n.operator;
    let (h1, h2) = (B256::repeat_byte(1), B256::repeat_byte(2));
    op.post_settlement(&n.d, h1, client.address(), vec![node], vec![tokens("40")])
        .await
        .unwrap();
    op.post_settlement(&n.d, h2, client.address(), vec![node], vec![tokens("10")])
        .await
        .unwrap();
    assert_eq!(
        op.client_balance(&n.d, client.address()).await.unwrap(),
        tokens("50")
    );

    assert_reverts(
        client.challenge_settlement(&n.d, h1).await,
        "UnfedEscrow: caller is not the settler",
    );
    assert_reverts(
        op.challenge_settlement(&n.d, B256::repeat_byte(3)).await,
        "UnfedEscrow: unknown settlement",
    );
    let window = n.params.challenge_window_secs;
    let posted = op.settlement(&n.d, h1).await.unwrap().posted_at;
    n.set_next_timestamp(posted + window - 1).await;
    op.challenge_settlement(&n.d, h1).await.unwrap();
    assert_eq!(
        op.client_balance(&n.d, client.address()).await.unwrap(),
        tokens("90")
    );
    assert!(op.settlement(&n.d, h1).await.unwrap().challenged);
    assert_reverts(
        op.challenge_settlement(&n.d, h1).await,
        "UnfedEscrow: settlement already challenged",
    );

    let posted2 = op.settlement(&n.d, h2).await.unwrap().posted_at;
    n.set_next_timestamp(posted2 + window).await;
    assert_reverts(
        op.challenge_settlement(&n.d, h2).await,
        "UnfedEscrow: challenge window closed",
    );
    assert_reverts(
        op.finalize_settlement(&n.d, h1).await,
        "UnfedEscrow: settlement was challenged",
    );
    assert_eq!(op.earnings(&n.d, node).await.unwrap(), U256::ZERO);
}

#[tokio::test]
async fn slashing_takes_active_stake_first_then_cooling() {
    let n = net().await; // slash 50 % to the pool
    let node = n.wallet(1, "200").await;
    let me = node.address();
    let op = &n.operator;
    assert_reverts(
        op.slash(&n.d, me, "no stake").await,
        "UnfedEscrow: node has no stake",
    );
    node.stake(&n.d, tokens("200")).await.unwrap();
    node.request_unstake(&n.d, tokens("160")).await.unwrap(); // active 40, cooling 160
    assert_reverts(
        node.slash(&n.d, me, "self").await,
        "UnfedEscrow: caller is not the slasher",
    );

    // 50 % of 200 = 100: all 40 active, then 60 of the cooling stake.
    op.slash(&n.d, me, "skipped layers").await.unwrap();
    let s = op.stake_info(&n.d, me).await.unwrap();
    assert_eq!((s.active, s.cooling), (U256::ZERO, tokens("100")));
    let e = op.escrow(&n.d);
    assert_eq!(e.slashPool().call().await.unwrap(), tokens("100"));

    // With enough active stake, cooling stake is untouched.
    let other = n.wallet(3, "200").await;
    other.stake(&n.d, tokens("200")).await.unwrap();
    other.request_unstake(&n.d, tokens("20")).await.unwrap(); // active 180, cooling 20
    op.slash(&n.d, other.address(), "bad logits").await.unwrap(); // 100 from active
    let s = op.stake_info(&n.d, other.address()).await.unwrap();
    assert_eq!(
        (s.active, s.cooling, s.eligible),
        (tokens("80"), tokens("20"), false)
    );
}

#[tokio::test]
async fn slash_destinations_burn_and_admin() {
    let params = EscrowParams {
        slash_destination: SlashDestination::Burn,
        slash_bps: 2500,
        ..EscrowParams::default()
    };
    let n = net_with(params).await;
    let op = &n.operator;
    let node = n.wallet(1, "200").await;
    node.stake(&n.d, tokens("200")).await.unwrap();
    let supply = op.token(&n.d).totalSupply().call().await.unwrap();
    op.slash(&n.d, node.address(), "burn").await.unwrap();
    assert_eq!(
        op.token(&n.d).totalSupply().call().await.unwrap(),
        supply - tokens("50")
    );

    let e = op.escrow(&n.d);
    unfed_chain::escrow::send(
        "setSlashConfig",
        e.setSlashConfig(SlashDestination::Admin as u8, 10000),
    )
    .await
    .unwrap();
    let before = op.token_balance(&n.d, op.address()).await.unwrap();
    op.slash(&n.d, node.address(), "to admin").await.unwrap();
    assert_eq!(
        op.token_balance(&n.d, op.address()).await.unwrap(),
        before + tokens("150")
    );
    assert_eq!(
        op.stake_info(&n.d, node.address()).await.unwrap().active,
        U256::ZERO
    );

    unfed_chain::escrow::send("setSlashConfig", e.setSlashConfig(2, 0))
        .await
        .unwrap();
    let n2 = n.wallet(3, "10").await;
    n2.stake(&n.d, tokens("10")).await.unwrap();
    assert_reverts(
        op.slash(&n.d, n2.address(), "zero").await,
        "UnfedEscrow: slash amount is zero",
    );
}

#[tokio::test]
async fn configuration_is_admin_only() {
    let n = net().await;
    let op = &n.operator;
    let e = op.escrow(&n.d);
    let stranger = n.wallet(6, "0").await;
    let se = stranger.escrow(&n.d);
    use unfed_chain::escrow::send;
    let not_op = "UnfedEscrow: caller is not the admin";
    assert_reverts(
        send("setMinStake", se.setMinStake(U256::from(1))).await,
        not_op,
    );
    assert_reverts(
        send("setCooldown", se.setCooldown(U256::from(1))).await,
        not_op,
    );
    assert_reverts(
        send("setChallengeWindow", se.setChallengeWindow(U256::from(1))).await,
        not_op,
    );
    assert_reverts(
        send("setSlashConfig", se.setSlashConfig(0, 1)).await,
        not_op,
    );
    assert_reverts(
        send("transferAdmin", se.transferAdmin(stranger.address())).await,
        not_op,
    );

    send("setMinStake", e.setMinStake(tokens("150")))
        .await
        .unwrap();
    send("setCooldown", e.setCooldown(U256::from(10)))
        .await
        .unwrap();
    send("setChallengeWindow", e.setChallengeWindow(U256::from(5)))
        .await
        .unwrap();
    // The withdraw delay never drops below the challenge window, from either side.
    assert_reverts(
        send("setWithdrawDelay", e.setWithdrawDelay(U256::from(4))).await,
        "UnfedEscrow: withdraw delay below challenge window",
    );
    assert_reverts(
        send("setChallengeWindow", e.setChallengeWindow(U256::from(121))).await,
        "UnfedEscrow: challenge window above withdraw delay",
    );
    send("setWithdrawDelay", e.setWithdrawDelay(U256::from(5)))
        .await
        .unwrap();
    assert_eq!(e.withdrawDelay().call().await.unwrap(), U256::from(5));
    assert_eq!(op.min_stake(&n.d).await.unwrap(), tokens("150"));
    assert_eq!(e.cooldown().call().await.unwrap(), U256::from(10));
    assert_eq!(e.challengeWindow().call().await.unwrap(), U256::from(5));
    assert_reverts(
        send("setSlashConfig", e.setSlashConfig(3, 1)).await,
        "UnfedEscrow: unknown slash destination",
    );
    assert_reverts(
        send("setSlashConfig", e.setSlashConfig(0, 10001)).await,
        "UnfedEscrow: slash bps above 10000",
    );
    send("setSlashConfig", e.setSlashConfig(1, 100))
        .await
        .unwrap();
    assert_eq!(e.slashDestination().call().await.unwrap(), 1);
    assert_eq!(e.slashBps().call().await.unwrap(), 100);

    // The new minimum applies to eligibility at once.
    let node = n.wallet(1, "200").await;
    node.stake(&n.d, tokens("149")).await.unwrap();
    assert!(
        !node
            .stake_info(&n.d, node.address())
            .await
            .unwrap()
            .eligible
    );

    assert_reverts(
        send("transferAdmin", e.transferAdmin(Address::ZERO)).await,
        "UnfedEscrow: new admin is the zero address",
    );
    send("transferAdmin", e.transferAdmin(stranger.address()))
        .await
        .unwrap();
    assert_eq!(e.admin().call().await.unwrap(), stranger.address());
    assert_reverts(
        send("setMinStake", e.setMinStake(U256::from(1))).await,
        not_op,
    );
    send("setMinStake", se.setMinStake(U256::from(1)))
        .await
        .unwrap();
}

#[tokio::test]
async fn constructor_rejects_bad_configuration() {
    let n = net().await;
    let bad = EscrowParams {
        slash_bps: 10001,
        ..EscrowParams::default()
    };
    let err = n.operator.deploy(&bad).await.unwrap_err();
    assert_eq!(
        err.revert_reason(),
        Some("UnfedEscrow: slash bps above 10000"),
        "{err}"
    );
    let short_delay = EscrowParams {
        withdraw_delay_secs: 59,
        ..EscrowParams::default()
    };
    let err = n.operator.deploy(&short_delay).await.unwrap_err();
    assert_eq!(
        err.revert_reason(),
        Some("UnfedEscrow: withdraw delay below challenge window"),
        "{err}"
    );
}
