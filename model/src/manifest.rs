//! `manifest.json` written by split and read by verify, the registry and the nodes.
//!
//! INTERFACE CONTRACT: extend, do not rename. Shard files are
//! `text_shard_{i}.safetensors` / `vision_shard_{i}.safetensors` beside the manifest.

use serde::{Deserialize, Serialize};

use crate::config::{Architecture, DType, ModelConfig};

pub const MANIFEST_FILE: &str = "manifest.json";
/// 2: the config carries RoPE scaling, sliding windows and per-head q/k norms; a
/// version-1 split of a model with them would run without them.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    Text,
    Vision,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub index: usize,
    pub stack: Stack,
    /// Global layer range `[layer_start, layer_end)`.
    pub layer_start: usize,
    pub layer_end: usize,
    pub has_embedding: bool,
    pub has_head: bool,
    /// File name relative to the manifest's directory.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// sha256 of each 4 MiB chunk of `file`, in order.
    pub chunk_sha256: Vec<String>,
    pub tensors: Vec<TensorEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// Stable id: `name` from the checkpoint (directory name or `_name_or_path`), never a path.
    pub model_id: String,
    pub architecture: Architecture,
    pub dtype: DType,
    /// The normalised config, so nodes need nothing else to build their layers.
    pub config: ModelConfig,
    pub shards: Vec<ShardEntry>,
    /// Other files copied beside the shards (config.json, tokenizer.json, ...).
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// A non-shard file of the split directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

impl Manifest {
    pub fn text_shards(&self) -> impl Iterator<Item = &ShardEntry> {
        self.shards.iter().filter(|s| s.stack == Stack::Text)
    }
    pub fn vision_shards(&self) -> impl Iterator<Item = &ShardEntry> {
        self.shards.iter().filter(|s| s.stack == Stack::Vision)
    }
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    pub fn load(dir: &std::path::Path) -> crate::error::Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(crate::error::io_err(&path))?;
        serde_json::from_str(&text)
            .map_err(|source| crate::error::ModelError::Json { path, source })
    }

    /// Reads `dir/manifest.json` for serving: a split in another format is refused, since
    /// its config may lack what this build runs (see [`FORMAT_VERSION`]).
    pub fn load_current(dir: &std::path::Path) -> crate::error::Result<Self> {
        let m = Self::load(dir)?;
        m.check_current(dir)?;
        Ok(m)
    }

    /// Refuses a manifest (read from `dir`) in another format than this build's.
    pub fn check_current(&self, dir: &std::path::Path) -> crate::error::Result<()> {
        if self.format_version == FORMAT_VERSION {
            return Ok(());
        }
        Err(crate::error::ModelError::Invalid {
            msg: format!(
                "{} is split format {}, this build reads format {FORMAT_VERSION}: split \
                 the model again (`unfedctl split`; `unfedctl up` re-splits by itself)",
                dir.join(MANIFEST_FILE).display(),
                self.format_version
            ),
        })
    }

    pub fn text_shard_file(index: usize) -> String {
        format!("text_shard_{index}.safetensors")
    }

    pub fn vision_shard_file(index: usize) -> String {
        format!("vision_shard_{index}.safetensors")
    }
}
