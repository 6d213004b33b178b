//! What `up`, `down` and `status` do about the processes they run: PIDs checked before
//! they are signalled, signals and crashes of `unfedctl` itself, restarts.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Net, run, text, unfedctl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid as NixPid;
use serde_json::{Value, json};

mod common;

fn sleeper() -> Child {
    Command::new("sleep").arg("600").spawn().unwrap()
}

fn running(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

/// A process record as `up` writes it.
fn record(name: &str, pid: u32, identity: Value) -> Value {
    json!({
        "name": name, "kind": "compute", "pid": pid, "port": null,
        "log": "/dev/null", "shard": 0, "eth_address": null, "identity": identity,
    })
}

/// /proc/<pid>/stat field 22.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[19].parse().unwrap()
}

#[test]
fn down_and_status_leave_a_pid_that_is_now_another_process_alone() {
    let net = Net::new("");
    let mut reused = sleeper();
    let mut legacy = sleeper();
    let mut ours = sleeper();
    let state = json!({
        "name": "net", "spec": "net.toml", "chain": null, "registry": null, "model_id": null,
        "processes": [
            // Recorded as a compute node that has exited since; `sleep` got its PID.
            record("compute-0", reused.id(), json!({
                "start_time": start_time(reused.id()) - 1,
                "cmdline": "unfed-node compute --shard-index 0",
            })),
            // A state file from before PIDs were checked: nothing proves the PID is ours.
            record("compute-1", legacy.id(), Value::Null),
            // Still exactly the process that was started.
            record("compute-2", ours.id(), json!({
                "start_time": start_time(ours.id()),
                "cmdline": "sleep 600",
            })),
        ],
    });
    std::fs::create_dir_all(net.run_dir()).unwrap();
    std::fs::write(net.run_dir().join("state.json"), state.to_string()).unwrap();

    let status = run(unfedctl().arg("status").arg(&net.spec));
    let out = text(&status.stdout);
    assert!(
        out.contains(&format!(
            "pid {} (compute-0) is now another process (sleep 600); left alone",
            reused.id()
        )),
        "{out}"
    );

    let down = run(unfedctl().arg("down").arg(&net.spec));
    assert!(down.status.success(), "{}", text(&down.stderr));
    let out = text(&down.stdout);
    assert!(
        out.contains(&format!(
            "pid {} (compute-0) is now another process (sleep 600); left alone",
            reused.id()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "pid {} (compute-1) is now another process",
            legacy.id()
        )) && out.contains("recorded no start time"),
        "{out}"
    );
    assert!(out.contains("stopped compute-2"), "{out}");
    assert!(running(&mut reused) && running(&mut legacy), "{out}");
    let _ = ours.wait();
    for mut child in [reused, legacy] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Every live process whose environment carries `marker` (children inherit it from the
/// `unfedctl` a test starts, Anvil included), found through /proc.
fn processes_marked(marker: &str) -> Vec<(u32, String)> {
    let needle = format!("{MARK_ENV}={marker}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let marked = env.split(|b| *b == 0).any(|v| v == needle.as_bytes());
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if marked && !zombie {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

const MARK_ENV: &str = "UNFED_TEST_RUN";

/// Waits until no process of the run is left; panics listing them after `secs`.
fn assert_no_process_left(marker: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = processes_marked(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the run left: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(50)); // poll again until the deadline
    }
}

/// A testnet of Anvil, registry and two compute nodes, its processes marked.
fn marked_net() -> (Net, String) {
    let net = Net::new("[daemon]\nenabled = false\n[web]\nenabled = false\n");
    let marker = net.dir.path().display().to_string();
    (net, marker)
}

/// `unfedctl up` in the foreground, marked; returns once the model is READY.
fn foreground_up(net: &Net, marker: &str) -> Child {
    let mut child = unfedctl()
        .arg("up")
        .arg(&net.spec)
        .env(MARK_ENV, marker)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("running in the foreground") {
            // Keep reading: a closed pipe would end `up` with SIGPIPE, not by our signal.
            std::thread::spawn(move || lines.for_each(drop));
            return child;
        }
    }
    let _ = child.wait();
    panic!("up ended before READY:\n{seen}");
}

fn signal(pid: u32, signal: Signal) {
    kill(NixPid::from_raw(pid as i32), signal).unwrap();
}

#[test]
fn sigterm_to_a_foreground_up_leaves_no_process_of_the_run() {
    let (net, marker) = marked_net();
    let mut up = foreground_up(&net, &marker);
    assert!(
        processes_marked(&marker).len() >= 5,
        "{:#?}",
        processes_marked(&marker)
    );
    signal(up.id(), Signal::SIGTERM);
    let status = up.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_no_process_left(&marker, 10);
}

#[test]
fn sigkill_to_the_detached_supervisor_leaves_no_orphan() {
    let (net, marker) = marked_net();
    let out = run(unfedctl()
        .arg("up")
        .arg(&net.spec)
        .arg("--detach")
        .env(MARK_ENV, &marker));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("model      builtin-tiny (READY)"),
        "{}",
        text(&out.stdout)
    );
    // The testnet outlives `up --detach`: its supervisor keeps it.
    let supervisor = common::state(&net.spec)["up_pid"].as_u64().unwrap() as u32;
    let left = processes_marked(&marker);
    assert!(left.iter().any(|(p, _)| *p == supervisor), "{left:#?}");
    assert!(left.len() >= 5, "{left:#?}");
    signal(supervisor, Signal::SIGKILL);
    assert_no_process_left(&marker, 10);
}

/// The pid `state.json` records for `node`.
fn pid_of(net: &Net, node: &str) -> u32 {
    common::state(&net.spec)["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == node)
        .unwrap_or_else(|| panic!("{node} is not in state.json"))["pid"]
        .as_u64()
        .unwrap() as u32
}

/// Polls the supervisor's output until it holds `needle`; the output.
fn supervisor_says(net: &Net, file: &str, needle: &str, secs: u64) -> String {
    let path = net.run_dir().join("logs").join(file);
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let seen = std::fs::read_to_string(&path).unwrap_or_default();
        if seen.contains(needle) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {}:\n{seen}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20)); // poll again until the deadline
    }
}

