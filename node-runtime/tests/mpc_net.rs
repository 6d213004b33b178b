//! The MPC pair as real processes over gRPC: `unfed-node mpc --role B`, then `--role A
//! --peer B`, registered with a registry that requires the pair. The client runs shard 0
//! in MPC (or every layer, full-output 2PC) and the tokens equal the plaintext pipeline's.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::net::{Net, Node, s, split_into};
use unfed_node::engine::generate::load_split;
use unfed_node::engine::model::{ShardInput, ShardModel, ShardOutput, ShardSpec};
use unfed_node::engine::sampling::{SamplingConfig, argmax};
use unfed_node::engine::weights::WeightFiles;
use unfed_node::mpc::client::{Client, ClientOutput, ClientSession};
use unfed_node::mpc::net::RemotePair;
use unfed_node::mpc::weights::ClientModel;
use unfed_proto::ModelState;

const TOKENS: usize = 24;
const PROMPT: [u32; 6] = [3, 14, 15, 92, 65, 35];

/// The split's manifest and every text shard's weights.
fn open_split(dir: &Path) -> (unfed_model::Manifest, WeightFiles) {
    let manifest: unfed_model::Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let files: Vec<PathBuf> = manifest.text_shards().map(|s| dir.join(&s.file)).collect();
    (manifest, WeightFiles::open(&files).unwrap())
}

fn party(
    role: &str,
    split: &Path,
    registry: Option<&str>,
    peer: Option<&str>,
    extra: &[&str],
    log: PathBuf,
) -> Node {
    let mut args = vec![
        s("mpc"),
        s("--role"),
        s(role),
        s("--port"),
        s("0"),
        s("--shards-dir"),
        split.display().to_string(),
        s("--heartbeat-secs"),
        s("1"),
        s("--timeout-secs"),
        s("3"),
    ];
    if let Some(r) = registry {
        args.extend([s("--registry"), s(r)]);
    }
    if let Some(p) = peer {
        args.extend([s("--peer"), s(p)]);
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    Node::start(&args, log)
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

async fn model_status(net: &Net) -> unfed_proto::ModelStatus {
    net.client().await.list_models().await.unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn shard0_in_mpc_over_grpc_gates_readiness_and_matches_the_plaintext_tokens() {
    let dir = Net::prepare();
    let tiny = dir.path().join("tiny-src");
    unfed_model::builtin::write_tiny(&tiny).unwrap();
    let split = split_into(&tiny, &dir.path().join("splits"), "tiny", 2);
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
    };
    net.compute("tiny", 0);
    net.compute("tiny", 1);
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
    let reg = net.registry.address.clone();
    let logs = net.dir.path().to_path_buf();
    let mut b = party("B", &split, Some(&reg), None, &[], logs.join("mpc-b.log"));
    let a = party(
        "A",
        &split,
        Some(&reg),
        Some(&b.address),
        &[],
        logs.join("mpc-a.log"),
    );
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
    let mut pair = RemotePair::connect(&a.address, &b.address, "s1", Duration::from_secs(3))
        .await
        .unwrap();
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
async fn full_output_2pc_over_grpc_generates_the_plaintext_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny-src");
    unfed_model::builtin::write_tiny(&tiny).unwrap();
    let split = split_into(&tiny, &dir.path().join("splits"), "tiny", 2);
    let full = ["--full-output"];
    let b = party("B", &split, None, None, &full, dir.path().join("b.log"));
    let a = party(
        "A",
        &split,
        None,
        Some(&b.address),
        &full,
        dir.path().join("a.log"),
    );
    let (manifest, files) = open_split(&split);
    let cfg = &manifest.config;
    let layers = cfg.text.num_hidden_layers;
    let cm = ClientModel::load(&cfg.text, &cfg.text_prefix, 0..layers, true, &files).unwrap();
    let mut pair = RemotePair::connect(&a.address, &b.address, "full", Duration::from_secs(3))
        .await
        .unwrap();
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
    // A party refuses a link that does not start with a hello.
    let err = RemotePair::connect(&b.address, &a.address, "", Duration::from_secs(1)).await;
    assert!(err.is_err());
}
