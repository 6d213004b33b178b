//! config.json parsing across transformers 4.x / 5.x spellings.

use unfed_model::{Architecture, DType, ModelConfig, ModelError};

#[test]
fn qwen2_transformers_4() {
    let cfg = ModelConfig::from_json(
        r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":4,"num_attention_heads":4,
        "num_key_value_heads":2,"rope_theta":1000000.0,"torch_dtype":"bfloat16",
        "vocab_size":512,"tie_word_embeddings":true,"eos_token_id":[3,4],"bos_token_id":1,
        "rms_norm_eps":1e-6,"max_position_embeddings":256,"hidden_act":"silu"}"#,
    )
    .unwrap();
    assert_eq!(cfg.architecture, Architecture::Qwen2);
    assert_eq!(cfg.dtype, DType::Bf16);
    assert_eq!(cfg.text.head_dim, 16);
    assert_eq!(cfg.text.rope_theta, 1e6);
    assert!(cfg.text.attention_bias, "qwen2 q/k/v carry a bias");
    assert!(cfg.text.tie_word_embeddings);
    assert_eq!(cfg.text.eos_token_ids, vec![3, 4]);
    assert_eq!(cfg.text.bos_token_id, Some(1));
    assert_eq!(cfg.text_prefix, "model.");
}

#[test]
fn llama_transformers_5_rope_parameters_and_dtype() {
    let cfg = ModelConfig::from_json(
        r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":4,"num_attention_heads":4,"vocab_size":512,"dtype":"float16",
        "rope_parameters":{"rope_theta":50000.0,"rope_type":"default"},"eos_token_id":2,
        "head_dim":32,"attention_bias":true}"#,
    )
    .unwrap();
    assert_eq!(cfg.architecture, Architecture::Llama);
    assert_eq!(cfg.dtype, DType::F16);
    assert_eq!(cfg.text.rope_theta, 50000.0);
    assert_eq!(cfg.text.num_key_value_heads, 4, "kv heads default to heads");
    assert_eq!(cfg.text.head_dim, 32);
    assert!(cfg.text.attention_bias);
    assert!(!cfg.text.tie_word_embeddings);
    assert_eq!(cfg.text.eos_token_ids, vec![2]);
}

#[test]
fn idefics3_nested_configs() {
    let cfg = ModelConfig::from_json(
        r#"{"model_type":"idefics3","scale_factor":4,"image_token_id":49190,
        "torch_dtype":"bfloat16",
        "text_config":{"model_type":"llama","hidden_size":576,"intermediate_size":1536,
          "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
          "vocab_size":49280,"rope_theta":100000},
        "vision_config":{"hidden_size":768,"intermediate_size":3072,"num_hidden_layers":12,
          "num_attention_heads":12,"image_size":512,"patch_size":16}}"#,
    )
    .unwrap();
    assert_eq!(cfg.architecture, Architecture::Idefics3);
    assert_eq!(cfg.text_prefix, "model.text_model.");
    assert_eq!(cfg.text.head_dim, 64);
    assert_eq!(cfg.text.num_key_value_heads, 3);
    let v = cfg.vision.unwrap();
    assert_eq!(
        (v.scale_factor, v.image_token_id, v.patch_size),
        (4, 49190, 16)
    );
}

#[test]
fn unsupported_architecture_lists_supported() {
    let err = ModelConfig::from_json(r#"{"model_type":"gpt2"}"#).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedArchitecture { .. }));
    assert_eq!(
        err.to_string(),
        "unsupported architecture gpt2; supported: qwen2, llama, mistral, idefics3"
    );
}

#[test]
fn bad_values_name_the_key() {
    let err = ModelConfig::from_json(
        r#"{"model_type":"llama","num_attention_heads":4,"num_key_value_heads":3}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    let err = ModelConfig::from_json(r#"{"model_type":"llama","torch_dtype":"int8"}"#).unwrap_err();
    assert!(err.to_string().contains("unsupported dtype"), "{err}");
}

#[test]
fn missing_config_names_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = ModelConfig::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::MissingConfig { .. }));
    assert!(err.to_string().contains("no config.json"), "{err}");
}
