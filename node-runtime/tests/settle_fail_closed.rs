//! Fraud handling and unpayable settlements fail closed, on a real Anvil with the
//! compiled escrow and a real share db: a settlement naming an excluded node pays its
//! honest nodes (re-formed before posting, or challenged and re-posted after), never
//! the cheater; a settlement the deposit cannot cover is parked without sending a
//! transaction and posted once the deposit grows; the registry keeps its exclusions
//! across a restart.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::net::Node;
use unfed_chain::{Address, Chain, Deployment, U256, dev_signer, parse_amount};
use unfed_node::daemon::store::Settlement;
use unfed_node::daemon::{Settler, Store};

struct Setup {
    _anvil: unfed_chain::Anvil,
    _dir: tempfile::TempDir,
    operator: Chain,
    d: Deployment,
    store: Arc<Mutex<Store>>,
    settler: Settler,
    client: Chain,
    honest: Address,
    cheater: Address,
}

/// Challenge window of the escrow in these tests (seconds of chain time).
const WINDOW: u64 = 3;

async fn setup(deposit: &str) -> Setup {
    let (anvil, operator, d) = common::net::anvil_with_escrow(WINDOW).await;
    let client = operator.as_wallet(dev_signer(1).unwrap()).unwrap();
    operator
        .fund(
            &d,
            client.address(),
            parse_amount("1000").unwrap(),
            U256::ZERO,
        )
        .await
        .unwrap();
    client
        .deposit(&d, parse_amount(deposit).unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Mutex::new(
        Store::open(&dir.path().join("chain.db")).unwrap(),
    ));
    let settler = Settler {
        chain: operator.clone(),
        deployment: d,
    };
    Setup {
        _anvil: anvil,
        _dir: dir,
        operator,
        d,
        store,
        settler,
        client,
        honest: dev_signer(2).unwrap().address(),
        cheater: dev_signer(3).unwrap().address(),
    }
}

impl Setup {
    /// Records one settlement of `client` paying (node, tokens) pairs.
    fn record(&self, tag: u8, to_height: u64, pay: &[(Address, &str)]) -> [u8; 32] {
        let amounts: Vec<U256> = pay.iter().map(|(_, a)| parse_amount(a).unwrap()).collect();
        let row = Settlement {
            hash: [tag; 32],
            from_height: to_height,
            to_height,
            client: self.client.address().to_string(),
            total: amounts.iter().copied().sum::<U256>().to_string(),
            nodes: pay.iter().map(|(n, _)| n.to_string()).collect(),
            amounts: amounts.iter().map(U256::to_string).collect(),
            status: "pending".into(),
            attempts: 0,
            last_error: String::new(),
            next_attempt_ms: 0,
            posted_at: 0,
        };
        self.store
            .lock()
            .unwrap()
            .record_settlements(to_height, &[row])
            .unwrap();
        [tag; 32]
    }

    fn row(&self, hash: &[u8; 32]) -> Settlement {
        self.rows().into_iter().find(|s| &s.hash == hash).unwrap()
    }

    fn rows(&self) -> Vec<Settlement> {
        self.store.lock().unwrap().settlements().unwrap()
    }

    /// Ticks the settler until `done` holds (the window passes in wall time: Anvil
    /// stamps blocks with the clock).
    async fn tick_until(
        &self,
        cheaters: &BTreeSet<String>,
        what: &str,
        done: impl Fn(&Setup) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.settler
                .tick(&self.store, WINDOW, cheaters)
                .await
                .unwrap();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:#?}",
                self.rows()
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // poll again until the deadline
        }
    }

    async fn earnings(&self, who: Address) -> U256 {
        self.operator.earnings(&self.d, who).await.unwrap()
    }
}

fn finalized_honest_part(s: &Setup, of: &[u8; 32]) -> bool {
    s.rows()
        .iter()
        .any(|r| r.status == "finalized" && r.from_height == s.row(of).from_height && &r.hash != of)
}

