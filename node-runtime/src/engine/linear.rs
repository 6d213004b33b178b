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
///
/// The weights are kept in panels of [`PANEL`] output rows stored column by column (all
/// of a panel's weights for input `k`, then for `k + 1`, ...), so one load brings the
/// weights of 16 outputs for one input and every output accumulates in its own vector
/// lane: no horizontal sums, and one decode or batch streams each panel once, in order.
/// Every output is then the same chain of FMAs over `k = 0..in`, whatever the tile,
/// batch or thread computes it: results do not depend on the batch.
pub struct Linear {
    /// Panels first, then the `out % PANEL` rows left over, row-major.
    weight: WeightData,
    out_dim: usize,
    in_dim: usize,
    bias: Option<Vec<f32>>,
}

/// Output rows per panel: two 8-lane vectors.
const PANEL: usize = 16;

/// Where output `j` of a panel sits among the panel's 16 weights of one input. bf16
/// panels are stored so that interleaving them with zeros (which widens a bf16 to f32)
/// yields outputs 0..8 from the low halves of the two 128-bit lanes and 8..16 from the
/// high halves; f32 panels are in order.
fn slot(bf16: bool, j: usize) -> usize {
    match (bf16, j / 4) {
        (true, 1) => j + 4,
        (true, 2) => j - 4,
        _ => j,
    }
}

/// Rearranges row-major weights into panels, in place (one panel of scratch), so a
/// matrix never needs twice its memory.
fn pack<T: Copy + Default>(w: &mut [T], out: usize, cols: usize, bf16: bool) {
    let mut rows = vec![T::default(); PANEL * cols];
    for panel in w[..out / PANEL * PANEL * cols].chunks_exact_mut(PANEL * cols) {
        rows.copy_from_slice(panel);
        for k in 0..cols {
            for j in 0..PANEL {
                panel[k * PANEL + slot(bf16, j)] = rows[j * cols + k];
            }
        }
    }
}

/// Fewest panels one parallel task handles: enough to amortise scheduling.
const MIN_PANELS_PER_TASK: usize = 2;
/// Below this many multiply-adds (tens of microseconds on one core) a matmul runs on the
/// calling thread: waking the pool would cost more than it saves, and its threads then
/// spin, taking the cores other shards and processes on the machine are waiting for.
const PARALLEL_MACS: usize = 1 << 18;
/// Tasks per thread for a large matrix: a few, so the threads stay balanced, not
/// thousands, whose scheduling would cost more than the rows they compute.
const TASKS_PER_THREAD: usize = 4;

