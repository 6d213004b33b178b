//! The MPC pair as real processes over gRPC: `unfed-node mpc --role B`, then `--role A
//! --peer B`, registered with a registry that requires the pair. The client runs shard 0
//! in MPC (or every layer, full-output 2PC) and the tokens equal the plaintext pipeline's.

mod common;
mod daemon_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::net::{Net, Node, s, start_pair};
use common::web::Web;
use daemon_common::wait_status;
use unfed_node::client::GenerateOptions;
use unfed_node::client::private::{PublicParams, PublicSource};
use unfed_node::engine::generate::load_split;
use unfed_node::engine::model::{ShardInput, ShardModel, ShardOutput, ShardSpec};
use unfed_node::engine::sampling::{SamplingConfig, argmax};
use unfed_node::engine::weights::WeightFiles;
use unfed_node::mpc::client::{Client, ClientOutput, ClientSession};
use unfed_node::mpc::handoff::{Outbox, Signer};
use unfed_node::mpc::net::RemotePair;
use unfed_node::mpc::public::cache_path;
use unfed_node::mpc::weights::ClientModel;
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::{
    ForwardRequest, GetChainStatusResponse, ModelState, MpcInput, forward_request, step_input,
};

const TOKENS: usize = 24;
const PROMPT: [u32; 6] = [3, 14, 15, 92, 65, 35];

/// The split's manifest and every text shard's weights.
fn open_split(dir: &Path) -> (unfed_model::Manifest, WeightFiles) {
    let manifest: unfed_model::Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let files: Vec<PathBuf> = manifest.text_shards().map(|s| dir.join(&s.file)).collect();
    (manifest, WeightFiles::open(&files).unwrap())
}

fn plaintext_tokens(split: &Path) -> Vec<u32> {
    let (_, whole) = load_split(split).unwrap();
    unfed_node::engine::generate::generate(
        &whole,
        &PROMPT,
        TOKENS,
        SamplingConfig::default(),
        false,
    )
    .unwrap()
    .tokens
}

/// A share-chain daemon (no chain) that finds the nodes' keys through `registry`.
fn start_daemon(registry: &str, dir: &Path) -> Node {
    let args = daemon_common::daemon_args_at(registry, &dir.join("chain.db"), "0", &[]);
    Node::start(&args, dir.join("daemon.log"))
}

/// The daemon's status once it holds `shares` accepted shares of `nodes` nodes.
async fn wait_shares(daemon: &Node, nodes: usize, shares: u64) -> GetChainStatusResponse {
    let mut d = daemon_common::daemon(&daemon.address).await;
    wait_status(&mut d, "every hop's shares", |st| {
        st.nodes.len() == nodes && st.pending_shares == 0 && st.shares == shares
    })
    .await
}

/// A party as a hop (unpinned: the tests' CA vouches for it).
fn hop(n: &Node) -> unfed_proto::Hop {
    unfed_proto::Hop {
        address: n.address.clone(),
        ..Default::default()
    }
}

/// A client session with the pair, its output kept by the client, paid under a
/// voucher of the dev client naming both parties (by their default node ids).
async fn connect(a: &Node, b: &Node, session: &str) -> RemotePair {
    let timeout = Duration::from_secs(3);
    let payer = unfed_node::voucher::Payer::wallet(unfed_chain::dev_signer(9).unwrap());
    let route = [
        format!("mpc_a@{}", a.address),
        format!("mpc_b@{}", b.address),
    ];
    let (voucher, salt) = payer
        .issue(
            &daemon_common::terms(daemon_common::ESCROW),
            ("tiny", session),
            route.to_vec(),
            (100, 100),
        )
        .unwrap();
    RemotePair::connect(
        &common::net::transport(),
        &hop(a),
        &hop(b),
        session,
        timeout,
        &unfed_node::mpc::net::SessionOptions {
            handoff: None,
            voucher: Some(voucher),
            billing_salt: salt,
        },
    )
    .await
    .unwrap()
}

async fn model_status(net: &Net) -> unfed_proto::ModelStatus {
    net.client().await.list_models().await.unwrap().remove(0)
}

