//! The client withdrawal delay against a real Anvil: a withdrawal is a request and,
//! `withdrawDelay` later, the withdrawal; settlements posted in between still draw on
//! the deposit, so in either order of events the nodes are paid for work already done.

mod common;

use alloy::primitives::{B256, U256};
use common::*;
use unfed_chain::Chain;

/// A client with `deposit` in the escrow and a node wallet with nothing.
async fn client_and_node(n: &Net, deposit: &str) -> (Chain, Chain) {
    let client = n.wallet(2, "1000").await;
    client.deposit(&n.d, tokens(deposit)).await.unwrap();
    (client, n.wallet(4, "0").await)
}

/// The settler posts settlement `tag` paying `node` `amount` out of `client`'s deposit.
async fn settle(n: &Net, client: &Chain, node: &Chain, tag: u8, amount: &str) -> B256 {
    let h = B256::repeat_byte(tag);
    n.operator
        .post_settlement(
            &n.d,
            h,
            client.address(),
            vec![node.address()],
            vec![tokens(amount)],
        )
        .await
        .unwrap();
    h
}

async fn request(n: &Net, client: &Chain, amount: &str) {
    client
        .request_client_withdraw(&n.d, tokens(amount))
        .await
        .unwrap();
}

/// Lets the settlement's window pass, finalizes it and returns the node's earnings.
async fn finalize_and_earnings(n: &Net, node: &Chain, h: B256) -> U256 {
    n.increase_time(n.params.challenge_window_secs).await;
    node.finalize_settlement(&n.d, h).await.unwrap();
    n.operator.earnings(&n.d, node.address()).await.unwrap()
}

#[tokio::test]
async fn withdraw_request_then_settlement_still_pays_the_node() {
    let n = net().await;
    let (client, node) = client_and_node(&n, "100").await;
    let me = client.address();
    request(&n, &client, "100").await;
    let req = client.withdrawal_request(&n.d, me).await.unwrap();
    assert_eq!(req.amount, tokens("100"));

    // Too early: refused, and the deposit stays where settlements can reach it.
    assert_reverts(
        client.client_withdraw(&n.d).await,
        "UnfedEscrow: withdraw delay not elapsed",
    );
    assert_eq!(
        n.operator.client_balance(&n.d, me).await.unwrap(),
        tokens("100")
    );
    assert_eq!(client.token_balance(&n.d, me).await.unwrap(), tokens("900"));

    // The daemon settles the session the client ran before asking for its money back.
    let h = settle(&n, &client, &node, 1, "40").await;

    n.increase_time(n.params.withdraw_delay_secs).await;
    client.client_withdraw(&n.d).await.unwrap();
    // min(requested, balance): the 40 owed stayed in the escrow.
    assert_eq!(client.token_balance(&n.d, me).await.unwrap(), tokens("960"));
    assert_eq!(
        n.operator.client_balance(&n.d, me).await.unwrap(),
        U256::ZERO
    );
    assert_eq!(
        client.withdrawal_request(&n.d, me).await.unwrap().amount,
        U256::ZERO
    );
    assert_eq!(finalize_and_earnings(&n, &node, h).await, tokens("40"));
    assert_reverts(
        client.client_withdraw(&n.d).await,
        "UnfedEscrow: no withdrawal requested",
    );
}

#[tokio::test]
async fn settlement_then_withdraw_pays_the_node_and_returns_the_rest() {
    let n = net().await;
    let (client, node) = client_and_node(&n, "100").await;
    let me = client.address();
    let h = settle(&n, &client, &node, 2, "40").await;
    // What is owed is already debited: the client cannot ask for it back.
    assert_reverts(
        client.request_client_withdraw(&n.d, tokens("61")).await,
        "UnfedEscrow: withdraw amount exceeds balance",
    );
    request(&n, &client, "60").await;
    n.increase_time(n.params.withdraw_delay_secs).await;
    client.client_withdraw(&n.d).await.unwrap();
    assert_eq!(client.token_balance(&n.d, me).await.unwrap(), tokens("960"));
    assert_eq!(finalize_and_earnings(&n, &node, h).await, tokens("40"));
}

#[tokio::test]
async fn a_withdrawal_emptied_by_settlements_is_refused_and_changes_nothing() {
    let n = net().await;
    let (client, node) = client_and_node(&n, "50").await;
    let me = client.address();
    request(&n, &client, "50").await;
    let h = settle(&n, &client, &node, 3, "50").await;
    n.increase_time(n.params.withdraw_delay_secs).await;
    assert_reverts(
        client.client_withdraw(&n.d).await,
        "UnfedEscrow: nothing left to withdraw",
    );
    assert_eq!(client.token_balance(&n.d, me).await.unwrap(), tokens("950"));
    assert_eq!(finalize_and_earnings(&n, &node, h).await, tokens("50"));
}

#[tokio::test]
async fn a_new_request_restarts_the_delay() {
    let n = net().await;
    let (client, _node) = client_and_node(&n, "100").await;
    let me = client.address();
    request(&n, &client, "10").await;
    n.increase_time(n.params.withdraw_delay_secs - 5).await;
    request(&n, &client, "20").await;
    n.increase_time(10).await;
    assert_reverts(
        client.client_withdraw(&n.d).await,
        "UnfedEscrow: withdraw delay not elapsed",
    );
    assert_eq!(
        n.operator.client_balance(&n.d, me).await.unwrap(),
        tokens("100")
    );
}
