//! Generation in one process over a shard that holds the whole model: the reference
//! path for tests and the baseline `unfedctl bench` compares the network against.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use unfed_model::ModelConfig;

use super::model::{ShardInput, ShardModel, ShardOutput, ShardSpec};
use super::sampling::{Sampler, SamplingConfig};
use super::weights::WeightFiles;

/// Loads an unsplit HuggingFace checkpoint directory as a single shard.
pub fn load_checkpoint(dir: &Path) -> Result<(ModelConfig, ShardModel)> {
    let cfg = ModelConfig::from_dir(dir)?;
    let files = WeightFiles::open_checkpoint_dir(dir)?;
    let model = ShardModel::load(
        &cfg.text,
        &cfg.text_prefix,
        ShardSpec::whole(&cfg.text),
        &files,
    )?;
    Ok((cfg, model))
}

/// Loads every text shard of a split directory into one process (the whole model),
/// the baseline `unfedctl bench` compares a network of the same shards against.
pub fn load_split(dir: &Path) -> Result<(unfed_model::Manifest, ShardModel)> {
    let manifest = unfed_model::Manifest::load_current(dir)?;
    let files: Vec<_> = manifest.text_shards().map(|s| dir.join(&s.file)).collect();
    let weights = WeightFiles::open(&files)?;
    let cfg = &manifest.config;
    let model = ShardModel::load(
        &cfg.text,
        &cfg.text_prefix,
        ShardSpec::whole(&cfg.text),
        &weights,
    )?;
    Ok((manifest, model))
}

/// Tokens and timings of one local generation.
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Prompt forward including the first token.
    pub prefill_ms: f64,
    /// Every later step.
    pub decode_ms: f64,
}

/// Generates up to `max_new` tokens, stopping after an EOS id when `stop_on_eos`. Runs
/// on a thread of the engine's pool, as a node's steps do.
pub fn generate(
    model: &ShardModel,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingConfig,
    stop_on_eos: bool,
) -> Result<Generation> {
    super::pool::on_pool(|| generate_here(model, prompt, max_new, sampling, stop_on_eos))
}

fn generate_here(
    model: &ShardModel,
    prompt: &[u32],
    max_new: usize,
    sampling: SamplingConfig,
    stop_on_eos: bool,
) -> Result<Generation> {
    if !model.spec().has_embedding || !model.spec().has_head {
        bail!("local generation needs a shard with the embedding and the head");
    }
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(sampling);
    sampler.observe(prompt);
    let mut tokens = Vec::new();
    let mut input = prompt.to_vec();
    let start = Instant::now();
    let mut prefill_ms = 0.0;
    while tokens.len() < max_new {
        let ShardOutput::Logits(logits) = model.forward(&mut cache, ShardInput::Tokens(&input))?
        else {
            bail!("the last shard returned hidden states");
        };
        let next = sampler.sample(logits).token;
        if tokens.is_empty() {
            prefill_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        tokens.push(next);
        if stop_on_eos && model.config().eos_token_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    let decode_ms = start.elapsed().as_secs_f64() * 1e3 - prefill_ms;
    Ok(Generation {
        tokens,
        prefill_ms,
        decode_ms,
    })
}
