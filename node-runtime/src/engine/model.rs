//! Llama-family decoder (Qwen2, Llama, Mistral) for one layer range `[start, end)`.
//!
//! Follows transformers' float32 math: RMSNorm, rotate-half RoPE with the checkpoint's
//! theta, grouped-query attention, SwiGLU, optional q/k/v bias. The first shard embeds
//! token ids; the last applies the final norm and the LM head (tied or not).

use anyhow::{Context, Result, bail};
use candle_core::{DType as CDType, Device, Tensor};
use unfed_model::TextConfig;

use super::linear::{Linear, WeightData};
use super::weights::WeightFiles;

/// Which part of the model a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub layer_start: usize,
    pub layer_end: usize,
    pub has_embedding: bool,
    pub has_head: bool,
}

impl ShardSpec {
    pub fn whole(cfg: &TextConfig) -> Self {
        Self {
            layer_start: 0,
            layer_end: cfg.num_hidden_layers,
            has_embedding: true,
            has_head: true,
        }
    }
}

/// Input of a shard: token ids on the first shard, hidden states `[seq, hidden]` after.
pub enum ShardInput<'a> {
    Tokens(&'a [u32]),
    Hidden {
        data: Vec<f32>,
        seq: usize,
    },
    /// Hidden states entering at absolute layer `layer` of this shard's range (the
    /// output of an MPC pair that ran the layers before it; on shard 0 too).
    HiddenAt {
        data: Vec<f32>,
        seq: usize,
        layer: usize,
    },
    /// First shard only: input rows already embedded (an image prompt whose placeholder
    /// rows were replaced by image features; see `embed_tokens`).
    Embedded {
        data: Vec<f32>,
        seq: usize,
    },
}

/// Output of a shard: hidden states for the next hop, or the last row's logits.
pub enum ShardOutput {
    Hidden { data: Vec<f32>, seq: usize },
    Logits(Vec<f32>),
}

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// q, k and v projections fused row-wise: one pass over the input.
    qkv: Linear,
    o: Linear,
    /// Per-head RMSNorm weights of the queries and keys, before RoPE (Qwen3).
    qk_norm: Option<(Tensor, Tensor)>,
    /// gate and up projections fused row-wise.
    gate_up: Linear,
    down: Linear,
}

/// Keys and values of one layer: `[kv_heads, positions, head_dim]`.
#[derive(Default)]
struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The KV cache of one session on one shard.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub(crate) fn empty_for_tests() -> Self {
        Self {
            layers: Vec::new(),
            len: 0,
        }
    }

    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.k.as_ref().map_or(0, |t| t.elem_count() * 4)
                    + l.v.as_ref().map_or(0, |t| t.elem_count() * 4)
            })
            .sum()
    }
}

pub struct ShardModel {
    cfg: TextConfig,
    spec: ShardSpec,
    embed: Option<WeightData>,
    layers: Vec<Layer>,
    final_norm: Option<Tensor>,
    head: Option<Linear>,
    /// `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    weight_bytes: usize,
}

