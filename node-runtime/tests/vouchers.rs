//! Spending vouchers from the attacker's side. A node that bills works only under a
//! valid voucher naming it, within its caps, once; the daemon bills only what a voucher
//! covers, to the client that signed it, split over the voucher's route — and a forged,
//! spoofed, replayed, expired or overdrawn voucher moves no deposit.

mod common;
mod daemon_common;

use common::net::{Net, Node, s};
use daemon_common::*;
use unfed_chain::voucher::{SignedVoucher, SpendingVoucher, session_hash};
use unfed_chain::{Address, PrivateKeySigner, U256, dev_signer, parse_amount};
use unfed_node::voucher::{Payer, to_proto};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::*;

/// A voucher with every field chosen by the test (an attacker signs what it likes).
fn signed(
    key: &PrivateKeySigner,
    client: Address,
    (session, route): (&str, &[&str]),
    (caps, expiry, nonce): ((u32, u32), u64, u64),
    (escrow, model): (&str, &str),
) -> unfed_proto::SpendingVoucher {
    let v = SpendingVoucher {
        client,
        model: model.into(),
        session: session_hash(session),
        route: route.iter().map(|r| r.to_string()).collect(),
        maxInputTokens: caps.0,
        maxOutputTokens: caps.1,
        maxSpend: U256::from(10u64).pow(U256::from(24)),
        expiry,
        nonce,
    };
    let sv = SignedVoucher::sign(key, v, (CHAIN_ID, escrow.parse().unwrap()), None).unwrap();
    to_proto(&sv)
}

fn later() -> u64 {
    unfed_node::voucher::now_secs() + 600
}

fn step0(session: &str, voucher: Option<unfed_proto::SpendingVoucher>) -> ForwardRequest {
    ForwardRequest {
        model_id: "tiny".into(),
        session_id: session.into(),
        step: 0,
        position: 0,
        input: Some(forward_request::Input::Tokens(TokenIds {
            ids: vec![1, 2, 3],
        })),
        voucher,
        billing_salt: vec![7; 32],
        ..Default::default()
    }
}

