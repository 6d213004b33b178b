//! `up --detach`: the testnet runs under a supervisor, `unfedctl up --supervise` in a
//! session of its own with its output in logs/supervisor.{out,err}. Children are tied to
//! the life of the process that started them, so the supervisor is what keeps them (and
//! their restart policy) after this command returns. This command relays the
//! supervisor's output until the model is READY or the launch fails.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use super::state::RunState;
use crate::plan::LaunchPlan;
use crate::spec::LoadedSpec;

/// The hidden flag that makes `up` the supervisor.
pub const SUPERVISE_FLAG: &str = "--supervise";

pub fn run(
    loaded: &LoadedSpec,
    plan: &LaunchPlan,
    spec: Option<&Path>,
    wait_timeout: u64,
    join: Option<(String, PathBuf)>,
) -> anyhow::Result<ExitCode> {
    super::refuse_if_running(loaded, plan)?;
    let logs = plan.run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let (out_path, err_path) = (logs.join("supervisor.out"), logs.join("supervisor.err"));
    let create =
        |p: &PathBuf| File::create(p).with_context(|| format!("cannot create {}", p.display()));
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("up");
    if let Some(spec) = spec {
        cmd.arg(spec);
    }
    if let Some((host, bundle)) = &join {
        cmd.arg("--host").arg(host).arg("--join").arg(bundle);
    }
    cmd.args(["--wait-timeout", &wait_timeout.to_string(), SUPERVISE_FLAG])
        .stdin(Stdio::null())
        .stdout(create(&out_path)?)
        .stderr(create(&err_path)?);
    // SAFETY: setsid is async-signal-safe. A session of its own: the terminal's Ctrl-C
    // and hang-up are for this command, not for the testnet it leaves running.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut supervisor = cmd.spawn().context("cannot start the supervisor")?;
    let mut out = Relay::new(out_path);
    let mut err = Relay::new(err_path);
    loop {
        let exited = supervisor.try_wait()?;
        let ready = RunState::load(&plan.run_dir)
            .ok()
            .flatten()
            .is_some_and(|s| s.ready && s.up_pid == Some(supervisor.id()));
        out.copy_to(&mut std::io::stdout());
        err.copy_to(&mut std::io::stderr());
        if ready {
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = exited {
            return Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(1, 255) as u8
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Copies what a file gained since the last call.
struct Relay {
    path: PathBuf,
    offset: u64,
}

impl Relay {
    fn new(path: PathBuf) -> Self {
        Self { path, offset: 0 }
    }

    fn copy_to(&mut self, to: &mut impl Write) {
        use std::io::Seek;
        let Ok(mut file) = File::open(&self.path) else {
            return;
        };
        let mut new = Vec::new();
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_ok()
            && file.read_to_end(&mut new).is_ok()
        {
            self.offset += new.len() as u64;
            let _ = to.write_all(&new);
            let _ = to.flush();
        }
    }
}
