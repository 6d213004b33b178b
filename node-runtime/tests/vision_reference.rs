//! The vision path against transformers on the tiny Idefics3 fixture
//! (tests/fixtures/vision/reference.json, made by make_vision_fixtures.py): image
//! preprocessing and prompt expansion, image features, and image + text greedy ids.

mod vision_common;

use sha2::{Digest, Sha256};
use unfed_node::client::image::{
    ImageError, ImageLimits, RgbImage, decode_image, expand_image_prompt, load_image,
    resize_lanczos,
};
use unfed_node::engine::{SamplingConfig, WeightFiles};
use unfed_node::vision::{VisionInput, VisionLanguageModel, VisionModel, VisionOutput, VisionSpec};
use vision_common::{fixtures, label, model, model_dir, preprocess, reference};

fn rel_close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1e-3)
}

#[test]
fn preprocessing_matches_the_transformers_processor() {
    let r = reference();
    assert_eq!(r.cases.len(), 6);
    for case in &r.cases {
        let p = preprocess(case);
        let b = &p.batch;
        let what = label(case);
        assert_eq!(
            vec![1, b.tiles, b.channels, b.height, b.width],
            case.pixel_values_shape,
            "{what}"
        );
        assert_eq!((p.rows, p.cols), (case.rows, case.cols), "{what}");
        // Pixels back to the 8-bit values the resampler produced: identical resizes.
        let u8s: Vec<u8> = b
            .pixels
            .iter()
            .map(|&v| ((v as f64 * 0.5 + 0.5) * 255.0).round() as u8)
            .collect();
        assert_eq!(
            hex::encode(Sha256::digest(&u8s)),
            case.pixel_u8_sha256,
            "{what}: resized pixels differ"
        );
        let sum: f64 = b.pixels.iter().map(|&v| v as f64).sum();
        assert!(
            (sum - case.pixel_sum).abs() < 1e-2,
            "{what}: pixel sum {sum} vs {}",
            case.pixel_sum
        );
        assert_eq!(
            b.pixel_mask.iter().map(|&m| m as u64).sum::<u64>(),
            case.pixel_attention_mask_sum,
            "{what}"
        );
    }
}

#[test]
fn lanczos_resizes_are_bit_identical_to_pillow() {
    for r in &reference().resizes {
        let [w, h] = r.from;
        let mut src = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    src.push(((3 * x * x + 7 * y + 101 * c + (x * y) % 17) % 256) as u8);
                }
            }
        }
        let out = resize_lanczos(&src, w, h, 3, r.to[0], r.to[1]);
        assert_eq!(
            hex::encode(Sha256::digest(&out)),
            r.sha256,
            "{w}x{h} -> {}x{}",
            r.to[0],
            r.to[1]
        );
    }
}

#[test]
fn prompt_expansion_tokenizes_to_the_processor_input_ids() {
    let r = reference();
    let tok = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    for case in &r.cases {
        assert!(case.prompt_text.contains(&r.prompt));
        let text =
            expand_image_prompt(&case.prompt_text, &preprocess(case), r.image_seq_len).unwrap();
        let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ids, case.input_ids, "{}", label(case));
    }
}

