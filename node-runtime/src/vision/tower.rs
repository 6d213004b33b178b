//! The Idefics3 (SmolVLM) vision tower for a range of encoder layers `[start, end)`.
//!
//! Follows transformers' float32 math: a `patch × patch` stride-`patch` convolution as a
//! matmul over flattened patches, learned position embeddings indexed through the
//! patch-mask bucketing Idefics3 uses for partially padded tiles, pre-LayerNorm encoder
//! layers (bidirectional attention with padding keys masked, GELU-tanh MLP), the
//! post-layernorm, then the connector: pixel shuffle by `scale_factor` and a bias-free
//! projection into the text model's hidden size. The first vision shard embeds pixels;
//! the last applies the post-layernorm and the connector.

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use unfed_model::VisionConfig;
use unfed_model::layout::{CONNECTOR_WEIGHT, VISION_PREFIX};

use crate::engine::WeightFiles;
use crate::engine::linear::{Linear, WeightData};

/// Which part of the vision stack a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionSpec {
    pub layer_start: usize,
    pub layer_end: usize,
    /// Patch and position embeddings: the shard takes pixels.
    pub has_embedding: bool,
    /// Post-layernorm and connector: the shard returns image features.
    pub has_head: bool,
}

impl VisionSpec {
    pub fn whole(cfg: &VisionConfig) -> Self {
        Self {
            layer_start: 0,
            layer_end: cfg.num_hidden_layers,
            has_embedding: true,
            has_head: true,
        }
    }
}

/// Preprocessed image tiles: `pixels` is `[tiles, channels, height, width]` row-major,
/// `pixel_mask` `[tiles, height, width]` (1 = real pixel, 0 = padding).
#[derive(Debug, Clone, PartialEq)]
pub struct PixelBatch {
    pub tiles: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<f32>,
    pub pixel_mask: Vec<u8>,
}

impl PixelBatch {
    /// Checks that the buffers hold what the dimensions say.
    pub fn validate(&self) -> Result<()> {
        let plane = self.height * self.width;
        if self.tiles == 0 || plane == 0 {
            bail!(
                "the image batch is empty ({} tiles of {}x{})",
                self.tiles,
                self.height,
                self.width
            );
        }
        if self.pixels.len() != self.tiles * self.channels * plane {
            bail!(
                "pixel buffer has {} values, expected {} tiles x {} channels x {}x{}",
                self.pixels.len(),
                self.tiles,
                self.channels,
                self.height,
                self.width
            );
        }
        if self.pixel_mask.len() != self.tiles * plane {
            bail!(
                "pixel mask has {} values, expected {} tiles x {}x{}",
                self.pixel_mask.len(),
                self.tiles,
                self.height,
                self.width
            );
        }
        Ok(())
    }
}

/// Hidden states between vision shards: `data` is `[tiles, grid_h * grid_w, hidden]`;
/// `patch_mask` (`[tiles, grid_h * grid_w]`) travels along because every layer masks
/// padding patches out of attention.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchStates {
    pub tiles: usize,
    pub grid_h: usize,
    pub grid_w: usize,
    pub patch_mask: Vec<bool>,
    pub data: Vec<f32>,
}

/// Input of a vision shard.
pub enum VisionInput {
    Pixels(PixelBatch),
    Hidden(PatchStates),
}

