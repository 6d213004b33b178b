//! split → verify round trips on the committed transformers fixtures, corruption
//! detection, and bad inputs that must fail cleanly and leave no output.

use std::path::{Path, PathBuf};

use unfed_model::split::{SplitOptions, split};
use unfed_model::verify::verify;
use unfed_model::{Checkpoint, Manifest, ModelConfig, Stack};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name)
}

const FIXTURES: &[&str] = &[
    "qwen2-f32",
    "qwen2-f16",
    "qwen2-bf16",
    "qwen2-sharded",
    "llama-f32",
    "llama-bf16",
    "llama3-rope-f32",
    "mistral-f32",
    "mistral-window-f32",
    "qwen2-window-f32",
    "qwen3-f32",
    "idefics3-f32",
];

fn opts(n: usize) -> SplitOptions {
    SplitOptions {
        text_shards: n,
        ..SplitOptions::default()
    }
}

/// Only the output dir itself may appear in its parent: no temp leftovers.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn every_fixture_splits_and_verifies() {
    for name in FIXTURES {
        let src = fixture(name);
        let cfg = ModelConfig::from_dir(&src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let m = split(&src, &out, &opts(3)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(entries(tmp.path()), vec!["out"], "{name}: leftovers");
        let problems = verify(&out);
        assert!(problems.is_empty(), "{name}: {problems:?}");
        assert_eq!(m.model_id, *name);
        assert_eq!(m.text_shards().count(), 3, "never changes N");
        let layers = cfg.text.num_hidden_layers;
        let sizes: Vec<usize> = m
            .text_shards()
            .map(|s| s.layer_end - s.layer_start)
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), layers);
        // Uneven split (4 or 5 or 6 layers into 3): the first shards take the extra.
        assert!(
            sizes.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1),
            "{sizes:?}"
        );
        // dtype preserved on disk
        for s in &m.shards {
            for t in &s.tensors {
                assert_eq!(t.dtype, cfg.dtype, "{name}: {}", t.name);
            }
        }
        for f in [
            "config.json",
            "tokenizer.json",
            "manifest.json",
            "generation_config.json",
        ] {
            assert!(out.join(f).is_file(), "{name}: {f} not copied");
        }
    }
}

#[test]
fn shard_tensors_are_byte_identical_to_the_source() {
    for name in ["qwen2-sharded", "qwen2-bf16", "llama-f32"] {
        let src_dir = fixture(name);
        let src = Checkpoint::open(&src_dir).unwrap();
        let cfg = ModelConfig::from_dir(&src_dir).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let m = split(&src_dir, &out, &opts(2)).unwrap();
        let mut seen = 0;
        for s in &m.shards {
            let shard = Checkpoint::open_files(&out, &[s.file.as_str()]).unwrap();
            for t in &s.tensors {
                let got = shard.tensor(&t.name).unwrap();
                let source_name = if src.contains(&t.name) {
                    t.name.clone()
                } else {
                    assert_eq!(t.name, "lm_head.weight");
                    assert!(
                        cfg.text.tie_word_embeddings,
                        "{name}: head absent but not tied"
                    );
                    format!("{}embed_tokens.weight", cfg.text_prefix)
                };
                let want = src.tensor(&source_name).unwrap();
                assert_eq!(got.shape, want.shape, "{name}: {}", t.name);
                assert!(got.bytes == want.bytes, "{name}: {} bytes differ", t.name);
                seen += 1;
            }
        }
        // Every source tensor lands somewhere (plus the materialised head when tied).
        let extra = usize::from(!src.contains("lm_head.weight"));
        assert_eq!(seen, src.tensors().count() + extra, "{name}");
        let last = m.shards.last().unwrap();
        assert!(last.has_head && last.tensors.iter().any(|t| t.name == "lm_head.weight"));
        assert!(
            m.shards[0]
                .tensors
                .iter()
                .any(|t| t.name.ends_with("embed_tokens.weight"))
        );
    }
}

#[test]
fn flipping_one_byte_fails_verify_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    split(&fixture("qwen2-f16"), &out, &opts(2)).unwrap();
    let victim = out.join("text_shard_1.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let problems = verify(&out);
    assert!(!problems.is_empty());
    assert!(
        problems
            .iter()
            .all(|p| p.file == "text_shard_1.safetensors"),
        "{problems:?}"
    );
    assert!(problems.iter().any(|p| p.to_string().contains("sha256")));
}

#[test]
fn verify_reports_missing_files_escaping_paths_and_gaps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    split(&fixture("llama-f32"), &out, &opts(2)).unwrap();
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    let mut m = Manifest::load(&out).unwrap();
    m.shards[0].file = "../text_shard_0.safetensors".into();
    m.shards[1].layer_start += 1; // layer gap
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = verify(&out).iter().map(ToString::to_string).collect();
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    assert!(has("tokenizer.json: missing"), "{lines:?}");
    assert!(
        has("../text_shard_0.safetensors: path leaves the split directory"),
        "{lines:?}"
    );
    assert!(has("are in no shard"), "{lines:?}");
}

