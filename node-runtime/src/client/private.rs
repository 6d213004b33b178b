//! Private generation through an MPC pair that runs every layer and the LM head
//! (full_output_2pc): the client embeds its tokens, the pair computes on shares, and only
//! the client reconstructs the logits and samples. No node holds a plaintext activation
//! or token.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use unfed_proto::{DiscoverRequest, Hop, HopTiming};

use super::{Client, GenerateOptions, GenerateOutput};
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
        Ok(match (find("mpc_a"), find("mpc_b")) {
            (Some((a, layer_end)), Some((b, _))) => Some(PairInfo { a, b, layer_end }),
            _ => None,
        })
    }

    /// Generates from `prompt_ids` through `pair`, which must run every layer and the head;
    /// `public` is the client's copy of the embedding and norms.
    pub async fn generate_private(
        &mut self,
        pair: &PairInfo,
        public: &ClientModel,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerateOutput> {
        if public.final_norm.is_none() {
            bail!(
                "the client's model has no final norm: load it with the head for full_output_2pc"
            );
        }
        if prompt_ids.is_empty() {
            bail!("the prompt is empty: nothing to generate from");
        }
        let session = hex::encode(rand::random::<[u8; 16]>());
        let mut remote = RemotePair::connect(
            &pair.a.address,
            &pair.b.address,
            &session,
            Duration::from_secs(30),
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
            route: vec![pair.a.clone(), pair.b.clone()],
            ..Default::default()
        };
        let start = Instant::now();
        let mut input = prompt_ids.to_vec();
        for step in 0..opts.max_tokens {
            let t = Instant::now();
            let rows = public.embed(&input)?;
            let logits = match remote.step(&client, &mut sess, &rows) {
                Ok(ClientOutput::Logits(l)) => l,
                Ok(ClientOutput::Hidden(_)) => bail!(
                    "the MPC pair returned hidden states: it runs only shard 0's layers, not full_output_2pc"
                ),
                Err(e) => bail!("private generation failed at step {step}: {e:#}"),
            };
            let token = sampler.sample(logits).token;
            sampler.observe(&[token]);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if step == 0 {
                out.ttft_ms = start.elapsed().as_secs_f64() * 1e3;
                out.hops = vec![HopTiming {
                    node_id: pair.a.node_id.clone(),
                    shard_index: 0,
                    compute_ms: 0.0,
                    total_ms: 0.0,
                }];
            }
            out.hops[0].total_ms += ms;
            out.tokens.push(token);
            on_token(token);
            if opts.stop_on_eos && public.cfg.eos_token_ids.contains(&token) {
                out.stopped_on_eos = true;
                break;
            }
            input = vec![token];
        }
        out.total_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }
}
