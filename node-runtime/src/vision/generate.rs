//! Image + text generation in one process over a whole Idefics3 checkpoint: the
//! reference path that tests compare against transformers and the network against.

use std::path::Path;

use anyhow::{Context, Result, bail};
use unfed_model::ModelConfig;

use super::merge::replace_image_rows;
use super::tower::{PixelBatch, VisionInput, VisionModel, VisionOutput, VisionSpec};
use crate::engine::sampling::{Sampler, SamplingConfig};
use crate::engine::{ShardInput, ShardModel, ShardOutput, ShardSpec, WeightFiles};

/// The vision tower, connector and decoder of one checkpoint.
pub struct VisionLanguageModel {
    config: ModelConfig,
    vision: VisionModel,
    /// The whole decoder: embedding, every layer, the head.
    text: ShardModel,
}

impl VisionLanguageModel {
    /// Loads an unsplit HuggingFace Idefics3 checkpoint directory.
    pub fn load_checkpoint(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let Some(vcfg) = &config.vision else {
            bail!(
                "{} is a text-only model ({}); images need a vision-language model such as SmolVLM",
                dir.display(),
                config.model_type
            );
        };
        let files = WeightFiles::open_checkpoint_dir(dir)?;
        let vision = VisionModel::load(
            vcfg,
            config.text.hidden_size,
            VisionSpec::whole(vcfg),
            &files,
        )?;
        let text = ShardModel::load(
            &config.text,
            &config.text_prefix,
            ShardSpec::whole(&config.text),
            &files,
        )?;
        Ok(Self {
            config,
            vision,
            text,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vision(&self) -> &VisionModel {
        &self.vision
    }

    /// Image features `[tiles · image_seq_len, text_hidden]` of preprocessed tiles.
    pub fn image_features(&self, batch: PixelBatch) -> Result<Vec<f32>> {
        match self.vision.forward(VisionInput::Pixels(batch))? {
            VisionOutput::Features { data, .. } => Ok(data),
            VisionOutput::Hidden(_) => bail!("the whole vision stack returned hidden states"),
        }
    }

    /// Generates up to `max_new` tokens for `prompt` (already expanded with the image
    /// placeholders when `features` is given), stopping after EOS when `stop_on_eos`.
    pub fn generate(
        &self,
        prompt: &[u32],
        features: Option<&[f32]>,
        max_new: usize,
        sampling: SamplingConfig,
        stop_on_eos: bool,
    ) -> Result<Vec<u32>> {
        let image_token = self
            .config
            .vision
            .as_ref()
            .map(|v| v.image_token_id)
            .context("not a vision model")?;
        let h = self.config.text.hidden_size;
        let mut rows = self.text.embed_tokens(prompt)?;
        if let Some(f) = features {
            replace_image_rows(&mut rows, h, prompt, image_token, f)?;
        }
        let mut cache = self.text.new_cache();
        let mut sampler = Sampler::new(sampling);
        sampler.observe(prompt);
        let mut tokens = Vec::new();
        let mut input = ShardInput::Embedded {
            data: rows,
            seq: prompt.len(),
        };
        let mut last = [0u32];
        while tokens.len() < max_new {
            let ShardOutput::Logits(logits) = self.text.forward(&mut cache, input)? else {
                bail!("the decoder returned hidden states instead of logits");
            };
            let next = sampler.sample(logits).token;
            tokens.push(next);
            if stop_on_eos && self.config.text.eos_token_ids.contains(&next) {
                break;
            }
            last[0] = next;
            input = ShardInput::Tokens(&last);
        }
        Ok(tokens)
    }
}