/// Output of a vision shard: hidden states for the next vision shard, or image features
/// `[rows, text_hidden]` (rows = tiles × image_seq_len) for the first text shard.
pub enum VisionOutput {
    Hidden(PatchStates),
    Features { rows: usize, data: Vec<f32> },
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct EncoderLayer {
    norm1: Norm,
    /// q, k and v projections fused row-wise.
    qkv: Linear,
    out: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

struct Embeddings {
    /// The convolution kernel flattened to `[hidden, channels * patch * patch]`.
    patch: Linear,
    /// `[num_patches_per_side², hidden]`.
    position: Vec<f32>,
}

struct Head {
    post_norm: Norm,
    projection: Linear,
}

pub struct VisionModel {
    cfg: VisionConfig,
    spec: VisionSpec,
    text_hidden: usize,
    embeddings: Option<Embeddings>,
    layers: Vec<EncoderLayer>,
    head: Option<Head>,
}

impl VisionModel {
    /// Builds the shard from `files`; `text_hidden` is the decoder's hidden size (the
    /// connector's output width).
    pub fn load(
        cfg: &VisionConfig,
        text_hidden: usize,
        spec: VisionSpec,
        files: &WeightFiles,
    ) -> Result<Self> {
        if cfg.hidden_act != "gelu_pytorch_tanh" && cfg.hidden_act != "gelu_new" {
            bail!(
                "vision hidden_act `{}` is not supported: the vision tower runs GELU-tanh",
                cfg.hidden_act
            );
        }
        if spec.layer_start > spec.layer_end || spec.layer_end > cfg.num_hidden_layers {
            bail!(
                "vision layer range [{}, {}) is outside the tower's {} layers",
                spec.layer_start,
                spec.layer_end,
                cfg.num_hidden_layers
            );
        }
        let h = cfg.hidden_size;
        if cfg.num_attention_heads == 0 || !h.is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "vision hidden size {h} is not a multiple of {} attention heads",
                cfg.num_attention_heads
            );
        }
        if cfg.patch_size == 0
            || !cfg.image_size.is_multiple_of(cfg.patch_size)
            || cfg.scale_factor == 0
        {
            bail!(
                "vision config: image_size {} must be a multiple of patch_size {} (scale_factor {})",
                cfg.image_size,
                cfg.patch_size,
                cfg.scale_factor
            );
        }
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            Ok(Linear::new(
                files.matrix(&format!("{name}.weight"), out, inp)?,
                out,
                inp,
                if bias {
                    Some(files.vector(&format!("{name}.bias"), out)?)
                } else {
                    None
                },
            ))
        };
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                weight: files.vector(&format!("{name}.weight"), h)?,
                bias: files.vector(&format!("{name}.bias"), h)?,
            })
        };
        let embeddings = if spec.has_embedding {
            let e = format!("{VISION_PREFIX}embeddings.");
            let (p, c) = (cfg.patch_size, cfg.num_channels);
            let kernel_name = format!("{e}patch_embedding.weight");
            let (shape, kernel) = files.tensor_f32(&kernel_name)?;
            if shape != [h, c, p, p] {
                bail!(
                    "tensor `{kernel_name}` has shape {shape:?}, the config implies [{h}, {c}, {p}, {p}]"
                );
            }
            let side = cfg.image_size / p;
            let position =
                files.matrix(&format!("{e}position_embedding.weight"), side * side, h)?;
            let mut pos = vec![0f32; side * side * h];
            for (r, row) in pos.chunks_exact_mut(h).enumerate() {
                position.row_into(r, h, row);
            }
            Some(Embeddings {
                patch: Linear::new(
                    WeightData::F32(kernel),
                    h,
                    c * p * p,
                    Some(files.vector(&format!("{e}patch_embedding.bias"), h)?),
                ),
                position: pos,
            })
        } else {
            None
        };
        let mut layers = Vec::new();
        for i in spec.layer_start..spec.layer_end {
            let p = format!("{VISION_PREFIX}encoder.layers.{i}.");
            let attn = |n: &str| format!("{p}self_attn.{n}");
            let mut qkv_b = files.vector(&attn("q_proj.bias"), h)?;
            qkv_b.extend(files.vector(&attn("k_proj.bias"), h)?);
            qkv_b.extend(files.vector(&attn("v_proj.bias"), h)?);
            layers.push(EncoderLayer {
                norm1: norm(&format!("{p}layer_norm1"))?,
                qkv: Linear::new(
                    WeightData::concat_rows(vec![
                        files.matrix(&attn("q_proj.weight"), h, h)?,
                        files.matrix(&attn("k_proj.weight"), h, h)?,
                        files.matrix(&attn("v_proj.weight"), h, h)?,
                    ]),
                    3 * h,
                    h,
                    Some(qkv_b),
                ),
                out: linear(&attn("out_proj"), h, h, true)?,
                norm2: norm(&format!("{p}layer_norm2"))?,
                fc1: linear(&format!("{p}mlp.fc1"), cfg.intermediate_size, h, true)?,
                fc2: linear(&format!("{p}mlp.fc2"), h, cfg.intermediate_size, true)?,
            });
        }
        let head = if spec.has_head {
            let s2 = cfg.scale_factor * cfg.scale_factor;
            let side = cfg.image_size / cfg.patch_size;
            if !side.is_multiple_of(cfg.scale_factor) {
                bail!(
                    "{side} patches per side are not divisible by scale_factor {}",
                    cfg.scale_factor
                );
            }
            Some(Head {
                post_norm: norm(&format!("{VISION_PREFIX}post_layernorm"))?,
                projection: Linear::new(
                    files
                        .matrix(CONNECTOR_WEIGHT, text_hidden, h * s2)
                        .context("the last vision shard needs the connector projection")?,
                    text_hidden,
                    h * s2,
                    None,
                ),
            })
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            spec,
            text_hidden,
            embeddings,
            layers,
            head,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    pub fn spec(&self) -> VisionSpec {
        self.spec
    }

    /// `<image>` rows one tile contributes to the prompt.
    pub fn image_seq_len(&self) -> usize {
        image_seq_len(&self.cfg)
    }

    /// Runs the shard: embeddings (first shard), its encoder layers, and post-layernorm +
    /// connector (last shard).
    pub fn forward(&self, input: VisionInput) -> Result<VisionOutput> {
        let mut states = match input {
            VisionInput::Pixels(batch) => {
                let emb = self
                    .embeddings
                    .as_ref()
                    .context("pixels sent to a vision shard without the patch embedding (not vision shard 0)")?;
                self.embed(emb, &batch)?
            }
            VisionInput::Hidden(states) => {
                if self.embeddings.is_some() {
                    bail!("hidden states sent to the first vision shard, which expects pixels");
                }
                let seq = states.grid_h * states.grid_w;
                if states.data.len() != states.tiles * seq * self.cfg.hidden_size
                    || states.patch_mask.len() != states.tiles * seq
                {
                    bail!(
                        "vision hidden states have {} values and {} mask entries, expected {} tiles x {} patches x {}",
                        states.data.len(),
                        states.patch_mask.len(),
                        states.tiles,
                        seq,
                        self.cfg.hidden_size
                    );
                }
                states
            }
        };
        for layer in &self.layers {
            states.data = self.layer_forward(layer, &states)?;
        }
        match &self.head {
            Some(head) => {
                let h = self.cfg.hidden_size;
                layer_norm(
                    &mut states.data,
                    &head.post_norm,
                    h,
                    self.cfg.layer_norm_eps as f32,
                );
                let shuffled = pixel_shuffle(&states, h, self.cfg.scale_factor)?;
                let rows = shuffled.len() / head.projection.in_dim();
                let data = head.projection.forward(&shuffled, rows);
                debug_assert_eq!(data.len(), rows * self.text_hidden);
                Ok(VisionOutput::Features { rows, data })
            }
            None => Ok(VisionOutput::Hidden(states)),
        }
    }

    fn embed(&self, emb: &Embeddings, b: &PixelBatch) -> Result<PatchStates> {
        b.validate()?;
        let (p, c, h) = (
            self.cfg.patch_size,
            self.cfg.num_channels,
            self.cfg.hidden_size,
        );
        if b.channels != c {
            bail!(
                "the image has {} channels, the vision tower expects {c}",
                b.channels
            );
        }
        if !b.height.is_multiple_of(p) || !b.width.is_multiple_of(p) {
            bail!(
                "tile size {}x{} is not a multiple of the {p}-pixel patch",
                b.height,
                b.width
            );
        }
        let (gh, gw) = (b.height / p, b.width / p);
        let seq = gh * gw;
        // Patches flattened in the kernel's (channel, row, col) order.
        let mut patches = vec![0f32; b.tiles * seq * c * p * p];
        let mut patch_mask = vec![false; b.tiles * seq];
        let plane = b.height * b.width;
        for t in 0..b.tiles {
            for (gy, gx) in (0..gh).flat_map(|y| (0..gw).map(move |x| (y, x))) {
                let n = t * seq + gy * gw + gx;
                let out = &mut patches[n * c * p * p..(n + 1) * c * p * p];
                let mut any = false;
                for ch in 0..c {
                    for py in 0..p {
                        let y = gy * p + py;
                        let src = (t * c + ch) * plane + y * b.width + gx * p;
                        out[(ch * p + py) * p..(ch * p + py + 1) * p]
                            .copy_from_slice(&b.pixels[src..src + p]);
                    }
                }
                for py in 0..p {
                    let m = t * plane + (gy * p + py) * b.width + gx * p;
                    any |= b.pixel_mask[m..m + p].iter().any(|&v| v != 0);
                }
                patch_mask[n] = any;
            }
        }
        let mut data = emb.patch.forward(&patches, b.tiles * seq);
        let side = self.cfg.image_size / p;
        for t in 0..b.tiles {
            let mask = &patch_mask[t * seq..(t + 1) * seq];
            let ids = position_ids(mask, gh, gw, side);
            for (s, &id) in ids.iter().enumerate() {
                let row = &mut data[(t * seq + s) * h..(t * seq + s + 1) * h];
                for (x, &e) in row.iter_mut().zip(&emb.position[id * h..(id + 1) * h]) {
                    *x += e;
                }
            }
        }
        Ok(PatchStates {
            tiles: b.tiles,
            grid_h: gh,
            grid_w: gw,
            patch_mask,
            data,
        })
    }

    fn layer_forward(&self, l: &EncoderLayer, st: &PatchStates) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let hd = h / nh;
        let eps = cfg.layer_norm_eps as f32;
        let seq = st.grid_h * st.grid_w;
        let rows = st.tiles * seq;
        let mut x = st.data.clone();

        let mut normed = x.clone();
        layer_norm(&mut normed, &l.norm1, h, eps);
        let qkv = l.qkv.forward(&normed, rows);
        let qkv = Tensor::from_vec(qkv, (st.tiles, seq, 3 * h), &Device::Cpu)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut attn_out = Vec::with_capacity(rows * h);
        // One tile at a time: a tile's attention matrix is [heads, seq, seq].
        for t in 0..st.tiles {
            let tile = qkv.get(t)?;
            let heads = |i: usize| -> Result<Tensor> {
                Ok(tile
                    .narrow(1, i * h, h)?
                    .reshape((seq, nh, hd))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            let mask = &st.patch_mask[t * seq..(t + 1) * seq];
            if mask.iter().any(|&m| !m) {
                // Padding patches are hidden from every query (transformers adds the
                // dtype's minimum rather than -inf, so a fully padded row stays finite).
                let bias: Vec<f32> = mask
                    .iter()
                    .map(|&m| if m { 0.0 } else { f32::MIN })
                    .collect();
                att = att.broadcast_add(&Tensor::from_vec(bias, (1, 1, seq), &Device::Cpu)?)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let out = att.matmul(&v)?.transpose(0, 1)?.contiguous()?; // [seq, nh, hd]
            attn_out.extend(out.flatten_all()?.to_vec1::<f32>()?);
        }
        let o = l.out.forward(&attn_out, rows);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }

        let mut normed = x.clone();
        layer_norm(&mut normed, &l.norm2, h, eps);
        let mut act = l.fc1.forward(&normed, rows);
        for a in act.iter_mut() {
            *a = gelu_tanh(*a);
        }
        let d = l.fc2.forward(&act, rows);
        for (a, b) in x.iter_mut().zip(&d) {
            *a += b;
        }
        Ok(x)
    }
}

/// `<image>` tokens per tile: patches per tile divided by the pixel-shuffle factor².
pub fn image_seq_len(cfg: &VisionConfig) -> usize {
    let side = cfg.image_size / cfg.patch_size.max(1);
    side * side / (cfg.scale_factor * cfg.scale_factor).max(1)
}

/// Position ids of one tile's patches: each real patch's fractional coordinate within
/// the tile's real extent is bucketed onto the `side × side` grid the embeddings were
/// trained on (transformers' `torch.bucketize(..., right=True)` over `k / side`);
/// padding patches get id 0.
fn position_ids(mask: &[bool], gh: usize, gw: usize, side: usize) -> Vec<usize> {
    let real_h = (0..gh).filter(|&y| mask[y * gw]).count();
    let real_w = (0..gw).filter(|&x| mask[x]).count();
    let boundaries: Vec<f32> = (1..side).map(|k| (k as f64 / side as f64) as f32).collect();
    let bucket = |i: usize, n: usize| -> usize {
        let step = 1.0f32 / n as f32;
        let frac = (i as f32 * step).min(1.0 - 1e-6);
        boundaries.iter().take_while(|&&b| b <= frac).count()
    };
    let mut ids = vec![0usize; gh * gw];
    for y in 0..gh {
        for x in 0..gw {
            if mask[y * gw + x] {
                ids[y * gw + x] = bucket(y, real_h) * side + bucket(x, real_w);
            }
        }
    }
    ids
}

/// LayerNorm over rows of `dim`, in place (biased variance, like torch).
fn layer_norm(x: &mut [f32], n: &Norm, dim: usize, eps: f32) {
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().sum::<f32>() / dim as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&n.weight).zip(&n.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// PyTorch's `gelu(approximate="tanh")`.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// Idefics3's pixel shuffle: each `s × s` block of patches becomes one row of
/// `hidden · s²` values (block row-major over patch rows, then patch columns within the
/// row, then channels), for every tile; returns `[tiles · seq / s², hidden · s²]`.
fn pixel_shuffle(st: &PatchStates, h: usize, s: usize) -> Result<Vec<f32>> {
    let (gh, gw) = (st.grid_h, st.grid_w);
    if gh != gw || !gh.is_multiple_of(s) {
        bail!("pixel shuffle needs a square grid divisible by {s}, got {gh}x{gw} patches");
    }
    let (oh, ow) = (gh / s, gw / s);
    let width = h * s * s;
    let mut out = vec![0f32; st.tiles * oh * ow * width];
    for t in 0..st.tiles {
        for (i, j) in (0..oh).flat_map(|i| (0..ow).map(move |j| (i, j))) {
            let dst = &mut out[((t * oh + i) * ow + j) * width..][..width];
            for (c, v) in dst.iter_mut().enumerate() {
                let row = i * s + c / (h * s);
                let col = j * s + (c % (h * s)) / h;
                *v = st.data[((t * gh + row) * gw + col) * h + c % h];
            }
        }
    }
    Ok(out)
}
