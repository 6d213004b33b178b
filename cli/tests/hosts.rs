//! A testnet across hosts: the control host's `up` writes join bundles, other hosts
//! join with `up --host NAME --join BUNDLE`. Refusals run on loopback aliases
//! (127.0.0.2, .3); the three-host run uses Linux network namespaces joined by veth links
//! on a private subnet inside them (root only, as in CI).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{run, text, unfedctl};
use serde_json::Value;

/// Three hosts: the control host runs chain, registry, daemon and shard 0 (two
/// replicas); b runs shard 1, c a second replica of shard 1.
fn spec_text(run_dir: &Path, [ctl, b, c]: [&str; 3]) -> String {
    format!(
        r#"[testnet]
name = "hosts"
base_port = 0
run_dir = "{run_dir}"

[model]
text_shards = 2

[nodes]
replicas = 2

[web]
enabled = false

[[host]]
name = "ctl"
address = "{ctl}"
control = true

[[host]]
name = "b"
address = "{b}"

[[host]]
name = "c"
address = "{c}"

[[node]]
role = "compute"
shard = 1
host = "b"

[[node]]
role = "compute"
shard = 1
replica = 1
host = "c"
"#,
        run_dir = run_dir.display()
    )
}

/// Runs `cmd` and returns its output, which must be a success.
fn ok(cmd: &mut Command, what: &str) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Like [`ok`], but a failure also shows the end of every log under `run_dir`: a host
/// that cannot join is explained by the control host's logs, not by its own output.
fn ok_or_logs(cmd: &mut Command, what: &str, run_dir: &Path) -> Output {
    let out = run(cmd);
    if !out.status.success() {
        panic!(
            "{what} failed:\n{}\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            log_tails(run_dir)
        );
    }
    out
}

/// The last lines of each `*.log` and `*.err` file under `dir`, with its path.
fn log_tails(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|x| x.to_str()),
                Some("log" | "err")
            ) {
                let body = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = body.lines().collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                out.push_str(&format!("--- {}\n{tail}\n", path.display()));
            }
        }
    }
    out
}

/// Runs `cmd`, which must fail; its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    text(&out.stderr)
}