#[tokio::test]
async fn a_settlement_naming_an_excluded_node_pays_only_the_honest_ones() {
    let s = setup("100").await;
    let cheaters = BTreeSet::from([s.cheater.to_string()]);
    // Not yet posted when the verdict is known: withheld, the honest part settled anew.
    let before_post = s.record(1, 2, &[(s.honest, "12"), (s.cheater, "30")]);
    s.tick_until(&cheaters, "the honest part to finalize", |s| {
        finalized_honest_part(s, &before_post)
    })
    .await;
    assert_eq!(s.row(&before_post).status, "withheld");
    assert_eq!(s.earnings(s.honest).await, parse_amount("12").unwrap());
    assert_eq!(s.earnings(s.cheater).await, U256::ZERO);

    // Posted before the verdict: challenged (the client refunded), then re-posted
    // without the cheater.
    let posted = s.record(2, 4, &[(s.honest, "5"), (s.cheater, "7")]);
    s.settler
        .tick(&s.store, WINDOW, &BTreeSet::new())
        .await
        .unwrap();
    assert_eq!(s.row(&posted).status, "posted");
    s.tick_until(&cheaters, "the re-posted honest part to finalize", |s| {
        finalized_honest_part(s, &posted)
    })
    .await;
    assert_eq!(s.row(&posted).status, "challenged");
    assert!(
        s.operator
            .settlement(&s.d, posted.into())
            .await
            .unwrap()
            .challenged
    );
    assert_eq!(s.earnings(s.honest).await, parse_amount("17").unwrap());
    assert_eq!(s.earnings(s.cheater).await, U256::ZERO);
    assert_eq!(
        s.operator
            .client_balance(&s.d, s.client.address())
            .await
            .unwrap(),
        parse_amount("83").unwrap(),
        "the client pays exactly the honest work"
    );
}

#[tokio::test]
async fn a_settlement_the_deposit_cannot_cover_is_parked_not_retried() {
    let s = setup("10").await;
    let none = BTreeSet::new();
    let big = s.record(1, 2, &[(s.honest, "25")]);
    // Any transaction would cost the settler gas.
    let settler_eth = || s.operator.eth_balance(s.operator.address());
    let eth = settler_eth().await.unwrap();
    for _ in 0..3 {
        s.settler.tick(&s.store, WINDOW, &none).await.unwrap();
    }
    let row = s.row(&big);
    assert_eq!(row.status, "underfunded");
    assert!(
        row.last_error.contains("posted once the deposit covers it"),
        "{row:?}"
    );
    assert_eq!(row.attempts, 0, "parking is not a failure");
    assert_eq!(settler_eth().await.unwrap(), eth, "no transaction was sent");

    s.client
        .deposit(&s.d, parse_amount("20").unwrap())
        .await
        .unwrap();
    s.tick_until(&none, "the covered settlement to finalize", |s| {
        s.row(&big).status == "finalized"
    })
    .await;
    assert_eq!(s.earnings(s.honest).await, parse_amount("25").unwrap());
}

#[tokio::test]
async fn a_restarted_registry_keeps_excluding_a_convicted_node() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("registry-state.db");
    // What the registry's first run wrote when it found the node guilty.
    unfed_node::exclusions::ExclusionStore::open(&state)
        .unwrap()
        .exclude(
            "0x00000000000000000000000000000000000000c4",
            "skipped layers",
            1,
        )
        .unwrap();
    let args: Vec<String> = ["registry", "--port", "0", "--state-db"]
        .into_iter()
        .map(String::from)
        .chain([state.display().to_string()])
        .collect();
    let registry = Node::start(&args, dir.path().join("registry.log"));
    let mut c = unfed_proto::registry_client::RegistryClient::new(
        common::net::channel(&registry.address).await,
    );
    let v = c
        .list_verdicts(unfed_proto::ListVerdictsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v.excluded,
        vec!["0x00000000000000000000000000000000000000c4"]
    );
}
