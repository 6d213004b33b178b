//! Settlement on a real Anvil with the compiled escrow: the daemon process posts each
//! summary as the operator, finalizes it after the challenge window, and the client's
//! deposit and the nodes' earnings match the usage at the configured prices exactly.
//! A settlement the client's deposit cannot cover is parked (no transaction sent) and
//! posted once the deposit grows, never dropped. A share db made for another chain (the
//! last run's, before a fresh Anvil) is kept aside and never settled on the new one.

mod common;
mod daemon_common;

use common::net::Node;
use daemon_common::*;
use unfed_chain::{U256, dev_signer, parse_amount};
use unfed_proto::*;

/// Daemon flags that settle on `anvil`'s escrow for `client` every `blocks` blocks, at
/// 3 wei per input and 5 wei per output token, with dev wallet 0 as the settler.
/// Voucher terms for a daemon started with `settling` on `d`.
fn settling_terms(d: &unfed_chain::Deployment) -> unfed_node::voucher::Terms {
    let mut t = terms(&d.escrow.to_string());
    t.prices = unfed_node::daemon::Prices {
        input: U256::from(3),
        output: U256::from(5),
    };
    t
}

fn settling(
    net: &Net,
    anvil: &unfed_chain::Anvil,
    d: &unfed_chain::Deployment,
    blocks: u32,
) -> Vec<String> {
    let key_file = net.dir.path().join("keys/operator.key");
    unfed_chain::write_key_file(&key_file, &dev_signer(0).unwrap()).unwrap();
    [
        "--chain-rpc",
        anvil.endpoint().as_str(),
        "--escrow",
        d.escrow.to_string().as_str(),
        "--operator-key-file",
        key_file.display().to_string().as_str(),
        "--settlement-blocks",
        blocks.to_string().as_str(),
        "--settle-poll-secs",
        "0.2",
        "--price-per-input-token",
        "0.000000000000000003",
        "--price-per-output-token",
        "0.000000000000000005",
    ]
    .map(String::from)
    .to_vec()
}

