//! Choosing the next token from the last shard's logits, with transformers' semantics:
//! repetition penalty, then temperature, top-k, top-p, then a seeded draw (or argmax).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// ≥ 1 or ≤ 0 = off.
    pub top_p: f32,
    /// 1 (or 0) = off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Tokens already sampled under `seed` (a replayed session): the generator starts
    /// after their draws.
    pub sampled_before: u32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            sampled_before: 0,
        }
    }
}

/// Per-session sampler state: the seeded generator and the tokens seen so far.
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
    seen: Vec<u32>,
}

pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        // `sample` draws once per token, and only when not greedy.
        if cfg.temperature > 0.0 {
            for _ in 0..cfg.sampled_before {
                let _: f32 = rng.random();
            }
        }
        Self {
            rng,
            cfg,
            seen: Vec::new(),
        }
    }

    fn penalty_active(&self) -> bool {
        self.cfg.repetition_penalty > 0.0 && self.cfg.repetition_penalty != 1.0
    }

    /// Records tokens of the context (prompt, or tokens fed back) for the penalty.
    pub fn observe(&mut self, tokens: &[u32]) {
        if self.penalty_active() {
            self.seen.extend_from_slice(tokens);
        }
    }

    pub fn sample(&mut self, mut logits: Vec<f32>) -> Sampled {
        if self.penalty_active() {
            let p = self.cfg.repetition_penalty;
            let mut seen = self.seen.clone();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
        // The token, and the largest logit its logprob is taken against.
        let (token, max) = if self.cfg.temperature <= 0.0 {
            argmax_and_max(&logits)
        } else {
            for l in logits.iter_mut() {
                *l /= self.cfg.temperature;
            }
            self.filter_top_k(&mut logits);
            self.filter_top_p(&mut logits);
            let probs = softmax(&logits);
            let r: f32 = self.rng.random();
            let mut acc = 0f32;
            let mut chosen = argmax(&probs);
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if *p > 0.0 && r < acc {
                    chosen = i as u32;
                    break;
                }
            }
            (chosen, max_of(&logits))
        };
        let logprob = log_softmax_at(&logits, token as usize, max);
        if self.penalty_active() {
            self.seen.push(token);
        }
        Sampled { token, logprob }
    }

    fn filter_top_k(&self, logits: &mut [f32]) {
        let k = self.cfg.top_k;
        if k == 0 || k >= logits.len() {
            return;
        }
        let mut sorted = logits.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for l in logits.iter_mut() {
            if *l < kth {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Keeps the smallest set of most likely tokens whose probability reaches top_p.
    fn filter_top_p(&self, logits: &mut [f32]) {
        let p = self.cfg.top_p;
        if p <= 0.0 || p >= 1.0 {
            return;
        }
        let probs = softmax(logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut acc = 0f32;
        let mut keep = 0;
        for &i in &order {
            acc += probs[i];
            keep += 1;
            if acc >= p {
                break;
            }
        }
        for &i in &order[keep..] {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// Index of the largest value, the first one on ties (like torch.argmax). NaNs never
/// win, except a NaN first value, which nothing beats.
pub fn argmax(v: &[f32]) -> u32 {
    argmax_and_max(v).0
}

/// [`argmax`], and the largest non-NaN value, found on the way.
fn argmax_and_max(v: &[f32]) -> (u32, f32) {
    let max = max_of(v);
    if v.first().is_none_or(|x| x.is_nan()) {
        return (0, max);
    }
    (v.iter().position(|x| *x == max).unwrap_or(0) as u32, max)
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = max_of(v);
    let e: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// Lanes of the vocabulary-wide reductions: independent, so they vectorise, and summed
/// in a fixed order, so every machine gets the same bits.
const LANES: usize = 8;

/// The largest non-NaN value (-inf if none).
fn max_of(v: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    for &x in chunks.remainder() {
        m[0] = if x > m[0] { x } else { m[0] };
    }
    for c in chunks {
        for (m, &x) in m.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    m.into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// `ln softmax(v)[i]`, given `max`, the largest of `v`. A step's vocabulary is 150k
/// logits, and libm's scalar `exp` over them cost ~0.6 ms per sampled token, on the path
/// every session's next step waits for; [`exp_nonpositive`] vectorises (within ~2 ulp,
/// and the result only reports the token's logprob: the token is the argmax).
fn log_softmax_at(v: &[f32], i: usize, max: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    for &x in chunks.remainder() {
        sums[0] += exp_nonpositive(x - max);
    }
    for c in chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += exp_nonpositive(x - max);
        }
    }
    let sum: f32 = sums.iter().sum();
    v[i] - max - sum.ln()
}

/// `e^x` for `x <= 0`, branch-free: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
/// Taylor polynomial for `e^r` (error below 2e-7), and `2^n` put in the exponent bits.
/// Below -87 it returns about 1.6e-38 instead of less: negligible in a sum holding 1.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = if x > -87.0 { x } else { -87.0 };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `t`'s low mantissa bits hold n (-126..=0): n + 127 shifted into the exponent field
    // is 2^n, with no float-to-int conversion (whose NaN and range checks do not
    // vectorise).
    p * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
            sampled_before: 0,
        }
    }

    fn draws(c: SamplingConfig, n: usize) -> Vec<u32> {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        let mut s = Sampler::new(c);
        (0..n).map(|_| s.sample(logits.clone()).token).collect()
    }

    /// The vectorised argmax keeps torch's rule (first index on ties) and the old NaN
    /// behaviour, and the logprob matches an f64 log-softmax on a vocabulary-sized row.
    #[test]
    fn argmax_and_logprob_match_a_plain_reference() {
        let mut v: Vec<f32> = (0..151_939)
            .map(|i| ((i * 7919 % 1021) as f32 - 510.0) / 37.0)
            .collect();
        let top = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let first = v.iter().position(|x| *x == top).unwrap();
        assert_eq!(argmax(&v), first as u32, "first of the tied maxima");
        v[151_937] = top + 1.0; // a maximum in the tail past the last whole lane
        assert_eq!(argmax(&v), 151_937);
        v[5] = f32::NAN;
        assert_eq!(argmax(&v), 151_937, "a NaN never wins");
        v[0] = f32::NAN;
        assert_eq!(argmax(&v), 0, "nothing beats a NaN first value");
        assert_eq!(argmax(&[]), 0);
        v[0] = -3.0;
        v[5] = -200.0; // far below the max: underflows in f32
        let max = top + 1.0;
        let sum: f64 = v.iter().map(|x| ((*x - max) as f64).exp()).sum();
        for i in [0, 5, 1000, 151_937] {
            let want = (v[i] - max) as f64 - sum.ln();
            let got = log_softmax_at(&v, i, max) as f64;
            assert!(
                // f32 sums of 150k terms: a few ulp of rounding per lane add up.
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "logprob of {i}: {got} vs {want}"
            );
        }
        for x in [0.0f32, -1e-3, -0.5, -1.0, -10.0, -50.0, -86.9] {
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 3e-7 * want, "e^{x}: {got} vs {want}");
        }
    }

    #[test]
    fn greedy_picks_argmax_and_seeded_sampling_is_deterministic() {
        let g = draws(cfg(0.0, 0, 1.0, 1), 5);
        assert!(g.iter().all(|&t| t == g[0]));
        let a = draws(cfg(1.5, 0, 1.0, 42), 40);
        assert_eq!(a, draws(cfg(1.5, 0, 1.0, 42), 40), "same seed, same tokens");
        assert_ne!(
            a,
            draws(cfg(1.5, 0, 1.0, 43), 40),
            "another seed, other tokens"
        );
        assert!(a.iter().any(|&t| t != a[0]), "temperature sampling varies");
    }

    #[test]
    fn a_sampler_resumed_after_n_tokens_continues_the_seeded_sequence() {
        let full = draws(cfg(1.5, 0, 1.0, 42), 40);
        let resumed = draws(
            SamplingConfig {
                sampled_before: 25,
                ..cfg(1.5, 0, 1.0, 42)
            },
            15,
        );
        assert_eq!(resumed, full[25..], "continues, does not restart");
        assert_ne!(resumed, full[..15], "a restart would repeat the start");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
        let mut idx: Vec<u32> = (0..50).collect();
        idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top3 = &idx[..3];
        for t in draws(cfg(5.0, 3, 1.0, 7), 200) {
            assert!(top3.contains(&t), "top-k=3 drew {t}");
        }
        // A tiny top_p keeps only the most likely token.
        assert!(draws(cfg(5.0, 0, 0.01, 7), 50).iter().all(|&t| t == idx[0]));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut logits = vec![0.0f32; 10];
        logits[3] = 2.0;
        logits[4] = 1.5;
        let mut s = Sampler::new(SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        s.observe(&[3]);
        assert_eq!(s.sample(logits).token, 4);
    }
}
