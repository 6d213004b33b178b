//! Weight matrices and the matmul that streams them.
//!
//! Decode on a CPU is bound by memory traffic: every weight is read once per token.
//! bf16 checkpoints therefore stay bf16 in memory and are widened to f32 in registers
//! (exact: a bf16 is the top half of an f32), halving that traffic. Activations and
//! accumulation are f32, so results match an f32 reference.

use rayon::prelude::*;

use super::hugepages::weight_buffer;

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

    /// Elements (weights), whatever their width.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        if parts.iter().all(|p| matches!(p, WeightData::Bf16(_))) {
            let mut out = weight_buffer(len);
            for p in parts {
                if let WeightData::Bf16(v) = p {
                    out.extend_from_slice(&v);
                }
            }
            WeightData::Bf16(out)
        } else {
            let mut out = weight_buffer(len);
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

/// Fewest output rows one parallel task handles: enough to amortise scheduling.
const MIN_ROWS_PER_TASK: usize = 32;
/// Below this many multiply-adds (tens of microseconds on one core) a matmul runs on the
/// calling thread: waking the pool would cost more than it saves, and its threads then
/// spin, taking the cores other shards and processes on the machine are waiting for.
const PARALLEL_MACS: usize = 1 << 18;
/// Tasks per thread for a large matrix: a few, so the threads stay balanced, not
/// thousands, whose scheduling would cost more than the rows they compute.
const TASKS_PER_THREAD: usize = 4;

impl Linear {
    /// `x` is `[rows, in]` row-major; returns `[rows, out]` row-major.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "linear input shape");
        // Computed transposed ([out, rows]) so each task owns a contiguous output chunk.
        let mut yt = vec![0f32; self.out_dim * rows];
        // Splitting the output rows changes no element's arithmetic, only who computes it.
        if self.out_dim * self.in_dim * rows < PARALLEL_MACS {
            self.rows_kernel(0, self.out_dim, x, rows, &mut yt);
        } else {
            let per_task = (self.out_dim / (rayon::current_num_threads() * TASKS_PER_THREAD))
                .max(MIN_ROWS_PER_TASK);
            yt.par_chunks_mut(per_task * rows)
                .enumerate()
                .for_each(|(task, chunk)| {
                    let first = task * per_task;
                    let n = chunk.len() / rows;
                    self.rows_kernel(first, n, x, rows, chunk);
                });
        }
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
                // SAFETY: the CPU supports the features the functions are compiled for.
                match &self.weight {
                    WeightData::Bf16(w) if rows == 1 => unsafe {
                        decode_bf16_avx2(w, self.in_dim, first, n, x, out)
                    },
                    _ => unsafe {
                        rows_kernel_avx2(&self.weight, self.in_dim, first, n, x, rows, out)
                    },
                }
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

/// Weight rows per tile of the one-token bf16 kernel: eight independent FMA chains keep
/// both FMA pipes busy (four would wait on the FMA latency).
const DECODE_TILE: usize = 8;
/// How many tiles ahead the one-token kernel prefetches.
const PREFETCH_TILES: usize = 1;

/// `out[o] = dot(W[first + o], x)` for one token row and bf16 weights. Decode streams
/// each weight once, so they are widened in registers as they are loaded instead of
/// through a buffer: the loads then never pause for a separate widening pass. Each
/// output is the same per-lane FMA sequence and reduction as [`tile_avx2`], so the same
/// bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_bf16_avx2(
    w: &[u16],
    cols: usize,
    first: usize,
    n: usize,
    x: &[f32],
    out: &mut [f32],
) {
    let mut o = 0;
    while o + DECODE_TILE <= n {
        let d = unsafe { decode_tile_bf16::<DECODE_TILE>(w, cols, first + o, x) };
        out[o..o + DECODE_TILE].copy_from_slice(&d);
        o += DECODE_TILE;
    }
    for (k, y) in out[o..n].iter_mut().enumerate() {
        *y = unsafe { decode_tile_bf16::<1>(w, cols, first + o + k, x) }[0];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode_tile_bf16<const R: usize>(
    w: &[u16],
    cols: usize,
    first: usize,
    x: &[f32],
) -> [f32; R] {
    use std::arch::x86_64::*;
    const L: usize = 8;
    assert!(x.len() == cols && (first + R) * cols <= w.len());
    let rows: [&[u16]; R] = std::array::from_fn(|k| &w[(first + k) * cols..(first + k + 1) * cols]);
    let n = cols / L * L;
    let mut acc = [_mm256_setzero_ps(); R];
    // The rows are read side by side, R streams at once, which the hardware prefetcher
    // follows poorly; so the next tile's block (contiguous) is fetched ahead, in step.
    let ahead = w.as_ptr().wrapping_add((first + R * PREFETCH_TILES) * cols) as *const i8;
    let mut i = 0;
    while i < n {
        for line in (0..L * R * 2).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(i * R * 2 + line));
        }
        // SAFETY: i + L <= n <= cols, the length of x and of every row (asserted above).
        let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
        for k in 0..R {
            let raw = unsafe { _mm_loadu_si128(rows[k].as_ptr().add(i) as *const __m128i) };
            // A bf16 is the top half of an f32: zero-extend and shift.
            let wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            acc[k] = _mm256_fmadd_ps(wv, xv, acc[k]);
        }
        i += L;
    }
    std::array::from_fn(|k| {
        // SAFETY: AVX2 is enabled in this function.
        let lanes = unsafe { sum_lanes_avx2(acc[k]) };
        lanes
            + (n..cols)
                .map(|i| bf16_to_f32(rows[k][i]) * x[i])
                .sum::<f32>()
    })
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
    // Weight rows are widened once per group and reused by every token row.
    let mut buf = vec![0f32; W_TILE * cols];
    let mut o = 0;
    while o < n {
        let g = W_TILE.min(n - o);
        let r = first + o;
        let wrows: &[f32] = match w {
            WeightData::F32(v) => &v[r * cols..(r + g) * cols],
            WeightData::Bf16(v) => {
                widen(&v[r * cols..(r + g) * cols], &mut buf[..g * cols]);
                // The next group streams in while this one is multiplied.
                prefetch(&v[(r + g) * cols..((r + 2 * g) * cols).min(v.len())]);
                &buf[..g * cols]
            }
        };
        let out = &mut out[o * rows..(o + g) * rows];
        if g == W_TILE {
            let w4: [&[f32]; W_TILE] = std::array::from_fn(|k| &wrows[k * cols..(k + 1) * cols]);
            tile_rows::<W_TILE, FMA>(w4, x, cols, rows, out);
        } else {
            for k in 0..g {
                tile_rows::<1, FMA>(
                    [&wrows[k * cols..(k + 1) * cols]],
                    x,
                    cols,
                    rows,
                    &mut out[k * rows..(k + 1) * rows],
                );
            }
        }
        o += g;
    }
}

/// Asks for `data` to be brought towards the core ahead of its use (into L2: a whole
/// group's lines at once would crowd the L1's miss buffers).
#[inline(always)]
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let p = data.as_ptr() as *const i8;
        for off in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: a prefetch never faults, and `off` stays inside `data`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(off)) };
        }
    }
}

