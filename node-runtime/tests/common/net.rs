//! Real `unfed-node` processes on loopback for the network tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unfed_model::split::{SplitOptions, split};
use unfed_node::client::Client;
use unfed_proto::ModelState;

pub const BIN: &str = env!("CARGO_BIN_EXE_unfed-node");

/// The tests' CA: every node a test starts serves TLS (the default of a real testnet)
/// with a certificate of its own, issued here.
struct TestPki {
    ca: unfed_node::net::pki::Ca,
    dir: PathBuf,
    issued: std::sync::atomic::AtomicUsize,
}

fn pki() -> &'static TestPki {
    static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("test-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = unfed_node::net::pki::Ca::generate("tests").unwrap();
        unfed_chain::keys::create_private_file(&dir.join("ca.key"), ca.key_pem.as_bytes()).unwrap();
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
        TestPki {
            ca,
            dir,
            issued: Default::default(),
        }
    })
}

/// The tests' CA certificate.
pub fn ca_path() -> PathBuf {
    pki().dir.join("ca.crt")
}

/// A fresh certificate for `name` (valid for 127.0.0.1 and localhost) and its key.
pub fn issue(name: &str) -> unfed_node::net::TlsFiles {
    let p = pki();
    let n = p.issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{name}-{n}");
    let issued =
        p.ca.issue(&name, &[s("127.0.0.1"), s("localhost")], 30)
            .unwrap();
    let files = unfed_node::net::TlsFiles::in_dir(&p.dir, &name);
    unfed_chain::keys::create_private_file(&files.key, issued.key_pem.as_bytes()).unwrap();
    std::fs::write(&files.cert, &issued.cert_pem).unwrap();
    files
}

/// The TLS flags of a node playing `role` (the dashboard only needs the CA).
pub fn tls_args(role: &str) -> Vec<String> {
    let mut args = vec![s("--tls-ca"), ca_path().display().to_string()];
    if role != "web" {
        let f = issue(role);
        args.extend([
            s("--tls-cert"),
            f.cert.display().to_string(),
            s("--tls-key"),
            f.key.display().to_string(),
        ]);
    }
    args
}

/// A client's transport: trusts the tests' CA, presents no certificate.
pub fn transport() -> unfed_node::net::Net {
    unfed_node::net::Net::client_from_ca(&ca_path()).unwrap()
}

/// The transport of a process holding a certificate of its own (e.g. a fake node).
pub fn identity(name: &str) -> unfed_node::net::Net {
    unfed_node::net::Net::from_files(&issue(name)).unwrap()
}

/// A connected channel to `addr` over the tests' TLS.
pub async fn channel(addr: &str) -> tonic::transport::Channel {
    try_channel(addr).await.unwrap()
}

/// `channel`, for a peer that may be down.
pub async fn try_channel(addr: &str) -> anyhow::Result<tonic::transport::Channel> {
    transport()
        .connect(addr, Duration::from_secs(60), None)
        .await
}

/// A child process killed when dropped; stderr goes to a log file kept for failures.
pub struct Node {
    pub child: Child,
    pub address: String,
    pub log: PathBuf,
    pub args: Vec<String>,
}

impl Node {
    /// Starts `unfed-node ARGS` and waits for its "listening ADDR" line.
    pub fn start(args: &[String], log: PathBuf) -> Node {
        Self::start_with_env::<&str>(args, log, &[])
    }

    /// Starts a node without TLS (loopback plaintext, `[testnet] tls = false`).
    pub fn start_plaintext(args: &[String], log: PathBuf) -> Node {
        Self::spawn(args, log, &[] as &[(&str, &str)], false)
    }

    pub fn start_with_env<V: AsRef<std::ffi::OsStr>>(
        args: &[String],
        log: PathBuf,
        env: &[(&str, V)],
    ) -> Node {
        Self::spawn(args, log, env, true)
    }

