//! The client's side: it embeds its own tokens, deals the Beaver triples, and computes
//! the non-linear steps (RMSNorm, RoPE, softmax, SiLU·up) on values it reconstructs from
//! the parties' shares, handing back fresh shares. It learns only its own request's
//! activations; A and B see nothing but uniformly masked ring elements.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::beaver::{self, Batch};
use super::port::{Peer, Port};
use super::ring::{FRAC_BITS, add, decode_at, encode_at, share};
use super::weights::ClientModel;

/// The client's state of one session: its randomness and the positions done.
pub struct ClientSession {
    rng: ChaCha20Rng,
    pos: usize,
}

impl ClientSession {
    /// Fresh randomness from the OS.
    pub fn new() -> Self {
        Self::with_rng(ChaCha20Rng::from_os_rng())
    }

    /// Fixed randomness, for tests that compare what the parties receive.
    pub fn with_seed(seed: u64) -> Self {
        Self::with_rng(ChaCha20Rng::seed_from_u64(seed))
    }

    fn with_rng(rng: ChaCha20Rng) -> Self {
        Self { rng, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }
}

impl Default for ClientSession {
    fn default() -> Self {
        Self::new()
    }
}

/// What a step produced for the client.
pub enum ClientOutput {
    /// The MPC layers' output [rows, hidden] (the parties hold it in shares too).
    Hidden(Vec<f32>),
    /// The last row's logits (full-output 2PC).
    Logits(Vec<f32>),
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let h = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(h) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v * inv * *g as f64));
    }
    out
}

