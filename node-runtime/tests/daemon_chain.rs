//! The share-chain daemon as a real process next to a real registry: every rejection
//! reason, blocks only when shares are pending, and `kill -9` mid-stream followed by a
//! restart on the same database (nothing lost, nothing counted twice, blocks chained).

mod common;
mod daemon_common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::net::Node;
use daemon_common::*;
use unfed_node::daemon::store::{Block, Store};
use unfed_node::shares;
use unfed_proto::daemon_client::DaemonClient;
use unfed_proto::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_reason_and_blocks_only_when_shares_are_pending() {
    let net = registry();
    let db = net.dir.path().join("chain.db");
    let args = daemon_args(
        &net,
        &db,
        "0",
        &[
            "--max-shares-per-session",
            "4",
            "--max-shares-per-window",
            "7",
            "--window-secs",
            "600",
        ],
    );
    let dnode = Node::start(&args, net.dir.path().join("daemon.log"));
    let mut d = daemon(&dnode.address).await;
    let mut a = Signer::register(&net.registry.address, "node-a").await;
    let b = Signer::register(&net.registry.address, "node-b").await;

    let first = a.next("s1");
    let r = one(&mut d, "node-a", first.clone()).await;
    assert!(
        r.accepted,
        "{r:?}\n{}",
        std::fs::read_to_string(&dnode.log).unwrap()
    );
    assert_eq!(r.share_hash, shares::share_hash(&first).to_vec());

    // Forged: node-b's key signs a share claiming to be node-a's.
    let mut forged = a.next("s1");
    b.resign(&mut forged);
    rejected(&one(&mut d, "node-a", forged).await, "bad_signature");
    a.prev
        .insert("s1".into(), (shares::share_hash(&first).to_vec(), 0));

    rejected(
        &one(&mut d, "node-b", a.next("s1")).await,
        "submitter_mismatch",
    );
    a.prev
        .insert("s1".into(), (shares::share_hash(&first).to_vec(), 0));

    let mut missing = a.next("s1");
    missing.activation_hash.clear();
    a.resign(&mut missing);
    rejected(&one(&mut d, "node-a", missing).await, "missing_field");

    let mut stale = a.next("s1");
    stale.timestamp_ms -= 7 * 3600 * 1000;
    a.resign(&mut stale);
    rejected(&one(&mut d, "node-a", stale).await, "timestamp_skew");
    let mut ahead = a.next("s1");
    ahead.timestamp_ms += 300_000;
    a.resign(&mut ahead);
    rejected(&one(&mut d, "node-a", ahead).await, "timestamp_skew");

    let mut ghost = Signer::unregistered("ghost");
    rejected(
        &one(&mut d, "ghost", ghost.next("s1")).await,
        "unknown_node",
    );

    rejected(&one(&mut d, "node-a", first.clone()).await, "replay");

    let mut anchor = a.next("s1");
    anchor.chain_tip = vec![9; 32];
    a.resign(&mut anchor);
    rejected(&one(&mut d, "node-a", anchor).await, "unknown_anchor");

    let mut unlinked = a.next("s1");
    unlinked.prev_share_hash = vec![7; 32];
    a.resign(&mut unlinked);
    rejected(&one(&mut d, "node-a", unlinked).await, "broken_prev_link");

    // Out of order: correctly linked to step 0 but claiming step 0 again.
    a.prev
        .insert("s1".into(), (shares::share_hash(&first).to_vec(), 0));
    let mut backwards = a.next("s1");
    backwards.step = 0;
    a.resign(&mut backwards);
    rejected(
        &one(&mut d, "node-a", backwards).await,
        "non_monotonic_step",
    );

    // Session cap 4: steps 1..3 accepted (4 shares), the 5th refused.
    a.prev
        .insert("s1".into(), (shares::share_hash(&first).to_vec(), 0));
    let batch: Vec<_> = (0..3).map(|_| a.next("s1")).collect();
    let rs = submit(&mut d, "node-a", batch).await;
    assert!(rs.iter().all(|r| r.accepted), "{rs:?}");
    rejected(&one(&mut d, "node-a", a.next("s1")).await, "session_cap");

    // Window cap 7 per node: 4 accepted so far, 3 more in a new session, then refused.
    let rs = submit(&mut d, "node-a", (0..3).map(|_| a.next("s2")).collect()).await;
    assert!(rs.iter().all(|r| r.accepted), "{rs:?}");
    rejected(&one(&mut d, "node-a", a.next("s2")).await, "window_cap");

    // All 7 accepted shares end up in blocks; then no more blocks without shares.
    let st = wait_status(&mut d, "every share in a block", |st| {
        st.shares == 7 && st.pending_shares == 0
    })
    .await;
    assert_eq!(st.nodes.len(), 1);
    assert_eq!(
        (
            st.nodes[0].shares,
            st.nodes[0].input_tokens,
            st.nodes[0].output_tokens
        ),
        (7, 10, 7)
    );
    let height = st.height;
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        let tip = d.get_tip(GetTipRequest {}).await.unwrap().into_inner();
        assert_eq!(
            tip.tip_height, height,
            "a block was produced with no shares pending"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll again until the deadline
    }
    // Anchoring to the real tip is accepted.
    let mut anchored = a.next("s3");
    anchored.chain_tip = st.tip_hash.clone();
    a.resign(&mut anchored);
    let b_share = {
        let mut b = b;
        b.next("s9")
    };
    let rs = submit(&mut d, "node-a", vec![anchored]).await;
    // node-a is at its window cap; the anchor check passes before the cap refuses it.
    rejected(&rs[0], "window_cap");
    assert!(one(&mut d, "node-b", b_share).await.accepted);
}

