//! The launch plan of every shipped spec: start order, parallel waves, ports (snapshots).

use std::path::Path;

use unfedctl::plan::{LaunchPlan, load_plan};

fn plan(spec: &str) -> LaunchPlan {
    load_plan(Some(Path::new(&format!("../specs/{spec}.toml")))).unwrap_or_else(|e| panic!("{e}"))
}

/// Position of each named step in start order (waves, then declaration order).
fn position(plan: &LaunchPlan, name: &str) -> (usize, usize) {
    let i = plan
        .steps
        .iter()
        .position(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"));
    (plan.steps[i].wave, i)
}

#[test]
fn smolvlm_starts_in_the_user_guide_order() {
    let plan = plan("smolvlm");
    let order = [
        "anvil",
        "contracts",
        "fund-stake",
        "registry",
        "daemon",
        "mpc-b-0",
        "mpc-a-0",
        "compute-0",
        "vision-0",
        "web",
    ];
    for pair in order.windows(2) {
        let (a, b) = (position(&plan, pair[0]), position(&plan, pair[1]));
        assert!(
            a.0 < b.0,
            "{} (wave {}) must start before {} (wave {})",
            pair[0],
            a.0,
            pair[1],
            b.0
        );
    }
    // Shards of one stage start together; the split runs beside the chain steps.
    assert_eq!(
        position(&plan, "compute-0").0,
        position(&plan, "compute-1").0
    );
    assert_eq!(position(&plan, "split").0, position(&plan, "anvil").0);
    let registry = plan.step("registry").unwrap();
    assert_eq!(registry.after, vec!["fund-stake", "split"]);
}

#[test]
fn every_staked_node_gets_its_own_wallet_and_port() {
    let plan = plan("smolvlm");
    let mut wallets: Vec<usize> = plan.steps.iter().filter_map(|s| s.wallet).collect();
    let count = wallets.len();
    wallets.dedup();
    assert_eq!(wallets.len(), count);
    assert_eq!(count, 6, "daemon, mpc b+a, 2 compute, 1 vision");
    let mut ports: Vec<u16> = plan.steps.iter().filter_map(|s| s.port).collect();
    let count = ports.len();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), count, "ports must be distinct");
}

#[test]
fn base_port_zero_leaves_ports_to_launch_time() {
    let loaded =
        unfedctl::spec::parse("x.toml", "[testnet]\nbase_port = 0\n", Path::new("."), "x").unwrap();
    let facts = unfedctl::plan::model_facts(&loaded);
    let plan = LaunchPlan::build(&loaded, facts).unwrap();
    assert!(plan.steps.iter().all(|s| s.port.is_none()));
}

#[test]
fn chain_none_has_no_chain_steps_and_no_stakes() {
    let loaded =
        unfedctl::spec::parse("x.toml", "[chain]\nmode = \"none\"\n", Path::new("."), "x").unwrap();
    let facts = unfedctl::plan::model_facts(&loaded);
    let plan = LaunchPlan::build(&loaded, facts).unwrap();
    assert!(
        plan.step("anvil").is_none()
            && plan.step("contracts").is_none()
            && plan.step("fund-stake").is_none()
    );
    assert!(
        plan.steps
            .iter()
            .all(|s| s.stake.is_none() && s.wallet.is_none())
    );
    assert_eq!(plan.step("registry").unwrap().after, vec!["split"]);
}

#[test]
fn replicas_and_overrides() {
    let text = "[nodes]\nreplicas = 2\n[[node]]\nrole = \"compute\"\nshard = 1\nreplica = 1\nname = \"gpu\"\nport = 60000\nstake = \"500\"\n";
    let loaded = unfedctl::spec::parse("x.toml", text, Path::new("."), "x").unwrap();
    let facts = unfedctl::plan::model_facts(&loaded);
    let plan = LaunchPlan::build(&loaded, facts).unwrap();
    let names: Vec<&str> = plan
        .steps
        .iter()
        .filter(|s| s.shard.is_some())
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["compute-0", "compute-0-r1", "compute-1", "gpu"]);
    let gpu = plan.step("gpu").unwrap();
    assert_eq!(
        (gpu.port, gpu.stake.map(|s| s.to_string())),
        (Some(60000), Some("500".into()))
    );
    assert_eq!(
        plan.step("web").unwrap().after,
        vec!["compute-0", "compute-0-r1", "compute-1", "gpu"]
    );
}

#[test]
fn shipped_spec_plans() {
    for spec in ["tiny", "qwen", "smolvlm", "chaos"] {
        let plan = plan(spec);
        insta::assert_snapshot!(format!("{spec}_text"), plan.render_text());
        insta::assert_json_snapshot!(format!("{spec}_json"), plan);
    }
}
