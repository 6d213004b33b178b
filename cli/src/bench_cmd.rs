//! `unfedctl bench`: prefill/decode speed, TTFT and per-hop overhead of the network
//! against the single-process engine on the same shards — and, with `--compare-tls`,
//! of the same testnet with and without TLS, in one run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use unfed_node::client::private::PrivateRoute;
use unfed_node::client::{Client, GenerateOptions};
use unfed_node::mpc::net::{LinkTraffic, MpcTraffic};
use unfed_node::proto::SamplingParams;

use crate::client_cmd::{Target, pick_model, resolve};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub target: Target,
    /// Split directory to load into one process for the baseline (default: the spec's).
    #[arg(long)]
    pub shards_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 23)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Decode exactly --tokens every run, past any EOS (else a run ends at EOS, in the
    /// network and the single process alike).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Measured runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Start two ephemeral copies of the spec's testnet, one with TLS and one without,
    /// and measure both against the single process in the same run (the cost of TLS).
    #[arg(long)]
    pub compare_tls: bool,
    /// Start 1, 2, 4, … N sessions at once against the network: aggregate and
    /// per-session decode tok/s and inter-token latency at each level.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    pub concurrency: Option<u64>,
    /// With --concurrency: write the figures as JSON to this file, and a plot of tok/s
    /// against sessions beside it (same name, .svg).
    #[arg(long, value_name = "FILE.json", requires = "concurrency")]
    pub output: Option<PathBuf>,
    /// The same seeded sampling in the network and the single process (greedy unless
    /// --temperature), so both generate the same tokens.
    #[command(flatten)]
    pub sampling: crate::client_cmd::Sampling,
}

#[derive(Clone, Copy, Default, serde::Serialize)]
struct Speed {
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
}

/// What the memory allows: a decode step reads every weight once, so the machine's read
/// rate (measured in this run) over the bytes per step bounds single-session decode.
#[derive(serde::Serialize)]
struct DecodeBound {
    weight_bytes_per_token: usize,
    memory_read_gb_per_s: f64,
    bound_tokens_per_s: f64,
    single_process_fraction: f64,
}

/// Below this, a model's weights stay in the last-level cache of most CPUs between
/// tokens, so memory bandwidth bounds nothing.
const CACHE_RESIDENT_BYTES: usize = 64 << 20;

impl DecodeBound {
    async fn measure(bytes: usize, single_decode: f64) -> Result<Self> {
        let rate =
            tokio::task::spawn_blocking(unfed_node::engine::bandwidth::read_bytes_per_second)
                .await?;
        let bound = rate / bytes.max(1) as f64;
        Ok(Self {
            weight_bytes_per_token: bytes,
            memory_read_gb_per_s: rate / 1e9,
            bound_tokens_per_s: bound,
            single_process_fraction: single_decode / bound,
        })
    }

