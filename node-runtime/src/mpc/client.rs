//! The client's side: it embeds its own tokens and computes everything that is not a
//! public linear layer — RMSNorm, RoPE, attention over its own keys and values (kept
//! here, in the clear: they are its request's), SiLU·up — on values it reconstructs
//! from the parties' shares, handing back fresh shares. A gets its shares as one seed
//! per step ([`mask`]); B gets x − r. It learns only its own request's activations; A and
//! B see nothing but a seed and uniformly masked ring elements.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::mask::MaskStream;
use super::port::{Peer, Port};
use super::ring::{FRAC_BITS, encode_at, open_dropped, sub};
use super::weights::ClientModel;

/// The client's state of one session: its randomness, the positions done, and per layer
/// the keys and values of those positions (after RoPE).
pub struct ClientSession {
    rng: ChaCha20Rng,
    pos: usize,
    kv: Vec<LayerKv>,
}

/// One layer's keys and values, [positions, kv_heads · head_dim] each.
#[derive(Default)]
struct LayerKv {
    k: Vec<f64>,
    v: Vec<f64>,
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
        Self {
            rng,
            pos: 0,
            kv: Vec::new(),
        }
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

/// Attention heads and their sizes.
#[derive(Clone, Copy)]
struct Heads {
    q: usize,
    kv: usize,
    dim: usize,
}

/// Causal attention of `t` new rows (positions `pos..pos + t`) whose q, k, v are in
/// `qkv` [t, (q + 2·kv)·dim] after RoPE: appends their keys and values to `cache` and
/// returns [t, q·dim], each query head reading its group's key-value head. With a
/// `window`, a row sees only the last `window` positions up to its own.
fn attend(
    cache: &mut LayerKv,
    qkv: &[f64],
    h: Heads,
    pos: usize,
    window: Option<usize>,
) -> Vec<f64> {
    let (q_dim, kv_dim) = (h.q * h.dim, h.kv * h.dim);
    let width = q_dim + 2 * kv_dim;
    for row in qkv.chunks(width) {
        cache.k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
        cache.v.extend_from_slice(&row[q_dim + kv_dim..]);
    }
    let scale = 1.0 / (h.dim as f64).sqrt();
    let per_group = h.q / h.kv;
    let mut out = vec![0.0; qkv.len() / width * q_dim];
    let mut probs = Vec::new();
    for (i, row) in qkv.chunks(width).enumerate() {
        // Row i is position pos + i: it sees positions up to itself, within the window.
        let visible = pos + i + 1;
        let from = window.map_or(0, |w| visible.saturating_sub(w));
        for head in 0..h.q {
            let g = head / per_group;
            let q = &row[head * h.dim..(head + 1) * h.dim];
            let key = |j: usize| &cache.k[j * kv_dim + g * h.dim..j * kv_dim + (g + 1) * h.dim];
            probs.clear();
            probs.extend(
                (from..visible)
                    .map(|j| q.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f64>() * scale),
            );
            let max = probs.iter().fold(f64::MIN, |m, v| m.max(*v));
            let mut sum = 0.0;
            for p in probs.iter_mut() {
                *p = (*p - max).exp();
                sum += *p;
            }
            let o = &mut out[i * q_dim + head * h.dim..i * q_dim + (head + 1) * h.dim];
            for (j, p) in (from..).zip(&probs) {
                let v = &cache.v[j * kv_dim + g * h.dim..j * kv_dim + (g + 1) * h.dim];
                for (acc, x) in o.iter_mut().zip(v) {
                    *acc += p / sum * x;
                }
            }
        }
    }
    out
}

pub struct Client<'a> {
    pub model: &'a ClientModel,
}

