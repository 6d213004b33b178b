//! Private generation through an MPC pair. The client embeds its own tokens and the pair
//! computes the first layers on shares. With full_output_2pc the pair runs every layer
//! and the LM head and only the client reconstructs the logits and samples: no node
//! holds a plaintext activation or token. Otherwise both parties hand their output
//! shares to the compute node holding the next layer, which reconstructs them and runs
//! the rest of the route; the client's Forward names the pair and the layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;
use unfed_proto::mpc_client::MpcClient as MpcRpc;
use unfed_proto::{
    DiscoverRequest, Hop, HopTiming, MpcInfoRequest, MpcInfoResponse, MpcInput,
    PublicParamsRequest, forward_request,
};

use super::{Client, GenerateOptions, GenerateOutput, RouteSession};
use crate::engine::sampling::Sampler;
use crate::mpc::client::{Client as MpcClient, ClientOutput, ClientSession};
use crate::mpc::net::{RemotePair, SessionOptions};
use crate::mpc::public;
use crate::mpc::weights::ClientModel;

/// The MPC pair serving a model, as the registry lists it.
#[derive(Debug, Clone)]
pub struct PairInfo {
    pub a: Hop,
    pub b: Hop,
    /// Layers the pair runs: `[0, end)`.
    pub layer_end: u32,
    /// The pair also runs the head (full_output_2pc).
    pub full_output: bool,
    /// Digest and size of the public parameters the parties serve.
    pub public_sha256: String,
    pub public_bytes: u64,
}

/// A pair and the public parameters of its layers.
pub type PrivateRoute = (PairInfo, Arc<ClientModel>);

/// Where a client gets the public parameters of an MPC pair's layers, and the ones it
/// has loaded (by digest), so that each process reads or fetches them once.
pub struct PublicParams {
    source: PublicSource,
    loaded: Mutex<HashMap<String, Arc<ClientModel>>>,
}

pub enum PublicSource {
    /// The split directory on this machine (a testnet's own spec).
    Split(PathBuf),
    /// Fetched from the pair and cached on disk under this directory.
    Fetch(PathBuf),
}

impl PublicParams {
    pub fn new(source: PublicSource) -> Self {
        Self {
            source,
            loaded: Mutex::default(),
        }
    }
}

/// A connection to party `name` of a pair, and how errors name it.
async fn party_rpc(
    net: &crate::net::Net,
    hop: &Hop,
    name: &str,
) -> Result<(MpcRpc<Channel>, String)> {
    let what = format!("MPC party {name} {} at {}", hop.node_id, hop.address);
    let pin = crate::net::Pin::parse(&hop.tls_pin)?;
    let ch = net
        .connect(&hop.address, crate::net::REQUEST_TIMEOUT, pin)
        .await
        .with_context(|| format!("cannot reach {what}"))?;
    let rpc = MpcRpc::new(ch)
        .max_decoding_message_size(crate::net::limits::MPC)
        .max_encoding_message_size(crate::net::limits::MPC);
    Ok((rpc, what))
}

