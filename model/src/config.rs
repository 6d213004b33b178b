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
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
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
