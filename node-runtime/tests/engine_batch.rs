//! Batching sessions through one shard changes no session's numbers: prompts of
//! different lengths, decode steps at different positions and a session joining late,
//! run as batches, give logits bit-identical to each session run alone.

mod common;

use unfed_node::engine::generate::load_checkpoint;
use unfed_node::engine::model::{KvCache, ShardInput, ShardModel, ShardOutput};
use unfed_node::engine::sampling::argmax;

fn logits(out: ShardOutput) -> Vec<f32> {
    match out {
        ShardOutput::Logits(l) => l,
        ShardOutput::Hidden { .. } => panic!("the whole model ends in logits"),
    }
}

/// Greedy decode of one session alone: the logits of every step.
fn alone(model: &ShardModel, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out = vec![logits(
        model
            .forward(&mut cache, ShardInput::Tokens(prompt))
            .unwrap(),
    )];
    for _ in 1..steps {
        let next = [argmax(out.last().unwrap())];
        out.push(logits(
            model
                .forward(&mut cache, ShardInput::Tokens(&next))
                .unwrap(),
        ));
    }
    out
}

#[test]
fn batched_sessions_get_the_logits_they_get_alone() {
    for (name, dir, reference) in common::fixtures() {
        let (_, model) = load_checkpoint(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let prompts: Vec<Vec<u32>> = reference
            .cases
            .iter()
            .map(|c| c.prompt_ids.clone())
            .chain([vec![1, 2, 3, 4, 5, 6, 7]])
            .take(3)
            .collect();
        assert_eq!(prompts.len(), 3, "{name}: need three prompts");
        let steps = 6;
        // Session 2 joins two steps late, so prefill and decode rows share batches.
        let joins = [0usize, 0, 2];
        let expected: Vec<_> = prompts.iter().map(|p| alone(&model, p, steps)).collect();

        let mut caches: Vec<KvCache> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
        for tick in 0..steps + 2 {
            let inputs: Vec<Vec<u32>> = (0..prompts.len())
                .map(|s| match got[s].last() {
                    _ if tick < joins[s] || got[s].len() == steps => Vec::new(),
                    None => prompts[s].clone(),
                    Some(l) => vec![argmax(l)],
                })
                .collect();
            let (who, items): (Vec<usize>, Vec<_>) = caches
                .iter_mut()
                .zip(&inputs)
                .enumerate()
                .filter(|(_, (_, ids))| !ids.is_empty())
                .map(|(s, (c, ids))| (s, (c, ShardInput::Tokens(ids))))
                .unzip();
            for (s, out) in who.into_iter().zip(model.forward_batch(items)) {
                got[s].push(logits(out.unwrap()));
            }
        }
        for (s, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g.len(), steps, "{name}: session {s} steps");
            for (step, (a, b)) in g.iter().zip(e).enumerate() {
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name}: session {s} step {step} differs when batched");
            }
        }
    }
}

#[test]
fn a_bad_input_in_a_batch_fails_alone() {
    let (name, dir, reference) = common::fixtures().remove(0);
    let (cfg, model) = load_checkpoint(&dir).unwrap();
    let prompt = &reference.cases[0].prompt_ids;
    let bad = vec![cfg.text.vocab_size as u32 + 7];
    let (mut a, mut b) = (model.new_cache(), model.new_cache());
    let outs = model.forward_batch(vec![
        (&mut a, ShardInput::Tokens(&bad)),
        (&mut b, ShardInput::Tokens(prompt)),
    ]);
    let msg = format!("{:#}", outs[0].as_ref().err().expect("bad id refused"));
    assert!(msg.contains("outside the vocabulary"), "{name}: {msg}");
    assert!(outs[1].is_ok(), "{name}: the good input still runs");
    assert_eq!((a.len(), b.len()), (0, prompt.len()));
}
