//! Cheating modes for tests and demos: what a dishonest node does to its output or its
//! attestation. Only allowed against a local Anvil chain (see `cli::run_compute`).

use crate::engine::{ShardModel, ShardOutput};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Cheat {
    /// Returns its input (or the bare embedding) instead of running its layers.
    SkipLayers,
    /// Adds noise to the activations it sends.
    Perturb,
    /// Last shard: returns a different token than it sampled.
    WrongToken,
    /// Signs its attestations with a key that is not its registered one.
    ForgeAttestation,
}

impl Cheat {
    /// Rewrites an honest output. `input_rows` is the hidden input (hidden-state shards)
    /// and `tokens` the token ids (first shard).
    pub fn corrupt(
        self,
        model: &ShardModel,
        out: ShardOutput,
        input_rows: Option<&[f32]>,
        tokens: Option<&[u32]>,
    ) -> ShardOutput {
        match (self, out) {
            (Cheat::SkipLayers, ShardOutput::Hidden { data, seq }) => {
                let skipped = match (input_rows, tokens) {
                    (Some(rows), _) => Some(rows.to_vec()),
                    (None, Some(ids)) => model.embed_tokens(ids).ok(),
                    _ => None,
                };
                ShardOutput::Hidden {
                    data: skipped.filter(|s| s.len() == data.len()).unwrap_or(data),
                    seq,
                }
            }
            (Cheat::Perturb, ShardOutput::Hidden { mut data, seq }) => {
                let rms =
                    (data.iter().map(|v| v * v).sum::<f32>() / data.len().max(1) as f32).sqrt();
                for v in data.iter_mut().step_by(7) {
                    *v += 0.25 * rms;
                }
                ShardOutput::Hidden { data, seq }
            }
            (Cheat::WrongToken | Cheat::Perturb, ShardOutput::Logits(mut v)) => {
                // [token, logprob] after sampling.
                let vocab = model.config().vocab_size as f32;
                v[0] = (v[0] + 1.0) % vocab;
                ShardOutput::Logits(v)
            }
            (_, out) => out,
        }
    }
}
