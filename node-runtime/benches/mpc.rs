//! One decode step (after an 8-token prompt) through the MPC pair against the plaintext
//! engine, in the same run: `cargo bench -p unfed-node --bench mpc`. The builtin model
//! always; a Qwen2.5-0.5B-shaped checkpoint too when UNFED_BENCH_MODEL names its directory.
//! Both parties run in this process (threads), so the figure is compute plus the
//! protocol's copies, without network latency.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use unfed_model::ModelConfig;
use unfed_node::engine::model::{ShardInput, ShardModel, ShardSpec};
use unfed_node::engine::weights::WeightFiles;
use unfed_node::mpc::client::{Client, ClientSession};
use unfed_node::mpc::local::{Hooks, LocalPair};
use unfed_node::mpc::weights::{ClientModel, PartyModel};

const PROMPT: [u32; 8] = [11, 22, 33, 44, 55, 66, 77, 88];

fn plaintext(cfg: &ModelConfig, files: &WeightFiles, layers: usize, head: bool) -> ShardModel {
    let spec = ShardSpec {
        layer_start: 0,
        layer_end: layers,
        has_embedding: true,
        has_head: head,
    };
    ShardModel::load(&cfg.text, &cfg.text_prefix, spec, files).unwrap()
}

fn bench_model(c: &mut Criterion, name: &str, dir: &Path) {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let files = WeightFiles::open_checkpoint_dir(dir).unwrap();
    let all = cfg.text.num_hidden_layers;
    let mut g = c.benchmark_group(format!("mpc/decode-step/{name}"));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    // (label, layers, with the head): shard 0 of two, and the whole model with the head.
    for (label, layers, head) in [
        ("shard0", all.div_ceil(2), false),
        ("full-output", all, true),
    ] {
        let plain = plaintext(&cfg, &files, layers, head);
        g.bench_function(format!("{label}/plaintext"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut cache = plain.new_cache();
                    plain
                        .forward(&mut cache, ShardInput::Tokens(&PROMPT))
                        .unwrap();
                    let t = Instant::now();
                    plain.forward(&mut cache, ShardInput::Tokens(&[5])).unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
        let party = Arc::new(
            PartyModel::load(&cfg.text, &cfg.text_prefix, 0..layers, head, &files).unwrap(),
        );
        let cm = ClientModel::load(&cfg.text, &cfg.text_prefix, 0..layers, head, &files).unwrap();
        let client = Client { model: &cm };
        g.bench_function(format!("{label}/mpc"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut pair = LocalPair::start(
                        party.clone(),
                        "bench",
                        Duration::from_secs(60),
                        Hooks::default(),
                    );
                    let mut sess = ClientSession::new();
                    pair.step(&client, &mut sess, &cm.embed(&PROMPT).unwrap())
                        .unwrap();
                    let row = cm.embed(&[5]).unwrap();
                    let t = Instant::now();
                    pair.step(&client, &mut sess, &row).unwrap();
                    total += t.elapsed();
                    pair.finish().unwrap();
                }
                total
            })
        });
    }
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

criterion_group!(mpc, benches);
criterion_main!(mpc);
