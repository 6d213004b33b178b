//! builtin:tiny is deterministic, loads as a HuggingFace checkpoint, has a working
//! byte-level BPE tokenizer, and splits/verifies.

use std::time::Instant;

use unfed_model::builtin::{TINY_LAYERS, materialise, write_tiny};
use unfed_model::split::{SplitOptions, split};
use unfed_model::verify::verify;
use unfed_model::{Architecture, Checkpoint, DType, ModelConfig};

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn byte_identical_across_runs_and_fast() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = Instant::now();
    write_tiny(a.path()).unwrap();
    let took = start.elapsed();
    write_tiny(b.path()).unwrap();
    let (fa, fb) = (files(a.path()), files(b.path()));
    assert_eq!(
        fa.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert!(fa == fb, "two runs differ");
    // Debug builds of this crate are unoptimised; release is far below this.
    assert!(took.as_secs_f64() < 5.0, "took {took:?}");
}

#[test]
fn is_a_real_qwen2_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path()).unwrap();
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    assert_eq!(cfg.architecture, Architecture::Qwen2);
    assert_eq!(cfg.dtype, DType::Bf16);
    assert_eq!(cfg.text.num_hidden_layers, TINY_LAYERS);
    assert!(
        cfg.text.num_key_value_heads < cfg.text.num_attention_heads,
        "GQA"
    );
    // Untied: the head is solved from corpus bigrams (see builtin::head).
    assert!(!cfg.text.tie_word_embeddings);
    assert!(
        cfg.text.eos_token_ids.len() >= 2,
        "{:?}",
        cfg.text.eos_token_ids
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let emb = ckpt.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.shape, [cfg.text.vocab_size, cfg.text.hidden_size]);
    // Weights are spread, not constant.
    let vals: Vec<f32> = emb
        .bytes
        .chunks(2)
        .take(1000)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let mean = vals.iter().sum::<f32>() / vals.len() as f32;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
    assert!(mean.abs() < 0.1 && var > 0.1, "{mean} {var}");
    let head = ckpt.tensor("lm_head.weight").unwrap();
    assert_eq!(head.shape, [cfg.text.vocab_size, cfg.text.hidden_size]);
}

#[test]
fn tokenizer_loads_in_hf_tokenizers_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 512);
    for text in [
        "Hello! What can you do?",
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b\n",
        "Unseen wörds, émojis 🚀 and 12345 digits",
    ] {
        let enc = tok.encode(text, false).unwrap();
        let ids = enc.get_ids();
        assert!(ids.iter().all(|&i| i < 512));
        let decoded = tok.decode(ids, false).unwrap();
        assert_eq!(decoded, text);
    }
    // Merges learned from the corpus make common words short.
    let enc = tok.encode("The model", false).unwrap();
    assert!(enc.get_ids().len() <= 3, "{:?}", enc.get_tokens());
    // Specials are single tokens.
    let enc = tok.encode("<|im_start|>user", false).unwrap();
    assert_eq!(enc.get_tokens()[0], "<|im_start|>");
}

#[test]
fn splits_and_verifies() {
    let src = materialise("builtin:tiny").unwrap().unwrap();
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("shards");
    let m = split(
        src.dir(),
        &out,
        &SplitOptions {
            text_shards: 4,
            ..SplitOptions::default()
        },
    )
    .unwrap();
    assert_eq!(m.model_id, "builtin-tiny");
    assert!(verify(&out).is_empty(), "{:?}", verify(&out));
    assert!(
        m.shards[3]
            .tensors
            .iter()
            .any(|t| t.name == "lm_head.weight")
    );
    assert!(out.join("tokenizer_config.json").is_file());
}

#[test]
fn unknown_builtin_is_a_clear_error() {
    let err = materialise("builtin:huge").err().unwrap().to_string();
    assert_eq!(
        err,
        "unknown built-in model `huge`; available: builtin:tiny"
    );
    assert!(materialise("models/x").unwrap().is_none());
}

/// The committed transformers reference (tests/fixtures/builtin-tiny.reference.json) was
/// computed from exactly these weights, and the Rust tokenizer agrees with Python's.
#[test]
fn matches_the_committed_transformers_reference() {
    use sha2::{Digest, Sha256};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/builtin-tiny.reference.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_tiny(dir.path()).unwrap();
    let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&weights)),
        reference["model_safetensors_sha256"].as_str().unwrap(),
        "builtin:tiny's weights changed; regenerate the reference \
         (see tests/fixtures/make_builtin_reference.py)"
    );
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap().get_ids(), ids, "{text}");
        let generated: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.decode(&generated, false).unwrap(),
            case["generated_text"].as_str().unwrap()
        );
    }
}
