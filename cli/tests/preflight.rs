//! Every preflight check, failing: `unfedctl preflight spec|runtime` and `up`'s own
//! preflight, each with the check named and its fix. (The taken port is in up.rs, the web
//! switches and node TLS in preflight.rs's unit tests.)

use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};

use common::{Net, run, text, unfedctl};

mod common;

fn preflight_spec(net: &Net) -> Output {
    run(unfedctl().args(["preflight", "spec"]).arg(&net.spec))
}

/// The NO-GO verdict with exactly one failed check, which contains `want`.
fn no_go(out: &Output, want: &str) {
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("[FAIL]")).collect();
    assert!(
        failed.len() == 1 && failed[0].contains(want),
        "expected one failure about {want:?}:\n{stdout}"
    );
    assert!(stdout.contains("[NO-GO] 1 check(s) failed"), "{stdout}");
}

fn readable_key(net: &Net) -> String {
    let key = net.dir.path().join("k.key");
    std::fs::write(&key, format!("0x{}\n", "11".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    key.display().to_string()
}

/// The built-in model (written under `work`) split in two into `shards`.
fn split_tiny(work: &std::path::Path, shards: &std::path::Path) {
    let src = work.join("tiny-src");
    unfed_model::builtin::write_tiny(&src).unwrap();
    let options = unfed_model::split::SplitOptions {
        text_shards: 2,
        vision_shards: None,
        model_id: None,
        progress: false,
    };
    unfed_model::split::split(&src, shards, &options).unwrap();
}

#[test]
fn the_default_shape_is_go() {
    let net = Net::new("");
    let out = preflight_spec(&net);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("is valid\n"),
        "{}",
        text(&out.stdout)
    );
}

/// `preflight web` says whether the dashboard would offer dev-wallet sign-in: only on
/// loopback with a local Anvil.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_web_reports_dev_wallet_sign_in() {
    let anvil = unfed_chain::Anvil::start(&Default::default())
        .await
        .unwrap();
    let web = |host: &str| {
        let out = run(unfedctl()
            .args(["preflight", "web", "--host", host, "--chain-rpc"])
            .arg(anvil.endpoint()));
        text(&out.stdout)
    };
    let client = unfed_chain::keys::dev_client_signer().unwrap().address();
    assert!(
        web("127.0.0.1").contains(&format!("dev client wallet {client} is ON")),
        "{}",
        web("127.0.0.1")
    );
    let public = web("0.0.0.0");
    assert!(
        public.contains("dev-wallet sign-in is off: the dashboard binds 0.0.0.0, not loopback"),
        "{public}"
    );
}

#[test]
fn an_invalid_spec_fails_the_spec_check_naming_each_problem() {
    let net = Net::new("[model]\nshardz = 2\n");
    let out = preflight_spec(&net);
    no_go(&out, "is valid: ");
    assert!(text(&out.stdout).contains("unknown key 'shardz' in [model]"));
}

#[test]
fn a_readable_node_key_fails() {
    let net = Net::new("");
    let key = readable_key(&net);
    std::fs::write(
        &net.spec,
        format!(
            "{}[[node]]\nrole = \"compute\"\nshard = 0\neth_key = \"{key}\"\n",
            std::fs::read_to_string(&net.spec).unwrap()
        ),
    )
    .unwrap();
    no_go(&preflight_spec(&net), "key file of compute-0 is private: ");
}

#[test]
fn a_readable_operator_key_fails() {
    let net = Net::new("");
    let key = readable_key(&net);
    // Every other key an external chain needs, private.
    let private = |name: &str| {
        let p = net.dir.path().join(name);
        std::fs::write(&p, format!("0x{}\n", "22".repeat(32))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let (settler, slasher, client, node, daemon) = (
        private("s.key"),
        private("l.key"),
        private("c.key"),
        private("n.key"),
        private("d.key"),
    );
    std::fs::write(
        &net.spec,
        format!(
            "{}[chain]\nmode = \"external\"\nrpc_url = \"http://127.0.0.1:1\"\noperator_key_file = \"{key}\"\nsettler_key_file = \"{settler}\"\nslasher_key_file = \"{slasher}\"\nclient_key_file = \"{client}\"\n[model]\ntext_shards = 1\n[[node]]\nrole = \"compute\"\neth_key = \"{node}\"\n[[node]]\nrole = \"daemon\"\neth_key = \"{daemon}\"\n",
            std::fs::read_to_string(&net.spec).unwrap()
        ),
    )
    .unwrap();
    no_go(
        &preflight_spec(&net),
        "chain.operator_key_file is private: ",
    );
}

#[test]
fn a_damaged_cached_split_fails_verification() {
    let net = Net::new("[web]\nenabled = false\n");
    let shards = net.run_dir().join("shards");
    split_tiny(net.dir.path(), &shards);
    std::fs::write(shards.join("text_shard_1.safetensors"), b"damaged").unwrap();
    no_go(&preflight_spec(&net), "verifies: ");
}

/// `up` of a spec whose model directory is missing: NO-GO before anything starts, naming
/// the HuggingFace repository and a download command.
#[test]
fn a_missing_model_directory_is_a_no_go_before_anything_starts() {
    let net = Net::new("[model]\npath = \"models/SmolVLM-256M-Instruct\"\nvision_shards = 1\n");
    let out = run(unfedctl().arg("up").arg(&net.spec).arg("--detach"));
    no_go(
        &out,
        "huggingface-cli download HuggingFaceTB/SmolVLM-256M-Instruct --local-dir",
    );
    assert!(text(&out.stderr).contains("nothing was started"));
    assert!(
        !net.run_dir().join("state.json").exists(),
        "nothing may start"
    );
}

#[test]
fn runtime_checks_fail_without_a_registry_or_a_ready_model() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let out = run(unfedctl()
        .args(["preflight", "runtime", "--registry"])
        .arg(&addr));
    no_go(&out, &format!("registry {addr} answers: "));

    // A registry serving the split, with no compute node: the model is INCOMPLETE.
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    split_tiny(dir.path(), &shards);
    let mut registry = unfedctl()
        .args(["node", "registry", "--port", "0", "--shards-dir"])
        .arg(&shards)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let listening = std::io::BufReader::new(registry.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("listening ").map(str::to_string))
        .expect("the registry prints its address");
    let out = run(unfedctl()
        .args(["preflight", "runtime", "--registry"])
        .arg(&listening));
    let _ = registry.kill();
    let _ = registry.wait();
    no_go(&out, "model builtin-tiny is READY: ");
}
