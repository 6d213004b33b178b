//! `unfedctl up` / `down` / `status` against real processes: Anvil, contracts, stakes, the
//! registry and compute nodes. Every testnet uses free ports and its own temp dir.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Net, run, state, text, unfedctl};
use serde_json::Value;

mod common;

/// A spec with free ports and no daemon or web (the tests here watch the core roles).
fn testnet(extra: &str) -> Net {
    Net::new(&format!(
        "[daemon]\nenabled = false\n[web]\nenabled = false\n{extra}"
    ))
}

fn pids(state: &Value) -> Vec<i32> {
    state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect()
}

fn alive(pid: i32) -> bool {
    // Not a zombie and still there.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

fn wait_all_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes still alive: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::yield_now();
    }
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn up_detach_then_status_then_down_leaves_nothing_running() {
    let net = testnet("");
    let spec = net.spec.as_path();
    let out = net.up_detached();
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("model      builtin-tiny (READY)"),
        "{stdout}"
    );

    let st = state(spec);
    let names: Vec<&str> = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["anvil", "registry", "compute-0", "compute-1"]);
    assert_eq!(st["chain"]["wallets"].as_array().unwrap().len(), 2);
    let key = PathBuf::from(st["chain"]["wallets"][0]["key_file"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A second `up` reports the running testnet instead of starting another.
    let again = run(unfedctl().arg("up").arg(spec).arg("--detach"));
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("testnet 'net' is already running"),
        "{}",
        text(&again.stderr)
    );

    let status = run(unfedctl().arg("status").arg(spec).arg("--json"));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["alive"] == true)
    );
    assert_eq!(status["models"][0]["ready"], true);
    let compute = &status["nodes"][2];
    assert_eq!(
        (compute["name"].as_str(), compute["admitted"].as_bool()),
        (Some("compute-0"), Some(true))
    );
    assert_eq!(compute["stake"], "200");
    assert!(status["chain_height"].as_u64().unwrap() > 0);

    let pids = pids(&st);
    let ports: Vec<u16> = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap() as u16)
        .collect();
    let down = run(unfedctl().arg("down").arg(spec));
    assert!(down.status.success(), "{}", text(&down.stderr));
    wait_all_gone(&pids);
    assert!(
        ports.iter().all(|p| port_free(*p)),
        "a port is still in use: {ports:?}"
    );
    // down is idempotent.
    assert!(run(unfedctl().arg("down").arg(spec)).status.success());
}

#[test]
fn a_node_that_fails_to_start_tears_everything_down_and_shows_its_log() {
    let net = testnet("");
    let spec = net.spec.as_path();
    // First run splits the model; then damage shard 1 so its node cannot load it.
    let out = run(unfedctl().arg("up").arg(spec).arg("--detach"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(run(unfedctl().arg("down").arg(spec)).status.success());
    let shard = spec
        .parent()
        .unwrap()
        .join(".unfed/net/shards/text_shard_1.safetensors");
    std::fs::write(&shard, b"not a safetensors file").unwrap();

    let out = run(unfedctl()
        .arg("up")
        .arg(spec)
        .arg("--detach")
        .args(["--wait-timeout", "20"]));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("step 'compute-1' failed"), "{stderr}");
    assert!(stderr.contains("last lines of"), "{stderr}");
    assert!(
        text(&out.stdout).contains("tearing down"),
        "{}",
        text(&out.stdout)
    );
    let st = state(spec);
    assert!(st["processes"].as_array().unwrap().is_empty());
}

#[test]
fn a_taken_port_is_a_no_go_naming_the_port() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    let net = testnet(&format!(
        "[[node]]\nrole = \"compute\"\nshard = 1\nport = {port}\n"
    ));
    let spec = net.spec.as_path();
    let out = run(unfedctl().arg("up").arg(spec).arg("--detach"));
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    let expected =
        format!("[FAIL] port {port} for compute-1 is free: port {port} is already in use");
    assert!(stdout.contains(&expected), "{stdout}");
    assert!(stdout.contains("[NO-GO] 1 check(s) failed"), "{stdout}");
    assert!(text(&out.stderr).contains("preflight is NO-GO; nothing was started"));
    assert!(
        !spec
            .parent()
            .unwrap()
            .join(".unfed/net/state.json")
            .exists(),
        "nothing may start"
    );
}

