//! Image prompts for vision-language models: decoding (PNG, JPEG), the preprocessing of
//! transformers' Idefics3 image processor (PIL backend) for the SmolVLM family, and the
//! prompt expansion with the image placeholder tokens.
//!
//! Preprocessing, in transformers' order: convert to RGB (transparency composited onto
//! white), resize so the longest edge is `size.longest_edge`, then either (splitting)
//! resize up to multiples of `max_image_size.longest_edge` and cut into that many square
//! tiles plus the whole image resized to one tile (the global image), or (no splitting)
//! resize to one square tile; rescale and normalise; pad to the largest tile with a
//! pixel mask. Every resize is Pillow's Lanczos on 8-bit pixels (see `resample`).

mod resample;

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::vision::{self, PixelBatch};

pub use resample::resize_lanczos;

/// The image placeholder and its framing tokens (Idefics3 processor).
pub const IMAGE_TOKEN: &str = "<image>";
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
pub const GLOBAL_IMAGE_TOKEN: &str = "<global-img>";
/// transformers caps any resized side at 4k.
const MAX_IMAGE_SIDE: usize = 4096;

/// Why an image cannot be used; every message says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "{source_name}: the image is {size} bytes, over the limit of {limit} bytes; downscale or recompress it"
    )]
    TooManyBytes {
        source_name: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "{source_name}: the image is {width}x{height} pixels, over the limit of {limit} pixels; downscale it"
    )]
    TooManyPixels {
        source_name: String,
        width: u64,
        height: u64,
        limit: u64,
    },
    #[error("{source_name}: {format} images are not supported; convert it to PNG or JPEG")]
    Unsupported { source_name: String, format: String },
    #[error(
        "{source_name}: not a readable PNG or JPEG image ({detail}); check that the file is complete"
    )]
    Corrupt { source_name: String, detail: String },
    #[error("{source_name}: cannot read the image file: {detail}")]
    Io { source_name: String, detail: String },
}

/// Size limits applied before and while decoding (a small file can decode to a huge image).
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_bytes: u64,
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 << 20,
            max_pixels: 40_000_000,
        }
    }
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    fn resize(&self, width: usize, height: usize) -> RgbImage {
        RgbImage {
            width,
            height,
            data: resize_lanczos(&self.data, self.width, self.height, 3, width, height),
        }
    }

    fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
        let (w, h) = (w.min(self.width - x), h.min(self.height - y));
        let mut data = Vec::with_capacity(w * h * 3);
        for row in y..y + h {
            data.extend_from_slice(
                &self.data[(row * self.width + x) * 3..(row * self.width + x + w) * 3],
            );
        }
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }
}

/// Reads and decodes an image file.
pub fn load_image(path: &Path, limits: ImageLimits) -> Result<RgbImage, ImageError> {
    let name = path.display().to_string();
    let io = |e: std::io::Error| ImageError::Io {
        source_name: name.clone(),
        detail: e.to_string(),
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            source_name: name,
            size,
            limit: limits.max_bytes,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    decode_image(&bytes, &name, limits)
}

/// Decodes PNG or JPEG bytes; `source_name` names the image in errors.
pub fn decode_image(
    bytes: &[u8],
    source_name: &str,
    limits: ImageLimits,
) -> Result<RgbImage, ImageError> {
    let name = source_name.to_string();
    if bytes.len() as u64 > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            source_name: name,
            size: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let corrupt = |e: &dyn std::fmt::Display| ImageError::Corrupt {
        source_name: name.clone(),
        detail: e.to_string(),
    };
    let open = || image::ImageReader::new(Cursor::new(bytes)).with_guessed_format();
    let mut reader = open().map_err(|e| corrupt(&e))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(ImageError::Unsupported {
                source_name: name,
                format: format!("{other:?}").to_uppercase(),
            });
        }
        None => {
            return Err(ImageError::Unsupported {
                source_name: name,
                format: "unrecognised (not PNG or JPEG)".into(),
            });
        }
    }
    let (w, h) = open()
        .map_err(|e| corrupt(&e))?
        .into_dimensions()
        .map_err(|e| corrupt(&e))?;
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            source_name: name,
            width: w as u64,
            height: h as u64,
            limit: limits.max_pixels,
        });
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    reader.limits(decoder_limits);
    let img = reader.decode().map_err(|e| corrupt(&e))?;
    Ok(to_rgb(img))
}

