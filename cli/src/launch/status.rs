//! `unfedctl status`: what runs, as the processes, the registry, the chain and the daemon
//! see it.

use std::process::ExitCode;

use serde::Serialize;
use unfed_proto::GetChainStatusRequest;

use super::pid;
use super::state::RunState;
use crate::plan::LaunchPlan;

#[derive(Serialize)]
struct NodeStatus {
    name: String,
    kind: String,
    shard: Option<usize>,
    address: Option<String>,
    pid: u32,
    alive: bool,
    /// Set when another process now holds the recorded PID: what it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pid_reused: Option<String>,
    /// Listed by the registry (admitted, stake still eligible); None for non-nodes.
    admitted: Option<bool>,
    last_heartbeat_ms_ago: Option<u64>,
    eth_address: Option<String>,
    /// Stake on-chain now (active + cooling), or the configured stake if the chain
    /// cannot be read.
    stake: Option<String>,
    /// Excluded by the registry after a guilty fraud verdict.
    excluded: bool,
}

/// A fraud verdict of the registry.
#[derive(Serialize)]
struct VerdictLine {
    accused: String,
    reporter: String,
    shard: u32,
    guilty: bool,
    stage: String,
    detail: String,
    /// Tokens slashed on-chain, if any.
    slashed: Option<String>,
}

#[derive(Serialize)]
struct ModelLine {
    model: String,
    ready: bool,
    status: String,
    nodes: u32,
    shards: String,
}

/// A machine of a testnet that spans hosts, and the nodes the registry lists there.
#[derive(Serialize)]
struct HostLine {
    name: String,
    address: String,
    control: bool,
    /// When it joined (unix seconds), as the control host recorded it.
    joined_at: Option<u64>,
    /// Listed by the registry at this host's address: node id, role, shard, address.
    nodes: Vec<HostNode>,
}

#[derive(Serialize)]
struct HostNode {
    node: String,
    role: String,
    shard: u32,
    address: String,
}

#[derive(Serialize)]
struct Status {
    name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hosts: Vec<HostLine>,
    registry: Option<String>,
    /// Which links are encrypted.
    links: &'static str,
    /// The dashboard's URL (https with `[web] tls`).
    dashboard: Option<String>,
    nodes: Vec<NodeStatus>,
    models: Vec<ModelLine>,
    chain_rpc: Option<String>,
    chain_height: Option<u64>,
    daemon_height: Option<u64>,
    verdicts: Vec<VerdictLine>,
}

/// Roles the registry lists; everything else (anvil, registry) is not "admitted".
const LISTED_KINDS: [&str; 3] = ["compute", "vision", "daemon"];