/// Weight rows per register tile.
const W_TILE: usize = 4;
/// Token rows per register tile: 4 × 3 accumulators of 8 lanes plus the operands fit
/// the 16 vector registers of AVX2, and each load feeds 3–4 FMAs (prefill is
/// compute-bound; decode has one token row and stays bound by weight traffic).
const X_TILE: usize = 3;

/// `out[k * rows + s] = dot(w[k], x[s])` for every token row `s`.
#[inline(always)]
fn tile_rows<const R: usize, const FMA: bool>(
    w: [&[f32]; R],
    x: &[f32],
    cols: usize,
    rows: usize,
    out: &mut [f32],
) {
    let mut s = 0;
    while s < rows {
        // Widest tiles first, but never a lone row after them: a one-row pass waits on
        // the FMA latency and costs as much as a full tile, so four rows go as 2 + 2.
        let t = match rows - s {
            4 | 2 => 2,
            1 => 1,
            _ => X_TILE,
        };
        match t {
            X_TILE => put_tile::<R, X_TILE, FMA>(w, x, cols, rows, s, out),
            2 => put_tile::<R, 2, FMA>(w, x, cols, rows, s, out),
            _ => put_tile::<R, 1, FMA>(w, x, cols, rows, s, out),
        }
        s += t;
    }
}

/// Token rows `s..s + T` of [`tile_rows`].
#[inline(always)]
fn put_tile<const R: usize, const T: usize, const FMA: bool>(
    w: [&[f32]; R],
    x: &[f32],
    cols: usize,
    rows: usize,
    s: usize,
    out: &mut [f32],
) {
    let d = tile::<R, T, FMA>(
        w,
        std::array::from_fn(|t| &x[(s + t) * cols..(s + t + 1) * cols]),
    );
    for (k, dk) in d.iter().enumerate() {
        out[k * rows + s..k * rows + s + T].copy_from_slice(dk);
    }
}

/// Dot products of `R` weight rows with `T` token rows, 8 lanes each, accumulated in
/// registers; the pairwise lane reduction keeps rounding the same for every tile shape.
#[inline(always)]
fn tile<const R: usize, const T: usize, const FMA: bool>(
    w: [&[f32]; R],
    x: [&[f32]; T],
) -> [[f32; T]; R] {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA is only true under `rows_kernel_avx2`, whose caller checked the CPU.
        return unsafe { tile_avx2::<R, T>(w, x) };
    }
    tile_portable::<R, T, FMA>(w, x)
}