#[test]
fn image_features_match_transformers_within_1e4_relative() {
    let r = reference();
    let m = model();
    assert_eq!(m.vision().image_seq_len(), r.image_seq_len);
    for case in &r.cases {
        let what = label(case);
        let feats = m.image_features(preprocess(case).batch).unwrap();
        let [rows, width] = case.features_shape;
        assert_eq!(feats.len(), rows * width, "{what}");
        for (i, (row, &want)) in feats
            .chunks_exact(width)
            .zip(&case.features_row_norms)
            .enumerate()
        {
            let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                rel_close(norm, want, 1e-4),
                "{what}: row {i} norm {norm} vs {want}"
            );
        }
        let probe: f64 = feats
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 * (i as f64 * 0.37).cos())
            .sum();
        let scale = case.features_row_norms.iter().sum::<f64>();
        assert!(
            (probe - case.features_probe).abs() <= 1e-4 * scale,
            "{what}: probe {probe} vs {}",
            case.features_probe
        );
        for (i, (&g, &w)) in feats.iter().zip(&case.features_first_16).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 * case.features_row_norms[0],
                "{what}: feature {i}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn a_partly_padded_tile_matches_transformers_bucketed_positions_and_masking() {
    let p = &reference().padded_tile;
    let case = reference()
        .cases
        .iter()
        .find(|c| c.image == p.image && !c.do_image_splitting)
        .unwrap();
    let mut batch = preprocess(case).batch;
    let (h, w) = (batch.height, batch.width);
    for (i, v) in batch.pixels.iter_mut().enumerate() {
        let (y, x) = ((i / w) % h, i % w);
        if y >= p.real_rows || x >= p.real_cols {
            *v = 0.0;
        }
    }
    for (i, m) in batch.pixel_mask.iter_mut().enumerate() {
        if (i / w) % h >= p.real_rows || i % w >= p.real_cols {
            *m = 0;
        }
    }
    let feats = model().image_features(batch).unwrap();
    let width = feats.len() / p.features_row_norms.len();
    for (i, (row, &want)) in feats
        .chunks_exact(width)
        .zip(&p.features_row_norms)
        .enumerate()
    {
        let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(rel_close(norm, want, 1e-4), "row {i} norm {norm} vs {want}");
    }
    let probe: f64 = feats
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 * (i as f64 * 0.37).cos())
        .sum();
    let scale = p.features_row_norms.iter().sum::<f64>();
    assert!(
        (probe - p.features_probe).abs() <= 1e-4 * scale,
        "probe {probe} vs {}",
        p.features_probe
    );
}

#[test]
fn a_vision_stack_split_in_two_shards_gives_the_same_features() {
    let m = model();
    let cfg = m.config().vision.clone().unwrap();
    let files = WeightFiles::open_checkpoint_dir(&model_dir()).unwrap();
    let hidden = m.config().text.hidden_size;
    let first = VisionSpec {
        layer_start: 0,
        layer_end: 1,
        has_embedding: true,
        has_head: false,
    };
    let last = VisionSpec {
        layer_start: 1,
        layer_end: cfg.num_hidden_layers,
        has_embedding: false,
        has_head: true,
    };
    let first = VisionModel::load(&cfg, hidden, first, &files).unwrap();
    let last = VisionModel::load(&cfg, hidden, last, &files).unwrap();
    let case = &reference().cases[0];
    let batch = preprocess(case).batch;
    let whole = m.image_features(batch.clone()).unwrap();
    let VisionOutput::Hidden(states) = first.forward(VisionInput::Pixels(batch.clone())).unwrap()
    else {
        panic!("the first vision shard returned features");
    };
    assert_eq!(states.patch_mask.len(), batch.tiles * 16);
    let VisionOutput::Features { rows, data } =
        last.forward(VisionInput::Hidden(states.clone())).unwrap()
    else {
        panic!("the last vision shard returned hidden states");
    };
    assert_eq!(rows * hidden, whole.len());
    assert_eq!(data, whole);
    // Each shard refuses the other's input.
    let err = last.forward(VisionInput::Pixels(batch)).err().unwrap();
    assert!(format!("{err:#}").contains("not vision shard 0"), "{err:#}");
    let err = first.forward(VisionInput::Hidden(states)).err().unwrap();
    assert!(format!("{err:#}").contains("expects pixels"), "{err:#}");
}

#[test]
fn image_and_text_greedy_generation_is_token_identical_to_transformers() {
    let r = reference();
    let m = model();
    for case in &r.cases {
        let feats = m.image_features(preprocess(case).batch).unwrap();
        let got = m
            .generate(
                &case.input_ids,
                Some(&feats),
                case.generated_ids.len(),
                SamplingConfig::default(),
                true,
            )
            .unwrap();
        assert_eq!(got, case.generated_ids, "{}", label(case));
    }
}

#[test]
fn feature_rows_must_match_the_placeholders() {
    let r = reference();
    let m = model();
    let case = &r.cases[1]; // one tile: 4 placeholders
    let feats = m.image_features(preprocess(&r.cases[0]).batch).unwrap(); // five tiles
    let err = m
        .generate(
            &case.input_ids,
            Some(&feats),
            1,
            SamplingConfig::default(),
            true,
        )
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("4 image placeholder tokens") && msg.contains("20 feature rows"),
        "{msg}"
    );
}

