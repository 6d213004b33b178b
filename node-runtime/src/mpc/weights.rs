//! What each side of the MPC holds of a model: the parties the layers' matrices in fixed
//! point (public weights), the client the small public parts it computes with —
//! embedding, norm weights and RoPE frequencies.

use std::ops::Range;

use anyhow::{Context, Result, bail};
use unfed_model::TextConfig;

use super::ring::FixedLinear;
use crate::engine::linear::{Linear, WeightData};
use crate::engine::weights::WeightFiles;

fn dense(w: &WeightData, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for (r, row) in out.chunks_mut(cols).enumerate() {
        w.row_into(r, cols, row);
    }
    out
}

/// Matrix `name` [rows, cols] (and its bias, if it has one) in fixed point.
fn fixed(files: &WeightFiles, name: &str, rows: usize, cols: usize) -> Result<FixedLinear> {
    let w = dense(
        &files.matrix(&format!("{name}.weight"), rows, cols)?,
        rows,
        cols,
    );
    let bias_name = format!("{name}.bias");
    let bias = if files.contains(&bias_name) {
        Some(files.vector(&bias_name, rows)?)
    } else {
        None
    };
    FixedLinear::from_f32(&w, rows, cols, bias.as_deref()).with_context(|| format!("`{name}`"))
}

/// Rows of several matrices stacked into one (q, k, v; gate, up): one pass over the input.
fn stacked(parts: Vec<FixedLinear>) -> FixedLinear {
    let in_dim = parts[0].in_dim;
    let out_dim = parts.iter().map(|p| p.out_dim).sum();
    let any_bias = parts.iter().any(|p| p.bias.is_some());
    let mut weight = Vec::with_capacity(out_dim * in_dim);
    let mut bias = Vec::with_capacity(out_dim);
    for p in parts {
        weight.extend_from_slice(&p.weight);
        bias.extend(p.bias.unwrap_or_else(|| vec![0; p.out_dim]));
    }
    FixedLinear {
        weight,
        out_dim,
        in_dim,
        bias: any_bias.then_some(bias),
    }
}

pub struct PartyLayer {
    pub qkv: FixedLinear,
    pub o: FixedLinear,
    pub gate_up: FixedLinear,
    pub down: FixedLinear,
}

/// A party's copy of the MPC layers (and, for full-output 2PC, the LM head unless the
/// client computes it).
pub struct PartyModel {
    pub cfg: TextConfig,
    pub layers: Vec<PartyLayer>,
    /// The pair runs every layer: the client gets the output, nothing is handed off.
    pub full_output: bool,
    pub head: Option<FixedLinear>,
}

/// With tied embeddings the LM head is the embedding, which the client already holds:
/// it computes the logits itself from the final hidden state it reconstructs anyway, so
/// no logits travel (2 × vocabulary ring elements a step) and the parties skip the
/// largest matrix. Both sides decide from the model's config.
pub fn client_computes_head(cfg: &TextConfig) -> bool {
    cfg.tie_word_embeddings
}

fn check(cfg: &TextConfig, layers: &Range<usize>) -> Result<()> {
    if layers.end > cfg.num_hidden_layers || layers.start > layers.end {
        bail!(
            "MPC layers {layers:?} are outside the model's {} layers",
            cfg.num_hidden_layers
        );
    }
    if cfg.hidden_act != "silu" {
        bail!("MPC runs SwiGLU (silu) decoders, not `{}`", cfg.hidden_act);
    }
    Ok(())
}

impl PartyModel {
    /// Layers `layers` of the checkpoint behind `files`; `head` adds the final norm's
    /// successor, the LM head (the final norm itself is computed by the client).
    pub fn load(
        cfg: &TextConfig,
        prefix: &str,
        layers: Range<usize>,
        head: bool,
        files: &WeightFiles,
    ) -> Result<Self> {
        check(cfg, &layers)?;
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut out = Vec::new();
        for i in layers {
            let p = format!("{prefix}layers.{i}.");
            let attn = |n: &str| format!("{p}self_attn.{n}");
            let mlp = |n: &str| format!("{p}mlp.{n}");
            out.push(PartyLayer {
                qkv: stacked(vec![
                    fixed(files, &attn("q_proj"), q, h)?,
                    fixed(files, &attn("k_proj"), kv, h)?,
                    fixed(files, &attn("v_proj"), kv, h)?,
                ]),
                o: fixed(files, &attn("o_proj"), h, q)?,
                gate_up: stacked(vec![
                    fixed(files, &mlp("gate_proj"), inter, h)?,
                    fixed(files, &mlp("up_proj"), inter, h)?,
                ]),
                down: fixed(files, &mlp("down_proj"), h, inter)?,
            });
        }
        let full_output = head;
        let head = if head && !client_computes_head(cfg) {
            let name = if files.contains("lm_head.weight") {
                "lm_head".to_string()
            } else {
                format!("{prefix}embed_tokens")
            };
            Some(fixed(files, &name, cfg.vocab_size, h)?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            layers: out,
            full_output,
            head,
        })
    }
}

