//! Chat: `POST /api/chat` (one JSON answer) and `GET /api/chat/ws` (tokens streamed over
//! a WebSocket, with stop). Both use the client library `unfedctl chat` uses and bill
//! the signed-in wallet's deposit.

use crate::client::private::PrivateRoute;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use unfed_chain::Address;
use unfed_proto::{ModelState, SamplingParams, Tensor};

use super::server::{ApiError, ApiResult, WebState};
use super::views::amount;
use crate::client::text::IncrementalDecoder;
use crate::client::text::Turn;
use crate::client::{Client, GenerateOptions, GenerateOutput, TextCodec, image};

/// Longest generation one request may ask for.
pub(super) const MAX_TOKENS_LIMIT: usize = 4096;

fn default_max_tokens() -> usize {
    128
}

fn one() -> f32 {
    1.0
}

/// A chat request; the sampling fields mean what `unfedctl chat`'s flags mean.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub prompt: String,
    /// Default: the registry's READY model (the first, if several).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    /// 0 = off.
    #[serde(default)]
    pub top_k: u32,
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    #[serde(default)]
    pub seed: u64,
    /// Tokenize the prompt as is, without the chat template.
    #[serde(default)]
    pub raw: bool,
    /// A PNG or JPEG for a vision-language model, base64 (a `data:` URL is fine); the
    /// prompt places it with `<image>`, or it goes before the text.
    #[serde(default)]
    pub image: Option<String>,
    /// Session token (WebSocket only: a browser cannot set headers there).
    #[serde(default)]
    pub token: Option<String>,
}

impl ChatBody {
    fn check(&self) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::new(400, m));
        if self.prompt.trim().is_empty() {
            return bad("the prompt is empty; type something to send".into());
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_LIMIT {
            return bad(format!(
                "max_tokens {} is out of range; use 1..={MAX_TOKENS_LIMIT}",
                self.max_tokens
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            ..Default::default()
        };
        match crate::compute::sampling_out_of_range(&sampling, str::to_string) {
            Some(why) => bad(why),
            None => Ok(()),
        }
    }
}

/// What to generate from, whoever asked: the dashboard's chat body and the
/// OpenAI-compatible API (`web::openai`) both become one, checked by their own rules.
pub(super) struct Job {
    /// Default: the registry's READY model (the first, if several).
    pub model: Option<String>,
    pub prompt: JobPrompt,
    /// A PNG or JPEG for a vision-language model, base64 or a `data:` URL.
    pub image: Option<String>,
    /// None = the rest of the model's context, at most MAX_TOKENS_LIMIT.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
}

pub(super) enum JobPrompt {
    /// One user message through the chat template, or as is with `raw`.
    Text { text: String, raw: bool },
    /// A whole conversation through the chat template.
    Conversation(Vec<Turn>),
}

impl JobPrompt {
    fn encode(&self, codec: &TextCodec) -> anyhow::Result<Vec<u32>> {
        match self {
            JobPrompt::Text { text, raw } => codec.encode_prompt(text, *raw),
            JobPrompt::Conversation(turns) => codec.encode_conversation(turns),
        }
    }

    /// The text with the image's marker in it, as the model reads it.
    fn render_with_image(&self, codec: &TextCodec) -> anyhow::Result<String> {
        match self {
            JobPrompt::Text { text, raw } => codec.render_image_prompt(text, *raw),
            JobPrompt::Conversation(turns) => codec.render_conversation(turns),
        }
    }
}

/// A checked request, ready to generate.
pub(super) struct Prepared {
    pub client: Client,
    pub model: String,
    pub codec: Arc<TextCodec>,
    pub ids: Vec<u32>,
    /// Image features from the vision shards, for an image prompt.
    pub features: Option<Tensor>,
    /// The model's MPC pair, when it has one: the chat goes through it.
    pub private: Option<PrivateRoute>,
    pub opts: GenerateOptions,
    /// The billed wallet; None = the daemon's default client (demo mode without sign-in).
    pub payer: Option<Address>,
}

impl Prepared {
    /// Runs the generation, calling `on_token` as each token arrives.
    pub async fn generate(&mut self, on_token: impl FnMut(u32)) -> anyhow::Result<GenerateOutput> {
        self.client
            .generate_via(
                &self.model,
                self.private.as_ref(),
                &self.ids,
                self.features.as_ref(),
                &self.opts,
                on_token,
            )
            .await
    }

    /// `generate` on a task of its own: token ids arrive on the receiver as they come,
    /// and the task gives this back with the output.
    pub fn spawn(
        mut self,
    ) -> (
        tokio::task::JoinHandle<(Prepared, anyhow::Result<GenerateOutput>)>,
        tokio::sync::mpsc::UnboundedReceiver<u32>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let out = self
                .generate(|id| {
                    let _ = tx.send(id);
                })
                .await;
            (self, out)
        });
        (task, rx)
    }
}