/// `unfedctl up` in the foreground, its output piped.
fn foreground_up(spec: &std::path::Path) -> std::process::Child {
    unfedctl()
        .arg("up")
        .arg(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn ctrl_c_in_the_foreground_stops_every_process() {
    let net = testnet("");
    let spec = net.spec.as_path();
    let mut child = foreground_up(spec);
    let state_file = spec.parent().unwrap().join(".unfed/net/state.json");
    // Wait until some processes have started, then interrupt mid-way or once up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        if let Ok(bytes) = std::fs::read(&state_file)
            && let Ok(st) = serde_json::from_slice::<Value>(&bytes)
            && pids(&st).len() >= 2
        {
            break pids(&st);
        }
        assert!(Instant::now() < deadline, "up never started two processes");
        std::thread::yield_now();
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut all = started;
    all.extend(pids(&state(spec)));
    wait_all_gone(&all);
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("stopped anvil"), "{out}");
    let _ = status;
}

#[test]
fn two_conformance_runs_side_by_side_both_pass() {
    let dir = tempfile::tempdir().unwrap();
    let junit = |i: usize| dir.path().join(format!("junit-{i}.xml"));
    let runs: Vec<_> = (0..2)
        .map(|i| {
            unfedctl()
                .args(["test", "../specs/tiny.toml", "--junit"])
                .arg(junit(i))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let out = run.wait_with_output().unwrap();
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "run {i}:\n{stdout}\n{}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains("[PASS] chat_matches_single_process_engine"),
            "{stdout}"
        );
        assert!(stdout.contains("6 passed, 0 failed"), "{stdout}");
        let xml = std::fs::read_to_string(junit(i)).unwrap();
        assert!(xml.contains("tests=\"6\" failures=\"0\""), "{xml}");
    }
}

#[test]
fn a_vision_language_model_gets_its_vision_shard_after_the_text_shards() {
    let fixture = std::fs::canonicalize("../tests/fixtures/models/idefics3-f32").unwrap();
    let net = testnet(&format!(
        "[model]\npath = \"{}\"\ntext_shards = 2\nvision_shards = 1\n",
        fixture.display()
    ));
    let spec = net.spec.as_path();
    let out = net.up_detached();
    assert!(text(&out.stdout).contains("model      idefics3-f32 (READY)"));
    let st = state(spec);
    let names: Vec<&str> = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["anvil", "registry", "compute-0", "compute-1", "vision-0"]
    );

    let image = std::fs::canonicalize("../tests/fixtures/vision/square.png").unwrap();
    let chat = run(unfedctl()
        .arg("chat")
        .arg(spec)
        .arg("--image")
        .arg(&image)
        .args(["--prompt", "What is this?", "--max-tokens", "4", "--json"]));
    assert!(chat.status.success(), "{}", text(&chat.stderr));
    let answer: Value = serde_json::from_slice(&chat.stdout).unwrap();
    assert_eq!(answer["token_ids"].as_array().unwrap().len(), 4);
    // The image's placeholder rows are part of the prompt.
    assert!(answer["prompt_tokens"].as_u64().unwrap() > 50, "{answer}");
}

#[test]
fn without_a_chain_everything_runs_unstaked() {
    let net = testnet("[chain]\nmode = \"none\"\n");
    let spec = net.spec.as_path();
    net.up_detached();
    let st = state(spec);
    let names: Vec<&str> = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["registry", "compute-0", "compute-1"]);
    assert!(st["chain"].is_null());
    let chat = run(unfedctl().arg("chat").arg(spec).args([
        "--prompt",
        "Hello",
        "--max-tokens",
        "4",
        "--json",
    ]));
    assert!(chat.status.success(), "{}", text(&chat.stderr));
    let answer: Value = serde_json::from_slice(&chat.stdout).unwrap();
    assert_eq!(answer["token_ids"].as_array().unwrap().len(), 4);

    // A cached split in an older manifest format is made again by the next `up`.
    assert!(run(unfedctl().arg("down").arg(spec)).status.success());
    let manifest = net.run_dir().join("shards/manifest.json");
    let format = |m: &Value| m["format_version"].as_u64().unwrap();
    let mut m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let current = format(&m);
    m["format_version"] = 1.into();
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    net.up_detached();
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(format(&m), current, "the old split was served");
    net.chat_ok();
}

