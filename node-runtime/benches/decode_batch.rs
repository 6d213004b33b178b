//! One decode step of 8 sessions as one batch against the same 8 steps one at a time,
//! in the same run: `cargo bench -p unfed-node --bench decode_batch`. The builtin model
//! always; a checkpoint too when UNFED_BENCH_MODEL names its directory (e.g. the
//! Qwen2.5-0.5B-dims one from bench/transformers_baseline.py).
//! A decode step reads every weight for a single row; a batch reads them once for all.
//! Steps run on a thread of the rayon pool, as a node's batch worker runs them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use unfed_node::engine::generate::load_checkpoint;
use unfed_node::engine::model::{KvCache, ShardInput, ShardModel};
use unfed_node::engine::pool::on_pool;

const SESSIONS: usize = 8;
const PROMPT_TOKENS: u32 = 23;

/// Each session's cache after its own 23-token prompt.
fn prefilled(model: &ShardModel) -> Vec<KvCache> {
    (0..SESSIONS as u32)
        .map(|s| {
            let prompt: Vec<u32> = (0..PROMPT_TOKENS).map(|j| 3 + 31 * s + j).collect();
            let mut cache = model.new_cache();
            model
                .forward(&mut cache, ShardInput::Tokens(&prompt))
                .unwrap();
            cache
        })
        .collect()
}

/// How long `f` takes on a thread of the engine's pool (the hand-over not counted).
fn timed_on_pool(f: impl FnOnce() + Send) -> Duration {
    on_pool(|| {
        let t = Instant::now();
        f();
        t.elapsed()
    })
}

fn bench_model(c: &mut Criterion, name: &str, dir: &Path) {
    let (_, model) = load_checkpoint(dir).unwrap();
    let mut g = c.benchmark_group(format!("decode-step/{name}/{SESSIONS}-sessions"));
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(SESSIONS as u64));
    let token = [7u32];
    g.bench_function("one-at-a-time", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut caches = prefilled(&model);
                total += timed_on_pool(|| {
                    for cache in caches.iter_mut() {
                        model.forward(cache, ShardInput::Tokens(&token)).unwrap();
                    }
                });
            }
            total
        })
    });
    g.bench_function("batched", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut caches = prefilled(&model);
                total += timed_on_pool(|| {
                    let items = caches
                        .iter_mut()
                        .map(|c| (c, ShardInput::Tokens(&token)))
                        .collect();
                    for out in model.forward_batch(items) {
                        out.unwrap();
                    }
                });
            }
            total
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny");
    unfed_model::builtin::write_tiny(&tiny).unwrap();
    bench_model(c, "builtin-tiny", &tiny);
    if let Some(model) = std::env::var_os("UNFED_BENCH_MODEL").map(PathBuf::from) {
        bench_model(c, "bench-model", &model);
    }
}

criterion_group!(decode_batch, benches);
// As the binaries do: candle otherwise re-reads /proc/cpuinfo on every matmul it runs.
fn main() {
    unfed_node::engine::fix_thread_count();
    decode_batch();
    Criterion::default().configure_from_args().final_summary();
}
