//! `unfedctl test`'s chaos: each `[[chaos]]` fault in turn, injected while chats run
//! back to back. A fault is ridden out when every chat equals the undisturbed answer,
//! the target is serving and the model READY again within the fault's bound, and the
//! daemon holds one share per hop per step served (none lost, none doubled).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use unfed_node::client::{Client, GenerateOptions, GenerateOutput};
use unfed_proto::{GetChainStatusRequest, ModelState};

use super::relay::Fault;
use super::state::ProcessRecord;
use super::steps::Context;
use crate::chaos_plan::{ChaosEvent, Trigger};
use crate::plan::StepKind;
use crate::spec::ChaosAction;

/// Tokens per chaos chat, generated whatever the model says (no stop at EOS), so each
/// chat is long enough for a fault to land inside it.
pub const CHAOS_TOKENS: usize = 24;
/// Longest wait for a fault's trigger, or for shares to reach the daemon.
const PATIENCE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// What every fault's chats share.
pub struct Chats {
    pub registry: String,
    pub model: String,
    pub prompt: Vec<u32>,
    /// The undisturbed answer: the single-process engine's `CHAOS_TOKENS` tokens.
    pub reference: Vec<u32>,
    pub payer: Option<unfed_node::voucher::Payer>,
    /// Text shards: the paid hops of one step.
    pub hops: usize,
}

impl Chats {
    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: CHAOS_TOKENS,
            stop_on_eos: false,
            payer: self.payer.clone(),
            ..GenerateOptions::default()
        }
    }
}

/// Rides out `event`; on success, a one-line account of it.
pub async fn ride_out(ctx: &Context, chats: &Chats, event: &ChaosEvent) -> anyhow::Result<String> {
    let mut client = Client::connect(&ctx.net, &chats.registry).await?;
    let nodes_before = listed_nodes(&mut client, &chats.model).await?;
    let shares_before = daemon_shares(ctx).await?;
    let tokens = AtomicUsize::new(0);
    let over = AtomicBool::new(false);
    let started = Instant::now();
    let run_chats = async {
        let mut outs: Vec<GenerateOutput> = Vec::new();
        loop {
            // One whole chat starts after the fault is over.
            let last = over.load(Ordering::SeqCst);
            let n = outs.len() + 1;
            let out = client
                .generate(&chats.model, &chats.prompt, &chats.options(), |_| {
                    tokens.fetch_add(1, Ordering::SeqCst);
                })
                .await
                .with_context(|| format!("chat {n} failed"))?;
            ensure!(
                out.tokens == chats.reference,
                "chat {n} generated {:?}, the undisturbed run {:?}",
                out.tokens,
                chats.reference
            );
            outs.push(out);
            if last {
                return anyhow::Ok(outs);
            }
        }
    };
    let fault = async {
        let r = inject(ctx, chats, event, &tokens, started, nodes_before).await;
        over.store(true, Ordering::SeqCst);
        r
    };
    let (outs, ready) = tokio::join!(run_chats, fault);
    let ready = ready?;
    let outs = outs?;
    let failovers: usize = outs.iter().map(|o| o.failovers).sum();
    let mut account = format!(
        "{} chats equal the undisturbed run ({failovers} failovers); serving and READY {:.2}s after the fault ended",
        outs.len(),
        ready.as_secs_f64()
    );
    if let (Some(before), Some(_)) = (shares_before, &chats.payer) {
        let tokens: usize = outs.iter().map(|o| o.tokens.len()).sum();
        let (low, high) = (
            (tokens * chats.hops) as u64,
            ((tokens + failovers) * chats.hops) as u64,
        );
        let added = shares_delivered(ctx, before, low).await?;
        ensure!(
            added <= high,
            "the daemon recorded {added} shares for {tokens} steps × {} hops with {failovers} failovers (at most {high}): counted twice?",
            chats.hops
        );
        account += &format!("; {added} shares for {tokens} steps × {} hops", chats.hops);
    }
    Ok(account)
}

