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
        // Only the k-th largest is needed: a selection, not a sort of the vocabulary.
        let mut scratch = logits.to_vec();
        let kth = *scratch
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a))
            .1;
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
        let mut keep = vec![false; logits.len()];
        for i in nucleus(&probs, p) {
            keep[i] = true;
        }
        for (l, keep) in logits.iter_mut().zip(keep) {
            if !keep {
                *l = f32::NEG_INFINITY;
            }
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
    (first_index_of(v, max).unwrap_or(0) as u32, max)
}

/// The most probable tokens whose probabilities first sum to at least `p`, most
/// probable first (ties: the lower id first), exactly as sorting the whole vocabulary
/// would give them (NaNs aside: they are never kept before a number); all of them when
/// rounding keeps the sum below `p`. Sorting ~150k
/// tokens cost ~12 ms a token, and the nucleus is usually a few of them, so only the
/// tokens at or above a threshold are sorted. They always open the full order, so
/// their running sum is the full sort's; the threshold drops until it reaches `p`.
fn nucleus(probs: &[f32], p: f32) -> Vec<usize> {
    let mut floor = max_of(probs);
    loop {
        floor *= NUCLEUS_STEP;
        // Cheap vectorised test first: below `p` the gather and sort are not worth it.
        if floor > 0.0 && mass_at_least(probs, floor) < p {
            continue;
        }
        let mut top: Vec<u64> = (0..probs.len())
            .filter(|&i| floor <= 0.0 || probs[i] >= floor)
            .map(|i| order_key(probs[i], i))
            .collect();
        // Plain integers sort several times faster than by a comparison of floats.
        top.sort_unstable();
        let mut top: Vec<usize> = top.into_iter().map(|k| k as u32 as usize).collect();
        let mut acc = 0f32;
        if let Some(k) = top.iter().position(|&i| {
            acc += probs[i];
            acc >= p
        }) {
            top.truncate(k + 1);
            return top;
        }
        if top.len() == probs.len() {
            return top;
        }
    }
}

/// A key whose ascending order is descending `prob` (as `f32::total_cmp` orders it),
/// then ascending `id`.
fn order_key(prob: f32, id: usize) -> u64 {
    let bits = prob.to_bits();
    // total_cmp's order as unsigned integers: negatives reversed below the positives.
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    };
    (u64::from(!ascending) << 32) | id as u64
}

/// How far [`nucleus`]'s threshold drops at a time (it reaches 0 by underflow).
const NUCLEUS_STEP: f32 = 1.0 / 16.0;

/// Probabilities of `v`; -inf (a filtered token) gets exactly 0.
fn softmax(v: &[f32]) -> Vec<f32> {
    let max = max_of(v);
    let mut e = vec![0f32; v.len()];
    exps(v, max, &mut e);
    let sum = lane_sum(&e);
    for x in e.iter_mut() {
        *x /= sum;
    }
    e
}

/// The sum of `v` in [`LANES`] lanes, added in a fixed order.
fn lane_sum(v: &[f32]) -> f32 {
    let mut sums = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    for &x in chunks.remainder() {
        sums[0] += x;
    }
    for c in chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += x;
        }
    }
    sums.iter().sum()
}

/// Lanes of the vocabulary-wide reductions: independent, so they vectorise, and summed
/// in a fixed order, so every machine gets the same bits.
const LANES: usize = 8;

/// Defines `$name` as `$body` compiled for AVX2 when the CPU has it, else as compiled for
/// the portable baseline (SSE2). A step's vocabulary is up to ~150k logits, and these
/// passes over it lie on the path every session's next step waits for: AVX2 runs them in
/// half the instructions. The source is the same and Rust never fuses a multiply and an
/// add, so both give the same bits (a test compares them).
macro_rules! with_avx2 {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty = $body:ident) => {
        $(#[$m])*
        fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn on_avx2($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                // SAFETY: the CPU has AVX2, checked just above.
                return unsafe { on_avx2($($a),*) };
            }
            $body($($a),*)
        }
    };
}

with_avx2!(
    /// The largest non-NaN value (-inf if none).
    fn max_of(v: &[f32]) -> f32 = max_of_body
);
with_avx2!(
    /// Where `target` first occurs.
    fn first_index_of(v: &[f32], target: f32) -> Option<usize> = first_index_body
);
with_avx2!(
    /// `sum(e^(x - max))` over `v`, in [`LANES`] lanes summed in order.
    fn exp_sum(v: &[f32], max: f32) -> f32 = exp_sum_body
);
with_avx2!(
    /// The sum of the values of `v` at or above `floor`, in [`LANES`] lanes.
    fn mass_at_least(v: &[f32], floor: f32) -> f32 = mass_at_least_body
);
with_avx2!(
    /// `out[i] = e^(v[i] - max)`, and exactly 0 where `v[i]` is -inf.
    fn exps(v: &[f32], max: f32, out: &mut [f32]) -> () = exps_body
);

#[inline(always)]
fn mass_at_least_body(v: &[f32], floor: f32) -> f32 {
    let mut sums = [0f32; LANES];
    for c in v.chunks(LANES) {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += if x >= floor { x } else { 0.0 };
        }
    }
    sums.iter().sum()
}

#[inline(always)]
fn exps_body(v: &[f32], max: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        let e = exp_nonpositive(x - max);
        *o = if x == f32::NEG_INFINITY { 0.0 } else { e };
    }
}