impl ShardModel {
    /// Builds the shard's layers from `files`, reading only the tensors it needs.
    pub fn load(
        cfg: &TextConfig,
        prefix: &str,
        spec: ShardSpec,
        files: &WeightFiles,
    ) -> Result<Self> {
        if cfg.hidden_act != "silu" {
            bail!(
                "hidden_act `{}` is not supported: the engine runs SwiGLU (silu) decoders",
                cfg.hidden_act
            );
        }
        if spec.layer_start > spec.layer_end || spec.layer_end > cfg.num_hidden_layers {
            bail!(
                "layer range [{}, {}) is outside the model's {} layers",
                spec.layer_start,
                spec.layer_end,
                cfg.num_hidden_layers
            );
        }
        if !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
        {
            bail!(
                "{} attention heads are not a multiple of {} key/value heads",
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            );
        }
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let vec_t = |name: &str, len: usize| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                files.vector(name, len)?,
                len,
                &Device::Cpu,
            )?)
        };
        let mut layers = Vec::new();
        for i in spec.layer_start..spec.layer_end {
            let p = format!("{prefix}layers.{i}.");
            let attn = |n: &str| format!("{p}self_attn.{n}");
            let qkv_w = WeightData::concat_rows(vec![
                files.matrix(&attn("q_proj.weight"), q_dim, h)?,
                files.matrix(&attn("k_proj.weight"), kv_dim, h)?,
                files.matrix(&attn("v_proj.weight"), kv_dim, h)?,
            ]);
            let qkv_b = if cfg.attention_bias || files.contains(&attn("q_proj.bias")) {
                let mut b = files.vector(&attn("q_proj.bias"), q_dim)?;
                b.extend(files.vector(&attn("k_proj.bias"), kv_dim)?);
                b.extend(files.vector(&attn("v_proj.bias"), kv_dim)?);
                Some(b)
            } else {
                None
            };
            let mlp = |n: &str| format!("{p}mlp.{n}");
            let inter = cfg.intermediate_size;
            let qk_norm = if cfg.qk_norm {
                Some((
                    vec_t(&attn("q_norm.weight"), hd)?,
                    vec_t(&attn("k_norm.weight"), hd)?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                qk_norm,
                input_norm: vec_t(&format!("{p}input_layernorm.weight"), h)?,
                post_norm: vec_t(&format!("{p}post_attention_layernorm.weight"), h)?,
                qkv: Linear::new(qkv_w, q_dim + 2 * kv_dim, h, qkv_b),
                o: Linear::new(
                    files.matrix(&attn("o_proj.weight"), h, q_dim)?,
                    h,
                    q_dim,
                    None,
                ),
                gate_up: Linear::new(
                    WeightData::concat_rows(vec![
                        files.matrix(&mlp("gate_proj.weight"), inter, h)?,
                        files.matrix(&mlp("up_proj.weight"), inter, h)?,
                    ]),
                    2 * inter,
                    h,
                    None,
                ),
                down: Linear::new(
                    files.matrix(&mlp("down_proj.weight"), h, inter)?,
                    h,
                    inter,
                    None,
                ),
            });
        }
        let embed_name = format!("{prefix}embed_tokens.weight");
        let embed = if spec.has_embedding {
            Some(files.matrix(&embed_name, cfg.vocab_size, h)?)
        } else {
            None
        };
        let (final_norm, head) = if spec.has_head {
            // Split shards always carry lm_head; an unsplit tied checkpoint only has the embedding.
            let head_name = if files.contains("lm_head.weight") {
                "lm_head.weight".to_string()
            } else {
                embed_name.clone()
            };
            let w = files
                .matrix(&head_name, cfg.vocab_size, h)
                .context("the last shard needs lm_head.weight (or the tied embedding)")?;
            (
                Some(vec_t(&format!("{prefix}norm.weight"), h)?),
                Some(Linear::new(w, cfg.vocab_size, h, None)),
            )
        } else {
            (None, None)
        };
        let (cos, sin) = rope_tables(cfg)?;
        let weight_bytes = layers
            .iter()
            .map(|l| l.qkv.nbytes() + l.o.nbytes() + l.gate_up.nbytes() + l.down.nbytes())
            .sum::<usize>()
            + embed.as_ref().map_or(0, |e| e.nbytes())
            + head.as_ref().map_or(0, |l| l.nbytes());
        Ok(Self {
            cfg: cfg.clone(),
            spec,
            embed,
            layers,
            final_norm,
            head,
            cos,
            sin,
            weight_bytes,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn spec(&self) -> ShardSpec {
        self.spec
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of weights one decode step reads: every matrix, but one row of the
    /// embedding table.
    pub fn decode_read_bytes(&self) -> usize {
        self.weight_bytes - self.embed.as_ref().map_or(0, |e| e.nbytes())
    }

    /// Bytes one position adds to a session's KV cache on this shard (f32 keys and
    /// values of every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        self.layers.len() * 2 * self.cfg.num_key_value_heads * self.cfg.head_dim * 4
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.layers.len())
                .map(|_| LayerCache::default())
                .collect(),
            len: 0,
        }
    }

    /// Runs the shard's layers on new positions `cache.len() ..`, extending the cache.
    /// The embedding rows `[ids.len(), hidden]` of token ids (first shard only).
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let embed = self
            .embed
            .as_ref()
            .context("token ids sent to a shard without the embedding (not shard 0)")?;
        let mut x = vec![0f32; ids.len() * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if id as usize >= self.cfg.vocab_size {
                bail!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.cfg.vocab_size
                );
            }
            embed.row_into(id as usize, h, row);
        }
        Ok(x)
    }

    pub fn forward(&self, cache: &mut KvCache, input: ShardInput<'_>) -> Result<ShardOutput> {
        self.forward_batch(vec![(cache, input)])
            .pop()
            .expect("one output per input")
    }

    /// Several sessions' steps as one batch: their rows go through every projection
    /// together (one pass over the weights for all of them), each attends only to its
    /// own cache at its own positions. The projections are batch-invariant, so each
    /// session's output is bit-identical to running it alone. Inputs entering at
    /// different layers (MPC hand-offs) run as separate groups. One result per input,
    /// in order; a bad input fails alone.
    pub fn forward_batch(
        &self,
        items: Vec<(&mut KvCache, ShardInput<'_>)>,
    ) -> Vec<Result<ShardOutput>> {
        let mut results: Vec<Option<Result<ShardOutput>>> = Vec::with_capacity(items.len());
        let mut groups: std::collections::BTreeMap<usize, Vec<Entry<'_>>> = Default::default();
        for (index, (cache, input)) in items.into_iter().enumerate() {
            match self.prepare(cache.len, input) {
                Ok((x, seq, first)) => {
                    groups.entry(first).or_default().push(Entry {
                        index,
                        cache,
                        x,
                        seq,
                    });
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        for (first, mut group) in groups {
            let outs = self.run_group(first, &mut group);
            for (entry, out) in group.iter().zip(outs) {
                results[entry.index] = Some(out);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every input has a result"))
            .collect()
    }

    /// The input's rows `[seq, hidden]`, their count, and the layer they enter at.
    fn prepare(&self, pos: usize, input: ShardInput<'_>) -> Result<(Vec<f32>, usize, usize)> {
        let h = self.cfg.hidden_size;
        let mut first = self.spec.layer_start;
        let (x, seq) = match input {
            ShardInput::Tokens(ids) => (self.embed_tokens(ids)?, ids.len()),
            ShardInput::HiddenAt { data, seq, layer } => {
                if !(self.spec.layer_start..=self.spec.layer_end).contains(&layer) {
                    bail!(
                        "hidden states for layer {layer} sent to a shard of layers [{}, {})",
                        self.spec.layer_start,
                        self.spec.layer_end
                    );
                }
                first = layer;
                (data, seq)
            }
            ShardInput::Embedded { data, seq } => {
                if !self.spec.has_embedding {
                    bail!("embedded rows sent to a shard without the embedding (not shard 0)");
                }
                (data, seq)
            }
            ShardInput::Hidden { data, seq } => {
                if self.spec.has_embedding {
                    bail!("hidden states sent to the first shard, which expects token ids");
                }
                (data, seq)
            }
        };
        if x.len() != seq * h {
            bail!(
                "hidden state has {} values, expected {seq} rows of {h}",
                x.len()
            );
        }
        if seq == 0 {
            bail!("empty input: a step needs at least one token");
        }
        if pos + seq > self.cfg.max_position_embeddings {
            bail!(
                "context overflow: {} cached + {seq} new positions exceed the model's context of {} tokens",
                pos,
                self.cfg.max_position_embeddings
            );
        }
        Ok((x, seq, first))
    }

    /// Runs the layers from `first` on a group's stacked rows.
    fn run_group(&self, first: usize, group: &mut [Entry<'_>]) -> Vec<Result<ShardOutput>> {
        let h = self.cfg.hidden_size;
        let rows: usize = group.iter().map(|e| e.seq).sum();
        let mut stacked = Vec::with_capacity(rows * h);
        for e in group.iter_mut() {
            stacked.append(&mut e.x);
        }
        let run = || -> Result<Vec<f32>> {
            let mut x = Tensor::from_vec(stacked, (rows, h), &Device::Cpu)?;
            let skip = first - self.spec.layer_start;
            for (li, layer) in self.layers.iter().enumerate().skip(skip) {
                let mut spans: Vec<Span<'_>> = group
                    .iter_mut()
                    .map(|e| Span {
                        pos: e.cache.len,
                        seq: e.seq,
                        cache: &mut e.cache.layers[li],
                    })
                    .collect();
                let window = self.cfg.attention_window(self.spec.layer_start + li);
                x = self.layer_forward(layer, window, &mut spans, x)?;
            }
            Ok(x.flatten_all()?.to_vec1()?)
        };
        let x = match run() {
            Ok(x) => x,
            Err(e) => {
                return group
                    .iter()
                    .map(|_| Err(anyhow::anyhow!("{e:#}")))
                    .collect();
            }
        };
        for e in group.iter_mut() {
            e.cache.len += e.seq;
        }
        // Each session's rows, in group order.
        let mut offsets = Vec::with_capacity(group.len());
        let mut at = 0;
        for e in group.iter() {
            offsets.push((at, e.seq));
            at += e.seq;
        }
        match (&self.final_norm, &self.head) {
            (Some(norm), Some(head)) => {
                let last: Vec<f32> = offsets
                    .iter()
                    .flat_map(|&(start, seq)| x[(start + seq - 1) * h..(start + seq) * h].iter())
                    .copied()
                    .collect();
                let logits = Tensor::from_vec(last, (group.len(), h), &Device::Cpu)
                    .and_then(|t| candle_nn::ops::rms_norm(&t, norm, self.cfg.rms_norm_eps as f32))
                    .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                    .map(|normed| head.forward(&normed, group.len()));
                match logits {
                    Ok(l) => l
                        .chunks_exact(head.out_dim())
                        .map(|row| Ok(ShardOutput::Logits(row.to_vec())))
                        .collect(),
                    Err(e) => group
                        .iter()
                        .map(|_| Err(anyhow::anyhow!("{e:#}")))
                        .collect(),
                }
            }
            _ => offsets
                .iter()
                .map(|&(start, seq)| {
                    Ok(ShardOutput::Hidden {
                        data: x[start * h..(start + seq) * h].to_vec(),
                        seq,
                    })
                })
                .collect(),
        }
    }

    fn layer_forward(
        &self,
        l: &Layer,
        window: Option<usize>,
        spans: &mut [Span<'_>],
        x: Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps as f32;
        let rows: usize = spans.iter().map(|s| s.seq).sum();
        let width = nh * hd + 2 * nkv * hd;

        let normed = candle_nn::ops::rms_norm(&x, &l.input_norm, eps)?;
        let qkv = l.qkv.forward(&normed.flatten_all()?.to_vec1()?, rows);
        let mut attended = Vec::with_capacity(rows * nh * hd);
        let mut at = 0;
        for span in spans.iter_mut() {
            let own = &qkv[at * width..(at + span.seq) * width];
            attended.extend(self.attend(span, own, window, l.qk_norm.as_ref())?);
            at += span.seq;
        }
        let o = l.o.forward(&attended, rows);
        let x = (x + Tensor::from_vec(o, (rows, cfg.hidden_size), &Device::Cpu)?)?;

        let normed = candle_nn::ops::rms_norm(&x, &l.post_norm, eps)?;
        let gu = l.gate_up.forward(&normed.flatten_all()?.to_vec1()?, rows);
        let inter = cfg.intermediate_size;
        let mut act = vec![0f32; rows * inter];
        for (s, row) in gu.chunks_exact(2 * inter).enumerate() {
            let (g, u) = row.split_at(inter);
            for (a, (&g, &u)) in act[s * inter..(s + 1) * inter]
                .iter_mut()
                .zip(g.iter().zip(u))
            {
                *a = g / (1.0 + (-g).exp()) * u;
            }
        }
        let d = l.down.forward(&act, rows);
        Ok((x + Tensor::from_vec(d, (rows, cfg.hidden_size), &Device::Cpu)?)?)
    }

    /// One session's attention for its new rows (`qkv`: `[seq, q | k | v]`), extending
    /// its cache; returns `[seq, heads * head_dim]`. With a `window`, a row sees only
    /// the last `window` positions up to its own; with `qk_norm`, each head's query and
    /// key are RMS-normalised first.
    fn attend(
        &self,
        span: &mut Span<'_>,
        qkv: &[f32],
        window: Option<usize>,
        qk_norm: Option<&(Tensor, Tensor)>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let n_rep = nh / nkv;
        let (pos, seq) = (span.pos, span.seq);
        let qkv = Tensor::from_slice(qkv, (seq, nh * hd + 2 * nkv * hd), &Device::Cpu)?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((seq, n, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let mut q = heads(qkv.narrow(1, 0, nh * hd)?, nh)?;
        let mut k = heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv)?;
        if let Some((qn, kn)) = qk_norm {
            let eps = cfg.rms_norm_eps as f32;
            q = candle_nn::ops::rms_norm(&q, qn, eps)?;
            k = candle_nn::ops::rms_norm(&k, kn, eps)?;
        }
        let v = qkv
            .narrow(1, (nh + nkv) * hd, nkv * hd)?
            .reshape((seq, nkv, hd))?
            .transpose(0, 1)?
            .contiguous()?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?.squeeze(0)?;

        let lc = &mut *span.cache;
        let (k, v) = match (lc.k.take(), lc.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            _ => (k, v),
        };
        lc.k = Some(k.clone());
        lc.v = Some(v.clone());
        // Keys before `first` are outside every new row's window: not even scored.
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let (k, v) = if first > 0 {
            (
                k.narrow(1, first, pos + seq - first)?,
                v.narrow(1, first, pos + seq - first)?,
            )
        } else {
            (k, v)
        };
        let total = pos + seq - first;

        // Grouped-query attention without copying keys: the n_rep query heads that share
        // a kv head are stacked along the row axis.
        let q = q.reshape((nkv, n_rep * seq, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if seq > 1 {
            let mut mask = vec![0f32; n_rep * seq * total];
            for r in 0..n_rep * seq {
                // Row i is position pos + i; key column c is position first + c.
                let i = r % seq;
                let row = &mut mask[r * total..(r + 1) * total];
                let visible_from = window.map_or(0, |w| (pos + i + 1).saturating_sub(w));
                for (c, m) in row.iter_mut().enumerate() {
                    let j = first + c;
                    if j > pos + i || j < visible_from {
                        *m = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (n_rep * seq, total), &Device::Cpu)?;
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let out = att.matmul(&v)?; // [nkv, n_rep*seq, hd]
        let out = out.reshape((nh, seq, hd))?.transpose(0, 1)?.contiguous()?; // [seq, nh, hd]
        Ok(out.flatten_all()?.to_vec1()?)
    }
}

/// One input of a batch, prepared.
struct Entry<'c> {
    index: usize,
    cache: &'c mut KvCache,
    x: Vec<f32>,
    seq: usize,
}

/// One session's rows in a batched layer: where they start and its cache of the layer.
struct Span<'c> {
    pos: usize,
    seq: usize,
    cache: &'c mut LayerCache,
}

/// cos/sin of every position, computed in f32 like transformers' RoPE.
fn rope_tables(cfg: &TextConfig) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv = cfg.rope_inv_freq();
    let n = cfg.max_position_embeddings;
    let mut freqs = Vec::with_capacity(n * half);
    for p in 0..n {
        freqs.extend(inv.iter().map(|f| p as f32 * f));
    }
    let freqs = Tensor::from_vec(freqs, (n, half), &Device::Cpu)?;
    Ok((freqs.cos()?.to_dtype(CDType::F32)?, freqs.sin()?))
}