/// The READY model to use: the one asked for (404 if the registry does not know it), or
/// the first READY one.
async fn pick_model(client: &mut Client, asked: Option<String>) -> Result<String, ApiError> {
    let models = client.list_models().await.map_err(ApiError::upstream)?;
    if let Some(model) = asked.filter(|m| !m.is_empty()) {
        return match models.iter().find(|m| m.model == model) {
            None => {
                let known: Vec<&str> = models.iter().map(|m| m.model.as_str()).collect();
                Err(ApiError::new(
                    404,
                    format!(
                        "unknown model `{model}`: the network serves {}; GET /v1/models lists them",
                        if known.is_empty() {
                            "no model yet".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ))
            }
            Some(m) if m.state != ModelState::Ready as i32 => Err(ApiError::new(
                503,
                format!(
                    "model `{model}` is {}; wait for its nodes or start the missing ones",
                    crate::client::readiness_text(m)
                ),
            )),
            Some(_) => Ok(model),
        };
    }
    if let Some(m) = models.iter().find(|m| m.state == ModelState::Ready as i32) {
        return Ok(m.model.clone());
    }
    Err(ApiError::new(
        503,
        match models.first() {
            Some(m) => format!(
                "model {} is {}; wait for its nodes or start the missing ones",
                m.model,
                crate::client::readiness_text(m)
            ),
            None => "the registry serves no model yet; start the compute nodes".to_string(),
        },
    ))
}

/// The model's text codec and its context length in tokens, fetched once per model.
async fn codec(
    s: &WebState,
    client: &mut Client,
    model: &str,
) -> Result<(Arc<TextCodec>, usize), ApiError> {
    if let Some(c) = s.codecs.lock().expect("codecs poisoned").get(model) {
        return Ok(c.clone());
    }
    let (manifest, files) = client.manifest(model).await.map_err(ApiError::upstream)?;
    let codec =
        Arc::new(TextCodec::from_manifest_files(&files, model).map_err(ApiError::upstream)?);
    let entry = (codec, manifest.config.text.max_position_embeddings);
    s.codecs
        .lock()
        .expect("codecs poisoned")
        .insert(model.to_string(), entry.clone());
    Ok(entry)
}

/// Decodes an uploaded image and runs it through the model's vision shards.
async fn image_prompt(
    s: &WebState,
    client: &mut Client,
    model: &str,
    prompt: &JobPrompt,
    data: &str,
) -> Result<image::ImagePrompt, ApiError> {
    use base64::Engine;
    let b64 = match data.split_once(";base64,") {
        Some((_, b)) => b,
        None => data,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| ApiError::new(400, format!("the image is not valid base64: {e}")))?;
    let img = image::decode_image(&bytes, "the attached image", image::ImageLimits::default())
        .map_err(|e| ApiError::new(400, e.to_string()))?;
    image::image_prompt_with(client, &s.registry, model, &img, |c| {
        prompt.render_with_image(c)
    })
    .await
    .map_err(|e| {
        let text = format!("{e:#}");
        // A text-only model or a bad image is the request's fault; the rest upstream.
        let status = if text.contains("text-only") { 400 } else { 502 };
        ApiError::new(status, text)
    })
}

/// The dashboard's chat: billed to the signed-in wallet (`session`).
async fn prepare(
    s: &WebState,
    session: Option<&str>,
    body: ChatBody,
) -> Result<Prepared, ApiError> {
    let payer = match s.auth.session(session) {
        Ok(address) => (Some(address), s.auth.payer(session)),
        // Chat without sign-in in demo mode: as the demo wallet.
        Err(_) if s.switches.demo => (s.switches.demo_wallet, s.switches.demo_payer.clone()),
        Err(e) => {
            return Err(ApiError::new(
                e.http_status(),
                format!("{e}: chats are billed to the signed-in wallet's deposit"),
            ));
        }
    };
    body.check()?;
    let job = Job {
        model: body.model,
        prompt: JobPrompt::Text {
            text: body.prompt,
            raw: body.raw,
        },
        image: body.image,
        max_tokens: Some(body.max_tokens),
        sampling: SamplingParams {
            temperature: body.temperature,
            top_p: body.top_p,
            top_k: body.top_k,
            repetition_penalty: body.repetition_penalty,
            seed: body.seed,
            ..Default::default()
        },
    };
    prepare_job(s, payer, job).await
}

/// Everything before generating, the same for every front end: the model, the prompt's
/// tokens (and image features), the context and deposit checks, the private route and
/// the options the spec's private modes ask for. `payer` is billed through the vouchers
/// `signer` signs (no signer: an unpaid chat, which nodes that bill refuse).
pub(super) async fn prepare_job(
    s: &WebState,
    (payer, signer): (Option<Address>, Option<crate::voucher::Payer>),
    job: Job,
) -> Result<Prepared, ApiError> {
    let mut client = Client::connect(&s.net, &s.registry)
        .await
        .map_err(|e| ApiError::new(503, format!("{e:#}")))?;
    let model = pick_model(&mut client, job.model.clone()).await?;
    let (codec, context) = codec(s, &mut client, &model).await?;
    let private = client
        .private_route(&model, &s.private)
        .await
        .map_err(|e| ApiError::new(502, format!("{e:#}")))?;
    let (ids, features) = match &job.image {
        None => {
            let ids = job
                .prompt
                .encode(&codec)
                .map_err(|e| ApiError::new(400, format!("{e:#}")))?;
            (ids, None)
        }
        Some(data) => {
            let p = image_prompt(s, &mut client, &model, &job.prompt, data).await?;
            (p.prompt_ids, Some(p.features))
        }
    };
    let room = context.saturating_sub(ids.len());
    let max_tokens = job.max_tokens.unwrap_or(room.min(MAX_TOKENS_LIMIT));
    if max_tokens == 0 || max_tokens > room {
        return Err(ApiError::new(
            400,
            format!(
                "the prompt has {} tokens and max_tokens is {max_tokens}: the model's context is {context} tokens, so at most {room} can be generated after this prompt; shorten the prompt or lower max_tokens",
                ids.len()
            ),
        ));
    }
    if let (Some(c), Some(who)) = (&s.chain, payer) {
        let deposit = c
            .reader
            .client_balance(&c.deployment, who)
            .await
            .map_err(|e| ApiError::upstream(e.into()))?;
        // The whole chat's cap, as the voucher will state it.
        let needed = s.prices.cost(ids.len() as u64, max_tokens as u64);
        if deposit < needed {
            return Err(ApiError::new(
                402,
                format!(
                    "the chat deposit of {who} is {}, less than this chat may cost ({}: the prompt and up to max_tokens); top it up (the faucet, or depositFor on the escrow) or lower max_tokens",
                    unfed_chain::format_amount(deposit),
                    unfed_chain::format_amount(needed)
                ),
            ));
        }
    }
    let opts = GenerateOptions {
        max_tokens,
        sampling: job.sampling,
        payer: signer,
        decode_client_sample: s.decode_client_sample,
        ..Default::default()
    };
    Ok(Prepared {
        client,
        model,
        codec,
        ids,
        features,
        private,
        opts,
        payer,
    })
}

/// What a finished chat reports: the text, speed, route, cost and the payer's deposit.
async fn summary(s: &WebState, p: &Prepared, out: &GenerateOutput) -> Value {
    let cost = s
        .prices
        .cost(out.prompt_tokens as u64, out.tokens.len() as u64);
    let deposit = match (&s.chain, p.payer) {
        (Some(c), Some(who)) => c
            .reader
            .client_balance(&c.deployment, who)
            .await
            .ok()
            .map(amount),
        _ => None,
    };
    let route: Vec<Value> = out
        .route
        .iter()
        .map(|h| {
            let t = out.hops.iter().find(|t| t.shard_index == h.shard_index);
            json!({
                "node_id": h.node_id,
                "address": h.address,
                "shard_index": h.shard_index,
                "compute_ms": t.map(|t| t.compute_ms),
            })
        })
        .collect();
    json!({
        "model": p.model,
        "text": p.codec.decode(&out.tokens).unwrap_or_default(),
        "token_ids": out.tokens,
        "tokens": out.tokens.len(),
        "prompt_tokens": out.prompt_tokens,
        "ttft_ms": out.ttft_ms,
        "total_ms": out.total_ms,
        "tokens_per_s": out.tokens_per_s(),
        "decode_tokens_per_s": out.decode_tokens_per_s(),
        "stopped_on_eos": out.stopped_on_eos,
        "stopped": out.stopped_by_caller,
        "payer": p.payer.map(|a| a.to_string()),
        "cost": amount(cost),
        // On-chain now; this chat's cost leaves it once the daemon settles its blocks.
        "deposit": deposit,
        "route": route,
        "sampled_by": if out.sampled_by_client { "client" } else { "last shard" },
        "privacy": {"mode": out.privacy.name(), "sees": out.privacy.sees()},
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

pub async fn chat(
    State(s): State<Arc<WebState>>,
    headers: HeaderMap,
    Json(body): Json<ChatBody>,
) -> ApiResult<Value> {
    let token = bearer(&headers).map(str::to_string).or(body.token.clone());
    let mut p = prepare(&s, token.as_deref(), body).await?;
    let out = p.generate(|_| {}).await.map_err(ApiError::generation)?;
    Ok(Json(summary(&s, &p, &out).await))
}

pub async fn chat_ws(State(s): State<Arc<WebState>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| ws_session(s, socket))
}

async fn send(socket: &mut WebSocket, v: Value) -> bool {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .is_ok()
}

fn ws_error(e: ApiError) -> Value {
    json!({ "type": "error", "status": e.status.as_u16(), "error": e.message })
}

/// One socket, any number of chats in turn: `{"type": "start", ...ChatBody}` starts one,
/// `{"type": "stop"}` ends it after the current token.
async fn ws_session(s: Arc<WebState>, mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let Message::Text(text) = msg else { continue };
        let body: ChatBody = match serde_json::from_str(&text) {
            Ok(b) => b,
            Err(e) => {
                let e = ApiError::new(400, format!("not a chat request: {e}"));
                if !send(&mut socket, ws_error(e)).await {
                    return;
                }
                continue;
            }
        };
        let token = body.token.clone();
        let prepared = match prepare(&s, token.as_deref(), body).await {
            Ok(p) => p,
            Err(e) => {
                if !send(&mut socket, ws_error(e)).await {
                    return;
                }
                continue;
            }
        };
        if !stream_chat(&s, &mut socket, prepared).await {
            return;
        }
    }
}

/// Runs one chat, sending each token's text as it arrives; false if the socket closed.
async fn stream_chat(s: &WebState, socket: &mut WebSocket, mut p: Prepared) -> bool {
    let stop = Arc::new(AtomicBool::new(false));
    p.opts.stop = Some(stop.clone());
    let started = json!({
        "type": "started",
        "model": p.model,
        "prompt_tokens": p.ids.len(),
        "payer": p.payer.map(|a| a.to_string()),
    });
    if !send(socket, started).await {
        return false;
    }
    let codec = p.codec.clone();
    let (generation, mut rx) = p.spawn();
    let mut decoder = IncrementalDecoder::new(&codec);
    let mut open = true;
    loop {
        tokio::select! {
            id = rx.recv() => match id {
                Some(id) => {
                    let delta = decoder.push(id).unwrap_or_default();
                    if open && !send(socket, json!({"type": "token", "id": id, "text": delta})).await {
                        open = false;
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                None => break,
            },
            m = socket.recv(), if open => match m {
                Some(Ok(Message::Text(t))) if t.contains("\"stop\"") => stop.store(true, Ordering::Relaxed),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    open = false;
                    stop.store(true, Ordering::Relaxed);
                }
            },
        }
    }
    let (p, out) = match generation.await {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::new(500, format!("the generation task failed: {e}"));
            return open && send(socket, ws_error(e)).await;
        }
    };
    if !open {
        return false;
    }
    let done = match out {
        Ok(out) => json!({ "type": "done", "summary": summary(s, &p, &out).await }),
        Err(e) => ws_error(ApiError::generation(e)),
    };
    send(socket, done).await
}