/// A registry that requires the MPC pair, serving the builtin model split in two.
fn require_mpc_net() -> (Net, PathBuf) {
    let (dir, split) = Net::prepare_tiny(2);
    let registry = Node::start_with_env(
        &[
            s("registry"),
            s("--port"),
            s("0"),
            s("--heartbeat-secs"),
            s("1"),
            s("--shards-dir"),
            dir.path().join("splits").display().to_string(),
        ],
        dir.path().join("registry.log"),
        &[("UNFED_REQUIRE_MPC", "1")],
    );
    let mut net = Net {
        dir,
        registry,
        computes: Vec::new(),
        tls: true,
    };
    net.compute("tiny", 0);
    net.compute("tiny", 1);
    (net, split)
}

#[tokio::test(flavor = "multi_thread")]
async fn shard0_in_mpc_over_grpc_gates_readiness_and_matches_the_plaintext_tokens() {
    let (net, split) = require_mpc_net();
    // Every shard is served, but the pair is missing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = model_status(&net).await;
        if st.reason == "missing_mpc" {
            assert!(st.message.contains("party A"), "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}\n{}", net.logs());
        tokio::time::sleep(Duration::from_millis(50)).await; // poll again until the deadline
    }
    let logs = net.dir.path().to_path_buf();
    let (a, mut b) = start_pair(&split, Some(&net.registry.address), &[], &logs);
    net.wait_ready("tiny", 4).await;
    assert_eq!(model_status(&net).await.state, ModelState::Ready as i32);

    let (manifest, files) = open_split(&split);
    let cfg = &manifest.config;
    let k = manifest.text_shards().next().unwrap().layer_end;
    let cm = ClientModel::load(&cfg.text, &cfg.text_prefix, 0..k, false, &files).unwrap();
    let spec = ShardSpec {
        layer_start: k,
        layer_end: cfg.text.num_hidden_layers,
        has_embedding: false,
        has_head: true,
    };
    let rest = ShardModel::load(&cfg.text, &cfg.text_prefix, spec, &files).unwrap();
    let mut cache = rest.new_cache();
    let mut pair = connect(&a, &b, "s1").await;
    let client = Client { model: &cm };
    let mut sess = ClientSession::new();
    let (mut tokens, mut input) = (Vec::new(), PROMPT.to_vec());
    for _ in 0..TOKENS {
        let out = pair.step(&client, &mut sess, &cm.embed(&input).unwrap());
        let ClientOutput::Hidden(h) = out.unwrap_or_else(|e| {
            panic!(
                "{e:#}\n{}",
                std::fs::read_to_string(logs.join("mpc-a.log")).unwrap()
            )
        }) else {
            panic!("expected hidden states")
        };
        let seq = input.len();
        let ShardOutput::Logits(l) = rest
            .forward(&mut cache, ShardInput::Hidden { data: h, seq })
            .unwrap()
        else {
            panic!("expected logits")
        };
        tokens.push(argmax(&l));
        input = vec![*tokens.last().unwrap()];
    }
    assert_eq!(tokens, plaintext_tokens(&split));

    // Party B dies: the next step fails within the timeout, naming the party.
    b.kill();
    let t = Instant::now();
    let err = match pair.step(&client, &mut sess, &cm.embed(&[1]).unwrap()) {
        Ok(_) => panic!("a step without party B succeeded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(err.contains("B"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn full_output_2pc_over_grpc_generates_the_plaintext_tokens_and_bills_the_pair() {
    let (dir, split) = Net::prepare_tiny(2);
    let net = Net::registry(dir);
    let (reg, dir) = (net.registry.address.clone(), net.dir.path().to_path_buf());
    let daemon = start_daemon(&reg, &dir);
    let (a, b) = start_pair(&split, Some(&reg), &["--full-output"], &dir);
    // Party A looks party B up in the registry when a session opens.
    net.wait_listing("the pair listed", |nodes| {
        [&a, &b]
            .iter()
            .all(|p| nodes.iter().any(|n| n.address == p.address))
    })
    .await;
    let (manifest, files) = open_split(&split);
    let cfg = &manifest.config;
    let layers = cfg.text.num_hidden_layers;
    let cm = ClientModel::load(&cfg.text, &cfg.text_prefix, 0..layers, true, &files).unwrap();
    let mut pair = connect(&a, &b, "full").await;
    let client = Client { model: &cm };
    let mut sess = ClientSession::new();
    let (mut tokens, mut input) = (Vec::new(), PROMPT.to_vec());
    for _ in 0..TOKENS {
        let ClientOutput::Logits(l) = pair
            .step(&client, &mut sess, &cm.embed(&input).unwrap())
            .unwrap()
        else {
            panic!("expected logits")
        };
        tokens.push(argmax(&l));
        input = vec![*tokens.last().unwrap()];
    }
    assert_eq!(tokens, plaintext_tokens(&split));
    // Each party recorded one compute share per step with the daemon, the prompt counted
    // once: the pair is the whole route, so it is what the client pays.
    let st = wait_shares(&daemon, 2, 2 * TOKENS as u64).await;
    for n in &st.nodes {
        assert_eq!(
            (n.shares, n.input_tokens, n.output_tokens),
            (TOKENS as u64, PROMPT.len() as u64, TOKENS as u64),
            "{n:?}"
        );
    }
    // A party refuses a link that does not start with a hello.
    let err = RemotePair::connect(
        &common::net::transport(),
        &hop(&b),
        &hop(&a),
        "",
        Duration::from_secs(1),
        &Default::default(),
    )
    .await;
    assert!(err.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pair_hands_its_shares_to_the_next_shard_which_reconstructs_them() {
    let (net, split) = require_mpc_net();
    let (reg, logs) = (net.registry.address.clone(), net.dir.path().to_path_buf());
    let daemon = start_daemon(&reg, &logs);
    let (a, b) = start_pair(&split, Some(&reg), &[], &logs);
    net.wait_ready("tiny", 4).await;
    net.wait_daemon_listed().await;
    let mut client = net.client().await;
    // The client fetches the public parameters from the pair and caches them by digest.
    let cache = net.dir.path().join("cache");
    let fetch = || PublicParams::new(PublicSource::Fetch(cache.clone()));
    let (pair, public) = client
        .private_route("tiny", &fetch())
        .await
        .unwrap()
        .expect("the pair is listed");
    let k = pair.layer_end;
    assert!(!pair.full_output);
    let cached = cache_path(&cache, &pair.public_sha256);
    assert!(cached.exists());
    let local = ClientModel::from_split(&split, k as usize, false).unwrap();
    assert_eq!(public.norms, local.norms);
    assert_eq!(
        public.embed(&PROMPT).unwrap(),
        local.embed(&PROMPT).unwrap()
    );
    // A damaged cache entry is dropped and fetched again.
    std::fs::write(&cached, b"garbage").unwrap();
    let (_, again) = client
        .private_route("tiny", &fetch())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.norms, local.norms);
    assert_ne!(std::fs::read(&cached).unwrap(), b"garbage");
    let opts = GenerateOptions {
        max_tokens: TOKENS,
        stop_on_eos: false,
        payer: Some(unfed_node::voucher::Payer::wallet(
            unfed_chain::dev_signer(9).unwrap(),
        )),
        ..Default::default()
    };
    let out = client
        .generate_via(
            "tiny",
            Some(&(pair.clone(), public.clone())),
            &PROMPT,
            None,
            &opts,
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    assert_eq!(out.tokens, plaintext_tokens(&split));
    // A, B, then shard 1: shard 0's compute node never saw the request.
    let route: Vec<(&str, u32)> = out
        .route
        .iter()
        .map(|h| (h.node_id.as_str(), h.shard_index))
        .collect();
    assert_eq!(route.len(), 3, "{route:?}");
    assert_eq!(route[2].1, 1, "{route:?}");
    assert_eq!(net.compute_forwards(0).await, 0);
    handoff_inputs_are_kept_by_digest_only(&net, &a, &pair, &out).await;

    // The dashboard's chats of a model with a pair go through it too, paid by the demo
    // wallet's vouchers.
    let demo_key = logs.join("demo.key");
    unfed_chain::write_key_file(&demo_key, &unfed_chain::dev_signer(9).unwrap()).unwrap();
    let web = Web::start(
        common::web::args(
            &reg,
            &logs.join("web.db"),
            &[
                "--public-cache",
                &cache.display().to_string(),
                "--demo-wallet-key-file",
                &demo_key.display().to_string(),
            ],
        ),
        &[("UNFED_DEMO_AUTH", "1")],
        &logs.join("web.log"),
    );
    let forwards = net.compute_forwards(1).await;
    let (st, v) = web
        .post(
            "/api/chat",
            serde_json::json!({"prompt": "Tell me about shards", "max_tokens": 8}),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let route = v["route"].as_array().unwrap();
    assert_eq!(route.len(), 3, "{v}");
    assert_eq!(route[0]["node_id"].as_str(), Some(pair.a.node_id.as_str()));
    let tokens = v["tokens"].as_u64().unwrap();
    assert!(tokens > 0, "{v}");
    assert_eq!(net.compute_forwards(1).await, forwards + tokens);
    assert_eq!(net.compute_forwards(0).await, 0);

    // Every step is paid to the three hops it took: party A, party B and shard 1, each
    // a third of the price (hops 0, 1 and 2 of 3); shard 0 took none.
    let steps = TOKENS as u64 + tokens;
    let st = wait_shares(&daemon, 3, 3 * steps).await;
    let mut ids: Vec<&str> = st.nodes.iter().map(|n| n.node_id.as_str()).collect();
    ids.sort();
    let mut hops = vec![
        pair.a.node_id.as_str(),
        pair.b.node_id.as_str(),
        out.route[2].node_id.as_str(),
    ];
    hops.sort();
    assert_eq!(ids, hops);
    assert!(st.nodes.iter().all(|n| n.shares == steps), "{st:?}");
    private_routes_keep_the_penalty_and_seed(&net, &(pair.clone(), public.clone()), &opts).await;
    drop((a, b));

    // Shares the registered parties did not sign are refused as they arrive (not
    // when a Forward claims them), malformed or not.
    let shard1 = out.route[2].clone();
    let mut compute = ComputeClient::new(crate::common::net::channel(&shard1.address).await);
    let h = public.cfg.hidden_size;
    let tls = common::net::transport();
    for (party, node, rows) in [
        (true, &pair.a.node_id, 2),
        (false, &pair.b.node_id, 2),
        (true, &pair.a.node_id, 1),
    ] {
        let forger = Signer {
            node_id: node.clone(),
            model_id: "tiny".into(),
            key: unfed_node::shares::generate_key(),
        };
        let width = if rows == 1 { h + 1 } else { h };
        let outbox = Outbox::new(&tls, &forger, party, width, &shard1).unwrap();
        let share = outbox.request("forged", 0, vec![7u64; rows * width]);
        let err = compute.put_share(share).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{}",
            err.message()
        );
        assert!(
            err.message().contains("PutShare refused"),
            "{}",
            err.message()
        );
    }
    // Nothing was filed: a Forward naming the pair finds no share to claim.
    let err = compute
        .forward(ForwardRequest {
            model_id: "tiny".into(),
            session_id: "forged".into(),
            input: Some(forward_request::Input::Mpc(MpcInput {
                layer: k,
                rows: 2,
                party_a: pair.a.node_id.clone(),
                party_b: pair.b.node_id.clone(),
            })),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("neither party's share"),
        "{}",
        err.message()
    );
}

/// Issue 19: the activations the hand-off node rebuilds from the pair's shares are the
/// prompt, so it keeps them by the parties' signed share digests only. Party A knows the
/// session and the hand-off address; the neighbour that may spot-check gets digests.
async fn handoff_inputs_are_kept_by_digest_only(
    net: &Net,
    party_a: &Node,
    pair: &unfed_node::client::private::PairInfo,
    out: &unfed_node::client::GenerateOutput,
) {
    let handoff = &out.route[2].address;
    let steps = out.tokens.len();
    let err = common::net::session_inputs(party_a, handoff, &out.session_id, steps)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "{}",
        err.message()
    );
    let checker = &net.computes[0];
    let got = common::net::session_inputs(checker, handoff, &out.session_id, steps)
        .await
        .unwrap();
    assert_eq!(got.inputs.len(), steps);
    let mut signers = vec![pair.a.node_id.clone(), pair.b.node_id.clone()];
    signers.sort();
    for (step, input) in got.inputs.iter().enumerate() {
        assert!(input.input.is_none(), "step {step} kept its activations");
        assert_eq!(input.from_layer, Some(pair.layer_end));
        let mut by: Vec<String> = input.mpc_shares.iter().map(|a| a.node_id.clone()).collect();
        by.sort();
        assert_eq!(by, signers, "step {step}");
        assert!(input.mpc_shares.iter().all(|a| a.step as usize == step));
    }
}

/// Issue 19: on a private route the client applies the repetition penalty and keeps the
/// seed. Without client sampling such a request is refused, naming the option; with it,
/// the tokens are those the last shard samples on a plaintext route, and the hand-off
/// node received neither the penalty's tokens nor the seed. The control (the plaintext
/// route) shows the same probe sees the activations, the penalty's tokens and the seed.
async fn private_routes_keep_the_penalty_and_seed(
    net: &Net,
    private: &unfed_node::client::private::PrivateRoute,
    opts: &GenerateOptions,
) {
    let mut client = net.client().await;
    let seeded = GenerateOptions {
        max_tokens: 8,
        sampling: unfed_proto::SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.3,
            seed: 7,
            ..Default::default()
        },
        ..opts.clone()
    };
    let err = client
        .generate_via("tiny", Some(private), &PROMPT, None, &seeded, |_| {})
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("decode_client_sample"),
        "{err:#}"
    );
    let sealed = GenerateOptions {
        decode_client_sample: true,
        ..seeded.clone()
    };
    let out = client
        .generate_via("tiny", Some(private), &PROMPT, None, &sealed, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    let plain = client
        .generate("tiny", &PROMPT, &seeded, |_| {})
        .await
        .unwrap();
    assert_eq!(out.tokens, plain.tokens);
    let checker = &net.computes[0];
    let steps = out.tokens.len();
    let got = common::net::session_inputs(checker, &out.route[2].address, &out.session_id, steps)
        .await
        .unwrap();
    assert_eq!(got.sampling, None);
    assert!(
        got.inputs
            .iter()
            .all(|i| i.penalty_tokens.is_empty() && i.input.is_none())
    );
    let got =
        common::net::session_inputs(checker, &plain.route[1].address, &plain.session_id, steps)
            .await
            .unwrap();
    assert_eq!(got.sampling.map(|p| p.seed), Some(7));
    assert!(got.inputs[0].penalty_tokens.starts_with(&PROMPT));
    match &got.inputs[0].input {
        Some(step_input::Input::Hidden(t)) => assert!(t.data.len() >= PROMPT.len() * 4),
        other => panic!("the plaintext route's input is not a hidden state: {other:?}"),
    }
}

/// Issue 20: a party of the pair serving a private chat dies mid-generation. The client
/// bans that pair, re-deals through the other one (the prompt and the tokens so far as
/// one prefill) and the answer equals the undisturbed one. With no pair left, the error
/// says so within seconds. Each A is paired with the B it dials, not any listed B.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_party_fails_over_to_another_pair_with_the_same_tokens() {
    let (dir, split) = Net::prepare_tiny(2);
    let net = Net::registry(dir);
    let reg = net.registry.address.clone();
    let logs = |i: usize| {
        let d = net.dir.path().join(format!("pair-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (a1, b1) = start_pair(&split, Some(&reg), &["--full-output"], &logs(1));
    let (a2, b2) = start_pair(&split, Some(&reg), &["--full-output"], &logs(2));
    let mut parties = [a1, b1, a2, b2];
    net.wait_listing("every party listed", |nodes| {
        parties
            .iter()
            .all(|p| nodes.iter().any(|n| n.address == p.address))
    })
    .await;
    let mut client = net.client().await;
    let params = PublicParams::new(PublicSource::Split(split.clone()));
    let private = client
        .private_route("tiny", &params)
        .await
        .unwrap()
        .unwrap();
    let index = |addr: &str| parties.iter().position(|p| p.address == addr).unwrap();
    let (a, b) = (index(&private.0.a.address), index(&private.0.b.address));
    assert_eq!(
        b,
        a + 1,
        "party A {a} was paired with a B it does not dial ({b})"
    );
    let opts = GenerateOptions {
        max_tokens: TOKENS,
        stop_on_eos: false,
        ..Default::default()
    };
    let undisturbed = client
        .generate_via("tiny", Some(&private), &PROMPT, None, &opts, |_| {})
        .await
        .unwrap();
    assert_eq!(undisturbed.tokens, plaintext_tokens(&split));

    let mut seen = 0;
    let out = client
        .generate_via("tiny", Some(&private), &PROMPT, None, &opts, |_| {
            seen += 1;
            if seen == 3 {
                parties[a].kill();
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(out.tokens, undisturbed.tokens);
    assert_eq!(out.failovers, 1, "{:?}", out.failures);
    let other = if a == 0 { 2 } else { 0 };
    assert_eq!(out.route[0].address, parties[other].address);
    assert_eq!(out.route[1].address, parties[other + 1].address);

    // The other pair dies too: nothing to re-deal through, and the error says so.
    parties[other + 1].kill();
    let t = Instant::now();
    let err = client
        .generate_via("tiny", Some(&private), &PROMPT, None, &opts, |_| {})
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        err.contains("no other live MPC pair") || err.contains("no live MPC pair"),
        "{err}"
    );
}
