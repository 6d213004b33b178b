//! The client library `unfedctl chat` and the web dashboard share: discover the nodes
//! of a model, pick a route (one replica per shard), and generate token by token.

pub mod failover;
pub mod image;
pub mod private;
pub mod text;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::seq::IndexedRandom;
use tonic::transport::Channel;
use unfed_model::Manifest;
use unfed_proto::compute_client::ComputeClient;
use unfed_proto::daemon_client::DaemonClient;
use unfed_proto::registry_client::RegistryClient;
use unfed_proto::*;

use crate::engine::sampling::Sampler;
use crate::step_link::StepLink;

pub use text::TextCodec;

/// Sampling and stopping of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop after an EOS token (it is included in the output).
    pub stop_on_eos: bool,
    pub hidden_dtype: DType,
    /// Who signs the session's spending voucher (the wallet that pays, or its
    /// delegate); `None`: an unpaid session, which nodes that bill refuse.
    pub payer: Option<crate::voucher::Payer>,
    /// Set to stop after the current step (the tokens so far are returned).
    pub stop: Option<Arc<AtomicBool>>,
    /// decode_client_sample: the last shard returns the logits sealed to this client,
    /// which samples itself (the hops back learn nothing of the logits or the token).
    pub decode_client_sample: bool,
}

impl GenerateOptions {
    /// The caller asked to stop.
    pub fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_on_eos: true,
            hidden_dtype: DType::DtypeF32,
            payer: None,
            stop: None,
            decode_client_sample: false,
        }
    }
}

/// What a generation produced and how fast.
#[derive(Debug, Clone, Default)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Request sent → first token back (the prompt step).
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// Sum over steps, per hop (route order).
    pub hops: Vec<HopTiming>,
    pub route: Vec<Hop>,
    pub stopped_on_eos: bool,
    /// Stopped early through `GenerateOptions::stop`.
    pub stopped_by_caller: bool,
    /// The client sampled the tokens (full_output_2pc or decode_client_sample), not the
    /// last shard.
    pub sampled_by_client: bool,
    /// Hops that failed mid-generation and were replaced by replaying the session.
    pub failovers: usize,
    /// Time from those failures coming back to the replayed step's token.
    pub failover_ms: f64,
    /// Why each failover happened, as the route reported it.
    pub failures: Vec<String>,
    /// The session the nodes know this generation by (the last one, after a failover).
    pub session_id: String,
    /// What the nodes could learn of it.
    pub privacy: crate::privacy::Mode,
    /// Through an MPC pair: what the client exchanged with each party.
    pub mpc_traffic: Option<crate::mpc::net::MpcTraffic>,
}

impl GenerateOutput {
    /// Adds one step's per-hop timings to the sums (route order).
    pub fn add_timings(&mut self, timings: &[HopTiming]) {
        if self.hops.is_empty() {
            self.hops = timings.to_vec();
        } else {
            for (acc, t) in self.hops.iter_mut().zip(timings) {
                acc.compute_ms += t.compute_ms;
                acc.total_ms += t.total_ms;
            }
        }
    }

    /// Tokens per second after the first one (decode speed).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        let ms = self.total_ms - self.ttft_ms;
        if n == 0 || ms <= 0.0 {
            0.0
        } else {
            n as f64 * 1e3 / ms
        }
    }

    /// Tokens per second over the whole request.
    pub fn tokens_per_s(&self) -> f64 {
        if self.total_ms <= 0.0 {
            0.0
        } else {
            self.tokens.len() as f64 * 1e3 / self.total_ms
        }
    }
}

/// "READY", or "INCOMPLETE (reason: message)": how every tool shows a model's state.
pub fn readiness_text(m: &ModelStatus) -> String {
    if m.state == ModelState::Ready as i32 {
        "READY".to_string()
    } else {
        format!("INCOMPLETE ({}: {})", m.reason, m.message)
    }
}

pub struct Client {
    net: crate::net::Net,
    registry_addr: String,
    registry: RegistryClient<Channel>,
    /// Timeout of one step through the whole route.
    pub step_timeout: Duration,
    /// The daemon vouchers are checked with, and its terms (found on first use).
    daemon: Option<(DaemonClient<Channel>, crate::voucher::Terms)>,
    /// Nodes that failed a step of this client, not routed to until their ban ends.
    bans: failover::Bans,
}

