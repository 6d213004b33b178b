//! Each kind of spec problem, with its exact message and location.

use std::path::Path;

use unfedctl::plan::{LaunchPlan, model_facts};
use unfedctl::spec;

/// Every problem `text` has, as the CLI prints them (spec + plan checks).
fn problems(text: &str) -> Vec<String> {
    let loaded = match spec::parse("x.toml", text, Path::new("."), "x") {
        Ok(loaded) => loaded,
        Err(errors) => return errors.0.iter().map(ToString::to_string).collect(),
    };
    let facts = model_facts(&loaded);
    match LaunchPlan::build(&loaded, facts) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

fn one_problem(text: &str) -> String {
    let all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.into_iter().next().unwrap()
}

#[test]
fn a_three_line_spec_is_valid() {
    assert_eq!(
        problems("[testnet]\nname = \"mini\"\n[model]\ntext_shards = 1\n"),
        Vec::<String>::new()
    );
    assert_eq!(problems(""), Vec::<String>::new());
}

#[test]
fn unknown_key_names_section_known_keys_and_a_suggestion() {
    assert_eq!(
        one_problem("[model]\ntext_shards = 2\nshardz = 3\n"),
        "x.toml:3:1: unknown key 'shardz' in [model]; known keys: source, path, text_shards, vision_shards"
    );
    assert_eq!(
        one_problem("[model]\ntext_shard = 2\n"),
        "x.toml:2:1: unknown key 'text_shard' in [model] (did you mean 'text_shards'?); known keys: source, path, text_shards, vision_shards"
    );
}

#[test]
fn unknown_section_and_top_level_key() {
    assert_eq!(
        one_problem("[nodez]\nstake = \"1\"\n"),
        "x.toml:1:2: unknown section 'nodez' (did you mean [nodes]?); known sections: [testnet], [chain], [economics], [model], [mpc], [nodes], [daemon], [web], [[node]], [[host]], [[chaos]]"
    );
    assert_eq!(
        one_problem("stake = 1\n"),
        "x.toml:1:1: unknown top-level key 'stake'; known sections: [testnet], [chain], [economics], [model], [mpc], [nodes], [daemon], [web], [[node]], [[host]], [[chaos]]"
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        one_problem("[model]\ntext_shards = \"two\"\n"),
        "x.toml:2:15: wrong type for 'model.text_shards': expected an integer, found a string"
    );
    assert_eq!(
        one_problem("[web]\nenabled = \"yes\"\n"),
        "x.toml:2:11: wrong type for 'web.enabled': expected a boolean (true or false), found a string"
    );
    assert_eq!(
        one_problem("model = 3\n"),
        "x.toml:1:9: 'model' must be a table ([model]), found an integer"
    );
}

#[test]
fn bad_values() {
    assert_eq!(
        one_problem("[chain]\nmode = \"anvill\"\n"),
        "x.toml:2:8: unknown value \"anvill\" for 'chain.mode' (did you mean \"anvil\"?); expected \"anvil\", \"external\", \"none\""
    );
    assert_eq!(
        one_problem("[testnet]\nbase_port = 70000\n"),
        "x.toml:2:13: 'testnet.base_port' must be between 0 and 65535, found 70000"
    );
    assert_eq!(
        one_problem("[model]\ntext_shards = 0\n"),
        "x.toml:2:15: 'model.text_shards' must be between 1 and 1024, found 0"
    );
    assert_eq!(
        one_problem("[nodes]\nstake = \"2e3\"\n"),
        "x.toml:2:9: bad value for 'nodes.stake': '2e3' is not a decimal token amount (write e.g. \"200\" or \"0.5\")"
    );
    assert_eq!(
        one_problem("[economics]\nslash_fraction = 1.5\n"),
        "x.toml:2:18: 'economics.slash_fraction' must be between 0 and 1, found 1.5"
    );
    assert_eq!(
        one_problem("[testnet]\nname = \"my net\"\n"),
        "x.toml:2:8: testnet.name \"my net\" may contain only letters, digits, '-' and '_' (it names the run directory)"
    );
}

#[test]
fn invalid_toml_points_at_the_syntax_error() {
    assert_eq!(
        one_problem("[model\n"),
        "x.toml:1:7: invalid TOML: unclosed table, expected `]`"
    );
}

#[test]
fn all_problems_are_reported_at_once_in_source_order() {
    let all = problems(
        "[model]\nshardz = 1\ntext_shards = \"x\"\n[chain]\nmode = \"eth\"\n[nodes]\nstake = \"50\"\n",
    );
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(all[0].starts_with("x.toml:2:1: unknown key 'shardz'"));
    assert!(all[1].starts_with("x.toml:3:15: wrong type"));
    assert!(all[2].starts_with("x.toml:5:8: unknown value \"eth\""));
}

#[test]
fn stake_below_min_stake() {
    assert_eq!(
        one_problem("[economics]\nmin_stake = \"300\"\n[nodes]\nstake = \"200\"\n"),
        "x.toml:4:9: nodes.stake (200) is below economics.min_stake (300); nodes would not be admitted — raise nodes.stake or lower min_stake"
    );
    assert_eq!(
        one_problem("[[node]]\nrole = \"compute\"\nshard = 1\nstake = \"99.5\"\n"),
        "x.toml:4:9: [[node]] #1 stake (99.5) is below economics.min_stake (100)"
    );
    // Without a chain nothing is staked, so nothing is checked.
    assert_eq!(
        problems("[chain]\nmode = \"none\"\n[nodes]\nstake = \"1\"\n"),
        Vec::<String>::new()
    );
}

#[test]
fn external_chain_needs_rpc_url_and_a_key_per_duty() {
    let all = problems("[chain]\nmode = \"external\"\n");
    let refused = "the public dev keys are refused off Anvil";
    // The nodes' missing keys follow (next test).
    assert_eq!(
        all[..5],
        [
            "x.toml:2:8: chain.mode = \"external\" needs chain.rpc_url (e.g. rpc_url = \"http://127.0.0.1:8545\")".to_string(),
            format!("x.toml:2:8: chain.mode = \"external\" needs chain.operator_key_file (a 0600 file holding the escrow admin's private key; {refused})"),
            format!("x.toml:2:8: chain.mode = \"external\" needs chain.settler_key_file (a 0600 file holding the settlement poster (the daemon)'s private key; {refused})"),
            format!("x.toml:2:8: chain.mode = \"external\" needs chain.slasher_key_file (a 0600 file holding the slasher (the registry)'s private key; {refused})"),
            format!("x.toml:2:8: chain.mode = \"external\" needs chain.client_key_file (a 0600 file holding the client wallet's private key; {refused})"),
        ]
    );
    assert_eq!(all.len(), 8, "{all:#?}");
    assert_eq!(
        one_problem("[chain]\nmode = \"none\"\nrpc_url = \"http://x\"\n"),
        "x.toml:3:11: chain.rpc_url is only used with mode = \"external\" (mode is \"none\"); remove it or switch the mode"
    );
}

/// `[chain]` of an external chain with every duty's key (the faucet's is optional).
const EXTERNAL_CHAIN: &str = "[chain]\nmode = \"external\"\nrpc_url = \"http://127.0.0.1:8545\"\noperator_key_file = \"a.key\"\nsettler_key_file = \"s.key\"\nslasher_key_file = \"l.key\"\nclient_key_file = \"c.key\"\n[model]\ntext_shards = 1\n";

#[test]
fn external_chain_refuses_nodes_on_the_dev_mnemonic() {
    // Every node without eth_key is named, with the override that fixes it.
    assert_eq!(
        problems(EXTERNAL_CHAIN),
        vec![
            "x.toml:2:8: node daemon has no eth_key: with chain.mode = \"external\" every node needs its own key ([[node]] role = \"daemon\", shard = 0, eth_key = \"path/to/0600-key\"); the public dev keys are refused off Anvil",
            "x.toml:2:8: node compute-0 has no eth_key: with chain.mode = \"external\" every node needs its own key ([[node]] role = \"compute\", shard = 0, eth_key = \"path/to/0600-key\"); the public dev keys are refused off Anvil",
        ]
    );
    let keyed = format!(
        "{EXTERNAL_CHAIN}[[node]]\nrole = \"compute\"\neth_key = \"n0.key\"\n[[node]]\nrole = \"daemon\"\neth_key = \"d.key\"\n"
    );
    assert_eq!(problems(&keyed), Vec::<String>::new());
}

#[test]
fn dashboard_https_needs_the_testnet_ca() {
    assert_eq!(
        one_problem("[testnet]\ntls = false\n[web]\ntls = true\n"),
        "x.toml:4:7: web.tls = true needs the testnet CA to issue the dashboard's certificate, but testnet.tls = false; set testnet.tls = true or remove web.tls"
    );
    assert_eq!(problems("[web]\ntls = true\n"), Vec::<String>::new());
}

#[test]
fn the_dashboard_host_must_be_an_ip_address_it_can_bind() {
    assert_eq!(
        one_problem("[web]\nhost = \"localhost\"\n"),
        "x.toml:2:8: web.host \"localhost\" is not an IP address, and the dashboard binds an address; use \"127.0.0.1\" (this machine only)"
    );
    assert_eq!(
        one_problem("[web]\nhost = \"dash.example\"\n"),
        "x.toml:2:8: web.host \"dash.example\" is not an IP address, and the dashboard binds an address; use the IP address to bind (\"127.0.0.1\" for this machine only, \"0.0.0.0\" for every interface)"
    );
    for ok in ["127.0.0.1", "0.0.0.0", "::1"] {
        assert_eq!(
            problems(&format!("[web]\nhost = \"{ok}\"\n")),
            Vec::<String>::new()
        );
    }
}

#[test]
fn mpc_that_cannot_be_served() {
    assert_eq!(
        one_problem("[mpc]\noutput = \"decode_client_sample\"\n"),
        "x.toml:2:10: mpc.output = \"decode_client_sample\" needs an MPC pair to serve it; set mpc.pairs = 1 (or output = \"off\")"
    );
    assert_eq!(
        one_problem("[model]\ntext_shards = 2\n[mpc]\npairs = 1\noutput = \"full_output_2pc\"\n"),
        "x.toml:2:15: mpc.output = \"full_output_2pc\" runs every layer in the MPC pair, so the model must be one text shard; set model.text_shards = 1 (found 2)"
    );
    assert_eq!(
        one_problem("[mpc]\nlayers = 1\n"),
        "x.toml:2:10: mpc.layers needs mpc.pairs >= 1"
    );
}

#[test]
fn model_source_and_path_conflicts() {
    assert_eq!(
        one_problem("[model]\nsource = \"builtin:tiny\"\npath = \"m\"\n"),
        "x.toml:3:8: model.path and model.source are both set; keep one (path = a HuggingFace directory, source = \"builtin:tiny\")"
    );
    assert_eq!(
        one_problem("[model]\nsource = \"hub:qwen\"\n"),
        "x.toml:2:10: unknown model.source \"hub:qwen\"; built-in models: \"builtin:tiny\" (or set model.path to a HuggingFace directory)"
    );
}

#[test]
fn duplicate_ports() {
    assert_eq!(
        one_problem(
            "[[node]]\nrole = \"compute\"\nport = 9000\n[[node]]\nrole = \"compute\"\nshard = 1\nport = 9000\n"
        ),
        "x.toml:7:8: port 9000 is used by both compute-0 and compute-1; give each its own port"
    );
    assert_eq!(
        one_problem("[chain]\nport = 9000\n[web]\nport = 9000\n"),
        "x.toml:4:8: port 9000 is used by both anvil and web; give each its own port"
    );
    // An automatic port moves out of the way of an explicit one.
    assert_eq!(problems("[chain]\nport = 8080\n"), Vec::<String>::new());
}

#[test]
fn override_that_matches_no_node() {
    assert_eq!(
        one_problem("[[node]]\nrole = \"vision\"\n"),
        "x.toml:2:1: [[node]] #1 (role \"vision\", shard 0, replica 0) matches no node of this plan; check model.text_shards, model.vision_shards, mpc.pairs, nodes.replicas and daemon.enabled"
    );
}

#[test]
fn more_shards_than_layers_once_the_model_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":10000.0,"max_position_embeddings":128,"vocab_size":256,"tie_word_embeddings":true,"torch_dtype":"float32"}"#;
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\ntext_shards = 4\n",
        dir.path().display()
    );
    let problem = one_problem(&text);
    assert!(
        problem.ends_with("model.text_shards = 4 but the model has 3 layers; use at most 3 shards"),
        "{problem}"
    );
}