fn status_json(cmd: &mut Command) -> Value {
    let out = ok(cmd.arg("--json"), "status");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The node names the control host's status lists on `host`.
fn nodes_on(status: &Value, host: &str) -> Vec<String> {
    let hosts = status["hosts"].as_array().expect("hosts in status");
    let h = hosts
        .iter()
        .find(|h| h["name"] == host)
        .expect("host listed");
    let mut names: Vec<String> = h["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn chat_tokens(cmd: &mut Command) -> (Vec<u64>, Value) {
    let out = ok(
        cmd.args([
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ]),
        "chat",
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    (ids, v)
}

/// The same model on one machine: the tokens a multi-host chat must equal.
fn one_machine_tokens() -> Vec<u64> {
    let net = common::Net::new("[chain]\nmode = \"none\"\n[web]\nenabled = false\n");
    net.up_detached();
    chat_tokens(unfedctl().arg("chat").arg(&net.spec)).0
}

/// Stops every part of the testnet on drop (each host's, then the control host's).
struct Parts {
    spec: PathBuf,
    hosts: Vec<&'static str>,
}

impl Drop for Parts {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run(unfedctl()
                .arg("down")
                .arg(&self.spec)
                .args(["--host", host]));
        }
        let _ = run(unfedctl().arg("down").arg(&self.spec));
    }
}

#[test]
fn joins_with_a_wrong_or_reused_token_another_model_or_an_unknown_host_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let spec = dir.path().join("hosts.toml");
    std::fs::write(
        &spec,
        spec_text(&run_dir, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]),
    )
    .unwrap();
    let _parts = Parts {
        spec: spec.clone(),
        hosts: vec!["b", "c"],
    };
    let up = ok(unfedctl().arg("up").arg(&spec).arg("--detach"), "up");
    assert!(
        text(&up.stdout).contains("--host b --join"),
        "{}",
        text(&up.stdout)
    );
    let bundle_b = run_dir.join("join/b.json");
    let bundle: Value = serde_json::from_slice(&std::fs::read(&bundle_b).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&bundle_b).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the bundle holds a token: 0600");
    assert!(!text(&std::fs::read(&bundle_b).unwrap()).contains("PRIVATE KEY"));
    let join = |host: &str, bundle: &Path| {
        let mut cmd = unfedctl();
        cmd.arg("up")
            .arg(&spec)
            .args(["--host", host, "--join"])
            .arg(bundle);
        cmd
    };
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut b = bundle.clone();
        edit(&mut b);
        let path = dir.path().join(format!("edited-{}.json", rand_suffix()));
        std::fs::write(&path, serde_json::to_vec(&b).unwrap()).unwrap();
        path
    };

    let err = refused(&mut join("zz", &bundle_b));
    assert!(err.contains("no host named 'zz'"), "{err}");
    let err = refused(&mut join("ctl", &bundle_b));
    assert!(err.contains("is the control host"), "{err}");
    let err = refused(&mut join("c", &bundle_b));
    assert!(err.contains("admits host 'b', not 'c'"), "{err}");
    let wrong = with(&|b| b["token"] = Value::from("00".repeat(32)));
    let err = refused(&mut join("b", &wrong));
    assert!(err.contains("wrong join token for host 'b'"), "{err}");
    let other_model = with(&|b| b["model_digest"] = Value::from("ab".repeat(32)));
    let err = refused(&mut join("b", &other_model));
    assert!(
        err.contains("the model here splits to digest") && err.contains("differ"),
        "{err}"
    );
    // Nothing joined so far: the registry lists nothing on b.
    let status = status_json(unfedctl().arg("status").arg(&spec));
    assert!(nodes_on(&status, "b").is_empty(), "{status:#}");
    assert_eq!(status["hosts"][1]["joined_at"], Value::Null);

    // The real token joins once…
    let kept = with(&|_| {});
    ok(join("b", &bundle_b).arg("--detach"), "join b");
    let status = status_json(unfedctl().arg("status").arg(&spec));
    assert_eq!(nodes_on(&status, "b"), ["compute-1"], "{status:#}");
    ok(
        unfedctl().arg("down").arg(&spec).args(["--host", "b"]),
        "down --host b",
    );
    // …and never again.
    let err = refused(&mut join("b", &kept));
    assert!(err.contains("was already used"), "{err}");
    // The control host wrote b a new bundle, which joins.
    ok(join("b", &bundle_b).arg("--detach"), "join b again");
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Linux network namespaces made by this test, removed on drop (their processes first).
struct Namespaces {
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
}

