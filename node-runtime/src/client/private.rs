//! Private generation through an MPC pair. The client embeds its own tokens and the pair
//! computes the first layers on shares. With full_output_2pc the pair runs every layer
//! and the LM head and only the client reconstructs the logits and samples: no node
//! holds a plaintext activation or token. Otherwise both parties hand their output
//! shares to the compute node holding the next layer, which reconstructs them and runs
//! the rest of the route; the client's Forward names the pair and the layer.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use unfed_proto::mpc_client::MpcClient as MpcRpc;
use unfed_proto::{DiscoverRequest, Hop, HopTiming, MpcInfoRequest, MpcInput, forward_request};

use super::{Client, GenerateOptions, GenerateOutput, RouteSession};
use crate::engine::sampling::Sampler;
use crate::mpc::client::{Client as MpcClient, ClientOutput, ClientSession};
use crate::mpc::net::RemotePair;
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
}

impl Client {
    /// A live pair (party A and party B) of `model`, if the registry lists one.
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
        let find = |role: &str| {
            nodes
                .iter()
                .find(|n| n.role == role && n.model == model)
                .map(|n| {
                    (
                        Hop {
                            node_id: n.node_id.clone(),
                            address: n.address.clone(),
                            shard_index: 0,
                        },
                        n.layer_end,
                    )
                })
        };
        let (Some((a, _)), Some((b, _))) = (find("mpc_a"), find("mpc_b")) else {
            return Ok(None);
        };
        let info = MpcRpc::connect(format!("http://{}", a.address))
            .await
            .with_context(|| format!("cannot reach MPC party A {} at {}", a.node_id, a.address))?
            .info(MpcInfoRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("MPC party A {}: {}", a.node_id, s.message()))?
            .into_inner();
        Ok(Some(PairInfo {
            a,
            b,
            layer_end: info.layer_end,
            full_output: info.full_output,
        }))
    }

    /// The compute route after a pair that runs layers [0, `layer`): from the shard
    /// holding `layer` (the last shard when the pair ran every layer) to the last.
    async fn route_after(&mut self, model: &str, layer: u32) -> Result<Vec<Hop>> {
        let route = self.route(model).await?;
        let (manifest, _) = self.manifest(model).await?;
        let entry = manifest
            .text_shards()
            .position(|s| (s.layer_start..s.layer_end).contains(&(layer as usize)))
            .unwrap_or(route.len().saturating_sub(1));
        Ok(route[entry..].to_vec())
    }

    /// Generates from `prompt_ids` through `pair` (and, unless it runs the head, the
    /// compute nodes after it); `public` is the client's copy of the embedding and norms
    /// of the pair's layers.
    pub async fn generate_private(
        &mut self,
        model: &str,
        pair: &PairInfo,
        public: &ClientModel,
        prompt_ids: &[u32],
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
        let session = hex::encode(rand::random::<[u8; 16]>());
        let mut route = Vec::new();
        let mut hops = None;
        if !pair.full_output {
            route = self.route_after(model, pair.layer_end).await?;
            hops = Some(RouteSession::open(&route, &session, self.step_timeout)?);
        }
        let handoff = route.first().map(|h| h.address.clone());
        let mut remote = RemotePair::connect(
            &pair.a.address,
            &pair.b.address,
            &session,
            Duration::from_secs(30),
            handoff.as_deref(),
        )
        .await
        .with_context(|| {
            format!(
                "opening an MPC session with party A {} and party B {}",
                pair.a.node_id, pair.b.node_id
            )
        })?;
        let client = MpcClient { model: public };
        let mut sess = ClientSession::new();
        let mut sampler = Sampler::new(crate::compute::sampling_of(Some(&opts.sampling)));
        sampler.observe(prompt_ids);
        let mut out = GenerateOutput {
            prompt_tokens: prompt_ids.len(),
            route: [vec![pair.a.clone(), pair.b.clone()], route.clone()].concat(),
            ..Default::default()
        };
        let start = Instant::now();
        let mut input = prompt_ids.to_vec();
        let mut position = 0u32;
        for step in 0..opts.max_tokens as u32 {
            let t = Instant::now();
            let rows = public.embed(&input)?;
            let output = remote
                .step(&client, &mut sess, &rows)
                .map_err(|e| anyhow::anyhow!("private generation failed at step {step}: {e:#}"))?;
            let mpc_ms = t.elapsed().as_secs_f64() * 1e3;
            let mut timings = vec![HopTiming {
                node_id: pair.a.node_id.clone(),
                shard_index: 0,
                compute_ms: mpc_ms,
                total_ms: mpc_ms,
            }];
            let (token, is_eos) = match (output, hops.as_mut()) {
                (ClientOutput::Logits(logits), None) => {
                    let token = sampler.sample(logits).token;
                    sampler.observe(&[token]);
                    (token, public.cfg.eos_token_ids.contains(&token))
                }
                (ClientOutput::Hidden(_), Some(hops)) => {
                    let handed = forward_request::Input::Mpc(MpcInput {
                        layer: pair.layer_end,
                        rows: input.len() as u32,
                        party_a: pair.a.node_id.clone(),
                        party_b: pair.b.node_id.clone(),
                    });
                    let resp = hops
                        .step(model, (step, position), handed, &input, None, opts)
                        .await?;
                    timings.extend(resp.timings);
                    (resp.token_id, resp.is_eos)
                }
                _ => bail!(
                    "the MPC pair's output does not match what it advertised (full output: {})",
                    pair.full_output
                ),
            };
            if step == 0 {
                out.ttft_ms = start.elapsed().as_secs_f64() * 1e3;
            }
            out.add_timings(&timings);
            position += input.len() as u32;
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
        out.total_ms = start.elapsed().as_secs_f64() * 1e3;
        if let Some(hops) = hops {
            hops.end().await;
        }
        Ok(out)
    }
}
