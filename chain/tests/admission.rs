//! Signed admission against a real Anvil and escrow: a staked node is admitted; an
//! unstaked or under-staked wallet is refused with its own reason; eligibility follows
//! requestUnstake and re-staking (what the registry's periodic re-check reads).

mod common;

use std::time::Duration;

use common::*;
use unfed_chain::{
    AdmissionVerifier, Chain, RegistrationPayload, RejectReason, dev_signer, sign_registration,
};

fn registration(node: &Chain, shard: i64) -> RegistrationPayload {
    RegistrationPayload::new_now(
        // Lower case on purpose: ids are compared case-insensitively.
        node.address().to_string().to_lowercase(),
        "compute",
        "127.0.0.1:50051",
        "builtin:tiny",
        shard,
        "11".repeat(32),
    )
}

async fn admit(
    v: &AdmissionVerifier,
    i: u32,
    p: &RegistrationPayload,
) -> Result<(), unfed_chain::Rejection> {
    let sig = sign_registration(&dev_signer(i).unwrap(), p).unwrap();
    v.admit(p, &sig).await
}

#[tokio::test]
async fn staked_node_is_admitted_and_others_are_refused_with_distinct_reasons() {
    let n = net().await; // min stake 100
    let v =
        AdmissionVerifier::new(&n.anvil.endpoint(), n.d.escrow, Duration::from_secs(60)).unwrap();

    let staked = n.wallet(1, "200").await;
    staked.stake(&n.d, tokens("200")).await.unwrap();
    let p = registration(&staked, 0);
    admit(&v, 1, &p).await.expect("staked node admitted");
    assert!(v.is_eligible(&p.node_id).await.unwrap());

    // Replaying the very same signed registration is refused.
    let err = admit(&v, 1, &p).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::ReplayedNonce, "{err}");

    // Someone else's signature over a payload claiming the staked node id.
    let err = admit(&v, 7, &registration(&staked, 0)).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::WrongSigner, "{err}");

    let mut stale = registration(&staked, 0);
    stale.timestamp -= 120;
    let err = admit(&v, 1, &stale).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::StaleTimestamp, "{err}");

    let unstaked = n.wallet(2, "200").await;
    let err = admit(&v, 2, &registration(&unstaked, 1)).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::NotStaked, "{err}");
    assert!(
        err.message.contains("has no stake") && err.message.contains("100"),
        "{err}"
    );

    let under = n.wallet(3, "200").await;
    under.stake(&n.d, tokens("99.5")).await.unwrap();
    let err = admit(&v, 3, &registration(&under, 1)).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::UnderStaked, "{err}");
    assert!(err.message.contains("99.5"), "{err}");
    assert!(!v.is_eligible(&under.address().to_string()).await.unwrap());
}

#[tokio::test]
async fn eligibility_follows_unstake_and_restake() {
    let n = net().await;
    let v =
        AdmissionVerifier::new(&n.anvil.endpoint(), n.d.escrow, Duration::from_secs(60)).unwrap();
    let node = n.wallet(1, "200").await;
    let id = node.address().to_string();
    node.stake(&n.d, tokens("150")).await.unwrap();
    assert!(v.is_eligible(&id).await.unwrap());

    node.request_unstake(&n.d, tokens("100")).await.unwrap(); // 50 left < 100
    assert!(!v.is_eligible(&id).await.unwrap());
    let err = admit(&v, 1, &registration(&node, 0)).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::UnderStaked, "{err}");

    node.stake(&n.d, tokens("50")).await.unwrap(); // back to exactly min stake
    assert!(v.is_eligible(&id).await.unwrap());
    admit(&v, 1, &registration(&node, 0))
        .await
        .expect("re-staked node admitted");
}

#[tokio::test]
async fn chain_down_is_reported_as_unavailable() {
    let n = net().await;
    let url = n.anvil.endpoint();
    let escrow = n.d.escrow;
    let node = n.wallet(1, "200").await;
    let p = registration(&node, 0);
    drop(n); // stops anvil
    let v = AdmissionVerifier::new(&url, escrow, Duration::from_secs(60)).unwrap();
    let err = admit(&v, 1, &p).await.unwrap_err();
    assert_eq!(err.reason, RejectReason::ChainUnavailable, "{err}");
    assert!(v.is_eligible(&p.node_id).await.is_err());
}
