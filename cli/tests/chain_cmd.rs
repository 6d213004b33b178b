//! `unfedctl chain up|deploy|fund|stake|status|down` through the real binary against a
//! real Anvil: the verbs run one at a time, are safe to re-run, write 0600 keys, and
//! `down` stops the chain.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn chain(verb: &str, spec: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unfedctl"))
        .args(["chain", verb])
        .arg(spec)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[track_caller]
fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn spec(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("net.toml");
    let text = format!(
        "[testnet]\nname = \"net\"\nbase_port = 0\n[mpc]\npairs = 0\n[daemon]\nenabled = false\n\
         [web]\nenabled = false\n{extra}"
    );
    std::fs::write(&spec, text).unwrap();
    (dir, spec)
}

fn status(spec: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_unfedctl"))
        .args(["chain", "status", "--json"])
        .arg(spec)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn chain_verbs_step_by_step_then_down() {
    let (dir, spec) = spec("[nodes]\nstake = \"150\"\n[economics]\nmin_stake = \"120\"\n");

    // Before a chain exists, the later steps say which verb comes first.
    let out = chain("deploy", &spec);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unfedctl chain up"));

    let first = ok(chain("up", &spec));
    assert!(first.contains("deployed UnfedToken"), "{first}");
    let s = status(&spec);
    assert_eq!(s["reachable"], true);
    let wallets = s["wallets"].as_array().unwrap();
    let nodes: Vec<&Value> = wallets.iter().filter(|w| w["node"] != "client").collect();
    assert_eq!(nodes.len(), 2, "{s}");
    for w in &nodes {
        assert_eq!(
            (w["stake"].as_str(), w["eligible"].as_bool()),
            (Some("150"), Some(true))
        );
        assert_eq!(w["min_stake"], "120");
    }
    let client = wallets.iter().find(|w| w["node"] == "client").unwrap();
    assert_eq!(client["deposit"], "1000");

    let keys = dir.path().join(".unfed/net/keys");
    for entry in std::fs::read_dir(&keys).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    // Re-running each step changes nothing: no second deployment, no double stake.
    let again = ok(chain("up", &spec));
    assert!(again.contains("contracts already deployed"), "{again}");
    ok(chain("fund", &spec));
    ok(chain("stake", &spec));
    let s2 = status(&spec);
    assert_eq!(s2["escrow"], s["escrow"]);
    assert_eq!(s2["wallets"], s["wallets"]);

    // Unstaking below min_stake makes the node ineligible; `stake` restores it.
    let out = Command::new(env!("CARGO_BIN_EXE_unfedctl"))
        .args([
            "chain",
            "unstake",
            "--node",
            "compute-0",
            "--amount",
            "40.5",
        ])
        .arg(&spec)
        .output()
        .unwrap();
    let text = ok(out);
    assert!(text.contains("NOT eligible"), "{text}");
    let w = &status(&spec)["wallets"][0];
    assert_eq!(
        (w["stake"].as_str(), w["cooling"].as_str()),
        (Some("109.5"), Some("40.5"))
    );
    assert_eq!(w["eligible"], false);
    let out = Command::new(env!("CARGO_BIN_EXE_unfedctl"))
        .args(["chain", "unstake", "--node", "nobody", "--amount", "1"])
        .arg(&spec)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("staked nodes: compute-0, compute-1"));
    ok(chain("fund", &spec));
    ok(chain("stake", &spec));
    let w = &status(&spec)["wallets"][0];
    assert_eq!(
        (w["stake"].as_str(), w["eligible"].as_bool()),
        (Some("150"), Some(true))
    );

    let pid = s["anvil_pid"].as_u64().unwrap() as u32;
    ok(chain("down", &spec));
    assert!(
        !unfed_chain::anvil::pid_alive(pid),
        "anvil {pid} still runs after down"
    );
    let out = chain("status", &spec);
    assert!(!out.status.success());
}

#[test]
fn chain_mode_none_needs_nothing() {
    let (_dir, spec) = spec("[chain]\nmode = \"none\"\n");
    let out = ok(chain("up", &spec));
    assert!(out.contains("unstaked"), "{out}");
}