/// The AVX2 form of [`tile_portable`] (same FMA order per lane, same reduction, so the
/// same bits): the compiler does not keep the portable form's 96 accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2<const R: usize, const T: usize>(
    w: [&[f32]; R],
    x: [&[f32]; T],
) -> [[f32; T]; R] {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let cols = w[0].len();
    assert!(w.iter().all(|v| v.len() == cols) && x.iter().all(|v| v.len() == cols));
    let n = cols / L * L;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut i = 0;
    while i < n {
        // SAFETY: i + L <= n <= cols, the length of every row (asserted above).
        let xv: [__m256; T] =
            std::array::from_fn(|t| unsafe { _mm256_loadu_ps(x[t].as_ptr().add(i)) });
        for r in 0..R {
            let wv = unsafe { _mm256_loadu_ps(w[r].as_ptr().add(i)) };
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        i += L;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            // SAFETY: AVX2 is enabled in this function.
            let lanes = unsafe { sum_lanes_avx2(acc[r][t]) };
            out[r][t] = lanes + (n..cols).map(|i| w[r][i] * x[t][i]).sum::<f32>();
        }
    }
    out
}

/// An accumulator's 8 lanes summed by [`reduce_lanes`], as every kernel sums them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sum_lanes_avx2(acc: std::arch::x86_64::__m256) -> f32 {
    let mut a = [0f32; 8];
    // SAFETY: `a` holds exactly 8 floats.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(a.as_mut_ptr(), acc) };
    reduce_lanes(a)
}

/// Pairwise sum of the lanes: symmetric rounding, identical in both kernels.
#[inline(always)]
fn reduce_lanes(mut a: [f32; 8]) -> f32 {
    let mut width = a.len();
    while width > 1 {
        width /= 2;
        for i in 0..width {
            a[i] += a[i + width];
        }
    }
    a[0]
}

#[inline(always)]
fn tile_portable<const R: usize, const T: usize, const FMA: bool>(
    w: [&[f32]; R],
    x: [&[f32]; T],
) -> [[f32; T]; R] {
    const L: usize = 8;
    let cols = w[0].len();
    let n = cols / L * L;
    let wb: [&[f32]; R] = w.map(|v| &v[..n]);
    let xb: [&[f32]; T] = x.map(|v| &v[..n]);
    let mut acc = [[[0f32; L]; T]; R];
    for i in (0..n).step_by(L) {
        let xc: [&[f32; L]; T] = xb.map(|v| v[i..i + L].try_into().unwrap());
        for r in 0..R {
            let wc: &[f32; L] = wb[r][i..i + L].try_into().unwrap();
            for t in 0..T {
                for j in 0..L {
                    acc[r][t][j] = if FMA {
                        wc[j].mul_add(xc[t][j], acc[r][t][j])
                    } else {
                        acc[r][t][j] + wc[j] * xc[t][j]
                    };
                }
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let tail: f32 = (n..cols).map(|i| w[r][i] * x[t][i]).sum();
            out[r][t] = reduce_lanes(acc[r][t]) + tail;
        }
    }
    out
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

    /// bf16 weights give the very bits of the same weights widened to f32, and a matrix
    /// big enough to be split into few large tasks the bits of small ones.
    #[test]
    fn bf16_weights_give_the_bits_of_their_f32_widening() {
        let (out, inp) = (4099, 67);
        let wb: Vec<u16> = (0..out * inp)
            .map(|i| ((((i * 7919 % 211) as f32 - 105.0) / 64.0).to_bits() >> 16) as u16)
            .collect();
        let wf: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
        let lin = |weight| Linear {
            weight,
            out_dim: out,
            in_dim: inp,
            bias: None,
        };
        let (bf, f) = (lin(WeightData::Bf16(wb)), lin(WeightData::F32(wf)));
        for rows in [1, 2, 3, 7] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let (a, b) = (bf.forward(&x, rows), f.forward(&x, rows));
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows} rows"
            );
        }
        // The same outputs computed 32 rows at a time, as many small tasks would.
        let (WeightData::F32(w), x) = (&f.weight, vec![0.25f32; inp]) else {
            unreachable!()
        };
        let whole = f.forward(&x, 1);
        for (i, rows) in w.chunks(32 * inp).enumerate() {
            let part = Linear {
                weight: WeightData::F32(rows.to_vec()),
                out_dim: rows.len() / inp,
                in_dim: inp,
                bias: None,
            };
            let got = part.forward(&x, 1);
            let want = &whole[i * 32..i * 32 + got.len()];
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    /// Every output element is the same sequence of FMAs whatever the tile it falls in,
    /// so a token's row is bit-identical whether it is computed in a prefill batch or
    /// alone (decode) — replicas re-executing a hop reproduce it exactly.
    #[test]
    fn results_do_not_depend_on_the_batch() {
        let (out, inp) = (11, 45);
        let w: Vec<u16> = (0..out * inp)
            .map(|i| ((((i * 7919 % 211) as f32 - 105.0) / 64.0).to_bits() >> 16) as u16)
            .collect();
        let lin = Linear {
            weight: WeightData::Bf16(w),
            out_dim: out,
            in_dim: inp,
            bias: None,
        };
        for rows in 1..=8 {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let batch = lin.forward(&x, rows);
            for s in 0..rows {
                let alone = lin.forward(&x[s * inp..(s + 1) * inp], 1);
                let same = batch[s * out..(s + 1) * out]
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "row {s} of a {rows}-row batch differs from the row alone"
                );
            }
        }
    }
}