impl Linear {
    /// A layer over row-major `[out, in]` weights, repacked into panels in place.
    pub fn new(
        mut weight: WeightData,
        out_dim: usize,
        in_dim: usize,
        bias: Option<Vec<f32>>,
    ) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "linear weight shape");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim, "linear bias shape");
        }
        match &mut weight {
            WeightData::F32(v) => pack(v, out_dim, in_dim, false),
            WeightData::Bf16(v) => pack(v, out_dim, in_dim, true),
        }
        Self {
            weight,
            out_dim,
            in_dim,
            bias,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes of weights (what one pass over the matrix reads).
    pub fn nbytes(&self) -> usize {
        self.weight.nbytes()
    }

    /// Row `r` of the weights, widened into `out` (an embedding lookup in a tied table).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let cols = self.in_dim;
        let panels = self.out_dim / PANEL;
        if r >= panels * PANEL {
            return self.weight.row_into(r, cols, out);
        }
        let (base, j) = (r / PANEL * PANEL * cols, r % PANEL);
        let at = |k: usize| base + k * PANEL;
        match &self.weight {
            WeightData::F32(v) => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = v[at(k) + slot(false, j)];
                }
            }
            WeightData::Bf16(v) => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = bf16_to_f32(v[at(k) + slot(true, j)]);
                }
            }
        }
    }

    /// `x` is `[rows, in]` row-major; returns `[rows, out]` row-major.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.run(Kernel::best(), x, rows)
    }

    /// [`Linear::forward`] on a given compiled form of the kernel (one of
    /// [`Kernel::available`]), to measure one against another.
    pub fn forward_on(&self, kernel: Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(
            Kernel::available().contains(&kernel),
            "this CPU cannot run the {kernel:?} matmul"
        );
        self.run(kernel, x, rows)
    }

    fn run(&self, kernel: Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "linear input shape");
        // Each task fills a contiguous block `[rows, n]` for its outputs; the blocks are
        // laid side by side into `y` afterwards (for one row they already are `y`).
        let mut blocks = vec![0f32; self.out_dim * rows];
        let panels = self.out_dim / PANEL;
        // Splitting the panels changes no element's arithmetic, only who computes it.
        let per_task = if self.out_dim * self.in_dim * rows < PARALLEL_MACS {
            panels.max(1)
        } else {
            panels
                .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD)
                .max(MIN_PANELS_PER_TASK)
        };
        let spans: Vec<(usize, usize)> = (0..panels.div_ceil(per_task).max(1))
            .map(|t| {
                let first = t * per_task * PANEL;
                let last = if (t + 1) * per_task >= panels {
                    self.out_dim
                } else {
                    (t + 1) * per_task * PANEL
                };
                (first, last - first)
            })
            .collect();
        let mut chunks = Vec::with_capacity(spans.len());
        let mut rest = blocks.as_mut_slice();
        for &(_, n) in &spans {
            let (chunk, tail) = rest.split_at_mut(n * rows);
            chunks.push(chunk);
            rest = tail;
        }
        let run = |((first, n), chunk): (&(usize, usize), &mut &mut [f32])| {
            self.block(kernel, *first, *n, x, rows, chunk)
        };
        if spans.len() == 1 {
            spans.iter().zip(chunks.iter_mut()).for_each(run);
        } else {
            spans.par_iter().zip(chunks.par_iter_mut()).for_each(run);
        }
        let mut y = if rows == 1 {
            blocks
        } else {
            let mut y = vec![0f32; rows * self.out_dim];
            let mut at = 0;
            for &(first, n) in &spans {
                for s in 0..rows {
                    let o = s * self.out_dim + first;
                    y[o..o + n].copy_from_slice(&blocks[at + s * n..at + (s + 1) * n]);
                }
                at += n * rows;
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

    /// Outputs `first..first + n` (`first` on a panel boundary) for every token row, into
    /// `out` as `[rows, n]`.
    fn block(
        &self,
        kernel: Kernel,
        first: usize,
        n: usize,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        match kernel {
            // SAFETY: `Kernel::available` offers these only on CPUs with their features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { block_avx512(self, first, n, x, rows, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { block_avx2(self, first, n, x, rows, out) },
            Kernel::Portable => {
                block_body::<false, AVX2_TILE_ROWS, false>(self, first, n, x, rows, out)
            }
        }
    }
}

/// The compiled forms of the matmul. The FMA ones give the same bits (each output is
/// the same FMA chain); AVX-512's 16-lane registers hold a whole panel per row, so a
/// tile of up to 12 rows widens each weight once and streams each panel once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Multiply then add (no FMA): other bits than the FMA forms.
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The widest form this CPU runs, unless `UNFED_MATMUL_KERNEL` names another one it
    /// runs (to measure one against another).
    fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Kernel::available();
            let widest = *available.last().expect("the portable kernel always runs");
            let Ok(name) = std::env::var("UNFED_MATMUL_KERNEL") else {
                return widest;
            };
            let chosen = available
                .iter()
                .find(|k| format!("{k:?}").eq_ignore_ascii_case(&name));
            chosen.copied().unwrap_or_else(|| {
                tracing::warn!(
                    "UNFED_MATMUL_KERNEL={name} is not one this CPU runs ({available:?}); using {widest:?}"
                );
                widest
            })
        })
    }

    /// Every form this CPU runs, narrowest first.
    pub fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            kernels.push(Kernel::Avx2);
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bw")
            {
                kernels.push(Kernel::Avx512);
            }
        }
        kernels
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(l: &Linear, first: usize, n: usize, x: &[f32], rows: usize, out: &mut [f32]) {
    block_body::<true, AVX2_TILE_ROWS, false>(l, first, n, x, rows, out)
}

