//! Weight matrices and the matmul that streams them.
//!
//! Decode on a CPU is bound by memory traffic: every weight is read once per token.
//! bf16 checkpoints therefore stay bf16 in memory and are widened to f32 in registers
//! (exact: a bf16 is the top half of an f32), halving that traffic. Activations and
//! accumulation are f32, so results match an f32 reference.

use rayon::prelude::*;

/// Row-major `[out, in]` weights as stored in memory.
pub enum WeightData {
    F32(Vec<f32>),
    /// Raw bf16 bit patterns.
    Bf16(Vec<u16>),
}

impl WeightData {
    pub fn nbytes(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) => v.len() * 2,
        }
    }

    /// Row `r` of a matrix with `cols` columns, widened into `out`.
    pub fn row_into(&self, r: usize, cols: usize, out: &mut [f32]) {
        match self {
            WeightData::F32(v) => out.copy_from_slice(&v[r * cols..(r + 1) * cols]),
            WeightData::Bf16(v) => widen(&v[r * cols..(r + 1) * cols], out),
        }
    }

    /// Stacks matrices with equal column counts row-wise (fusing q/k/v or gate/up).
    pub fn concat_rows(parts: Vec<WeightData>) -> WeightData {
        if parts.iter().all(|p| matches!(p, WeightData::Bf16(_))) {
            let mut out = Vec::new();
            for p in parts {
                if let WeightData::Bf16(v) = p {
                    out.extend_from_slice(&v);
                }
            }
            WeightData::Bf16(out)
        } else {
            let mut out = Vec::new();
            for p in parts {
                match p {
                    WeightData::F32(v) => out.extend_from_slice(&v),
                    WeightData::Bf16(v) => out.extend(v.iter().map(|&b| bf16_to_f32(b))),
                }
            }
            WeightData::F32(out)
        }
    }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline(always)]
fn widen(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(s);
    }
}

/// `y = x · Wᵀ + b` for a weight `W` of shape `[out, in]`.
pub struct Linear {
    pub weight: WeightData,
    pub out_dim: usize,
    pub in_dim: usize,
    pub bias: Option<Vec<f32>>,
}

/// Output rows handled by one parallel task: large enough to amortise scheduling,
/// small enough to balance two cores.
const ROWS_PER_TASK: usize = 32;

impl Linear {
    /// `x` is `[rows, in]` row-major; returns `[rows, out]` row-major.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "linear input shape");
        // Computed transposed ([out, rows]) so each task owns a contiguous output chunk.
        let mut yt = vec![0f32; self.out_dim * rows];
        yt.par_chunks_mut(ROWS_PER_TASK * rows)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * ROWS_PER_TASK;
                let n = chunk.len() / rows;
                self.rows_kernel(first, n, x, rows, chunk);
            });
        let mut y = if rows == 1 {
            yt
        } else {
            let mut y = vec![0f32; rows * self.out_dim];
            for o in 0..self.out_dim {
                for s in 0..rows {
                    y[s * self.out_dim + o] = yt[o * rows + s];
                }
            }
            y
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_dim) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
        y
    }

    fn rows_kernel(&self, first: usize, n: usize, x: &[f32], rows: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { rows_kernel_avx2(&self.weight, self.in_dim, first, n, x, rows, out) };
                return;
            }
        }
        rows_kernel_body::<false>(&self.weight, self.in_dim, first, n, x, rows, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_kernel_avx2(
    w: &WeightData,
    cols: usize,
    first: usize,
    n: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    rows_kernel_body::<true>(w, cols, first, n, x, rows, out)
}

/// `out[o * rows + s] = dot(W[first + o], x[s])` for `o < n`.
#[inline(always)]
fn rows_kernel_body<const FMA: bool>(
    w: &WeightData,
    cols: usize,
    first: usize,
    n: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    let mut buf = vec![0f32; cols];
    for o in 0..n {
        let r = first + o;
        let wrow: &[f32] = match w {
            WeightData::F32(v) => &v[r * cols..(r + 1) * cols],
            WeightData::Bf16(v) => {
                widen(&v[r * cols..(r + 1) * cols], &mut buf);
                &buf
            }
        };
        // Four token rows at a time share each load of the weight row (prefill).
        let mut s = 0;
        while s + 4 <= rows {
            let x4 = [0, 1, 2, 3].map(|k| &x[(s + k) * cols..(s + k + 1) * cols]);
            let d = dot4::<FMA>(wrow, x4);
            out[o * rows + s..o * rows + s + 4].copy_from_slice(&d);
            s += 4;
        }
        for s in s..rows {
            out[o * rows + s] = dot::<FMA>(wrow, &x[s * cols..(s + 1) * cols]);
        }
    }
}

/// Dot products of `w` with four vectors, 8 lanes each.
#[inline(always)]
fn dot4<const FMA: bool>(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    const L: usize = 8;
    let mut acc = [[0f32; L]; 4];
    let n = w.len() / L * L;
    for i in (0..n).step_by(L) {
        let wc = &w[i..i + L];
        for k in 0..4 {
            let xc = &x[k][i..i + L];
            for j in 0..L {
                acc[k][j] = if FMA {
                    wc[j].mul_add(xc[j], acc[k][j])
                } else {
                    acc[k][j] + wc[j] * xc[j]
                };
            }
        }
    }
    let mut out = [0f32; 4];
    for k in 0..4 {
        let mut a = acc[k];
        let mut width = L;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                a[i] += a[i + width];
            }
        }
        let tail: f32 = (n..w.len()).map(|i| w[i] * x[k][i]).sum();
        out[k] = a[0] + tail;
    }
    out
}

/// Dot product with 16 independent accumulators so the compiler keeps two vector
/// registers busy.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction keeps rounding symmetric.
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(w: &[f32], x: &[f32], rows: usize, out: usize, inp: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for s in 0..rows {
            for o in 0..out {
                y[s * out + o] = (0..inp)
                    .map(|i| w[o * inp + i] as f64 * x[s * inp + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn bf16_and_f32_weights_agree_with_a_naive_matmul() {
        let (out, inp, rows) = (75, 37, 6);
        let wf: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 64.0)
            .collect();
        let wb: Vec<u16> = wf.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let wb_f: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        for (data, reference) in [
            (WeightData::F32(wf.clone()), &wf),
            (WeightData::Bf16(wb), &wb_f),
        ] {
            let lin = Linear {
                weight: data,
                out_dim: out,
                in_dim: inp,
                bias: Some(vec![0.5; out]),
            };
            let y = lin.forward(&x, rows);
            let want = naive(reference, &x, rows, out, inp);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - (b + 0.5)).abs() < 1e-3, "{a} vs {}", b + 0.5);
            }
        }
    }
}
