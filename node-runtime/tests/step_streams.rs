//! A session's steps on one Compute.Steps stream per hop: the answers are those unary
//! Forward calls give, an outsider cannot take over a live session, a failed step ends
//! the stream with its status, an abandoned stream is closed after the session's idle
//! time, and a node that shuts down ends its open streams rather than waiting on them.

mod common;

use std::time::Duration;

use common::net::{Net, channel};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::{ForwardRequest, Hop, TokenIds, forward_request};

const PROMPT: [u32; 5] = [3, 14, 15, 92, 65];
const STEPS: u32 = 6;
/// The entry node's session idle time (`--session-idle-secs`).
const IDLE_SECS: u64 = 2;

/// Step `step` of greedy session `session` over `route` (the hops after the entry).
fn request(session: &str, step: u32, ids: Vec<u32>, route: &[Hop]) -> ForwardRequest {
    ForwardRequest {
        model_id: "tiny".into(),
        session_id: session.into(),
        step,
        position: if step == 0 {
            0
        } else {
            PROMPT.len() as u32 + step - 1
        },
        input: Some(forward_request::Input::Tokens(TokenIds { ids })),
        route: route.to_vec(),
        ..Default::default()
    }
}

/// The next step's input: the prompt first, then the token the last step sampled.
fn input(step: u32, last: u32) -> Vec<u32> {
    if step == 0 {
        PROMPT.to_vec()
    } else {
        vec![last]
    }
}

/// A Steps stream to `entry`: where its requests go, and where the answers come back.
async fn open(
    entry: &mut ComputeClient<tonic::transport::Channel>,
) -> (
    mpsc::UnboundedSender<ForwardRequest>,
    tonic::Streaming<unfed_proto::ForwardResponse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let answers = entry
        .steps(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_on_a_stream_answer_as_forward_calls_and_it_ends_on_failure_idleness_or_shutdown() {
    let (dir, _) = Net::prepare_tiny(2);
    let mut net = Net::registry(dir);
    let mut args = net.compute_args("tiny", 0, "0");
    args.extend(["--session-idle-secs".into(), IDLE_SECS.to_string()]);
    let node = net.start(&args, net.dir.path().join("tiny-0.log"));
    net.computes.push(node);
    let entry = net.computes.len() - 1;
    net.compute("tiny", 1);
    net.wait_ready("tiny", 2).await;
    let route = net.client().await.route("tiny").await.unwrap();
    let mut shard0 = ComputeClient::new(channel(&route[0].address).await);

    // The same greedy session, once as unary calls and once on one stream.
    let mut unary = Vec::new();
    for step in 0..STEPS {
        let ids = input(step, unary.last().copied().unwrap_or(0));
        let r = shard0
            .forward(request("unary", step, ids, &route[1..]))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", net.logs()))
            .into_inner();
        unary.push(r.token_id);
    }
    let (tx, mut answers) = open(&mut shard0).await;
    let mut streamed = Vec::new();
    for step in 0..STEPS {
        let ids = input(step, streamed.last().copied().unwrap_or(0));
        tx.send(request("streamed", step, ids, &route[1..]))
            .unwrap();
        let r = answers
            .message()
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", net.logs()))
            .expect("an answer per step");
        assert_eq!(r.timings.len(), 2, "both hops ran step {step}: {r:?}");
        streamed.push(r.token_id);
    }
    assert_eq!(streamed, unary);
    // Each step ran once on each node: unary and streamed steps alike.
    for node in 0..2 {
        assert_eq!(net.compute_forwards(node).await, 2 * STEPS as u64);
    }

    // An outsider's stream cannot take over the live session: a step 0 naming its id is
    // refused before anything runs.
    let (intruder, mut refusals) = open(&mut shard0).await;
    intruder
        .send(request("streamed", 0, PROMPT.to_vec(), &route[1..]))
        .unwrap();
    let err = refusals.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("streamed"), "{err}");
    for node in 0..2 {
        assert_eq!(net.compute_forwards(node).await, 2 * STEPS as u64);
    }

    // A failed step ends the stream with that step's status, and nothing after it runs.
    tx.send(ForwardRequest {
        model_id: "no-such-model".into(),
        ..request("streamed", STEPS, vec![1], &route[1..])
    })
    .unwrap();
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(err.message().contains("no-such-model"), "{err}");
    let _ = tx.send(request("streamed", STEPS, vec![1], &route[1..]));
    assert!(matches!(answers.message().await, Ok(None) | Err(_)));
    assert_eq!(net.compute_forwards(0).await, 2 * STEPS as u64);

    // A stream left open without steps is closed once its session would have expired.
    let (tx, mut answers) = open(&mut shard0).await;
    tx.send(request("abandoned", 0, PROMPT.to_vec(), &route[1..]))
        .unwrap();
    answers.message().await.unwrap().unwrap();
    let waited = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), answers.message())
        .await
        .expect("the idle stream was never closed")
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("no step for"), "{err}");
    assert!(waited.elapsed() >= Duration::from_secs(IDLE_SECS) - Duration::from_millis(100));
    drop(tx);

    // An open stream (with its own stream on to shard 1) does not hold up a shutdown:
    // the node ends it, saying why, and exits.
    let (tx, mut answers) = open(&mut shard0).await;
    tx.send(request("open", 0, PROMPT.to_vec(), &route[1..]))
        .unwrap();
    answers.message().await.unwrap().unwrap();
    let status = net.computes[entry].terminate();
    assert!(status.success(), "exit status {status:?}\n{}", net.logs());
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("shutting down"), "{err}");
    drop(tx);
}
