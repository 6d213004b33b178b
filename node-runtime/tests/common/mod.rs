//! Shared helpers of the inference tests: fixtures, processes, polling.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod net;
pub mod relay;
pub mod web;

#[derive(Deserialize)]
pub struct Reference {
    pub cases: Vec<Case>,
    /// transformers' RoPE inverse frequencies (fixtures made since rope scaling).
    #[serde(default)]
    pub rope_inv_freq: Option<Vec<f32>>,
}

#[derive(Deserialize, Clone)]
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
}

pub fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

/// Every fixture checkpoint with a reference.json, sorted by name.
pub fn fixtures() -> Vec<(String, PathBuf, Reference)> {
    let mut out = Vec::new();
    let root = fixtures_root();
    let entries = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixtures missing at {}: {e}", root.display()));
    for e in entries {
        let dir = e.unwrap().path();
        let r = dir.join("reference.json");
        if r.is_file() {
            let reference: Reference =
                serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
            out.push((
                dir.file_name().unwrap().to_string_lossy().into_owned(),
                dir,
                reference,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        !out.is_empty(),
        "no fixture with reference.json under {}",
        root.display()
    );
    out
}

/// Fixtures of text-only models (a vision-language model is READY only with vision nodes).
pub fn text_fixtures() -> Vec<(String, PathBuf, Reference)> {
    fixtures()
        .into_iter()
        .filter(|(_, dir, _)| {
            unfed_model::ModelConfig::from_dir(dir).is_ok_and(|c| c.vision.is_none())
        })
        .collect()
}