fn step(session: &str, step: u32) -> ForwardRequest {
    ForwardRequest {
        model_id: "tiny".into(),
        session_id: session.into(),
        step,
        position: 2 + step,
        input: Some(forward_request::Input::Tokens(TokenIds { ids: vec![4] })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_node_works_only_under_a_valid_voucher_naming_it_once() {
    let (dir, _) = Net::prepare_tiny(1);
    let mut net = Net::registry(dir);
    let mut args = net.compute_args("tiny", 0, "0");
    args.extend([s("--node-id"), s("n0"), s("--require-voucher")]);
    let log = net.dir.path().join("compute.log");
    net.computes.push(Node::start(&args, log));
    net.wait_ready("tiny", 1).await;
    let mut node = ComputeClient::new(common::net::channel(&net.computes[0].address).await);
    let client = dev_signer(1).unwrap();
    let me = client.address();
    let ok = |session| {
        signed(
            &client,
            me,
            (session, &["n0"]),
            ((8, 3), later(), 1),
            (ESCROW, "tiny"),
        )
    };

    let refused = |r: Result<tonic::Response<ForwardResponse>, tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
        e.message().to_string()
    };
    let m = refused(node.forward(step0("s0", None)).await, "no voucher");
    assert!(m.contains("no spending voucher"), "{m}");
    // Someone else's key, naming this client: the signature does not recover to it.
    let thief = dev_signer(7).unwrap();
    let forged = signed(
        &thief,
        me,
        ("s1", &["n0"]),
        ((8, 3), later(), 2),
        (ESCROW, "tiny"),
    );
    let m = refused(node.forward(step0("s1", Some(forged))).await, "forged");
    assert!(m.contains("not by its client"), "{m}");
    // A valid voucher of another session, of another node, expired, or too small.
    let m = refused(
        node.forward(step0("s2", Some(ok("s1")))).await,
        "other session",
    );
    assert!(m.contains("another session"), "{m}");
    let elsewhere = signed(
        &client,
        me,
        ("s3", &["n1"]),
        ((8, 3), later(), 3),
        (ESCROW, "tiny"),
    );
    let m = refused(
        node.forward(step0("s3", Some(elsewhere))).await,
        "other node",
    );
    assert!(m.contains("does not name node n0"), "{m}");
    let expired = signed(
        &client,
        me,
        ("s4", &["n0"]),
        ((8, 3), 1_000, 4),
        (ESCROW, "tiny"),
    );
    let m = refused(node.forward(step0("s4", Some(expired))).await, "expired");
    assert!(m.contains("expired"), "{m}");
    let small = signed(
        &client,
        me,
        ("s5", &["n0"]),
        ((2, 3), later(), 5),
        (ESCROW, "tiny"),
    );
    let m = refused(
        node.forward(step0("s5", Some(small))).await,
        "prompt over the cap",
    );
    assert!(m.contains("the prompt has 3 rows"), "{m}");

    // The valid voucher: served up to its token cap, then refused.
    node.forward(step0("s6", Some(ok("s6")))).await.unwrap();
    node.forward(step("s6", 1)).await.unwrap();
    node.forward(step("s6", 2)).await.unwrap();
    let m = refused(node.forward(step("s6", 3)).await, "a fourth token");
    assert!(m.contains("covers 3 generated tokens"), "{m}");
    // Replayed: the same voucher cannot start its session again.
    let m = refused(node.forward(step0("s6", Some(ok("s6")))).await, "replay");
    assert!(m.contains("already started a session"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_bills_only_what_a_voucher_covers_and_no_forgery_moves_a_deposit() {
    let net = registry();
    let (anvil, operator, d) = common::net::anvil_with_escrow(1).await;
    let (deposit, gas) = (parse_amount("1000").unwrap(), parse_amount("1").unwrap());
    let client = dev_signer(1).unwrap();
    let victim = dev_signer(4).unwrap();
    for w in [&client, &victim] {
        operator.fund(&d, w.address(), deposit, gas).await.unwrap();
        operator
            .as_wallet(w.clone())
            .unwrap()
            .deposit(&d, deposit)
            .await
            .unwrap();
    }
    let key_file = net.dir.path().join("keys/operator.key");
    unfed_chain::write_key_file(&key_file, &dev_signer(0).unwrap()).unwrap();
    let escrow = d.escrow.to_string();
    let extra = [
        s("--chain-rpc"),
        anvil.endpoint(),
        s("--escrow"),
        escrow.clone(),
        s("--operator-key-file"),
        key_file.display().to_string(),
        s("--settlement-blocks"),
        s("1"),
        s("--settle-poll-secs"),
        s("0.2"),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let db = net.dir.path().join("chain.db");
    let dnode = Node::start(
        &daemon_args(&net, &db, "0", &extra),
        net.dir.path().join("daemon.log"),
    );
    let mut dm = daemon(&dnode.address).await;
    let (wa, wb) = (
        dev_signer(2).unwrap().address().to_string(),
        dev_signer(3).unwrap().address().to_string(),
    );
    let mut a = Signer::register(&net.registry.address, &wa).await;
    let mut b = Signer::register(&net.registry.address, &wb).await;
    let wc = dev_signer(5).unwrap().address().to_string();
    let mut c = Signer::register(&net.registry.address, &wc).await;
    let me = client.address();
    let v = |key: &PrivateKeySigner, who: Address, session: &str, caps, nonce| {
        signed(
            key,
            who,
            (session, &[wa.as_str(), wb.as_str()]),
            (caps, later(), nonce),
            (&escrow, "m"),
        )
    };

    // The honest session: 2 steps on the 2-hop route, both hops within the caps.
    let honest = v(&client, me, "h", (5, 2), 1);
    for sg in [&mut a, &mut b] {
        sg.bill("h", &honest);
        let rs = submit(&mut dm, &sg.node.clone(), vec![sg.next("h"), sg.next("h")]).await;
        assert!(rs.iter().all(|r| r.accepted), "{rs:?}");
    }
    // Fabricated work beyond the voucher: a third token on a 2-token voucher.
    rejected(&one(&mut dm, &wa, a.next("h")).await, "voucher_cap");
    // A node off the voucher's route.
    c.bill("h", &honest);
    rejected(
        &one(&mut dm, &c.node.clone(), c.next("h")).await,
        "voucher_mismatch",
    );
    // Spoofed client: a share billing the victim under the client's voucher ...
    a.bill("x", &v(&client, me, "x", (5, 2), 2));
    let mut spoofed = a.next("x");
    spoofed.client = victim.address().to_string();
    a.resign(&mut spoofed);
    rejected(&one(&mut dm, &wa, spoofed).await, "voucher_mismatch");
    // ... and a voucher naming the victim, signed by a staked node's own key.
    let node_key = dev_signer(2).unwrap();
    a.bill("y", &v(&node_key, victim.address(), "y", (5, 2), 3));
    rejected(&one(&mut dm, &wa, a.next("y")).await, "bad_voucher");
    // A second voucher reusing the client's nonce.
    a.bill("z", &v(&client, me, "z", (5, 2), 1));
    rejected(&one(&mut dm, &wa, a.next("z")).await, "voucher_replay");
    // Expired before the share was made.
    let expired = signed(
        &client,
        me,
        ("e", &[wa.as_str()]),
        ((5, 2), 1_000, 9),
        (&escrow, "m"),
    );
    a.bill("e", &expired);
    rejected(&one(&mut dm, &wa, a.next("e")).await, "voucher_expired");
    // A share naming no voucher at all.
    let mut bare = a.next("h2");
    bare.voucher.clear();
    a.resign(&mut bare);
    rejected(&one(&mut dm, &wa, bare).await, "no_voucher");

    // Only the honest session is paid: prompt 5 + 2 tokens at the default prices, split
    // over the route's two hops; the victim's deposit never moves.
    let prices = unfed_node::daemon::Prices::default();
    let total = prices.cost(5, 2);
    // The two hops' shares may fall in one block or two (one settlement per block):
    // wait until every settlement is final and they add up to the session.
    let settled = |st: &unfed_proto::GetChainStatusResponse| {
        st.settlements
            .iter()
            .map(|s| s.total.parse::<U256>().unwrap())
            .fold(U256::ZERO, |a, b| a + b)
    };
    let st = wait_status(&mut dm, "the honest session finalized", |st| {
        settled(st) == total && st.settlements.iter().all(|s| s.status == "finalized")
    })
    .await;
    assert!(st.settlements.len() <= 2, "{st:?}");
    assert_eq!(
        operator.client_balance(&d, me).await.unwrap(),
        deposit - total
    );
    assert_eq!(
        operator.client_balance(&d, victim.address()).await.unwrap(),
        deposit
    );
    let half = total / U256::from(2);
    for w in [2u32, 3] {
        let addr = dev_signer(w).unwrap().address();
        assert_eq!(operator.earnings(&d, addr).await.unwrap(), half);
    }
    // Per voucher and node, as `unfedctl earnings` shows it: the honest voucher's two
    // hops are paid half each; nothing else was ever billed.
    let digest = unfed_node::voucher::digest(&honest).unwrap().to_vec();
    let mut per_node: Vec<(String, String, String, String)> = st
        .vouchers
        .iter()
        .map(|e| {
            assert_eq!(e.voucher, digest, "{e:?}");
            (
                e.node_id.clone(),
                e.paid.clone(),
                e.pending.clone(),
                e.withheld.clone(),
            )
        })
        .collect();
    per_node.sort();
    let paid = |n: &str| (n.to_string(), half.to_string(), s("0"), s("0"));
    assert_eq!(per_node, vec![paid(&wa), paid(&wb)]);

    // Before a session: a voucher whose cap the deposit cannot cover is refused.
    let greedy = Payer::wallet(client.clone());
    let (big, _) = greedy
        .issue(
            &terms(&escrow),
            ("m", "big"),
            vec![wa.clone()],
            (1, 2_000_000),
        )
        .unwrap();
    let e = dm
        .check_voucher(CheckVoucherRequest { voucher: Some(big) })
        .await
        .expect_err("a cap above the deposit");
    assert!(e.message().contains("insufficient deposit"), "{e:?}");
    let (fits, _) = greedy
        .issue(&terms(&escrow), ("m", "fits"), vec![wa.clone()], (5, 10))
        .unwrap();
    dm.check_voucher(CheckVoucherRequest {
        voucher: Some(fits),
    })
    .await
    .unwrap();
    drop(anvil);
}