#[test]
fn web_tls_serves_the_dashboard_over_https_from_the_testnet_ca() {
    // Every interface: the certificate, the probe and the printed URL use loopback.
    let net = Net::new(
        "[chain]\nmode = \"none\"\n[daemon]\nenabled = false\n[web]\ntls = true\nhost = \"0.0.0.0\"\n",
    );
    let spec = net.spec.as_path();
    let out = net.up_detached();
    assert!(
        text(&out.stdout).contains("dashboard  https://127.0.0.1:"),
        "{}",
        text(&out.stdout)
    );
    let url = state(spec)["dashboard"].as_str().unwrap().to_string();
    let status = run(unfedctl().arg("status").arg(spec));
    assert!(text(&status.stdout).contains(&format!("dashboard {url}")));
    // A client trusting the testnet CA gets the API over HTTPS; plain HTTP gets nothing.
    let addr = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let ca = net.run_dir().join("keys/tls/ca.crt");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (https, plain) = rt.block_on(async {
        let https = unfed_node::web::probe::Probe::https(&ca).unwrap();
        let plain = unfed_node::web::probe::Probe::plain();
        (
            https.get(&addr, "/api/models").await,
            plain.get(&addr, "/api/models").await,
        )
    });
    assert_eq!(https.unwrap().status, 200);
    assert!(plain.is_err(), "{plain:?}");
}

#[test]
fn down_stops_a_foreground_up_without_it_reporting_a_crash() {
    let net = testnet("");
    let spec = net.spec.as_path();
    let mut child = foreground_up(spec);
    // Read stdout until the foreground loop runs, then keep the rest.
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("running in the foreground") {
            break;
        }
    }
    assert!(seen.contains("running in the foreground"), "{seen}");
    let pids = pids(&state(spec));
    let down = run(unfedctl().arg("down").arg(spec));
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        text(&down.stdout).contains("asking `unfedctl up`"),
        "{}",
        text(&down.stdout)
    );
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("exited unexpectedly"), "{stderr}");
    assert!(rest.iter().any(|l| l.contains("stopped anvil")), "{rest:?}");
    wait_all_gone(&pids);
    assert!(state(spec)["up_pid"].is_null());
}

/// The built-in model with EOS set to the newline that ends each of its lines, so a
/// chat reaches EOS after one line; returns the newline's id.
fn tiny_with_newline_eos(dir: &std::path::Path) -> u64 {
    unfed_model::builtin::write_tiny(dir).unwrap();
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(f)).unwrap()).unwrap()
    };
    // Byte-level BPE spells "\n" as "Ċ".
    let newline = read("tokenizer.json")["model"]["vocab"]["Ċ"]
        .as_u64()
        .unwrap();
    for file in ["config.json", "generation_config.json"] {
        let mut v = read(file);
        v["eos_token_id"] = serde_json::json!(newline);
        std::fs::write(dir.join(file), serde_json::to_vec(&v).unwrap()).unwrap();
    }
    newline
}