async fn gather(plan: &LaunchPlan, state: &RunState) -> Status {
    let mut listed = Vec::new();
    let mut models = Vec::new();
    let mut verdicts = unfed_proto::ListVerdictsResponse::default();
    if let Some(registry) = &state.registry
        && let Ok(net) = state.net()
        && let Ok(mut client) = unfed_node::membership::registry_client(&net, registry)
    {
        let discover = unfed_proto::DiscoverRequest {
            model: String::new(),
        };
        listed = client
            .discover(discover)
            .await
            .map(|r| r.into_inner().nodes)
            .unwrap_or_default();
        let list = client.list_models(unfed_proto::ListModelsRequest {}).await;
        models = list.map(|r| r.into_inner().models).unwrap_or_default();
        if let Ok(v) = client
            .list_verdicts(unfed_proto::ListVerdictsRequest {})
            .await
        {
            verdicts = v.into_inner();
        }
    }
    let stakes = live_stakes(state).await;
    let nodes = state
        .processes
        .iter()
        .map(|p| {
            let address = p.dial_address();
            let entry = listed.iter().find(|n| Some(&n.address) == address.as_ref());
            let wallet = state
                .chain
                .as_ref()
                .and_then(|c| c.wallets.iter().find(|w| w.node == p.name));
            let now = p.now();
            NodeStatus {
                name: p.name.clone(),
                kind: p.kind.clone(),
                shard: p.shard,
                address,
                pid: p.pid,
                alive: now == pid::Now::Ours,
                pid_reused: match now {
                    pid::Now::Other(why) => Some(why),
                    _ => None,
                },
                admitted: LISTED_KINDS
                    .contains(&p.kind.as_str())
                    .then_some(entry.is_some()),
                last_heartbeat_ms_ago: entry.map(|n| n.last_seen_ms_ago),
                eth_address: p.eth_address.clone(),
                stake: p
                    .eth_address
                    .as_ref()
                    .and_then(|a| stakes.get(a).cloned())
                    .or_else(|| wallet.map(|w| w.stake.clone())),
                excluded: p
                    .eth_address
                    .as_ref()
                    .is_some_and(|a| verdicts.excluded.contains(a))
                    || verdicts.excluded.contains(&p.name),
            }
        })
        .collect();
    let models = models
        .iter()
        .map(|m| ModelLine {
            model: m.model.clone(),
            ready: m.state == unfed_proto::ModelState::Ready as i32,
            status: unfed_node::client::readiness_text(m),
            nodes: m.nodes,
            shards: format!("{}/{}", m.text_shards_covered, m.text_shards_total),
        })
        .collect();
    let chain_height = match &state.chain {
        Some(c) => chain_height(&c.rpc_url).await,
        None => None,
    };
    let daemon = state
        .processes
        .iter()
        .find(|p| p.kind == "daemon")
        .and_then(|p| p.dial_address());
    let daemon_height = match daemon {
        Some(addr) => {
            match async { unfed_node::daemon::client(&state.net()?, &addr, None).await }.await {
                Ok(mut d) => d
                    .get_chain_status(GetChainStatusRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner().height),
                Err(_) => None,
            }
        }
        None => None,
    };
    let hosts = host_lines(plan, state, &listed);
    Status {
        name: plan.name.clone(),
        hosts,
        registry: state.registry.clone(),
        links: crate::plan::links_statement(state.tls_ca.is_some()),
        dashboard: state.dashboard.clone(),
        nodes,
        models,
        chain_rpc: state.chain.as_ref().map(|c| c.rpc_url.clone()),
        chain_height,
        daemon_height,
        verdicts: verdicts
            .verdicts
            .into_iter()
            .map(|v| VerdictLine {
                accused: v.accused,
                reporter: v.reporter,
                shard: v.shard_index,
                guilty: v.guilty,
                stage: v.stage,
                detail: v.detail,
                slashed: v
                    .slashed
                    .parse::<unfed_chain::U256>()
                    .ok()
                    .map(unfed_chain::format_amount),
            })
            .collect(),
    }
}

/// Every `[[host]]` with what the registry lists at its address; node ids (wallets)
/// are shown by node name where this host's records know it.
fn host_lines(
    plan: &LaunchPlan,
    state: &RunState,
    listed: &[unfed_proto::NodeInfo],
) -> Vec<HostLine> {
    let joined = super::join::read_joined(&plan.run_dir);
    let mut names: Vec<(String, String)> = joined.iter().flat_map(|j| j.nodes.clone()).collect();
    if let Some(chain) = &state.chain {
        names.extend(
            chain
                .wallets
                .iter()
                .map(|w| (w.node.clone(), w.address.clone())),
        );
    }
    plan.hosts
        .iter()
        .map(|h| {
            let record = joined.iter().find(|j| j.name == h.name);
            let ip_of = |addr: &str| addr.rsplit_once(':').map(|(ip, _)| ip.to_string());
            let nodes = listed
                .iter()
                .filter(|n| ip_of(&n.address).as_deref() == Some(h.address.as_str()))
                .map(|n| {
                    let name = names
                        .iter()
                        .find(|(_, wallet)| wallet.eq_ignore_ascii_case(&n.node_id))
                        .map_or_else(|| n.node_id.clone(), |(name, _)| name.clone());
                    HostNode {
                        node: name,
                        role: n.role.clone(),
                        shard: n.shard_index,
                        address: n.address.clone(),
                    }
                })
                .collect();
            HostLine {
                name: h.name.clone(),
                address: h.address.clone(),
                control: h.control,
                joined_at: record.map(|r| r.joined_at),
                nodes,
            }
        })
        .collect()
}