#[test]
fn jpeg_decodes_close_to_pillow() {
    let j = &reference().jpeg;
    let img = load_image(
        &fixtures().join("vision").join(&j.image),
        ImageLimits::default(),
    )
    .unwrap();
    assert_eq!([img.width, img.height], j.size);
    // JPEG decoders may differ by a level or two per pixel (IDCT, chroma upsampling).
    for c in 0..3 {
        let mean = img
            .data
            .iter()
            .skip(c)
            .step_by(3)
            .map(|&v| v as f64)
            .sum::<f64>()
            / (img.width * img.height) as f64;
        assert!(
            (mean - j.pil_mean_rgb[c]).abs() < 2.0,
            "channel {c}: {mean} vs {}",
            j.pil_mean_rgb[c]
        );
    }
}

#[test]
fn a_truncated_image_is_reported_as_corrupt() {
    let path = fixtures().join("vision/truncated.png");
    let err = load_image(&path, ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("truncated.png") && msg.contains("check that the file is complete"),
        "{msg}"
    );
}

#[test]
fn an_unsupported_format_names_the_format_and_the_fix() {
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
    let err = decode_image(gif, "cat.gif", ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("GIF images are not supported; convert it to PNG or JPEG"),
        "{err}"
    );
    let err =
        decode_image(b"hello, not an image", "notes.txt", ImageLimits::default()).unwrap_err();
    assert!(
        err.to_string().contains("notes.txt") && err.to_string().contains("PNG or JPEG"),
        "{err}"
    );
}

#[test]
fn images_over_the_limits_are_refused_before_decoding() {
    let path = fixtures().join("vision/square.png");
    let size = std::fs::metadata(&path).unwrap().len();
    let err = load_image(
        &path,
        ImageLimits {
            max_bytes: 1000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::TooManyBytes { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{size} bytes, over the limit of 1000 bytes")),
        "{err}"
    );
    let err = load_image(
        &path,
        ImageLimits {
            max_pixels: 80 * 79,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("80x80 pixels, over the limit of 6320 pixels"),
        "{err}"
    );
}

#[test]
fn an_image_for_a_text_only_model_is_refused() {
    let err = VisionLanguageModel::load_checkpoint(&fixtures().join("models/qwen2-f32"))
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("text-only model") && msg.contains("vision-language model"),
        "{msg}"
    );
}

#[test]
fn transparency_is_composited_onto_white() {
    // 2x1 RGBA PNG: opaque red, fully transparent black.
    let mut png = Vec::new();
    let img = image::RgbaImage::from_raw(2, 1, vec![255, 0, 0, 255, 0, 0, 0, 0]).unwrap();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let rgb: RgbImage = decode_image(&png, "alpha.png", ImageLimits::default()).unwrap();
    assert_eq!(rgb.data, vec![255, 0, 0, 255, 255, 255]);
}

fn codec_with_template(template: &str) -> unfed_node::client::TextCodec {
    let files = unfed_node::proto::GetManifestResponse {
        tokenizer_json: std::fs::read_to_string(model_dir().join("tokenizer.json")).unwrap(),
        chat_template: template.to_string(),
        ..Default::default()
    };
    unfed_node::client::TextCodec::from_manifest_files(&files, "idefics3-f32").unwrap()
}

#[test]
fn image_prompts_render_as_typed_content_parts_for_multimodal_templates() {
    // The shape of SmolVLM's template: it walks typed content parts.
    let typed = "{% for m in messages %}{{ m['role'] | capitalize }}:{% for part in m['content'] %}\
                 {% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}\
                 {% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";
    let codec = codec_with_template(typed);
    assert_eq!(
        codec.render_image_prompt("What is this?", false).unwrap(),
        "User:<image>What is this?<end_of_utterance>\nAssistant:"
    );
    assert_eq!(
        codec
            .render_image_prompt("Look: <image> now", false)
            .unwrap(),
        "User:Look: <image> now<end_of_utterance>\nAssistant:"
    );
    // A template that prints the content as text (the fixture's) gets the marked text.
    let plain = std::fs::read_to_string(model_dir().join("chat_template.jinja")).unwrap();
    let codec = codec_with_template(&plain);
    assert_eq!(
        codec.render_image_prompt("What is this?", false).unwrap(),
        codec.render_prompt("<image>What is this?", false).unwrap()
    );
    assert_eq!(
        codec.render_image_prompt("What is this?", true).unwrap(),
        "<image>What is this?"
    );
}
