//! `unfedctl up` / `down` / `status` / `logs`: walk a launch plan wave by wave, starting
//! each step only once everything it depends on is ready, and tear it all down in reverse
//! on failure or Ctrl-C.

pub mod chaos;
pub mod conformance;
pub mod detach;
pub mod join;
pub mod node_cmd;
pub mod pid;
pub mod pki;
pub mod process;
pub mod relay;
pub mod state;
pub mod status;
pub mod supervise;

pub use status::status;
pub mod steps;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::future::join_all;

use crate::plan::LaunchPlan;
use crate::spec::LoadedSpec;
use state::RunState;
use steps::{Context, Inputs, Outcome, StepFailed};

/// How often the foreground `up` looks for processes that exited.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// Grace between SIGTERM and SIGKILL when stopping a process.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct UpOptions {
    /// Run as the background supervisor of `up --detach` (output to its log files).
    pub supervise: bool,
    /// How long one step may take to become ready.
    pub wait_timeout: Duration,
    /// Join a testnet as this `[[host]]` with this bundle.
    pub join: Option<(String, std::path::PathBuf)>,
}

/// Record what a step produced and persist it, with every process started so far.
fn record(ctx: &Context, state: &mut RunState, outcome: Outcome) -> anyhow::Result<()> {
    if let Some(chain) = outcome.chain {
        state.chain = Some(chain);
    }
    if let Some(registry) = outcome.registry {
        state.registry = Some(registry);
    }
    if let Some(model) = outcome.model_id {
        state.model_id = Some(model);
    }
    if let Some(url) = outcome.dashboard {
        state.dashboard = Some(url);
    }
    state.processes = ctx.running.lock().unwrap().processes.clone();
    state.save(&ctx.plan.run_dir)
}

/// Stop every process, newest first, and reap our children.
fn teardown(ctx: &Context, state: &mut RunState) {
    let mut running = ctx.running.lock().unwrap();
    let running = &mut *running;
    for (record, child) in running
        .processes
        .iter()
        .zip(running.children.iter_mut())
        .rev()
    {
        stop_reporting(record);
        if let Some(child) = child {
            let _ = child.wait();
        }
    }
    running.processes.clear();
    running.children.clear();
    state.processes.clear();
    state.up_pid = None;
    state.up_identity = None;
    state.ready = false;
    let _ = state.save(&ctx.plan.run_dir);
}

/// A testnet started by this process. Dropping it (a panic included) stops every
/// process, newest first.
pub struct Testnet {
    pub ctx: Context,
    pub state: RunState,
    pub took: Duration,
}

impl Testnet {
    /// Stop every process, newest first.
    pub fn teardown(&mut self) {
        teardown(&self.ctx, &mut self.state);
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        if !self
            .ctx
            .running
            .lock()
            .map(|r| r.processes.is_empty())
            .unwrap_or(true)
        {
            println!("tearing down");
            self.teardown();
        }
    }
}

/// Refuse to start a testnet whose recorded processes still run.
pub fn refuse_if_running(loaded: &LoadedSpec, plan: &LaunchPlan) -> anyhow::Result<()> {
    let Some(existing) = RunState::load(&plan.run_dir)? else {
        return Ok(());
    };
    let alive = existing.alive();
    if alive.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = alive.iter().map(|p| p.name.as_str()).collect();
    bail!(
        "testnet '{}' is already running ({}; registry at {}); see `unfedctl status {}` or stop it with `unfedctl down {}`",
        plan.name,
        names.join(", "),
        existing.registry.as_deref().unwrap_or("?"),
        loaded.display_path,
        loaded.display_path
    )
}

/// Start everything the plan lists, wave by wave; on failure, a stop signal or a panic,
/// stop what started.
pub async fn start(
    loaded: LoadedSpec,
    plan: LaunchPlan,
    wait_timeout: Duration,
    relays: relay::Relays,
) -> anyhow::Result<Testnet> {
    start_as(loaded, plan, wait_timeout, relays, None).await
}

