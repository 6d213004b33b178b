//! The first text shard's side of a vision-language prompt: the `<image>` placeholder
//! rows of the prompt's embeddings are replaced, in order, by the vision stack's image
//! features (transformers' `inputs_merger`).

use anyhow::{Result, bail};
use unfed_model::ModelConfig;
use unfed_proto::Tensor;

use crate::engine::ShardModel;
use crate::wire;

/// Overwrites the rows of `image_token` in `rows` (`[ids.len(), hidden]`) with
/// `features` (`[placeholders, hidden]`, in prompt order).
pub fn replace_image_rows(
    rows: &mut [f32],
    hidden: usize,
    ids: &[u32],
    image_token: u32,
    features: &[f32],
) -> Result<()> {
    if !features.len().is_multiple_of(hidden) {
        bail!(
            "image features have {} values, not a whole number of {hidden}-wide rows",
            features.len()
        );
    }
    let placeholders = ids.iter().filter(|&&id| id == image_token).count();
    let n = features.len() / hidden;
    if placeholders != n {
        bail!(
            "the prompt has {placeholders} image placeholder tokens (id {image_token}) but the vision stack \
             returned {n} feature rows; expand the prompt with the same image processor settings that \
             produced the pixels"
        );
    }
    let mut next = features.chunks_exact(hidden);
    for (row, &id) in rows.chunks_exact_mut(hidden).zip(ids) {
        if id == image_token {
            row.copy_from_slice(next.next().expect("counted above"));
        }
    }
    Ok(())
}

/// The first shard's input rows for an image prompt: token embeddings with the image
/// features (a wire tensor `[rows, hidden]`) in place of the placeholders.
pub fn image_prompt_rows(
    model: &ShardModel,
    cfg: &ModelConfig,
    ids: &[u32],
    features: &Tensor,
) -> Result<Vec<f32>> {
    merged_rows(|ids| model.embed_tokens(ids), cfg, ids, features)
}

/// `image_prompt_rows` with any embedding (the client's, when an MPC pair runs shard 0).
pub fn merged_rows(
    embed: impl FnOnce(&[u32]) -> Result<Vec<f32>>,
    cfg: &ModelConfig,
    ids: &[u32],
    features: &Tensor,
) -> Result<Vec<f32>> {
    let Some(vision) = &cfg.vision else {
        bail!(
            "`{}` is a text-only model and takes no image; send the prompt without an image",
            cfg.model_type
        );
    };
    let (data, shape) = wire::decode(features)?;
    let h = cfg.text.hidden_size;
    if shape.len() != 2 || shape[1] != h {
        bail!("image features have shape {shape:?}; expected [rows, {h}]");
    }
    let mut rows = embed(ids)?;
    replace_image_rows(&mut rows, h, ids, vision.image_token_id, &data)?;
    Ok(rows)
}
