//! Verified compute on real processes and a real Anvil: hops attest what they computed,
//! neighbours spot-check them by re-execution on an independent replica, the registry
//! re-executes before it rules, excludes the cheater and slashes its stake on-chain.

mod common;
mod daemon_common;

use daemon_common::{daemon, wait_status};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::net::{Net, Node, s, split_into};
use unfed_chain::{Anvil, Chain, Deployment, U256, dev_signer, parse_amount};
use unfed_node::client::GenerateOptions;
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::{ListVerdictsRequest, ListVerdictsResponse};

/// Anvil's last funded dev wallet, never staked: the daemon's settler key.
const SETTLER_WALLET: u32 = 9;

/// A staked testnet: Anvil with the escrow, a registry that slashes as the operator,
/// and a staked wallet per compute node (dev keys 2, 3, ...).
struct Staked {
    _anvil: Anvil,
    chain: Chain,
    d: Deployment,
    net: Net,
    next_wallet: u32,
    /// The share-chain daemon (settles with the dev client's deposit), when started.
    daemon: Option<Node>,
    /// The dev client, signing the chats' vouchers once the daemon runs.
    payer: Option<unfed_node::voucher::Payer>,
}

impl Staked {
    async fn start(fixture: &str, shards: usize) -> Staked {
        let tmp = Net::prepare();
        split_into(
            &common::fixtures_root().join(fixture),
            &tmp.path().join("splits"),
            "m",
            shards,
        );
        // A challenge window long enough that a settlement paying the cheater is still
        // open when the verdict lands.
        let (anvil, chain, d) = common::net::anvil_with_escrow(120).await;
        let op_key = tmp.path().join("operator.key");
        unfed_chain::write_key_file(&op_key, &dev_signer(0).unwrap()).unwrap();
        let args = vec![
            s("registry"),
            s("--port"),
            s("0"),
            s("--heartbeat-secs"),
            s("1"),
            s("--shards-dir"),
            tmp.path().join("splits").display().to_string(),
            s("--chain-rpc"),
            anvil.endpoint(),
            s("--escrow"),
            d.escrow.to_string(),
            s("--operator-key-file"),
            op_key.display().to_string(),
            s("--dispute-stage"),
            s("enforced"),
        ];
        let registry = Node::start(&args, tmp.path().join("registry.log"));
        let net = Net {
            dir: tmp,
            registry,
            computes: Vec::new(),
            tls: true,
        };
        Staked {
            _anvil: anvil,
            chain,
            d,
            net,
            next_wallet: 2,
            daemon: None,
            payer: None,
        }
    }

    /// A staked wallet `dev_signer(i)` with its key file.
    async fn wallet(&mut self) -> (unfed_chain::PrivateKeySigner, PathBuf) {
        let i = self.next_wallet;
        self.next_wallet += 1;
        let w = dev_signer(i).unwrap();
        let stake = parse_amount("200").unwrap();
        self.chain
            .fund(&self.d, w.address(), stake, parse_amount("1").unwrap())
            .await
            .unwrap();
        self.chain
            .as_wallet(w.clone())
            .unwrap()
            .stake(&self.d, stake)
            .await
            .unwrap();
        let key: PathBuf = self.net.dir.path().join(format!("w{i}.key"));
        unfed_chain::write_key_file(&key, &w).unwrap();
        (w, key)
    }