/// Rotate-half RoPE of `heads` heads of every row of `x` (row r at position `pos + r`).
fn rope(x: &mut [f64], width: usize, col: usize, heads: usize, inv_freq: &[f32], pos: usize) {
    let half = inv_freq.len();
    for (r, row) in x.chunks_mut(width).enumerate() {
        let p = (pos + r) as f32;
        for hd in 0..heads {
            let head = &mut row[col + hd * 2 * half..col + (hd + 1) * 2 * half];
            for i in 0..half {
                let angle = p * inv_freq[i];
                let (sin, cos) = (angle.sin() as f64, angle.cos() as f64);
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Test-only fault (feature `privacy-mutation`): party A gets the first row of every "h"
/// in the clear and B a zero row, so the privacy tests can show that they catch a leak.
#[cfg(feature = "privacy-mutation")]
fn leak_first_row(
    kind: &str,
    shape: &[usize],
    enc: &[u64],
    (mut a, mut b): (Vec<u64>, Vec<u64>),
) -> (Vec<u64>, Vec<u64>) {
    if kind == "h" {
        let w = shape.last().copied().unwrap_or(0);
        a[..w].copy_from_slice(&enc[..w]);
        b[..w].fill(0);
    }
    (a, b)
}

pub struct Client<'a> {
    pub model: &'a ClientModel,
}

impl Client<'_> {
    /// Sends fresh shares of `x` to A and B as `kind`.
    fn reshare(
        &self,
        port: &Port,
        sess: &mut ClientSession,
        kind: &str,
        shape: &[usize],
        x: &[f64],
    ) -> Result<()> {
        let enc: Vec<u64> = x.iter().map(|v| encode_at(*v, FRAC_BITS)).collect();
        let shares = share(&enc, &mut sess.rng);
        #[cfg(feature = "privacy-mutation")]
        let shares = leak_first_row(kind, shape, &enc, shares);
        let (a, b) = shares;
        port.send(Peer::A, kind, shape, a)?;
        port.send(Peer::B, kind, shape, b)
    }

    /// Both parties' shares of `kind`, reconstructed and decoded from 2·FRAC_BITS.
    fn gather(&self, port: &Port, kind: &str, shape: &[usize]) -> Result<Vec<f64>> {
        let a = port.recv(Peer::A, kind, shape)?;
        let b = port.recv(Peer::B, kind, shape)?;
        Ok(add(&a, &b)
            .iter()
            .map(|v| decode_at(*v, 2 * FRAC_BITS))
            .collect())
    }

    fn deal(&self, port: &Port, sess: &mut ClientSession, kind: &str, batch: &Batch) -> Result<()> {
        let (for_a, for_b) = beaver::deal(batch, &mut sess.rng);
        let kind = format!("triple.{kind}");
        port.send(Peer::A, &kind, &[for_a.len()], for_a)?;
        port.send(Peer::B, &kind, &[for_b.len()], for_b)
    }

    /// One step over `input` [rows, hidden] (embedded rows: the client embeds its own
    /// tokens, the embedding being public).
    pub fn step(
        &self,
        sess: &mut ClientSession,
        port: &Port,
        input: &[f32],
    ) -> Result<ClientOutput> {
        let cfg = &self.model.cfg;
        let (hdim, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_dim, kv_dim, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let qkv_dim = q_dim + 2 * kv_dim;
        let t = input.len() / hdim;
        let s = sess.pos + t;
        let eps = cfg.rms_norm_eps;
        port.send(Peer::A, "begin", &[1], vec![t as u64])?;
        port.send(Peer::B, "begin", &[1], vec![t as u64])?;
        let mut x: Vec<f64> = input.iter().map(|v| *v as f64).collect();
        let scale = 1.0 / (hd as f64).sqrt();
        for (norm1, norm2) in &self.model.norms {
            self.reshare(port, sess, "h", &[t, hdim], &rms_norm(&x, norm1, eps))?;
            let mut qkv = self.gather(port, "qkv2f", &[t, qkv_dim])?;
            rope(&mut qkv, qkv_dim, 0, nh, &self.model.inv_freq, sess.pos);
            rope(
                &mut qkv,
                qkv_dim,
                q_dim,
                nkv,
                &self.model.inv_freq,
                sess.pos,
            );
            self.reshare(port, sess, "qkv", &[t, qkv_dim], &qkv)?;
            let scores = Batch {
                heads: nh,
                groups: nkv,
                m: t,
                k: hd,
                n: s,
                transposed: true,
            };
            self.deal(port, sess, "scores", &scores)?;
            let mut att = self.gather(port, "scores2f", &[nh, t, s])?;
            for (i, row) in att.chunks_mut(s).enumerate() {
                // Row i is position pos + (i mod t): it sees positions up to itself.
                let visible = sess.pos + i % t + 1;
                let max = row[..visible]
                    .iter()
                    .fold(f64::MIN, |m, v| m.max(*v * scale));
                let mut sum = 0.0;
                for (j, v) in row.iter_mut().enumerate() {
                    *v = if j < visible {
                        (*v * scale - max).exp()
                    } else {
                        0.0
                    };
                    sum += *v;
                }
                row.iter_mut().for_each(|v| *v /= sum);
            }
            self.reshare(port, sess, "probs", &[nh, t, s], &att)?;
            let pv = Batch {
                heads: nh,
                groups: nkv,
                m: t,
                k: s,
                n: hd,
                transposed: false,
            };
            self.deal(port, sess, "pv", &pv)?;
            let attn = self.gather(port, "attn2f", &[t, q_dim])?;
            self.reshare(port, sess, "attn", &[t, q_dim], &attn)?;
            let o = self.gather(port, "o2f", &[t, hdim])?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            self.reshare(port, sess, "h2", &[t, hdim], &rms_norm(&x, norm2, eps))?;
            let gu = self.gather(port, "gu2f", &[t, 2 * inter])?;
            let m: Vec<f64> = gu
                .chunks(2 * inter)
                .flat_map(|r| (0..inter).map(move |j| silu(r[j]) * r[inter + j]))
                .collect();
            self.reshare(port, sess, "m", &[t, inter], &m)?;
            let d = self.gather(port, "down2f", &[t, hdim])?;
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        sess.pos = s;
        if let Some(norm) = &self.model.final_norm {
            let last = &x[(t - 1) * hdim..];
            self.reshare(port, sess, "final", &[1, hdim], &rms_norm(last, norm, eps))?;
            let logits = self.gather(port, "logits2f", &[1, cfg.vocab_size])?;
            return Ok(ClientOutput::Logits(
                logits.iter().map(|v| *v as f32).collect(),
            ));
        }
        self.reshare(port, sess, "out", &[t, hdim], &x)?;
        Ok(ClientOutput::Hidden(x.iter().map(|v| *v as f32).collect()))
    }
}