/// Each wallet's stake on-chain (active + cooling), by address.
async fn live_stakes(state: &RunState) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Some(c) = &state.chain else { return out };
    let (Some(escrow), Ok(signer)) = (&c.escrow, unfed_chain::dev_signer(0)) else {
        return out;
    };
    let (Ok(chain), Ok(escrow)) = (
        unfed_chain::Chain::connect(&c.rpc_url, signer),
        escrow.parse(),
    ) else {
        return out;
    };
    let d = unfed_chain::Deployment {
        token: unfed_chain::Address::ZERO,
        escrow,
    };
    for w in &c.wallets {
        if let Ok(addr) = w.address.parse()
            && let Ok(info) = chain.stake_info(&d, addr).await
        {
            out.insert(
                w.address.clone(),
                unfed_chain::format_amount(info.active + info.cooling),
            );
        }
    }
    out
}

async fn chain_height(rpc_url: &str) -> Option<u64> {
    let chain = unfed_chain::Chain::connect(rpc_url, unfed_chain::dev_signer(0).ok()?).ok()?;
    chain.block_number().await.ok()
}

pub async fn status(plan: &LaunchPlan, json: bool) -> anyhow::Result<ExitCode> {
    let state = RunState::load(&plan.run_dir)?.unwrap_or_default();
    let status = gather(plan, &state).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    if status.nodes.is_empty() {
        println!("testnet '{}' is not running", plan.name);
        return Ok(ExitCode::SUCCESS);
    }
    println!("testnet '{}'", plan.name);
    println!(
        "  {:<12} {:<9} {:<5} {:<16} {:<7} {:<5} {:<9} {:<9} {:<7} WALLET",
        "NODE", "ROLE", "SHARD", "ADDRESS", "PID", "ALIVE", "ADMITTED", "HEARTBEAT", "STAKE"
    );
    for n in &status.nodes {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "  {:<12} {:<9} {:<5} {:<16} {:<7} {:<5} {:<9} {:<9} {:<7} {}",
            n.name,
            n.kind,
            opt(n.shard.map(|s| s.to_string())),
            opt(n.address.clone()),
            n.pid,
            match (n.alive, &n.pid_reused) {
                (true, _) => "yes",
                (false, None) => "DEAD",
                (false, Some(_)) => "GONE",
            },
            opt(n
                .admitted
                .map(|a| if a { "yes".into() } else { "NO".into() })),
            opt(n
                .last_heartbeat_ms_ago
                .map(|ms| format!("{:.1}s ago", ms as f64 / 1e3))),
            opt(n.stake.clone()),
            n.eth_address.as_deref().unwrap_or("-"),
        );
    }
    for n in &status.nodes {
        if let Some(why) = &n.pid_reused {
            println!("  {}", pid::left_alone(&n.name, n.pid, why));
        }
    }
    for m in &status.models {
        println!(
            "  model {}: {}, {} node(s), shards {}",
            m.model, m.status, m.nodes, m.shards
        );
    }
    for h in &status.hosts {
        let role = match (h.control, h.joined_at) {
            (true, _) => "control",
            (false, Some(_)) => "joined",
            (false, None) => "not joined",
        };
        let nodes: Vec<String> = h
            .nodes
            .iter()
            .map(|n| format!("{} ({} shard {})", n.node, n.role, n.shard))
            .collect();
        println!(
            "  host {} {} [{role}]: {}",
            h.name,
            h.address,
            if nodes.is_empty() {
                "no node listed".into()
            } else {
                nodes.join(", ")
            }
        );
    }
    println!("  links: {}", status.links);
    if let Some(url) = &status.dashboard {
        println!("  dashboard {url}");
    }
    if let Some(rpc) = &status.chain_rpc {
        let height = status
            .chain_height
            .map_or("unreachable".into(), |h| format!("block {h}"));
        println!("  chain {rpc}: {height}");
    }
    if let Some(h) = status.daemon_height {
        println!("  share chain: height {h}");
    }
    for n in status.nodes.iter().filter(|n| n.excluded) {
        println!("  EXCLUDED {} (found cheating)", n.name);
    }
    for v in &status.verdicts {
        println!(
            "  verdict: {} (shard {}) {} [{}], reported by {}: {}{}",
            v.accused,
            v.shard,
            if v.guilty { "GUILTY" } else { "not guilty" },
            v.stage,
            v.reporter,
            v.detail,
            v.slashed
                .as_ref()
                .map(|s| format!("; slashed {s}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
