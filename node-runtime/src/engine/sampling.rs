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
        let token = if self.cfg.temperature <= 0.0 {
            argmax(&logits)
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
            chosen
        };
        let logprob = log_softmax_at(&logits, token as usize);
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

/// Index of the largest value, the first one on ties (like torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

fn log_softmax_at(v: &[f32], i: usize) -> f32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = v.iter().map(|x| (x - max).exp()).sum();
    v[i] - max - sum.ln()
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
