//! `config.json` as transformers 4.x and 5.x write it, normalised into one shape.
//!
//! INTERFACE CONTRACT (other crates build on these types; extend, do not rename):
//! - `ModelConfig::from_dir(dir)` / `ModelConfig::from_json(&str)` parse a checkpoint's
//!   config.json (rope_theta top-level or in rope_parameters; torch_dtype or dtype).
//! - `ModelConfig::text` is always the decoder's config (for Idefics3 it is `text_config`).
//! - `ModelConfig::text_prefix` is the tensor-name prefix of the decoder:
//!   "model." for Qwen2/Llama/Mistral, "model.text_model." for Idefics3.
//!   Layer i's tensors are `{text_prefix}layers.{i}.…`, the embedding
//!   `{text_prefix}embed_tokens.weight`, the final norm `{text_prefix}norm.weight`, the
//!   head `lm_head.weight`. Shard files keep these HF names with global layer indices.

use serde::{Deserialize, Serialize};

/// Architectures the product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Qwen2,
    Qwen3,
    Llama,
    Mistral,
    Idefics3,
}

/// Weight dtypes the product reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

/// The decoder (Llama-family) part of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the RoPE frequencies are scaled (absent in a format-1 manifest, which is
    /// refused for serving).
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Sliding-window attention (Mistral; Qwen2 with `use_sliding_window`): the layers
    /// that see only the latest positions. None when every layer sees the whole context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindow>,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Each head's query and key are RMS-normalised before RoPE (Qwen3's q_norm, k_norm).
    #[serde(default)]
    pub qk_norm: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// How RoPE frequencies are scaled: config.json's `rope_scaling` (transformers 4.x) or
/// `rope_parameters` (5.x). Only kinds whose frequencies we compute exactly as
/// transformers does are accepted; anything else is refused when the config is read.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    Default,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.x: wavelengths longer than the original context / `low_freq_factor` are
    /// divided by `factor`, those shorter than it / `high_freq_factor` kept, and the band
    /// between blended smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Layers whose queries attend only to the last `window` positions, their own included
/// (key j is seen from query position q when q - j < window, as in transformers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindow {
    pub window: usize,
    /// Global layer indices, ascending.
    pub layers: Vec<usize>,
}

impl std::fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RopeScaling::Default => write!(f, "none"),
            RopeScaling::Linear { factor } => write!(f, "linear, factor {factor}"),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => write!(
                f,
                "llama3, factor {factor}, low/high frequency factors \
                 {low_freq_factor}/{high_freq_factor}, original context {original_max_position_embeddings}"
            ),
        }
    }
}

impl TextConfig {
    /// The attention window of global layer `layer`, if it slides.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .as_ref()
            .filter(|w| w.layers.contains(&layer))
            .map(|w| w.window)
    }

    /// The inverse frequency of each rotated pair of a head, `head_dim / 2` of them,
    /// with the float32 operations of transformers' rope initialisers in their order,
    /// so that cos/sin tables (and so the tokens) come out identical.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let hd = self.head_dim;
        let theta = self.rope_theta as f32;
        let base = (0..hd / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32));
        match self.rope_scaling {
            RopeScaling::Default => base.collect(),
            RopeScaling::Linear { factor } => base.map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: context,
            } => {
                let factor = factor as f32;
                // Python computes these from floats in double, torch rounds them to f32.
                let low_wavelen = (context / low_freq_factor) as f32;
                let high_wavelen = (context / high_freq_factor) as f32;
                let band = (high_freq_factor - low_freq_factor) as f32;
                let two_pi = std::f64::consts::TAU as f32;
                base.map(|f| {
                    // torch's `scalar / tensor` is `tensor.reciprocal() * scalar`.
                    let wavelen = (1.0 / f) * two_pi;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        return scaled;
                    }
                    let smooth = ((1.0 / wavelen) * context as f32 - low_freq_factor as f32) / band;
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                })
                .collect()
            }
        }
    }
}

/// The Idefics3 vision tower and connector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub scale_factor: usize,
    pub image_token_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// `model_type` as written in config.json.
    pub model_type: String,
    pub dtype: DType,
    pub text: TextConfig,
    pub vision: Option<VisionConfig>,
    pub text_prefix: String,
}
