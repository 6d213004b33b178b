//! Stateless re-execution of one shard over a session's inputs (a fresh KV cache): how
//! a replica or the registry recomputes another node's hop, and how outputs compare.

use anyhow::{Context, Result, bail};
use unfed_proto::{DType, ReexecuteResponse, StepInput, Tensor, reexecute_response, step_input};

use crate::engine::sampling::{Sampler, SamplingConfig};
use crate::engine::{ShardInput, ShardModel, ShardOutput};
use crate::wire;

/// What a hop sent on: a hidden state (as on the wire) or a sampled token.
#[derive(Debug, Clone, PartialEq)]
pub enum HopOutput {
    Hidden(Tensor),
    Token(u32),
}

impl HopOutput {
    pub fn digest(&self) -> Vec<u8> {
        match self {
            HopOutput::Hidden(t) => super::attest::digest(&t.data),
            HopOutput::Token(t) => super::attest::digest(&t.to_le_bytes()),
        }
    }

    pub fn into_proto(self) -> ReexecuteResponse {
        ReexecuteResponse {
            output: Some(match self {
                HopOutput::Hidden(t) => reexecute_response::Output::Hidden(t),
                HopOutput::Token(t) => reexecute_response::Output::TokenId(t),
            }),
            attestation: None,
        }
    }

    pub fn from_proto(r: ReexecuteResponse) -> Result<Self> {
        match r.output {
            Some(reexecute_response::Output::Hidden(t)) => Ok(HopOutput::Hidden(t)),
            Some(reexecute_response::Output::TokenId(t)) => Ok(HopOutput::Token(t)),
            None => bail!("re-execution returned no output"),
        }
    }
}

/// Runs `model` over steps 0..n of a session and returns the last step's output.
pub fn reexecute(
    model: &ShardModel,
    inputs: &[StepInput],
    sampling: SamplingConfig,
    dtype: DType,
) -> Result<HopOutput> {
    if inputs.is_empty() {
        bail!("no inputs to re-execute");
    }
    if let Some(why) = super::attest::not_checkable(inputs) {
        bail!("{why}");
    }
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(sampling);
    let h = model.config().hidden_size;
    let mut last = None;
    for (step, input) in inputs.iter().enumerate() {
        let out = match &input.input {
            Some(step_input::Input::Tokens(t)) => {
                model.forward(&mut cache, ShardInput::Tokens(&t.ids))
            }
            Some(step_input::Input::Hidden(t)) => {
                let (data, shape) = wire::decode(t)?;
                let seq = match shape[..] {
                    [1, seq, hh] | [seq, hh] if hh == h => seq,
                    _ => bail!("step {step}: hidden state shape {shape:?} is not [1, seq, {h}]"),
                };
                match input.from_layer {
                    Some(layer) => model.forward(
                        &mut cache,
                        ShardInput::HiddenAt {
                            data,
                            seq,
                            layer: layer as usize,
                        },
                    ),
                    None => model.forward(&mut cache, ShardInput::Hidden { data, seq }),
                }
            }
            None => bail!("step {step} carries no input"),
        }
        .with_context(|| format!("re-executing step {step}"))?;
        sampler.observe(&input.penalty_tokens);
        last = Some(match out {
            ShardOutput::Logits(logits) => HopOutput::Token(sampler.sample(logits).token),
            ShardOutput::Hidden { data, seq } => {
                HopOutput::Hidden(wire::encode(&data, &[1, seq, h], dtype))
            }
        });
    }
    Ok(last.expect("inputs is not empty"))
}

/// Relative tolerance (of the reference's RMS) for a hidden state on the wire in `dtype`.
/// The engine is deterministic (the same FMA order whatever the batch), so honest
/// replicas agree to the bit; the slack only absorbs one rounding step of the wire dtype.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::DtypeF32 => 1e-5,
        DType::DtypeF16 => 1e-3,
        DType::DtypeBf16 => 8e-3,
    }
}

/// `Ok` when `claimed` is what the shard computes (`reference`), else why not.
pub fn compare(claimed: &HopOutput, reference: &HopOutput) -> Result<(), String> {
    match (claimed, reference) {
        (HopOutput::Token(a), HopOutput::Token(b)) if a == b => Ok(()),
        (HopOutput::Token(a), HopOutput::Token(b)) => {
            Err(format!("returned token {a}, the shard computes {b}"))
        }
        (HopOutput::Hidden(a), HopOutput::Hidden(b)) => {
            let (av, ashape) = wire::decode(a).map_err(|e| format!("{e:#}"))?;
            let (bv, bshape) = wire::decode(b).map_err(|e| format!("{e:#}"))?;
            if ashape != bshape {
                return Err(format!(
                    "sent shape {ashape:?}, the shard computes {bshape:?}"
                ));
            }
            let rms = (bv.iter().map(|v| v * v).sum::<f32>() / bv.len().max(1) as f32).sqrt();
            let worst = av
                .iter()
                .zip(&bv)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let tol = tolerance(DType::try_from(b.dtype).unwrap_or(DType::DtypeF32));
            if worst.is_nan() || worst > tol * rms.max(1e-6) {
                Err(format!(
                    "hidden state differs by up to {worst:.3e} (RMS {rms:.3e}, tolerance {:.1e} × RMS)",
                    tol
                ))
            } else {
                Ok(())
            }
        }
        _ => Err("output kind differs (token vs hidden state)".into()),
    }
}
