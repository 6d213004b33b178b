//! The engine's matmul against candle's f32 matmul (gemm) on Qwen2.5-0.5B shapes, in
//! the same run: `cargo bench -p unfed-node --bench linear`.
//! Prefill (23 token rows) is compute-bound; decode (1 row) is bound by weight traffic,
//! where bf16 weights widened in registers read half the bytes of f32.

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use unfed_node::engine::linear::{Linear, WeightData};

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
    for rows in [23usize, 1] {
        let mut g = c.benchmark_group(format!("linear/{rows}-rows"));
        g.sample_size(20);
        for (name, inp, out) in SHAPES {
            let w = values(out * inp, 1);
            let x = values(rows * inp, 2);
            g.throughput(Throughput::Elements((2 * rows * inp * out) as u64));
            let ours = Linear {
                weight: WeightData::Bf16(w.iter().map(|v| (v.to_bits() >> 16) as u16).collect()),
                out_dim: out,
                in_dim: inp,
                bias: None,
            };
            g.bench_with_input(BenchmarkId::new("unfed-bf16", name), &x, |b, x| {
                b.iter(|| ours.forward(x, rows))
            });
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

criterion_group!(benches, matmul);
criterion_main!(benches);