/// Whole blocks are tested at once (that vectorises), and only the block holding
/// `target` is searched element by element.
#[inline(always)]
fn first_index_body(v: &[f32], target: f32) -> Option<usize> {
    const BLOCK: usize = 64;
    let hit = v
        .chunks(BLOCK)
        .position(|c| c.iter().fold(false, |hit, x| hit | (*x == target)))?;
    v[hit * BLOCK..]
        .iter()
        .position(|x| *x == target)
        .map(|k| hit * BLOCK + k)
}

#[inline(always)]
fn max_of_body(v: &[f32]) -> f32 {
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
    v[i] - max - exp_sum(v, max).ln()
}

#[inline(always)]
fn exp_sum_body(v: &[f32], max: f32) -> f32 {
    // Each block's exponentials first, then their lane sums: two simple loops, which
    // vectorise, where one fused loop did not. Every lane adds the same terms in the
    // same order as a plain lane-by-lane loop.
    const BLOCK: usize = 64 * LANES;
    let mut sums = [0f32; LANES];
    let whole = v.len() - v.len() % LANES;
    for &x in &v[whole..] {
        sums[0] += exp_nonpositive(x - max);
    }
    let mut e = [0f32; BLOCK];
    for block in v[..whole].chunks(BLOCK) {
        let e = &mut e[..block.len()];
        for (o, &x) in e.iter_mut().zip(block) {
            *o = exp_nonpositive(x - max);
        }
        for c in e.chunks_exact(LANES) {
            for (s, &x) in sums.iter_mut().zip(c) {
                *s += x;
            }
        }
    }
    sums.iter().sum()
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

    /// A vocabulary-sized row with ties, NaNs, -inf (filtered tokens), values far below
    /// the max and a tail past the last whole lane.
    fn awkward_row(len: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..len as u64)
            .map(|i| ((i * 2_654_435_761 % 4093) as f32 - 2046.0) / 97.0)
            .collect();
        for i in (3..len).step_by(1009) {
            v[i] = f32::NEG_INFINITY;
        }
        for i in (11..len).step_by(4001) {
            v[i] = f32::NAN;
        }
        for i in (17..len).step_by(503) {
            v[i] = -150.0;
        }
        v
    }

    /// The AVX2 forms of the vocabulary-wide passes give the portable build's bits.
    #[test]
    fn wide_passes_match_the_portable_ones_bit_for_bit() {
        for len in [0, 1, 7, 8, 9, 513, 4096 + 3, 151_936, 151_939] {
            let v = awkward_row(len);
            assert_eq!(
                max_of(&v).to_bits(),
                max_of_body(&v).to_bits(),
                "max, {len}"
            );
            let max = max_of_body(&v);
            for target in [max, -150.0, 12.345] {
                assert_eq!(
                    first_index_of(&v, target),
                    v.iter().position(|x| *x == target),
                    "index of {target}, {len}"
                );
            }
            let finite: Vec<f32> = v
                .iter()
                .map(|x| if x.is_nan() { 0.0 } else { *x })
                .collect();
            assert_eq!(
                exp_sum(&finite, max).to_bits(),
                exp_sum_body(&finite, max).to_bits(),
                "sum, {len}"
            );
            let (mut wide, mut portable) = (vec![0f32; len], vec![0f32; len]);
            exps(&finite, max, &mut wide);
            exps_body(&finite, max, &mut portable);
            assert!(
                wide.iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "exps, {len}"
            );
            assert!(
                finite
                    .iter()
                    .zip(&wide)
                    .all(|(x, e)| x.is_finite() || *e == 0.0),
                "a filtered token has probability 0"
            );
        }
    }

    /// Sorting keys is sorting by probability, greatest first (as `total_cmp` orders
    /// any float), then by id.
    #[test]
    fn order_keys_sort_as_the_probabilities_do() {
        let values = [
            0.5,
            0.0,
            -0.0,
            1e-40,
            1.0,
            f32::INFINITY,
            f32::NAN,
            -1.0,
            0.5,
            f32::MIN_POSITIVE,
            -f32::NAN,
            f32::NEG_INFINITY,
            0.25,
        ];
        let mut by_key: Vec<usize> = (0..values.len()).collect();
        by_key.sort_by_key(|&i| order_key(values[i], i));
        let mut by_cmp: Vec<usize> = (0..values.len()).collect();
        by_cmp.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        assert_eq!(by_key, by_cmp);
    }

    /// The top-k cut and the nucleus are what sorting the whole vocabulary gives.
    #[test]
    fn top_k_and_nucleus_match_a_full_sort() {
        // Few distinct values, so ties are everywhere.
        let logits: Vec<f32> = (0..20_000u64)
            .map(|i| (i * 2_654_435_761 % 613) as f32 / 40.0)
            .collect();
        for k in [1, 2, 50, 613, 19_999] {
            let mut sorted = logits.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let mut got = logits.clone();
            Sampler::new(cfg(1.0, k, 1.0, 0)).filter_top_k(&mut got);
            let want: Vec<f32> = logits
                .iter()
                .map(|l| {
                    if *l < sorted[k - 1] {
                        f32::NEG_INFINITY
                    } else {
                        *l
                    }
                })
                .collect();
            assert_eq!(got, want, "top-k {k}");
        }
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        for p in [1e-9, 0.1, 0.5, 0.9, 0.999, 0.999_999_9] {
            let mut acc = 0f32;
            let keep = order
                .iter()
                .position(|&i| {
                    acc += probs[i];
                    acc >= p
                })
                .map_or(order.len(), |k| k + 1);
            assert_eq!(nucleus(&probs, p), order[..keep], "top-p {p}");
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