#[test]
fn ignore_eos_generates_exactly_max_tokens_in_chat_and_bench() {
    let model = tempfile::tempdir().unwrap();
    let newline = tiny_with_newline_eos(model.path());
    let net = testnet(&format!(
        "[chain]\nmode = \"none\"\n[model]\npath = \"{}\"\ntext_shards = 2\n",
        model.path().display()
    ));
    let spec = net.spec.as_path();
    net.up_detached();
    let chat = |extra: &[&str]| -> Value {
        let out = run(unfedctl()
            .arg("chat")
            .arg(spec)
            .args(["--prompt", "Hello", "--max-tokens", "20", "--json"])
            .args(extra));
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let stops = chat(&[]);
    let ids = stops["token_ids"].as_array().unwrap();
    assert_eq!(stops["stopped_on_eos"], true, "{stops}");
    assert!(ids.len() < 20 && ids.last().unwrap() == newline, "{stops}");
    let full = chat(&["--ignore-eos"]);
    assert_eq!(full["token_ids"].as_array().unwrap().len(), 20, "{full}");
    assert_eq!(full["stopped_on_eos"], false);

    // Greedy, then seeded sampling with every filter (hot enough to leave greedy's
    // tokens): the network and the single process generate the same tokens, so the
    // bench compares the same work.
    let sampled = [
        "--temperature",
        "3",
        "--top-p",
        "0.95",
        "--top-k",
        "40",
        "--seed",
        "5",
    ];
    let drawn = chat(&[&["--ignore-eos"][..], &sampled].concat());
    assert_ne!(drawn["token_ids"], full["token_ids"], "{drawn}");
    for extra in [&[][..], &sampled] {
        let b = common::bench_json(spec, 12, extra);
        assert_eq!(
            (
                b["networks"][0]["generated_tokens"].as_u64(),
                b["single_process_generated_tokens"].as_u64(),
                b["networks"][0]["runs_with_other_tokens_than_single"].as_u64()
            ),
            (Some(12), Some(12), Some(0)),
            "{extra:?}: {b}"
        );
        assert!(b["decode_ratio"].as_f64().unwrap() > 0.0, "{b}");
    }
    // Out-of-range sampling fails before anything runs, naming the flag.
    let bad = run(unfedctl().arg("bench").arg(spec).args(["--top-p", "1.5"]));
    assert!(
        !bad.status.success() && text(&bad.stderr).contains("--top-p 1.5 is out of range"),
        "{}",
        text(&bad.stderr)
    );
    // One token is the prefill alone: there is no decode to compare, and the table says
    // "-" instead of a ratio of zeros (NaN).
    let prefill = run(unfedctl()
        .arg("bench")
        .arg(spec)
        .args(["--tokens", "1", "--runs", "1"]));
    assert!(prefill.status.success(), "{}", text(&prefill.stderr));
    let table = text(&prefill.stdout);
    let network = table.lines().find(|l| l.starts_with("network ")).unwrap();
    assert!(
        network.trim_end().ends_with(" -") && !table.contains("NaN"),
        "{table}"
    );
}

/// A checkpoint saved by transformers 5 (image processor settings nested in
/// processor_config.json, no preprocessor_config.json; 192-px images in 64-px tiles): the
/// split serves them, `chat --image` reads them and answers with transformers' tokens.
#[test]
fn a_vision_checkpoint_saved_by_transformers_5_chats_like_transformers() {
    let fixtures = std::fs::canonicalize("../tests/fixtures").unwrap();
    let model = fixtures.join("models/idefics3-tf5");
    assert!(!model.join("preprocessor_config.json").exists());
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("vision/reference-tf5.json")).unwrap())
            .unwrap();
    let net = testnet(&format!(
        "[chain]\nmode = \"none\"\n[model]\npath = \"{}\"\ntext_shards = 2\nvision_shards = 1\n",
        model.display()
    ));
    let spec = net.spec.as_path();
    net.up_detached();
    let want = reference["generated_ids"].as_array().unwrap();
    let chat = run(unfedctl()
        .arg("chat")
        .arg(spec)
        .arg("--image")
        .arg(
            fixtures
                .join("vision")
                .join(reference["image"].as_str().unwrap()),
        )
        .args(["--prompt", reference["prompt"].as_str().unwrap()])
        .args(["--max-tokens", &want.len().to_string(), "--json"]));
    assert!(chat.status.success(), "{}", text(&chat.stderr));
    let answer: Value = serde_json::from_slice(&chat.stdout).unwrap();
    assert_eq!(
        answer["prompt_tokens"].as_u64().unwrap() as usize,
        reference["input_ids"].as_array().unwrap().len(),
        "{answer}"
    );
    assert_eq!(&answer["token_ids"].as_array().unwrap()[..], &want[..]);
}

