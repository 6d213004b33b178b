//! Single-process engine speed on a real-size checkpoint (ignored by default):
//! `UNFED_BENCH_CHECKPOINT=DIR cargo test --release -p unfed-node --test bench_engine -- --ignored --nocapture`
//! with DIR from `bench/transformers_baseline.py make DIR`.

use std::path::PathBuf;

use unfed_node::engine::SamplingConfig;
use unfed_node::engine::generate::{generate, load_checkpoint};

#[test]
#[ignore = "needs a generated checkpoint in UNFED_BENCH_CHECKPOINT"]
fn engine_speed() {
    let dir =
        PathBuf::from(std::env::var("UNFED_BENCH_CHECKPOINT").expect("UNFED_BENCH_CHECKPOINT"));
    let (cfg, model) = load_checkpoint(&dir).unwrap();
    let vocab = cfg.text.vocab_size as u32;
    let prompt: Vec<u32> = (0..23u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let g = generate(&model, &prompt, 64, SamplingConfig::default(), false).unwrap();
        runs.push((g.prefill_ms, 63.0 * 1e3 / g.decode_ms));
    }
    let runs = &runs[1..];
    println!(
        "{{\"engine\": \"unfed single-process\", \"weight_mb\": {}, \"ttft_ms\": {:.1}, \"decode_tokens_per_s\": {:.2}}}",
        model.weight_bytes() >> 20,
        runs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min),
        runs.iter().map(|r| r.1).fold(0.0, f64::max)
    );
}
