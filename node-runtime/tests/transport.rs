//! The transport from the attacker's side, over real processes: what a wire tap sees
//! (with a plaintext control that shows the tap can see a leak), and every caller the
//! nodes must refuse — no certificate, another CA, a valid certificate that is not the
//! registered one, a stranger, a node of the wrong shard, a forged signature — each next
//! to the authorized call that still works.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::net::{Net, Node, issue, s};
use ed25519_dalek::Signer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use unfed_node::client::GenerateOptions;
use unfed_node::net::auth::CallProof;
use unfed_node::net::{Net as Transport, TlsFiles};
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::mpc_client::MpcClient;
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::*;

/// A prompt of distinctive ids (two-byte varints) to look for on the wire.
const PROMPT: [u32; 12] = [301, 417, 288, 399, 455, 262, 333, 478, 291, 402, 366, 444];

/// The ids as protobuf writes a packed `repeated uint32`: what a tap would search for.
fn packed_varints(ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &id in ids {
        let mut v = id;
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out
}

/// A TCP relay that records every byte it forwards (both directions): a wire tap.
struct Tap {
    addr: String,
    target: Arc<Mutex<Option<String>>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start() -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target: Arc<Mutex<Option<String>>> = Arc::default();
        let bytes: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (t, b) = (target.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Some(to) = t.lock().unwrap().clone() else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(&to).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(copy(ri, wo, b.clone()));
                tokio::spawn(copy(ro, wi, b.clone()));
            }
        });
        Tap {
            addr,
            target,
            bytes,
        }
    }

    fn forward_to(&self, addr: &str) {
        *self.target.lock().unwrap() = Some(addr.to_string());
    }

    fn saw(&self, needle: &[u8]) -> bool {
        let b = self.bytes.lock().unwrap();
        !b.is_empty() && b.windows(needle.len()).any(|w| w == needle)
    }

    fn recorded(&self) -> usize {
        self.bytes.lock().unwrap().len()
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    log: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        log.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// The built-in model in 2 shards, shard 0 advertised behind `tap`; one chat through it.
async fn chat_through_tap(tls: bool) -> Tap {
    let (dir, _) = Net::prepare_tiny(2);
    let mut net = Net::registry_with(dir, tls);
    let tap = Tap::start().await;
    let mut args = net.compute_args("tiny", 0, "0");
    args.extend([s("--advertise"), tap.addr.clone()]);
    let node = net.start(&args, net.dir.path().join("compute-0.log"));
    tap.forward_to(&node.address);
    net.computes.push(node);
    net.compute("tiny", 1);
    net.wait_ready("tiny", 2).await;
    let opts = GenerateOptions {
        max_tokens: 8,
        stop_on_eos: false,
        ..Default::default()
    };
    let out = net
        .client()
        .await
        .generate("tiny", &PROMPT, &opts, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    assert_eq!(out.tokens.len(), 8);
    assert_eq!(
        out.route[0].address, tap.addr,
        "the route goes through the tap"
    );
    tap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wire_tap_reads_the_prompt_in_plaintext_and_nothing_under_tls() {
    let needle = packed_varints(&PROMPT);
    let plain = chat_through_tap(false).await;
    assert!(
        plain.saw(&needle),
        "control: the tap must see the prompt's token ids on a plaintext testnet"
    );
    let tls = chat_through_tap(true).await;
    assert!(tls.recorded() > 1000, "the tap recorded the TLS traffic");
    assert!(
        !tls.saw(&needle),
        "the prompt's token ids are readable on the wire of a TLS testnet"
    );
    // Not even a fragment: any 4 consecutive ids.
    for w in PROMPT.windows(4) {
        assert!(!tls.saw(&packed_varints(w)), "ids {w:?} readable under TLS");
    }
}

/// A node started with certificate files the test keeps, so it can act as that node.
fn start_as(net: &mut Net, shard: usize, files: &TlsFiles) -> usize {
    let mut args = net.compute_args("tiny", shard, "0");
    args.extend([
        s("--tls-ca"),
        files.ca.display().to_string(),
        s("--tls-cert"),
        files.cert.display().to_string(),
        s("--tls-key"),
        files.key.display().to_string(),
    ]);
    let log = net.dir.path().join(format!("compute-{shard}.log"));
    net.computes.push(Node::start(&args, log));
    net.computes.len() - 1
}

async fn compute_as(who: &Transport, addr: &str) -> ComputeClient<tonic::transport::Channel> {
    ComputeClient::new(
        who.connect(addr, Duration::from_secs(30), None)
            .await
            .unwrap(),
    )
}

fn step0(session: &str, route: &[Hop], owner: &ed25519_dalek::SigningKey) -> ForwardRequest {
    ForwardRequest {
        model_id: "tiny".into(),
        session_id: session.into(),
        step: 0,
        position: 0,
        input: Some(forward_request::Input::Tokens(TokenIds {
            ids: PROMPT.to_vec(),
        })),
        route: route[1..].to_vec(),
        owner_key: owner.verifying_key().to_bytes().to_vec(),
        ..Default::default()
    }
}

fn next_step(session: &str, route: &[Hop], step: u32, token: u32) -> ForwardRequest {
    ForwardRequest {
        model_id: "tiny".into(),
        session_id: session.into(),
        step,
        position: PROMPT.len() as u32 + step - 1,
        input: Some(forward_request::Input::Tokens(TokenIds {
            ids: vec![token],
        })),
        route: route[1..].to_vec(),
        ..Default::default()
    }
}

fn end(session: &str, route: &[Hop], signature: Vec<u8>) -> EndSessionRequest {
    EndSessionRequest {
        session_id: session.into(),
        route: route[1..].to_vec(),
        owner_signature: signature,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_guarded_rpc_refuses_outsiders_and_serves_its_caller() {
    let (dir, _) = Net::prepare_tiny(2);
    let mut net = Net::registry(dir);
    let (files0, files1) = (issue("compute-0"), issue("compute-1"));
    let c0 = start_as(&mut net, 0, &files0);
    let c1 = start_as(&mut net, 1, &files1);
    net.wait_ready("tiny", 2).await;
    let addr0 = net.computes[c0].address.clone();
    let (as0, as1) = (
        Transport::from_files(&files0).unwrap(),
        Transport::from_files(&files1).unwrap(),
    );
    let anonymous = common::net::transport();
    let stranger = common::net::identity("stranger");
    let mut client = net.client().await;
    let route = client.route("tiny").await.unwrap();
    assert!(route.iter().all(|h| h.tls_pin.len() == 64), "{route:?}");

    // --- The link: no TLS, another CA, a valid certificate that is not the registered one.
    let plain = Transport::plaintext()
        .connect(&addr0, Duration::from_secs(5), None)
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => ComputeClient::new(ch)
            .health(HealthRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client got an answer from a TLS node");
    let other_ca = tempfile::tempdir().unwrap();
    let ca_file = other_ca.path().join("ca.crt");
    std::fs::write(
        &ca_file,
        unfed_node::net::pki::Ca::generate("other")
            .unwrap()
            .cert_pem,
    )
    .unwrap();
    let err = Transport::client_from_ca(&ca_file)
        .unwrap()
        .connect(&addr0, Duration::from_secs(5), None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    let pin1 = unfed_node::net::Pin::parse(&route[1].tls_pin).unwrap();
    let err = anonymous
        .connect(&addr0, Duration::from_secs(5), pin1)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("impersonation"), "{err:#}");

    // --- Heartbeat and Unregister: only the node itself.
    let node0 = route[0].node_id.clone();
    let mut reg = RegistryClient::new(common::net::channel(&net.registry.address).await);
    let forged = CallProof::sign(
        &unfed_node::shares::generate_key(),
        unfed_node::registry::HEARTBEAT,
        &node0,
    );
    for proof in [CallProof::default(), forged.clone()] {
        let err = reg
            .heartbeat(HeartbeatRequest {
                node_id: node0.clone(),
                timestamp: proof.timestamp,
                nonce: proof.nonce.clone(),
                signature: proof.signature.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    }
    let forged = CallProof::sign(
        &unfed_node::shares::generate_key(),
        unfed_node::registry::UNREGISTER,
        &node0,
    );
    let err = reg
        .unregister(UnregisterRequest {
            node_id: node0.clone(),
            timestamp: forged.timestamp,
            nonce: forged.nonce,
            signature: forged.signature,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    // Another registered node's certificate is not node 0's either.
    let mut reg1 = RegistryClient::new(
        as1.connect(&net.registry.address, Duration::from_secs(5), None)
            .await
            .unwrap(),
    );
    let err = reg1
        .unregister(UnregisterRequest {
            node_id: node0.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let listed = reg
        .discover(DiscoverRequest {
            model: "tiny".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(
        listed.iter().any(|n| n.node_id == node0),
        "node 0 was removed"
    );
    // Node 0's own certificate may heartbeat for it.
    let mut reg0 = RegistryClient::new(
        as0.connect(&net.registry.address, Duration::from_secs(5), None)
            .await
            .unwrap(),
    );
    let beat = reg0
        .heartbeat(HeartbeatRequest {
            node_id: node0.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(beat.known);

    // --- A session: opened by its owner; a step 0 never replaces it; only the owner ends it.
    let owner = unfed_node::shares::generate_key();
    let mut entry = compute_as(&anonymous, &addr0).await;
    let first = entry
        .forward(step0("s-1", &route, &owner))
        .await
        .unwrap()
        .into_inner();
    let err = entry
        .forward(step0("s-1", &route, &unfed_node::shares::generate_key()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("is live"), "{}", err.message());
    let not_owner = unfed_node::shares::generate_key();
    for sig in [
        Vec::new(),
        unfed_node::compute::sign_end_session(&not_owner, "s-1"),
        unfed_node::compute::sign_end_session(&owner, "s-2"),
    ] {
        let err = entry
            .end_session(end("s-1", &route, sig))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    }
    let second = entry
        .forward(next_step("s-1", &route, 1, first.token_id))
        .await
        .expect("the session survives refused EndSessions")
        .into_inner();
    entry
        .end_session(end(
            "s-1",
            &route,
            unfed_node::compute::sign_end_session(&owner, "s-1"),
        ))
        .await
        .unwrap();
    let err = entry
        .forward(next_step("s-1", &route, 2, second.token_id))
        .await
        .unwrap_err();
    assert!(err.message().contains("unknown"), "{}", err.message());

    // --- SessionInputs and Reexecute: only a neighbouring shard's node (or the registry).
    let inputs = SessionInputsRequest {
        session_id: "s-1".into(),
        up_to_step: 0,
    };
    let reexec = ReexecuteRequest {
        model_id: "tiny".into(),
        inputs: vec![StepInput {
            input: Some(step_input::Input::Tokens(TokenIds { ids: vec![1, 2, 3] })),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = compute_as(&anonymous, &addr0)
        .await
        .session_inputs(inputs.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    for (who, what) in [
        (&stranger, "a stranger"),
        (&as0, "node 0 itself (same shard)"),
    ] {
        let mut c = compute_as(who, &addr0).await;
        let err = c.session_inputs(inputs.clone()).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{what}: {}",
            err.message()
        );
        let err = c.reexecute(reexec.clone()).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{what}: {}",
            err.message()
        );
    }
    let mut neighbour = compute_as(&as1, &addr0).await;
    let served = neighbour.session_inputs(inputs).await.unwrap().into_inner();
    assert_eq!(
        served.inputs[0].input,
        Some(step_input::Input::Tokens(TokenIds {
            ids: PROMPT.to_vec()
        })),
        "the neighbour gets the session's inputs (kept a while after it ended)"
    );
    let out = neighbour.reexecute(reexec).await.unwrap().into_inner();
    assert!(out.attestation.is_some());

    // --- PutShare: no registered MPC party of this model signed it.
    let mut share = ComputeClient::new(common::net::channel(&net.computes[c1].address).await);
    let err = share
        .put_share(PutShareRequest {
            model_id: "tiny".into(),
            session_id: "x".into(),
            party: "A".into(),
            shape: vec![1, 8],
            data: vec![0; 8],
            attestation: Some(Attestation {
                node_id: node0.clone(),
                model_id: "tiny".into(),
                session_id: "x".into(),
                signature: owner.sign(b"anything").to_bytes().to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());

    // The real client, through the pinned route, is served throughout.
    let out = client
        .generate("tiny", &PROMPT, &GenerateOptions::default(), |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", net.logs()));
    assert!(!out.tokens.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn party_b_takes_only_the_registered_party_a() {
    let (dir, split) = Net::prepare_tiny(1);
    let net = Net::registry(dir);
    let (_a, b) = common::net::start_pair(
        &split,
        Some(&net.registry.address),
        &["--full-output"],
        net.dir.path(),
    );
    let mut reg = RegistryClient::new(common::net::channel(&net.registry.address).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = reg
            .discover(DiscoverRequest::default())
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if ["mpc_a", "mpc_b"]
            .iter()
            .all(|r| nodes.iter().any(|n| n.role == *r))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pair never registered"
        );
        tokio::time::sleep(Duration::from_millis(25)).await; // poll again until the deadline
    }
    let hello = |from: &str| MpcMessage {
        session: "s".into(),
        kind: "hello".into(),
        from: from.into(),
        shape: vec![0],
        ..Default::default()
    };
    for (who, code) in [
        (common::net::transport(), Code::Unauthenticated),
        (common::net::identity("stranger"), Code::PermissionDenied),
    ] {
        let ch = who
            .connect(&b.address, Duration::from_secs(5), None)
            .await
            .unwrap();
        let err = MpcClient::new(ch)
            .link(futures::stream::iter([hello("A")]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
    }
    // A client's hello (anyone may open a session) is taken.
    let ch = common::net::channel(&b.address).await;
    MpcClient::new(ch)
        .link(futures::stream::iter([hello("client")]))
        .await
        .expect("a client's hello is accepted");
}
