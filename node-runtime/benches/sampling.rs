//! Choosing a token from a Qwen-sized vocabulary (151,936 logits), greedy and with each
//! sampling filter, on two rows: peaked like a trained model's (a few tokens far above
//! the rest) and flat like a random-weights checkpoint's (the nucleus is most of the
//! vocabulary): `cargo bench -p unfed-node --bench sampling`. Greedy in the same run is
//! the baseline a filter's cost reads against.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use unfed_node::engine::sampling::{Sampler, SamplingConfig};

const VOCAB: usize = 151_936;

/// Pseudo-random logits in [-3, 3), plus `peaks` tokens at 18, 17, 16, …
fn row(peaks: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..VOCAB as u64)
        .map(|i| ((i * 2_654_435_761) >> 8 & 0xff_ffff) as f32 / 16_777_216.0 * 6.0 - 3.0)
        .collect();
    for k in 0..peaks {
        v[1000 + 997 * k] = 18.0 - k as f32;
    }
    v
}

fn sample(c: &mut Criterion) {
    let hot = |top_k, top_p| SamplingConfig {
        temperature: 0.7,
        top_k,
        top_p,
        ..Default::default()
    };
    let configs = [
        ("greedy", SamplingConfig::default()),
        ("temperature", hot(0, 1.0)),
        ("top-p 0.9", hot(0, 0.9)),
        ("top-k 50", hot(50, 1.0)),
        ("top-k 50, top-p 0.9", hot(50, 0.9)),
    ];
    for (shape, logits) in [("peaked", row(5)), ("flat", row(0))] {
        let mut g = c.benchmark_group(format!("sampling/{shape}"));
        g.sample_size(20);
        for (name, cfg) in configs {
            let mut s = Sampler::new(cfg);
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| s.sample(logits.clone()).token)
            });
        }
        g.finish();
    }
}

criterion_group!(benches, sample);
criterion_main!(benches);