/// Independent restatement of the pricing rule: a step's price split evenly over the
/// route's shards, the remainder to the last shard.
fn hop_amount(input: u64, output: u64, shard: u32, shards: u32, p_in: u64, p_out: u64) -> U256 {
    let price = input * p_in + output * p_out;
    let base = price / shards as u64;
    U256::from(if shard + 1 == shards {
        base + price % shards as u64
    } else {
        base
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_paid_exactly_and_an_underfunded_settlement_waits_for_the_deposit() {
    let net = registry();
    let (anvil, operator, d) = common::net::anvil_with_escrow(1).await;
    let deposit = parse_amount("1000").unwrap();
    let gas = parse_amount("1").unwrap();
    let client = dev_signer(1).unwrap();
    let poor = dev_signer(4).unwrap();
    operator
        .fund(&d, client.address(), deposit, gas)
        .await
        .unwrap();
    operator
        .fund(&d, poor.address(), deposit, gas)
        .await
        .unwrap();
    operator
        .as_wallet(client.clone())
        .unwrap()
        .deposit(&d, deposit)
        .await
        .unwrap();
    // Odd prices in wei so that the per-shard split has remainders.
    let (p_in, p_out) = (3u64, 5u64);
    let extra = settling(&net, &anvil, &d, 2);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let db = net.dir.path().join("chain.db");
    let dnode = Node::start(
        &daemon_args(&net, &db, "0", &extra),
        net.dir.path().join("daemon.log"),
    );
    let log = || std::fs::read_to_string(&dnode.log).unwrap_or_default();
    let mut dm = daemon(&dnode.address).await;

    let (wa, wb) = (
        dev_signer(2).unwrap().address(),
        dev_signer(3).unwrap().address(),
    );
    let mut a = Signer::register(&net.registry.address, &wa.to_string()).await;
    let mut b = Signer::register(&net.registry.address, &wb.to_string()).await;
    b.shard_index = 1;
    a.shards_total = 2;
    b.shards_total = 2;
    // Vouchers at the daemon's prices, for its escrow; the route is (a, b).
    let terms = settling_terms(&d);
    let route = [wa.to_string(), wb.to_string()];
    let route: Vec<&str> = route.iter().map(String::as_str).collect();
    // A 2-shard route serving 2 sessions of 4 steps (prompt of 5 tokens) for the
    // default client, and one of 3 steps for the poor client, across two blocks.
    let (mut expect_a, mut expect_b, mut expect_poor) = (U256::ZERO, U256::ZERO, U256::ZERO);
    // Each session in a block of its own: two blocks per round, so each round is
    // one summary of `--settlement-blocks 2` (or more, when a block falls between the
    // two nodes' submissions or the test pauses for two intervals).
    for sessions in [["s1", "s2"], ["s3", "s4"]] {
        for sess in sessions {
            let height = dm
                .get_tip(GetTipRequest {})
                .await
                .unwrap()
                .into_inner()
                .tip_height;
            let poor_session = sess == "s4";
            let steps = if poor_session { 3 } else { 4 };
            let payer = unfed_node::voucher::Payer::wallet(if poor_session {
                poor.clone()
            } else {
                client.clone()
            });
            let v = voucher(&payer, &terms, sess, &route, (5, steps));
            for sg in [&mut a, &mut b] {
                sg.bill(sess, &v);
                let batch: Vec<_> = (0..steps).map(|_| sg.next(sess)).collect();
                for sh in &batch {
                    let amt = hop_amount(
                        sh.input_tokens as u64,
                        sh.output_tokens as u64,
                        sh.shard_index,
                        2,
                        p_in,
                        p_out,
                    );
                    match (poor_session, sh.shard_index) {
                        (true, _) => expect_poor += amt,
                        (false, 0) => expect_a += amt,
                        (false, _) => expect_b += amt,
                    }
                }
                let rs = submit(&mut dm, &sg.node, batch).await;
                assert!(rs.iter().all(|r| r.accepted), "{rs:?}\n{}", log());
            }
            wait_status(&mut dm, &format!("the block of session {sess}"), |st| {
                st.height > height && st.pending_shares == 0
            })
            .await;
        }
    }
    // The prompt step's remainder went to the last shard.
    assert_eq!(hop_amount(5, 1, 0, 2, p_in, p_out), U256::from(10));
    assert_eq!(hop_amount(5, 1, 1, 2, p_in, p_out), U256::from(10));
    assert_eq!(
        hop_amount(0, 1, 0, 2, p_in, p_out) + hop_amount(0, 1, 1, 2, p_in, p_out),
        U256::from(5)
    );

    // The poor client's deposit cannot cover its settlement: parked with the reason,
    // not sent (so not a failed attempt).
    // Its two nodes submit apart, so a block may fall between them: the session can
    // span two settlements, which together pay its usage. No traffic follows it, so its
    // window is settled because the chain went quiet, not because it filled.
    let poor_total = |st: &unfed_proto::GetChainStatusResponse| {
        st.settlements
            .iter()
            .filter(|s| s.client == poor.address().to_string())
            .map(|s| s.total.parse::<U256>().unwrap())
            .fold(U256::ZERO, |a, b| a + b)
    };
    let st = wait_status(
        &mut dm,
        "the poor client's settlements to be parked",
        |st| {
            poor_total(st) == expect_poor
                && st
                    .settlements
                    .iter()
                    .filter(|s| s.client == poor.address().to_string())
                    .all(|s| s.status == "underfunded")
        },
    )
    .await;
    for refused in st
        .settlements
        .iter()
        .filter(|s| s.client == poor.address().to_string())
    {
        assert_eq!(refused.status, "underfunded", "{refused:?}");
        assert_eq!(refused.attempts, 0, "{refused:?}");
        assert!(
            refused
                .last_error
                .contains("posted once the deposit covers it"),
            "{refused:?}"
        );
    }

    // The paying client's settlements (one per round, or more when a block fell
    // between its nodes' submissions) are posted and finalized after the window.
    let me = client.address().to_string();
    let st = wait_status(&mut dm, "the client's settlements to finalize", |st| {
        let mine: Vec<_> = st.settlements.iter().filter(|s| s.client == me).collect();
        let total = mine
            .iter()
            .map(|s| s.total.parse::<U256>().unwrap())
            .fold(U256::ZERO, |a, b| a + b);
        total == expect_a + expect_b && mine.iter().all(|s| s.status == "finalized")
    })
    .await;
    let paid: U256 = st
        .settlements
        .iter()
        .filter(|s| s.client == me)
        .map(|s| s.total.parse::<U256>().unwrap())
        .sum();
    assert_eq!(paid, expect_a + expect_b);
    assert_eq!(operator.earnings(&d, wa).await.unwrap(), expect_a);
    assert_eq!(operator.earnings(&d, wb).await.unwrap(), expect_b);
    assert_eq!(
        operator.client_balance(&d, client.address()).await.unwrap(),
        deposit - expect_a - expect_b
    );
    for s in st.settlements.iter().filter(|s| s.client == me) {
        let hash = <[u8; 32]>::try_from(s.hash.as_slice()).unwrap();
        let on_chain = operator.settlement(&d, hash.into()).await.unwrap();
        assert!(on_chain.finalized && !on_chain.challenged);
        assert_eq!(on_chain.nodes, vec![wa, wb]);
    }

    // Funding the poor client lets the retried settlement through.
    operator
        .as_wallet(poor.clone())
        .unwrap()
        .deposit(&d, deposit)
        .await
        .unwrap();
    wait_status(&mut dm, "the retried settlements to finalize", |st| {
        st.settlements
            .iter()
            .filter(|s| s.client == poor.address().to_string())
            .all(|s| s.status == "finalized")
    })
    .await;
    assert_eq!(
        operator.client_balance(&d, poor.address()).await.unwrap(),
        deposit - expect_poor
    );
    let poor_a =
        hop_amount(5, 1, 0, 2, p_in, p_out) + hop_amount(0, 1, 0, 2, p_in, p_out) * U256::from(2);
    assert_eq!(operator.earnings(&d, wa).await.unwrap(), expect_a + poor_a);
    assert_eq!(
        operator.earnings(&d, wb).await.unwrap(),
        expect_b + expect_poor - poor_a
    );

    // Nodes claim: earnings move to their wallets.
    let node_a = operator.as_wallet(dev_signer(2).unwrap()).unwrap();
    let before = node_a.token_balance(&d, wa).await.unwrap();
    node_a.claim_earnings(&d).await.unwrap();
    assert_eq!(
        node_a.token_balance(&d, wa).await.unwrap(),
        before + expect_a + poor_a
    );
    assert_eq!(operator.earnings(&d, wa).await.unwrap(), U256::ZERO);
}

/// `up`, chat, `down`, `up` again: the second run's Anvil is fresh (same chain id, the
/// escrow at the same address), so the first run's unfinished settlement must not be
/// posted on it. The daemon keeps the old share db aside and starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_db_of_an_earlier_chain_is_kept_aside_and_never_settled() {
    let net = registry();
    let client = dev_signer(1).unwrap().address();
    let db = net.dir.path().join("chain.db");
    let (mut first, _, d1) = common::net::anvil_with_escrow(1).await;
    let extra = settling(&net, &first, &d1, 1);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut dnode = Node::start(
        &daemon_args(&net, &db, "0", &extra),
        net.dir.path().join("daemon-1.log"),
    );
    let mut dm = daemon(&dnode.address).await;
    let node = dev_signer(2).unwrap().address().to_string();
    let mut a = Signer::register(&net.registry.address, &node).await;
    a.payer = unfed_node::voucher::Payer::wallet(dev_signer(1).unwrap());
    a.terms = settling_terms(&d1);
    let batch: Vec<_> = (0..3).map(|_| a.next("s1")).collect();
    assert!(
        submit(&mut dm, &a.node, batch)
            .await
            .iter()
            .all(|r| r.accepted)
    );
    // The client never deposited on the first chain: the settlement stays unfinished.
    let st = wait_status(&mut dm, "an unfinished settlement", |st| {
        st.settlements.iter().any(|s| s.status == "underfunded")
    })
    .await;
    let old = <[u8; 32]>::try_from(st.settlements[0].hash.as_slice()).unwrap();
    dnode.terminate();
    first.stop().unwrap();

    let (second, operator, d2) = common::net::anvil_with_escrow(1).await;
    assert_eq!(
        d2.escrow, d1.escrow,
        "a fresh Anvil puts the escrow at the same address"
    );
    // On the new chain the client can pay, so only the stamp stands in the way.
    let deposit = parse_amount("10").unwrap();
    let payer = operator.as_wallet(dev_signer(1).unwrap()).unwrap();
    operator
        .fund(&d2, client, deposit, U256::ZERO)
        .await
        .unwrap();
    payer.deposit(&d2, deposit).await.unwrap();

    let extra = settling(&net, &second, &d2, 1);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let dnode = Node::start(
        &daemon_args(&net, &db, "0", &extra),
        net.dir.path().join("daemon-2.log"),
    );
    let mut dm = daemon(&dnode.address).await;
    let st = dm
        .get_chain_status(GetChainStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.settlements.is_empty() && st.height == 0, "{st:?}");
    let log = std::fs::read_to_string(&dnode.log).unwrap();
    assert!(log.contains("belongs to another chain"), "{log}");
    let kept: Vec<_> = std::fs::read_dir(net.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chain.db.") && n.ends_with(".stale"))
        .collect();
    assert_eq!(kept.len(), 1, "the old db is kept beside: {kept:?}");
    assert!(log.contains(&kept[0]), "the log names the kept file: {log}");
    // The old db still holds the unfinished settlement; the new chain never saw it.
    let old_db = unfed_node::daemon::Store::open(&net.dir.path().join(&kept[0])).unwrap();
    assert!(old_db.settlements().unwrap().iter().any(|s| s.hash == old));
    assert_eq!(
        operator
            .settlement(&d2, old.into())
            .await
            .unwrap()
            .posted_at,
        0
    );
    assert_eq!(operator.client_balance(&d2, client).await.unwrap(), deposit);
}