impl Namespaces {
    /// `ctl` with a bridge at .1, and `b`, `c` each on a veth link into it at .2, .3.
    fn create(prefix: &str, subnet: &str) -> Self {
        let ns = Namespaces {
            names: ["ctl", "b", "c"]
                .iter()
                .map(|h| format!("{prefix}{h}"))
                .collect(),
        };
        for name in &ns.names {
            ip(&["netns", "add", name]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        let ctl = &ns.names[0];
        ip(&["-n", ctl, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", ctl, "link", "set", "br0", "up"]);
        ip(&[
            "-n",
            ctl,
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            "br0",
        ]);
        for (i, name) in ns.names.iter().enumerate().skip(1) {
            let port = format!("v{i}");
            ip(&[
                "-n", ctl, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                name,
            ]);
            ip(&["-n", ctl, "link", "set", &port, "master", "br0"]);
            ip(&["-n", ctl, "link", "set", &port, "up"]);
            let addr = format!("{subnet}.{}/24", i + 1);
            ip(&["-n", name, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", name, "link", "set", "eth0", "up"]);
        }
        ns
    }

    /// `unfedctl` run inside namespace `i`.
    fn unfedctl(&self, i: usize) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.names[i],
            env!("CARGO_BIN_EXE_unfedctl"),
        ]);
        cmd
    }

    /// TCP sockets listening in namespace `i` on a non-loopback address.
    fn exposed_listeners(&self, i: usize) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.names[i], "ss", "-Hltn"])
            .output()
            .unwrap();
        text(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .filter(|a| !a.starts_with("127.") && !a.starts_with("[::1]"))
            .collect()
    }

    /// Runs `f` on a thread inside namespace `i` (its sockets are that host's).
    fn inside<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.names[i]);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in text(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// What a server answers a plaintext HTTP/2 connection preface with: `Some(first
/// byte)`, or `None` if it closed without a word.
fn answer_to_plaintext_h2(addr: &str) -> Option<u8> {
    let mut s = TcpStream::connect(addr).expect("reachable");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The preface and an empty SETTINGS frame: a plaintext gRPC server answers with its
    // own SETTINGS frame (first byte 0x00); a TLS server with an alert (0x15) or nothing.
    let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00");
    let mut first = [0u8; 1];
    match s.read(&mut first) {
        Ok(1) => Some(first[0]),
        _ => None,
    }
}

/// The probe's control: a plaintext registry (loopback) does answer it.
#[test]
fn the_plaintext_probe_sees_a_plaintext_grpc_server() {
    use std::io::BufRead;
    let mut node = unfedctl()
        .args(["node", "registry", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let addr = lines
        .find_map(|l| l.ok()?.strip_prefix("listening ").map(str::to_string))
        .expect("the registry listens");
    let answer = answer_to_plaintext_h2(&addr);
    let _ = node.kill();
    let _ = node.wait();
    assert_eq!(
        answer,
        Some(0x00),
        "a plaintext server answers with a frame"
    );
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn three_hosts_in_network_namespaces_serve_one_model_over_tls() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root (CI runs as root)");
        return;
    }
    let want = one_machine_tokens();
    let prefix = format!("uf{}", std::process::id() % 100_000);
    let subnet = "10.231.7";
    let ns = Namespaces::create(&prefix, subnet);
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let spec = dir.path().join("hosts.toml");
    let addrs = [1, 2, 3].map(|i| format!("{subnet}.{i}"));
    std::fs::write(
        &spec,
        spec_text(&run_dir, [&addrs[0], &addrs[1], &addrs[2]]),
    )
    .unwrap();
    let _parts = Parts {
        spec: spec.clone(),
        hosts: vec!["b", "c"],
    };
    ok_or_logs(
        ns.unfedctl(0).arg("up").arg(&spec).arg("--detach"),
        "up on ctl",
        &run_dir,
    );
    for (i, host) in [(1, "b"), (2, "c")] {
        let bundle = run_dir.join(format!("join/{host}.json"));
        ok_or_logs(
            ns.unfedctl(i)
                .arg("up")
                .arg(&spec)
                .args(["--host", host, "--join"])
                .arg(&bundle)
                .arg("--detach"),
            host,
            &run_dir,
        );
    }

    let (got, chat) = chat_tokens(ns.unfedctl(0).arg("chat").arg(&spec));
    assert_eq!(got, want, "tokens across hosts differ from one machine");
    let last_hop = chat["route"][1]["address"].as_str().unwrap().to_string();
    assert!(
        last_hop.starts_with(&format!("{}:", addrs[1]))
            || last_hop.starts_with(&format!("{}:", addrs[2])),
        "shard 1 was not served from b or c: {chat:#}"
    );

    let status = status_json(ns.unfedctl(0).arg("status").arg(&spec));
    assert_eq!(nodes_on(&status, "b"), ["compute-1"], "{status:#}");
    assert_eq!(nodes_on(&status, "c"), ["compute-1-r1"], "{status:#}");
    assert_eq!(
        nodes_on(&status, "ctl"),
        ["compute-0", "compute-0-r1", "daemon"],
        "{status:#}"
    );

    // Every socket another host can reach speaks TLS: none answers plaintext HTTP/2.
    for (host, from) in [(0, 1), (1, 0), (2, 0)] {
        let exposed = ns.exposed_listeners(host);
        assert!(!exposed.is_empty(), "nothing listens on host {host}");
        for addr in exposed {
            let target = addr
                .replace("0.0.0.0", &addrs[host])
                .replace('*', &addrs[host]);
            let answer = ns.inside(from, move || answer_to_plaintext_h2(&target));
            assert!(
                matches!(answer, None | Some(0x15)),
                "{addr} on host {host} answered plaintext HTTP/2 (first byte {answer:?})"
            );
        }
    }
    // The chain's RPC (plain HTTP) is not reachable from another host.
    let state: Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("state.json")).unwrap()).unwrap();
    let rpc = state["chain"]["rpc_url"].as_str().unwrap().to_string();
    assert!(rpc.starts_with("http://127.0.0.1:"), "{rpc}");

    ok(
        ns.unfedctl(1).arg("down").arg(&spec).args(["--host", "b"]),
        "down --host b",
    );
    let (after, _) = chat_tokens(ns.unfedctl(0).arg("chat").arg(&spec));
    assert_eq!(after, want, "with b gone, c's replica serves shard 1");
}
