//! How a layer stack is cut into contiguous shards.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::manifest::{ShardEntry, Stack};

/// Split `layers` into `shards` contiguous ranges as evenly as possible: the first
/// `layers % shards` ranges get one extra layer. Never changes the shard count; the caller
/// must reject `shards == 0` or `shards > layers` (returns None then).
pub fn layer_ranges(layers: usize, shards: usize) -> Option<Vec<Range<usize>>> {
    if shards == 0 || shards > layers {
        return None;
    }
    let (base, extra) = (layers / shards, layers % shards);
    let mut start = 0;
    Some(
        (0..shards)
            .map(|i| {
                let len = base + usize::from(i < extra);
                let range = start..start + len;
                start += len;
                range
            })
            .collect(),
    )
}

/// Tensor-name prefix of the Idefics3 vision tower.
pub const VISION_PREFIX: &str = "model.vision_model.";
/// The Idefics3 connector (pixel shuffle + this projection), kept in the last vision shard.
pub const CONNECTOR_WEIGHT: &str = "model.connector.modality_projection.proj.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// A tensor a shard must hold, with the shape the config implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
}

fn exp(name: String, shape: &[usize]) -> Expected {
    Expected {
        name,
        shape: shape.to_vec(),
    }
}

pub fn embedding_name(cfg: &ModelConfig) -> String {
    format!("{}embed_tokens.weight", cfg.text_prefix)
}

pub fn final_norm_name(cfg: &ModelConfig) -> String {
    format!("{}norm.weight", cfg.text_prefix)
}

/// `{prefix}layers.{i}.` of the decoder, or `{VISION_PREFIX}encoder.layers.{i}.`.
pub fn layer_prefix(cfg: &ModelConfig, stack: Stack, layer: usize) -> String {
    match stack {
        Stack::Text => format!("{}layers.{layer}.", cfg.text_prefix),
        Stack::Vision => format!("{VISION_PREFIX}encoder.layers.{layer}."),
    }
}

/// Every tensor the engine loads for decoder layers `layers`, plus the embedding and the
/// head/final norm when the shard holds them.
pub fn text_tensors(
    cfg: &ModelConfig,
    layers: Range<usize>,
    embedding: bool,
    head: bool,
) -> Vec<Expected> {
    let t = &cfg.text;
    let (h, q, kv, i) = (
        t.hidden_size,
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
        t.intermediate_size,
    );
    let mut out = Vec::new();
    if embedding {
        out.push(exp(embedding_name(cfg), &[t.vocab_size, h]));
    }
    for layer in layers {
        let p = layer_prefix(cfg, Stack::Text, layer);
        out.push(exp(format!("{p}input_layernorm.weight"), &[h]));
        out.push(exp(format!("{p}self_attn.q_proj.weight"), &[q, h]));
        out.push(exp(format!("{p}self_attn.k_proj.weight"), &[kv, h]));
        out.push(exp(format!("{p}self_attn.v_proj.weight"), &[kv, h]));
        if t.attention_bias {
            out.push(exp(format!("{p}self_attn.q_proj.bias"), &[q]));
            out.push(exp(format!("{p}self_attn.k_proj.bias"), &[kv]));
            out.push(exp(format!("{p}self_attn.v_proj.bias"), &[kv]));
        }
        if t.qk_norm {
            out.push(exp(format!("{p}self_attn.q_norm.weight"), &[t.head_dim]));
            out.push(exp(format!("{p}self_attn.k_norm.weight"), &[t.head_dim]));
        }
        out.push(exp(format!("{p}self_attn.o_proj.weight"), &[h, q]));
        out.push(exp(format!("{p}post_attention_layernorm.weight"), &[h]));
        out.push(exp(format!("{p}mlp.gate_proj.weight"), &[i, h]));
        out.push(exp(format!("{p}mlp.up_proj.weight"), &[i, h]));
        out.push(exp(format!("{p}mlp.down_proj.weight"), &[h, i]));
    }
    if head {
        out.push(exp(final_norm_name(cfg), &[h]));
        out.push(exp(LM_HEAD.to_string(), &[t.vocab_size, h]));
    }
    out
}