/// The AVX2 kernel compiled with AVX-512: one row's decode as AVX2's (EVEX-encoded; a
/// 16-lane form of it measured 6-31 % slower), and batches in tiles of whole-panel
/// 16-lane vectors, whose 32 registers hold a tile of up to [`AVX512_TILE_ROWS`] rows
/// with each weight widened once for all of them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw")]
unsafe fn block_avx512(
    l: &Linear,
    first: usize,
    n: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    block_body::<true, AVX512_TILE_ROWS, true>(l, first, n, x, rows, out)
}

/// Panels taken together by the one-row (decode) kernel: 8 independent FMA chains keep
/// both FMA pipes busy while four weight streams are read.
const DECODE_PANELS: usize = 4;
/// Most token rows per tile of the batched kernel: 6 × 2 accumulators, the panel's two
/// weight vectors and a broadcast fill the 16 vector registers of AVX2.
const AVX2_TILE_ROWS: usize = 6;
/// With AVX-512's 32 registers and one 16-lane accumulator per row. A decode batch of up
/// to 12 sessions is one tile; 12 measured faster than 8 for a 23-row prompt (tiles of
/// 12 + 11: 171 against 160 GFLOP/s on the LM head, Zen 4).
const AVX512_TILE_ROWS: usize = 12;

#[inline(always)]
fn block_body<const FMA: bool, const TILE_ROWS: usize, const WIDE: bool>(
    l: &Linear,
    first: usize,
    n: usize,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
) {
    let cols = l.in_dim;
    // `first` is on a panel boundary, so the block's whole panels are its first n / PANEL.
    let full = n / PANEL;
    let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
    let first_panel = first / PANEL;
    let mut p = 0;
    if rows == 1 {
        while p + DECODE_PANELS <= full {
            put::<FMA, DECODE_PANELS, 1, false>(l, first_panel, p, &xs, 0, n, out);
            p += DECODE_PANELS;
        }
    }
    // Token rows in tiles of at most TILE_ROWS, as even as possible: a short last tile
    // would wait on the FMA latency and cost as much as a full one.
    let tiles = rows.div_ceil(TILE_ROWS);
    while p < full {
        let mut s = 0;
        for t in 0..tiles {
            let size = rows / tiles + usize::from(t < rows % tiles);
            macro_rules! tile {
                ($($t:literal)*) => {
                    match size {
                        $($t => put::<FMA, 1, $t, WIDE>(l, first_panel, p, &xs, s, n, out),)*
                        _ => unreachable!("a tile holds at most {TILE_ROWS} rows"),
                    }
                };
            }
            // Only the widest kernel's tiles are compiled for it.
            if TILE_ROWS > AVX2_TILE_ROWS {
                tile!(1 2 3 4 5 6 7 8 9 10 11 12);
            } else {
                tile!(1 2 3 4 5 6);
            }
            s += size;
        }
        p += 1;
    }
    // Rows past the last whole panel, stored row-major: the same FMA chain per output.
    let mut w = vec![0f32; if full * PANEL < n { cols } else { 0 }];
    for r in full * PANEL..n {
        l.weight.row_into(first + r, cols, &mut w);
        for (s, xr) in xs.iter().enumerate() {
            let mut acc = 0f32;
            for (a, b) in w.iter().zip(*xr) {
                acc = if FMA { a.mul_add(*b, acc) } else { acc + a * b };
            }
            out[s * n + r] = acc;
        }
    }
}

