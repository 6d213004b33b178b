//! The real `unfedctl` binary: exit codes, output streams, `init`.

use assert_cmd::Command;
use predicates::prelude::*;

fn unfedctl() -> Command {
    Command::cargo_bin("unfedctl").unwrap()
}

#[test]
fn a_bad_spec_exits_2_with_every_problem_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("x.toml");
    std::fs::write(&spec, "[model]\nshardz = 3\n[chain]\nmode = \"eth\"\n").unwrap();
    unfedctl()
        .arg("plan")
        .arg(&spec)
        .assert()
        .code(2)
        .stdout("")
        .stderr(predicate::str::contains(
            "x.toml:2:1: unknown key 'shardz' in [model]",
        ))
        .stderr(predicate::str::contains(
            "x.toml:4:8: unknown value \"eth\" for 'chain.mode'",
        ))
        .stderr(predicate::str::ends_with("error: 2 problems in the spec\n"));
}

#[test]
fn a_missing_spec_says_how_to_make_one() {
    unfedctl()
        .args(["plan", "no/such.toml"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "no/such.toml: cannot read the spec",
        ))
        .stderr(predicate::str::contains("unfedctl init no/such.toml"));
}

#[test]
fn plan_without_a_spec_uses_the_embedded_default() {
    unfedctl()
        .arg("plan")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Launch plan for testnet 'tiny' (<embedded specs/tiny.toml>)",
        ));
    let out = unfedctl().args(["plan", "--json"]).output().unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["name"], "tiny");
}

#[test]
fn init_writes_each_template_as_a_valid_spec_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    for template in ["tiny", "qwen", "smolvlm"] {
        let path = dir.path().join(format!("{template}.toml"));
        unfedctl()
            .args(["init", "--template", template])
            .arg(&path)
            .assert()
            .success();
        unfedctl().arg("plan").arg(&path).assert().success();
        unfedctl()
            .args(["init", "--template", template])
            .arg(&path)
            .assert()
            .failure()
            .stderr(predicate::str::contains(
                "already exists; choose another path or pass --force",
            ));
    }
}

#[test]
fn the_tiny_template_documents_every_key() {
    let template = unfedctl::init::Template::Tiny.text();
    for section in unfedctl::spec::schema::SECTIONS {
        for key in section.keys {
            assert!(
                template.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{} =", key.name))),
                "templates/tiny.toml does not mention {}.{}",
                section.name,
                key.name
            );
        }
    }
}

#[test]
fn preflight_prints_one_line_per_check_and_a_verdict() {
    unfedctl()
        .args(["preflight", "node", "--advertise", "203.0.113.42:50051"])
        .assert()
        .code(1)
        .stdout(predicate::str::contains(
            "[FAIL] TLS: certificate, key and CA are given: the node at 203.0.113.42 would serve plaintext",
        ))
        .stdout(predicate::str::ends_with("[NO-GO] 1 check(s) failed\n"));
    unfedctl()
        .args(["preflight", "web"])
        .env_remove("UNFED_DEV_AUTH_BYPASS")
        .env_remove("UNFED_DEMO_AUTH")
        .env_remove("UNFED_FAUCET_ENABLED")
        .assert()
        .success()
        .stdout(predicate::str::ends_with("[GO]\n"));
    unfedctl()
        .args(["preflight", "web"])
        .env("UNFED_DEV_AUTH_BYPASS", "1")
        .assert()
        .code(1)
        .stdout(predicate::str::contains(
            "[FAIL] web: dev auth bypass is off: UNFED_DEV_AUTH_BYPASS is on; unset it",
        ));
    unfedctl()
        .args(["preflight", "spec", "../specs/tiny.toml"])
        .assert()
        .stdout(predicate::str::contains(
            "[PASS] spec ../specs/tiny.toml is valid",
        ));
}