    fn print(&self) {
        if self.weight_bytes_per_token < CACHE_RESIDENT_BYTES {
            println!(
                "weight-streaming bound: none; the {:.1} MB of weights a token reads stay in the CPU caches",
                self.weight_bytes_per_token as f64 / 1e6
            );
            return;
        }
        let single = if self.single_process_fraction > 0.0 {
            format!(
                "; single-process decode at {:.0} % of it",
                self.single_process_fraction * 100.0
            )
        } else {
            String::new()
        };
        println!(
            "weight-streaming bound: {:.1} MB read per token at {:.1} GB/s (measured now) = {:.1} tok/s{single}",
            self.weight_bytes_per_token as f64 / 1e6,
            self.memory_read_gb_per_s,
            self.bound_tokens_per_s,
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One generation: (ttft_ms, decode_ms, decoded tokens).
type Run = (f64, f64, usize);

fn decode_rate(r: &Run) -> f64 {
    if r.1 > 0.0 {
        r.2 as f64 * 1e3 / r.1
    } else {
        0.0
    }
}

/// Tokens the last run generated (fewer than --tokens when it ended at EOS).
fn generated(runs: &[Run]) -> Option<usize> {
    runs.last().map(|r| r.2 + 1)
}

fn summarize(runs: &[Run], prompt: usize) -> Speed {
    let ttft = median(runs.iter().map(|r| r.0).collect());
    Speed {
        prefill_tokens_per_s: prompt as f64 * 1e3 / ttft,
        decode_tokens_per_s: median(runs.iter().map(decode_rate).collect()),
        ttft_ms: ttft,
    }
}

/// The median over runs of `a`'s decode rate divided by `b`'s, run by run, so a change
/// in machine load during the benchmark hits both sides of each ratio alike.
fn paired_ratio(a: &[Run], b: &[Run]) -> Option<f64> {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.2 > 0 && y.2 > 0 && x.1 > 0.0 && y.1 > 0.0)
        .map(|(x, y)| decode_rate(x) / decode_rate(y))
        .collect();
    // None when no pair decoded a token (`--tokens 1` measures the prefill only).
    (!ratios.is_empty()).then(|| median(ratios))
}

/// A ratio for the table, or "-" when there was nothing to compare.
fn shown(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| format!("{r:.3}"))
}

/// A network under measurement and what it measured.
struct Measured {
    label: String,
    client: Client,
    /// Signs the sessions' spending vouchers (the testnet's dev client).
    payer: Option<unfed_node::voucher::Payer>,
    runs: Vec<Run>,
    /// Where a token's time goes, ms per token.
    split: Split,
    /// Generate through this MPC pair (the private mode) instead of the compute route.
    private: Option<PrivateRoute>,
    /// The client's traffic with the pair in the last run.
    traffic: Option<MpcTraffic>,
    /// Measured runs whose tokens differ from the single process's in the same round:
    /// then the two timed different generations.
    mismatches: usize,
}

/// A token's time by where it went, ms per token: each hop's step (from the request's
/// arrival to its output: checks, queueing and compute), each hop's remaining time not
/// spent waiting downstream (attesting, sending on, checking the answer), and the client
/// round trip to the entry hop beyond the hops' own time.
#[derive(Default)]
struct Split {
    compute: Vec<f64>,
    overhead: Vec<f64>,
    client: f64,
}

impl Split {
    fn of(out: &unfed_node::client::GenerateOutput, steps: f64) -> Self {
        let hops = &out.hops;
        let overhead = hops
            .iter()
            .enumerate()
            .map(|(k, h)| {
                let downstream = hops.get(k + 1).map_or(0.0, |n| n.total_ms);
                (h.total_ms - h.compute_ms - downstream) / steps
            })
            .collect();
        Self {
            compute: hops.iter().map(|h| h.compute_ms / steps).collect(),
            overhead,
            client: (out.total_ms - hops.first().map_or(0.0, |h| h.total_ms)) / steps,
        }
    }
}

impl Measured {
    fn new(label: String, client: Client, payer: Option<unfed_node::voucher::Payer>) -> Self {
        Self {
            label,
            client,
            payer,
            runs: Vec::new(),
            split: Split::default(),
            private: None,
            traffic: None,
            mismatches: 0,
        }
    }
}

pub async fn bench(a: BenchArgs) -> Result<ExitCode> {
    // Bad sampling flags fail before any testnet starts.
    let sampling = a.sampling.params()?;
    if let Some(n) = a.concurrency {
        return concurrency(&a, sampling, n as usize).await;
    }
    let mut testnets = Vec::new();
    let (mut networks, model, shards_dir) = if a.compare_tls {
        if a.target.registry.is_some() {
            bail!(
                "--compare-tls starts its own testnets from a spec: drop --registry and name the spec (or none for the built-in one)"
            );
        }
        let loaded = crate::spec::load(a.target.spec.as_deref())?;
        let mut networks = Vec::new();
        let mut shards_dir = PathBuf::new();
        for (tls, label) in [(true, "network (TLS)"), (false, "network (plaintext)")] {
            let mut l = loaded.clone();
            let dir = tempfile::Builder::new().prefix("unfed-bench-").tempdir()?;
            crate::launch::conformance::make_ephemeral(&mut l, dir.path());
            l.spec.testnet.tls = tls;
            // Nothing but the inference path: no dashboard.
            l.spec.web.enabled = false;
            let plan = crate::plan::LaunchPlan::build(&l, crate::plan::model_facts(&l))?;
            shards_dir = plan.shards_dir.clone();
            let net =
                crate::launch::start(l, plan, Duration::from_secs(120), Default::default()).await?;
            let registry = net.state.registry.clone().context("no registry started")?;
            let client = Client::connect(&net.ctx.net, &registry).await?;
            // The testnet's dev client pays, as `chat` would.
            let payer = match net.state.chain.as_ref().and_then(|c| c.client.as_ref()) {
                Some(_) => Some(unfed_node::voucher::Payer::wallet(
                    unfed_chain::read_key_file(&net.ctx.key_path("client"))?,
                )),
                None => None,
            };
            networks.push(Measured::new(label.to_string(), client, payer));
            testnets.push((net, dir));
        }
        let model = pick_model(&mut networks[0].client, a.target.model.clone()).await?;
        (networks, model, Some(shards_dir))
    } else {
        let r = resolve(&a.target)?;
        let mut client = Client::connect(&r.net, &r.registry).await?;
        let model = pick_model(&mut client, r.model).await?;
        // A model with an MPC pair: its private mode too, against the plaintext route.
        let private =
            crate::client_cmd::private_route(&mut client, &model, r.shards_dir.as_deref()).await?;
        let mut networks = vec![Measured::new("network".into(), client, r.payer.clone())];
        if let Some(route) = private {
            let private = Client::connect(&r.net, &r.registry).await?;
            let mode = if route.0.full_output {
                "full_output_2pc".to_string()
            } else {
                format!("MPC to layer {}", route.0.layer_end)
            };
            let mut m = Measured::new(format!("private ({mode})"), private, r.payer);
            m.private = Some(route);
            networks.push(m);
        }
        (networks, model, r.shards_dir)
    };
    let result = measure(&a, sampling, &mut networks, &model, shards_dir).await;
    for (mut net, _dir) in testnets {
        net.teardown();
    }
    result
}

async fn measure(
    a: &BenchArgs,
    sampling: SamplingParams,
    networks: &mut [Measured],
    model: &str,
    shards_dir: Option<PathBuf>,
) -> Result<ExitCode> {
    let status = networks[0].client.require_ready(model).await?;
    // A testnet's shards dir is the split itself or holds one split per model.
    let from_spec = shards_dir.map(|d| {
        if d.join("manifest.json").is_file() {
            d
        } else {
            d.join(model)
        }
    });
    let shards_dir = a.shards_dir.clone().or(from_spec);
    let shards_dir =
        shards_dir.context("the single-process baseline needs the split: pass --shards-dir DIR")?;
    let (manifest, local) = tokio::task::spawn_blocking({
        let d = shards_dir.clone();
        move || unfed_node::engine::generate::load_split(&d)
    })
    .await??;
    if manifest.model_id != model {
        bail!(
            "{} holds `{}`, not `{model}`; pass the matching --shards-dir",
            shards_dir.display(),
            manifest.model_id
        );
    }
    let vocab = manifest.config.text.vocab_size as u32;
    // Deterministic prompt ids.
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab.max(2))
        .collect();
    let runs = a.runs.max(1);
    let local = std::sync::Arc::new(local);
    // The node's reading of the same parameters, so both sample alike.
    let config = unfed_node::compute::sampling_of(Some(&sampling));
    let opts = GenerateOptions {
        max_tokens: a.tokens,
        stop_on_eos: !a.ignore_eos,
        sampling,
        ..Default::default()
    };
    // Single-process and network runs alternate within each round.
    let mut single = Vec::new();
    for i in 0..=runs {
        let (m, p, n, stop) = (local.clone(), prompt.clone(), a.tokens, opts.stop_on_eos);
        let g = tokio::task::spawn_blocking(move || {
            unfed_node::engine::generate::generate(&m, &p, n, config, stop)
        })
        .await??;
        if i > 0 {
            single.push((g.prefill_ms, g.decode_ms, g.tokens.len().saturating_sub(1)));
        }
        for net in networks.iter_mut() {
            let opts = GenerateOptions {
                payer: net.payer.clone(),
                ..opts.clone()
            };
            let out = net
                .client
                .generate_via(model, net.private.as_ref(), &prompt, None, &opts, |_| {})
                .await?;
            if i == 0 {
                continue; // warm-up
            }
            net.traffic = out.mpc_traffic.clone();
            net.mismatches += usize::from(out.tokens != g.tokens);
            net.runs.push((
                out.ttft_ms,
                out.total_ms - out.ttft_ms,
                out.tokens.len().saturating_sub(1),
            ));
            let steps = out.tokens.len().max(1) as f64;
            net.split = Split::of(&out, steps);
        }
    }
    let s = summarize(&single, prompt.len());
    let bound = DecodeBound::measure(local.decode_read_bytes(), s.decode_tokens_per_s).await?;
    drop(local);
    let tls_cost = a
        .compare_tls
        .then(|| paired_ratio(&networks[0].runs, &networks[1].runs))
        .flatten();
    if a.target.json {
        let nets: Vec<_> = networks
            .iter()
            .map(|n| {
                json!({
                    "label": n.label,
                    "generated_tokens": generated(&n.runs),
                    "runs_with_other_tokens_than_single": n.mismatches,
                    "speed": summarize(&n.runs, prompt.len()),
                    "decode_ratio": paired_ratio(&n.runs, &single),
                    "per_hop_compute_ms": n.split.compute,
                    "per_hop_overhead_ms": n.split.overhead,
                    "client_rpc_overhead_ms": n.split.client,
                    "over_plaintext_network_decode_ratio": (n.private.is_some())
                        .then(|| paired_ratio(&n.runs, &networks[0].runs))
                        .flatten(),
                    "mpc_traffic": n.traffic.as_ref().map(traffic_json),
                })
            })
            .collect();
        let v = json!({
            "model": model, "shards": status.text_shards_total, "prompt_tokens": prompt.len(),
            "tokens": a.tokens, "runs": runs, "single_process": s,
            "single_process_generated_tokens": generated(&single),
            "network": summarize(&networks[0].runs, prompt.len()),
            "decode_ratio": paired_ratio(&networks[0].runs, &single),
            "per_hop_compute_ms": networks[0].split.compute,
            "per_hop_overhead_ms": networks[0].split.overhead,
            "client_rpc_overhead_ms": networks[0].split.client,
            "networks": nets,
            "tls_over_plaintext_decode_ratio": tls_cost,
            "decode_bound": bound,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model {model}: {} shard(s), prompt {} tokens, {} generated (of --tokens {}), median of {runs} run(s)",
        status.text_shards_total,
        prompt.len(),
        generated(&networks[0].runs).unwrap_or(0),
        a.tokens
    );
    println!(
        "{:<28} {:>14} {:>14} {:>10} {:>16}",
        "", "prefill tok/s", "decode tok/s", "TTFT ms", "decode / single"
    );
    println!(
        "{:<28} {:>14.1} {:>14.1} {:>10.2} {:>16}",
        "single-process", s.prefill_tokens_per_s, s.decode_tokens_per_s, s.ttft_ms, "1.000"
    );
    for n in networks.iter() {
        let sp = summarize(&n.runs, prompt.len());
        println!(
            "{:<28} {:>14.1} {:>14.1} {:>10.2} {:>16}",
            n.label,
            sp.prefill_tokens_per_s,
            sp.decode_tokens_per_s,
            sp.ttft_ms,
            shown(paired_ratio(&n.runs, &single))
        );
    }
    bound.print();
    for n in networks.iter().filter(|n| n.mismatches > 0) {
        println!(
            "{}: {} of {runs} run(s) generated other tokens than the single process: their speeds compare different work",
            n.label, n.mismatches
        );
    }
    for n in networks.iter() {
        let hops: Vec<String> = n
            .split
            .compute
            .iter()
            .zip(&n.split.overhead)
            .enumerate()
            .map(|(k, (c, o))| format!("hop {k} {c:.3} + {o:.3}"))
            .collect();
        println!(
            "{}: ms/token in the node (step + overhead): {}; client RPC {:.3}",
            n.label,
            hops.join(", "),
            n.split.client
        );
    }
    for n in networks.iter().filter(|n| n.private.is_some()) {
        println!(
            "{} / network decode (median of paired runs): {}",
            n.label,
            shown(paired_ratio(&n.runs, &networks[0].runs))
        );
        if let Some(t) = &n.traffic {
            print_traffic(t);
        }
    }
    if let Some(r) = tls_cost {
        println!(
            "TLS / plaintext decode (median of paired runs): {r:.3} ({:+.1} %)",
            (r - 1.0) * 100.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Party `i`'s rates: per prompt token and per decode step, each [bytes to the party,
/// bytes from it, messages to it, messages from it].
fn rates(t: &MpcTraffic, i: usize) -> ([f64; 4], [f64; 4]) {
    let per = |l: &LinkTraffic, n: usize| {
        let d = n.max(1) as f64;
        [
            l.sent_bytes as f64 / d,
            l.received_bytes as f64 / d,
            l.sent_msgs as f64 / d,
            l.received_msgs as f64 / d,
        ]
    };
    (
        per(&t.prefill[i], t.prefill_rows),
        per(&t.decode[i], t.decode_steps),
    )
}

fn traffic_json(t: &MpcTraffic) -> serde_json::Value {
    let party = |i: usize| {
        let (p, d) = rates(t, i);
        json!({
            "to_party_bytes_per_prompt_token": p[0],
            "from_party_bytes_per_prompt_token": p[1],
            "to_party_bytes_per_generated_token": d[0],
            "from_party_bytes_per_generated_token": d[1],
            "to_party_messages_per_decode_step": d[2],
            "from_party_messages_per_decode_step": d[3],
        })
    };
    json!({
        "a": party(0), "b": party(1),
        "prompt_tokens": t.prefill_rows, "decode_steps": t.decode_steps,
    })
}

fn bytes(b: f64) -> String {
    match b {
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

/// The client's traffic with each party: per prompt token (the steps carrying a
/// prompt), per generated token, and messages per decode step (client → party / back).
fn print_traffic(t: &MpcTraffic) {
    println!(
        "{:<10} {:>26} {:>26} {:>20}",
        "", "per prompt token (→ / ←)", "per generated token", "messages / step"
    );
    for (i, name) in ["party A", "party B"].iter().enumerate() {
        let (p, d) = rates(t, i);
        println!(
            "{name:<10} {:>26} {:>26} {:>20}",
            format!("{} / {}", bytes(p[0]), bytes(p[1])),
            format!("{} / {}", bytes(d[0]), bytes(d[1])),
            format!("{:.0} / {:.0}", d[2], d[3])
        );
    }
}

/// `--concurrency N`: the sweep of `bench_load` against the target network.
async fn concurrency(a: &BenchArgs, sampling: SamplingParams, max: usize) -> Result<ExitCode> {
    if a.compare_tls {
        bail!("--concurrency measures one running network: drop --compare-tls");
    }
    let r = resolve(&a.target)?;
    let mut client = Client::connect(&r.net, &r.registry).await?;
    let model = pick_model(&mut client, r.model).await?;
    client.require_ready(&model).await?;
    let (manifest, _) = client.manifest(&model).await?;
    let load = crate::bench_load::Load {
        net: &r.net,
        registry: &r.registry,
        model: &model,
        opts: GenerateOptions {
            max_tokens: a.tokens,
            stop_on_eos: !a.ignore_eos,
            payer: r.payer,
            sampling,
            ..Default::default()
        },
        vocab: manifest.config.text.vocab_size as u32,
        prompt_tokens: a.prompt_tokens,
        runs: a.runs,
        hops: client.route(&model).await?,
    };
    let levels = load.sweep(max).await?;
    let report = json!({
        "model": model, "prompt_tokens": a.prompt_tokens, "tokens": a.tokens,
        "runs": a.runs, "levels": levels,
    });
    if let Some(path) = &a.output {
        let svg = path.with_extension("svg");
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::write(&svg, crate::bench_load::plot(&model, &levels))
            .with_context(|| format!("cannot write {}", svg.display()))?;
        eprintln!("wrote {} and {}", path.display(), svg.display());
    }
    if a.target.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::bench_load::print(&model, &levels);
    }
    let differ: Vec<_> = levels
        .iter()
        .filter(|l| !l.tokens_match_one_session)
        .map(|l| l.sessions)
        .collect();
    if !differ.is_empty() {
        bail!("session 0 got other tokens with {differ:?} concurrent sessions than alone");
    }
    Ok(ExitCode::SUCCESS)
}