/// Waits for the trigger, applies the fault (and undoes it after its duration), then
/// waits for the target to serve and the model to be READY with every node; returns
/// how long that took after the fault ended.
async fn inject(
    ctx: &Context,
    chats: &Chats,
    event: &ChaosEvent,
    tokens: &AtomicUsize,
    started: Instant,
    nodes_before: u32,
) -> anyhow::Result<Duration> {
    match event.trigger {
        Trigger::At(s) => {
            tokio::time::sleep_until((started + Duration::from_secs_f64(s)).into()).await
        }
        Trigger::AfterTokens(n) => {
            let deadline = Instant::now() + PATIENCE;
            while tokens.load(Ordering::SeqCst) < n as usize {
                ensure!(
                    Instant::now() < deadline,
                    "the chats never reached {n} tokens"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let pid = pid_of(ctx, &event.target)?;
    let duration = Duration::from_secs_f64(event.duration.unwrap_or(0.0));
    let relay = || {
        ctx.relays
            .get(&event.target)
            .with_context(|| format!("{} has no relay in front of it", event.target))
    };
    match event.action {
        ChaosAction::Kill => signal(pid, Signal::SIGKILL)?,
        ChaosAction::Stop => {
            signal(pid, Signal::SIGSTOP)?;
            tokio::time::sleep(duration).await;
            signal(pid, Signal::SIGCONT)?;
        }
        ChaosAction::Slow => {
            let relay = relay()?;
            let delay = Duration::from_millis(event.delay_ms.unwrap_or(0));
            relay.set(Fault::Delay(delay));
            tokio::time::sleep(duration).await;
            relay.set(Fault::None);
        }
        ChaosAction::Partition => {
            let relay = relay()?;
            relay.set(Fault::Cut);
            tokio::time::sleep(duration).await;
            relay.set(Fault::None);
        }
    }
    let ended = Instant::now();
    let bound = Duration::from_secs_f64(event.ready_within);
    let mut client = Client::connect(&ctx.net, &chats.registry).await?;
    loop {
        let serving = serving(ctx, event, pid).await;
        let nodes = listed_nodes(&mut client, &chats.model).await;
        match (&serving, &nodes) {
            (Ok(()), Ok(n)) if *n >= nodes_before => return Ok(ended.elapsed()),
            _ if ended.elapsed() > bound => {
                let why = match (serving, nodes) {
                    (Err(e), _) => format!("{e:#}"),
                    (_, Err(e)) => format!("{e:#}"),
                    (_, Ok(n)) => format!("the registry lists {n} of {nodes_before} nodes"),
                };
                bail!(
                    "not READY again within {}s (ready_within) after the fault: {why}",
                    event.ready_within
                );
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// The target runs (a new process after a kill) and answers where peers dial it.
async fn serving(ctx: &Context, event: &ChaosEvent, old_pid: u32) -> anyhow::Result<()> {
    let target = process(ctx, |p| p.name == event.target)
        .with_context(|| format!("{} is not running (left stopped?)", event.target))?;
    if event.action == ChaosAction::Kill {
        ensure!(
            target.pid != old_pid,
            "{} has not been restarted yet",
            event.target
        );
    }
    let addr = dial_address(ctx, &target)?;
    match event.target_kind {
        StepKind::Daemon => {
            let mut d = unfed_node::daemon::client(&ctx.net, &addr, None).await?;
            d.get_chain_status(GetChainStatusRequest {}).await?;
        }
        _ => {
            compute_health(ctx, &target).await?;
        }
    }
    Ok(())
}

async fn compute_health(
    ctx: &Context,
    p: &ProcessRecord,
) -> anyhow::Result<unfed_proto::HealthResponse> {
    let ch = ctx
        .net
        .connect(
            &dial_address(ctx, p)?,
            unfed_node::net::REQUEST_TIMEOUT,
            None,
        )
        .await?;
    Ok(unfed_proto::compute_client::ComputeClient::new(ch)
        .health(unfed_proto::HealthRequest {})
        .await?
        .into_inner())
}

/// Shares signed by the compute nodes and not yet acknowledged by a daemon.
async fn shares_in_flight(ctx: &Context) -> anyhow::Result<u64> {
    let computes: Vec<ProcessRecord> = {
        let running = ctx.running.lock().unwrap();
        running
            .processes
            .iter()
            .filter(|p| p.kind == "compute")
            .cloned()
            .collect()
    };
    let mut pending = 0;
    for p in &computes {
        pending += compute_health(ctx, p).await?.shares_pending;
    }
    Ok(pending)
}

/// Nodes the registry counts for `model`; an error unless the model is READY.
async fn listed_nodes(client: &mut Client, model: &str) -> anyhow::Result<u32> {
    let models = client.list_models().await?;
    let m = models
        .iter()
        .find(|m| m.model == model)
        .with_context(|| format!("the registry does not list {model}"))?;
    ensure!(
        m.state == ModelState::Ready as i32,
        "{model} is not READY: {}",
        m.message
    );
    Ok(m.nodes)
}

/// Shares the daemon has accepted; `None` without a daemon.
async fn daemon_shares(ctx: &Context) -> anyhow::Result<Option<u64>> {
    let Some(mut d) = daemon(ctx).await? else {
        return Ok(None);
    };
    Ok(Some(
        d.get_chain_status(GetChainStatusRequest {})
            .await?
            .into_inner()
            .shares,
    ))
}

async fn daemon(ctx: &Context) -> anyhow::Result<Option<unfed_node::daemon::DaemonClient>> {
    let Some(daemon) = process(ctx, |p| p.kind == "daemon") else {
        return Ok(None);
    };
    let addr = dial_address(ctx, &daemon)?;
    Ok(Some(
        unfed_node::daemon::client(&ctx.net, &addr, None).await?,
    ))
}

/// Waits until the daemon has accepted at least `low` shares since `before` and no
/// compute node holds one back (so none of this case's shares lands in the next case's
/// count: a failover's replay may add some after the `low` first); returns how many it
/// accepted.
async fn shares_delivered(ctx: &Context, before: u64, low: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        // Read before the daemon's count: when nothing was pending then, the count
        // includes every share signed so far.
        let in_flight = shares_in_flight(ctx).await.ok();
        let status = match daemon(ctx).await? {
            Some(mut d) => d.get_chain_status(GetChainStatusRequest {}).await.ok(),
            None => None,
        };
        if let Some(st) = status.map(|s| s.into_inner()) {
            // `shares` counts every accepted share, in a block or still pending.
            let added = st.shares.saturating_sub(before);
            if added >= low && in_flight == Some(0) {
                return Ok(added);
            }
            if Instant::now() > deadline {
                let secs = PATIENCE.as_secs();
                ensure!(
                    added >= low,
                    "the daemon recorded {added} shares, fewer than the {low} hops served, within {secs}s: shares were lost"
                );
                bail!(
                    "the compute nodes still hold shares back after {secs}s ({in_flight:?} pending)"
                );
            }
        } else if Instant::now() > deadline {
            bail!("the daemon does not answer");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn pid_of(ctx: &Context, name: &str) -> anyhow::Result<u32> {
    process(ctx, |p| p.name == name)
        .map(|p| p.pid)
        .with_context(|| format!("{name} is not running"))
}

/// The newest running process `matches` picks.
fn process(ctx: &Context, matches: impl Fn(&ProcessRecord) -> bool) -> Option<ProcessRecord> {
    let running = ctx.running.lock().unwrap();
    running.processes.iter().rfind(|p| matches(p)).cloned()
}

/// Where peers dial `p`: the relay chaos put in front of it, else its own port.
fn dial_address(ctx: &Context, p: &ProcessRecord) -> anyhow::Result<String> {
    Ok(match ctx.relays.get(&p.name) {
        Some(relay) => relay.addr.to_string(),
        None => format!("127.0.0.1:{}", p.port.context("no port recorded")?),
    })
}

fn signal(pid: u32, sig: Signal) -> anyhow::Result<()> {
    kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("sending {sig} to pid {pid}"))
}
