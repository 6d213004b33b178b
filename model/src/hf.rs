//! Parsing `config.json` (and `generation_config.json`) as transformers 4.x and 5.x write
//! them into the normalised [`ModelConfig`].
//!
//! transformers only omits keys of the base `PretrainedConfig` when they equal its default,
//! so model-specific keys are normally present; the per-architecture defaults below mirror
//! the transformers config classes for the rare hand-written file that leaves them out.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::checkpoint::Checkpoint;
use crate::config::{
    Architecture, DType, ModelConfig, RopeScaling, SlidingWindow, TextConfig, VisionConfig,
};
use crate::error::{ModelError, Result, io_err};

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Defaults of one transformers text config class.
struct TextDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// `None`: same as the attention heads.
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    attention_bias: bool,
    /// Which layers slide their attention window when config.json has no `layer_types`.
    windows: Windows,
    /// Per-head q/k RMSNorm before RoPE.
    qk_norm: bool,
}

/// How a transformers text class decides its sliding-window layers.
enum Windows {
    /// Never (Llama).
    Never,
    /// Every layer, when `sliding_window` is set; its default when the key is absent.
    AllLayers(Option<usize>),
    /// Layers from `max_window_layers` on, when `use_sliding_window` is true (Qwen2).
    FromMaxWindowLayers,
}

const QWEN2: TextDefaults = TextDefaults {
    vocab_size: 151936,
    hidden_size: 4096,
    intermediate_size: 22016,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    attention_bias: true,
    windows: Windows::FromMaxWindowLayers,
    qk_norm: false,
};
const QWEN3: TextDefaults = TextDefaults {
    vocab_size: 151936,
    hidden_size: 4096,
    intermediate_size: 22016,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(32),
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    attention_bias: false,
    windows: Windows::FromMaxWindowLayers,
    qk_norm: true,
};
const LLAMA: TextDefaults = TextDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    attention_bias: false,
    windows: Windows::Never,
    qk_norm: false,
};
const MISTRAL: TextDefaults = TextDefaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: Some(8),
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-6,
    attention_bias: false,
    windows: Windows::AllLayers(Some(4096)),
    qk_norm: false,
};