/// `start` on the control host (`joined` = None) or on a host that joined the testnet.
pub async fn start_as(
    loaded: LoadedSpec,
    plan: LaunchPlan,
    wait_timeout: Duration,
    relays: relay::Relays,
    joined: Option<join::Joined>,
) -> anyhow::Result<Testnet> {
    let run_dir = plan.run_dir.clone();
    let mut signals = StopSignals::listen()?;
    refuse_if_running(&loaded, &plan)?;
    let checks = crate::preflight::spec_checks(&loaded, &plan, false);
    if crate::preflight::failures(&checks) > 0 {
        crate::preflight::report(&checks);
        bail!("preflight is NO-GO; nothing was started");
    }
    std::fs::create_dir_all(run_dir.join("logs"))
        .with_context(|| format!("cannot create {}", run_dir.display()))?;

    let (host, pki, registry, chain) = match joined {
        Some(j) => (Some(j.host), j.pki, Some(j.registry), j.chain),
        None if loaded.spec.testnet.tls => {
            let pki = pki::TestnetPki::create(&run_dir, &plan.name)?;
            (None, Some(pki), None, None)
        }
        None => (None, None, None, None),
    };
    let bind = plan.bind_address(host.as_deref());
    let delay = plan.host_entry(host.as_deref()).and_then(|h| h.delay_ms);
    let relays = match delay {
        Some(ms) => {
            let here = plan
                .steps
                .iter()
                .filter(|s| plan.runs_on(s, host.as_deref()));
            relay::Relays::delaying(
                here.map(|s| s.name.clone()),
                bind.parse().context("the host's address")?,
                Duration::from_millis(ms),
            )
        }
        None => relays,
    };
    let net = match &pki {
        Some(p) => p.client_net()?,
        None => unfed_node::net::Net::plaintext(),
    };
    let ctx = Context {
        node: node_cmd::NodeCommand::locate()?,
        net,
        pki,
        loaded,
        plan,
        ready_timeout: wait_timeout,
        running: Default::default(),
        tied: true,
        relays,
        host,
        bind,
    };
    let started = Instant::now();
    let state = RunState {
        name: ctx.plan.name.clone(),
        spec: ctx.plan.spec.clone(),
        tls_ca: ctx.pki.as_ref().map(|p| p.ca_path()),
        up_pid: Some(std::process::id()),
        up_identity: pid::identity(std::process::id()),
        registry,
        chain,
        ..RunState::default()
    };
    state.save(&run_dir)?;
    println!(
        "starting testnet '{}' (run dir {})",
        ctx.plan.name,
        run_dir.display()
    );
    let mut net = Testnet {
        ctx,
        state,
        took: Duration::ZERO,
    };
    let walk = walk(&net.ctx, &mut net.state, started);
    let result = tokio::select! {
        r = walk => r,
        signal = signals.recv() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    if let Err(err) = result {
        println!("tearing down");
        net.teardown();
        return Err(err);
    }
    net.took = started.elapsed();
    Ok(net)
}

pub async fn up(loaded: LoadedSpec, plan: LaunchPlan, opts: UpOptions) -> anyhow::Result<ExitCode> {
    // Listening before the launch: a signal during it or right after is not missed.
    let mut signals = StopSignals::listen()?;
    let joined = match &opts.join {
        Some((host, bundle)) => {
            // Before the join spends the bundle's token.
            refuse_if_running(&loaded, &plan)?;
            Some(join::host::join(&loaded, &plan, host, bundle).await?)
        }
        None => None,
    };
    let mut net = start_as(loaded, plan, opts.wait_timeout, Default::default(), joined).await?;
    let (ctx, state) = (&net.ctx, &mut net.state);
    let dev_key = dev_api_key(ctx, state)?;
    print_summary(ctx, state, net.took, dev_key.as_deref());
    // The control host of a testnet that spans hosts admits the others.
    let _join_service = match ctx.host.is_none() && ctx.plan.hosts.len() > 1 {
        true => {
            let (service, bundles) = join::serve::start(ctx, state).await?;
            println!("joining hosts are admitted at {}:", service.addr);
            for (host, bundle) in ctx.plan.hosts.iter().filter(|h| !h.control).zip(&bundles) {
                println!(
                    "  on {} ({}): unfedctl up {} --host {} --join {}",
                    host.name,
                    host.address,
                    ctx.plan.spec,
                    host.name,
                    bundle.display()
                );
            }
            Some(service)
        }
        false => None,
    };
    if opts.supervise {
        println!(
            "\nsupervised in the background (pid {}, output in {}); `unfedctl down` stops everything",
            std::process::id(),
            ctx.plan.run_dir.join("logs").display()
        );
    } else {
        println!("\nrunning in the foreground; Ctrl-C (or `unfedctl down`) stops everything");
    }
    state.ready = true;
    state.save(&ctx.plan.run_dir)?;
    let signal = supervise_until(&net.ctx, &mut net.state, signals.recv()).await;
    println!("\n{signal}: stopping");
    net.teardown();
    Ok(ExitCode::SUCCESS)
}

/// Applies the restart policy to every process that exits until `until` completes;
/// returns its output.
pub async fn supervise_until<T>(
    ctx: &Context,
    state: &mut RunState,
    until: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(until);
    let mut supervisor = supervise::Supervisor::new(ctx);
    loop {
        tokio::select! {
            out = &mut until => return out,
            _ = tokio::time::sleep(EXIT_POLL) => {
                for exit in supervise::reap(ctx) {
                    tokio::select! {
                        _ = supervisor.handle(ctx, state, exit) => {}
                        out = &mut until => return out,
                    }
                }
            }
        }
    }
}

/// Ctrl-C at the terminal, SIGTERM (`unfedctl down`, a service manager) or SIGHUP (the
/// terminal closed). Listening starts when this is created, not when it is first awaited,
/// so a signal that arrives in between is not lost.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Which signal came, for the message.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Run every wave; the steps of a wave run concurrently.
async fn walk(ctx: &Context, state: &mut RunState, started: Instant) -> anyhow::Result<()> {
    let progress = &Progress::new();
    for (_, wave) in ctx.plan.waves() {
        let wave: Vec<_> = wave.into_iter().filter(|s| ctx.runs_here(s)).collect();
        let inputs = Inputs {
            chain: state.chain.clone(),
            registry: state.registry.clone(),
        };
        let results = join_all(wave.iter().map(|step| {
            let inputs = inputs.clone();
            let bar = progress.begin(&step.name);
            async move {
                let t = Instant::now();
                let result = steps::run(ctx, step, inputs).await;
                let port = result
                    .as_ref()
                    .ok()
                    .and_then(|o| o.port)
                    .map(|p| format!(" :{p}"))
                    .unwrap_or_default();
                let verdict = if result.is_ok() { "ready" } else { "FAILED" };
                let line = format!(
                    "  [{:>6.2}s] {:<12} {verdict} in {:.2}s{port}",
                    started.elapsed().as_secs_f64(),
                    step.name,
                    t.elapsed().as_secs_f64()
                );
                progress.finish(bar, line);
                (step, result)
            }
        }))
        .await;
        let mut failure = None;
        for (step, result) in results {
            match result {
                Ok(outcome) => record(ctx, state, outcome)?,
                Err(err) => {
                    let mut message = format!("step '{}' failed: {err:#}", step.name);
                    if let Some(failed) = err.downcast_ref::<StepFailed>() {
                        let tail = process::tail(&failed.log, 20);
                        message.push_str(&format!(
                            "\nlast lines of {}:\n{tail}",
                            failed.log.display()
                        ));
                    }
                    failure.get_or_insert(message);
                }
            }
        }
        if let Some(message) = failure {
            bail!(message);
        }
    }
    wait_ready(ctx, state).await
}

/// One line per step with its timing; on a terminal, a spinner while the step runs.
struct Progress {
    bars: Option<indicatif::MultiProgress>,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            bars: std::io::stdout()
                .is_terminal()
                .then(indicatif::MultiProgress::new),
        }
    }

    fn begin(&self, name: &str) -> Option<indicatif::ProgressBar> {
        let bars = self.bars.as_ref()?;
        let bar = bars.add(indicatif::ProgressBar::new_spinner());
        bar.set_message(format!("{name} starting"));
        bar.enable_steady_tick(Duration::from_millis(80));
        Some(bar)
    }

    fn finish(&self, bar: Option<indicatif::ProgressBar>, line: String) {
        match bar {
            Some(bar) => {
                bar.finish_and_clear();
                let _ = self.bars.as_ref().map(|b| b.println(line));
            }
            None => println!("{line}"),
        }
    }
}