    fn spawn<V: AsRef<std::ffi::OsStr>>(
        args: &[String],
        log: PathBuf,
        env: &[(&str, V)],
        tls: bool,
    ) -> Node {
        let err = std::fs::File::create(&log).unwrap();
        let mut args = args.to_vec();
        if tls && !args.iter().any(|a| a == "--tls-ca") {
            args.extend(tls_args(&args[0]));
        }
        let args = &args[..];
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_ref())))
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn unfed-node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(address) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            panic!(
                "unfed-node {args:?} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Node {
            address: address.to_string(),
            child,
            log,
            args: args.to_vec(),
        }
    }

    /// The transport of this node's own TLS identity (its certificate and key), to
    /// call other nodes as it would.
    pub fn identity(&self) -> unfed_node::net::Net {
        let flag = |name: &str| {
            let i = self.args.iter().position(|a| a == name).expect(name);
            PathBuf::from(&self.args[i + 1])
        };
        unfed_node::net::Net::from_files(&unfed_node::net::TlsFiles {
            cert: flag("--tls-cert"),
            key: flag("--tls-key"),
            ca: flag("--tls-ca"),
        })
        .unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20)); // poll again until the deadline
        }
    }

    /// Waits (with a deadline) for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "node still running after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20)); // poll again until the deadline
        }
    }

    pub fn port(&self) -> String {
        self.address.rsplit(':').next().unwrap().to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A registry and compute nodes over a temp dir of splits.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub registry: Node,
    pub computes: Vec<Node>,
    /// Nodes serve TLS under the tests' CA (false: loopback plaintext).
    pub tls: bool,
}

pub fn s(v: &str) -> String {
    v.to_string()
}

/// Splits `checkpoint` into `shards` text shards under `root/model_id`.
pub fn split_into(checkpoint: &Path, root: &Path, model_id: &str, shards: usize) -> PathBuf {
    let out = root.join(model_id);
    let opts = SplitOptions {
        text_shards: shards,
        model_id: Some(model_id.to_string()),
        ..Default::default()
    };
    split(checkpoint, &out, &opts)
        .unwrap_or_else(|e| panic!("split {} into {shards}: {e}", checkpoint.display()));
    out
}

