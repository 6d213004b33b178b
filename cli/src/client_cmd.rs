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
use unfed_node::proto::{ModelState, SamplingParams};

#[derive(Subcommand)]
pub enum Commands {
    /// List the models a registry knows: nodes, shards covered, READY or INCOMPLETE.
    Models(Target),
    /// Chat with a model: one prompt with --prompt, interactive otherwise.
    Chat(ChatArgs),
    /// Measure prefill/decode speed, TTFT and per-hop overhead against the
    /// single-process engine on the same shards.
    Bench(crate::bench_cmd::BenchArgs),
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
    /// Key file (mode 0600) of the wallet that pays: it signs each session's spending
    /// voucher. Default: a spec's testnet dev client.
    #[arg(long, env = "UNFED_CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,
}

/// How the next token is chosen (`chat` and `bench`): greedy unless --temperature.
#[derive(Args, Clone)]
pub struct Sampling {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the most probable tokens whose probabilities first sum to this; 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most probable tokens; 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Sampling {
    /// The request's sampling parameters, once each is in its range.
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..Default::default()
        };
        let flag = |field: &str| format!("--{}", field.replace('_', "-"));
        match unfed_node::compute::sampling_out_of_range(&p, flag) {
            Some(why) => bail!("{why}"),
            None => Ok(p),
        }
    }
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens to generate at most (default: 128; 8 on the built-in model, which rarely
    /// ends by itself).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Generate exactly --max-tokens tokens, past any EOS (fixed-length references and
    /// benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub sampling: Sampling,
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

pub fn run(cmd: Commands) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Run as a task, not on the blocking main thread: a task and the connection tasks it
    // wakes then share a worker, which takes a cross-thread wake-up off every step.
    let task = rt.spawn(async {
        match cmd {
            Commands::Models(t) => models(t).await,
            Commands::Chat(a) => chat(a).await,
            Commands::Bench(a) => crate::bench_cmd::bench(a).await,
        }
    });
    rt.block_on(task).context("the command's task failed")?
}

/// The registry address, testnet model and shards dir a target points at.
pub(crate) struct Resolved {
    pub(crate) registry: String,
    pub(crate) net: unfed_node::net::Net,
    pub(crate) model: Option<String>,
    pub(crate) shards_dir: Option<PathBuf>,
    /// The spec asks for `mpc.output = "decode_client_sample"`.
    decode_client_sample: bool,
    /// Signs the sessions' spending vouchers.
    pub(crate) payer: Option<unfed_node::voucher::Payer>,
}

/// The paying wallet: the key file given, else the testnet's dev client when it has one.
fn payer(
    given: Option<&std::path::Path>,
    testnet_client: Option<PathBuf>,
) -> Result<Option<unfed_node::voucher::Payer>> {
    let Some(file) = given.map(PathBuf::from).or(testnet_client) else {
        return Ok(None);
    };
    let key = unfed_chain::read_key_file(&file)
        .with_context(|| format!("the paying wallet's key file {}", file.display()))?;
    Ok(Some(unfed_node::voucher::Payer::wallet(key)))
}

pub(crate) fn resolve(t: &Target) -> Result<Resolved> {
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
            payer: payer(t.client_key_file.as_deref(), None)?,
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
        decode_client_sample: plan.mpc_output == "decode_client_sample",
        payer: payer(
            t.client_key_file.as_deref(),
            state
                .chain
                .as_ref()
                .and_then(|c| c.client.as_ref())
                .map(|_| plan.run_dir.join("keys").join("client.key")),
        )?,
        shards_dir: Some(plan.shards_dir),
    })
}

/// The model to use: the one asked for, or the registry's only model.
pub(crate) async fn pick_model(client: &mut Client, asked: Option<String>) -> Result<String> {
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

/// The model's MPC pair when it has one, with the public parameters of its layers: from
/// the spec's split, else fetched from the pair (cached by digest).
pub(crate) async fn private_route(
    client: &mut Client,
    model: &str,
    shards_dir: Option<&std::path::Path>,
) -> Result<Option<PrivateRoute>> {
    let source = match shards_dir {
        Some(dir) => PublicSource::Split(dir.to_path_buf()),
        None => PublicSource::Fetch(unfed_chain::anvil::cache_dir()?),
    };
    client
        .private_route(model, &PublicParams::new(source))
        .await
}

async fn chat(a: ChatArgs) -> Result<ExitCode> {
    let r = resolve(&a.target)?;
    let mut client = Client::connect(&r.net, &r.registry).await?;
    let model = pick_model(&mut client, r.model).await?;
    client.require_ready(&model).await?;
    let (_, files) = client.manifest(&model).await?;
    let codec = TextCodec::from_manifest_files(&files, &model)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens.unwrap_or_else(|| default_max_tokens(&model)),
        stop_on_eos: !a.ignore_eos,
        sampling: a.sampling.params()?,
        decode_client_sample: a.decode_client_sample || r.decode_client_sample,
        payer: r.payer.clone(),
        ..Default::default()
    };
    let limits = ImageLimits {
        max_bytes: a.max_image_mb << 20,
        ..ImageLimits::default()
    };
    let image = a.image.as_deref().map(|i| (r.registry.as_str(), i, limits));
    let private = private_route(&mut client, &model, r.shards_dir.as_deref()).await?;
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
                // Waiting for the user blocks this worker; the runtime's others go on.
                if tokio::task::block_in_place(|| stdin.lock().read_line(&mut line))? == 0 {
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

/// `chat`'s length without --max-tokens. The built-in model's head follows bigram
/// statistics, so greedy decoding cycles instead of reaching EOS: one line's worth of it.
fn default_max_tokens(model: &str) -> usize {
    if model == unfed_model::builtin::TINY_ID {
        BUILTIN_MAX_TOKENS
    } else {
        128
    }
}

pub const BUILTIN_MAX_TOKENS: usize = 8;

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
            "privacy": {"mode": out.privacy.name(), "sees": out.privacy.sees()},
            "route": out.route.iter().map(|h| json!({"node_id": h.node_id, "shard_index": h.shard_index, "address": h.address})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!();
    }
    Ok(out)
}
