//! The single-process engine over each unsplit fixture checkpoint is token-identical
//! to transformers' greedy output (reference.json, computed in float32).

mod common;

use serde_json::Value;
use unfed_node::engine::SamplingConfig;
use unfed_node::engine::generate::{generate, load_checkpoint};

/// The engine's greedy tokens for a reference case, as many as the reference has.
fn greedy(model: &unfed_node::engine::ShardModel, case: &common::Case) -> Vec<u32> {
    generate(
        model,
        &case.prompt_ids,
        case.generated_ids.len(),
        SamplingConfig::default(),
        true,
    )
    .unwrap()
    .tokens
}

#[test]
fn greedy_generation_matches_transformers_for_every_fixture() {
    let mut checked = 0;
    for (name, dir, reference) in common::fixtures() {
        let (_, model) = load_checkpoint(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for case in &reference.cases {
            assert_eq!(
                greedy(&model, case),
                case.generated_ids,
                "{name}: prompt {:?}",
                case.prompt_ids
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} cases checked");
}

#[test]
fn rope_frequencies_are_transformers_own_to_the_bit() {
    let mut checked = Vec::new();
    for (name, dir, reference) in common::fixtures() {
        let Some(want) = reference.rope_inv_freq else {
            continue;
        };
        let cfg = unfed_model::config::ModelConfig::from_dir(&dir).unwrap();
        let got = cfg.text.rope_inv_freq();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{name}: {got:?} against {want:?}");
        checked.push(name);
    }
    assert!(
        checked.iter().any(|n| n.starts_with("llama3-rope")),
        "no scaled-rope fixture checked: {checked:?}"
    );
}

/// Greedy tokens of `fixture` with its config.json edited by `edit`: how many of its
/// reference cases they miss.
fn cases_missed_with(fixture: &str, edit: impl Fn(&mut serde_json::Map<String, Value>)) -> usize {
    let (_, dir, reference) = common::fixtures()
        .into_iter()
        .find(|f| f.0 == fixture)
        .unwrap_or_else(|| panic!("no fixture {fixture}"));
    let plain = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        std::fs::copy(&path, plain.path().join(path.file_name().unwrap())).unwrap();
    }
    let config = plain.path().join("config.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    edit(json.as_object_mut().unwrap());
    std::fs::write(&config, serde_json::to_string(&json).unwrap()).unwrap();
    let (_, model) = load_checkpoint(plain.path()).unwrap();
    reference
        .cases
        .iter()
        .filter(|case| greedy(&model, case) != case.generated_ids)
        .count()
}

/// The controls of the fixtures for one feature each: without the feature in their
/// config.json, the same weights generate other tokens, so their references test it.
#[test]
fn the_rope_scaling_sliding_window_and_qk_norm_fixtures_differ_without_them() {
    let no_rope_scaling = |c: &mut serde_json::Map<String, Value>| {
        assert!(c.remove("rope_parameters").is_some() | c.remove("rope_scaling").is_some());
        c.insert("rope_theta".into(), 10000.0.into());
    };
    assert!(cases_missed_with("llama3-rope-f32", no_rope_scaling) > 0);
    let no_window = |c: &mut serde_json::Map<String, Value>| {
        assert!(c.insert("sliding_window".into(), Value::Null).is_some());
        c.remove("layer_types");
    };
    assert!(cases_missed_with("mistral-window-f32", no_window) > 0);
    assert!(cases_missed_with("qwen2-window-f32", no_window) > 0);
    // Qwen2 slides only from max_window_layers on: sliding every layer differs too.
    let all_layers = |c: &mut serde_json::Map<String, Value>| {
        c.remove("layer_types");
        c.insert("max_window_layers".into(), 0.into());
    };
    assert!(cases_missed_with("qwen2-window-f32", all_layers) > 0);
    // Read as Qwen2 without biases, Qwen3 runs without its per-head q/k norms.
    let no_qk_norm = |c: &mut serde_json::Map<String, Value>| {
        c.insert("model_type".into(), "qwen2".into());
        c.insert("attention_bias".into(), false.into());
    };
    assert!(cases_missed_with("qwen3-f32", no_qk_norm) > 0);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_with_the_sizes() {
    let (name, dir, _) = common::fixtures().remove(0);
    let (cfg, model) = load_checkpoint(&dir).unwrap();
    let too_long = vec![1u32; cfg.text.max_position_embeddings + 1];
    let err = generate(&model, &too_long, 1, SamplingConfig::default(), true)
        .err()
        .expect(&name);
    let msg = format!("{err:#}");
    assert!(
        msg.contains("context overflow")
            && msg.contains(&cfg.text.max_position_embeddings.to_string()),
        "{msg}"
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_differs_from_greedy() {
    let (_, dir, reference) = common::fixtures().remove(0);
    let (_, model) = load_checkpoint(&dir).unwrap();
    let prompt = &reference.cases[0].prompt_ids;
    let sampled = |seed| {
        let s = SamplingConfig {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed,
            sampled_before: 0,
        };
        generate(&model, prompt, 16, s, false).unwrap().tokens
    };
    assert_eq!(sampled(7), sampled(7));
    assert_ne!(sampled(7), sampled(8));
    assert_ne!(
        sampled(7),
        generate(&model, prompt, 16, SamplingConfig::default(), false)
            .unwrap()
            .tokens
    );
}
