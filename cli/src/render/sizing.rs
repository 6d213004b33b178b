//! Memory requests from shard sizes: the weights a node maps, plus headroom for its KV
//! cache and the runtime. The best source wins: the split's manifest (exact file sizes),
//! else the checkpoint's config.json (parameter count × dtype width), else a flat default.

use crate::plan::{LaunchPlan, Step, StepKind};
use crate::spec::LoadedSpec;

/// The KV cache cap render passes to compute nodes (`--kv-cache-mb`).
pub const KV_CACHE_MB: u64 = 512;
/// Runtime, gRPC buffers, activations.
const RUNTIME_MB: u64 = 256;
/// Roles that hold no weights (registry, daemon, web).
const SMALL_MB: u64 = 256;
/// A shard whose size nothing tells.
const UNKNOWN_SHARD_MB: u64 = 2048;
/// The built-in tiny model is a few hundred KiB.
const BUILTIN_SHARD_MB: u64 = 16;

const MIB: u64 = 1 << 20;

/// A memory request and how it was reached (an annotation on the pod).
pub struct Estimate {
    pub mebibytes: u64,
    pub how: String,
}

/// Where shard sizes come from for this plan.
pub enum Sizes {
    Manifest(Box<unfed_model::Manifest>),
    Config(Box<unfed_model::ModelConfig>),
    Builtin,
    Unknown(String),
}

impl Sizes {
    pub fn of(loaded: &LoadedSpec, plan: &LaunchPlan) -> Self {
        if let Ok(m) = unfed_model::Manifest::load(&plan.shards_dir) {
            return Sizes::Manifest(Box::new(m));
        }
        let Some(path) = &loaded.spec.model.path else {
            return Sizes::Builtin;
        };
        match unfed_model::ModelConfig::from_dir(&loaded.resolve(path)) {
            Ok(c) => Sizes::Config(Box::new(c)),
            Err(_) => Sizes::Unknown(format!("model {path} not on this machine")),
        }
    }

    /// The memory request of `step`'s node.
    pub fn estimate(&self, plan: &LaunchPlan, step: &Step) -> Estimate {
        let (vision, shard) = match step.kind {
            StepKind::Compute => (false, step.shard.unwrap_or(0)),
            // The MPC parties hold shard 0's layers (as shares).
            StepKind::MpcA | StepKind::MpcB => (false, 0),
            StepKind::Vision => (true, step.shard.unwrap_or(0)),
            _ => {
                return Estimate {
                    mebibytes: SMALL_MB,
                    how: format!("{SMALL_MB}Mi: holds no weights"),
                };
            }
        };
        let (bytes, source) = match self {
            Sizes::Manifest(m) => {
                let stack = if vision {
                    unfed_model::Stack::Vision
                } else {
                    unfed_model::Stack::Text
                };
                let size = m
                    .shards
                    .iter()
                    .find(|s| s.stack == stack && s.index == shard)
                    .map(|s| s.size);
                match size {
                    Some(b) => (b, "the split's manifest.json".to_string()),
                    None => (
                        UNKNOWN_SHARD_MB * MIB,
                        "default (shard not in the manifest)".into(),
                    ),
                }
            }
            Sizes::Config(c) => (
                config_bytes(c, plan, step, vision),
                "config.json: parameters × dtype width".into(),
            ),
            Sizes::Builtin => (BUILTIN_SHARD_MB * MIB, "built-in tiny model".into()),
            Sizes::Unknown(why) => (UNKNOWN_SHARD_MB * MIB, format!("default ({why})")),
        };
        let shard_mb = bytes.div_ceil(MIB);
        let headroom = KV_CACHE_MB + RUNTIME_MB;
        Estimate {
            mebibytes: shard_mb + headroom,
            how: format!(
                "{shard_mb}Mi shard weights from {source} + {KV_CACHE_MB}Mi KV cache + {RUNTIME_MB}Mi runtime"
            ),
        }
    }
}

/// Weight bytes of a shard from the model's shape: decoder layers (attention with
/// grouped KV heads, SwiGLU MLP, two norms), the embedding on shard 0 and the LM head on
/// the last shard (counted even when tied: that shard holds its own copy).
fn config_bytes(c: &unfed_model::ModelConfig, plan: &LaunchPlan, step: &Step, vision: bool) -> u64 {
    let width = match c.dtype {
        unfed_model::config::DType::F32 => 4,
        _ => 2,
    };
    let layers = step.layers.as_ref().map_or(0, |r| r.len()) as u64;
    let params = if vision {
        let v = c.vision.as_ref();
        let (h, i) = v.map_or((0, 0), |v| {
            (v.hidden_size as u64, v.intermediate_size as u64)
        });
        layers * (4 * h * h + 2 * h * i + 4 * h)
    } else {
        let t = &c.text;
        let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
        let q = (t.num_attention_heads * t.head_dim) as u64;
        let kv = (t.num_key_value_heads * t.head_dim) as u64;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let table = t.vocab_size as u64 * h;
        let shard = step.shard.unwrap_or(0);
        let first = shard == 0 || matches!(step.kind, StepKind::MpcA | StepKind::MpcB);
        let last = step.kind == StepKind::Compute && shard + 1 == plan.text_shards();
        layers * per_layer + if first { table } else { 0 } + if last { table + h } else { 0 }
    };
    params * width
}