    /// Starts a daemon that settles every block from the dev client's deposit.
    async fn start_daemon(&mut self) {
        let client = dev_signer(1).unwrap();
        let deposit = parse_amount("1000").unwrap();
        self.chain
            .fund(
                &self.d,
                client.address(),
                deposit,
                parse_amount("1").unwrap(),
            )
            .await
            .unwrap();
        self.chain
            .as_wallet(client.clone())
            .unwrap()
            .deposit(&self.d, deposit)
            .await
            .unwrap();
        let (w, key) = self.wallet().await;
        let dir = self.net.dir.path();
        // The daemon settles with its own key, as under `unfedctl up`: sharing the
        // registry's slasher key, its settlements raced the slash for the wallet's nonce.
        let settler = dev_signer(SETTLER_WALLET).unwrap();
        self.chain
            .assign_roles(&self.d, settler.address(), self.chain.address())
            .await
            .unwrap();
        let op_key = dir.join("settler.key");
        unfed_chain::write_key_file(&op_key, &settler).unwrap();
        let args: Vec<String> = [
            "daemon",
            "--port",
            "0",
            "--registry",
            &self.net.registry.address,
            "--eth-address",
            &w.address().to_string(),
            "--db",
            &dir.join("chain.db").display().to_string(),
            "--block-interval-secs",
            "0.2",
            "--settlement-blocks",
            "1",
            "--settle-poll-secs",
            "0.2",
            "--heartbeat-secs",
            "1",
            "--chain-rpc",
            self.chain.rpc_url(),
            "--escrow",
            &self.d.escrow.to_string(),
            "--operator-key-file",
            &op_key.display().to_string(),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        self.payer = Some(unfed_node::voucher::Payer::wallet(client));
        self.daemon = Some(Node::start_with_env(
            &args,
            dir.join("daemon.log"),
            &[(unfed_chain::STAKE_KEY_FILE_ENV, key.as_path())],
        ));
        self.net.wait_daemon_listed().await;
    }

    /// Stakes a fresh wallet and starts a compute node for `shard` on it.
    async fn compute(&mut self, shard: usize, extra: &[&str]) -> String {
        let (w, key) = self.wallet().await;
        let i = self.next_wallet - 1;
        let mut a = self.net.compute_args("m", shard, "0");
        a.extend([
            s("--eth-address"),
            w.address().to_string(),
            s("--spot-check"),
            s("1"),
        ]);
        a.extend(extra.iter().map(|x| x.to_string()));
        if extra.contains(&"--cheat") {
            a.extend([s("--chain-rpc"), self.chain.rpc_url().to_string()]);
        }
        let log = self
            .net
            .dir
            .path()
            .join(format!("compute-{shard}-w{i}.log"));
        self.net.computes.push(Node::start_with_env(
            &a,
            log,
            &[(unfed_chain::STAKE_KEY_FILE_ENV, key.as_path())],
        ));
        w.address().to_string()
    }

    async fn stake(&self, node: &str) -> U256 {
        let info = self
            .chain
            .stake_info(&self.d, node.parse().unwrap())
            .await
            .unwrap();
        info.active + info.cooling
    }

    async fn verdicts(&self) -> ListVerdictsResponse {
        let mut c =
            RegistryClient::new(crate::common::net::channel(&self.net.registry.address).await);
        c.list_verdicts(ListVerdictsRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Chats until `done` holds for the registry's verdicts (or the deadline passes);
    /// returns the chats' results.
    async fn chat_until(
        &self,
        what: &str,
        done: impl Fn(&ListVerdictsResponse) -> bool,
    ) -> Vec<anyhow::Result<unfed_node::client::GenerateOutput>> {
        let mut client = self.net.client().await;
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut results = Vec::new();
        loop {
            let v = self.verdicts().await;
            if done(&v) {
                return results;
            }
            assert!(
                Instant::now() < deadline,
                "never: {what}; verdicts {v:?}\n{}",
                self.net.logs()
            );
            let out = client
                .generate(
                    "m",
                    &[3, 1, 4, 1, 5, 9, 2, 6],
                    &GenerateOptions {
                        max_tokens: 4,
                        stop_on_eos: false,
                        payer: self.payer.clone(),
                        ..Default::default()
                    },
                    |_| {},
                )
                .await;
            results.push(out);
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval inside the deadline
        }
    }
}

/// One cheating replica beside an honest one: the cheater is caught, slashed on-chain
/// and excluded from discovery; honest nodes keep their stake and stay listed.
async fn cheater_is_slashed(
    mode: &str,
    cheat_shard: usize,
) -> Vec<anyhow::Result<unfed_node::client::GenerateOutput>> {
    let mut t = Staked::start("qwen2-f32", 2).await;
    let other = 1 - cheat_shard;
    t.start_daemon().await;
    let cheater = t.compute(cheat_shard, &["--cheat", mode]).await;
    let honest_twin = t.compute(cheat_shard, &[]).await;
    let honest_other = t.compute(other, &[]).await;
    t.net.wait_ready("m", 3).await;
    let before = t.stake(&cheater).await;
    let chats = t
        .chat_until("the cheater is excluded", |v| v.excluded.contains(&cheater))
        .await;
    assert!(!chats.is_empty(), "detected without a request?");
    let v = t.verdicts().await;
    let guilty: Vec<_> = v.verdicts.iter().filter(|x| x.guilty).collect();
    assert_eq!(guilty.len(), 1, "{v:?}");
    assert_eq!(guilty[0].accused, cheater);
    assert_eq!(guilty[0].stage, "enforced");
    assert!(
        v.verdicts.iter().all(|x| x.accused == cheater),
        "honest node accused: {v:?}"
    );
    let after = t.stake(&cheater).await;
    assert!(after < before, "stake {before} -> {after}");
    assert_eq!(guilty[0].slashed, (before - after).to_string());
    for honest in [&honest_twin, &honest_other] {
        assert_eq!(
            t.stake(honest).await,
            parse_amount("200").unwrap(),
            "{honest} lost stake"
        );
    }
    let mut c = RegistryClient::new(crate::common::net::channel(&t.net.registry.address).await);
    let listed: Vec<String> = c
        .discover(unfed_proto::DiscoverRequest { model: s("m") })
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert!(!listed.contains(&cheater), "{listed:?}");
    assert!(
        listed.contains(&honest_twin) && listed.contains(&honest_other),
        "{listed:?}"
    );
    // The network keeps answering through the honest replicas.
    let mut client = t.net.client().await;
    let out = client
        .generate("m", &[1, 2, 3], &GenerateOptions::default(), |_| {})
        .await;
    assert!(out.is_ok(), "after the exclusion: {out:?}");
    // The cheater is not paid: its shares were refused at intake (once excluded it is no
    // longer a registered node — under load its share batch can arrive after that), or
    // every settlement paying it is challenged (posted) or withheld.
    let mut d = daemon(&t.daemon.as_ref().unwrap().address).await;
    let pays = |x: &&unfed_proto::SettlementRecord| x.nodes.contains(&cheater);
    let st = wait_status(&mut d, "the cheater's settlement refused", |st| {
        let has_shares = st.nodes.iter().any(|n| n.node_id == cheater);
        let refused = st
            .settlements
            .iter()
            .filter(pays)
            .all(|x| x.status == "challenged" || x.status == "withheld");
        let settled = st.settlements.iter().filter(pays).count() > 0;
        st.pending_shares == 0 && refused && (settled || !has_shares)
    })
    .await;
    assert!(
        st.settlements
            .iter()
            .filter(pays)
            .all(|x| x.status == "challenged" || x.status == "withheld"),
        "{st:?}"
    );
    chats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_layers_is_detected_and_slashed() {
    cheater_is_slashed("skip-layers", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perturbed_activations_are_detected_and_slashed() {
    cheater_is_slashed("perturb", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_detected_and_slashed() {
    cheater_is_slashed("wrong-token", 1).await;
}

/// A forged attestation is refused by the next hop at once, naming the forger; the
/// client fails over to the forger's honest twin, so every chat is answered; the
/// registry probes the forger, slashes and excludes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_attestation_is_refused_then_slashed() {
    let chats = cheater_is_slashed("forge-attestation", 0).await;
    let refused: Vec<String> = chats
        .iter()
        .map(|c| {
            c.as_ref()
                .unwrap_or_else(|e| panic!("a chat failed: {e:#}"))
        })
        .flat_map(|o| o.failures.iter().cloned())
        .collect();
    assert!(
        refused
            .iter()
            .any(|m| m.contains("not signed by its registered share key")),
        "{refused:?}"
    );
}

/// No false positives: every hop spot-checked (sampling 1.0) on two replicas per shard,
/// across f32, f16 and bf16 checkpoints and wire dtypes, and not one report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_honest_hops_produce_no_reports() {
    use unfed_proto::DType;
    let mut hops = 0usize;
    let mut checks = 0usize;
    for (fixture, wire) in [
        ("qwen2-f32", DType::DtypeF32),
        ("qwen2-f16", DType::DtypeF16),
        ("qwen2-bf16", DType::DtypeBf16),
        ("llama-bf16", DType::DtypeBf16),
    ] {
        let tmp = Net::prepare();
        split_into(
            &common::fixtures_root().join(fixture),
            &tmp.path().join("splits"),
            "m",
            2,
        );
        let mut net = Net::registry(tmp);
        for shard in [0, 0, 1, 1] {
            let mut a = net.compute_args("m", shard, "0");
            a.extend([s("--spot-check"), s("1")]);
            let log = net
                .dir
                .path()
                .join(format!("compute-{shard}-{}.log", net.computes.len()));
            net.computes.push(Node::start(&a, log));
        }
        net.wait_ready("m", 4).await;
        let mut client = net.client().await;
        let opts = GenerateOptions {
            max_tokens: 16,
            stop_on_eos: false,
            hidden_dtype: wire,
            ..Default::default()
        };
        for i in 0..8u32 {
            let prompt: Vec<u32> = (0..5 + i).map(|k| (k * 37 + i) % 200 + 1).collect();
            let out = client.generate("m", &prompt, &opts, |_| {}).await.unwrap();
            hops += 2 * out.tokens.len();
        }
        // Every hop is checked in the background: wait for all of them to finish.
        let expected = 2 * 8 * 16;
        let deadline = Instant::now() + Duration::from_secs(60);
        let passed = loop {
            let logs = net.logs();
            let passed = logs.matches("spot check passed").count();
            assert!(
                !logs.contains("verdict"),
                "a report on honest nodes:\n{logs}"
            );
            if passed >= expected {
                break passed;
            }
            assert!(
                Instant::now() < deadline,
                "{passed}/{expected} spot checks passed\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await; // poll interval inside the deadline
        };
        checks += passed;
        let mut c = RegistryClient::new(crate::common::net::channel(&net.registry.address).await);
        let v = c
            .list_verdicts(ListVerdictsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(
            v.verdicts.is_empty() && v.excluded.is_empty(),
            "{fixture}: {v:?}"
        );
    }
    assert!(
        hops >= 1000 && checks >= 1000,
        "{hops} hops, {checks} checks"
    );
}

/// Reports that are not evidence are refused with a reason; a real one is ruled on by
/// re-execution (here: an accused that attested zeros as its layers' output).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_excess_reports_are_refused() {
    use unfed_node::verify::attest;
    use unfed_proto::*;
    let tmp = Net::prepare();
    let split = split_into(
        &common::fixtures_root().join("qwen2-f32"),
        &tmp.path().join("splits"),
        "m",
        2,
    );
    let net = Net::registry(tmp);
    let reg = net.registry.address.clone();
    let manifest: unfed_model::Manifest =
        serde_json::from_str(&std::fs::read_to_string(split.join("manifest.json")).unwrap())
            .unwrap();
    let end = manifest.text_shards().next().unwrap().layer_end as u32;
    let reporter = daemon_common::Signer::register_for(&reg, "reporter", end, 2)
        .await
        .key;
    let accused = daemon_common::Signer::register_for(&reg, "accused", end, 2)
        .await
        .key;
    let h = manifest.config.text.hidden_size;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    // The accused's signed claim for step 0 of a session: tokens in, zeros out.
    let report_for = |session: &str, key: &ed25519_dalek::SigningKey, who: &str| {
        let ids = vec![5u32, 6, 7];
        let input = StepInput {
            input: Some(step_input::Input::Tokens(TokenIds { ids: ids.clone() })),
            penalty_tokens: vec![],
            from_layer: None,
            mpc_shares: vec![],
        };
        let out = unfed_node::wire::encode(&vec![0.0; 3 * h], &[1, 3, h], DType::DtypeF32);
        let mut a = Attestation {
            node_id: "accused".into(),
            model_id: "m".into(),
            shard_index: 0,
            session_id: session.into(),
            step: 0,
            input_digest: attest::input_digest(&input),
            output_digest: attest::digest(&out.data),
            output_shape: out.shape.clone(),
            output_dtype: DType::DtypeF32 as i32,
            signature: vec![],
        };
        attest::sign(&accused, &mut a);
        let mut r = FraudReport {
            reporter: who.into(),
            accused: Some(a.clone()),
            inputs: vec![input],
            input_attestations: vec![a],
            sampling: None,
            output: Some(fraud_report::Output::Hidden(out)),
            timestamp: now(),
            signature: vec![],
            kind: String::new(),
        };
        attest::sign_report(key, &mut r);
        r
    };
    let mut c = RegistryClient::new(crate::common::net::channel(&reg).await);
    let mut send = async |r: FraudReport| c.report_fraud(r).await.unwrap().into_inner();

    let stranger = unfed_node::shares::generate_key();
    let v = send(report_for("s0", &stranger, "ghost")).await;
    assert_eq!(
        (v.accepted, v.reason.as_str()),
        (false, "unknown_reporter"),
        "{v:?}"
    );
    let v = send(report_for("s0", &stranger, "reporter")).await;
    assert_eq!(
        (v.accepted, v.reason.as_str()),
        (false, "bad_signature"),
        "{v:?}"
    );
    let mut stale = report_for("s0", &reporter, "reporter");
    stale.timestamp -= 3600;
    attest::sign_report(&reporter, &mut stale);
    assert_eq!(send(stale).await.reason, "stale");
    let mut tampered = report_for("s1", &reporter, "reporter");
    tampered.inputs[0].input = Some(step_input::Input::Tokens(TokenIds { ids: vec![9] }));
    attest::sign_report(&reporter, &mut tampered);
    assert_eq!(send(tampered).await.reason, "bad_evidence");

    let real = report_for("s2", &reporter, "reporter");
    let v = send(real.clone()).await;
    assert!(v.accepted && v.guilty, "{v:?}");
    let v = send(real).await;
    assert_eq!(v.reason, "replay", "{v:?}");
    // Three reports counted this minute so far (unknown reporters, bad signatures and
    // stale reports are refused before the rate limit); the limit is 10.
    let mut reasons = Vec::new();
    for i in 0..8 {
        reasons.push(
            send(report_for(&format!("x{i}"), &reporter, "reporter"))
                .await
                .reason,
        );
    }
    assert_eq!(
        reasons.last().map(String::as_str),
        Some("rate_limited"),
        "{reasons:?}"
    );
    let v = c
        .list_verdicts(ListVerdictsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdicts.len(), 1, "{v:?}");
    assert_eq!(v.excluded, vec!["accused".to_string()]);
}

/// Cheating needs a local Anvil: without one the node refuses to start, saying why.
#[test]
fn cheating_is_refused_without_a_local_anvil() {
    let tmp = Net::prepare();
    let split = split_into(
        &common::fixtures_root().join("qwen2-f32"),
        &tmp.path().join("splits"),
        "m",
        1,
    );
    let out = std::process::Command::new(common::net::BIN)
        .args([
            "compute",
            "--shard-index",
            "0",
            "--port",
            "0",
            "--cheat",
            "perturb",
        ])
        .arg("--shards-dir")
        .arg(&split)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cheat perturb needs --chain-rpc") && err.contains("local Anvil"),
        "{err}"
    );
}
