//! Client verbs: `models`, `chat`, `bench` — thin shells over `unfed_node::client`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use unfed_node::client::image::ImageLimits;
use unfed_node::client::private::{PrivateRoute, PublicParams, PublicSource};
use unfed_node::client::text::IncrementalDecoder;
use unfed_node::client::{Client, GenerateOptions, GenerateOutput, TextCodec};
use unfed_node::engine::SamplingConfig;
use unfed_node::proto::{ModelState, SamplingParams};

#[derive(Subcommand)]
pub enum Commands {
    /// List the models a registry knows: nodes, shards covered, READY or INCOMPLETE.
    Models(Target),
    /// Chat with a model: one prompt with --prompt, interactive otherwise.
    Chat(ChatArgs),
    /// Measure prefill/decode speed, TTFT and per-hop overhead against the
    /// single-process engine on the same shards.
    Bench(BenchArgs),
}

/// Where the network is: a running testnet's spec, or a registry address.
#[derive(Args, Clone)]
pub struct Target {
    /// Testnet spec whose running network to use (its registry from state.json).
    pub spec: Option<PathBuf>,
    /// Registry host:port (instead of a spec).
    #[arg(long)]
    pub registry: Option<String>,
    /// The network's CA certificate, to reach a TLS network by --registry (a spec's
    /// running testnet brings its own).
    #[arg(long, env = "UNFED_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Model id (default: the testnet's model, or the registry's only model).
    #[arg(long)]
    pub model: Option<String>,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenize the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// PNG or JPEG image for a vision-language model (SmolVLM); the prompt places it with
    /// `<image>`, or it goes before the text.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Largest --image file accepted, in MiB (larger images are refused before decoding).
    #[arg(long, default_value_t = 20)]
    pub max_image_mb: u64,
    /// The last shard returns the logits sealed to this client (X25519 +
    /// ChaCha20-Poly1305), which samples; on by default when the spec's mpc.output is
    /// "decode_client_sample".
    #[arg(long)]
    pub decode_client_sample: bool,
}

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
    /// Measured runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

pub fn run(cmd: Commands) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            Commands::Models(t) => models(t).await,
            Commands::Chat(a) => chat(a).await,
            Commands::Bench(a) => bench(a).await,
        }
    })
}

/// The registry address, testnet model and shards dir a target points at.
struct Resolved {
    registry: String,
    net: unfed_node::net::Net,
    model: Option<String>,
    shards_dir: Option<PathBuf>,
    /// The spec asks for `mpc.output = "decode_client_sample"`.
    decode_client_sample: bool,
}

