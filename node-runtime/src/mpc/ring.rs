//! Fixed point in the ring Z_2^64 and two-party additive sharing.
//!
//! A real value x is the ring element round(x · 2^FRAC_BITS) (two's complement). A product
//! of two such values carries 2·FRAC_BITS fractional bits; the parties never truncate
//! locally (that fails with probability ~|x|/2^64 per element) — every product goes to the
//! client, which reconstructs it exactly and re-shares it at FRAC_BITS.
//!
//! Range: a value at 2·FRAC_BITS must stay below 2^63 in magnitude, i.e. |x| < 2^23 (8.4 M)
//! for products; a value at FRAC_BITS below 2^43. Resolution: 2^-20 ≈ 9.5e-7.

use rand::RngCore;
use rayon::prelude::*;

/// Fractional bits of an activation or weight.
pub const FRAC_BITS: u32 = 20;
const ONE: f64 = (1u64 << FRAC_BITS) as f64;

/// Encodes at `scale` fractional bits (FRAC_BITS or 2·FRAC_BITS).
pub fn encode_at(x: f64, scale: u32) -> u64 {
    (x * (1u64 << scale) as f64).round() as i64 as u64
}

pub fn encode(x: f32) -> u64 {
    (x as f64 * ONE).round() as i64 as u64
}

/// Decodes a ring element carrying `scale` fractional bits.
pub fn decode_at(v: u64, scale: u32) -> f64 {
    v as i64 as f64 / (1u64 << scale) as f64
}

/// Splits `values` (already encoded) into two additive shares: the first is uniform.
pub fn share(values: &[u64], rng: &mut impl RngCore) -> (Vec<u64>, Vec<u64>) {
    let mask: Vec<u64> = (0..values.len()).map(|_| rng.next_u64()).collect();
    let other = values
        .iter()
        .zip(&mask)
        .map(|(v, m)| v.wrapping_sub(*m))
        .collect();
    (mask, other)
}

pub fn add(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x.wrapping_add(*y)).collect()
}

pub fn sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x.wrapping_sub(*y)).collect()
}

pub fn add_assign(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

/// An element of a matrix multiplied into ring shares: a ring element, or a public
/// weight kept as i32 and sign-extended (half the memory of a ring element).
pub trait RingWeight: Copy + Sync {
    fn ring(self) -> u64;
}

impl RingWeight for u64 {
    fn ring(self) -> u64 {
        self
    }
}

impl RingWeight for i32 {
    fn ring(self) -> u64 {
        self as i64 as u64
    }
}

/// A public weight at FRAC_BITS in an i32: `None` outside ±2^11 (no real checkpoint's
/// weights come near; the party refuses such a model rather than wrap).
pub fn encode_weight(w: f32) -> Option<i32> {
    let v = (w as f64 * ONE).round();
    (v.abs() <= i32::MAX as f64).then_some(v as i32)
}

/// `x` [m, k] times `y`ᵀ where `y` is [n, k]: [m, n].
pub fn mm_nt<W: RingWeight>(x: &[u64], y: &[W], m: usize, k: usize, n: usize) -> Vec<u64> {
    debug_assert_eq!((x.len(), y.len()), (m * k, n * k));
    let mut out = vec![0u64; m * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let xi = &x[i * k..(i + 1) * k];
            for (j, o) in row.iter_mut().enumerate() {
                let yj = &y[j * k..(j + 1) * k];
                *o = xi.iter().zip(yj).fold(0u64, |acc, (a, b)| {
                    acc.wrapping_add(a.wrapping_mul(b.ring()))
                });
            }
        });
    out
}

/// `x` [m, k] times `y` [k, n]: [m, n].
pub fn mm_nn(x: &[u64], y: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    debug_assert_eq!((x.len(), y.len()), (m * k, k * n));
    let mut out = vec![0u64; m * n];
    out.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            for kk in 0..k {
                let a = x[i * k + kk];
                let yr = &y[kk * n..(kk + 1) * n];
                for (o, b) in row.iter_mut().zip(yr) {
                    *o = o.wrapping_add(a.wrapping_mul(*b));
                }
            }
        });
    out
}

/// A public weight matrix [out, in] in fixed point, with an optional bias at 2·FRAC_BITS
/// (added by party A only, so it is counted once).
pub struct FixedLinear {
    pub weight: Vec<i32>,
    pub out_dim: usize,
    pub in_dim: usize,
    pub bias: Option<Vec<u64>>,
}

impl FixedLinear {
    /// Fails on a weight outside the fixed-point range of [`encode_weight`].
    pub fn from_f32(
        weight: &[f32],
        out_dim: usize,
        in_dim: usize,
        bias: Option<&[f32]>,
    ) -> anyhow::Result<Self> {
        let weight = weight
            .iter()
            .map(|w| {
                encode_weight(*w).ok_or_else(|| {
                    anyhow::anyhow!(
                        "weight {w} is outside the MPC fixed-point range (|w| < 2048 at {FRAC_BITS} fractional bits)"
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            weight,
            out_dim,
            in_dim,
            bias: bias.map(|b| {
                b.iter()
                    .map(|v| encode_at(*v as f64, 2 * FRAC_BITS))
                    .collect()
            }),
        })
    }

    /// The layer on a share `x` [rows, in]: a share of x·Wᵀ (+ b) at 2·FRAC_BITS.
    pub fn forward(&self, x: &[u64], rows: usize, first_party: bool) -> Vec<u64> {
        let mut y = mm_nt(x, &self.weight, rows, self.in_dim, self.out_dim);
        if let (Some(b), true) = (&self.bias, first_party) {
            for row in y.chunks_mut(self.out_dim) {
                add_assign(row, b);
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shares_reconstruct_and_products_keep_their_scale() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let x: Vec<u64> = [1.5f32, -2.25, 0.0, 1234.5]
            .iter()
            .map(|v| encode(*v))
            .collect();
        let (a, b) = share(&x, &mut rng);
        assert_eq!(add(&a, &b), x);
        // A public weight times a share: the shares of the product sum to the product.
        let w = FixedLinear::from_f32(&[0.5, -1.0, 2.0, 0.001], 1, 4, Some(&[0.25])).unwrap();
        let y = add(&w.forward(&a, 1, true), &w.forward(&b, 1, false));
        let expect = 0.75 + 2.25 + 0.0 + 1.2345 + 0.25;
        // Weights are rounded to 2^-20: the error is at most 2^-21 · Σ|x|.
        let bound = 0.5 / (1u64 << FRAC_BITS) as f64 * (1.5 + 2.25 + 1234.5);
        assert!((decode_at(y[0], 2 * FRAC_BITS) - expect).abs() <= bound);
    }

    #[test]
    fn matrix_products_agree() {
        let x: Vec<u64> = (1..=6).collect(); // [2, 3]
        let y: Vec<u64> = (1..=6).collect(); // [3, 2] or [2, 3]ᵀ
        assert_eq!(mm_nn(&x, &y, 2, 3, 2), vec![22, 28, 49, 64]);
        assert_eq!(mm_nt(&x, &y, 2, 3, 2), vec![14, 32, 32, 77]);
        // Negative i32 weights enter sign-extended: the same product as in the ring.
        let w: Vec<i32> = vec![-1, 2, -3, 4, -5, 6];
        let wr: Vec<u64> = w.iter().map(|v| v.ring()).collect();
        assert_eq!(mm_nt(&x, &w, 2, 3, 2), mm_nt(&x, &wr, 2, 3, 2));
        assert_eq!(encode_weight(4096.0), None);
        assert_eq!(encode_weight(-1.5), Some(-(3 << (FRAC_BITS - 1))));
    }
}
