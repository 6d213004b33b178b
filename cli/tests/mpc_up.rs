//! `unfedctl up` with an MPC pair: party B starts, then party A, then the compute shards;
//! the registry keeps the model INCOMPLETE (missing_mpc) until the pair is live; with
//! `full_output_2pc` a chat goes through the pair and gives the plaintext tokens.

mod common;

use common::{Net, run, state, text, unfedctl};
use serde_json::Value;

fn up(net: &Net) {
    let out = run(unfedctl().arg("up").arg(&net.spec).arg("--detach"));
    assert!(
        out.status.success(),
        "up failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn chat(net: &Net) -> Value {
    let out = run(unfedctl().arg("chat").arg(&net.spec).args([
        "--prompt",
        "Tell me about shards",
        "--json",
        "--max-tokens",
        "24",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_full_output_pair_starts_b_then_a_and_serves_private_chats() {
    let body = "[model]\ntext_shards = 1\n[daemon]\nenabled = false\n[web]\nenabled = false\n";
    let private = Net::new(&format!(
        "{body}[mpc]\npairs = 1\noutput = \"full_output_2pc\"\n"
    ));
    up(&private);
    let st = state(&private.spec);
    let names: Vec<&str> = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["anvil", "registry", "mpc-b-0", "mpc-a-0", "compute-0"]
    );
    let wallet = |name: &str| {
        st["chain"]["wallets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["node"] == name)
            .unwrap()["address"]
            .clone()
    };
    let ours = chat(&private);
    // The route is the pair: A, then B — no compute node saw the request.
    let route: Vec<&Value> = ours["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["node_id"])
        .collect();
    assert_eq!(route, [&wallet("mpc-a-0"), &wallet("mpc-b-0")]);

    let plain = Net::new(body);
    up(&plain);
    assert_eq!(ours["token_ids"], chat(&plain)["token_ids"]);
}
