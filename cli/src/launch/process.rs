//! Child processes of a testnet: started in their own process group with output to a log
//! file, tied to the life of `unfedctl`, stopped group-wide with SIGTERM, a grace period,
//! then SIGKILL.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Start `cmd` in a new process group (so a Ctrl-C at the terminal reaches only unfedctl,
/// which then stops everything in order), stdout and stderr appended to `log`.
pub fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let program = cmd.get_program().to_owned();
    spawn_tied(cmd).with_context(|| format!("cannot start {program:?}"))
}

/// Spawn `cmd` so that the kernel kills it when this process dies, however it dies
/// (SIGKILL included): PR_SET_PDEATHSIG. The signal fires when the spawning *thread*
/// exits, so every child is spawned by one thread that lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let parent = std::process::id();
    // SAFETY: prctl, getppid and _exit are async-signal-safe; nothing here allocates.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before the prctl: then nothing would fire.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in queue {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the child-spawner thread");
        Mutex::new(jobs)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the child-spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the child-spawner thread is gone"))?
}

pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // A zombie (exited, not yet reaped by its parent) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

/// SIGTERM to the process group, wait up to `grace`, then SIGKILL. True if it had to kill.
pub fn stop(pid: u32, grace: Duration) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let group = Pid::from_raw(raw);
    if !alive(pid) {
        return false;
    }
    let _ = killpg(group, Signal::SIGTERM).or_else(|_| kill(group, Signal::SIGTERM));
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(group, Signal::SIGKILL).or_else(|_| kill(group, Signal::SIGKILL));
    true
}

/// The last `lines` lines of a log, for failure messages.
pub fn tail(log: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(log) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
