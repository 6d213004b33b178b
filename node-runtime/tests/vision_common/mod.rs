//! Shared by the vision tests: the image references of the tiny Idefics3 fixture
//! (tests/fixtures/vision/reference.json, made by make_vision_fixtures.py).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;
use unfed_node::client::image::{ImageLimits, ImageProcessorConfig, ProcessedImage, load_image};
use unfed_node::vision::VisionLanguageModel;

#[derive(Deserialize)]
pub struct Reference {
    pub prompt: String,
    pub image_seq_len: usize,
    pub jpeg: Jpeg,
    pub resizes: Vec<Resize>,
    pub padded_tile: Padded,
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Jpeg {
    pub image: String,
    pub size: [usize; 2],
    pub pil_mean_rgb: [f64; 3],
}

#[derive(Deserialize)]
pub struct Resize {
    pub from: [usize; 2],
    pub to: [usize; 2],
    pub sha256: String,
}

#[derive(Deserialize)]
pub struct Padded {
    pub image: String,
    pub real_rows: usize,
    pub real_cols: usize,
    pub features_row_norms: Vec<f64>,
    pub features_probe: f64,
}

#[derive(Deserialize)]
pub struct Case {
    pub image: String,
    pub do_image_splitting: bool,
    pub rows: usize,
    pub cols: usize,
    pub pixel_values_shape: Vec<usize>,
    pub pixel_u8_sha256: String,
    pub pixel_sum: f64,
    pub pixel_attention_mask_sum: u64,
    pub prompt_text: String,
    pub input_ids: Vec<u32>,
    pub features_shape: [usize; 2],
    pub features_row_norms: Vec<f64>,
    pub features_probe: f64,
    pub features_first_16: Vec<f64>,
    pub generated_ids: Vec<u32>,
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn model_dir() -> PathBuf {
    fixtures().join("models/idefics3-f32")
}

pub fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let path = fixtures().join("vision/reference.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    })
}

/// The whole checkpoint in one process (loaded once per test binary).
pub fn model() -> &'static VisionLanguageModel {
    static M: OnceLock<VisionLanguageModel> = OnceLock::new();
    M.get_or_init(|| VisionLanguageModel::load_checkpoint(&model_dir()).unwrap())
}

/// The case's image through the fixture's image processor settings.
pub fn preprocess(case: &Case) -> ProcessedImage {
    let mut cfg = ImageProcessorConfig::from_dir(&model_dir()).unwrap();
    cfg.do_image_splitting = case.do_image_splitting;
    let img = load_image(
        &fixtures().join("vision").join(&case.image),
        ImageLimits::default(),
    )
    .unwrap();
    cfg.preprocess(&img)
}

pub fn label(case: &Case) -> String {
    format!(
        "{} (splitting {})",
        case.image,
        if case.do_image_splitting { "on" } else { "off" }
    )
}