/// transformers' `convert_to_rgb`: transparency is composited onto white with Pillow's
/// `alpha_composite` integer arithmetic.
fn to_rgb(img: image::DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    if !img.color().has_alpha() {
        return RgbImage {
            width,
            height,
            data: img.into_rgb8().into_raw(),
        };
    }
    let rgba = img.into_rgba8().into_raw();
    let mut data = Vec::with_capacity(width * height * 3);
    for px in rgba.chunks_exact(4) {
        let a = px[3] as u32;
        for &c in &px[..3] {
            let v = if a == 0 {
                255
            } else {
                // Pillow: coef1 = a·128, coef2 = (255 − a)·128, then a rounded ÷255 and ≫7.
                let tmp = (c as u32 * a + 255 * (255 - a)) * 128 + (0x80 << 7);
                (((tmp >> 8) + tmp) >> 8) >> 7
            };
            data.push(v as u8);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// `{"longest_edge": n}` as written in preprocessor_config.json.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct LongestEdge {
    pub longest_edge: usize,
}

/// Where transformers 4 saves the image processor settings (flat).
pub const PREPROCESSOR_CONFIG_FILE: &str = "preprocessor_config.json";
/// Where transformers 5 saves them: nested under `"image_processor"`, with `image_seq_len`
/// beside it.
pub const PROCESSOR_CONFIG_FILE: &str = "processor_config.json";

/// The image processor settings of a checkpoint, from either file. `size` and
/// `max_image_size` fix the tiles, so they must be given; the rest default to SmolVLM's.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: LongestEdge,
    pub do_image_splitting: bool,
    pub max_image_size: LongestEdge,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub do_pad: bool,
    /// Placeholder rows per tile, as transformers 5's processor_config.json records it.
    #[serde(skip)]
    pub image_seq_len: Option<usize>,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            size: LongestEdge { longest_edge: 2048 },
            do_image_splitting: true,
            max_image_size: LongestEdge { longest_edge: 512 },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_pad: true,
            image_seq_len: None,
        }
    }
}

/// Preprocessed tiles and the grid they were cut into (0 × 0 = no split).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    pub batch: PixelBatch,
    pub rows: usize,
    pub cols: usize,
}