/// The client's public parameters: embedding, norms, RoPE.
pub struct ClientModel {
    pub cfg: TextConfig,
    /// The embedding, as a matrix the tied LM head can run on.
    pub embed: Linear,
    /// (input norm, post-attention norm) of each MPC layer.
    pub norms: Vec<(Vec<f32>, Vec<f32>)>,
    /// (query norm, key norm) of each head, per MPC layer; empty when the model has none.
    pub qk_norms: Vec<(Vec<f32>, Vec<f32>)>,
    /// The final norm, when the pair also runs the LM head.
    pub final_norm: Option<Vec<f32>>,
    /// RoPE inverse frequencies, computed as the engine does (f32).
    pub inv_freq: Vec<f32>,
}

/// The tensors a client needs for MPC layers `[0, layer_end)`: the embedding and the
/// layers' norms (the per-head q/k norms too, where the model has them), and the final
/// norm when the pair runs the head.
pub fn public_tensor_names(
    cfg: &TextConfig,
    prefix: &str,
    layer_end: usize,
    head: bool,
) -> Vec<String> {
    let mut names = vec![format!("{prefix}embed_tokens.weight")];
    for i in 0..layer_end {
        names.push(format!("{prefix}layers.{i}.input_layernorm.weight"));
        names.push(format!(
            "{prefix}layers.{i}.post_attention_layernorm.weight"
        ));
        if cfg.qk_norm {
            names.extend(qk_norm_names(prefix, i));
        }
    }
    if head {
        names.push(format!("{prefix}norm.weight"));
    }
    names
}

/// Layer `i`'s per-head query and key norm weights.
fn qk_norm_names(prefix: &str, i: usize) -> [String; 2] {
    ["q_norm", "k_norm"].map(|n| format!("{prefix}layers.{i}.self_attn.{n}.weight"))
}

impl ClientModel {
    pub fn load(
        cfg: &TextConfig,
        prefix: &str,
        layers: Range<usize>,
        head: bool,
        files: &WeightFiles,
    ) -> Result<Self> {
        check(cfg, &layers)?;
        let h = cfg.hidden_size;
        let norms = layers
            .clone()
            .map(|i| {
                let p = format!("{prefix}layers.{i}.");
                Ok((
                    files.vector(&format!("{p}input_layernorm.weight"), h)?,
                    files.vector(&format!("{p}post_attention_layernorm.weight"), h)?,
                ))
            })
            .collect::<Result<_>>()?;
        let qk_norms = if cfg.qk_norm {
            layers
                .map(|i| {
                    let [q, k] = qk_norm_names(prefix, i);
                    Ok((
                        files.vector(&q, cfg.head_dim)?,
                        files.vector(&k, cfg.head_dim)?,
                    ))
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let final_norm = if head {
            Some(files.vector(&format!("{prefix}norm.weight"), h)?)
        } else {
            None
        };
        let inv_freq = cfg.rope_inv_freq();
        Ok(Self {
            cfg: cfg.clone(),
            embed: Linear::new(
                files.matrix(&format!("{prefix}embed_tokens.weight"), cfg.vocab_size, h)?,
                cfg.vocab_size,
                h,
                None,
            ),
            norms,
            qk_norms,
            final_norm,
            inv_freq,
        })
    }

    /// From a split directory on this machine (the client's cached copy of the public
    /// parameters): layers `[0, layer_end)`, with the final norm when `head`.
    pub fn from_split(dir: &std::path::Path, layer_end: usize, head: bool) -> Result<Self> {
        let manifest = unfed_model::Manifest::load_current(dir)?;
        let files: Vec<_> = manifest.text_shards().map(|s| dir.join(&s.file)).collect();
        let cfg = &manifest.config;
        Self::load(
            &cfg.text,
            &cfg.text_prefix,
            0..layer_end,
            head,
            &WeightFiles::open(&files)?,
        )
    }

    /// The rows of `ids` in the embedding.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let mut out = vec![0f32; ids.len() * h];
        for (row, &id) in out.chunks_mut(h).zip(ids) {
            if id as usize >= self.cfg.vocab_size {
                bail!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.cfg.vocab_size
                );
            }
            self.embed.row_into(id as usize, row);
        }
        Ok(out)
    }

    /// The logits of the final-normed hidden state `hn` when the client computes the LM
    /// head ([`client_computes_head`]); `None` when the pair does.
    pub fn logits(&self, hn: &[f64]) -> Option<Vec<f32>> {
        if self.final_norm.is_none() || !client_computes_head(&self.cfg) {
            return None;
        }
        let h: Vec<f32> = hn.iter().map(|v| *v as f32).collect();
        Some(self.embed.forward(&h, 1))
    }
}