impl Client<'_> {
    /// Shares `x` as `kind`: A's share is the next mask of its seed's stream, B gets
    /// the rest.
    fn reshare(
        &self,
        port: &Port,
        masks: &mut MaskStream,
        kind: &str,
        shape: &[usize],
        x: &[f64],
    ) -> Result<()> {
        let enc: Vec<u64> = x.iter().map(|v| encode_at(*v, FRAC_BITS)).collect();
        port.send(Peer::B, kind, shape, sub(&enc, &masks.next(kind, shape)))
    }

    /// Both parties' shares of `kind` (products, without their dropped low bits),
    /// reconstructed.
    fn gather(&self, port: &Port, kind: &str, shape: &[usize]) -> Result<Vec<f64>> {
        let a = port.recv(Peer::A, kind, shape)?;
        let b = port.recv(Peer::B, kind, shape)?;
        Ok(a.iter()
            .zip(&b)
            .map(|(x, y)| open_dropped(*x, *y))
            .collect())
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
        let (seed, mut masks) = MaskStream::draw(&mut sess.rng);
        port.send(Peer::A, "begin", &[1], vec![t as u64])?;
        port.send(Peer::A, "seed", &[seed.len()], seed)?;
        port.send(Peer::B, "begin", &[1], vec![t as u64])?;
        let masks = &mut masks;
        let heads = Heads {
            q: nh,
            kv: nkv,
            dim: hd,
        };
        sess.kv
            .resize_with(self.model.norms.len(), LayerKv::default);
        let mut x: Vec<f64> = input.iter().map(|v| *v as f64).collect();
        for (layer, ((norm1, norm2), kv)) in self.model.norms.iter().zip(&mut sess.kv).enumerate() {
            self.reshare(port, masks, "h", &[t, hdim], &rms_norm(&x, norm1, eps))?;
            let mut qkv = self.gather(port, "qkv2f", &[t, qkv_dim])?;
            if let Some((qn, kn)) = self.model.qk_norms.get(layer) {
                // Each head's query and key, RMS-normalised in place before RoPE.
                for row in qkv.chunks_mut(qkv_dim) {
                    let (q, rest) = row.split_at_mut(q_dim);
                    q.copy_from_slice(&rms_norm(q, qn, eps));
                    let k = &mut rest[..kv_dim];
                    k.copy_from_slice(&rms_norm(k, kn, eps));
                }
            }
            rope(&mut qkv, qkv_dim, 0, nh, &self.model.inv_freq, sess.pos);
            rope(
                &mut qkv,
                qkv_dim,
                q_dim,
                nkv,
                &self.model.inv_freq,
                sess.pos,
            );
            let attn = attend(kv, &qkv, heads, sess.pos, cfg.attention_window(layer));
            self.reshare(port, masks, "attn", &[t, q_dim], &attn)?;
            let o = self.gather(port, "o2f", &[t, hdim])?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            self.reshare(port, masks, "h2", &[t, hdim], &rms_norm(&x, norm2, eps))?;
            let gu = self.gather(port, "gu2f", &[t, 2 * inter])?;
            let m: Vec<f64> = gu
                .chunks(2 * inter)
                .flat_map(|r| (0..inter).map(move |j| silu(r[j]) * r[inter + j]))
                .collect();
            self.reshare(port, masks, "m", &[t, inter], &m)?;
            let d = self.gather(port, "down2f", &[t, hdim])?;
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
        sess.pos = s;
        if let Some(norm) = &self.model.final_norm {
            let hn = rms_norm(&x[(t - 1) * hdim..], norm, eps);
            self.reshare(port, masks, "final", &[1, hdim], &hn)?;
            if let Some(logits) = self.model.logits(&hn) {
                return Ok(ClientOutput::Logits(logits));
            }
            let logits = self.gather(port, "logits2f", &[1, cfg.vocab_size])?;
            return Ok(ClientOutput::Logits(
                logits.iter().map(|v| *v as f32).collect(),
            ));
        }
        self.reshare(port, masks, "out", &[t, hdim], &x)?;
        Ok(ClientOutput::Hidden(x.iter().map(|v| *v as f32).collect()))
    }
}