#[test]
fn cheating_is_for_compute_nodes_on_a_local_anvil_only() {
    let compute = "[[node]]\nrole = \"compute\"\nshard = 1\ncheat = \"perturb\"\n";
    assert_eq!(problems(compute), Vec::<String>::new());
    assert_eq!(
        one_problem(&format!("[chain]\nmode = \"none\"\n{compute}")),
        "x.toml:6:9: [[node]] #1 cheat = \"perturb\" is refused on a none chain: cheating modes are for tests and demos on a local Anvil (chain.mode = \"anvil\")"
    );
    assert_eq!(
        one_problem("[[node]]\nrole = \"daemon\"\ncheat = \"wrong-token\"\n"),
        "x.toml:3:9: [[node]] #1 cheat = \"wrong-token\": only compute nodes cheat; set role = \"compute\" or remove cheat"
    );
    assert!(
        one_problem("[[node]]\nrole = \"compute\"\ncheat = \"lie\"\n").contains("\"skip-layers\"")
    );
}

#[test]
fn chaos_a_network_cannot_ride_out_is_a_spec_error() {
    let spec = |chaos: &str| {
        format!("[model]\ntext_shards = 2\n[nodes]\nreplicas = 2\n[[chaos]]\n{chaos}")
    };
    assert_eq!(
        one_problem(&spec("target = \"compute-9\"\naction = \"kill\"\nat = 1\n")),
        "x.toml:6:10: [[chaos]] #1: target = \"compute-9\" is no node of this plan; targets: daemon, compute-0, compute-0-r1, compute-1, compute-1-r1"
    );
    assert_eq!(
        one_problem(
            "[model]\ntext_shards = 2\n[[chaos]]\ntarget = \"compute-1\"\naction = \"kill\"\nat = 1\n"
        ),
        "x.toml:4:10: [[chaos]] #1: compute-1 is the only node of text shard 1: a chat cannot ride out its kill; set nodes.replicas = 2"
    );
    assert_eq!(
        one_problem(&spec("target = \"compute-0\"\naction = \"stop\"\nat = 1\n")),
        "x.toml:7:10: [[chaos]] #1: stop needs duration (seconds)"
    );
    assert_eq!(
        one_problem(&spec(
            "target = \"compute-0\"\naction = \"kill\"\nat = 1\nafter_tokens = 3\n"
        )),
        "x.toml:8:6: [[chaos]] #1: give exactly one of at (seconds after the chats start) or after_tokens"
    );
    assert_eq!(
        one_problem(&spec(
            "target = \"registry\"\naction = \"stop\"\nat = 1\nduration = 1\n"
        )),
        "x.toml:6:10: [[chaos]] #1: target = \"registry\" is a Registry node: chaos targets compute nodes and the daemon (a failing registry, MPC party, vision shard or dashboard is not ridden out yet)"
    );
    assert_eq!(
        one_problem(&spec(
            "target = \"compute-0\"\naction = \"slow\"\nat = 1\nduration = 1\n"
        )),
        "x.toml:7:10: [[chaos]] #1: slow needs delay_ms"
    );
}