#[test]
fn verify_checks_shapes_against_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    split(&fixture("qwen2-f32"), &out, &opts(1)).unwrap();
    let mut m = Manifest::load(&out).unwrap();
    m.config.text.intermediate_size = 256;
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = verify(&out).iter().map(ToString::to_string).collect();
    assert!(
        lines.iter().any(|l| l.starts_with("text_shard_0.safetensors: tensor `model.layers.0.mlp.gate_proj.weight` has shape [128, 64], the config implies [256, 64]")),
        "{lines:?}"
    );
}

fn expect_clean_failure(src: &Path, o: SplitOptions, needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = split(src, &out, &o).unwrap_err().to_string();
    assert!(err.contains(needle), "{err}");
    assert!(
        entries(tmp.path()).is_empty(),
        "left {:?}",
        entries(tmp.path())
    );
}

/// A copy of a fixture to damage.
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// Adds an f32 tensor of `len` zeros named `name` to a single-file checkpoint.
fn add_tensor(dir: &Path, name: &str, len: usize) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    header[name] = serde_json::json!({
        "dtype": "F32",
        "shape": [len],
        "data_offsets": [data.len(), data.len() + 4 * len],
    });
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out.extend(vec![0u8; 4 * len]);
    std::fs::write(&path, out).unwrap();
}

#[test]
fn decoder_tensors_the_engine_would_not_run_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    for (fixture, extra) in [
        ("llama-f32", "model.layers.2.self_attn.o_proj.bias"),
        ("qwen2-f32", "model.layers.0.self_attn.q_norm.weight"),
        ("mistral-f32", "model.layers.3.mlp.down_proj.bias"),
    ] {
        let dir = copy_fixture(fixture, work.path());
        add_tensor(&dir, extra, 64);
        expect_clean_failure(
            &dir,
            opts(2),
            &format!("hold 1 tensor(s) unfed does not run, such as `{extra}`"),
        );
    }
    // RoPE frequencies saved by old checkpoints are not weights: the split goes on.
    let dir = copy_fixture("llama-bf16", work.path());
    add_tensor(&dir, "model.layers.0.self_attn.rotary_emb.inv_freq", 8);
    let out = work.path().join("inv-freq-split");
    split(&dir, &out, &opts(2)).unwrap();
}

#[test]
fn bad_inputs_fail_clearly_and_leave_nothing() {
    let work = tempfile::tempdir().unwrap();
    // shards > layers
    expect_clean_failure(
        &fixture("qwen2-f32"),
        opts(5),
        "--text-shards 5: the model has only 4 text layers",
    );
    expect_clean_failure(&fixture("qwen2-f32"), opts(0), "need at least one shard");
    expect_clean_failure(
        &fixture("qwen2-f32"),
        SplitOptions {
            vision_shards: Some(1),
            ..opts(1)
        },
        "has no vision tower",
    );
    // missing config
    let no_cfg = copy_fixture("llama-f32", work.path());
    std::fs::remove_file(no_cfg.join("config.json")).unwrap();
    expect_clean_failure(&no_cfg, opts(1), "no config.json");
    // truncated safetensors
    let trunc = copy_fixture("mistral-f32", work.path());
    let f = trunc.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_clean_failure(&trunc, opts(1), "truncated safetensors file");
    // unknown architecture
    let gpt = copy_fixture("qwen2-f16", work.path());
    let cfg = std::fs::read_to_string(gpt.join("config.json"))
        .unwrap()
        .replace("\"qwen2\"", "\"gpt2\"");
    std::fs::write(gpt.join("config.json"), cfg).unwrap();
    expect_clean_failure(
        &gpt,
        opts(1),
        "unsupported architecture gpt2; supported: qwen2, qwen3, llama, mistral, idefics3",
    );
}

#[test]
fn refuses_a_non_empty_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let err = split(&fixture("qwen2-f32"), &out, &opts(1)).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(entries(&out), vec!["keep.txt"]);
    assert_eq!(entries(tmp.path()), vec!["out"]);
}

#[test]
fn manifest_has_no_paths_and_lists_vision_none() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let m = split(&fixture("qwen2-sharded"), &out, &opts(6)).unwrap();
    assert_eq!(m.model_id, "qwen2-sharded");
    assert!(m.shards.iter().all(|s| s.stack == Stack::Text));
    let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(!text.contains(tmp.path().to_str().unwrap()));
    assert!(!text.contains("fixtures"));
}

