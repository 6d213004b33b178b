//! config.json parsing across transformers 4.x / 5.x spellings.

use unfed_model::{Architecture, DType, ModelConfig, ModelError, RopeScaling, SlidingWindow};

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
        "unsupported architecture gpt2; supported: qwen2, qwen3, llama, mistral, idefics3"
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

/// A Llama config around `rope` (a JSON member: `"rope_scaling": {...}` or similar).
fn llama_with(rope: &str) -> Result<ModelConfig, ModelError> {
    ModelConfig::from_json(&format!(
        r#"{{"model_type":"llama","hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":512,{rope}}}"#
    ))
}

#[test]
fn rope_scaling_of_both_transformers_spellings() {
    let llama3 = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    // Llama 3.2 as transformers 4.x writes it…
    let v4 = llama_with(
        r#""rope_theta":500000.0,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,
        "low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"}"#,
    )
    .unwrap();
    assert_eq!(v4.text.rope_scaling, llama3);
    assert_eq!(v4.text.rope_theta, 500000.0);
    // …and as 5.x does.
    let v5 = llama_with(
        r#""rope_parameters":{"rope_theta":500000.0,"factor":32.0,"high_freq_factor":4.0,
        "low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"}"#,
    )
    .unwrap();
    assert_eq!(v5.text, v4.text);
    // The legacy `type` key, and a null scaling.
    let linear = llama_with(r#""rope_scaling":{"type":"linear","factor":2.0}"#).unwrap();
    assert_eq!(
        linear.text.rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    let plain = llama_with(r#""rope_scaling":null"#).unwrap();
    assert_eq!(plain.text.rope_scaling, RopeScaling::Default);
}

#[test]
fn linear_and_llama3_frequencies() {
    let plain = llama_with(r#""rope_theta":10000.0"#).unwrap().text;
    let base = plain.rope_inv_freq();
    assert_eq!(base.len(), 8);
    let linear = llama_with(r#""rope_scaling":{"rope_type":"linear","factor":4.0}"#)
        .unwrap()
        .text;
    let scaled: Vec<f32> = base.iter().map(|f| f / 4.0).collect();
    assert_eq!(linear.rope_inv_freq(), scaled);
    // Wavelengths 2π·10000^(i/8): 6.3, 19.9, 62.8, 199, … against the bands 64/4 = 16
    // and 64/1 = 64: pair 0 kept, 1 and 2 blended, 3 onwards divided by 8.
    let l3 = llama_with(
        r#""rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":64}"#,
    )
    .unwrap()
    .text
    .rope_inv_freq();
    assert_eq!(l3[0], base[0]);
    for i in [1, 2] {
        assert!(
            l3[i] < base[i] && l3[i] > base[i] / 8.0,
            "pair {i} is blended"
        );
    }
    for i in 3..8 {
        assert_eq!(l3[i], base[i] / 8.0, "pair {i} is divided by the factor");
    }
}

#[test]
fn unsupported_or_incomplete_rope_scaling_is_refused_by_name() {
    let msg = |rope: &str| llama_with(rope).unwrap_err().to_string();
    let yarn = msg(r#""rope_scaling":{"rope_type":"yarn","factor":4.0}"#);
    assert!(
        yarn.contains("`rope_scaling.rope_type` \"yarn\" is not supported")
            && yarn.contains("default, linear, llama3"),
        "{yarn}"
    );
    let missing = msg(r#""rope_parameters":{"rope_type":"llama3","factor":8.0}"#);
    assert!(
        missing.contains("`rope_parameters.low_freq_factor` must be a positive number"),
        "{missing}"
    );
    let zero = msg(r#""rope_scaling":{"rope_type":"linear","factor":0}"#);
    assert!(zero.contains("`rope_scaling.factor`"), "{zero}");
    let equal = msg(
        r#""rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":2.0,
        "high_freq_factor":2.0,"original_max_position_embeddings":64}"#,
    );
    assert!(equal.contains("greater than low_freq_factor"), "{equal}");
}

#[test]
fn sliding_windows_follow_each_class_and_layer_types() {
    let cfg = |body: &str| {
        ModelConfig::from_json(&format!(
            r#"{{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":4,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":512,{body}}}"#
        ))
    };
    let window = |body: &str| cfg(body).unwrap().text.sliding_window;
    let all = |w| {
        Some(SlidingWindow {
            window: w,
            layers: vec![0, 1, 2, 3],
        })
    };
    // Mistral: every layer, 4096 when the key is absent (transformers' default), none if null.
    assert_eq!(window(r#""model_type":"mistral""#), all(4096));
    assert_eq!(
        window(r#""model_type":"mistral","sliding_window":8"#),
        all(8)
    );
    assert_eq!(
        window(r#""model_type":"mistral","sliding_window":null"#),
        None
    );
    // Qwen2: only with use_sliding_window, from max_window_layers on.
    let qwen = r#""model_type":"qwen2","sliding_window":8,"max_window_layers":2"#;
    assert_eq!(window(qwen), None);
    let on = window(&format!(r#"{qwen},"use_sliding_window":true"#)).unwrap();
    assert_eq!(on.layers, [2, 3]);
    let text = cfg(&format!(r#"{qwen},"use_sliding_window":true"#))
        .unwrap()
        .text;
    assert_eq!(text.attention_window(1), None);
    assert_eq!(text.attention_window(2), Some(8));
    // transformers 5.x lists the layers.
    let listed = window(
        r#""model_type":"qwen2","sliding_window":8,"layer_types":["sliding_attention",
        "full_attention","sliding_attention","full_attention"]"#,
    )
    .unwrap();
    assert_eq!(listed.layers, [0, 2]);
    // Llama has no windows.
    assert_eq!(window(r#""model_type":"llama","sliding_window":8"#), None);
    for bad in [
        r#""model_type":"qwen2","sliding_window":8,"layer_types":["full_attention"]"#,
        r#""model_type":"mistral","layer_types":["full_attention","full_attention","x","full_attention"]"#,
    ] {
        let e = cfg(bad).unwrap_err().to_string();
        assert!(e.contains("`layer_types` must be a list of 4"), "{e}");
    }
    let e = cfg(r#""model_type":"mistral","sliding_window":0"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`sliding_window` must be a positive integer or null"),
        "{e}"
    );
}

#[test]
fn qwen3_norms_each_head_and_has_no_qkv_bias() {
    let cfg = ModelConfig::from_json(
        r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":32,"vocab_size":512}"#,
    )
    .unwrap();
    assert_eq!(cfg.architecture, Architecture::Qwen3);
    assert!(cfg.text.qk_norm);
    assert!(!cfg.text.attention_bias);
    assert_eq!(cfg.text.head_dim, 32, "head_dim is not hidden / heads");
    let names: Vec<String> = unfed_model::layout::text_tensors(&cfg, 0..1, false, false)
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"model.layers.0.self_attn.q_norm.weight".to_string()));
    assert!(names.contains(&"model.layers.0.self_attn.k_norm.weight".to_string()));
}