/// Failovers of one generation before it gives up (each bans a node, so a shard runs
/// out of replicas long before this; the cap bounds a flapping network).
const MAX_FAILOVERS: usize = 8;
/// How long a chat waits for an unavailable daemon to check its voucher.
const DAEMON_RESTART_GRACE: Duration = Duration::from_secs(10);

/// Sleeps `backoff`, then doubles it, up to a second.
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(1));
}

impl Client {
    /// Connects to the registry at `registry` over `net` (TLS with the testnet's CA, or
    /// plaintext for a loopback testnet that opted out).
    pub async fn connect(net: &crate::net::Net, registry: &str) -> Result<Self> {
        let channel = net
            .connect(registry, crate::net::REQUEST_TIMEOUT, None)
            .await
            .with_context(|| {
                format!("cannot reach the registry at {registry}; is `unfed-node registry` running there?")
            })?;
        Ok(Self {
            net: net.clone(),
            registry_addr: registry.to_string(),
            registry: RegistryClient::new(channel)
                .max_decoding_message_size(crate::net::limits::REGISTRY)
                .max_encoding_message_size(crate::net::limits::REGISTRY),
            step_timeout: Duration::from_secs(60),
            daemon: None,
            bans: failover::Bans::default(),
        })
    }

    /// The daemon the registry lists, and its voucher terms (`None`: no daemon, so no
    /// work is paid and no voucher is needed).
    async fn daemon(
        &mut self,
    ) -> Result<Option<&mut (DaemonClient<Channel>, crate::voucher::Terms)>> {
        if self.daemon.is_none() {
            let nodes = self
                .registry
                .discover(DiscoverRequest {
                    model: String::new(),
                })
                .await
                .context("Discover failed")?
                .into_inner()
                .nodes;
            let Some(d) = nodes.into_iter().find(|n| n.role == "daemon") else {
                return Ok(None);
            };
            let mut c =
                crate::daemon::client(&self.net, &d.address, crate::net::Pin::parse(&d.tls_pin)?)
                    .await?;
            let terms = c
                .get_terms(GetTermsRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("the daemon {}: {}", d.node_id, s.message()))?
                .into_inner();
            self.daemon = Some((c, crate::voucher::Terms::from_proto(&terms)?));
        }
        Ok(self.daemon.as_mut())
    }