#[test]
fn hosts_and_the_nodes_placed_on_them() {
    let hosts = "[[host]]\nname = \"ctl\"\naddress = \"10.0.0.1\"\ncontrol = true\n[[host]]\nname = \"b\"\naddress = \"10.0.0.2\"\n";
    let node_on = |host: &str, role: &str| {
        format!("{hosts}[[node]]\nrole = \"{role}\"\nshard = 1\nhost = \"{host}\"\n")
    };
    assert_eq!(problems(&node_on("b", "compute")), Vec::<String>::new());
    let err = one_problem(&node_on("zz", "compute"));
    assert!(
        err.ends_with("[[node]] #1 host = \"zz\" names no [[host]] (declared: ctl, b)"),
        "{err}"
    );
    let err = one_problem(&format!(
        "{hosts}[mpc]\npairs = 1\n[[node]]\nrole = \"mpc_a\"\nhost = \"b\"\n"
    ));
    assert!(
        err.contains("role \"mpc_a\" runs on the control host; only compute and vision nodes join"),
        "{err}"
    );
    let err = one_problem(&hosts.replace("control = true\n", ""));
    assert!(
        err.contains("0 [[host]] entries have control = true"),
        "{err}"
    );
    let err = one_problem(&hosts.replace("10.0.0.2", "b.example"));
    assert!(
        err.contains("address \"b.example\" is not an IP address"),
        "{err}"
    );
    let err = one_problem(&hosts.replace("name = \"b\"", "name = \"ctl\""));
    assert!(err.contains("name \"ctl\" is used twice"), "{err}");
    let all = problems(&format!("[testnet]\ntls = false\n{hosts}"));
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(
        all[1].ends_with("[[host]] \"b\" is at 10.0.0.2, off loopback, but testnet.tls = false: links between hosts must be encrypted; set testnet.tls = true"),
        "{all:#?}"
    );
    // Loopback aliases may run plaintext (one machine).
    let local = hosts.replace("10.0.0.", "127.0.0.");
    assert_eq!(
        problems(&format!("[testnet]\ntls = false\n{local}")),
        Vec::<String>::new()
    );
    let err = one_problem(&format!("{hosts}[[host]]\nname = \"c\"\n"));
    assert!(err.contains("address"), "{err}");
}
