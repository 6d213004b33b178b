//! Errors other code matches on. Every message names the file at fault and, where there is
//! one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a HuggingFace model directory (no config.json); pass the directory that holds config.json and the *.safetensors files", dir.display())]
    MissingConfig { dir: PathBuf },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported architecture {found}; supported: qwen2, qwen3, llama, mistral, idefics3")]
    UnsupportedArchitecture { found: String },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// A request that cannot be carried out as asked (e.g. more shards than layers).
    #[error("{msg}")]
    Invalid { msg: String },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