impl ImageProcessorConfig {
    /// Either layout: transformers 4's flat preprocessor_config.json, or transformers 5's
    /// processor_config.json with the settings under `"image_processor"`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let (settings, image_seq_len) = match value.get("image_processor") {
            Some(nested) => (
                nested.clone(),
                value
                    .get("image_seq_len")
                    .and_then(serde_json::Value::as_u64)
                    .map(|n| n as usize),
            ),
            None => (value, None),
        };
        for key in ["size", "max_image_size"] {
            if settings.get(key).is_none() {
                anyhow::bail!(
                    "no image processor `{key}` (neither a flat {PREPROCESSOR_CONFIG_FILE} nor an \"image_processor\" object as in {PROCESSOR_CONFIG_FILE})"
                );
            }
        }
        let mut cfg: Self =
            serde_json::from_value(settings).context("not a valid image processor config")?;
        if cfg.size.longest_edge == 0 || cfg.max_image_size.longest_edge == 0 {
            anyhow::bail!("`size.longest_edge` and `max_image_size.longest_edge` must be positive");
        }
        cfg.image_seq_len = image_seq_len;
        Ok(cfg)
    }

    /// The settings file of a checkpoint or split directory: preprocessor_config.json
    /// (transformers 4) or processor_config.json (transformers 5), as text and name.
    pub fn file_in(dir: &Path) -> Result<(String, &'static str)> {
        for name in [PREPROCESSOR_CONFIG_FILE, PROCESSOR_CONFIG_FILE] {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => return Ok((text, name)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
            }
        }
        anyhow::bail!(
            "{} has no image processor settings: neither {PREPROCESSOR_CONFIG_FILE} nor {PROCESSOR_CONFIG_FILE}; \
             a vision-language checkpoint is saved with one of them (copy it from the model's repository)",
            dir.display()
        )
    }

    /// The settings in `dir`, from either file; an error names the files looked for.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let (text, name) = Self::file_in(dir)?;
        Self::from_json(&text).with_context(|| format!("{}", dir.join(name).display()))
    }

    /// Tiles for the vision tower, exactly as transformers' processor makes them.
    pub fn preprocess(&self, image: &RgbImage) -> ProcessedImage {
        let mut img = image.clone();
        if self.do_resize {
            let (h, w) = rescale_to_max_len(img.height, img.width, self.size.longest_edge);
            let (h, w) = scale_below_upper_bound(h, w, MAX_IMAGE_SIDE);
            img = img.resize(w, h);
        }
        let tile = self.max_image_size.longest_edge;
        let (frames, rows, cols) = if self.do_image_splitting {
            let (h, w) = resize_for_vision_encoder(img.height, img.width, tile);
            let img = img.resize(w, h);
            if img.height > tile || img.width > tile {
                let rows = (img.height - tile) / tile + 1;
                let cols = (img.width - tile) / tile + 1;
                let mut frames: Vec<RgbImage> = (0..rows)
                    .flat_map(|r| (0..cols).map(move |c| (r, c)))
                    .map(|(r, c)| img.crop(c * tile, r * tile, tile, tile))
                    .collect();
                frames.push(img.resize(tile, tile));
                (frames, rows, cols)
            } else {
                (vec![img], 0, 0)
            }
        } else {
            (vec![img.resize(tile, tile)], 0, 0)
        };
        let height = frames.iter().map(|f| f.height).max().unwrap_or(0);
        let width = frames.iter().map(|f| f.width).max().unwrap_or(0);
        let (tiles, plane) = (frames.len(), height * width);
        let mut pixels = vec![0f32; tiles * 3 * plane];
        let mut pixel_mask = vec![0u8; tiles * plane];
        for (t, f) in frames.iter().enumerate() {
            for y in 0..f.height {
                for x in 0..f.width {
                    pixel_mask[t * plane + y * width + x] = 1;
                    for c in 0..3 {
                        pixels[(t * 3 + c) * plane + y * width + x] =
                            self.pixel_value(f.data[(y * f.width + x) * 3 + c], c);
                    }
                }
            }
        }
        ProcessedImage {
            batch: PixelBatch {
                tiles,
                channels: 3,
                height,
                width,
                pixels,
                pixel_mask,
            },
            rows,
            cols,
        }
    }

    /// numpy's rescale (float64 product cast to float32) then normalise in float32.
    fn pixel_value(&self, v: u8, channel: usize) -> f32 {
        let mut x = if self.do_rescale {
            (v as f64 * self.rescale_factor) as f32
        } else {
            v as f32
        };
        if self.do_normalize {
            x = (x - self.image_mean[channel]) / self.image_std[channel];
        }
        x
    }
}

/// Longest edge to `max_len`, aspect kept, the other edge rounded up to even.
fn rescale_to_max_len(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (h, w) = if width >= height {
        let h = (max_len as f64 / aspect) as usize;
        (h + h % 2, max_len)
    } else {
        let w = (max_len as f64 * aspect) as usize;
        (max_len, w + w % 2)
    };
    (h.max(1), w.max(1))
}

fn scale_below_upper_bound(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if width >= height && width > max_len {
        w = max_len;
        h = (w as f64 / aspect) as usize;
    } else if height > width && height > max_len {
        h = max_len;
        w = (h as f64 * aspect) as usize;
    }
    (h.max(1), w.max(1))
}

/// Both edges up to multiples of the tile size, the longer one first (transformers'
/// `resize_for_vision_encoder`, including its use of the rounded-up edge for the other).
fn resize_for_vision_encoder(height: usize, width: usize, tile: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let up = |v: f64| (v / tile as f64).ceil() as usize * tile;
    if width >= height {
        let w = up(width as f64);
        let h = (w as f64 / aspect) as usize;
        (up(h as f64), w)
    } else {
        let h = up(height as f64);
        let w = (h as f64 * aspect) as usize;
        (h, up(w as f64))
    }
}

