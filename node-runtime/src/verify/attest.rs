//! Forward attestations: a hop's Ed25519 signature over the digests of the input it
//! received and the output it sent, bound to the session, step, model and shard.

use anyhow::{Result, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use unfed_proto::{Attestation, FraudReport, StepInput, forward_request, step_input};

/// sha256 of the bytes a hop receives or sends: the hidden-state bytes as on the wire,
/// or token ids as little-endian u32s.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

pub fn tokens_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Digest of one step's input. An input rebuilt from an MPC pair's shares is known only
/// by the parties' signed share digests: a digest of its activations would let anyone
/// holding the attestation test guesses of the prompt.
pub fn input_digest(input: &StepInput) -> Vec<u8> {
    if !input.mpc_shares.is_empty() {
        let mut bytes = b"unfed-mpc-handoff-v1".to_vec();
        for share in &input.mpc_shares {
            put(&mut bytes, &share.output_digest);
        }
        return digest(&bytes);
    }
    match &input.input {
        Some(step_input::Input::Tokens(t)) => digest(&tokens_bytes(&t.ids)),
        Some(step_input::Input::Hidden(h)) => digest(&h.data),
        None => digest(&[]),
    }
}

/// The step input a forward request carries.
pub fn step_input_of(input: &Option<forward_request::Input>, penalty: &[u32]) -> StepInput {
    StepInput {
        input: input.as_ref().map(|i| match i {
            forward_request::Input::Tokens(t) => step_input::Input::Tokens(t.clone()),
            forward_request::Input::Hidden(h) => step_input::Input::Hidden(h.clone()),
            // Replaced by the reconstructed hidden state before anything records it.
            forward_request::Input::Mpc(_) => step_input::Input::Hidden(Default::default()),
        }),
        penalty_tokens: penalty.to_vec(),
        from_layer: None,
        mpc_shares: Vec::new(),
    }
}

/// The step input of a hop fed by an MPC pair: the parties' share attestations only.
pub fn handoff_input(shares: Vec<Attestation>, layer: u32, penalty: &[u32]) -> StepInput {
    StepInput {
        input: None,
        penalty_tokens: penalty.to_vec(),
        from_layer: Some(layer),
        mpc_shares: shares,
    }
}

/// Why a session's inputs cannot be re-executed, when one of them came from MPC shares.
pub fn not_checkable(inputs: &[StepInput]) -> Option<String> {
    let step = inputs.iter().position(|i| !i.mpc_shares.is_empty())?;
    Some(format!(
        "not checkable: the input of step {step} was rebuilt from the MPC pair's shares; \
         those activations are the prompt, so no node keeps them (only the parties' signed share digests)"
    ))
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_le_bytes());
    out.extend_from_slice(field);
}

/// Length-prefixed fields under a domain tag, so no two attestations share bytes.
pub fn canonical_bytes(a: &Attestation) -> Vec<u8> {
    let mut out = b"unfed-attestation-v1".to_vec();
    put(&mut out, a.node_id.as_bytes());
    put(&mut out, a.model_id.as_bytes());
    put(&mut out, &a.shard_index.to_le_bytes());
    put(&mut out, a.session_id.as_bytes());
    put(&mut out, &a.step.to_le_bytes());
    put(&mut out, &a.input_digest);
    put(&mut out, &a.output_digest);
    let shape: Vec<u8> = a
        .output_shape
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    put(&mut out, &shape);
    put(&mut out, &a.output_dtype.to_le_bytes());
    out
}

pub fn sign(key: &SigningKey, a: &mut Attestation) {
    a.signature = key.sign(&canonical_bytes(a)).to_bytes().to_vec();
}

pub fn verify(key: &VerifyingKey, a: &Attestation) -> Result<()> {
    let sig = Signature::from_slice(&a.signature)
        .map_err(|_| anyhow::anyhow!("signature is {} bytes, not 64", a.signature.len()))?;
    if key.verify(&canonical_bytes(a), &sig).is_err() {
        bail!(
            "attestation of {} (shard {}, step {}) is not signed by its registered share key",
            a.node_id,
            a.shard_index,
            a.step
        );
    }
    Ok(())
}

/// Report bytes under a domain tag; the signature field is left out.
pub fn report_bytes(r: &FraudReport) -> Vec<u8> {
    let mut unsigned = r.clone();
    unsigned.signature.clear();
    let mut out = b"unfed-fraud-report-v1".to_vec();
    out.extend_from_slice(&prost::Message::encode_to_vec(&unsigned));
    out
}

pub fn sign_report(key: &SigningKey, r: &mut FraudReport) {
    r.signature = key.sign(&report_bytes(r)).to_bytes().to_vec();
}

pub fn verify_report(key: &VerifyingKey, r: &FraudReport) -> Result<()> {
    let sig =
        Signature::from_slice(&r.signature).map_err(|_| anyhow::anyhow!("bad signature length"))?;
    key.verify(&report_bytes(r), &sig)
        .map_err(|_| anyhow::anyhow!("report is not signed by the reporter's registered key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_field_breaks_the_signature() {
        let key = crate::shares::generate_key();
        let mut a = Attestation {
            node_id: "n".into(),
            model_id: "m".into(),
            session_id: "s".into(),
            step: 3,
            input_digest: digest(b"in"),
            output_digest: digest(b"out"),
            output_shape: vec![1, 2, 8],
            ..Default::default()
        };
        sign(&key, &mut a);
        verify(&key.verifying_key(), &a).unwrap();
        let mut b = a.clone();
        b.step = 4;
        assert!(verify(&key.verifying_key(), &b).is_err());
        let mut c = a.clone();
        c.output_digest = digest(b"other");
        assert!(verify(&key.verifying_key(), &c).is_err());
        let other = crate::shares::generate_key();
        assert!(verify(&other.verifying_key(), &a).is_err());
    }

    /// A hand-off input is bound to the parties' share digests, keeps no activations,
    /// and is reported as not checkable rather than re-executed.
    #[test]
    fn a_handoff_input_is_known_by_its_share_digests() {
        let share = |party: &str, bytes: &[u8]| Attestation {
            node_id: party.into(),
            output_digest: digest(bytes),
            ..Default::default()
        };
        let input = handoff_input(vec![share("a", b"x"), share("b", b"y")], 2, &[]);
        assert!(input.input.is_none());
        let swapped = handoff_input(vec![share("a", b"x"), share("b", b"z")], 2, &[]);
        assert_ne!(input_digest(&input), input_digest(&swapped));
        assert_ne!(input_digest(&input), input_digest(&StepInput::default()));
        let plain = step_input_of(
            &Some(forward_request::Input::Tokens(unfed_proto::TokenIds {
                ids: vec![1],
            })),
            &[],
        );
        assert_eq!(not_checkable(std::slice::from_ref(&plain)), None);
        let why = not_checkable(&[plain, input]).unwrap();
        assert!(why.contains("step 1") && why.contains("MPC pair"), "{why}");
    }
}
