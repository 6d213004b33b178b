//! What each role learns of a chat, by mode: the one statement that `unfedctl plan`, `chat
//! --json`, the dashboard and the README all print, so they cannot drift apart.

use serde::Serialize;

/// How the MPC pair takes part in a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mpc {
    /// No pair: shard 0 receives the prompt's token ids.
    #[default]
    None,
    /// The pair runs layers [0, k) and hands its shares to the node holding layer k
    /// (`k` when known).
    HandOff { layer: Option<usize> },
    /// full_output_2pc: the pair runs every layer and the head; the client samples.
    FullOutput,
}

/// A chat's privacy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Mode {
    pub mpc: Mpc,
    /// decode_client_sample: the last shard seals the logits to the client.
    pub client_samples: bool,
    /// The chat (or the network, for `plan`) has vision shards encoding an image.
    pub vision: bool,
}

impl Mode {
    /// The short name of the mode, as in the spec's `mpc.output`.
    pub fn name(&self) -> &'static str {
        match (self.mpc, self.client_samples) {
            (Mpc::FullOutput, _) => {
                "full_output_2pc (private: no node sees the prompt or the output)"
            }
            (Mpc::HandOff { .. }, true) => "MPC pair, decode_client_sample",
            (Mpc::HandOff { .. }, false) => "MPC pair",
            (Mpc::None, true) => "no MPC pair, decode_client_sample",
            (Mpc::None, false) => "no MPC pair",
        }
    }

    /// One line per role: what it sees of a chat in this mode ("sees:" lines).
    pub fn sees(&self) -> Vec<String> {
        let mut lines =
            vec!["every node: the sequence length, the step count and timing".to_string()];
        let pair = "mpc-a/mpc-b: nothing else (A receives one random seed per step, B only uniformly masked shares)";
        let last = if self.client_samples {
            "the last compute shard: the logits of every step, sealed to the client, which samples with its own seed and repetition penalty (the logits show the likely next tokens: their argmax is the greedy token)"
        } else {
            "the last compute shard: every generated token (it samples)"
        };
        match self.mpc {
            Mpc::None => {
                lines.push("compute shard 0: the prompt's token ids (no MPC pair)".into());
                lines.push(
                    "each compute shard: its input activations, from which it can recover the prompt".into(),
                );
                lines.push(last.into());
            }
            Mpc::HandOff { layer } => {
                let k = layer.map_or("k".to_string(), |k| k.to_string());
                lines.push(pair.into());
                lines.push(format!(
                    "the compute shard holding layer {k}: the layer-{k} activations, from which it can recover the prompt (public weights, causal attention), and every activation after them"
                ));
                lines.push(last.into());
            }
            Mpc::FullOutput => {
                lines.push(pair.into());
                lines.push(
                    "compute nodes: nothing (full_output_2pc hides the prompt and the output from every node; only the client sees the logits)".into(),
                );
            }
        }
        if self.vision {
            lines.push(
                "vision shards: the image of an image prompt (they encode it in plaintext)".into(),
            );
        }
        lines
    }
}

/// The modes the README documents, in its order.
pub fn documented_modes() -> Vec<(&'static str, Mode)> {
    let mode = |mpc, client_samples| Mode {
        mpc,
        client_samples,
        vision: false,
    };
    vec![
        ("pairs = 0", mode(Mpc::None, false)),
        (
            "output = \"off\" (hand-off at layer k)",
            mode(Mpc::HandOff { layer: None }, false),
        ),
        (
            "output = \"decode_client_sample\"",
            mode(Mpc::HandOff { layer: None }, true),
        ),
        (
            "output = \"full_output_2pc\" (the private mode)",
            mode(Mpc::FullOutput, false),
        ),
    ]
}

/// The README's block of "sees:" lines, as this module states them.
pub fn readme_block() -> String {
    let mut out = String::new();
    for (title, mode) in documented_modes() {
        out.push_str(&format!("- `{title}`:\n"));
        for line in mode.sees() {
            out.push_str(&format!("  - {line}\n"));
        }
    }
    out.push_str(&format!(
        "- with vision shards, also: {}\n",
        Mode {
            vision: true,
            ..Default::default()
        }
        .sees()
        .last()
        .expect("the vision line")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_off_says_the_prompt_is_recoverable_and_full_output_hides_it() {
        let handoff = Mode {
            mpc: Mpc::HandOff { layer: Some(2) },
            ..Default::default()
        }
        .sees();
        assert!(
            handoff
                .iter()
                .any(|l| l.contains("layer 2") && l.contains("recover the prompt"))
        );
        let full = Mode {
            mpc: Mpc::FullOutput,
            ..Default::default()
        };
        assert!(
            full.sees()
                .iter()
                .any(|l| l.contains("hides the prompt and the output from every node"))
        );
        assert!(!full.sees().iter().any(|l| l.contains("recover the prompt")));
        assert!(full.name().contains("private"));
    }

    /// The README states what each mode protects exactly as this module does.
    #[test]
    fn the_readme_states_the_same() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let block = readme_block();
        assert!(
            readme.contains(&block),
            "README.md's privacy block is out of date; paste this under \"What each mode protects\":\n{block}"
        );
    }
}
