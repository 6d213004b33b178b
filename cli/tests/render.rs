//! `unfedctl render --target kubernetes`: the manifests are valid typed objects, wired
//! together (Services select pods, ports are declared), started in the plan's order,
//! keep secrets out of ConfigMaps, and render deterministically but for fresh keys.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, PodTemplateSpec, Secret, Service,
};
use serde_json::Value;
use unfedctl::plan::{LaunchPlan, load_plan};

use common::unfedctl;

const IMAGE: &str = "registry.example/unfed:test";

/// `unfedctl render SPEC --target kubernetes --image IMAGE -o OUT`.
fn kube_args<'a>(spec: &'a str, out: &'a str) -> [&'a str; 8] {
    [
        "render",
        spec,
        "--target",
        "kubernetes",
        "--image",
        IMAGE,
        "-o",
        out,
    ]
}

/// Renders `spec` (relative to the crate dir) into a temp dir; the files in order.
fn render(spec: &str) -> (tempfile::TempDir, Vec<(String, Value)>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k8s");
    let o = unfedctl()
        .args(kube_args(spec, out.to_str().unwrap()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let docs = files
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", p.display()));
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name, serde_json::to_value(yaml).unwrap())
        })
        .collect();
    (dir, docs)
}

fn smolvlm() -> (tempfile::TempDir, Vec<(String, Value)>) {
    render("../specs/smolvlm.toml")
}

fn plan(spec: &str) -> LaunchPlan {
    load_plan(Some(Path::new(spec))).unwrap_or_else(|e| panic!("{e}"))
}

/// The first path at which `want` holds something `got` lacks or differs in.
fn lost(want: &Value, got: &Value, path: &str) -> Option<String> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => w.iter().find_map(|(k, v)| match g.get(k) {
            None => Some(format!("{path}.{k}")),
            Some(gv) => lost(v, gv, &format!("{path}.{k}")),
        }),
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => w
            .iter()
            .zip(g)
            .enumerate()
            .find_map(|(i, (a, b))| lost(a, b, &format!("{path}[{i}]"))),
        _ if want == got => None,
        _ => Some(format!("{path} (value {want} became {got})")),
    }
}

/// Parses `doc` as the typed object its `kind` names and serializes it again; any field
/// the typed object dropped (k8s-openapi ignores unknown fields) is reported.
fn unknown_field(doc: &Value) -> Result<(), String> {
    fn again<T: serde::de::DeserializeOwned + serde::Serialize>(
        doc: &Value,
    ) -> Result<Value, String> {
        let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
        Ok(serde_json::to_value(typed).unwrap())
    }
    let kind = doc["kind"].as_str().ok_or("no kind")?;
    let round = match kind {
        "Namespace" => again::<Namespace>(doc),
        "ConfigMap" => again::<ConfigMap>(doc),
        "Secret" => again::<Secret>(doc),
        "PersistentVolumeClaim" => again::<PersistentVolumeClaim>(doc),
        "Service" => again::<Service>(doc),
        "Deployment" => again::<Deployment>(doc),
        "StatefulSet" => again::<StatefulSet>(doc),
        "Job" => again::<Job>(doc),
        other => return Err(format!("unexpected kind {other}")),
    }?;
    match lost(doc, &round, "") {
        None => Ok(()),
        Some(field) => Err(format!("unknown field {field}")),
    }
}

