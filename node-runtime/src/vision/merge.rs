//! The first text shard's side of a vision-language prompt: token embeddings with the
//! `<image>` placeholder rows replaced, in order, by the vision stack's image features
//! (transformers' `inputs_merger`).

use anyhow::{Result, bail};
use unfed_model::TextConfig;

use crate::engine::WeightFiles;
use crate::engine::linear::WeightData;

/// The decoder's token embedding table, for shards that build their own input rows.
pub struct TokenEmbedder {
    table: WeightData,
    hidden: usize,
    vocab: usize,
}

impl TokenEmbedder {
    pub fn load(cfg: &TextConfig, text_prefix: &str, files: &WeightFiles) -> Result<Self> {
        let table = files.matrix(
            &format!("{text_prefix}embed_tokens.weight"),
            cfg.vocab_size,
            cfg.hidden_size,
        )?;
        Ok(Self {
            table,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// `[ids.len(), hidden]` embeddings.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut x = vec![0f32; ids.len() * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if id as usize >= self.vocab {
                bail!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.vocab
                );
            }
            self.table.row_into(id as usize, h, row);
        }
        Ok(x)
    }

    /// Embeds `ids` and overwrites the rows of `image_token` with `features`
    /// (`[rows, hidden]`, one row per placeholder, in prompt order).
    pub fn embed_with_image(
        &self,
        ids: &[u32],
        image_token: u32,
        features: &[f32],
    ) -> Result<Vec<f32>> {
        let h = self.hidden;
        if !features.len().is_multiple_of(h) {
            bail!(
                "image features have {} values, not a whole number of {h}-wide rows",
                features.len()
            );
        }
        let placeholders = ids.iter().filter(|&&id| id == image_token).count();
        let rows = features.len() / h;
        if placeholders != rows {
            bail!(
                "the prompt has {placeholders} image placeholder tokens (id {image_token}) but the vision stack \
                 returned {rows} feature rows; expand the prompt with the same image processor settings that \
                 produced the pixels"
            );
        }
        let mut x = self.embed(ids)?;
        let mut next = features.chunks_exact(h);
        for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
            if id == image_token {
                row.copy_from_slice(next.next().expect("counted above"));
            }
        }
        Ok(x)
    }
}
