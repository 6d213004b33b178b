//! `unfedctl up` with an MPC pair: party B starts, then party A, then the compute shards;
//! the registry keeps the model INCOMPLETE (missing_mpc) until the pair is live; a chat
//! goes through the pair (and, unless it runs every layer, the compute nodes after it)
//! and gives the plaintext tokens.

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

/// The node ids of a chat's route.
fn route(chat: &Value) -> Vec<Value> {
    chat["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["node_id"].clone())
        .collect()
}

fn wallet(st: &Value, name: &str) -> Value {
    st["chain"]["wallets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["node"] == name)
        .unwrap_or_else(|| panic!("no wallet of {name}"))["address"]
        .clone()
}

#[test]
fn a_pair_running_part_of_shard0_hands_its_output_to_shard0_and_the_client_samples() {
    let body = "[daemon]\nenabled = false\n[web]\nenabled = false\n";
    let private = Net::new(&format!(
        "{body}[mpc]\npairs = 1\nlayers = 1\noutput = \"decode_client_sample\"\n"
    ));
    up(&private);
    let st = state(&private.spec);
    let ours = chat(&private);
    // The pair runs layer 0; compute shard 0 continues from layer 1 with the shares; the
    // last shard seals the logits to the client, which samples.
    let names = ["mpc-a-0", "mpc-b-0", "compute-0", "compute-1"];
    let expected: Vec<Value> = names.iter().map(|n| wallet(&st, n)).collect();
    assert_eq!(route(&ours), expected);
    let plan = run(unfedctl().arg("plan").arg(&private.spec));
    let plan = text(&plan.stdout);
    assert!(plan.contains("the layer-1 activations"), "{plan}");
    assert!(plan.contains("sealed to the client"), "{plan}");
    assert_eq!(ours["sampled_by"], "client");
    // The same statement as `plan`'s: the node holding layer 1 can recover the prompt.
    let sees = ours["privacy"]["sees"].to_string();
    assert!(
        sees.contains("layer 1") && sees.contains("recover the prompt"),
        "{sees}"
    );
    assert!(plan.contains("recover the prompt"), "{plan}");

    let plain = Net::new(body);
    up(&plain);
    assert_eq!(ours["token_ids"], chat(&plain)["token_ids"]);
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
    let ours = chat(&private);
    // The route is the pair: A, then B — no compute node saw the request.
    assert_eq!(
        route(&ours),
        [wallet(&st, "mpc-a-0"), wallet(&st, "mpc-b-0")]
    );
    let sees = ours["privacy"]["sees"].to_string();
    assert!(
        sees.contains("hides the prompt and the output from every node"),
        "{sees}"
    );
    assert!(!sees.contains("recover the prompt"), "{sees}");

    // `bench` measures the private mode beside the plaintext route, with the client's
    // traffic per party: A gets a seed a step, B the masked tensors, both answer alike.
    let b = common::bench_json(&private.spec, 8, &[]);
    let p = &b["networks"][1];
    assert_eq!(p["label"], "private (full_output_2pc)", "{b}");
    assert_eq!(p["generated_tokens"], 8, "{b}");
    let t = &p["mpc_traffic"];
    assert_eq!(
        (t["prompt_tokens"].as_u64(), t["decode_steps"].as_u64()),
        (Some(23), Some(7)),
        "{t}"
    );
    let per = |party: &str, what: &str| t[party][what].as_f64().unwrap();
    assert!(
        per("a", "to_party_bytes_per_generated_token") < 200.0,
        "{t}"
    );
    assert!(
        per("b", "to_party_bytes_per_generated_token") > 1000.0,
        "{t}"
    );
    let (from_a, from_b) = (
        per("a", "from_party_bytes_per_generated_token"),
        per("b", "from_party_bytes_per_generated_token"),
    );
    assert!(
        from_a > 1000.0 && (from_a - from_b).abs() < 0.01 * from_a,
        "{t}"
    );
    assert!(
        p["over_plaintext_network_decode_ratio"].as_f64().unwrap() > 0.0,
        "{b}"
    );
    // The bound from the same run: the built-in model's matrices (a few MB, no embedding
    // table) over a read rate some memory really has.
    let bound = &b["decode_bound"];
    let bytes = bound["weight_bytes_per_token"].as_u64().unwrap();
    assert!((100_000..16_000_000).contains(&bytes), "{bound}");
    assert!(
        bound["memory_read_gb_per_s"].as_f64().unwrap() > 0.5,
        "{bound}"
    );

    let plain = Net::new(body);
    up(&plain);
    assert_eq!(ours["token_ids"], chat(&plain)["token_ids"]);
}