/// What party `name` of a pair runs.
async fn party_info(net: &crate::net::Net, hop: &Hop, name: &str) -> Result<MpcInfoResponse> {
    let (mut rpc, what) = party_rpc(net, hop, name).await?;
    Ok(rpc
        .info(MpcInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{what}: {}", s.message()))?
        .into_inner())
}

impl Client {
    /// A live pair (party A and the party B it dials) of `model` that this client has
    /// not banned, if the registry lists one.
    pub async fn mpc_pair(&mut self, model: &str) -> Result<Option<PairInfo>> {
        let nodes = self
            .registry_mut()
            .discover(DiscoverRequest {
                model: model.to_string(),
            })
            .await
            .context("Discover failed")?
            .into_inner()
            .nodes;
        let parties = |role: &str| -> Vec<Hop> {
            nodes
                .iter()
                .filter(|n| n.role == role && n.model == model)
                .map(|n| Hop {
                    node_id: n.node_id.clone(),
                    address: n.address.clone(),
                    shard_index: 0,
                    tls_pin: n.tls_pin.clone(),
                })
                .collect()
        };
        let (all_a, all_b) = (parties("mpc_a"), parties("mpc_b"));
        let net = self.net().clone();
        let mut tried = Vec::new();
        for a in all_a.iter().filter(|a| !self.bans.is_banned(&a.node_id)) {
            let ia = match party_info(&net, a, "A").await {
                Ok(i) => i,
                Err(e) => {
                    tried.push(format!("{e:#}"));
                    continue;
                }
            };
            // A pairs with the B it dials (any B when it does not say, as older parties).
            let b = all_b.iter().find(|b| {
                !self.bans.is_banned(&b.node_id) && (ia.peer.is_empty() || b.address == ia.peer)
            });
            let Some(b) = b else {
                tried.push(format!(
                    "party A {} dials party B at {}, which is not listed or is banned",
                    a.node_id, ia.peer
                ));
                continue;
            };
            match party_info(&net, b, "B").await {
                Ok(ib) => return Ok(Some(pair_info(model, (a.clone(), ia), (b.clone(), ib))?)),
                Err(e) => tried.push(format!("{e:#}")),
            }
        }
        if tried.is_empty() {
            return Ok(None);
        }
        bail!(
            "no live MPC pair for `{model}`: {}; start another pair or retry once one is back",
            tried.join("; ")
        )
    }
}

/// The pair of `a` and `b`, which must run the same layers from the same parameters.
fn pair_info(
    model: &str,
    (a, ia): (Hop, MpcInfoResponse),
    (b, ib): (Hop, MpcInfoResponse),
) -> Result<PairInfo> {
    if (ia.layer_end, ia.full_output, &ia.public_sha256)
        != (ib.layer_end, ib.full_output, &ib.public_sha256)
    {
        bail!(
            "the MPC parties of `{model}` disagree: A {} runs layers [0, {}) (full output {}, public parameters {}), B {} runs [0, {}) (full output {}, public parameters {}); restart them from the same split and settings",
            a.node_id,
            ia.layer_end,
            ia.full_output,
            ia.public_sha256,
            b.node_id,
            ib.layer_end,
            ib.full_output,
            ib.public_sha256
        );
    }
    Ok(PairInfo {
        a,
        b,
        layer_end: ia.layer_end,
        full_output: ia.full_output,
        public_sha256: ia.public_sha256,
        public_bytes: ia.public_bytes,
    })
}

impl Client {
    /// Generates through `private` when given, else through the compute route.
    pub async fn generate_via(
        &mut self,
        model: &str,
        private: Option<&PrivateRoute>,
        prompt_ids: &[u32],
        image_features: Option<&unfed_proto::Tensor>,
        opts: &GenerateOptions,
        on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput> {
        match private {
            Some(route) => {
                self.generate_private(model, route, prompt_ids, image_features, opts, on_token)
                    .await
            }
            None => {
                self.generate_with_image(model, prompt_ids, image_features, opts, on_token)
                    .await
            }
        }
    }

    /// The MPC pair to generate through, when the registry lists one for `model`, with
    /// the public parameters of its layers.
    pub async fn private_route(
        &mut self,
        model: &str,
        params: &PublicParams,
    ) -> Result<Option<PrivateRoute>> {
        let Some(pair) = self.mpc_pair(model).await? else {
            return Ok(None);
        };
        let key = format!("{model}/{}", pair.public_sha256);
        if let Some(m) = params.loaded.lock().expect("params poisoned").get(&key) {
            return Ok(Some((pair, m.clone())));
        }
        let public = Arc::new(match &params.source {
            PublicSource::Split(dir) => {
                ClientModel::from_split(dir, pair.layer_end as usize, pair.full_output)?
            }
            PublicSource::Fetch(cache) => self.public_params(model, &pair, cache).await?,
        });
        params
            .loaded
            .lock()
            .expect("params poisoned")
            .insert(key, public.clone());
        Ok(Some((pair, public)))
    }

    /// The public parameters of `pair`'s layers (embedding, norms): from the cache under
    /// `cache` when present, else fetched from party A and checked against the digest
    /// both parties stated.
    pub async fn public_params(
        &mut self,
        model: &str,
        pair: &PairInfo,
        cache: &Path,
    ) -> Result<ClientModel> {
        let (manifest, _) = self.manifest(model).await?;
        let path = match public::cached(cache, &pair.public_sha256) {
            Some(p) => p,
            None => {
                let (mut rpc, what) = party_rpc(self.net(), &pair.a, "A").await?;
                let mut stream = rpc
                    .public_params(PublicParamsRequest {})
                    .await
                    .map_err(|s| anyhow::anyhow!("{what}: {}", s.message()))?
                    .into_inner();
                let mut bytes = Vec::with_capacity(pair.public_bytes as usize);
                while let Some(chunk) = stream
                    .message()
                    .await
                    .map_err(|s| anyhow::anyhow!("{what}: {}", s.message()))?
                {
                    bytes.extend_from_slice(&chunk.data);
                    if bytes.len() as u64 > pair.public_bytes {
                        bail!(
                            "{what} sent more public parameters than the {} bytes it stated",
                            pair.public_bytes
                        );
                    }
                }
                public::store(cache, &pair.public_sha256, &bytes)?
            }
        };
        let cfg = &manifest.config;
        public::load(
            &path,
            &cfg.text,
            &cfg.text_prefix,
            pair.layer_end as usize,
            pair.full_output,
        )
    }

    /// The compute route after a pair that runs layers [0, `layer`): from the shard
    /// holding `layer` (the last shard when the pair ran every layer) to the last.
    async fn route_after(&mut self, model: &str, layer: u32) -> Result<Vec<Hop>> {
        let route = self.route(model).await?;
        self.after_pair(model, &route, layer).await
    }

    /// Generates from `prompt_ids` through `pair` (and, unless it runs the head, the
    /// compute nodes after it); `public` is the client's copy of the embedding and norms
    /// of the pair's layers.
    async fn generate_private(
        &mut self,
        model: &str,
        (pair, public): &PrivateRoute,
        prompt_ids: &[u32],
        image_features: Option<&unfed_proto::Tensor>,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput> {
        if pair.full_output && public.final_norm.is_none() {
            bail!(
                "the client's model has no final norm: load it with the head for full_output_2pc"
            );
        }
        if public.norms.len() != pair.layer_end as usize {
            bail!(
                "the client's parameters cover {} layers but the MPC pair runs {}",
                public.norms.len(),
                pair.layer_end
            );
        }
        if prompt_ids.is_empty() {
            bail!("the prompt is empty: nothing to generate from");
        }
        if !pair.full_output && !opts.decode_client_sample && super::has_penalty(&opts.sampling) {
            bail!(
                "the repetition penalty needs every prompt and output token, which a private route keeps from the nodes: \
                 turn on decode_client_sample (`--decode-client-sample`, or mpc.output = \"decode_client_sample\" in the spec) so the client applies it, or set --repetition-penalty 1"
            );
        }
        let mut pair = pair.clone();
        let mut route = Vec::new();
        if !pair.full_output {
            route = self.route_after(model, pair.layer_end).await?;
        }
        let mut live = self
            .open_live(model, &mut pair, &route, prompt_ids.len(), opts, public)
            .await?;
        let client = MpcClient { model: public };
        let mut sampler = Sampler::new(crate::compute::sampling_of(Some(&opts.sampling)));
        sampler.observe(prompt_ids);
        let mut out = GenerateOutput {
            prompt_tokens: prompt_ids.len(),
            sampled_by_client: pair.full_output || opts.decode_client_sample,
            privacy: crate::privacy::Mode {
                mpc: if pair.full_output {
                    crate::privacy::Mpc::FullOutput
                } else {
                    crate::privacy::Mpc::HandOff {
                        layer: Some(pair.layer_end as usize),
                    }
                },
                client_samples: !pair.full_output && opts.decode_client_sample,
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
            let t = Instant::now();
            // The client embeds its own tokens, and merges the image features into the
            // prompt's placeholder rows as shard 0 would (each session's first step
            // carries the whole prompt).
            let rows = match (image_features, step) {
                (Some(f), 0) => {
                    let (manifest, _) = self.manifest(model).await?;
                    crate::vision::merge::merged_rows(
                        |ids| public.embed(ids),
                        &manifest.config,
                        &input,
                        f,
                    )?
                }
                _ => public.embed(&input)?,
            };
            let before = live.remote.traffic();
            let stepped = live
                .step(
                    &pair,
                    &client,
                    (model, step, position),
                    (&rows, t),
                    &input,
                    opts,
                )
                .await;
            let (token, is_eos, timings) = match stepped {
                Ok(Stepped::Token(token, is_eos, timings)) => (token, is_eos, timings),
                Ok(Stepped::Logits(logits, timings)) => {
                    let token = sampler.sample(logits).token;
                    sampler.observe(&[token]);
                    let is_eos = public.cfg.eos_token_ids.contains(&token);
                    (token, is_eos, timings)
                }
                Err(failure) if out.failovers < super::MAX_FAILOVERS && failure.replayable() => {
                    failed_at = Some(Instant::now());
                    out.failures.push(format!("{:#}", failure.error));
                    match failure.at {
                        FailedAt::Pair => {
                            for party in [&pair.a, &pair.b] {
                                self.bans.ban(party, &format!("{:#}", failure.error));
                            }
                            pair = self.next_pair(model, &pair).await?;
                        }
                        FailedAt::Route => {
                            let full = self.fail_over(model, &route, failure.error).await?;
                            route = self.after_pair(model, &full, pair.layer_end).await?;
                        }
                    }
                    // The prompt and the tokens so far, as one prefill, rebuild every
                    // party's and hop's state; the samplers continue after the tokens.
                    let replay = [prompt_ids, &out.tokens].concat();
                    let left = GenerateOptions {
                        max_tokens: opts.max_tokens - out.tokens.len(),
                        ..opts.clone()
                    };
                    let next = self
                        .open_live(model, &mut pair, &route, replay.len(), &left, public)
                        .await?;
                    let mut old = std::mem::replace(&mut live, next);
                    if let (Some(old_hops), Some(hops)) = (old.hops.as_mut(), live.hops.as_mut()) {
                        hops.resume_after(old_hops.local.take(), out.tokens.len() as u32);
                    }
                    if let Some(hops) = old.hops.take() {
                        // Frees the survivors' caches; a hung hop must not hold us up.
                        tokio::spawn(hops.end());
                    }
                    (input, step, position) = (replay, 0, 0);
                    out.failovers += 1;
                    continue;
                }
                Err(failure) => return Err(failure.error),
            };
            if let Some(t) = failed_at.take() {
                out.failover_ms += t.elapsed().as_secs_f64() * 1e3;
            }
            if out.tokens.is_empty() {
                out.ttft_ms = start.elapsed().as_secs_f64() * 1e3;
            }
            out.add_timings(&timings);
            let moved = live.remote.traffic();
            out.mpc_traffic.get_or_insert_default().add_step(
                step == 0,
                input.len(),
                [moved[0].since(before[0]), moved[1].since(before[1])],
            );
            position += input.len() as u32;
            step += 1;
            out.tokens.push(token);
            on_token(token);
            if opts.stop_on_eos && is_eos {
                out.stopped_on_eos = true;
                break;
            }
            input = vec![token];
            if opts.stopped() {
                out.stopped_by_caller = true;
                break;
            }
        }
        out.route = [vec![pair.a.clone(), pair.b.clone()], route].concat();
        out.session_id = live.session.clone();
        out.total_ms = start.elapsed().as_secs_f64() * 1e3;
        if let Some(hops) = live.hops {
            hops.end().await;
        }
        Ok(out)
    }

    /// `open_private` through `pair`, or through another pair (into `pair`) when this
    /// client banned it or it cannot be reached.
    async fn open_live(
        &mut self,
        model: &str,
        pair: &mut PairInfo,
        route: &[Hop],
        rows: usize,
        opts: &GenerateOptions,
        public: &ClientModel,
    ) -> Result<PrivateSession> {
        loop {
            if self.bans.is_banned(&pair.a.node_id) || self.bans.is_banned(&pair.b.node_id) {
                *pair = self.next_pair(model, pair).await?;
            }
            match self
                .open_private(model, pair, route, rows, opts, public)
                .await
            {
                Err(e) if e.is::<PairUnreachable>() => {
                    for party in [&pair.a, &pair.b] {
                        self.bans.ban(party, &format!("{e:#}"));
                    }
                }
                opened => return opened,
            }
        }
    }

    /// A session through `pair` (and `route` after it) whose first step carries `rows`
    /// rows, under one voucher for the whole route, the pair's parties first.
    async fn open_private(
        &mut self,
        model: &str,
        pair: &PairInfo,
        route: &[Hop],
        rows: usize,
        opts: &GenerateOptions,
        public: &ClientModel,
    ) -> Result<PrivateSession> {
        let session = hex::encode(rand::random::<[u8; 16]>());
        let paid: Vec<String> = [&pair.a, &pair.b]
            .into_iter()
            .chain(route)
            .map(|h| h.node_id.clone())
            .collect();
        let billing = self.voucher((model, &session), paid, rows, opts).await?;
        let mut hops = None;
        if !pair.full_output {
            hops = Some(
                RouteSession::open(
                    self.net(),
                    route,
                    &session,
                    self.step_timeout,
                    opts,
                    &public.cfg.eos_token_ids,
                )?
                .billed(billing.clone()),
            );
        }
        let remote = RemotePair::connect(
            self.net(),
            &pair.a,
            &pair.b,
            &session,
            Duration::from_secs(30),
            &SessionOptions {
                handoff: route.first().cloned(),
                voucher: billing.as_ref().map(|b| b.0.clone()),
                billing_salt: billing.map(|b| b.1).unwrap_or_default(),
            },
        )
        .await
        .map_err(|e| {
            anyhow::Error::new(PairUnreachable(format!("{e:#}"))).context(format!(
                "opening an MPC session with party A {} and party B {}",
                pair.a.node_id, pair.b.node_id
            ))
        })?;
        Ok(PrivateSession {
            session,
            remote,
            sess: ClientSession::new(),
            hops,
        })
    }

    /// Another live pair after `failed` (banned): one with the same layers and public
    /// parameters, so the client's copy still fits.
    async fn next_pair(&mut self, model: &str, failed: &PairInfo) -> Result<PairInfo> {
        let why = || {
            format!(
                "the MPC pair of party A {} and party B {} failed",
                failed.a.node_id, failed.b.node_id
            )
        };
        let Some(pair) = self.mpc_pair(model).await.with_context(why)? else {
            bail!(
                "{}, and `{model}` has no other live MPC pair; start another pair or retry once it is back",
                why()
            );
        };
        if (pair.layer_end, pair.full_output, &pair.public_sha256)
            != (failed.layer_end, failed.full_output, &failed.public_sha256)
        {
            bail!(
                "{}; the other pair (party A {}) runs other layers or parameters, so this generation cannot continue on it",
                why(),
                pair.a.node_id
            );
        }
        Ok(pair)
    }

    /// The hops of `full` (one per shard) after a pair that runs layers [0, `layer`).
    async fn after_pair(&mut self, model: &str, full: &[Hop], layer: u32) -> Result<Vec<Hop>> {
        let (manifest, _) = self.manifest(model).await?;
        let entry = manifest
            .text_shards()
            .position(|s| (s.layer_start..s.layer_end).contains(&(layer as usize)))
            .unwrap_or(full.len().saturating_sub(1));
        Ok(full[entry..].to_vec())
    }
}

/// A pair that could not open a session (a party down or refusing).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PairUnreachable(String);

/// One private session: the pair's, and the compute route's after a hand-off.
struct PrivateSession {
    session: String,
    remote: RemotePair,
    sess: ClientSession,
    hops: Option<RouteSession>,
}

/// What one step produced: the logits for the client to sample (full_output_2pc), or
/// the token the route's last shard sampled; with the timings of the pair, then of the
/// route's hops.
enum Stepped {
    Logits(Vec<f32>, Vec<HopTiming>),
    Token(u32, bool, Vec<HopTiming>),
}

/// Where a step failed: in the pair, or on the compute route after it.
enum FailedAt {
    Pair,
    Route,
}

struct StepFailure {
    at: FailedAt,
    error: anyhow::Error,
    /// A protocol mismatch is not a node's failure: another pair would not help.
    fatal: bool,
}

impl StepFailure {
    fn replayable(&self) -> bool {
        !self.fatal
            && match self.at {
                FailedAt::Pair => true,
                FailedAt::Route => self
                    .error
                    .downcast_ref::<super::failover::HopFailed>()
                    .is_some_and(|f| f.replayable()),
            }
    }
}

impl PrivateSession {
    async fn step(
        &mut self,
        pair: &PairInfo,
        client: &MpcClient<'_>,
        (model, step, position): (&str, u32, u32),
        (rows, started): (&[f32], Instant),
        input: &[u32],
        opts: &GenerateOptions,
    ) -> std::result::Result<Stepped, StepFailure> {
        let failed = |at, fatal, error| StepFailure { at, error, fatal };
        let output = self
            .remote
            .step(client, &mut self.sess, rows)
            .map_err(|e| {
                failed(
                    FailedAt::Pair,
                    false,
                    anyhow::anyhow!("private generation failed at step {step}: {e:#}"),
                )
            })?;
        // The pair's time: from embedding the rows to its output.
        let mpc_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut timings = vec![HopTiming {
            node_id: pair.a.node_id.clone(),
            shard_index: 0,
            compute_ms: mpc_ms,
            total_ms: mpc_ms,
        }];
        match (output, self.hops.as_mut()) {
            (ClientOutput::Logits(logits), None) => Ok(Stepped::Logits(logits, timings)),
            (ClientOutput::Hidden(_), Some(hops)) => {
                let handed = forward_request::Input::Mpc(MpcInput {
                    layer: pair.layer_end,
                    rows: input.len() as u32,
                    party_a: pair.a.node_id.clone(),
                    party_b: pair.b.node_id.clone(),
                });
                let resp = hops
                    .step(model, (step, position), handed, input, None, opts)
                    .await
                    .map_err(|e| failed(FailedAt::Route, false, e))?;
                timings.extend(resp.timings);
                Ok(Stepped::Token(resp.token_id, resp.is_eos, timings))
            }
            _ => Err(failed(
                FailedAt::Pair,
                true,
                anyhow::anyhow!(
                    "the MPC pair's output does not match what it advertised (full output: {})",
                    pair.full_output
                ),
            )),
        }
    }
}
