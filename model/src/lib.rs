//! Model tools shared by `unfedctl` and `unfed-node`: reading HuggingFace checkpoint
//! directories, the shard manifest, splitting, verifying, and the built-in tiny model.

pub mod builtin;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod hashing;
pub mod hf;
pub mod inspect;
pub mod layout;
pub mod manifest;
pub mod paths;
pub mod safetensors_io;
pub mod split;
pub mod verify;

pub use checkpoint::{Checkpoint, TensorInfo, TensorView};
pub use config::{
    Architecture, DType, ModelConfig, RopeScaling, SlidingWindow, TextConfig, VisionConfig,
};
pub use error::ModelError;
pub use manifest::{FileEntry, Manifest, ShardEntry, Stack, TensorEntry};