/// The text that replaces one `<image>` for an image cut into `rows × cols` tiles
/// (0 × 0: the global image only), `image_seq_len` placeholders per tile.
pub fn image_prompt_text(rows: usize, cols: usize, image_seq_len: usize) -> String {
    let placeholders = IMAGE_TOKEN.repeat(image_seq_len);
    let global = format!("{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{placeholders}{FAKE_IMAGE_TOKEN}");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut text = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            text.push_str(&format!(
                "{FAKE_IMAGE_TOKEN}<row_{r}_col_{c}>{placeholders}"
            ));
        }
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&global);
    text
}

/// Replaces the single `<image>` of `prompt` with the expansion for `image`. The prompt
/// must mention the image exactly once (where it goes in the conversation).
pub fn expand_image_prompt(
    prompt: &str,
    image: &ProcessedImage,
    image_seq_len: usize,
) -> Result<String> {
    let n = prompt.matches(IMAGE_TOKEN).count();
    if n != 1 {
        anyhow::bail!(
            "the prompt contains {n} `{IMAGE_TOKEN}` markers but one image was given; put exactly one `{IMAGE_TOKEN}` \
             where the image belongs (or none, and the client puts it before the text)"
        );
    }
    Ok(prompt.replacen(
        IMAGE_TOKEN,
        &image_prompt_text(image.rows, image.cols, image_seq_len),
        1,
    ))
}

/// The user message for an image prompt: the text as given when it places `<image>`
/// itself, else the image first (SmolVLM's convention).
pub fn user_message_with_image(text: &str) -> String {
    if text.contains(IMAGE_TOKEN) {
        text.to_string()
    } else {
        format!("{IMAGE_TOKEN}{text}")
    }
}

/// An image + text prompt ready for `Client::generate_with_image`.
pub struct ImagePrompt {
    /// The chat prompt with the image expanded into its placeholder tokens.
    pub prompt_ids: Vec<u32>,
    /// `[rows, hidden]` image features from the vision shards, one row per placeholder.
    pub features: unfed_proto::Tensor,
    /// Tiles the image was cut into (including the global image).
    pub tiles: usize,
}

/// Everything `chat --image` needs before generating: checks that `model` is a
/// vision-language model, decodes and preprocesses the image with the model's
/// preprocessor_config.json (as the registry serves it), renders and expands the prompt,
/// and runs the image through the model's vision shards.
pub async fn image_prompt(
    client: &mut super::Client,
    registry: &str,
    model: &str,
    user_text: &str,
    image: &Path,
    raw: bool,
    limits: ImageLimits,
) -> Result<ImagePrompt> {
    let img = load_image(image, limits)?;
    image_prompt_decoded(client, registry, model, user_text, &img, raw).await
}

/// `image_prompt` for an image already decoded (e.g. uploaded to the dashboard).
pub async fn image_prompt_decoded(
    client: &mut super::Client,
    registry: &str,
    model: &str,
    user_text: &str,
    img: &RgbImage,
    raw: bool,
) -> Result<ImagePrompt> {
    image_prompt_with(client, registry, model, img, |codec| {
        codec.render_image_prompt(user_text, raw)
    })
    .await
}

