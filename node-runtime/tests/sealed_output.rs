//! decode_client_sample over real compute processes: the last shard returns the logits
//! sealed to the client's X25519 key instead of a token; the shard before it relays them
//! without being able to read them; the client samples, and the tokens are those the last
//! shard would have sampled (greedy and seeded sampling alike).

mod common;

use common::net::Net;
use unfed_node::client::GenerateOptions;
use unfed_node::seal::{Opener, logits_context};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::{ForwardRequest, Hop, SamplingParams, TokenIds, forward_request};

const PROMPT: [u32; 5] = [3, 14, 15, 92, 65];

#[tokio::test(flavor = "multi_thread")]
async fn the_client_samples_from_logits_sealed_to_it() {
    let (dir, _) = Net::prepare_tiny(2);
    let mut net = Net::registry(dir);
    net.compute("tiny", 0);
    net.compute("tiny", 1);
    net.wait_ready("tiny", 2).await;
    let mut client = net.client().await;

    for sampling in [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.3,
            seed: 7,
            ..Default::default()
        },
    ] {
        let opts = GenerateOptions {
            max_tokens: 16,
            stop_on_eos: false,
            sampling,
            ..Default::default()
        };
        let shard_samples = client
            .generate("tiny", &PROMPT, &opts, |_| {})
            .await
            .unwrap();
        let sealed = GenerateOptions {
            decode_client_sample: true,
            ..opts.clone()
        };
        let client_samples = client
            .generate("tiny", &PROMPT, &sealed, |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
        assert_eq!(client_samples.tokens, shard_samples.tokens, "{sampling:?}");
    }

    // One step by hand: what comes back through shard 0 is sealed logits, no token; only
    // the client's key opens it, for this step only.
    let route = client.route("tiny").await.unwrap();
    let me = Opener::new();
    let mut shard0 = ComputeClient::new(crate::common::net::channel(&route[0].address).await);
    let req = ForwardRequest {
        model_id: "tiny".into(),
        session_id: "sealed".into(),
        input: Some(forward_request::Input::Tokens(TokenIds {
            ids: PROMPT.to_vec(),
        })),
        route: vec![Hop {
            shard_index: 1,
            ..route[1].clone()
        }],
        client_key: me.public_key().to_vec(),
        ..Default::default()
    };
    let resp = shard0.forward(req).await.unwrap().into_inner();
    assert_eq!((resp.token_id, resp.is_eos), (0, false));
    let context = logits_context("tiny", "sealed", 0);
    let logits = me.open(&resp.sealed_logits, &context).unwrap();
    let vocab = client
        .manifest("tiny")
        .await
        .unwrap()
        .0
        .config
        .text
        .vocab_size;
    assert_eq!(logits.len(), vocab * 4);
    // The plaintext logits appear nowhere in what the relay carried.
    assert!(
        !resp
            .sealed_logits
            .windows(16)
            .any(|w| logits.windows(16).any(|l| l == w)),
        "the sealed bytes contain plaintext logits"
    );
    assert!(Opener::new().open(&resp.sealed_logits, &context).is_err());
    assert!(
        me.open(&resp.sealed_logits, &logits_context("tiny", "sealed", 1))
            .is_err()
    );
    // A key that is not an X25519 public key is refused with a reason.
    let bad = ForwardRequest {
        model_id: "tiny".into(),
        session_id: "bad-key".into(),
        input: Some(forward_request::Input::Tokens(TokenIds { ids: vec![1] })),
        route: vec![route[1].clone()],
        client_key: vec![1, 2, 3],
        ..Default::default()
    };
    let err = shard0.forward(bad).await.unwrap_err();
    assert!(err.message().contains("X25519"), "{}", err.message());
}
