//! Reading single-file and sharded checkpoints, and refusing bad indexes.

use std::path::{Path, PathBuf};

use unfed_model::{Checkpoint, DType, ModelConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

#[test]
fn sharded_checkpoint_reads_every_file_of_the_index() {
    let dir = fixture("qwen2-sharded");
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.files().count(), 4);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let listed = index["weight_map"].as_object().unwrap();
    assert_eq!(ckpt.tensors().count(), listed.len());
    for name in listed.keys() {
        assert!(ckpt.contains(name), "{name}");
    }
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let h = cfg.text.hidden_size;
    let emb = ckpt.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.shape, [cfg.text.vocab_size, h]);
    assert_eq!(emb.bytes.len(), cfg.text.vocab_size * h * 4);
    assert_eq!(ckpt.dominant_dtype(), Some(DType::F32));
}

#[test]
fn dtypes_come_from_the_files() {
    for (name, dtype) in [
        ("qwen2-f16", DType::F16),
        ("qwen2-bf16", DType::Bf16),
        ("llama-f32", DType::F32),
    ] {
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        assert!(ckpt.tensors().all(|t| t.dtype == dtype), "{name}");
        assert_eq!(ModelConfig::from_dir(&fixture(name)).unwrap().dtype, dtype);
    }
}

fn copy_sharded(to: &Path) -> PathBuf {
    let dst = to.join("m");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture("qwen2-sharded")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn index_entries_must_stay_inside_and_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_sharded(tmp.path());
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();

    let escaped = text.replacen(
        "\"model-00001-of-00004.safetensors\"",
        "\"../evil.safetensors\"",
        1,
    );
    std::fs::write(&index, &escaped).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(err.contains("points outside the model directory"), "{err}");

    std::fs::write(&index, &text).unwrap();
    std::fs::remove_file(dir.join("model-00003-of-00004.safetensors")).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains(
            "model.safetensors.index.json: lists model-00003-of-00004.safetensors, which is missing"
        ),
        "{err}"
    );
}

#[test]
fn corrupt_headers_are_reported_with_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("model.safetensors");
    std::fs::write(&f, [1, 2, 3]).unwrap();
    let err = Checkpoint::open(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors: truncated safetensors file"),
        "{err}"
    );
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&f, bytes).unwrap();
    let err = Checkpoint::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("header claims 1000000 bytes"), "{err}");
}
