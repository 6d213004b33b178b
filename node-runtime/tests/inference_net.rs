//! Inference across real `unfed-node` processes on loopback: token-exact through 1, 2
//! and 3 shards and replicas, isolated concurrent sessions, fast failure when a node
//! dies, recovery after restart, and clear errors.

mod common;

use std::time::{Duration, Instant};

use common::net::{Net, split_into};
use unfed_node::client::GenerateOptions;
use unfed_node::engine::SamplingConfig;
use unfed_node::engine::generate::{generate, load_checkpoint};

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_through_1_2_3_shards_and_replicas_matches_transformers_for_every_fixture() {
    let tmp = Net::prepare();
    let fixtures = common::text_fixtures();
    let mut expected_nodes = Vec::new();
    for (name, dir, _) in &fixtures {
        for shards in 1..=3 {
            let id = format!("{name}-{shards}s");
            split_into(dir, &tmp.path().join("splits"), &id, shards);
        }
    }
    let mut net = Net::registry(tmp);
    for (name, _, _) in &fixtures {
        for shards in 1..=3 {
            let id = format!("{name}-{shards}s");
            for shard in 0..shards {
                net.compute(&id, shard);
            }
            // Two replicas of the middle shard of the 3-shard route.
            let mut nodes = shards as u32;
            if shards == 3 {
                net.compute(&id, 1);
                nodes += 1;
            }
            expected_nodes.push((id, nodes));
        }
    }
    for (id, nodes) in &expected_nodes {
        net.wait_ready(id, *nodes).await;
    }
    let mut client = net.client().await;
    let mut checked = 0;
    for (name, _, reference) in &fixtures {
        for shards in 1..=3 {
            let id = format!("{name}-{shards}s");
            // Enough rounds that both replicas serve with overwhelming probability.
            let rounds = if shards == 3 { 4 } else { 1 };
            for _ in 0..rounds {
                for case in &reference.cases {
                    let out = client
                        .generate(
                            &id,
                            &case.prompt_ids,
                            &greedy(case.generated_ids.len()),
                            |_| {},
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{id}: {e:#}\n{}", net.logs()));
                    assert_eq!(
                        out.tokens, case.generated_ids,
                        "{id}: prompt {:?}",
                        case.prompt_ids
                    );
                    assert_eq!(out.hops.len(), shards, "one timing per hop");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= fixtures.len() * 3 * 4);
    // Every replica of every 3-shard route served steps.
    for node in &net.computes {
        let mut c = unfed_proto::compute_client::ComputeClient::new(
            crate::common::net::channel(&node.address).await,
        );
        let h = c
            .health(unfed_proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            h.forwards > 0,
            "node {} (shard {} of {}) never served",
            h.node_id,
            h.shard_index,
            h.model_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_sessions_each_get_their_own_output() {
    let (name, dir, _) = common::fixtures()
        .into_iter()
        .find(|f| f.0 == "qwen2-f32")
        .unwrap();
    let tmp = Net::prepare();
    split_into(&dir, &tmp.path().join("splits"), &name, 2);
    let mut net = Net::registry(tmp);
    net.compute(&name, 0);
    net.compute(&name, 1);
    net.wait_ready(&name, 2).await;

    let (_, model) = load_checkpoint(&dir).unwrap();
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..3 + i).map(|j| (17 * i + 5 * j + 3) % 400 + 1).collect())
        .collect();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(&model, p, 20, SamplingConfig::default(), true)
                .unwrap()
                .tokens
        })
        .collect();
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        let registry = net.registry.address.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut client =
                unfed_node::client::Client::connect(&crate::common::net::transport(), &registry)
                    .await
                    .unwrap();
            client
                .generate(&name, &p, &greedy(20), |_| {})
                .await
                .map(|o| o.tokens)
        }));
    }
    let distinct: std::collections::BTreeSet<_> = expected.iter().collect();
    assert!(
        distinct.len() > 1,
        "prompts should lead to different outputs"
    );
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("session {i}: {e:#}"));
        assert_eq!(got, expected[i], "session {i} got another session's tokens");
    }
    // The sessions overlapped, so the shards ran some of their steps as batches: the
    // tokens above are what batched steps produce.
    for node in 0..2 {
        let health = net.compute_health(node).await;
        assert!(
            health.largest_batch > 1 && health.batches < health.forwards,
            "node {node} never batched: {health:?}"
        );
        // Every client ended its session: no KV cache is left behind (nor counted as an
        // active session the batcher would wait for).
        assert_eq!(
            (health.sessions, health.kv_cache_bytes),
            (0, 0),
            "node {node}: {health:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_the_client_fast_naming_it_and_a_restart_recovers() {
    let (name, dir, reference) = common::fixtures()
        .into_iter()
        .find(|f| f.0 == "llama-f32")
        .unwrap();
    let tmp = Net::prepare();
    split_into(&dir, &tmp.path().join("splits"), &name, 2);
    let mut net = Net::registry(tmp);
    net.compute(&name, 0);
    let victim = net.compute(&name, 1);
    net.wait_ready(&name, 2).await;

    let mut client = net.client().await;
    let case = &reference.cases[0];
    let mut killed_at = None;
    let result = {
        let node = &mut net.computes[victim];
        client
            .generate(&name, &case.prompt_ids, &greedy(64), |_| {
                if killed_at.is_none() {
                    node.kill();
                    killed_at = Some(Instant::now());
                }
            })
            .await
    };
    let failed_after = killed_at
        .expect("a token arrived before the kill")
        .elapsed();
    let err = format!(
        "{:#}",
        result.expect_err("generation must fail once shard 1 is gone")
    );
    assert!(
        failed_after < Duration::from_secs(5),
        "failure took {failed_after:?}"
    );
    assert!(
        err.contains("shard 1") && err.contains("compute-1@"),
        "error must name the node and shard: {err}"
    );

    // Same port, node id and certificate (its pin is what clients check): the
    // restarted node replaces its record.
    let mut args = net.computes[victim].args.clone();
    let port = args.iter().position(|a| a == "--port").unwrap() + 1;
    args[port] = net.computes[victim].port();
    let log = net.dir.path().join("restarted.log");
    net.computes[victim] = common::net::Node::start(&args, log);
    net.wait_ready(&name, 2).await;
    let out = client
        .generate(
            &name,
            &case.prompt_ids,
            &greedy(case.generated_ids.len()),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(out.tokens, case.generated_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_incomplete_and_too_long_requests_get_clear_errors_and_sigterm_unregisters() {
    let (name, dir, _) = common::fixtures()
        .into_iter()
        .find(|f| f.0 == "mistral-f32")
        .unwrap();
    let tmp = Net::prepare();
    split_into(&dir, &tmp.path().join("splits"), &name, 2);
    let mut net = Net::registry(tmp);
    let mut client = net.client().await;

    let err = format!(
        "{:#}",
        client
            .generate("no-such-model", &[1, 2], &greedy(4), |_| {})
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("unknown model `no-such-model`") && err.contains(&name),
        "{err}"
    );

    let first = net.compute(&name, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let m = client
            .list_models()
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.model == name)
            .unwrap();
        if m.nodes == 1 {
            break m;
        }
        assert!(Instant::now() < deadline, "shard 0 never registered");
        tokio::time::sleep(Duration::from_millis(25)).await; // poll again until the deadline
    };
    assert_eq!(status.reason, "incomplete_text_coverage");
    assert_eq!(
        (status.text_shards_covered, status.text_shards_total),
        (1, 2)
    );
    let err = format!(
        "{:#}",
        client
            .generate(&name, &[1, 2], &greedy(4), |_| {})
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("INCOMPLETE (incomplete_text_coverage)") && err.contains("shard(s) 1 of 2"),
        "{err}"
    );

    net.compute(&name, 1);
    net.wait_ready(&name, 2).await;
    let too_long = vec![5u32; 300];
    let err = format!(
        "{:#}",
        client
            .generate(&name, &too_long, &greedy(4), |_| {})
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("300 tokens") && err.contains("context of 256 tokens"),
        "{err}"
    );

    // SIGTERM: the node exits cleanly and unregisters at once (no heartbeat timeout).
    let status = net.computes[first].terminate();
    assert!(status.success(), "exit status {status:?}\n{}", net.logs());
    let m = client
        .list_models()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.model == name)
        .unwrap();
    assert_eq!(m.nodes, 1, "unregistered immediately: {m:?}");
    assert_eq!(m.reason, "incomplete_text_coverage");
}