/// Checks the stored chain: contiguous heights, each block linked to its parent, each
/// hash and shares root recomputed from the stored shares.
fn verify_chain(store: &Store) -> Vec<Block> {
    let blocks = store.blocks().unwrap();
    let mut prev = shares::GENESIS;
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(b.height, i as u64 + 1, "heights are contiguous");
        assert_eq!(b.prev_hash, prev, "block {} links to its parent", b.height);
        let hashes = store.block_share_hashes(b.height).unwrap();
        assert_eq!(hashes.len() as u64, b.share_count);
        assert!(!hashes.is_empty(), "block {} is empty", b.height);
        use sha2::Digest;
        let mut root = sha2::Sha256::new();
        for h in &hashes {
            root.update(h);
        }
        assert_eq!(<[u8; 32]>::from(root.finalize()), b.shares_root);
        assert_eq!(
            Block::compute_hash(
                b.height,
                &b.prev_hash,
                &b.shares_root,
                b.share_count,
                b.timestamp_ms
            ),
            b.hash
        );
        prev = b.hash;
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_nothing_and_counts_nothing_twice() {
    let net = registry();
    let db = net.dir.path().join("chain.db");
    let mut dnode = Node::start(
        &daemon_args(&net, &db, "0", &[]),
        net.dir.path().join("daemon.log"),
    );
    let port = dnode.port();
    let addr = dnode.address.clone();
    let mut signers = [
        Signer::register(&net.registry.address, "node-a").await,
        Signer::register(&net.registry.address, "node-b").await,
    ];
    // Two streams of batches; the daemon is killed while they run, restarted on the
    // same port and db, and every batch is retried until the daemon answers it.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let submitter = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut delivered: HashSet<Vec<u8>> = HashSet::new();
            let mut accepted_count = 0usize;
            let mut replays = 0usize;
            let mut failures = 0usize;
            for round in 0..60 {
                for sg in signers.iter_mut() {
                    let session = format!("sess-{}", round % 3);
                    let batch: Vec<_> = (0..5).map(|_| sg.next(&session)).collect();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    let results = loop {
                        let attempt = async {
                            let mut d =
                                DaemonClient::new(crate::common::net::try_channel(&addr).await?);
                            let r = d
                                .submit_shares(SubmitSharesRequest {
                                    submitter: sg.node.clone(),
                                    shares: batch.clone(),
                                    vouchers: vouchers_of(&batch),
                                })
                                .await?;
                            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                                r.into_inner().results,
                            )
                        };
                        match attempt.await {
                            Ok(r) => break r,
                            Err(_) => {
                                failures += 1;
                                assert!(Instant::now() < deadline, "daemon never came back");
                                tokio::time::sleep(Duration::from_millis(20)).await; // poll again until the deadline
                            }
                        }
                    };
                    for r in results {
                        // A replay on retry means the first attempt was committed before the kill.
                        assert!(r.accepted || r.reason == "replay", "{r:?}");
                        accepted_count += r.accepted as usize;
                        replays += (r.reason == "replay") as usize;
                        assert!(delivered.insert(r.share_hash), "share answered twice");
                    }
                }
                if round == 20 {
                    let _ = tx.send(()).await;
                }
            }
            assert!(failures > 0, "the kill never interrupted the stream");
            (delivered, accepted_count, replays)
        })
    };
    rx.recv().await.unwrap();
    dnode.kill(); // SIGKILL: no shutdown path runs.
    let log2 = net.dir.path().join("daemon2.log");
    let dnode2 = Node::start(&daemon_args(&net, &db, &port, &[]), log2);
    let (delivered, accepted, replays) = submitter.await.unwrap();
    assert_eq!(delivered.len(), 60 * 2 * 5);
    assert_eq!(accepted + replays, delivered.len());
    let mut d = daemon(&dnode2.address).await;
    let st = wait_status(&mut d, "every share in a block", |st| {
        st.pending_shares == 0 && st.shares as usize == delivered.len()
    })
    .await;
    assert_eq!(
        st.nodes.iter().map(|n| n.shares).sum::<u64>() as usize,
        delivered.len()
    );
    drop(d);
    let mut dnode2 = dnode2;
    assert!(dnode2.terminate().success());
    let store = Store::open(&db).unwrap();
    let blocks = verify_chain(&store);
    assert_eq!(
        blocks.iter().map(|b| b.share_count).sum::<u64>() as usize,
        delivered.len()
    );
    let mut stored = HashSet::new();
    for b in &blocks {
        for h in store.block_share_hashes(b.height).unwrap() {
            assert!(stored.insert(h.to_vec()), "share stored twice");
        }
    }
    assert_eq!(stored, delivered);
    eprintln!(
        "{} blocks, {} shares, {replays} replays answered after the restart",
        blocks.len(),
        stored.len()
    );
}