/// A split made by a build with another manifest format is refused for serving, naming
/// both formats and the fix; this build's own split loads.
#[test]
fn a_split_in_another_format_is_refused_for_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    split(&fixture("llama3-rope-f32"), &out, &opts(2)).unwrap();
    let loaded = Manifest::load_current(&out).unwrap();
    assert_eq!(loaded.format_version, unfed_model::manifest::FORMAT_VERSION);
    let path = out.join("manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["format_version"] = 1.into();
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let err = Manifest::load_current(&out).unwrap_err().to_string();
    assert!(
        err.contains("is split format 1, this build reads format 2")
            && err.contains("split the model again"),
        "{err}"
    );
}

#[test]
fn idefics3_vision_shards_hold_embeddings_encoder_and_connector() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let m = split(
        &fixture("idefics3-f32"),
        &out,
        &SplitOptions {
            text_shards: 2,
            vision_shards: Some(2),
            ..SplitOptions::default()
        },
    )
    .unwrap();
    assert!(verify(&out).is_empty(), "{:?}", verify(&out));
    let vision: Vec<_> = m.vision_shards().collect();
    assert_eq!(vision.len(), 2);
    assert_eq!((vision[0].layer_start, vision[0].layer_end), (0, 2));
    assert_eq!((vision[1].layer_start, vision[1].layer_end), (2, 3));
    assert_eq!(vision[0].file, "vision_shard_0.safetensors");
    let has = |s: &unfed_model::ShardEntry, n: &str| s.tensors.iter().any(|t| t.name == n);
    assert!(has(
        vision[0],
        "model.vision_model.embeddings.patch_embedding.weight"
    ));
    assert!(has(
        vision[0],
        "model.vision_model.embeddings.position_embedding.weight"
    ));
    assert!(has(
        vision[0],
        "model.vision_model.encoder.layers.1.mlp.fc2.bias"
    ));
    assert!(!has(
        vision[0],
        "model.vision_model.encoder.layers.2.mlp.fc2.bias"
    ));
    assert!(has(vision[1], "model.vision_model.post_layernorm.weight"));
    assert!(has(
        vision[1],
        "model.connector.modality_projection.proj.weight"
    ));
    let text: Vec<_> = m.text_shards().collect();
    assert!(has(text[0], "model.text_model.embed_tokens.weight"));
    assert!(has(text[1], "model.text_model.norm.weight"));
    assert!(has(text[1], "lm_head.weight"));
    // Every source tensor is in exactly one shard.
    let src = Checkpoint::open(&fixture("idefics3-f32")).unwrap();
    let total: usize = m.shards.iter().map(|s| s.tensors.len()).sum();
    assert_eq!(total, src.tensors().count());
    let v = m.config.vision.as_ref().unwrap();
    assert_eq!((v.scale_factor, v.image_size, v.patch_size), (2, 64, 16));

    // More vision shards than encoder layers is refused.
    let err = split(
        &fixture("idefics3-f32"),
        &tmp.path().join("out2"),
        &SplitOptions {
            text_shards: 1,
            vision_shards: Some(4),
            ..SplitOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("--vision-shards 4: the model has only 3 vision encoder layers"),
        "{err}"
    );
}

#[test]
fn verify_reports_tensors_outside_the_shard_or_unlisted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    split(&fixture("llama-f32"), &out, &opts(2)).unwrap();
    // Claim shard 0 covers one layer less: its layer-1 tensors are now out of range.
    let mut m = Manifest::load(&out).unwrap();
    m.shards[0].layer_end = 1;
    m.shards[1].layer_start = 1;
    m.shards[0]
        .tensors
        .retain(|t| !t.name.ends_with("mlp.up_proj.weight"));
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = verify(&out).iter().map(ToString::to_string).collect();
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    assert!(
        has(
            "text_shard_0.safetensors: tensor `model.layers.1.mlp.down_proj.weight` belongs to layer 1, outside this shard's layers 0..1"
        ),
        "{lines:?}"
    );
    assert!(
        has(
            "text_shard_0.safetensors: tensor `model.layers.0.mlp.up_proj.weight` is in the file but not in the manifest"
        ),
        "{lines:?}"
    );
    assert!(
        has(
            "text_shard_1.safetensors: tensor `model.layers.1.input_layernorm.weight` needed for layers 1..4 is missing"
        ),
        "{lines:?}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn staging_left_by_a_killed_split_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    // No process has this pid (above the kernel's maximum).
    let dead = tmp.path().join(".out.partial-4999999-abc");
    std::fs::create_dir(&dead).unwrap();
    std::fs::write(dead.join("text_shard_0.safetensors"), "half").unwrap();
    let live = tmp
        .path()
        .join(format!(".out.partial-{}-xyz", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    split(&fixture("qwen2-f32"), &tmp.path().join("out"), &opts(1)).unwrap();
    assert!(!dead.exists());
    assert!(
        live.exists(),
        "a live process's staging dir must be left alone"
    );
}