#[test]
fn manifests_parse_into_typed_objects_with_no_unknown_field() {
    let (_dir, docs) = smolvlm();
    assert!(docs.len() > 10);
    for (file, doc) in &docs {
        unknown_field(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    // The check catches what deserialization alone would let through.
    let (file, doc) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "StatefulSet")
        .unwrap();
    let mut bad = doc.clone();
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = Value::Bool(true);
    let err = unknown_field(&bad).expect_err(file);
    assert!(err.contains("readinessProbes"), "{err}");
}

/// Every pod template with its owner's file name.
fn templates(docs: &[(String, Value)]) -> Vec<(String, PodTemplateSpec)> {
    docs.iter()
        .filter(|(_, d)| {
            matches!(
                d["kind"].as_str(),
                Some("StatefulSet" | "Deployment" | "Job")
            )
        })
        .map(|(f, d)| {
            (
                f.clone(),
                serde_json::from_value(d["spec"]["template"].clone()).unwrap(),
            )
        })
        .collect()
}

fn labels(t: &PodTemplateSpec) -> BTreeMap<String, String> {
    t.metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn port_matches(
    port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    declared: &[k8s_openapi::api::core::v1::ContainerPort],
) -> bool {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    declared.iter().any(|p| match port {
        IntOrString::Int(n) => p.container_port == *n,
        IntOrString::String(name) => p.name.as_deref() == Some(name),
    })
}

#[test]
fn every_service_selects_a_pod_on_declared_container_ports() {
    let (_dir, docs) = smolvlm();
    let templates = templates(&docs);
    let mut services = 0;
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "Service") {
        services += 1;
        let svc: Service = serde_json::from_value(doc.clone()).unwrap();
        let spec = svc.spec.unwrap();
        let selector = spec.selector.unwrap_or_default();
        assert!(!selector.is_empty(), "{file}: selects nothing");
        let selected: Vec<_> = templates
            .iter()
            .filter(|(_, t)| {
                let l = labels(t);
                selector.iter().all(|(k, v)| l.get(k) == Some(v))
            })
            .collect();
        assert!(
            !selected.is_empty(),
            "{file}: selector {selector:?} matches no pod template"
        );
        for port in spec.ports.unwrap_or_default() {
            let target = port.target_port.clone().unwrap_or(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port.port),
            );
            for (owner, t) in &selected {
                let declared: Vec<_> = t
                    .spec
                    .as_ref()
                    .unwrap()
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.clone().unwrap_or_default())
                    .collect();
                assert!(
                    port_matches(&target, &declared),
                    "{file}: port {:?} targets {target:?}, which {owner} does not declare",
                    port.name
                );
            }
        }
    }
    assert!(services >= 8, "only {services} services");
}

#[test]
fn every_probe_port_is_a_declared_container_port() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let (_dir, docs) = smolvlm();
    let mut grpc_probes = 0;
    for (file, t) in templates(&docs) {
        for c in &t.spec.unwrap().containers {
            let declared = c.ports.clone().unwrap_or_default();
            for probe in [&c.readiness_probe, &c.liveness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
            {
                let port = if let Some(g) = &probe.grpc {
                    grpc_probes += 1;
                    IntOrString::Int(g.port)
                } else if let Some(h) = &probe.http_get {
                    h.port.clone()
                } else if let Some(tcp) = &probe.tcp_socket {
                    tcp.port.clone()
                } else {
                    panic!("{file}: container {} has a probe without a port", c.name)
                };
                assert!(
                    port_matches(&port, &declared),
                    "{file}: container {} probes {port:?}, not among its ports {declared:?}",
                    c.name
                );
            }
        }
    }
    // registry, daemon, mpc-b-0, mpc-a-0, compute-0, compute-1, vision-0
    assert_eq!(grpc_probes, 7);
}

