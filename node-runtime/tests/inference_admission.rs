//! Stake-gated admission across real processes: a real Anvil with the compiled escrow,
//! a registry checking signatures and stakes, compute nodes signing their registration
//! with a 0600 key file.

mod common;

use std::time::{Duration, Instant};

use common::net::{Net, Node, s, split_into};
use unfed_chain::{
    Anvil, AnvilOptions, Chain, EscrowParams, U256, dev_signer, parse_amount, write_key_file,
};
use unfed_proto::ModelState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staked_nodes_are_admitted_unstaked_refused_and_unstaking_hides_a_node_until_restaked() {
    let anvil = Anvil::start(&AnvilOptions::default())
        .await
        .expect("start anvil");
    let operator = Chain::connect(&anvil.endpoint(), dev_signer(0).unwrap()).unwrap();
    let d = operator
        .deploy(&EscrowParams::default())
        .await
        .expect("deploy");
    let wallet = |i| operator.as_wallet(dev_signer(i).unwrap()).unwrap();
    let (staked, unstaked) = (wallet(1), wallet(2));
    for w in [&staked, &unstaked] {
        operator
            .fund(&d, w.address(), parse_amount("200").unwrap(), U256::ZERO)
            .await
            .unwrap();
    }
    staked
        .stake(&d, parse_amount("200").unwrap())
        .await
        .unwrap();

    let (name, dir, reference) = common::text_fixtures()
        .into_iter()
        .find(|f| f.0 == "qwen2-f32")
        .unwrap();
    let tmp = Net::prepare();
    split_into(&dir, &tmp.path().join("splits"), &name, 1);
    let keys = tmp.path().join("keys");
    for i in [1, 2] {
        write_key_file(&keys.join(format!("node{i}.key")), &dev_signer(i).unwrap()).unwrap();
    }
    let reg_args = vec![
        s("registry"),
        s("--port"),
        s("0"),
        s("--heartbeat-secs"),
        s("1"),
        s("--stake-recheck-secs"),
        s("1"),
        s("--shards-dir"),
        tmp.path().join("splits").display().to_string(),
        s("--chain-rpc"),
        anvil.endpoint(),
        s("--escrow"),
        d.escrow.to_string(),
    ];
    let registry = Node::start(&reg_args, tmp.path().join("registry.log"));
    let mut net = Net {
        dir: tmp,
        registry,
        computes: Vec::new(),
        tls: true,
    };

    let node = |net: &Net, i: u32, who: &Chain| {
        let mut args = net.compute_args(&name, 0, "0");
        args.extend([s("--eth-address"), who.address().to_string()]);
        let key = net.dir.path().join("keys").join(format!("node{i}.key"));
        let log = net.dir.path().join(format!("node{i}.log"));
        Node::start_with_env(
            &args,
            log,
            &[("UNFED_STAKE_EVM_PRIVATE_KEY_FILE", key.as_path())],
        )
    };

    // Unstaked: the registry refuses it and the node exits saying why.
    let mut refused = node(&net, 2, &unstaked);
    let status = refused.wait_exit(Duration::from_secs(20));
    let log = std::fs::read_to_string(&refused.log).unwrap();
    assert!(!status.success());
    assert!(
        log.contains("refused this node") && log.contains("not_staked"),
        "{log}"
    );

    let admitted = node(&net, 1, &staked);
    net.computes.push(admitted);
    net.wait_ready(&name, 1).await;
    let mut client = net.client().await;
    let case = &reference.cases[0];
    let opts = unfed_node::client::GenerateOptions {
        max_tokens: case.generated_ids.len(),
        ..Default::default()
    };
    let out = client
        .generate(&name, &case.prompt_ids, &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(out.tokens, case.generated_ids);

    // Unstaking makes the node ineligible: the periodic re-check hides it.
    staked
        .request_unstake(&d, parse_amount("200").unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = client
            .list_models()
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.model == name)
            .unwrap();
        if m.nodes == 0 {
            assert_eq!(m.state, ModelState::Incomplete as i32);
            assert_eq!(m.reason, "no_nodes");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unstaked node still visible: {m:?}\n{}",
            net.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll again until the deadline
    }
    let err = format!(
        "{:#}",
        client
            .generate(&name, &case.prompt_ids, &opts, |_| {})
            .await
            .unwrap_err()
    );
    assert!(err.contains("INCOMPLETE (no_nodes)"), "{err}");

    // Staking again makes it eligible: the next re-check shows it, and it serves again.
    operator
        .fund(
            &d,
            staked.address(),
            parse_amount("200").unwrap(),
            U256::ZERO,
        )
        .await
        .unwrap();
    staked
        .stake(&d, parse_amount("200").unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.require_ready(&name).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "re-staked node did not return within 15 s\n{}",
            net.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll again until the deadline
    }
    let out = client
        .generate(&name, &case.prompt_ids, &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(out.tokens, case.generated_ids);
}
