//! Failover across real `unfed-node` processes: a replica on a running chat's route is
//! killed (SIGKILL) or hung (SIGSTOP) mid-generation, and the client replays the session
//! through the other replica; the tokens equal an undisturbed run under seeded sampling.
//! With no replica left, the chat fails fast naming the shard and what was tried.

mod common;

use std::time::{Duration, Instant};

use common::net::Net;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use unfed_node::client::{GenerateOptions, GenerateOutput};
use unfed_proto::SamplingParams;

/// Tokens before the disturbance, and the chat's length.
const DISTURB_AT: usize = 30;
const TOKENS: usize = 120;

/// Seeded temperature sampling, so a restarted sampler would show in the tokens.
fn sampled() -> GenerateOptions {
    GenerateOptions {
        max_tokens: TOKENS,
        stop_on_eos: false,
        sampling: SamplingParams {
            temperature: 0.9,
            seed: 1234,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn prompt() -> Vec<u32> {
    (0..12u32).map(|i| (31 * i + 7) % 200 + 3).collect()
}

/// The tiny model in 2 shards: one node for shard 0, two replicas of shard 1 (computes
/// 1 and 2).
async fn two_replicas_of_shard_1() -> Net {
    let (dir, _) = Net::prepare_tiny(2);
    let mut net = Net::registry(dir);
    net.compute("tiny", 0);
    net.compute("tiny", 1);
    net.compute("tiny", 1);
    net.wait_ready("tiny", 3).await;
    net
}

/// Runs a chat on its own client; after `DISTURB_AT` tokens it pauses, hands `disturb`
/// the computes index of the shard-1 replica on its route, and resumes once `disturb`
/// returns. Returns the chat's result and how long it was paused.
async fn chat_disturbed(
    net: &mut Net,
    disturb: impl FnOnce(&mut Net, usize),
) -> (anyhow::Result<GenerateOutput>, Duration) {
    let before = [net.compute_forwards(1).await, net.compute_forwards(2).await];
    let (at, mut reached) = tokio::sync::mpsc::unbounded_channel();
    let (resume, resumed) = std::sync::mpsc::channel::<()>();
    let mut client = net.client().await;
    let chat = tokio::spawn(async move {
        let mut n = 0;
        client
            .generate("tiny", &prompt(), &sampled(), move |_| {
                n += 1;
                if n == DISTURB_AT {
                    at.send(()).unwrap();
                    // Hands this worker's queued tasks to another thread while paused.
                    tokio::task::block_in_place(|| resumed.recv().unwrap());
                }
            })
            .await
    });
    reached
        .recv()
        .await
        .expect("the chat reached the disturbance");
    let paused = Instant::now();
    let after = [net.compute_forwards(1).await, net.compute_forwards(2).await];
    let on_route = if after[0] > before[0] { 1 } else { 2 };
    assert!(
        after[on_route - 1] - before[on_route - 1] >= DISTURB_AT as u64,
        "replica {on_route} served the chat: {before:?} → {after:?}"
    );
    disturb(net, on_route);
    let paused = paused.elapsed();
    resume.send(()).unwrap();
    (chat.await.unwrap(), paused)
}

async fn undisturbed(net: &Net) -> GenerateOutput {
    let mut client = net.client().await;
    client
        .generate("tiny", &prompt(), &sampled(), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()))
}

fn signal(net: &Net, i: usize, sig: Signal) {
    kill(Pid::from_raw(net.computes[i].child.id() as i32), sig).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sigkill_of_the_replica_on_a_running_chats_route_fails_over_token_identical() {
    let mut net = two_replicas_of_shard_1().await;
    let reference = undisturbed(&net).await;
    assert_eq!(reference.tokens.len(), TOKENS);

    let mut victim = 0;
    let mut killed_at = None;
    let (out, paused) = chat_disturbed(&mut net, |net, i| {
        net.computes[i].kill();
        victim = i;
        killed_at = Some(Instant::now());
    })
    .await;
    // The hop that saw the failure reported it; the registry's probe delisted the node
    // long before its heartbeats would have (3 missed intervals of 1 s).
    let mut client = net.client().await;
    loop {
        let m = client.list_models().await.unwrap();
        if m.iter().any(|m| m.model == "tiny" && m.nodes == 2) {
            break;
        }
        let waited = killed_at.unwrap().elapsed();
        assert!(
            waited < Duration::from_millis(1500),
            "still listed after {waited:?}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll again until the deadline
    }
    let out = out.unwrap_or_else(|e| panic!("the chat must fail over: {e:#}\n{}", net.logs()));
    assert_eq!(
        out.tokens, reference.tokens,
        "token-identical to the undisturbed run"
    );
    assert_eq!(out.failovers, 1);
    let survivor = 3 - victim;
    assert_eq!(
        out.route[1].address, net.computes[survivor].address,
        "finished on the other replica"
    );
    let extra_ms = out.total_ms - paused.as_secs_f64() * 1e3 - reference.total_ms;
    println!(
        "failover after SIGKILL: extra latency {extra_ms:.0} ms (replay {:.0} ms; undisturbed chat {:.0} ms)",
        out.failover_ms, reference.total_ms
    );
    assert!(extra_ms <= 2000.0, "extra latency {extra_ms:.0} ms");

    // The same client routes its next chat around the banned node at once.
    let again = client.generate("tiny", &prompt(), &sampled(), |_| {}).await;
    let again = again.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(again.tokens, reference.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sigstop_of_a_hop_is_detected_within_the_hop_timeout_then_fails_over() {
    let mut net = two_replicas_of_shard_1().await;
    let reference = undisturbed(&net).await;
    let hop_timeout = Duration::from_secs(4); // `compute_args`' --hop-timeout-secs

    let mut stopped = 0;
    let started = Instant::now();
    let (out, paused) = chat_disturbed(&mut net, |net, i| {
        signal(net, i, Signal::SIGSTOP);
        stopped = i;
    })
    .await;
    let elapsed = started.elapsed();
    signal(&net, stopped, Signal::SIGCONT);
    let out = out.unwrap_or_else(|e| panic!("the chat must fail over: {e:#}\n{}", net.logs()));
    assert_eq!(
        out.tokens, reference.tokens,
        "token-identical to the undisturbed run"
    );
    assert_eq!(out.failovers, 1);
    assert_ne!(out.route[1].address, net.computes[stopped].address);
    let extra = out.total_ms - paused.as_secs_f64() * 1e3 - reference.total_ms;
    println!(
        "failover after SIGSTOP: extra latency {extra:.0} ms (hop timeout {} ms; replay {:.0} ms)",
        hop_timeout.as_millis(),
        out.failover_ms
    );
    assert!(
        extra <= (hop_timeout + Duration::from_secs(2)).as_secs_f64() * 1e3,
        "detection and failover took {extra:.0} ms (chat {elapsed:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn with_both_replicas_of_a_shard_dead_the_chat_fails_within_5s_naming_shard_and_tries() {
    let mut net = two_replicas_of_shard_1().await;
    let mut killed_at = None;
    let (out, _) = chat_disturbed(&mut net, |net, _| {
        net.computes[1].kill();
        net.computes[2].kill();
        killed_at = Some(Instant::now());
    })
    .await;
    let failed_after = killed_at.unwrap().elapsed();
    let err = format!("{:#}", out.expect_err("no replica of shard 1 is left"));
    // Both were reported by shard 0's node and failed the registry's probe: not READY
    // before a single heartbeat interval ran out three times.
    let mut client = net.client().await;
    loop {
        let m = client.list_models().await.unwrap();
        let tiny = m.iter().find(|m| m.model == "tiny").unwrap();
        if tiny.state != unfed_proto::ModelState::Ready as i32 {
            break;
        }
        let waited = killed_at.unwrap().elapsed();
        assert!(
            waited < Duration::from_millis(2000),
            "still READY after {waited:?}: {tiny:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll again until the deadline
    }
    assert!(
        failed_after < Duration::from_secs(5),
        "failed after {failed_after:?}"
    );
    assert!(
        err.contains("text shard 1 of `tiny` has no live replica"),
        "{err}"
    );
    for i in [1, 2] {
        assert!(
            err.contains(&net.computes[i].address),
            "error must name the replica at {} as tried: {err}",
            net.computes[i].address
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_false_report_does_not_delist_a_live_node_and_an_anonymous_reporter_is_refused() {
    let net = two_replicas_of_shard_1().await;
    let mut client = net.client().await;
    let nodes = client
        .registry_mut()
        .discover(unfed_proto::DiscoverRequest {
            model: "tiny".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let id_at = |i: usize| {
        let n = nodes.iter().find(|n| n.address == net.computes[i].address);
        n.unwrap().node_id.clone()
    };
    let (reporter, victim) = (id_at(0), id_at(1));
    let report = || unfed_proto::UnresponsiveReport {
        reporter_id: reporter.clone(),
        node_id: victim.clone(),
        reason: "made up".into(),
        ..Default::default()
    };
    // Anonymous (no client certificate, no signature) though it names a real reporter.
    let refused = client
        .registry_mut()
        .report_unresponsive(report())
        .await
        .expect_err("an unauthenticated report is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    // A registered node (its own certificate) lying about a live node.
    let arg = |k: &str| {
        let a = &net.computes[0].args;
        std::path::PathBuf::from(&a[a.iter().position(|x| x == k).unwrap() + 1])
    };
    let tls = unfed_node::net::TlsFiles {
        cert: arg("--tls-cert"),
        key: arg("--tls-key"),
        ca: arg("--tls-ca"),
    };
    let as_node = unfed_node::net::Net::from_files(&tls).unwrap();
    let mut registry =
        unfed_node::membership::registry_client(&as_node, &net.registry.address).unwrap();
    let verdict = registry
        .report_unresponsive(report())
        .await
        .unwrap()
        .into_inner();
    assert!(!verdict.delisted, "the node answers the probe");
    let m = client.list_models().await.unwrap();
    let tiny = m.iter().find(|m| m.model == "tiny").unwrap();
    assert_eq!(tiny.nodes, 3, "nothing changed: {tiny:?}");
    assert_eq!(tiny.state, unfed_proto::ModelState::Ready as i32);
}