    /// The spending voucher and billing salt of a session over `route` (node ids of the
    /// paid hops), signed by `opts.payer` and accepted by the daemon (the deposit covers
    /// its cap), before any compute; `None` for an unpaid session.
    pub(crate) async fn voucher(
        &mut self,
        (model, session): (&str, &str),
        route: Vec<String>,
        prompt_rows: usize,
        opts: &GenerateOptions,
    ) -> Result<Option<(SpendingVoucher, Vec<u8>)>> {
        let Some(payer) = &opts.payer else {
            return Ok(None);
        };
        let payer = payer.clone();
        let caps = (
            u32::try_from(prompt_rows).context("prompt too long")?,
            u32::try_from(opts.max_tokens).context("max_tokens too large")?,
        );
        // A daemon restarting (its supervisor brings it back in about a second) is
        // waited for, re-resolved through the registry, rather than failing the chat.
        let deadline = Instant::now() + DAEMON_RESTART_GRACE;
        let mut backoff = Duration::from_millis(100);
        loop {
            // A restarted daemon may serve a new certificate before the registry lists
            // its new pin: that too is waited for.
            let listed = match self.daemon().await {
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!("the daemon cannot be reached, retrying: {e:#}");
                    back_off(&mut backoff).await;
                    continue;
                }
                listed => listed?,
            };
            let Some((daemon, terms)) = listed else {
                tracing::debug!("no daemon listed: the session is unpaid");
                return Ok(None);
            };
            let (voucher, salt) = payer.issue(terms, (model, session), route.clone(), caps)?;
            let checked = daemon
                .check_voucher(CheckVoucherRequest {
                    voucher: Some(voucher.clone()),
                })
                .await;
            match checked {
                Ok(_) => return Ok(Some((voucher, salt))),
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tracing::warn!("the daemon is unavailable, retrying: {}", s.message());
                    self.daemon = None;
                    back_off(&mut backoff).await;
                }
                Err(s) => bail!("{}", s.message()),
            }
        }
    }

    /// The transport this client dials nodes with.
    pub fn net(&self) -> &crate::net::Net {
        &self.net
    }

    /// The registry's address.
    pub fn registry_addr(&self) -> &str {
        &self.registry_addr
    }

    /// The registry connection, for calls this library does not wrap.
    pub fn registry_mut(&mut self) -> &mut RegistryClient<Channel> {
        &mut self.registry
    }

    pub async fn list_models(&mut self) -> Result<Vec<ModelStatus>> {
        Ok(self
            .registry
            .list_models(ListModelsRequest {})
            .await
            .context("ListModels failed")?
            .into_inner()
            .models)
    }

    pub async fn pool_health(&mut self, model: &str) -> Result<Vec<ShardHealth>> {
        let req = GetPoolHealthRequest {
            model: model.to_string(),
        };
        Ok(self
            .registry
            .get_pool_health(req)
            .await
            .context("GetPoolHealth failed")?
            .into_inner()
            .shards)
    }

    /// The model's status, or an error saying why it cannot serve.
    pub async fn require_ready(&mut self, model: &str) -> Result<ModelStatus> {
        let models = self.list_models().await?;
        let Some(status) = models.iter().find(|m| m.model == model) else {
            let known: Vec<&str> = models.iter().map(|m| m.model.as_str()).collect();
            bail!(
                "unknown model `{model}`: the registry at {} serves {}; pick one with --model",
                self.registry_addr,
                if known.is_empty() {
                    "no model yet".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        if status.state != ModelState::Ready as i32 {
            bail!(
                "model `{model}` is INCOMPLETE ({}): {}; start the missing nodes and check `unfedctl models --registry {}`",
                status.reason,
                status.message,
                self.registry_addr
            );
        }
        Ok(status.clone())
    }

    /// One live replica per text shard, in shard order (chosen at random among the
    /// replicas this client has not banned).
    pub async fn route(&mut self, model: &str) -> Result<Vec<Hop>> {
        self.route_keeping(model, &[]).await
    }

    /// `route`, keeping the hops of `keep` that are not banned.
    async fn route_keeping(&mut self, model: &str, keep: &[Hop]) -> Result<Vec<Hop>> {
        let status = match self.require_ready(model).await {
            Ok(s) => s,
            // The registry may have delisted the nodes this client banned already.
            Err(e) => {
                return Err(
                    match keep.iter().find_map(|h| {
                        self.bans
                            .exhausted(model, h.shard_index)
                            .filter(|_| self.bans.is_banned(&h.node_id))
                    }) {
                        Some(exhausted) => e.context(exhausted),
                        None => e,
                    },
                );
            }
        };
        let nodes = self
            .registry
            .discover(DiscoverRequest {
                model: model.to_string(),
            })
            .await
            .context("Discover failed")?
            .into_inner()
            .nodes;
        let mut by_shard: BTreeMap<u32, Vec<&NodeInfo>> = BTreeMap::new();
        for n in nodes
            .iter()
            .filter(|n| n.role == "compute" && n.stack == Stack::Text as i32 && n.model == model)
        {
            by_shard.entry(n.shard_index).or_default().push(n);
        }
        let mut route = Vec::new();
        for i in 0..status.text_shards_total {
            let kept = keep
                .iter()
                .find(|h| h.shard_index == i && !self.bans.is_banned(&h.node_id));
            if let Some(h) = kept {
                route.push(h.clone());
                continue;
            }
            let listed: Vec<Hop> = by_shard
                .get(&i)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|n| Hop {
                    node_id: n.node_id.clone(),
                    address: n.address.clone(),
                    shard_index: i,
                    tls_pin: n.tls_pin.clone(),
                })
                .collect();
            let mut live: Vec<&Hop> = listed
                .iter()
                .filter(|n| !self.bans.is_banned(&n.node_id))
                .collect();
            if live.is_empty() {
                // Only banned replicas are listed: one that is back (restarted) is live.
                let down = failover::unresponsive(&self.net, &listed).await;
                live = listed
                    .iter()
                    .filter(|h| !down.iter().any(|(d, _)| d.node_id == h.node_id))
                    .collect();
                for h in &live {
                    self.bans.lift(&h.node_id);
                }
            }
            let Some(n) = live.choose(&mut rand::rng()) else {
                if let Some(exhausted) = self.bans.exhausted(model, i) {
                    bail!(exhausted);
                }
                bail!(
                    "text shard {i} of `{model}` has no live node; the registry's view changed, retry"
                );
            };
            route.push((*n).clone());
        }
        Ok(route)
    }

    pub async fn manifest(&mut self, model: &str) -> Result<(Manifest, GetManifestResponse)> {
        let resp = self
            .registry
            .get_manifest(GetManifestRequest {
                model: model.to_string(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let manifest: Manifest = serde_json::from_str(&resp.manifest_json)
            .context("the registry served a manifest that does not parse")?;
        Ok((manifest, resp))
    }

    /// A session over `route` whose first step carries `rows` rows and which may run
    /// `opts.max_tokens` steps, under a voucher for that route when `opts` pays.
    async fn open_session(
        &mut self,
        model: &str,
        route: &[Hop],
        rows: usize,
        opts: &GenerateOptions,
        eos: &[u32],
    ) -> Result<RouteSession> {
        let session_id = hex::encode(rand::random::<[u8; 16]>());
        let paid = route.iter().map(|h| h.node_id.clone()).collect();
        let billing = self.voucher((model, &session_id), paid, rows, opts).await?;
        Ok(
            RouteSession::open(&self.net, route, &session_id, self.step_timeout, opts, eos)?
                .billed(billing),
        )
    }

    /// After `failure` of a step over `route`: bans the nodes that failed (those that
    /// do not answer a health probe, else the one the error names) and returns a route
    /// with other replicas in their place. Errors when the failure is not a node's
    /// (bad input) or a shard has no replica left.
    async fn fail_over(
        &mut self,
        model: &str,
        route: &[Hop],
        failure: anyhow::Error,
    ) -> Result<Vec<Hop>> {
        let Some(hop_failed) = failure
            .downcast_ref::<failover::HopFailed>()
            .filter(|f| f.replayable())
        else {
            return Err(failure);
        };
        let mut failed = failover::unresponsive(&self.net, route).await;
        if failed.is_empty() {
            let Some(named) = hop_failed.named(route) else {
                return Err(failure);
            };
            failed.push((named.clone(), hop_failed.message.clone()));
        }
        for (hop, why) in &failed {
            tracing::warn!(
                node = hop.node_id,
                shard = hop.shard_index,
                "failing over: {why}"
            );
            self.bans.ban(hop, why);
        }
        self.route_keeping(model, route)
            .await
            .map_err(|e| e.context(format!("{failure:#}")))
    }

    /// Generates from `prompt_ids`, calling `on_token` as each token arrives.
    pub async fn generate(
        &mut self,
        model: &str,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput> {
        self.generate_with_image(model, prompt_ids, None, opts, on_token)
            .await
    }

    /// `generate` for a vision-language prompt: `prompt_ids` is expanded with the image
    /// placeholders (`client::image`) and `image_features` [rows, hidden] come from the
    /// vision shards (`vision::service::encode_image`); the first shard merges them.
    pub async fn generate_with_image(
        &mut self,
        model: &str,
        prompt_ids: &[u32],
        image_features: Option<&Tensor>,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput> {
        if prompt_ids.is_empty() {
            bail!("the prompt is empty: nothing to generate from");
        }
        let mut eos = Vec::new();
        if let Ok((manifest, _)) = self.manifest(model).await {
            eos = manifest.config.text.eos_token_ids.clone();
            let ctx = manifest.config.text.max_position_embeddings;
            if prompt_ids.len() + opts.max_tokens > ctx {
                bail!(
                    "the prompt has {} tokens and --max-tokens is {}, together more than the model's context of {ctx} tokens; shorten the prompt or lower --max-tokens",
                    prompt_ids.len(),
                    opts.max_tokens
                );
            }
        }
        let mut route = self.route(model).await?;
        let mut hops = self
            .open_session(model, &route, prompt_ids.len(), opts, &eos)
            .await?;
        let mut out = GenerateOutput {
            prompt_tokens: prompt_ids.len(),
            sampled_by_client: opts.decode_client_sample,
            privacy: crate::privacy::Mode {
                mpc: crate::privacy::Mpc::None,
                client_samples: opts.decode_client_sample,
                vision: image_features.is_some(),
            },
            ..Default::default()
        };
        let start = Instant::now();
        let mut input = prompt_ids.to_vec();
        // Of the current session: a failover starts a new one at 0.
        let (mut step, mut position) = (0u32, 0u32);
        let mut failed_at = None;
        while out.tokens.len() < opts.max_tokens {
            let image = if step == 0 {
                image_features.cloned()
            } else {
                None
            };
            let tokens = forward_request::Input::Tokens(TokenIds { ids: input.clone() });
            let resp = match hops
                .step(model, (step, position), tokens, &input, image, opts)
                .await
            {
                Ok(r) => r,
                Err(failure) if out.failovers < MAX_FAILOVERS => {
                    failed_at = Some(Instant::now());
                    out.failures.push(format!("{failure:#}"));
                    route = self.fail_over(model, &route, failure).await?;
                    // The prompt and the tokens so far, as one prefill, rebuild every
                    // hop's KV cache; the sampler continues after the tokens so far.
                    let replay = [prompt_ids, &out.tokens].concat();
                    let left = GenerateOptions {
                        max_tokens: opts.max_tokens - out.tokens.len(),
                        ..opts.clone()
                    };
                    let next = self
                        .open_session(model, &route, replay.len(), &left, &eos)
                        .await?;
                    let mut old = std::mem::replace(&mut hops, next);
                    hops.resume_after(old.local.take(), out.tokens.len() as u32);
                    // Frees the survivors' caches; a hung hop must not hold us up.
                    tokio::spawn(old.end());
                    (input, step, position) = (replay, 0, 0);
                    out.failovers += 1;
                    continue;
                }
                Err(failure) => return Err(failure),
            };
            if let Some(t) = failed_at.take() {
                out.failover_ms += t.elapsed().as_secs_f64() * 1e3;
            }
            if out.tokens.is_empty() {
                out.ttft_ms = start.elapsed().as_secs_f64() * 1e3;
            }
            out.add_timings(&resp.timings);
            position += input.len() as u32;
            step += 1;
            out.tokens.push(resp.token_id);
            on_token(resp.token_id);
            if opts.stop_on_eos && resp.is_eos {
                out.stopped_on_eos = true;
                break;
            }
            input = vec![resp.token_id];
            if opts.stopped() {
                out.stopped_by_caller = true;
                break;
            }
        }
        out.route = route;
        out.session_id = hops.session_id.clone();
        out.total_ms = start.elapsed().as_secs_f64() * 1e3;
        hops.end().await;
        Ok(out)
    }
}

/// The sampling applies a repetition penalty (which needs every token of the session).
pub fn has_penalty(p: &SamplingParams) -> bool {
    p.repetition_penalty > 0.0 && p.repetition_penalty != 1.0
}

/// One session's route through the compute nodes: the entry hop and those after it.
pub(crate) struct RouteSession {
    entry: Hop,
    rest: Vec<Hop>,
    compute: ComputeClient<Channel>,
    /// The session's steps go to the entry hop on one stream.
    link: StepLink,
    /// How long a step may take.
    timeout: Duration,
    session_id: String,
    /// decode_client_sample: the client's key and its own sampler.
    local: Option<LocalSampling>,
    /// The session's spending voucher and billing salt, sent with step 0.
    billing: Option<(SpendingVoucher, Vec<u8>)>,
    /// The session's owner key: its public half opens the session on every hop, and
    /// only a signature by it ends the session early.
    owner: ed25519_dalek::SigningKey,
    /// Tokens sampled before this session (it replays an earlier one's).
    sampled_before: u32,
}

/// decode_client_sample on the client: the key the logits are sealed to, the sampler
/// (the one the last shard would run), and the EOS ids.
struct LocalSampling {
    opener: crate::seal::Opener,
    sampler: Sampler,
    eos: Vec<u32>,
}

impl LocalSampling {
    /// Opens step `step`'s sealed logits and samples the token, after observing the
    /// step's input `ids` (as the last shard does for the repetition penalty).
    fn sample(
        &mut self,
        (model, session, step): (&str, &str, u32),
        ids: &[u32],
        resp: &mut ForwardResponse,
    ) -> Result<()> {
        if resp.sealed_logits.is_empty() {
            bail!(
                "the last shard returned a token instead of sealed logits: it does not serve decode_client_sample"
            );
        }
        let context = crate::seal::logits_context(model, session, step);
        let bytes = self.opener.open(&resp.sealed_logits, &context)?;
        let logits = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        self.sampler.observe(ids);
        let s = self.sampler.sample(logits);
        (resp.token_id, resp.logprob) = (s.token, s.logprob);
        resp.is_eos = self.eos.contains(&s.token);
        Ok(())
    }
}

impl RouteSession {
    /// A session over `route`; with `opts.decode_client_sample` the client samples
    /// (`eos`: the model's EOS ids).
    pub(crate) fn open(
        net: &crate::net::Net,
        route: &[Hop],
        session_id: &str,
        timeout: Duration,
        opts: &GenerateOptions,
        eos: &[u32],
    ) -> Result<Self> {
        let entry = route.first().context("the route is empty")?.clone();
        let pin = crate::net::Pin::parse(&entry.tls_pin)?;
        let channel = net.channel_with(&entry.address, timeout, pin)?;
        let local = opts.decode_client_sample.then(|| LocalSampling {
            opener: crate::seal::Opener::new(),
            sampler: Sampler::new(crate::compute::sampling_of(Some(&opts.sampling))),
            eos: eos.to_vec(),
        });
        Ok(Self {
            entry,
            rest: route[1..].to_vec(),
            compute: ComputeClient::new(channel)
                .max_decoding_message_size(crate::net::limits::COMPUTE)
                .max_encoding_message_size(crate::net::limits::COMPUTE),
            link: StepLink::stream(),
            timeout,
            session_id: session_id.to_string(),
            local,
            billing: None,
            owner: crate::shares::generate_key(),
            sampled_before: 0,
        })
    }

    /// The session is paid under this voucher.
    pub(crate) fn billed(mut self, billing: Option<(SpendingVoucher, Vec<u8>)>) -> Self {
        self.billing = billing;
        self
    }

    /// This session replays one that sampled `sampled_before` tokens: the sampler
    /// continues after them (the client's own, when it samples).
    fn resume_after(&mut self, local: Option<LocalSampling>, sampled_before: u32) {
        if local.is_some() {
            self.local = local;
        }
        self.sampled_before = sampled_before;
    }

    /// One step at (`step`, `position`): `input` to the entry hop (`ids` are the step's
    /// tokens, for the repetition penalty), the sampled token back.
    pub(crate) async fn step(
        &mut self,
        model: &str,
        (step, position): (u32, u32),
        input: forward_request::Input,
        ids: &[u32],
        image_features: Option<Tensor>,
        opts: &GenerateOptions,
    ) -> Result<ForwardResponse> {
        // When the client samples, the penalty and the seed stay here: the tokens the
        // penalty sees are the prompt and the output, and with the seed the last shard
        // could redo the sampling.
        let node_samples = self.local.is_none();
        let req = ForwardRequest {
            model_id: model.to_string(),
            session_id: self.session_id.clone(),
            step,
            position,
            input: Some(input),
            sampling: node_samples.then_some(SamplingParams {
                sampled_before: self.sampled_before,
                ..opts.sampling
            }),
            route: self.rest.clone(),
            penalty_tokens: if node_samples && has_penalty(&opts.sampling) {
                ids.to_vec()
            } else {
                Vec::new()
            },
            hidden_dtype: opts.hidden_dtype as i32,
            image_features,
            attestations: Vec::new(),
            client_key: match &self.local {
                Some(l) => l.opener.public_key().to_vec(),
                None => Vec::new(),
            },
            owner_key: if step == 0 {
                self.owner.verifying_key().to_bytes().to_vec()
            } else {
                Vec::new()
            },
            voucher: self
                .billing
                .as_ref()
                .filter(|_| step == 0)
                .map(|b| b.0.clone()),
            billing_salt: match &self.billing {
                Some((_, salt)) if step == 0 => salt.clone(),
                _ => Vec::new(),
            },
        };
        // A client is cloned only when a stream opens, not at every step.
        let compute = || Ok(self.compute.clone());
        match self
            .link
            .step(&self.entry, compute, req, self.timeout)
            .await
        {
            Ok(mut resp) => {
                if let Some(local) = &mut self.local {
                    local
                        .sample((model, &self.session_id, step), ids, &mut resp)
                        .with_context(|| format!("step {step}"))?;
                }
                Ok(resp)
            }
            Err(s) => {
                let msg = if s.message().starts_with("node ") {
                    s.message().to_string()
                } else {
                    format!(
                        "node {} (shard {}) at {}: {}",
                        self.entry.node_id,
                        self.entry.shard_index,
                        self.entry.address,
                        s.message()
                    )
                };
                Err(failover::HopFailed {
                    code: s.code(),
                    message: format!("generation failed at step {step}: {msg}"),
                }
                .into())
            }
        }
    }

    /// Frees the KV caches now rather than at the idle timeout; failures only delay that.
    pub(crate) async fn end(mut self) {
        let _ = self
            .compute
            .end_session(EndSessionRequest {
                owner_signature: crate::compute::sign_end_session(&self.owner, &self.session_id),
                session_id: self.session_id.clone(),
                route: self.rest.clone(),
            })
            .await;
    }
}