/// Every step `name` waits for, directly or not (computed here, from the plan's edges).
fn closure(plan: &LaunchPlan, names: &[&str]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    while let Some(n) = todo.pop() {
        for d in &plan.step(&n).unwrap().after {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    for n in names {
        seen.remove(*n);
    }
    seen
}

#[test]
fn init_containers_follow_the_plan_waves() {
    let plan = plan("../specs/smolvlm.toml");
    let order: Vec<String> = plan
        .waves()
        .into_values()
        .flatten()
        .map(|s| s.name.clone())
        .collect();
    let (_dir, docs) = smolvlm();
    let mut checked = 0;
    for (file, t) in templates(&docs) {
        let step = labels(&t)["unfed.dev/step"].clone();
        // The chain Job runs contracts and fund-stake, one after the other.
        let own: Vec<&str> = if step == "contracts" {
            vec!["contracts", "fund-stake"]
        } else {
            vec![step.as_str()]
        };
        let waits: Vec<String> = t
            .spec
            .unwrap()
            .init_containers
            .unwrap_or_default()
            .iter()
            .map(|c| {
                c.name
                    .strip_prefix("wait-")
                    .unwrap_or_else(|| panic!("{file}: init container {} is no wait", c.name))
                    .to_string()
            })
            .collect();
        let deps = closure(&plan, &own);
        let expected: Vec<String> = order
            .iter()
            .filter(|n| deps.contains(*n))
            .cloned()
            .collect();
        assert_eq!(
            waits, expected,
            "{file}: init containers out of the plan's order"
        );
        let waves: Vec<usize> = waits.iter().map(|w| plan.step(w).unwrap().wave).collect();
        assert!(waves.is_sorted(), "{file}: waves {waves:?}");
        checked += 1;
    }
    // anvil, split, chain, 7 nodes, web.
    assert_eq!(checked, 11);
    // The last compute shard waits for the whole chain of steps before it.
    let web = templates(&docs)
        .into_iter()
        .find(|(f, _)| f.ends_with("statefulset-web.yaml"))
        .unwrap()
        .1;
    assert_eq!(web.spec.unwrap().init_containers.unwrap().len(), 11);
}

/// Every Secret value, decoded.
fn secret_values(docs: &[(String, Value)]) -> Vec<(String, String)> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == "Secret")
        .flat_map(|(f, d)| {
            let s: Secret = serde_json::from_value(d.clone()).unwrap();
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (format!("{f}:{k}"), String::from_utf8(v.0).unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn no_secret_value_is_in_a_config_map() {
    let (dir, docs) = smolvlm();
    let secrets = secret_values(&docs);
    assert!(secrets.iter().any(|(k, _)| k.ends_with("tls.key")));
    assert!(secrets.iter().any(|(k, _)| k.ends_with("wallet.key")));
    let config: Vec<String> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "ConfigMap")
        .flat_map(|(_, d)| {
            d["data"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!config.is_empty());
    for (name, value) in &secrets {
        // The whole value, and each long line of it (a PEM body line, a hex key).
        let pieces = std::iter::once(value.trim()).chain(value.lines().filter(|l| l.len() >= 16));
        for piece in pieces {
            for text in &config {
                assert!(!text.contains(piece), "{name} appears in a ConfigMap");
            }
        }
    }
    // Secret files are private: they hold keys.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir.path().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if path.to_string_lossy().contains("-secret-") {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
}

/// The render with every Secret value replaced: the rest is deterministic.
fn redacted(docs: &[(String, Value)]) -> String {
    let mut out = String::new();
    for (file, doc) in docs {
        let mut doc = doc.clone();
        if doc["kind"] == "Secret" {
            for v in doc["data"].as_object_mut().unwrap().values_mut() {
                *v = Value::String("[REDACTED]".into());
            }
        }
        let yaml: serde_yaml_ng::Value = serde_json::from_value(doc).unwrap();
        out.push_str(&format!(
            "# {file}\n{}---\n",
            serde_yaml_ng::to_string(&yaml).unwrap()
        ));
    }
    out
}

#[test]
fn smolvlm_snapshot_is_deterministic_but_keys_are_fresh() {
    let (_a, first) = smolvlm();
    let (_b, second) = smolvlm();
    assert_eq!(redacted(&first), redacted(&second));
    let key = |docs: &[(String, Value)]| {
        secret_values(docs)
            .into_iter()
            .find(|(k, _)| k.ends_with("registry-tls.yaml:tls.key"))
            .unwrap()
            .1
    };
    assert_ne!(key(&first), key(&second), "render reused a private key");
    insta::assert_snapshot!("smolvlm_kubernetes", redacted(&first));
}

fn render_err(args: &[&str]) -> String {
    let o = unfedctl().args(args).output().unwrap();
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn bad_input_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let spec = "../specs/tiny.toml";

    let err = render_err(&[
        "render", spec, "--target", "nomad", "--image", IMAGE, "-o", out,
    ]);
    assert!(err.contains("nomad") && err.contains("kubernetes"), "{err}");

    let err = render_err(&["render", spec, "--target", "kubernetes", "-o", out]);
    assert!(
        err.contains("--image") && err.contains("Dockerfile"),
        "{err}"
    );

    let render_into = |dir: &Path| render_err(&kube_args(spec, dir.to_str().unwrap()));
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = render_into(&file);
    assert!(
        err.contains("is a file") && err.contains("directory"),
        "{err}"
    );

    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("old.yaml"), "x").unwrap();
    let err = render_into(&full);
    assert!(err.contains("not empty"), "{err}");
    assert!(!Path::new(out).exists(), "a failed render wrote files");
}

#[test]
fn wait_gives_up_at_the_deadline_naming_what_it_waited_for() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let err = render_err(&["wait", "--grpc-health", &addr, "--timeout", "1s"]);
    assert!(
        err.contains("gave up after") && err.contains(&addr),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));

    let dir = tempfile::tempdir().unwrap();
    let ok = unfedctl()
        .args(["wait", "--file"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(ok.status.success());
    let err = render_err(&["wait", "--timeout", "1s"]);
    assert!(err.contains("exactly one of"), "{err}");
}

/// The node's `unfed-node` arguments, from its command (direct, or the shell line that
/// sources the chain env file first; the addresses it would read are stand-ins here).
fn node_args(command: &[String]) -> Vec<String> {
    if command[0] == "unfed-node" {
        return command[1..].to_vec();
    }
    let line = command.last().unwrap();
    let (_, rest) = line.split_once("exec unfed-node ").unwrap();
    rest.split(' ')
        .map(|w| {
            if w.starts_with("\"$UNFED_") {
                "0x5FbDB2315678afecb367f032d93F642f64180aa3".to_string()
            } else {
                w.trim_matches('\'').to_string()
            }
        })
        .collect()
}

#[test]
fn every_node_command_is_accepted_by_unfed_node() {
    let (_dir, docs) = smolvlm();
    let mut nodes = 0;
    for (file, doc) in docs.iter().filter(|(_, d)| d["kind"] == "StatefulSet") {
        let set: StatefulSet = serde_json::from_value(doc.clone()).unwrap();
        let c = &set.spec.unwrap().template.spec.unwrap().containers[0];
        let args = node_args(c.command.as_ref().unwrap());
        // clap checks every argument before it reaches the trailing --help.
        let o = unfedctl()
            .arg("node")
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{file}: unfed-node refuses {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        nodes += 1;
    }
    assert_eq!(nodes, 8);
}

#[test]
fn wait_hands_the_deployed_contracts_to_the_node_through_an_env_file() {
    use unfedctl::launch::state::{ChainRecord, RunState};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let env = dir.path().join("chain.env");
    let wait = |timeout: &str| {
        unfedctl()
            .args(["wait", "--timeout", timeout, "--chain-state"])
            .arg(&state)
            .arg("--env-file")
            .arg(&env)
            .output()
            .unwrap()
    };
    // Recorded chain, contracts not deployed yet: still waiting at the deadline.
    let mut run = RunState {
        chain: Some(ChainRecord {
            rpc_url: "http://anvil:8545".into(),
            chain_id: 31337,
            token: None,
            escrow: None,
            operator: None,
            client: None,
            wallets: vec![],
        }),
        ..RunState::default()
    };
    run.save(dir.path()).unwrap();
    let o = wait("1s");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("contracts not deployed yet"));
    assert!(!env.exists());
    // What `unfedctl chain deploy` records, in the format it records it.
    let chain = run.chain.as_mut().unwrap();
    chain.escrow = Some("0x5FbDB2315678afecb367f032d93F642f64180aa3".into());
    chain.token = Some("0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512".into());
    run.save(dir.path()).unwrap();
    let o = wait("5s");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&env).unwrap(),
        "UNFED_ESCROW=0x5FbDB2315678afecb367f032d93F642f64180aa3\nUNFED_TOKEN=0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512\nUNFED_CHAIN_ID=31337\n"
    );
}

/// compute-0's memory request and how it was estimated.
fn compute0_memory(docs: &[(String, Value)]) -> (String, String) {
    let (_, doc) = docs
        .iter()
        .find(|(f, _)| f.ends_with("statefulset-compute-0.yaml"))
        .unwrap();
    let t = &doc["spec"]["template"];
    (
        t["spec"]["containers"][0]["resources"]["requests"]["memory"]
            .as_str()
            .unwrap()
            .to_string(),
        t["metadata"]["annotations"]["unfed.dev/memory-estimate"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[test]
fn memory_requests_come_from_the_split_or_the_config() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2-f32");
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("net.toml");
    std::fs::write(
        &spec,
        format!(
            "[testnet]\nname = \"net\"\n[chain]\nmode = \"none\"\n[model]\npath = \"{}\"\ntext_shards = 2\n",
            model.display()
        ),
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    let (_a, docs) = render(spec);
    let (memory, how) = compute0_memory(&docs);
    assert!(how.contains("config.json"), "{how}");
    // Unsplit: the weights estimated from the shape, plus 512Mi KV cache and 256Mi runtime.
    assert_eq!(memory, "769Mi", "{how}");

    // Once split on this machine, the manifest's exact sizes are used.
    let shards = dir.path().join(".unfed/net/shards");
    let o = unfedctl()
        .arg("split")
        .arg(&model)
        .arg("-o")
        .arg(&shards)
        .args(["--text-shards", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(shards.join("manifest.json")).unwrap()).unwrap();
    let size = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["index"] == 0 && s["stack"] == "text")
        .unwrap()["size"]
        .as_u64()
        .unwrap();
    let (_b, docs) = render(spec);
    let (memory, how) = compute0_memory(&docs);
    assert!(how.contains("manifest.json"), "{how}");
    assert_eq!(
        memory,
        format!("{}Mi", size.div_ceil(1 << 20) + 768),
        "{how}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_job_script_deploys_funds_and_stakes_on_an_anvil_started_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("net.toml");
    std::fs::write(
        &spec,
        "[testnet]\nname = \"net\"\n[mpc]\npairs = 0\n[daemon]\nenabled = false\n[web]\nenabled = false\n",
    )
    .unwrap();
    let (_r, docs) = render(spec.to_str().unwrap());
    let doc = |suffix: &str| {
        docs.iter()
            .find(|(f, _)| f.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix}"))
            .1
            .clone()
    };
    // The Anvil Deployment's place is taken by a local Anvil (loopback).
    let anvil = unfed_chain::Anvil::start(&unfed_chain::AnvilOptions::default())
        .await
        .unwrap();
    let run = dir.path().join("run");
    let cluster_spec = dir.path().join("in-cluster.toml");
    let text = doc("configmap-spec.yaml")["data"]["testnet.toml"]
        .as_str()
        .unwrap()
        .replace("/data/run", run.to_str().unwrap());
    std::fs::write(&cluster_spec, text).unwrap();
    let job = doc("job-chain.yaml");
    let script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap()
        .replace(
            "/etc/unfed/spec/testnet.toml",
            cluster_spec.to_str().unwrap(),
        )
        .replace("/data/run", run.to_str().unwrap())
        .replace("http://anvil.net.svc:8545", &anvil.endpoint());
    let bin = Path::new(env!("CARGO_BIN_EXE_unfedctl"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = tokio::process::Command::new("/bin/sh")
        .args(["-c", &script])
        .env("PATH", path)
        .output()
        .await
        .unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(run.join("fund-stake.done").exists());
    // What the nodes' init containers then read.
    let env = dir.path().join("chain.env");
    let o = unfedctl()
        .args(["wait", "--timeout", "5s", "--chain-state"])
        .arg(run.join("state.json"))
        .arg("--env-file")
        .arg(&env)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let env = std::fs::read_to_string(env).unwrap();
    assert!(env.contains("UNFED_ESCROW=0x"), "{env}");
    // The wallets staked are the ones the node Secrets hold (same --eth-address).
    let state: Value =
        serde_json::from_slice(&std::fs::read(run.join("state.json")).unwrap()).unwrap();
    let set = doc("statefulset-compute-0.yaml");
    let args = node_args(
        &serde_json::from_value::<Vec<String>>(
            set["spec"]["template"]["spec"]["containers"][0]["command"].clone(),
        )
        .unwrap(),
    );
    let i = args.iter().position(|a| a == "--eth-address").unwrap();
    let staked = state["chain"]["wallets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["node"] == "compute-0")
        .unwrap();
    assert_eq!(staked["address"].as_str(), Some(args[i + 1].as_str()));
}

#[test]
fn an_external_chain_gets_the_specs_key_files_as_secrets_and_paths_in_the_config_map() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    for (i, name) in ["operator", "settler", "slasher", "client", "node"]
        .iter()
        .enumerate()
    {
        let path = dir.path().join(format!("{name}.key"));
        let key = format!("0x{:064x}", 0xabc0 + i);
        std::fs::write(&path, &key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        keys.push(key);
    }
    let spec = dir.path().join("ext.toml");
    std::fs::write(
        &spec,
        "[testnet]\nname = \"ext\"\n[chain]\nmode = \"external\"\nrpc_url = \"https://rpc.example:8545\"\n\
         operator_key_file = \"operator.key\"\nsettler_key_file = \"settler.key\"\n\
         slasher_key_file = \"slasher.key\"\nclient_key_file = \"client.key\"\n\
         [model]\ntext_shards = 1\n[mpc]\npairs = 0\n[daemon]\nenabled = false\n[web]\nenabled = false\n\
         [[node]]\nrole = \"compute\"\nshard = 0\neth_key = \"node.key\"\n",
    )
    .unwrap();
    let (_r, docs) = render(spec.to_str().unwrap());
    assert!(
        !docs.iter().any(|(f, _)| f.contains("anvil")),
        "no Anvil off testnet mode"
    );
    let secrets = secret_values(&docs);
    let chain_keys: BTreeMap<_, _> = secrets
        .iter()
        .filter(|(k, _)| k.contains("secret-chain-keys"))
        .map(|(k, v)| (k.rsplit(':').next().unwrap().to_string(), v.clone()))
        .collect();
    assert_eq!(
        chain_keys.keys().collect::<Vec<_>>(),
        [
            "client.key",
            "node-0.key",
            "operator.key",
            "settler.key",
            "slasher.key"
        ]
    );
    let config = docs
        .iter()
        .find(|(f, _)| f.ends_with("configmap-spec.yaml"))
        .unwrap()
        .1["data"]["testnet.toml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        config.contains("eth_key = \"/etc/unfed/chain-keys/node-0.key\""),
        "{config}"
    );
    for key in &keys {
        assert!(!config.contains(key.as_str()));
        assert!(chain_keys.values().any(|v| v == key));
    }
    // The node runs as the spec's key: its Secret holds it, the rpc is the spec's.
    assert!(
        secrets
            .iter()
            .any(|(k, v)| k.contains("compute-0-keys") && v == &keys[4])
    );
    let job = &docs
        .iter()
        .find(|(f, _)| f.ends_with("job-chain.yaml"))
        .unwrap()
        .1;
    let script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert!(!script.contains("--rpc-url"), "{script}");
}
