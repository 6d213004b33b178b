//! Split streams: peak memory stays far below the largest tensor. Alone in its test
//! binary so the process's peak RSS (VmHWM) reflects only this test.

#![cfg(target_os = "linux")]

use std::io::Write;

use unfed_model::DType;
use unfed_model::safetensors_io::{PlannedTensor, write_header};
use unfed_model::split::{SplitOptions, split};

const HIDDEN: usize = 1024;
const VOCAB: usize = 16384;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A 1-layer Llama checkpoint whose embedding and head are 64 MiB each, written from a
/// small buffer.
fn write_checkpoint(dir: &std::path::Path) {
    let h = HIDDEN;
    let mut tensors = vec![
        ("lm_head.weight".to_string(), vec![VOCAB, h]),
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    let p = "model.layers.0.";
    for (n, s) in [
        ("input_layernorm.weight", vec![h]),
        ("post_attention_layernorm.weight", vec![h]),
        ("self_attn.q_proj.weight", vec![h, h]),
        ("self_attn.k_proj.weight", vec![h, h]),
        ("self_attn.v_proj.weight", vec![h, h]),
        ("self_attn.o_proj.weight", vec![h, h]),
        ("mlp.gate_proj.weight", vec![64, h]),
        ("mlp.up_proj.weight", vec![64, h]),
        ("mlp.down_proj.weight", vec![h, 64]),
    ] {
        tensors.push((format!("{p}{n}"), s));
    }
    let planned: Vec<PlannedTensor> = tensors
        .into_iter()
        .map(|(name, shape)| PlannedTensor {
            name,
            dtype: DType::F32,
            shape,
        })
        .collect();
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    write_header(&mut f, &planned).unwrap();
    let block = vec![0x3cu8; 1 << 20];
    for t in &planned {
        let mut left = t.nbytes();
        while left > 0 {
            let n = left.min(block.len());
            f.write_all(&block[..n]).unwrap();
            left -= n;
        }
    }
    f.flush().unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"model_type":"llama","hidden_size":{HIDDEN},"intermediate_size":64,
            "num_hidden_layers":1,"num_attention_heads":8,"vocab_size":{VOCAB},
            "torch_dtype":"float32","tie_word_embeddings":false}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
}

#[test]
fn peak_memory_stays_below_one_large_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model");
    std::fs::create_dir(&src).unwrap();
    write_checkpoint(&src);
    let size = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(size > 140 << 20, "{size}");
    let before = peak_rss_kib();
    split(
        &src,
        &tmp.path().join("out"),
        &SplitOptions {
            text_shards: 1,
            ..SplitOptions::default()
        },
    )
    .unwrap();
    let peak = peak_rss_kib();
    // The largest tensor alone is 64 MiB; streaming keeps the peak far below it.
    assert!(
        peak < before + 32 * 1024,
        "peak RSS {peak} KiB (before split {before} KiB) for a {} MiB checkpoint",
        size >> 20
    );
    eprintln!(
        "split of {} MiB: peak RSS {} KiB (before {} KiB)",
        size >> 20,
        peak,
        before
    );
}
