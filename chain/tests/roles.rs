//! One key per duty, from the attacker's side on a real Anvil: once the admin hands
//! out the settler and slasher roles, each key is refused outside its duty (the call
//! reverts and the escrow's state is unchanged) and still does its own.

mod common;

use alloy::primitives::{Address, B256, U256};
use common::*;
use unfed_chain::escrow::send;
use unfed_chain::{Chain, Roles};

struct Duties {
    n: Net,
    settler: Chain,
    slasher: Chain,
    /// The faucet is only a funded token wallet: it holds no role at all.
    faucet: Chain,
    client: Chain,
    node: Chain,
}

async fn duties() -> Duties {
    let n = net().await;
    let settler = n.wallet(7, "0").await;
    let slasher = n.wallet(8, "0").await;
    let faucet = n.wallet(9, "1000").await;
    n.operator
        .assign_roles(&n.d, settler.address(), slasher.address())
        .await
        .unwrap();
    let client = n.wallet(2, "500").await;
    client.deposit(&n.d, tokens("500")).await.unwrap();
    let node = n.wallet(1, "200").await;
    node.stake(&n.d, tokens("200")).await.unwrap();
    Duties {
        n,
        settler,
        slasher,
        faucet,
        client,
        node,
    }
}

/// What a key acting outside its duty could change.
#[derive(Debug, PartialEq)]
struct Snapshot {
    roles: Roles,
    min_stake: U256,
    client_balance: U256,
    stake: U256,
    settlement_posted_at: u64,
}

impl Duties {
    async fn snapshot(&self, h: B256) -> Snapshot {
        let c = &self.n.operator;
        Snapshot {
            roles: c.roles(&self.n.d).await.unwrap(),
            min_stake: c.min_stake(&self.n.d).await.unwrap(),
            client_balance: c
                .client_balance(&self.n.d, self.client.address())
                .await
                .unwrap(),
            stake: c
                .stake_info(&self.n.d, self.node.address())
                .await
                .unwrap()
                .active,
            settlement_posted_at: c.settlement(&self.n.d, h).await.unwrap().posted_at,
        }
    }

    /// Every call `who` must not make unless it holds that duty.
    async fn assert_refused_outside(&self, who: &Chain, duty: &str) {
        let d = &self.n.d;
        let h = B256::repeat_byte(0xee);
        let before = self.snapshot(h).await;
        let e = who.escrow(d);
        let (client, node) = (self.client.address(), self.node.address());
        if duty != "settler" {
            assert_reverts(
                who.post_settlement(d, h, client, vec![who.address()], vec![tokens("500")])
                    .await,
                "UnfedEscrow: caller is not the settler",
            );
        }
        if duty != "slasher" {
            assert_reverts(
                who.slash(d, node, "framed").await,
                "UnfedEscrow: caller is not the slasher",
            );
        }
        if duty != "admin" {
            let not_admin = "UnfedEscrow: caller is not the admin";
            assert_reverts(
                send("setSettler", e.setSettler(who.address())).await,
                not_admin,
            );
            assert_reverts(
                send("setSlasher", e.setSlasher(who.address())).await,
                not_admin,
            );
            assert_reverts(
                send("transferAdmin", e.transferAdmin(who.address())).await,
                not_admin,
            );
            assert_reverts(
                send("setMinStake", e.setMinStake(U256::ZERO)).await,
                not_admin,
            );
        }
        assert_eq!(
            self.snapshot(h).await,
            before,
            "{duty} key changed the escrow"
        );
    }
}

#[tokio::test]
async fn each_key_is_refused_outside_its_duty() {
    let t = duties().await;
    let roles = t.n.operator.roles(&t.n.d).await.unwrap();
    assert_eq!(
        roles,
        Roles {
            admin: t.n.operator.address(),
            settler: t.settler.address(),
            slasher: t.slasher.address(),
        }
    );
    t.assert_refused_outside(&t.n.operator, "admin").await;
    t.assert_refused_outside(&t.settler, "settler").await;
    t.assert_refused_outside(&t.slasher, "slasher").await;
    t.assert_refused_outside(&t.faucet, "faucet").await;
    t.assert_refused_outside(&t.client, "client").await;
    t.assert_refused_outside(&t.node, "node").await;
}

#[tokio::test]
async fn each_key_does_its_own_duty() {
    let t = duties().await;
    let d = &t.n.d;
    let h = B256::repeat_byte(1);
    t.settler
        .post_settlement(
            d,
            h,
            t.client.address(),
            vec![t.node.address()],
            vec![tokens("5")],
        )
        .await
        .unwrap();
    t.settler.challenge_settlement(d, h).await.unwrap();
    assert!(t.n.operator.settlement(d, h).await.unwrap().challenged);
    t.slasher
        .slash(d, t.node.address(), "bad logits")
        .await
        .unwrap();
    assert_eq!(
        t.n.operator
            .stake_info(d, t.node.address())
            .await
            .unwrap()
            .active,
        tokens("100")
    );
    // The admin can move a duty to a new key; the old key loses it.
    let e = t.n.operator.escrow(d);
    send("setSettler", e.setSettler(Address::repeat_byte(0x11)))
        .await
        .unwrap();
    assert_reverts(
        t.settler
            .post_settlement(
                d,
                B256::repeat_byte(2),
                t.client.address(),
                vec![t.node.address()],
                vec![tokens("1")],
            )
            .await,
        "UnfedEscrow: caller is not the settler",
    );
    assert_reverts(
        send("setSlasher", e.setSlasher(Address::ZERO)).await,
        "UnfedEscrow: slasher is the zero address",
    );
}
