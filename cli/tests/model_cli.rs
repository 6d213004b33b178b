//! The model verbs through the real `unfedctl` binary: output, exit codes (0 ok,
//! 1 verify problems, 2 usage/input errors), and no output left behind on failure.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

fn unfedctl() -> Command {
    Command::cargo_bin("unfedctl").unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

#[test]
fn inspect_prints_a_table_and_json() {
    unfedctl()
        .arg("inspect")
        .arg(fixture("qwen2-bf16"))
        .assert()
        .success()
        .stdout(predicate::str::contains("architecture     qwen2"))
        .stdout(predicate::str::contains(
            "heads            4 query, 2 key/value",
        ))
        .stdout(predicate::str::contains("tied embeddings  yes"));
    unfedctl()
        .arg("inspect")
        .arg(fixture("idefics3-f32"))
        .assert()
        .success()
        .stdout(predicate::str::contains("architecture     idefics3"))
        .stdout(predicate::str::contains(
            "vision tower     3 layers, hidden 32, 4 heads, image 64px, patch 16, scale factor 2",
        ));
    let out = unfedctl()
        .args(["inspect", "--json"])
        .arg(fixture("llama-f32"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["num_layers"], 4);
    assert_eq!(v["dtype"], "f32");
    assert!(v["parameters"].as_u64().unwrap() > 100_000);
}

#[test]
fn split_then_verify_with_the_user_guide_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    unfedctl()
        .arg("split")
        .arg(fixture("qwen2-sharded"))
        .arg("--output")
        .arg(&out)
        .args(["--num-text-shards", "4"])
        .assert()
        .success()
        .stdout(predicate::str::contains("text_shard_3.safetensors [5..6)"));
    unfedctl()
        .arg("verify")
        .arg(&out)
        .assert()
        .code(0)
        .stdout(predicate::str::contains("verified"));

    // One flipped byte: exit 1, one line per problem naming the file.
    let victim = out.join("text_shard_0.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[200] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    unfedctl()
        .arg("verify")
        .arg(&out)
        .assert()
        .code(1)
        .stdout(predicate::str::starts_with("text_shard_0.safetensors: "))
        .stderr(predicate::str::contains("problem(s)"));
}

#[test]
fn input_errors_exit_2_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("shards");
    unfedctl()
        .arg("split")
        .arg(fixture("mistral-f32"))
        .arg("-o")
        .arg(&out)
        .args(["--text-shards", "9"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "error: --text-shards 9: the model has only 4 text layers",
        ));
    assert!(!out.exists());
    unfedctl()
        .arg("split")
        .arg(tmp.path().join("nope"))
        .arg("-o")
        .arg(&out)
        .args(["--text-shards", "1"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no config.json"));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    unfedctl()
        .arg("verify")
        .arg(tmp.path())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("no manifest.json"));
    // Usage errors from clap also exit 2.
    unfedctl().args(["split", "x"]).assert().code(2);
}

#[test]
fn builtin_tiny_writes_splits_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    unfedctl()
        .args(["model", "tiny", "--output"])
        .arg(&model)
        .assert()
        .success();
    assert!(model.join("model.safetensors").is_file());
    let out = tmp.path().join("shards");
    unfedctl()
        .args(["split", "builtin:tiny", "-o"])
        .arg(&out)
        .args(["--text-shards", "2"])
        .assert()
        .success();
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"model_id\": \"builtin-tiny\""));
    unfedctl().arg("verify").arg(&out).assert().success();
}