/// Panels `p..p + NP` of the block starting at panel `first_panel`, for token rows
/// `s..s + T`, stored into the block's `[rows, n]` output.
#[inline(always)]
fn put<const FMA: bool, const NP: usize, const T: usize, const WIDE: bool>(
    l: &Linear,
    first_panel: usize,
    p: usize,
    xs: &[&[f32]],
    s: usize,
    n: usize,
    out: &mut [f32],
) {
    let d = panels::<FMA, NP, T, WIDE>(l, first_panel + p, std::array::from_fn(|t| xs[s + t]));
    for (q, dq) in d.iter().enumerate() {
        for (t, dt) in dq.iter().enumerate() {
            let o = (s + t) * n + (p + q) * PANEL;
            out[o..o + PANEL].copy_from_slice(dt);
        }
    }
}

/// Outputs of panels `first..first + NP` for `T` token rows: `[panel][row][output]`.
/// `WIDE` (only inlined under `block_avx512`) takes one panel at a time in 16-lane form.
#[inline(always)]
fn panels<const FMA: bool, const NP: usize, const T: usize, const WIDE: bool>(
    l: &Linear,
    first: usize,
    x: [&[f32]; T],
) -> [[[f32; PANEL]; T]; NP] {
    let cols = l.in_dim;
    assert!((first + NP) * PANEL <= l.out_dim && x.iter().all(|r| r.len() == cols));
    let span = first * PANEL * cols..(first + NP) * PANEL * cols;
    #[cfg(target_arch = "x86_64")]
    if WIDE && FMA && NP == 1 {
        let mut out = [[[0f32; PANEL]; T]; NP];
        // SAFETY: WIDE is only true under `block_avx512`, whose caller checked the CPU;
        // the span holds this one whole panel (asserted above).
        out[0] = match &l.weight {
            WeightData::Bf16(w) => unsafe {
                panel_avx512::<true, T>(w[span].as_ptr() as *const u8, cols, x)
            },
            WeightData::F32(w) => unsafe {
                panel_avx512::<false, T>(w[span].as_ptr() as *const u8, cols, x)
            },
        };
        return out;
    }
    match &l.weight {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: FMA is only true under `block_avx2`, whose caller checked the CPU; the
        // span holds NP whole panels (asserted above).
        WeightData::Bf16(w) if FMA => unsafe {
            panels_avx2::<true, NP, T>(w[span].as_ptr() as *const u8, cols, x)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        WeightData::F32(w) if FMA => unsafe {
            panels_avx2::<false, NP, T>(w[span].as_ptr() as *const u8, cols, x)
        },
        w => panels_portable::<FMA, NP, T>(w, first, cols, x),
    }
}

/// How far ahead (in inputs) each panel's weights are prefetched into L1, for one token
/// row and for more: roughly a memory latency's worth of steps. Measured on Zen 4 against
/// 32, 128 and 256 for the batch; the differences for one row were within noise.
const fn prefetch_inputs(rows: usize) -> usize {
    if rows == 1 { 32 } else { 64 }
}
/// And, for one token row, into L2 a panel's length ahead (32 KB of bf16 for 1024
/// inputs): lm_head, which streams 272 MB per decode step, measured 5-15 % faster. For a
/// 23-row prefill it measured 7 % slower, so batches do without.
const L2_PREFETCH_INPUTS: usize = 1024;

/// The AVX2 form of [`panels_portable`]: per output lane the same FMA chain, so the
/// same bits. `w` points at `NP` consecutive panels of `BF16` or f32 weights. It is
/// inlined into `block_avx2` or `block_avx512` and compiled with their features, which
/// the CPU must have.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panels_avx2<const BF16: bool, const NP: usize, const T: usize>(
    w: *const u8,
    cols: usize,
    x: [&[f32]; T],
) -> [[[f32; PANEL]; T]; NP] {
    use std::arch::x86_64::*;
    let elem = if BF16 { 2 } else { 4 };
    let (step, panel_bytes) = (PANEL * elem, PANEL * elem * cols);
    let (ahead, far) = (prefetch_inputs(T) * step, L2_PREFETCH_INPUTS * step);
    // SAFETY: the features are the caller's (see above); k < cols, the length of every
    // token row (checked by the caller), and `at` is input k of panel p, inside the NP
    // panels the caller passed.
    unsafe {
        let mut acc = [[[_mm256_setzero_ps(); 2]; T]; NP];
        let zero = _mm256_setzero_si256();
        for k in 0..cols {
            let xb: [__m256; T] =
                std::array::from_fn(|t| _mm256_broadcast_ss(&*x[t].as_ptr().add(k)));
            for (p, acc) in acc.iter_mut().enumerate() {
                let at = w.wrapping_add(p * panel_bytes + k * step);
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(ahead) as *const i8);
                // One 64-byte line holds two inputs' bf16 weights, or one's f32 ones.
                if T == 1 && (!BF16 || k % 2 == 0) {
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(far) as *const i8);
                }
                let (lo, hi) = if BF16 {
                    // A bf16 is the top half of an f32: interleaving with zeros widens it.
                    let v = _mm256_loadu_si256(at as *const __m256i);
                    (
                        _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)),
                        _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)),
                    )
                } else {
                    let f = at as *const f32;
                    (_mm256_loadu_ps(f), _mm256_loadu_ps(f.add(8)))
                };
                for (a, xv) in acc.iter_mut().zip(&xb) {
                    a[0] = _mm256_fmadd_ps(lo, *xv, a[0]);
                    a[1] = _mm256_fmadd_ps(hi, *xv, a[1]);
                }
            }
        }
        let mut out = [[[0f32; PANEL]; T]; NP];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o.iter_mut().zip(a) {
                _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(o.as_mut_ptr().add(8), a[1]);
            }
        }
        out
    }
}

