//! Real compute nodes serving a real split submit their shares to a real daemon they
//! find through the registry: every hop of a generated answer yields exactly one
//! accepted share, counted with the prompt and generated tokens.

mod common;
mod daemon_common;

use std::time::{Duration, Instant};

use common::net::{Net, Node, s, split_into};
use daemon_common::{daemon, wait_status};
use unfed_node::client::GenerateOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_of_an_answer_yields_exactly_one_accepted_share() {
    let tmp = Net::prepare();
    let checkpoint = common::fixtures_root().join("qwen2-f32");
    split_into(&checkpoint, &tmp.path().join("splits"), "m", 2);
    let mut net = Net::registry(tmp);
    let dnode = listed_daemon(&net).await;
    net.compute("m", 0);
    net.compute("m", 1);
    net.wait_ready("m", 2).await;
    let mut client = net.client().await;
    let prompt = [1u32, 2, 3, 4, 5, 6, 7];
    let (steps_a, steps_b) = (6usize, 4usize);
    let opts = paid;
    let a = client
        .generate("m", &prompt, &opts(steps_a), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    let b = client
        .generate("m", &prompt[..3], &opts(steps_b), |_| {})
        .await
        .unwrap();
    assert_eq!((a.tokens.len(), b.tokens.len()), (steps_a, steps_b));

    let hops = 2 * (steps_a + steps_b) as u64;
    let mut dm = daemon(&dnode.address).await;
    let st = wait_status(&mut dm, "one share per hop", |st| {
        st.shares >= hops && st.pending_shares == 0
    })
    .await;
    assert_eq!(
        st.shares,
        hops,
        "exactly one share per hop\n{}",
        std::fs::read_to_string(&dnode.log).unwrap()
    );
    assert_eq!(st.nodes.len(), 2, "{st:?}");
    for n in &st.nodes {
        // Each node served every step of both answers; the prompt rows count once.
        assert_eq!(n.shares, (steps_a + steps_b) as u64, "{n:?}");
        assert_eq!(n.output_tokens, (steps_a + steps_b) as u64, "{n:?}");
        assert_eq!(n.input_tokens, (prompt.len() + 3) as u64, "{n:?}");
    }
    // Nothing was rejected along the way.
    let log = std::fs::read_to_string(&dnode.log).unwrap();
    assert!(!log.contains("share rejected"), "{log}");
    no_token_recoverable(&net.dir.path().join("chain.db"), [&a.tokens, &b.tokens]);
}

/// A daemon (no chain) that finds the nodes through `net`'s registry and keeps its
/// share chain in the net's dir, so a restarted one carries on with it.
fn daemon_args(net: &Net) -> Vec<String> {
    [
        "daemon",
        "--port",
        "0",
        "--registry",
        &net.registry.address,
        "--db",
        &net.dir.path().join("chain.db").display().to_string(),
        "--block-interval-secs",
        "0.1",
        "--heartbeat-secs",
        "1",
        "--chain-id",
        &daemon_common::CHAIN_ID.to_string(),
        "--escrow",
        daemon_common::ESCROW,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A paid answer of `n` tokens, whatever the model says (no stop at EOS).
/// A daemon the registry lists: a client finding none runs its session unpaid.
async fn listed_daemon(net: &Net) -> Node {
    let node = Node::start(&daemon_args(net), net.dir.path().join("daemon.log"));
    net.wait_daemon_listed().await;
    node
}

fn paid(n: usize) -> GenerateOptions {
    let payer = unfed_node::voucher::Payer::wallet(unfed_chain::dev_signer(9).unwrap());
    GenerateOptions {
        max_tokens: n,
        stop_on_eos: false,
        payer: Some(payer),
        ..Default::default()
    }
}

/// kill -9 of the daemon three tokens into an answer, the registry delisting it, and a
/// compute node killed and restarted while its shares wait: once a daemon is back, the
/// chain holds exactly one share per hop per step served, none lost, none doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_outage_and_a_node_restart_lose_no_share() {
    let tmp = Net::prepare();
    let checkpoint = common::fixtures_root().join("qwen2-f32");
    split_into(&checkpoint, &tmp.path().join("splits"), "m", 2);
    let mut net = Net::registry(tmp);
    let mut dnode = listed_daemon(&net).await;
    let spool = |net: &Net, shard: usize| net.dir.path().join(format!("spool-{shard}"));
    for shard in 0..2 {
        let mut args = net.compute_args("m", shard, "0");
        // A fixed id: the restarted node is the same node on another port.
        args.extend([s("--node-id"), format!("m-{shard}"), s("--share-spool")]);
        args.push(spool(&net, shard).display().to_string());
        let node = net.start(&args, net.dir.path().join(format!("m-{shard}.log")));
        net.computes.push(node);
    }
    net.wait_ready("m", 2).await;
    let mut client = net.client().await;
    let steps = 24usize;
    let mut seen = 0;
    let out = client
        .generate("m", &[1, 2, 3, 4, 5], &paid(steps), |_| {
            seen += 1;
            if seen == 3 {
                dnode.kill();
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    assert_eq!(out.tokens.len(), steps);

    // The registry drops the dead daemon: the shares wait rather than being cleared.
    net.wait_listing("the dead daemon stays listed", |nodes| {
        !nodes.iter().any(|n| n.role == "daemon")
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Every hop of shard 1 is signed (and so spooled); some wait for a daemon.
    let pending = loop {
        let h = net.compute_health(1).await;
        if h.shares_recorded == steps as u64 {
            break h.shares_pending;
        }
        assert!(Instant::now() < deadline, "shard 1 signed {h:?}");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll again until the deadline
    };
    assert!(pending > 0, "the daemon died before shard 1's shares left");
    net.computes[1].kill();
    let on_disk = unfed_node::share_spool::pending_in(&spool(&net, 1)).unwrap();
    assert_eq!(
        on_disk.len() as u64,
        pending,
        "the spool holds what was pending"
    );

    let args = net.computes[1].args.clone();
    net.computes[1] = net.start(&args, net.dir.path().join("m-1-restarted.log"));
    net.wait_ready("m", 2).await;
    let dnode = Node::start(&daemon_args(&net), net.dir.path().join("daemon-2.log"));
    let mut dm = daemon(&dnode.address).await;
    let hops = 2 * steps as u64;
    let st = wait_status(&mut dm, "every share delivered", |st| {
        st.shares >= hops && st.pending_shares == 0
    })
    .await;
    assert_eq!(
        st.shares,
        hops,
        "one share per hop per step\n{}",
        net.logs()
    );
    for n in &st.nodes {
        assert_eq!(n.shares, steps as u64, "{n:?}");
    }
    for i in 0..2 {
        let h = net.compute_health(i).await;
        assert_eq!(h.shares_pending, 0, "{h:?}");
        assert!(
            unfed_node::share_spool::pending_in(&spool(&net, i))
                .unwrap()
                .is_empty()
        );
    }
    let log = std::fs::read_to_string(net.dir.path().join("m-1-restarted.log")).unwrap();
    assert!(log.contains("earlier run left in the spool"), "{log}");
}

/// The daemon learns counts, never tokens: no stored commitment matches any token id
/// of the vocabulary under any plain encoding. Control: the same probe finds every
/// generated token in unsalted hashes, as shares carried them before.
fn no_token_recoverable(db: &std::path::Path, generated: [&Vec<u32>; 2]) {
    use sha2::{Digest, Sha256};
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn.prepare("SELECT body FROM shares").unwrap();
    let stored: std::collections::HashSet<Vec<u8>> = st
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|b| {
            <unfed_proto::ComputeShare as prost::Message>::decode(b.unwrap().as_slice())
                .unwrap()
                .activation_hash
        })
        .collect();
    assert!(!stored.is_empty());
    let probe = |hashes: &std::collections::HashSet<Vec<u8>>| -> Vec<u32> {
        // The fixture's vocabulary is small; a generous bound covers any id it can emit.
        (0u32..1 << 16)
            .filter(|t| {
                [t.to_le_bytes(), t.to_be_bytes()]
                    .iter()
                    .any(|enc| hashes.contains(&Sha256::digest(enc).to_vec()))
                    || hashes.contains(&Sha256::digest(t.to_string()).to_vec())
            })
            .collect()
    };
    assert_eq!(
        probe(&stored),
        Vec::<u32>::new(),
        "a token id is recoverable"
    );
    let unsalted: std::collections::HashSet<Vec<u8>> = generated
        .iter()
        .flat_map(|toks| toks.iter())
        .map(|t| Sha256::digest(t.to_le_bytes()).to_vec())
        .collect();
    let mut found = probe(&unsalted);
    let mut expected: Vec<u32> = generated.iter().flat_map(|t| t.iter().copied()).collect();
    expected.sort();
    expected.dedup();
    found.sort();
    assert_eq!(
        found, expected,
        "control: the probe must see unsalted tokens"
    );
}

/// The whole economic loop on a staked testnet: Anvil with the compiled contracts,
/// stake-gated admission, staked compute nodes and daemon, a chat, settlement and
/// finalization by the daemon as operator; balances match usage at the prices exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_on_a_staked_testnet_is_paid_exactly_at_the_configured_prices() {
    use unfed_chain::{U256, dev_signer, parse_amount};

    let tmp = Net::prepare();
    let checkpoint = common::fixtures_root().join("qwen2-f32");
    split_into(&checkpoint, &tmp.path().join("splits"), "m", 2);
    let (anvil, operator, d) = common::net::anvil_with_escrow(1).await;
    let (stake, gas, deposit) = (
        parse_amount("200").unwrap(),
        parse_amount("1").unwrap(),
        parse_amount("1000").unwrap(),
    );
    let keys = tmp.path().join("keys");
    // Wallets: 1 client, 2 and 3 compute nodes, 5 daemon.
    let mut key_files = std::collections::HashMap::new();
    for i in [2u32, 3, 5] {
        let w = dev_signer(i).unwrap();
        operator.fund(&d, w.address(), stake, gas).await.unwrap();
        operator
            .as_wallet(w.clone())
            .unwrap()
            .stake(&d, stake)
            .await
            .unwrap();
        let f = keys.join(format!("w{i}.key"));
        unfed_chain::write_key_file(&f, &w).unwrap();
        key_files.insert(i, f);
    }
    let client = dev_signer(1).unwrap();
    operator
        .fund(&d, client.address(), deposit, gas)
        .await
        .unwrap();
    operator
        .as_wallet(client.clone())
        .unwrap()
        .deposit(&d, deposit)
        .await
        .unwrap();
    let op_key = keys.join("operator.key");
    unfed_chain::write_key_file(&op_key, &dev_signer(0).unwrap()).unwrap();

    let (rpc, escrow) = (anvil.endpoint(), d.escrow.to_string());
    let str_args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let splits = tmp.path().join("splits").display().to_string();
    let registry = Node::start(
        &str_args(&[
            "registry",
            "--port",
            "0",
            "--heartbeat-secs",
            "1",
            "--shards-dir",
            &splits,
            "--chain-rpc",
            &rpc,
            "--escrow",
            &escrow,
        ]),
        tmp.path().join("registry.log"),
    );
    let env = |i: u32| {
        vec![(
            unfed_chain::STAKE_KEY_FILE_ENV,
            key_files[&i].display().to_string(),
        )]
    };
    let addr = |i: u32| dev_signer(i).unwrap().address().to_string();
    let db = tmp.path().join("chain.db").display().to_string();
    let dnode = daemon_common::start_with_env(
        &str_args(&[
            "daemon",
            "--port",
            "0",
            "--registry",
            &registry.address,
            "--eth-address",
            &addr(5),
            "--db",
            &db,
            "--block-interval-secs",
            "0.2",
            "--settlement-blocks",
            "1",
            "--settle-poll-secs",
            "0.2",
            "--heartbeat-secs",
            "1",
            "--chain-rpc",
            &rpc,
            "--escrow",
            &escrow,
            "--operator-key-file",
            &op_key.display().to_string(),
        ]),
        &env(5),
        tmp.path().join("daemon.log"),
    );
    let mut net = Net {
        dir: tmp,
        registry,
        computes: Vec::new(),
        tls: true,
    };
    net.wait_daemon_listed().await;
    for (shard, wallet) in [(0usize, 2u32), (1, 3)] {
        let mut a = net.compute_args("m", shard, "0");
        a.extend([
            "--eth-address".to_string(),
            addr(wallet),
            "--require-voucher".into(),
        ]);
        let log = net.dir.path().join(format!("compute-{shard}.log"));
        net.computes
            .push(daemon_common::start_with_env(&a, &env(wallet), log));
    }
    net.wait_ready("m", 2).await;

    let mut chat = net.client().await;
    let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let steps = 5usize;
    let out = chat
        .generate(
            "m",
            &prompt,
            &GenerateOptions {
                max_tokens: steps,
                stop_on_eos: false,
                payer: Some(unfed_node::voucher::Payer::wallet(client.clone())),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    assert_eq!(out.tokens.len(), steps);

    // Usage at the default prices (0.0001 per input token, 0.001 per output token).
    let (p_in, p_out) = (
        parse_amount("0.0001").unwrap(),
        parse_amount("0.001").unwrap(),
    );
    let total = U256::from(prompt.len()) * p_in + U256::from(steps) * p_out;
    let per_node = total / U256::from(2); // even: the prices are multiples of 2 wei
    let mut dm = daemon(&dnode.address).await;
    let st = wait_status(&mut dm, "every share settled and finalized", |st| {
        let paid: U256 = st
            .settlements
            .iter()
            .filter(|s| s.status == "finalized")
            .map(|s| s.total.parse::<U256>().unwrap())
            .sum();
        st.shares == 2 * steps as u64 && st.pending_shares == 0 && paid == total
    })
    .await;
    assert!(
        st.settlements
            .iter()
            .all(|s| s.status == "finalized" && s.last_error.is_empty()),
        "{st:?}"
    );
    let (w2, w3) = (
        dev_signer(2).unwrap().address(),
        dev_signer(3).unwrap().address(),
    );
    assert_eq!(operator.earnings(&d, w2).await.unwrap(), per_node);
    assert_eq!(operator.earnings(&d, w3).await.unwrap(), per_node);
    assert_eq!(
        operator.client_balance(&d, client.address()).await.unwrap(),
        deposit - total
    );
    eprintln!(
        "paid {total} wei for {} prompt + {steps} generated tokens over {} settlement(s)",
        prompt.len(),
        st.settlements.len()
    );
}
