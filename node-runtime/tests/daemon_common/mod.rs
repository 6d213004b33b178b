//! Helpers of the daemon tests: a registry process, fake compute nodes that sign
//! shares with registered keys, and polling of the daemon's status.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use unfed_node::shares;
use unfed_proto::daemon_client::DaemonClient;
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::*;

use crate::common::net::{Node, s};

pub type Daemon = DaemonClient<tonic::transport::Channel>;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The chain id and escrow of a daemon without a chain (`daemon_args` names them).
pub const CHAIN_ID: u64 = 31337;
pub const ESCROW: &str = "0xeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

/// Terms at the default prices on `escrow`.
pub fn terms(escrow: &str) -> unfed_node::voucher::Terms {
    unfed_node::voucher::Terms {
        chain_id: CHAIN_ID,
        escrow: escrow.parse().unwrap(),
        prices: unfed_node::daemon::Prices::default(),
    }
}

/// Every voucher a test signed, by digest: `submit` attaches the ones its shares name,
/// as a node's share sink does.
static VOUCHERS: Mutex<Option<HashMap<Vec<u8>, SpendingVoucher>>> = Mutex::new(None);

fn remember(v: &SpendingVoucher) -> Vec<u8> {
    let d = unfed_node::voucher::digest(v).unwrap().to_vec();
    VOUCHERS
        .lock()
        .unwrap()
        .get_or_insert_default()
        .insert(d.clone(), v.clone());
    d
}

/// A voucher of `payer` for `session` over `route`, remembered for `submit`.
pub fn voucher(
    payer: &unfed_node::voucher::Payer,
    terms: &unfed_node::voucher::Terms,
    session: &str,
    route: &[&str],
    caps: (u32, u32),
) -> SpendingVoucher {
    let route = route.iter().map(|r| r.to_string()).collect();
    let (v, _) = payer.issue(terms, ("m", session), route, caps).unwrap();
    remember(&v);
    v
}

/// A fake compute node: its share key, registered with the registry, and the
/// per-session link state a real node keeps.
pub struct Signer {
    pub node: String,
    pub key: SigningKey,
    pub prev: HashMap<String, (Vec<u8>, u32)>,
    pub nonce: u64,
    /// Pays for the sessions this node serves without a voucher set by `bill`.
    pub payer: unfed_node::voucher::Payer,
    pub terms: unfed_node::voucher::Terms,
    /// Session → the voucher its shares name.
    pub vouchers: HashMap<String, SpendingVoucher>,
    pub shard_index: u32,
    pub shards_total: u32,
}

impl Signer {
    pub async fn register(registry: &str, node: &str) -> Signer {
        Self::register_for(registry, node, 1, 1).await
    }

