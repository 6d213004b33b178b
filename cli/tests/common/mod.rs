//! A testnet spec in a temp dir for the `unfedctl` process tests, torn down on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub fn unfedctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_unfedctl"))
}

/// A spec named "net" in a fresh temp dir, on free ports. Dropping it runs
/// `unfedctl down`, so a failing assertion never leaves processes behind.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub spec: PathBuf,
}

impl Net {
    /// `body` is appended to `[testnet] name = "net", base_port = 0`.
    pub fn new(body: &str) -> Net {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("net.toml");
        let text = format!("[testnet]\nname = \"net\"\nbase_port = 0\n{body}");
        std::fs::write(&spec, text).unwrap();
        Net { dir, spec }
    }

    /// `unfedctl up --detach`, which must succeed; its output.
    pub fn up_detached(&self) -> Output {
        let out = run(unfedctl().arg("up").arg(&self.spec).arg("--detach"));
        assert!(
            out.status.success(),
            "up failed:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        out
    }

    /// A short `unfedctl chat`, which must succeed.
    pub fn chat_ok(&self) {
        let chat = run(unfedctl().arg("chat").arg(&self.spec).args([
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--json",
        ]));
        assert!(chat.status.success(), "{}", text(&chat.stderr));
    }

    /// The run directory `up` uses for this spec.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join(".unfed/net")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = unfedctl()
            .arg("down")
            .arg(&self.spec)
            .stdout(Stdio::null())
            .status();
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The testnet's state.json.
pub fn state(spec: &Path) -> Value {
    let path = spec.parent().unwrap().join(".unfed/net/state.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The JSON line a Node driver (tests/web-e2e/*.mjs) printed last, checked to report no
/// error; on failure the panic shows the driver's output and the dashboard's log.
pub fn driver_result(net: &Net, drive: &Output, what: &str) -> Value {
    let out = text(&drive.stdout);
    let seen: Value = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "the driver printed no result:\n{out}\n{}",
                text(&drive.stderr)
            )
        });
    let web_log = std::fs::read_to_string(net.run_dir().join("logs/web.log")).unwrap_or_default();
    assert!(
        drive.status.success() && seen.get("error").is_none(),
        "the {what} failed: {seen:#}\n{}\nweb log:\n{web_log}",
        text(&drive.stderr)
    );
    seen
}

/// `unfedctl bench SPEC --json` for `tokens` tokens past any EOS, one measured run.
pub fn bench_json(spec: &Path, tokens: u32, extra: &[&str]) -> Value {
    let out = run(unfedctl()
        .arg("bench")
        .arg(spec)
        .args([
            "--tokens",
            &tokens.to_string(),
            "--runs",
            "1",
            "--ignore-eos",
            "--json",
        ])
        .args(extra));
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
