//! decode_client_sample over real compute processes: the last shard returns the logits
//! sealed to the client's X25519 key instead of a token; the shard before it relays them
//! without being able to read them; the client samples, and the tokens are those the last
//! shard would have sampled (greedy and seeded sampling alike).

mod common;

use common::net::{Net, session_inputs};
use unfed_node::client::GenerateOptions;
use unfed_node::seal::{Opener, logits_context};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::{
    ForwardRequest, Hop, SamplingParams, SessionInputsResponse, TokenIds, forward_request,
};

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
        // What the nodes received: when the client samples, neither the penalty's
        // tokens (the prompt and the output) nor the seed; when the last shard samples
        // (the control), both.
        let penalty = sampling.repetition_penalty != 0.0;
        for (out, client_side) in [(&client_samples, true), (&shard_samples, false)] {
            let seen = received(&net, &out.session_id, out.tokens.len()).await;
            let last = &seen[1];
            assert_eq!(last.sampling.is_some(), !client_side, "{sampling:?}");
            let sent: Vec<u32> = last
                .inputs
                .iter()
                .flat_map(|i| i.penalty_tokens.clone())
                .collect();
            if client_side || !penalty {
                assert!(sent.is_empty(), "{sent:?}");
            } else {
                assert!(sent.starts_with(&PROMPT), "{sent:?}");
                assert_eq!(last.sampling.map(|p| p.seed), Some(7));
            }
            assert!(
                seen[0]
                    .inputs
                    .iter()
                    .all(|i| i.penalty_tokens.is_empty() || !client_side)
            );
        }
    }
    // A request that hands the seed or the penalty's tokens to a node while asking for
    // sealed logits is refused, naming the option.
    let route = client.route("tiny").await.unwrap();
    let mut shard0 = ComputeClient::new(crate::common::net::channel(&route[0].address).await);
    for (seed, penalty_tokens) in [(7, vec![]), (0, PROMPT.to_vec())] {
        let err = shard0
            .forward(ForwardRequest {
                model_id: "tiny".into(),
                session_id: "leaky".into(),
                input: Some(forward_request::Input::Tokens(TokenIds {
                    ids: PROMPT.to_vec(),
                })),
                route: vec![route[1].clone()],
                client_key: Opener::new().public_key().to_vec(),
                sampling: Some(SamplingParams {
                    seed,
                    ..Default::default()
                }),
                penalty_tokens,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("decode_client_sample"),
            "{}",
            err.message()
        );
    }

    // One step by hand: what comes back through shard 0 is sealed logits, no token; only
    // the client's key opens it, for this step only.
    let me = Opener::new();
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

/// What each shard's node kept of `session` (its SessionInputs, asked by its neighbour).
async fn received(net: &Net, session: &str, steps: usize) -> Vec<SessionInputsResponse> {
    let (n0, n1) = (&net.computes[0], &net.computes[1]);
    vec![
        session_inputs(n1, &n0.address, session, steps)
            .await
            .unwrap(),
        session_inputs(n0, &n1.address, session, steps)
            .await
            .unwrap(),
    ]
}