    /// Registers as a node of shard 0 covering layers `[0, layer_end)` of `shards_total`.
    pub async fn register_for(
        registry: &str,
        node: &str,
        layer_end: u32,
        shards_total: u32,
    ) -> Signer {
        let key = shares::generate_key();
        // Over TLS a registration comes with the certificate it names.
        let id = crate::common::net::identity(node);
        let mut c = RegistryClient::new(
            id.connect(registry, Duration::from_secs(10), None)
                .await
                .unwrap(),
        );
        let r = c
            .register(RegisterRequest {
                node_id: node.into(),
                role: "compute".into(),
                address: "127.0.0.1:1".into(),
                model: "m".into(),
                shard_index: 0,
                share_key: shares::public_key_hex(&key),
                timestamp: now_ms() / 1000,
                nonce: "n".into(),
                shards_total,
                layer_end,
                tls_pin: id.own_pin().unwrap().hex(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.accepted, "{r:?}");
        Signer {
            key,
            shards_total,
            ..Self::unregistered(node)
        }
    }

    /// A node the registry does not know (its shares name an unknown key).
    pub fn unregistered(node: &str) -> Signer {
        Signer {
            node: node.into(),
            key: shares::generate_key(),
            prev: HashMap::new(),
            nonce: 0,
            payer: unfed_node::voucher::Payer::wallet(unfed_chain::dev_signer(9).unwrap()),
            terms: terms(ESCROW),
            vouchers: HashMap::new(),
            shard_index: 0,
            shards_total: 1,
        }
    }

    /// Bills `session` under `v` from now on.
    pub fn bill(&mut self, session: &str, v: &SpendingVoucher) {
        self.vouchers.insert(session.into(), v.clone());
    }

    /// The session's voucher: the one set by `bill`, else one of `payer` naming only
    /// this node, with room for 1000 steps.
    fn voucher_of(&mut self, session: &str) -> SpendingVoucher {
        if let Some(v) = self.vouchers.get(session) {
            return v.clone();
        }
        let v = voucher(
            &self.payer,
            &self.terms,
            session,
            &[&self.node],
            (1000, 1000),
        );
        self.vouchers.insert(session.into(), v.clone());
        v
    }

    /// The next share of `session` (step after the previous one), signed, linked.
    pub fn next(&mut self, session: &str) -> ComputeShare {
        let (prev, step) = match self.prev.get(session) {
            Some((h, st)) => (h.clone(), st + 1),
            None => (Vec::new(), 0),
        };
        self.nonce += 1;
        let v = self.voucher_of(session);
        let mut sh = ComputeShare {
            node_id: self.node.clone(),
            model: "m".into(),
            shard_index: self.shard_index,
            shards_total: self.shards_total,
            session_id: session.into(),
            step,
            input_tokens: if step == 0 { 5 } else { 0 },
            output_tokens: 1,
            activation_hash: rand::random::<[u8; 32]>().to_vec(),
            timestamp_ms: now_ms(),
            nonce: self.nonce,
            prev_share_hash: prev,
            chain_tip: shares::GENESIS.to_vec(),
            client: v.client.clone(),
            signature: Vec::new(),
            voucher: remember(&v),
        };
        shares::sign(&self.key, &mut sh);
        self.prev
            .insert(session.into(), (shares::share_hash(&sh).to_vec(), step));
        sh
    }

    pub fn resign(&self, sh: &mut ComputeShare) {
        shares::sign(&self.key, sh);
    }
}

/// A temp dir and a registry with open admission (no model served: the daemon tests
/// register their nodes by hand).
pub struct Net {
    pub dir: tempfile::TempDir,
    pub registry: Node,
}

pub fn registry() -> Net {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        s("registry"),
        s("--port"),
        s("0"),
        s("--heartbeat-secs"),
        s("1"),
    ];
    let registry = Node::start(&args, dir.path().join("registry.log"));
    Net { dir, registry }
}

pub fn daemon_args(net: &Net, db: &std::path::Path, port: &str, extra: &[&str]) -> Vec<String> {
    daemon_args_at(&net.registry.address, db, port, extra)
}

/// A daemon's arguments: it finds the nodes' keys through `registry`, its db at `db`.
pub fn daemon_args_at(
    registry: &str,
    db: &std::path::Path,
    port: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a = vec![
        s("daemon"),
        s("--port"),
        s(port),
        s("--registry"),
        s(registry),
        s("--db"),
        db.display().to_string(),
        s("--block-interval-secs"),
        s("0.1"),
        s("--heartbeat-secs"),
        s("1"),
    ];
    // Without a chain, the daemon takes vouchers for the harness's escrow.
    if !extra.contains(&"--chain-rpc") {
        a.extend([
            s("--chain-id"),
            CHAIN_ID.to_string(),
            s("--escrow"),
            s(ESCROW),
        ]);
    }
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

pub async fn daemon(addr: &str) -> Daemon {
    DaemonClient::new(crate::common::net::channel(addr).await)
}

/// The vouchers `shares` name, each once.
pub fn vouchers_of(shares: &[ComputeShare]) -> Vec<SpendingVoucher> {
    let known = VOUCHERS.lock().unwrap().clone().unwrap_or_default();
    let mut vouchers: Vec<SpendingVoucher> = Vec::new();
    for sh in shares {
        if let Some(v) = known.get(&sh.voucher)
            && !vouchers.contains(v)
        {
            vouchers.push(v.clone());
        }
    }
    vouchers
}

pub async fn submit(
    d: &mut Daemon,
    submitter: &str,
    shares: Vec<ComputeShare>,
) -> Vec<ShareResult> {
    let vouchers = vouchers_of(&shares);
    d.submit_shares(SubmitSharesRequest {
        submitter: submitter.into(),
        shares,
        vouchers,
    })
    .await
    .unwrap()
    .into_inner()
    .results
}

pub async fn one(d: &mut Daemon, submitter: &str, share: ComputeShare) -> ShareResult {
    submit(d, submitter, vec![share]).await.remove(0)
}

#[track_caller]
pub fn rejected(r: &ShareResult, reason: &str) {
    assert!(
        !r.accepted && r.reason == reason,
        "expected rejection {reason}, got {r:?}"
    );
}

/// Polls GetChainStatus until `pred` holds. The deadline is generous: settlement waits
/// for blocks, the chain and a challenge window, all slow on a loaded 2-core CI machine.
pub async fn wait_status(
    d: &mut Daemon,
    what: &str,
    pred: impl Fn(&GetChainStatusResponse) -> bool,
) -> GetChainStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let st = d
            .get_chain_status(GetChainStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if pred(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll again until the deadline
    }
}

/// Starts `unfed-node ARGS` with extra environment variables (stake key files) and
/// waits for its "listening ADDR" line.
pub fn start_with_env(args: &[String], env: &[(&str, String)], log: std::path::PathBuf) -> Node {
    Node::start_with_env(args, log, env)
}