/// `bench --concurrency`: levels 1, 2, 4 with their figures, session 0's tokens the same
/// at every level, and the JSON and its plot written where asked.
#[test]
fn bench_concurrency_sweeps_sessions_and_writes_json_and_plot() {
    let net = testnet("[chain]\nmode = \"none\"\n[model]\ntext_shards = 2\n");
    let spec = net.spec.as_path();
    net.up_detached();
    let out_dir = tempfile::tempdir().unwrap();
    let report = out_dir.path().join("sweep.json");
    let bench = run(unfedctl()
        .arg("bench")
        .arg(spec)
        .args(["--concurrency", "4", "--tokens", "8", "--runs", "1"])
        .args(["--ignore-eos", "--output"])
        .arg(&report));
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let table = text(&bench.stdout);
    assert!(table.contains("aggregate tok/s"), "{table}");
    let v: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let levels = v["levels"].as_array().unwrap();
    let sessions: Vec<u64> = levels
        .iter()
        .map(|l| l["sessions"].as_u64().unwrap())
        .collect();
    assert_eq!(sessions, [1, 2, 4], "{v}");
    for l in levels {
        assert_eq!(l["tokens_match_one_session"], true, "{l}");
        assert!(
            l["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{l}"
        );
        assert!(l["inter_token_p99_ms"].as_f64() >= l["inter_token_p50_ms"].as_f64());
        // Each shard's batches held between one step and one per session; a lone session
        // is never batched with anything.
        let n = l["sessions"].as_f64().unwrap();
        let per_shard: Vec<f64> = l["steps_per_batch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_f64().unwrap())
            .collect();
        assert_eq!(per_shard.len(), 2, "{l}");
        assert!(per_shard.iter().all(|b| *b >= 1.0 && *b <= n), "{l}");
        if n == 1.0 {
            assert_eq!(per_shard, [1.0, 1.0], "{l}");
        }
    }
    let svg = std::fs::read_to_string(report.with_extension("svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 2 * levels.len(), "{svg}");

    let bad = run(unfedctl()
        .arg("bench")
        .arg(spec)
        .args(["--concurrency", "2", "--compare-tls"]));
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("drop --compare-tls"));
}

/// specs/chaos.toml: kill, stop, slow and partition of compute nodes and a kill of the
/// daemon, each ridden out (chats equal the undisturbed run, READY again, no share
/// lost); JUnit has one case per fault.
#[test]
fn the_chaos_spec_passes_unfedctl_test_with_a_junit_case_per_fault() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let out = run(unfedctl()
        .args(["test", "../specs/chaos.toml", "--junit"])
        .arg(&junit));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("failures=\"0\""), "{xml}");
    for case in [
        "chaos_1_kill_compute-1-r1",
        "chaos_2_stop_compute-0",
        "chaos_3_slow_compute-1",
        "chaos_4_partition_compute-0-r1",
        "chaos_5_kill_daemon",
    ] {
        assert!(xml.contains(&format!("name=\"{case}\"")), "{case}: {xml}");
        assert!(stdout.contains(&format!("[PASS] {case}")), "{stdout}");
    }
    assert!(stdout.contains("shares for"), "{stdout}");
}

/// A bound the network cannot meet fails its case (and the run), naming the bound.
#[test]
fn a_chaos_fault_not_ridden_out_in_time_fails_its_case() {
    let net = testnet(
        "[chain]\nmode = \"none\"\n[nodes]\nreplicas = 2\n\
         [[chaos]]\ntarget = \"compute-1-r1\"\naction = \"kill\"\nafter_tokens = 2\nready_within = 0\n",
    );
    let out = run(unfedctl().arg("test").arg(&net.spec));
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("[FAIL] chaos_1_kill_compute-1-r1: not READY again within 0s"),
        "{stdout}"
    );
}