fn resolve(t: &Target) -> Result<Resolved> {
    if let Some(registry) = &t.registry {
        let net = match &t.tls_ca {
            Some(ca) => unfed_node::net::Net::client_from_ca(ca)?,
            None => unfed_node::net::Net::plaintext(),
        };
        return Ok(Resolved {
            net,
            registry: registry.clone(),
            model: t.model.clone(),
            shards_dir: None,
            decode_client_sample: false,
        });
    }
    let plan = crate::plan::load_plan(t.spec.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spec_name = t
        .spec
        .as_ref()
        .map_or("the default spec".to_string(), |p| p.display().to_string());
    let state = crate::launch::state::RunState::load(&plan.run_dir)?.with_context(|| {
        format!("no testnet of {spec_name} is running (no state in {}); start it with `unfedctl up` or pass --registry", plan.run_dir.display())
    })?;
    let net = state.net()?;
    let registry = state.registry.with_context(|| {
        format!(
            "the testnet in {} has no registry address; pass --registry",
            plan.run_dir.display()
        )
    })?;
    Ok(Resolved {
        net,
        registry,
        model: t.model.clone().or(state.model_id),
        shards_dir: Some(plan.shards_dir),
        decode_client_sample: plan.mpc_output == "decode_client_sample",
    })
}

/// The model to use: the one asked for, or the registry's only model.
async fn pick_model(client: &mut Client, asked: Option<String>) -> Result<String> {
    if let Some(m) = asked {
        return Ok(m);
    }
    let models = client.list_models().await?;
    match models.as_slice() {
        [only] => Ok(only.model.clone()),
        [] => bail!("the registry serves no model yet; start compute nodes or pass --model"),
        many => bail!(
            "the registry serves {} models ({}); pick one with --model",
            many.len(),
            many.iter()
                .map(|m| m.model.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn models(t: Target) -> Result<ExitCode> {
    let r = resolve(&t)?;
    let mut client = Client::connect(&r.net, &r.registry).await?;
    let models = client.list_models().await?;
    if t.json {
        let v: Vec<_> = models
            .iter()
            .map(|m| {
                json!({
                    "model": m.model, "nodes": m.nodes, "shards_covered": m.text_shards_covered,
                    "shards_total": m.text_shards_total,
                    "status": if m.state == ModelState::Ready as i32 { "READY" } else { "INCOMPLETE" },
                    "reason": m.reason, "message": m.message,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if models.is_empty() {
        println!("No models registered at {}", r.registry);
    }
    for m in &models {
        let status = unfed_node::client::readiness_text(m);
        println!(
            "{}\n  Nodes: {} | Shards: {}/{} | Status: {status}",
            m.model, m.nodes, m.text_shards_covered, m.text_shards_total
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn chat(a: ChatArgs) -> Result<ExitCode> {
    let r = resolve(&a.target)?;
    let mut client = Client::connect(&r.net, &r.registry).await?;
    let model = pick_model(&mut client, r.model).await?;
    client.require_ready(&model).await?;
    let (_, files) = client.manifest(&model).await?;
    let codec = TextCodec::from_manifest_files(&files, &model)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        decode_client_sample: a.decode_client_sample || r.decode_client_sample,
        ..Default::default()
    };
    let limits = ImageLimits {
        max_bytes: a.max_image_mb << 20,
        ..ImageLimits::default()
    };
    let image = a.image.as_deref().map(|i| (r.registry.as_str(), i, limits));
    // Through the model's MPC pair when it has one; the public parameters of its layers
    // come from the spec's split, else from the pair (cached by digest).
    let source = match &r.shards_dir {
        Some(dir) => PublicSource::Split(dir.clone()),
        None => PublicSource::Fetch(unfed_chain::anvil::cache_dir()?),
    };
    let private = client
        .private_route(&model, &PublicParams::new(source))
        .await?;
    match &a.prompt {
        Some(p) => {
            let turn = Turn {
                prompt: p,
                raw: a.raw,
                image,
                private: private.as_ref(),
            };
            chat_once(&mut client, &codec, &model, turn, &opts, a.target.json).await?;
        }
        None => {
            let stdin = std::io::stdin();
            let interactive = stdin.is_terminal();
            loop {
                if interactive {
                    eprint!("> ");
                    std::io::stderr().flush()?;
                }
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 {
                    break;
                }
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                if line == "/exit" || line == "/quit" {
                    break;
                }
                let turn = Turn {
                    prompt: line,
                    raw: a.raw,
                    image,
                    private: private.as_ref(),
                };
                chat_once(&mut client, &codec, &model, turn, &opts, a.target.json).await?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One user message of a chat.
struct Turn<'a> {
    prompt: &'a str,
    raw: bool,
    /// (registry address, image file, size limits) for an image prompt.
    image: Option<(&'a str, &'a std::path::Path, ImageLimits)>,
    /// Through an MPC pair, with the public parameters of its layers.
    private: Option<&'a PrivateRoute>,
}

async fn chat_once(
    client: &mut Client,
    codec: &TextCodec,
    model: &str,
    turn: Turn<'_>,
    opts: &GenerateOptions,
    json_out: bool,
) -> Result<GenerateOutput> {
    let Turn {
        prompt,
        raw,
        image,
        private,
    } = turn;
    let (ids, features) = match image {
        Some((registry, path, limits)) => {
            let p = unfed_node::client::image::image_prompt(
                client, registry, model, prompt, path, raw, limits,
            )
            .await?;
            (p.prompt_ids, Some(p.features))
        }
        None => (codec.encode_prompt(prompt, raw)?, None),
    };
    let mut dec = IncrementalDecoder::new(codec);
    let mut stdout = std::io::stdout();
    let on_token = |id| {
        if !json_out && let Ok(delta) = dec.push(id) {
            let _ = write!(stdout, "{delta}");
            let _ = stdout.flush();
        }
    };
    let out = client
        .generate_via(model, private, &ids, features.as_ref(), opts, on_token)
        .await?;
    let text = codec.decode(&out.tokens)?;
    if json_out {
        let v = json!({
            "model": model,
            "token_ids": out.tokens,
            "text": text,
            "prompt_tokens": out.prompt_tokens,
            "ttft_ms": out.ttft_ms,
            "tokens_per_s": out.tokens_per_s(),
            "decode_tokens_per_s": out.decode_tokens_per_s(),
            "stopped_on_eos": out.stopped_on_eos,
            "sampled_by": if out.sampled_by_client { "client" } else { "last shard" },
            "route": out.route.iter().map(|h| json!({"node_id": h.node_id, "shard_index": h.shard_index, "address": h.address})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!();
    }
    Ok(out)
}

#[derive(Clone, Copy, Default, serde::Serialize)]
struct Speed {
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn summarize(runs: &[(f64, f64, usize)], prompt: usize) -> Speed {
    // (ttft_ms, decode_ms, decoded tokens)
    let ttft = median(runs.iter().map(|r| r.0).collect());
    let decode = median(
        runs.iter()
            .map(|r| {
                if r.1 > 0.0 {
                    r.2 as f64 * 1e3 / r.1
                } else {
                    0.0
                }
            })
            .collect(),
    );
    Speed {
        prefill_tokens_per_s: prompt as f64 * 1e3 / ttft,
        decode_tokens_per_s: decode,
        ttft_ms: ttft,
    }
}

async fn bench(a: BenchArgs) -> Result<ExitCode> {
    let r = resolve(&a.target)?;
    let mut client = Client::connect(&r.net, &r.registry).await?;
    let model = pick_model(&mut client, r.model).await?;
    let status = client.require_ready(&model).await?;
    // A testnet's shards dir is the split itself or holds one split per model.
    let from_spec = r.shards_dir.map(|d| {
        if d.join("manifest.json").is_file() {
            d
        } else {
            d.join(&model)
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
    // Deterministic prompt ids; EOS is ignored so every run decodes the same count.
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab.max(2))
        .collect();
    let runs = a.runs.max(1);
    let local = std::sync::Arc::new(local);
    let opts = GenerateOptions {
        max_tokens: a.tokens,
        stop_on_eos: false,
        ..Default::default()
    };
    // Single-process and network runs alternate, and the ratio is taken per pair, so a
    // change in machine load during the benchmark hits both sides of each ratio alike.
    let mut single = Vec::new();
    let mut network = Vec::new();
    let mut overhead = Vec::new();
    for i in 0..=runs {
        let (m, p, n) = (local.clone(), prompt.clone(), a.tokens);
        let g = tokio::task::spawn_blocking(move || {
            unfed_node::engine::generate::generate(&m, &p, n, SamplingConfig::default(), false)
        })
        .await??;
        let out = client.generate(&model, &prompt, &opts, |_| {}).await?;
        if i == 0 {
            continue; // warm-up
        }
        single.push((g.prefill_ms, g.decode_ms, g.tokens.len().saturating_sub(1)));
        network.push((
            out.ttft_ms,
            out.total_ms - out.ttft_ms,
            out.tokens.len().saturating_sub(1),
        ));
        // Per hop: time in the handler not spent computing or waiting for the next hop.
        let steps = out.tokens.len().max(1) as f64;
        let hop_over: Vec<f64> = out
            .hops
            .iter()
            .enumerate()
            .map(|(k, h)| {
                let downstream = out.hops.get(k + 1).map_or(0.0, |n| n.total_ms);
                (h.total_ms - h.compute_ms - downstream) / steps
            })
            .collect();
        let client_side = (out.total_ms - out.hops.first().map_or(0.0, |h| h.total_ms)) / steps;
        overhead.push((hop_over, client_side));
    }
    drop(local);
    let pair_ratios: Vec<f64> = single
        .iter()
        .zip(&network)
        .filter(|(s, n)| s.1 > 0.0 && n.1 > 0.0)
        .map(|(s, n)| (n.2 as f64 / n.1) / (s.2 as f64 / s.1))
        .collect();
    let s = summarize(&single, prompt.len());
    let n = summarize(&network, prompt.len());
    let ratio = if pair_ratios.is_empty() {
        0.0
    } else {
        median(pair_ratios)
    };
    let last = overhead.last().cloned().unwrap_or_default();
    if a.target.json {
        let v = json!({
            "model": model, "shards": status.text_shards_total, "prompt_tokens": prompt.len(), "tokens": a.tokens, "runs": runs,
            "single_process": s, "network": n, "decode_ratio": ratio,
            "per_hop_overhead_ms": last.0, "client_rpc_overhead_ms": last.1,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "model {model}: {} shard(s), prompt {} tokens, {} generated, median of {runs} run(s)",
            status.text_shards_total,
            prompt.len(),
            a.tokens
        );
        println!(
            "{:<16} {:>14} {:>14} {:>10}",
            "", "prefill tok/s", "decode tok/s", "TTFT ms"
        );
        for (name, sp) in [("single-process", s), ("network", n)] {
            println!(
                "{name:<16} {:>14.1} {:>14.1} {:>10.2}",
                sp.prefill_tokens_per_s, sp.decode_tokens_per_s, sp.ttft_ms
            );
        }
        println!("decode ratio network/single (median of paired runs): {ratio:.3}");
        for (k, o) in last.0.iter().enumerate() {
            println!("hop {k} overhead: {o:.3} ms/token");
        }
        println!("client RPC overhead: {:.3} ms/token", last.1);
    }
    Ok(ExitCode::SUCCESS)
}