#[test]
fn a_killed_compute_node_is_restarted_and_the_model_is_ready_again_within_5s() {
    // The default testnet: Anvil, registry, daemon, two compute nodes, dashboard.
    let net = Net::new("");
    net.up_detached();
    let old = pid_of(&net, "compute-0");
    let killed = Instant::now();
    signal(old, Signal::SIGKILL);
    let out = supervisor_says(&net, "supervisor.out", "model builtin-tiny READY again", 30);
    let took = killed.elapsed();
    println!("compute-0: kill -9 to model READY again with a new process: {took:.2?}");
    assert!(out.contains("compute-0 signal: 9 (SIGKILL)"), "{out}");
    let new = pid_of(&net, "compute-0");
    assert_ne!(new, old);
    let status = run(unfedctl().arg("status").arg(&net.spec).arg("--json"));
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "compute-0");
    assert_eq!(node.unwrap()["alive"], true, "{status:#}");
    assert!(
        took <= Duration::from_secs(5),
        "READY again only after {took:?}:\n{out}"
    );
    // The restarted node serves: a chat goes through it (the only shard-0 node).
    net.chat_ok();
}

#[test]
fn a_node_crashing_in_a_loop_is_left_stopped_after_the_cap_and_the_rest_keeps_running() {
    let net = Net::new(
        "[chain]\nmode = \"none\"\n[daemon]\nenabled = false\n[web]\nenabled = false\n\
         [nodes]\nmax_restarts_per_minute = 2\n",
    );
    net.up_detached();
    // From now on compute-1 cannot load its shard: every restart crashes.
    std::fs::write(
        net.run_dir().join("shards/text_shard_1.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    signal(pid_of(&net, "compute-1"), Signal::SIGKILL);
    let err = supervisor_says(&net, "supervisor.err", "left stopped", 60);
    assert!(
        err.contains(
            "compute-1 was restarted 2 times within a minute and exited again: left stopped"
        ) && err.contains("max_restarts_per_minute"),
        "{err}"
    );
    let out = std::fs::read_to_string(net.run_dir().join("logs/supervisor.out")).unwrap();
    assert_eq!(
        out.matches("restarting compute-1 failed").count(),
        2,
        "{out}"
    );
    // Only compute-1 stopped: the supervisor and everything else still run.
    let st = common::state(&net.spec);
    let names: Vec<&str> = st["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["registry", "compute-0"]);
    for pid in [
        st["up_pid"].as_u64().unwrap() as u32,
        pid_of(&net, "compute-0"),
    ] {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
