//! A local Anvil chain: find the binary (PATH, or the npm package installed once into a
//! cache dir), start it on a chosen or free port in its own process group, wait until
//! it answers `eth_chainId`, and stop it by PID (SIGTERM, then SIGKILL).

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::providers::{Provider, ProviderBuilder};
use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The npm package that ships the real Anvil binary for linux x86-64, pinned.
pub const ANVIL_NPM_PACKAGE: &str = "@foundry-rs/anvil-linux-amd64";
pub const ANVIL_NPM_VERSION: &str = "1.7.1";
/// Overrides binary discovery with an explicit path.
pub const ANVIL_BIN_ENV: &str = "UNFED_ANVIL_BIN";
/// Anvil's default chain id: with a loopback RPC, a chain whose keys are the public dev
/// mnemonic's.
pub const ANVIL_CHAIN_ID: u64 = 31337;

/// `rpc` is a local Anvil: a loopback URL serving chain 31337. Err says what it is instead.
pub async fn ensure_local(rpc: &str) -> anyhow::Result<()> {
    let authority = rpc
        .split("://")
        .nth(1)
        .unwrap_or(rpc)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]");
    if !local {
        bail!("{rpc} is on {host}, not loopback: not a local Anvil");
    }
    // Only reads the chain id: any key will do.
    let chain = crate::Chain::connect(rpc, crate::keys::dev_signer(0)?)?;
    let id = chain
        .chain_id()
        .await
        .with_context(|| format!("asking {rpc} for its chain id"))?;
    if id != ANVIL_CHAIN_ID {
        bail!("{rpc} is chain {id}, not a local Anvil ({ANVIL_CHAIN_ID})");
    }
    Ok(())
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How to start Anvil.
#[derive(Debug, Clone, Default)]
pub struct AnvilOptions {
    /// Port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// Seconds between blocks; `None` mines every transaction at once (tests).
    pub block_time: Option<u64>,
    pub chain_id: Option<u64>,
    /// Dev accounts to create and fund (Anvil's default is 10).
    pub accounts: Option<u32>,
    /// Where Anvil's stdout/stderr go; `None` discards them.
    pub log_file: Option<PathBuf>,
    /// Spawns the prepared command instead of `Command::spawn` (`unfedctl up` ties
    /// Anvil's life to its own this way).
    pub spawn: Option<fn(Command) -> std::io::Result<Child>>,
}

/// A running Anvil. Dropping it stops the process unless it was `detach`ed.
#[derive(Debug)]
pub struct Anvil {
    child: Option<Child>,
    pid: u32,
    port: u16,
    chain_id: u64,
}