impl Architecture {
    /// Recognises `model_type` (or, failing that, the `architectures` class name).
    pub fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type.to_ascii_lowercase().as_str() {
            "qwen2" | "qwen2forcausallm" => Ok(Self::Qwen2),
            "qwen3" | "qwen3forcausallm" => Ok(Self::Qwen3),
            "llama" | "llamaforcausallm" => Ok(Self::Llama),
            "mistral" | "mistralforcausallm" => Ok(Self::Mistral),
            "idefics3" | "smolvlm" | "idefics3forconditionalgeneration" => Ok(Self::Idefics3),
            _ => Err(ModelError::UnsupportedArchitecture {
                found: model_type.to_string(),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Idefics3 => "idefics3",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DType {
    /// transformers' spelling: "float32", "float16", "bfloat16" (also "torch.float32").
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Some(Self::F32),
            "float16" | "half" => Some(Self::F16),
            "bfloat16" => Some(Self::Bf16),
            _ => None,
        }
    }

    /// safetensors' spelling: "F32", "F16", "BF16".
    pub fn from_safetensors(name: &str) -> Option<Self> {
        match name {
            "F32" => Some(Self::F32),
            "F16" => Some(Self::F16),
            "BF16" => Some(Self::Bf16),
            _ => None,
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ModelConfig {
    /// Reads `dir/config.json` (plus `generation_config.json` when present, for the EOS
    /// ids). When the config names no dtype, or no `tie_word_embeddings`, the checkpoint's
    /// tensors decide: their dtype, and "tied" when there is no `lm_head.weight`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(ModelError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let raw: Value = parse_json(&path, &text)?;
        let mut cfg = Self::from_value(&raw, &path)?;

        let gen_path = dir.join(GENERATION_CONFIG_FILE);
        if gen_path.is_file() {
            let gen_text = std::fs::read_to_string(&gen_path).map_err(io_err(&gen_path))?;
            let gen_raw: Value = parse_json(&gen_path, &gen_text)?;
            for id in token_ids(gen_raw.get("eos_token_id"), &gen_path, "eos_token_id")? {
                if !cfg.text.eos_token_ids.contains(&id) {
                    cfg.text.eos_token_ids.push(id);
                }
            }
            if cfg.text.bos_token_id.is_none() {
                cfg.text.bos_token_id =
                    token_ids(gen_raw.get("bos_token_id"), &gen_path, "bos_token_id")?
                        .first()
                        .copied();
            }
        }

        if Checkpoint::has_weights(dir) {
            let ckpt = Checkpoint::open(dir)?;
            if !has_key(&raw, "torch_dtype")
                && !has_key(&raw, "dtype")
                && let Some(dtype) = ckpt.dominant_dtype()
            {
                cfg.dtype = dtype;
            }
            let lm_head = ckpt.contains("lm_head.weight");
            let declared = tie_declared(&raw);
            if declared.is_none() || (declared == Some(false) && !lm_head) {
                // A checkpoint without a head can only run tied.
                cfg.text.tie_word_embeddings = !lm_head;
            }
        }
        Ok(cfg)
    }

    /// Parses the text of a `config.json`. Defaults follow the transformers config classes.
    pub fn from_json(text: &str) -> Result<Self> {
        let path = PathBuf::from(CONFIG_FILE);
        let raw = parse_json(&path, text)?;
        Self::from_value(&raw, &path)
    }

    fn from_value(raw: &Value, path: &Path) -> Result<Self> {
        let obj = raw.as_object().ok_or_else(|| ModelError::Config {
            path: path.to_path_buf(),
            msg: "expected a JSON object at the top level".into(),
        })?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                obj.get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| ModelError::Config {
                path: path.to_path_buf(),
                msg: "no `model_type` (nor `architectures`); is this a transformers config.json?"
                    .into(),
            })?;
        let architecture = Architecture::from_model_type(&model_type)?;
        let reader = Reader { path };

        let (text, vision, text_prefix) = match architecture {
            Architecture::Qwen2 => (reader.text(obj, &QWEN2, obj)?, None, "model."),
            Architecture::Qwen3 => (reader.text(obj, &QWEN3, obj)?, None, "model."),
            Architecture::Llama => (reader.text(obj, &LLAMA, obj)?, None, "model."),
            Architecture::Mistral => (reader.text(obj, &MISTRAL, obj)?, None, "model."),
            Architecture::Idefics3 => {
                let empty = Map::new();
                let text_obj = obj
                    .get("text_config")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty);
                let vision_obj = obj
                    .get("vision_config")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty);
                let text = reader.text(text_obj, &LLAMA, obj)?;
                let vision = reader.vision(vision_obj, obj)?;
                (text, Some(vision), "model.text_model.")
            }
        };

        let dtype = match obj
            .get("dtype")
            .or_else(|| obj.get("torch_dtype"))
            .or_else(|| obj.get("text_config").and_then(|t| t.get("dtype")))
            .or_else(|| obj.get("text_config").and_then(|t| t.get("torch_dtype")))
        {
            None | Some(Value::Null) => DType::F32,
            Some(v) => {
                let name = v.as_str().unwrap_or_default();
                DType::from_torch_name(name).ok_or_else(|| ModelError::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                        "unsupported dtype {v}; supported: float32, float16, bfloat16 \
                         (convert the checkpoint with transformers first)"
                    ),
                })?
            }
        };

        Ok(ModelConfig {
            architecture,
            model_type,
            dtype,
            text,
            vision,
            text_prefix: text_prefix.to_string(),
        })
    }
}

fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn has_key(raw: &Value, key: &str) -> bool {
    raw.get(key).is_some_and(|v| !v.is_null())
        || raw
            .get("text_config")
            .and_then(|t| t.get(key))
            .is_some_and(|v| !v.is_null())
}

