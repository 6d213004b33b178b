//! `builtin:tiny`: a small Qwen2-layout checkpoint in HuggingFace format, built
//! deterministically (same bytes on every run and machine) so the default testnet needs
//! no download. The tokenizer is a real byte-level BPE learned from an embedded corpus;
//! the layers are random from a seeded generator; the LM head is solved so that the
//! model continues text like the corpus's bigram statistics (see `head`).

mod bpe;
mod head;
mod rng;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{Value, json};

use crate::config::DType;
use crate::error::{ModelError, Result, io_err};
use crate::safetensors_io::{PlannedTensor, write_header};
use rng::SplitMix64;

pub const TINY_SPEC: &str = "builtin:tiny";
pub const TINY_ID: &str = "builtin-tiny";
pub const TINY_LAYERS: usize = 6;
const HIDDEN: usize = 128;
const INTERMEDIATE: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 512;
const SEED: u64 = 0x756E_6665_6421; // "unfed!"
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CORPUS: &str = include_str!("corpus.txt");
const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Writes the tiny model into `dir` (created if needed): config.json,
/// generation_config.json, model.safetensors (bf16), tokenizer.json, tokenizer_config.json.
pub fn write_tiny(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let bpe = bpe::train(CORPUS, VOCAB, &SPECIALS);
    let id = |t: &str| bpe.id(t).expect("special token in vocab");
    let (eos, im_end) = (id("<|endoftext|>"), id("<|im_end|>"));

    write_json(&dir.join("config.json"), &config_json(eos))?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({ "bos_token_id": eos, "eos_token_id": [im_end, eos], "pad_token_id": eos, "do_sample": false }),
    )?;
    write_json(&dir.join("tokenizer.json"), &bpe.to_json())?;
    let added: serde_json::Map<String, Value> = SPECIALS
        .iter()
        .map(|s| {
            (
                id(s).to_string(),
                json!({ "content": s, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true }),
            )
        })
        .collect();
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": false,
            "added_tokens_decoder": added,
            "bos_token": null,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "model_max_length": 1024,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast"
        }),
    )?;
    write_weights(&dir.join("model.safetensors"), &bpe)
}

fn config_json(eos: u32) -> Value {
    json!({
        "_name_or_path": TINY_ID,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0"
    })
}

/// Every random tensor: name -> (shape, std, mean), drawn in name order.
fn random_tensors() -> BTreeMap<String, (Vec<usize>, f32, f32)> {
    let mut t = BTreeMap::new();
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut add = |name: String, shape: &[usize], std: f32, mean: f32| {
        t.insert(name, (shape.to_vec(), std, mean));
    };
    // The layers are real and random, but their outputs into the residual stream
    // (o_proj, down_proj) are small, so the bigram head below still reads mostly the
    // current token's embedding: the model says corpus-like text, and every layer still
    // moves the logits (a wrong layer implementation changes tokens).
    let (w, out) = (0.1, 0.004);
    add(
        "model.embed_tokens.weight".into(),
        &[VOCAB, HIDDEN],
        1.0,
        0.0,
    );
    add("model.norm.weight".into(), &[HIDDEN], 0.05, 1.0);
    for l in 0..TINY_LAYERS {
        let p = format!("model.layers.{l}.");
        add(format!("{p}input_layernorm.weight"), &[HIDDEN], 0.05, 1.0);
        add(
            format!("{p}post_attention_layernorm.weight"),
            &[HIDDEN],
            0.05,
            1.0,
        );
        add(format!("{p}self_attn.q_proj.weight"), &[q, HIDDEN], w, 0.0);
        add(format!("{p}self_attn.q_proj.bias"), &[q], 0.05, 0.0);
        add(format!("{p}self_attn.k_proj.weight"), &[kv, HIDDEN], w, 0.0);
        add(format!("{p}self_attn.k_proj.bias"), &[kv], 0.05, 0.0);
        add(format!("{p}self_attn.v_proj.weight"), &[kv, HIDDEN], w, 0.0);
        add(format!("{p}self_attn.v_proj.bias"), &[kv], 0.05, 0.0);
        add(
            format!("{p}self_attn.o_proj.weight"),
            &[HIDDEN, q],
            out,
            0.0,
        );
        add(
            format!("{p}mlp.gate_proj.weight"),
            &[INTERMEDIATE, HIDDEN],
            w,
            0.0,
        );
        add(
            format!("{p}mlp.up_proj.weight"),
            &[INTERMEDIATE, HIDDEN],
            w,
            0.0,
        );
        add(
            format!("{p}mlp.down_proj.weight"),
            &[HIDDEN, INTERMEDIATE],
            out,
            0.0,
        );
    }
    t
}

fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// All tensors (values already rounded to bf16), sorted by name.
fn weights(bpe: &bpe::Bpe) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix64::new(SEED);
    let mut out = BTreeMap::new();
    for (name, (shape, std, mean)) in random_tensors() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| bf16_round(mean + std * rng.normal() as f32))
            .collect();
        out.insert(name, (shape, values));
    }
    let head = head::bigram_head(
        &out["model.embed_tokens.weight"].1,
        &out["model.norm.weight"].1,
        &head::bigram_targets(&bpe.encode(CORPUS), VOCAB),
        HIDDEN,
    );
    let head = head.into_iter().map(bf16_round).collect();
    out.insert("lm_head.weight".into(), (vec![VOCAB, HIDDEN], head));
    out
}

fn write_weights(path: &Path, bpe: &bpe::Bpe) -> Result<()> {
    let tensors = weights(bpe);
    let planned: Vec<PlannedTensor> = tensors
        .iter()
        .map(|(name, (shape, _))| PlannedTensor {
            name: name.clone(),
            dtype: DType::Bf16,
            shape: shape.clone(),
        })
        .collect();
    let file = File::create(path).map_err(io_err(path))?;
    let mut out = BufWriter::new(file);
    let result = (|| -> std::io::Result<()> {
        write_header(&mut out, &planned)?;
        for (_, values) in tensors.values() {
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect();
            out.write_all(&bytes)?;
        }
        out.flush()
    })();
    result.map_err(io_err(path))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON serialises");
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// A built-in model written to a temporary directory (removed on drop).
pub struct Materialised {
    tmp: tempfile::TempDir,
    id: &'static str,
}

impl Materialised {
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
    pub fn model_id(&self) -> &str {
        self.id
    }
}

/// `Some` when `spec` names a built-in model (`builtin:tiny`), written to a temp dir;
/// `None` for anything else (a path).
pub fn materialise(spec: &str) -> Result<Option<Materialised>> {
    let Some(name) = spec.strip_prefix("builtin:") else {
        return Ok(None);
    };
    if spec != TINY_SPEC {
        return Err(ModelError::Invalid {
            msg: format!("unknown built-in model `{name}`; available: {TINY_SPEC}"),
        });
    }
    let tmp = tempfile::tempdir().map_err(io_err(std::env::temp_dir()))?;
    write_tiny(tmp.path())?;
    Ok(Some(Materialised { tmp, id: TINY_ID }))
}