impl Net {
    /// A temp dir whose `splits/` the registry will serve; split models into it first.
    pub fn prepare() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("splits")).unwrap();
        dir
    }

    /// `prepare` with the built-in model split into `shards` as model "tiny"; returns
    /// the dir and the split.
    pub fn prepare_tiny(shards: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = Self::prepare();
        let tiny = dir.path().join("tiny-src");
        unfed_model::builtin::write_tiny(&tiny).unwrap();
        let split = split_into(&tiny, &dir.path().join("splits"), "tiny", shards);
        (dir, split)
    }

    /// A registry over `dir/splits` (every split under it is served).
    pub fn registry(dir: tempfile::TempDir) -> Net {
        Self::registry_with(dir, true)
    }

    /// `registry`, serving TLS or (`tls = false`) plaintext; nodes started through this
    /// network follow it.
    pub fn registry_with(dir: tempfile::TempDir, tls: bool) -> Net {
        let splits = dir.path().join("splits");
        let args = vec![
            s("registry"),
            s("--port"),
            s("0"),
            s("--heartbeat-secs"),
            s("1"),
            s("--shards-dir"),
            splits.display().to_string(),
        ];
        let log = dir.path().join("registry.log");
        let registry = if tls {
            Node::start(&args, log)
        } else {
            Node::start_plaintext(&args, log)
        };
        Net {
            dir,
            registry,
            computes: Vec::new(),
            tls,
        }
    }

    /// Starts `unfed-node ARGS` the way this network runs (TLS or plaintext).
    pub fn start(&self, args: &[String], log: PathBuf) -> Node {
        if self.tls {
            Node::start(args, log)
        } else {
            Node::start_plaintext(args, log)
        }
    }

    /// How a client of this network dials it.
    pub fn transport(&self) -> unfed_node::net::Net {
        if self.tls {
            transport()
        } else {
            unfed_node::net::Net::plaintext()
        }
    }

    pub fn splits(&self) -> PathBuf {
        self.dir.path().join("splits")
    }

    pub fn compute_args(&self, model_id: &str, shard: usize, port: &str) -> Vec<String> {
        vec![
            s("compute"),
            s("--shard-index"),
            shard.to_string(),
            s("--port"),
            s(port),
            s("--shards-dir"),
            self.splits().join(model_id).display().to_string(),
            s("--registry"),
            self.registry.address.clone(),
            s("--heartbeat-secs"),
            s("1"),
            s("--hop-timeout-secs"),
            s("4"),
        ]
    }

    /// Starts a compute node for `shard` of `model_id`; returns its index in `computes`.
    pub fn compute(&mut self, model_id: &str, shard: usize) -> usize {
        let args = self.compute_args(model_id, shard, "0");
        let log = self
            .dir
            .path()
            .join(format!("{model_id}-{shard}-{}.log", self.computes.len()));
        let node = self.start(&args, log);
        self.computes.push(node);
        self.computes.len() - 1
    }

    /// Forward calls compute node `i` has run (its Health).
    pub async fn compute_forwards(&self, i: usize) -> u64 {
        self.compute_health(i).await.forwards
    }

    /// Compute node `i`'s Health report.
    pub async fn compute_health(&self, i: usize) -> unfed_proto::HealthResponse {
        let mut c = unfed_proto::compute_client::ComputeClient::new(
            channel(&self.computes[i].address).await,
        );
        c.health(unfed_proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.transport(), &self.registry.address)
            .await
            .unwrap()
    }

    /// Waits until the registry lists a daemon: a client that finds none runs its
    /// sessions unpaid, so a paid test must not start before.
    pub async fn wait_daemon_listed(&self) {
        self.wait_listing("no daemon listed", |nodes| {
            nodes.iter().any(|n| n.role == "daemon")
        })
        .await;
    }

    /// Polls the registry's node list until `done` holds for it (20 s deadline, `what`
    /// names the wait in the failure).
    pub async fn wait_listing(&self, what: &str, done: impl Fn(&[unfed_proto::NodeInfo]) -> bool) {
        let mut client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let nodes = client
                .registry_mut()
                .discover(unfed_proto::DiscoverRequest::default())
                .await
                .unwrap()
                .into_inner()
                .nodes;
            if done(&nodes) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {nodes:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await; // poll again until the deadline
        }
    }

    /// Polls until the registry reports `model` READY with `nodes` nodes.
    pub async fn wait_ready(&self, model: &str, nodes: u32) {
        let mut client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let models = client.list_models().await.unwrap();
            if models.iter().any(|m| {
                m.model == model && m.state == ModelState::Ready as i32 && m.nodes == nodes
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{model} never became READY with {nodes} nodes: {models:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await; // poll again until the deadline
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in std::iter::once(&self.registry).chain(&self.computes) {
            out += &format!(
                "--- {}\n{}\n",
                n.log.display(),
                std::fs::read_to_string(&n.log).unwrap_or_default()
            );
        }
        out
    }
}

/// A local Anvil with the token and escrow deployed (`window_secs` challenge window),
/// and the operator (dev key 0) connected to it.
pub async fn anvil_with_escrow(
    window_secs: u64,
) -> (
    unfed_chain::Anvil,
    unfed_chain::Chain,
    unfed_chain::Deployment,
) {
    use unfed_chain::{Anvil, AnvilOptions, Chain, EscrowParams, dev_signer};
    let anvil = Anvil::start(&AnvilOptions::default())
        .await
        .expect("start anvil");
    let operator = Chain::connect(&anvil.endpoint(), dev_signer(0).unwrap()).unwrap();
    let d = operator
        .deploy(&EscrowParams {
            challenge_window_secs: window_secs,
            ..Default::default()
        })
        .await
        .expect("deploy the contracts");
    (anvil, operator, d)
}

/// An MPC party (`unfed-node mpc --role A|B`) over the split in `split`.
pub fn party(
    role: &str,
    split: &Path,
    registry: Option<&str>,
    peer: Option<&str>,
    extra: &[&str],
    log: PathBuf,
) -> Node {
    Node::start(&party_args(role, split, registry, peer, extra), log)
}

/// The arguments of `party`.
pub fn party_args(
    role: &str,
    split: &Path,
    registry: Option<&str>,
    peer: Option<&str>,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        s("mpc"),
        s("--role"),
        s(role),
        s("--port"),
        s("0"),
        s("--shards-dir"),
        split.display().to_string(),
        s("--heartbeat-secs"),
        s("1"),
        s("--timeout-secs"),
        s("3"),
    ];
    if let Some(r) = registry {
        args.extend([s("--registry"), s(r)]);
    }
    if let Some(p) = peer {
        args.extend([s("--peer"), s(p)]);
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    args
}

/// Party B, then party A dialing it: (A, B); logs mpc-a.log and mpc-b.log in `logs`.
pub fn start_pair(
    split: &Path,
    registry: Option<&str>,
    extra: &[&str],
    logs: &Path,
) -> (Node, Node) {
    let b = party("B", split, registry, None, extra, logs.join("mpc-b.log"));
    let a = party(
        "A",
        split,
        registry,
        Some(&b.address),
        extra,
        logs.join("mpc-a.log"),
    );
    (a, b)
}

/// `SessionInputs` of `session` up to `up_to` on `node`, called with `caller`'s certificate.
pub async fn session_inputs(
    caller: &Node,
    node: &str,
    session: &str,
    up_to: usize,
) -> Result<unfed_proto::SessionInputsResponse, tonic::Status> {
    let ch = caller
        .identity()
        .connect(node, Duration::from_secs(30), None)
        .await
        .unwrap();
    unfed_proto::compute_client::ComputeClient::new(ch)
        .session_inputs(unfed_proto::SessionInputsRequest {
            session_id: session.into(),
            up_to_step: up_to as u32 - 1,
        })
        .await
        .map(|r| r.into_inner())
}
