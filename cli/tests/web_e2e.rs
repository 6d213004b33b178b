//! The dashboard in a real browser: `unfedctl up` starts a testnet with the web role,
//! and headless Debian Chromium, driven by playwright-core (tests/web-e2e/drive.mjs),
//! signs in with the dev client's wallet (a real EIP-191 signature), sends a prompt with
//! Enter, and watches the tokens stream in, the cost, and the deposit going down.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Net, driver_result, run, state, text, unfedctl};
use serde_json::Value;

const INSTALL: &str =
    "apt-get install -y chromium chromium-driver && npm ci --prefix tests/web-e2e";

/// The browser and the driver's packages, or why the test cannot run.
fn browser_setup(root: &Path) -> Result<PathBuf, String> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return Err(format!("{} is missing", chromium.display()));
    }
    if !root
        .join("tests/web-e2e/node_modules/playwright-core")
        .is_dir()
    {
        return Err("tests/web-e2e/node_modules is missing".into());
    }
    Ok(chromium)
}

#[test]
fn a_wallet_signs_in_chats_and_pays_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let chromium = match browser_setup(root) {
        Ok(c) => c,
        // CI installs both, so there a missing browser is a failure, not a skip.
        Err(why) if std::env::var_os("CI").is_some() => panic!("{why}; run `{INSTALL}`"),
        Err(why) => {
            eprintln!("\n*** SKIPPED the browser test: {why}; run `{INSTALL}` ***\n");
            return;
        }
    };
    // Blocks every second and a settlement per block, so the deposit moves quickly.
    let net = Net::new("[daemon]\nblock_interval_seconds = 1\nsettlement_blocks = 1\n");
    let up = run(unfedctl().arg("up").arg(&net.spec).arg("--detach"));
    assert!(
        up.status.success(),
        "up failed:\n{}\n{}",
        text(&up.stdout),
        text(&up.stderr)
    );
    assert!(text(&up.stdout).contains("dashboard  http://127.0.0.1:"));
    let st = state(&net.spec);
    let web_port = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "web")
        .and_then(|p| p["port"].as_u64())
        .expect("a web process with a port");
    let client = st["chain"]["client"].as_str().unwrap().to_string();

    let (prompt, max_tokens, seed) = ("What is a network?", "24", "7");
    let chat = run(unfedctl().arg("chat").arg(&net.spec).args([
        "--prompt",
        prompt,
        "--json",
        "--max-tokens",
        max_tokens,
        "--seed",
        seed,
    ]));
    assert!(chat.status.success(), "{}", text(&chat.stderr));
    let chat: Value = serde_json::from_slice(&chat.stdout).unwrap();

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let key = std::fs::read_to_string(net.run_dir().join("keys/client.key")).unwrap();
    let drive = Command::new("node")
        .arg(root.join("tests/web-e2e/drive.mjs"))
        .env("WEB_URL", format!("http://127.0.0.1:{web_port}/"))
        .env("WALLET_KEY", key.trim())
        .env("PROMPT", prompt)
        .env("MAX_TOKENS", max_tokens)
        .env("SEED", seed)
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    println!("screenshots in {}", shots.display());
    let seen = driver_result(&net, &drive, "browser run");

    assert_eq!(
        seen["signed_in_as"].as_str().unwrap().to_lowercase(),
        client.to_lowercase()
    );
    // The tokens streamed in one by one and read exactly as `unfedctl chat` prints them.
    assert!(seen["updates"].as_u64().unwrap() >= 2, "{seen:#}");
    assert_eq!(seen["streamed_text"], chat["text"], "{seen:#}");
    assert_eq!(seen["summary_text"], chat["text"]);
    // The cost at the spec's prices, and the deposit going down once settled.
    let cost: u128 = seen["cost_wei"].as_str().unwrap().parse().unwrap();
    let tokens = chat["token_ids"].as_array().unwrap().len() as u128;
    let prompt_tokens = chat["prompt_tokens"].as_u64().unwrap() as u128;
    assert_eq!(
        cost,
        prompt_tokens * 100_000_000_000_000 + tokens * 1_000_000_000_000_000
    );
    let before: u128 = seen["deposit_before"].as_str().unwrap().parse().unwrap();
    let after: u128 = seen["deposit_after"].as_str().unwrap().parse().unwrap();
    assert!(after < before, "{seen:#}");
    // Stop ends a 1000-token generation early.
    assert_eq!(seen["stopped"], true, "{seen:#}");
    assert!(seen["stopped_tokens"].as_u64().unwrap() < 1000, "{seen:#}");
    // The network view lists the daemon and both compute nodes; the chain view blocks.
    assert!(seen["network_rows"].as_u64().unwrap() >= 3, "{seen:#}");
    assert_eq!(seen["route"].as_array().unwrap().len(), 2, "{seen:#}");
    assert!(seen["block_rows"].as_u64().unwrap() >= 1, "{seen:#}");
    assert_eq!(seen["console_errors"], serde_json::json!([]), "{seen:#}");
    for shot in [
        "chat-1280x800.png",
        "chain-1280x800.png",
        "chat-400x800.png",
    ] {
        assert!(shots.join(shot).is_file(), "{shot}");
    }
}
