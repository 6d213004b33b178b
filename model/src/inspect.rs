//! `inspect`: what a checkpoint directory holds, for people (Display) and machines (JSON).

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::{Architecture, DType, ModelConfig, VisionConfig};
use crate::error::Result;

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub architecture: Architecture,
    pub model_type: String,
    pub dtype: DType,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: crate::config::RopeScaling,
    pub sliding_window: Option<crate::config::SlidingWindow>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub parameters: u64,
    pub bytes: u64,
    pub tensors: usize,
    pub weight_files: Vec<String>,
    pub has_tokenizer: bool,
    pub vision: Option<VisionConfig>,
}

pub fn inspect(dir: &Path) -> Result<Inspection> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let t = &cfg.text;
    Ok(Inspection {
        architecture: cfg.architecture,
        model_type: cfg.model_type.clone(),
        dtype: cfg.dtype,
        num_layers: t.num_hidden_layers,
        hidden_size: t.hidden_size,
        intermediate_size: t.intermediate_size,
        num_attention_heads: t.num_attention_heads,
        num_key_value_heads: t.num_key_value_heads,
        head_dim: t.head_dim,
        vocab_size: t.vocab_size,
        max_position_embeddings: t.max_position_embeddings,
        rope_theta: t.rope_theta,
        rope_scaling: t.rope_scaling.clone(),
        sliding_window: t.sliding_window.clone(),
        tie_word_embeddings: t.tie_word_embeddings,
        attention_bias: t.attention_bias,
        parameters: ckpt.parameter_count(),
        bytes: ckpt.total_bytes(),
        tensors: ckpt.tensors().count(),
        weight_files: ckpt
            .files()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect(),
        has_tokenizer: dir.join("tokenizer.json").is_file(),
        vision: cfg.vision.clone(),
    })
}

/// 1234567 -> "1.23M".
fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "architecture     {} (model_type {})",
            self.architecture, self.model_type
        )?;
        writeln!(f, "dtype            {}", self.dtype)?;
        writeln!(f, "layers           {}", self.num_layers)?;
        writeln!(f, "hidden size      {}", self.hidden_size)?;
        writeln!(f, "intermediate     {}", self.intermediate_size)?;
        writeln!(
            f,
            "heads            {} query, {} key/value (head dim {})",
            self.num_attention_heads, self.num_key_value_heads, self.head_dim
        )?;
        writeln!(f, "vocab            {}", self.vocab_size)?;
        writeln!(f, "max positions    {}", self.max_position_embeddings)?;
        writeln!(f, "rope theta       {}", self.rope_theta)?;
        writeln!(f, "rope scaling     {}", self.rope_scaling)?;
        match &self.sliding_window {
            Some(w) => writeln!(
                f,
                "sliding window   {} positions, layers {:?}",
                w.window, w.layers
            )?,
            None => writeln!(f, "sliding window   none")?,
        }
        writeln!(
            f,
            "tied embeddings  {}",
            if self.tie_word_embeddings {
                "yes"
            } else {
                "no"
            }
        )?;
        writeln!(
            f,
            "parameters       {} ({} in {} tensors)",
            human(self.parameters),
            human_bytes(self.bytes),
            self.tensors
        )?;
        writeln!(f, "weight files     {}", self.weight_files.join(", "))?;
        writeln!(
            f,
            "tokenizer.json   {}",
            if self.has_tokenizer {
                "present"
            } else {
                "MISSING (split needs it)"
            }
        )?;
        match &self.vision {
            None => writeln!(f, "vision tower     none"),
            Some(v) => writeln!(
                f,
                "vision tower     {} layers, hidden {}, {} heads, image {}px, patch {}, scale factor {}",
                v.num_hidden_layers,
                v.hidden_size,
                v.num_attention_heads,
                v.image_size,
                v.patch_size,
                v.scale_factor
            ),
        }
    }
}
