//! `[nodes] restart`: what `up` (in the foreground, or as the supervisor of `--detach`)
//! does when a process it started exits after the launch. A death is reported and the
//! policy decides: restart it on its old port (so every address others hold stays
//! right) after an exponential backoff, or leave it stopped; a node restarted too often
//! within a minute is left stopped with a message. The rest of the testnet keeps running.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::state::{ProcessRecord, RunState};
use super::steps::{Context, Inputs};
use crate::spec::RestartPolicy;

/// The first restart waits this long; each further one within a minute twice as long.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const WINDOW: Duration = Duration::from_secs(60);

/// A process that exited on its own.
pub struct Exit {
    pub record: ProcessRecord,
    /// `None`: not our child (Anvil), so its status is unknown.
    pub status: Option<ExitStatus>,
}

impl Exit {
    fn failed(&self) -> bool {
        self.status.is_none_or(|s| !s.success())
    }

    fn describe(&self) -> String {
        match self.status {
            Some(status) => status.to_string(),
            None => "exited".into(),
        }
    }
}

/// Remove every process that has exited from the running set and return them.
pub fn reap(ctx: &Context) -> Vec<Exit> {
    let mut running = ctx.running.lock().unwrap();
    let mut exits = Vec::new();
    let mut i = 0;
    while i < running.processes.len() {
        let status = match &mut running.children[i] {
            Some(child) => match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(Some(status)),
                Err(_) => Some(None),
            },
            None => (!super::process::alive(running.processes[i].pid)).then_some(None),
        };
        match status {
            Some(status) => {
                running.children.remove(i);
                exits.push(Exit {
                    record: running.processes.remove(i),
                    status,
                });
            }
            None => i += 1,
        }
    }
    exits
}

pub struct Supervisor {
    policy: RestartPolicy,
    cap: usize,
    /// When each node was restarted, within the last minute.
    restarts: HashMap<String, Vec<Instant>>,
}

impl Supervisor {
    pub fn new(ctx: &Context) -> Self {
        let nodes = &ctx.loaded.spec.nodes;
        Self {
            policy: nodes.restart,
            cap: nodes.max_restarts_per_minute as usize,
            restarts: HashMap::new(),
        }
    }

    /// Report `exit` and apply the policy; returns once the node runs again (ready and,
    /// for nodes, listed by the registry) or is left stopped.
    pub async fn handle(&mut self, ctx: &Context, state: &mut RunState, mut exit: Exit) {
        let died = Instant::now();
        loop {
            let name = exit.record.name.clone();
            let wanted = match self.policy {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => exit.failed(),
                RestartPolicy::Always => true,
            };
            println!("{name} {}", exit.describe());
            // state.json drops a node left stopped before that is reported.
            if exit.record.kind == "anvil" {
                self.forget(ctx, state);
                println!(
                    "  anvil is not restarted: the chain's state died with it; `unfedctl down` and `up` again"
                );
                return;
            }
            if !wanted {
                self.forget(ctx, state);
                println!(
                    "  left stopped ([nodes] restart = \"{}\")",
                    policy_name(self.policy)
                );
                return;
            }
            let history = self.restarts.entry(name.clone()).or_default();
            history.retain(|t| t.elapsed() < WINDOW);
            if history.len() >= self.cap {
                let restarts = history.len();
                self.forget(ctx, state);
                eprintln!(
                    "{name} was restarted {} times within a minute and exited again: left stopped. \
                     Read {} for why; raise [nodes] max_restarts_per_minute to allow more",
                    restarts,
                    exit.record.log.display()
                );
                return;
            }
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << history.len().min(16))
                .min(MAX_BACKOFF);
            history.push(Instant::now());
            tokio::time::sleep(backoff).await;
            match restart(ctx, state, &exit.record).await {
                Ok(record) => {
                    println!(
                        "  restarted {name} (pid {}, port {}) {:.2}s after it died",
                        record.pid,
                        record.port.unwrap_or(0),
                        died.elapsed().as_secs_f64()
                    );
                    if super::wait_ready(ctx, state).await.is_ok()
                        && let Some(model) = &state.model_id
                    {
                        println!(
                            "  model {model} READY again {:.2}s after {name} died",
                            died.elapsed().as_secs_f64()
                        );
                    }
                    return;
                }
                Err(err) => {
                    println!("  restarting {name} failed: {err:#}");
                    // The failed attempt is in the running set (recorded at spawn): take it
                    // out and count it as another exit.
                    let mut running = ctx.running.lock().unwrap();
                    let at = running.processes.iter().rposition(|p| p.name == name);
                    let record = at.map(|i| {
                        running.children.remove(i);
                        running.processes.remove(i)
                    });
                    drop(running);
                    if let Some(record) = record {
                        super::stop_reporting(&record);
                        exit = Exit {
                            record,
                            status: None,
                        };
                    }
                }
            }
        }
    }

    /// Persist the running set without the processes left stopped.
    fn forget(&self, ctx: &Context, state: &mut RunState) {
        state.processes = ctx.running.lock().unwrap().processes.clone();
        let _ = state.save(&ctx.plan.run_dir);
    }
}

/// Start the step that ran `old` again, on its old port.
async fn restart(
    ctx: &Context,
    state: &mut RunState,
    old: &ProcessRecord,
) -> anyhow::Result<ProcessRecord> {
    let mut step = ctx
        .plan
        .step(&old.name)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{} is not a step of the plan", old.name))?;
    step.port = old.port.or(step.port);
    let inputs = Inputs {
        chain: state.chain.clone(),
        registry: state.registry.clone(),
    };
    let outcome = super::steps::run(ctx, &step, inputs).await?;
    super::record(ctx, state, outcome)?;
    let running = ctx.running.lock().unwrap();
    Ok(running
        .processes
        .iter()
        .rfind(|p| p.name == old.name)
        .cloned()
        .expect("a started step is in the running set"))
}

pub fn policy_name(policy: RestartPolicy) -> &'static str {
    match policy {
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Always => "always",
        RestartPolicy::Never => "never",
    }
}
