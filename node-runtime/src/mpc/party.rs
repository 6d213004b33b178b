//! Party A's or B's side of one forward step through the MPC layers: the public linear
//! layers applied to its shares. Every other step (norms, RoPE, attention, SiLU) is the
//! client's, so a party holds no state across steps but the position count, and party A,
//! whose shares come from the step's seed, never waits for the client within a step.

use std::time::Duration;

use anyhow::{Result, bail};

use super::mask::{MaskStream, SEED_WORDS};
use super::port::{Peer, Port, PortError};
use super::ring::drop_low_bits;
use super::weights::PartyModel;

/// A party's state of one session: the positions done.
#[derive(Default)]
pub struct PartySession {
    len: usize,
}

impl PartySession {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One party in one session.
pub struct Party<'a> {
    pub model: &'a PartyModel,
    pub is_a: bool,
}

/// Where a party's input shares come from within a step.
enum Inputs<'a> {
    /// Party A: expanded from the step's seed.
    Seeded(Box<MaskStream>),
    /// Party B: sent by the client.
    Sent(&'a Port),
}

impl Inputs<'_> {
    fn next(&mut self, kind: &str, shape: &[usize]) -> Result<Vec<u64>> {
        match self {
            Inputs::Seeded(m) => Ok(m.next(kind, shape)),
            Inputs::Sent(port) => port.recv(Peer::Client, kind, shape),
        }
    }
}

impl Party<'_> {
    /// One step of `t` rows (the client's "begin" said how many) through every layer.
    /// Returns this party's share of the output (hidden states at FRAC_BITS, or with full
    /// output the logits at 2·FRAC_BITS, or the final-normed row when the client
    /// computes the head).
    pub fn step(&self, sess: &mut PartySession, port: &Port, t: usize) -> Result<Vec<u64>> {
        let cfg = &self.model.cfg;
        let hdim = cfg.hidden_size;
        let (q_dim, inter) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        let qkv_dim = q_dim + 2 * cfg.num_key_value_heads * cfg.head_dim;
        if t == 0 || sess.len + t > cfg.max_position_embeddings {
            bail!(
                "{t} rows after {} positions do not fit the model's context of {}",
                sess.len,
                cfg.max_position_embeddings
            );
        }
        let mut inputs = if self.is_a {
            let seed = port.recv(Peer::Client, "seed", &[SEED_WORDS])?;
            Inputs::Seeded(Box::new(MaskStream::from_words(&seed)))
        } else {
            Inputs::Sent(port)
        };
        // Every output is a share of products, which the client needs at FRAC_BITS only.
        let to_client = |kind: &str, shape: &[usize], data: &[u64]| {
            port.send(Peer::Client, kind, shape, drop_low_bits(data))
        };
        let a = self.is_a;
        for layer in &self.model.layers {
            let h = inputs.next("h", &[t, hdim])?;
            to_client("qkv2f", &[t, qkv_dim], &layer.qkv.forward(&h, t, a))?;
            let attn = inputs.next("attn", &[t, q_dim])?;
            to_client("o2f", &[t, hdim], &layer.o.forward(&attn, t, a))?;
            let h2 = inputs.next("h2", &[t, hdim])?;
            to_client("gu2f", &[t, 2 * inter], &layer.gate_up.forward(&h2, t, a))?;
            let m = inputs.next("m", &[t, inter])?;
            to_client("down2f", &[t, hdim], &layer.down.forward(&m, t, a))?;
        }
        sess.len += t;
        if self.model.full_output {
            // Only the last row: the client samples from its logits.
            let hn = inputs.next("final", &[1, hdim])?;
            let Some(head) = &self.model.head else {
                // The client computes the head: the normed row is the step's output.
                return Ok(hn);
            };
            let logits = head.forward(&hn, 1, a);
            to_client("logits2f", &[1, head.out_dim], &logits)?;
            return Ok(logits);
        }
        inputs.next("out", &[t, hdim])
    }
}

/// What a party does with its share of a step's output (step, rows, share): hand it to
/// the next shard, record the step for billing.
pub type OnOutput<'a> = &'a mut dyn FnMut(u32, usize, Vec<u64>) -> Result<()>;

/// A party's thread: one step per "begin" until the client hangs up (or `steps` are done);
/// each step's output share goes to `on_output`.
pub fn serve(
    model: &PartyModel,
    port: &mut Port,
    is_a: bool,
    steps: Option<u32>,
    on_output: OnOutput,
) -> Result<()> {
    let party = Party { model, is_a };
    let mut sess = PartySession::default();
    let idle = Duration::from_secs(300);
    while steps.is_none_or(|n| port.step < n) {
        let t = match port.recv_within(Peer::Client, "begin", &[1], idle) {
            Ok(v) => v[0] as usize,
            Err(PortError::Gone { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let out = party.step(&mut sess, port, t)?;
        on_output(port.step, t, out)?;
        port.step += 1;
    }
    Ok(())
}
