//! The README's tour, run as written against one testnet: the commands between the
//! `<!-- tour` markers, each given this testnet's spec (the README's run on the embedded
//! default, whose fixed ports a test cannot take).

use std::process::Command;

use common::{Net, run, state, text, unfedctl};
use serde_json::Value;

mod common;

/// The tour's command lines, comments dropped, split like a shell splits them.
fn tour_commands() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string("../README.md").unwrap();
    let start = readme
        .find("<!-- tour")
        .expect("README has a <!-- tour --> block");
    let end = readme.find("<!-- /tour -->").expect("the tour block ends");
    readme[start..end]
        .lines()
        .map(|l| l.split(" # ").next().unwrap().trim())
        .filter(|l| l.starts_with("unfedctl "))
        .map(words)
        .collect()
}

/// Whitespace-separated words; double quotes group.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut word, mut quoted, mut any) = (String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(word);
    }
    out
}

/// `unfedctl VERB ARGS...` as `unfedctl VERB SPEC ARGS...`.
fn on(spec: &std::path::Path, cmd: &[String]) -> Command {
    let mut c = unfedctl();
    c.arg(&cmd[1]).arg(spec).args(&cmd[2..]);
    c
}

#[test]
fn the_readme_tour_runs_as_written() {
    let commands = tour_commands();
    let verbs: Vec<&str> = commands.iter().map(|c| c[1].as_str()).collect();
    assert_eq!(
        verbs,
        ["status", "chat", "chat", "earnings", "logs", "down"],
        "the tour changed; update this test's expectations"
    );
    // The embedded default's shape (Anvil, daemon, dashboard) on free ports.
    let net = Net::new("");
    let spec = net.spec.as_path();
    let up = run(unfedctl().arg("up").arg(spec).arg("--detach"));
    assert!(
        up.status.success(),
        "{}\n{}",
        text(&up.stdout),
        text(&up.stderr)
    );
    let client = state(spec)["chain"]["client"].as_str().unwrap().to_string();
    for cmd in &commands {
        let out = run(&mut on(spec, cmd));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{cmd:?}:\n{stdout}\n{stderr}");
        match (cmd[1].as_str(), cmd.last().map(String::as_str)) {
            ("status", _) => assert!(stdout.contains("READY"), "{stdout}"),
            ("chat", Some("--json")) => {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                // The README's promise: a short fragment, not 128 tokens of a loop.
                assert_eq!(
                    v["token_ids"].as_array().unwrap().len(),
                    unfedctl::client_cmd::BUILTIN_MAX_TOKENS,
                    "{v}"
                );
                assert!(stdout.contains("assistant"), "{stdout}");
            }
            ("chat", _) => assert!(!stdout.trim().is_empty(), "no answer streamed"),
            ("earnings", _) => assert!(!stdout.trim().is_empty()),
            ("logs", _) => assert!(!stdout.trim().is_empty(), "empty registry log"),
            ("down", _) => {
                assert!(state(spec)["processes"].as_array().unwrap().is_empty())
            }
            other => panic!("unexpected tour command {other:?}"),
        }
        if cmd[1] == "status" {
            // The README's dashboard promise on this testnet (loopback, local Anvil):
            // one-click sign-in as the testnet's client wallet.
            let url = state(spec)["dashboard"].as_str().unwrap().to_string();
            let addr = url.trim_start_matches("http://").trim_end_matches('/');
            let rt = tokio::runtime::Runtime::new().unwrap();
            let config = rt
                .block_on(unfed_node::web::probe::Probe::plain().get(addr, "/api/config"))
                .unwrap()
                .json();
            assert_eq!(
                config["auth"]["dev_wallet"].as_str().map(str::to_lowercase),
                Some(client.to_lowercase()),
                "{config}"
            );
        }
    }
}

#[test]
fn words_group_quotes() {
    assert_eq!(
        words(r#"unfedctl chat --prompt "Hello there" --json"#),
        ["unfedctl", "chat", "--prompt", "Hello there", "--json"]
    );
}