fn tie_declared(raw: &Value) -> Option<bool> {
    raw.get("tie_word_embeddings")
        .or_else(|| raw.get("text_config")?.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
}

/// A token id field: an integer, a list of integers, or null.
fn token_ids(v: Option<&Value>, path: &Path, key: &str) -> Result<Vec<u32>> {
    let bad = || ModelError::Config {
        path: path.to_path_buf(),
        msg: format!("`{key}` must be a token id or a list of token ids"),
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => Ok(vec![
            n.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad)?,
        ]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Typed reads of optional keys, with errors naming the file and key.
struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, key: &str, want: &str) -> ModelError {
        ModelError::Config {
            path: self.path.to_path_buf(),
            msg: format!("`{key}` must be {want}"),
        }
    }

    fn usize(&self, obj: &Map<String, Value>, key: &str, default: usize) -> Result<usize> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, "a non-negative integer")),
        }
    }

    fn f64(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a number")),
        }
    }

    fn bool(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "true or false")),
        }
    }

    fn string(&self, obj: &Map<String, Value>, key: &str, default: &str) -> Result<String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err(key, "a string")),
        }
    }

    /// `obj` is the decoder's config; `top` the whole file (Idefics3 keeps some keys there).
    fn text(
        &self,
        obj: &Map<String, Value>,
        d: &TextDefaults,
        top: &Map<String, Value>,
    ) -> Result<TextConfig> {
        let hidden_size = self.usize(obj, "hidden_size", d.hidden_size)?;
        let num_attention_heads = self.usize(obj, "num_attention_heads", d.num_attention_heads)?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err(self.err("num_attention_heads", "positive, as must `hidden_size`"));
        }
        let num_key_value_heads = self.usize(
            obj,
            "num_key_value_heads",
            d.num_key_value_heads.unwrap_or(num_attention_heads),
        )?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                &format!("a positive divisor of num_attention_heads ({num_attention_heads})"),
            ));
        }
        let head_dim = self.usize(obj, "head_dim", hidden_size / num_attention_heads)?;
        // transformers 5.x moved rope_theta into rope_parameters.
        let rope_theta = match self.f64(obj, "rope_theta")? {
            Some(t) => t,
            None => match obj.get("rope_parameters").and_then(Value::as_object) {
                Some(params) => self.f64(params, "rope_theta")?.unwrap_or(10000.0),
                None => 10000.0,
            },
        };
        let tie_word_embeddings = match self.bool(obj, "tie_word_embeddings")? {
            Some(t) => t,
            None => self.bool(top, "tie_word_embeddings")?.unwrap_or(false),
        };
        let attention_bias = self
            .bool(obj, "attention_bias")?
            .unwrap_or(d.attention_bias);
        let mut eos_token_ids = token_ids(obj.get("eos_token_id"), self.path, "eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = token_ids(top.get("eos_token_id"), self.path, "eos_token_id")?;
        }
        let bos_token_id = token_ids(obj.get("bos_token_id"), self.path, "bos_token_id")?
            .first()
            .copied();
        let num_hidden_layers = self.usize(obj, "num_hidden_layers", d.num_hidden_layers)?;
        Ok(TextConfig {
            sliding_window: self.sliding_window(obj, d, num_hidden_layers)?,
            hidden_size,
            intermediate_size: self.usize(obj, "intermediate_size", d.intermediate_size)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64(obj, "rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
            rope_theta,
            rope_scaling: self.rope_scaling(obj)?,
            max_position_embeddings: self.usize(
                obj,
                "max_position_embeddings",
                d.max_position_embeddings,
            )?,
            vocab_size: self.usize(obj, "vocab_size", d.vocab_size)?,
            tie_word_embeddings,
            attention_bias,
            qk_norm: d.qk_norm,
            hidden_act: self.string(obj, "hidden_act", "silu")?,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// The sliding-window layers: `layer_types` when listed (transformers 5.x), else
    /// the class's rule over `sliding_window`, `use_sliding_window`, `max_window_layers`.
    fn sliding_window(
        &self,
        obj: &Map<String, Value>,
        d: &TextDefaults,
        layers: usize,
    ) -> Result<Option<SlidingWindow>> {
        if matches!(d.windows, Windows::Never) {
            return Ok(None);
        }
        let window = match (obj.get("sliding_window"), &d.windows) {
            (None, Windows::AllLayers(default)) => *default,
            (None | Some(Value::Null), _) => None,
            (Some(v), _) => Some(
                v.as_u64()
                    .filter(|w| *w > 0)
                    .ok_or_else(|| self.err("sliding_window", "a positive integer or null"))?
                    as usize,
            ),
        };
        let windowed: Vec<usize> = match obj.get("layer_types").filter(|v| !v.is_null()) {
            Some(types) => {
                let want =
                    format!("a list of {layers} \"full_attention\" or \"sliding_attention\"");
                let types = types
                    .as_array()
                    .filter(|t| t.len() == layers)
                    .ok_or_else(|| self.err("layer_types", &want))?;
                let mut out = Vec::new();
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        Some("sliding_attention") => out.push(i),
                        Some("full_attention") => {}
                        _ => return Err(self.err("layer_types", &want)),
                    }
                }
                out
            }
            None => match d.windows {
                Windows::AllLayers(_) if window.is_some() => (0..layers).collect(),
                Windows::FromMaxWindowLayers
                    if self.bool(obj, "use_sliding_window")?.unwrap_or(false) =>
                {
                    (self.usize(obj, "max_window_layers", 28)?..layers).collect()
                }
                _ => Vec::new(),
            },
        };
        // Without a window size no layer slides, as in transformers.
        Ok(window
            .filter(|_| !windowed.is_empty())
            .map(|window| SlidingWindow {
                window,
                layers: windowed,
            }))
    }

    /// `rope_scaling` (transformers 4.x) or the scaling part of `rope_parameters` (5.x).
    fn rope_scaling(&self, obj: &Map<String, Value>) -> Result<RopeScaling> {
        let found = ["rope_scaling", "rope_parameters"]
            .into_iter()
            .find_map(|k| obj.get(k).filter(|v| !v.is_null()).map(|v| (k, v)));
        let Some((key, params)) = found else {
            return Ok(RopeScaling::Default);
        };
        let p = params
            .as_object()
            .ok_or_else(|| self.err(key, "an object"))?;
        let kind = match p.get("rope_type").or_else(|| p.get("type")) {
            None | Some(Value::Null) => "default",
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(&format!("{key}.rope_type"), "a string"))?,
        };
        let positive = |field: &str| -> Result<f64> {
            let name = format!("{key}.{field}");
            match p.get(field).and_then(Value::as_f64) {
                Some(x) if x > 0.0 && x.is_finite() => Ok(x),
                _ => Err(self.err(
                    &name,
                    &format!("a positive number (rope_type \"{kind}\" needs it)"),
                )),
            }
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: positive("factor")?,
            }),
            "llama3" => {
                let (low, high) = (positive("low_freq_factor")?, positive("high_freq_factor")?);
                if high <= low {
                    return Err(self.err(
                        &format!("{key}.high_freq_factor"),
                        &format!(
                            "greater than low_freq_factor ({low}), or the blend divides by zero"
                        ),
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: positive("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: positive("original_max_position_embeddings")?,
                })
            }
            other => Err(ModelError::Config {
                path: self.path.to_path_buf(),
                msg: format!(
                    "`{key}.rope_type` \"{other}\" is not supported; supported: default, linear, \
                     llama3. Outputs would differ from transformers, so the model is refused \
                     rather than run with other position frequencies"
                ),
            }),
        }
    }

    /// Defaults follow transformers' `Idefics3VisionConfig`.
    fn vision(&self, obj: &Map<String, Value>, top: &Map<String, Value>) -> Result<VisionConfig> {
        Ok(VisionConfig {
            hidden_size: self.usize(obj, "hidden_size", 1152)?,
            intermediate_size: self.usize(obj, "intermediate_size", 3072)?,
            num_hidden_layers: self.usize(obj, "num_hidden_layers", 12)?,
            num_attention_heads: self.usize(obj, "num_attention_heads", 16)?,
            image_size: self.usize(obj, "image_size", 224)?,
            patch_size: self.usize(obj, "patch_size", 32)?,
            num_channels: self.usize(obj, "num_channels", 3)?,
            layer_norm_eps: self.f64(obj, "layer_norm_eps")?.unwrap_or(1e-6),
            hidden_act: self.string(obj, "hidden_act", "gelu_pytorch_tanh")?,
            scale_factor: self.usize(top, "scale_factor", 2)?,
            image_token_id: self.usize(top, "image_token_id", 128257)? as u32,
        })
    }
}
