//! Fixed point in the ring Z_2^64 and two-party additive sharing.
//!
//! A real value x is the ring element round(x · 2^FRAC_BITS) (two's complement). A product
//! of two such values carries 2·FRAC_BITS fractional bits; the parties never truncate
//! locally (that fails with probability ~|x|/2^64 per element) — every product goes to the
//! client, which reconstructs it exactly and re-shares it at FRAC_BITS.
//!
//! Range: a value at 2·FRAC_BITS must stay below 2^63 in magnitude, i.e. |x| < 2^23 (8.4 M)
//! for products; a value at FRAC_BITS below 2^43. Resolution: 2^-20 ≈ 9.5e-7.

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

/// Low bits a party drops from each element of its share of a product (2·FRAC_BITS)
/// before sending it to the client, which needs FRAC_BITS. Dropping them from each share
/// separately loses at most one unit of 2^-FRAC_BITS (the floors and a carry between the
/// low halves, re-centred) and keeps the whole range; the 44 bits left travel in 6 bytes
/// instead of 8.
pub const DROPPED_BITS: u32 = FRAC_BITS;

/// A share of products, without its [`DROPPED_BITS`] low bits.
pub fn drop_low_bits(share: &[u64]) -> Vec<u64> {
    share.iter().map(|v| v >> DROPPED_BITS).collect()
}

/// The value of two shares that dropped their low bits (a product at 2·FRAC_BITS).
pub fn open_dropped(a: u64, b: u64) -> f64 {
    // The sum's 44 bits moved to the top and back with an arithmetic shift: sign-extended.
    let v = (a.wrapping_add(b) << DROPPED_BITS) as i64 >> DROPPED_BITS;
    // Each floor, and the lost carry, sit below the value: +1 unit centres the error
    // in (-1, 1] units.
    (v + 1) as f64 / (1u64 << (2 * FRAC_BITS - DROPPED_BITS)) as f64
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

/// A public weight at FRAC_BITS in an i32: `None` outside ±2^11 (no real checkpoint's
/// weights come near; the party refuses such a model rather than wrap).
pub fn encode_weight(w: f32) -> Option<i32> {
    let v = (w as f64 * ONE).round();
    (v.abs() <= i32::MAX as f64).then_some(v as i32)
}

/// Σ x_i · w_i in the ring, each weight sign-extended.
#[inline(always)]
fn dot_body(x: &[u64], w: &[i32]) -> u64 {
    // Wrapping adds reassociate freely, so this loop vectorizes.
    x.iter().zip(w).fold(0u64, |acc, (a, b)| {
        acc.wrapping_add(a.wrapping_mul(*b as i64 as u64))
    })
}

/// `dot_body` compiled with AVX-512 (8 lanes of 64-bit multiplies).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
fn dot_avx512(x: &[u64], w: &[i32]) -> u64 {
    dot_body(x, w)
}

/// `dot_body` compiled with AVX2 (64-bit multiplies from 32-bit ones, 4 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(x: &[u64], w: &[i32]) -> u64 {
    dot_body(x, w)
}

/// The dot product with the widest vector unit this CPU has.
fn dot(x: &[u64], w: &[i32]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512dq") {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { dot_avx512(x, w) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { dot_avx2(x, w) };
        }
    }
    dot_body(x, w)
}

/// Weight rows per parallel task: enough tasks to spread one decode row ([1, n]) over
/// the cores, each long enough to outweigh its scheduling.
const TASK: usize = 64;

/// `x` [m, k] times `w`ᵀ where `w` is [n, k] (public weights, sign-extended): [m, n].
/// Each weight row is read once for all rows of `x` (it stays in cache), not once per row.
pub fn mm_nt(x: &[u64], w: &[i32], m: usize, k: usize, n: usize) -> Vec<u64> {
    debug_assert_eq!((x.len(), w.len()), (m * k, n * k));
    if k == 0 || m == 0 {
        return vec![0u64; m * n];
    }
    // Column-major while computing: [n, m].
    let mut by_col = vec![0u64; n * m];
    by_col
        .par_chunks_mut(TASK * m)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (jj, col) in chunk.chunks_mut(m).enumerate() {
                let j = c * TASK + jj;
                let wj = &w[j * k..(j + 1) * k];
                for (i, o) in col.iter_mut().enumerate() {
                    *o = dot(&x[i * k..(i + 1) * k], wj);
                }
            }
        });
    if m == 1 {
        return by_col;
    }
    let mut out = vec![0u64; m * n];
    for (j, col) in by_col.chunks(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
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
    use rand::{RngCore, SeedableRng};

    /// Splits `values` (already encoded) into two additive shares: the first is uniform.
    fn share(values: &[u64], rng: &mut impl RngCore) -> (Vec<u64>, Vec<u64>) {
        let mask: Vec<u64> = (0..values.len()).map(|_| rng.next_u64()).collect();
        let other = values
            .iter()
            .zip(&mask)
            .map(|(v, m)| v.wrapping_sub(*m))
            .collect();
        (mask, other)
    }

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
    fn the_product_is_the_ring_product_of_sign_extended_weights() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        // Lengths that are not multiples of any vector width, rows over task borders.
        let (m, k, n) = (3, 37, 45);
        let x: Vec<u64> = (0..m * k).map(|_| rng.next_u64()).collect();
        let w: Vec<i32> = (0..n * k).map(|_| rng.next_u32() as i32).collect();
        let got = mm_nt(&x, &w, m, k, n);
        for i in 0..m {
            for j in 0..n {
                // In i128: the exact sum, reduced mod 2^64 at the end.
                let want = (0..k)
                    .map(|t| x[i * k + t] as i128 * w[j * k + t] as i128)
                    .fold(0i128, |acc, p| acc.wrapping_add(p)) as u64;
                assert_eq!(got[i * n + j], want, "({i}, {j})");
            }
        }
        assert_eq!(
            mm_nt(&[1, 2, 3], &[-1, 2, -3], 1, 3, 1),
            vec![(-6i64) as u64]
        );
        assert_eq!(encode_weight(4096.0), None);
        assert_eq!(encode_weight(-1.5), Some(-(3 << (FRAC_BITS - 1))));
    }

    #[test]
    fn shares_without_their_low_bits_open_to_within_one_unit() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let unit = 1.0 / (1u64 << FRAC_BITS) as f64;
        for x in [
            0.0,
            1.5,
            -1.5,
            3.25e-6,
            -7_000_000.0,
            8_000_000.0,
            -0.000_001,
        ] {
            for _ in 0..1000 {
                let enc = encode_at(x, 2 * FRAC_BITS);
                let a = rng.next_u64();
                let b = enc.wrapping_sub(a);
                let (da, db) = (drop_low_bits(&[a])[0], drop_low_bits(&[b])[0]);
                assert!(da < 1 << 44 && db < 1 << 44);
                let got = open_dropped(da, db);
                assert!((got - x).abs() <= unit, "{x}: {got}");
            }
        }
    }
}
