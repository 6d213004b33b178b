//! The engine's matmul, in each compiled form the CPU runs (AVX2; AVX-512VL), against
//! candle's f32 matmul (gemm) on Qwen2.5-0.5B shapes, in the same run:
//! `cargo bench -p unfed-node --bench linear`.
//! Prefill (23 token rows) is compute-bound; decode (1 row) is bound by weight traffic,
//! where bf16 weights widened in registers read half the bytes of f32.
//! `linear/fma-peak` measures the machine's FMA peak in the same run (GFLOP/s, every
//! thread), so each shape's throughput reads as a fraction of it.

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use unfed_node::engine::linear::{Kernel, Linear, WeightData};

/// (name, in, out) of the Qwen2.5-0.5B projections as the engine fuses them.
const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv", 896, 1152),
    ("gate_up", 896, 9728),
    ("down", 4864, 896),
    // The tied LM head: 272 MB of bf16, far past any cache; decode streams it.
    ("lm_head", 896, 151_936),
];

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed) % 1021) as f32 - 510.0) / 2048.0)
        .collect()
}

fn matmul(c: &mut Criterion) {
    for rows in [23usize, 8, 1] {
        let mut g = c.benchmark_group(format!("linear/{rows}-rows"));
        g.sample_size(20);
        for (name, inp, out) in SHAPES {
            let w = values(out * inp, 1);
            let x = values(rows * inp, 2);
            g.throughput(Throughput::Elements((2 * rows * inp * out) as u64));
            let ours = Linear::new(
                WeightData::Bf16(w.iter().map(|v| (v.to_bits() >> 16) as u16).collect()),
                out,
                inp,
                None,
            );
            // Each compiled form this CPU runs (the widest is what the engine uses).
            for kernel in Kernel::available().into_iter().skip(1) {
                let id = format!("unfed-bf16-{kernel:?}").to_lowercase();
                g.bench_with_input(BenchmarkId::new(id, name), &x, |b, x| {
                    b.iter(|| ours.forward_on(kernel, x, rows))
                });
            }
            let wt = Tensor::from_vec(w, (out, inp), &Device::Cpu)
                .unwrap()
                .t()
                .unwrap();
            let xt = Tensor::from_vec(x, (rows, inp), &Device::Cpu).unwrap();
            g.bench_with_input(BenchmarkId::new("candle-f32", name), &xt, |b, xt| {
                b.iter(|| xt.matmul(&wt).unwrap())
            });
        }
        g.finish();
    }
}

/// Independent 8-lane FMA chains per thread: enough to cover the FMA latency on both pipes.
const CHAINS: usize = 10;
const STEPS: usize = 1 << 20;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_chains() -> f32 {
    use std::arch::x86_64::*;
    let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..STEPS {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, a);
        }
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds 8 floats.
    unsafe {
        _mm256_storeu_ps(
            out.as_mut_ptr(),
            acc.iter().fold(acc[0], |s, v| _mm256_add_ps(s, *v)),
        )
    };
    out[0]
}

fn fma_peak(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        let mut g = c.benchmark_group("linear/fma-peak");
        g.sample_size(20);
        g.throughput(Throughput::Elements(
            (threads * STEPS * CHAINS * 8 * 2) as u64,
        ));
        g.bench_function("avx2", |b| {
            b.iter(|| {
                (0..threads)
                    // SAFETY: the CPU supports AVX2 and FMA (checked above).
                    .into_par_iter()
                    .map(|_| unsafe { fma_chains() })
                    .sum::<f32>()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, fma_peak, matmul);
// As the binaries do: candle otherwise re-reads /proc/cpuinfo on every matmul it runs.
fn main() {
    unfed_node::engine::fix_thread_count();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