/// One panel for `T` token rows in 16-lane vectors: per output the same FMA chain as
/// [`panels_avx2`], so the same bits. A bf16 is zero-extended into its 32-bit lane and
/// shifted to the top half, which widens it; lanes are then in stored order, which
/// [`slot`] maps back at the end. Inlined into `block_avx512` only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel_avx512<const BF16: bool, const T: usize>(
    w: *const u8,
    cols: usize,
    x: [&[f32]; T],
) -> [[f32; PANEL]; T] {
    use std::arch::x86_64::*;
    let step = PANEL * if BF16 { 2 } else { 4 };
    let ahead = prefetch_inputs(T) * step;
    // SAFETY: the features are the caller's; k < cols, the length of every token row
    // (checked by the caller), and `at` is input k of the panel the caller passed.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); T];
        for k in 0..cols {
            let at = w.wrapping_add(k * step);
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(ahead) as *const i8);
            let wk = if BF16 {
                let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(at as *const __m256i));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
            } else {
                _mm512_loadu_ps(at as *const f32)
            };
            for (a, xr) in acc.iter_mut().zip(&x) {
                *a = _mm512_fmadd_ps(wk, _mm512_set1_ps(*xr.get_unchecked(k)), *a);
            }
        }
        let mut out = [[0f32; PANEL]; T];
        let mut lanes = [0f32; PANEL];
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
            for (j, v) in o.iter_mut().enumerate() {
                *v = lanes[slot(BF16, j)];
            }
        }
        out
    }
}