impl Anvil {
    /// Starts Anvil and returns once its RPC answers.
    pub async fn start(opts: &AnvilOptions) -> anyhow::Result<Self> {
        let bin = anvil_binary()?;
        // A free port picked here can be taken before Anvil binds it (parallel tests):
        // Anvil then exits at once, and we try another.
        let attempts = if opts.port.is_some() { 1 } else { 3 };
        let mut last_err = None;
        for _ in 0..attempts {
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            match Self::start_on(&bin, port, opts).await {
                Ok(a) => return Ok(a),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn start_on(bin: &Path, port: u16, opts: &AnvilOptions) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--accounts", &opts.accounts.unwrap_or(20).to_string()])
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(bt) = opts.block_time.filter(|b| *b > 0) {
            cmd.args(["--block-time", &bt.to_string()]);
        }
        if let Some(id) = opts.chain_id {
            cmd.args(["--chain-id", &id.to_string()]);
        }
        cmd.args(["--timestamp", &unique_genesis_time()?.to_string()]);
        match &opts.log_file {
            Some(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening Anvil log {}", path.display()))?;
                cmd.stdout(log.try_clone()?).stderr(log);
            }
            None => {
                // Anvil logs to stdout; stderr carries only its errors, kept for messages.
                cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            }
        }
        let spawned = match opts.spawn {
            Some(spawn) => spawn(cmd),
            None => cmd.spawn(),
        };
        let mut child = spawned.with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().map(keep_tail);
        let mut anvil = Anvil {
            pid: child.id(),
            child: Some(child),
            port,
            chain_id: 0,
        };
        anvil.chain_id = anvil
            .wait_ready(opts.log_file.as_deref(), stderr.as_ref())
            .await?;
        Ok(anvil)
    }

    /// Polls `eth_chainId` until it answers, the process dies, or the deadline passes.
    async fn wait_ready(
        &mut self,
        log: Option<&Path>,
        stderr: Option<&Tail>,
    ) -> anyhow::Result<u64> {
        let provider = ProviderBuilder::new().connect_http(self.endpoint().parse()?);
        let deadline = Instant::now() + READY_TIMEOUT;
        let see_log = || match (log, stderr) {
            (Some(l), _) => format!("; see {}", l.display()),
            (None, Some(tail)) => match tail_text(tail) {
                t if t.is_empty() => String::new(),
                t => format!(":\n{t}"),
            },
            (None, None) => String::new(),
        };
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "anvil exited ({status}) before answering on port {}{}",
                    self.port,
                    see_log()
                );
            }
            // Bounded per attempt: something else holding the port may accept the
            // connection and never answer, and Anvil's own exit must still be noticed.
            if let Ok(Ok(id)) =
                tokio::time::timeout(Duration::from_millis(500), provider.get_chain_id()).await
            {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!(
                    "anvil did not answer eth_chainId on {} within {}s{}",
                    self.endpoint(),
                    READY_TIMEOUT.as_secs(),
                    see_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// Leaves Anvil running after this handle is dropped (`unfedctl chain up`); stop it
    /// later with [`stop_pid`].
    pub fn detach(mut self) -> u32 {
        self.child = None;
        self.pid
    }

    /// Stops Anvil (SIGTERM to its process group, SIGKILL after a grace period).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            terminate_group(self.pid, STOP_GRACE, || {
                matches!(child.try_wait(), Ok(Some(_)) | Err(_))
            })?;
            let _ = child.wait();
        }
        Ok(())
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(pid = self.pid, "stopping anvil: {e:#}");
        }
    }
}

/// Stops a detached Anvil by PID: SIGTERM to its process group, SIGKILL if it is
/// still alive after the grace period. A PID that is already gone is not an error.
pub fn stop_pid(pid: u32) -> anyhow::Result<()> {
    terminate_group(pid, STOP_GRACE, || !pid_alive(pid))
}

/// Whether a process with this PID exists (and is not a zombie we could reap).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return kill(Pid::from_raw(pid as i32), None).is_ok();
    };
    // The state letter follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.trim().chars().next());
    !matches!(state, Some('Z') | Some('X'))
}

fn terminate_group(
    pid: u32,
    grace: Duration,
    mut gone: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let pgid = Pid::from_raw(pid as i32);
    if gone() {
        return Ok(());
    }
    if killpg(pgid, Signal::SIGTERM).is_err() {
        // Not a group leader (or already gone): signal the process itself.
        let _ = kill(pgid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if gone() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = kill(pgid, Signal::SIGKILL);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if gone() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("anvil (pid {pid}) did not exit after SIGKILL")
}

/// The last lines a child wrote to a pipe, and whether the pipe reached its end.
#[derive(Default)]
struct TailBuf {
    lines: std::collections::VecDeque<String>,
    closed: bool,
}

type Tail = std::sync::Arc<std::sync::Mutex<TailBuf>>;

/// Drains `pipe` on a thread (so the child never blocks on a full pipe), keeping the
/// last 20 lines.
fn keep_tail(pipe: impl std::io::Read + Send + 'static) -> Tail {
    use std::io::BufRead;
    let tail = Tail::default();
    let sink = tail.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut t = sink.lock().unwrap_or_else(|e| e.into_inner());
            if t.lines.len() == 20 {
                t.lines.pop_front();
            }
            t.lines.push_back(line);
        }
        sink.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    });
    tail
}

/// The captured lines once the writer has exited (waiting briefly for the reader to
/// reach the end of the pipe).
fn tail_text(tail: &Tail) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.closed || Instant::now() > deadline {
            return t.lines.iter().cloned().collect::<Vec<_>>().join("\n");
        }
        drop(t);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port for anvil")?;
    Ok(l.local_addr()?.port())
}

