//! `unfedctl test`: an ephemeral testnet (free ports, temporary run dir) and a conformance
//! pass over it — what CI runs. Several can run side by side.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use unfed_node::client::{Client, GenerateOptions, TextCodec};
use unfed_node::engine::SamplingConfig;
use unfed_node::engine::generate::{generate, load_checkpoint};
use unfed_proto::GetChainStatusRequest;

use super::{Testnet, start};
use crate::plan::{LaunchPlan, StepKind, model_facts};
use crate::spec::LoadedSpec;

/// The prompt every conformance run sends, raw (no chat template), greedy.
const PROMPT: &str = "The quick brown fox";
const MAX_TOKENS: usize = 16;

struct CaseResult {
    name: String,
    took: Duration,
    failure: Option<String>,
}

/// Run the conformance pass on an ephemeral copy of `loaded`'s testnet.
pub async fn test(
    mut loaded: LoadedSpec,
    junit: Option<PathBuf>,
    wait_timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let run_dir = tempfile::Builder::new().prefix("unfed-test-").tempdir()?;
    make_ephemeral(&mut loaded, run_dir.path());
    let plan = LaunchPlan::build(&loaded, model_facts(&loaded))?;
    let started = Instant::now();
    let relays = super::relay::Relays::for_chaos(&plan);
    let mut net = start(loaded, plan, wait_timeout, relays).await?;
    println!(
        "testnet up in {:.2}s; running conformance checks",
        net.took.as_secs_f64()
    );
    let mut results = run_cases(&net).await;
    if !net.ctx.plan.chaos.is_empty() {
        results.extend(run_chaos(&mut net).await);
    }
    net.teardown();

    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    for r in &results {
        match &r.failure {
            None => println!("[PASS] {} ({} ms)", r.name, r.took.as_millis()),
            Some(why) => println!("[FAIL] {}: {why}", r.name),
        }
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    if let Some(path) = junit {
        std::fs::write(
            &path,
            junit_xml(&net.ctx.plan.name, &results, started.elapsed()),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if failed > 0 {
        let kept = run_dir.keep();
        eprintln!("logs kept in {}", kept.join("logs").display());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Free ports everywhere and a private run directory, so runs never collide.
pub(crate) fn make_ephemeral(loaded: &mut LoadedSpec, run_dir: &Path) {
    let spec = &mut loaded.spec;
    spec.testnet.base_port = 0;
    spec.testnet.run_dir = run_dir.display().to_string();
    spec.chain.port = None;
    spec.web.port = None;
    // An ephemeral copy runs on this machine alone, whatever hosts the spec spans.
    spec.hosts.clear();
    for node in &mut spec.node_overrides {
        node.port = None;
        node.host = None;
    }
}

async fn run_cases(net: &Testnet) -> Vec<CaseResult> {
    let mut results = Vec::new();
    macro_rules! case {
        ($name:literal, $body:expr) => {{
            let t = Instant::now();
            let failure = match $body.await {
                Ok(_) => None,
                Err(e) => Some(format!("{e:#}")),
            };
            results.push(CaseResult {
                name: $name.into(),
                took: t.elapsed(),
                failure,
            });
        }};
    }
    case!("model_ready", model_ready(net));
    case!("nodes_admitted", nodes_admitted(net));
    case!("stakes_on_chain", stakes_on_chain(net));
    let mut generated = None;
    case!("chat_matches_single_process_engine", async {
        let n = chat_matches_engine(net).await?;
        generated = Some(n);
        anyhow::Ok(())
    });
    let has = |kind: StepKind| net.ctx.plan.steps.iter().any(|s| s.kind == kind);
    if has(StepKind::Daemon) {
        case!(
            "one_share_per_hop_recorded",
            shares_recorded(net, generated)
        );
    }
    if has(StepKind::Web) {
        case!("dashboard_shows_the_model_ready", dashboard_ready(net));
    }
    results
}

/// The dashboard's API lists the testnet's model as READY.
async fn dashboard_ready(net: &Testnet) -> anyhow::Result<()> {
    let (_, model) = registry_and_model(net)?;
    let port = net
        .state
        .processes
        .iter()
        .find(|p| p.kind == "web")
        .and_then(|p| p.port)
        .context("the web process has no port")?;
    let addr = format!("127.0.0.1:{port}");
    let probe = super::steps::dashboard_probe(&net.ctx)?;
    let reply = probe
        .get(&addr, "/api/models")
        .await
        .with_context(|| format!("the dashboard at {addr} does not answer"))?;
    let (status, body) = (reply.status, reply.body);
    ensure!(status == 200, "GET /api/models answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).context("/api/models is not JSON")?;
    let ready = v["models"]
        .as_array()
        .is_some_and(|ms| ms.iter().any(|m| m["model"] == model && m["ready"] == true));
    ensure!(ready, "the dashboard does not show {model} READY: {body}");
    Ok(())
}

fn registry_and_model(net: &Testnet) -> anyhow::Result<(&str, &str)> {
    let registry = net
        .state
        .registry
        .as_deref()
        .context("no registry in this testnet")?;
    let model = net
        .state
        .model_id
        .as_deref()
        .context("no model in this testnet")?;
    Ok((registry, model))
}

async fn model_ready(net: &Testnet) -> anyhow::Result<()> {
    let (registry, model) = registry_and_model(net)?;
    Client::connect(&net.ctx.net, registry)
        .await?
        .require_ready(model)
        .await
        .map(drop)
}

async fn nodes_admitted(net: &Testnet) -> anyhow::Result<()> {
    let (registry, model) = registry_and_model(net)?;
    let route = Client::connect(&net.ctx.net, registry)
        .await?
        .route(model)
        .await?;
    let expected = net.ctx.plan.text_shards();
    ensure!(
        route.len() == expected,
        "the route has {} hops, the plan {expected} text shards",
        route.len()
    );
    Ok(())
}

async fn stakes_on_chain(net: &Testnet) -> anyhow::Result<()> {
    let Some(chain) = &net.state.chain else {
        return Ok(());
    };
    let deployment = chain.deployment()?;
    let reader = unfed_chain::Chain::connect(&chain.rpc_url, unfed_chain::dev_signer(0)?)?;
    for wallet in &chain.wallets {
        let info = reader
            .stake_info(&deployment, wallet.address.parse()?)
            .await?;
        let expected: crate::spec::TokenAmount =
            wallet.stake.parse().map_err(anyhow::Error::msg)?;
        ensure!(
            info.active == super::steps::wei(expected) && info.eligible,
            "{} ({}) has {} staked (eligible: {}), expected {}",
            wallet.node,
            wallet.address,
            unfed_chain::format_amount(info.active),
            info.eligible,
            wallet.stake
        );
    }
    Ok(())
}

/// Greedy generation through the testnet equals the unsplit model in this process;
/// returns how many tokens it generated.
async fn chat_matches_engine(net: &Testnet) -> anyhow::Result<usize> {
    let (registry, model) = registry_and_model(net)?;
    let mut client = Client::connect(&net.ctx.net, registry).await?;
    let prompt = prompt_ids(&mut client, model).await?;
    let opts = GenerateOptions {
        max_tokens: MAX_TOKENS,
        payer: payer(net)?,
        ..GenerateOptions::default()
    };
    let network = client.generate(model, &prompt, &opts, |_| {}).await?.tokens;
    let reference = engine_answer(net, prompt, MAX_TOKENS, true).await?;
    if network != reference {
        bail!("the testnet generated {network:?}, the single-process engine {reference:?}");
    }
    Ok(network.len())
}

/// The conformance prompt's token ids under `model`'s tokenizer.
async fn prompt_ids(client: &mut Client, model: &str) -> anyhow::Result<Vec<u32>> {
    let (_, files) = client.manifest(model).await?;
    TextCodec::from_manifest_files(&files, model)?.encode_prompt(PROMPT, true)
}

/// The testnet's client wallet, which pays as `unfedctl chat` would (none unstaked).
fn payer(net: &Testnet) -> anyhow::Result<Option<unfed_node::voucher::Payer>> {
    let client_key = net.ctx.key_path("client");
    if !client_key.is_file() {
        return Ok(None);
    }
    let key = unfed_chain::read_key_file(&client_key)?;
    Ok(Some(unfed_node::voucher::Payer::wallet(key)))
}

/// The unsplit model's greedy answer to `prompt`, in this process.
async fn engine_answer(
    net: &Testnet,
    prompt: Vec<u32>,
    tokens: usize,
    stop_on_eos: bool,
) -> anyhow::Result<Vec<u32>> {
    let source = super::steps::model_source_dir(&net.ctx.loaded, &net.ctx.plan);
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u32>> {
        let (_, whole) = load_checkpoint(&source)?;
        let sampling = SamplingConfig::default();
        Ok(generate(&whole, &prompt, tokens, sampling, stop_on_eos)?.tokens)
    })
    .await?
}

/// One case per `[[chaos]]` fault, in order, each ridden out while the restart policy
/// is applied to whatever exits.
async fn run_chaos(net: &mut Testnet) -> Vec<CaseResult> {
    let t = Instant::now();
    let chats = match chaos_chats(net).await {
        Ok(c) => c,
        Err(e) => {
            return vec![CaseResult {
                name: "chaos_setup".into(),
                took: t.elapsed(),
                failure: Some(format!("{e:#}")),
            }];
        }
    };
    let ctx = &net.ctx;
    let faults = async {
        let mut results = Vec::new();
        for (i, event) in ctx.plan.chaos.iter().enumerate() {
            println!("chaos {}: {}", i + 1, event.describe());
            let t = Instant::now();
            let outcome = super::chaos::ride_out(ctx, &chats, event).await;
            if let Ok(account) = &outcome {
                println!("  {account}");
            }
            results.push(CaseResult {
                name: event.case_name(i),
                took: t.elapsed(),
                failure: outcome.err().map(|e| format!("{e:#}")),
            });
        }
        results
    };
    super::supervise_until(ctx, &mut net.state, faults).await
}

async fn chaos_chats(net: &Testnet) -> anyhow::Result<super::chaos::Chats> {
    let (registry, model) = registry_and_model(net)?;
    let mut client = Client::connect(&net.ctx.net, registry).await?;
    let prompt = prompt_ids(&mut client, model).await?;
    let tokens = super::chaos::CHAOS_TOKENS;
    let reference = engine_answer(net, prompt.clone(), tokens, false).await?;
    let hops = net.ctx.plan.text_shards();
    Ok(super::chaos::Chats {
        registry: registry.to_string(),
        model: model.to_string(),
        prompt,
        reference,
        payer: payer(net)?,
        hops,
    })
}

fn junit_xml(suite: &str, results: &[CaseResult], took: Duration) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuite name=\"unfed.{}\" tests=\"{}\" failures=\"{failed}\" time=\"{:.3}\">",
        escape(suite),
        results.len(),
        took.as_secs_f64()
    );
    for r in results {
        let _ = write!(
            xml,
            "  <testcase name=\"{}\" time=\"{:.3}\"",
            r.name,
            r.took.as_secs_f64()
        );
        match &r.failure {
            None => xml.push_str("/>\n"),
            Some(why) => {
                let _ = writeln!(
                    xml,
                    ">\n    <failure message=\"{}\"/>\n  </testcase>",
                    escape(why)
                );
            }
        }
    }
    xml.push_str("</testsuite>\n");
    xml
}

/// The daemon records exactly one share per hop of the chat: tokens × text shards.
async fn shares_recorded(net: &Testnet, generated: Option<usize>) -> anyhow::Result<()> {
    let tokens = generated.context("the chat check failed, so there is nothing to count")?;
    let hops = net.ctx.plan.text_shards();
    let expected = (tokens * hops) as u64;
    let daemon = net
        .state
        .processes
        .iter()
        .find(|p| p.kind == "daemon")
        .and_then(|p| p.port)
        .context("no daemon port")?;
    let mut client =
        unfed_node::daemon::client(&net.ctx.net, &format!("127.0.0.1:{daemon}"), None).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = client
            .get_chain_status(GetChainStatusRequest {})
            .await?
            .into_inner();
        // `shares` counts every accepted share, in a block or still pending.
        let recorded = status.shares;
        ensure!(
            recorded <= expected,
            "the daemon recorded {recorded} shares for {expected} hops (counted twice?)"
        );
        if recorded == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon recorded {recorded} of {expected} shares ({tokens} tokens × {hops} hops) within 15 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