/// Panels `first..first + NP` for `T` token rows, one FMA (or multiply-add) chain per
/// output over the inputs in order.
#[inline(always)]
fn panels_portable<const FMA: bool, const NP: usize, const T: usize>(
    w: &WeightData,
    first: usize,
    cols: usize,
    x: [&[f32]; T],
) -> [[[f32; PANEL]; T]; NP] {
    let mut out = [[[0f32; PANEL]; T]; NP];
    let mut wk = [0f32; PANEL];
    for (p, out) in out.iter_mut().enumerate() {
        let base = (first + p) * PANEL * cols;
        for k in 0..cols {
            let at = base + k * PANEL;
            for (j, v) in wk.iter_mut().enumerate() {
                *v = match w {
                    WeightData::F32(w) => w[at + slot(false, j)],
                    WeightData::Bf16(w) => bf16_to_f32(w[at + slot(true, j)]),
                };
            }
            for (o, xr) in out.iter_mut().zip(&x) {
                for (acc, wv) in o.iter_mut().zip(&wk) {
                    *acc = if FMA {
                        wv.mul_add(xr[k], *acc)
                    } else {
                        *acc + wv * xr[k]
                    };
                }
            }
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
            let lin = Linear::new(data, out, inp, Some(vec![0.5; out]));
            let y = lin.forward(&x, rows);
            let want = naive(reference, &x, rows, out, inp);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - (b + 0.5)).abs() < 1e-3, "{a} vs {}", b + 0.5);
            }
        }
    }

    /// bf16 weights give the very bits of the same weights widened to f32, and a matrix
    /// big enough to be split into tasks the bits of small ones, whose rows fall in other
    /// panels or past the last panel.
    #[test]
    fn bf16_weights_give_the_bits_of_their_f32_widening() {
        let (out, inp) = (4099, 67);
        let wb: Vec<u16> = (0..out * inp)
            .map(|i| ((((i * 7919 % 211) as f32 - 105.0) / 64.0).to_bits() >> 16) as u16)
            .collect();
        let wf: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
        let lin = |weight| Linear::new(weight, out, inp, None);
        let (bf, f) = (lin(WeightData::Bf16(wb)), lin(WeightData::F32(wf.clone())));
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
        // The same outputs computed 20 rows at a time: one panel and four rows past it.
        let x = vec![0.25f32; inp];
        let whole = f.forward(&x, 1);
        for (i, rows) in wf.chunks(20 * inp).enumerate() {
            let part = Linear::new(WeightData::F32(rows.to_vec()), rows.len() / inp, inp, None);
            let got = part.forward(&x, 1);
            let want = &whole[i * 20..i * 20 + got.len()];
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    /// A packed matrix still gives back each of its rows (a tied embedding's lookup).
    #[test]
    fn rows_read_back_from_the_panels() {
        let (out, inp) = (53, 9);
        let wf: Vec<f32> = (0..out * inp).map(|i| (i % 251) as f32).collect();
        let wb: Vec<u16> = wf.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        for data in [WeightData::F32(wf.clone()), WeightData::Bf16(wb.clone())] {
            let reference = WeightData::F32(wf.clone());
            let lin = Linear::new(data, out, inp, None);
            let (mut got, mut want) = (vec![0f32; inp], vec![0f32; inp]);
            for r in 0..out {
                lin.row_into(r, &mut got);
                reference.row_into(r, inp, &mut want);
                // bf16 keeps the small integers exactly.
                assert_eq!(got, want, "row {r}");
            }
        }
    }

    /// Every output element is the same sequence of FMAs whatever the tile it falls in,
    /// so a token's row is bit-identical whether it is computed in a prefill batch or
    /// alone (decode) — replicas re-executing a hop reproduce it exactly — and whichever
    /// FMA kernel (AVX2 or AVX-512, with their different tiles) the CPU runs.
    #[test]
    fn results_do_not_depend_on_the_batch_or_the_kernel() {
        // Five whole panels (four decoded together, one alone) and seven rows past them.
        let (out, inp) = (87, 45);
        let w: Vec<u16> = (0..out * inp)
            .map(|i| ((((i * 7919 % 211) as f32 - 105.0) / 64.0).to_bits() >> 16) as u16)
            .collect();
        let lin = Linear::new(WeightData::Bf16(w), out, inp, None);
        let fma: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|k| *k != Kernel::Portable)
            .collect();
        for rows in (1..=13).chain([23, 25]) {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            for &kernel in &fma {
                let batch = lin.forward_on(kernel, &x, rows);
                for s in 0..rows {
                    let alone = lin.forward_on(fma[0], &x[s * inp..(s + 1) * inp], 1);
                    let same = batch[s * out..(s + 1) * out]
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "row {s} of a {rows}-row batch on {kernel:?} differs from the row alone on {:?}",
                        fma[0]
                    );
                }
            }
        }
    }
}