/// The directory for downloaded tools: `$UNFED_CACHE_DIR`, else `$XDG_CACHE_HOME/unfed`,
/// else `~/.cache/unfed`.
/// `path` opened and exclusively locked (flock) until the returned file is dropped.
fn locked(path: &Path) -> anyhow::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; released when `f` is dropped.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(f)
}

/// A genesis time (unix seconds) no other Anvil started on this machine has used. Two
/// fresh Anvils with one chain id differ only by it, and chain-stamped databases tell
/// chains apart by their genesis hash, so a testnet restarted within the same second
/// must not reproduce the last one's genesis.
fn unique_genesis_time() -> anyhow::Result<u64> {
    use std::io::{Read, Seek, Write};
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;
    let mut f = locked(&dir.join("anvil-genesis-time"))?;
    let mut last = String::new();
    f.read_to_string(&mut last)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t = now.max(last.trim().parse::<u64>().unwrap_or(0) + 1);
    f.set_len(0)?;
    f.rewind()?;
    f.write_all(t.to_string().as_bytes())?;
    Ok(t)
}

pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let non_empty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = non_empty("UNFED_CACHE_DIR") {
        return Ok(d);
    }
    if let Some(d) = non_empty("XDG_CACHE_HOME") {
        return Ok(d.join("unfed"));
    }
    match non_empty("HOME") {
        Some(h) => Ok(h.join(".cache").join("unfed")),
        None => bail!("cannot choose a cache directory: set UNFED_CACHE_DIR (or HOME)"),
    }
}

/// The Anvil binary: `$UNFED_ANVIL_BIN`, else `anvil` on PATH, else the pinned npm
/// package in the cache dir, installed on first use.
pub fn anvil_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(ANVIL_BIN_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{ANVIL_BIN_ENV}={} does not name a file", p.display());
        }
        return Ok(p);
    }
    if let Some(p) = find_on_path("anvil") {
        return Ok(p);
    }
    install_anvil(&cache_dir()?)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Installs the npm package into `<cache>/anvil-<version>` once. An exclusive file lock
/// serialises parallel callers; the install happens in a temp dir renamed into place,
/// so a half-finished install is never used.
pub fn install_anvil(cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join(format!("anvil-{ANVIL_NPM_VERSION}"));
    let bin = dir
        .join("node_modules")
        .join(ANVIL_NPM_PACKAGE)
        .join("bin")
        .join("anvil");
    if bin.is_file() {
        return Ok(bin);
    }
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        bail!(
            "anvil is not on PATH and {ANVIL_NPM_PACKAGE} only serves linux x86-64: install \
             Foundry (https://book.getfoundry.sh) or set {ANVIL_BIN_ENV}"
        );
    }
    std::fs::create_dir_all(cache)
        .with_context(|| format!("creating cache directory {}", cache.display()))?;
    let _lock = locked(&cache.join("anvil.lock"))?;
    if bin.is_file() {
        return Ok(bin); // another process installed it while we waited
    }
    let staging = cache.join(format!(
        "anvil-{ANVIL_NPM_VERSION}.partial-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    tracing::info!(
        "installing {ANVIL_NPM_PACKAGE}@{ANVIL_NPM_VERSION} into {}",
        dir.display()
    );
    let out = Command::new("npm")
        .args(["install", "--prefix"])
        .arg(&staging)
        .args([
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--no-package-lock",
            "--loglevel=error",
        ])
        .arg(format!("{ANVIL_NPM_PACKAGE}@{ANVIL_NPM_VERSION}"))
        .stdin(Stdio::null())
        .output()
        .context(
            "anvil is not on PATH and npm could not be run to install it: install Node.js \
             (npm) or Foundry, or set UNFED_ANVIL_BIN",
        )?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        bail!(
            "npm install {ANVIL_NPM_PACKAGE}@{ANVIL_NPM_VERSION} failed ({}):\n{}\nFix: install \
             Foundry's anvil on PATH, or set UNFED_ANVIL_BIN",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let staged_bin = staging
        .join("node_modules")
        .join(ANVIL_NPM_PACKAGE)
        .join("bin")
        .join("anvil");
    if !staged_bin.is_file() {
        bail!(
            "{ANVIL_NPM_PACKAGE} installed but has no bin/anvil (looked at {})",
            staged_bin.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    Ok(bin)
}
