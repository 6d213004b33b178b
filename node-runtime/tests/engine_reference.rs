//! The single-process engine over each unsplit fixture checkpoint is token-identical
//! to transformers' greedy output (reference.json, computed in float32).

mod common;

use unfed_node::engine::SamplingConfig;
use unfed_node::engine::generate::{generate, load_checkpoint};

#[test]
fn greedy_generation_matches_transformers_for_every_fixture() {
    let mut checked = 0;
    for (name, dir, reference) in common::fixtures() {
        let (_, model) = load_checkpoint(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        for case in &reference.cases {
            let got = generate(
                &model,
                &case.prompt_ids,
                case.generated_ids.len(),
                SamplingConfig::default(),
                true,
            )
            .unwrap()
            .tokens;
            assert_eq!(
                got, case.generated_ids,
                "{name}: prompt {:?}",
                case.prompt_ids
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} cases checked");
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