/// The launch is done when the registry says the model is READY; on a control host
/// whose nodes are partly elsewhere, once its own part runs (the others join later).
async fn wait_ready(ctx: &Context, state: &RunState) -> anyhow::Result<()> {
    let (Some(registry), Some(model)) = (&state.registry, &state.model_id) else {
        return Ok(());
    };
    if ctx.others_join_later() {
        return Ok(());
    }
    let mut client = unfed_node::client::Client::connect(&ctx.net, registry).await?;
    let deadline = Instant::now() + ctx.ready_timeout;
    loop {
        match client.require_ready(model).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!(
                "model {model} is not READY after {:?}: {e:#}",
                ctx.ready_timeout
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// On a local Anvil chain, a dev key for the dashboard's OpenAI-compatible API, billing
/// the testnet's client wallet.
fn dev_api_key(ctx: &Context, state: &RunState) -> anyhow::Result<Option<String>> {
    let anvil = ctx.loaded.spec.chain.mode == crate::spec::ChainMode::Anvil;
    let client = state.chain.as_ref().and_then(|c| c.client.as_deref());
    let (true, Some(client), Some(_)) = (anvil, client, &state.dashboard) else {
        return Ok(None);
    };
    let wallet = client
        .parse()
        .context("the recorded client wallet is not an EVM address")?;
    let key = unfed_chain::read_key_file(&ctx.key_path("client"))?;
    let chain = state.chain.as_ref().expect("checked above");
    crate::api_key_cmd::create_key(&ctx.plan.run_dir, wallet, "dev", None, Some((&key, chain)))
        .map(Some)
}

fn print_summary(ctx: &Context, state: &RunState, took: Duration, dev_key: Option<&str>) {
    println!(
        "\ntestnet '{}' is up in {:.1}s",
        ctx.plan.name,
        took.as_secs_f64()
    );
    if let Some(registry) = &state.registry {
        println!("  registry   {registry}");
    }
    if let Some(model) = &state.model_id {
        let when = if ctx.others_join_later() {
            "READY once every host has joined"
        } else {
            "READY"
        };
        println!("  model      {model} ({when})");
    }
    if let Some(url) = &state.dashboard {
        println!("  dashboard  {url}");
        if let Some(key) = dev_key {
            println!(
                "  openai     {} with API key {key} (dev key, bills the client wallet)",
                crate::api_key_cmd::base_url(url)
            );
        }
    }
    if let Some(chain) = &state.chain {
        if !chain.rpc_url.is_empty() {
            println!(
                "  chain      {} (chain id {})",
                chain.rpc_url, chain.chain_id
            );
        }
        if let (Some(token), Some(escrow)) = (&chain.token, &chain.escrow) {
            println!("  contracts  token {token}, escrow {escrow}");
        }
        for w in &chain.wallets {
            println!(
                "  wallet     {:<12} {} staked {}",
                w.node, w.address, w.stake
            );
        }
    }
    // The embedded default needs no spec argument.
    let spec = match ctx.plan.spec.as_str() {
        crate::spec::EMBEDDED_NAME => String::new(),
        path => format!(" {path}"),
    };
    println!("\nnext:");
    if let Some(host) = &ctx.host {
        // A joined host runs only its part; chats and the rest go through the control host.
        println!("  unfedctl status{spec} --host {host}\n  unfedctl down{spec} --host {host}");
        return;
    }
    println!("  unfedctl chat{spec} --prompt \"Hello\"");
    if let Some(registry) = &state.registry {
        println!("  unfedctl models --registry {registry}");
    }
    println!("  unfedctl status{spec}\n  unfedctl logs{spec} registry\n  unfedctl down{spec}");
}

/// Stop one process (SIGTERM, grace, SIGKILL) and say so.
pub fn stop_reporting(record: &state::ProcessRecord) {
    let killed = process::stop(record.pid, STOP_GRACE);
    let how = if killed {
        " (killed after the grace period)"
    } else {
        ""
    };
    println!("  stopped {}{how}", record.name);
}

/// Stop a testnet's processes, newest first. Stopping a stopped testnet is fine.
pub fn down(plan: &LaunchPlan) -> anyhow::Result<ExitCode> {
    let Some(mut state) = RunState::load(&plan.run_dir)? else {
        println!(
            "testnet '{}' is not running (no {})",
            plan.name,
            RunState::path(&plan.run_dir).display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let started = Instant::now();
    let owner = state.up_pid.filter(|p| *p != std::process::id());
    match owner.map(|pid| (pid, pid::check(pid, state.up_identity.as_ref()))) {
        Some((pid, pid::Now::Ours)) => {
            // The owning `up` stops its processes itself (and then knows none crashed).
            println!("  asking `unfedctl up` (pid {pid}) to stop the testnet");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + STOP_GRACE * (state.processes.len() as u32 + 1);
            while process::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            state = RunState::load(&plan.run_dir)?.unwrap_or(state);
        }
        Some((pid, pid::Now::Other(why))) => {
            println!("  {}", pid::left_alone("unfedctl up", pid, &why))
        }
        _ => {}
    }
    state.up_pid = None;
    state.up_identity = None;
    for record in state.processes.iter().rev() {
        match record.now() {
            pid::Now::Ours => stop_reporting(record),
            pid::Now::Gone => {}
            pid::Now::Other(why) => {
                println!("  {}", pid::left_alone(&record.name, record.pid, &why))
            }
        }
    }
    state.processes.clear();
    state.save(&plan.run_dir)?;
    println!(
        "testnet '{}' is down ({:.2}s)",
        plan.name,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Print (or follow) a node's log; without a node, list the logs.
pub fn logs(plan: &LaunchPlan, node: Option<&str>, follow: bool) -> anyhow::Result<ExitCode> {
    let dir = plan.run_dir.join("logs");
    let Some(node) = node else {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("no logs in {} (has the testnet run?)", dir.display()))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".log")
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        println!("{}", names.join("\n"));
        return Ok(ExitCode::SUCCESS);
    };
    let path = dir.join(format!("{node}.log"));
    let mut file = std::fs::File::open(&path).with_context(|| {
        format!(
            "no log for '{node}' at {}; `unfedctl logs {}` lists them",
            path.display(),
            plan.spec
        )
    })?;
    let mut out = std::io::stdout();
    std::io::copy(&mut file, &mut out)?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        std::io::copy(&mut file, &mut out)?;
    }
}