/// `image_prompt_decoded` with the text rendered by `render` (e.g. a whole conversation
/// through `TextCodec::render_conversation`); it must place the `<image>` marker.
pub async fn image_prompt_with(
    client: &mut super::Client,
    registry: &str,
    model: &str,
    img: &RgbImage,
    render: impl FnOnce(&super::text::TextCodec) -> Result<String>,
) -> Result<ImagePrompt> {
    let (manifest, files) = client.manifest(model).await?;
    let Some(vision) = &manifest.config.vision else {
        anyhow::bail!(
            "`{model}` is a text-only model ({}) and cannot take --image; pick a vision-language model \
             such as SmolVLM (`unfedctl models` lists them)",
            manifest.config.model_type
        );
    };
    // Never another model's defaults: their tiles would not match this vision stack.
    if files.preprocessor_config_json.is_empty() {
        anyhow::bail!(
            "the registry serves no image processor settings for `{model}`: its split has neither \
             {PREPROCESSOR_CONFIG_FILE} nor {PROCESSOR_CONFIG_FILE}; copy the one the checkpoint was \
             saved with into the model directory and split it again"
        );
    }
    let processor =
        ImageProcessorConfig::from_json(&files.preprocessor_config_json).with_context(|| {
            format!("the image processor settings the registry serves for `{model}`")
        })?;
    let seq_len = crate::vision::image_seq_len(vision);
    if let Some(n) = processor.image_seq_len.filter(|n| *n != seq_len) {
        anyhow::bail!(
            "`{model}`'s {PROCESSOR_CONFIG_FILE} says image_seq_len {n}, but its vision config makes {seq_len} rows per tile; the checkpoint's files disagree"
        );
    }
    let processed = processor.preprocess(img);
    let codec = super::text::TextCodec::from_manifest_files(&files, model)?;
    let text = render(&codec)?;
    let expanded = expand_image_prompt(&text, &processed, seq_len)?;
    // transformers' processor tokenizes the expanded text with special tokens on.
    let prompt_ids = codec.encode_prompt(&expanded, true)?;
    let net = client.net().clone();
    // A vision node that fails is banned and the tiles go through another replica of
    // its shard (each attempt bans one node, so this ends).
    let (data, rows) = loop {
        let bans = &client.bans;
        let banned = |id: &str| bans.is_banned(id);
        let shards = vision::service::vision_route(&net, registry, model, &banned).await?;
        let encoded = vision::service::encode_image(&net, &shards, model, &processed.batch).await;
        let failed = match &encoded {
            Err(e) => e.downcast_ref::<vision::service::EncodeFailed>(),
            Ok(_) => None,
        };
        match failed {
            Some(f) if super::failover::replayable_code(f.code) => {
                let (hop, why) = (f.hop.clone(), format!("{f}"));
                tracing::warn!(node = hop.node_id, "failing over: {why}");
                client.bans.ban(&hop, &why);
            }
            _ => break encoded?,
        }
    };
    let width = data.len() / rows.max(1);
    Ok(ImagePrompt {
        prompt_ids,
        features: crate::wire::encode(&data, &[rows, width], unfed_proto::DType::DtypeF32),
        tiles: processed.batch.tiles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAT: &str = r#"{"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 128},
        "max_image_size": {"longest_edge": 64}, "do_image_splitting": true}"#;

    #[test]
    fn both_layouts_read_the_same_settings() {
        let flat = ImageProcessorConfig::from_json(FLAT).unwrap();
        let nested = format!(
            r#"{{"image_processor": {FLAT}, "image_seq_len": 4, "processor_class": "Idefics3Processor"}}"#
        );
        let nested = ImageProcessorConfig::from_json(&nested).unwrap();
        assert_eq!(nested.image_seq_len, Some(4));
        assert_eq!(
            ImageProcessorConfig {
                image_seq_len: None,
                ..nested
            },
            flat
        );
        assert_eq!(flat.max_image_size.longest_edge, 64);
    }

    #[test]
    fn settings_without_tile_sizes_are_an_error_not_another_models_defaults() {
        let err = ImageProcessorConfig::from_json(
            r#"{"image_seq_len": 4, "processor_class": "Idefics3Processor"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no image processor `size`"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            ImageProcessorConfig::from_dir(dir.path()).unwrap_err()
        );
        assert!(
            err.contains("neither preprocessor_config.json nor processor_config.json"),
            "{err}"
        );
        std::fs::write(
            dir.path().join(PROCESSOR_CONFIG_FILE),
            format!(r#"{{"image_processor": {FLAT}}}"#),
        )
        .unwrap();
        assert_eq!(
            ImageProcessorConfig::from_dir(dir.path())
                .unwrap()
                .size
                .longest_edge,
            128
        );
    }
}
