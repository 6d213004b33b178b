//! Party A's or B's side of one forward step through the MPC layers: linear layers on
//! shares with the public weights, attention products with the client's Beaver triples
//! and openings with the other party, the KV cache kept in shares.

use std::time::Duration;

use anyhow::{Result, bail};

use super::beaver::{self, Batch};
use super::port::{Peer, Port, PortError};
use super::weights::PartyModel;

/// A party's KV cache of one session: per layer, per KV head, [positions, head_dim] shares.
#[derive(Default)]
pub struct PartySession {
    k: Vec<Vec<Vec<u64>>>,
    v: Vec<Vec<Vec<u64>>>,
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

/// Columns `[col, col + width)` of every row of `x` [rows, cols].
fn columns(x: &[u64], cols: usize, col: usize, width: usize) -> Vec<u64> {
    x.chunks(cols)
        .flat_map(|r| r[col..col + width].iter().copied())
        .collect()
}

/// One party in one session.
pub struct Party<'a> {
    pub model: &'a PartyModel,
    pub is_a: bool,
}

impl Party<'_> {
    fn other(&self) -> Peer {
        if self.is_a { Peer::B } else { Peer::A }
    }

    /// Multiplies shared X_h by shared Y_g for a batch, with the dealt triples of `kind`.
    fn multiply(
        &self,
        port: &Port,
        kind: &str,
        batch: &Batch,
        x: &[Vec<u64>],
        y: &[Vec<u64>],
    ) -> Result<Vec<Vec<u64>>> {
        let dealt_len = if self.is_a {
            4
        } else {
            beaver::b_message_len(batch)
        };
        let dealt = port.recv(Peer::Client, &format!("triple.{kind}"), &[dealt_len])?;
        let triples = beaver::receive(&dealt, batch, self.is_a);
        let mine = beaver::mask(batch, &triples, x, y);
        let open = format!("open.{kind}");
        let len = [mine.len()];
        port.send(self.other(), &open, &len, mine.clone())?;
        let theirs = port.recv(self.other(), &open, &len)?;
        Ok(beaver::combine(batch, &triples, &mine, &theirs, self.is_a))
    }

    /// One step of `t` rows (the client's "begin" said how many), driven by the client
    /// through every layer. Returns this party's share of the output (hidden states at
    /// FRAC_BITS, or logits at 2·FRAC_BITS when the pair runs the head).
    pub fn step(&self, sess: &mut PartySession, port: &Port, t: usize) -> Result<Vec<u64>> {
        let cfg = &self.model.cfg;
        let (hdim, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_dim, kv_dim, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let qkv_dim = q_dim + 2 * kv_dim;
        if t == 0 || sess.len + t > cfg.max_position_embeddings {
            bail!(
                "{t} rows after {} positions do not fit the model's context of {}",
                sess.len,
                cfg.max_position_embeddings
            );
        }
        sess.k
            .resize_with(self.model.layers.len(), || vec![Vec::new(); nkv]);
        sess.v
            .resize_with(self.model.layers.len(), || vec![Vec::new(); nkv]);
        let s = sess.len + t;
        let to_client = |kind: &str, shape: &[usize], data: Vec<u64>| {
            port.send(Peer::Client, kind, shape, data)
        };
        for (l, layer) in self.model.layers.iter().enumerate() {
            let h = port.recv(Peer::Client, "h", &[t, hdim])?;
            to_client("qkv2f", &[t, qkv_dim], layer.qkv.forward(&h, t, self.is_a))?;
            let qkv = port.recv(Peer::Client, "qkv", &[t, qkv_dim])?;
            let q: Vec<Vec<u64>> = (0..nh)
                .map(|i| columns(&qkv, qkv_dim, i * hd, hd))
                .collect();
            for g in 0..nkv {
                sess.k[l][g].extend(columns(&qkv, qkv_dim, q_dim + g * hd, hd));
                sess.v[l][g].extend(columns(&qkv, qkv_dim, q_dim + kv_dim + g * hd, hd));
            }
            let scores = Batch {
                heads: nh,
                groups: nkv,
                m: t,
                k: hd,
                n: s,
                transposed: true,
            };
            let z = self.multiply(port, "scores", &scores, &q, &sess.k[l])?;
            to_client("scores2f", &[nh, t, s], z.concat())?;
            let probs = port.recv(Peer::Client, "probs", &[nh, t, s])?;
            let p: Vec<Vec<u64>> = probs.chunks(t * s).map(<[u64]>::to_vec).collect();
            let pv = Batch {
                heads: nh,
                groups: nkv,
                m: t,
                k: s,
                n: hd,
                transposed: false,
            };
            let z = self.multiply(port, "pv", &pv, &p, &sess.v[l])?;
            // [heads][t, hd] → [t, heads·hd], the layout o_proj reads.
            let mut attn2f = vec![0u64; t * q_dim];
            for (i, zh) in z.iter().enumerate() {
                for r in 0..t {
                    attn2f[r * q_dim + i * hd..r * q_dim + (i + 1) * hd]
                        .copy_from_slice(&zh[r * hd..(r + 1) * hd]);
                }
            }
            to_client("attn2f", &[t, q_dim], attn2f)?;
            let attn = port.recv(Peer::Client, "attn", &[t, q_dim])?;
            to_client("o2f", &[t, hdim], layer.o.forward(&attn, t, self.is_a))?;
            let h2 = port.recv(Peer::Client, "h2", &[t, hdim])?;
            to_client(
                "gu2f",
                &[t, 2 * inter],
                layer.gate_up.forward(&h2, t, self.is_a),
            )?;
            let m = port.recv(Peer::Client, "m", &[t, inter])?;
            to_client("down2f", &[t, hdim], layer.down.forward(&m, t, self.is_a))?;
        }
        sess.len = s;
        if let Some(head) = &self.model.head {
            // Only the last row's logits: the client samples from them.
            let hn = port.recv(Peer::Client, "final", &[1, hdim])?;
            let logits = head.forward(&hn, 1, self.is_a);
            to_client("logits2f", &[1, head.out_dim], logits.clone())?;
            return Ok(logits);
        }
        port.recv(Peer::Client, "out", &[t, hdim])
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