/// Tensors of the decoder's layers that no shard loads: the parts of a variant the
/// engine does not run (an o_proj or MLP bias, per-head q/k norms, extra norms). Run
/// without them, the model's outputs would differ from transformers'.
pub fn unused_layer_tensors<'a>(
    cfg: &ModelConfig,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let layers = format!("{}layers.", cfg.text_prefix);
    let loaded: std::collections::HashSet<String> =
        text_tensors(cfg, 0..cfg.text.num_hidden_layers, false, false)
            .into_iter()
            .map(|e| e.name)
            .collect();
    names
        .into_iter()
        // Old checkpoints saved RoPE's frequencies: the engine computes its own.
        .filter(|n| n.starts_with(&layers) && !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !loaded.contains(*n))
        .map(str::to_string)
        .collect()
}

/// Every tensor of the Idefics3 vision encoder layers `layers`, plus the patch/position
/// embeddings (first shard) and post-layernorm + connector (last shard).
pub fn vision_tensors(
    cfg: &ModelConfig,
    layers: Range<usize>,
    embedding: bool,
    head: bool,
) -> Vec<Expected> {
    let Some(v) = &cfg.vision else {
        return Vec::new();
    };
    let (h, i) = (v.hidden_size, v.intermediate_size);
    let e = format!("{VISION_PREFIX}embeddings.");
    let mut out = Vec::new();
    if embedding {
        let patches = (v.image_size / v.patch_size.max(1)).pow(2);
        out.push(exp(
            format!("{e}patch_embedding.weight"),
            &[h, v.num_channels, v.patch_size, v.patch_size],
        ));
        out.push(exp(format!("{e}patch_embedding.bias"), &[h]));
        out.push(exp(format!("{e}position_embedding.weight"), &[patches, h]));
    }
    for layer in layers {
        let p = layer_prefix(cfg, Stack::Vision, layer);
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push(exp(format!("{p}self_attn.{proj}.weight"), &[h, h]));
            out.push(exp(format!("{p}self_attn.{proj}.bias"), &[h]));
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            out.push(exp(format!("{p}{norm}.weight"), &[h]));
            out.push(exp(format!("{p}{norm}.bias"), &[h]));
        }
        out.push(exp(format!("{p}mlp.fc1.weight"), &[i, h]));
        out.push(exp(format!("{p}mlp.fc1.bias"), &[i]));
        out.push(exp(format!("{p}mlp.fc2.weight"), &[h, i]));
        out.push(exp(format!("{p}mlp.fc2.bias"), &[h]));
    }
    if head {
        out.push(exp(format!("{VISION_PREFIX}post_layernorm.weight"), &[h]));
        out.push(exp(format!("{VISION_PREFIX}post_layernorm.bias"), &[h]));
        out.push(exp(
            CONNECTOR_WEIGHT.to_string(),
            &[cfg.text.hidden_size, h * v.scale_factor * v.scale_factor],
        ));
    }
    out
}

/// The tensors a manifest shard entry needs.
pub fn shard_tensors(cfg: &ModelConfig, shard: &ShardEntry) -> Vec<Expected> {
    let range = shard.layer_start..shard.layer_end;
    match shard.stack {
        Stack::Text => text_tensors(cfg, range, shard.has_embedding, shard.has_head),
        Stack::Vision => vision_tensors(cfg, range, shard.has_embedding, shard.has_head),
    }
}

#[cfg(test)]
mod tests {
    use super::layer_ranges;

    #[test]
    fn spreads_remainder_over_the_first_shards() {
        assert_eq!(layer_ranges(10, 3).unwrap(), vec![0..4, 4..7, 7..10]);
        assert_eq!(layer_ranges(24, 2).unwrap(), vec![0..12, 12..24]);
        assert_eq!(layer_ranges(5, 5).unwrap().len(), 5);
    }

    #[test]
    fn rejects_impossible_counts() {
        assert!(layer_ranges(4, 0).is_none());
        assert!(layer_ranges(4, 5).is_none());
    }
}
